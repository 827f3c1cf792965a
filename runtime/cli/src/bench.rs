//! `edgelm bench`: median TTFT, prefill and decode speed and peak memory of a bundle.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use edgelm_runtime::metrics::median;
use edgelm_runtime::GenerateParams;

use crate::board::Placement;
use crate::gen_args::{open, KvArg};

#[derive(Args)]
pub struct BenchArgs {
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
    /// Intra-op threads; 0 = the board's count, else one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV cache strategy.
    #[arg(long, value_enum, default_value = "shared")]
    kv_cache: KvArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn bench(b: BenchArgs, place: &Placement) -> Result<()> {
    let load_start = std::time::Instant::now();
    let engine = open(&b.bundle, place, b.threads, b.kv_cache)?;
    place.check_budget(&engine, b.prompt_tokens + b.new_tokens)?;
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
    let p = GenerateParams::default().with_max_new_tokens(b.new_tokens).with_ignore_eos(true);
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
