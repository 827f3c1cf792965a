//! Framing: `COBS(body ++ crc16_le(body)) ++ 0x00`, where `body = vk ++ varint(seq) ++ fields`:
//! `vk = (version << 5) | kind` packs the protocol version (3 bits, 1..=7) and the message kind
//! (5 bits, 0..=31) into one byte, `seq` is a postcard varint, and `fields` is the postcard
//! encoding of the message without its variant index (the kind already said it).
//!
//! Decoding order, and the error each step reports:
//! 1. more than `MAX_FRAME - 1` bytes before the delimiter -> [`FrameError::TooLong`];
//! 2. COBS chain invalid -> [`FrameError::Cobs`];
//! 3. fewer than 2 bytes, or CRC mismatch -> [`FrameError::Crc`];
//! 4. top three bits of the first body byte are not a version this crate speaks (1 to
//!    [`PROTOCOL_VERSION`]) -> [`FrameError::Version`] (checked on the raw byte, so a future
//!    layout of the rest still yields a clean version error);
//! 5. empty body, a kind that the frame's version does not have, `seq` or the fields do not
//!    decode, bytes are left over, or a varint is longer than it needs to be ->
//!    [`FrameError::Malformed`].

use crate::{cobs_decode_in_place, cobs_encode, cobs_encoded_len, crc16, FrameError, Header, Message};
use crate::{MAX_FRAME, PROTOCOL_VERSION};

/// Bits of the first body byte that hold the kind; the version sits above them.
const KIND_BITS: u32 = 5;

/// Mask of the kind bits of the first body byte.
const KIND_MASK: u8 = (1 << KIND_BITS) - 1;

/// Largest version the 3 version bits hold.
const MAX_VERSION: u8 = u8::MAX >> KIND_BITS;

// Every kind fits the five kind bits (and so is a one-byte varint as postcard's variant index).
const _: () = assert!(Message::LAST_KIND <= KIND_MASK && PROTOCOL_VERSION <= MAX_VERSION);

/// `seq` as a postcard (LEB128) varint: the bytes and how many of them are used (1..=3).
fn seq_varint(seq: u16) -> ([u8; 3], usize) {
    let mut out = [0u8; 3];
    let mut rest = seq;
    let mut n = 0;
    while rest >= 0x80 {
        out[n] = (rest as u8 & 0x7F) | 0x80;
        rest >>= 7;
        n += 1;
    }
    out[n] = rest as u8;
    (out, n + 1)
}

/// Encodes one complete frame (COBS data and the closing `0x00`) into `out` and returns the
/// written part of `out`.
///
/// Errors: [`FrameError::Version`] if `header.version` is not in `1..=7` (it must fit the
/// three version bits) or is older than the message's kind ([`Message::first_version`]), [`FrameError::TooLong`] if the frame would exceed [`MAX_FRAME`] bytes
/// (cannot happen for messages within the documented limits), [`FrameError::BufferTooSmall`] if
/// `out` cannot hold it. Uses a `MAX_FRAME`-byte scratch buffer on the stack.
///
/// ```
/// use edgelm_protocol::{encode_frame, Header, Message, MAX_FRAME};
/// let mut out = [0u8; MAX_FRAME];
/// let frame = encode_frame(&Header::new(0), &Message::Ack, &mut out).unwrap();
/// assert_eq!(frame, &[0x02, 0x2D, 0x03, 0xB5, 0x6D, 0x00]);
/// ```
pub fn encode_frame<'a>(header: &Header, msg: &Message, out: &'a mut [u8]) -> Result<&'a [u8], FrameError> {
    if header.version == 0 || header.version > MAX_VERSION || header.version < msg.first_version() {
        return Err(FrameError::Version(header.version));
    }
    let (seq, seq_len) = seq_varint(header.seq);
    let kind = msg.kind();
    let mut scratch = [0u8; MAX_FRAME];
    let body_room = MAX_FRAME - 2;
    // postcard(Message) is the kind (a varint, one byte as kind < 128) then the fields. Put it
    // so that the kind byte lands where the last seq byte goes, then write vk and seq over the
    // front: the fields are already in place, no copy.
    let msg_len = postcard::to_slice(msg, &mut scratch[seq_len..body_room]).map_err(|_| FrameError::TooLong)?.len();
    debug_assert_eq!(scratch[seq_len], kind, "the variant index is the kind, one byte");
    scratch[0] = (header.version << KIND_BITS) | kind;
    scratch[1..=seq_len].copy_from_slice(&seq[..seq_len]);
    let body_len = seq_len + msg_len;
    let crc = crc16(&scratch[..body_len]);
    scratch[body_len..body_len + 2].copy_from_slice(&crc.to_le_bytes());
    let raw = &scratch[..body_len + 2];

    let encoded_len = cobs_encoded_len(raw);
    if encoded_len + 1 > MAX_FRAME {
        return Err(FrameError::TooLong);
    }
    if encoded_len + 1 > out.len() {
        return Err(FrameError::BufferTooSmall);
    }
    let n = cobs_encode(raw, out).ok_or(FrameError::BufferTooSmall)?;
    out[n] = 0;
    Ok(&out[..n + 1])
}

/// Decodes the COBS bytes of one frame (everything between two delimiters, delimiter excluded)
/// in place. `encoded` is clobbered. This is what [`FrameDecoder`] runs on each delimiter.
pub fn decode_frame(encoded: &mut [u8]) -> Result<(Header, Message), FrameError> {
    if encoded.len() >= MAX_FRAME {
        return Err(FrameError::TooLong);
    }
    let n = cobs_decode_in_place(encoded).ok_or(FrameError::Cobs)?;
    let Some(body_len) = n.checked_sub(2) else {
        return Err(FrameError::Crc);
    };
    let (body, crc) = encoded[..n].split_at_mut(body_len);
    if crc16(body) != u16::from_le_bytes([crc[0], crc[1]]) {
        return Err(FrameError::Crc);
    }
    let Some((&vk, rest)) = body.split_first() else {
        return Err(FrameError::Malformed);
    };
    let version = vk >> KIND_BITS;
    if version == 0 || version > PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = vk & KIND_MASK;
    if kind > Message::LAST_KIND_OF[version as usize - 1] {
        return Err(FrameError::Malformed);
    }
    let (seq, fields) = postcard::take_from_bytes::<u16>(rest).map_err(|_| FrameError::Malformed)?;
    let seq_len = rest.len() - fields.len();
    // The message decodes from `kind ++ fields`: write the kind over the last seq byte (at
    // least one seq byte precedes the fields), in place.
    let at = body_len - fields.len() - 1;
    body[at] = kind;
    let (msg, left) = postcard::take_from_bytes::<Message>(&body[at..]).map_err(|_| FrameError::Malformed)?;
    if !left.is_empty() {
        return Err(FrameError::Malformed);
    }
    // Only shortest-form varints: re-encoding must take exactly the bytes that came. This
    // holds every length to 5 bytes on every platform (postcard alone reads up to 10 on a
    // 64-bit host and 5 on a 32-bit MCU) and gives each message exactly one encoding.
    if seq_varint(seq).1 != seq_len || encoded_size(&msg) != Some(body_len - at) {
        return Err(FrameError::Malformed);
    }
    Ok((Header { version, seq }, msg))
}

/// Bytes postcard writes for `msg` (its kind byte included). Encodes into a stack buffer with
/// the same serializer `encode_frame` uses, so firmware carries one copy of that code.
fn encoded_size(msg: &Message) -> Option<usize> {
    let mut scratch = [0u8; MAX_FRAME];
    postcard::to_slice(msg, &mut scratch).ok().map(|b| b.len())
}

/// What [`FrameDecoder::push`] returns when a delimiter closes a frame.
pub type FrameResult = Result<(Header, Message), FrameError>;

/// Byte-at-a-time frame decoder with a fixed [`MAX_FRAME`]-byte buffer and no allocation.
///
/// Feed every received byte to [`push`](FrameDecoder::push). It answers only when a `0x00`
/// delimiter closes a non-empty frame. After any error the decoder has dropped that frame and
/// starts afresh with the next byte, so a receiver resynchronises on the next delimiter. A
/// receiver that joins mid-stream gets at most one error for the partial first frame.
#[derive(Clone)]
pub struct FrameDecoder {
    buf: [u8; MAX_FRAME],
    len: usize,
    overflow: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        FrameDecoder { buf: [0; MAX_FRAME], len: 0, overflow: false }
    }

    /// Drops any partly received frame.
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// Number of bytes of the current, unfinished frame held so far.
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Feeds one byte. Returns `Some` only when `byte` is a `0x00` that closes a non-empty frame:
    /// the decoded header and message, or why the frame was dropped. Empty frames (two `0x00`
    /// in a row) are skipped silently, so a sender may send extra delimiters to flush the line.
    ///
    /// A frame of more than `MAX_FRAME - 1` bytes before its delimiter is dropped as it arrives
    /// and reported as [`FrameError::TooLong`] when its delimiter comes.
    pub fn push(&mut self, byte: u8) -> Option<FrameResult> {
        if byte == 0 {
            let result = if self.overflow {
                Some(Err(FrameError::TooLong))
            } else if self.len == 0 {
                None
            } else {
                Some(decode_frame(&mut self.buf[..self.len]))
            };
            self.reset();
            return result;
        }
        if self.overflow {
            return None;
        }
        if self.len == MAX_FRAME - 1 {
            // With the delimiter this frame would exceed MAX_FRAME: drop it.
            self.overflow = true;
            return None;
        }
        self.buf[self.len] = byte;
        self.len += 1;
        None
    }

    /// Feeds a run of bytes; the iterator yields each completed frame's result. Bytes are
    /// consumed only as the iterator advances: drive it to the end (e.g. with `for`) or the
    /// bytes after the last yielded frame are not fed. [`Frames::remainder`] gives them back.
    ///
    /// ```
    /// use edgelm_protocol::{encode_frame, FrameDecoder, Header, Message, MAX_FRAME};
    /// let mut out = [0u8; MAX_FRAME];
    /// let frame = encode_frame(&Header::new(7), &Message::GetStats, &mut out).unwrap();
    /// let mut decoder = FrameDecoder::new();
    /// let got: Vec<_> = decoder.push_slice(frame).collect();
    /// assert_eq!(got, vec![Ok((Header::new(7), Message::GetStats))]);
    /// ```
    pub fn push_slice<'a>(&'a mut self, bytes: &'a [u8]) -> Frames<'a> {
        Frames { decoder: self, bytes }
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameDecoder").field("pending", &self.len).field("overflow", &self.overflow).finish()
    }
}

/// Iterator returned by [`FrameDecoder::push_slice`].
#[derive(Debug)]
pub struct Frames<'a> {
    decoder: &'a mut FrameDecoder,
    bytes: &'a [u8],
}

impl<'a> Frames<'a> {
    /// The bytes not fed to the decoder yet.
    pub fn remainder(&self) -> &'a [u8] {
        self.bytes
    }
}

impl Iterator for Frames<'_> {
    type Item = FrameResult;

    fn next(&mut self) -> Option<FrameResult> {
        while let Some((&byte, rest)) = self.bytes.split_first() {
            self.bytes = rest;
            if let Some(result) = self.decoder.push(byte) {
                return Some(result);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GenParams, Stats};

    fn encode(seq: u16, msg: &Message) -> std::vec::Vec<u8> {
        let mut out = [0u8; MAX_FRAME];
        encode_frame(&Header::for_message(seq, msg), msg, &mut out).unwrap().to_vec()
    }

    #[test]
    fn round_trip_through_decoder() {
        let msg = Message::Generate { prompt: "hello".try_into().unwrap(), params: GenParams::default() };
        let frame = encode(300, &msg);
        let mut d = FrameDecoder::new();
        let results: std::vec::Vec<_> = d.push_slice(&frame).collect();
        assert_eq!(results, vec![Ok((Header::new(300), msg))]);
    }

    #[test]
    fn empty_frames_are_skipped() {
        let mut d = FrameDecoder::new();
        assert!(d.push_slice(&[0, 0, 0]).next().is_none());
        let frame = encode(1, &Message::Cancel);
        let mut stream = vec![0, 0];
        stream.extend_from_slice(&frame);
        stream.push(0);
        let results: std::vec::Vec<_> = d.push_slice(&stream).collect();
        assert_eq!(results, vec![Ok((Header::new(1), Message::Cancel))]);
    }

    #[test]
    fn too_long_then_resync() {
        let mut d = FrameDecoder::new();
        let mut stream = vec![0x55u8; MAX_FRAME + 40];
        stream.push(0);
        stream.extend_from_slice(&encode(2, &Message::Ack));
        let results: std::vec::Vec<_> = d.push_slice(&stream).collect();
        assert_eq!(results, vec![Err(FrameError::TooLong), Ok((Header::new(2), Message::Ack))]);
    }

    #[test]
    fn longest_accepted_frame_length() {
        // MAX_FRAME - 1 bytes plus the delimiter is accepted by the length check (it fails
        // later, as this is not a real frame); one more byte is TooLong.
        let mut d = FrameDecoder::new();
        for _ in 0..MAX_FRAME - 1 {
            assert!(d.push(0x01).is_none());
        }
        assert_ne!(d.push(0), Some(Err(FrameError::TooLong)));
        for _ in 0..MAX_FRAME {
            assert!(d.push(0x01).is_none());
        }
        assert_eq!(d.push(0), Some(Err(FrameError::TooLong)));
    }

    /// Wraps `body` in its CRC and COBS, without the delimiter.
    fn frame_of_body(body: &[u8]) -> std::vec::Vec<u8> {
        let mut raw = body.to_vec();
        raw.extend_from_slice(&crc16(body).to_le_bytes());
        let mut enc = [0u8; MAX_FRAME];
        let n = cobs_encode(&raw, &mut enc).unwrap();
        enc[..n].to_vec()
    }

    #[test]
    fn wrong_version_is_reported_after_crc() {
        let mut out = [0u8; MAX_FRAME];
        for version in PROTOCOL_VERSION + 1..=MAX_VERSION {
            let header = Header { version, seq: 0 };
            let frame = encode_frame(&header, &Message::Ack, &mut out).unwrap().to_vec();
            let mut d = FrameDecoder::new();
            assert_eq!(d.push_slice(&frame).next(), Some(Err(FrameError::Version(version))));
        }
        // Version 0 cannot be encoded but can arrive: vk = kind.
        assert_eq!(decode_frame(&mut frame_of_body(&[13, 0x00])), Err(FrameError::Version(0)));
    }

    #[test]
    fn every_spoken_version_is_read_and_kinds_belong_to_their_version() {
        let raw = Message::GenerateRaw { prompt: "hi".try_into().unwrap(), params: crate::GenParams::default() };
        assert_eq!(raw.first_version(), 2);
        assert_eq!(Message::Ack.first_version(), 1);
        // A version-2 frame of a version-1 kind is read (a newer sender may label it so).
        let frame = encode(3, &raw);
        let mut d = FrameDecoder::new();
        assert_eq!(d.push_slice(&frame).next(), Some(Ok((Header { version: 2, seq: 3 }, raw.clone()))));
        let mut out = [0u8; MAX_FRAME];
        let v2_ack = encode_frame(&Header { version: 2, seq: 0 }, &Message::Ack, &mut out).unwrap().to_vec();
        assert_eq!(d.push_slice(&v2_ack).next(), Some(Ok((Header { version: 2, seq: 0 }, Message::Ack))));
        // Kind 14 does not exist in version 1: encoding refuses it, decoding calls it malformed.
        assert_eq!(encode_frame(&Header::new(0), &raw, &mut out), Err(FrameError::Version(1)));
        let mut body = std::vec::Vec::from([0x20 | 14, 0x00, 0x02, b'h', b'i']);
        body.extend_from_slice(&[0x00; 16]); // GenParams: 1 + 4 + 1 + 4 + 4 + 1 + 1 bytes
        assert_eq!(decode_frame(&mut frame_of_body(&body)), Err(FrameError::Malformed));
        body[0] = 0x40 | 14;
        assert!(decode_frame(&mut frame_of_body(&body)).is_ok(), "the same body as version 2 decodes");
    }

    #[test]
    fn only_shortest_form_varints_are_accepted() {
        // Resend { from: 1 } with seq 0: body 27 00 01.
        assert_eq!(decode_frame(&mut frame_of_body(&[0x27, 0x00, 0x01])).unwrap().1, Message::Resend { from: 1 });
        // The same value in two bytes, and seq 0 in two bytes: overlong.
        assert_eq!(decode_frame(&mut frame_of_body(&[0x27, 0x00, 0x81, 0x00])), Err(FrameError::Malformed));
        assert_eq!(decode_frame(&mut frame_of_body(&[0x27, 0x80, 0x00, 0x01])), Err(FrameError::Malformed));
        // Embed { text: "hi" } with its length in 1, 5 and 10 bytes: only the first is valid.
        for (len, ok) in [
            (&[0x02u8][..], true),
            (&[0x82, 0x80, 0x80, 0x80, 0x00], false),
            (&[0x82, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], false),
        ] {
            let mut body = std::vec::Vec::from([0x28, 0x00]);
            body.extend_from_slice(len);
            body.extend_from_slice(b"hi");
            assert_eq!(decode_frame(&mut frame_of_body(&body)).is_ok(), ok, "length bytes {len:02X?}");
        }
    }

    #[test]
    fn unencodable_version_is_refused() {
        let mut out = [0u8; MAX_FRAME];
        for version in [0, 8, 9, 0xFF] {
            let header = Header { version, seq: 0 };
            assert_eq!(encode_frame(&header, &Message::Ack, &mut out), Err(FrameError::Version(version)));
        }
    }

    #[test]
    fn header_byte_packs_version_and_kind() {
        let messages = [
            Message::Cancel,
            Message::Resend { from: 1 },
            Message::GetStats,
            Message::Ack,
            Message::Token { index: 3, text: "x".try_into().unwrap() },
        ];
        for msg in messages {
            for seq in [0u16, 127, 128, 16383, 16384, u16::MAX] {
                let mut out = [0u8; MAX_FRAME];
                let mut frame = encode_frame(&Header::new(seq), &msg, &mut out).unwrap().to_vec();
                frame.pop();
                let n = cobs_decode_in_place(&mut frame).unwrap();
                let (seq_bytes, seq_len) = seq_varint(seq);
                assert_eq!(frame[0], (1 << 5) | msg.kind(), "{msg:?}: version-1 kinds carry version 1");
                assert_eq!(&frame[1..=seq_len], &seq_bytes[..seq_len], "seq {seq}");
                // The fields follow, then the CRC: postcard(Message) minus its one-byte kind.
                let mut whole = [0u8; MAX_FRAME];
                let whole = postcard::to_slice(&msg, &mut whole).unwrap();
                assert_eq!(&frame[1 + seq_len..n - 2], &whole[1..], "{msg:?}");
            }
        }
    }

    #[test]
    fn seq_varint_matches_postcard() {
        for seq in (0..=u16::MAX).step_by(7).chain([127, 128, 16383, 16384, u16::MAX]) {
            let (bytes, len) = seq_varint(seq);
            let mut buf = [0u8; 3];
            assert_eq!(&bytes[..len], postcard::to_slice(&seq, &mut buf).unwrap(), "{seq}");
        }
    }

    #[test]
    fn unknown_kinds_are_malformed() {
        for kind in Message::LAST_KIND + 1..=KIND_MASK {
            let vk = (PROTOCOL_VERSION << 5) | kind;
            assert_eq!(decode_frame(&mut frame_of_body(&[vk, 0x00])), Err(FrameError::Malformed), "{kind}");
        }
        // Known kind, body cut short: no seq, or fields missing.
        assert_eq!(decode_frame(&mut frame_of_body(&[0x2D])), Err(FrameError::Malformed));
        assert_eq!(decode_frame(&mut frame_of_body(&[0x27, 0x00])), Err(FrameError::Malformed));
        assert_eq!(decode_frame(&mut frame_of_body(&[0x2D, 0x80])), Err(FrameError::Malformed));
        assert_eq!(decode_frame(&mut frame_of_body(&[])), Err(FrameError::Malformed));
        // The smallest frames decode: Ack and Cancel with seq 0.
        assert_eq!(decode_frame(&mut frame_of_body(&[0x2D, 0x00])), Ok((Header::new(0), Message::Ack)));
        assert_eq!(decode_frame(&mut frame_of_body(&[0x26, 0x81, 0x01])), Ok((Header::new(129), Message::Cancel)));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        // Body = Ack header (version 1, kind 13, seq 0) + one stray byte, with a valid CRC.
        assert_eq!(decode_frame(&mut frame_of_body(&[0x2D, 0x00, 0x42])), Err(FrameError::Malformed));
    }

    #[test]
    fn crc_and_cobs_errors() {
        let mut frame = encode(5, &Message::Done { pieces: 3, stats: Stats::default() });
        let last = frame.len() - 2;
        frame[last] ^= 0x01; // inside the CRC bytes, stays non-zero
        let mut d = FrameDecoder::new();
        assert_eq!(d.push_slice(&frame).next(), Some(Err(FrameError::Crc)));
        let mut short = [0x03, 0x11];
        assert_eq!(decode_frame(&mut short), Err(FrameError::Cobs));
        let mut one = [0x02, 0x11];
        assert_eq!(decode_frame(&mut one), Err(FrameError::Crc));
    }

    #[test]
    fn small_output_buffer() {
        let mut out = [0u8; 4];
        assert_eq!(encode_frame(&Header::new(0), &Message::Ack, &mut out), Err(FrameError::BufferTooSmall));
    }
}
