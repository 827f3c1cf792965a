//! The training step machinery shared by pre-training, fine-tuning and distillation: AdamW over
//! named parameters, the learning-rate schedule, gradient accumulation and global-norm clipping.
//!
//! A [`Trainer`] owns the trainable parameters as candle `Var`s; the model is rebuilt over
//! their tensors (sharing storage), so gradients of any loss computed with it land on the
//! parameters.

pub mod adamw;
pub mod batch;
pub mod distill;
pub(crate) mod ewc;
pub mod finetune;
pub mod fit;
pub(crate) mod frozen;
pub mod kd;
pub mod pretrain;
pub mod qlora;
pub mod schedule;
pub mod stage;
pub mod teacher_cache;
pub mod workers;

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

pub use adamw::{AdamW, AdamWParams};
pub use kd::{kd_loss, kd_loss_top_k};
pub use schedule::CosineSchedule;

use crate::error::{Error, Result};

/// Optimizer settings.
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    /// Learning-rate schedule.
    pub schedule: CosineSchedule,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Micro-batches whose gradients are summed before one optimizer step.
    pub accumulation: usize,
    /// Largest global gradient L2 norm; larger gradients are scaled down to it (0 = off).
    pub clip_norm: f64,
}

/// Trainable parameters and their optimizer state.
pub struct Trainer {
    params: Vec<(String, Var)>,
    optimizer: AdamW,
    config: TrainConfig,
    pending: Option<GradStore>,
    micro: usize,
    step: usize,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Optimizer step just taken (0-based).
    pub step: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl Trainer {
    /// Makes every given weight trainable.
    pub fn new(weights: HashMap<String, Tensor>, config: TrainConfig) -> Result<Self> {
        let mut params: Vec<(String, Var)> =
            weights.into_iter().map(|(k, t)| Ok((k, Var::from_tensor(&t)?))).collect::<Result<_>>()?;
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let optimizer = AdamW::new(AdamWParams { weight_decay: config.weight_decay, ..AdamWParams::default() });
        Ok(Trainer { params, optimizer, config, pending: None, micro: 0, step: 0 })
    }

    /// The parameters' current tensors by name (share storage with the parameters).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Adds the gradients of `loss` (divided by the accumulation count); after `accumulation`
    /// calls, clips and takes one optimizer step and returns its report.
    pub fn backward(&mut self, loss: &Tensor) -> Result<Option<StepReport>> {
        let grads = self.gradients(loss)?;
        self.accumulate(vec![grads])
    }

    /// The gradients of `loss` divided by the accumulation count, without touching the
    /// trainer: data-parallel workers call this on their shares of a batch at the same time.
    pub fn gradients(&self, loss: &Tensor) -> Result<GradStore> {
        Ok((loss / self.config.accumulation.max(1) as f64)?.backward()?)
    }

    /// Adds the gradients of one micro-batch, given as the sum of `shards` (from
    /// [`Trainer::gradients`] over parts of it); after `accumulation` micro-batches, clips and
    /// takes one optimizer step and returns its report.
    pub fn accumulate(&mut self, shards: Vec<GradStore>) -> Result<Option<StepReport>> {
        if shards.is_empty() {
            return Err(Error::Training { what: "a micro-batch brought no gradients".into() });
        }
        for grads in shards {
            match self.pending.as_mut() {
                None => self.pending = Some(grads),
                Some(acc) => {
                    for (_, v) in &self.params {
                        if let Some(g) = grads.get(v.as_tensor()) {
                            let sum = match acc.get(v.as_tensor()) {
                                Some(a) => (a + g)?,
                                None => g.clone(),
                            };
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                }
            }
        }
        self.micro += 1;
        if self.micro < self.config.accumulation.max(1) {
            return Ok(None);
        }
        let grads = self.pending.take().expect("gradients were accumulated");
        self.micro = 0;
        let mut sq = 0f64;
        for (_, v) in &self.params {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += adamw::with_f32_values(g, edgelm_kernels::adamw::sum_of_squares)?;
            }
        }
        let grad_norm = sq.sqrt();
        let scale = if self.config.clip_norm > 0.0 && grad_norm > self.config.clip_norm {
            self.config.clip_norm / grad_norm
        } else {
            1.0
        };
        let lr = self.config.schedule.lr(self.step);
        self.optimizer.step_scaled(&self.params, &grads, lr, scale)?;
        let report = StepReport { step: self.step, lr, grad_norm };
        self.step += 1;
        Ok(Some(report))
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes parameters and optimizer state into `dir` (`params.safetensors`,
    /// `optimizer.safetensors`); only between optimizer steps.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.micro != 0 {
            return Err(Error::RunState {
                path: dir.to_path_buf(),
                what: "training state can only be saved between optimizer steps".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|err| Error::Io { path: dir.into(), err })?;
        let save = |t: &HashMap<String, Tensor>, file: &str| {
            let path = dir.join(file);
            candle_core::safetensors::save(t, &path)
                .map_err(|e| Error::Format { path: path.clone(), what: e.to_string() })
        };
        save(&self.tensors(), "params.safetensors")?;
        let (t, mut state) = self.optimizer.state();
        state.insert("step".into(), Tensor::new(&[self.step as u32, t as u32], &candle_core::Device::Cpu)?);
        save(&state, "optimizer.safetensors")
    }

    /// Restores what [`Trainer::save`] wrote; the parameter names must match.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let read = |file: &str| {
            let path = dir.join(file);
            candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
                .map_err(|e| Error::RunState { path: path.clone(), what: e.to_string() })
        };
        let params = read("params.safetensors")?;
        for (name, var) in &self.params {
            let state = |what: String| Error::RunState { path: dir.join("params.safetensors"), what };
            let t = params.get(name).ok_or_else(|| state(format!("lacks parameter {name}")))?;
            if t.dims() != var.dims() {
                return Err(state(format!("{name} is {:?}, the model has {:?}", t.dims(), var.dims())));
            }
            var.set(t)?;
        }
        let mut state = read("optimizer.safetensors")?;
        let steps = state
            .remove("step")
            .ok_or_else(|| Error::RunState {
                path: dir.join("optimizer.safetensors"),
                what: "lacks its step count".into(),
            })?
            .to_vec1::<u32>()?;
        self.step = steps[0] as usize;
        // The optimizer names what is wrong; the file is known here.
        self.optimizer.set_state(steps[1] as usize, &state).map_err(|e| match e {
            Error::RunState { what, .. } => Error::RunState { path: dir.join("optimizer.safetensors"), what },
            other => other,
        })?;
        self.pending = None;
        self.micro = 0;
        Ok(())
    }
}
