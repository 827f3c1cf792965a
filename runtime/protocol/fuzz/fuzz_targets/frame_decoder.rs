//! Arbitrary bytes into the frame decoder; every accepted message must re-encode and decode to
//! the same bytes. The property lives in the crate (`fuzz_frame_decoder`) so that
//! `tests/fuzz_smoke.rs` runs it on stable too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgelm_protocol::fuzz_frame_decoder(data);
});
