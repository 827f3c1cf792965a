//! ONNX writing: a hand-written subset of the protobuf schema and a graph builder.

pub mod graph;
pub mod proto;

pub use graph::{GraphBuilder, MS_DOMAIN};
pub use proto::{AttributeProto, DataType, Dim, ModelProto};
