//! The serial protocol end to end over a real PTY pair: `edgelm serve --serial` on one side,
//! the firmware client driver (from edgelm-protocol) on the other, with a harness in between
//! that can flip bits, drop bytes and inject garbage.

use std::ops::ControlFlow;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgelm_e2e::line::{open_pty, Noise, NoisyLine, Pty};
use edgelm_e2e::{bin, bundle};
use edgelm_protocol::client::{Client, ClientError};
use edgelm_protocol::{GenParams, StopReason};
use edgelm_runtime::{Engine, EngineOptions, GenerateParams};

const PROMPT: &str = "Set the kitchen heater to 21.5 degrees";
const NEW: u16 = 40;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(pty: &Pty, extra: &[&str]) -> Daemon {
    let b = bundle("tiny");
    let child = Command::new(bin("edgelm"))
        .args(["serve", "--serial", &pty.slave_path, "--baud", "115200", "--bundle", b.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon(child)
}

/// `edgelm serve --tcp` on a free local port with `extra` flags, and the address it listens on.
fn serve_tcp(extra: &[&str]) -> (Daemon, String) {
    use std::io::BufRead;
    let mut child = Command::new(bin("edgelm"))
        .args(["serve", "--tcp", "127.0.0.1:0"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = lines
        .find_map(|l| l.ok()?.strip_prefix("edgelm serve: listening on ").map(str::to_owned))
        .expect("serve prints its address");
    // Keep reading its log, so the daemon never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (Daemon(child), addr)
}

fn reference_text(max_new: u16) -> String {
    let e = Engine::open(bundle("tiny"), &EngineOptions::default()).unwrap();
    // The board renders a Generate's prompt with the chat template, as the runtime does.
    let ids = e.encode_prompt(PROMPT, false).unwrap();
    let p = GenerateParams::default().with_max_new_tokens(max_new as usize).with_ignore_eos(true);
    e.generate(&ids, &p, |_| ControlFlow::Continue(())).unwrap().text
}

fn params(max_new: u16) -> GenParams {
    GenParams { max_new_tokens: max_new, ignore_eos: true, ..GenParams::default() }
}

fn connect(pty: &Pty, seed: u64) -> Client<NoisyLine> {
    let mut c = Client::new(NoisyLine::new(&pty.master, seed, Duration::from_secs(5)));
    // The daemon needs a moment to load the bundle and open the port.
    for _ in 0..50 {
        if c.hello("test").is_ok() {
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the daemon does not answer Hello");
}

#[test]
fn streamed_answer_equals_the_runtime_greedy_answer() {
    let pty = open_pty();
    let _d = start(&pty, &[]);
    let mut c = connect(&pty, 1);
    let info = c.hello("test").unwrap();
    assert_eq!(info.model.as_str(), "tiny");
    let mut text = String::new();
    let stats = c.generate(PROMPT, &params(NEW), |p| {
        text.push_str(p);
        true
    });
    let stats = stats.unwrap();
    assert_eq!(text, reference_text(NEW));
    assert_eq!(stats.generated_tokens, NEW as u32);
    assert_eq!(stats.stop_reason, StopReason::MaxTokens);
    assert_eq!(c.get_stats().unwrap(), stats, "GetStats returns the last generation's stats");
}

#[test]
fn cancel_stops_generation_mid_stream() {
    let pty = open_pty();
    // A 9600 baud line: generation is held one frame ahead of it, so a cancel lands mid-answer.
    let _d = start(&pty, &["--line-rate", "9600"]);
    let mut c = connect(&pty, 2);
    let max_new = 240;
    let mut pieces = 0;
    let stats = c
        .generate(PROMPT, &params(max_new), |_| {
            pieces += 1;
            false
        })
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert!(stats.generated_tokens < max_new as u32, "generation stopped early: {}", stats.generated_tokens);
    assert_eq!(pieces, 1, "no piece is delivered after the callback said stop");
    // The link is usable right after.
    let mut text = String::new();
    c.generate(PROMPT, &params(NEW), |p| {
        text.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(text, reference_text(NEW));
}

#[test]
fn a_noisy_line_never_yields_a_wrong_answer_or_a_hung_daemon() {
    let pty = open_pty();
    let _d = start(&pty, &[]);
    let clean = reference_text(NEW);
    let (mut ok, mut failed) = (0, 0);
    for seed in 1..=12u64 {
        let mut line = NoisyLine::new(&pty.master, seed, Duration::from_secs(2));
        line.drain();
        let noise = Noise { flip: 0.004, drop: 0.003, garbage: 0.003 };
        line.rx_noise = noise;
        line.tx_noise = Noise { flip: 0.002, drop: 0.001, garbage: 0.001 };
        let mut c = Client::new(line);
        let mut text = String::new();
        match c.generate(PROMPT, &params(NEW), |p| {
            text.push_str(p);
            true
        }) {
            Ok(_) => {
                assert_eq!(text, clean, "seed {seed}: an accepted answer must be exact");
                ok += 1;
            }
            Err(e) => {
                // Refused or given up: allowed, as long as nothing wrong was accepted.
                assert!(clean.starts_with(&text), "seed {seed}: delivered pieces are a prefix of the answer ({e})");
                assert!(
                    matches!(
                        e,
                        ClientError::Remote { .. }
                            | ClientError::TooManyRetries
                            | ClientError::Io(_)
                            | ClientError::Unexpected
                    ),
                    "seed {seed}: {e}"
                );
                failed += 1;
            }
        }
    }
    assert!(ok > 0, "some noisy runs must recover through Resend ({ok} ok, {failed} failed)");
    // The daemon is alive and correct afterwards.
    let mut line = NoisyLine::new(&pty.master, 99, Duration::from_secs(5));
    line.drain();
    let mut c = Client::new(line);
    c.hello("after noise").unwrap();
    let mut text = String::new();
    c.generate(PROMPT, &params(NEW), |p| {
        text.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(text, clean);
}

#[test]
fn host_client_over_tcp_loads_a_model_and_prints_the_answer() {
    let b = bundle("tiny");
    let models = b.parent().unwrap();
    // No bundle at start: the client loads one by name from the models folder.
    let (_d, addr) = serve_tcp(&["--models-dir", models.to_str().unwrap()]);
    let client = |extra: &[&str]| {
        Command::new(bin("edgelm"))
            .args(["client", "--tcp", &addr, "--prompt", PROMPT, "--max-new-tokens", "20", "--ignore-eos"])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = client(&["--load", "../tiny"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("plain relative path"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let no_model = client(&[]);
    assert!(
        String::from_utf8_lossy(&no_model.stderr).contains("no model loaded"),
        "{}",
        String::from_utf8_lossy(&no_model.stderr)
    );
    let out = client(&["--load", "tiny"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.strip_suffix('\n').unwrap(), reference_text(20));
}

/// Frames as they arrive, read straight off the line (no client driver in between).
struct RawLine {
    file: std::fs::File,
    decoder: edgelm_protocol::FrameDecoder,
    seq: u16,
}

impl RawLine {
    fn new(pty: &Pty) -> Self {
        RawLine { file: pty.master.try_clone().unwrap(), decoder: edgelm_protocol::FrameDecoder::new(), seq: 0 }
    }

    fn frames(msgs: &[edgelm_protocol::Message]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let mut buf = [0u8; edgelm_protocol::MAX_FRAME];
            let h = edgelm_protocol::Header::for_message(i as u16, m);
            out.extend_from_slice(edgelm_protocol::encode_frame(&h, m, &mut buf).unwrap());
        }
        out
    }

    fn send(&mut self, msgs: &[edgelm_protocol::Message]) {
        use std::io::Write;
        self.seq += msgs.len() as u16;
        self.file.write_all(&Self::frames(msgs)).unwrap();
    }

    /// The next message from the board; fails the test when none completes within 30 s (the
    /// wait is a poll, so a board that stops sending cannot hang the test).
    fn next(&mut self) -> edgelm_protocol::Message {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut byte = [0u8; 1];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut p = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) } > 0;
            assert!(ready, "no frame from the board within 30 s");
            self.file.read_exact(&mut byte).unwrap();
            if let Some(r) = self.decoder.push(byte[0]) {
                return r.expect("the board sends valid frames").1;
            }
        }
    }
}

fn generate_msg(prompt: &str, max_new: u16) -> edgelm_protocol::Message {
    edgelm_protocol::Message::Generate { prompt: prompt.try_into().unwrap(), params: params(max_new) }
}

#[test]
fn the_ack_comes_first_refusals_get_one_error_and_the_queue_is_exact() {
    use edgelm_protocol::{ErrorCode, Message};
    let pty = open_pty();
    let _d = start(&pty, &["--queue", "4"]);
    drop(connect(&pty, 3));
    let mut line = RawLine::new(&pty);
    // Unpaced and at 2400 bit/s the Ack precedes every piece.
    for round in 0..10 {
        line.send(&[generate_msg(PROMPT, 12)]);
        assert_eq!(line.next(), Message::Ack, "round {round}: the Ack comes first");
        loop {
            match line.next() {
                Message::Token { .. } => {}
                Message::Done { .. } => break,
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
    }
    // Refused requests: one Error, no Ack (the StatsReply right after proves nothing else came).
    // 380 bytes of symbols the tiny tokenizer never merged: more tokens than its 256 positions.
    let too_long = "~^".repeat(190);
    for (msg, code) in
        [(generate_msg(PROMPT, 0), ErrorCode::InvalidRequest), (generate_msg(&too_long, 8), ErrorCode::TooLong)]
    {
        line.send(&[msg, Message::GetStats]);
        match line.next() {
            Message::Error { code: got, .. } => assert_eq!(got, code),
            other => panic!("expected one Error, got {other:?}"),
        }
        assert!(matches!(line.next(), Message::StatsReply { .. }), "nothing follows the Error");
    }
    // Six Generates in one write with --queue 4: one runs, four wait, exactly one Busy.
    for round in 0..3 {
        let burst: Vec<Message> = (0..6).map(|_| generate_msg(PROMPT, 30)).collect();
        line.send(&burst);
        let (mut busy, mut done) = (0, 0);
        while done < 5 {
            match line.next() {
                Message::Error { code: ErrorCode::Busy, .. } => busy += 1,
                Message::Done { .. } => done += 1,
                _ => {}
            }
        }
        assert_eq!(busy, 1, "round {round}: --queue 4 refuses exactly the sixth");
    }
}

#[test]
fn a_second_tcp_client_is_refused_at_once() {
    use std::io::Read;
    let (_d, addr) = serve_tcp(&["--bundle", bundle("tiny").to_str().unwrap()]);
    let first = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut second = std::net::TcpStream::connect(&addr).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    second.read_to_end(&mut bytes).unwrap();
    let mut d = edgelm_protocol::FrameDecoder::new();
    let got: Vec<_> = d.push_slice(&bytes).collect();
    assert!(
        matches!(&got[..], [Ok((_, edgelm_protocol::Message::Error { code: edgelm_protocol::ErrorCode::Busy, .. }))]),
        "{got:?}"
    );
    drop(first);
}

#[test]
fn generate_uses_the_chat_template_and_generate_raw_does_not() {
    let pty = open_pty();
    let _d = start(&pty, &[]);
    let mut c = connect(&pty, 4);
    assert!(c.hello("test").unwrap().protocol >= 2);
    let mut raw = String::new();
    c.generate_raw(PROMPT, &params(NEW), |p| {
        raw.push_str(p);
        true
    })
    .unwrap();
    let e = Engine::open(bundle("tiny"), &EngineOptions::default()).unwrap();
    let ids = e.encode(PROMPT).unwrap();
    let p = GenerateParams::default().with_max_new_tokens(NEW as usize).with_ignore_eos(true);
    assert_eq!(raw, e.generate(&ids, &p, |_| ControlFlow::Continue(())).unwrap().text);
    let mut chat = String::new();
    c.generate(PROMPT, &params(NEW), |p| {
        chat.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(chat, reference_text(NEW));
}

#[test]
fn serve_takes_the_board_profiles_serial_port_when_no_link_is_given() {
    let pty = open_pty();
    let profile = std::fs::read_to_string(edgelm_e2e::root().join("boards/x86_64-linux.toml")).unwrap();
    let board = edgelm_e2e::scratch().join("board-with-serial.toml");
    std::fs::write(&board, format!("{profile}\n[serial]\ndevice = \"{}\"\nbaud = 115200\n", pty.slave_path)).unwrap();
    let b = bundle("tiny");
    let child = Command::new(bin("edgelm"))
        .args(["--board", board.to_str().unwrap(), "serve", "--bundle", b.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _d = Daemon(child);
    let mut c = connect(&pty, 3);
    assert_eq!(c.hello("test").unwrap().model.as_str(), "tiny");
    // Without a profile port, no --serial and no --tcp is an error that says what to give.
    let out = edgelm_e2e::edgelm(&["serve", "--bundle", b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--serial DEVICE or --tcp ADDR"));
}
