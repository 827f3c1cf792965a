//! The firmware client against a simulated board in the same process: no hardware, no
//! threads. The board speaks the protocol as docs/protocol.md describes and can drop, damage or
//! duplicate the frames it sends.

mod common;

use std::collections::VecDeque;

use common::Rng;
use edgelm_protocol::client::{Client, ClientError, Info, MAX_RETRIES};
use edgelm_protocol::{
    encode_frame, ErrorCode, FrameDecoder, GenParams, Header, Message, Stats, StopReason, MAX_FRAME, MAX_PROMPT,
};

/// What happens to one frame the board sends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Drop,
    Corrupt,
    Duplicate,
}

type FaultFn = Box<dyn FnMut(&Message, usize) -> Option<Fault>>;

/// A board that answers on the spot, generating `burst` pieces each time the client reads an
/// empty line (burst 1 = the client sees every piece as it is made; a large burst = the board
/// has finished before it reads the client's next frame).
struct Board {
    decoder: FrameDecoder,
    out: VecDeque<u8>,
    seq: u16,
    received: Vec<Message>,
    model_loaded: bool,
    answer: Vec<String>,
    produced: usize,
    running: bool,
    finished_stats: Option<Stats>,
    burst: usize,
    /// Decides the fate of each outgoing frame; the count is how often that same message was
    /// sent before.
    fault: FaultFn,
    sent_count: Vec<(Message, usize)>,
    rng: Rng,
}

impl Board {
    fn new(answer: &[&str]) -> Self {
        Board {
            decoder: FrameDecoder::new(),
            out: VecDeque::new(),
            seq: 0,
            received: Vec::new(),
            model_loaded: true,
            answer: answer.iter().map(|s| s.to_string()).collect(),
            produced: 0,
            running: false,
            finished_stats: None,
            burst: 1,
            fault: Box::new(|_, _| None),
            sent_count: Vec::new(),
            rng: Rng(0x1234_5678),
        }
    }

    fn with_fault(mut self, f: impl FnMut(&Message, usize) -> Option<Fault> + 'static) -> Self {
        self.fault = Box::new(f);
        self
    }

    fn send(&mut self, msg: Message) {
        let count = match self.sent_count.iter_mut().find(|(m, _)| *m == msg) {
            Some((_, c)) => {
                *c += 1;
                *c - 1
            }
            None => {
                self.sent_count.push((msg.clone(), 1));
                0
            }
        };
        let fault = (self.fault)(&msg, count);
        trace(format_args!("board -> {} {fault:?}", short(&msg)));
        let mut buf = [0u8; MAX_FRAME];
        let frame = encode_frame(&Header::new(self.seq), &msg, &mut buf).unwrap().to_vec();
        self.seq = self.seq.wrapping_add(1);
        match fault {
            None => self.out.extend(&frame),
            Some(Fault::Drop) => {}
            Some(Fault::Duplicate) => {
                self.out.extend(&frame);
                self.out.extend(&frame);
            }
            Some(Fault::Corrupt) => {
                let mut bad = frame.clone();
                // Flip one bit of a non-delimiter byte, keeping it non-zero.
                loop {
                    let at = self.rng.below(bad.len() - 1);
                    let bit = 1u8 << self.rng.below(8);
                    if bad[at] ^ bit != 0 {
                        bad[at] ^= bit;
                        break;
                    }
                }
                self.out.extend(&bad);
            }
        }
    }

    fn piece(&self, i: usize) -> Message {
        Message::Token { index: i as u16, text: self.answer[i].as_str().try_into().unwrap() }
    }

    fn stats(&self, stop_reason: StopReason) -> Stats {
        Stats {
            prompt_tokens: 7,
            generated_tokens: self.produced as u32,
            ttft_ms: 12.5,
            decode_tokens_per_s: 20.0,
            peak_rss_kib: 4096,
            stop_reason,
        }
    }

    fn finish(&mut self, reason: StopReason) {
        self.running = false;
        let stats = self.stats(reason);
        self.finished_stats = Some(stats);
        self.send(Message::Done { pieces: self.produced as u16, stats });
    }

    /// Generates up to `burst` pieces.
    fn step(&mut self) {
        for _ in 0..self.burst {
            if !self.running {
                return;
            }
            if self.produced < self.answer.len() {
                let msg = self.piece(self.produced);
                self.produced += 1;
                self.send(msg);
            } else {
                self.finish(StopReason::Eos);
            }
        }
    }

    fn handle(&mut self, msg: Message) {
        trace(format_args!("client -> {}", short(&msg)));
        self.received.push(msg.clone());
        match msg {
            Message::Hello { .. } => self.send(Message::Info {
                protocol: 1,
                runtime: "edgelm 0.1.0".try_into().unwrap(),
                model: "tiny".try_into().unwrap(),
                context: 512,
                max_prompt: MAX_PROMPT as u16,
                max_piece: 200,
                max_frame: MAX_FRAME as u16,
            }),
            Message::LoadModel { .. } => {
                self.model_loaded = true;
                self.send(Message::Ack)
            }
            Message::GetStats => {
                let stats = self.finished_stats.unwrap_or_default();
                self.send(Message::StatsReply { stats })
            }
            Message::Generate { .. } if !self.model_loaded => self
                .send(Message::Error { code: ErrorCode::NoModel, message: "load a model first".try_into().unwrap() }),
            Message::Generate { .. } => {
                self.produced = 0;
                self.running = true;
                self.finished_stats = None;
                self.send(Message::Ack);
            }
            Message::Cancel => {
                if self.running {
                    self.finish(StopReason::Cancelled);
                }
            }
            Message::Resend { from } => {
                for i in usize::from(from)..self.produced {
                    let msg = self.piece(i);
                    self.send(msg);
                }
                match self.finished_stats {
                    Some(stats) => self.send(Message::Done { pieces: self.produced as u16, stats }),
                    None if self.running => self.send(Message::Ack),
                    None => self.send(Message::Error {
                        code: ErrorCode::InvalidRequest,
                        message: "no answer to resend".try_into().unwrap(),
                    }),
                }
            }
            other => panic!("board got {other:?}"),
        }
    }
}

impl embedded_io::ErrorType for Board {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Read for Board {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        while self.out.is_empty() && self.running {
            self.step();
        }
        let n = buf.len().min(self.out.len());
        for (slot, byte) in buf.iter_mut().zip(self.out.drain(..n)) {
            *slot = byte;
        }
        Ok(n) // 0 = nothing will ever come: the client reports Disconnected instead of hanging
    }
}

impl embedded_io::Write for Board {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            match self.decoder.push(b) {
                Some(Ok((_, msg))) => self.handle(msg),
                Some(Err(e)) => self.send(Message::Error { code: e.code(), message: heapless::String::new() }),
                None => {}
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

const ANSWER: &[&str] = &["The ", "heater ", "is ", "set ", "to ", "21.5 °C", " at ", "7pm", "."];

fn full_text() -> String {
    ANSWER.concat()
}

fn generate(client: &mut Client<Board>) -> (Result<Stats, ClientError<embedded_io::ErrorKind>>, String) {
    let mut text = String::new();
    let result = client.generate("heater 21.5 at 7pm", &GenParams::default(), |piece| {
        text.push_str(piece);
        true
    });
    (result, text)
}

fn resends(board: &Board) -> Vec<u16> {
    board.received.iter().filter_map(|m| if let Message::Resend { from } = m { Some(*from) } else { None }).collect()
}

fn is_token(msg: &Message, index: u16) -> bool {
    matches!(msg, Message::Token { index: i, .. } if *i == index)
}

#[test]
fn hello_load_and_stats() {
    let mut client = Client::new(Board::new(ANSWER));
    let info: Info = client.hello("fw-test").unwrap();
    assert_eq!((info.protocol, info.model.as_str(), info.max_frame), (1, "tiny", 512));
    client.load_model("/models/tiny").unwrap();
    assert_eq!(client.get_stats().unwrap(), Stats::default());
    let (result, _) = generate(&mut client);
    let stats = result.unwrap();
    assert_eq!(client.get_stats().unwrap(), stats);
    assert!(client.into_inner().out.is_empty());
}

#[test]
fn streams_pieces_in_order() {
    for burst in [1, 3, 100] {
        let mut board = Board::new(ANSWER);
        board.burst = burst;
        let mut client = Client::new(board);
        let (result, text) = generate(&mut client);
        let stats = result.unwrap();
        assert_eq!(text, full_text());
        assert_eq!((stats.generated_tokens, stats.stop_reason), (ANSWER.len() as u32, StopReason::Eos));
        let board = client.into_inner();
        assert!(resends(&board).is_empty());
        assert!(board.out.is_empty(), "frames left on the line");
    }
}

#[test]
fn dropped_piece_is_resent() {
    for burst in [1, 2, 100] {
        let mut board = Board::new(ANSWER).with_fault(|m, n| (is_token(m, 3) && n == 0).then_some(Fault::Drop));
        board.burst = burst;
        let mut client = Client::new(board);
        let (result, text) = generate(&mut client);
        result.unwrap();
        assert_eq!(text, full_text(), "burst {burst}");
        let board = client.into_inner();
        assert_eq!(resends(&board), vec![3], "burst {burst}");
        assert!(board.out.is_empty(), "frames left on the line, burst {burst}");
    }
}

#[test]
fn dropped_last_piece_is_asked_for_by_done() {
    let last = ANSWER.len() as u16 - 1;
    let board = Board::new(ANSWER).with_fault(move |m, n| (is_token(m, last) && n == 0).then_some(Fault::Drop));
    let mut client = Client::new(board);
    let (result, text) = generate(&mut client);
    result.unwrap();
    assert_eq!(text, full_text());
    assert_eq!(resends(&client.into_inner()), vec![last]);
}

#[test]
fn corrupted_piece_is_resent() {
    for burst in [1, 100] {
        let mut board = Board::new(ANSWER).with_fault(|m, n| (is_token(m, 5) && n == 0).then_some(Fault::Corrupt));
        board.burst = burst;
        let mut client = Client::new(board);
        let (result, text) = generate(&mut client);
        result.unwrap();
        assert_eq!(text, full_text());
        let board = client.into_inner();
        assert_eq!(resends(&board), vec![5]);
        assert!(board.out.is_empty(), "frames left on the line, burst {burst}");
    }
}

#[test]
fn corrupted_done_is_asked_for() {
    let board =
        Board::new(ANSWER).with_fault(|m, n| (matches!(m, Message::Done { .. }) && n == 0).then_some(Fault::Corrupt));
    let mut client = Client::new(board);
    let (result, text) = generate(&mut client);
    assert_eq!(result.unwrap().stop_reason, StopReason::Eos);
    assert_eq!(text, full_text());
    assert_eq!(resends(&client.into_inner()), vec![ANSWER.len() as u16]);
}

#[test]
fn duplicated_piece_is_delivered_once() {
    let board = Board::new(ANSWER).with_fault(|m, _| is_token(m, 2).then_some(Fault::Duplicate));
    let mut client = Client::new(board);
    let (result, text) = generate(&mut client);
    result.unwrap();
    assert_eq!(text, full_text());
    assert!(resends(&client.into_inner()).is_empty());
}

#[test]
fn piece_lost_twice_is_asked_for_twice() {
    let board = Board::new(ANSWER).with_fault(|m, n| (is_token(m, 4) && n < 2).then_some(Fault::Drop));
    let mut client = Client::new(board);
    let (result, text) = generate(&mut client);
    result.unwrap();
    assert_eq!(text, full_text());
    assert_eq!(resends(&client.into_inner()), vec![4, 4]);
}

#[test]
fn piece_that_never_arrives_exhausts_the_retries() {
    let board = Board::new(ANSWER).with_fault(|m, _| is_token(m, 1).then_some(Fault::Drop));
    let mut client = Client::new(board);
    let (result, text) = generate(&mut client);
    assert_eq!(result, Err(ClientError::TooManyRetries));
    assert_eq!(text, ANSWER[0]);
    assert_eq!(resends(&client.into_inner()).len(), usize::from(MAX_RETRIES));
}

#[test]
fn returning_false_cancels() {
    let mut client = Client::new(Board::new(ANSWER));
    let mut text = String::new();
    let mut calls = 0;
    let stats = client
        .generate("stop early", &GenParams::default(), |piece| {
            text.push_str(piece);
            calls += 1;
            calls < 2
        })
        .unwrap();
    assert_eq!(calls, 2);
    assert_eq!(text, ANSWER[..2].concat());
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    let board = client.into_inner();
    assert_eq!(board.received.iter().filter(|m| **m == Message::Cancel).count(), 1);
    assert!(board.out.is_empty());
}

#[test]
fn board_error_is_returned() {
    let mut board = Board::new(ANSWER);
    board.model_loaded = false;
    let mut client = Client::new(board);
    let (result, text) = generate(&mut client);
    assert_eq!(
        result,
        Err(ClientError::Remote { code: ErrorCode::NoModel, message: "load a model first".try_into().unwrap() })
    );
    assert_eq!(
        result.unwrap_err().to_string(),
        "board reported an error: no model loaded (code 6): load a model first"
    );
    assert!(text.is_empty());
}

#[test]
fn prompt_and_name_limits() {
    let mut client = Client::new(Board::new(ANSWER));
    let long = "p".repeat(MAX_PROMPT + 1);
    let result = client.generate(&long, &GenParams::default(), |_| true);
    assert_eq!(result, Err(ClientError::PromptTooLong));
    assert_eq!(client.hello(&"n".repeat(100)), Err(ClientError::ArgumentTooLong));
    assert!(client.into_inner().received.is_empty(), "nothing may be sent for a rejected argument");
}

#[test]
fn damaged_reply_repeats_the_request() {
    let board =
        Board::new(ANSWER).with_fault(|m, n| (matches!(m, Message::Info { .. }) && n == 0).then_some(Fault::Corrupt));
    let mut client = Client::new(board);
    assert_eq!(client.hello("fw").unwrap().model.as_str(), "tiny");
    let hellos = client.into_inner().received.iter().filter(|m| matches!(m, Message::Hello { .. })).count();
    assert_eq!(hellos, 2);
}

#[test]
fn closed_stream_is_disconnected() {
    // The board drops its Info: nothing more comes, and the mock reports end of stream.
    let board = Board::new(ANSWER).with_fault(|m, _| matches!(m, Message::Info { .. }).then_some(Fault::Drop));
    let mut client = Client::new(board);
    assert_eq!(client.hello("fw"), Err(ClientError::Disconnected));
}

/// A damaged Resend reaches the board as garbage; the board answers Error { Corrupt } and the
/// client asks again.
#[test]
fn damaged_resend_is_sent_again() {
    struct Noisy {
        board: Board,
        resends_seen: usize,
    }
    impl embedded_io::ErrorType for Noisy {
        type Error = embedded_io::ErrorKind;
    }
    impl embedded_io::Read for Noisy {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            self.board.read(buf)
        }
    }
    impl embedded_io::Write for Noisy {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            let mut frame = buf.to_vec();
            let mut body = frame[..frame.len() - 1].to_vec();
            let n = edgelm_protocol::cobs_decode_in_place(&mut body).unwrap();
            if body[..n].first() == Some(&0x27) {
                // version 1, kind 7 = Resend: damage the first one
                self.resends_seen += 1;
                if self.resends_seen == 1 {
                    frame[1] ^= 0x40;
                }
            }
            self.board.write(&frame)
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }
    let board = Board::new(ANSWER).with_fault(|m, n| (is_token(m, 2) && n == 0).then_some(Fault::Drop));
    let mut client = Client::new(Noisy { board, resends_seen: 0 });
    let mut text = String::new();
    client
        .generate("x", &GenParams::default(), |p| {
            text.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(text, full_text());
    let noisy = client.into_inner();
    assert_eq!(noisy.resends_seen, 2);
}

/// Many generations with random drops, damage and duplicates of the board's frames. Every
/// answer that completes is exact; with a retry budget some may give up.
#[test]
fn random_faults_soak() {
    let mut rng = Rng(0xC0FF_EE00_D15E_A5E5);
    let mut completed = 0;
    let mut leftovers = 0;
    for round in 0..300 {
        trace(format_args!("--- round {round}"));
        let seed = rng.next_u64();
        let mut fault_rng = Rng(seed | 1);
        let board = Board::new(ANSWER).with_fault(move |m, _| {
            let roll = fault_rng.below(100);
            // The last frame of an exchange is never dropped outright: without a timeout
            // nothing could notice. Damage to it is fair game.
            let is_last = matches!(m, Message::Done { .. } | Message::StatsReply { .. });
            match roll {
                0..=7 if !is_last => Some(Fault::Drop),
                8..=15 => Some(Fault::Corrupt),
                16..=20 => Some(Fault::Duplicate),
                _ => None,
            }
        });
        let mut board = board;
        board.burst = 1 + (seed % 4) as usize;
        let mut client = Client::new(board);
        let (result, text) = generate(&mut client);
        match result {
            Ok(stats) => {
                assert_eq!(text, full_text(), "round {round}");
                assert_eq!(stats.generated_tokens, ANSWER.len() as u32);
                completed += 1;
                let board = client.into_inner();
                if !board.out.is_empty() {
                    leftovers += 1;
                    let left: Vec<u8> = board.out.iter().copied().collect();
                    let mut d = FrameDecoder::new();
                    let frames: Vec<_> = d.push_slice(&left).map(|r| r.map(|(_, m)| short(&m))).collect();
                    trace(format_args!("left on the line after round {round}: {frames:?}"));
                }
            }
            Err(ClientError::TooManyRetries) => assert!(full_text().starts_with(&text), "round {round}"),
            // The Ack is not needed, but a damaged Ack may have been the Generate's only sign.
            Err(e) => panic!("round {round}: {e:?}"),
        }
    }
    // Leftovers are stale StatsReply frames or damaged bytes, which every call skips.
    eprintln!("soak: {completed} of 300 completed, {leftovers} left frames on the line");
    assert!(completed >= 280, "only {completed} of 300 answers completed");
}

/// `EDGELM_PROTOCOL_TRACE=1 cargo test -p edgelm-protocol --test client -- --nocapture` prints
/// every frame of the simulated line.
fn trace(line: std::fmt::Arguments) {
    if std::env::var_os("EDGELM_PROTOCOL_TRACE").is_some() {
        eprintln!("{line}");
    }
}

/// Compact name of a message for traces: T<index>, D<pieces>, R<from>, or k<kind>.
fn short(m: &Message) -> String {
    match m {
        Message::Token { index, .. } => format!("T{index}"),
        Message::Done { pieces, .. } => format!("D{pieces}"),
        Message::Resend { from } => format!("R{from}"),
        other => format!("k{}", other.kind()),
    }
}
