//! The fleet example (`examples/fleet/nginx.conf`) with a real nginx on loopback in front of
//! two `edgelm serve --http` instances: one instance killed mid-run costs only the requests it
//! was answering.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgelm_e2e::{bin, bundle, root, scratch};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx, stopped as its master expects (SIGTERM stops the workers too; a SIGKILL would leave
/// them running).
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling a child process this test started.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn edgelm(port: u16) -> Killed {
    let mut child = Command::new(bin("edgelm"))
        .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--cache-bytes", "0", "--bundle"])
        .arg(bundle("tiny"))
        // Each answer takes a few hundred milliseconds, so some are running at the kill.
        .env("EDGELM_HTTP_STEP_DELAY_MS", "20")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.starts_with("edgelm serve: listening on"))), "edgelm did not start");
    std::thread::spawn(move || lines.for_each(drop));
    Killed(child)
}

/// A completion through nginx: Ok on a 200 with a whole answer, Err with what went wrong.
fn complete(port: u16) -> Result<(), String> {
    let body = r#"{"prompt": "Set the kitchen heater to 21.5 degrees", "max_tokens": 12}"#;
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: fleet\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    if raw.starts_with("HTTP/1.1 200") && raw.contains("\"finish_reason\"") {
        Ok(())
    } else {
        Err(raw.lines().next().unwrap_or("empty answer").to_owned())
    }
}

#[test]
fn one_instance_killed_mid_run_costs_only_its_own_requests() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists());
    let nginx = nginx.expect("nginx is missing: `just setup-tools` installs it");
    let (front, a_port, b_port) = (free_port(), free_port(), free_port());
    let mut a = edgelm(a_port);
    let _b = edgelm(b_port);

    let dir = scratch().join("fleet");
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = std::fs::read_to_string(root().join("examples/fleet/nginx.conf"))
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{front}"))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{a_port}"))
        .replace("127.0.0.1:8082", &format!("127.0.0.1:{b_port}"));
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let _nginx = Nginx(
        Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off; pid nginx.pid; error_log logs/error.log;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", front)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Four clients, each sending its next request when the last one ended.
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut log = vec![];
                while !stop.load(Ordering::SeqCst) {
                    let t0 = Instant::now();
                    let r = complete(front);
                    log.push((t0, Instant::now(), r));
                }
                log
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = a.0.kill();
    let _ = a.0.wait();
    *killed_at.lock().unwrap() = Some(Instant::now());
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::SeqCst);

    let kill = killed_at.lock().unwrap().unwrap();
    let (mut before, mut after, mut failed_in_flight) = (0, 0, 0);
    for c in clients {
        for (t0, t1, r) in c.join().unwrap() {
            match r {
                Ok(()) if t1 < kill => before += 1,
                Ok(()) => after += 1,
                // Only a request running across the kill may fail.
                Err(e) => {
                    assert!(t0 <= kill && t1 >= kill, "a request outside the kill failed: {e}");
                    failed_in_flight += 1;
                }
            }
        }
    }
    assert!(before >= 4 && after >= 4, "too few requests ran: {before} before the kill, {after} after");
    assert!(failed_in_flight <= 4, "{failed_in_flight} requests failed; at most the 4 in flight may");
}
