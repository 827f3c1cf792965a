//! edgelm-runtime: runs edgelm bundles (and onnxruntime-genai model folders) on ONNX Runtime,
//! loaded at run time.
#![warn(missing_docs)]

pub mod bundle;
pub mod decoder;
pub mod detokenize;
pub mod error;
pub mod genai_config;
pub mod ortlib;
pub mod sampling;

pub use error::{Error, Result};
