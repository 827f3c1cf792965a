//! Weight quantization: block-wise INT8/INT4 in ONNX Runtime's layout (`block`), and the
//! rewrite of an fp32 graph onto `MatMulNBits` and `GatherBlockQuantized` (`graph`).

pub mod block;
pub mod graph;

pub use block::{quantize, BlockScheme, QuantizedMatrix};
pub use graph::{quantize_model, QuantizeOptions, QuantizeSummary};
