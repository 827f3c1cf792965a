//! Firmware-side driver: speaks the protocol over any blocking `embedded_io` byte stream.
//!
//! [`Client`] owns the stream, a [`FrameDecoder`], a transmit buffer and a 64-byte receive
//! buffer (about 1.1 KiB in all, no allocation). Every call sends one request and blocks until
//! its answer, so one call runs at a time.
//!
//! Recovery, all driven by what arrives (there are no timers in `no_std`):
//! * A damaged answer to [`hello`](Client::hello), [`load_model`](Client::load_model) or
//!   [`get_stats`](Client::get_stats), or an `Error { Corrupt }` from the board, makes the client
//!   send the request again (these requests are idempotent), up to [`MAX_RETRIES`] times.
//! * During [`generate`](Client::generate), a gap in the piece indices, a damaged frame, or a
//!   `Done` that counts more pieces than arrived makes the client send `Resend { from }` for the
//!   first missing piece. It asks once per missing index until the board has visibly answered
//!   (an `Ack` after the resent pieces, a second `Done`, or a `Done` after the board was known to
//!   be finished; a damaged frame counts as a possible `Done`), and at most [`MAX_RETRIES`]
//!   times without progress. Pieces reach the callback once each, in order.
//! * After an answer that needed a `Resend`, the client sends `GetStats` and drops everything
//!   up to its `StatsReply`. The board answers in order, so duplicates from the recovery are
//!   not left on the line for the next call.
//! * Frames left over from an earlier exchange (a stray piece or `Done`, a second `StatsReply`)
//!   are skipped.
//!
//! Timeouts: a read that never returns blocks the client forever (e.g. a board that lost
//! power, or a last frame of an exchange, such as `Done`, that vanished without a trace; a
//! damaged one is recovered). Firmware that needs a bound gives the
//! client a `Read` that fails after a deadline; the call then returns [`ClientError::Io`], and
//! [`cancel`](Client::cancel) stops a generation that may still be running.

use embedded_io::{Read, Write};
use heapless::String;

use crate::{
    encode_frame, ErrorCode, FrameDecoder, FrameError, FrameResult, GenParams, Header, Message, Stats, MAX_FRAME,
    MAX_MESSAGE, MAX_NAME,
};

/// How many times in a row a request or a `Resend` is sent without progress before a call
/// gives up with [`ClientError::TooManyRetries`].
pub const MAX_RETRIES: u8 = 8;

/// Bytes read from the stream per `read` call.
const RX_CHUNK: usize = 64;

/// What the board said about itself in answer to [`Client::hello`]; mirrors
/// [`Message::Info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The board's protocol version.
    pub protocol: u8,
    /// Runtime name and version.
    pub runtime: String<16>,
    /// Loaded model, empty when none.
    pub model: String<MAX_NAME>,
    /// Context length of the loaded model in tokens.
    pub context: u32,
    /// Largest prompt the board accepts, bytes.
    pub max_prompt: u16,
    /// Largest piece the board sends, bytes.
    pub max_piece: u16,
    /// Largest frame the board sends or accepts, bytes with the delimiter.
    pub max_frame: u16,
}

/// Why a [`Client`] call failed. `E` is the stream's error type.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError<E> {
    /// The stream failed to read or write; the value is its error.
    Io(E),
    /// The stream ended (`read` returned 0 bytes): the board is gone or the port was closed.
    Disconnected,
    /// The board answered with [`Message::Error`]: its code says why, its message gives the
    /// board's detail (may be empty).
    Remote {
        /// The board's error code.
        code: ErrorCode,
        /// The board's human-readable detail, at most [`MAX_MESSAGE`] bytes.
        message: String<MAX_MESSAGE>,
    },
    /// [`MAX_RETRIES`] requests or resends in a row brought no progress; the line is too noisy
    /// or the board is not answering as the protocol says.
    TooManyRetries,
    /// The board sent a message only a client sends (e.g. `Generate`): the line is looped back
    /// or another client is connected, or a `Done` counted fewer pieces than were delivered.
    Unexpected,
    /// The prompt is longer than [`MAX_PROMPT`](crate::MAX_PROMPT) bytes; shorten it or check
    /// [`Info::max_prompt`].
    PromptTooLong,
    /// A name or path argument is longer than its limit ([`MAX_NAME`], [`MAX_PATH`](crate::MAX_PATH)).
    ArgumentTooLong,
    /// A frame could not be used: the board speaks another protocol version
    /// ([`FrameError::Version`]).
    Frame(FrameError),
}

impl<E: core::fmt::Debug> core::fmt::Display for ClientError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "serial I/O error: {e:?}"),
            ClientError::Disconnected => f.write_str("serial stream closed; check the cable and that the board runs"),
            ClientError::Remote { code, message } if message.is_empty() => {
                write!(f, "board reported an error: {code}")
            }
            ClientError::Remote { code, message } => write!(f, "board reported an error: {code}: {message}"),
            ClientError::TooManyRetries => {
                write!(f, "no progress after {MAX_RETRIES} retries; check baud rate, wiring and noise")
            }
            ClientError::Unexpected => f.write_str("board sent a message out of protocol; is the line looped back?"),
            ClientError::PromptTooLong => write!(f, "prompt longer than {} bytes", crate::MAX_PROMPT),
            ClientError::ArgumentTooLong => {
                write!(f, "name longer than {MAX_NAME} bytes or path longer than {} bytes", crate::MAX_PATH)
            }
            ClientError::Frame(e) => write!(f, "{e}"),
        }
    }
}

impl<E: core::fmt::Debug> core::error::Error for ClientError<E> {}

/// The firmware-side protocol driver over a blocking byte stream `T`.
///
/// ```
/// # use edgelm_protocol::client::Client;
/// # fn run<T: embedded_io::Read + embedded_io::Write>(uart: T) -> Result<(), edgelm_protocol::client::ClientError<T::Error>> {
/// let mut client = Client::new(uart);
/// let info = client.hello("thermostat-fw 1.2")?;
/// let params = edgelm_protocol::GenParams { max_new_tokens: 32, ..Default::default() };
/// let stats = client.generate("Set the heater to 21 degrees", &params, |piece| {
///     // show `piece` on the display; return false to stop early
///     true
/// })?;
/// # let _ = (info, stats); Ok(()) }
/// ```
pub struct Client<T> {
    io: T,
    decoder: FrameDecoder,
    seq: u16,
    tx: [u8; MAX_FRAME],
    rx: [u8; RX_CHUNK],
    rx_pos: usize,
    rx_len: usize,
}

impl<T: Read + Write> Client<T> {
    /// A client over `io`, a byte stream to the board (see [`crate::hal_nb::NbSerial`] for an
    /// `embedded-hal-nb` UART).
    pub fn new(io: T) -> Self {
        Client { io, decoder: FrameDecoder::new(), seq: 0, tx: [0; MAX_FRAME], rx: [0; RX_CHUNK], rx_pos: 0, rx_len: 0 }
    }

    /// Gives the stream back. Bytes already read but not yet decoded are dropped.
    pub fn into_inner(self) -> T {
        self.io
    }

    /// Sends `Hello { client: name }` and returns the board's [`Info`].
    pub fn hello(&mut self, name: &str) -> Result<Info, ClientError<T::Error>> {
        let client = String::try_from(name).map_err(|_| ClientError::ArgumentTooLong)?;
        self.request(&Message::Hello { client }, |msg| match msg {
            Message::Info { protocol, runtime, model, context, max_prompt, max_piece, max_frame } => {
                Some(Info { protocol, runtime, model, context, max_prompt, max_piece, max_frame })
            }
            _ => None,
        })
    }

    /// Sends `LoadModel { path }` and waits until the board acknowledges that the model is
    /// loaded. Loading can take seconds; the call blocks meanwhile.
    pub fn load_model(&mut self, path: &str) -> Result<(), ClientError<T::Error>> {
        let path = String::try_from(path).map_err(|_| ClientError::ArgumentTooLong)?;
        self.request(&Message::LoadModel { path }, |msg| matches!(msg, Message::Ack).then_some(()))
    }

    /// Sends `GetStats` and returns the counters of the board's last generation.
    pub fn get_stats(&mut self) -> Result<Stats, ClientError<T::Error>> {
        self.request(&Message::GetStats, |msg| match msg {
            Message::StatsReply { stats } => Some(stats),
            _ => None,
        })
    }

    /// Sends `Cancel` and returns without waiting. Use it after a `generate` call was cut short
    /// (e.g. by a read timeout) while the board may still be generating: the board ends that
    /// answer (an idle board ignores `Cancel`). Then call [`get_stats`](Client::get_stats), which
    /// reads past the rest of that answer, before the next `generate`.
    pub fn cancel(&mut self) -> Result<(), ClientError<T::Error>> {
        self.send(&Message::Cancel)
    }

    /// Generates an answer to `prompt`, calling `on_piece` with each piece of text in order,
    /// exactly once per piece. Returns the board's [`Stats`] when the answer is complete.
    ///
    /// When `on_piece` returns `false` the client sends `Cancel` once, stops calling
    /// `on_piece`, and returns the stats of the board's closing `Done` (stop reason
    /// [`StopReason::Cancelled`](crate::StopReason::Cancelled), unless the answer had already
    /// finished). `Ack` frames are ignored. Lost or damaged pieces are recovered with `Resend`,
    /// as the module doc describes.
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
        on_piece: impl FnMut(&str) -> bool,
    ) -> Result<Stats, ClientError<T::Error>> {
        self.answer(prompt, params, false, on_piece)
    }

    /// [`Client::generate`] with the prompt fed to the model as it is, without the bundle's
    /// chat template ([`Message::GenerateRaw`], protocol version 2: a board whose
    /// [`Info`]`.protocol` is 1 answers [`ClientError::Remote`] with code `Version`).
    pub fn generate_raw(
        &mut self,
        prompt: &str,
        params: &GenParams,
        on_piece: impl FnMut(&str) -> bool,
    ) -> Result<Stats, ClientError<T::Error>> {
        self.answer(prompt, params, true, on_piece)
    }

    fn answer(
        &mut self,
        prompt: &str,
        params: &GenParams,
        raw: bool,
        mut on_piece: impl FnMut(&str) -> bool,
    ) -> Result<Stats, ClientError<T::Error>> {
        let prompt = String::try_from(prompt).map_err(|_| ClientError::PromptTooLong)?;
        let params = *params;
        self.send(&if raw { Message::GenerateRaw { prompt, params } } else { Message::Generate { prompt, params } })?;
        let mut answer = Answer::default();
        loop {
            let frame = self.next_frame()?;
            match answer.on_frame(frame, &mut on_piece)? {
                Step::Wait => {}
                Step::Resend(from) => self.send(&Message::Resend { from })?,
                Step::Cancel => self.send(&Message::Cancel)?,
                Step::Finish(stats) => {
                    if answer.resent {
                        self.sync()?;
                    }
                    return Ok(stats);
                }
            }
        }
    }

    /// Sends `GetStats` and reads until its `StatsReply`, dropping everything before it. The
    /// board answers in order, so after this no answer to an earlier `Resend` is left on the
    /// line to confuse the next call.
    fn sync(&mut self) -> Result<(), ClientError<T::Error>> {
        self.send(&Message::GetStats)?;
        let mut retries = 0;
        loop {
            match self.next_frame()? {
                Ok((_, Message::StatsReply { .. })) => return Ok(()),
                Ok((_, msg)) if is_client_kind(&msg) => return Err(ClientError::Unexpected),
                Ok(_) => {}
                Err(e @ FrameError::Version(_)) => return Err(ClientError::Frame(e)),
                // The damaged frame may have been the reply: ask again. A second reply that
                // arrives later is skipped by every call as a stale frame.
                Err(_) => {
                    if retries == MAX_RETRIES {
                        return Err(ClientError::TooManyRetries);
                    }
                    retries += 1;
                    self.send(&Message::GetStats)?;
                }
            }
        }
    }

    /// Asks the board for the sentence embedding of `text` (an encoder model must be loaded) and
    /// writes it into `out`, returning the number of values. The answer arrives in Embedding
    /// chunks; a missing or damaged chunk makes the client ask again from the start (Embed is
    /// idempotent), at most [`MAX_RETRIES`] times. [`ClientError::ArgumentTooLong`] when `text`
    /// is over [`MAX_PROMPT`](crate::MAX_PROMPT) bytes or `out` is too small for the vector.
    pub fn embed(&mut self, text: &str, out: &mut [f32]) -> Result<usize, ClientError<T::Error>> {
        let text = String::try_from(text).map_err(|_| ClientError::ArgumentTooLong)?;
        let req = Message::Embed { text };
        self.send(&req)?;
        let (mut next, mut len, mut retries) = (0u16, 0usize, 0u8);
        loop {
            let restart = match self.next_frame()? {
                Ok((_, Message::Embedding { index, last, values })) if index == next => {
                    let end = len + values.len();
                    if end > out.len() {
                        return Err(ClientError::ArgumentTooLong);
                    }
                    out[len..end].copy_from_slice(&values);
                    len = end;
                    next += 1;
                    if last {
                        return Ok(len);
                    }
                    false
                }
                // A chunk went missing. While waiting for chunk 0 after asking again, stale
                // chunks of the earlier answer are skipped; only its last one asks again.
                Ok((_, Message::Embedding { index, last, .. })) => index > next && (next > 0 || last),
                Ok((_, Message::Error { code: ErrorCode::Corrupt, .. })) => true,
                Ok((_, Message::Error { code, message })) => return Err(ClientError::Remote { code, message }),
                Ok((_, msg)) if is_client_kind(&msg) => return Err(ClientError::Unexpected),
                Ok(_) => false,
                Err(e @ FrameError::Version(_)) => return Err(ClientError::Frame(e)),
                Err(_) => true,
            };
            if restart {
                if retries == MAX_RETRIES {
                    return Err(ClientError::TooManyRetries);
                }
                retries += 1;
                (next, len) = (0, 0);
                self.send(&req)?;
            }
        }
    }

    /// Sends `req`, then reads until `accept` takes a message. A damaged frame or an
    /// `Error { Corrupt }` re-sends `req`; other board-to-client messages are stale and skipped.
    fn request<R>(
        &mut self,
        req: &Message,
        mut accept: impl FnMut(Message) -> Option<R>,
    ) -> Result<R, ClientError<T::Error>> {
        self.send(req)?;
        let mut retries = 0;
        loop {
            let resend = match self.next_frame()? {
                Ok((_, Message::Error { code: ErrorCode::Corrupt, .. })) => true,
                Ok((_, Message::Error { code, message })) => return Err(ClientError::Remote { code, message }),
                Ok((_, msg)) if is_client_kind(&msg) => return Err(ClientError::Unexpected),
                Ok((_, msg)) => match accept(msg) {
                    Some(r) => return Ok(r),
                    None => false,
                },
                Err(e @ FrameError::Version(_)) => return Err(ClientError::Frame(e)),
                Err(_) => true,
            };
            if resend {
                if retries == MAX_RETRIES {
                    return Err(ClientError::TooManyRetries);
                }
                retries += 1;
                self.send(req)?;
            }
        }
    }

    fn send(&mut self, msg: &Message) -> Result<(), ClientError<T::Error>> {
        let header = Header::for_message(self.seq, msg);
        self.seq = self.seq.wrapping_add(1);
        // Every message within the documented limits fits in MAX_FRAME (see the size test).
        let frame = encode_frame(&header, msg, &mut self.tx).map_err(ClientError::Frame)?;
        self.io.write_all(frame).map_err(ClientError::Io)?;
        self.io.flush().map_err(ClientError::Io)
    }

    /// Reads until the decoder completes a frame.
    fn next_frame(&mut self) -> Result<FrameResult, ClientError<T::Error>> {
        loop {
            while self.rx_pos < self.rx_len {
                let byte = self.rx[self.rx_pos];
                self.rx_pos += 1;
                if let Some(result) = self.decoder.push(byte) {
                    return Ok(result);
                }
            }
            let n = self.io.read(&mut self.rx).map_err(ClientError::Io)?;
            if n == 0 {
                return Err(ClientError::Disconnected);
            }
            self.rx_pos = 0;
            self.rx_len = n;
        }
    }
}

impl<T> core::fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Client").field("seq", &self.seq).field("decoder", &self.decoder).finish_non_exhaustive()
    }
}

/// Kinds that only a client sends.
fn is_client_kind(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Hello { .. }
            | Message::LoadModel { .. }
            | Message::Generate { .. }
            | Message::GenerateRaw { .. }
            | Message::Cancel
            | Message::Resend { .. }
            | Message::Embed { .. }
            | Message::GetStats
    )
}

/// What [`Client::generate`] does after a frame.
#[derive(Debug, PartialEq)]
enum Step {
    Wait,
    Resend(u16),
    Cancel,
    Finish(Stats),
}

/// State of one streamed answer. Pure logic, no I/O, so the recovery rules are unit-tested on
/// their own.
///
/// `open` is the latest `Resend` and whether the board has visibly answered it, which decides
/// whether a further sign of loss may ask again. The board ends its answer to a `Resend` with
/// `Ack` (still generating) or `Done` (finished), so an `Ack` answers it. A `Done` may instead be
/// the answer's own end, sent before the board read the `Resend`; so only a second `Done`, or a
/// `Done` after the board was known to be finished, answers it. A damaged frame counts as a
/// possible `Done`.
#[derive(Debug, Default)]
struct Answer {
    /// Index of the next piece to deliver.
    expected: u16,
    /// An `Ack`, piece or `Done` has arrived: the board has the request.
    started: bool,
    /// The Generate's own `Ack` is behind us: it arrived, or a piece or `Done` came (the board
    /// sends it first), or a damaged frame may have been it. Later `Ack`s answer `Resend`s.
    past_first_ack: bool,
    /// A `Done` has arrived: the board has finished the answer.
    finished: bool,
    /// `Cancel` was sent.
    cancelled: bool,
    /// Requests sent since the last progress.
    retries: u8,
    /// The latest `Resend`, until the piece it asked for arrives.
    open: Option<OpenResend>,
    /// A `Resend` was sent, so answers to it may still be on their way after the `Done`.
    resent: bool,
}

/// A `Resend` waiting for the piece it asked for.
#[derive(Debug)]
struct OpenResend {
    /// The board had finished when we asked, so the next `Done` is its answer.
    after_finish: bool,
    /// `Done` frames or damaged frames seen since.
    closes: u8,
    /// The board has answered it: asking again is not a duplicate.
    answered: bool,
}

impl Answer {
    fn on_frame<E>(
        &mut self,
        frame: FrameResult,
        on_piece: &mut impl FnMut(&str) -> bool,
    ) -> Result<Step, ClientError<E>> {
        let msg = match frame {
            Ok((_, msg)) => msg,
            Err(e @ FrameError::Version(_)) => return Err(ClientError::Frame(e)),
            Err(_) => {
                self.past_first_ack = true;
                self.note_close();
                return self.ask();
            }
        };
        match msg {
            Message::Ack => {
                if self.past_first_ack {
                    if let Some(open) = &mut self.open {
                        open.answered = true;
                    }
                }
                self.started = true;
                self.past_first_ack = true;
                Ok(Step::Wait)
            }
            Message::Token { index, text } => {
                self.started = true;
                self.past_first_ack = true;
                if self.cancelled || index < self.expected {
                    Ok(Step::Wait)
                } else if index == self.expected {
                    self.expected = self.expected.wrapping_add(1);
                    self.open = None;
                    self.retries = 0;
                    if on_piece(&text) {
                        Ok(Step::Wait)
                    } else {
                        self.cancelled = true;
                        Ok(Step::Cancel)
                    }
                } else {
                    self.ask()
                }
            }
            Message::Done { pieces, stats } => {
                self.started = true;
                self.past_first_ack = true;
                if self.cancelled || pieces == self.expected {
                    return Ok(Step::Finish(stats));
                }
                if pieces < self.expected {
                    return Err(ClientError::Unexpected);
                }
                self.note_close();
                self.finished = true;
                self.ask()
            }
            // The board could not read a frame of ours. Once the answer has started, that was
            // a Resend or the Cancel (the Generate arrived), so send it again.
            Message::Error { code: ErrorCode::Corrupt, .. } if self.started => {
                if self.cancelled {
                    self.count_retry()?;
                    Ok(Step::Cancel)
                } else if let Some(open) = &mut self.open {
                    open.answered = true;
                    self.ask()
                } else {
                    Ok(Step::Wait)
                }
            }
            Message::Error { code, message } => Err(ClientError::Remote { code, message }),
            msg if is_client_kind(&msg) => Err(ClientError::Unexpected),
            // Info, StatsReply, Embedding: stale answers to other requests.
            _ => Ok(Step::Wait),
        }
    }

    /// A `Done` or a damaged frame arrived while a `Resend` is open.
    fn note_close(&mut self) {
        if let Some(open) = &mut self.open {
            if open.after_finish || open.closes > 0 {
                open.answered = true;
            }
            open.closes = open.closes.saturating_add(1);
        }
    }

    /// Something is missing from `expected` on: ask for it unless that request is still open.
    fn ask<E>(&mut self) -> Result<Step, ClientError<E>> {
        // After a Cancel this still runs for damaged frames: the lost one may have been the
        // closing Done, which a Resend brings back.
        if self.open.as_ref().is_some_and(|open| !open.answered) {
            return Ok(Step::Wait);
        }
        self.count_retry()?;
        self.resent = true;
        self.open = Some(OpenResend { after_finish: self.finished, closes: 0, answered: false });
        Ok(Step::Resend(self.expected))
    }

    fn count_retry<E>(&mut self) -> Result<(), ClientError<E>> {
        if self.retries >= MAX_RETRIES {
            return Err(ClientError::TooManyRetries);
        }
        self.retries += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StopReason;

    type Err = ClientError<core::convert::Infallible>;

    fn ack() -> FrameResult {
        Ok((Header::new(0), Message::Ack))
    }

    fn token(index: u16, text: &str) -> FrameResult {
        Ok((Header::new(0), Message::Token { index, text: text.try_into().unwrap() }))
    }

    fn done(pieces: u16) -> FrameResult {
        Ok((Header::new(0), Message::Done { pieces, stats: Stats::default() }))
    }

    const FINISH: Result<Step, Err> = Ok(Step::Finish(Stats {
        prompt_tokens: 0,
        generated_tokens: 0,
        ttft_ms: 0.0,
        decode_tokens_per_s: 0.0,
        peak_rss_kib: 0,
        stop_reason: StopReason::MaxTokens,
    }));

    /// Runs `frames` through an `Answer`; returns the delivered text and the steps taken.
    fn run(frames: &[FrameResult]) -> (std::string::String, std::vec::Vec<Result<Step, Err>>) {
        let mut answer = Answer::default();
        let mut text = std::string::String::new();
        let mut steps = std::vec::Vec::new();
        for f in frames {
            let step = answer.on_frame(f.clone(), &mut |p: &str| {
                text.push_str(p);
                true
            });
            steps.push(step);
        }
        (text, steps)
    }

    fn resends(steps: &[Result<Step, Err>]) -> std::vec::Vec<u16> {
        steps.iter().filter_map(|s| if let Ok(Step::Resend(i)) = s { Some(*i) } else { None }).collect()
    }

    #[test]
    fn in_order() {
        let (text, steps) = run(&[ack(), token(0, "a"), token(1, "b"), done(2)]);
        assert_eq!(text, "ab");
        assert_eq!(steps.last(), Some(&FINISH));
    }

    #[test]
    fn no_ack_is_fine_without_faults() {
        let (text, steps) = run(&[token(0, "a"), done(1)]);
        assert_eq!(text, "a");
        assert_eq!(steps.last(), Some(&FINISH));
    }

    #[test]
    fn gap_after_finish_asks_once_then_fills() {
        // Piece 1 lost; the board finished before it read the Resend.
        let frames = [
            ack(),
            token(0, "a"),
            token(2, "c"),
            token(3, "d"),
            done(4),
            token(1, "b"),
            token(2, "c"),
            token(3, "d"),
            done(4),
        ];
        let (text, steps) = run(&frames);
        assert_eq!(text, "abcd");
        assert_eq!(resends(&steps), [1]);
        assert_eq!(steps.last(), Some(&FINISH));
    }

    #[test]
    fn gap_mid_stream_is_answered_by_ack() {
        // Piece 1 lost, the Resend answered mid-stream with 1, 2 and an Ack.
        let frames = [ack(), token(0, "a"), token(2, "c"), token(1, "b"), token(2, "c"), ack(), token(3, "d"), done(4)];
        let (text, steps) = run(&frames);
        assert_eq!(text, "abcd");
        assert_eq!(resends(&steps), [1]);
        assert_eq!(steps.last(), Some(&FINISH));
    }

    #[test]
    fn lost_again_mid_stream_asks_again_after_the_ack() {
        let frames = [ack(), token(0, "a"), token(2, "c"), token(2, "c"), ack(), token(3, "d")];
        let (_, steps) = run(&frames);
        assert_eq!(steps[2], Ok(Step::Resend(1)));
        assert_eq!(steps[3], Ok(Step::Wait));
        assert_eq!(steps[5], Ok(Step::Resend(1)));
    }

    #[test]
    fn damaged_done_is_asked_for() {
        let frames = [ack(), token(0, "a"), Err(FrameError::Crc), done(1)];
        let (text, steps) = run(&frames);
        assert_eq!(text, "a");
        assert_eq!(steps[2], Ok(Step::Resend(1)));
        assert_eq!(steps[3], FINISH);
    }

    #[test]
    fn damaged_done_twice_is_asked_for_twice() {
        let frames = [ack(), token(0, "a"), Err(FrameError::Crc), Err(FrameError::Crc), Err(FrameError::Cobs), done(1)];
        let (_, steps) = run(&frames);
        assert_eq!(steps[2], Ok(Step::Resend(1)));
        assert_eq!(steps[3], Ok(Step::Wait));
        assert_eq!(steps[4], Ok(Step::Resend(1)));
    }

    #[test]
    fn damaged_ack_asks_from_zero() {
        let frames = [Err(FrameError::Crc), token(0, "a"), done(1)];
        let (text, steps) = run(&frames);
        assert_eq!(text, "a");
        assert_eq!(steps[0], Ok(Step::Resend(0)));
        assert_eq!(steps[2], FINISH);
    }

    #[test]
    fn retry_budget() {
        let mut frames = std::vec::Vec::new();
        for _ in 0..40 {
            frames.push(Err(FrameError::Crc));
        }
        let (_, steps) = run(&frames);
        assert_eq!(resends(&steps).len(), usize::from(MAX_RETRIES));
        assert!(steps.contains(&Err(ClientError::TooManyRetries)));
    }

    #[test]
    fn cancel_then_done() {
        let mut answer = Answer::default();
        let mut seen = 0;
        let mut cb = |_: &str| {
            seen += 1;
            false
        };
        type Step2 = Result<Step, ClientError<core::convert::Infallible>>;
        let r: Step2 = answer.on_frame(token(0, "a"), &mut cb);
        assert_eq!(r, Ok(Step::Cancel));
        let r: Step2 = answer.on_frame(token(1, "b"), &mut cb);
        assert_eq!(r, Ok(Step::Wait));
        let stats = Stats { stop_reason: StopReason::Cancelled, ..Stats::default() };
        let r: Step2 = answer.on_frame(Ok((Header::new(0), Message::Done { pieces: 2, stats })), &mut cb);
        assert_eq!(r, Ok(Step::Finish(stats)));
        assert_eq!(seen, 1);
    }

    #[test]
    fn remote_error_carries_the_board_message() {
        let (_, steps) = run(&[Ok((
            Header::new(0),
            Message::Error { code: ErrorCode::Busy, message: "queue full (4 waiting)".try_into().unwrap() },
        ))]);
        let Err(err) = &steps[0] else { panic!("{:?}", steps[0]) };
        assert_eq!(
            *err,
            ClientError::Remote { code: ErrorCode::Busy, message: "queue full (4 waiting)".try_into().unwrap() }
        );
        assert_eq!(
            std::format!("{err}"),
            "board reported an error: board busy, queue full (code 5): queue full (4 waiting)"
        );
        let empty: Err = ClientError::Remote { code: ErrorCode::NoModel, message: String::new() };
        assert_eq!(std::format!("{empty}"), "board reported an error: no model loaded (code 6)");
    }
}
