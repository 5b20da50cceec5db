//! Calibration on candle. For now: the float reference model everything is checked against.

pub mod float;
mod pool;

pub use float::{BnStats, FloatModel, Forward};
