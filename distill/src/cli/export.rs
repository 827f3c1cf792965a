//! `export`: a checkpoint to a checked bundle.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;

use edgelm_distill::export::{export as run_export, ExportOptions, LogitsMode};
use edgelm_distill::Checkpoint;

/// Which positions the exported graph gives logits for.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogitsArg {
    Last,
    All,
}

/// Export a checkpoint to an edgelm bundle (fp32 ONNX with KV cache) and check it.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Checkpoint folder (config.json, safetensors, tokenizer.json).
    checkpoint: PathBuf,
    /// Bundle folder to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Logits for the last position only (fast prefill) or for every position.
    #[arg(long, value_enum, default_value = "last")]
    logits: LogitsArg,
    /// Skip the ONNX-vs-candle check.
    #[arg(long)]
    no_verify: bool,
    /// Largest allowed max-abs logit difference in the check.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Record that the model answers single requests, so `edgelm chat` sends each line
    /// alone (models trained on single-turn {instruction, input, output} data).
    #[arg(long)]
    single_turn: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Exports and checks a bundle.
pub fn export(a: ExportArgs) -> Result<()> {
    let ExportArgs { checkpoint, output, logits, no_verify, tolerance, single_turn, json } = a;
    if edgelm_distill::encoder::EncoderCheckpoint::is_encoder(&checkpoint) {
        let ck = edgelm_distill::encoder::EncoderCheckpoint::load(&checkpoint)
            .with_context(|| format!("loading {}", checkpoint.display()))?;
        let diff = edgelm_distill::export::export_encoder(&ck, &output, tolerance)
            .with_context(|| format!("exporting to {}", output.display()))?;
        eprintln!(
            "exported encoder to {} (check: ONNX Runtime vs candle embedding, max abs diff {diff:.2e})",
            output.display()
        );
        return Ok(());
    }
    let ck = Checkpoint::load(&checkpoint).with_context(|| format!("loading {}", checkpoint.display()))?;
    let opts = ExportOptions {
        logits: match logits {
            LogitsArg::Last => LogitsMode::Last,
            LogitsArg::All => LogitsMode::All,
        },
        verify: !no_verify,
        tolerance,
        single_turn,
    };
    let report = run_export(&ck, &output, &opts).with_context(|| format!("exporting to {}", output.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!(
            "exported {} parameters to {} (model.onnx {:.1} MiB)",
            report.parameters,
            report.bundle.display(),
            report.model_bytes as f64 / (1 << 20) as f64
        );
        if let Some(v) = &report.verify {
            eprintln!(
                "check: ONNX Runtime vs candle, {} prompt tokens + {} decode steps, max abs logit diff {:.2e}",
                v.prompt_tokens, v.decode_steps, v.max_abs_diff
            );
        }
    }
    Ok(())
}
