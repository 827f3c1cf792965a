//! `edgelm`: the device-side command. Runs bundles, chats, benchmarks, embeds, and serves the
//! serial protocol. One file per subcommand; board and thread policy in `board.rs`.
//!
//! Exit codes: 0 success, 1 failure (the message says what to do), 2 bad arguments. A closed
//! stdout (`edgelm ... | head`) ends the process quietly, as it does for other Unix tools.

mod bench;
mod board;
mod board_cmd;
mod chat;
mod check;
mod client;
mod deploy;
mod doctor;
mod embed;
mod gen_args;
#[cfg(feature = "http")]
mod http;
mod link;
mod run;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use board::{BoardProfile, Placement};

/// `edgelm --version`: ours and the ONNX Runtime release the board must provide.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use edgelm_runtime::ortlib::{ORT_API, ORT_VERSION};
    format!(
        "{} (ONNX Runtime C API {ORT_API}: 1.{ORT_API} or newer; tested with {ORT_VERSION})",
        env!("CARGO_PKG_VERSION")
    )
});

#[derive(Parser)]
#[command(name = "edgelm", version = VERSION.as_str(), about = "Run edgelm bundles on ONNX Runtime")]
struct Cli {
    /// ONNX Runtime library to load (otherwise: EDGELM_ORT_LIB, ORT_DYLIB_PATH, next to the
    /// executable, in its lib/ or ../lib/, the system library path).
    #[arg(long, global = true)]
    ort_lib: Option<PathBuf>,
    /// Board profile (boards/*.toml): threads, execution providers, ONNX Runtime library,
    /// memory budget, serial port.
    #[arg(long, global = true)]
    board: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Run(run::RunArgs),
    /// Chat with a bundle that has a chat template (reads turns from stdin).
    Chat(chat::ChatArgs),
    /// Measure TTFT, prefill and decode speed and peak memory (median over runs).
    Bench(bench::BenchArgs),
    /// Print the sentence embedding of a text (encoder bundles).
    Embed(embed::EmbedArgs),
    /// Serve the serial command protocol on a serial port (or TCP, for development).
    Serve(serve::ServeArgs),
    /// Send a prompt to a board over the serial protocol and print the streamed answer.
    Client(client::ClientArgs),
    /// Print the settings of the board profile given with --board (--get KEY: one value).
    Board(board_cmd::BoardArgs),
    /// Check that this device can run edgelm (and a bundle) as its board profile says.
    Doctor(doctor::DoctorArgs),
    /// Health check: open a bundle as the board profile says and run one step of it.
    Check(check::CheckArgs),
    /// Install a runtime and a bundle into the inactive A/B slot under the board's prefix,
    /// switch to it atomically after a health check, and roll back if it fails.
    Deploy(deploy::DeployArgs),
}

fn main() {
    restore_default_sigpipe();
    // EDGELM_LOG takes `level` or `target=level,...` directives (`warn` by default). Targets
    // parses them without the regex engine EnvFilter brings into the board binary.
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("EDGELM_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    if let Err(e) = dispatch(Cli::parse()) {
        eprintln!("error: {e:#}");
        if e.chain().any(|c| matches!(c.downcast_ref(), Some(edgelm_runtime::Error::OrtLibrary { .. }))) {
            eprintln!(
                "  (edgelm: give the library with --ort-lib PATH; in the source tree `just setup-ort` fetches it)"
            );
        }
        std::process::exit(1);
    }
}

/// Rust ignores SIGPIPE, so a print to a closed pipe fails and `println!` panics. The default
/// action ends the process silently instead, as `head` and friends expect. Sockets and serial
/// ports never raise it (std sends with MSG_NOSIGNAL; a tty reports errors as values).
fn restore_default_sigpipe() {
    // SAFETY: setting a signal's disposition to the default touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let board = cli.board.as_deref().map(BoardProfile::load).transpose()?;
    let place = Placement { board, ort_lib: cli.ort_lib };
    match cli.command {
        Command::Run(a) => run::run(a, &place),
        Command::Chat(a) => chat::chat(a, &place),
        Command::Bench(a) => bench::bench(a, &place),
        Command::Embed(a) => embed::embed(a, &place),
        Command::Serve(a) => serve::serve(a, &place),
        Command::Client(a) => client::client(a),
        Command::Board(a) => board_cmd::board(a, &place),
        Command::Doctor(a) => doctor::doctor(a, &place),
        Command::Check(a) => check::check(a, &place),
        Command::Deploy(a) => deploy::deploy(a, &place),
    }
}
