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
