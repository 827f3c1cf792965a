//! Weight quantization: block-wise INT8/INT4 in ONNX Runtime's layout (`block`), the rewrite
//! of an fp32 graph onto `MatMulNBits` and `GatherBlockQuantized` (`graph`), and static int8 in
//! QDQ form (`qdq`) with activation ranges measured on calibration data (`calibrate`), and fp16
//! graphs (`fp16`).

pub mod block;
pub mod calibrate;
pub mod fp16;
pub mod graph;
pub mod qdq;

pub use block::{quantize, BlockScheme, QuantizedMatrix};
pub use calibrate::{ActivationRange, RangeMethod};
pub use graph::{quantize_model, quantize_model_in, QuantizeOptions, QuantizeSummary};
