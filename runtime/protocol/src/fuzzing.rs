//! The fuzz properties, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and the stable
//! test that runs them on deterministic inputs (`tests/fuzz_smoke.rs`).

use crate::{cobs_encode, crc16, encode_frame, FrameDecoder, MAX_FRAME};

/// Feeds `data` to a [`FrameDecoder`] byte by byte, then one extra delimiter. Panics if the
/// decoder panics, or if a message it accepts does not survive a second trip: re-encoding must
/// succeed and decoding that frame must give the same header and the same encoded bytes (bytes,
/// not `==`, so NaN payloads in `f32` fields compare equal).
///
/// Returns how many messages the decoder accepted, so tests can see the round trip ran.
/// Not part of the protocol API; public only for the fuzz target and tests.
pub fn fuzz_frame_decoder(data: &[u8]) -> usize {
    let mut accepted = 0;
    let mut decoder = FrameDecoder::new();
    for &byte in data.iter().chain(core::iter::once(&0)) {
        let Some(Ok((header, msg))) = decoder.push(byte) else { continue };
        accepted += 1;

        let mut first = [0u8; MAX_FRAME];
        let first = encode_frame(&header, &msg, &mut first).expect("an accepted message must re-encode");
        let mut again = FrameDecoder::new();
        let mut decoded = None;
        for &b in first {
            if let Some(result) = again.push(b) {
                assert!(decoded.is_none(), "one frame decoded twice");
                decoded = Some(result.expect("a re-encoded frame must decode"));
            }
        }
        let (header2, msg2) = decoded.expect("a re-encoded frame must end with its delimiter");
        assert_eq!(header2, header);
        let mut second = [0u8; MAX_FRAME];
        let second = encode_frame(&header2, &msg2, &mut second).expect("second encode");
        assert_eq!(first, second, "message changed on the second trip: {msg:?} vs {msg2:?}");
    }
    accepted
}

/// Wraps `body` (truncated to what fits in a frame) in a valid CRC and COBS and runs it through
/// [`fuzz_frame_decoder`]. Random bytes almost never pass the CRC, so this reaches the message
/// decoder with arbitrary bodies. Returns the number of accepted messages (0 or 1).
///
/// Not part of the protocol API; public only for the fuzz target and tests.
pub fn fuzz_frame_body(body: &[u8]) -> usize {
    let body = &body[..body.len().min(MAX_FRAME - 8)];
    let mut raw = [0u8; MAX_FRAME];
    raw[..body.len()].copy_from_slice(body);
    raw[body.len()..body.len() + 2].copy_from_slice(&crc16(body).to_le_bytes());
    let mut frame = [0u8; MAX_FRAME + 8];
    let n = cobs_encode(&raw[..body.len() + 2], &mut frame).expect("room for COBS");
    frame[n] = 0;
    fuzz_frame_decoder(&frame[..n + 1])
}
