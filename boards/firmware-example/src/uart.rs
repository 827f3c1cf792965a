//! A tiny polled driver for USART2 of an STM32F4, with volatile register access and no HAL.
//!
//! It implements the `embedded-hal-nb` 1.x serial traits, the interface most HALs offer for a
//! UART; `edgelm_protocol::hal_nb::NbSerial` turns it into the `embedded_io` stream the client
//! wants. A HAL whose UART already implements `embedded_io::{Read, Write}` can be handed to
//! `Client::new` directly instead.
//!
//! Setup is deliberately minimal: clocks (RCC), pin muxing (PA2/PA3 as AF7 on most parts) and
//! the baud rate (BRR) are board-specific and omitted. This driver assumes the bootloader or the
//! clock init left USART2 clocked, wired and set to 115200 8N1; it only sets UE, TE and RE.
//!
//! Reads time out: when no byte has arrived for `read_timeout` core clock ticks (SysTick, see
//! `ticks.rs`; counted from the first empty poll after the last byte or write), `read` reports
//! `ErrorKind::Other`. The adapter passes that on, so a client call returns
//! `ClientError::Io` instead of blocking forever on a board that is not answering.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, Ordering};

use embedded_hal_nb::serial::{ErrorKind, ErrorType, Read, Write};

use crate::ticks::Stopwatch;

const USART2: usize = 0x4000_4400;
const SR: usize = 0x00;
const DR: usize = 0x04;
const CR1: usize = 0x0C;

// SR bits.
const PE: u32 = 1 << 0;
const FE: u32 = 1 << 1;
const NF: u32 = 1 << 2;
const ORE: u32 = 1 << 3;
const RXNE: u32 = 1 << 5;
const TC: u32 = 1 << 6;
const TXE: u32 = 1 << 7;
// CR1 bits.
const RE: u32 = 1 << 2;
const TE: u32 = 1 << 3;
const UE: u32 = 1 << 13;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// USART2, owned: at most one value exists.
pub struct Usart2 {
    read_timeout: u32,
    /// Running from the first empty poll since the last byte or write.
    idle: Option<Stopwatch>,
}

impl Usart2 {
    /// Takes USART2 (once; `None` afterwards) and enables its transmitter and receiver.
    ///
    /// `read_timeout` is in core clock ticks; SysTick must be running (`ticks::start`).
    pub fn take(read_timeout: u32) -> Option<Self> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return None;
        }
        let uart = Usart2 { read_timeout, idle: None };
        uart.set(CR1, uart.get(CR1) | UE | TE | RE);
        Some(uart)
    }

    fn get(&self, offset: usize) -> u32 {
        // SAFETY: a valid, aligned USART2 register on STM32F4, owned by `self`.
        unsafe { read_volatile((USART2 + offset) as *const u32) }
    }

    fn set(&self, offset: usize, value: u32) {
        // SAFETY: as in `get`.
        unsafe { write_volatile((USART2 + offset) as *mut u32, value) }
    }
}

impl ErrorType for Usart2 {
    type Error = ErrorKind;
}

impl Read<u8> for Usart2 {
    fn read(&mut self) -> nb::Result<u8, ErrorKind> {
        let sr = self.get(SR);
        if sr & (PE | FE | NF | ORE) != 0 {
            // Reading SR then DR clears the error flags; the byte is lost either way.
            let _ = self.get(DR);
            self.idle = None;
            let kind = if sr & ORE != 0 {
                ErrorKind::Overrun
            } else if sr & FE != 0 {
                ErrorKind::FrameFormat
            } else if sr & PE != 0 {
                ErrorKind::Parity
            } else {
                ErrorKind::Noise
            };
            return Err(nb::Error::Other(kind));
        }
        if sr & RXNE != 0 {
            self.idle = None;
            return Ok(self.get(DR) as u8);
        }
        match &mut self.idle {
            None => self.idle = Some(Stopwatch::start()),
            Some(watch) => {
                if watch.elapsed() >= self.read_timeout {
                    self.idle = None;
                    return Err(nb::Error::Other(ErrorKind::Other));
                }
            }
        }
        Err(nb::Error::WouldBlock)
    }
}

impl Write<u8> for Usart2 {
    fn write(&mut self, word: u8) -> nb::Result<(), ErrorKind> {
        // A request is going out: its answer gets a fresh read timeout.
        self.idle = None;
        if self.get(SR) & TXE == 0 {
            return Err(nb::Error::WouldBlock);
        }
        self.set(DR, u32::from(word));
        Ok(())
    }

    fn flush(&mut self) -> nb::Result<(), ErrorKind> {
        if self.get(SR) & TC == 0 {
            return Err(nb::Error::WouldBlock);
        }
        Ok(())
    }
}
