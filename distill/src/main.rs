//! `edgelm-distill`: host-side commands (data, training, distillation, evaluation, export, and
//! the `pipeline` main command).
//!
//! Exit codes: 0 success, 1 any failure (the message says what to do), 2 bad arguments.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use edgelm_distill::checkpoint::preset::{write_preset, PRESETS};
use edgelm_distill::checkpoint::write::WriteOptions;
use edgelm_distill::data::Example;
use edgelm_distill::export::{export, ExportOptions, LogitsMode};
use edgelm_distill::recipe::{Recipe, Splits, StudentSpec, TrainSettings};
use edgelm_distill::train::pretrain::{pretrain, StageOptions, TrainLog};
use edgelm_distill::Checkpoint;

#[derive(Parser)]
#[command(
    name = "edgelm-distill",
    version,
    about = "Train, distil, score and export models for edgelm, from Hugging Face checkpoints"
)]
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
    /// Train the recipe's teacher from scratch (tokenizer, weights) into a checkpoint.
    Pretrain {
        /// Recipe file (models/<name>/recipe.toml).
        #[arg(long)]
        recipe: PathBuf,
        /// Checkpoint folder to write.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Train LoRA adapters on instruction data with the base frozen (PEFT layout output).
    Finetune {
        /// Base checkpoint.
        #[arg(long)]
        base: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Adapter folder to write (adapter_config.json, adapter_model.safetensors).
        #[arg(short, long)]
        output: PathBuf,
        /// Adapter rank.
        #[arg(long, default_value_t = 8)]
        lora_r: usize,
        /// Adapter scale numerator (the update is scaled by alpha / r).
        #[arg(long, default_value_t = 32.0)]
        lora_alpha: f64,
        /// Projections to adapt.
        #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
        target: Vec<String>,
        /// EWC penalty strength against forgetting (0 = off).
        #[arg(long, default_value_t = 0.0)]
        ewc_lambda: f64,
        /// Data the base should not forget (JSONL; default: the training split).
        #[arg(long)]
        ewc_data: Option<PathBuf>,
        /// Batches of that data for the Fisher estimate.
        #[arg(long, default_value_t = 8)]
        fisher_batches: usize,
        #[command(flatten)]
        train: TrainArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Fold a LoRA adapter into its base checkpoint (for export).
    Merge {
        /// Base checkpoint.
        #[arg(long)]
        base: PathBuf,
        /// Adapter folder (PEFT layout).
        #[arg(long)]
        adapter: PathBuf,
        /// Merged checkpoint folder to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Distil a teacher into a student made of a subset of its layers (optionally narrower).
    Distill {
        /// Teacher checkpoint.
        #[arg(long)]
        teacher: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Student checkpoint folder to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Student settings as TOML (the `[student]` table of a recipe: layers,
        /// intermediate_size, hidden_size, temperature, alpha, [train]); flags override it.
        #[arg(long)]
        student_config: Option<PathBuf>,
        /// Teacher layers the student keeps, e.g. 0,5 (default: the recipe's).
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        /// Student MLP width (sliced from the teacher's).
        #[arg(long)]
        intermediate_size: Option<usize>,
        /// Student residual width (sliced from the teacher's).
        #[arg(long)]
        hidden_size: Option<usize>,
        /// Soft-target temperature.
        #[arg(long)]
        temperature: Option<f64>,
        /// Weight of the soft-target term.
        #[arg(long)]
        alpha: Option<f64>,
        /// Cache the teacher's top-k logits in this folder (built on first use, reused while
        /// teacher and data are unchanged) instead of running the teacher every step.
        #[arg(long)]
        teacher_cache: Option<PathBuf>,
        /// Logits kept per position in the teacher cache.
        #[arg(long, default_value_t = 64)]
        teacher_top_k: usize,
        #[command(flatten)]
        train: TrainArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Score checkpoints (candle) and bundles (ONNX Runtime) on the test split.
    Eval {
        /// Checkpoint or bundle folders.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        /// Score only the first N test examples.
        #[arg(long)]
        examples: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The main command: distil the recipe's teacher, export, answer held-out commands on the
    /// runtime, and write report.json + report.svg.
    Pipeline {
        /// Recipe file.
        #[arg(long, default_value = "models/devcmd/recipe.toml")]
        recipe: PathBuf,
        /// Output folder (default out/<recipe name>).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Score only the first N test examples per stage.
        #[arg(long)]
        eval_examples: Option<usize>,
        /// ONNX Runtime library to load.
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
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
        /// Record that the model answers single requests, so `edgelm chat` sends each line
        /// alone (models trained on single-turn {instruction, input, output} data).
        #[arg(long)]
        single_turn: bool,
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

/// Where examples come from.
#[derive(clap::Args)]
struct DataArgs {
    /// Folder with train.jsonl, validation.jsonl, test.jsonl.
    #[arg(long, conflicts_with = "recipe")]
    data: Option<PathBuf>,
    /// Recipe whose data (and, for distill, student settings) to use.
    #[arg(long)]
    recipe: Option<PathBuf>,
}

impl DataArgs {
    fn recipe(&self) -> Result<Option<Recipe>> {
        self.recipe.as_deref().map(Recipe::load).transpose().map_err(Into::into)
    }

    fn splits(&self) -> Result<Splits> {
        if let Some(r) = self.recipe()? {
            return Ok(r.splits()?);
        }
        let dir = self.data.as_ref().context("give --data DIR (train/validation/test.jsonl) or --recipe FILE")?;
        Ok(Splits::read_dir(dir)?)
    }
}

/// Optimizer and loop flags; unset flags keep the recipe's (or built-in) values.
#[derive(clap::Args)]
struct TrainArgs {
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine decay.
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// Passes over the training data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Cap on optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    accumulation: Option<usize>,
    /// AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Gradient clipping norm (0 = off).
    #[arg(long)]
    clip_norm: Option<f64>,
    /// Validate every N steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after N validations without improvement (0 = off).
    #[arg(long)]
    patience: Option<usize>,
    /// Checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Seed of the data order (and of the adapter init).
    #[arg(long)]
    seed: Option<u64>,
}

impl TrainArgs {
    fn over(&self, base: TrainSettings) -> TrainSettings {
        TrainSettings {
            lr: self.lr.unwrap_or(base.lr),
            min_lr: self.min_lr.unwrap_or(base.min_lr),
            warmup: self.warmup.unwrap_or(base.warmup),
            epochs: self.epochs.unwrap_or(base.epochs),
            max_steps: self.max_steps.or(base.max_steps),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            accumulation: self.accumulation.unwrap_or(base.accumulation),
            weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
            clip_norm: self.clip_norm.unwrap_or(base.clip_norm),
            eval_every: self.eval_every.unwrap_or(base.eval_every),
            patience: self.patience.unwrap_or(base.patience),
            checkpoint_every: self.checkpoint_every.unwrap_or(base.checkpoint_every),
            eval_examples: base.eval_examples,
            seed: self.seed.unwrap_or(base.seed),
        }
    }
}

/// Resumable-run flags shared by the training commands.
#[derive(clap::Args)]
struct RunArgs {
    /// Folder for checkpoints of the run (default: <output>.run).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run saved in the run folder exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Stop after this optimizer step, leaving a state `--resume` continues.
    #[arg(long)]
    halt_after: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl RunArgs {
    fn stage(self, output: PathBuf) -> StageOptions {
        StageOptions {
            output,
            run_dir: self.run_dir,
            resume: self.resume,
            halt_after: self.halt_after,
            progress: !self.quiet,
        }
    }
}

fn print_log(log: &TrainLog, output: &std::path::Path) {
    eprintln!(
        "{}: {} steps, best validation loss {:.4}{}, {:.0} tokens/s ({:.2} GFLOP/s), {} trainable parameters -> {}",
        log.stage,
        log.steps,
        log.best_val_loss.unwrap_or(f64::NAN),
        if log.stopped_early { " (stopped early)" } else { "" },
        log.tokens_per_s,
        log.gflops,
        log.trainable_parameters,
        output.display()
    );
}

#[derive(Clone, Copy, ValueEnum)]
enum LogitsArg {
    Last,
    All,
}

fn main() {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`edgelm-distill eval ... | head`)
    // would panic; the default action ends the process quietly, as Unix tools do.
    // SAFETY: setting a signal's disposition touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
            let tok = train_tokenizer(examples.iter().flat_map(Example::texts), vocab)?;
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
        Command::Pretrain { recipe, output, run } => {
            let r = Recipe::load(&recipe)?;
            let log = pretrain(&r, &run.stage(output.clone())).context("pretraining")?;
            print_log(&log, &output);
        }
        Command::Finetune {
            base,
            data,
            output,
            lora_r,
            lora_alpha,
            target,
            ewc_lambda,
            ewc_data,
            fisher_batches,
            train,
            run,
        } => {
            use edgelm_distill::lora::LoraConfig;
            use edgelm_distill::train::finetune::{finetune, FinetuneSpec};
            let ck = Checkpoint::load(&base).with_context(|| format!("loading {}", base.display()))?;
            let splits = data.splits()?;
            let base_settings = match data.recipe()?.and_then(|r| r.finetune) {
                Some(f) => f.train,
                None => TrainSettings::default(),
            };
            let settings = train.over(base_settings);
            let ewc = match &ewc_data {
                Some(p) => edgelm_distill::data::prepare::read_any(p)?,
                None => splits.train.clone(),
            };
            let spec = FinetuneSpec {
                lora: LoraConfig { r: lora_r, lora_alpha, target_modules: target },
                seed: settings.seed,
                ewc_lambda,
                fisher_batches,
                train: settings,
            };
            let done = finetune(&ck, (&splits.train, &splits.validation), &ewc, &spec, &run.stage(output.clone()))
                .context("fine-tuning")?;
            print_log(&done.log, &output);
        }
        Command::Merge { base, adapter, output } => {
            use edgelm_distill::train::finetune::merge;
            let ck = Checkpoint::load(&base).with_context(|| format!("loading {}", base.display()))?;
            let a = edgelm_distill::lora::Adapter::load_peft(&adapter)
                .with_context(|| format!("loading the adapter in {}", adapter.display()))?;
            merge(&ck, &a, &output)?;
            eprintln!("merged {} ({} modules) into {}", adapter.display(), a.modules.len(), output.display());
        }
        Command::Distill {
            teacher,
            data,
            output,
            student_config,
            layers,
            intermediate_size,
            hidden_size,
            temperature,
            alpha,
            teacher_cache,
            teacher_top_k,
            train,
            run,
        } => {
            use edgelm_distill::student::StudentShape;
            use edgelm_distill::train::distill::{distill, DistillSpec};
            let ck = Checkpoint::load(&teacher).with_context(|| format!("loading {}", teacher.display()))?;
            let splits = data.splits()?;
            let recipe = data.recipe()?;
            let st = match &student_config {
                Some(p) => Some(StudentSpec::load(p)?),
                None => recipe.as_ref().map(|r| r.student.clone()),
            };
            let layers = if layers.is_empty() {
                st.as_ref().map(|s| s.layers.clone()).context("give --layers (or a --recipe with [student])")?
            } else {
                layers
            };
            let spec = DistillSpec {
                shape: StudentShape {
                    layers,
                    intermediate_size: intermediate_size.or(st.as_ref().and_then(|s| s.intermediate_size)),
                    hidden_size: hidden_size.or(st.as_ref().and_then(|s| s.hidden_size)),
                },
                temperature: temperature.or(st.as_ref().map(|s| s.temperature)).unwrap_or(2.0),
                alpha: alpha.or(st.as_ref().map(|s| s.alpha)).unwrap_or(0.5),
                teacher_cache: teacher_cache.map(|d| (d, teacher_top_k)),
                train: train.over(st.map(|s| s.train).unwrap_or_else(|| TrainSettings::default().with_lr(2e-3))),
            };
            let log = distill(&ck, (&splits.train, &splits.validation), &spec, &run.stage(output.clone()))
                .context("distilling")?;
            print_log(&log, &output);
        }
        Command::Eval { models, data, examples, json } => {
            use edgelm_distill::eval::{score_bundle, score_checkpoint};
            let splits = data.splits()?;
            let test = &splits.test[..examples.unwrap_or(splits.test.len()).min(splits.test.len())];
            let mut all = Vec::new();
            for m in &models {
                let score = if m.join("edgelm.json").exists() || m.join("genai_config.json").exists() {
                    score_bundle(m, test, &Default::default(), !json)
                } else {
                    Checkpoint::load(m).and_then(|ck| score_checkpoint(&ck, test, !json))
                }
                .with_context(|| format!("scoring {}", m.display()))?;
                if !json {
                    println!(
                        "{}: task completion {:.1}% of {}{}",
                        m.display(),
                        100.0 * score.task_completion,
                        score.examples,
                        score.perplexity.map_or(String::new(), |p| format!(", perplexity {p:.3}"))
                    );
                    for miss in score.misses.iter().take(3) {
                        println!("  miss: {:?} -> {:?} (expected {:?})", miss.input, miss.got, miss.expected);
                    }
                }
                all.push(serde_json::json!({"model": m, "score": score}));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            }
        }
        Command::Pipeline { recipe, output, eval_examples, ort_lib, quiet } => {
            use edgelm_distill::pipeline::{run as run_pipeline, PipelineOptions};
            let r = Recipe::load(&recipe)?;
            let mut engine = edgelm_runtime::EngineOptions::default();
            if let Some(p) = ort_lib {
                engine = engine.with_ort_library(p);
            }
            let opts = PipelineOptions {
                output: output.unwrap_or_else(|| PathBuf::from("out").join(&r.name)),
                eval_examples,
                engine,
                progress: !quiet,
            };
            run_pipeline(&r, &opts, &mut std::io::stdout().lock()).context("pipeline")?;
        }
        Command::Presets => {
            for (name, about) in PRESETS {
                println!("{name:14} {about}");
            }
        }
        Command::Export { checkpoint, output, logits, no_verify, tolerance, single_turn, json } => {
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
