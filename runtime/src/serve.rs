//! The board side of the serial protocol: `edgelm serve`.
//!
//! Three threads per link. The reader decodes frames and answers malformed ones with an Error
//! frame (the decoder resynchronises at the next delimiter); it handles Cancel and Resend at
//! once and queues requests (bounded: a full queue answers `Busy`). The worker runs requests
//! one at a time, so one generation runs per link. The writer owns the line: generated text
//! collects in a buffer and the writer sends it as Token frames whenever the line is free, so a
//! slow line gets fewer, fuller frames (coalescing) and a fast one gets a frame per token.
//! Blocking writes pace the frames to the line; nothing is dropped. Pieces of the current
//! answer are kept until the next Generate so a client can ask for any of them again.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use edgelm_protocol::{
    encode_frame, ErrorCode, FrameDecoder, GenParams, Header, Message, Stats, StopReason as WireStop, MAX_EMBED,
    MAX_FRAME, MAX_PIECE, MAX_PROMPT,
};

use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::generate::{Engine, EngineOptions, GenerateParams, StopReason};
use crate::link::{is_idle, open_serial, tcp_link, Link, LinkAddr};
use crate::sampling::SamplingParams;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Bundle loaded at start (optional: a client can send LoadModel).
    pub bundle: Option<PathBuf>,
    /// Folder LoadModel paths are resolved in; LoadModel is refused without one.
    pub models_dir: Option<PathBuf>,
    /// Engine settings for every bundle loaded.
    pub engine: EngineOptions,
    /// Requests that may wait behind the running one.
    pub queue: usize,
    /// Pace writes to this many bits per second (10 bits per byte), for links that do not pace
    /// themselves (a PTY or TCP standing in for a UART during development).
    pub line_rate: Option<u32>,
}

/// State that outlives one connection: the loaded model and the last stats.
struct Board {
    opts: ServeOptions,
    engine: Option<(String, Engine)>,
    /// An encoder bundle, when the loaded model is one (then `engine` is None).
    encoder: Option<(String, Encoder)>,
    last_stats: Stats,
}

enum Outgoing {
    /// New text is in the answer buffer.
    Wake,
    /// A frame to send after any pending text.
    Frame(Box<Message>),
    /// Send what is pending, then Done with the piece count.
    Done(Stats),
    /// Send the pieces of the current answer again, from this index.
    Resend(u16),
    /// A new answer starts: forget the old pieces, then acknowledge. Going through the writer
    /// keeps it ordered after the previous answer's Done.
    NewAnswer(SyncSender<()>),
}

#[derive(Default)]
struct AnswerBuf {
    /// Text generated but not yet sent.
    pending: String,
    /// Pieces sent, by index.
    pieces: Vec<String>,
    /// Whether any answer was started on this link (Resend needs one).
    started: bool,
    /// The Done stats once the answer finished.
    finished: Option<Stats>,
}

struct Shared {
    answer: Mutex<AnswerBuf>,
    /// Signalled when the writer took text out of `answer.pending`.
    drained: Condvar,
    cancel: AtomicBool,
    closed: AtomicBool,
}

/// Copies `s` into a fixed-capacity string, cut at a character boundary if too long.
pub fn bounded<const N: usize>(s: &str) -> heapless::String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    heapless::String::try_from(&s[..end]).unwrap_or_default()
}

fn error_frame(code: ErrorCode, message: &str) -> Message {
    Message::Error { code, message: bounded(message) }
}

fn wire_stats(g: &crate::generate::Generation) -> Stats {
    let m = &g.metrics;
    Stats {
        prompt_tokens: m.prompt_tokens as u32,
        generated_tokens: m.generated_tokens as u32,
        ttft_ms: m.ttft_ms as f32,
        decode_tokens_per_s: m.decode_tokens_per_s as f32,
        peak_rss_kib: (m.peak_rss_bytes / 1024) as u32,
        stop_reason: match g.stop_reason {
            StopReason::Eos => WireStop::Eos,
            StopReason::StopString => WireStop::StopString,
            StopReason::MaxTokens => WireStop::MaxTokens,
            StopReason::ContextFull => WireStop::ContextFull,
            StopReason::Cancelled => WireStop::Cancelled,
        },
    }
}

fn error_code(e: &Error) -> ErrorCode {
    match e {
        Error::InvalidRequest(_)
        | Error::ContextOverflow { .. }
        | Error::TokenOutOfRange { .. }
        | Error::NoTokenizer
        | Error::Tokenizer(_) => ErrorCode::InvalidRequest,
        _ => ErrorCode::Runtime,
    }
}

/// Runs the daemon on a serial port or a TCP listener until the process is stopped. Bad input
/// never ends it: a broken link is reopened, a failed request answers an Error frame.
pub fn serve(addr: &LinkAddr, opts: ServeOptions) -> Result<()> {
    let mut board = Board { engine: None, encoder: None, last_stats: Stats::default(), opts };
    if let Some(b) = board.opts.bundle.clone() {
        board.load(&b)?;
    }
    match addr {
        LinkAddr::Serial { path, baud } => loop {
            match open_serial(path, *baud) {
                Ok(link) => {
                    eprintln!("edgelm serve: serial {path} at {baud} baud");
                    serve_link(link, &mut board);
                }
                Err(e) => eprintln!("edgelm serve: {e}; retrying"),
            }
            std::thread::sleep(Duration::from_millis(500));
        },
        LinkAddr::Tcp(a) => {
            let listener = std::net::TcpListener::bind(a)
                .map_err(|e| Error::InvalidRequest(format!("cannot listen on {a}: {e}")))?;
            let local = listener.local_addr().map_err(|e| Error::InvalidRequest(e.to_string()))?;
            eprintln!("edgelm serve: listening on {local}");
            for conn in listener.incoming() {
                match conn.map_err(|e| Error::InvalidRequest(e.to_string())).and_then(tcp_link) {
                    Ok(link) => serve_link(link, &mut board),
                    Err(e) => eprintln!("edgelm serve: {e}"),
                }
            }
            Ok(())
        }
    }
}

impl Board {
    /// Loads a bundle of either kind, replacing the current model.
    fn load(&mut self, dir: &Path) -> Result<()> {
        let is_encoder = dir.join(crate::bundle::MANIFEST).exists()
            && crate::bundle::read_manifest_kind(dir).is_ok_and(|k| k == "encoder");
        if is_encoder {
            let e = Encoder::open(dir, &self.opts.engine)?;
            (self.engine, self.encoder) = (None, Some((model_name(dir), e)));
        } else {
            let e = Engine::open(dir, &self.opts.engine)?;
            (self.engine, self.encoder) = (Some((model_name(dir), e)), None);
        }
        Ok(())
    }
}

fn model_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Serves one link until it closes.
fn serve_link(link: Link, board: &mut Board) {
    let shared = Arc::new(Shared {
        answer: Mutex::new(AnswerBuf::default()),
        drained: Condvar::new(),
        cancel: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>();
    let (req_tx, req_rx) = mpsc::sync_channel::<Message>(board.opts.queue.max(1));
    let Link { reader, writer } = link;
    let writer_thread = {
        let shared = shared.clone();
        let writer: Box<dyn Write + Send> = match board.opts.line_rate {
            Some(bps) => {
                Box::new(PacedWriter { inner: writer, bits_per_s: bps.max(1), next: std::time::Instant::now() })
            }
            None => writer,
        };
        std::thread::spawn(move || write_loop(writer, out_rx, &shared))
    };
    let reader_thread = {
        let (shared, out_tx) = (shared.clone(), out_tx.clone());
        std::thread::spawn(move || read_loop(reader, req_tx, out_tx, &shared))
    };
    work_loop(board, req_rx, &out_tx, &shared);
    shared.closed.store(true, Ordering::SeqCst);
    drop(out_tx);
    let _ = reader_thread.join();
    let _ = writer_thread.join();
}

/// Holds writes to a line rate, as a UART would.
struct PacedWriter {
    inner: Box<dyn Write + Send>,
    bits_per_s: u32,
    next: std::time::Instant,
}

impl Write for PacedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // At most 16 bytes at a time, so pacing stays smooth.
        let n = self.inner.write(&buf[..buf.len().min(16)])?;
        let now = std::time::Instant::now();
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

fn read_loop(mut reader: Box<dyn Read + Send>, req_tx: SyncSender<Message>, out_tx: Sender<Outgoing>, shared: &Shared) {
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 256];
    while !shared.closed.load(Ordering::SeqCst) {
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
                    | Message::Embed { .. }
                    | Message::GetStats),
                )) => match req_tx.try_send(m) {
                    Ok(()) => None,
                    Err(TrySendError::Full(_)) => {
                        Some(error_frame(ErrorCode::Busy, "request queue is full; wait for Done"))
                    }
                    Err(TrySendError::Disconnected(_)) => break,
                },
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

fn write_loop(mut writer: Box<dyn Write + Send>, out_rx: Receiver<Outgoing>, shared: &Shared) {
    let mut seq: u16 = 0;
    let mut frame = [0u8; MAX_FRAME];
    let mut send = |w: &mut Box<dyn Write + Send>, m: &Message| -> bool {
        seq = seq.wrapping_add(1);
        match encode_frame(&Header::new(seq), m, &mut frame) {
            Ok(bytes) => w.write_all(bytes).and_then(|_| w.flush()).is_ok(),
            Err(_) => true,
        }
    };
    // Sends pending text as Token frames of at most MAX_PIECE bytes.
    let drain =
        |w: &mut Box<dyn Write + Send>, send: &mut dyn FnMut(&mut Box<dyn Write + Send>, &Message) -> bool| -> bool {
            loop {
                let (index, text) = {
                    let mut a = shared.answer.lock().unwrap_or_else(|e| e.into_inner());
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
                if !send(w, &Message::Token { index: index as u16, text: bounded(&text) }) {
                    return false;
                }
            }
        };
    while let Ok(out) = out_rx.recv() {
        let ok = match out {
            Outgoing::Wake => drain(&mut writer, &mut send),
            Outgoing::Frame(m) => drain(&mut writer, &mut send) && send(&mut writer, &m),
            Outgoing::Done(stats) => {
                let ok = drain(&mut writer, &mut send);
                let pieces = {
                    let mut a = shared.answer.lock().unwrap_or_else(|e| e.into_inner());
                    a.finished = Some(stats);
                    a.pieces.len() as u16
                };
                ok && send(&mut writer, &Message::Done { pieces, stats })
            }
            Outgoing::Resend(from) => {
                // The pieces from `from` on, then Done again (finished) or Ack (still running),
                // so the client sees its request was served.
                let (started, again, finished, total) = {
                    let a = shared.answer.lock().unwrap_or_else(|e| e.into_inner());
                    let again: Vec<(usize, String)> =
                        a.pieces.iter().enumerate().skip(from as usize).map(|(i, p)| (i, p.clone())).collect();
                    (a.started, again, a.finished, a.pieces.len() as u16)
                };
                if !started {
                    send(&mut writer, &error_frame(ErrorCode::InvalidRequest, "no answer to resend"))
                } else {
                    again.iter().all(|(i, p)| send(&mut writer, &Message::Token { index: *i as u16, text: bounded(p) }))
                        && match finished {
                            Some(stats) => send(&mut writer, &Message::Done { pieces: total, stats }),
                            None => send(&mut writer, &Message::Ack),
                        }
                }
            }
            Outgoing::NewAnswer(ack) => {
                *shared.answer.lock().unwrap_or_else(|e| e.into_inner()) =
                    AnswerBuf { started: true, ..AnswerBuf::default() };
                let _ = ack.send(());
                true
            }
        };
        if !ok {
            shared.closed.store(true, Ordering::SeqCst);
            shared.cancel.store(true, Ordering::SeqCst);
            break;
        }
    }
}

fn work_loop(board: &mut Board, req_rx: Receiver<Message>, out_tx: &Sender<Outgoing>, shared: &Shared) {
    let reply = |m: Message| {
        let _ = out_tx.send(Outgoing::Frame(Box::new(m)));
    };
    loop {
        let req = match req_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) if !shared.closed.load(Ordering::SeqCst) => continue,
            Err(_) => return,
        };
        match req {
            Message::Hello { .. } => {
                let (model, context) = board
                    .engine
                    .as_ref()
                    .map(|(n, e)| (n.as_str(), e.context_length() as u32))
                    .unwrap_or_else(|| board.encoder.as_ref().map(|(n, _)| (n.as_str(), 0)).unwrap_or(("", 0)));
                reply(Message::Info {
                    protocol: edgelm_protocol::PROTOCOL_VERSION,
                    runtime: bounded(env!("CARGO_PKG_VERSION")),
                    model: bounded(model),
                    context,
                    max_prompt: MAX_PROMPT as u16,
                    max_piece: MAX_PIECE as u16,
                    max_frame: MAX_FRAME as u16,
                });
            }
            Message::GetStats => reply(Message::StatsReply { stats: board.last_stats }),
            Message::Embed { text } => match board.encoder.as_mut() {
                None => reply(error_frame(ErrorCode::Unsupported, "embeddings need an encoder bundle")),
                Some((_, enc)) => match enc.embed(&text) {
                    Ok(v) => {
                        let chunks: Vec<&[f32]> = v.chunks(MAX_EMBED).collect();
                        for (i, c) in chunks.iter().enumerate() {
                            let values = heapless::Vec::from_slice(c).unwrap_or_default();
                            reply(Message::Embedding { index: i as u16, last: i + 1 == chunks.len(), values });
                        }
                    }
                    Err(e) => reply(error_frame(error_code(&e), &e.to_string())),
                },
            },
            Message::LoadModel { path } => match resolve_model(board.opts.models_dir.as_deref(), &path) {
                Ok(dir) => match board.load(&dir) {
                    Ok(()) => reply(Message::Ack),
                    Err(e) => reply(error_frame(ErrorCode::Runtime, &e.to_string())),
                },
                Err(msg) => reply(error_frame(ErrorCode::InvalidRequest, &msg)),
            },
            Message::Generate { prompt, params } => generate(board, &prompt, &params, out_tx, shared),
            _ => {}
        }
    }
}

/// A LoadModel path: relative, inside the models folder.
fn resolve_model(root: Option<&Path>, rel: &str) -> std::result::Result<PathBuf, String> {
    let root = root.ok_or("this board loads no models over the link (start edgelm serve with --models-dir)")?;
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("model path `{rel}` must be a plain relative path inside the models folder"));
    }
    Ok(root.join(p))
}

fn generate(board: &mut Board, prompt: &str, params: &GenParams, out_tx: &Sender<Outgoing>, shared: &Shared) {
    if board.encoder.is_some() {
        let _ = out_tx.send(Outgoing::Frame(Box::new(error_frame(
            ErrorCode::Unsupported,
            "the loaded model is an encoder: send Embed",
        ))));
        return;
    }
    let Some((_, engine)) = board.engine.as_mut() else {
        let _ =
            out_tx.send(Outgoing::Frame(Box::new(error_frame(ErrorCode::NoModel, "no model loaded; send LoadModel"))));
        return;
    };
    let ids = match engine.encode(prompt) {
        Ok(ids) => ids,
        Err(e) => {
            let _ = out_tx.send(Outgoing::Frame(Box::new(error_frame(error_code(&e), &e.to_string()))));
            return;
        }
    };
    let gp = GenerateParams {
        max_new_tokens: params.max_new_tokens as usize,
        sampling: SamplingParams {
            temperature: params.temperature,
            top_k: params.top_k as usize,
            top_p: params.top_p,
            repetition_penalty: params.repetition_penalty,
            seed: params.seed as u64,
        },
        stop_strings: vec![],
        ignore_eos: params.ignore_eos,
    };
    let (ack_tx, ack_rx) = mpsc::sync_channel(1);
    if out_tx.send(Outgoing::NewAnswer(ack_tx)).is_err() || ack_rx.recv().is_err() {
        return; // the writer is gone: the link closed
    }
    // Accepted: Ack first, then the pieces, then Done.
    let _ = out_tx.send(Outgoing::Frame(Box::new(Message::Ack)));
    shared.cancel.store(false, Ordering::SeqCst);
    let result = engine.generate(&ids, &gp, |ev| {
        if !ev.text.is_empty() {
            let mut a = shared.answer.lock().unwrap_or_else(|e| e.into_inner());
            a.pending.push_str(ev.text);
            let _ = out_tx.send(Outgoing::Wake);
            // Generation runs at most one full frame ahead of the line: memory stays bounded and
            // a Cancel stops the model, not just the stream.
            while a.pending.len() > MAX_PIECE && !shared.cancel.load(Ordering::SeqCst) {
                a = shared.drained.wait_timeout(a, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        if shared.cancel.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    match result {
        Ok(g) => {
            let stats = wire_stats(&g);
            board.last_stats = stats;
            let _ = out_tx.send(Outgoing::Done(stats));
        }
        Err(e) => {
            let _ = out_tx.send(Outgoing::Frame(Box::new(error_frame(error_code(&e), &e.to_string()))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        let s: heapless::String<4> = bounded("aé€x");
        assert_eq!(s.as_str(), "aé");
    }

    #[test]
    fn model_paths_stay_inside_the_models_folder() {
        let root = Path::new("/models");
        assert_eq!(resolve_model(Some(root), "tiny").unwrap(), Path::new("/models/tiny"));
        for bad in ["../etc", "/abs", "a/../../b", ""] {
            assert!(resolve_model(Some(root), bad).is_err(), "{bad}");
        }
        assert!(resolve_model(None, "tiny").is_err());
    }
}
