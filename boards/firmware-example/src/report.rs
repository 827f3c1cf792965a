//! The `qemu` feature's report: semihosting output on the host's console and an exit status,
//! so a run in QEMU (`-semihosting-config enable=on,target=native`) can be checked by a program.
//!
//! Every line starts with `edgelm-firmware: `. The answer is length-prefixed because its text
//! may hold anything, newlines included:
//!
//! ```text
//! edgelm-firmware: request prompt="turn on the hallway light" max_new_tokens=32
//! edgelm-firmware: error code=0x1 attempt=1 of=3            (one line per failed attempt)
//! edgelm-firmware: answer bytes=N truncated=false
//! <exactly N bytes of answer text>
//! edgelm-firmware: stats prompt_tokens=P generated_tokens=G stop_reason=MaxTokens ttft_ms=T decode_tokens_per_s=D
//! ```
//!
//! QEMU exits with status 0 after the stats, or 1 once [`MAX_ATTEMPTS`] attempts failed.

use cortex_m_semihosting::debug::{self, EXIT_FAILURE, EXIT_SUCCESS};
use cortex_m_semihosting::{hprint, hprintln};
use edgelm_protocol::GenParams;

use crate::Outcome;

/// Attempts before giving up. The emulated line loses nothing, so a failure is a real one
/// (or a board that never answers); a few tries still exercise the recovery path.
pub const MAX_ATTEMPTS: u32 = 3;

/// What is about to be asked, so a checker can tell it matches its own expectation.
pub fn request(prompt: &str, params: &GenParams) {
    hprintln!("edgelm-firmware: request prompt={:?} max_new_tokens={}", prompt, params.max_new_tokens);
}

/// The answer and the board's stats.
pub fn answer(outcome: &Outcome) {
    hprintln!("edgelm-firmware: answer bytes={} truncated={}", outcome.answer.len(), outcome.truncated);
    hprint!(outcome.answer.as_str());
    let s = &outcome.stats;
    hprintln!(
        "\nedgelm-firmware: stats prompt_tokens={} generated_tokens={} stop_reason={:?} ttft_ms={} decode_tokens_per_s={}",
        s.prompt_tokens,
        s.generated_tokens,
        s.stop_reason,
        s.ttft_ms,
        s.decode_tokens_per_s
    );
}

/// A failed attempt (`code` as in `error_code`); ends the run after the last one.
pub fn failure(code: u32, attempt: u32) {
    hprintln!("edgelm-firmware: error code={:#x} attempt={} of={}", code, attempt, MAX_ATTEMPTS);
    if attempt >= MAX_ATTEMPTS {
        exit(false);
    }
}

/// Ends QEMU with status 0 (`ok`) or 1.
pub fn exit(ok: bool) {
    debug::exit(if ok { EXIT_SUCCESS } else { EXIT_FAILURE });
}
