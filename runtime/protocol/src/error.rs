//! Errors of the frame layer.

use crate::ErrorCode;

/// Why a frame could not be encoded or decoded.
///
/// A [`FrameDecoder`](crate::FrameDecoder) that reports one of these has already dropped the
/// bad frame and is ready for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// More than [`MAX_FRAME`](crate::MAX_FRAME) bytes arrived without a `0x00` delimiter
    /// (decoding), or a message does not fit in one frame (encoding).
    TooLong,
    /// The bytes between two delimiters are not a valid COBS chain.
    Cobs,
    /// The CRC-16 over the body does not match the two bytes that close it, or the frame is too
    /// short to hold one.
    Crc,
    /// The CRC matched but the body is not a header and a message (empty body, a kind above the
    /// last of the frame's version, bad varint, invalid UTF-8, a string or vector over its
    /// limit, or bytes left over).
    Malformed,
    /// The CRC matched but the protocol version (the top three bits of the body's first byte)
    /// is 0 or above [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION); the value is the version
    /// received.
    /// From [`encode_frame`](crate::encode_frame): the header's version is not in `1..=7`, so
    /// it does not fit those three bits.
    Version(u8),
    /// The output buffer given to [`encode_frame`](crate::encode_frame) is too small; a
    /// buffer of [`MAX_FRAME`](crate::MAX_FRAME) bytes always suffices.
    BufferTooSmall,
}

impl FrameError {
    /// The [`ErrorCode`] a receiver reports back to the sender of such a frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLong | FrameError::BufferTooSmall => ErrorCode::TooLong,
            FrameError::Cobs | FrameError::Crc => ErrorCode::Corrupt,
            FrameError::Malformed => ErrorCode::Malformed,
            FrameError::Version(_) => ErrorCode::Version,
        }
    }
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::TooLong => {
                write!(f, "frame longer than {} bytes; dropped up to the next delimiter", crate::MAX_FRAME)
            }
            FrameError::Cobs => f.write_str("frame is not valid COBS; the line may be noisy or the baud rate wrong"),
            FrameError::Crc => f.write_str("frame CRC mismatch; the line may be noisy or the baud rate wrong"),
            FrameError::Malformed => {
                f.write_str("frame body does not decode as an edgelm message; are both sides the same version?")
            }
            FrameError::Version(v) => {
                write!(f, "peer speaks protocol version {v}, this side speaks {}", crate::PROTOCOL_VERSION)
            }
            FrameError::BufferTooSmall => {
                write!(f, "output buffer too small for the frame; use {} bytes", crate::MAX_FRAME)
            }
        }
    }
}

impl core::error::Error for FrameError {}
