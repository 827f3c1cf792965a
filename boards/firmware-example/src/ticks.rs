//! Elapsed time from SysTick, run as a free-running 24-bit down counter at the core clock.
//!
//! SysTick rather than the DWT cycle counter: every Cortex-M3/M4/M7 has it and QEMU models it,
//! while QEMU does not model CYCCNT, so a timeout counted there never expires and a lost frame
//! would hang the firmware. No interrupt is used: a [`Stopwatch`] adds up the distance the
//! counter moved between two of its reads.

use cortex_m::peripheral::SYST;

/// SysTick counts 24 bits.
const MASK: u32 = 0x00FF_FFFF;

/// Starts SysTick counting down from 0xFF_FFFF at the core clock, reloading on its own, with
/// no interrupt. One period is 2^24 ticks: about 1 s at 16 MHz, 0.1 s at 168 MHz.
pub fn start(syst: &mut SYST) {
    // SAFETY: plain SysTick configuration; nothing else uses SysTick in this program.
    unsafe {
        syst.rvr.write(MASK);
        syst.cvr.write(0);
        // ENABLE | CLKSOURCE (processor clock); TICKINT stays off.
        syst.csr.write(0b101);
    }
}

/// Core clock ticks since it was started, from SysTick (which [`start`] must have set running).
///
/// Read it at least once per counter period (2^24 ticks): a longer gap loses whole periods,
/// so a timeout can come late but never early.
pub struct Stopwatch {
    last: u32,
    elapsed: u32,
}

impl Stopwatch {
    /// A stopwatch at zero.
    pub fn start() -> Self {
        Stopwatch { last: SYST::get_current(), elapsed: 0 }
    }

    /// Ticks since [`Stopwatch::start`] (saturating at `u32::MAX`).
    pub fn elapsed(&mut self) -> u32 {
        let now = SYST::get_current();
        // The counter runs down, so the distance moved is last - now, modulo 2^24.
        self.elapsed = self.elapsed.saturating_add(self.last.wrapping_sub(now) & MASK);
        self.last = now;
        self.elapsed
    }
}

/// Waits `ticks` core clock ticks.
pub fn delay(ticks: u32) {
    let mut watch = Stopwatch::start();
    while watch.elapsed() < ticks {}
}
