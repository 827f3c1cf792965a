//! `y = x W^T` with a frozen `W`: the backward pass computes the input's gradient only.
//!
//! candle's matmul backward always computes both operands' gradients, so under LoRA every
//! frozen projection (and the tied LM head) paid a full weight-gradient matmul per step that
//! nobody read: a third of the step's arithmetic. This operator carries `W` outside the autograd
//! graph: forward `x W^T`, backward `dy W`. `W` is held dense, or packed in 4-bit blocks (QLoRA)
//! and dequantized for each matmul, never kept.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use crate::quantize::QuantizedMatrix;

/// Where a frozen weight `[out, in]` lives.
#[derive(Clone)]
pub(crate) enum FrozenWeight {
    /// An fp32 tensor that takes no gradient.
    Dense(Tensor),
    /// Packed blocks, dequantized on use.
    Packed(Arc<QuantizedMatrix>),
}

impl FrozenWeight {
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(t) => t.dims2(),
            FrozenWeight::Packed(m) => Ok((m.rows, m.cols)),
        }
    }

    fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.clone()),
            FrozenWeight::Packed(m) => Tensor::from_vec(m.dequantize(), (m.rows, m.cols), &Device::Cpu),
        }
    }
}

/// The operator; [`FrozenMatmul::apply`] runs it on an input.
pub(crate) struct FrozenMatmul(pub FrozenWeight);

impl FrozenMatmul {
    /// `x W^T` for `x [..., in]` through this operator.
    pub(crate) fn apply(x: &Tensor, w: FrozenWeight) -> candle_core::Result<Tensor> {
        let op: Box<dyn CustomOp1 + Send + Sync> = Box::new(FrozenMatmul(w));
        x.contiguous()?.apply_op1_arc(Arc::new(op))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::Msg("frozen-matmul: input must be f32".into()));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("frozen-matmul: input must be contiguous".into()));
        };
        let (out, cols) = self.0.dims()?;
        let dims = layout.dims();
        let inp = *dims.last().ok_or_else(|| candle_core::Error::Msg("frozen-matmul: scalar input".into()))?;
        if inp != cols {
            return Err(candle_core::Error::Msg(format!(
                "frozen-matmul: input width {inp} does not match the weight's {cols}"
            )));
        }
        let rows = (end - start) / inp;
        let x = Tensor::from_slice(&data[start..end], (rows, inp), &Device::Cpu)?;
        let y = x.matmul(&self.0.tensor()?.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.0.tensor()?;
        let dims = grad_res.dims();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let g = grad_res.contiguous()?.reshape((rows, dims[dims.len() - 1]))?.matmul(&w)?;
        let mut in_dims = dims.to_vec();
        *in_dims.last_mut().expect("non-scalar") = w.dims()[1];
        Ok(Some(g.reshape(in_dims)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Same output and input gradient as a plain matmul, and no gradient reaches the weight.
    #[test]
    fn dense_frozen_matmul_matches_a_plain_one_and_leaves_the_weight_alone() {
        let wv: Vec<f32> = (0..24 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let w = Tensor::from_vec(wv, (24, 64), &Device::Cpu).unwrap();
        let xv: Vec<f32> = (0..2 * 3 * 64).map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(xv, (2, 3, 64), &Device::Cpu).unwrap()).unwrap();
        let y = FrozenMatmul::apply(x.as_tensor(), FrozenWeight::Dense(w.clone())).unwrap();
        let reference = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.dims(), &[2, 3, 24]);
        assert!(diff(&y, &reference) < 1e-4);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = reference.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
        assert!(diff(a, b) < 1e-3, "input gradients differ by {}", diff(a, b));
        assert!(g.get(&w).is_none(), "the frozen weight got a gradient");
    }
}
