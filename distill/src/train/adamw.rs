//! AdamW (decoupled weight decay) with its moment estimates exposed, so a run can be saved and
//! resumed exactly: candle's own optimizer keeps its state private.
//!
//! Per parameter `p` with gradient `g` at step `t` (1-based):
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
//! Weight decay applies to matrices only; norms, biases and other vectors are not decayed.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

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

/// Moment estimates of one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
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
        self.t += 1;
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        let c1 = 1.0 - beta1.powi(self.t as i32);
        let c2 = 1.0 - beta2.powi(self.t as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let mom = match self.moments.get_mut(name) {
                Some(m) => m,
                None => {
                    let z = var.as_tensor().zeros_like()?;
                    self.moments.entry(name.clone()).or_insert(Moments { m: z.clone(), v: z })
                }
            };
            mom.m = ((&mom.m * beta1)? + (g * (1.0 - beta1))?)?;
            mom.v = ((&mom.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let update = ((&mom.m / c1)? / ((&mom.v / c2)?.sqrt()? + eps)?)?;
            let p = var.as_tensor();
            let decayed =
                if p.rank() >= 2 && weight_decay > 0.0 { (p * (1.0 - lr * weight_decay))? } else { p.clone() };
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`) plus the step count.
    pub fn state(&self) -> (usize, HashMap<String, Tensor>) {
        let mut out = HashMap::new();
        for (name, mom) in &self.moments {
            out.insert(format!("m.{name}"), mom.m.clone());
            out.insert(format!("v.{name}"), mom.v.clone());
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
            self.moments.insert(name.to_owned(), Moments { m: m.clone(), v: v.clone() });
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
}
