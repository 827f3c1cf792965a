//! The frame header and the message set, in wire order.
//!
//! Every type here is encoded with postcard: `u8` and `bool` as one byte, `u16`/`u32` as
//! LEB128-style varints (7 bits per byte, low group first, high bit = "more follows"), `f32` as
//! four little-endian IEEE-754 bytes, strings as varint byte length + UTF-8 bytes, vectors as
//! varint element count + elements, structs as their fields in declaration order with no tags,
//! and enums as a varint variant index followed by the variant's fields.
//!
//! A frame body is not simply postcard of these types: its first byte packs the version and the
//! kind, `seq` follows as a varint, then the message's fields (see [`Header`] and
//! [`crate::encode_frame`]). The fields are exactly postcard of the [`Message`] without its
//! variant index.
//!
//! **Append only.** The variant index of [`Message`] is the message *kind* on the wire, so
//! variants are never reordered or removed and fields are never changed; a new message or a new
//! field is a new protocol version (see [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION)).

use heapless::{String, Vec};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{MAX_EMBED, MAX_MESSAGE, MAX_NAME, MAX_PATH, MAX_PIECE, MAX_PROMPT};

/// The frame header: protocol version and the sender's frame counter.
///
/// On the wire the version shares the first body byte with the message kind,
/// `(version << 5) | kind`, and `seq` follows as a varint (1 to 3 bytes). So the version must
/// be in `1..=7`; [`encode_frame`](crate::encode_frame) refuses others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of the sender; always the top three bits of the first body byte. A
    /// receiver rejects a frame whose version it does not speak with
    /// [`FrameError::Version`](crate::FrameError).
    pub version: u8,
    /// The sender's frame counter: incremented (wrapping) for every frame sent, in each
    /// direction independently. It helps a log reader spot lost frames; no rule depends on it.
    pub seq: u16,
}

impl Header {
    /// A version-1 header with `seq`: right for every kind but
    /// [`Message::GenerateRaw`]. [`Header::for_message`] picks the version for any message.
    pub const fn new(seq: u16) -> Self {
        Header { version: 1, seq }
    }

    /// The header a sender puts on `msg`: the first version that has its kind. So every
    /// version-1 message keeps its version-1 bytes in every release, and a peer that speaks
    /// only version 1 still reads them.
    pub fn for_message(seq: u16, msg: &Message) -> Self {
        Header { version: msg.first_version(), seq }
    }
}

/// One message. The variant index is the *kind*, the low five bits of the first body byte
/// (so at most 32 kinds); the comment on each variant gives its kind and direction.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Message {
    /// Kind 0, client -> board: opens a session; the board answers [`Message::Info`].
    Hello {
        /// Free-form name of the client (firmware name and version), for the board's log.
        client: String<MAX_NAME>,
    },
    /// Kind 1, board -> client: answer to [`Message::Hello`], what the board runs and its limits.
    Info {
        /// The board's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
        protocol: u8,
        /// Runtime name and version, e.g. `edgelm 0.1.0`.
        runtime: String<16>,
        /// Name of the loaded model, empty when none is loaded.
        model: String<MAX_NAME>,
        /// Context length of the loaded model in tokens (0 when none is loaded).
        context: u32,
        /// Largest prompt the board accepts, in bytes (at most [`MAX_PROMPT`]).
        max_prompt: u16,
        /// Largest text piece the board sends, in bytes (at most [`MAX_PIECE`]).
        max_piece: u16,
        /// Largest frame the board sends or accepts, in bytes with the delimiter
        /// (at most [`MAX_FRAME`](crate::MAX_FRAME)).
        max_frame: u16,
    },
    /// Kind 2, client -> board: load the model bundle at `path` (a path on the board). The board
    /// answers [`Message::Ack`] when the model is ready, or [`Message::Error`].
    LoadModel {
        /// Bundle directory or archive on the board's file system.
        path: String<MAX_PATH>,
    },
    /// Kind 3, client -> board: generate an answer to `prompt`, which the board renders as one
    /// user turn with the loaded bundle's chat template (the format the model was trained
    /// on; [`Message::GenerateRaw`] sends it as it is). The board answers with
    /// [`Message::Ack`] (accepted), then [`Message::Token`] pieces and a closing
    /// [`Message::Done`]; or, if it refuses the request, with one [`Message::Error`] and
    /// nothing else. After the Ack an Error comes only if the model fails mid-answer; it then
    /// ends the answer in place of the Done.
    Generate {
        /// Prompt text (UTF-8), at most [`MAX_PROMPT`] bytes.
        prompt: String<MAX_PROMPT>,
        /// Sampling and length settings.
        params: GenParams,
    },
    /// Kind 4, board -> client: the next piece of the answer.
    Token {
        /// 0-based number of this piece within the current answer.
        index: u16,
        /// Decoded text of the piece (UTF-8, never splits a character). Pieces are coalesced
        /// text, not necessarily one model token each.
        text: String<MAX_PIECE>,
    },
    /// Kind 5, board -> client: the answer is complete.
    Done {
        /// Number of pieces the answer had (the indices were `0..pieces`).
        pieces: u16,
        /// Counters of this generation.
        stats: Stats,
    },
    /// Kind 6, client -> board: stop the running generation. It ends with its
    /// [`Message::Done`] (stop reason [`StopReason::Cancelled`]). A board with nothing running
    /// ignores it.
    Cancel,
    /// Kind 7, client -> board: send the pieces of the current (or last) answer again, from
    /// index `from` up to the last one produced, then its [`Message::Done`] again if that answer
    /// has finished (its [`Message::Error`] again if it ended with one), or [`Message::Ack`] if
    /// it is still being generated (it then goes on). The answer is the last one the board
    /// started: a request refused before its `Ack` starts none. With no answer to resend the
    /// board answers [`Message::Error`] (`InvalidRequest`).
    Resend {
        /// First piece index to send again.
        from: u16,
    },
    /// Kind 8, client -> board: compute an embedding of `text`. The board answers with
    /// [`Message::Embedding`] chunks, or [`Message::Error`].
    Embed {
        /// Text to embed (UTF-8), at most [`MAX_PROMPT`] bytes.
        text: String<MAX_PROMPT>,
    },
    /// Kind 9, board -> client: one chunk of an embedding vector.
    Embedding {
        /// 0-based chunk number; chunk `i` holds the values from `i * MAX_EMBED` on.
        index: u16,
        /// True on the final chunk.
        last: bool,
        /// Up to [`MAX_EMBED`] values.
        values: Vec<f32, MAX_EMBED>,
    },
    /// Kind 10, client -> board: ask for the counters of the last generation.
    GetStats,
    /// Kind 11, board -> client: answer to [`Message::GetStats`].
    StatsReply {
        /// Counters of the last generation; with none yet, [`Stats::default`]: every counter
        /// zero and stop reason `MaxTokens`.
        stats: Stats,
    },
    /// Kind 12, board -> client: a request failed, or a frame from the client could not be read.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail for logs, at most [`MAX_MESSAGE`] bytes.
        message: String<MAX_MESSAGE>,
    },
    /// Kind 13, board -> client: a request was accepted (a model finished loading; a
    /// generation passed every check and starts: no [`Message::Token`] of it precedes this) or,
    /// after a [`Message::Resend`] during generation, the resent pieces are complete.
    Ack,
    /// Kind 14, client -> board, **version 2**: like [`Message::Generate`], with the prompt fed
    /// to the model as it is. `Generate` renders the prompt with the bundle's chat template
    /// first. A board that speaks only version 1 answers `Error` with code `Version`; check
    /// [`Message::Info`]'s `protocol` first.
    GenerateRaw {
        /// Prompt text (UTF-8), at most [`MAX_PROMPT`] bytes, tokenized as it is.
        prompt: String<MAX_PROMPT>,
        /// Sampling and length settings.
        params: GenParams,
    },
}

impl Message {
    /// The highest kind number in use; a frame with a higher kind is malformed.
    pub(crate) const LAST_KIND: u8 = 14;

    /// The highest kind of each protocol version: `LAST_KIND_OF[v - 1]` for version `v`.
    pub(crate) const LAST_KIND_OF: [u8; crate::PROTOCOL_VERSION as usize] = [13, 14];

    /// The protocol version that introduced this message's kind: the version its frames
    /// carry.
    pub fn first_version(&self) -> u8 {
        let kind = self.kind();
        let mut v = 0;
        while Self::LAST_KIND_OF[v] < kind {
            v += 1;
        }
        v as u8 + 1
    }

    /// The kind number of this message: its variant index, the low five bits of the first
    /// body byte.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 0,
            Message::Info { .. } => 1,
            Message::LoadModel { .. } => 2,
            Message::Generate { .. } => 3,
            Message::Token { .. } => 4,
            Message::Done { .. } => 5,
            Message::Cancel => 6,
            Message::Resend { .. } => 7,
            Message::Embed { .. } => 8,
            Message::Embedding { .. } => 9,
            Message::GetStats => 10,
            Message::StatsReply { .. } => 11,
            Message::Error { .. } => 12,
            Message::Ack => 13,
            Message::GenerateRaw { .. } => 14,
        }
    }
}

/// Generation settings sent with [`Message::Generate`]. `Default` is greedy decoding of up to
/// 128 new tokens.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct GenParams {
    /// Upper bound on generated tokens.
    pub max_new_tokens: u16,
    /// Softmax temperature; `0.0` selects greedy (argmax) decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: u16,
    /// Nucleus sampling mass; `1.0` disables the filter.
    pub top_p: f32,
    /// Penalty for tokens already in the context; `1.0` disables it.
    pub repetition_penalty: f32,
    /// Sampler seed, so a run can be repeated.
    pub seed: u32,
    /// Keep generating past the end-of-sequence token (for benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

/// Counters of one generation, sent in [`Message::Done`] and [`Message::StatsReply`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    /// Tokens in the prompt after templating.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Time from request to the first piece, milliseconds.
    pub ttft_ms: f32,
    /// Decode speed after the first token, tokens per second.
    pub decode_tokens_per_s: f32,
    /// Peak resident memory of the runtime, KiB.
    pub peak_rss_kib: u32,
    /// Why generation stopped.
    pub stop_reason: StopReason,
}

/// Why a generation stopped. On the wire: one byte equal to the number below.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum StopReason {
    /// The model produced its end-of-sequence token.
    Eos = 0,
    /// A stop string matched.
    StopString = 1,
    /// `max_new_tokens` was reached.
    #[default]
    MaxTokens = 2,
    /// The context window is full.
    ContextFull = 3,
    /// The client sent [`Message::Cancel`].
    Cancelled = 4,
}

/// Failure classes carried by [`Message::Error`]. On the wire: one byte equal to the number
/// below (not the variant position), so the table in `docs/protocol.md` is the whole story.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[repr(u8)]
pub enum ErrorCode {
    /// A frame failed its CRC or COBS check.
    Corrupt = 1,
    /// A frame passed its CRC but its body did not decode (postcard).
    Malformed = 2,
    /// A frame, prompt or text exceeded its limit.
    TooLong = 3,
    /// The frame's protocol version is not spoken by the receiver.
    Version = 4,
    /// The board's request queue is full; try again later.
    Busy = 5,
    /// The request needs a model and none is loaded; send `LoadModel` first.
    NoModel = 6,
    /// The request is not valid in the current state (e.g. `Resend` with no answer).
    InvalidRequest = 7,
    /// The runtime failed (inference error, file error); the message has details.
    Runtime = 8,
    /// The board does not implement this request (e.g. `Embed` on a decoder-only model).
    Unsupported = 9,
    /// Reserved: a board never sends it (a cancelled generation ends with its `Done`, stop
    /// reason `Cancelled`).
    Cancelled = 10,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::Corrupt,
        ErrorCode::Malformed,
        ErrorCode::TooLong,
        ErrorCode::Version,
        ErrorCode::Busy,
        ErrorCode::NoModel,
        ErrorCode::InvalidRequest,
        ErrorCode::Runtime,
        ErrorCode::Unsupported,
        ErrorCode::Cancelled,
    ];

    /// The wire number of this code.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code with wire number `value`, if it is one.
    pub const fn from_u8(value: u8) -> Option<Self> {
        if value >= 1 && value <= Self::ALL.len() as u8 {
            Some(Self::ALL[value as usize - 1])
        } else {
            None
        }
    }

    /// Short lowercase description, for logs and `Display`.
    pub const fn description(self) -> &'static str {
        match self {
            ErrorCode::Corrupt => "corrupt frame (CRC or COBS check failed)",
            ErrorCode::Malformed => "malformed message",
            ErrorCode::TooLong => "too long",
            ErrorCode::Version => "unsupported protocol version",
            ErrorCode::Busy => "board busy, queue full",
            ErrorCode::NoModel => "no model loaded",
            ErrorCode::InvalidRequest => "invalid request",
            ErrorCode::Runtime => "runtime failure",
            ErrorCode::Unsupported => "unsupported request",
            ErrorCode::Cancelled => "cancelled",
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} (code {})", self.description(), self.as_u8())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.as_u8())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u8::deserialize(deserializer)?;
        ErrorCode::from_u8(value).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Unsigned(value.into()), &"an error code 1..=10")
        })
    }
}
