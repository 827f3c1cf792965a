//! Byte links between a board and a client: a serial port or a TCP socket, split into a reader
//! and a writer half, plus an adapter that gives std I/O the `embedded-io` traits the protocol
//! crate's client driver is written against.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::board::SerialPort;

/// `--serial` / `--baud` / `--tcp`, for both ends of a link.
#[derive(clap::Args)]
pub struct LinkArgs {
    /// Serial device (e.g. /dev/ttyUSB0); serve: the board profile's `[serial]` when absent.
    #[arg(long, conflicts_with = "tcp")]
    serial: Option<String>,
    /// Line speed of the serial port [default: serve: the board profile's `serial.baud`, else
    /// 115200; client: 115200].
    #[arg(long)]
    baud: Option<u32>,
    /// TCP address instead of a serial port (serve: listen; client: connect).
    #[arg(long)]
    tcp: Option<String>,
}

impl LinkArgs {
    /// Where the flags point; a flag left out takes the board's own port (`board_port`, for
    /// the side that runs on the board).
    pub fn addr(&self, board_port: Option<&SerialPort>) -> anyhow::Result<LinkAddr> {
        let baud = |fallback: u32| self.baud.unwrap_or(fallback);
        match (&self.serial, &self.tcp, board_port) {
            (Some(path), _, port) => {
                Ok(LinkAddr::Serial { path: path.clone(), baud: baud(port.map_or(115_200, |p| p.baud)) })
            }
            (None, Some(a), _) => Ok(LinkAddr::Tcp(a.clone())),
            (None, None, Some(port)) => Ok(LinkAddr::Serial { path: port.device.clone(), baud: baud(port.baud) }),
            (None, None, None) => {
                anyhow::bail!("no link: give --serial DEVICE or --tcp ADDR (or a --board profile with a [serial] port)")
            }
        }
    }
}

/// Where a link goes.
#[derive(Debug, Clone)]
pub enum LinkAddr {
    /// A serial device (`/dev/ttyUSB0`, `/dev/pts/3`) at a baud rate.
    Serial {
        /// Device path.
        path: String,
        /// Line speed in bits per second.
        baud: u32,
    },
    /// A TCP address (`127.0.0.1:7878`); for development without hardware.
    Tcp(String),
}

/// The two halves of an open link. Reads time out now and then (returning
/// `ErrorKind::TimedOut` or `WouldBlock`) so a reader can notice shutdown.
pub struct Link {
    /// Bytes from the other end.
    pub reader: Box<dyn Read + Send>,
    /// Bytes to the other end.
    pub writer: Box<dyn Write + Send>,
}

/// How long a read waits before reporting a timeout.
pub const READ_TIMEOUT: Duration = Duration::from_millis(200);

/// Opens a serial port as a link.
pub fn open_serial(path: &str, baud: u32) -> Result<Link> {
    let port = serialport::new(path, baud)
        .timeout(READ_TIMEOUT)
        .open()
        .with_context(|| format!("cannot open serial port {path} at {baud} baud"))?;
    let reader = port.try_clone().with_context(|| format!("cannot share serial port {path} between threads"))?;
    Ok(Link { reader: Box::new(reader), writer: Box::new(port) })
}

/// Wraps a connected TCP stream as a link.
pub fn tcp_link(stream: std::net::TcpStream) -> Result<Link> {
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(READ_TIMEOUT)).context("tcp: setting the read timeout")?;
    let reader = stream.try_clone().context("tcp: sharing the socket between threads")?;
    Ok(Link { reader: Box::new(reader), writer: Box::new(stream) })
}

/// Whether a read error only means "nothing arrived yet" (a timeout or an interruption).
pub fn is_idle(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted)
}

/// Gives a std reader/writer pair the `embedded-io` traits (blocking, no timeouts surfaced:
/// a timed-out read is retried).
pub struct EmbeddedIo<R, W> {
    /// Reading half.
    pub reader: R,
    /// Writing half.
    pub writer: W,
}

impl<R, W> embedded_io::ErrorType for EmbeddedIo<R, W> {
    type Error = std::io::Error;
}

impl<R: Read, W> embedded_io::Read for EmbeddedIo<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::result::Result<usize, std::io::Error> {
        loop {
            match self.reader.read(buf) {
                Err(e) if is_idle(&e) => continue,
                other => return other,
            }
        }
    }
}

impl<R, W: Write> embedded_io::Write for EmbeddedIo<R, W> {
    fn write(&mut self, buf: &[u8]) -> std::result::Result<usize, std::io::Error> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> std::result::Result<(), std::io::Error> {
        self.writer.flush()
    }
}
