//! The compiler tests' helpers live in the `diffdfq-support` crate (shared with the examples).
#![allow(unused_imports)]

pub use diffdfq_support::*;
