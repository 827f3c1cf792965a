//! Timing and memory figures of one generation.

use serde::Serialize;

/// What one generation cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time to first token: prefill plus choosing the first token, in milliseconds.
    pub ttft_ms: f64,
    /// Prompt tokens per second during prefill.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second after the first (one decode step each).
    pub decode_tokens_per_s: f64,
    /// Wall time of the whole generation, in milliseconds.
    pub total_ms: f64,
    /// Peak resident memory of the process so far, in bytes (0 where unknown).
    pub peak_rss_bytes: u64,
}

/// Peak resident set size of this process (`VmHWM` on Linux), in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Resident set size of this process now (`VmRSS` on Linux), in bytes.
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The median of `v` (the mean of the middle two for an even count; 0 for none), the one
/// summary every benchmark of the project reports.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
