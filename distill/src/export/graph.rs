//! The llama-family decoder as an ONNX graph on ONNX Runtime's fused CPU operators.
//!
//! Per layer: `SkipSimplifiedLayerNormalization` (residual add + RMSNorm in one kernel), one
//! packed q/k/v `MatMul`, `GroupQueryAttention` with rotary embedding and the KV cache inside,
//! the output projection, a second skip-norm and the SwiGLU MLP. Inputs and outputs carry
//! onnxruntime-genai's names so genai runs the graph unchanged.
//!
//! Shapes: `input_ids [batch, seq]`, `attention_mask [batch, total]` (int64),
//! `past_key_values.N.key|value [batch, kv_heads, past, head_dim]` ->
//! `logits [batch, seq|1, vocab]`, `present.N.key|value [batch, kv_heads, total, head_dim]`.
//! When past and present are bound to one buffer (genai's `past_present_share_buffer`), that
//! buffer's length is the sequence capacity and present has the same shape as past. The cache's
//! `head_dim` is the checkpoint's rounded up to a multiple of 16 (`cache_head_size`).

use std::collections::HashMap;

use candle_core::Tensor;

use super::{flat, transposed};
use crate::checkpoint::index::WeightIndex;
use crate::checkpoint::{names, weight, DecoderWeights, LayerWeights, ModelConfig, Projection};
use crate::error::{Error, IoContext, Result};
use crate::onnx::{AttributeProto as Attr, DataType, Dim, GraphBuilder, ModelProto, MS_DOMAIN};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogitsMode {
    /// Only the last position: prefill skips the LM head for every other token.
    Last,
    /// Every position (needed for perplexity over a sequence).
    All,
}

fn sym(s: &str) -> Dim {
    Dim::Symbolic(s.into())
}

/// Where the graph's weights come from.
pub(crate) enum Weights<'a> {
    /// A checkpoint's weights in memory, each layer's let go once the graph has it.
    Loaded(HashMap<String, Tensor>),
    /// A checkpoint's index: each weight read when the graph needs it (for models larger than
    /// memory, with the graph's weights spilling to disk).
    Indexed(&'a WeightIndex),
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Weights::Loaded(map) => weight(map, name, shape).cloned(),
            Weights::Indexed(index) => index.read(name, shape),
        }
    }

    fn layer(&self, c: &ModelConfig, i: usize) -> Result<LayerWeights> {
        LayerWeights::read(c, i, &mut |name, shape| self.get(name, shape))
    }

    /// Lets go of weights the graph holds now (those loaded whose names start with `prefix`).
    fn let_go(&mut self, prefix: &str) {
        if let Weights::Loaded(map) = self {
            map.retain(|name, _| !name.starts_with(prefix));
        }
    }
}

/// Builds the graph for a checkpoint's configuration and weights: inputs and outputs, the mask
/// bookkeeping, the embedding, then per layer attention, skip-norm, MLP, skip-norm, and the LM
/// head. Each layer's weights are let go once copied into the graph, so where the caller gave
/// up its own references the weights are held about once, not twice; read from an index into a
/// builder that spills, one layer's at a time. The caller has refused what the graph cannot
/// express ([`check_expressible`]).
pub(crate) fn build_decoder(
    c: &ModelConfig,
    mut weights: Weights<'_>,
    logits: LogitsMode,
    spill: Option<(&std::path::Path, DataType)>,
) -> Result<ModelProto> {
    if let Weights::Loaded(map) = &mut weights {
        // Every weight checked before any work is done, and what the decoder does not read let
        // go now.
        let mut used = std::collections::HashSet::new();
        let all = &*map;
        DecoderWeights::read(c, &mut |name, shape| {
            used.insert(name.to_owned());
            weight(all, name, shape).cloned()
        })?;
        map.retain(|name, _| used.contains(name));
    }
    let mut g = GraphBuilder::new("edgelm-decoder");
    if let Some((path, elem)) = spill {
        let location = path.file_name().and_then(|n| n.to_str()).unwrap_or("weights.spill");
        g.spill_weights(path, location, elem).at(path)?;
    }
    declare_io(&mut g, c, logits);
    let shared = attention_inputs(&mut g, c);
    let h = c.hidden_size;

    g.set_scope("/model/embed_tokens");
    // The table is the largest tensor: copied once into the graph, not through a Vec first.
    let embed = weights.get(names::EMBED, &[c.vocab_size, h])?;
    let embed_name = with_values(&embed, |v| g.init_weight(names::EMBED, &[c.vocab_size, h], v))?;
    drop(embed);
    weights.let_go(names::EMBED);
    let mut residual = g.op("Gather", &[&embed_name, "input_ids"], vec![Attr::int("axis", 0)]);
    let first_input_norm = weights.get(&names::in_layer(0, names::INPUT_NORM), &[h])?;
    let mut x = first_norm(&mut g, c, &shared.norm, &first_input_norm, &residual)?;

    let layers = c.num_hidden_layers;
    for i in 0..layers {
        let layer = &weights.layer(c, i)?;
        let attn = attention(&mut g, c, i, layer, &x, &shared)?;
        let (normed, r) = skip_norm(
            &mut g,
            c,
            &format!("/model/layers.{i}/post_attention_layernorm"),
            (&names::in_layer(i, names::POST_ATTENTION_NORM), &layer.post_attention_norm),
            (&attn, &residual),
            &[1, 2],
        )?;
        residual = r;
        let down = mlp(&mut g, i, layer, &normed)?;
        // The next layer's input norm, or the final norm (whose residual output is unused).
        let (scope, norm_name, unused): (String, String, &[usize]) = if i + 1 < layers {
            (format!("/model/layers.{}/input_layernorm", i + 1), names::in_layer(i + 1, names::INPUT_NORM), &[1, 2])
        } else {
            ("/model/norm".to_owned(), names::FINAL_NORM.to_owned(), &[1, 2, 3])
        };
        let norm = weights.get(&norm_name, &[h])?;
        let (next, r) = skip_norm(&mut g, c, &scope, (&norm_name, &norm), (&down, &residual), unused)?;
        x = next;
        residual = r;
        weights.let_go(&format!("model.layers.{i}."));
    }
    let head = if c.tie_word_embeddings { None } else { Some(weights.get(names::LM_HEAD, &[c.vocab_size, h])?) };
    drop(weights);
    lm_head(&mut g, c, head.as_ref(), &x, &embed_name, logits, &shared.axis1)?;
    drop(head);
    if let Some((path, _)) = spill {
        g.finish_spill().at(path)?;
    }

    // Past protobuf's 2 GiB the weights go to a data file beside the graph (`write_model`).
    Ok(g.finish(21, Some(1), env!("CARGO_PKG_VERSION")))
}

/// Calls `f` with a tensor's values in row-major order: in place where they lie that way in
/// memory, else from a copy.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(f(&v[start..end]));
    }
    drop(storage);
    Ok(f(&flat(t)?))
}

/// GroupQueryAttention's `local_window_size` for the model's sliding window (-1: none). Each
/// position then attends to the window's last `sliding_window` positions, itself included, as
/// transformers masks them (checked against the candle model step by step at every export).
fn gqa_window(c: &ModelConfig, layer: usize) -> i64 {
    c.layer_window(layer).map_or(-1, |w| w as i64)
}

/// Refuses a configuration the graph cannot express, before any work is done on its weights.
pub(crate) fn check_expressible(c: &ModelConfig) -> Result<()> {
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        return Err(Error::InvalidConfig {
            what: format!("head_dim {} is not a positive even number, which rotary embedding needs", c.head_dim),
        });
    }
    Ok(())
}

/// Graph inputs and outputs with onnxruntime-genai's names and shapes.
fn declare_io(g: &mut GraphBuilder, c: &ModelConfig, logits: LogitsMode) {
    g.input("input_ids", DataType::Int64, &[sym("batch_size"), sym("sequence_length")]);
    g.input("attention_mask", DataType::Int64, &[sym("batch_size"), sym("total_sequence_length")]);
    let kv = |len: &str| {
        [sym("batch_size"), Dim::Fixed(c.num_key_value_heads as i64), sym(len), Dim::Fixed(cache_head_size(c) as i64)]
    };
    for i in 0..c.num_hidden_layers {
        for kind in ["key", "value"] {
            g.input(&format!("past_key_values.{i}.{kind}"), DataType::Float, &kv("past_sequence_length"));
        }
    }
    let seq_out = match logits {
        LogitsMode::Last => Dim::Fixed(1),
        LogitsMode::All => sym("sequence_length"),
    };
    g.output("logits", DataType::Float, &[sym("batch_size"), seq_out, Dim::Fixed(c.vocab_size as i64)]);
    for i in 0..c.num_hidden_layers {
        for kind in ["key", "value"] {
            g.output(&format!("present.{i}.{kind}"), DataType::Float, &kv("total_sequence_length"));
        }
    }
}

/// What every layer's attention reads besides its own weights.
struct AttentionInputs {
    /// Valid length minus one per sequence (int32), from the mask.
    seqlens_k: String,
    /// Total sequence length (int32 scalar), from the mask's shape.
    total: String,
    /// Rotary tables.
    cos: String,
    sin: String,
    /// The constant `[1]` (axis 1), also used by the LM head's slice.
    axis1: String,
    /// Constants of the RMSNorms written as plain operators.
    norm: NormConstants,
}

/// The constants an RMSNorm in plain operators reads: the exponent 2, epsilon, the last axis.
struct NormConstants {
    two: String,
    eps: String,
    axis_last: String,
}

/// The mask bookkeeping shared by every layer, computed as genai's models do, and the rotary
/// tables.
fn attention_inputs(g: &mut GraphBuilder, c: &ModelConfig) -> AttentionInputs {
    g.set_scope("/model/attn_mask_reformat");
    let one = g.init_i64("/model/constants/one", &[], &[1]);
    let axis1 = g.init_i64("/model/constants/axes_1", &[1], &[1]);
    let sum = g.op("ReduceSum", &["attention_mask", &axis1], vec![Attr::int("keepdims", 0)]);
    let minus_one = g.op("Sub", &[&sum, &one], vec![]);
    let seqlens_k = g.op("Cast", &[&minus_one], vec![Attr::int("to", DataType::Int32 as i64)]);
    let shape = g.op("Shape", &["attention_mask"], vec![]);
    let total = g.op("Gather", &[&shape, &one], vec![Attr::int("axis", 0)]);
    let total = g.op("Cast", &[&total], vec![Attr::int("to", DataType::Int32 as i64)]);
    let (cos, sin) = rotary_tables(g, c, &seqlens_k, &one);
    let norm = NormConstants {
        two: g.init_f32("/model/constants/two", &[], &[2.0]),
        eps: g.init_f32("/model/constants/rms_eps", &[], &[c.rms_norm_eps as f32]),
        axis_last: g.init_i64("/model/constants/axes_last", &[1], &[-1]),
    };
    AttentionInputs { seqlens_k, total, cos, sin, axis1, norm }
}

/// The rotary tables GroupQueryAttention reads, `[positions, cache_head_size / 2]` each.
/// LongRoPE stacks its short and long tables and picks one per run: the long one when the
/// longest sequence (largest `seqlens_k`, plus one) is past the original context, as
/// transformers picks on the largest position id.
fn rotary_tables(g: &mut GraphBuilder, c: &ModelConfig, seqlens_k: &str, one: &str) -> (String, String) {
    let positions = c.max_position_embeddings;
    let half = cache_head_size(c) / 2;
    let short = c.rope.table(c.head_dim, positions);
    let (cos, sin) = (padded_rotary_table(c, &short.cos, 1.0), padded_rotary_table(c, &short.sin, 0.0));
    let Some(long) = c.rope.long_table(c.head_dim, positions) else {
        let cos = g.init_f32("cos_cache", &[positions, half], &cos);
        let sin = g.init_f32("sin_cache", &[positions, half], &sin);
        return (cos, sin);
    };
    let stacked = |first: Vec<f32>, second: Vec<f32>| [first, second].concat();
    let cos = stacked(cos, padded_rotary_table(c, &long.table.cos, 1.0));
    let sin = stacked(sin, padded_rotary_table(c, &long.table.sin, 0.0));
    let cos = g.init_f32("cos_cache_short_long", &[2, positions, half], &cos);
    let sin = g.init_f32("sin_cache_short_long", &[2, positions, half], &sin);
    g.set_scope("/model/rotary_switch");
    let longest = g.op("ReduceMax", &[seqlens_k], vec![Attr::int("keepdims", 0)]);
    let longest = g.op("Cast", &[&longest], vec![Attr::int("to", DataType::Int64 as i64)]);
    let longest = g.op("Add", &[&longest, one], vec![]);
    let after = g.init_i64("/model/constants/rope_original_context", &[], &[long.after as i64]);
    let past = g.op("Greater", &[&longest, &after], vec![]);
    let which = g.op("Cast", &[&past], vec![Attr::int("to", DataType::Int64 as i64)]);
    let cos = g.op("Gather", &[&cos, &which], vec![Attr::int("axis", 0)]);
    let sin = g.op("Gather", &[&sin, &which], vec![Attr::int("axis", 0)]);
    g.set_scope("/model/attn_mask_reformat");
    (cos, sin)
}

/// The head size of the graph's attention and KV cache: the checkpoint's `head_dim` rounded up
/// to a multiple of 16, the only sizes ONNX Runtime's GroupQueryAttention rotates. Heads of
/// other sizes (4 in transformers' tiny test models, 72, 24) are padded with zeros in the
/// graph; the weights keep their shapes.
pub(crate) fn cache_head_size(c: &ModelConfig) -> usize {
    c.head_dim.div_ceil(16) * 16
}

/// A rotary table `[positions, head_dim / 2]` widened to `[positions, cache_head_size / 2]`:
/// the padded columns rotate zeros, so any value does; `fill` (cos 1, sin 0) leaves them alone.
fn padded_rotary_table(c: &ModelConfig, table: &[f32], fill: f32) -> Vec<f32> {
    let (half, padded) = (c.head_dim / 2, cache_head_size(c) / 2);
    if half == padded {
        return table.to_vec();
    }
    let mut out = Vec::with_capacity(table.len() / half * padded);
    for row in table.chunks_exact(half) {
        out.extend_from_slice(row);
        out.resize(out.len() + padded - half, fill);
    }
    out
}

/// The first RMSNorm, which has no residual to add (kept standard so onnx.checker accepts the
/// file).
fn first_norm(
    g: &mut GraphBuilder,
    c: &ModelConfig,
    k: &NormConstants,
    weight: &Tensor,
    input: &str,
) -> Result<String> {
    g.set_scope("/model/layers.0/input_layernorm");
    let w0 = g.init_f32(&names::in_layer(0, names::INPUT_NORM), &[c.hidden_size], &flat(weight)?);
    Ok(rms_norm(g, k, &w0, input))
}

/// RMSNorm over the last axis of `input` in plain operators, the pattern ONNX Runtime fuses
/// into one SimplifiedLayerNormalization kernel.
fn rms_norm(g: &mut GraphBuilder, k: &NormConstants, weight: &str, input: &str) -> String {
    let sq = g.op("Pow", &[input, &k.two], vec![]);
    let mean = g.op("ReduceMean", &[&sq, &k.axis_last], vec![Attr::int("keepdims", 1)]);
    let plus = g.op("Add", &[&mean, &k.eps], vec![]);
    let root = g.op("Sqrt", &[&plus], vec![]);
    let normed = g.op("Div", &[input, &root], vec![]);
    g.op("Mul", &[&normed, weight], vec![])
}

/// Layer `i`'s attention: packed q/k/v projection, GroupQueryAttention (rotary and the KV cache
/// inside), output projection. Returns the projected output.
fn attention(
    g: &mut GraphBuilder,
    c: &ModelConfig,
    i: usize,
    layer: &LayerWeights,
    x: &str,
    shared: &AttentionInputs,
) -> Result<String> {
    let h = c.hidden_size;
    let p = names::layer(i);
    g.set_scope(format!("/model/layers.{i}/attn"));
    let qkv_dim = c.q_dim() + 2 * c.kv_dim();
    let qkv = Tensor::cat(&[&layer.q.weight, &layer.k.weight, &layer.v.weight], 0)?;
    let wqkv = g.init_weight(&format!("{p}.self_attn.qkv_proj.MatMul.weight"), &[h, qkv_dim], &transposed(&qkv)?);
    let mut packed = g.op("MatMul", &[x, &wqkv], vec![]);
    if let (Some(bq), Some(bk), Some(bv)) = (&layer.q.bias, &layer.k.bias, &layer.v.bias) {
        let bias = [bq, bk, bv];
        let b = g.init_f32(&format!("{p}.self_attn.qkv_proj.bias"), &[qkv_dim], &flat(&Tensor::cat(&bias, 0)?)?);
        packed = g.op("Add", &[&packed, &b], vec![]);
    }
    let padded = cache_head_size(c) != c.head_dim;
    let attn_out = format!("/model/layers.{i}/attn/GroupQueryAttention/output_0");
    // GroupQueryAttention takes q/k/v packed unless something happens to them between the
    // projection and the rotary embedding it applies.
    let (q, k, v) = if padded || layer.qk_norm.is_some() {
        let sizes = g.init_i64(
            &format!("/model/layers.{i}/attn/qkv_split_sizes"),
            &[3],
            &[c.q_dim() as i64, c.kv_dim() as i64, c.kv_dim() as i64],
        );
        let parts = g.node("Split", "", &[&packed, &sizes], 3, vec![Attr::int("axis", -1)]);
        let (mut q, mut k, v) = (parts[0].clone(), parts[1].clone(), parts[2].clone());
        if let Some((q_norm, k_norm)) = &layer.qk_norm {
            q = head_norm(g, c, i, names::Q_NORM, q_norm, &q, c.num_attention_heads, &shared.norm)?;
            k = head_norm(g, c, i, names::K_NORM, k_norm, &k, c.num_key_value_heads, &shared.norm)?;
        }
        if padded {
            pad_heads(g, c, i, [q, k, v])
        } else {
            (q, k, v)
        }
    } else {
        (packed, String::new(), String::new())
    };
    let AttentionInputs { seqlens_k, total, cos, sin, .. } = shared;
    g.node_named(
        "GroupQueryAttention",
        MS_DOMAIN,
        &[
            &q,
            &k,
            &v,
            &format!("past_key_values.{i}.key"),
            &format!("past_key_values.{i}.value"),
            seqlens_k,
            total,
            cos,
            sin,
        ],
        &[&attn_out, &format!("present.{i}.key"), &format!("present.{i}.value")],
        vec![
            Attr::int("num_heads", c.num_attention_heads as i64),
            Attr::int("kv_num_heads", c.num_key_value_heads as i64),
            Attr::float("scale", 1.0 / (c.head_dim as f32).sqrt()),
            Attr::int("do_rotary", 1),
            Attr::int("rotary_interleaved", 0),
            Attr::int("local_window_size", gqa_window(c, i)),
        ],
    );
    let heads_out = if padded { unpad_heads(g, c, i, &attn_out) } else { attn_out };
    projection(g, &format!("{p}.self_attn.o_proj"), &layer.o, &heads_out)
}

/// RMSNorm over each of the `heads` heads of `x` `[batch, seq, heads * head_dim]` with the
/// layer's weight `[head_dim]` named `name` (Qwen3's q_norm and k_norm).
#[allow(clippy::too_many_arguments)]
fn head_norm(
    g: &mut GraphBuilder,
    c: &ModelConfig,
    i: usize,
    name: &str,
    weight: &Tensor,
    x: &str,
    heads: usize,
    k: &NormConstants,
) -> Result<String> {
    let d = c.head_dim as i64;
    let full = names::in_layer(i, name);
    let w = g.init_f32(&full, &[c.head_dim], &flat(weight)?);
    let split = g.init_i64(&format!("{full}/heads_shape"), &[4], &[0, 0, heads as i64, d]);
    let joined = g.init_i64(&format!("{full}/joined_shape"), &[3], &[0, 0, heads as i64 * d]);
    let x = g.op("Reshape", &[x, &split], vec![]);
    // The norm's own scope names it for the fp16 conversion, which keeps it in fp32
    // (`HEAD_NORM_SCOPES`): squares of unnormalised heads overflow fp16.
    let short = if name == names::Q_NORM { "q_norm" } else { "k_norm" };
    g.set_scope(format!("/model/layers.{i}/attn/{short}"));
    let x = rms_norm(g, k, &w, &x);
    g.set_scope(format!("/model/layers.{i}/attn"));
    Ok(g.op("Reshape", &[&x, &joined], vec![]))
}

/// Name parts of the nodes of Qwen3's head norms, which fp16 bundles compute in fp32.
pub(crate) const HEAD_NORM_SCOPES: [&str; 2] = ["/attn/q_norm/", "/attn/k_norm/"];

/// Pads every head of the split q, k and v from `head_dim` to `cache_head_size` with zeros.
/// Query and key heads are padded half by half, since rotary embedding pairs element `j` with
/// `j + size / 2`; value heads at their end. Zeros change no attention score, and the padded
/// columns of the output are dropped by `unpad_heads`.
fn pad_heads(g: &mut GraphBuilder, c: &ModelConfig, i: usize, [q, k, v]: [String; 3]) -> (String, String, String) {
    let (d, size) = (c.head_dim as i64, cache_head_size(c) as i64);
    let (heads, kv_heads) = (c.num_attention_heads as i64, c.num_key_value_heads as i64);
    let scope = format!("/model/layers.{i}/attn/pad_heads");
    let mut pad = |x: &str, n: i64, halves: i64, what: &str| {
        let split = g.init_i64(&format!("{scope}/{what}_split_shape"), &[5], &[0, 0, n, halves, d / halves]);
        let pads =
            g.init_i64(&format!("{scope}/{what}_pads"), &[10], &[0, 0, 0, 0, 0, 0, 0, 0, 0, (size - d) / halves]);
        let joined = g.init_i64(&format!("{scope}/{what}_joined_shape"), &[3], &[0, 0, n * size]);
        let x = g.op("Reshape", &[x, &split], vec![]);
        let x = g.op("Pad", &[&x, &pads], vec![]);
        g.op("Reshape", &[&x, &joined], vec![])
    };
    (pad(&q, heads, 2, "query"), pad(&k, kv_heads, 2, "key"), pad(&v, kv_heads, 1, "value"))
}

/// Drops the padded columns of every head of the attention output (`pad_heads`).
fn unpad_heads(g: &mut GraphBuilder, c: &ModelConfig, i: usize, attn: &str) -> String {
    let (d, size, heads) = (c.head_dim as i64, cache_head_size(c) as i64, c.num_attention_heads as i64);
    let scope = format!("/model/layers.{i}/attn/unpad_heads");
    let split = g.init_i64(&format!("{scope}/heads_shape"), &[4], &[0, 0, heads, size]);
    let zero = g.init_i64(&format!("{scope}/start"), &[1], &[0]);
    let end = g.init_i64(&format!("{scope}/end"), &[1], &[d]);
    let last = g.init_i64(&format!("{scope}/axis"), &[1], &[-1]);
    let joined = g.init_i64(&format!("{scope}/joined_shape"), &[3], &[0, 0, heads * d]);
    let x = g.op("Reshape", &[attn, &split], vec![]);
    let x = g.op("Slice", &[&x, &zero, &end, &last], vec![]);
    g.op("Reshape", &[&x, &joined], vec![])
}

/// Residual add + RMSNorm in one SkipSimplifiedLayerNormalization under `scope` with the weight
/// `weight`; `unused` outputs are blanked. Returns (normed, new residual).
fn skip_norm(
    g: &mut GraphBuilder,
    c: &ModelConfig,
    scope: &str,
    (name, weight): (&str, &Tensor),
    (input, residual): (&str, &str),
    unused: &[usize],
) -> Result<(String, String)> {
    let h = c.hidden_size;
    g.set_scope(scope);
    let w = g.init_f32(name, &[h], &flat(weight)?);
    let eps = Attr::float("epsilon", c.rms_norm_eps as f32);
    let outs = g.node("SkipSimplifiedLayerNormalization", MS_DOMAIN, &[input, residual, &w], 4, vec![eps]);
    let (normed, residual) = (outs[0].clone(), outs[3].clone());
    blank_outputs(g, unused);
    Ok((normed, residual))
}

/// Layer `i`'s SwiGLU MLP: down(silu(gate(x)) * up(x)). Gate and up read the same input, so
/// they are one matrix `[hidden, 2 * intermediate]` and one kernel call (split after), which
/// saves a call per layer in decode and gives prefill a wider matrix.
fn mlp(g: &mut GraphBuilder, i: usize, layer: &LayerWeights, normed: &str) -> Result<String> {
    let p = format!("{}.mlp", names::layer(i));
    g.set_scope(format!("/model/layers.{i}/mlp"));
    let inter = layer.gate.weight.dims()[0];
    let packed = Projection {
        name: format!("{p}.gate_up_proj"),
        weight: Tensor::cat(&[&layer.gate.weight, &layer.up.weight], 0)?,
        bias: match (&layer.gate.bias, &layer.up.bias) {
            (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
            _ => None,
        },
    };
    let gate_up = projection(g, &format!("{p}.gate_up_proj"), &packed, normed)?;
    let sizes = g.init_i64(&format!("/model/layers.{i}/mlp/split_sizes"), &[2], &[inter as i64, inter as i64]);
    let halves = g.node("Split", "", &[&gate_up, &sizes], 2, vec![Attr::int("axis", -1)]);
    let (gate, up) = (halves[0].clone(), halves[1].clone());
    let sig = g.op("Sigmoid", &[&gate], vec![]);
    let silu = g.op("Mul", &[&gate, &sig], vec![]);
    let act = g.op("Mul", &[&silu, &up], vec![]);
    projection(g, &format!("{p}.down_proj"), &layer.down, &act)
}

/// `input` times a projection's weight (stored transposed, `[in, out]`, for `MatMul`), plus its
/// bias when it has one; initializers are named `{prefix}.MatMul.weight` and `{prefix}.bias`.
fn projection(g: &mut GraphBuilder, prefix: &str, proj: &Projection, input: &str) -> Result<String> {
    let (out_dim, in_dim) = proj.weight.dims2()?;
    let w = g.init_weight(&format!("{prefix}.MatMul.weight"), &[in_dim, out_dim], &transposed(&proj.weight)?);
    let mut y = g.op("MatMul", &[input, &w], vec![]);
    if let Some(bias) = &proj.bias {
        let b = g.init_f32(&format!("{prefix}.bias"), &[out_dim], &flat(bias)?);
        y = g.op("Add", &[&y, &b], vec![]);
    }
    Ok(y)
}

/// The LM head as Gemm with transB over the `[vocab, hidden]` matrix, so a tied head shares the
/// embedding initializer instead of storing a transposed copy; writes the `logits` output.
fn lm_head(
    g: &mut GraphBuilder,
    c: &ModelConfig,
    head: Option<&Tensor>,
    x: &str,
    embed_name: &str,
    logits: LogitsMode,
    axis1: &str,
) -> Result<()> {
    let h = c.hidden_size;
    g.set_scope("/lm_head");
    let mut x = x.to_owned();
    if logits == LogitsMode::Last {
        let start = g.init_i64("/model/constants/minus_one", &[1], &[-1]);
        let end = g.init_i64("/model/constants/int64_max", &[1], &[i64::MAX]);
        x = g.op("Slice", &[&x, &start, &end, axis1], vec![]);
    }
    let head_name = match head {
        None => embed_name.to_owned(),
        Some(head) => with_values(head, |v| g.init_weight(names::LM_HEAD, &[c.vocab_size, h], v))?,
    };
    let shape_2d = g.init_i64("/model/constants/shape_rows_hidden", &[2], &[-1, h as i64]);
    let rows = g.op("Reshape", &[&x, &shape_2d], vec![]);
    let flat_logits = g.op("Gemm", &[&rows, &head_name], vec![Attr::int("transB", 1)]);
    // Back to [batch, seq, vocab]: batch and seq from the normed activations' shape.
    let x_shape = g.op("Shape", &[&x], vec![]);
    let zero_one = g.init_i64("/model/constants/range_0_2", &[2], &[0, 1]);
    let bs = g.op("Gather", &[&x_shape, &zero_one], vec![Attr::int("axis", 0)]);
    let vocab = g.init_i64("/model/constants/vocab", &[1], &[c.vocab_size as i64]);
    let out_shape = g.op("Concat", &[&bs, &vocab], vec![Attr::int("axis", 0)]);
    g.node_named("Reshape", "", &[&flat_logits, &out_shape], &["logits"], vec![]);
    Ok(())
}

/// Marks optional outputs of the most recent node as not produced.
fn blank_outputs(g: &mut GraphBuilder, idx: &[usize]) {
    g.with_last_node(|n| {
        for &i in idx {
            n.output[i].clear();
        }
        while n.output.last().is_some_and(|s| s.is_empty()) {
            n.output.pop();
        }
    });
}
