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
    /// Whether the graph takes `position_ids` (an embedding model built on a decoder, as
    /// Optimum exports Qwen3-Embedding).
    positions: bool,
}

impl EncoderSession {
    /// Opens an encoder ONNX file with the decoder's session settings; the token states of a
    /// graph without `sentence_embedding` are mean-pooled and not normalised.
    pub fn load(model: &Path, opts: &DecoderOptions) -> Result<Self> {
        let session = crate::session::open(model, opts)?;
        let find = |name: &str| session.outputs().iter().find(|o| o.name() == name);
        let (output, declared) = if let Some(o) = find("sentence_embedding") {
            (Output::Sentence, o)
        } else if let Some(o) = find("token_embeddings").or_else(|| find("last_hidden_state")) {
            (Output::Tokens { name: o.name().to_owned(), pooling: Pooling::Mean, normalize: false }, o)
        } else {
            return Err(Error::Bundle {
                path: model.to_path_buf(),
                what:
                    "the encoder graph has none of the outputs sentence_embedding, token_embeddings, last_hidden_state"
                        .into(),
            });
        };
        let embedding_dim =
            declared.dtype().tensor_shape().and_then(|s| s.last().copied()).filter(|&d| d > 0).unwrap_or(0) as usize;
        let takes = |name: &str| session.inputs().iter().any(|i| i.name() == name);
        if let Some(past) = session.inputs().iter().find(|i| i.name().starts_with("past_key_values")) {
            return Err(Error::Bundle {
                path: model.to_path_buf(),
                what: format!(
                    "the encoder graph takes a KV cache (`{}`): export the embedding model without past inputs (Optimum's feature-extraction task)",
                    past.name()
                ),
            });
        }
        let (token_types, positions) = (takes("token_type_ids"), takes("position_ids"));
        Ok(EncoderSession { session, embedding_dim, output, token_types, positions })
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
        if self.positions {
            inputs.push(("position_ids", Tensor::from_array(([1usize, s], (0..s as i64).collect::<Vec<_>>()))?.into()));
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
            Output::Tokens { pooling, normalize, .. }
                if shape.len() == 3 && shape[0] == 1 && shape[1] == s as i64 && shape[2] > 0 =>
            {
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

/// The pooling a sentence-transformers folder declares and whether a Normalize module follows
/// it: `modules.json` lists the modules run after the transformer, in order, and the Pooling
/// module's folder holds its config.json. Without modules.json, what `1_Pooling/config.json`
/// says (not normalised), and `None` without either. Only a Transformer, one
/// Pooling and an optional Normalize after it are accepted: any other module (a Dense
/// projection, ...) would change the embedding, so it is refused by name rather than skipped.
/// The one reader of these files, for the runtime and for export.
pub fn sentence_transformers_pooling(dir: &Path) -> Result<Option<(Pooling, bool)>> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        let pooling = dir.join("1_Pooling").join("config.json");
        return Ok(if pooling.exists() { Some((pooling_mode(&pooling)?, false)) } else { None });
    }
    let refuse = |what: String| Error::Bundle { path: modules_path.clone(), what };
    let modules = crate::bundle::read_json::<serde_json::Value>(&modules_path)?;
    let modules = modules.as_array().ok_or_else(|| refuse("is not a list of modules".into()))?;
    let (mut pooling, mut normalize) = (None, false);
    for m in modules {
        let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        let folder = m.get("path").and_then(|p| p.as_str());
        match kind.rsplit('.').next().unwrap_or(kind) {
            "Transformer" if pooling.is_none() => {}
            // A Normalize counts only after the Pooling, so a Pooling after it is refused below.
            "Pooling" if pooling.is_none() && !normalize => {
                pooling = Some(pooling_mode(&dir.join(folder.unwrap_or("1_Pooling")).join("config.json"))?);
            }
            "Normalize" if pooling.is_some() && !normalize => normalize = true,
            _ => {
                return Err(refuse(format!(
                    "lists the module `{kind}` (folder `{}`) where edgelm applies a Transformer, one Pooling and an optional Normalize after it, in that order",
                    folder.unwrap_or("")
                )))
            }
        }
    }
    Ok(Some((pooling.unwrap_or(Pooling::Mean), normalize)))
}

/// The most tokens sentence-transformers embeds for the folder (`max_seq_length` in
/// sentence_bert_config.json); `None` where the file or the key is missing or unreadable.
pub fn sentence_transformers_max_tokens(dir: &Path) -> Option<usize> {
    let config: serde_json::Value = crate::bundle::read_json(&dir.join("sentence_bert_config.json")).ok()?;
    config.get("max_seq_length")?.as_u64().map(|v| v as usize)
}

/// The one pooling mode a sentence-transformers Pooling `config.json` turns on.
pub fn pooling_mode(config_path: &Path) -> Result<Pooling> {
    let config = crate::bundle::read_json::<serde_json::Value>(config_path)?;
    let modes: Vec<&str> = config
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| k.starts_with("pooling_mode_") && v.as_bool() == Some(true))
        .map(|(k, _)| k.as_str())
        .collect();
    match modes[..] {
        ["pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
        ["pooling_mode_cls_token"] => Ok(Pooling::Cls),
        ["pooling_mode_max_tokens"] => Ok(Pooling::Max),
        ["pooling_mode_lasttoken"] => Ok(Pooling::LastToken),
        _ => Err(Error::Bundle {
            path: config_path.to_path_buf(),
            what: format!(
                "pools with {modes:?}; edgelm applies exactly one of mean, cls, max, lasttoken (several at once are joined end to end by sentence-transformers)"
            ),
        }),
    }
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
        // would only add masked positions. Truncation is off: a text past the encoder's limit
        // is refused rather than cut short without a word (sentence-transformers folders also
        // carry a tokenizer truncation shorter than the length the model is used at).
        tokenizer.with_padding(None);
        let truncation = tokenizer.get_truncation().map(|t| t.max_length);
        let _ = tokenizer.with_truncation(None);
        let (model_file, max_tokens) = match &manifest {
            Some(m) => (m.model_file.clone(), m.encoder.as_ref().map(|e| e.max_tokens)),
            None => {
                let config: serde_json::Value = crate::bundle::read_json(&dir.join("config.json")).unwrap_or_default();
                // RoBERTa-style position tables keep two rows for the padding offset.
                let offset = match config.get("model_type").and_then(|t| t.as_str()) {
                    Some("roberta" | "xlm-roberta" | "camembert" | "mpnet") => 2,
                    _ => 0,
                };
                let positions = config
                    .get("max_position_embeddings")
                    .and_then(|v| v.as_u64())
                    .map(|p| (p as usize).saturating_sub(offset))
                    .filter(|&p| p > 0);
                // sentence-transformers' limit, else the tokenizer's truncation, never past the
                // position table. Longer texts are refused, not cut short: edgelm's rule for
                // every input, and a cut the tokenizer made on its own would not say so.
                let limit = sentence_transformers_max_tokens(dir).or(truncation);
                let max = match (limit, positions) {
                    (Some(l), Some(p)) => Some(l.min(p)),
                    (l, p) => l.or(p),
                };
                (crate::bundle::foreign_graph(dir)?, max)
            }
        };
        let mut session = EncoderSession::load(&dir.join(&model_file), &opts.decoder)
            .map_err(|e| crate::session::explain_refusal(e, dir))?;
        // Token states are pooled here as the sentence-transformers files say (read only then).
        if let (None, Output::Tokens { pooling, normalize, .. }) = (&manifest, &mut session.output) {
            if let Some((p, n)) = sentence_transformers_pooling(dir)? {
                (*pooling, *normalize) = (p, n);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sentence-transformers folder with `modules` (type suffixes) and a Pooling config.
    fn folder(modules: &[&str], pooling: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<serde_json::Value> = modules
            .iter()
            .enumerate()
            .map(|(i, m)| serde_json::json!({"idx": i, "name": i.to_string(), "path": if *m == "Pooling" { "1_Pooling" } else { "" }, "type": format!("sentence_transformers.models.{m}")}))
            .collect();
        std::fs::write(dir.path().join("modules.json"), serde_json::to_string(&list).unwrap()).unwrap();
        std::fs::create_dir_all(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), pooling).unwrap();
        dir
    }

    #[test]
    fn sentence_transformers_pooling_is_applied_exactly_or_refused() {
        let mode = |m: &str| {
            format!(
                r#"{{"word_embedding_dimension": 4, "{m}": true, "pooling_mode_mean_tokens": false, "include_prompt": true}}"#
            )
        };
        let read = |modules: &[&str], pooling: &str| sentence_transformers_pooling(folder(modules, pooling).path());
        let chain = ["Transformer", "Pooling", "Normalize"];
        assert_eq!(read(&chain, &mode("pooling_mode_cls_token")).unwrap(), Some((Pooling::Cls, true)));
        assert_eq!(read(&chain[..2], &mode("pooling_mode_lasttoken")).unwrap(), Some((Pooling::LastToken, false)));
        assert_eq!(read(&chain[..2], &mode("pooling_mode_max_tokens")).unwrap(), Some((Pooling::Max, false)));
        assert_eq!(read(&chain, r#"{"pooling_mode_mean_tokens": true}"#).unwrap(), Some((Pooling::Mean, true)));
        // What edgelm does not apply is refused by name: a Dense layer, two modes joined, a
        // weighted mean.
        let e = read(&["Transformer", "Pooling", "Dense", "Normalize"], r#"{"pooling_mode_mean_tokens": true}"#)
            .unwrap_err();
        assert!(e.to_string().contains("models.Dense"), "{e}");
        let e = read(&chain, r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#).unwrap_err();
        assert!(e.to_string().contains("pooling_mode_max_tokens"), "{e}");
        let e = read(&chain, &mode("pooling_mode_weightedmean_tokens")).unwrap_err();
        assert!(e.to_string().contains("weightedmean"), "{e}");
        // Out of order, or twice: sentence-transformers would run something else.
        let e = read(&["Transformer", "Normalize", "Pooling"], &mode("pooling_mode_cls_token")).unwrap_err();
        assert!(e.to_string().contains("models.Normalize") && e.to_string().contains("in that order"), "{e}");
        let e = read(&["Transformer", "Pooling", "Pooling"], &mode("pooling_mode_cls_token")).unwrap_err();
        assert!(e.to_string().contains("models.Pooling"), "{e}");
        assert_eq!(sentence_transformers_pooling(tempfile::tempdir().unwrap().path()).unwrap(), None);
        // No modules.json: what the Pooling folder says, not normalised.
        let plain = folder(&[], &mode("pooling_mode_cls_token"));
        std::fs::remove_file(plain.path().join("modules.json")).unwrap();
        assert_eq!(sentence_transformers_pooling(plain.path()).unwrap(), Some((Pooling::Cls, false)));
    }

    #[test]
    fn pooling_by_hand() {
        // Two tokens of three features.
        let states = [1.0, -2.0, 3.0, 3.0, 4.0, -1.0];
        assert_eq!(pool(&states, 2, Pooling::Mean, false), [2.0, 1.0, 1.0]);
        assert_eq!(pool(&states, 2, Pooling::Max, false), [3.0, 4.0, 3.0]);
        assert_eq!(pool(&states, 2, Pooling::Cls, false), [1.0, -2.0, 3.0]);
        assert_eq!(pool(&states, 2, Pooling::LastToken, false), [3.0, 4.0, -1.0]);
        let n = pool(&states, 2, Pooling::Mean, true);
        assert!((n.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6 && (n[0] / n[1] - 2.0).abs() < 1e-6);
    }
}
