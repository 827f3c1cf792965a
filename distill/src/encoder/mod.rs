//! BERT-family sentence encoders (e.g. all-MiniLM-L6-v2 as sentence-transformers saves it):
//! configuration, weights, and the candle reference model that the encoder export is checked
//! against.
//!
//! Shapes: `input_ids, token_type_ids, attention_mask [B, S]` -> hidden states `[B, S, H]` ->
//! sentence embedding `[B, H]` (mean over the unmasked positions, then L2-normalised when the
//! checkpoint's modules.json has a Normalize step).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::checkpoint::{load_weights, read_json};
use crate::error::{Error, IoContext, Result};

mod gelu;
pub mod prune;
pub mod qat;
pub mod student;

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the positions the attention mask keeps.
    Mean,
    /// The first ([CLS]) position.
    Cls,
}

/// The pooling and normalisation a sentence-transformers folder declares, read by the runtime's
/// reader ([`edgelm_runtime::encoder::sentence_transformers_pooling`]) so export and runtime
/// accept the same folders. A folder with neither modules.json nor `1_Pooling` is a plain BERT
/// checkpoint: mean pooling, no normalisation. The graph carries mean and
/// cls pooling; max and last-token pooling are refused rather than exported as something else.
fn sentence_modules(dir: &Path) -> Result<(Pooling, bool)> {
    use edgelm_runtime::encoder::{sentence_transformers_pooling, Pooling as Declared};
    let (declared, normalize) = sentence_transformers_pooling(dir)?.unwrap_or((Declared::Mean, false));
    match declared {
        Declared::Mean => Ok((Pooling::Mean, normalize)),
        Declared::Cls => Ok((Pooling::Cls, normalize)),
        Declared::Max | Declared::LastToken => Err(Error::Unsupported {
            what: format!(
                "{}: the Pooling config turns on {}; an export's graph pools with pooling_mode_mean_tokens or pooling_mode_cls_token (the runtime applies other modes to an Optimum export's token states)",
                dir.display(),
                if declared == Declared::Max { "pooling_mode_max_tokens" } else { "pooling_mode_lasttoken" }
            ),
        }),
    }
}

/// Shape and numerics of a BERT encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Longest input in tokens.
    pub max_position_embeddings: usize,
    /// Segment (token type) vocabulary.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Sentence pooling.
    pub pooling: Pooling,
    /// L2-normalise the sentence vector.
    pub normalize: bool,
}

#[derive(Deserialize)]
struct HfBert {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "two")]
    type_vocab_size: usize,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

/// A loaded encoder checkpoint.
pub struct EncoderCheckpoint {
    /// Folder read.
    pub dir: PathBuf,
    /// Parsed configuration.
    pub config: EncoderConfig,
    /// Weights without any `bert.` prefix.
    pub tensors: HashMap<String, Tensor>,
    /// tokenizer.json, when present.
    pub tokenizer_json: Option<PathBuf>,
    /// tokenizer_config.json, when present.
    pub tokenizer_config: Option<serde_json::Value>,
}

/// A tensor's name as transformers names it once loaded: without the `bert.` prefix, and a
/// layer norm's `gamma` / `beta` (the original TensorFlow port's names, which the
/// bert-base-uncased files still use) as `weight` / `bias`.
fn loaded_name(stored: &str) -> String {
    let k = stored.strip_prefix("bert.").unwrap_or(stored);
    if let Some(p) = k.strip_suffix("LayerNorm.gamma") {
        format!("{p}LayerNorm.weight")
    } else if let Some(p) = k.strip_suffix("LayerNorm.beta") {
        format!("{p}LayerNorm.bias")
    } else {
        k.to_owned()
    }
}

impl EncoderCheckpoint {
    /// Whether `dir` holds a BERT-family checkpoint (by config.json's model_type).
    pub fn is_encoder(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(|s| s == "bert"))
            .unwrap_or(false)
    }

    /// Reads config.json, the sentence-transformers pooling files and the weights.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
        let raw: HfBert = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidConfig { what: format!("config.json is not a BERT config: {e}") })?;
        if raw.model_type.as_deref() != Some("bert") {
            return Err(Error::UnsupportedArchitecture { found: raw.model_type.unwrap_or_else(|| "<none>".into()) });
        }
        if raw.hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            return Err(Error::InvalidConfig {
                what: format!("hidden_act {:?} is not supported (gelu only)", raw.hidden_act),
            });
        }
        if raw.position_embedding_type.as_deref().is_some_and(|p| p != "absolute") {
            return Err(Error::InvalidConfig { what: "only absolute position embeddings are supported".into() });
        }
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(Error::InvalidConfig { what: "hidden_size must be a multiple of num_attention_heads".into() });
        }
        let (pooling, normalize) = sentence_modules(&dir)?;
        let config = EncoderConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            pooling,
            normalize,
        };
        let tensors = load_weights(&dir)?.into_iter().map(|(k, v)| (loaded_name(&k), v)).collect();
        Ok(EncoderCheckpoint {
            tokenizer_json: Some(dir.join("tokenizer.json")).filter(|p| p.exists()),
            tokenizer_config: read_json(&dir.join("tokenizer_config.json"))?,
            dir,
            config,
            tensors,
        })
    }

    /// A weight by name with a shape check.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        crate::checkpoint::weight(&self.tensors, name, shape)
    }
}

/// Hidden states of a padded batch: `states[j]` `[B, S, H]` after layer `j`, the attention
/// scores of each layer when asked for, and `mask` `[B, S]` (1 where a row has a token, 0 where
/// it was padded).
pub struct BatchStates {
    /// Hidden states after each layer, first to last.
    pub states: Vec<Tensor>,
    /// Each layer's attention scores `[B, heads, S, S]` before the softmax (query rows, key
    /// columns; in a padded batch the padded keys at -1e9). Empty unless asked for (they hold
    /// `heads x S x S` values per sentence and layer) or when the model has no layers.
    pub scores: Vec<Tensor>,
    /// Real (1) and padded (0) positions.
    pub mask: Tensor,
}

/// The candle reference: runs the encoder and pools.
pub struct BertModel<'a> {
    ck: &'a EncoderCheckpoint,
    fake_quant: Option<&'a qat::FakeQuant>,
    tap: Option<qat::Tap<'a>>,
}

impl<'a> BertModel<'a> {
    /// A model over a checkpoint's weights.
    pub fn new(ck: &'a EncoderCheckpoint) -> Self {
        BertModel { ck, fake_quant: None, tap: None }
    }

    /// The model as its int8-static bundle runs it (quantization-aware training).
    pub fn with_fake_quant(mut self, fake_quant: &'a qat::FakeQuant) -> Self {
        self.fake_quant = Some(fake_quant);
        self
    }

    /// The model with `tap` seeing each linear layer's input (calibration).
    pub(crate) fn with_tap(mut self, tap: qat::Tap<'a>) -> Self {
        self.tap = Some(tap);
        self
    }

    fn linear(&self, x: &Tensor, name: &str, out: usize, inp: usize) -> Result<Tensor> {
        let w = self.ck.get(&format!("{name}.weight"), &[out, inp])?;
        let b = self.ck.get(&format!("{name}.bias"), &[out])?;
        if let Some(tap) = self.tap {
            tap(name, x)?;
        }
        if let Some(y) = self.fake_quant.map(|q| q.linear(name, x, w, b)).transpose()?.flatten() {
            return Ok(y);
        }
        Ok(crate::model::times_transposed(x, w)?.broadcast_add(b)?)
    }

    fn layer_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let h = self.ck.config.hidden_size;
        let w = self.ck.get(&format!("{name}.weight"), &[h])?;
        let b = self.ck.get(&format!("{name}.bias"), &[h])?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.ck.config.layer_norm_eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(w)?.broadcast_add(b)?)
    }

    /// Hidden states `[1, S, H]` for one sequence (all positions attended).
    pub fn hidden_states(&self, ids: &[u32], type_ids: &[u32]) -> Result<Tensor> {
        let mut states = self.layer_states(ids, type_ids)?;
        Ok(states.pop().expect("layer_states returns the embedding output at least"))
    }

    /// Hidden states `[1, S, H]` after each layer, first to last (the embeddings' output when
    /// the model has no layers).
    pub fn layer_states(&self, ids: &[u32], type_ids: &[u32]) -> Result<Vec<Tensor>> {
        Ok(self.batch_layer_states(&[(ids, type_ids)])?.states)
    }

    /// Hidden states `[B, S, H]` after each layer for several sequences at once, padded at the
    /// end to the longest (`S`); padded positions are masked out of attention, so each row's
    /// real positions hold what the sequence gives alone. One run over a batch of similar
    /// lengths makes matrices large enough to keep a core busy, where one sentence at a time
    /// spends its time between operations.
    pub fn batch_layer_states(&self, seqs: &[(&[u32], &[u32])]) -> Result<BatchStates> {
        self.batch_run(seqs, false)
    }

    /// [`BertModel::batch_layer_states`], keeping each layer's attention scores too when
    /// `with_scores`.
    pub fn batch_run(&self, seqs: &[(&[u32], &[u32])], with_scores: bool) -> Result<BatchStates> {
        let c = &self.ck.config;
        let h = c.hidden_size;
        let (b, s) = (seqs.len(), seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0));
        for (ids, type_ids) in seqs {
            if ids.is_empty() || ids.len() > c.max_position_embeddings {
                return Err(Error::ContextOverflow { positions: ids.len(), context: c.max_position_embeddings });
            }
            if type_ids.len() != ids.len() {
                return Err(Error::InvalidConfig {
                    what: format!("{} token types for {} tokens", type_ids.len(), ids.len()),
                });
            }
        }
        if b == 0 {
            return Err(Error::InvalidConfig { what: "an empty batch".into() });
        }
        let dev = Device::Cpu;
        let (mut flat_ids, mut flat_types, mut mask) = (vec![0u32; b * s], vec![0u32; b * s], vec![0f32; b * s]);
        for (row, (ids, type_ids)) in seqs.iter().enumerate() {
            flat_ids[row * s..row * s + ids.len()].copy_from_slice(ids);
            flat_types[row * s..row * s + ids.len()].copy_from_slice(type_ids);
            mask[row * s..row * s + ids.len()].fill(1.0);
        }
        let padded = seqs.iter().any(|(ids, _)| ids.len() < s);
        let mask = Tensor::from_vec(mask, (b, s), &dev)?;
        let word = self.ck.get("embeddings.word_embeddings.weight", &[c.vocab_size, h])?;
        let pos = self.ck.get("embeddings.position_embeddings.weight", &[c.max_position_embeddings, h])?;
        let tt = self.ck.get("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?;
        let x = word.embedding(&Tensor::from_vec(flat_ids, b * s, &dev)?)?.reshape((b, s, h))?;
        let x = x.broadcast_add(&pos.narrow(0, 0, s)?)?;
        let x = (x + tt.embedding(&Tensor::from_vec(flat_types, b * s, &dev)?)?.reshape((b, s, h))?)?;
        let mut x = self.layer_norm(&x, "embeddings.LayerNorm")?;
        // Padded keys get a large negative score: their softmax weight is exactly zero.
        let key_bias = if padded { Some(((&mask - 1.0)? * 1e9)?.reshape((b, 1, 1, s))?) } else { None };
        let (heads, hd) = (c.num_attention_heads, h / c.num_attention_heads);
        let mut states = Vec::with_capacity(c.num_hidden_layers);
        let mut all_scores = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let split =
                |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()?) };
            let q = split(self.linear(&x, &format!("{p}.attention.self.query"), h, h)?)?;
            let k = split(self.linear(&x, &format!("{p}.attention.self.key"), h, h)?)?;
            let v = split(self.linear(&x, &format!("{p}.attention.self.value"), h, h)?)?;
            let mut scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            if let Some(bias) = &key_bias {
                scores = scores.broadcast_add(bias)?;
            }
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            if with_scores {
                all_scores.push(scores);
            }
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
            let attn = self.linear(&ctx, &format!("{p}.attention.output.dense"), h, h)?;
            x = self.layer_norm(&(attn + &x)?, &format!("{p}.attention.output.LayerNorm"))?;
            let inter = self.linear(&x, &format!("{p}.intermediate.dense"), c.intermediate_size, h)?;
            let gelu = gelu::gelu(&inter)?;
            let out = self.linear(&gelu, &format!("{p}.output.dense"), h, c.intermediate_size)?;
            x = self.layer_norm(&(out + &x)?, &format!("{p}.output.LayerNorm"))?;
            states.push(x.clone());
        }
        if states.is_empty() {
            states.push(x);
        }
        Ok(BatchStates { states, scores: all_scores, mask })
    }

    /// [`BertModel::batch_run`] and the sentence embeddings `[B, H]` pooled from the last
    /// layer's states.
    pub fn batch_embed(&self, seqs: &[(&[u32], &[u32])], with_scores: bool) -> Result<(BatchStates, Tensor)> {
        let run = self.batch_run(seqs, with_scores)?;
        let pooled = self.pool_batch(run.states.last().expect("at least the embeddings' output"), &run.mask)?;
        Ok((run, pooled))
    }

    /// Sentence embeddings `[B, H]` of final hidden states `[B, S, H]` under `mask` `[B, S]`
    /// (1 for real positions): pooled over the real positions, and normalised when the
    /// model's configuration says so.
    pub fn pool_batch(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let v = match self.ck.config.pooling {
            Pooling::Mean => {
                let sum = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
                sum.broadcast_div(&mask.sum_keepdim(1)?.maximum(1.0)?)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        Ok(if self.ck.config.normalize {
            v.broadcast_div(&v.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?)?
        } else {
            v
        })
    }

    /// The sentence embedding of one sequence `[H]`, differentiable.
    pub fn sentence(&self, ids: &[u32], type_ids: &[u32]) -> Result<Tensor> {
        self.pool(&self.hidden_states(ids, type_ids)?)
    }

    /// The sentence embedding `[H]` of final hidden states `[1, S, H]` (every position real):
    /// pooled, and normalised when the model's configuration says so.
    pub fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        let mask = Tensor::ones((1, hidden.dim(1)?), DType::F32, hidden.device())?;
        Ok(self.pool_batch(hidden, &mask)?.squeeze(0)?)
    }

    /// The sentence embedding of one sequence.
    pub fn embed(&self, ids: &[u32], type_ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.sentence(ids, type_ids)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}

#[cfg(test)]
/// A random two-layer encoder: 40 words, width 16, four heads.
pub(crate) fn tiny_encoder(pooling: Pooling, seed: u64) -> EncoderCheckpoint {
    let config = EncoderConfig {
        vocab_size: 40,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 32,
        max_position_embeddings: 12,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pooling,
        normalize: true,
    };
    let mut rng = crate::rng::Rng::new(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        let n = shape.iter().product();
        tensors.insert(name, Tensor::from_vec(rng.normal_vec(n, 0.0, 0.3), shape, &Device::Cpu).unwrap());
    };
    add("embeddings.word_embeddings.weight".into(), &[40, 16]);
    add("embeddings.position_embeddings.weight".into(), &[12, 16]);
    add("embeddings.token_type_embeddings.weight".into(), &[2, 16]);
    for norm in ["embeddings.LayerNorm".to_string()]
        .into_iter()
        .chain((0..2).flat_map(|i| ["attention.output", "output"].map(|m| format!("encoder.layer.{i}.{m}.LayerNorm"))))
    {
        add(format!("{norm}.weight"), &[16]);
        add(format!("{norm}.bias"), &[16]);
    }
    for i in 0..2 {
        for (m, out, inp) in [
            ("attention.self.query", 16, 16),
            ("attention.self.key", 16, 16),
            ("attention.self.value", 16, 16),
            ("attention.output.dense", 16, 16),
            ("intermediate.dense", 32, 16),
            ("output.dense", 16, 32),
        ] {
            add(format!("encoder.layer.{i}.{m}.weight"), &[out, inp]);
            add(format!("encoder.layer.{i}.{m}.bias"), &[out]);
        }
    }
    EncoderCheckpoint { dir: PathBuf::new(), config, tensors, tokenizer_json: None, tokenizer_config: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_read_as_transformers_loads_them() {
        assert_eq!(loaded_name("bert.embeddings.LayerNorm.gamma"), "embeddings.LayerNorm.weight");
        assert_eq!(loaded_name("encoder.layer.3.output.LayerNorm.beta"), "encoder.layer.3.output.LayerNorm.bias");
        assert_eq!(
            loaded_name("bert.encoder.layer.0.attention.self.query.weight"),
            "encoder.layer.0.attention.self.query.weight"
        );
        assert_eq!(loaded_name("embeddings.word_embeddings.weight"), "embeddings.word_embeddings.weight");
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn a_padded_batch_gives_each_sentence_what_it_gives_alone() {
        for pooling in [Pooling::Mean, Pooling::Cls] {
            let ck = tiny_encoder(pooling, 7);
            let m = BertModel::new(&ck);
            let seqs: [(&[u32], &[u32]); 3] =
                [(&[1, 5, 9], &[0, 0, 0]), (&[2, 30, 7, 7, 11, 3], &[0, 0, 0, 1, 1, 1]), (&[39], &[1])];
            let batch = m.batch_layer_states(&seqs).unwrap();
            assert_eq!(batch.states.len(), 2);
            assert_eq!(batch.states[1].dims(), &[3, 6, 16]);
            assert_eq!(batch.mask.to_vec2::<f32>().unwrap()[0], vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
            let pooled = m.pool_batch(&batch.states[1], &batch.mask).unwrap();
            for (row, (ids, types)) in seqs.iter().enumerate() {
                let alone = m.layer_states(ids, types).unwrap();
                for (layer, state) in alone.iter().enumerate() {
                    let padded = batch.states[layer].get(row).unwrap().narrow(0, 0, ids.len()).unwrap();
                    assert!(
                        max_diff(&padded, &state.squeeze(0).unwrap()) < 1e-5,
                        "{pooling:?} row {row} layer {layer}"
                    );
                }
                let single = m.sentence(ids, types).unwrap();
                assert!(max_diff(&pooled.get(row).unwrap(), &single) < 1e-5, "{pooling:?} row {row} pooled");
                let norm = single.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!((norm - 1.0).abs() < 1e-5);
            }
            // Padding would change an unmasked sentence: the mask is what makes rows agree.
            let (ids, types) = seqs[0];
            let with_pad = m.layer_states(&[ids, &[0, 0, 0]].concat(), &[types, &[0, 0, 0]].concat()).unwrap();
            let first = with_pad[1].squeeze(0).unwrap().narrow(0, 0, 3).unwrap();
            assert!(max_diff(&first, &m.layer_states(ids, types).unwrap()[1].squeeze(0).unwrap()) > 1e-3);
        }
    }

    /// Writes a sentence-transformers folder's modules.json and pooling config into a new
    /// temporary folder.
    fn st_folder(modules: serde_json::Value, pooling: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.json"), modules.to_string()).unwrap();
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), pooling.to_string()).unwrap();
        dir
    }

    #[test]
    fn sentence_transformers_modules_give_the_pooling_or_a_clear_refusal() {
        use serde_json::json;
        let module = |i: usize, kind: &str, path: &str| json!({"idx": i, "name": i.to_string(), "path": path, "type": format!("sentence_transformers.models.{kind}")});
        let mode = |m: &str| {
            let mut cfg = json!({"word_embedding_dimension": 16, "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": false, "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false});
            cfg[m] = json!(true);
            cfg
        };
        let st = json!([
            module(0, "Transformer", ""),
            module(1, "Pooling", "1_Pooling"),
            module(2, "Normalize", "2_Normalize")
        ]);
        let dir = st_folder(st.clone(), mode("pooling_mode_mean_tokens"));
        assert_eq!(sentence_modules(dir.path()).unwrap(), (Pooling::Mean, true));
        let dir = st_folder(st.clone(), mode("pooling_mode_cls_token"));
        assert_eq!(sentence_modules(dir.path()).unwrap(), (Pooling::Cls, true));
        let no_norm = json!([module(0, "Transformer", ""), module(1, "Pooling", "1_Pooling")]);
        let dir = st_folder(no_norm, mode("pooling_mode_mean_tokens"));
        assert_eq!(sentence_modules(dir.path()).unwrap(), (Pooling::Mean, false));

        // Max pooling, two modes at once, a Dense projection: refused, naming what is there.
        let dir = st_folder(st.clone(), mode("pooling_mode_max_tokens"));
        let e = sentence_modules(dir.path()).unwrap_err().to_string();
        assert!(e.contains("pooling_mode_max_tokens"), "{e}");
        let mut both = mode("pooling_mode_mean_tokens");
        both["pooling_mode_cls_token"] = json!(true);
        let dir = st_folder(st, both);
        assert!(sentence_modules(dir.path()).unwrap_err().to_string().contains("pooling_mode_cls_token"));
        let dense = json!([
            module(0, "Transformer", ""),
            module(1, "Pooling", "1_Pooling"),
            module(2, "Dense", "2_Dense"),
            module(3, "Normalize", "3_Normalize")
        ]);
        let dir = st_folder(dense, mode("pooling_mode_mean_tokens"));
        let e = sentence_modules(dir.path()).unwrap_err().to_string();
        assert!(e.contains("Dense") && e.contains("2_Dense"), "{e}");

        // A plain BERT folder: mean pooling, not normalised.
        let plain = tempfile::tempdir().unwrap();
        assert_eq!(sentence_modules(plain.path()).unwrap(), (Pooling::Mean, false));
    }

    #[test]
    fn empty_or_overlong_sequences_are_refused() {
        let ck = tiny_encoder(Pooling::Mean, 7);
        let m = BertModel::new(&ck);
        assert!(matches!(m.batch_layer_states(&[]), Err(Error::InvalidConfig { .. })));
        let long = vec![1u32; 13];
        assert!(matches!(
            m.batch_layer_states(&[(&long, &long)]),
            Err(Error::ContextOverflow { positions: 13, context: 12 })
        ));
        assert!(matches!(m.batch_layer_states(&[(&[1, 2], &[0])]), Err(Error::InvalidConfig { .. })));
    }
}
