//! `pretrain`, `finetune` and `distill`, with the optimizer and run flags they share.

use std::path::PathBuf;

use anyhow::{Context, Result};

use edgelm_distill::recipe::{Recipe, StudentSpec, TrainSettings};
use edgelm_distill::train::pretrain::pretrain as run_pretrain;
use edgelm_distill::train::stage::{StageOptions, TrainLog};
use edgelm_distill::Checkpoint;

use super::data::DataArgs;

/// Optimizer and loop flags; unset flags keep the recipe's (or built-in) values.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine decay [default: the recipe's when --lr is not
    /// given, else a tenth of the learning rate].
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
    /// Validation examples per validation [default: the recipe's, else 256].
    #[arg(long)]
    eval_examples: Option<usize>,
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
            // A recipe's min_lr belongs to the recipe's lr: with another --lr it decays to a tenth
            // of that unless --min-lr says otherwise.
            min_lr: self.min_lr.or(if self.lr.is_some() { None } else { base.min_lr }),
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
            eval_examples: self.eval_examples.or(base.eval_examples),
            seed: self.seed.unwrap_or(base.seed),
        }
    }
}

/// Resumable-run flags shared by the training commands.
#[derive(clap::Args)]
pub struct RunArgs {
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

/// Train the recipe's teacher from scratch (tokenizer, weights) into a checkpoint.
#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Recipe file (models/<name>/recipe.toml).
    #[arg(long)]
    recipe: PathBuf,
    /// Checkpoint folder to write.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

/// Trains the recipe's teacher.
pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let PretrainArgs { recipe, output, run } = a;
    let r = Recipe::load(&recipe)?;
    let log = run_pretrain(&r, &run.stage(output.clone())).context("pretraining")?;
    print_log(&log, &output);
    Ok(())
}

/// Train LoRA adapters on instruction data with the base frozen (PEFT layout output).
#[derive(clap::Args)]
pub struct FinetuneArgs {
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
    /// EWC penalty strength against forgetting (0 = off; 1 weighs the base task's token loss as
    /// much as the new one's).
    #[arg(long, default_value_t = 0.0)]
    ewc_lambda: f64,
    /// Data the base should not forget (JSONL; default: the training split).
    #[arg(long)]
    ewc_data: Option<PathBuf>,
    /// Batches of that data for the Fisher estimate (one gradient per example).
    #[arg(long, default_value_t = 8)]
    fisher_batches: usize,
    /// QLoRA: hold the base's projections as 4-bit blocks, dequantized on the fly (the fp32
    /// projections are freed after packing).
    #[arg(long, conflicts_with_all = ["ewc_lambda", "ewc_data", "fisher_batches"])]
    qlora: bool,
    /// Weights per 4-bit block for --qlora.
    #[arg(long, default_value_t = 64, requires = "qlora")]
    qlora_block_size: usize,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Trains LoRA adapters.
pub fn finetune(a: FinetuneArgs) -> Result<()> {
    let FinetuneArgs {
        base,
        data,
        output,
        lora_r,
        lora_alpha,
        target,
        ewc_lambda,
        ewc_data,
        fisher_batches,
        qlora,
        qlora_block_size,
        train,
        run,
    } = a;
    use edgelm_distill::lora::LoraConfig;
    use edgelm_distill::quantize::BlockScheme;
    use edgelm_distill::train::finetune::{finetune, finetune_qlora, FinetuneSpec};
    use edgelm_distill::train::qlora::QuantizedBase;
    // With --qlora each projection is packed as it is read: the fp32 projections are never all
    // in memory.
    let (ck, packed) = if qlora {
        let scheme = BlockScheme::new(4, qlora_block_size, true)?;
        let (ck, packed) = QuantizedBase::load(&base, scheme).with_context(|| format!("loading {}", base.display()))?;
        (ck, Some(packed))
    } else {
        (Checkpoint::load(&base).with_context(|| format!("loading {}", base.display()))?, None)
    };
    let splits = data.splits()?;
    let base_settings = match data.recipe()?.and_then(|r| r.finetune) {
        Some(f) => f.train,
        None => TrainSettings::default(),
    };
    let settings = train.over(base_settings);
    let ewc = match &ewc_data {
        Some(p) => edgelm_distill::data::prepare::read_any(p)?,
        None if ewc_lambda > 0.0 => splits.train.clone(),
        None => vec![],
    };
    let spec = FinetuneSpec {
        lora: LoraConfig { r: lora_r, lora_alpha, target_modules: target },
        seed: settings.seed,
        ewc_lambda,
        fisher_batches,
        train: settings,
    };
    let data = (&splits.train[..], &splits.validation[..]);
    let done = if let Some(packed) = &packed {
        eprintln!(
            "QLoRA: projections held as 4-bit blocks of {qlora_block_size}: {:.1} MiB",
            packed.packed_bytes() as f64 / (1 << 20) as f64
        );
        finetune_qlora(&ck, packed, data, &spec, &run.stage(output.clone())).context("fine-tuning (QLoRA)")?
    } else {
        finetune(&ck, data, &ewc, &spec, &run.stage(output.clone())).context("fine-tuning")?
    };
    print_log(&done.log, &output);
    eprintln!("peak resident memory: {:.1} MiB", edgelm_runtime::metrics::peak_rss_bytes() as f64 / (1 << 20) as f64);
    Ok(())
}

/// Distil a teacher into a student made of a subset of its layers (optionally narrower).
#[derive(clap::Args)]
pub struct DistillArgs {
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
    /// teacher and data are unchanged) instead of running the teacher every step [default:
    /// <output>.teacher-cache when the [student] settings (--student-config, else the
    /// recipe's) set teacher_top_k, else none].
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    /// Logits kept per position in the teacher cache [default: the [student] settings'
    /// teacher_top_k, else 64].
    #[arg(long)]
    teacher_top_k: Option<usize>,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Distils a student.
pub fn distill(a: DistillArgs) -> Result<()> {
    let DistillArgs {
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
    } = a;
    use edgelm_distill::student::StudentShape;
    use edgelm_distill::train::distill::{distill, DistillSpec, StudentInit};
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
        student: StudentInit::Slice(StudentShape {
            layers,
            intermediate_size: intermediate_size.or(st.as_ref().and_then(|s| s.intermediate_size)),
            hidden_size: hidden_size.or(st.as_ref().and_then(|s| s.hidden_size)),
        }),
        temperature: temperature.or(st.as_ref().map(|s| s.temperature)).unwrap_or(2.0),
        alpha: alpha.or(st.as_ref().map(|s| s.alpha)).unwrap_or(0.5),
        teacher_cache: {
            // The recipe's top-k turns the cache on, as in the pipeline; the flags win.
            let recipe_k = st.as_ref().and_then(|s| s.teacher_top_k);
            let k = teacher_top_k.or(recipe_k).unwrap_or(64);
            let beside = || {
                let mut d = output.clone().into_os_string();
                d.push(".teacher-cache");
                PathBuf::from(d)
            };
            teacher_cache.or_else(|| recipe_k.map(|_| beside())).map(|d| (d, k))
        },
        hidden_weight: 0.0,
        train: train.over(st.map(|s| s.train).unwrap_or_else(|| TrainSettings::default().with_lr(2e-3))),
    };
    let log =
        distill(&ck, (&splits.train, &splits.validation), &spec, &run.stage(output.clone())).context("distilling")?;
    print_log(&log, &output);
    Ok(())
}

/// Remove whole MLP units and KV groups (structured pruning), ranked by their contribution on
/// calibration examples, optionally followed by a recovery distillation from the unpruned model.
#[derive(clap::Args)]
pub struct PruneStructuredArgs {
    /// Checkpoint to prune.
    checkpoint: PathBuf,
    /// Examples the importance is measured on (and the recovery trains on).
    #[command(flatten)]
    data: DataArgs,
    /// Pruned checkpoint folder to write (with structured_prune_report.json).
    #[arg(short, long)]
    output: PathBuf,
    /// Share of each layer's MLP units to remove (0 up to 1) [default: the recipe's [prune]].
    #[arg(long)]
    mlp: Option<f64>,
    /// Share of each layer's attention heads to remove, in whole KV groups [default: the
    /// recipe's [prune]].
    #[arg(long)]
    heads: Option<f64>,
    /// Share of each KV group's query heads to remove, keys and values kept [default: the
    /// recipe's [prune]].
    #[arg(long)]
    query_heads: Option<f64>,
    /// Training examples the importance is measured on.
    #[arg(long)]
    calibration: Option<usize>,
    /// During the recovery, also match the unpruned model's residual stream after every layer,
    /// with this weight [default: the recipe's [prune], else 0].
    #[arg(long, requires = "recover")]
    hidden_weight: Option<f64>,
    /// Distil the pruned model from the unpruned one afterwards (settings: the recipe's
    /// [prune.train], then the flags).
    #[arg(long)]
    recover: bool,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Prunes whole units and groups, and recovers when asked.
pub fn prune_structured(a: PruneStructuredArgs) -> Result<()> {
    use edgelm_distill::prune::structured::{
        calibration_sequences, measure_importance, prune_structured, write_pruned, StructuredOptions,
    };
    use edgelm_distill::train::distill::{distill, DistillSpec, StudentInit};
    let ck = Checkpoint::load(&a.checkpoint).with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let splits = a.data.splits()?;
    let stage = a.data.recipe()?.and_then(|r| r.prune);
    let opts = StructuredOptions {
        mlp: a.mlp.or(stage.as_ref().map(|s| s.mlp)).unwrap_or(0.0),
        heads: a.heads.or(stage.as_ref().map(|s| s.heads)).unwrap_or(0.0),
        query_heads: a.query_heads.or(stage.as_ref().map(|s| s.query_heads)).unwrap_or(0.0),
    };
    if opts.mlp == 0.0 && opts.heads == 0.0 && opts.query_heads == 0.0 {
        anyhow::bail!("nothing to prune: give --mlp, --heads or --query-heads (or a --recipe with [prune])");
    }
    opts.check(&ck.config)?;
    let n = a.calibration.or(stage.as_ref().map(|s| s.calibration)).unwrap_or(256);
    let calibration = calibration_sequences(&ck, &splits.train, n)?;
    let importance = measure_importance(&ck.config, &ck.tensors, &calibration).context("measuring importance")?;
    let (config, weights, report) = prune_structured(&ck.config, &ck.tensors, &importance, &opts)?;
    eprintln!("pruned: {}, on {} calibration tokens", report.summary(), report.calibration_tokens);
    if a.recover {
        let base = stage.as_ref().map(|s| s.train.clone()).unwrap_or_else(|| TrainSettings::default().with_lr(1e-3));
        let spec = DistillSpec {
            student: StudentInit::Weights(Box::new(config), weights),
            temperature: stage.as_ref().map(|s| s.temperature).unwrap_or(2.0),
            alpha: stage.as_ref().map(|s| s.alpha).unwrap_or(0.5),
            train: a.train.over(base),
            teacher_cache: None,
            hidden_weight: a.hidden_weight.or(stage.as_ref().map(|s| s.hidden_weight)).unwrap_or(0.0),
        };
        let log = distill(&ck, (&splits.train, &splits.validation), &spec, &a.run.stage(a.output.clone()))
            .context("recovering")?;
        print_log(&log, &a.output);
        report.write(&a.output)?;
    } else {
        write_pruned(&ck.dir, &a.output, (&config, &weights), &report)?;
    }
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// Student layers matched to the teacher's hidden states (see `--hidden-states`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HiddenStatesArg {
    /// Every kept layer.
    All,
    /// The last layer only.
    Last,
}

/// Distil a sentence encoder (BERT family, e.g. all-MiniLM-L6-v2) into one with fewer layers on
/// unlabelled text: cosine and squared error against the teacher's embeddings.
#[derive(clap::Args)]
pub struct DistillEncoderArgs {
    /// Teacher encoder checkpoint (sentence-transformers or transformers layout).
    #[arg(long)]
    teacher: PathBuf,
    /// Text to train on, one sentence per line.
    #[arg(long)]
    text: PathBuf,
    /// Student checkpoint folder to write (with distill_report.json).
    #[arg(short, long)]
    output: PathBuf,
    /// Teacher layers the student keeps, e.g. 1,3,5.
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Passes over the text.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Sentences per optimizer step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Longest sentence in tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Weight of matching the teacher's hidden states after each kept layer, token by token
    /// (0: match the sentence embedding alone).
    #[arg(long, default_value_t = 1.0)]
    hidden_weight: f64,
    /// Which student layers meet the teacher's hidden states: every kept layer, or the last
    /// one only (the one the sentence embedding is pooled from).
    #[arg(long, value_enum, default_value_t = HiddenStatesArg::All)]
    hidden_states: HiddenStatesArg,
    /// Weight of matching the teacher's attention distributions at the same layers (KL per
    /// head and query; 0: none).
    #[arg(long, default_value_t = 0.0)]
    attention_weight: f64,
    /// Seed of the sentence order and the held-out split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start from this student of the same teacher (a distill-encoder output with as many
    /// layers as --layers names) instead of the teacher's layers: a second stage on more text.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Quantization-aware training for int8-static: train through the rounding the student's
    /// int8-static bundle will do (give `quantize` the same --calibration, --smooth, --range,
    /// --percentile and --full-range afterwards). Best as a last, short stage from a trained
    /// student (--init) at a low learning rate.
    #[arg(long, requires = "calibration")]
    qat: bool,
    /// --qat: calibration text, one per line (the file `quantize --calibration` will read).
    #[arg(long, value_name = "FILE", requires = "qat")]
    calibration: Option<PathBuf>,
    /// --qat: at most this many calibration lines are used.
    #[arg(long, default_value_t = 256)]
    calibration_samples: usize,
    /// --qat: SmoothQuant strength the bundle will be quantized with.
    #[arg(long, value_name = "ALPHA")]
    smooth: Option<f32>,
    /// --qat: how the bundle's activation ranges will be picked.
    #[arg(long, value_enum, default_value = "min-max")]
    range: super::export::RangeArg,
    /// --qat with --range percentile: the share of values kept inside each range, in percent.
    #[arg(long, default_value_t = 99.999)]
    percentile: f32,
    /// --qat: the bundle's weights will use -127..127 (`quantize --full-range`).
    #[arg(long)]
    full_range: bool,
    /// Narrow every layer's feed-forward block to this many units before training (structured
    /// pruning: the units that write least into the residual stream on the training text go;
    /// training then recovers). Later stages (--init) keep the width they start from.
    #[arg(long, value_name = "UNITS")]
    ffn_size: Option<usize>,
}

/// Distils an encoder.
pub fn distill_encoder(a: DistillEncoderArgs) -> Result<()> {
    use edgelm_distill::encoder::qat::FakeQuantSpec;
    use edgelm_distill::encoder::student::{
        distill_encoder, read_sentences, EncoderDistillSpec, HiddenStates, QatSpec,
    };
    use edgelm_distill::encoder::EncoderCheckpoint;
    use edgelm_distill::quantize::RangeMethod;
    let teacher = EncoderCheckpoint::load(&a.teacher).with_context(|| format!("loading {}", a.teacher.display()))?;
    let text = read_sentences(&a.text)?;
    super::export::warn_full_range_here(a.qat && a.full_range);
    let qat = match &a.calibration {
        Some(path) if a.qat => Some(QatSpec {
            scheme: FakeQuantSpec {
                smooth: a.smooth,
                range: match a.range {
                    super::export::RangeArg::MinMax => RangeMethod::MinMax,
                    super::export::RangeArg::Percentile => RangeMethod::Percentile { percentile: a.percentile },
                },
                full_range: a.full_range,
            },
            calibration: read_sentences(path)?.into_iter().take(a.calibration_samples).collect(),
            recalibrations: 10,
        }),
        _ => None,
    };
    let spec = EncoderDistillSpec {
        layers: a.layers,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        max_tokens: a.max_tokens,
        hidden_weight: a.hidden_weight,
        hidden_states: match a.hidden_states {
            HiddenStatesArg::All => HiddenStates::All,
            HiddenStatesArg::Last => HiddenStates::Last,
        },
        attention_weight: a.attention_weight,
        seed: a.seed,
        init: a.init,
        qat,
        ffn_size: a.ffn_size,
    };
    let r = distill_encoder(&teacher, &text, &spec, &a.output).context("distilling the encoder")?;
    eprintln!(
        "encoder student (layers {:?}): {} sentences, {} steps in {:.0} s; held-out cosine to the teacher {:.4} -> {:.4} -> {}",
        r.layers,
        r.train_sentences,
        r.steps,
        r.seconds,
        r.held_out_cosine.0,
        r.held_out_cosine.1,
        a.output.display()
    );
    Ok(())
}
