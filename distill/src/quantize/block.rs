//! Block-wise integer quantization of a weight matrix, in the byte layout ONNX Runtime's
//! `MatMulNBits` and `GatherBlockQuantized` read: the arithmetic lives in `edgelm-kernels`.

pub use edgelm_kernels::block::{quantize, quantize_per_column, BlockScheme, QuantizedMatrix};
