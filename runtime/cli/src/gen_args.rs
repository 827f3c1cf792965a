//! Generation flags shared by `run` and `chat`, and opening a bundle for them.

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::{Engine, GenerateParams, Generation, SamplingParams, TokenEvent};

use crate::board::Placement;

#[derive(Args, Clone)]
pub struct GenArgs {
    /// Most tokens to generate (default: 128, or what the context leaves after the prompt).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy (default: the bundle's).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens; 0 is off.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p; 1 is off.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalty on tokens already seen; 1 is off.
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Intra-op threads; 0 = the board's count, else one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// KV cache strategy.
    #[arg(long, value_enum, default_value = "shared")]
    pub kv_cache: KvArg,
}

/// `--kv-cache`.
#[derive(Clone, Copy, ValueEnum)]
pub enum KvArg {
    /// Preallocated buffer updated in place.
    Shared,
    /// Present outputs fed back as past inputs (copies every step).
    Growing,
}

impl From<KvArg> for KvCacheMode {
    fn from(k: KvArg) -> Self {
        match k {
            KvArg::Shared => KvCacheMode::Shared,
            KvArg::Growing => KvCacheMode::Growing,
        }
    }
}

/// The default for `--max-new-tokens`: 128, or less when the prompt leaves less room.
pub const DEFAULT_MAX_NEW: usize = 128;

/// Opens a causal-LM bundle with the placement's settings.
pub fn open(bundle: &Path, place: &Placement, threads: usize, kv: KvArg) -> Result<Engine> {
    Engine::open(bundle, &place.engine_options(threads, kv.into())?)
        .with_context(|| format!("opening {}", bundle.display()))
}

impl GenArgs {
    /// Request settings for a prompt of `prompt_len` tokens: flags over the bundle's defaults.
    /// Without `--max-new-tokens` the answer gets up to 128 tokens, never more than the context
    /// leaves (at least 1, so an over-long prompt is reported as such).
    pub fn params(&self, engine: &Engine, prompt_len: usize) -> GenerateParams {
        let d = engine.default_sampling();
        let room = engine.context_length().saturating_sub(prompt_len).max(1);
        let sampling = SamplingParams::default()
            .with_temperature(self.temperature.unwrap_or(d.temperature))
            .with_top_k(self.top_k.unwrap_or(d.top_k))
            .with_top_p(self.top_p.unwrap_or(d.top_p))
            .with_repetition_penalty(self.repetition_penalty.unwrap_or(d.repetition_penalty))
            .with_seed(self.seed);
        GenerateParams::default()
            .with_max_new_tokens(self.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW.min(room)))
            .with_sampling(sampling)
            .with_stop_strings(self.stop.iter().cloned())
            .with_ignore_eos(self.ignore_eos)
    }
}

/// Streams pieces to stdout (or token ids when the bundle has no tokenizer).
pub fn stream_to_stdout(has_text: bool) -> impl FnMut(TokenEvent<'_>) -> ControlFlow<()> {
    use std::io::Write;
    let mut out = std::io::stdout();
    move |ev| {
        let r = match (has_text, ev.id) {
            (true, _) => write!(out, "{}", ev.text),
            (false, Some(id)) => write!(out, "{id} "),
            (false, None) => Ok(()),
        };
        if r.and_then(|_| out.flush()).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// The one-line summary printed on stderr after streamed text.
pub fn print_metrics(g: &Generation) {
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
