//! A serial line for tests: a real PTY pair (the board opens the slave side by path, the test
//! talks through the master side), and a harness in between that can damage bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

/// The master side of a PTY pair plus the slave's path.
pub struct Pty {
    /// Master side: what the test reads and writes.
    pub master: File,
    /// Device path of the slave side (give it to `edgelm serve --serial`).
    pub slave_path: String,
    _slave: File,
}

/// Opens a PTY pair in raw mode.
pub fn open_pty() -> Pty {
    let (mut master, mut slave) = (0, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes two fds and a NUL-terminated name into the buffers given.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, name.as_mut_ptr(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty failed: {}", std::io::Error::last_os_error());
    // SAFETY: termios calls on the fresh slave fd; cfmakeraw fills the struct.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(slave, &mut t);
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(slave, libc::TCSANOW, &t);
    }
    // SAFETY: name was written NUL-terminated by openpty.
    let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: both fds are open and owned by nobody else.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    Pty { master, slave_path, _slave: slave }
}

/// Damage applied to bytes crossing the harness, per byte.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noise {
    /// Probability of flipping one random bit.
    pub flip: f64,
    /// Probability of dropping the byte.
    pub drop: f64,
    /// Probability of inserting a random byte before it.
    pub garbage: f64,
}

/// Client-side view of the line through the noise harness, with `embedded-io` traits. A read
/// that sees nothing for `timeout` fails with `TimedOut`, so a lost frame cannot hang a test.
pub struct NoisyLine {
    reader: File,
    writer: File,
    /// Noise on bytes from the board.
    pub rx_noise: Noise,
    /// Noise on bytes to the board.
    pub tx_noise: Noise,
    rng: u64,
    timeout: Duration,
    /// Bytes received from the board (before noise).
    pub rx_bytes: u64,
}

impl NoisyLine {
    /// A harness over the PTY master.
    pub fn new(master: &File, seed: u64, timeout: Duration) -> Self {
        NoisyLine {
            reader: master.try_clone().unwrap(),
            writer: master.try_clone().unwrap(),
            rx_noise: Noise::default(),
            tx_noise: Noise::default(),
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            timeout,
            rx_bytes: 0,
        }
    }

    fn next(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn damage(&mut self, input: &[u8], noise: Noise) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 4);
        for &b in input {
            if self.next() < noise.garbage {
                out.push((self.next() * 256.0) as u8);
            }
            if self.next() < noise.drop {
                continue;
            }
            let b = if self.next() < noise.flip { b ^ (1 << ((self.next() * 8.0) as u32 % 8)) } else { b };
            out.push(b);
        }
        out
    }

    /// Discards whatever the board sent that nobody read yet.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while poll_readable(&self.reader, Duration::from_millis(100)) {
            if self.reader.read(&mut buf).unwrap_or(0) == 0 {
                break;
            }
        }
    }
}

fn poll_readable(f: &File, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

impl embedded_io::ErrorType for NoisyLine {
    type Error = std::io::Error;
}

impl embedded_io::Read for NoisyLine {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, std::io::Error> {
        loop {
            if !poll_readable(&self.reader, self.timeout) {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no bytes from the board"));
            }
            let mut raw = vec![0u8; buf.len()];
            let n = self.reader.read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            self.rx_bytes += n as u64;
            let noise = self.rx_noise;
            let damaged = self.damage(&raw[..n], noise);
            if damaged.is_empty() {
                continue;
            }
            // Garbage can make the damaged chunk longer than the caller's buffer: keep it short.
            let m = damaged.len().min(buf.len());
            buf[..m].copy_from_slice(&damaged[..m]);
            return Ok(m);
        }
    }
}

impl embedded_io::Write for NoisyLine {
    fn write(&mut self, buf: &[u8]) -> Result<usize, std::io::Error> {
        let noise = self.tx_noise;
        let damaged = self.damage(buf, noise);
        self.writer.write_all(&damaged)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), std::io::Error> {
        self.writer.flush()
    }
}
