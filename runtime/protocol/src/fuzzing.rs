//! The fuzz property, shared by the cargo-fuzz target (`fuzz/fuzz_targets/frame_decoder.rs`)
//! and the stable test that runs it on deterministic inputs (`tests/fuzz_smoke.rs`).

use crate::{encode_frame, FrameDecoder, MAX_FRAME};

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
