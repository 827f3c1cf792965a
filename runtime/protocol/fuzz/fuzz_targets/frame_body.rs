//! Arbitrary bytes as a frame body behind a valid CRC, so the fuzzer explores the message
//! decoder instead of the checksum. Same property as `frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgelm_protocol::fuzz_frame_body(data);
});
