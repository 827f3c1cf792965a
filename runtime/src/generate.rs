//! Generation: a bundle opened for inference ([`Engine`]), and the token loop with sampling,
//! stop conditions, streaming and metrics.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::bundle::Bundle;
use crate::decoder::{Decoder, DecoderOptions, KvCacheMode};
use crate::detokenize::StreamDecoder;
use crate::error::{Error, Result};
use crate::metrics::{peak_rss_bytes, Metrics};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::TextCodec;

/// How to open a bundle.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// ONNX Runtime library to load instead of searching (see [`crate::ortlib`]).
    pub ort_lib: Option<PathBuf>,
    /// Session settings (threads, KV cache strategy).
    pub decoder: DecoderOptions,
}

/// One turn of a conversation, as chat templates take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A turn with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage::new("user", content)
    }

    /// An assistant turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage::new("assistant", content)
    }
}

/// Per-request settings.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token selection.
    pub sampling: SamplingParams,
    /// Stop when the generated text contains any of these (the stop string is not returned).
    pub stop_strings: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// One streamed step.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    /// The token chosen; None for the final event that releases held-back text.
    pub id: Option<u32>,
    /// Text completed by this token (may be empty: a partial character, or held back while it
    /// might start a stop string).
    pub text: &'a str,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Generated token ids (including a final EOS, if one ended generation).
    pub generated_ids: Vec<u32>,
    /// Generated text (empty without a tokenizer).
    pub text: String,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// Timing and memory.
    pub metrics: Metrics,
}

/// A bundle opened for generation.
pub struct Engine {
    bundle: Bundle,
    decoder: Decoder,
    codec: Option<TextCodec>,
}

impl Engine {
    /// Opens and verifies a bundle folder (edgelm or onnxruntime-genai layout).
    pub fn open(dir: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        crate::ortlib::init(opts.ort_lib.as_deref())?;
        let bundle = Bundle::open(dir)?;
        let decoder = Decoder::load(&bundle.model_path, &bundle.genai, &opts.decoder)?;
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
        Ok(Engine { bundle, decoder, codec })
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
        self.decoder.context_length()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.decoder.vocab_size()
    }

    /// The KV cache strategy in use.
    pub fn kv_cache_mode(&self) -> KvCacheMode {
        self.decoder.kv_cache_mode()
    }

    /// Bytes of weights on disk (the ONNX file plus any external data next to it).
    pub fn weight_bytes(&self) -> u64 {
        let model = &self.bundle.model_path;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        size(model) + size(&model.with_extension("onnx.data"))
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
        let vocab = self.decoder.vocab_size();
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        let context = self.decoder.context_length();
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
        &mut self,
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
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut cancelled: impl FnMut() -> bool,
        mut on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let start = Instant::now();
        self.check_request(prompt, params)?;
        let context = self.decoder.context_length();
        let capacity = (prompt.len() + params.max_new_tokens.max(1)).min(context);
        let mut state = self.decoder.start(capacity)?;
        let mut sampler = Sampler::new(params.sampling);
        let eos = &self.bundle.generation.eos_token_ids;
        let mut stream = StreamDecoder::new(&prompt[prompt.len().saturating_sub(4)..]);
        let mut stops = StopMatcher::new(&params.stop_strings);
        let mut history: Vec<u32> = prompt.to_vec();
        let mut generated = Vec::with_capacity(params.max_new_tokens);
        let mut text = String::new();
        let mut metrics = Metrics { prompt_tokens: prompt.len(), ..Metrics::default() };
        let mut first_token_at = None;
        let mut reason = StopReason::MaxTokens;
        let mut input: Vec<u32> = prompt.to_vec();
        let mut caller_stopped = false;
        while generated.len() < params.max_new_tokens {
            if cancelled() {
                reason = StopReason::Cancelled;
                break;
            }
            if state.position() + input.len() > capacity {
                reason = StopReason::ContextFull;
                break;
            }
            let logits = self.decoder.forward(&mut state, &input)?;
            let id = sampler.sample(logits, &history);
            if first_token_at.is_none() {
                first_token_at = Some(Instant::now());
            }
            generated.push(id);
            history.push(id);
            let is_eos = !params.ignore_eos && eos.contains(&id);
            let mut piece = String::new();
            let mut hit_stop = false;
            if let (Some(codec), false) = (&self.codec, is_eos) {
                let new = stream.push(codec.tokenizer(), id).map_err(|e| Error::Tokenizer(e.to_string()))?;
                match stops.push(new.as_deref().unwrap_or("")) {
                    StopOutcome::Continue(t) => piece = t,
                    StopOutcome::Stop(t) => {
                        piece = t;
                        hit_stop = true;
                    }
                }
            }
            text.push_str(&piece);
            let flow = on_token(TokenEvent { id: Some(id), text: &piece });
            caller_stopped = flow.is_break();
            if is_eos {
                reason = StopReason::Eos;
                break;
            }
            if hit_stop {
                reason = StopReason::StopString;
                break;
            }
            if flow.is_break() {
                reason = StopReason::Cancelled;
                break;
            }
            input.clear();
            input.push(id);
        }
        // Release text held back for a partial character or a possible stop string.
        if reason != StopReason::StopString {
            if let Some(codec) = &self.codec {
                let tail =
                    stream.flush(codec.tokenizer()).map_err(|e| Error::Tokenizer(e.to_string()))?.unwrap_or_default();
                let tail = match stops.push(&tail) {
                    StopOutcome::Continue(t) => t + &stops.finish(),
                    StopOutcome::Stop(t) => {
                        reason = StopReason::StopString;
                        t
                    }
                };
                if !tail.is_empty() {
                    text.push_str(&tail);
                    // A caller that stopped or cancelled gets no more callbacks; the text still
                    // has the tail.
                    if reason != StopReason::Cancelled && !caller_stopped {
                        let _ = on_token(TokenEvent { id: None, text: &tail });
                    }
                }
            }
        }
        let end = Instant::now();
        let first = first_token_at.unwrap_or(end);
        metrics.generated_tokens = generated.len();
        metrics.ttft_ms = (first - start).as_secs_f64() * 1e3;
        metrics.prefill_tokens_per_s = prompt.len() as f64 / (first - start).as_secs_f64().max(1e-9);
        let decode_secs = (end - first).as_secs_f64();
        metrics.decode_tokens_per_s =
            if generated.len() > 1 && decode_secs > 0.0 { (generated.len() - 1) as f64 / decode_secs } else { 0.0 };
        metrics.total_ms = (end - start).as_secs_f64() * 1e3;
        metrics.peak_rss_bytes = peak_rss_bytes();
        Ok(Generation { prompt_ids: prompt.to_vec(), generated_ids: generated, text, stop_reason: reason, metrics })
    }
}
