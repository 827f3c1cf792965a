//! The EWC penalty's inner sum `sum(F * d^2)` as one operator: a single pass over the update `d`
//! forward, and `2 F d` backward. Composed of candle's element-wise ops it took five full-size
//! temporaries per adapted matrix and step, a fifth of a LoRA step on the devcmd teacher.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// `sum(F * d^2)` for a fixed diagonal Fisher estimate `F` of one matrix.
pub(crate) struct FisherWeightedSquare {
    fisher: Arc<Vec<f32>>,
    dims: Vec<usize>,
}

impl FisherWeightedSquare {
    /// Holds `fisher` (any shape; the update must have the same).
    pub(crate) fn new(fisher: &Tensor) -> Result<Self> {
        let dims = fisher.dims().to_vec();
        let values = fisher.flatten_all()?.to_vec1::<f32>()?;
        Ok(FisherWeightedSquare { fisher: Arc::new(values), dims })
    }

    /// The scalar `sum(F * d^2)`, differentiable in `d`.
    pub(crate) fn apply(&self, d: &Tensor) -> Result<Tensor> {
        if d.dims() != self.dims.as_slice() {
            return Err(Error::Training {
                what: format!("EWC: update {:?} does not match its Fisher estimate {:?}", d.dims(), self.dims),
            });
        }
        let op = FisherWeightedSquare { fisher: self.fisher.clone(), dims: self.dims.clone() };
        let op: Box<dyn CustomOp1 + Send + Sync> = Box::new(op);
        Ok(d.contiguous()?.apply_op1_arc(Arc::new(op))?)
    }
}

impl CustomOp1 for FisherWeightedSquare {
    fn name(&self) -> &'static str {
        "fisher-weighted-square"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = crate::model::contiguous_f32(self.name(), storage, layout)?;
        let sum = edgelm_kernels::ewc::weighted_square_sum(d, &self.fisher);
        Ok((CpuStorage::F32(vec![sum as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = arg.flatten_all()?.to_vec1::<f32>()?;
        let grad = edgelm_kernels::ewc::weighted_square_gradient(&d, &self.fisher, grad_res.to_scalar::<f32>()?);
        Ok(Some(Tensor::from_vec(grad, arg.dims(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradient match the same sum written with candle's element-wise ops.
    #[test]
    fn matches_the_composed_penalty_in_value_and_gradient() {
        let f = Tensor::new(&[[0.5f32, 2.0, 0.0], [1.5, 0.25, 3.0]], &Device::Cpu).unwrap();
        let d = Var::new(&[[0.3f32, -1.2, 4.0], [0.7, -0.1, 0.2]], &Device::Cpu).unwrap();
        let op = FisherWeightedSquare::new(&f).unwrap();
        let fused = (op.apply(d.as_tensor()).unwrap() * 3.0).unwrap();
        let composed = ((&f * d.as_tensor().sqr().unwrap()).unwrap().sum_all().unwrap() * 3.0).unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), composed.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = fused.backward().unwrap().get(d.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gb =
            composed.backward().unwrap().get(d.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-5, "{ga:?} vs {gb:?}");
        }
        assert!(op.apply(&Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
