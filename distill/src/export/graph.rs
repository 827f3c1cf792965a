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
//! buffer's length is the sequence capacity and present has the same shape as past.

use candle_core::Tensor;

use super::{flat, transposed};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
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

/// Builds the graph for a checkpoint.
pub(crate) fn build_decoder(ck: &Checkpoint, logits: LogitsMode) -> Result<ModelProto> {
    let c = &ck.config;
    if c.sliding_window.is_some() {
        return Err(Error::Unsupported {
            what:
                "sliding-window attention in export; set sliding_window to null if the model never exceeds its window"
                    .into(),
        });
    }
    if !c.head_dim.is_multiple_of(16) {
        return Err(Error::InvalidConfig {
            what: format!(
                "head_dim {} is not a multiple of 16, which ONNX Runtime's rotary attention needs",
                c.head_dim
            ),
        });
    }
    let (h, layers) = (c.hidden_size, c.num_hidden_layers);
    let mut g = GraphBuilder::new("edgelm-decoder");
    g.input("input_ids", DataType::Int64, &[sym("batch_size"), sym("sequence_length")]);
    g.input("attention_mask", DataType::Int64, &[sym("batch_size"), sym("total_sequence_length")]);
    let kv_past = [
        sym("batch_size"),
        Dim::Fixed(c.num_key_value_heads as i64),
        sym("past_sequence_length"),
        Dim::Fixed(c.head_dim as i64),
    ];
    let kv_present = [
        sym("batch_size"),
        Dim::Fixed(c.num_key_value_heads as i64),
        sym("total_sequence_length"),
        Dim::Fixed(c.head_dim as i64),
    ];
    for i in 0..layers {
        for kind in ["key", "value"] {
            g.input(&format!("past_key_values.{i}.{kind}"), DataType::Float, &kv_past);
        }
    }
    let seq_out = match logits {
        LogitsMode::Last => Dim::Fixed(1),
        LogitsMode::All => sym("sequence_length"),
    };
    g.output("logits", DataType::Float, &[sym("batch_size"), seq_out, Dim::Fixed(c.vocab_size as i64)]);
    for i in 0..layers {
        for kind in ["key", "value"] {
            g.output(&format!("present.{i}.{kind}"), DataType::Float, &kv_present);
        }
    }

    // Attention bookkeeping shared by every layer, computed from the mask as genai's models do.
    g.set_scope("/model/attn_mask_reformat");
    let one = g.init_i64("/model/constants/one", &[], &[1]);
    let axis1 = g.init_i64("/model/constants/axes_1", &[1], &[1]);
    let sum = g.op("ReduceSum", &["attention_mask", &axis1], vec![Attr::int("keepdims", 0)]);
    let minus_one = g.op("Sub", &[&sum, &one], vec![]);
    let seqlens_k = g.op("Cast", &[&minus_one], vec![Attr::int("to", DataType::Int32 as i64)]);
    let shape = g.op("Shape", &["attention_mask"], vec![]);
    let total = g.op("Gather", &[&shape, &one], vec![Attr::int("axis", 0)]);
    let total = g.op("Cast", &[&total], vec![Attr::int("to", DataType::Int32 as i64)]);

    let (cos, sin) = c.rope.cos_sin(c.head_dim, c.max_position_embeddings);
    let cos = g.init_f32("cos_cache", &[c.max_position_embeddings, c.head_dim / 2], &cos);
    let sin = g.init_f32("sin_cache", &[c.max_position_embeddings, c.head_dim / 2], &sin);

    g.set_scope("/model/embed_tokens");
    let embed = ck.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let embed_name = g.init_f32("model.embed_tokens.weight", &[c.vocab_size, h], &flat(embed)?);
    let mut residual = g.op("Gather", &[&embed_name, "input_ids"], vec![Attr::int("axis", 0)]);

    // The first norm has no residual to add: plain ops in the pattern ORT fuses into one
    // SimplifiedLayerNormalization (kept standard so onnx.checker accepts the file).
    g.set_scope("/model/layers.0/input_layernorm");
    let w0 = ck.get("model.layers.0.input_layernorm.weight", &[h])?;
    let w0 = g.init_f32("model.layers.0.input_layernorm.weight", &[h], &flat(w0)?);
    let two = g.init_f32("/model/constants/two", &[], &[2.0]);
    let eps = g.init_f32("/model/constants/rms_eps", &[], &[c.rms_norm_eps as f32]);
    let axis_last = g.init_i64("/model/constants/axes_last", &[1], &[-1]);
    let sq = g.op("Pow", &[&residual, &two], vec![]);
    let mean = g.op("ReduceMean", &[&sq, &axis_last], vec![Attr::int("keepdims", 1)]);
    let plus = g.op("Add", &[&mean, &eps], vec![]);
    let root = g.op("Sqrt", &[&plus], vec![]);
    let normed = g.op("Div", &[&residual, &root], vec![]);
    let mut x = g.op("Mul", &[&normed, &w0], vec![]);

    let eps_attr = || Attr::float("epsilon", c.rms_norm_eps as f32);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        // Attention.
        g.set_scope(format!("/model/layers.{i}/attn"));
        let q = ck.get(&format!("{p}.self_attn.q_proj.weight"), &[c.q_dim(), h])?;
        let k = ck.get(&format!("{p}.self_attn.k_proj.weight"), &[c.kv_dim(), h])?;
        let v = ck.get(&format!("{p}.self_attn.v_proj.weight"), &[c.kv_dim(), h])?;
        let qkv_dim = c.q_dim() + 2 * c.kv_dim();
        let qkv = Tensor::cat(&[q, k, v], 0)?;
        let wqkv = g.init_f32(&format!("{p}.self_attn.qkv_proj.MatMul.weight"), &[h, qkv_dim], &transposed(&qkv)?);
        let mut packed = g.op("MatMul", &[&x, &wqkv], vec![]);
        if c.qkv_bias {
            let bias: Vec<Tensor> = ["q", "k", "v"]
                .iter()
                .zip([c.q_dim(), c.kv_dim(), c.kv_dim()])
                .map(|(n, d)| ck.get(&format!("{p}.self_attn.{n}_proj.bias"), &[d]).cloned())
                .collect::<Result<_>>()?;
            let b = g.init_f32(&format!("{p}.self_attn.qkv_proj.bias"), &[qkv_dim], &flat(&Tensor::cat(&bias, 0)?)?);
            packed = g.op("Add", &[&packed, &b], vec![]);
        }
        let past_k = format!("past_key_values.{i}.key");
        let past_v = format!("past_key_values.{i}.value");
        let present_k = format!("present.{i}.key");
        let present_v = format!("present.{i}.value");
        let attn_out = format!("/model/layers.{i}/attn/GroupQueryAttention/output_0");
        g.node_named(
            "GroupQueryAttention",
            MS_DOMAIN,
            &[&packed, "", "", &past_k, &past_v, &seqlens_k, &total, &cos, &sin],
            &[&attn_out, &present_k, &present_v],
            vec![
                Attr::int("num_heads", c.num_attention_heads as i64),
                Attr::int("kv_num_heads", c.num_key_value_heads as i64),
                Attr::float("scale", 1.0 / (c.head_dim as f32).sqrt()),
                Attr::int("do_rotary", 1),
                Attr::int("rotary_interleaved", 0),
            ],
        );
        let o = ck.get(&format!("{p}.self_attn.o_proj.weight"), &[h, c.q_dim()])?;
        let wo = g.init_f32(&format!("{p}.self_attn.o_proj.MatMul.weight"), &[c.q_dim(), h], &transposed(o)?);
        let mut attn_proj = g.op("MatMul", &[&attn_out, &wo], vec![]);
        if c.o_bias {
            let b = ck.get(&format!("{p}.self_attn.o_proj.bias"), &[h])?;
            let b = g.init_f32(&format!("{p}.self_attn.o_proj.bias"), &[h], &flat(b)?);
            attn_proj = g.op("Add", &[&attn_proj, &b], vec![]);
        }

        // Residual add + post-attention norm.
        g.set_scope(format!("/model/layers.{i}/post_attention_layernorm"));
        let w = ck.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        let w = g.init_f32(&format!("{p}.post_attention_layernorm.weight"), &[h], &flat(w)?);
        let outs =
            g.node("SkipSimplifiedLayerNormalization", MS_DOMAIN, &[&attn_proj, &residual, &w], 4, vec![eps_attr()]);
        let normed = outs[0].clone();
        residual = outs[3].clone();
        blank_outputs(&mut g, &[1, 2]);

        // SwiGLU MLP.
        g.set_scope(format!("/model/layers.{i}/mlp"));
        let proj = |g: &mut GraphBuilder, name: &str, input: &str, out_dim: usize, in_dim: usize| -> Result<String> {
            let w = ck.get(&format!("{p}.mlp.{name}.weight"), &[out_dim, in_dim])?;
            let w = g.init_f32(&format!("{p}.mlp.{name}.MatMul.weight"), &[in_dim, out_dim], &transposed(w)?);
            let mut y = g.op("MatMul", &[input, &w], vec![]);
            if c.mlp_bias {
                let b = ck.get(&format!("{p}.mlp.{name}.bias"), &[out_dim])?;
                let b = g.init_f32(&format!("{p}.mlp.{name}.bias"), &[out_dim], &flat(b)?);
                y = g.op("Add", &[&y, &b], vec![]);
            }
            Ok(y)
        };
        let gate = proj(&mut g, "gate_proj", &normed, c.intermediate_size, h)?;
        let up = proj(&mut g, "up_proj", &normed, c.intermediate_size, h)?;
        let sig = g.op("Sigmoid", &[&gate], vec![]);
        let silu = g.op("Mul", &[&gate, &sig], vec![]);
        let act = g.op("Mul", &[&silu, &up], vec![]);
        let down = proj(&mut g, "down_proj", &act, h, c.intermediate_size)?;

        // Residual add + the next norm (the next layer's input norm, or the final norm).
        let (scope, norm_name) = if i + 1 < layers {
            (
                format!("/model/layers.{}/input_layernorm", i + 1),
                format!("model.layers.{}.input_layernorm.weight", i + 1),
            )
        } else {
            ("/model/norm".to_owned(), "model.norm.weight".to_owned())
        };
        g.set_scope(scope);
        let w = ck.get(&norm_name, &[h])?;
        let w = g.init_f32(&norm_name, &[h], &flat(w)?);
        let outs = g.node("SkipSimplifiedLayerNormalization", MS_DOMAIN, &[&down, &residual, &w], 4, vec![eps_attr()]);
        x = outs[0].clone();
        residual = outs[3].clone();
        blank_outputs(&mut g, if i + 1 < layers { &[1, 2] } else { &[1, 2, 3] });
    }

    // LM head as Gemm with transB over the [vocab, hidden] matrix, so a tied head shares the
    // embedding initializer instead of storing a transposed copy.
    g.set_scope("/lm_head");
    if logits == LogitsMode::Last {
        let start = g.init_i64("/model/constants/minus_one", &[1], &[-1]);
        let end = g.init_i64("/model/constants/int64_max", &[1], &[i64::MAX]);
        x = g.op("Slice", &[&x, &start, &end, &axis1], vec![]);
    }
    let head_name = if c.tie_word_embeddings {
        embed_name.clone()
    } else {
        let w = ck.get("lm_head.weight", &[c.vocab_size, h])?;
        g.init_f32("lm_head.weight", &[c.vocab_size, h], &flat(w)?)
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

    let bytes = g.initializer_bytes();
    if bytes > 2_000_000_000 {
        return Err(Error::Unsupported {
            what: format!("{bytes} bytes of weights exceed protobuf's 2 GB limit, and external-data export is missing"),
        });
    }
    Ok(g.finish(21, Some(1), env!("CARGO_PKG_VERSION")))
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
