//! The line of one link: a reader thread that decodes frames, and a writer thread that owns the
//! outgoing bytes (frame order, coalescing of answer text, pacing to a UART's rate).
//!
//! The reader answers undecodable frames with an Error frame (the decoder resynchronises at
//! the next delimiter), handles Cancel and Resend at once, and admits requests to the worker:
//! at most `queue` may wait while one runs, counted by the reader as it decodes each frame and
//! released by the worker before an answer's last frame is sent, so a client that keeps at most
//! `queue + 1` requests without their last frame read is never refused. The writer sends generated
//! text as Token frames whenever the line is free, so a slow line gets fewer, fuller frames and
//! a fast one a frame per token; blocking writes pace the frames and nothing is dropped.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edgelm_protocol::{encode_frame, ErrorCode, FrameDecoder, Header, Message, Stats, MAX_FRAME, MAX_PIECE};

use super::wire::{bounded, error_frame};
use crate::link::is_idle;

/// What the worker and the reader ask the writer to send.
pub enum Outgoing {
    /// New text is in the answer buffer.
    Wake,
    /// A frame to send after any pending text.
    Frame(Box<Message>),
    /// Send what is pending, then Done with the piece count.
    Done(Stats),
    /// Send what is pending, then this Error, which ends the answer in place of Done.
    Failed(Box<Message>),
    /// Send the pieces of the current answer again, from this index.
    Resend(u16),
    /// A new answer starts: forget the old pieces, send its Ack, then tell the worker. Through
    /// the writer, so the Ack follows the previous answer's Done and precedes every piece.
    NewAnswer(SyncSender<()>),
}

/// The answer being streamed on this link.
#[derive(Default)]
pub struct AnswerBuf {
    /// Text generated but not yet sent.
    pub pending: String,
    /// Pieces sent, by index.
    pieces: Vec<String>,
    /// Whether any answer was started on this link (Resend needs one).
    started: bool,
    /// The Done stats once the answer finished.
    finished: Option<Stats>,
    /// The Error that ended the answer in place of Done, if one did.
    failed: Option<Message>,
}

/// State the three threads of a link share.
pub struct Shared {
    answer: Mutex<AnswerBuf>,
    /// Signalled when the writer took text out of `answer.pending`.
    drained: Condvar,
    /// Set by Cancel (or a closing link): the running generation stops.
    pub cancel: AtomicBool,
    /// The link is closing.
    pub closed: AtomicBool,
    /// Requests admitted and not yet finished (the running one plus those waiting).
    pub outstanding: AtomicUsize,
    /// How many may wait behind the running one.
    queue: usize,
}

impl Shared {
    pub fn new(queue: usize) -> Self {
        Shared {
            answer: Mutex::new(AnswerBuf::default()),
            drained: Condvar::new(),
            cancel: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            queue,
        }
    }

    pub fn answer(&self) -> MutexGuard<'_, AnswerBuf> {
        self.answer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds generated text and waits while more than one full piece is unsent, so generation
    /// runs at most a frame ahead of the line (bounded memory; a Cancel stops the model, not
    /// just the stream).
    pub fn push_text(&self, text: &str, out_tx: &Sender<Outgoing>) {
        let mut a = self.answer();
        a.pending.push_str(text);
        let _ = out_tx.send(Outgoing::Wake);
        while a.pending.len() > MAX_PIECE && !self.cancel.load(Ordering::SeqCst) {
            a = self.drained.wait_timeout(a, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Marks one admitted request as finished.
    pub fn finished_request(&self) {
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds writes to a line rate, as a UART would.
pub struct PacedWriter {
    pub inner: Box<dyn Write + Send>,
    pub bits_per_s: u32,
    pub next: Instant,
}

impl Write for PacedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // At most 16 bytes at a time, so pacing stays smooth.
        let n = self.inner.write(&buf[..buf.len().min(16)])?;
        let now = Instant::now();
        let start = self.next.max(now);
        self.next = start + Duration::from_secs_f64(n as f64 * 10.0 / self.bits_per_s as f64);
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads frames until the link closes.
pub fn read_loop(mut reader: Box<dyn Read + Send>, req_tx: Sender<Message>, out_tx: Sender<Outgoing>, shared: &Shared) {
    let mut decoder = FrameDecoder::new();
    // Room for a burst of frames in one read: requests that arrive together are admitted
    // together, before the running answer can end between two short reads and free a place.
    let mut buf = [0u8; 8 * MAX_FRAME];
    'link: while !shared.closed.load(Ordering::SeqCst) {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if is_idle(&e) => continue,
            Err(_) => break,
        };
        for frame in decoder.push_slice(&buf[..n]) {
            let reply = match frame {
                Err(e) => Some(error_frame(e.code(), &format!("bad frame: {e}"))),
                Ok((_, Message::Cancel)) => {
                    shared.cancel.store(true, Ordering::SeqCst);
                    None
                }
                Ok((_, Message::Resend { from })) => {
                    let _ = out_tx.send(Outgoing::Resend(from));
                    None
                }
                Ok((
                    _,
                    m @ (Message::Hello { .. }
                    | Message::LoadModel { .. }
                    | Message::Generate { .. }
                    | Message::GenerateRaw { .. }
                    | Message::Embed { .. }
                    | Message::GetStats),
                )) => {
                    if shared.outstanding.load(Ordering::SeqCst) > shared.queue {
                        Some(error_frame(ErrorCode::Busy, "request queue is full; wait for the running answer"))
                    } else {
                        shared.outstanding.fetch_add(1, Ordering::SeqCst);
                        if req_tx.send(m).is_err() {
                            break 'link;
                        }
                        None
                    }
                }
                Ok((_, other)) => Some(error_frame(
                    ErrorCode::InvalidRequest,
                    &format!("a board does not accept message kind {}", other.kind()),
                )),
            };
            if let Some(r) = reply {
                let _ = out_tx.send(Outgoing::Frame(Box::new(r)));
            }
        }
    }
    shared.closed.store(true, Ordering::SeqCst);
    // Wake a worker blocked in generation so the link can close.
    shared.cancel.store(true, Ordering::SeqCst);
}

/// Owns the outgoing bytes until the worker and the reader are gone.
pub fn write_loop(mut writer: Box<dyn Write + Send>, out_rx: Receiver<Outgoing>, shared: &Shared) {
    let mut frames = FrameWriter { seq: 0, buf: [0u8; MAX_FRAME] };
    while let Ok(out) = out_rx.recv() {
        let w = &mut writer;
        let ok = match out {
            Outgoing::Wake => frames.drain(w, shared),
            Outgoing::Frame(m) => frames.drain(w, shared) && frames.send(w, &m),
            Outgoing::Done(stats) => {
                let ok = frames.drain(w, shared);
                let pieces = {
                    let mut a = shared.answer();
                    a.finished = Some(stats);
                    a.pieces.len() as u16
                };
                ok && frames.send(w, &Message::Done { pieces, stats })
            }
            Outgoing::Failed(m) => {
                let ok = frames.drain(w, shared);
                shared.answer().failed = Some((*m).clone());
                ok && frames.send(w, &m)
            }
            Outgoing::Resend(from) => frames.resend(w, shared, from),
            Outgoing::NewAnswer(started) => {
                *shared.answer() = AnswerBuf { started: true, ..AnswerBuf::default() };
                let ok = frames.send(w, &Message::Ack);
                let _ = started.send(());
                ok
            }
        };
        if !ok {
            shared.closed.store(true, Ordering::SeqCst);
            shared.cancel.store(true, Ordering::SeqCst);
            break;
        }
    }
}

/// Encodes frames onto the line with the board's sequence numbers (the first frame is 1).
struct FrameWriter {
    seq: u16,
    buf: [u8; MAX_FRAME],
}

type Line<'a> = &'a mut Box<dyn Write + Send>;

impl FrameWriter {
    /// Sends one frame; false when the line is gone.
    fn send(&mut self, w: Line<'_>, m: &Message) -> bool {
        self.seq = self.seq.wrapping_add(1);
        match encode_frame(&Header::for_message(self.seq, m), m, &mut self.buf) {
            Ok(bytes) => w.write_all(bytes).and_then(|_| w.flush()).is_ok(),
            Err(_) => true,
        }
    }

    /// Sends pending answer text as Token frames of at most MAX_PIECE bytes.
    fn drain(&mut self, w: Line<'_>, shared: &Shared) -> bool {
        loop {
            let (index, text) = {
                let mut a = shared.answer();
                if a.pending.is_empty() {
                    return true;
                }
                let mut cut = a.pending.len().min(MAX_PIECE);
                while !a.pending.is_char_boundary(cut) {
                    cut -= 1;
                }
                let text: String = a.pending.drain(..cut).collect();
                a.pieces.push(text.clone());
                shared.drained.notify_all();
                (a.pieces.len() - 1, text)
            };
            if !self.send(w, &Message::Token { index: index as u16, text: bounded(&text) }) {
                return false;
            }
        }
    }

    /// The pieces from `from` on, then Done again (finished), the Error again (failed) or Ack
    /// (still running), so the client sees its request was served.
    fn resend(&mut self, w: Line<'_>, shared: &Shared, from: u16) -> bool {
        let (started, again, finished, failed, total) = {
            let a = shared.answer();
            let again: Vec<(usize, String)> =
                a.pieces.iter().enumerate().skip(from as usize).map(|(i, p)| (i, p.clone())).collect();
            (a.started, again, a.finished, a.failed.clone(), a.pieces.len() as u16)
        };
        if !started {
            return self.send(w, &error_frame(ErrorCode::InvalidRequest, "no answer to resend"));
        }
        again.iter().all(|(i, p)| self.send(w, &Message::Token { index: *i as u16, text: bounded(p) }))
            && match (finished, failed) {
                (Some(stats), _) => self.send(w, &Message::Done { pieces: total, stats }),
                (None, Some(error)) => self.send(w, &error),
                (None, None) => self.send(w, &Message::Ack),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgelm_protocol::decode_frame;

    /// The messages `run` writes through the writer thread, decoded.
    fn written(run: impl FnOnce(&Sender<Outgoing>)) -> Vec<Message> {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Shared::new(4);
        let bytes = std::sync::Arc::new(Mutex::new(Vec::new()));
        struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        run(&tx);
        drop(tx);
        write_loop(Box::new(Sink(bytes.clone())), rx, &shared);
        let mut all = bytes.lock().unwrap().clone();
        all.split_mut(|&b| b == 0).filter(|f| !f.is_empty()).map(|f| decode_frame(f).unwrap().1).collect()
    }

    /// An answer that ended with an Error is resent with that Error in place of Done, never
    /// with the Ack that means "still running" (a client would wait for ever).
    #[test]
    fn a_failed_answer_is_resent_with_its_error() {
        let error = error_frame(ErrorCode::Runtime, "the model failed");
        let out = written(|tx| {
            let (started, _started_rx) = std::sync::mpsc::sync_channel(1);
            tx.send(Outgoing::NewAnswer(started)).unwrap();
            tx.send(Outgoing::Failed(Box::new(error.clone()))).unwrap();
            tx.send(Outgoing::Resend(0)).unwrap();
        });
        assert_eq!(out, [Message::Ack, error.clone(), error]);
    }
}
