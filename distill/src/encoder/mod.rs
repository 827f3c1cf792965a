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
        // sentence-transformers: 1_Pooling/config.json and a Normalize module in modules.json.
        let pooling = match read_json(&dir.join("1_Pooling/config.json"))? {
            Some(p) if p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()) == Some(true) => Pooling::Cls,
            _ => Pooling::Mean,
        };
        let normalize = read_json(&dir.join("modules.json"))?.and_then(|m| m.as_array().cloned()).is_some_and(|mods| {
            mods.iter().any(|m| m.get("type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("Normalize")))
        });
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
        let tensors = load_weights(&dir)?
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("bert.").map(str::to_owned).unwrap_or(k), v))
            .collect();
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

/// The candle reference: runs the encoder and pools.
pub struct BertModel<'a> {
    ck: &'a EncoderCheckpoint,
}

impl<'a> BertModel<'a> {
    /// A model over a checkpoint's weights.
    pub fn new(ck: &'a EncoderCheckpoint) -> Self {
        BertModel { ck }
    }

    fn linear(&self, x: &Tensor, name: &str, out: usize, inp: usize) -> Result<Tensor> {
        let w = self.ck.get(&format!("{name}.weight"), &[out, inp])?;
        let b = self.ck.get(&format!("{name}.bias"), &[out])?;
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
        let c = &self.ck.config;
        let (h, s) = (c.hidden_size, ids.len());
        if s == 0 || s > c.max_position_embeddings {
            return Err(Error::ContextOverflow { positions: s, context: c.max_position_embeddings });
        }
        let dev = Device::Cpu;
        let word = self.ck.get("embeddings.word_embeddings.weight", &[c.vocab_size, h])?;
        let pos = self.ck.get("embeddings.position_embeddings.weight", &[c.max_position_embeddings, h])?;
        let tt = self.ck.get("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?;
        let x = (word.embedding(&Tensor::new(ids, &dev)?)? + pos.narrow(0, 0, s)?)?;
        let x = (x + tt.embedding(&Tensor::new(type_ids, &dev)?)?)?;
        let mut x = self.layer_norm(&x.unsqueeze(0)?, "embeddings.LayerNorm")?;
        let (heads, hd) = (c.num_attention_heads, h / c.num_attention_heads);
        let mut states = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let split =
                |t: Tensor| -> Result<Tensor> { Ok(t.reshape((1, s, heads, hd))?.transpose(1, 2)?.contiguous()?) };
            let q = split(self.linear(&x, &format!("{p}.attention.self.query"), h, h)?)?;
            let k = split(self.linear(&x, &format!("{p}.attention.self.key"), h, h)?)?;
            let v = split(self.linear(&x, &format!("{p}.attention.self.value"), h, h)?)?;
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((1, s, h))?;
            let attn = self.linear(&ctx, &format!("{p}.attention.output.dense"), h, h)?;
            x = self.layer_norm(&(attn + &x)?, &format!("{p}.attention.output.LayerNorm"))?;
            let inter = self.linear(&x, &format!("{p}.intermediate.dense"), c.intermediate_size, h)?;
            // Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
            let gelu = inter.gelu_erf()?;
            let out = self.linear(&gelu, &format!("{p}.output.dense"), h, c.intermediate_size)?;
            x = self.layer_norm(&(out + &x)?, &format!("{p}.output.LayerNorm"))?;
            states.push(x.clone());
        }
        if states.is_empty() {
            states.push(x);
        }
        Ok(states)
    }

    /// The sentence embedding of one sequence `[H]`, differentiable.
    pub fn sentence(&self, ids: &[u32], type_ids: &[u32]) -> Result<Tensor> {
        self.pool(&self.hidden_states(ids, type_ids)?)
    }

    /// The sentence embedding `[H]` of final hidden states `[1, S, H]`: pooled, and normalised
    /// when the model's configuration says so.
    pub fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = hidden.squeeze(0)?;
        let v = match self.ck.config.pooling {
            Pooling::Mean => x.mean(0)?,
            Pooling::Cls => x.get(0)?,
        };
        Ok(if self.ck.config.normalize { v.broadcast_div(&v.sqr()?.sum_all()?.sqrt()?.maximum(1e-12)?)? } else { v })
    }

    /// The sentence embedding of one sequence.
    pub fn embed(&self, ids: &[u32], type_ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.sentence(ids, type_ids)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}
