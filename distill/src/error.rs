//! The one error type of the distill crate.

use std::path::PathBuf;

/// Everything that can go wrong between reading a checkpoint and writing a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    // The OS error is part of the message and deliberately not the `source`, so error reports
    // that print the cause chain do not print it twice.
    #[error("{path}: {err}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// config.json names an architecture edgelm does not implement.
    #[error(
        "unsupported architecture `{found}`: edgelm loads llama, mistral, qwen2, qwen3 and phi3 decoders and BERT encoders"
    )]
    UnsupportedArchitecture {
        /// The `model_type` or class found.
        found: String,
    },
    /// config.json asks for a rotary scaling edgelm does not implement.
    #[error(
        "unsupported rope type `{rope_type}`: edgelm implements default, linear, llama3, dynamic, yarn and longrope"
    )]
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
    Candle(candle_core::Error),
    /// The exported graph and the reference model disagree.
    #[error("export check failed: {what}")]
    ExportMismatch {
        /// Which step and by how much.
        what: String,
    },
    /// A pipeline stage lost more accuracy than its recipe allows.
    #[error("stage {stage} failed its accuracy gate: {what}")]
    Gate {
        /// The stage.
        stage: String,
        /// What it lost, against which limit.
        what: String,
    },
    /// Running the bundle through the runtime failed.
    #[error(transparent)]
    Runtime(#[from] edgelm_runtime::Error),
    /// A recipe or student settings file is unreadable or inconsistent.
    #[error("recipe {path}: {what}")]
    Recipe {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Saved training state cannot be written or used to resume.
    #[error("run state {path}: {what}")]
    RunState {
        /// The file or run folder.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A line of a data file is not an example.
    #[error("{path} line {line}: {what}")]
    DataLine {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A weights or data file could not be encoded or decoded (the format's own error).
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format library's message.
        what: String,
    },
    /// The examples or settings given cannot train a model.
    #[error("cannot train: {what}")]
    Training {
        /// What is missing or wrong.
        what: String,
    },
    /// A run stopped after the step it was asked to stop at (`halt_after`): not a failure, but
    /// the stage has no result yet.
    #[error("halted after step {step} as asked; continue with --resume (state in {})", run_dir.display())]
    Halted {
        /// The last optimizer step taken.
        step: usize,
        /// Where the state to resume from is.
        run_dir: PathBuf,
    },
    /// A tokenizer could not be trained.
    #[error("tokenizer training failed: {0}")]
    Tokenizer(String),
    /// `init` was given a preset name it does not know.
    #[error("unknown preset `{name}`; known: {known}")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// The names known, comma-separated.
        known: String,
    },
    /// A sequence longer than the model's position table.
    #[error("{positions} positions exceed the model's context of {context}")]
    ContextOverflow {
        /// Positions asked for.
        positions: usize,
        /// The model's context.
        context: usize,
    },
    /// An output folder that would replace what the command reads from.
    #[error("{path}: {what}")]
    Destination {
        /// The output folder.
        path: PathBuf,
        /// Why it cannot be written there.
        what: String,
    },
    /// A model feature or size the exporter does not handle yet.
    #[error("not supported yet: {what}")]
    Unsupported {
        /// The feature, and what to do instead.
        what: String,
    },
}

impl From<edgelm_kernels::Error> for Error {
    fn from(e: edgelm_kernels::Error) -> Self {
        Error::Unsupported { what: e.to_string() }
    }
}

// Not `#[from]`: the candle message is already in ours; as the `source` too it would print twice.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|err| Error::Io { path: path.into(), err })
    }
}
