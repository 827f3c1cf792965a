//! Sentence encoders (`kind: encoder` bundles): text -> one embedding vector.
//!
//! The graph takes `input_ids`, `attention_mask` and (BERT) `token_type_ids` (int64
//! `[1, seq]`). An edgelm bundle's graph returns `sentence_embedding [1, hidden]` (pooled and,
//! for sentence-transformers models, L2-normalised inside the graph); an encoder exported by
//! Hugging Face Optimum returns that, or only its token states (`last_hidden_state` or
//! `token_embeddings`), which are pooled here as its sentence-transformers files say.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::Tensor;

use crate::bundle::{verify_manifest, Kind, Manifest, MANIFEST};
use crate::decoder::DecoderOptions;
use crate::engine::EngineOptions;
use crate::error::{Error, Result};

/// How token states become one sentence embedding outside the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over tokens.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// The largest value of each feature over tokens.
    Max,
    /// The last token's state.
    LastToken,
}

/// What the graph gives and what is left to do.
#[derive(Debug, Clone)]
enum Output {
    /// `sentence_embedding`, finished inside the graph.
    Sentence,
    /// Token states `[1, seq, hidden]` under this name, pooled (and normalised) here.
    Tokens { name: String, pooling: Pooling, normalize: bool },
}

/// An encoder graph in an ONNX Runtime session.
pub struct EncoderSession {
    session: Session,
    /// Length of the embedding as the graph declares it (0: not declared).
    embedding_dim: usize,
    output: Output,
    /// Whether the graph takes `token_type_ids` (BERT does; RoBERTa and DistilBERT do not).
    token_types: bool,
}

impl EncoderSession {
    /// Opens an encoder ONNX file with the decoder's session settings; a graph without
    /// `sentence_embedding` is pooled with `pooling` (mean, not normalised, when `None`).
    pub fn load(model: &Path, opts: &DecoderOptions) -> Result<Self> {
        Self::load_pooled(model, opts, None)
    }

    fn load_pooled(model: &Path, opts: &DecoderOptions, pooling: Option<(Pooling, bool)>) -> Result<Self> {
        let session = crate::session::open(model, opts)?;
        let find = |name: &str| session.outputs().iter().find(|o| o.name() == name);
        let output = if find("sentence_embedding").is_some() {
            Output::Sentence
        } else if let Some(o) = find("token_embeddings").or_else(|| find("last_hidden_state")) {
            let (pooling, normalize) = pooling.unwrap_or((Pooling::Mean, false));
            Output::Tokens { name: o.name().to_owned(), pooling, normalize }
        } else {
            return Err(Error::Bundle {
                path: model.to_path_buf(),
                what:
                    "the encoder graph has none of the outputs sentence_embedding, token_embeddings, last_hidden_state"
                        .into(),
            });
        };
        let name = match &output {
            Output::Sentence => "sentence_embedding",
            Output::Tokens { name, .. } => name.as_str(),
        };
        let embedding_dim =
            find(name).and_then(|o| o.dtype().tensor_shape()?.last().copied()).filter(|&d| d > 0).unwrap_or(0) as usize;
        let token_types = session.inputs().iter().any(|i| i.name() == "token_type_ids");
        Ok(EncoderSession { session, embedding_dim, output, token_types })
    }

    /// The sentence embedding of one sequence of ids and token types.
    pub fn run(&mut self, ids: &[u32], type_ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() || ids.len() != type_ids.len() {
            return Err(Error::InvalidRequest("an embedding needs at least one token".into()));
        }
        let s = ids.len();
        let to_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
        let mut inputs: Vec<(&str, ort::session::SessionInputValue)> = vec![
            ("input_ids", Tensor::from_array(([1usize, s], to_i64(ids)))?.into()),
            ("attention_mask", Tensor::from_array(([1usize, s], vec![1i64; s]))?.into()),
        ];
        if self.token_types {
            inputs.push(("token_type_ids", Tensor::from_array(([1usize, s], to_i64(type_ids)))?.into()));
        }
        let out = self.session.run(inputs)?;
        let (name, expected) = match &self.output {
            Output::Sentence => ("sentence_embedding", "[1, hidden]"),
            Output::Tokens { name, .. } => (name.as_str(), "[1, sequence, hidden]"),
        };
        let (shape, data) = out[name].try_extract_tensor::<f32>()?;
        let bad_shape = || Error::UnexpectedShape {
            name: name.into(),
            shape: shape.iter().copied().collect(),
            expected: expected.into(),
        };
        match &self.output {
            Output::Sentence if shape.len() == 2 && shape[0] == 1 => Ok(data.to_vec()),
            Output::Tokens { pooling, normalize, .. } if shape.len() == 3 && shape[0] == 1 && shape[1] == s as i64 => {
                Ok(pool(data, s, *pooling, *normalize))
            }
            _ => Err(bad_shape()),
        }
    }
}

/// One sentence's token states `[seq, hidden]` (every token real: one sequence, no padding)
/// pooled into one vector, L2-normalised when asked.
fn pool(states: &[f32], seq: usize, pooling: Pooling, normalize: bool) -> Vec<f32> {
    let hidden = states.len() / seq;
    let rows = || states.chunks_exact(hidden);
    let mut v: Vec<f32> = match pooling {
        Pooling::Cls => states[..hidden].to_vec(),
        Pooling::LastToken => states[(seq - 1) * hidden..].to_vec(),
        Pooling::Mean => {
            let mut sum = vec![0f32; hidden];
            rows().for_each(|r| sum.iter_mut().zip(r).for_each(|(s, x)| *s += x));
            sum.into_iter().map(|x| x / seq as f32).collect()
        }
        Pooling::Max => {
            let mut max = vec![f32::NEG_INFINITY; hidden];
            rows().for_each(|r| max.iter_mut().zip(r).for_each(|(m, x)| *m = m.max(*x)));
            max
        }
    };
    if normalize {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The pooling a sentence-transformers folder declares: the Pooling module's mode and whether a
/// Normalize module follows (`modules.json`). `None` without modules.json.
fn sentence_transformers_pooling(dir: &Path) -> Result<Option<(Pooling, bool)>> {
    let read = |path: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Bundle { path: path.to_path_buf(), what: e.to_string() })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Bundle { path: path.to_path_buf(), what: format!("is not JSON: {e}") })
    };
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        return Ok(None);
    }
    let modules = read(&modules_path)?;
    let modules = modules.as_array().map(Vec::as_slice).unwrap_or_default();
    let of_type =
        |t: &str| modules.iter().find(|m| m.get("type").and_then(|v| v.as_str()).is_some_and(|v| v.ends_with(t)));
    let normalize = of_type("models.Normalize").is_some();
    let Some(path) = of_type("models.Pooling").and_then(|m| m.get("path")?.as_str()) else {
        return Ok(Some((Pooling::Mean, normalize)));
    };
    let config = read(&dir.join(path).join("config.json"))?;
    let on = |key: &str| config.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
    let pooling = match () {
        _ if on("pooling_mode_cls_token") => Pooling::Cls,
        _ if on("pooling_mode_max_tokens") => Pooling::Max,
        _ if on("pooling_mode_lasttoken") => Pooling::LastToken,
        _ if on("pooling_mode_mean_tokens") => Pooling::Mean,
        _ => {
            return Err(Error::Bundle {
                path: dir.join(path),
                what: "the Pooling module uses a mode edgelm does not apply (it applies mean, cls, max, lasttoken)"
                    .into(),
            })
        }
    };
    Ok(Some((pooling, normalize)))
}

/// An encoder bundle opened for embedding text.
pub struct Encoder {
    session: EncoderSession,
    tokenizer: tokenizers::Tokenizer,
    /// edgelm.json; `None` for an encoder exported by Hugging Face Optimum.
    manifest: Option<Manifest>,
    max_tokens: Option<usize>,
    dir: PathBuf,
}

impl Encoder {
    /// Opens and verifies an encoder bundle, or opens an encoder exported by Hugging Face
    /// Optimum (a folder with config.json, tokenizer.json and one ONNX graph).
    pub fn open(dir: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        let dir = dir.as_ref();
        crate::ortlib::init(opts.ort_lib.as_deref())?;
        let bundle_err = |what: String| Error::Bundle { path: dir.to_path_buf(), what };
        let kind = Kind::of(dir)?;
        if kind != Kind::Encoder {
            if !dir.join(MANIFEST).exists() {
                return Err(bundle_err(
                    "has no edgelm.json, nor a config.json of an encoder beside an ONNX graph; export the encoder with `edgelm-distill export`".into(),
                ));
            }
            return Err(Error::WrongKind { path: dir.to_path_buf(), found: kind, wanted: Kind::Encoder });
        }
        let checked = opts.trust.check(dir)?;
        let manifest = match &checked.manifest {
            Some(bytes) => Some(crate::bundle::verify_manifest_bytes(dir, bytes, &[])?),
            None if dir.join(MANIFEST).exists() => Some(verify_manifest(dir, &[])?),
            None => None,
        };
        let tok_path: PathBuf = match &manifest {
            Some(m) => dir.join(
                m.tokenizer.as_deref().ok_or_else(|| bundle_err("an encoder bundle needs tokenizer.json".into()))?,
            ),
            None => dir.join("tokenizer.json"),
        };
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // One sequence at a time: padding (which sentence-transformers files often configure)
        // would only add masked positions. Truncation, if configured, is kept.
        tokenizer.with_padding(None);
        let (model_file, pooling, max_tokens) = match &manifest {
            Some(m) => (m.model_file.clone(), None, m.encoder.as_ref().map(|e| e.max_tokens)),
            None => {
                let config: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default();
                // RoBERTa-style position tables keep two rows for the padding offset.
                let offset = match config.get("model_type").and_then(|t| t.as_str()) {
                    Some("roberta" | "xlm-roberta" | "camembert") => 2,
                    _ => 0,
                };
                let positions =
                    config.get("max_position_embeddings").and_then(|v| v.as_u64()).map(|p| p as usize - offset);
                let truncation = tokenizer.get_truncation().map(|t| t.max_length);
                (crate::bundle::foreign_graph(dir)?, sentence_transformers_pooling(dir)?, truncation.or(positions))
            }
        };
        let mut session = EncoderSession::load_pooled(&dir.join(&model_file), &opts.decoder, pooling)?;
        if session.embedding_dim == 0 {
            // The graph leaves the width open: measure it once on a one-token input.
            session.embedding_dim = session.run(&[0], &[0])?.len();
        }
        Ok(Encoder { session, tokenizer, manifest, max_tokens, dir: dir.to_path_buf() })
    }

    /// The bundle's manifest (`None` for an encoder exported by Optimum).
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// Bytes of the weights on disk (the ONNX files and their external data).
    pub fn weight_bytes(&self) -> u64 {
        crate::bundle::weight_bytes(&self.dir)
    }

    /// The most tokens one text may have, when the bundle records it.
    pub fn context_length(&self) -> Option<usize> {
        self.max_tokens
    }

    /// Entries in the tokenizer's vocabulary (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Length of the embeddings [`Encoder::embed`] returns.
    pub fn embedding_dim(&self) -> usize {
        self.session.embedding_dim
    }

    /// Tokens `text` takes as [`Encoder::embed`] feeds it (special tokens included).
    pub fn token_count(&self, text: &str) -> Result<usize> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().len())
    }

    /// Embeds `text` (special tokens added as the tokenizer defines; too long -> error).
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>> {
        if text.is_empty() {
            return Err(Error::InvalidRequest("the text is empty".into()));
        }
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let Some(max) = self.max_tokens.filter(|&m| enc.get_ids().len() > m) {
            return Err(Error::ContextOverflow { prompt: enc.get_ids().len(), max_new: 0, context: max });
        }
        self.session.run(enc.get_ids(), enc.get_type_ids())
    }
}
