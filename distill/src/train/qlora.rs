//! QLoRA: LoRA over a base whose projection weights are held as 4-bit blocks (the same block
//! quantizer the INT4 export uses: symmetric absmax blocks, not QLoRA's NF4) and dequantized
//! on the fly, one projection at a time, inside the forward and backward passes. The fp32
//! projections are never resident together: [`QuantizedBase::load`] packs each as it is read
//! from the checkpoint (Phi-3's fused ones split as they are read), the autograd graph keeps the
//! packed matrix, and each dequantized copy lives only while one matmul runs.
//!
//! Embeddings, an untied LM head, norms and biases stay fp32 (as in QLoRA, which quantizes the
//! layers' linear projections). The adapter is an ordinary LoRA adapter: merged, it is added to
//! the original fp32 weights, as PEFT users merge one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::checkpoint::{names, Checkpoint, ModelConfig, PROJECTIONS};
use crate::error::{Error, Result};
use crate::quantize::{quantize, BlockScheme, QuantizedMatrix};

/// Whether `module` is one of the projections of a layer `config` has
/// (`model.layers.3.mlp.down_proj`).
fn is_projection(config: &ModelConfig, module: &str) -> bool {
    let layer = module.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.')).map(|(l, _)| l);
    layer
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l < config.num_hidden_layers)
        .is_some_and(|l| PROJECTIONS.iter().any(|p| names::projection(l, p) == module))
}

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

/// Packs one projection weight `[rows, cols]`; returns the packed matrix and the placeholder
/// that takes its place among the tensors.
fn pack(w: Tensor, scheme: BlockScheme) -> Result<(QuantizedMatrix, Tensor)> {
    let (rows, cols) = w.dims2()?;
    let values = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    drop(w);
    let placeholder = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?.broadcast_as((rows, cols))?;
    Ok((quantize(&values, rows, cols, scheme), placeholder))
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
                let (m, placeholder) = pack(w, scheme)?;
                packed.insert(module, Arc::new(m));
                tensors.insert(key, placeholder);
            }
        }
        Ok(QuantizedBase { config: config.clone(), tensors, packed })
    }

    /// Reads the checkpoint in `dir` packing each projection as it is read, so its fp32
    /// projections are never all in memory (only its other weights are held in f32). Returns
    /// the checkpoint (its folder, configuration and tokenizer; no tensors) and the base.
    pub fn load(dir: &Path, scheme: BlockScheme) -> Result<(Checkpoint, Self)> {
        let mut packed = HashMap::new();
        let mut ck = Checkpoint::load_with(dir, |config, name, t| {
            let Some(module) = name.strip_suffix(".weight").filter(|m| is_projection(config, m)) else {
                return Ok(t);
            };
            let (m, placeholder) = pack(t, scheme)?;
            packed.insert(module.to_owned(), Arc::new(m));
            Ok(placeholder)
        })?;
        let config = ck.config.clone();
        for l in 0..config.num_hidden_layers {
            for p in PROJECTIONS {
                let module = names::projection(l, p);
                if !packed.contains_key(&module) {
                    return Err(Error::Tensor {
                        name: format!("{module}.weight"),
                        what: "missing from the checkpoint".into(),
                    });
                }
            }
        }
        let tensors = std::mem::take(&mut ck.tensors);
        Ok((ck, QuantizedBase { config, tensors, packed }))
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

    /// Packed as it is read, the base is the one packed after a whole load: the same packed
    /// matrices and the same other tensors, Phi-3's fused storage included.
    #[test]
    fn packing_while_reading_gives_the_base_packing_after_loading_gives() {
        let tmp = tempfile::tempdir().unwrap();
        let mistral = tmp.path().join("mistral");
        crate::checkpoint::preset::write_preset("tiny-mistral-window", &mistral, 3, Default::default()).unwrap();
        let phi3 = tmp.path().join("phi3");
        crate::checkpoint::phi3::tests::phi3_folder(&phi3, &mistral);
        let scheme = BlockScheme::new(4, 32, true).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dir in [&mistral, &phi3] {
            let whole = Checkpoint::load(dir).unwrap();
            let a = QuantizedBase::quantize(&whole.config, whole.tensors.clone(), scheme).unwrap();
            let (ck, b) = QuantizedBase::load(dir, scheme).unwrap();
            assert!(ck.tensors.is_empty() && ck.config == whole.config);
            assert_eq!(a.packed.len(), 7 * whole.config.num_hidden_layers);
            for (m, q) in &a.packed {
                assert_eq!(q.dequantize(), b.packed[m].dequantize(), "{}: {m}", dir.display());
            }
            let keys = |t: &HashMap<String, Tensor>| {
                let mut k: Vec<String> = t.keys().cloned().collect();
                k.sort();
                k
            };
            assert_eq!(keys(&a.tensors), keys(&b.tensors));
            for (k, t) in &a.tensors {
                assert_eq!(values(t), values(&b.tensors[k]), "{}: {k}", dir.display());
            }
        }
    }

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
