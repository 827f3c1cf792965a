//! Recipes: one TOML file that fixes everything a model's training depends on (data, tokenizer,
//! shape, optimizer settings, seeds), so the committed model can be reproduced from it.
//!
//! ```toml
//! name = "devcmd"
//! [data]            # the built-in task (seed, size) or a folder of train/validation/test.jsonl
//! seed = 1
//! train = 20000
//! [tokenizer]
//! vocab_size = 1024
//! [teacher]         # shape of the model `pretrain` trains from scratch
//! hidden_size = 256
//! ...
//! [teacher.train]   # optimizer and loop settings (see TrainSettings)
//! [student]         # which teacher layers to keep and how narrow to slice
//! [student.train]
//! [pipeline]        # where the committed teacher lives, what to show
//! ```
//! Relative paths are relative to the recipe file's folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::checkpoint::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use crate::data::{read_jsonl, task, Example};
use crate::error::{Error, IoContext, Result};
use crate::train::fit::FitOptions;
use crate::train::{CosineSchedule, TrainConfig};

/// A parsed recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Model family name.
    pub name: String,
    /// Training data.
    pub data: DataSpec,
    /// Tokenizer trained for the teacher.
    pub tokenizer: TokenizerSpec,
    /// Teacher shape and training.
    pub teacher: TeacherSpec,
    /// LoRA fine-tuning of the teacher before distillation (skipped when absent).
    pub finetune: Option<FinetuneRecipe>,
    /// Student derived from the teacher.
    pub student: StudentSpec,
    /// Structured pruning of the student with a recovery distillation, gated (skipped when
    /// absent).
    pub prune: Option<PruneStage>,
    /// Quantized bundles made from the fp32 student bundle, each with its accuracy gate
    /// (`[[quantize]]` tables; none: the pipeline ships the fp32 bundle).
    #[serde(default)]
    pub quantize: Vec<QuantizeStage>,
    /// Main-command settings.
    #[serde(default)]
    pub pipeline: PipelineSpec,
    /// Folder of the recipe file (set when loaded).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// Where examples come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Folder with `train.jsonl`, `validation.jsonl`, `test.jsonl`; the built-in task when absent.
    pub dir: Option<PathBuf>,
    /// Seed of the built-in task.
    #[serde(default)]
    pub seed: u64,
    /// Training examples of the built-in task.
    #[serde(default = "default_train")]
    pub train: usize,
}

fn default_train() -> usize {
    20_000
}

/// Tokenizer settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// Vocabulary size, special tokens included.
    pub vocab_size: usize,
}

/// The teacher's shape and training.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Context length.
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Seed of the initial weights.
    #[serde(default)]
    pub init_seed: u64,
    /// Optimizer and loop settings.
    pub train: TrainSettings,
}

fn default_context() -> usize {
    256
}

fn default_theta() -> f64 {
    10_000.0
}

/// LoRA fine-tuning settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRecipe {
    /// Adapter rank.
    pub r: usize,
    /// Adapter scale numerator (`alpha / r`).
    pub alpha: f64,
    /// Projections adapted.
    pub targets: Vec<String>,
    /// EWC strength (0 = off).
    #[serde(default)]
    pub ewc_lambda: f64,
    /// Batches of base data for the Fisher estimate.
    #[serde(default = "default_fisher_batches")]
    pub fisher_batches: usize,
    /// Training examples used (the first N of the training split; all when absent).
    pub examples: Option<usize>,
    /// New data to teach (the recipe's own training data when absent).
    pub data: Option<FinetuneData>,
    /// Examples of the original training split mixed into new fine-tuning data (replay: the
    /// plainest guard against forgetting).
    #[serde(default)]
    pub replay: usize,
    /// Also fine-tune without EWC, to measure what EWC keeps of the original task.
    #[serde(default)]
    pub ewc_baseline: bool,
    /// Optimizer and loop settings.
    pub train: TrainSettings,
}

/// Data a fine-tune teaches: a built-in task or a folder of JSONL splits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneData {
    /// A built-in task (`home`: commands naming devices and places the base task never has).
    pub task: Option<BuiltinTask>,
    /// Folder with `train.jsonl`, `validation.jsonl`, `test.jsonl` instead.
    pub dir: Option<PathBuf>,
    /// Seed of the built-in task.
    #[serde(default)]
    pub seed: u64,
    /// Training examples of the built-in task (validation and test get a fifth each).
    #[serde(default = "default_home_train")]
    pub train: usize,
}

fn default_home_train() -> usize {
    2000
}

/// Built-in fine-tuning tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinTask {
    /// "The user's own home": new devices and places (`task::generate_home`).
    Home,
}

impl FinetuneRecipe {
    /// Why this fine-tune cannot run as written, if it cannot.
    fn check(&self) -> std::result::Result<(), String> {
        if self.r == 0 || !positive(self.alpha) || self.targets.is_empty() {
            return Err("finetune needs r of 1 or more, alpha above zero and at least one target".into());
        }
        if !non_negative(self.ewc_lambda) {
            return Err(format!("finetune.ewc_lambda must be 0 or more, not {}", self.ewc_lambda));
        }
        match &self.data {
            Some(d) if d.task.is_some() == d.dir.is_some() => {
                Err("[finetune.data] needs exactly one of task and dir".into())
            }
            Some(_) if self.examples.is_some() => Err(
                "finetune.examples takes part of the recipe's own data; with [finetune.data] the new data is used whole".into(),
            ),
            None if self.replay > 0 => {
                Err("finetune.replay mixes original examples into new data: it needs [finetune.data]".into())
            }
            _ => Ok(()),
        }
    }
}

fn default_fisher_batches() -> usize {
    8
}

/// Which part of the teacher the student keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// Teacher layer indices kept, in order.
    pub layers: Vec<usize>,
    /// Narrower MLP (the first rows/columns by importance are kept); the teacher's when absent.
    pub intermediate_size: Option<usize>,
    /// Narrower residual width; the teacher's when absent.
    pub hidden_size: Option<usize>,
    /// Distillation temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the soft-target term (1 - alpha goes to the hard labels).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Cache the teacher's top-k logits on disk and train from the cache (on the fly when
    /// absent).
    pub teacher_top_k: Option<usize>,
    /// Optimizer and loop settings.
    pub train: TrainSettings,
}

fn default_temperature() -> f64 {
    2.0
}

fn default_alpha() -> f64 {
    0.5
}

impl StudentSpec {
    /// Reads student settings from a TOML file (a recipe's `[student]` table on its own).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        toml::from_str(&text).map_err(|e| Error::Recipe { path: path.to_path_buf(), what: e.to_string() })
    }
}

/// Optimizer and loop settings of one training stage: the recipe's `[*.train]` tables, the
/// training commands' flags and the pipeline all start from [`TrainSettings::default`], so a
/// setting left out means the same everywhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay [default: a tenth of `lr`].
    pub min_lr: Option<f64>,
    /// Warm-up optimizer steps.
    pub warmup: usize,
    /// Passes over the training data (upper bound).
    pub epochs: usize,
    /// Cap on optimizer steps.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient clipping norm (0 = off).
    pub clip_norm: f64,
    /// Validate every this many steps.
    pub eval_every: usize,
    /// Validations without improvement before stopping (0 = off).
    pub patience: usize,
    /// Checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Validation examples used per validation (`None`, which only the API can ask for: all).
    pub eval_examples: Option<usize>,
    /// Seed of the data order.
    pub seed: u64,
}

impl Default for TrainSettings {
    /// Learning rate 1e-3 decaying to 1e-4 after 50 warm-up steps, one epoch of 32-example
    /// batches, clipping at norm 1, validation on 256 examples every 100 steps with a patience
    /// of 3, a checkpoint every 100 steps, seed 0.
    fn default() -> Self {
        TrainSettings {
            lr: 1e-3,
            min_lr: None,
            warmup: 50,
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            accumulation: 1,
            weight_decay: 0.0,
            clip_norm: 1.0,
            eval_every: 100,
            patience: 3,
            checkpoint_every: 100,
            eval_examples: Some(256),
            seed: 0,
        }
    }
}

impl TrainSettings {
    /// With peak learning rate `lr`, decaying to a tenth of it.
    pub fn with_lr(self, lr: f64) -> Self {
        TrainSettings { lr, min_lr: None, ..self }
    }

    /// The learning rate the cosine decay ends at: `min_lr`, else a tenth of `lr`.
    pub fn floor(&self) -> f64 {
        self.min_lr.unwrap_or(self.lr / 10.0)
    }

    /// Why these settings cannot train, if they cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.batch_size == 0 || self.epochs == 0 || self.accumulation == 0 {
            return Err("batch_size, epochs and accumulation must be at least 1".into());
        }
        if !positive(self.lr) {
            return Err(format!("lr must be above zero, not {}", self.lr));
        }
        let floor = self.floor();
        if !non_negative(floor) || floor > self.lr {
            return Err(format!("min_lr ({floor}) must be between 0 and lr ({})", self.lr));
        }
        if !non_negative(self.weight_decay) || !non_negative(self.clip_norm) {
            return Err("weight_decay and clip_norm must be 0 or more".into());
        }
        if self.eval_examples == Some(0) {
            return Err("eval_examples must be at least 1 (validation decides early stopping and the kept step)".into());
        }
        Ok(())
    }
}

impl TrainSettings {
    /// Loop options for `examples` training examples.
    pub fn fit_options(&self, label: &str) -> FitOptions {
        FitOptions {
            batch_size: self.batch_size,
            accumulation: self.accumulation,
            epochs: self.epochs,
            max_steps: self.max_steps,
            eval_every: self.eval_every,
            patience: self.patience,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            halt_after: None,
            progress: true,
            label: label.into(),
            ..FitOptions::default()
        }
    }

    /// Optimizer settings for a run of `total` optimizer steps.
    pub fn train_config(&self, total: usize) -> TrainConfig {
        TrainConfig {
            schedule: CosineSchedule { peak: self.lr, floor: self.floor(), warmup: self.warmup, total },
            weight_decay: self.weight_decay,
            accumulation: self.accumulation,
            clip_norm: self.clip_norm,
        }
    }
}

/// Structured pruning of the distilled student: which share of MLP units and attention heads
/// to remove, the calibration it is measured on, the recovery distillation from the unpruned
/// student and the accuracy it may lose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneStage {
    /// Share of each layer's MLP units to remove.
    #[serde(default)]
    pub mlp: f64,
    /// Share of each layer's attention heads to remove (whole KV groups).
    #[serde(default)]
    pub heads: f64,
    /// Share of the query heads of each KV group to remove (keys and values stay).
    #[serde(default)]
    pub query_heads: f64,
    /// Training examples the importance is measured on.
    #[serde(default = "default_calibration")]
    pub calibration: usize,
    /// Distillation temperature of the recovery.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the soft-target term of the recovery.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Weight of matching the unpruned model's residual stream after every layer during the
    /// recovery (0: logits only).
    #[serde(default)]
    pub hidden_weight: f64,
    /// Largest drop in task completion against the unpruned student, in percentage points.
    pub max_drop: f64,
    /// Largest mean KL divergence (nats) from the unpruned student's next-token distributions
    /// over the first test commands (not limited when absent).
    pub max_kl: Option<f64>,
    /// Recovery optimizer and loop settings.
    pub train: TrainSettings,
}

/// Finite and above zero (NaN is neither).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Finite and zero or more.
fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn default_calibration() -> usize {
    256
}

impl PruneStage {
    /// Why this stage cannot run as the pipeline's pruning stage, if it cannot: it must remove
    /// something and rank on some examples. (`prune-structured` may take the shares and the
    /// calibration count from flags instead, so loading a recipe does not ask this.)
    pub fn runnable(&self) -> std::result::Result<(), String> {
        if self.mlp == 0.0 && self.heads == 0.0 && self.query_heads == 0.0 {
            return Err("[prune] removes nothing: set mlp, heads or query_heads above 0".into());
        }
        if self.calibration == 0 {
            return Err("[prune] calibration needs at least one example to rank units on".into());
        }
        Ok(())
    }

    /// The pruning shares.
    pub fn options(&self) -> crate::prune::structured::StructuredOptions {
        crate::prune::structured::StructuredOptions { mlp: self.mlp, heads: self.heads, query_heads: self.query_heads }
    }
}

/// One quantized bundle of the pipeline and the accuracy it may lose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeStage {
    /// Bits per weight: 8 or 4.
    pub bits: u8,
    /// `blockwise` (MatMulNBits, 8 or 4 bits) or `dynamic-int8` (DynamicQuantizeMatMul, 8 bits:
    /// the faster prompt on x86).
    #[serde(default)]
    pub method: crate::quantize::graph::Method,
    /// Weights per block [default: 64 at 8 bits, 32 at 4].
    pub block_size: Option<usize>,
    /// Scales only (default) or scales and zero points.
    #[serde(default = "default_true")]
    pub symmetric: bool,
    /// `MatMulNBits` accuracy level (4: int8 activations).
    #[serde(default = "default_accuracy_level")]
    pub accuracy_level: u8,
    /// Largest drop in task completion against the fp32 bundle, in percentage points.
    pub max_drop: f64,
    /// Largest mean KL divergence (nats) of next-token distributions from the fp32 bundle's,
    /// over the first test commands read teacher-forced.
    pub max_kl: f64,
}

fn default_true() -> bool {
    true
}

fn default_accuracy_level() -> u8 {
    4
}

impl QuantizeStage {
    /// The quantizer's settings.
    pub fn options(&self) -> Result<crate::quantize::QuantizeOptions> {
        let mut o = crate::quantize::QuantizeOptions::for_bits(self.bits)?;
        o.scheme = crate::quantize::BlockScheme::new(
            self.bits,
            self.block_size.unwrap_or(o.scheme.block_size),
            self.symmetric,
        )?;
        o.accuracy_level = self.accuracy_level;
        o.method = self.method;
        if self.method == crate::quantize::graph::Method::StaticInt8 {
            return Err(crate::Error::InvalidConfig {
                what: "static-int8 is for encoder bundles (`edgelm-distill quantize --precision int8-static`); a causal LM's stages use blockwise or dynamic-int8".into(),
            });
        }
        if self.method == crate::quantize::graph::Method::DynamicInt8 && self.bits != 8 {
            return Err(crate::Error::InvalidConfig {
                what: format!("dynamic-int8 quantizes to 8 bits, not {}", self.bits),
            });
        }
        Ok(o)
    }

    /// Stage name: `int8`, `int4`, `int8-dynamic`.
    pub fn name(&self) -> String {
        match self.method {
            crate::quantize::graph::Method::DynamicInt8 => "int8-dynamic".into(),
            crate::quantize::graph::Method::StaticInt8 => "int8-static".into(),
            crate::quantize::graph::Method::Fp16 => "fp16".into(),
            _ => format!("int{}", self.bits),
        }
    }
}

/// Main-command settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// The committed teacher checkpoint; `pipeline` trains one with `pretrain` when absent.
    pub teacher: Option<PathBuf>,
    /// Held-out commands shown streaming at the end.
    #[serde(default = "default_show")]
    pub show: usize,
    /// Test examples scored per stage (all when absent).
    pub eval_examples: Option<usize>,
}

fn default_show() -> usize {
    4
}

/// The three splits.
pub struct Splits {
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples.
    pub validation: Vec<Example>,
    /// Held-out test examples.
    pub test: Vec<Example>,
}

impl Splits {
    /// Reads `train.jsonl`, `validation.jsonl` and `test.jsonl` from a folder.
    pub fn read_dir(dir: &Path) -> Result<Self> {
        Ok(Splits {
            train: read_jsonl(&dir.join("train.jsonl"))?,
            validation: read_jsonl(&dir.join("validation.jsonl"))?,
            test: read_jsonl(&dir.join("test.jsonl"))?,
        })
    }
}

impl Recipe {
    /// Reads and checks a recipe file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let mut r: Recipe =
            toml::from_str(&text).map_err(|e| Error::Recipe { path: path.to_path_buf(), what: e.to_string() })?;
        r.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        r.check().map_err(|what| Error::Recipe { path: path.to_path_buf(), what })?;
        Ok(r)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let t = &self.teacher;
        if !t.hidden_size.is_multiple_of(t.num_attention_heads)
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return Err("teacher heads must divide hidden_size and be a multiple of the key/value heads".into());
        }
        if self.student.layers.is_empty() {
            return Err("student.layers is empty".into());
        }
        if let Some(&l) = self.student.layers.iter().find(|&&l| l >= t.num_hidden_layers) {
            return Err(format!("student layer {l} does not exist in a {}-layer teacher", t.num_hidden_layers));
        }
        let prune_train = self.prune.iter().map(|p| ("prune", &p.train));
        let finetune_train = self.finetune.iter().map(|f| ("finetune", &f.train));
        let tables = [("teacher", &t.train), ("student", &self.student.train)].into_iter();
        for (name, s) in tables.chain(finetune_train).chain(prune_train) {
            s.check().map_err(|e| format!("{name}.train: {e}"))?;
        }
        if let Some(f) = &self.finetune {
            f.check()?;
        }
        for (i, q) in self.quantize.iter().enumerate() {
            let at = format!("[[quantize]] number {}", i + 1);
            q.options().map_err(|e| format!("{at}: {e}"))?;
            if !non_negative(q.max_drop) || !non_negative(q.max_kl) {
                return Err(format!("{at}: max_drop and max_kl must be 0 or more"));
            }
        }
        if self.pipeline.eval_examples == Some(0) {
            return Err("pipeline.eval_examples must be at least 1: the gates compare scores on them".into());
        }
        let prune_soft = self.prune.iter().map(|p| ("prune", p.alpha, p.temperature));
        let student_soft = ("student", self.student.alpha, self.student.temperature);
        for (name, alpha, temperature) in std::iter::once(student_soft).chain(prune_soft) {
            if !(0.0..=1.0).contains(&alpha) || !positive(temperature) {
                return Err(format!("{name}.alpha must be in [0, 1] and temperature above zero"));
            }
        }
        if let Some(p) = &self.prune {
            for (key, share) in [("mlp", p.mlp), ("heads", p.heads), ("query_heads", p.query_heads)] {
                if !(0.0..1.0).contains(&share) {
                    return Err(format!("prune.{key} is a share to remove, in [0, 1), not {share}"));
                }
            }
            if !non_negative(p.hidden_weight) {
                return Err(format!("prune.hidden_weight must be 0 or more, not {}", p.hidden_weight));
            }
            if !non_negative(p.max_drop) || p.max_kl.is_some_and(|k| !non_negative(k)) {
                return Err("prune.max_drop and max_kl must be 0 or more".into());
            }
        }
        Ok(())
    }

    /// A path from the recipe, made relative to the recipe's folder.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The recipe's examples.
    pub fn splits(&self) -> Result<Splits> {
        match &self.data.dir {
            Some(dir) => Splits::read_dir(&self.path(dir)),
            None => {
                let s = task::generate(self.data.seed, self.data.train);
                Ok(Splits { train: s.train, validation: s.validation, test: s.test })
            }
        }
    }

    /// The fine-tuning data's splits, when `[finetune.data]` names new data.
    pub fn finetune_splits(&self) -> Result<Option<Splits>> {
        let Some(d) = self.finetune.as_ref().and_then(|f| f.data.as_ref()) else {
            return Ok(None);
        };
        match (d.task, &d.dir) {
            (Some(BuiltinTask::Home), None) => {
                let s = task::generate_home(d.seed, d.train);
                Ok(Some(Splits { train: s.train, validation: s.validation, test: s.test }))
            }
            (None, Some(dir)) => Splits::read_dir(&self.path(dir)).map(Some),
            _ => Err(Error::InvalidConfig {
                what: format!("{}: [finetune.data] needs exactly one of task and dir", self.name),
            }),
        }
    }

    /// The teacher's configuration for a tokenizer of `vocab_size` entries (ChatML ids 0-2).
    pub fn teacher_config(&self, vocab_size: usize) -> ModelConfig {
        let t = &self.teacher;
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            num_key_value_heads: t.num_key_value_heads,
            head_dim: t.hidden_size / t.num_attention_heads,
            max_position_embeddings: t.max_position_embeddings,
            rms_norm_eps: 1e-5,
            rope: RopeConfig { theta: t.rope_theta, scaling: RopeScaling::Default },
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            full_attention_layers: vec![],
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_train_table_fills_what_it_leaves_out_from_the_one_default() {
        let t: TrainSettings = toml::from_str("lr = 0.5\nbatch_size = 8").unwrap();
        let d = TrainSettings::default();
        assert_eq!((t.lr, t.batch_size), (0.5, 8));
        assert_eq!((t.clip_norm, t.patience, t.checkpoint_every), (d.clip_norm, d.patience, d.checkpoint_every));
        assert_eq!((d.clip_norm, d.patience), (1.0, 3), "the documented defaults");
        assert_eq!(TrainSettings::default().with_lr(2e-3).floor(), 2e-4);
        assert_eq!(TrainSettings::default().floor(), 1e-4, "lr 1e-3 decaying to a tenth");
        let t: TrainSettings = toml::from_str("lr = 5e-5").unwrap();
        assert_eq!(t.floor(), 5e-6, "min_lr follows lr when left out");
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("recipe.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_shipped_recipes_load_and_bad_ones_say_what_is_wrong() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        for name in ["devcmd", "tiny"] {
            let r = Recipe::load(&root.join(name).join("recipe.toml")).unwrap();
            assert_eq!(r.name, name);
        }
        let good = std::fs::read_to_string(root.join("tiny/recipe.toml")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            (good.replace("[data]", "[data]\nshuffle = true"), "unknown field `shuffle`"),
            (good.replace("layers = [1]", "layers = [9]"), "student layer 9 does not exist"),
            (good.replace("alpha = 0.5", "alpha = 1.5"), "alpha must be in [0, 1]"),
            (good.replace("num_key_value_heads = 2", "num_key_value_heads = 3"), "multiple of the key/value heads"),
            (good.replace("name = \"tiny\"", ""), "missing field `name`"),
            (good.replace("mlp = 0.25", "mlp = 0.25\nhidden_weight = -1.0"), "prune.hidden_weight must be 0 or more"),
            (good.replace("mlp = 0.25", "mlp = 1.0"), "prune.mlp is a share to remove"),
            (good.replace("max_drop = 50.0\n\n[prune.train]", "max_drop = nan\n\n[prune.train]"), "prune.max_drop"),
            (good.replace("calibration = 16", "calibration = 16\nalpha = 2.0"), "prune.alpha must be"),
            // Each of these would otherwise show only after minutes of training, or never.
            (good.replace("bits = 4\n", "bits = 3\n"), "[[quantize]] number 2"),
            (good.replace("bits = 4\n", "bits = 4\nblock_size = 48\n"), "[[quantize]] number 2"),
            (good.replace("max_kl = 2.0", "max_kl = -1.0"), "max_drop and max_kl must be 0 or more"),
            (
                good.replace(
                    "lr = 2e-3\nmin_lr = 2e-4\nwarmup = 2\nepochs = 1\nbatch_size = 16",
                    "lr = 2e-3\nmin_lr = 2e-4\nwarmup = 2\nepochs = 1\nbatch_size = 0",
                ),
                "finetune.train: batch_size",
            ),
            (
                good.replace("lr = 3e-3\nmin_lr = 3e-4\nwarmup = 3", "lr = 3e-3\nmin_lr = 3e-2\nwarmup = 3"),
                "student.train: min_lr",
            ),
            (good.replace("task = \"home\"", "task = \"home\"\ndir = \"data\""), "exactly one of task and dir"),
            (good.replace("replay = 32", "replay = 32\nexamples = 10"), "finetune.examples"),
            (good.replace("ewc_lambda = 10.0", "ewc_lambda = -1.0"), "finetune.ewc_lambda"),
            (good.replace("show = 2\neval_examples = 16", "show = 2\neval_examples = 0"), "pipeline.eval_examples"),
        ];
        // Shares and calibration may come from prune-structured's flags: a recipe without them
        // loads, and only the pipeline refuses to run it.
        let flags_only = good.replace("mlp = 0.25", "mlp = 0.0").replace("heads = 0.5", "heads = 0.0");
        let r = Recipe::load(&write(tmp.path(), &flags_only)).unwrap();
        assert!(r.prune.as_ref().unwrap().runnable().unwrap_err().contains("removes nothing"));
        let r = Recipe::load(&write(tmp.path(), &good.replace("calibration = 16", "calibration = 0"))).unwrap();
        assert!(r.prune.as_ref().unwrap().runnable().unwrap_err().contains("calibration"));
        assert!(Recipe::load(&root.join("tiny/recipe.toml")).unwrap().prune.unwrap().runnable().is_ok());
        for (text, want) in cases {
            let err = Recipe::load(&write(tmp.path(), &text)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(err.contains("recipe.toml"), "names the file: {err}");
        }
    }
}
