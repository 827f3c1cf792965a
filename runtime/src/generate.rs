//! The token loop: sampling, stop conditions, streaming and metrics over any model that turns
//! token ids into next-token logits. [`crate::Engine`] runs it on an ONNX Runtime session; the
//! tests below run it on a scripted model, without ONNX Runtime.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use crate::detokenize::StreamDecoder;
use crate::error::{Error, Result};
use crate::metrics::{peak_rss_bytes, Metrics};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopOutcome};

/// Per-request settings. Start from [`GenerateParams::default`] and change what you need:
/// `GenerateParams::default().with_max_new_tokens(64).with_ignore_eos(true)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token selection.
    pub sampling: SamplingParams,
    /// Stop when the generated text contains any of these. The stop string and anything after
    /// it is neither streamed nor returned; empty strings are ignored.
    pub stop_strings: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each chosen token's log-probability ([`TokenEvent::logprob`],
    /// [`Generation::mean_logprob`]); costs one pass over the vocabulary per token.
    pub logprobs: bool,
}

impl Default for GenerateParams {
    /// 128 new tokens, greedy, no stop strings, stop at end-of-sequence.
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            ignore_eos: false,
            logprobs: false,
        }
    }
}

impl GenerateParams {
    /// With at most `n` new tokens.
    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// With these sampling settings.
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// With these stop strings.
    pub fn with_stop_strings(mut self, stops: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.stop_strings = stops.into_iter().map(Into::into).collect();
        self
    }

    /// Going past end-of-sequence tokens (`true`) or stopping at them.
    pub fn with_ignore_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }

    /// Reporting each chosen token's log-probability (`true`) or not.
    pub fn with_logprobs(mut self, logprobs: bool) -> Self {
        self.logprobs = logprobs;
        self
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
    /// The caller's callback asked to stop, or a cancel arrived.
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
    /// The token's log-probability under the model's distribution after the repetition
    /// penalty (before temperature and truncation), when [`GenerateParams::logprobs`] asked.
    pub logprob: Option<f32>,
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
    /// Mean log-probability of the generated tokens (see [`TokenEvent::logprob`]), when
    /// [`GenerateParams::logprobs`] asked and a token was generated.
    pub mean_logprob: Option<f64>,
    /// Timing and memory.
    pub metrics: Metrics,
}

/// The seam between the token loop and a model: run `ids` after everything run so far on this
/// sequence and give the logits of the last position.
pub(crate) trait Forward {
    fn forward(&mut self, ids: &[u32]) -> Result<&mut [f32]>;
}

/// What the loop knows of the model besides its logits.
pub(crate) struct LoopSetup<'a> {
    /// Positions the sequence may hold (prompt and generated tokens fed back).
    pub capacity: usize,
    /// Tokens that end the answer unless `ignore_eos` is set.
    pub eos: &'a [u32],
    /// Turns ids into text; without one, events carry no text and stop strings never match.
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
    /// When the request started (TTFT counts from here).
    pub start: Instant,
}

/// Generates after `prompt` (already checked: non-empty, in range, shorter than capacity).
///
/// Event order: one event per generated token, then (unless a stop string ended the answer,
/// the callback said stop, or a cancel arrived) one event with `id: None` carrying text that
/// was held back. `cancelled` is asked before every model step, the first included.
pub(crate) fn run(
    model: &mut impl Forward,
    setup: LoopSetup<'_>,
    prompt: &[u32],
    params: &GenerateParams,
    mut cancelled: impl FnMut() -> bool,
    mut on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generation> {
    let LoopSetup { capacity, eos, tokenizer, start } = setup;
    let tokenizer_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut sampler = Sampler::new(params.sampling);
    let mut stream = StreamDecoder::new(&prompt[prompt.len().saturating_sub(4)..]);
    let mut stops = StopMatcher::new(&params.stop_strings);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut generated = Vec::with_capacity(params.max_new_tokens);
    let mut text = String::new();
    let mut first_token_at = None;
    let mut reason = StopReason::MaxTokens;
    let mut input: Vec<u32> = prompt.to_vec();
    let mut position = 0;
    let mut caller_stopped = false;
    let mut logprob_sum = 0.0f64;
    while generated.len() < params.max_new_tokens {
        if cancelled() {
            reason = StopReason::Cancelled;
            break;
        }
        if position + input.len() > capacity {
            reason = StopReason::ContextFull;
            break;
        }
        let logits = model.forward(&input)?;
        position += input.len();
        let id = sampler.sample(logits, &history);
        let logprob = params.logprobs.then(|| log_softmax_at(logits, id));
        if let Some(lp) = logprob {
            logprob_sum += f64::from(lp);
        }
        first_token_at.get_or_insert_with(Instant::now);
        generated.push(id);
        history.push(id);
        let is_eos = !params.ignore_eos && eos.contains(&id);
        let mut piece = String::new();
        let mut hit_stop = false;
        if let (Some(tok), false) = (tokenizer, is_eos) {
            let new = stream.push(tok, id).map_err(tokenizer_err)?;
            match stops.push(new.as_deref().unwrap_or("")) {
                StopOutcome::Continue(t) => piece = t,
                StopOutcome::Stop(t) => {
                    piece = t;
                    hit_stop = true;
                }
            }
        }
        text.push_str(&piece);
        let flow = on_token(TokenEvent { id: Some(id), text: &piece, logprob });
        caller_stopped = flow.is_break();
        if is_eos {
            reason = StopReason::Eos;
            break;
        }
        if hit_stop {
            reason = StopReason::StopString;
            break;
        }
        if caller_stopped {
            reason = StopReason::Cancelled;
            break;
        }
        input.clear();
        input.push(id);
    }
    // Release text held back for a partial character or a possible stop string.
    if let (Some(tok), false) = (tokenizer, reason == StopReason::StopString) {
        let tail = stream.flush(tok).map_err(tokenizer_err)?.unwrap_or_default();
        let tail = match stops.push(&tail) {
            StopOutcome::Continue(t) => t + &stops.finish(),
            StopOutcome::Stop(t) => {
                reason = StopReason::StopString;
                t
            }
        };
        if !tail.is_empty() {
            text.push_str(&tail);
            // A caller that stopped or cancelled gets no more callbacks; the text still has
            // the tail.
            if reason != StopReason::Cancelled && !caller_stopped {
                let _ = on_token(TokenEvent { id: None, text: &tail, logprob: None });
            }
        }
    }
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    let mut metrics = Metrics { prompt_tokens: prompt.len(), generated_tokens: generated.len(), ..Metrics::default() };
    metrics.ttft_ms = (first - start).as_secs_f64() * 1e3;
    metrics.prefill_tokens_per_s = prompt.len() as f64 / (first - start).as_secs_f64().max(1e-9);
    let decode_secs = (end - first).as_secs_f64();
    metrics.decode_tokens_per_s =
        if generated.len() > 1 && decode_secs > 0.0 { (generated.len() - 1) as f64 / decode_secs } else { 0.0 };
    metrics.total_ms = (end - start).as_secs_f64() * 1e3;
    metrics.peak_rss_bytes = peak_rss_bytes();
    let mean_logprob = (params.logprobs && !generated.is_empty()).then(|| logprob_sum / generated.len() as f64);
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        generated_ids: generated,
        text,
        stop_reason: reason,
        mean_logprob,
        metrics,
    })
}

/// `log_softmax(logits)[id]`, computed stably.
fn log_softmax_at(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f32::NEG_INFINITY;
    }
    let sum: f64 = logits.iter().filter(|v| !v.is_nan()).map(|&v| f64::from(v - max).exp()).sum();
    logits.get(id as usize).map_or(f32::NEG_INFINITY, |&v| v - max - sum.ln() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-level vocabulary: `Ġ` is a space, `Ã` + `©` are the two bytes of `é`.
    const VOCAB: [&str; 8] = ["</s>", "light", "Ġon", "Ġoff", "ĠEND", "Ã", "©", "Ġcaf"];
    const EOS: u32 = 0;

    fn tokenizer() -> tokenizers::Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> =
            VOCAB.iter().enumerate().map(|(i, t)| (t.to_string(), serde_json::json!(i))).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "</s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        });
        json.to_string().parse().expect("test tokenizer")
    }

    /// A model that answers a fixed script of tokens and records what it was fed.
    struct Scripted {
        script: Vec<u32>,
        fed: Vec<Vec<u32>>,
        fail_at: Option<usize>,
        logits: Vec<f32>,
    }

    impl Scripted {
        fn new(script: &[u32]) -> Self {
            Scripted { script: script.to_vec(), fed: vec![], fail_at: None, logits: vec![0.0; VOCAB.len()] }
        }
    }

    impl Forward for Scripted {
        fn forward(&mut self, ids: &[u32]) -> Result<&mut [f32]> {
            let step = self.fed.len();
            self.fed.push(ids.to_vec());
            if self.fail_at == Some(step) {
                return Err(Error::InvalidRequest(format!("the model failed at step {step}")));
            }
            self.logits.fill(0.0);
            self.logits[self.script[step] as usize] = 5.0;
            Ok(&mut self.logits)
        }
    }

    const PROMPT: [u32; 2] = [1, 2];

    /// Runs the loop and returns the result plus every event as (id, text).
    fn generate(
        model: &mut Scripted,
        params: &GenerateParams,
        capacity: usize,
        stop_after_events: Option<usize>,
    ) -> (Result<Generation>, Vec<(Option<u32>, String)>) {
        let tok = tokenizer();
        let mut events = vec![];
        let setup = LoopSetup { capacity, eos: &[EOS], tokenizer: Some(&tok), start: Instant::now() };
        let out = run(
            model,
            setup,
            &PROMPT,
            params,
            || false,
            |ev| {
                events.push((ev.id, ev.text.to_owned()));
                match stop_after_events {
                    Some(n) if events.len() >= n => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                }
            },
        );
        (out, events)
    }

    fn params(max_new: usize) -> GenerateParams {
        GenerateParams::default().with_max_new_tokens(max_new)
    }

    #[test]
    fn logprobs_are_the_chosen_tokens_log_softmax_and_their_mean() {
        // Logits 5 for the scripted token, 0 for the other 7: p = e^5 / (e^5 + 7).
        let want = (5.0f64.exp() / (5.0f64.exp() + 7.0)).ln();
        let mut m = Scripted::new(&[1, 2, 3]);
        let (out, _) = generate(&mut m, &params(3).with_logprobs(true), 64, None);
        let mean = out.unwrap().mean_logprob.unwrap();
        assert!((mean - want).abs() < 1e-5, "{mean} vs {want}");
        let mut m = Scripted::new(&[1, 2, 3]);
        assert_eq!(generate(&mut m, &params(3), 64, None).0.unwrap().mean_logprob, None);
    }

    #[test]
    fn follows_the_model_feeds_each_token_once_and_stops_at_max_tokens() {
        let mut m = Scripted::new(&[1, 2, 3, 2, 2]);
        let (out, events) = generate(&mut m, &params(3), 64, None);
        let out = out.unwrap();
        assert_eq!(out.generated_ids, [1, 2, 3]);
        assert_eq!(out.stop_reason, StopReason::MaxTokens);
        assert_eq!(out.text, "light on off");
        // The prompt once, then each new token alone: the model keeps its own cache.
        assert_eq!(m.fed, [vec![1, 2], vec![1], vec![2]]);
        let streamed: String = events.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(streamed, out.text);
        assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
        assert_eq!((out.metrics.prompt_tokens, out.metrics.generated_tokens), (2, 3));
    }

    #[test]
    fn eos_ends_the_answer_without_text_unless_ignored() {
        let mut m = Scripted::new(&[1, EOS, 2]);
        let (out, events) = generate(&mut m, &params(8), 64, None);
        let out = out.unwrap();
        assert_eq!((out.generated_ids.as_slice(), out.stop_reason), (&[1, EOS][..], StopReason::Eos));
        assert_eq!(out.text, "light");
        assert_eq!(events.last().unwrap(), &(Some(EOS), String::new()), "the EOS event carries no text");
        let mut m = Scripted::new(&[1, EOS, 2]);
        let (out, _) = generate(&mut m, &params(3).with_ignore_eos(true), 64, None);
        let out = out.unwrap();
        assert_eq!((out.generated_ids.as_slice(), out.stop_reason), (&[1, EOS, 2][..], StopReason::MaxTokens));
        assert_eq!(out.text, "light on");
    }

    #[test]
    fn a_stop_string_is_never_streamed_nor_returned() {
        let mut m = Scripted::new(&[1, 2, 3, 4, 2]);
        let (out, events) = generate(&mut m, &params(8).with_stop_strings([" off"]), 64, None);
        let out = out.unwrap();
        assert_eq!(out.stop_reason, StopReason::StopString);
        assert_eq!(out.text, "light on");
        assert_eq!(out.generated_ids, [1, 2, 3]);
        let streamed: String = events.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(streamed, "light on");
        assert!(events.iter().all(|e| e.0.is_some()), "no release event after a stop string");
        // An empty stop string matches nothing.
        let mut m = Scripted::new(&[1, 2]);
        let (out, _) = generate(&mut m, &params(2).with_stop_strings([""]), 64, None);
        assert_eq!(out.unwrap().text, "light on");
    }

    #[test]
    fn text_held_for_a_possible_stop_string_is_released_last() {
        let mut m = Scripted::new(&[1, 3]);
        let (out, events) = generate(&mut m, &params(2).with_stop_strings([" offside"]), 64, None);
        let out = out.unwrap();
        assert_eq!(out.stop_reason, StopReason::MaxTokens);
        assert_eq!(out.text, "light off");
        let expected: Vec<(Option<u32>, String)> =
            vec![(Some(1), "light".into()), (Some(3), String::new()), (None, " off".into())];
        assert_eq!(events, expected);
    }

    #[test]
    fn a_partial_character_waits_for_its_last_byte_or_the_end() {
        let mut m = Scripted::new(&[7, 5, 6]);
        let (out, events) = generate(&mut m, &params(3), 64, None);
        let expected: Vec<(Option<u32>, String)> =
            vec![(Some(7), " caf".into()), (Some(5), String::new()), (Some(6), "é".into())];
        assert_eq!(events, expected);
        assert_eq!(out.unwrap().text, " café");
        // Cut after the first byte: the end releases what there is, marked as incomplete.
        let mut m = Scripted::new(&[7, 5]);
        let (out, events) = generate(&mut m, &params(2), 64, None);
        assert_eq!(events.last().unwrap(), &(None, "\u{FFFD}".to_owned()));
        assert_eq!(out.unwrap().text, " caf\u{FFFD}");
    }

    #[test]
    fn the_callback_stops_generation_and_hears_nothing_after() {
        let mut m = Scripted::new(&[1, 7, 5, 6, 2]);
        let (out, events) = generate(&mut m, &params(8), 64, Some(3));
        let out = out.unwrap();
        assert_eq!(out.stop_reason, StopReason::Cancelled);
        assert_eq!(events.len(), 3, "no event after the callback said stop");
        assert_eq!(out.generated_ids, [1, 7, 5]);
        assert_eq!(m.fed.len(), 3, "no model step after the callback said stop");
        // The held-back byte is not streamed, but the returned text has it.
        assert_eq!(out.text, "light caf\u{FFFD}");
    }

    #[test]
    fn a_cancel_before_the_first_step_runs_nothing() {
        let tok = tokenizer();
        let mut m = Scripted::new(&[1, 2]);
        let setup = LoopSetup { capacity: 64, eos: &[EOS], tokenizer: Some(&tok), start: Instant::now() };
        let mut events = 0;
        let out = run(
            &mut m,
            setup,
            &PROMPT,
            &params(4),
            || true,
            |_| {
                events += 1;
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert_eq!(out.stop_reason, StopReason::Cancelled);
        assert!(out.generated_ids.is_empty() && m.fed.is_empty() && events == 0);
    }

    #[test]
    fn the_capacity_bounds_the_answer() {
        // Room for 4 positions: the 2 prompt tokens and 2 fed back, so 3 tokens come out (the
        // last one is never fed).
        let mut m = Scripted::new(&[1, 2, 3, 4, 1]);
        let (out, _) = generate(&mut m, &params(5), 4, None);
        let out = out.unwrap();
        assert_eq!(out.stop_reason, StopReason::ContextFull);
        assert_eq!(out.generated_ids, [1, 2, 3]);
    }

    #[test]
    fn a_model_failure_ends_the_call_with_its_error() {
        let mut m = Scripted::new(&[1, 2, 3]);
        m.fail_at = Some(1);
        let (out, events) = generate(&mut m, &params(3), 64, None);
        assert!(matches!(out, Err(Error::InvalidRequest(ref s)) if s.contains("step 1")));
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn without_a_tokenizer_ids_flow_and_text_stays_empty() {
        let mut m = Scripted::new(&[1, 2]);
        let setup = LoopSetup { capacity: 64, eos: &[EOS], tokenizer: None, start: Instant::now() };
        let out = run(
            &mut m,
            setup,
            &PROMPT,
            &params(2),
            || false,
            |ev| {
                assert!(ev.text.is_empty());
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert_eq!((out.generated_ids.as_slice(), out.text.as_str()), (&[1, 2][..], ""));
    }
}
