//! Sentence encoders (`kind: encoder` bundles): text -> one embedding vector.
//!
//! The graph takes `input_ids`, `token_type_ids` and `attention_mask` (int64 `[1, seq]`) and
//! returns `sentence_embedding [1, hidden]` (pooled and, for sentence-transformers models,
//! L2-normalised inside the graph).

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::Tensor;

use crate::bundle::{verify_manifest, Kind, Manifest, MANIFEST};
use crate::decoder::DecoderOptions;
use crate::engine::EngineOptions;
use crate::error::{Error, Result};

/// An encoder graph in an ONNX Runtime session.
pub struct EncoderSession {
    session: Session,
    /// Length of `sentence_embedding` as the graph declares it (0: not declared).
    embedding_dim: usize,
}

impl EncoderSession {
    /// Opens an encoder ONNX file with the decoder's session settings.
    pub fn load(model: &Path, opts: &DecoderOptions) -> Result<Self> {
        let session = crate::session::open(model, opts)?;
        let embedding_dim = session
            .outputs()
            .iter()
            .find(|o| o.name() == "sentence_embedding")
            .and_then(|o| o.dtype().tensor_shape()?.last().copied())
            .filter(|&d| d > 0)
            .unwrap_or(0) as usize;
        Ok(EncoderSession { session, embedding_dim })
    }

    /// The sentence embedding of one sequence of ids and token types.
    pub fn run(&mut self, ids: &[u32], type_ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() || ids.len() != type_ids.len() {
            return Err(Error::InvalidRequest("an embedding needs at least one token".into()));
        }
        let s = ids.len();
        let to_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
        let inputs = ort::inputs![
            "input_ids" => Tensor::from_array(([1usize, s], to_i64(ids)))?,
            "token_type_ids" => Tensor::from_array(([1usize, s], to_i64(type_ids)))?,
            "attention_mask" => Tensor::from_array(([1usize, s], vec![1i64; s]))?,
        ];
        let out = self.session.run(inputs)?;
        let (shape, data) = out["sentence_embedding"].try_extract_tensor::<f32>()?;
        if shape.len() != 2 || shape[0] != 1 {
            return Err(Error::UnexpectedShape {
                name: "sentence_embedding".into(),
                shape: shape.iter().copied().collect(),
                expected: "[1, hidden]".into(),
            });
        }
        Ok(data.to_vec())
    }
}

/// An encoder bundle opened for embedding text.
pub struct Encoder {
    session: EncoderSession,
    tokenizer: tokenizers::Tokenizer,
    manifest: Manifest,
    max_tokens: Option<usize>,
    dir: PathBuf,
}

impl Encoder {
    /// Opens and verifies an encoder bundle.
    pub fn open(dir: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        let dir = dir.as_ref();
        crate::ortlib::init(opts.ort_lib.as_deref())?;
        let bundle_err = |what: String| Error::Bundle { path: dir.to_path_buf(), what };
        if !dir.join(MANIFEST).exists() {
            return Err(bundle_err("has no edgelm.json; export the encoder with `edgelm-distill export`".into()));
        }
        let kind = Kind::of(dir)?;
        if kind != Kind::Encoder {
            return Err(Error::WrongKind { path: dir.to_path_buf(), found: kind, wanted: Kind::Encoder });
        }
        let checked = opts.trust.check(dir)?;
        let manifest = match &checked.manifest {
            Some(bytes) => crate::bundle::verify_manifest_bytes(dir, bytes, &[])?,
            None => verify_manifest(dir, &[])?,
        };
        let tok_path: PathBuf = dir.join(
            manifest.tokenizer.as_deref().ok_or_else(|| bundle_err("an encoder bundle needs tokenizer.json".into()))?,
        );
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // One sequence at a time: padding (which sentence-transformers files often configure)
        // would only add masked positions. Truncation, if configured, is kept.
        tokenizer.with_padding(None);
        let mut session = EncoderSession::load(&dir.join(&manifest.model_file), &opts.decoder)?;
        if session.embedding_dim == 0 {
            // The graph leaves the width open: measure it once on a one-token input.
            session.embedding_dim = session.run(&[0], &[0])?.len();
        }
        let max_tokens = manifest.encoder.as_ref().map(|e| e.max_tokens);
        Ok(Encoder { session, tokenizer, manifest, max_tokens, dir: dir.to_path_buf() })
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
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
