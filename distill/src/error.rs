//! The one error type of the distill crate.

use std::path::PathBuf;

/// Everything that can go wrong between reading a checkpoint and writing a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// config.json names an architecture edgelm does not implement.
    #[error("unsupported architecture `{found}`: edgelm loads llama, mistral and qwen2 checkpoints")]
    UnsupportedArchitecture {
        /// The `model_type` or class found.
        found: String,
    },
    /// config.json asks for a rotary scaling edgelm does not implement.
    #[error("unsupported rope type `{rope_type}`: edgelm implements default, linear and llama3")]
    UnsupportedRope {
        /// The rope type found.
        rope_type: String,
    },
    /// config.json is readable but inconsistent or incomplete.
    #[error("invalid model config: {what}")]
    InvalidConfig {
        /// What is wrong.
        what: String,
    },
    /// A tensor is missing from the checkpoint or has the wrong shape.
    #[error("checkpoint tensor `{name}`: {what}")]
    Tensor {
        /// Tensor name as in the safetensors file.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// A computation in candle failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The exported graph and the reference model disagree.
    #[error("export check failed: {what}")]
    ExportMismatch {
        /// Which step and by how much.
        what: String,
    },
    /// Running the bundle through the runtime failed.
    #[error(transparent)]
    Runtime(#[from] edgelm_runtime::Error),
    /// Any other failure, with its context.
    #[error("{0}")]
    Other(String),
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io { path: path.into(), source })
    }
}
