//! # edgelm serial protocol, version 2
//!
//! The wire format between a microcontroller (the *client*) and an edge board running edgelm
//! (the *board*) over a UART, shared by both sides as one `no_std` crate without an allocator.
//! This module doc is the summary of the spec; `docs/protocol.md` has the byte tables and
//! worked examples, and `docs/protocol-vectors.txt` the golden frames the tests pin.
//!
//! ## Frame
//!
//! ```text
//! on the line:  COBS( body ++ crc_lo ++ crc_hi ) ++ 0x00
//! body:         vk (1 byte) | seq: u16 (postcard varint, 1..=3 bytes) | fields of that kind
//! vk:           (version << 5) | kind   (version 1..=7 in the top 3 bits, kind 0..=31 below)
//! fields:       postcard(Message) without its variant index (the kind already says it)
//! crc:          CRC-16/IBM-3740 over body (poly 0x1021, init 0xFFFF, no reflection)
//! ```
//!
//! * `0x00` only ever appears as the frame delimiter; [COBS](cobs_encode) removes it from the
//!   data. Several `0x00` in a row are legal and mean nothing (empty frames are skipped).
//! * A frame is at most [`MAX_FRAME`] bytes including its delimiter. A receiver that has
//!   buffered `MAX_FRAME - 1` bytes without seeing `0x00` drops the frame, reports
//!   [`FrameError::TooLong`] at the next delimiter, and carries on.
//! * The top three bits of the first body byte are always the protocol version, in every
//!   version to come. A frame with a good CRC and another version is reported as
//!   [`FrameError::Version`]; a kind above the last of the frame's version (13 in version 1,
//!   14 in version 2) as [`FrameError::Malformed`].
//! * A `Token` with `seq` and `index` below 128 and 1 to 127 bytes of text costs 8 bytes on
//!   the line beyond its text.
//! * `seq` counts the frames each side sends (wrapping at 65536); it is informational.
//!
//! ## Kinds
//!
//! | kind | message | direction | answer |
//! |---:|---|---|---|
//! | 0 | [`Hello`](Message::Hello) | client -> board | `Info` |
//! | 1 | [`Info`](Message::Info) | board -> client | |
//! | 2 | [`LoadModel`](Message::LoadModel) | client -> board | `Ack` or `Error` |
//! | 3 | [`Generate`](Message::Generate) | client -> board | `Ack`, `Token`*, `Done`; or `Error` |
//! | 4 | [`Token`](Message::Token) | board -> client | |
//! | 5 | [`Done`](Message::Done) | board -> client | |
//! | 6 | [`Cancel`](Message::Cancel) | client -> board | the running answer ends with `Done` |
//! | 7 | [`Resend`](Message::Resend) | client -> board | `Token`s from `from` on, then `Done` (finished), its `Error` (failed) or `Ack` (running) |
//! | 8 | [`Embed`](Message::Embed) | client -> board | `Embedding`+ or `Error` |
//! | 9 | [`Embedding`](Message::Embedding) | board -> client | |
//! | 10 | [`GetStats`](Message::GetStats) | client -> board | `StatsReply` |
//! | 11 | [`StatsReply`](Message::StatsReply) | board -> client | |
//! | 12 | [`Error`](Message::Error) | board -> client | |
//! | 13 | [`Ack`](Message::Ack) | board -> client | |
//!
//! ## Stability
//!
//! Within a protocol version the encoding of every message it has is frozen. Kinds and error
//! codes are append-only: a number is never reused or reordered. Any change to what goes on the
//! wire (a new kind, a new field, a new error code) increments [`PROTOCOL_VERSION`].
//!
//! ## Crate map
//!
//! * [`crc16`], [`cobs_encode`], [`cobs_decode_in_place`]: the two byte-level layers.
//! * [`Header`], [`Message`] and the types they carry: the message set.
//! * [`encode_frame`], [`FrameDecoder`]: whole frames, in and out.
//! * [`client::Client`]: the firmware-side driver over any `embedded_io` byte stream;
//!   [`hal_nb::NbSerial`] adapts an `embedded-hal-nb` UART to it.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

mod cobs;
mod crc;
mod error;
mod frame;
mod fuzzing;
mod message;

pub mod client;
pub mod hal_nb;

pub use cobs::{cobs_decode_in_place, cobs_encode, cobs_encoded_len, cobs_max_encoded_len};
pub use crc::crc16;
pub use error::FrameError;
pub use frame::{decode_frame, encode_frame, FrameDecoder, FrameResult, Frames};
#[doc(hidden)]
pub use fuzzing::{fuzz_frame_body, fuzz_frame_decoder};
pub use message::{ErrorCode, GenParams, Header, Message, Stats, StopReason};

/// Protocol version spoken by this crate; the top three bits of the first byte of every frame
/// body.
pub const PROTOCOL_VERSION: u8 = 2;

/// Largest frame on the line, in bytes, counting the `0x00` delimiter.
pub const MAX_FRAME: usize = 512;

/// Largest prompt in [`Message::Generate`] and text in [`Message::Embed`], in UTF-8 bytes.
pub const MAX_PROMPT: usize = 384;

/// Largest text piece in [`Message::Token`], in UTF-8 bytes.
pub const MAX_PIECE: usize = 200;

/// Largest detail text in [`Message::Error`], in UTF-8 bytes.
pub const MAX_MESSAGE: usize = 96;

/// Largest client or model name ([`Message::Hello`], [`Message::Info`]), in UTF-8 bytes.
pub const MAX_NAME: usize = 48;

/// Largest model path in [`Message::LoadModel`], in UTF-8 bytes.
pub const MAX_PATH: usize = 128;

/// Largest number of `f32` values in one [`Message::Embedding`] frame.
pub const MAX_EMBED: usize = 48;
