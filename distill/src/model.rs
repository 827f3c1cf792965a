//! The llama-family decoder in candle: the reference that export is checked against and the
//! model that training differentiates.
//!
//! Written only with differentiable ops (no fused rms_norm, rope or softmax kernels, which cut
//! candle's autograd graph), so the same code serves inference and training.
//!
//! Shapes: `input_ids [B, S]` -> `logits [B, S, vocab]`; the KV cache holds
//! `[B, kv_heads, T, head_dim]` per layer.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};

use crate::checkpoint::weights::WeightGetter;
use crate::checkpoint::{names, Checkpoint, DecoderWeights, LayerWeights, ModelConfig, Projection};
use crate::error::Result;
use crate::train::frozen::{FrozenMatmul, FrozenWeight};

/// A linear layer `y = x W^T + b` with HF's `[out, in]` weight layout.
#[derive(Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// LoRA update `(A [r, in], B [out, r], scale)`: `y += scale * x A^T B^T`.
    lora: Option<(Tensor, Tensor, f64)>,
    /// The weight held packed (QLoRA): `weight` is then a placeholder of its shape.
    packed: Option<Arc<crate::quantize::QuantizedMatrix>>,
}

/// Packed projection weights by module name (QLoRA's base).
type Packed<'a> = Option<&'a HashMap<String, Arc<crate::quantize::QuantizedMatrix>>>;

impl Linear {
    fn load(p: &Projection, adapter: Option<&crate::lora::Adapter>, packed: Packed<'_>) -> Result<Self> {
        let packed = packed.and_then(|m| m.get(&p.name)).cloned();
        let (name, (out, inp)) = (&p.name, p.weight.dims2()?);
        let lora = match adapter.and_then(|a| a.modules.get(name).map(|m| (m, a.config.scale()))) {
            Some(((a, b), scale)) => {
                let r = a.dims()[0];
                if a.dims() != [r, inp] || b.dims() != [out, r] {
                    return Err(crate::Error::Tensor {
                        name: format!("{name} (LoRA)"),
                        what: format!("A {:?} / B {:?} do not fit a [{out}, {inp}] projection", a.dims(), b.dims()),
                    });
                }
                Some((a.clone(), b.clone(), scale))
            }
            None => None,
        };
        Ok(Linear { weight: p.weight.clone(), bias: p.bias.clone(), lora, packed })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = match &self.packed {
            Some(m) => FrozenMatmul::apply(x, FrozenWeight::Packed(m.clone()))?,
            None => times_transposed(x, &self.weight)?,
        };
        if let Some((a, b, scale)) = &self.lora {
            y = (y + (times_transposed(&times_transposed(x, a)?, b)? * *scale)?)?;
        }
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The values of a custom operator's input, which must be contiguous f32 (`op` names the
/// operator in the error).
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => Err(candle_core::Error::Msg(format!("{op}: contiguous f32 input expected"))),
    }
}

/// `x W^T` for `x [..., in]` and `W [out, in]`, as one 2-D matmul over the flattened leading
/// dimensions. candle's `broadcast_matmul` would copy `W` once per batch entry (and keep those
/// copies for the backward pass): with batch 32 that was gigabytes and most of a step's time.
/// A `W` outside the autograd graph (a frozen base under LoRA) goes through [`FrozenMatmul`],
/// whose backward skips the weight gradient.
pub(crate) fn times_transposed(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() && !w.track_op() {
        return FrozenMatmul::apply(x, FrozenWeight::Dense(w.clone()));
    }
    let dims = x.dims();
    let (inp, lead) = match dims.split_last() {
        Some((&inp, lead)) => (inp, lead),
        None => return Err(candle_core::Error::Msg("matmul of a scalar".into())),
    };
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dims()[0]);
    y.reshape(out)
}

/// RMSNorm as `x / sqrt(mean(x^2) + eps) * w`, composed of differentiable ops.
#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(weight: &Tensor, c: &ModelConfig) -> Self {
        RmsNorm { weight: weight.clone(), eps: c.rms_norm_eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)
    }
}

/// Rotary tables `[positions, head_dim / 2]`, and the LongRoPE table that replaces them for
/// forward passes reaching past the original context.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    long: Option<(usize, Tensor, Tensor)>,
}

impl Rotary {
    fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let shape = (cfg.max_position_embeddings, cfg.head_dim / 2);
        let tensors = |t: crate::checkpoint::rope::RotaryTable| -> Result<(Tensor, Tensor)> {
            Ok((Tensor::from_vec(t.cos, shape, device)?, Tensor::from_vec(t.sin, shape, device)?))
        };
        let (cos, sin) = tensors(cfg.rope.table(cfg.head_dim, cfg.max_position_embeddings))?;
        let long = match cfg.rope.long_table(cfg.head_dim, cfg.max_position_embeddings) {
            Some(l) => {
                let (cos, sin) = tensors(l.table)?;
                Some((l.after, cos, sin))
            }
            None => None,
        };
        Ok(Rotary { cos, sin, long })
    }

    /// Rotates `x [B, H, S, D]` for positions `start..start + S` (non-interleaved halves).
    fn apply(&self, x: &Tensor, start: usize) -> candle_core::Result<Tensor> {
        let (_, _, s, d) = x.dims4()?;
        let (cos, sin) = match &self.long {
            Some((after, cos, sin)) if start + s > *after => (cos, sin),
            _ => (&self.cos, &self.sin),
        };
        let cos = cos.narrow(0, start, s)?;
        let sin = sin.narrow(0, start, s)?;
        let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
        let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Keys and values seen so far, one entry per layer: `[B, kv_heads, T, head_dim]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Norms over each query and key head before rotary embedding (Qwen3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

impl Attention {
    fn load(
        w: &LayerWeights,
        adapter: Option<&crate::lora::Adapter>,
        c: &ModelConfig,
        packed: Packed<'_>,
    ) -> Result<Self> {
        Ok(Attention {
            q_proj: Linear::load(&w.q, adapter, packed)?,
            k_proj: Linear::load(&w.k, adapter, packed)?,
            v_proj: Linear::load(&w.v, adapter, packed)?,
            o_proj: Linear::load(&w.o, adapter, packed)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            qk_norm: w.qk_norm.as_ref().map(|(q, k)| (RmsNorm::new(q, c), RmsNorm::new(k, c))),
        })
    }

    /// The heads' outputs before the output projection, `[B, S, heads * head_dim]`.
    fn heads_out(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let start = cache.as_ref().map(|(k, _)| k.dims()[2]).unwrap_or(0);
        let split = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim))?.transpose(1, 2);
        let (mut q, mut k) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q.reshape((b, s, self.heads, self.head_dim))?)?;
            k = k_norm.forward(&k.reshape((b, s, self.kv_heads, self.head_dim))?)?;
        }
        let q = split(q, self.heads)?;
        let k = split(k, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = rotary.apply(&q.contiguous()?, start)?;
        let k = rotary.apply(&k.contiguous()?, start)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v.contiguous()?], 2)?),
            None => (k, v.contiguous()?),
        };
        *cache = Some((k.clone(), v.clone()));
        // Grouped-query attention: each kv head serves `heads / kv_heads` query heads.
        let groups = self.heads / self.kv_heads;
        let t = k.dims()[2];
        let expand = |t_: &Tensor| -> candle_core::Result<Tensor> {
            if groups == 1 {
                return Ok(t_.clone());
            }
            t_.unsqueeze(2)?.broadcast_as((b, self.kv_heads, groups, t, self.head_dim))?.reshape((
                b,
                self.heads,
                t,
                self.head_dim,
            ))
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, self.heads * self.head_dim))
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        self.o_proj.forward(&self.heads_out(x, rotary, mask, cache)?)
    }

    /// Per query head, the summed L2 norm over tokens of what the head writes into the residual
    /// stream (its slice of `heads_out` through its columns of `o_proj`).
    fn head_contributions(&self, heads_out: &Tensor) -> candle_core::Result<Vec<f64>> {
        let d = self.head_dim;
        let flat = heads_out.flatten_to(1)?;
        (0..self.heads)
            .map(|h| {
                let part = flat.narrow(1, h * d, d)?;
                let cols = self.o_proj.weight.narrow(1, h * d, d)?;
                let written = part.matmul(&cols.t()?)?;
                Ok(written.sqr()?.sum(1)?.sqrt()?.sum_all()?.to_scalar::<f32>()? as f64)
            })
            .collect()
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &LayerWeights, adapter: Option<&crate::lora::Adapter>, packed: Packed<'_>) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(&w.gate, adapter, packed)?,
            up_proj: Linear::load(&w.up, adapter, packed)?,
            down_proj: Linear::load(&w.down, adapter, packed)?,
        })
    }
}

impl Mlp {
    /// The gated hidden units `silu(gate x) * up x`, `[B, S, intermediate]`.
    fn units(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let silu = (&g * candle_nn::ops::sigmoid(&g)?)?;
        silu * self.up_proj.forward(x)?
    }

    /// Per hidden unit, `sum over tokens |unit| * ||down_proj column||`: how much it writes into
    /// the residual stream on these tokens.
    fn unit_contributions(&self, units: &Tensor) -> candle_core::Result<Vec<f64>> {
        let column_norms = self.down_proj.weight.sqr()?.sum(0)?.sqrt()?;
        let summed = units.abs()?.flatten_to(1)?.sum(0)?;
        Ok((summed * column_norms)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.down_proj.forward(&self.units(x)?)
    }
}

/// What the units structured pruning can remove contributed on calibration tokens, summed
/// over those tokens; one entry per layer.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnitImportance {
    /// Per layer, per MLP hidden unit (see `Mlp::unit_contributions`).
    pub mlp: Vec<Vec<f64>>,
    /// Per layer, per query head (see `Attention::head_contributions`).
    pub heads: Vec<Vec<f64>>,
    /// Tokens summed over.
    pub tokens: usize,
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(
        l: &LayerWeights,
        adapter: Option<&crate::lora::Adapter>,
        c: &ModelConfig,
        packed: Packed<'_>,
    ) -> Result<Self> {
        Ok(Block {
            input_layernorm: RmsNorm::new(&l.input_norm, c),
            self_attn: Attention::load(l, adapter, c, packed)?,
            post_attention_layernorm: RmsNorm::new(&l.post_attention_norm, c),
            mlp: Mlp::load(l, adapter, packed)?,
        })
    }

    /// The residual stream after this block.
    fn forward(
        &self,
        x: Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let a = self.self_attn.forward(&self.input_layernorm.forward(&x)?, rotary, mask, slot)?;
        let x = (x + a)?;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + m
    }
}

/// A llama-family causal language model.
pub struct LlamaModel {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: Rotary,
}

impl LlamaModel {
    /// Builds the model over a checkpoint's weights (shared, not copied).
    pub fn new(ck: &Checkpoint) -> Result<Self> {
        Self::from_tensors(&ck.config, &ck.tensors)
    }

    /// Builds the model over named weights in transformers' naming.
    pub fn from_tensors(config: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        Self::with_adapter(config, tensors, None)
    }

    /// Builds the model with a LoRA adapter applied on top of the base weights (not merged).
    pub fn with_adapter(
        config: &ModelConfig,
        tensors: &HashMap<String, Tensor>,
        adapter: Option<&crate::lora::Adapter>,
    ) -> Result<Self> {
        Self::build(config, tensors, adapter, None)
    }

    /// Builds the model over a QLoRA base (projections packed, dequantized on the fly) with an
    /// optional LoRA adapter on top.
    pub fn qlora(base: &crate::train::qlora::QuantizedBase, adapter: Option<&crate::lora::Adapter>) -> Result<Self> {
        Self::build(&base.config, &base.tensors, adapter, Some(&base.packed))
    }

    fn build(
        config: &ModelConfig,
        tensors: &HashMap<String, Tensor>,
        adapter: Option<&crate::lora::Adapter>,
        packed: Packed<'_>,
    ) -> Result<Self> {
        let c = config;
        let w = DecoderWeights::from_map(tensors, c)?;
        let layers = w.layers.iter().map(|l| Block::load(l, adapter, c, packed)).collect::<Result<Vec<_>>>()?;
        Ok(LlamaModel {
            rotary: Rotary::new(c, &Device::Cpu)?,
            config: c.clone(),
            lm_head: w.head().clone(),
            norm: RmsNorm::new(&w.final_norm, c),
            embed_tokens: w.embed,
            layers,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A fresh cache with one slot per layer.
    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.layers.len()).map(|_| None).collect() }
    }

    /// Runs `input_ids [B, S]` after the cached positions; returns logits `[B, S, vocab]` and
    /// appends this step's keys and values to `cache`.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        let start = cache.len();
        if start + s > self.config.max_position_embeddings {
            return Err(crate::Error::ContextOverflow {
                positions: start + s,
                context: self.config.max_position_embeddings,
            });
        }
        if cache.layers.len() != self.layers.len() {
            *cache = self.new_cache();
        }
        let mut x = self.embed_tokens.embedding(&input_ids.flatten_all()?)?.reshape((
            input_ids.dims()[0],
            s,
            self.config.hidden_size,
        ))?;
        let masks = layer_masks(&self.config, s, start)?;
        for ((block, slot), mask) in self.layers.iter().zip(cache.layers.iter_mut()).zip(&masks) {
            x = block.forward(x, &self.rotary, mask.as_ref(), slot)?;
        }
        let x = self.norm.forward(&x)?;
        Ok(times_transposed(&x, &self.lm_head)?)
    }

    /// Training forward pass: runs `input_ids [B, S]` from position 0 and returns the logits of
    /// the flat positions `rows` (`b * S + s`) only, `[N, vocab]`; the LM head is applied to
    /// those rows alone.
    pub fn logits_at(&self, input_ids: &Tensor, rows: &Tensor) -> Result<Tensor> {
        Ok(self.run_at(input_ids, rows, false)?.0)
    }

    /// [`Self::logits_at`], and the residual stream after every layer at the same rows: one
    /// `[N, hidden]` per layer.
    pub fn logits_and_states_at(&self, input_ids: &Tensor, rows: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.run_at(input_ids, rows, true)
    }

    fn run_at(&self, input_ids: &Tensor, rows: &Tensor, keep_states: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, s) = input_ids.dims2()?;
        if s > self.config.max_position_embeddings {
            return Err(crate::Error::ContextOverflow { positions: s, context: self.config.max_position_embeddings });
        }
        let h = self.config.hidden_size;
        let mut x = self.embed_tokens.embedding(&input_ids.flatten_all()?)?.reshape((b, s, h))?;
        let masks = layer_masks(&self.config, s, 0)?;
        let mut states = Vec::new();
        for (block, mask) in self.layers.iter().zip(&masks) {
            x = block.forward(x, &self.rotary, mask.as_ref(), &mut None)?;
            if keep_states {
                states.push(x.reshape((b * s, h))?.index_select(rows, 0)?);
            }
        }
        let picked = x.reshape((b * s, h))?.index_select(rows, 0)?;
        let picked = self.norm.forward(&picked)?;
        Ok((times_transposed(&picked, &self.lm_head)?, states))
    }

    /// Adds what every MLP unit and attention head of every layer contributes on
    /// `input_ids [1, S]` (one unpadded sequence) to `acc`.
    pub fn accumulate_importance(&self, input_ids: &Tensor, acc: &mut UnitImportance) -> Result<()> {
        let (b, s) = input_ids.dims2()?;
        if s > self.config.max_position_embeddings {
            return Err(crate::Error::ContextOverflow { positions: s, context: self.config.max_position_embeddings });
        }
        if acc.mlp.is_empty() {
            acc.mlp = self.layers.iter().map(|_| vec![0.0; self.config.intermediate_size]).collect();
            acc.heads = self.layers.iter().map(|_| vec![0.0; self.config.num_attention_heads]).collect();
        }
        let h = self.config.hidden_size;
        let mut x = self.embed_tokens.embedding(&input_ids.flatten_all()?)?.reshape((b, s, h))?;
        let masks = layer_masks(&self.config, s, 0)?;
        for (l, block) in self.layers.iter().enumerate() {
            let attn = &block.self_attn;
            let heads_out =
                attn.heads_out(&block.input_layernorm.forward(&x)?, &self.rotary, masks[l].as_ref(), &mut None)?;
            for (a, c) in acc.heads[l].iter_mut().zip(attn.head_contributions(&heads_out)?) {
                *a += c;
            }
            x = (x + attn.o_proj.forward(&heads_out)?)?;
            let units = block.mlp.units(&block.post_attention_layernorm.forward(&x)?)?;
            for (a, c) in acc.mlp[l].iter_mut().zip(block.mlp.unit_contributions(&units)?) {
                *a += c;
            }
            x = (x + block.mlp.down_proj.forward(&units)?)?;
        }
        acc.tokens += b * s;
        Ok(())
    }

    /// The last position's logits after each of `steps`, run one after another from position
    /// 0 as cached decoding runs them (each step a forward pass over its tokens), with each
    /// layer's weights read by `get` when its turn comes and let go after it: the model is never
    /// whole in memory (the check of an export larger than memory). Every step passes through a
    /// layer before the next layer is read.
    pub fn streamed_logits(c: &ModelConfig, steps: &[Vec<u32>], get: &mut WeightGetter<'_>) -> Result<Vec<Vec<f32>>> {
        let total: usize = steps.iter().map(Vec::len).sum();
        if total > c.max_position_embeddings {
            return Err(crate::Error::ContextOverflow { positions: total, context: c.max_position_embeddings });
        }
        let h = c.hidden_size;
        let embed = get(names::EMBED, &[c.vocab_size, h])?;
        let mut xs = steps
            .iter()
            .map(|ids| Ok(embed.embedding(&Tensor::new(ids.as_slice(), &Device::Cpu)?)?.unsqueeze(0)?))
            .collect::<Result<Vec<Tensor>>>()?;
        // A tied head is the table; an untied one is read at the end.
        let table = c.tie_word_embeddings.then_some(embed);
        let rotary = Rotary::new(c, &Device::Cpu)?;
        // Each step's masks, per layer, made once for all layers.
        let mut start = 0;
        let masks = steps
            .iter()
            .map(|ids| {
                let m = layer_masks(c, ids.len(), start);
                start += ids.len();
                m
            })
            .collect::<Result<Vec<_>>>()?;
        for i in 0..c.num_hidden_layers {
            let block = Block::load(&LayerWeights::read(c, i, get)?, None, c, None)?;
            let mut slot = None;
            for (x, step_masks) in xs.iter_mut().zip(&masks) {
                *x = block.forward(x.clone(), &rotary, step_masks[i].as_ref(), &mut slot)?;
            }
        }
        let norm = RmsNorm::new(&get(names::FINAL_NORM, &[h])?, c);
        let head = match table {
            Some(t) => t,
            None => get(names::LM_HEAD, &[c.vocab_size, h])?,
        };
        xs.iter()
            .map(|x| {
                let last = x.narrow(1, x.dims()[1] - 1, 1)?;
                Ok(times_transposed(&norm.forward(&last)?, &head)?.flatten_all()?.to_vec1::<f32>()?)
            })
            .collect()
    }
}

/// Each layer's mask for a pass over `s` positions after `start`: at most two tensors (windowed
/// and full), shared.
fn layer_masks(c: &ModelConfig, s: usize, start: usize) -> Result<Vec<Option<Tensor>>> {
    let every = causal_mask(c.sliding_window, s, start)?;
    if c.full_attention_layers.is_empty() {
        return Ok(vec![every; c.num_hidden_layers]);
    }
    let full = causal_mask(None, s, start)?;
    Ok((0..c.num_hidden_layers)
        .map(|i| if c.layer_window(i).is_some() { every.clone() } else { full.clone() })
        .collect())
}

/// Additive mask `[S, start + S]`: causal, and limited to the sliding window when the model has
/// one. None when no position needs masking (single-token steps without a window).
fn causal_mask(window: Option<usize>, s: usize, start: usize) -> Result<Option<Tensor>> {
    if s == 1 && window.is_none_or(|w| start < w) {
        return Ok(None);
    }
    let t = start + s;
    let mut m = vec![0f32; s * t];
    for i in 0..s {
        let pos = start + i;
        for j in 0..t {
            let too_far = window.is_some_and(|w| pos >= j + w);
            if j > pos || too_far {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (s, t), &Device::Cpu)?))
}

impl LlamaModel {
    /// Greedy continuation of `prompt` for `n` tokens using the KV cache (reference decoding).
    pub fn greedy(&self, prompt: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>> {
        let mut cache = self.new_cache();
        let mut out = Vec::with_capacity(n);
        let mut input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
        for _ in 0..n {
            let logits = self.forward(&input, &mut cache)?;
            let last = logits.squeeze(0)?.get(logits.dims()[1] - 1)?.to_dtype(DType::F32)?;
            let next = last.argmax(0)?.to_scalar::<u32>()?;
            out.push(next);
            if stop.contains(&next) {
                break;
            }
            input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
        }
        Ok(out)
    }
}
