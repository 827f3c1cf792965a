//! The fuzz property (`fuzz_frame_decoder`) on 20 000 deterministic inputs, so it runs on stable
//! in every `cargo test`: random bytes, and valid frame streams with mutations (bit flips,
//! byte changes, insertions, deletions, truncation, splices, dropped and doubled delimiters).

mod common;

use common::{encode, Rng};
use edgelm_protocol::{fuzz_frame_body, fuzz_frame_decoder, ErrorCode, GenParams, Header, Message, Stats, MAX_EMBED};

fn text<const N: usize>(rng: &mut Rng) -> heapless::String<N> {
    const CHARS: [char; 8] = ['a', 'Z', ' ', '\0', 'é', '°', '中', '😀'];
    let mut s = heapless::String::new();
    let want = rng.below(N + 1);
    while s.len() < want {
        if s.push(CHARS[rng.below(CHARS.len())]).is_err() {
            break;
        }
    }
    s
}

fn float(rng: &mut Rng) -> f32 {
    // Includes NaN and infinities on purpose: the fuzz property compares bytes.
    f32::from_bits(rng.next_u64() as u32)
}

fn message(rng: &mut Rng) -> Message {
    let stats = Stats {
        prompt_tokens: rng.next_u64() as u32,
        generated_tokens: rng.next_u64() as u32,
        ttft_ms: float(rng),
        decode_tokens_per_s: float(rng),
        peak_rss_kib: rng.next_u64() as u32,
        stop_reason: Default::default(),
    };
    match rng.below(15) {
        0 => Message::Hello { client: text(rng) },
        1 => Message::Info {
            protocol: rng.next_u64() as u8,
            runtime: text(rng),
            model: text(rng),
            context: rng.next_u64() as u32,
            max_prompt: rng.next_u64() as u16,
            max_piece: rng.next_u64() as u16,
            max_frame: rng.next_u64() as u16,
        },
        2 => Message::LoadModel { path: text(rng) },
        3 => Message::Generate {
            prompt: text(rng),
            params: GenParams { temperature: float(rng), seed: rng.next_u64() as u32, ..GenParams::default() },
        },
        4 => Message::Token { index: rng.next_u64() as u16, text: text(rng) },
        5 => Message::Done { pieces: rng.next_u64() as u16, stats },
        6 => Message::Cancel,
        7 => Message::Resend { from: rng.next_u64() as u16 },
        8 => Message::Embed { text: text(rng) },
        9 => {
            let n = rng.below(MAX_EMBED + 1);
            let values: Vec<f32> = (0..n).map(|_| float(rng)).collect();
            Message::Embedding {
                index: rng.next_u64() as u16,
                last: rng.below(2) == 1,
                values: heapless::Vec::from_slice(&values).unwrap(),
            }
        }
        10 => Message::GetStats,
        11 => Message::StatsReply { stats },
        12 => Message::Error { code: ErrorCode::ALL[rng.below(ErrorCode::ALL.len())], message: text(rng) },
        13 => Message::Ack,
        _ => Message::GenerateRaw {
            prompt: text(rng),
            params: GenParams { seed: rng.next_u64() as u32, ..GenParams::default() },
        },
    }
}

fn valid_stream(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let m = message(rng);
        out.extend(encode(&Header::for_message(rng.next_u64() as u16, &m), &m));
    }
    out
}

/// The body of a frame (vk, seq, fields): the part the CRC covers, cut out of the encoded frame.
fn body_of(h: &Header, m: &Message) -> Vec<u8> {
    let mut frame = encode(h, m);
    frame.pop();
    let n = edgelm_protocol::cobs_decode_in_place(&mut frame).unwrap();
    frame.truncate(n - 2);
    frame
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            data.push(rng.next_u64() as u8);
        }
        let at = rng.below(data.len());
        match rng.below(8) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = rng.next_u64() as u8,
            2 => data.insert(at, rng.next_u64() as u8),
            3 => {
                data.remove(at);
            }
            4 => data.truncate(at),
            5 => {
                // Splice a copy of another part of the stream.
                let from = rng.below(data.len());
                let len = rng.below(data.len() - from + 1).min(64);
                let piece: Vec<u8> = data[from..from + len].to_vec();
                data.splice(at..at, piece);
            }
            6 => data.insert(at, 0),
            _ => {
                if let Some(zero) = data.iter().position(|&b| b == 0) {
                    data.remove(zero);
                }
            }
        }
    }
}

#[test]
fn fuzz_property_on_deterministic_inputs() {
    let mut rng = Rng(0x5EED_F00D_CAFE_BABE);
    let (mut clean_accepted, mut mutated_accepted) = (0, 0);
    for i in 0..20_000 {
        let input = match i % 4 {
            // Random bytes, sometimes with delimiters sprinkled in.
            0 => {
                let n = rng.below(1200);
                let zero_every = 1 + rng.below(200);
                (0..n).map(|k| if k % zero_every == 0 { 0 } else { rng.next_u64() as u8 }).collect()
            }
            // Valid frames, untouched: each must survive the round trip.
            1 => {
                let data = valid_stream(&mut rng);
                let frames = data.iter().filter(|&&b| b == 0).count();
                assert_eq!(fuzz_frame_decoder(&data), frames, "input {i}");
                clean_accepted += frames;
                continue;
            }
            // Valid frames, mutated.
            _ => {
                let mut data = valid_stream(&mut rng);
                mutate(&mut rng, &mut data);
                data
            }
        };
        let accepted = fuzz_frame_decoder(&input);
        if i % 4 != 0 {
            mutated_accepted += accepted;
        }
    }
    // Bodies behind a valid CRC: mutated real bodies and random bytes reach the message decoder.
    let mut body_accepted = 0;
    for i in 0..5_000 {
        let body = if i % 2 == 0 {
            let m = message(&mut rng);
            let h = Header::for_message(rng.next_u64() as u16, &m);
            let mut body = body_of(&h, &m);
            mutate(&mut rng, &mut body);
            body
        } else {
            let n = rng.below(64);
            let mut body: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            if let Some(first) = body.first_mut() {
                // A spoken version and a known kind, so the random rest reaches the decoder.
                *first = if *first % 15 == 14 { 0x40 | 14 } else { 0x20 | (*first % 14) };
            }
            body
        };
        body_accepted += fuzz_frame_body(&body);
    }
    assert!(body_accepted > 200, "{body_accepted}");
    // Mutations leave some frames of a stream intact; those must have gone through the check.
    assert!(clean_accepted > 10_000, "{clean_accepted}");
    assert!(mutated_accepted > 5_000, "{mutated_accepted}");
}
