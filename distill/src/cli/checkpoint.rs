//! `init`, `presets` and `merge`: checkpoints made or combined without training.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;

use edgelm_distill::checkpoint::preset::{write_preset, PRESETS};
use edgelm_distill::checkpoint::write::WriteOptions;
use edgelm_distill::Checkpoint;

/// Storage dtype of written weights.
#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

/// Write a random checkpoint of a named shape in the Hugging Face layout.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Preset name (see `edgelm-distill presets`).
    #[arg(long)]
    preset: String,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage dtype of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Split weights into shards of at most this many MiB (with an index file).
    #[arg(long)]
    shard_mib: Option<usize>,
}

/// Writes a random checkpoint of a preset.
pub fn init(a: InitArgs) -> Result<()> {
    let InitArgs { preset, output, seed, dtype, shard_mib } = a;
    let dtype = match dtype {
        Dtype::F32 => candle_core::DType::F32,
        Dtype::F16 => candle_core::DType::F16,
        Dtype::Bf16 => candle_core::DType::BF16,
    };
    let opts = WriteOptions { dtype, max_shard_bytes: shard_mib.map(|m| m << 20) };
    let cfg = write_preset(&preset, &output, seed, opts).with_context(|| format!("creating preset `{preset}`"))?;
    eprintln!("wrote {} ({} parameters) to {}", preset, cfg.num_parameters(), output.display());
    Ok(())
}

/// Fold a LoRA adapter into its base checkpoint (for export).
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Base checkpoint.
    #[arg(long)]
    base: PathBuf,
    /// Adapter folder (PEFT layout).
    #[arg(long)]
    adapter: PathBuf,
    /// Merged checkpoint folder to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// Folds an adapter into its base.
pub fn merge(a: MergeArgs) -> Result<()> {
    let MergeArgs { base, adapter, output } = a;
    use edgelm_distill::train::finetune::merge;
    let ck = Checkpoint::load(&base).with_context(|| format!("loading {}", base.display()))?;
    let a = edgelm_distill::lora::Adapter::load_peft(&adapter)
        .with_context(|| format!("loading the adapter in {}", adapter.display()))?;
    merge(&ck, &a, &output)?;
    eprintln!("merged {} ({} modules) into {}", adapter.display(), a.modules.len(), output.display());
    Ok(())
}

/// Lists the presets `init` knows.
pub fn presets() -> Result<()> {
    for (name, about) in PRESETS {
        println!("{name:14} {about}");
    }
    Ok(())
}

/// Where a sparsity's magnitude cut is chosen.
#[derive(Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    /// One cut over every targeted weight.
    Global,
    /// The same share in every layer.
    Layer,
}

/// Zero the smallest weights of a checkpoint's projections (magnitude pruning).
#[derive(clap::Args)]
pub struct PruneArgs {
    /// Checkpoint folder.
    checkpoint: PathBuf,
    /// Pruned checkpoint folder to write (with prune_report.json).
    #[arg(short, long)]
    output: PathBuf,
    /// Share of the targeted weights to zero, smallest magnitudes first (0 up to 1).
    #[arg(long, conflicts_with = "threshold", required_unless_present = "threshold")]
    sparsity: Option<f64>,
    /// Zero every targeted weight whose magnitude is below this instead.
    #[arg(long)]
    threshold: Option<f32>,
    /// One magnitude cut for the whole model, or the same share in every layer.
    #[arg(long, value_enum, default_value = "global")]
    scope: ScopeArg,
    /// Prune the embedding and an untied LM head too (left alone by default).
    #[arg(long)]
    include_embeddings: bool,
    /// Print the per-tensor report as JSON.
    #[arg(long)]
    json: bool,
}

/// Prunes a checkpoint by magnitude.
pub fn prune(a: PruneArgs) -> Result<()> {
    use edgelm_distill::prune::{prune_checkpoint, PruneAmount, PruneOptions, PruneScope};
    let ck = Checkpoint::load(&a.checkpoint).with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let amount = match (a.sparsity, a.threshold) {
        (Some(s), _) => PruneAmount::Sparsity(s),
        (None, Some(t)) => PruneAmount::Threshold(t),
        (None, None) => anyhow::bail!("give --sparsity or --threshold"),
    };
    let scope = match a.scope {
        ScopeArg::Global => PruneScope::Global,
        ScopeArg::Layer => PruneScope::Layer,
    };
    let r = prune_checkpoint(&ck, &a.output, &PruneOptions { amount, scope, embeddings: a.include_embeddings })
        .with_context(|| format!("pruning into {}", a.output.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    for t in &r.tensors {
        eprintln!("  {:<48} {:>9} weights {:>6.1}% zero", t.name, t.weights, 100.0 * t.sparsity);
    }
    eprintln!(
        "pruned into {}: {:.1}% of the targeted weights and {:.1}% of the model are zero",
        a.output.display(),
        100.0 * r.targeted_sparsity,
        100.0 * r.model_sparsity
    );
    Ok(())
}
