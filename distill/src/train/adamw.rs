//! AdamW (decoupled weight decay) with its moment estimates exposed, so a run can be saved and
//! resumed exactly: candle's own optimizer keeps its state private.
//!
//! Per parameter `p` with gradient `g` at step `t` (1-based):
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
//! Weight decay applies to matrices only; norms, biases and other vectors are not decayed.
//!
//! The update runs as one pass over each parameter's values (moments held as plain vectors),
//! split across threads for large tensors: written as tensor operations it took about fifteen
//! passes, each allocating a tensor, and on a small encoder that was a third of a training step.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Storage, Tensor, Var};
use edgelm_kernels::adamw::AdamWStep;

use crate::error::Result;

/// Runs `f` on the values of `t` in row-major order, without a copy when `t` is a contiguous
/// f32 tensor in memory.
pub(crate) fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&values))
}

/// Below this many values a tensor is updated on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Values per thread when `n` values are updated: all of them on one thread for small tensors,
/// an equal part per core for large ones.
fn part_len(n: usize) -> usize {
    let threads = if n < PARALLEL_MIN { 1 } else { std::thread::available_parallelism().map_or(1, |t| t.get()) };
    n.div_ceil(threads).max(1)
}

/// AdamW hyper-parameters besides the learning rate.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay (matrices only).
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Moment estimates of one parameter, in the parameter's row-major order.
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    shape: Vec<usize>,
}

/// The optimizer: hyper-parameters, step count and moments by parameter name.
pub struct AdamW {
    params: AdamWParams,
    t: usize,
    moments: HashMap<String, Moments>,
}

impl AdamW {
    /// A fresh optimizer (zero moments are created on first use).
    pub fn new(params: AdamWParams) -> Self {
        AdamW { params, t: 0, moments: HashMap::new() }
    }

    /// Applies one update to every parameter that has a gradient.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(vars, grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (global-norm
    /// clipping), without a pass of its own.
    pub fn step_scaled(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        let c1 = 1.0 - beta1.powi(self.t as i32);
        let c2 = 1.0 - beta2.powi(self.t as i32);
        // 1 - beta taken in f64: in f32, 1 - 0.999 is 1e-5 off.
        let step = AdamWStep {
            beta1: (beta1 as f32, (1.0 - beta1) as f32),
            beta2: (beta2 as f32, (1.0 - beta2) as f32),
            corrections: (c1 as f32, c2 as f32),
            eps: eps as f32,
            lr: lr as f32,
            keep: 1.0,
            grad_scale: grad_scale as f32,
        };
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let p = var.as_tensor();
            let n = p.elem_count();
            if g.elem_count() != n {
                return Err(crate::Error::Training {
                    what: format!("the gradient of {name} has {} values, the parameter {n}", g.elem_count()),
                });
            }
            let mom = self.moments.entry(name.clone()).or_insert_with(|| Moments {
                m: vec![0.0; n],
                v: vec![0.0; n],
                shape: p.dims().to_vec(),
            });
            if mom.m.len() != n {
                return Err(crate::Error::Training {
                    what: format!("the saved moments of {name} hold {} values, the parameter {n}", mom.m.len()),
                });
            }
            let keep = if p.rank() >= 2 && weight_decay > 0.0 { (1.0 - lr * weight_decay) as f32 } else { 1.0 };
            let step = AdamWStep { keep, ..step };
            let mut out = vec![0f32; n];
            let per = part_len(n);
            with_f32_values(p, |pv| {
                with_f32_values(g, |gv| {
                    std::thread::scope(|scope| {
                        let parts = (mom.m.chunks_mut(per).zip(mom.v.chunks_mut(per)))
                            .zip(out.chunks_mut(per))
                            .zip(pv.chunks(per).zip(gv.chunks(per)));
                        for (((m, v), o), (pv, gv)) in parts {
                            if o.len() == n {
                                step.apply(m, v, o, pv, gv);
                            } else {
                                scope.spawn(move || step.apply(m, v, o, pv, gv));
                            }
                        }
                    })
                })
            })??;
            let updated = Tensor::from_vec(out, p.dims(), &Device::Cpu)?.to_dtype(p.dtype())?.to_device(p.device())?;
            var.set(&updated)?;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`) plus the step count.
    pub fn state(&self) -> (usize, HashMap<String, Tensor>) {
        let mut out = HashMap::new();
        for (name, mom) in &self.moments {
            let tensor =
                |x: &[f32]| Tensor::from_slice(x, mom.shape.as_slice(), &Device::Cpu).expect("shape of its length");
            out.insert(format!("m.{name}"), tensor(&mom.m));
            out.insert(format!("v.{name}"), tensor(&mom.v));
        }
        (self.t, out)
    }

    /// Restores a state written by [`AdamW::state`].
    pub fn set_state(&mut self, t: usize, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.t = t;
        self.moments.clear();
        for (key, m) in tensors {
            let Some(name) = key.strip_prefix("m.") else { continue };
            let v = tensors.get(&format!("v.{name}")).ok_or_else(|| crate::Error::RunState {
                path: "optimizer.safetensors".into(),
                what: format!("has m.{name} but no v.{name}"),
            })?;
            let values = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            if m.dims() != v.dims() {
                return Err(crate::Error::RunState {
                    path: "optimizer.safetensors".into(),
                    what: format!("m.{name} is {:?} but v.{name} {:?}", m.dims(), v.dims()),
                });
            }
            self.moments.insert(name.to_owned(), Moments { m: values(m)?, v: values(v)?, shape: m.dims().to_vec() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn two_steps_match_the_update_rule_and_vectors_are_not_decayed() {
        let w = Var::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap();
        let n = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let vars = vec![("n".to_owned(), n.clone()), ("w".to_owned(), w.clone())];
        let p = AdamWParams { weight_decay: 0.5, ..AdamWParams::default() };
        let mut opt = AdamW::new(p);
        // loss = sum(3 * w) + sum(3 * n): gradient 3 everywhere.
        let (lr, g) = (0.1f64, 3.0f64);
        let mut expect_w = [1.0f64, -2.0];
        let mut expect_n = [1.0f64, -2.0];
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for t in 1..=2 {
            let loss = ((w.as_tensor() * 3.0).unwrap().sum_all().unwrap()
                + (n.as_tensor() * 3.0).unwrap().sum_all().unwrap())
            .unwrap();
            opt.step(&vars, &loss.backward().unwrap(), lr).unwrap();
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let upd = (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            for x in &mut expect_w {
                *x = *x * (1.0 - lr * 0.5) - lr * upd;
            }
            for x in &mut expect_n {
                *x -= lr * upd;
            }
        }
        let got_w = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got_n = n.as_tensor().to_vec1::<f32>().unwrap();
        for (g, e) in got_w.iter().zip(expect_w).chain(got_n.iter().zip(expect_n)) {
            assert!((*g as f64 - e).abs() < 1e-6, "{g} vs {e}");
        }
        // The state round-trips.
        let (t, state) = opt.state();
        let mut other = AdamW::new(p);
        other.set_state(t, &state).unwrap();
        assert_eq!(other.state().0, 2);
        assert_eq!(other.state().1.len(), 4);
    }

    #[test]
    fn a_large_tensor_split_across_threads_gets_every_value_updated_by_the_rule() {
        // 3 x PARALLEL_MIN values: the update runs in parts; each value must follow the rule.
        let (rows, cols) = (3, PARALLEL_MIN);
        let start: Vec<f32> = (0..rows * cols).map(|i| ((i % 97) as f32 - 48.0) / 10.0).collect();
        let w = Var::from_tensor(&Tensor::from_vec(start.clone(), (rows, cols), &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_owned(), w.clone())];
        let p = AdamWParams { weight_decay: 0.1, ..AdamWParams::default() };
        let mut opt = AdamW::new(p);
        // loss = sum(w^2) / 2: gradient w; scaled by 0.5 as clipping would.
        let (lr, scale) = (0.01f64, 0.5f64);
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() / 2.0).unwrap();
        opt.step_scaled(&vars, &loss.backward().unwrap(), lr, scale).unwrap();
        let got = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&x, &g)) in start.iter().zip(&got).enumerate() {
            let grad = x as f64 * scale;
            let (m, v) = (0.1 * grad, 0.001 * grad * grad);
            let upd = (m / 0.1) / ((v / (1.0 - 0.999f64)).sqrt() + 1e-8);
            let expect = x as f64 * (1.0 - lr * 0.1) - lr * upd;
            assert!((g as f64 - expect).abs() < 1e-5, "value {i}: {g} vs {expect}");
        }
        // Moments are saved in the parameter's shape.
        let (_, state) = opt.state();
        assert_eq!(state["m.w"].dims(), &[rows, cols]);
    }
}
