//! The op table: every ONNX op the importer accepts, once. The `--inspect` error
//! ([`super::unsupported_ops`]), the builder's dispatch, the README's op list (checked by
//! `tests/onnx_node.rs`) and the ONNX node-test filter all read it.

use tract_onnx::pb;

use super::builder::Builder;
use super::proto::Attrs;
use crate::graph::{Activation, Op, ValueId};
use crate::Error;

/// A node whose first input is an activation (or, with [`OpSpec::constant_operands`], may be a
/// constant: then `x` is `usize::MAX` and `xs` empty).
pub(super) struct Site<'a> {
    pub n: &'a pb::NodeProto,
    pub name: &'a str,
    pub x: ValueId,
    pub xs: Vec<usize>,
    pub a: Attrs<'a>,
}

type NetworkFn = fn(&mut Builder, &Site) -> Result<(), Error>;
type SourceFn = fn(&mut Builder, &pb::NodeProto, &Attrs) -> Result<(), Error>;

/// How the builder handles an op.
pub(super) enum Build {
    /// Built before constant folding, whatever its inputs: Constant, Shape, Size.
    Source(SourceFn),
    /// Folded when every input is a constant, else built on activations.
    Network(NetworkFn),
    /// Only folded (shape computations); refused where it reads an activation.
    FoldOnly,
}

/// One supported op.
pub struct OpSpec {
    pub name: &'static str,
    pub(super) build: Build,
    /// Any operand, the first included, may be a constant (binary arithmetic, Concat).
    pub constant_operands: bool,
    /// Listed among the network ops (may appear on activations).
    pub network: bool,
}

const fn net(name: &'static str, f: NetworkFn) -> OpSpec {
    OpSpec {
        name,
        build: Build::Network(f),
        constant_operands: false,
        network: true,
    }
}

const fn operands(name: &'static str, f: NetworkFn) -> OpSpec {
    OpSpec {
        name,
        build: Build::Network(f),
        constant_operands: true,
        network: true,
    }
}

const fn fold(name: &'static str) -> OpSpec {
    OpSpec {
        name,
        build: Build::FoldOnly,
        constant_operands: false,
        network: false,
    }
}

/// Every supported op: network ops first, then those accepted only in constant computations.
pub const OPS: &[OpSpec] = &[
    net("Conv", |b, s| b.conv(s)),
    net("BatchNormalization", |b, s| b.batchnorm(s)),
    net("Relu", |b, s| b.unary(s, Op::Act(Activation::Relu))),
    net("LeakyRelu", |b, s| b.leaky_relu(s)),
    net("PRelu", |b, s| b.prelu(s)),
    net("Clip", |b, s| b.clip(s)),
    net("HardSwish", |b, s| {
        b.unary(s, Op::Act(Activation::HardSwish))
    }),
    net("HardSigmoid", |b, s| b.hard_sigmoid(s)),
    net("Sigmoid", |b, s| b.unary(s, Op::Act(Activation::Sigmoid))),
    net("Tanh", |b, s| b.unary(s, Op::Act(Activation::Tanh))),
    operands("Add", |b, s| b.binary(s)),
    operands("Sub", |b, s| b.binary(s)),
    operands("Mul", |b, s| b.binary(s)),
    operands("Div", |b, s| b.binary(s)),
    operands("Concat", |b, s| b.concat(s)),
    net("MaxPool", |b, s| b.pool(s)),
    net("AveragePool", |b, s| b.pool(s)),
    net("GlobalAveragePool", |b, s| b.global_avg_pool(s)),
    net("Flatten", |b, s| b.reshape(s)),
    net("Reshape", |b, s| b.reshape(s)),
    net("Squeeze", |b, s| b.reshape(s)),
    net("Unsqueeze", |b, s| b.reshape(s)),
    net("Gemm", |b, s| b.gemm(s)),
    net("MatMul", |b, s| b.matmul(s)),
    net("Softmax", |b, s| b.softmax(s)),
    net("Identity", |b, s| b.identity(s)),
    net("Dropout", |b, s| b.dropout(s)),
    OpSpec {
        name: "Constant",
        build: Build::Source(|b, n, a| b.constant_node(n, a)),
        constant_operands: false,
        network: true,
    },
    net("Pad", |b, s| b.pad(s)),
    OpSpec {
        name: "Shape",
        build: Build::Source(|b, n, a| b.shape_node(n, a)),
        constant_operands: false,
        network: false,
    },
    OpSpec {
        name: "Size",
        build: Build::Source(|b, n, a| b.shape_node(n, a)),
        constant_operands: false,
        network: false,
    },
    fold("Gather"),
    fold("Slice"),
    fold("Cast"),
    fold("ConstantOfShape"),
    fold("Range"),
    fold("Neg"),
    fold("Floor"),
    fold("Ceil"),
    fold("Sqrt"),
    fold("Equal"),
    fold("Where"),
    fold("Transpose"),
];

/// The entry of `op`, if supported.
pub(super) fn lookup(op: &str) -> Option<&'static OpSpec> {
    OPS.iter().find(|s| s.name == op)
}

/// Ops that may appear on activations, in table order.
pub fn network_ops() -> Vec<&'static str> {
    OPS.iter().filter(|s| s.network).map(|s| s.name).collect()
}

/// Ops accepted only where they fold to constants (shape computations), in table order.
pub fn const_ops() -> Vec<&'static str> {
    OPS.iter().filter(|s| !s.network).map(|s| s.name).collect()
}
