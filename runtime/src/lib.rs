//! edgelm-runtime: runs edgelm bundles (and onnxruntime-genai model folders) on ONNX Runtime,
//! loaded at run time.
//!
//! ```no_run
//! use edgelm_runtime::{Engine, GenerateParams};
//! let mut engine = Engine::builder("bundle/").threads(2).open()?;
//! // As one user turn with the bundle's chat template, the way the model was trained.
//! let prompt = engine.encode_prompt("Turn on the kitchen light", false)?;
//! let out = engine.generate(&prompt, &GenerateParams::default(), |ev| {
//!     print!("{}", ev.text);
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! eprintln!("{:.1} tokens/s", out.metrics.decode_tokens_per_s);
//! # Ok::<(), edgelm_runtime::Error>(())
//! ```
#![warn(missing_docs)]

pub mod batch;
pub mod bundle;
pub mod decoder;
pub(crate) mod detokenize;
pub mod encoder;
pub mod engine;
pub mod error;
pub mod genai_config;
pub mod generate;
mod graph_scan;
mod kv_arena;
pub mod metrics;
pub mod model;
pub mod ortlib;
pub mod providers;
pub mod sampling;
mod session;
pub mod signature;
pub(crate) mod stop;
pub mod tokenizer;
mod verified;

pub use batch::BatchStats;
pub use engine::{Engine, EngineBuilder, EngineOptions};
pub use error::{Error, Result};
pub use generate::{GenerateParams, Generation, StopReason, TokenEvent};
pub use model::Model;
pub use providers::ExecutionProvider;
pub use sampling::SamplingParams;
pub use tokenizer::ChatMessage;
