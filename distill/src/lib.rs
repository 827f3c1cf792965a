//! edgelm-distill: the host side of edgelm. Reads Hugging Face checkpoints, runs and trains them
//! in candle (pre-training, LoRA fine-tuning, distillation), scores them, and exports ONNX
//! bundles for the edgelm runtime.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod export;
pub mod lora;
pub mod model;
pub(crate) mod onnx;
pub mod pipeline;
pub mod prune;
pub mod quantize;
pub mod recipe;
pub mod report;
mod rng;
pub mod sign;
pub mod student;
pub mod train;

pub use checkpoint::{Checkpoint, ModelConfig};
pub use error::{Error, Result};
pub use model::LlamaModel;
