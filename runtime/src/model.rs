//! Opening whatever a bundle holds: one call for a causal LM or a sentence encoder.

use std::path::Path;

use crate::bundle::Kind;
use crate::encoder::Encoder;
use crate::engine::{Engine, EngineOptions};
use crate::error::Result;

/// A bundle opened as what it holds.
pub enum Model {
    /// A causal language model, for generation.
    CausalLm(Box<Engine>),
    /// A sentence encoder, for embeddings.
    Encoder(Box<Encoder>),
}

impl Model {
    /// Opens and verifies the bundle in `dir` by its kind (edgelm.json's `kind`; a folder made
    /// by onnxruntime-genai is a causal LM).
    pub fn open(dir: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        let dir = dir.as_ref();
        crate::ortlib::init(opts.ort_lib.as_deref())?;
        Ok(match Kind::of(dir)? {
            Kind::CausalLm => Model::CausalLm(Box::new(Engine::open(dir, opts)?)),
            Kind::Encoder => Model::Encoder(Box::new(Encoder::open(dir, opts)?)),
        })
    }

    /// Its context in tokens: prompt plus answer for a causal LM, one text for an encoder (0
    /// when the encoder's bundle does not say).
    pub fn context_length(&self) -> usize {
        match self {
            Model::CausalLm(e) => e.context_length(),
            Model::Encoder(e) => e.context_length().unwrap_or(0),
        }
    }

    /// What the model is.
    pub fn kind(&self) -> Kind {
        match self {
            Model::CausalLm(_) => Kind::CausalLm,
            Model::Encoder(_) => Kind::Encoder,
        }
    }
}
