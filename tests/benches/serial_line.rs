//! How much of a serial line carries text when generation outpaces it: `edgelm serve` paced to
//! 115200 and 921600 baud over a PTY, the firmware client reading, tiny model generating.
//! Run: `cargo bench -p edgelm-e2e --bench serial_line` (needs `cargo build --release`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgelm_e2e::line::{open_pty, NoisyLine};
use edgelm_e2e::{bin, bundle};
use edgelm_protocol::client::Client;
use edgelm_protocol::GenParams;

fn main() {
    let b = bundle("tiny");
    println!(
        "{:>8} {:>8} {:>8} {:>7} {:>8} {:>15} {:>9}",
        "baud", "text B", "line B", "pieces", "text %", "text % (tokens)", "tokens/s"
    );
    for baud in [115_200u32, 921_600] {
        let pty = open_pty();
        let mut daemon = Command::new(bin("edgelm"))
            .args([
                "serve",
                "--serial",
                &pty.slave_path,
                "--line-rate",
                &baud.to_string(),
                "--bundle",
                b.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut c = Client::new(NoisyLine::new(&pty.master, 1, Duration::from_secs(10)));
        let mut up = false;
        for _ in 0..50 {
            if c.hello("bench").is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(up, "daemon did not answer");
        let mut line = c.into_inner();
        line.rx_bytes = 0;
        let mut c = Client::new(line);
        let (mut text, mut pieces) = (0usize, 0usize);
        let start = Instant::now();
        let params = GenParams { max_new_tokens: 240, ignore_eos: true, ..GenParams::default() };
        let stats = c
            .generate("Set the kitchen heater to 21.5 degrees", &params, |p| {
                text += p.len();
                pieces += 1;
                true
            })
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        let rx = c.into_inner().rx_bytes;
        // The answer's closing Done frame, to report the Token frames' share on their own.
        let mut buf = [0u8; edgelm_protocol::MAX_FRAME];
        let done = edgelm_protocol::encode_frame(
            &edgelm_protocol::Header::new(1000),
            &edgelm_protocol::Message::Done { pieces: pieces as u16, stats },
            &mut buf,
        )
        .unwrap()
        .len() as u64;
        println!(
            "{baud:>8} {text:>8} {rx:>8} {pieces:>7} {:>7.1}% {:>14.1}% {:>9.0}",
            100.0 * text as f64 / rx as f64,
            100.0 * text as f64 / (rx - done) as f64,
            stats.generated_tokens as f64 / secs
        );
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
