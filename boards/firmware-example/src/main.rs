//! Example firmware: an STM32F4-class Cortex-M4F asks an edgelm board, over USART2, to answer
//! one prompt, and keeps the answer in RAM.
//!
//! The UART is a tiny polled driver (`uart.rs`) implementing the `embedded-hal-nb` serial
//! traits; `NbSerial` from edgelm-protocol adapts it to the `embedded_io` stream that
//! `Client` drives. No HAL, no allocator, no `core::fmt`.
//!
//! Results are left in statics for a debugger: `RESULT` (answer text and the board's stats once
//! a generation has finished, `finished` set), `FAILURES` (failed attempts) and `LAST_ERROR` (see
//! [`error_code`]). On any error the firmware sends `Cancel`, waits and starts again with
//! `Hello`.
//!
//! With the `qemu` feature it also reports through semihosting (`report.rs`) and ends the
//! emulator with a status, for QEMU's `netduinoplus2` machine.
#![no_std]
#![no_main]

#[cfg(feature = "qemu")]
mod report;
mod ticks;
mod uart;
mod vectors;

use core::cell::RefCell;
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::interrupt::Mutex;
use cortex_m_rt::entry;
use edgelm_protocol::client::{Client, ClientError};
use edgelm_protocol::hal_nb::{NbError, NbSerial};
use edgelm_protocol::{GenParams, Stats, StopReason};
use embedded_hal_nb::serial::ErrorKind;
use heapless::String;
use panic_halt as _;

use crate::uart::Usart2;

/// Core clock, the rate SysTick counts at (`ticks.rs`), for the timeouts below. 16 MHz is the
/// STM32F4's HSI after reset; set this to SYSCLK when your clock init raises it.
#[cfg(not(feature = "qemu"))]
const CORE_HZ: u32 = 16_000_000;
/// QEMU's `netduinoplus2` runs its core clock at a fixed 168 MHz, and SysTick follows it (in
/// host time, without `-icount`).
#[cfg(feature = "qemu")]
const CORE_HZ: u32 = 168_000_000;
/// A read that sees no byte for this long fails, so the call is retried (a tick count in a
/// `u32`: keep it below 2^32 ticks, about 25 s at 168 MHz).
const READ_TIMEOUT_TICKS: u32 = 20 * CORE_HZ;
/// Pause before trying again after an error.
const RETRY_DELAY_TICKS: u32 = 2 * CORE_HZ;

const CLIENT_NAME: &str = "stm32f4-example";
const PROMPT: &str = "turn on the hallway light";
const MAX_NEW_TOKENS: u16 = 32;
const ANSWER_CAP: usize = 256;

type Error = ClientError<NbError<ErrorKind>>;

/// The outcome of the generation, for a debugger to read.
pub struct Outcome {
    /// A generation has finished; the fields below are its results.
    pub finished: bool,
    /// The answer text, as far as it fits in `ANSWER_CAP` bytes.
    pub answer: String<ANSWER_CAP>,
    /// The answer was cut short because `answer` was full.
    pub truncated: bool,
    /// The board's counters for this generation.
    pub stats: Stats,
}

/// The finished generation (`finished` is false until then). All zeros at first, so it lives
/// in `.bss` and costs no flash.
#[no_mangle]
static RESULT: Mutex<RefCell<Outcome>> = Mutex::new(RefCell::new(Outcome {
    finished: false,
    answer: String::new(),
    truncated: false,
    stats: Stats {
        prompt_tokens: 0,
        generated_tokens: 0,
        ttft_ms: 0.0,
        decode_tokens_per_s: 0.0,
        peak_rss_kib: 0,
        stop_reason: StopReason::Eos,
    },
}));
/// Attempts that ended in an error.
#[no_mangle]
static FAILURES: AtomicU32 = AtomicU32::new(0);
/// [`error_code`] of the latest error, 0 if none.
#[no_mangle]
static LAST_ERROR: AtomicU32 = AtomicU32::new(0);

#[entry]
fn main() -> ! {
    // The UART's read timeout and the retry delay count SysTick ticks. `take` only fails if
    // called twice.
    let Some(mut cp) = cortex_m::Peripherals::take() else { halt() };
    ticks::start(&mut cp.SYST);
    let Some(uart) = Usart2::take(READ_TIMEOUT_TICKS) else { halt() };

    // embedded-hal-nb UART -> embedded_io stream -> protocol client.
    let mut client = Client::new(NbSerial(uart));
    let params = GenParams { max_new_tokens: MAX_NEW_TOKENS, ..Default::default() };
    #[cfg(feature = "qemu")]
    report::request(PROMPT, &params);

    loop {
        let mut answer = String::new();
        let mut truncated = false;
        match ask(&mut client, &params, &mut answer, &mut truncated) {
            Ok(stats) => {
                let outcome = Outcome { finished: true, answer, truncated, stats };
                #[cfg(feature = "qemu")]
                report::answer(&outcome);
                cortex_m::interrupt::free(|cs| RESULT.borrow(cs).replace(outcome));
                break;
            }
            Err(e) => {
                let code = error_code(e);
                LAST_ERROR.store(code, Ordering::Relaxed);
                let _failures = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
                #[cfg(feature = "qemu")]
                report::failure(code, _failures);
                // After a read timeout the board may still be generating: stop it (an idle
                // board ignores this). The board answers requests in order, so the next
                // attempt's Hello is answered after that answer's last frames and the client
                // reads past them (as `get_stats` would). A failed Cancel shows again then.
                let _ = client.cancel();
                ticks::delay(RETRY_DELAY_TICKS);
            }
        }
    }

    // Done: a real application would act on the answer here.
    #[cfg(feature = "qemu")]
    report::exit(true);
    halt()
}

/// One attempt: `Hello`, then `Generate`, collecting the pieces into `answer`.
fn ask(
    client: &mut Client<NbSerial<Usart2>>,
    params: &GenParams,
    answer: &mut String<ANSWER_CAP>,
    truncated: &mut bool,
) -> Result<Stats, Error> {
    // The Info reply says which model the board runs and its limits; this example needs none
    // of it (a board without a model answers Generate with Error(NoModel)).
    let _info = client.hello(CLIENT_NAME)?;
    client.generate(PROMPT, params, |piece| {
        if !*truncated && answer.push_str(piece).is_err() {
            // Full: keep what fits, whole characters only, and drop the rest of the answer.
            // Returning false here would cancel the generation instead.
            *truncated = true;
            let mut end = answer.capacity() - answer.len();
            while !piece.is_char_boundary(end) {
                end -= 1;
            }
            if let Some(head) = piece.get(..end) {
                let _ = answer.push_str(head);
            }
        }
        true
    })
}

/// A number for each kind of error, for `LAST_ERROR` (formatting text would pull in
/// `core::fmt`, several KiB of flash).
///
/// 1 I/O (a read timeout), 2 disconnected, 3 too many retries, 4 unexpected message,
/// 5 argument too long, 6 frame (protocol version), `0x100 + code` an `Error` from the board
/// (e.g. `0x106` no model loaded, `0x105` busy), `0xFF` anything else.
fn error_code(e: Error) -> u32 {
    match e {
        ClientError::Io(_) => 1,
        ClientError::Disconnected => 2,
        ClientError::TooManyRetries => 3,
        ClientError::Unexpected => 4,
        ClientError::PromptTooLong | ClientError::ArgumentTooLong => 5,
        ClientError::Frame(_) => 6,
        ClientError::Remote { code, .. } => 0x100 | u32::from(code.as_u8()),
        _ => 0xFF,
    }
}

/// Sleeps forever; interrupts (none are enabled here) would wake it briefly.
fn halt() -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}
