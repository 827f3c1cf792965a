//! `edgelm serve`: the board side of the serial protocol (`docs/protocol.md`).
//!
//! One link is served at a time, with three threads: a reader and a writer (`line.rs`) and the
//! worker that runs requests on the loaded model (`requests.rs`). A serial port is reopened
//! when it goes away; on TCP a second client, while one is connected, gets one Busy Error
//! frame and is disconnected within half a second, rather than waiting unanswered.

mod line;
mod requests;
mod wire;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use edgelm_protocol::{encode_frame, ErrorCode, Header, MAX_FRAME};
use edgelm_runtime::decoder::KvCacheMode;

use crate::board::Placement;
use crate::gen_args::KvArg;
use crate::link::{open_serial, tcp_link, Link, LinkAddr, LinkArgs};
use line::{Outgoing, PacedWriter, Shared};
use requests::Board;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    link: LinkArgs,
    /// Bundle to load at start.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Folder whose bundles clients may load by name (LoadModel).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Requests that may wait while one runs; one more gets a Busy Error frame (0: none wait).
    #[arg(long, default_value_t = 4)]
    queue: usize,
    /// Intra-op threads; 0 = the board's count, else one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV cache strategy.
    #[arg(long, value_enum, default_value = "shared")]
    kv_cache: KvArg,
    /// Pace output to this line rate in bits/s (for PTY/TCP links standing in for a UART).
    #[arg(long)]
    line_rate: Option<u32>,
    #[cfg(feature = "http")]
    #[command(flatten)]
    http: crate::http::HttpArgs,
}

/// Runs the daemon until the process is stopped. Bad input never ends it: a broken link is
/// reopened, a failed request answers an Error frame. (A bug that panics does: board builds
/// abort on panic, and the systemd unit `deploy` writes restarts the daemon.)
pub fn serve(a: ServeArgs, place: &Placement) -> Result<()> {
    #[cfg(feature = "http")]
    if let Some(addr) = &a.http.http {
        let Some(bundle) = &a.bundle else { anyhow::bail!("serve --http needs --bundle") };
        let kv = KvCacheMode::from(a.kv_cache);
        return crate::http::serve_http(addr, &a.http, bundle, a.queue, a.threads, kv, place);
    }
    let mut board = Board::new(place.engine_options(a.threads, KvCacheMode::from(a.kv_cache))?, a.models_dir.clone());
    if let Some(b) = &a.bundle {
        board.load(b).with_context(|| format!("loading {}", b.display()))?;
    }
    match a.link.addr(place.board.as_ref().and_then(|b| b.serial.as_ref()))? {
        LinkAddr::Serial { path, baud } => loop {
            match open_serial(&path, baud) {
                Ok(link) => {
                    eprintln!("edgelm serve: serial {path} at {baud} baud");
                    serve_link(link, &mut board, &a);
                }
                Err(e) => eprintln!("edgelm serve: {e:#}; retrying"),
            }
            std::thread::sleep(Duration::from_millis(500));
        },
        LinkAddr::Tcp(addr) => {
            let listener = TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr().context("listening socket")?;
            eprintln!("edgelm serve: listening on {local}");
            let (conn_tx, conn_rx) = mpsc::channel::<TcpStream>();
            let busy = Arc::new(AtomicBool::new(false));
            {
                let busy = busy.clone();
                std::thread::spawn(move || accept_loop(listener, &busy, &conn_tx));
            }
            for stream in conn_rx {
                match tcp_link(stream) {
                    Ok(link) => serve_link(link, &mut board, &a),
                    Err(e) => eprintln!("edgelm serve: {e:#}"),
                }
                busy.store(false, Ordering::SeqCst);
            }
            Ok(())
        }
    }
}

/// How long a new connection waits for the link before it to finish closing. A client that
/// disconnects and connects again at once finds the board still tearing down its old link for
/// a few milliseconds; it is served, not refused.
const HANDOVER: Duration = Duration::from_millis(500);

/// Hands connections to the server one at a time; one arriving while another is served (and
/// still served after [`HANDOVER`]) gets a Busy Error frame and is closed.
fn accept_loop(listener: TcpListener, busy: &AtomicBool, conn_tx: &mpsc::Sender<TcpStream>) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let waited = Instant::now();
        let free = loop {
            if !busy.swap(true, Ordering::SeqCst) {
                break true;
            }
            if waited.elapsed() >= HANDOVER {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if !free {
            refuse_busy(&mut stream);
        } else if conn_tx.send(stream).is_err() {
            return;
        }
    }
}

fn refuse_busy(stream: &mut TcpStream) {
    use std::io::Write;
    let msg = wire::error_frame(ErrorCode::Busy, "another client is connected to this board; try later");
    let mut buf = [0u8; MAX_FRAME];
    if let Ok(bytes) = encode_frame(&Header::for_message(1, &msg), &msg, &mut buf) {
        let _ = stream.write_all(bytes);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Serves one link until it closes.
fn serve_link(link: Link, board: &mut Board, a: &ServeArgs) {
    let shared = Arc::new(Shared::new(a.queue));
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>();
    let (req_tx, req_rx) = mpsc::channel();
    let Link { reader, writer } = link;
    let writer_thread = {
        let shared = shared.clone();
        let writer: Box<dyn std::io::Write + Send> = match a.line_rate {
            Some(bps) => Box::new(PacedWriter { inner: writer, bits_per_s: bps.max(1), next: Instant::now() }),
            None => writer,
        };
        std::thread::spawn(move || line::write_loop(writer, out_rx, &shared))
    };
    let reader_thread = {
        let (shared, out_tx) = (shared.clone(), out_tx.clone());
        std::thread::spawn(move || line::read_loop(reader, req_tx, out_tx, &shared))
    };
    requests::work_loop(board, req_rx, &out_tx, &shared);
    shared.closed.store(true, Ordering::SeqCst);
    drop(out_tx);
    let _ = reader_thread.join();
    let _ = writer_thread.join();
}
