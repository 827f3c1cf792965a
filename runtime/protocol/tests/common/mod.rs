//! Strategies shared by the property tests: arbitrary messages within the protocol limits.
#![allow(dead_code)]

use edgelm_protocol::{ErrorCode, GenParams, Header, Message, Stats, StopReason, MAX_EMBED, MAX_FRAME};
use proptest::prelude::*;

/// Longest prefix of `chars` that fits in `N` bytes.
fn fit<const N: usize>(chars: Vec<char>) -> heapless::String<N> {
    let mut s = heapless::String::new();
    for c in chars {
        if s.push(c).is_err() {
            break;
        }
    }
    s
}

/// Like `fit`, then padded with ASCII to exactly `N` bytes.
fn fill<const N: usize>(chars: Vec<char>) -> heapless::String<N> {
    let mut s = fit::<N>(chars);
    while s.push('a').is_ok() {}
    s
}

/// Strings of up to `N` bytes: arbitrary characters (including NUL and 4-byte ones), and
/// strings of exactly `N` bytes made of 1-, 2-, 3- and 4-byte characters.
pub fn text<const N: usize>() -> impl Strategy<Value = heapless::String<N>> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..=N).prop_map(fit::<N>),
        prop::collection::vec(prop::sample::select(vec!['x', 'é', '°', '€', '中', '😀', '\0']), 0..=N)
            .prop_map(fill::<N>),
    ]
}

/// Any `f32` but NaN (NaN != NaN would break `==` on round trips; the fuzz property covers it).
pub fn float() -> impl Strategy<Value = f32> {
    any::<u32>().prop_map(|bits| {
        let f = f32::from_bits(bits);
        if f.is_nan() {
            f32::INFINITY
        } else {
            f
        }
    })
}

pub fn stop_reason() -> impl Strategy<Value = StopReason> {
    prop::sample::select(vec![
        StopReason::Eos,
        StopReason::StopString,
        StopReason::MaxTokens,
        StopReason::ContextFull,
        StopReason::Cancelled,
    ])
}

pub fn stats() -> impl Strategy<Value = Stats> {
    (any::<u32>(), any::<u32>(), float(), float(), any::<u32>(), stop_reason()).prop_map(
        |(prompt_tokens, generated_tokens, ttft_ms, decode_tokens_per_s, peak_rss_kib, stop_reason)| Stats {
            prompt_tokens,
            generated_tokens,
            ttft_ms,
            decode_tokens_per_s,
            peak_rss_kib,
            stop_reason,
        },
    )
}

pub fn params() -> impl Strategy<Value = GenParams> {
    (any::<u16>(), float(), any::<u16>(), float(), float(), any::<u32>(), any::<bool>()).prop_map(
        |(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos)| GenParams {
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            ignore_eos,
        },
    )
}

pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        text().prop_map(|client| Message::Hello { client }),
        (any::<u8>(), text(), text(), any::<u32>(), any::<u16>(), any::<u16>(), any::<u16>()).prop_map(
            |(protocol, runtime, model, context, max_prompt, max_piece, max_frame)| Message::Info {
                protocol,
                runtime,
                model,
                context,
                max_prompt,
                max_piece,
                max_frame,
            }
        ),
        text().prop_map(|path| Message::LoadModel { path }),
        (text(), params()).prop_map(|(prompt, params)| Message::Generate { prompt, params }),
        (any::<u16>(), text()).prop_map(|(index, text)| Message::Token { index, text }),
        (any::<u16>(), stats()).prop_map(|(pieces, stats)| Message::Done { pieces, stats }),
        Just(Message::Cancel),
        any::<u16>().prop_map(|from| Message::Resend { from }),
        text().prop_map(|text| Message::Embed { text }),
        (any::<u16>(), any::<bool>(), prop::collection::vec(float(), 0..=MAX_EMBED)).prop_map(
            |(index, last, values)| Message::Embedding {
                index,
                last,
                values: heapless::Vec::from_slice(&values).unwrap(),
            }
        ),
        Just(Message::GetStats),
        stats().prop_map(|stats| Message::StatsReply { stats }),
        (prop::sample::select(ErrorCode::ALL.to_vec()), text())
            .prop_map(|(code, message)| Message::Error { code, message }),
        Just(Message::Ack),
    ]
}

pub fn header() -> impl Strategy<Value = Header> {
    any::<u16>().prop_map(Header::new)
}

pub fn encode(header: &Header, msg: &Message) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    edgelm_protocol::encode_frame(header, msg, &mut out).unwrap().to_vec()
}

/// Tiny deterministic PRNG (xorshift64*) for the non-proptest generators.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
