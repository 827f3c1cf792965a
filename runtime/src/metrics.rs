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

/// A field of /proc/meminfo (`"MemTotal:"`, `"MemAvailable:"`), in bytes; none where that file
/// or field is missing.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    kib_field("/proc/meminfo", field).map(|kib| kib * 1024)
}

/// Memory this process could still take, in bytes: the system's `MemAvailable`, or less where
/// the control group it runs in (a container's) has a lower limit left, cgroup v2 or v1; none
/// where not known.
pub fn available_memory_bytes() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    // "max" (no limit) does not parse and leaves the system figure.
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ]
    .into_iter()
    .find_map(|(limit, used)| Some(read(limit)?.saturating_sub(read(used)?)));
    match (meminfo_bytes("MemAvailable:"), cgroup) {
        (Some(system), Some(group)) => Some(system.min(group)),
        (system, group) => system.or(group),
    }
}

fn status_kib(key: &str) -> u64 {
    kib_field("/proc/self/status", key).unwrap_or(0)
}

/// The number after `key` in a /proc file of `key value kB` lines.
fn kib_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
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
