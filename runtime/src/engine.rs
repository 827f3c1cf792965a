//! A causal-LM bundle opened for generation ([`Engine`]), how to open one
//! ([`Engine::builder`], [`EngineOptions`]), and its prompt encoding.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::batch::Batcher;
use crate::bundle::Bundle;
use crate::decoder::{DecodeState, Decoder, DecoderOptions, KvCacheMode};
use crate::error::{Error, Result};
use crate::generate::{self, Forward, GenerateParams, Generation, LoopSetup, TokenEvent};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, TextCodec};

/// How to open a bundle. Start from [`EngineOptions::default`] (or use [`Engine::builder`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct EngineOptions {
    /// ONNX Runtime library to load instead of searching (see [`crate::ortlib`]).
    pub ort_lib: Option<PathBuf>,
    /// Session settings (threads, KV cache strategy).
    pub decoder: DecoderOptions,
    /// Public keys bundles may be signed with, and whether unsigned ones are refused.
    pub trust: crate::signature::TrustedKeys,
}

impl EngineOptions {
    /// With `n` intra-op threads (0: one per physical core, ONNX Runtime's choice).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.decoder.threads = n;
        self
    }

    /// With this KV cache strategy.
    pub fn with_kv_cache(mut self, mode: KvCacheMode) -> Self {
        self.decoder.kv_cache = mode;
        self
    }

    /// With these execution providers, tried in order (see [`crate::providers`]).
    pub fn with_execution_providers(mut self, providers: Vec<crate::ExecutionProvider>) -> Self {
        self.decoder.execution_providers = providers;
        self
    }

    /// Checking bundle signatures against `trust` before a bundle opens.
    pub fn with_trusted_keys(mut self, trust: crate::signature::TrustedKeys) -> Self {
        self.trust = trust;
        self
    }

    /// Loading ONNX Runtime from `path` (the first successful load in a process counts).
    pub fn with_ort_library(mut self, path: impl Into<PathBuf>) -> Self {
        self.ort_lib = Some(path.into());
        self
    }
}

/// Opens a bundle with settings given one at a time:
/// `Engine::builder("bundle/").threads(4).kv_cache(KvCacheMode::Shared).open()?`.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until open() is called"]
pub struct EngineBuilder {
    dir: PathBuf,
    options: EngineOptions,
}

impl EngineBuilder {
    /// Intra-op threads (0: one per physical core).
    pub fn threads(mut self, n: usize) -> Self {
        self.options = self.options.with_threads(n);
        self
    }

    /// KV cache strategy.
    pub fn kv_cache(mut self, mode: KvCacheMode) -> Self {
        self.options = self.options.with_kv_cache(mode);
        self
    }

    /// Checking bundle signatures against `trust` (see [`crate::signature`]).
    pub fn trusted_keys(mut self, trust: crate::signature::TrustedKeys) -> Self {
        self.options.trust = trust;
        self
    }

    /// ONNX Runtime library to load instead of searching.
    pub fn ort_library(mut self, path: impl Into<PathBuf>) -> Self {
        self.options = self.options.with_ort_library(path);
        self
    }

    /// Every setting at once.
    pub fn options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// Opens the bundle as a causal LM (an encoder bundle is [`Error::WrongKind`]).
    pub fn open(self) -> Result<Engine> {
        Engine::open(self.dir, &self.options)
    }
}

/// One sequence on the decoder: what the token loop drives. The session is held only for the
/// model step; the sequence's KV cache and logits are its own, so sequences on other threads
/// interleave step by step.
struct Sequence<'a> {
    decoder: &'a Mutex<Decoder>,
    state: DecodeState,
}

impl Forward for Sequence<'_> {
    fn forward(&mut self, ids: &[u32]) -> Result<&mut [f32]> {
        // A step that panicked leaves nothing half-written that a later step reads (every
        // step writes its sequence's cache and logits afresh), so a poisoned lock is taken.
        let mut decoder = self.decoder.lock().unwrap_or_else(|e| e.into_inner());
        decoder.forward(&mut self.state, ids)
    }
}

/// A bundle opened for generation. One session serves every sequence: [`Engine::generate`]
/// takes `&self`, so threads sharing an engine (`Arc<Engine>`) generate at once, each with its
/// own KV cache, their model steps taking turns on the session, or, after
/// [`Engine::enable_batching`], their decode steps running as one batch.
pub struct Engine {
    bundle: Bundle,
    decoder: Arc<Mutex<Decoder>>,
    batcher: Option<Batcher>,
    codec: Option<TextCodec>,
    context_length: usize,
    vocab_size: usize,
    kv_cache_mode: KvCacheMode,
}

impl Engine {
    /// A builder for opening the bundle in `dir` (edgelm or onnxruntime-genai layout).
    pub fn builder(dir: impl Into<PathBuf>) -> EngineBuilder {
        EngineBuilder { dir: dir.into(), options: EngineOptions::default() }
    }

    /// Opens and verifies a bundle folder (edgelm or onnxruntime-genai layout).
    pub fn open(dir: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        crate::ortlib::init(opts.ort_lib.as_deref())?;
        let checked = opts.trust.check(dir.as_ref())?;
        let bundle = Bundle::open_with_manifest(dir, checked.manifest.as_deref())?;
        let decoder = Decoder::of_bundle(&bundle, &opts.decoder)?;
        let g = &bundle.generation;
        let codec = match &bundle.tokenizer_path {
            Some(p) => Some(TextCodec::load(
                p,
                bundle.chat_template.clone(),
                g.bos_token_id,
                g.eos_token_ids.first().copied(),
            )?),
            None => None,
        };
        Ok(Engine {
            bundle,
            context_length: decoder.context_length(),
            vocab_size: decoder.vocab_size(),
            kv_cache_mode: decoder.kv_cache_mode(),
            decoder: Arc::new(Mutex::new(decoder)),
            batcher: None,
            codec,
        })
    }

    /// Runs the decode steps of sequences generated at once (threads sharing this engine) as
    /// one batch on the session, up to `sequences` of them; more wait for a place (a sequence
    /// waiting for one is not cancelled until it has it). Their KV caches live in one arena of
    /// `sequences` caches at the full context, committed as it is written. With
    /// `reuse_prompts`, a new prompt that starts the way an earlier sequence's did reuses what
    /// that sequence left in its place (faster first tokens; a client could tell from the
    /// timing that someone sent a prompt starting like its own, so a server shared by parties
    /// who must not learn of each other's prompts turns it off).
    ///
    /// Returns false, changing nothing, when the graph cannot batch in place (its KV cache is
    /// not shared between past and present, see [`KvCacheMode`]), and an error when the
    /// system refuses the arena's memory. Batched rows may differ from a lone run in the last
    /// bits of their logits (the matrix kernels block a batch differently), as in every
    /// batching server.
    pub fn enable_batching(&mut self, sequences: usize, reuse_prompts: bool) -> Result<bool> {
        if sequences == 0 {
            return Err(Error::InvalidRequest("batching needs at least one sequence".into()));
        }
        let arena = self.decoder.lock().unwrap_or_else(|e| e.into_inner()).arena(sequences, self.context_length)?;
        let Some(arena) = arena else { return Ok(false) };
        // The old worker (if any) finishes and stops before the new one starts.
        self.batcher = None;
        self.batcher = Some(Batcher::start(Arc::clone(&self.decoder), arena, reuse_prompts)?);
        Ok(true)
    }

    /// Sequences whose decode steps run as one batch (0: batching is off, or its worker
    /// stopped and sequences take turns again).
    pub fn batch_sequences(&self) -> usize {
        self.batcher.as_ref().filter(|b| b.running()).map_or(0, Batcher::sequences)
    }

    /// What batching has run so far (all zero when it is off).
    pub fn batch_stats(&self) -> crate::BatchStats {
        self.batcher.as_ref().map(Batcher::stats).unwrap_or_default()
    }

    /// The opened bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The tokenizer, when the bundle has one.
    pub fn codec(&self) -> Option<&TextCodec> {
        self.codec.as_ref()
    }

    /// Longest sequence the model supports.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The KV cache strategy in use.
    pub fn kv_cache_mode(&self) -> KvCacheMode {
        self.kv_cache_mode
    }

    /// Bytes of weights on disk (see [`crate::bundle::weight_bytes`]).
    pub fn weight_bytes(&self) -> u64 {
        crate::bundle::weight_bytes(&self.bundle.dir)
    }

    /// Bytes of a KV cache holding `positions` positions (f32 keys and values, every layer).
    pub fn kv_cache_bytes(&self, positions: usize) -> u64 {
        let d = &self.bundle.genai.model.decoder;
        (2 * d.num_hidden_layers * d.num_key_value_heads * d.head_size * positions * 4) as u64
    }

    /// Sampling defaults from the bundle.
    pub fn default_sampling(&self) -> SamplingParams {
        let g = &self.bundle.generation;
        SamplingParams {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            repetition_penalty: g.repetition_penalty,
            seed: 0,
        }
    }

    /// Token ids for a text prompt (special tokens added as the tokenizer defines).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        let mut ids = self.codec.as_ref().ok_or(Error::NoTokenizer)?.encode(text, true)?;
        if let (true, Some(bos)) = (self.bundle.add_bos_token, self.bundle.generation.bos_token_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Token ids for a conversation rendered with the chat template.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let codec = self.codec.as_ref().ok_or(Error::NoTokenizer)?;
        let text = codec.apply_chat_template(messages)?;
        // The template already writes any BOS it wants, as transformers assumes.
        codec.encode(&text, false)
    }

    /// Token ids for a one-shot text prompt, as every front end feeds it: rendered as one user
    /// turn with the bundle's chat template (the format the model was trained on), or tokenized
    /// as it is when `raw` is set or the bundle has no template.
    pub fn encode_prompt(&self, text: &str, raw: bool) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        match self.codec.as_ref() {
            Some(c) if !raw && c.has_chat_template() => self.encode_chat(&[ChatMessage::user(text)]),
            _ => self.encode(text),
        }
    }

    /// Checks a request as [`Engine::generate`] would before it starts: a front end that must
    /// answer "accepted" before the first token (the serial link's Ack) calls this first.
    pub fn check_request(&self, prompt: &[u32], params: &GenerateParams) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty: give at least one token".into()));
        }
        if params.max_new_tokens == 0 {
            return Err(Error::InvalidRequest("max_new_tokens must be at least 1".into()));
        }
        if self.codec.is_none() && params.stop_strings.iter().any(|s| !s.is_empty()) {
            return Err(Error::InvalidRequest("stop strings need a tokenizer, and this bundle has none".into()));
        }
        let vocab = self.vocab_size;
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        let context = self.context_length;
        if prompt.len() >= context {
            return Err(Error::ContextOverflow { prompt: prompt.len(), max_new: params.max_new_tokens, context });
        }
        Ok(())
    }

    /// Generates after `prompt`, calling `on_token` for every token; the callback stops
    /// generation by returning `ControlFlow::Break(())`.
    ///
    /// After the last token, text that was held back (an incomplete character at the very end,
    /// or the start of a stop string that never completed) arrives in one more event whose `id`
    /// is None. No event follows a `Break`.
    /// TTFT counts from the call, so it includes setting up the sequence's KV cache.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.generate_until(prompt, params, || false, on_token)
    }

    /// [`Engine::generate`] that also asks `cancelled` before every model step (the first
    /// included) and stops with [`StopReason::Cancelled`] once it says true: how another
    /// thread stops a generation.
    pub fn generate_until(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        cancelled: impl FnMut() -> bool,
        on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let start = Instant::now();
        self.check_request(prompt, params)?;
        let capacity = (prompt.len() + params.max_new_tokens).min(self.context_length);
        let setup = LoopSetup {
            capacity,
            eos: &self.bundle.generation.eos_token_ids,
            tokenizer: self.codec.as_ref().map(TextCodec::tokenizer),
            start,
        };
        if let Some(batcher) = self.batcher.as_ref().filter(|b| b.running()) {
            let mut seq = batcher.sequence(self.vocab_size);
            return generate::run(&mut seq, setup, prompt, params, cancelled, on_token);
        }
        let state = self.decoder.lock().unwrap_or_else(|e| e.into_inner()).start(capacity)?;
        generate::run(&mut Sequence { decoder: &self.decoder, state }, setup, prompt, params, cancelled, on_token)
    }
}
