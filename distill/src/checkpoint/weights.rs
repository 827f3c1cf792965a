//! A llama-family decoder's weights as a typed struct: the one place that turns transformers'
//! tensor names into fields, checking every shape against the configuration once. The candle
//! model and the ONNX export read fields, not names.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{names, weight, ModelConfig};
use crate::error::Result;

/// The projections of a decoder layer, in the order transformers lists them.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One linear projection: `weight [out, in]` as transformers stores it, optional `bias [out]`.
#[derive(Clone)]
pub struct Projection {
    /// Module name (`model.layers.3.self_attn.q_proj`), the key LoRA adapters use.
    pub name: String,
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the architecture has one.
    pub bias: Option<Tensor>,
}

/// One decoder layer.
#[derive(Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention `[hidden]`.
    pub input_norm: Tensor,
    /// RMSNorm before the MLP `[hidden]`.
    pub post_attention_norm: Tensor,
    /// RMSNorm weights over each query and key head `[head_dim]`, applied before rotary
    /// embedding (Qwen3); `None` in the other families.
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// Query projection `[heads * head_dim, hidden]`.
    pub q: Projection,
    /// Key projection `[kv_heads * head_dim, hidden]`.
    pub k: Projection,
    /// Value projection `[kv_heads * head_dim, hidden]`.
    pub v: Projection,
    /// Attention output projection `[hidden, heads * head_dim]`.
    pub o: Projection,
    /// MLP gate `[intermediate, hidden]`.
    pub gate: Projection,
    /// MLP up `[intermediate, hidden]`.
    pub up: Projection,
    /// MLP down `[hidden, intermediate]`.
    pub down: Projection,
}

/// Gives a weight by transformers name, checked against the shape it must have.
pub type WeightGetter<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'a;

impl LayerWeights {
    /// Layer `i`'s tensors as `get` gives them.
    pub fn read(c: &ModelConfig, i: usize, get: &mut WeightGetter<'_>) -> Result<Self> {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let mut proj = |short: &str, out: usize, inp: usize, bias: bool| -> Result<Projection> {
            let name = names::projection(i, short);
            Ok(Projection {
                weight: get(&format!("{name}.weight"), &[out, inp])?,
                bias: if bias { Some(get(&format!("{name}.bias"), &[out])?) } else { None },
                name,
            })
        };
        let (q, k, v, o) = (
            proj("q_proj", c.q_dim(), h, c.qkv_bias)?,
            proj("k_proj", c.kv_dim(), h, c.qkv_bias)?,
            proj("v_proj", c.kv_dim(), h, c.qkv_bias)?,
            proj("o_proj", h, c.q_dim(), c.o_bias)?,
        );
        let (gate, up, down) = (
            proj("gate_proj", inter, h, c.mlp_bias)?,
            proj("up_proj", inter, h, c.mlp_bias)?,
            proj("down_proj", h, inter, c.mlp_bias)?,
        );
        Ok(LayerWeights {
            input_norm: get(&names::in_layer(i, names::INPUT_NORM), &[h])?,
            post_attention_norm: get(&names::in_layer(i, names::POST_ATTENTION_NORM), &[h])?,
            qk_norm: if c.qk_norm() {
                let d = &[c.head_dim];
                Some((get(&names::in_layer(i, names::Q_NORM), d)?, get(&names::in_layer(i, names::K_NORM), d)?))
            } else {
                None
            },
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        })
    }

    /// The seven projections with their short names (`q_proj`, ...), in [`PROJECTIONS`] order.
    pub fn projections(&self) -> [(&'static str, &Projection); 7] {
        let p = PROJECTIONS;
        [
            (p[0], &self.q),
            (p[1], &self.k),
            (p[2], &self.v),
            (p[3], &self.o),
            (p[4], &self.gate),
            (p[5], &self.up),
            (p[6], &self.down),
        ]
    }
}

/// Every weight of a llama-family decoder.
#[derive(Clone)]
pub struct DecoderWeights {
    /// Token embedding `[vocab, hidden]`.
    pub embed: Tensor,
    /// The decoder layers, first to last.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `[hidden]`.
    pub final_norm: Tensor,
    /// LM head `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

impl DecoderWeights {
    /// Picks the decoder's tensors out of a transformers-named map, checking each shape against
    /// `config`. Tensors are shared, not copied.
    pub fn from_map(tensors: &HashMap<String, Tensor>, c: &ModelConfig) -> Result<Self> {
        Self::read(c, &mut |name, shape| weight(tensors, name, shape).cloned())
    }

    /// The decoder's tensors as `get` gives them by transformers name and expected shape.
    pub fn read(c: &ModelConfig, get: &mut WeightGetter<'_>) -> Result<Self> {
        let h = c.hidden_size;
        let embed = get(names::EMBED, &[c.vocab_size, h])?;
        let layers = (0..c.num_hidden_layers).map(|i| LayerWeights::read(c, i, get)).collect::<Result<Vec<_>>>()?;
        Ok(DecoderWeights {
            embed,
            layers,
            final_norm: get(names::FINAL_NORM, &[h])?,
            lm_head: if c.tie_word_embeddings { None } else { Some(get(names::LM_HEAD, &[c.vocab_size, h])?) },
        })
    }

    /// The LM head matrix `[vocab, hidden]`: its own, or the embedding when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset;

    #[test]
    fn a_missing_or_misshapen_tensor_is_named() {
        let config = preset::preset_config("tiny").unwrap();
        let mut tensors = preset::random_weights(&config, 7).unwrap();
        assert!(DecoderWeights::from_map(&tensors, &config).is_ok());
        let name = names::projection(1, "up_proj") + ".weight";
        tensors
            .insert(name.clone(), Tensor::zeros((3, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
        let err = DecoderWeights::from_map(&tensors, &config).err().unwrap().to_string();
        assert!(err.contains(&name) && err.contains("[3, 3]"), "{err}");
        tensors.remove(&name);
        let err = DecoderWeights::from_map(&tensors, &config).err().unwrap().to_string();
        assert!(err.contains(&name) && err.contains("missing"), "{err}");
    }
}
