//! Conversions between the runtime's types and the wire's, in one place.

use edgelm_protocol::{ErrorCode, GenParams, Message, Stats, StopReason as WireStop};
use edgelm_runtime::{Error, GenerateParams, Generation, SamplingParams, StopReason};

/// Copies `s` into a fixed-capacity string, cut at a character boundary if too long.
pub fn bounded<const N: usize>(s: &str) -> heapless::String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    heapless::String::try_from(&s[..end]).unwrap_or_default()
}

/// An Error frame.
pub fn error_frame(code: ErrorCode, message: &str) -> Message {
    Message::Error { code, message: bounded(message) }
}

/// The Error frame for a runtime failure.
pub fn runtime_error(e: &Error) -> Message {
    error_frame(error_code(e), &e.to_string())
}

/// The wire's class of a runtime error.
pub fn error_code(e: &Error) -> ErrorCode {
    match e {
        Error::ContextOverflow { .. } => ErrorCode::TooLong,
        Error::InvalidRequest(_) | Error::TokenOutOfRange { .. } | Error::NoTokenizer | Error::Tokenizer(_) => {
            ErrorCode::InvalidRequest
        }
        Error::WrongKind { .. } => ErrorCode::Unsupported,
        _ => ErrorCode::Runtime,
    }
}

/// The wire's stop reason.
pub fn stop_reason(r: StopReason) -> WireStop {
    match r {
        StopReason::Eos => WireStop::Eos,
        StopReason::StopString => WireStop::StopString,
        StopReason::MaxTokens => WireStop::MaxTokens,
        StopReason::ContextFull => WireStop::ContextFull,
        StopReason::Cancelled => WireStop::Cancelled,
    }
}

/// The stats a Done frame carries.
pub fn stats(g: &Generation) -> Stats {
    let m = &g.metrics;
    Stats {
        prompt_tokens: m.prompt_tokens as u32,
        generated_tokens: m.generated_tokens as u32,
        ttft_ms: m.ttft_ms as f32,
        decode_tokens_per_s: m.decode_tokens_per_s as f32,
        peak_rss_kib: (m.peak_rss_bytes / 1024) as u32,
        stop_reason: stop_reason(g.stop_reason),
    }
}

/// The runtime's request settings for a Generate's params.
pub fn generate_params(p: &GenParams) -> GenerateParams {
    let sampling = SamplingParams::default()
        .with_temperature(p.temperature)
        .with_top_k(p.top_k as usize)
        .with_top_p(p.top_p)
        .with_repetition_penalty(p.repetition_penalty)
        .with_seed(p.seed as u64);
    GenerateParams::default()
        .with_max_new_tokens(p.max_new_tokens as usize)
        .with_sampling(sampling)
        .with_ignore_eos(p.ignore_eos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        let s: heapless::String<4> = bounded("aé€x");
        assert_eq!(s.as_str(), "aé");
    }
}
