//! `edgelm-distill`: host-side commands (create checkpoints, export bundles).
//!
//! Exit codes: 0 success, 1 any failure (the message says what to do), 2 bad arguments.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use edgelm_distill::checkpoint::preset::{write_preset, PRESETS};
use edgelm_distill::checkpoint::write::WriteOptions;
use edgelm_distill::export::{export, ExportOptions, LogitsMode};
use edgelm_distill::Checkpoint;

#[derive(Parser)]
#[command(name = "edgelm-distill", version, about = "Build edgelm bundles from Hugging Face checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random checkpoint of a named shape in the Hugging Face layout.
    Init {
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
    },
    /// List the presets `init` knows.
    Presets,
    /// Training data: the built-in task, or your own data prepared for training.
    #[command(subcommand)]
    Data(DataCommand),
    /// Export a checkpoint to an edgelm bundle (fp32 ONNX with KV cache) and check it.
    Export {
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
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate the built-in device-command task (train/validation/test JSONL).
    Generate {
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Seed; the same seed gives the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training examples (validation and test get a tenth each).
        #[arg(long, default_value_t = 20_000)]
        train: usize,
    },
    /// Train a byte-level BPE tokenizer (ChatML special tokens and template) on a data set.
    Tokenizer {
        /// JSONL triples or plain text to learn from.
        input: PathBuf,
        /// Output folder (tokenizer.json, tokenizer_config.json).
        #[arg(short, long)]
        output: PathBuf,
        /// Vocabulary size, special tokens included.
        #[arg(long, default_value_t = 2048)]
        vocab: usize,
        /// Longest sequence recorded in tokenizer_config.json.
        #[arg(long, default_value_t = 512)]
        max_length: usize,
    },
    /// Normalise, deduplicate, split and optionally augment JSONL triples or plain text.
    Prepare {
        /// Input file (JSONL with instruction/input/output, or plain text lines).
        input: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Share for validation.
        #[arg(long, default_value_t = 0.05)]
        validation: f64,
        /// Share for test.
        #[arg(long, default_value_t = 0.05)]
        test: f64,
        /// Shuffle seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Interchangeable entities, comma-separated (e.g. kitchen,garage,office).
        #[arg(long, value_delimiter = ',')]
        swap: Vec<String>,
        /// Augmented copies per example that mentions one of the entities.
        #[arg(long, default_value_t = 0)]
        augment: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogitsArg {
    Last,
    All,
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { preset, output, seed, dtype, shard_mib } => {
            let dtype = match dtype {
                Dtype::F32 => candle_core::DType::F32,
                Dtype::F16 => candle_core::DType::F16,
                Dtype::Bf16 => candle_core::DType::BF16,
            };
            let opts = WriteOptions { dtype, max_shard_bytes: shard_mib.map(|m| m << 20) };
            let cfg =
                write_preset(&preset, &output, seed, opts).with_context(|| format!("creating preset `{preset}`"))?;
            eprintln!("wrote {} ({} parameters) to {}", preset, cfg.num_parameters(), output.display());
        }
        Command::Data(DataCommand::Generate { output, seed, train }) => {
            use edgelm_distill::data::{task, write_jsonl};
            let s = task::generate(seed, train);
            for (name, set) in [("train", &s.train), ("validation", &s.validation), ("test", &s.test)] {
                write_jsonl(&output.join(format!("{name}.jsonl")), set)?;
            }
            eprintln!(
                "wrote {} train, {} validation, {} test examples to {}",
                s.train.len(),
                s.validation.len(),
                s.test.len(),
                output.display()
            );
        }
        Command::Data(DataCommand::Tokenizer { input, output, vocab, max_length }) => {
            use edgelm_distill::checkpoint::preset::{train_tokenizer, write_tokenizer};
            let examples = edgelm_distill::data::prepare::read_any(&input)?;
            let texts: Vec<String> =
                examples.iter().flat_map(|e| [e.instruction.clone(), e.input.clone(), e.output.clone()]).collect();
            let tok = train_tokenizer(texts.iter().map(String::as_str), vocab)?;
            write_tokenizer(&output, &tok, max_length)?;
            eprintln!(
                "trained a {}-entry tokenizer on {} examples into {}",
                tok.get_vocab_size(true),
                examples.len(),
                output.display()
            );
        }
        Command::Data(DataCommand::Prepare { input, output, validation, test, seed, swap, augment }) => {
            use edgelm_distill::data::{prepare, write_jsonl};
            let examples = prepare::read_any(&input)?;
            let opts =
                prepare::PrepareOptions { validation, test, seed, swap_entities: swap, augment_per_example: augment };
            let p = prepare::prepare(examples, &opts);
            for (name, set) in [("train", &p.train), ("validation", &p.validation), ("test", &p.test)] {
                write_jsonl(&output.join(format!("{name}.jsonl")), set)?;
            }
            eprintln!(
                "read {}, dropped {} duplicates, added {} by entity swaps: {} train, {} validation, {} test in {}",
                p.read,
                p.duplicates,
                p.augmented,
                p.train.len(),
                p.validation.len(),
                p.test.len(),
                output.display()
            );
        }
        Command::Presets => {
            for (name, about) in PRESETS {
                println!("{name:14} {about}");
            }
        }
        Command::Export { checkpoint, output, logits, no_verify, tolerance, json } => {
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
            };
            let report = export(&ck, &output, &opts).with_context(|| format!("exporting to {}", output.display()))?;
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
        }
    }
    Ok(())
}
