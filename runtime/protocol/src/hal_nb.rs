//! Adapter from an `embedded-hal-nb` 1.x serial port (a HAL's UART) to the blocking
//! `embedded_io` stream that [`Client`](crate::client::Client) reads and writes.
//!
//! Line errors (overrun, framing, parity, noise) lose one byte. The adapter drops that byte and
//! keeps reading: the frame it belonged to then fails its COBS or CRC check, and the protocol
//! recovers it (`Resend`, or sending the request again). Only errors of kind `Other` reach the
//! caller.
//!
//! ```ignore
//! let uart = hal::Serial::new(p.USART2, pins, 115_200.bps(), &clocks);
//! let mut client = edgelm_protocol::client::Client::new(NbSerial(uart));
//! ```

use embedded_hal_nb::serial::{self, ErrorKind as SerialErrorKind};

/// A blocking `embedded_io` stream over an `embedded-hal-nb` serial port `S`.
#[derive(Debug)]
pub struct NbSerial<S>(pub S);

/// An error of the wrapped serial port that the adapter could not absorb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbError<E>(pub E);

impl<E: serial::Error> core::fmt::Display for NbError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "serial port error: {:?}", self.0)
    }
}

impl<E: serial::Error> core::error::Error for NbError<E> {}

impl<E: serial::Error> embedded_io::Error for NbError<E> {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self.0.kind() {
            SerialErrorKind::Other => embedded_io::ErrorKind::Other,
            _ => embedded_io::ErrorKind::InvalidData,
        }
    }
}

impl<S: serial::ErrorType> embedded_io::ErrorType for NbSerial<S> {
    type Error = NbError<S::Error>;
}

/// True for errors that only cost the byte being received.
fn is_line_error<E: serial::Error>(e: &E) -> bool {
    !matches!(e.kind(), SerialErrorKind::Other)
}

impl<S: serial::Read<u8>> embedded_io::Read for NbSerial<S> {
    /// Blocks for the first byte, then takes whatever else is already waiting, without blocking.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match nb::block!(self.0.read()) {
                Ok(b) => {
                    buf[0] = b;
                    break;
                }
                Err(e) if is_line_error(&e) => continue,
                Err(e) => return Err(NbError(e)),
            }
        }
        let mut n = 1;
        while n < buf.len() {
            match self.0.read() {
                Ok(b) => {
                    buf[n] = b;
                    n += 1;
                }
                Err(nb::Error::WouldBlock) => break,
                Err(nb::Error::Other(e)) if is_line_error(&e) => {}
                Err(nb::Error::Other(e)) => return Err(NbError(e)),
            }
        }
        Ok(n)
    }
}

impl<S: serial::Write<u8>> embedded_io::Write for NbSerial<S> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            nb::block!(self.0.write(b)).map_err(NbError)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        nb::block!(self.0.flush()).map_err(NbError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_io::{Read, Write};
    use std::collections::VecDeque;

    /// A serial port that is "not ready" every other poll and reports a noise error once.
    #[derive(Default)]
    struct FakeUart {
        rx: VecDeque<Result<u8, SerialErrorKind>>,
        tx: std::vec::Vec<u8>,
        busy: bool,
    }

    impl serial::ErrorType for FakeUart {
        type Error = SerialErrorKind;
    }

    impl serial::Read<u8> for FakeUart {
        fn read(&mut self) -> nb::Result<u8, Self::Error> {
            self.busy = !self.busy;
            if self.busy {
                return Err(nb::Error::WouldBlock);
            }
            match self.rx.pop_front() {
                Some(Ok(b)) => Ok(b),
                Some(Err(e)) => Err(nb::Error::Other(e)),
                None => Err(nb::Error::WouldBlock),
            }
        }
    }

    impl serial::Write<u8> for FakeUart {
        fn write(&mut self, word: u8) -> nb::Result<(), Self::Error> {
            self.busy = !self.busy;
            if self.busy {
                return Err(nb::Error::WouldBlock);
            }
            self.tx.push(word);
            Ok(())
        }

        fn flush(&mut self) -> nb::Result<(), Self::Error> {
            Ok(())
        }
    }

    #[test]
    fn reads_skip_line_errors_and_writes_block() {
        let mut uart = FakeUart::default();
        uart.rx.extend([Ok(1), Err(SerialErrorKind::Noise), Ok(2), Ok(3)]);
        let mut port = NbSerial(uart);
        let mut buf = [0u8; 8];
        let mut got = std::vec::Vec::new();
        while got.len() < 3 {
            let n = port.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [1, 2, 3]);
        port.write_all(&[9, 8, 7]).unwrap();
        port.flush().unwrap();
        assert_eq!(port.0.tx, [9, 8, 7]);

        port.0.rx.push_back(Err(SerialErrorKind::Other));
        let err = port.read(&mut buf).unwrap_err();
        assert_eq!(embedded_io::Error::kind(&err), embedded_io::ErrorKind::Other);
    }
}
