//! The one error type of the runtime crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading a bundle or generating from it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable ONNX Runtime library was found.
    #[error("ONNX Runtime {wanted} could not be loaded: {reason}\n  looked in: {looked}\n  fix: set EDGELM_ORT_LIB to the path of a libonnxruntime.so of that version (or pass that path when loading), or install it next to the executable, in ../lib beside it, or on the system library path")]
    OrtLibrary {
        /// The versions this build can load: its C API level's release or newer.
        wanted: String,
        /// Why the last candidate failed.
        reason: String,
        /// Every place that was tried, in order.
        looked: String,
    },
    /// A bundle's signature is missing where one is required, made by a key that is not
    /// trusted, or does not match the manifest; or a key file is unreadable.
    #[error("bundle signature refused: {what} ({path})")]
    Signature {
        /// The bundle folder or key file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// ONNX Runtime reported an error.
    #[error("ONNX Runtime: {0}")]
    Ort(ort::Error),
    /// The bundle's token table is quantized (`GatherBlockQuantized` with `bits`), which
    /// ONNX Runtime releases before 1.23 cannot load.
    #[error("{path}: its token table is quantized (GatherBlockQuantized with `bits`), which ONNX Runtime {version} cannot load (1.23 and newer can)\n  fix: quantize the fp32 bundle again with --fp32-embedding (the matrices stay quantized), or load a newer ONNX Runtime\n  ({detail})")]
    QuantizedTableNeedsNewerOrt {
        /// The bundle folder.
        path: PathBuf,
        /// The loaded release.
        version: String,
        /// ONNX Runtime's own message.
        detail: String,
    },
    /// None of the execution providers asked for is in the loaded ONNX Runtime library, and
    /// the list does not allow the CPU.
    #[error("none of the execution providers {wanted} is in this ONNX Runtime library\n  fix: load a build that has one (on Jetson, the onnxruntime-gpu wheel built for JetPack), or add `cpu` to the list to allow falling back to the CPU")]
    NoExecutionProvider {
        /// The providers asked for, in order.
        wanted: String,
    },
    /// The execution providers asked for are in the library but none started, and the list
    /// does not allow the CPU.
    #[error("no execution provider started: {reasons}\n  fix: install what the provider needs (CUDA, cuDNN, TensorRT libraries), or add `cpu` to the list to allow falling back to the CPU")]
    ExecutionProviderFailed {
        /// Each provider and why it did not start.
        reasons: String,
    },
    /// A file could not be read.
    // The OS error is part of the message and deliberately not the `source`, so error reports
    // that print the cause chain do not print it twice.
    #[error("{path}: {err}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// The bundle is malformed, incomplete or was modified after export.
    #[error("bundle {path}: {what}")]
    Bundle {
        /// Bundle directory or file.
        path: PathBuf,
        /// What is wrong and what to do.
        what: String,
    },
    /// The bundle holds another kind of model than the call needs.
    #[error("bundle {path} holds {}, not {}: open it as what it is", found.describe(), wanted.describe())]
    WrongKind {
        /// The bundle folder.
        path: PathBuf,
        /// What it holds.
        found: crate::bundle::Kind,
        /// What the call needed.
        wanted: crate::bundle::Kind,
    },
    /// A file's hash does not match the one recorded in edgelm.json.
    #[error("bundle file {path} is corrupt: sha256 {actual}, edgelm.json records {expected}; re-export or re-copy the bundle")]
    HashMismatch {
        /// The file that changed.
        path: PathBuf,
        /// Recorded hash.
        expected: String,
        /// Hash of the bytes on disk.
        actual: String,
    },
    /// The tokenizer could not be loaded or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The bundle has no tokenizer, so only token ids can be used.
    #[error("this bundle has no tokenizer.json: give the prompt as token ids instead of text")]
    NoTokenizer,
    /// The request cannot be served as given.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt plus the requested tokens do not fit the model's context.
    #[error("prompt of {prompt} tokens does not fit the context of {context} tokens (room for {max_new} new tokens was requested); shorten the prompt or ask for fewer new tokens")]
    ContextOverflow {
        /// Prompt length in tokens.
        prompt: usize,
        /// New tokens requested.
        max_new: usize,
        /// The model's context length.
        context: usize,
    },
    /// A sequence's KV cache has no room for more positions.
    #[error("the KV cache holds {capacity} positions; {position} are used and {adding} more were given")]
    CacheFull {
        /// Positions already cached.
        position: usize,
        /// Positions in this step.
        adding: usize,
        /// Positions the cache was sized for.
        capacity: usize,
    },
    /// A token id is outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} entries")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The graph's outputs do not have the shape the runtime expects.
    #[error("model output `{name}` has shape {shape:?}; expected {expected}")]
    UnexpectedShape {
        /// Output name.
        name: String,
        /// Shape received.
        shape: Vec<i64>,
        /// What was expected.
        expected: String,
    },
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
}

// Not `#[from]`: that would also make the ORT error the `source`, and error reports would print
// its message twice.
impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Ort(e)
    }
}

/// Result with the runtime's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|err| Error::Io { path: path.into(), err })
    }
}
