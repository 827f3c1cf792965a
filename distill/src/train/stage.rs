//! What every training stage (pre-training, fine-tuning, distillation) shares around the loop
//! of `fit`: where it writes, how it is run and resumed, the language-model loss, and the log it
//! leaves next to its checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::batch::{Batch, Encoded};
use super::fit::{fit, FitData, FitReport, LossFn, Objective};
use super::Trainer;
use crate::checkpoint::ModelConfig;
use crate::error::{Error, IoContext, Result};
use crate::model::LlamaModel;
use crate::recipe::TrainSettings;

/// Where a stage writes and whether it continues an earlier run.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Checkpoint folder to write.
    pub output: PathBuf,
    /// Folder of resumable state (defaults to `<output>.run`).
    pub run_dir: Option<PathBuf>,
    /// Continue the run saved in the run folder.
    pub resume: bool,
    /// Leave after this optimizer step with a resumable state.
    pub halt_after: Option<usize>,
    /// Draw progress bars.
    pub progress: bool,
}

impl StageOptions {
    /// Writes into `output` with a progress bar.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        StageOptions { output: output.into(), run_dir: None, resume: false, halt_after: None, progress: true }
    }

    /// The run folder.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| self.output.with_extension("run"))
    }
}

/// What a training stage did, kept next to the checkpoint as `train_log.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainLog {
    /// Stage name.
    pub stage: String,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Lowest validation loss.
    pub best_val_loss: Option<f64>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Tokens read in training forward passes.
    pub tokens: u64,
    /// Seconds in training steps.
    pub seconds: f64,
    /// Training throughput.
    pub tokens_per_s: f64,
    /// Model FLOPs per second achieved: 6 x parameters x tokens/s (forward + backward).
    pub gflops: f64,
    /// Loss curve.
    pub history: Vec<super::fit::LogPoint>,
}

impl TrainLog {
    /// Summarises a finished run; `flop_params` are the parameters every token passes through.
    pub fn new(stage: &str, trainable: usize, flop_params: usize, r: &FitReport) -> Self {
        TrainLog {
            stage: stage.into(),
            trainable_parameters: trainable,
            steps: r.steps,
            best_val_loss: r.best_val,
            stopped_early: r.stopped_early,
            tokens: r.tokens,
            seconds: r.seconds,
            tokens_per_s: r.tokens_per_s(),
            gflops: 6.0 * flop_params as f64 * r.tokens_per_s() / 1e9,
            history: r.history.clone(),
        }
    }

    /// Writes `train_log.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join("train_log.json");
        std::fs::write(&p, serde_json::to_string_pretty(self).expect("json")).at(&p)
    }
}

/// Mean next-token cross-entropy of a batch's scored positions.
pub fn lm_loss(config: &ModelConfig, params: &HashMap<String, Tensor>, batch: &Batch) -> Result<Tensor> {
    let model = LlamaModel::from_tensors(config, params)?;
    let logits = model.logits_at(&batch.input_ids, &batch.rows)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &batch.labels)?)
}

/// Parameters every token passes through (the embedding lookup is not a matmul; a tied head is).
pub fn flop_parameters(config: &ModelConfig) -> usize {
    config.num_parameters() - if config.tie_word_embeddings { 0 } else { config.vocab_size * config.hidden_size }
}

/// The first `n` examples of a set (all when `n` is None).
pub fn take(examples: &[Encoded], n: Option<usize>) -> &[Encoded] {
    &examples[..n.unwrap_or(examples.len()).min(examples.len())]
}

/// Loads the best parameters a run saved.
pub fn load_best(r: &FitReport) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(&r.best_path, &candle_core::Device::Cpu)
        .map_err(|e| Error::RunState { path: r.best_path.clone(), what: e.to_string() })
}

/// One training run of a stage: its name, settings, data and where it writes.
#[derive(Debug, Clone, Copy)]
pub struct Stage<'a> {
    /// Name in logs and progress bars.
    pub label: &'a str,
    /// Optimizer and loop settings.
    pub settings: &'a TrainSettings,
    /// Training and validation examples and the padding id.
    pub data: FitData<'a>,
    /// Output, run folder, resumption, halting, progress.
    pub opts: &'a StageOptions,
}

/// Trains a stage and returns the run's report (weights stay in the run folder); a run halted
/// on request ends with [`Error::Halted`], which says how to continue it.
pub fn train_stage(
    stage: Stage<'_>,
    trainer: &mut Trainer,
    objective: Objective<'_>,
    val_fn: &LossFn,
) -> Result<FitReport> {
    let Stage { label, settings, data, opts } = stage;
    settings.check().map_err(|what| Error::Training { what: format!("{label}: {what}") })?;
    let mut fo = settings.fit_options(label);
    fo.halt_after = opts.halt_after;
    fo.progress = opts.progress;
    fo.run_dir = opts.run_dir();
    fo.resume = opts.resume;
    let data = FitData { validation: take(data.validation, settings.eval_examples), ..data };
    let report = fit(trainer, data, objective, val_fn, &fo)?;
    if report.halted {
        return Err(Error::Halted { step: report.steps, run_dir: fo.run_dir });
    }
    Ok(report)
}
