//! The loops `edgelm-distill` runs over every value of a tensor: block quantization and its
//! packing, the AdamW update and the gradient norm, the EWC penalty, activation range
//! statistics for static quantization, f32 / f16 / bf16 byte conversion and transposes.
//!
//! They live in their own crate so that a build may optimise them while compiling the rest of
//! the host tool (orchestration, file formats, reports) without optimisation: the `host` profile
//! that `just pipeline` builds does exactly that, and a fresh clone reaches its first training
//! step sooner. Everything here works on plain slices and depends on no other edgelm crate
//! (half, serde and thiserror only).

pub mod adamw;
pub mod block;
pub mod bytes;
pub mod ewc;
pub mod range;

/// What a kernel refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A block scheme's bit width other than 4 or 8.
    #[error("{0}-bit weights: edgelm quantizes to 4 or 8 bits")]
    Bits(u8),
    /// A block size ONNX Runtime's kernels do not take.
    #[error("block size {0}: ONNX Runtime takes a power of two from 16 to 256")]
    BlockSize(usize),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
