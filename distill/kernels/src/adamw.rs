//! One AdamW step over a parameter's values, and the sum of squares gradient clipping takes
//! (the optimizer's state handling is in `edgelm-distill`'s `train::adamw`).

/// `sum(x^2)` accumulated in f64: a gradient's share of the global norm.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// The coefficients of one AdamW step, the same for every value of a parameter.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// First-moment decay `b1` and `1 - b1` (taken in f64 before narrowing: in f32,
    /// `1 - 0.999` is 1e-5 off).
    pub beta1: (f32, f32),
    /// Second-moment decay `b2` and `1 - b2`.
    pub beta2: (f32, f32),
    /// Bias corrections `1 - b1^t` and `1 - b2^t`.
    pub corrections: (f32, f32),
    /// Denominator guard.
    pub eps: f32,
    /// Learning rate.
    pub lr: f32,
    /// What the parameter keeps before the step: `1 - lr * weight_decay`, or 1 without decay.
    pub keep: f32,
    /// Factor on every gradient value (gradient accumulation's share).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// Updates the moments `m` and `v` in place and writes the new parameter values to `out`.
    ///
    /// # Panics
    /// If the slices differ in length.
    pub fn apply(&self, m: &mut [f32], v: &mut [f32], out: &mut [f32], param: &[f32], grad: &[f32]) {
        let n = out.len();
        assert!(m.len() == n && v.len() == n && param.len() == n && grad.len() == n, "AdamW slices differ in length");
        let ((b1, a1), (b2, a2), (c1, c2)) = (self.beta1, self.beta2, self.corrections);
        for i in 0..n {
            let g = grad[i] * self.grad_scale;
            m[i] = b1 * m[i] + a1 * g;
            v[i] = b2 * v[i] + a2 * g * g;
            let step = (m[i] / c1) / ((v[i] / c2).sqrt() + self.eps);
            out[i] = param[i] * self.keep - self.lr * step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_of_squares_by_hand() {
        assert_eq!(sum_of_squares(&[3.0, -4.0]), 25.0);
    }

    #[test]
    fn first_step_by_hand() {
        // t = 1: m = 0.1 g, v = 0.001 g^2; corrected m / sqrt(v) = sign(g), so the step is
        // lr * g / (|g| + eps) and decay keeps 1 - lr * wd of the parameter.
        let s = AdamWStep {
            beta1: (0.9, 0.1),
            beta2: (0.999, 0.001),
            corrections: (0.1, 0.001),
            eps: 0.0,
            lr: 0.01,
            keep: 1.0 - 0.01 * 0.1,
            grad_scale: 0.5,
        };
        let (mut m, mut v, mut out) = ([0f32; 2], [0f32; 2], [0f32; 2]);
        s.apply(&mut m, &mut v, &mut out, &[1.0, -2.0], &[4.0, -0.2]);
        assert!((m[0] - 0.2).abs() < 1e-7 && (m[1] + 0.01).abs() < 1e-8, "{m:?}");
        assert!((v[0] - 0.004).abs() < 1e-9 && (v[1] - 0.00001).abs() < 1e-12, "{v:?}");
        assert!((out[0] - (0.999 - 0.01)).abs() < 1e-6, "{out:?}");
        assert!((out[1] - (-1.998 + 0.01)).abs() < 1e-6, "{out:?}");
    }
}
