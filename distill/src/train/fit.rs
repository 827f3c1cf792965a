//! The training loop shared by pre-training, fine-tuning and distillation: epochs over
//! length-bucketed batches, validation with early stopping, checkpoints every N steps and exact
//! resumption, a progress bar.
//!
//! Everything that decides what happens next (data order, step, best loss, patience) is in the
//! saved state, and the data order of an epoch is a function of the seed and the epoch alone,
//! so a resumed run takes the same steps, bit for bit, as one that was never interrupted.
//!
//! Layout of a run folder:
//! `state/` (latest checkpoint: `params.safetensors`, `optimizer.safetensors`, `state.json`),
//! `best.safetensors` (parameters with the lowest validation loss so far).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::batch::{Batch, Encoded};
use super::workers::{map_parts, split, training_workers};
use super::Trainer;
use crate::error::{Error, IoContext, Result};
use crate::rng::Rng;

/// How long and how to train.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (must equal the trainer's accumulation).
    pub accumulation: usize,
    /// Passes over the training set (upper bound; early stopping may end sooner).
    pub epochs: usize,
    /// Cap on optimizer steps.
    pub max_steps: Option<usize>,
    /// Validate every this many optimizer steps (and at the end).
    pub eval_every: usize,
    /// Stop after this many validations without improvement (0 = never stop early).
    pub patience: usize,
    /// Write a resumable checkpoint every this many optimizer steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Seed of the data order.
    pub seed: u64,
    /// Leave the run after this optimizer step with a resumable state, as if interrupted.
    pub halt_after: Option<usize>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Name shown in the progress bar and logs.
    pub label: String,
    /// Folder of the run's resumable state and best parameters.
    pub run_dir: PathBuf,
    /// Continue the run saved in `run_dir` exactly where it stopped.
    pub resume: bool,
}

/// The examples a run trains and validates on, and the id that pads a batch.
#[derive(Debug, Clone, Copy)]
pub struct FitData<'a> {
    /// Training examples.
    pub train: &'a [Encoded],
    /// Validation examples.
    pub validation: &'a [Encoded],
    /// Padding token id.
    pub pad: u32,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            batch_size: 32,
            accumulation: 1,
            epochs: 1,
            max_steps: None,
            eval_every: 100,
            patience: 0,
            checkpoint_every: 0,
            seed: 0,
            halt_after: None,
            progress: true,
            label: "train".into(),
            run_dir: PathBuf::from("train.run"),
            resume: false,
        }
    }
}

impl FitOptions {
    /// Optimizer steps the run will take at most for `examples` training examples.
    pub fn total_steps(&self, examples: usize) -> usize {
        let per_epoch = examples.div_ceil(self.batch_size.max(1)) / self.accumulation.max(1);
        let all = (per_epoch * self.epochs).max(1);
        self.max_steps.map_or(all, |m| m.min(all))
    }
}

/// One logged point of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogPoint {
    /// Optimizer steps taken.
    pub step: usize,
    /// Mean training loss since the previous point.
    pub train_loss: f64,
    /// Validation loss, when this point is a validation.
    pub val_loss: Option<f64>,
    /// Learning rate of the last step.
    pub lr: f64,
}

/// Progress that must survive an interruption.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RunState {
    step: usize,
    epoch: usize,
    /// Micro-batches of `epoch` already consumed.
    cursor: usize,
    best_val: Option<f64>,
    bad_evals: usize,
    history: Vec<LogPoint>,
    tokens: u64,
    seconds: f64,
    finished: bool,
    /// Sum and count of training losses since the last logged point.
    window: (f64, usize),
}

/// What a finished (or halted) run produced.
#[derive(Debug, Clone)]
pub struct FitReport {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Lowest validation loss.
    pub best_val: Option<f64>,
    /// Loss curve.
    pub history: Vec<LogPoint>,
    /// Tokens read by the model in training forward passes.
    pub tokens: u64,
    /// Seconds spent in training steps (validation excluded).
    pub seconds: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Whether the run stopped at `halt_after` and can be resumed.
    pub halted: bool,
    /// Where the best parameters are.
    pub best_path: PathBuf,
}

impl FitReport {
    /// Training throughput in tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// The micro-batches of one epoch: a seeded shuffle, sorted by length inside windows of 32
/// batches (less padding), then the batches themselves shuffled.
fn epoch_batches(lengths: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64 + 1));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    for window in order.chunks_mut(batch * 32) {
        window.sort_by_key(|&i| lengths[i]);
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
    rng.shuffle(&mut batches);
    batches
}

/// A loss over the current parameters and a batch: the mean loss of its scored positions.
/// Data-parallel workers call it at the same time on parts of a batch.
pub type LossFn<'a> = dyn Fn(&HashMap<String, Tensor>, &Batch) -> Result<Tensor> + Sync + 'a;

/// A term of the training loss on the parameters alone (a regulariser such as EWC's), in
/// parts: `penalty(params, i, n)` is part `i` of `n` (None when it holds nothing) and the parts
/// sum to the whole. Each data-parallel worker adds one part to its share of the batch, so the
/// term is computed once per micro-batch rather than once per share.
pub type PenaltyFn<'a> = dyn Fn(&HashMap<String, Tensor>, usize, usize) -> Result<Option<Tensor>> + Sync + 'a;

/// What a training step minimises: the batch's loss plus, optionally, a penalty.
#[derive(Clone, Copy)]
pub struct Objective<'a> {
    /// Mean loss of a batch's scored positions.
    pub loss: &'a LossFn<'a>,
    /// Added once per micro-batch, not weighted by the batch.
    pub penalty: Option<&'a PenaltyFn<'a>>,
}

impl<'a> Objective<'a> {
    /// The loss alone.
    pub fn new(loss: &'a LossFn<'a>) -> Self {
        Objective { loss, penalty: None }
    }

    /// The loss plus `penalty`.
    pub fn with_penalty(self, penalty: &'a PenaltyFn<'a>) -> Self {
        Objective { penalty: Some(penalty), ..self }
    }
}

/// Mean loss per scored token of `loss_fn` over `examples` (no parameter update), the batches
/// shared among the training workers.
pub fn evaluate(
    examples: &[Encoded],
    batch_size: usize,
    pad: u32,
    loss_fn: &(dyn Fn(&Batch) -> Result<Tensor> + Sync),
) -> Result<f64> {
    let chunks: Vec<&[Encoded]> = examples.chunks(batch_size.max(1)).collect();
    // (sum of losses, scored positions) over some of the batches.
    let run = |chunks: &[&[Encoded]]| -> Result<(f64, usize)> {
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in chunks {
            let refs: Vec<&Encoded> = chunk.iter().collect();
            let batch = Batch::new(&refs, pad)?;
            let n = batch.targets();
            sum += loss_fn(&batch)?.to_scalar::<f32>()? as f64 * n as f64;
            count += n;
        }
        Ok((sum, count))
    };
    let totals = map_parts(&split(&chunks, training_workers()), "validation", |p| run(p));
    let (mut sum, mut count) = (0f64, 0usize);
    for t in totals {
        let (s, c) = t?;
        sum += s;
        count += c;
    }
    Ok(sum / count.max(1) as f64)
}

/// Positions of an example whose next token is scored (what `Batch::new` marks).
fn scored_positions(e: &Encoded) -> usize {
    e.ids.len().saturating_sub(e.prompt_len.max(1))
}

/// The weight of micro-batch `cursor` in its optimizer step: `accumulation` times its part of
/// the step's scored positions. The trainer divides each micro-batch by `accumulation`, so the
/// step's gradient is that of the mean loss over all its tokens, as one batch of the same
/// examples would give, however the micro-batches' lengths differ.
fn step_share(batches: &[Vec<usize>], cursor: usize, accumulation: usize, train: &[Encoded]) -> f64 {
    let acc = accumulation.max(1);
    let first = cursor - cursor % acc;
    let scored = |b: &Vec<usize>| b.iter().map(|&i| scored_positions(&train[i])).sum::<usize>();
    let step: usize = batches[first..(first + acc).min(batches.len())].iter().map(scored).sum();
    if step == 0 {
        return 1.0;
    }
    acc as f64 * scored(&batches[cursor]) as f64 / step as f64
}

/// One micro-batch's loss and gradients, its examples shared among the training workers: each
/// share's mean loss is weighted by its part of the batch's scored positions, so the sum is
/// the whole batch's mean loss and the summed gradients are its gradients; each share also
/// adds one part of the objective's penalty. `share` scales the loss (not the penalty): the
/// micro-batch's weight in its optimizer step ([`step_share`]).
fn sharded_gradients(
    trainer: &Trainer,
    params: &HashMap<String, Tensor>,
    examples: &[usize],
    data: (&[Encoded], u32),
    objective: Objective<'_>,
    parts: usize,
    share: f64,
) -> Result<(f64, usize, Vec<GradStore>)> {
    let (train, pad) = data;
    let shares: Vec<Batch> = split(examples, parts)
        .into_iter()
        .map(|ids| {
            let refs: Vec<&Encoded> = ids.iter().map(|&i| &train[i]).collect();
            let mut b = Batch::new(&refs, pad)?;
            b.examples = ids.to_vec();
            Ok(b)
        })
        .collect::<Result<_>>()?;
    let scored: usize = shares.iter().map(Batch::targets).sum();
    let tokens: usize = shares.iter().map(|b| b.tokens).sum();
    let numbered: Vec<(usize, &Batch)> = shares.iter().enumerate().collect();
    let run = |&(i, b): &(usize, &Batch)| -> Result<(f64, GradStore)> {
        let weight = share * b.targets() as f64 / scored.max(1) as f64;
        let mut loss = ((objective.loss)(params, b)? * weight)?;
        if let Some(part) = objective.penalty.map(|p| p(params, i, shares.len())).transpose()?.flatten() {
            loss = (loss + part)?;
        }
        let value = loss.to_scalar::<f32>()? as f64;
        Ok((value, trainer.gradients(&loss)?))
    };
    let results = map_parts(&numbered, "training worker", run);
    let (mut value, mut grads) = (0f64, Vec::with_capacity(results.len()));
    for r in results {
        let (v, g) = r?;
        value += v;
        grads.push(g);
    }
    Ok((value, tokens, grads))
}

fn write_json(path: &Path, state: &RunState) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(state).expect("json")).at(path)
}

/// Trains until the epochs or steps run out, early stopping fires, or `halt_after` is reached.
/// The objective's loss gets the trainer's current parameters and a batch and returns the mean
/// loss of its scored positions; `val_fn` is used for validation. With `opts.resume`, a previous run's
/// `state/` in `opts.run_dir` is continued exactly.
pub fn fit(
    trainer: &mut Trainer,
    data: FitData<'_>,
    objective: Objective<'_>,
    val_fn: &LossFn,
    opts: &FitOptions,
) -> Result<FitReport> {
    let FitData { train, validation, pad } = data;
    let (run_dir, resume) = (opts.run_dir.as_path(), opts.resume);
    if train.is_empty() || validation.is_empty() {
        return Err(Error::Training { what: "give at least one training and one validation example".into() });
    }
    std::fs::create_dir_all(run_dir).at(run_dir)?;
    let state_dir = run_dir.join("state");
    let best_path = run_dir.join("best.safetensors");
    let mut st = RunState {
        step: 0,
        epoch: 0,
        cursor: 0,
        best_val: None,
        bad_evals: 0,
        history: vec![],
        tokens: 0,
        seconds: 0.0,
        finished: false,
        window: (0.0, 0),
    };
    if resume {
        let p = state_dir.join("state.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::RunState {
            path: run_dir.to_path_buf(),
            what: format!("no saved run to resume ({e}); start without --resume"),
        })?;
        st = serde_json::from_str(&text).map_err(|e| Error::RunState { path: p.clone(), what: e.to_string() })?;
        trainer.load(&state_dir)?;
        tracing::info!("{}: resumed at step {} (epoch {}, batch {})", opts.label, st.step, st.epoch, st.cursor);
    }
    let total = opts.total_steps(train.len());
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let bar = progress_bar(opts, total, st.step);
    let mut stopped_early = false;
    let mut halted = false;
    let mut tick = Instant::now();
    let mut tokens_at_tick = st.tokens;
    'outer: while !st.finished && st.step < total && st.epoch < opts.epochs {
        let batches = epoch_batches(&lengths, opts.batch_size, opts.seed, st.epoch);
        let usable = batches.len() / opts.accumulation.max(1) * opts.accumulation.max(1);
        if usable == 0 {
            return Err(Error::Training {
                what: format!(
                    "{}: {} examples make no full optimizer step at batch {} x accumulation {}",
                    opts.label,
                    train.len(),
                    opts.batch_size,
                    opts.accumulation
                ),
            });
        }
        while st.cursor < usable {
            let started = Instant::now();
            let params = trainer.tensors();
            let share = step_share(&batches, st.cursor, opts.accumulation, train);
            let micro = &batches[st.cursor];
            let (value, tokens, grads) =
                sharded_gradients(trainer, &params, micro, (train, pad), objective, training_workers(), share)?;
            if !value.is_finite() {
                return Err(Error::Training {
                    what: format!("{}: loss became {value} at step {}; lower the learning rate", opts.label, st.step),
                });
            }
            let report = trainer.accumulate(grads)?;
            st.cursor += 1;
            st.tokens += tokens as u64;
            st.seconds += started.elapsed().as_secs_f64();
            st.window.0 += value;
            st.window.1 += 1;
            let Some(report) = report else { continue };
            st.step = report.step + 1;
            let at_end = st.step >= total || (st.cursor >= usable && st.epoch + 1 >= opts.epochs);
            let mut point = LogPoint {
                step: st.step,
                train_loss: st.window.0 / st.window.1.max(1) as f64,
                val_loss: None,
                lr: report.lr,
            };
            if let Some(b) = &bar {
                let rate = (st.tokens - tokens_at_tick) as f64 / tick.elapsed().as_secs_f64().max(1e-9);
                b.set_position(st.step as u64);
                b.set_message(format!("loss {:.4}  {:.0} tok/s", point.train_loss, rate));
                if tick.elapsed().as_secs_f64() > 5.0 {
                    tick = Instant::now();
                    tokens_at_tick = st.tokens;
                }
            }
            let eval_now = at_end || (opts.eval_every > 0 && st.step.is_multiple_of(opts.eval_every));
            if eval_now {
                let params = trainer.tensors();
                let val = evaluate(validation, opts.batch_size, pad, &|b| val_fn(&params, b))?;
                if !val.is_finite() {
                    return Err(Error::Training {
                        what: format!(
                            "{}: validation loss became {val} at step {}; lower the learning rate",
                            opts.label, st.step
                        ),
                    });
                }
                point.val_loss = Some(val);
                if st.best_val.is_none_or(|b| val < b) {
                    st.best_val = Some(val);
                    st.bad_evals = 0;
                    candle_core::safetensors::save(&params, &best_path)
                        .map_err(|e| Error::Format { path: best_path.clone(), what: e.to_string() })?;
                } else {
                    st.bad_evals += 1;
                }
                tracing::info!(
                    "{} step {}/{}: train loss {:.4}, validation loss {:.4} (best {:.4}), lr {:.2e}, {:.0} tok/s",
                    opts.label,
                    st.step,
                    total,
                    point.train_loss,
                    val,
                    st.best_val.unwrap_or(val),
                    report.lr,
                    st.tokens as f64 / st.seconds.max(1e-9)
                );
                if bar.is_none() && opts.progress {
                    // No bar to draw (a log file, CI): one line per validation instead.
                    eprintln!(
                        "{} step {}/{}: train loss {:.4}, validation {:.4}, {:.0} s",
                        opts.label, st.step, total, point.train_loss, val, st.seconds
                    );
                }
                if opts.patience > 0 && st.bad_evals >= opts.patience {
                    stopped_early = true;
                }
            }
            if eval_now || st.window.1 >= 8 {
                st.history.push(point);
                st.window = (0.0, 0);
            }
            let epoch_done = st.cursor >= usable;
            if epoch_done {
                st.epoch += 1;
                st.cursor = 0;
            }
            st.finished = at_end || stopped_early;
            let checkpoint = st.finished
                || (opts.checkpoint_every > 0 && st.step.is_multiple_of(opts.checkpoint_every))
                || opts.halt_after == Some(st.step);
            if checkpoint {
                save_state(trainer, &st, &state_dir)?;
            }
            if st.finished {
                break 'outer;
            }
            if opts.halt_after == Some(st.step) {
                halted = true;
                break 'outer;
            }
            if epoch_done {
                continue 'outer;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(FitReport {
        steps: st.step,
        best_val: st.best_val,
        history: st.history,
        tokens: st.tokens,
        seconds: st.seconds,
        stopped_early,
        halted,
        best_path,
    })
}

/// Writes the resumable state: into a fresh folder first, then swapped in, so an interruption
/// while saving leaves the previous checkpoint intact.
fn save_state(trainer: &Trainer, st: &RunState, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    trainer.save(&tmp)?;
    write_json(&tmp.join("state.json"), st)?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).at(dir)?;
    }
    std::fs::rename(&tmp, dir).at(dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn progress_bar(opts: &FitOptions, total: usize, at: usize) -> Option<indicatif::ProgressBar> {
    if !opts.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(opts.label.clone());
    bar.set_position(at as u64);
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset::{preset_config, random_weights};
    use crate::train::stage::lm_loss;
    use crate::train::{CosineSchedule, TrainConfig};

    /// A batch split into shares of different lengths gives the loss and gradients of the
    /// whole batch, with and without a penalty whose parts the shares add.
    #[test]
    fn sharded_gradients_sum_to_the_whole_batch() {
        let config = preset_config("tiny").unwrap();
        let weights = random_weights(&config, 3).unwrap();
        let schedule = CosineSchedule { peak: 1e-3, floor: 1e-4, warmup: 0, total: 10 };
        let tc = TrainConfig { schedule, weight_decay: 0.0, accumulation: 1, clip_norm: 0.0 };
        let trainer = Trainer::new(weights, tc).unwrap();
        let vocab = config.vocab_size as u32;
        let data: Vec<Encoded> = (0..5)
            .map(|i| Encoded { ids: (0..(6 + 3 * i)).map(|j| (7 * i + 3 * j) as u32 % vocab).collect(), prompt_len: 3 })
            .collect();
        let ids: Vec<usize> = (0..5).collect();
        let loss = |p: &HashMap<String, Tensor>, b: &Batch| lm_loss(&config, p, b);
        // 0.01 * the sum of squares of every parameter, part i holding every n-th by name.
        let mut names: Vec<String> = trainer.tensors().into_keys().collect();
        names.sort();
        let penalty = |p: &HashMap<String, Tensor>, i: usize, n: usize| -> Result<Option<Tensor>> {
            let mut sum: Option<Tensor> = None;
            for name in names.iter().skip(i).step_by(n) {
                let t = (p[name].sqr()?.sum_all()? * 0.01)?;
                sum = Some(match sum {
                    Some(s) => (s + t)?,
                    None => t,
                });
            }
            Ok(sum)
        };
        let params = trainer.tensors();
        for objective in [Objective::new(&loss), Objective::new(&loss).with_penalty(&penalty)] {
            let (whole, _, g1) = sharded_gradients(&trainer, &params, &ids, (&data, 0), objective, 1, 1.0).unwrap();
            let (shared, _, g3) = sharded_gradients(&trainer, &params, &ids, (&data, 0), objective, 3, 1.0).unwrap();
            assert_eq!(g3.len(), 3);
            assert!((whole - shared).abs() < 1e-4, "loss {whole} vs {shared}");
            for (name, t) in &params {
                let a = g1[0].get(t).unwrap();
                let mut b = g3[0].get(t).unwrap().clone();
                for g in &g3[1..] {
                    b = (b + g.get(t).unwrap()).unwrap();
                }
                let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff <= 1e-4 * scale.max(1e-3), "{name}: gradients differ by {diff} (largest {scale})");
            }
        }
        // The penalty counts once: the loss with it exceeds the loss alone by the whole term.
        let term = penalty(&params, 0, 1).unwrap().unwrap().to_scalar::<f32>().unwrap() as f64;
        let alone = sharded_gradients(&trainer, &params, &ids, (&data, 0), Objective::new(&loss), 3, 1.0).unwrap().0;
        let with = sharded_gradients(
            &trainer,
            &params,
            &ids,
            (&data, 0),
            Objective::new(&loss).with_penalty(&penalty),
            3,
            1.0,
        )
        .unwrap()
        .0;
        assert!((with - alone - term).abs() < 1e-3 * term.max(1.0), "{with} - {alone} vs {term}");
    }

    /// Two micro-batches of different lengths accumulated into one step give the gradients of
    /// the mean loss over all their tokens: those of one batch of the same examples.
    #[test]
    fn accumulated_micro_batches_weigh_every_token_alike() {
        let config = preset_config("tiny").unwrap();
        let weights = random_weights(&config, 4).unwrap();
        let schedule = CosineSchedule { peak: 1e-3, floor: 1e-4, warmup: 0, total: 10 };
        let trainer = |accumulation| {
            let tc = TrainConfig { schedule, weight_decay: 0.0, accumulation, clip_norm: 0.0 };
            Trainer::new(weights.clone(), tc).unwrap()
        };
        let vocab = config.vocab_size as u32;
        // Two short examples, then three long ones: 4 + 4 against 13 + 16 + 19 scored positions.
        let data: Vec<Encoded> = [7, 7, 16, 19, 22]
            .iter()
            .enumerate()
            .map(|(i, &n)| Encoded { ids: (0..n).map(|j| (5 * i + 3 * j) as u32 % vocab).collect(), prompt_len: 3 })
            .collect();
        let loss = |p: &HashMap<String, Tensor>, b: &Batch| lm_loss(&config, p, b);
        let (one, two) = (trainer(1), trainer(2));
        let params = one.tensors();
        let all: Vec<usize> = (0..5).collect();
        let (_, _, whole) = sharded_gradients(&one, &params, &all, (&data, 0), Objective::new(&loss), 1, 1.0).unwrap();
        let micro = vec![vec![0, 1], vec![2, 3, 4]];
        let shares: Vec<f64> = (0..2).map(|c| step_share(&micro, c, 2, &data)).collect();
        assert!((shares[0] - 2.0 * 8.0 / 56.0).abs() < 1e-12 && (shares.iter().sum::<f64>() - 2.0).abs() < 1e-12);
        let parts: Vec<GradStore> = micro
            .iter()
            .zip(&shares)
            .flat_map(|(ids, &s)| {
                sharded_gradients(&two, &params, ids, (&data, 0), Objective::new(&loss), 1, s).unwrap().2
            })
            .collect();
        for (name, t) in &params {
            let a = whole[0].get(t).unwrap();
            let b = (parts[0].get(t).unwrap() + parts[1].get(t).unwrap()).unwrap();
            let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-4 * scale.max(1e-3), "{name}: gradients differ by {diff} (largest {scale})");
        }
    }
}
