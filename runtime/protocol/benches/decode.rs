//! Decoder throughput: `cargo bench -p edgelm-protocol --bench decode`.
//!
//! Feeds a buffer of many Token frames (a streamed answer) through `FrameDecoder::push` and
//! prints MB/s of line bytes, plus the encode rate for comparison. No criterion: a plain
//! `Instant` loop, best of several runs.

use std::hint::black_box;
use std::time::Instant;

use edgelm_protocol::{encode_frame, FrameDecoder, Header, Message, MAX_FRAME};

fn main() {
    // 20 000 pieces of 1..=40 bytes of mixed text, like a long streamed answer.
    let words = ["The ", "heater", " is", " set", " to", " 21.5 °C", " at", " 7pm", ".", "\n"];
    let mut line = Vec::new();
    let mut frames = 0usize;
    let mut out = [0u8; MAX_FRAME];
    for i in 0..20_000u32 {
        let mut text = heapless::String::<200>::new();
        for k in 0..(i % 5 + 1) {
            let _ = text.push_str(words[((i + k) % words.len() as u32) as usize]);
        }
        let msg = Message::Token { index: i as u16, text };
        line.extend_from_slice(encode_frame(&Header::new(i as u16), &msg, &mut out).unwrap());
        frames += 1;
    }
    let mb = line.len() as f64 / 1e6;

    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let mut decoder = FrameDecoder::new();
        let start = Instant::now();
        let mut ok = 0usize;
        for &b in black_box(&line[..]) {
            if let Some(Ok(_)) = decoder.push(b) {
                ok += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(ok, frames);
        best = best.min(secs);
    }
    println!(
        "decode: {frames} Token frames, {:.2} MB, best of 10: {:.2} ms = {:.1} MB/s ({:.2} M frames/s)",
        mb,
        best * 1e3,
        mb / best,
        frames as f64 / best / 1e6
    );

    let msgs: Vec<(Header, Message)> = {
        let mut decoder = FrameDecoder::new();
        decoder.push_slice(&line).map(Result::unwrap).collect()
    };
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let start = Instant::now();
        let mut bytes = 0usize;
        for (h, m) in black_box(&msgs) {
            bytes += encode_frame(h, m, &mut out).unwrap().len();
        }
        best = best.min(start.elapsed().as_secs_f64());
        assert_eq!(bytes, line.len());
    }
    println!("encode: same frames, best of 10: {:.2} ms = {:.1} MB/s", best * 1e3, mb / best);
    // For scale: a UART at 921 600 baud (8N1) carries 0.092 MB/s.
}
