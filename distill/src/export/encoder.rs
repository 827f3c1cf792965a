//! Export of BERT-family sentence encoders: one ONNX graph from token ids to hidden states and
//! the pooled sentence embedding, in standard ONNX operators (LayerNormalization, Erf GELU,
//! MatMul attention) that ONNX Runtime's graph optimizer fuses for its CPU kernels.
//!
//! Inputs `input_ids`, `token_type_ids`, `attention_mask` (int64 `[batch, seq]`); outputs
//! `last_hidden_state [batch, seq, hidden]` and `sentence_embedding [batch, hidden]`.

use std::path::Path;

use prost::Message as _;

use edgelm_runtime::bundle::{BundleInfo, BundleWriter, EncoderInfo, GenerationDefaults, Kind, Precision};

use super::{flat, transposed};
use crate::encoder::{BertModel, EncoderCheckpoint, Pooling};
use crate::error::{Error, Result};
use crate::onnx::{AttributeProto as Attr, DataType, Dim, GraphBuilder, ModelProto};

/// Builds the encoder graph.
pub(crate) fn build(ck: &EncoderCheckpoint) -> Result<ModelProto> {
    let c = &ck.config;
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let hd = h / heads;
    let mut g = GraphBuilder::new("edgelm-encoder");
    let io = [Dim::Symbolic("batch_size".into()), Dim::Symbolic("sequence_length".into())];
    for name in ["input_ids", "token_type_ids", "attention_mask"] {
        g.input(name, DataType::Int64, &io);
    }
    g.output("last_hidden_state", DataType::Float, &[io[0].clone(), io[1].clone(), Dim::Fixed(h as i64)]);
    g.output("sentence_embedding", DataType::Float, &[io[0].clone(), Dim::Fixed(h as i64)]);

    let ln = |g: &mut GraphBuilder, x: &str, name: &str| -> Result<String> {
        let w = g.init_f32(&format!("{name}.weight"), &[h], &flat(ck.get(&format!("{name}.weight"), &[h])?)?);
        let b = g.init_f32(&format!("{name}.bias"), &[h], &flat(ck.get(&format!("{name}.bias"), &[h])?)?);
        Ok(g.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![Attr::int("axis", -1), Attr::float("epsilon", c.layer_norm_eps as f32)],
        ))
    };
    let dense = |g: &mut GraphBuilder, x: &str, name: &str, out: usize, inp: usize| -> Result<String> {
        let w = ck.get(&format!("{name}.weight"), &[out, inp])?;
        let w = g.init_f32(&format!("{name}.MatMul.weight"), &[inp, out], &transposed(w)?);
        let b = g.init_f32(&format!("{name}.bias"), &[out], &flat(ck.get(&format!("{name}.bias"), &[out])?)?);
        let y = g.op("MatMul", &[x, &w], vec![]);
        Ok(g.op("Add", &[&y, &b], vec![]))
    };

    // Embeddings: word + position (0..seq) + token type, then LayerNorm.
    g.set_scope("/embeddings");
    let table = |g: &mut GraphBuilder, name: &str, rows: usize| -> Result<String> {
        Ok(g.init_f32(name, &[rows, h], &flat(ck.get(name, &[rows, h])?)?))
    };
    let word = table(&mut g, "embeddings.word_embeddings.weight", c.vocab_size)?;
    let pos = table(&mut g, "embeddings.position_embeddings.weight", c.max_position_embeddings)?;
    let tt = table(&mut g, "embeddings.token_type_embeddings.weight", c.type_vocab_size)?;
    let zero = g.init_i64("/constants/zero", &[], &[0]);
    let one = g.init_i64("/constants/one", &[], &[1]);
    let shape = g.op("Shape", &["input_ids"], vec![]);
    let seq = g.op("Gather", &[&shape, &one], vec![Attr::int("axis", 0)]);
    let positions = g.op("Range", &[&zero, &seq, &one], vec![]);
    let we = g.op("Gather", &[&word, "input_ids"], vec![Attr::int("axis", 0)]);
    let pe = g.op("Gather", &[&pos, &positions], vec![Attr::int("axis", 0)]);
    let te = g.op("Gather", &[&tt, "token_type_ids"], vec![Attr::int("axis", 0)]);
    let sum = g.op("Add", &[&we, &pe], vec![]);
    let sum = g.op("Add", &[&sum, &te], vec![]);
    let mut x = ln(&mut g, &sum, "embeddings.LayerNorm")?;

    // Additive mask [batch, 1, 1, seq]: 0 where attended, a large negative number elsewhere.
    g.set_scope("/mask");
    let maskf = g.op("Cast", &["attention_mask"], vec![Attr::int("to", DataType::Float as i64)]);
    let onef = g.init_f32("/constants/one_f", &[], &[1.0]);
    let neg = g.init_f32("/constants/neg_big", &[], &[-10000.0]);
    let inv = g.op("Sub", &[&onef, &maskf], vec![]);
    let bias = g.op("Mul", &[&inv, &neg], vec![]);
    let axes12 = g.init_i64("/constants/axes_1_2", &[2], &[1, 2]);
    let bias = g.op("Unsqueeze", &[&bias, &axes12], vec![]);

    let split_shape = g.init_i64("/constants/split_heads", &[4], &[0, 0, heads as i64, hd as i64]);
    let merge_shape = g.init_i64("/constants/merge_heads", &[3], &[0, 0, h as i64]);
    let scale = g.init_f32("/constants/attn_scale", &[], &[1.0 / (hd as f32).sqrt()]);
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        g.set_scope(format!("/encoder/layer.{i}/attention"));
        let heads_of = |g: &mut GraphBuilder, t: &str, perm: &[i64]| {
            let r = g.op("Reshape", &[t, &split_shape], vec![]);
            g.op("Transpose", &[&r], vec![Attr::ints("perm", perm.to_vec())])
        };
        let q = dense(&mut g, &x, &format!("{p}.attention.self.query"), h, h)?;
        let k = dense(&mut g, &x, &format!("{p}.attention.self.key"), h, h)?;
        let v = dense(&mut g, &x, &format!("{p}.attention.self.value"), h, h)?;
        let q = heads_of(&mut g, &q, &[0, 2, 1, 3]);
        let k = heads_of(&mut g, &k, &[0, 2, 3, 1]);
        let v = heads_of(&mut g, &v, &[0, 2, 1, 3]);
        let scores = g.op("MatMul", &[&q, &k], vec![]);
        let scores = g.op("Mul", &[&scores, &scale], vec![]);
        let scores = g.op("Add", &[&scores, &bias], vec![]);
        let probs = g.op("Softmax", &[&scores], vec![Attr::int("axis", -1)]);
        let ctx = g.op("MatMul", &[&probs, &v], vec![]);
        let ctx = g.op("Transpose", &[&ctx], vec![Attr::ints("perm", vec![0, 2, 1, 3])]);
        let ctx = g.op("Reshape", &[&ctx, &merge_shape], vec![]);
        let attn = dense(&mut g, &ctx, &format!("{p}.attention.output.dense"), h, h)?;
        let res = g.op("Add", &[&attn, &x], vec![]);
        x = ln(&mut g, &res, &format!("{p}.attention.output.LayerNorm"))?;
        g.set_scope(format!("/encoder/layer.{i}/ffn"));
        let inter = dense(&mut g, &x, &format!("{p}.intermediate.dense"), c.intermediate_size, h)?;
        let gelu = g.op("Gelu", &[&inter], vec![]);
        let out = dense(&mut g, &gelu, &format!("{p}.output.dense"), h, c.intermediate_size)?;
        let res = g.op("Add", &[&out, &x], vec![]);
        x = ln(&mut g, &res, &format!("{p}.output.LayerNorm"))?;
    }
    g.set_scope("/pooling");
    g.node_named("Identity", "", &[&x], &["last_hidden_state"], vec![]);
    let pooled = match c.pooling {
        Pooling::Mean => {
            let axes_last = g.init_i64("/constants/axes_last", &[1], &[-1]);
            let m = g.op("Unsqueeze", &[&maskf, &axes_last], vec![]);
            let masked = g.op("Mul", &[&x, &m], vec![]);
            let axes_seq = g.init_i64("/constants/axes_seq", &[1], &[1]);
            let total = g.op("ReduceSum", &[&masked, &axes_seq], vec![Attr::int("keepdims", 0)]);
            let count = g.op("ReduceSum", &[&m, &axes_seq], vec![Attr::int("keepdims", 0)]);
            let tiny = g.init_f32("/constants/min_count", &[], &[1e-9]);
            let count = g.op("Max", &[&count, &tiny], vec![]);
            g.op("Div", &[&total, &count], vec![])
        }
        Pooling::Cls => g.op("Gather", &[&x, &zero], vec![Attr::int("axis", 1)]),
    };
    if c.normalize {
        g.node_named(
            "LpNormalization",
            "",
            &[&pooled],
            &["sentence_embedding"],
            vec![Attr::int("axis", -1), Attr::int("p", 2)],
        );
    } else {
        g.node_named("Identity", "", &[&pooled], &["sentence_embedding"], vec![]);
    }
    // Gelu is a standard operator from opset 20.
    Ok(g.finish(21, None, env!("CARGO_PKG_VERSION")))
}

/// Fixed check sentences' ids: spread over the vocabulary, CLS-like first id kept in range.
fn check_ids(vocab: usize) -> Vec<u32> {
    (0..10).map(|i| ((101 + i * 977) % vocab) as u32).collect()
}

/// Exports an encoder checkpoint into `out` (model.onnx, tokenizer files, edgelm.json with
/// kind `encoder`) after checking ONNX Runtime's embedding against candle's.
pub fn export_encoder(ck: &EncoderCheckpoint, out: &Path, tolerance: f32) -> Result<f32> {
    super::refuse_replacing_source(&ck.dir, out)?;
    let graph = build(ck)?;
    let mut w = BundleWriter::create(out, Kind::Encoder)?;
    let model_path = w.model("model.onnx", &graph.encode_to_vec())?;
    if let Some(t) = &ck.tokenizer_json {
        w.tokenizer(t)?;
    }

    // The check: ORT on the exported file against the candle reference.
    let ids = check_ids(ck.config.vocab_size);
    let types = vec![0u32; ids.len()];
    let reference = BertModel::new(ck).embed(&ids, &types)?;
    let mut enc = edgelm_runtime::encoder::EncoderSession::load(&model_path, &Default::default())?;
    let onnx = enc.run(&ids, &types)?;
    let diff = super::max_abs_diff(&reference, &onnx);
    let allowed = super::allowed_diff(tolerance, super::magnitude(&reference));
    if diff > allowed {
        return Err(Error::ExportMismatch {
            what: format!(
                "encoder embedding differs from candle by {diff:.3e} (max abs), allowed {allowed:.3e} (tolerance {tolerance:.1e} per unit of magnitude)"
            ),
        });
    }

    let c = &ck.config;
    // sentence-transformers embeds at most `max_seq_length` tokens (sentence_bert_config.json,
    // over the tokenizer's own truncation); longer texts are refused at that length.
    let st_limit = edgelm_runtime::encoder::sentence_transformers_max_tokens(&ck.dir);
    let max_tokens = st_limit.map_or(c.max_position_embeddings, |l| l.min(c.max_position_embeddings));
    w.finish(BundleInfo {
        generation: GenerationDefaults::none(),
        chat_template: None,
        precision: Precision::Fp32,
        weights: None,
        checkpoint: ck.dir.clone(),
        checkpoint_sha256: super::checkpoint_hash(&ck.dir)?,
        encoder: Some(EncoderInfo {
            max_tokens,
            hidden_size: c.hidden_size,
            pooling: match c.pooling {
                Pooling::Mean => "mean",
                Pooling::Cls => "cls",
            }
            .into(),
            normalize: c.normalize,
        }),
        report: serde_json::json!({"architecture": "bert", "check_max_abs_diff": diff}),
    })?;
    Ok(diff)
}
