//! ONNX writing: a hand-written subset of the protobuf schema and a graph builder.

pub mod external;
pub mod graph;
pub mod proto;

pub use graph::{GraphBuilder, MS_DOMAIN};
pub use proto::{AttributeProto, DataType, Dim, ModelProto};
