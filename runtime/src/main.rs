//! `edgelm`: the device-side command. Runs bundles, chats, benchmarks.
//!
//! Exit codes: 0 success, 1 failure (the message says what to do), 2 bad arguments.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use edgelm_runtime::board::BoardProfile;
use edgelm_runtime::decoder::{DecoderOptions, KvCacheMode};
use edgelm_runtime::{Engine, EngineOptions, GenerateParams, Generation, SamplingParams};

#[derive(Parser)]
#[command(name = "edgelm", version, about = "Run edgelm bundles on ONNX Runtime")]
struct Cli {
    /// ONNX Runtime library to load (otherwise: EDGELM_ORT_LIB, ORT_DYLIB_PATH, next to the
    /// executable, the project's .ort folder, the system).
    #[arg(long, global = true)]
    ort_lib: Option<PathBuf>,
    /// Board profile (boards/*.toml): sets the thread count and checks the memory budget.
    #[arg(long, global = true)]
    board: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Run(RunArgs),
    /// Chat with a bundle that has a chat template (reads turns from stdin).
    Chat {
        /// Bundle folder.
        bundle: PathBuf,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Measure TTFT, prefill and decode speed and peak memory (median over runs).
    Bench(BenchArgs),
    /// Print the sentence embedding of a text (encoder bundles).
    Embed {
        /// Encoder bundle folder.
        bundle: PathBuf,
        /// Text to embed.
        #[arg(long)]
        text: String,
        /// Print JSON ({"dim": N, "embedding": [...]}) instead of one number per line.
        #[arg(long)]
        json: bool,
    },
    /// Serve the serial command protocol on a serial port (or TCP, for development).
    Serve(ServeArgs),
    /// Send a prompt to a board over the serial protocol and print the streamed answer.
    Client(ClientArgs),
}

#[derive(Args)]
struct LinkArgs {
    /// Serial device (e.g. /dev/ttyUSB0).
    #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
    serial: Option<String>,
    /// Line speed for --serial.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// TCP address instead of a serial port (serve: listen; client: connect).
    #[arg(long)]
    tcp: Option<String>,
}

impl LinkArgs {
    fn addr(&self) -> edgelm_runtime::link::LinkAddr {
        use edgelm_runtime::link::LinkAddr;
        match (&self.serial, &self.tcp) {
            (Some(path), _) => LinkAddr::Serial { path: path.clone(), baud: self.baud },
            (None, Some(a)) => LinkAddr::Tcp(a.clone()),
            (None, None) => unreachable!("clap requires one of --serial and --tcp"),
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    link: LinkArgs,
    /// Bundle to load at start.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Folder whose bundles clients may load by name (LoadModel).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Requests that may wait behind the running one.
    #[arg(long, default_value_t = 4)]
    queue: usize,
    /// Intra-op threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Pace output to this line rate in bits/s (for PTY/TCP links standing in for a UART).
    #[arg(long)]
    line_rate: Option<u32>,
}

#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    link: LinkArgs,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: u16,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens; 0 is off.
    #[arg(long, default_value_t = 0)]
    top_k: u16,
    /// Nucleus mass; 1 is off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Ask the board to load this bundle (a name inside its --models-dir) first.
    #[arg(long)]
    load: Option<String>,
    /// Print the board's stats as JSON on stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Ask for the sentence embedding of the prompt (encoder models) instead of an answer.
    #[arg(long)]
    embed: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Bundle folder (edgelm bundle or onnxruntime-genai model folder).
    bundle: PathBuf,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    gen: GenArgs,
    /// Print one JSON object (ids, text, metrics) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct GenArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (default: the bundle's).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the k most likely tokens; 0 is off.
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p; 1 is off.
    #[arg(long)]
    top_p: Option<f32>,
    /// Penalty on tokens already seen; 1 is off.
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Intra-op threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV cache strategy.
    #[arg(long, value_enum, default_value = "shared")]
    kv_cache: KvArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvArg {
    /// Preallocated buffer updated in place.
    Shared,
    /// Present outputs fed back as past inputs (copies every step).
    Growing,
}

#[derive(Args)]
struct BenchArgs {
    /// Bundle folder.
    bundle: PathBuf,
    /// Prompt length in tokens (synthetic ids).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate per run (EOS ignored).
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Measured runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Unmeasured warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Intra-op threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV cache strategy.
    #[arg(long, value_enum, default_value = "shared")]
    kv_cache: KvArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EDGELM_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn open(
    bundle: &PathBuf,
    ort_lib: Option<PathBuf>,
    board: Option<&BoardProfile>,
    threads: usize,
    kv: KvArg,
) -> Result<Engine> {
    let threads = match (threads, board) {
        (0, Some(b)) => b.threads,
        (t, _) => t,
    };
    if let Some(ep) = board.and_then(|b| b.execution_providers.first()).filter(|ep| *ep != "cpu") {
        eprintln!("warning: execution provider `{ep}` is not built into this edgelm; running on the CPU");
    }
    let opts = EngineOptions {
        ort_lib,
        decoder: DecoderOptions {
            threads,
            kv_cache: match kv {
                KvArg::Shared => KvCacheMode::Shared,
                KvArg::Growing => KvCacheMode::Growing,
            },
            ..DecoderOptions::default()
        },
    };
    Engine::open(bundle, &opts).with_context(|| format!("opening {}", bundle.display()))
}

/// Refuses a request whose weights plus KV cache exceed the board's memory budget.
fn check_budget(engine: &Engine, board: Option<&BoardProfile>, positions: usize) -> Result<()> {
    if let Some(b) = board {
        b.check_fits(engine.weight_bytes(), engine.kv_cache_bytes(positions.min(engine.context_length())))?;
    }
    Ok(())
}

fn params(engine: &Engine, g: &GenArgs) -> GenerateParams {
    let d = engine.default_sampling();
    GenerateParams {
        max_new_tokens: g.max_new_tokens,
        sampling: SamplingParams {
            temperature: g.temperature.unwrap_or(d.temperature),
            top_k: g.top_k.unwrap_or(d.top_k),
            top_p: g.top_p.unwrap_or(d.top_p),
            repetition_penalty: g.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: g.seed,
        },
        stop_strings: g.stop.clone(),
        ignore_eos: g.ignore_eos,
    }
}

/// Streams pieces to stdout (or token ids when the bundle has no tokenizer).
fn stream_to_stdout(has_text: bool) -> impl FnMut(edgelm_runtime::TokenEvent<'_>) -> ControlFlow<()> {
    let mut out = std::io::stdout();
    move |ev| {
        let r = match (has_text, ev.id) {
            (true, _) => write!(out, "{}", ev.text),
            (false, Some(id)) => write!(out, "{id} "),
            (false, None) => Ok(()),
        };
        // A closed stdout (e.g. `| head`) ends generation instead of failing it.
        if r.and_then(|_| out.flush()).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

fn print_metrics(g: &Generation) {
    let m = &g.metrics;
    eprintln!(
        "\n[{} prompt + {} new tokens, stop: {:?} | TTFT {:.1} ms | prefill {:.1} tok/s | decode {:.1} tok/s | peak RSS {:.1} MiB]",
        m.prompt_tokens,
        m.generated_tokens,
        g.stop_reason,
        m.ttft_ms,
        m.prefill_tokens_per_s,
        m.decode_tokens_per_s,
        m.peak_rss_bytes as f64 / (1 << 20) as f64
    );
}

fn run(cli: Cli) -> Result<()> {
    let board = cli.board.as_deref().map(BoardProfile::load).transpose()?;
    let board = board.as_ref();
    match cli.command {
        Command::Run(a) => {
            let mut engine = open(&a.bundle, cli.ort_lib, board, a.gen.threads, a.gen.kv_cache)?;
            let prompt = match (&a.prompt, &a.prompt_ids) {
                (Some(text), _) => engine.encode(text)?,
                (None, Some(ids)) => ids.clone(),
                (None, None) => bail!("give --prompt or --prompt-ids"),
            };
            let p = params(&engine, &a.gen);
            check_budget(&engine, board, prompt.len() + p.max_new_tokens)?;
            if a.json {
                let g = engine.generate(&prompt, &p, |_| ControlFlow::Continue(()))?;
                // One flat object: the prompt, the generation and every metric at the top level.
                let mut v = serde_json::json!({ "prompt": a.prompt });
                for part in [serde_json::to_value(&g)?, serde_json::to_value(&g.metrics)?] {
                    if let serde_json::Value::Object(fields) = part {
                        v.as_object_mut().expect("object").extend(fields);
                    }
                }
                v.as_object_mut().expect("object").remove("metrics");
                println!("{v}");
            } else {
                let has_text = engine.codec().is_some();
                let g = engine.generate(&prompt, &p, stream_to_stdout(has_text))?;
                println!();
                print_metrics(&g);
            }
        }
        Command::Chat { bundle, gen } => {
            let mut engine = open(&bundle, cli.ort_lib, board, gen.threads, gen.kv_cache)?;
            if !engine.codec().is_some_and(|c| c.has_chat_template()) {
                bail!("{} has no chat template; use `edgelm run --prompt`", bundle.display());
            }
            let p = params(&engine, &gen);
            let mut messages: Vec<(String, String)> = Vec::new();
            let stdin = std::io::stdin();
            eprint!("> ");
            for line in stdin.lock().lines() {
                let line = line?;
                if line.trim().is_empty() {
                    eprint!("> ");
                    continue;
                }
                messages.push(("user".into(), line));
                let ids = engine.encode_chat(&messages)?;
                let g = engine.generate(&ids, &p, stream_to_stdout(true))?;
                println!();
                messages.push(("assistant".into(), g.text.clone()));
                eprint!("> ");
            }
        }
        Command::Bench(b) => bench(b, cli.ort_lib, board)?,
        Command::Serve(s) => {
            let threads = match (s.threads, board) {
                (0, Some(b)) => b.threads,
                (t, _) => t,
            };
            let opts = edgelm_runtime::serve::ServeOptions {
                bundle: s.bundle,
                models_dir: s.models_dir,
                engine: EngineOptions {
                    ort_lib: cli.ort_lib,
                    decoder: DecoderOptions { threads, ..DecoderOptions::default() },
                },
                queue: s.queue,
                line_rate: s.line_rate,
            };
            edgelm_runtime::serve::serve(&s.link.addr(), opts)?;
        }
        Command::Client(c) => client(c)?,
        Command::Embed { bundle, text, json } => {
            let opts = EngineOptions { ort_lib: cli.ort_lib, ..EngineOptions::default() };
            let mut enc = edgelm_runtime::encoder::Encoder::open(&bundle, &opts)
                .with_context(|| format!("opening {}", bundle.display()))?;
            let v = enc.embed(&text)?;
            if json {
                println!("{}", serde_json::json!({"dim": v.len(), "embedding": v}));
            } else {
                for x in v {
                    println!("{x}");
                }
            }
        }
    }
    Ok(())
}

fn client(c: ClientArgs) -> Result<()> {
    use edgelm_protocol::client::Client;
    use edgelm_runtime::link::{open_serial, tcp_link, EmbeddedIo, LinkAddr};
    let link = match c.link.addr() {
        LinkAddr::Serial { path, baud } => open_serial(&path, baud)?,
        LinkAddr::Tcp(a) => tcp_link(std::net::TcpStream::connect(&a).with_context(|| format!("connecting to {a}"))?)?,
    };
    let mut client = Client::new(EmbeddedIo { reader: link.reader, writer: link.writer });
    let info = client.hello("edgelm client").map_err(|e| anyhow::anyhow!("hello: {e}"))?;
    eprintln!(
        "board: edgelm {} protocol {}, model `{}`, context {}",
        info.runtime, info.protocol, info.model, info.context
    );
    if let Some(name) = &c.load {
        client.load_model(name).map_err(|e| anyhow::anyhow!("load {name}: {e}"))?;
    }
    if c.embed {
        let mut v = vec![0f32; 4096];
        let n = client.embed(&c.prompt, &mut v).map_err(|e| anyhow::anyhow!("embed: {e}"))?;
        println!("{}", serde_json::json!({"dim": n, "embedding": &v[..n]}));
        return Ok(());
    }
    let params = edgelm_protocol::GenParams {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        seed: c.seed,
        ignore_eos: c.ignore_eos,
        ..edgelm_protocol::GenParams::default()
    };
    let mut out = std::io::stdout();
    let stats = client
        .generate(&c.prompt, &params, |piece| write!(out, "{piece}").and_then(|_| out.flush()).is_ok())
        .map_err(|e| anyhow::anyhow!("generate: {e}"))?;
    println!();
    if c.stats {
        eprintln!(
            "{}",
            serde_json::json!({
                "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
                "ttft_ms": stats.ttft_ms, "decode_tokens_per_s": stats.decode_tokens_per_s,
                "peak_rss_kib": stats.peak_rss_kib, "stop_reason": format!("{:?}", stats.stop_reason),
            })
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn bench(b: BenchArgs, ort_lib: Option<PathBuf>, board: Option<&BoardProfile>) -> Result<()> {
    let load_start = std::time::Instant::now();
    let mut engine = open(&b.bundle, ort_lib, board, b.threads, b.kv_cache)?;
    check_budget(&engine, board, b.prompt_tokens + b.new_tokens)?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    if b.runs == 0 || b.prompt_tokens == 0 || b.new_tokens == 0 {
        bail!("--runs, --prompt-tokens and --new-tokens must be at least 1");
    }
    let vocab = engine.vocab_size();
    if vocab < 4 {
        bail!("vocabulary of {vocab} entries is too small for a synthetic prompt");
    }
    // Synthetic prompt spread over the vocabulary, away from the special ids at the bottom.
    let prompt: Vec<u32> = (0..b.prompt_tokens).map(|i| ((1000 + i * 7919) % (vocab - 3) + 3) as u32).collect();
    let p = GenerateParams { max_new_tokens: b.new_tokens, ignore_eos: true, ..GenerateParams::default() };
    let mut runs = Vec::new();
    for i in 0..b.warmup + b.runs {
        let g = engine.generate(&prompt, &p, |_| ControlFlow::Continue(()))?;
        if i >= b.warmup {
            runs.push(g.metrics);
        }
    }
    let ttft = median(runs.iter().map(|m| m.ttft_ms).collect());
    let prefill = median(runs.iter().map(|m| m.prefill_tokens_per_s).collect());
    let decode = median(runs.iter().map(|m| m.decode_tokens_per_s).collect());
    let rss = edgelm_runtime::metrics::peak_rss_bytes();
    let kv = format!("{:?}", engine.kv_cache_mode()).to_lowercase();
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "bundle": b.bundle, "prompt_tokens": b.prompt_tokens, "new_tokens": b.new_tokens,
                "runs": b.runs, "threads": b.threads, "kv_cache": kv, "load_ms": load_ms,
                "ttft_ms": ttft, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                "peak_rss_bytes": rss,
            })
        );
    } else {
        println!("bundle          {}", b.bundle.display());
        println!(
            "prompt / new    {} / {} tokens, {} runs (median), kv cache {kv}",
            b.prompt_tokens, b.new_tokens, b.runs
        );
        println!("load            {load_ms:.0} ms");
        println!("TTFT            {ttft:.1} ms");
        println!("prefill         {prefill:.1} tokens/s");
        println!("decode          {decode:.1} tokens/s");
        println!("peak RSS        {:.1} MiB", rss as f64 / (1 << 20) as f64);
    }
    Ok(())
}
