//! Frame sizes: the per-piece overhead of streaming, and the largest frame of every kind.
//! docs/protocol.md quotes these numbers.

use edgelm_protocol::{
    encode_frame, ErrorCode, GenParams, Header, Message, Stats, StopReason, MAX_EMBED, MAX_FRAME, MAX_MESSAGE,
    MAX_NAME, MAX_PATH, MAX_PIECE, MAX_PROMPT,
};

fn frame_len(seq: u16, msg: &Message) -> usize {
    let mut out = [0u8; MAX_FRAME];
    encode_frame(&Header::for_message(seq, msg), msg, &mut out).unwrap().len()
}

fn token(index: u16, n: usize) -> Message {
    let text = heapless::String::try_from("x".repeat(n).as_str()).unwrap();
    Message::Token { index, text }
}

/// Bytes on the line beyond the text itself: vk (version and kind) 1 + seq 1..=3 + index 1..=3
/// + length 1..=2 + CRC 2 + COBS 1 + delimiter 1.
fn overhead(seq: u16, index: u16, n: usize) -> usize {
    frame_len(seq, &token(index, n)) - n
}

/// The per-token budget: at most this many bytes beyond the text in the usual case.
const BUDGET: usize = 8;

#[test]
fn token_overhead_is_eight_bytes_for_small_seq_index_and_text() {
    // Exhaustive: every seq < 128, every index < 128, every text length 1..=127.
    for seq in 0..128u16 {
        for index in 0..128u16 {
            for n in 1..=127 {
                let got = overhead(seq, index, n);
                assert!(got <= BUDGET, "seq {seq}, index {index}, {n} bytes of text: {got} > {BUDGET}");
                assert_eq!(got, 8, "seq {seq}, index {index}, {n} bytes of text");
            }
        }
    }
}

#[test]
fn token_overhead_by_varint_width() {
    let varint_len = |v: usize| match v {
        0..=127 => 1,
        128..=16383 => 2,
        _ => 3,
    };
    let edges = [0u16, 1, 127, 128, 129, 16383, 16384, 16385, u16::MAX];
    for seq in edges {
        for index in edges {
            for n in [0usize, 1, 64, 127, 128, 129, MAX_PIECE] {
                let want = 5 + varint_len(seq.into()) + varint_len(index.into()) + varint_len(n);
                assert_eq!(overhead(seq, index, n), want, "seq {seq}, index {index}, {n} bytes");
            }
        }
    }
    // Worst case: 3-byte seq and index, 2-byte length: 13 bytes; the frame is 213 bytes.
    assert_eq!(overhead(u16::MAX, u16::MAX, MAX_PIECE), 13);
    assert_eq!(frame_len(u16::MAX, &token(u16::MAX, MAX_PIECE)), 213);
    // The smallest frames: Ack, Cancel and GetStats with seq < 128 are 6 bytes.
    assert_eq!(frame_len(0, &Message::Ack), 6);
    assert_eq!(frame_len(127, &Message::Cancel), 6);
    assert_eq!(frame_len(5, &Message::GetStats), 6);
}

fn s<const N: usize>() -> heapless::String<N> {
    // Non-zero bytes everywhere maximise the COBS cost.
    heapless::String::try_from("y".repeat(N).as_str()).unwrap()
}

#[test]
fn largest_frame_of_every_kind_fits() {
    let f = f32::from_bits(0x4141_4141);
    let stats = Stats {
        prompt_tokens: u32::MAX,
        generated_tokens: u32::MAX,
        ttft_ms: f,
        decode_tokens_per_s: f,
        peak_rss_kib: u32::MAX,
        stop_reason: StopReason::Cancelled,
    };
    let params = GenParams {
        max_new_tokens: u16::MAX,
        temperature: f,
        top_k: u16::MAX,
        top_p: f,
        repetition_penalty: f,
        seed: u32::MAX,
        ignore_eos: true,
    };
    let cases: Vec<(Message, usize)> = vec![
        (Message::Hello { client: s::<MAX_NAME>() }, 57),
        (
            Message::Info {
                protocol: 0xFF,
                runtime: s::<16>(),
                model: s::<MAX_NAME>(),
                context: u32::MAX,
                max_prompt: u16::MAX,
                max_piece: u16::MAX,
                max_frame: u16::MAX,
            },
            89,
        ),
        (Message::LoadModel { path: s::<MAX_PATH>() }, 138),
        (Message::Generate { prompt: s::<MAX_PROMPT>(), params }, 419),
        (token(u16::MAX, MAX_PIECE), 213),
        (Message::Done { pieces: u16::MAX, stats }, 35),
        (Message::Cancel, 8),
        (Message::Resend { from: u16::MAX }, 11),
        (Message::Embed { text: s::<MAX_PROMPT>() }, 395),
        (
            Message::Embedding {
                index: u16::MAX,
                last: true,
                values: heapless::Vec::from_slice(&[f; MAX_EMBED]).unwrap(),
            },
            205,
        ),
        (Message::GetStats, 8),
        (Message::StatsReply { stats }, 32),
        (Message::Error { code: ErrorCode::Cancelled, message: s::<MAX_MESSAGE>() }, 106),
        (Message::Ack, 8),
        (Message::GenerateRaw { prompt: s::<MAX_PROMPT>(), params }, 419),
    ];
    assert_eq!(cases.len(), 15);
    let got: Vec<(u8, usize)> = cases.iter().map(|(msg, _)| (msg.kind(), frame_len(u16::MAX, msg))).collect();
    let want: Vec<(u8, usize)> = cases.iter().map(|(msg, want)| (msg.kind(), *want)).collect();
    assert_eq!(got, want, "largest frame per kind");
    assert!(got.iter().all(|&(_, len)| len <= MAX_FRAME));
}
