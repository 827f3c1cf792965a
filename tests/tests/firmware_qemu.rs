//! The example firmware (boards/firmware-example, built with its `qemu` feature) on an
//! emulated STM32F405: QEMU's `netduinoplus2` machine runs the ELF unmodified, its USART2 is
//! one side of a PTY whose other side `edgelm serve --serial` holds, and the answer the firmware
//! reports through semihosting must be the runtime's greedy answer to the same prompt.
//!
//! The line: the test opens the PTY pair, QEMU gets the master through `-add-fd` and the daemon
//! opens the slave by path. QEMU's own `pty` chardev is not used: QEMU 7.2 (Debian 12) notices
//! the other end only on a one-second poll and drops what the guest sends until then.
//!
//! The order, so no byte is sent before the daemon listens: QEMU starts paused (`-S`) with QMP
//! on one end of a socket pair the test made, the daemon is started and says it opened the port,
//! then QMP `cont`. The firmware prints to QEMU's stdout through semihosting and ends QEMU:
//! status 0 after an answer, 1 after three failed attempts.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use edgelm_e2e::line::open_pty;
use edgelm_e2e::{bin, bundle, root, run};
use edgelm_runtime::{Engine, EngineOptions, GenerateParams};

/// What the firmware asks (`PROMPT`, `MAX_NEW_TOKENS` in boards/firmware-example/src/main.rs);
/// the firmware prints its request and the test checks the two agree.
const PROMPT: &str = "turn on the hallway light";
const MAX_NEW: u16 = 32;
/// The firmware keeps at most this many bytes of the answer (`ANSWER_CAP`).
const ANSWER_CAP: usize = 256;
/// Safety bound on the emulated run, from QEMU's start to its exit (the firmware gives up by
/// itself after three 20 s read timeouts).
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Every line the firmware reports starts with this.
const TAG: &str = "edgelm-firmware: ";

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of `r`, read on a thread so the caller can wait with a deadline. The thread keeps
/// reading after the receiver is gone, so the writer never blocks on a full pipe.
fn lines(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// QMP over the test's end of the socket pair.
struct Qmp {
    input: UnixStream,
    output: Receiver<String>,
    deadline: Instant,
}

impl Qmp {
    /// The next message QEMU sends; `None` once QEMU has closed its stdout (it exited).
    fn next(&mut self) -> Option<serde_json::Value> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.output.recv_timeout(left) {
            Ok(line) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("QEMU did not finish within {RUN_LIMIT:?}"),
        }
    }

    /// Runs a command and returns its `return` value (events in between are skipped).
    fn execute(&mut self, command: &str) -> serde_json::Value {
        writeln!(self.input, r#"{{"execute": "{command}"}}"#).expect("write to QMP");
        loop {
            let msg = self.next().unwrap_or_else(|| panic!("QEMU exited before answering {command}"));
            if let Some(r) = msg.get("return") {
                return r.clone();
            }
            assert!(msg.get("error").is_none(), "QMP {command}: {msg}");
        }
    }
}

/// Builds the firmware with the `qemu` feature through its build script (which also installs
/// the Rust target and checks the size) and returns the ELF.
fn firmware_elf() -> PathBuf {
    let out = run(Command::new("bash").arg(root().join("boards/firmware-example/build.sh")).env("FEATURES", "qemu"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "build.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let elf = stdout.lines().find_map(|l| l.strip_prefix("elf: ")).expect("build.sh prints `elf: PATH`");
    PathBuf::from(elf)
}

/// The version line of `qemu-system-arm` on PATH, if there is one.
fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-arm").arg("--version").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_owned())
}

/// What the firmware printed, split up.
#[derive(Default)]
struct Report {
    request: String,
    answer: String,
    truncated: bool,
    stats: std::collections::HashMap<String, String>,
    errors: Vec<String>,
}

/// Parses the semihosting output (format in boards/firmware-example/src/report.rs).
fn parse(out: &[u8]) -> Report {
    let text = String::from_utf8_lossy(out);
    let mut rest = out;
    let mut report = Report::default();
    let mut answered = false;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = std::str::from_utf8(&rest[..end]).expect("report lines are UTF-8");
        rest = &rest[(end + 1).min(rest.len())..];
        let Some(line) = line.strip_prefix(TAG) else { panic!("unexpected line {line:?} in:\n{text}") };
        if let Some(r) = line.strip_prefix("request ") {
            report.request = r.to_owned();
        } else if let Some(e) = line.strip_prefix("error ") {
            report.errors.push(e.to_owned());
        } else if let Some(a) = line.strip_prefix("answer ") {
            let fields = key_values(a);
            let n: usize = fields["bytes"].parse().unwrap();
            report.truncated = fields["truncated"] == "true";
            assert!(rest.len() > n && rest[n] == b'\n', "answer of {n} bytes then a newline in:\n{text}");
            report.answer = String::from_utf8(rest[..n].to_vec()).expect("the answer is UTF-8");
            rest = &rest[n + 1..];
            answered = true;
        } else if let Some(s) = line.strip_prefix("stats ") {
            report.stats = key_values(s);
        } else {
            panic!("unexpected line {line:?} in:\n{text}");
        }
    }
    assert!(answered, "the firmware reported no answer:\n{text}");
    report
}

fn key_values(s: &str) -> std::collections::HashMap<String, String> {
    s.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{kv:?} is not key=value"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn the_example_firmware_in_qemu_gets_the_runtime_greedy_answer_over_the_daemon() {
    // `just test` installs it (setup-tools), as capi.rs expects valgrind: never a silent skip.
    let version = qemu_version().expect("qemu-system-arm is missing: `just setup-tools` installs it");
    eprintln!("{version}");
    let elf = firmware_elf();
    let b = bundle("tiny");
    let reference = {
        let e = Engine::open(&b, &EngineOptions::default()).unwrap();
        // The daemon renders a Generate's prompt with the chat template; the firmware leaves
        // every parameter but max_new_tokens at its default (greedy, stop at EOS).
        let ids = e.encode_prompt(PROMPT, false).unwrap();
        let p = GenerateParams::default().with_max_new_tokens(MAX_NEW as usize);
        e.generate(&ids, &p, |_| ControlFlow::Continue(())).unwrap()
    };

    let dir = tempfile::tempdir().unwrap();
    let qemu_log = dir.path().join("qemu.log");
    let pty = open_pty();
    let (qmp_ours, qmp_theirs) = UnixStream::pair().unwrap();
    // QEMU inherits these two: the PTY master (its USART2) and its end of the QMP socket pair.
    // Both are close-on-exec here; QEMU's child clears the flag below, so the daemon gets neither.
    let inherited = [pty.master.as_raw_fd(), qmp_theirs.as_raw_fd()];
    for fd in inherited {
        // SAFETY: fcntl on fds this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }

    let mut qemu = Command::new("qemu-system-arm");
    qemu.args(["-M", "netduinoplus2", "-nodefaults", "-display", "none", "-S"])
        .args(["-chardev", &format!("socket,id=qmp,fd={}", inherited[1]), "-mon", "chardev=qmp,mode=control"])
        .args(["-add-fd", &format!("fd={},set=1", inherited[0])])
        // serial_hd(0) is USART1, serial_hd(1) USART2 (hw/arm/stm32f405_soc.c).
        .args(["-chardev", "serial,id=usart2,path=/dev/fdset/1", "-serial", "null", "-serial", "chardev:usart2"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(&elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&qemu_log).unwrap());
    // SAFETY: only async-signal-safe fcntl calls between fork and exec.
    unsafe {
        qemu.pre_exec(move || {
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let deadline = Instant::now() + RUN_LIMIT;
    let mut qemu = Killed(qemu.spawn().expect("start qemu-system-arm"));
    drop(qmp_theirs);
    // The semihosting report, read to its end when QEMU exits.
    let mut stdout = qemu.0.stdout.take().unwrap();
    let report = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let output = lines(qmp_ours.try_clone().unwrap());
    let mut qmp = Qmp { input: qmp_ours, output, deadline };
    let greeting = qmp.next().unwrap_or_else(|| panic!("QEMU exited at start:\n{}", log(&qemu_log)));
    assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
    qmp.execute("qmp_capabilities");
    let status = qmp.execute("query-status");
    assert_eq!(status["status"], "prelaunch", "QEMU waits for `cont`");

    let mut daemon = Command::new(bin("edgelm"));
    daemon
        .args(["serve", "--serial", &pty.slave_path, "--baud", "115200", "--bundle", b.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut daemon = Killed(daemon.spawn().unwrap());
    let daemon_log = lines(daemon.0.stderr.take().unwrap());
    let opened = format!("edgelm serve: serial {} ", pty.slave_path);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match daemon_log.recv_timeout(left) {
            Ok(line) if line.starts_with(&opened) => break,
            Ok(line) => seen.push(line),
            Err(e) => panic!("the daemon did not open {} ({e}):\n{}", pty.slave_path, seen.join("\n")),
        }
    }

    let started = Instant::now();
    qmp.execute("cont");
    // The firmware ends QEMU; its QMP stream ends with it.
    while qmp.next().is_some() {}
    let exit = qemu.0.wait().unwrap();
    let out = report.join().unwrap();
    eprintln!("emulated run: {:.1} s, QEMU {exit}", started.elapsed().as_secs_f64());
    assert!(
        exit.success(),
        "the firmware reported failure ({exit}):\n{}\nQEMU log:\n{}",
        String::from_utf8_lossy(&out),
        log(&qemu_log)
    );

    eprintln!("firmware report:\n{}", String::from_utf8_lossy(&out));
    let r = parse(&out);
    assert_eq!(
        r.request,
        format!("prompt={PROMPT:?} max_new_tokens={MAX_NEW}"),
        "the test asks what the firmware asks"
    );
    assert_eq!(r.truncated, reference.text.len() > ANSWER_CAP, "truncated exactly when the answer is longer");
    assert!(r.errors.is_empty(), "a lossless line needs no retry: {:?}", r.errors);
    if r.truncated {
        // The firmware keeps whole characters up to its buffer's size.
        assert!(r.answer.len() > ANSWER_CAP - 4 && r.answer.len() <= ANSWER_CAP, "{} bytes kept", r.answer.len());
        assert!(reference.text.starts_with(&r.answer), "{:?} is a prefix of {:?}", r.answer, reference.text);
    } else {
        assert_eq!(r.answer, reference.text);
    }
    assert_eq!(r.stats["prompt_tokens"], reference.metrics.prompt_tokens.to_string());
    assert_eq!(r.stats["generated_tokens"], reference.metrics.generated_tokens.to_string());
    assert_eq!(r.stats["stop_reason"], format!("{:?}", reference.stop_reason));
}
