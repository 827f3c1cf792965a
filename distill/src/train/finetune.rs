//! `finetune`: LoRA adapters trained on instruction data with the base frozen, optionally with
//! an EWC penalty that keeps the adapted weights close where the base data needs them, and
//! `merge`, which folds an adapter into its base for export.
//!
//! EWC with LoRA: the adapted weight is `W + dW` with `dW = (alpha / r) B A`; the penalty is
//! `lambda / 2 * sum(F * dW^2)` with `F` the diagonal Fisher information of `W`, estimated as the
//! mean squared gradient of the base model's loss on the base data.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use super::batch::{Batch, Encoded, Formatter};
use super::ewc::FisherWeightedSquare;
use super::fit::{FitData, Objective};
use super::qlora::QuantizedBase;
use super::stage::{flop_parameters, lm_loss, load_best, train_stage, Stage, StageOptions, TrainLog};
use super::Trainer;
use crate::checkpoint::write::{copy_tokenizer_files, derive_generation_config, write_checkpoint, WriteOptions};
use crate::checkpoint::Checkpoint;
use crate::data::Example;
use crate::error::Result;
use crate::lora::{Adapter, LoraConfig};
use crate::model::LlamaModel;
use crate::recipe::TrainSettings;

/// Fine-tuning settings besides the loop.
#[derive(Debug, Clone)]
pub struct FinetuneSpec {
    /// Adapter rank, scale and targets.
    pub lora: LoraConfig,
    /// Seed of the adapter's A matrices.
    pub seed: u64,
    /// EWC strength (0 = off).
    pub ewc_lambda: f64,
    /// Batches of base data for the Fisher estimate.
    pub fisher_batches: usize,
    /// Optimizer and loop settings.
    pub train: TrainSettings,
}

/// Diagonal Fisher estimate of the adapted modules' base weights, per scored token, over the
/// first `batches * batch_size` examples of `data`: each example's gradient of its summed token
/// loss, squared, summed over the examples and divided by their scored tokens. That is the
/// curvature of the mean token loss the fine-tune trains with, so `lambda = 1` weighs a rise of
/// the base task's loss as much as the new task's. Per example, not per batch: at the base's
/// optimum a batch's mean gradient nearly cancels, and its square is no curvature at all.
pub fn fisher_diagonal(
    base: &Checkpoint,
    modules: &[String],
    data: &[Encoded],
    pad: u32,
    batches: usize,
    batch_size: usize,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = base.tensors.clone();
    let mut vars = Vec::new();
    for m in modules {
        let name = format!("{m}.weight");
        let v = Var::from_tensor(&tensors[&name])?;
        tensors.insert(name.clone(), v.as_tensor().clone());
        vars.push((m.clone(), v));
    }
    let chunks: Vec<&[Encoded]> = data.chunks(batch_size.max(1)).take(batches.max(1)).collect();
    // Squared per-example gradients summed over some of the batches, with their scored tokens;
    // the training workers share the batches.
    let partial = |chunks: &[&[Encoded]]| -> Result<(HashMap<String, Tensor>, usize)> {
        let (mut sums, mut targets) = (HashMap::new(), 0);
        for example in chunks.iter().flat_map(|c| c.iter()) {
            let batch = Batch::new(&[example], pad)?;
            let n = batch.targets();
            if n == 0 {
                continue;
            }
            // lm_loss is the mean over the example's tokens; the sum is n times it.
            let grads = (lm_loss(&base.config, &tensors, &batch)? * n as f64)?.backward()?;
            for (m, v) in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    add_into(&mut sums, m.clone(), g.sqr()?)?;
                }
            }
            targets += n;
        }
        Ok((sums, targets))
    };
    let parts = super::workers::split(&chunks, super::workers::training_workers());
    let partials = super::workers::map_parts(&parts, "Fisher estimate", |p| partial(p));
    let (mut sums, mut targets) = (HashMap::new(), 0);
    for p in partials {
        let (part, n) = p?;
        targets += n;
        for (m, s) in part {
            add_into(&mut sums, m, s)?;
        }
    }
    sums.into_iter().map(|(m, s)| Ok((m, (s / targets.max(1) as f64)?))).collect()
}

/// Adds `t` to the sum held under `key` (the first one starts it).
fn add_into(sums: &mut HashMap<String, Tensor>, key: String, t: Tensor) -> Result<()> {
    let total = match sums.remove(&key) {
        Some(s) => (s + t)?,
        None => t,
    };
    sums.insert(key, total);
    Ok(())
}

/// The result of fine-tuning.
pub struct Finetuned {
    /// Training summary.
    pub log: TrainLog,
    /// The trained adapter (also written in PEFT's layout to the output folder).
    pub adapter: Adapter,
}

/// Trains a LoRA adapter for `base` and writes it (PEFT layout) to `opts.output`.
pub fn finetune(
    base: &Checkpoint,
    data: (&[Example], &[Example]),
    ewc_data: &[Example],
    spec: &FinetuneSpec,
    opts: &StageOptions,
) -> Result<Finetuned> {
    let fmt = Formatter::for_checkpoint(base)?;
    let fresh = Adapter::init(&base.config, spec.lora.clone(), spec.seed)?;
    let fisher = if spec.ewc_lambda > 0.0 {
        let mut modules: Vec<String> = fresh.modules.keys().cloned().collect();
        modules.sort();
        let ewc = fmt.encode_within(ewc_data, base.config.max_position_embeddings, "EWC data")?;
        fisher_diagonal(base, &modules, &ewc, fmt.pad(), spec.fisher_batches, spec.train.batch_size)?
    } else {
        HashMap::new()
    };
    let model = |a: Option<&Adapter>| LlamaModel::with_adapter(&base.config, &base.tensors, a);
    let frozen = Frozen { config: &base.config, dir: &base.dir, stored_fused: base.stored_fused, model: &model };
    train_adapter(frozen, &fmt, data, fresh, &fisher, spec, opts)
}

/// QLoRA: trains a LoRA adapter over a base held as packed 4-bit projections (see
/// `train::qlora`). `source` is the checkpoint the base came from, for its tokenizer and
/// folder; its weights may already have been moved into `base`. EWC is not available here
/// (its Fisher estimate needs the fp32 weights' gradients).
pub fn finetune_qlora(
    source: &Checkpoint,
    base: &QuantizedBase,
    data: (&[Example], &[Example]),
    spec: &FinetuneSpec,
    opts: &StageOptions,
) -> Result<Finetuned> {
    if spec.ewc_lambda > 0.0 {
        return Err(crate::Error::InvalidConfig { what: "EWC needs the fp32 base: turn it off for QLoRA".into() });
    }
    let fmt = Formatter::for_checkpoint(source)?;
    let model = |a: Option<&Adapter>| LlamaModel::qlora(base, a);
    let frozen = Frozen { config: &base.config, dir: &source.dir, stored_fused: source.stored_fused, model: &model };
    let fresh = Adapter::init(&base.config, spec.lora.clone(), spec.seed)?;
    train_adapter(frozen, &fmt, data, fresh, &HashMap::new(), spec, opts)
}

/// The frozen base an adapter is trained over.
struct Frozen<'a> {
    config: &'a crate::checkpoint::ModelConfig,
    dir: &'a Path,
    /// Its folder stores fused projections (Phi-3): the adapter is saved on them.
    stored_fused: bool,
    /// The base with an adapter on top.
    model: &'a (dyn Fn(Option<&Adapter>) -> Result<LlamaModel> + Sync),
}

/// Trains `fresh` over the frozen base (with the EWC penalty when `fisher` is not empty).
fn train_adapter(
    base: Frozen<'_>,
    fmt: &Formatter,
    data: (&[Example], &[Example]),
    fresh: Adapter,
    fisher: &HashMap<String, Tensor>,
    spec: &FinetuneSpec,
    opts: &StageOptions,
) -> Result<Finetuned> {
    let train = fmt.encode_within(data.0, base.config.max_position_embeddings, "training set")?;
    let validation = fmt.encode_within(data.1, base.config.max_position_embeddings, "validation set")?;
    let total = spec.train.fit_options("finetune").total_steps(train.len());
    let mut trainer = Trainer::new(fresh.to_tensors(), spec.train.train_config(total))?;
    let lora = spec.lora.clone();
    let lambda = spec.ewc_lambda;
    // In module order: the loss sums the same way in every run.
    let mut penalties: Vec<(&String, FisherWeightedSquare)> =
        fisher.iter().map(|(m, f)| Ok((m, FisherWeightedSquare::new(f)?))).collect::<Result<_>>()?;
    penalties.sort_by(|a, b| a.0.cmp(b.0));
    let adapted = |p: &HashMap<String, Tensor>| -> Result<(LlamaModel, Adapter)> {
        let a = Adapter::from_tensors(lora.clone(), p)?;
        Ok(((base.model)(Some(&a))?, a))
    };
    let loss = |p: &HashMap<String, Tensor>, b: &Batch| -> Result<Tensor> {
        let (model, _) = adapted(p)?;
        let logits = model.logits_at(&b.input_ids, &b.rows)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &b.labels)?)
    };
    // EWC: part `i` of `n` holds every n-th module, so the workers share the modules.
    let ewc = |p: &HashMap<String, Tensor>, i: usize, n: usize| -> Result<Option<Tensor>> {
        let adapter = Adapter::from_tensors(lora.clone(), p)?;
        let mut sum: Option<Tensor> = None;
        for (m, penalty) in penalties.iter().skip(i).step_by(n.max(1)) {
            let d = adapter.delta(m)?.expect("adapted module");
            let term = penalty.apply(&d)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum.map(|s| s * (lambda / 2.0)).transpose()?)
    };
    let val = |p: &HashMap<String, Tensor>, b: &Batch| -> Result<Tensor> {
        let (model, _) = adapted(p)?;
        let logits = model.logits_at(&b.input_ids, &b.rows)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &b.labels)?)
    };
    let data = FitData { train: &train, validation: &validation, pad: fmt.pad() };
    let stage = Stage { label: "finetune", settings: &spec.train, data, opts };
    let objective = Objective::new(&loss);
    let objective = if penalties.is_empty() { objective } else { objective.with_penalty(&ewc) };
    let report = train_stage(stage, &mut trainer, objective, &val)?;
    let adapter = Adapter::from_tensors(spec.lora.clone(), &load_best(&report)?)?;
    // On a Phi-3 base, written on its fused projections so PEFT loads it there.
    let fused = base.stored_fused.then_some(base.config);
    adapter.save_peft(&opts.output, &base.dir.display().to_string(), fused)?;
    // Forward and backward still run through the frozen base: count its parameters.
    let flop = flop_parameters(base.config);
    let log = TrainLog::new("finetune", trainer.num_parameters(), flop, &report);
    log.write(&opts.output)?;
    Ok(Finetuned { log, adapter })
}

/// Folds `adapter` into `base` and writes the merged checkpoint (with the base's tokenizer) to
/// `output`.
pub fn merge(base: &Checkpoint, adapter: &Adapter, output: &Path) -> Result<()> {
    let merged = adapter.merge(&base.tensors)?;
    write_checkpoint(output, &base.config, &merged, WriteOptions::default())?;
    derive_generation_config(&base.dir, output, &base.config)?;
    copy_tokenizer_files(&base.dir, output)
}
