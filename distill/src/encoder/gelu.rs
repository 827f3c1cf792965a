//! The exact GELU, `x Φ(x) = 0.5 x (1 + erf(x / √2))`, as one operator. candle's `gelu_erf`
//! evaluates erf in f64 per element and differentiates through eight element-wise tensor ops;
//! in encoder distillation that was 8-12 % of a training step. Here the forward pass is one
//! loop, the backward pass another, both with an f32 erf accurate to about 2e-7.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::Result;

/// `GELU(x)` elementwise, differentiable.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

/// `(erf(z), exp(-z²))` by Abramowitz and Stegun's formula 7.1.26 (absolute error under
/// 1.5e-7), whose exponential the derivative also needs.
fn erf_and_gauss(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let a = z.abs();
    let gauss = (-a * a).exp();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    ((1.0 - poly * gauss).copysign(z), gauss)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / √(2π)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = crate::model::contiguous_f32(self.name(), storage, layout)?
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf_and_gauss(x * FRAC_1_SQRT_2).0))
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `d/dx x Φ(x) = Φ(x) + x φ(x)`, with `φ(x) = exp(-x² / 2) / √(2π)` the exponential erf
    /// already computed.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad: Vec<f32> = x
            .iter()
            .zip(&g)
            .map(|(&x, &g)| {
                let (erf, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
                g * (0.5 * (1.0 + erf) + x * gauss * FRAC_1_SQRT_2PI)
            })
            .collect();
        Ok(Some(Tensor::from_vec(grad, arg.dims(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn erf_matches_known_values() {
        // erf(0.5), erf(1), erf(2), erf(-1.5) to 9 places.
        for (z, want) in
            [(0.0f32, 0.0f64), (0.5, 0.520499878), (1.0, 0.842700793), (2.0, 0.995322265), (-1.5, -0.966105146)]
        {
            let got = erf_and_gauss(z).0 as f64;
            assert!((got - want).abs() < 3e-7, "erf({z}) = {got}, not {want}");
        }
    }

    /// Value and gradient agree with candle's exact `gelu_erf` over the range activations take.
    #[test]
    fn matches_candles_exact_gelu_in_value_and_gradient() {
        let xs: Vec<f32> = (0..1203).map(|i| -12.0 + i as f32 * 0.02).collect();
        let x = Var::from_vec(xs.clone(), (3, 401), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(xs.iter().map(|v| (v * 1.7).cos()).collect(), (3, 401), &Device::Cpu).unwrap();
        let ours = gelu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().gelu_erf().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ((a, b), v) in flat(&ours).iter().zip(flat(&theirs)).zip(&xs) {
            assert!((a - b).abs() < 1e-6 * (1.0 + v.abs()), "gelu({v}) = {a}, candle {b}");
        }
        let ga = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (flat(ga.get(x.as_tensor()).unwrap()), flat(gb.get(x.as_tensor()).unwrap()));
        for ((a, b), v) in ga.iter().zip(&gb).zip(&xs) {
            assert!((a - b).abs() < 2e-6, "gradient at {v}: {a}, candle {b}");
        }
    }
}
