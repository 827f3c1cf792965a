//! Golden frames: docs/protocol-vectors.txt pins the exact bytes of every message kind.

use edgelm_protocol::{
    encode_frame, ErrorCode, FrameDecoder, GenParams, Header, Message, Stats, StopReason, MAX_FRAME, PROTOCOL_VERSION,
};

const VECTORS: &str = include_str!("../../../docs/protocol-vectors.txt");

fn s<const N: usize>(text: &str) -> heapless::String<N> {
    heapless::String::try_from(text).unwrap()
}

/// The message each vector describes, with its header.
fn expected(name: &str) -> Option<(Header, Message)> {
    let h = Header::new;
    Some(match name {
        "hello" => (h(0), Message::Hello { client: s("mcu-1") }),
        "info" => (
            h(0),
            Message::Info {
                protocol: 1,
                runtime: s("edgelm 0.1.0"),
                model: s("smollm2-135m"),
                context: 2048,
                max_prompt: 384,
                max_piece: 200,
                max_frame: 512,
            },
        ),
        "load_model" => (h(1), Message::LoadModel { path: s("/models/smollm2") }),
        "ack" => (h(0), Message::Ack),
        "generate" => (
            h(2),
            Message::Generate {
                prompt: s("Hi"),
                params: GenParams {
                    max_new_tokens: 64,
                    temperature: 0.7,
                    top_k: 40,
                    top_p: 0.9,
                    repetition_penalty: 1.1,
                    seed: 42,
                    ignore_eos: false,
                },
            },
        ),
        "generate_default" => (h(0), Message::Generate { prompt: s(""), params: GenParams::default() }),
        "token" => (h(2), Message::Token { index: 0, text: s("Hello") }),
        "token_utf8" => (h(300), Message::Token { index: 130, text: s(" 21.5 °C") }),
        "done" => (
            h(5),
            Message::Done {
                pieces: 3,
                stats: Stats {
                    prompt_tokens: 12,
                    generated_tokens: 3,
                    ttft_ms: 85.5,
                    decode_tokens_per_s: 14.25,
                    peak_rss_kib: 30720,
                    stop_reason: StopReason::Eos,
                },
            },
        ),
        "cancel" => (h(3), Message::Cancel),
        "resend" => (h(4), Message::Resend { from: 1 }),
        "embed" => (h(5), Message::Embed { text: s("hi") }),
        "embedding" => (
            h(6),
            Message::Embedding { index: 0, last: true, values: heapless::Vec::from_slice(&[0.5, -1.0, 0.25]).unwrap() },
        ),
        "get_stats" => (h(6), Message::GetStats),
        "stats_reply" => (h(7), Message::StatsReply { stats: Stats::default() }),
        "error" => (h(8), Message::Error { code: ErrorCode::NoModel, message: s("load a model first") }),
        "generate_raw" => (
            Header { version: 2, seq: 9 },
            Message::GenerateRaw { prompt: s("Hi"), params: GenParams { max_new_tokens: 16, ..GenParams::default() } },
        ),
        _ => return None,
    })
}

struct Vector<'a> {
    name: &'a str,
    bytes: Vec<u8>,
}

fn vectors() -> Vec<Vector<'static>> {
    VECTORS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(fields.len(), 3, "expected `name | description | bytes`: {line}");
            let bytes = fields[2].split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
            Vector { name: fields[0], bytes }
        })
        .collect()
}

#[test]
fn every_vector_encodes_to_its_bytes_and_decodes_back() {
    let all = vectors();
    assert!(all.len() >= 8);
    for v in &all {
        let (header, msg) = expected(v.name).unwrap_or_else(|| panic!("no expected message for vector `{}`", v.name));
        let mut out = [0u8; MAX_FRAME];
        let frame = encode_frame(&header, &msg, &mut out).unwrap();
        assert_eq!(frame, &v.bytes[..], "encoding of `{}`", v.name);

        let mut decoder = FrameDecoder::new();
        let results: Vec<_> = decoder.push_slice(&v.bytes).collect();
        assert_eq!(results, vec![Ok((header, msg))], "decoding of `{}`", v.name);
    }
}

#[test]
fn vectors_cover_every_kind() {
    let mut kinds = [false; 15];
    for v in vectors() {
        let (_, msg) = expected(v.name).unwrap();
        kinds[usize::from(msg.kind())] = true;
        // The first body byte packs version (top 3 bits) and kind (low 5 bits).
        let mut buf = v.bytes.clone();
        buf.pop();
        let n = edgelm_protocol::cobs_decode_in_place(&mut buf).unwrap();
        // Each frame carries the first version that has its kind.
        assert_eq!(buf[0] >> 5, msg.first_version(), "version bits of `{}`", v.name);
        assert!(msg.first_version() <= PROTOCOL_VERSION);
        assert_eq!(buf[0] & 0x1F, msg.kind(), "kind bits of `{}`", v.name);
        assert!(n >= 4);
    }
    assert!(kinds.iter().all(|&k| k), "a kind has no golden vector: {kinds:?}");
}

#[test]
fn names_are_unique() {
    let all = vectors();
    let mut names: Vec<_> = all.iter().map(|v| v.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len());
}

#[test]
fn error_codes_and_stop_reasons_have_their_numbers_on_the_wire() {
    for code in ErrorCode::ALL {
        let msg = Message::Error { code, message: s("") };
        let mut out = [0u8; MAX_FRAME];
        let frame = encode_frame(&Header::new(0), &msg, &mut out).unwrap().to_vec();
        let mut buf = frame[..frame.len() - 1].to_vec();
        edgelm_protocol::cobs_decode_in_place(&mut buf).unwrap();
        // vk, seq 0, then the code.
        assert_eq!(buf[..3], [0x2C, 0x00, code as u8], "{code:?}");
        assert_eq!(ErrorCode::from_u8(code as u8), Some(code));
    }
    assert_eq!(ErrorCode::from_u8(0), None);
    assert_eq!(ErrorCode::from_u8(11), None);
    let reasons = [
        StopReason::Eos,
        StopReason::StopString,
        StopReason::MaxTokens,
        StopReason::ContextFull,
        StopReason::Cancelled,
    ];
    for (i, reason) in reasons.into_iter().enumerate() {
        let bytes = postcard::to_slice(&reason, &mut [0u8; 4]).unwrap().to_vec();
        assert_eq!(bytes, [reason as u8]);
        assert_eq!(usize::from(reason as u8), i);
    }
}

/// docs/protocol.md shows frames as lines "on the line (vector `name`): HEX"; they must equal
/// the vectors file.
#[test]
fn examples_in_the_protocol_doc_match_the_vectors() {
    const DOC: &str = include_str!("../../../docs/protocol.md");
    let all = vectors();
    let mut checked = 0;
    for line in DOC.lines() {
        let Some(rest) = line.strip_prefix("on the line (vector `") else { continue };
        let (name, hex) = rest.split_once("`):").expect("(vector `name`): HEX");
        let bytes: Vec<u8> = hex.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        let v = all.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("doc names unknown vector `{name}`"));
        assert_eq!(bytes, v.bytes, "doc example `{name}`");
        checked += 1;
    }
    assert!(checked >= 2, "protocol.md shows only {checked} vector frames");
}
