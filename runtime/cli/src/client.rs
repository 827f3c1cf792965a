//! `edgelm client`: a prompt sent to a board over the serial protocol, the answer printed as
//! it streams in (the host side of the link, for testing a board from a laptop).

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;

use edgelm_protocol::client::Client;

use crate::link::{open_serial, tcp_link, EmbeddedIo, LinkAddr, LinkArgs};

#[derive(Args)]
pub struct ClientArgs {
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
    /// Send the prompt to be fed as it is, without the bundle's chat template (GenerateRaw,
    /// protocol version 2).
    #[arg(long)]
    raw: bool,
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

pub fn client(c: ClientArgs) -> Result<()> {
    let link = match c.link.addr(None)? {
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
    let on_piece = |piece: &str| write!(out, "{piece}").and_then(|_| out.flush()).is_ok();
    let stats = if c.raw {
        client.generate_raw(&c.prompt, &params, on_piece)
    } else {
        client.generate(&c.prompt, &params, on_piece)
    }
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
