//! QLoRA: LoRA over a base whose projection weights are held as 4-bit blocks (the same block
//! quantizer the INT4 export uses) and dequantized on the fly, one projection at a time, inside
//! the forward and backward passes. The fp32 projections are never resident: the autograd graph
//! keeps the packed matrix, and each dequantized copy lives only while one matmul runs.
//!
//! Embeddings, norms and biases stay fp32 (as in QLoRA, which quantizes the linear layers).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::checkpoint::{names, ModelConfig, PROJECTIONS};
use crate::error::{Error, Result};
use crate::quantize::{quantize, BlockScheme, QuantizedMatrix};

/// A base model for QLoRA: packed projections and the fp32 rest.
pub struct QuantizedBase {
    /// Its configuration.
    pub config: ModelConfig,
    /// Every non-projection tensor, and for each projection weight a zero-stride placeholder of
    /// the right shape (4 bytes), so the model's shape checks hold.
    pub tensors: HashMap<String, Tensor>,
    /// Packed projection weights by module name (`model.layers.0.self_attn.q_proj`).
    pub packed: HashMap<String, Arc<QuantizedMatrix>>,
}

impl QuantizedBase {
    /// Quantizes every projection of `tensors` with `scheme`, consuming the map so the fp32
    /// projections are freed as they are packed.
    pub fn quantize(config: &ModelConfig, mut tensors: HashMap<String, Tensor>, scheme: BlockScheme) -> Result<Self> {
        let mut packed = HashMap::new();
        for l in 0..config.num_hidden_layers {
            for p in PROJECTIONS {
                let module = names::projection(l, p);
                let key = format!("{module}.weight");
                let w = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::Tensor { name: key.clone(), what: "missing from the checkpoint".into() })?;
                let (rows, cols) = w.dims2()?;
                let values = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                drop(w);
                packed.insert(module, Arc::new(quantize(&values, rows, cols, scheme)));
                let placeholder =
                    Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?.broadcast_as((rows, cols))?;
                tensors.insert(key, placeholder);
            }
        }
        Ok(QuantizedBase { config: config.clone(), tensors, packed })
    }

    /// Bytes the packed projections take (data, scales, zero points).
    pub fn packed_bytes(&self) -> usize {
        self.packed.values().map(|m| m.stored_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset::{preset_config, random_weights};
    use crate::model::LlamaModel;
    use crate::train::frozen::{FrozenMatmul, FrozenWeight};
    use candle_core::Var;

    /// The packed model computes what an fp32 model over the dequantized weights computes, and
    /// its gradient with respect to the input matches that model's.
    #[test]
    fn packed_matmul_matches_the_dequantized_matrix_forward_and_backward() {
        let scheme = BlockScheme::new(4, 32, true).unwrap();
        let w: Vec<f32> = (0..24 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let m = Arc::new(quantize(&w, 24, 64, scheme));
        let deq = Tensor::from_vec(m.dequantize(), (24, 64), &Device::Cpu).unwrap();
        let xv: Vec<f32> = (0..2 * 3 * 64).map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(xv, (2, 3, 64), &Device::Cpu).unwrap()).unwrap();
        let y = FrozenMatmul::apply(x.as_tensor(), FrozenWeight::Packed(m.clone())).unwrap();
        let reference = x.as_tensor().broadcast_matmul(&deq.t().unwrap()).unwrap();
        assert_eq!(y.dims(), &[2, 3, 24]);
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&y, &reference) < 1e-4);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = reference.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
        assert!(diff(a, b) < 1e-3, "input gradients differ by {}", diff(a, b));
    }

    #[test]
    fn a_quantized_base_runs_like_its_dequantized_weights_and_holds_no_fp32_projection() {
        let cfg = preset_config("tiny").unwrap();
        let w = random_weights(&cfg, 5).unwrap();
        let scheme = BlockScheme::new(4, 32, true).unwrap();
        let base = QuantizedBase::quantize(&cfg, w.clone(), scheme).unwrap();
        assert_eq!(base.packed.len(), cfg.num_hidden_layers * PROJECTIONS.len());
        let fp32_bytes: usize = base.packed.values().map(|m| 4 * m.rows * m.cols).sum();
        assert!(base.packed_bytes() * 6 < fp32_bytes, "{} vs {fp32_bytes}", base.packed_bytes());
        // The same model with the dequantized weights written back as ordinary tensors.
        let mut deq = base.tensors.clone();
        for (module, m) in &base.packed {
            let t = Tensor::from_vec(m.dequantize(), (m.rows, m.cols), &Device::Cpu).unwrap();
            deq.insert(format!("{module}.weight"), t);
        }
        let ids = Tensor::new(&[[5u32, 9, 17, 33, 2]], &Device::Cpu).unwrap();
        let a = LlamaModel::qlora(&base, None).unwrap().forward(&ids, &mut Default::default()).unwrap();
        let b = LlamaModel::from_tensors(&cfg, &deq).unwrap().forward(&ids, &mut Default::default()).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}");
        // And is really quantized: it differs from the fp32 model.
        let c = LlamaModel::from_tensors(&cfg, &w).unwrap().forward(&ids, &mut Default::default()).unwrap();
        let b = LlamaModel::from_tensors(&cfg, &deq).unwrap().forward(&ids, &mut Default::default()).unwrap();
        let d = (c - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 1e-3, "{d}");
    }
}
