//! The export check: the ONNX graph in ONNX Runtime against the candle model, on a fixed
//! prompt, for the prefill and for cached decode steps.

use std::path::Path;

use candle_core::{Device, Tensor};

use edgelm_runtime::bundle::Bundle;
use edgelm_runtime::decoder::{Decoder, DecoderOptions};

use crate::checkpoint::index::WeightIndex;
use crate::checkpoint::{Checkpoint, ModelConfig};
use crate::error::Result;
use crate::model::LlamaModel;
use crate::train::batch::Encoded;

/// Decode steps checked after the prefill.
pub const DECODE_STEPS: usize = 8;

/// Outcome of the check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Largest absolute logit difference over all checked positions.
    pub max_abs_diff: f32,
    /// Largest absolute reference logit at `worst_step`: the tolerance is relative to each
    /// step's own (see [`allowed_diff`]).
    pub logit_scale: f32,
    /// Step with the largest difference against what its logits allow (0 = prefill).
    pub worst_step: usize,
    /// Whether every step was within tolerance.
    pub passed: bool,
    /// Prompt length used.
    pub prompt_tokens: usize,
    /// Decode steps compared.
    pub decode_steps: usize,
    /// Mean KL divergence of the bundle's next-token distribution from the reference's, in
    /// nats, over every checked position.
    pub mean_kl: f64,
    /// Share of checked positions where both pick the same greedy token.
    pub top1_agreement: f64,
}

/// KL(p || q) of the softmax distributions of two logit rows, in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - z).collect()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0)
}

/// The fixed check prompt: spread over the vocabulary, never the special ids at the bottom.
pub fn check_prompt(vocab: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| ((7 + i * 131) % (vocab - 3) + 3) as u32).collect()
}

/// Largest absolute difference; any non-finite value on either side counts as infinite, so a
/// graph that produces NaN never passes.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_finite() && y.is_finite() { (x - y).abs() } else { f32::INFINITY })
        .fold(0f32, f32::max)
}

/// The largest difference a check with `tolerance` accepts when the reference's values reach
/// `scale` in magnitude: `tolerance` itself up to magnitude 1, proportionally more above. fp32
/// sums taken in another order differ in proportion to the values summed, so the logits of a
/// deep, wide model (tens in magnitude) differ by more than a tiny model's while a wrong graph
/// still differs by about the logits themselves.
pub fn allowed_diff(tolerance: f32, scale: f32) -> f32 {
    tolerance * scale.max(1.0)
}

/// Largest finite absolute value of `values` (0 when none is finite).
pub fn magnitude(values: &[f32]) -> f32 {
    values.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()))
}

/// Runs the bundle in `dir` against the candle model.
pub fn verify_bundle(ck: &Checkpoint, dir: &Path, tolerance: f32) -> Result<VerifyReport> {
    verify_against_reference(&ReferenceLogits::of(ck)?, dir, tolerance)
}

/// The candle model's logits over the check: the prompt, then its own greedy tokens one at a
/// time. Taken once, before the graph is built, so the checkpoint's weights can be let go while
/// ONNX Runtime holds the graph's (an export then needs about the weights once, not twice), and
/// one set serves the fp32 and the quantized check.
#[derive(Debug, Clone)]
pub struct ReferenceLogits {
    /// What each step fed: the check prompt, then one token per decode step.
    inputs: Vec<Vec<u32>>,
    /// Last-position logits of the prefill, then of each decode step.
    steps: Vec<Vec<f32>>,
}

impl ReferenceLogits {
    /// Runs the check through the candle model of `ck`.
    pub fn of(ck: &Checkpoint) -> Result<Self> {
        let model = LlamaModel::new(ck)?;
        let mut cache = model.new_cache();
        Self::record(ck.config.vocab_size, ck.config.max_position_embeddings, |input| {
            let logits = model.forward(&Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?, &mut cache)?;
            Ok(logits.squeeze(0)?.get(input.len() - 1)?.to_vec1()?)
        })
    }

    /// Feeds the check prompt, then the model's own greedy tokens one at a time, to `step`
    /// (which keeps its own cache and returns the last position's logits), and keeps them.
    fn record(vocab: usize, context: usize, mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>) -> Result<Self> {
        let mut input = check_prompt(vocab, check_prompt_len(context));
        let (mut inputs, mut steps) = (Vec::with_capacity(DECODE_STEPS + 1), Vec::with_capacity(DECODE_STEPS + 1));
        for _ in 0..=DECODE_STEPS {
            let last = step(&input)?;
            inputs.push(std::mem::replace(&mut input, vec![edgelm_runtime::sampling::argmax(&last)]));
            steps.push(last);
        }
        Ok(ReferenceLogits { inputs, steps })
    }

    /// The check of a model read one layer at a time from `index` (never whole in memory): the
    /// check prompt, then fixed tokens one at a time rather than the model's own greedy ones
    /// (knowing those would take a pass over every weight per token).
    pub fn streamed(c: &ModelConfig, index: &WeightIndex) -> Result<Self> {
        let n = check_prompt_len(c.max_position_embeddings);
        let seq = check_prompt(c.vocab_size, n + DECODE_STEPS);
        let inputs: Vec<Vec<u32>> =
            std::iter::once(seq[..n].to_vec()).chain(seq[n..n + DECODE_STEPS].iter().map(|&t| vec![t])).collect();
        let steps = LlamaModel::streamed_logits(c, &inputs, &mut |name, shape| index.read(name, shape))?;
        Ok(ReferenceLogits { inputs, steps })
    }
}

/// Runs the bundle in `dir` over the tokens the reference read (the check prompt, then the
/// reference's greedy choices, so both sides see the same tokens) and compares its logits with
/// the reference's at every step.
pub fn verify_against_reference(reference: &ReferenceLogits, dir: &Path, tolerance: f32) -> Result<VerifyReport> {
    let bundle = Bundle::open(dir)?;
    let mut decoder = Decoder::of_bundle(&bundle, &DecoderOptions::default())?;
    let positions = reference.inputs.iter().map(Vec::len).sum();
    fits_check(&decoder, positions, dir)?;
    let mut state = decoder.start(positions)?;
    let mut steps = StepTolerance::new(tolerance);
    let (mut kl, mut agree) = (0f64, 0usize);
    for (step, (reference, input)) in reference.steps.iter().zip(&reference.inputs).enumerate() {
        let onnx = decoder.forward(&mut state, input)?;
        steps.add(step, reference, onnx);
        kl += kl_divergence(reference, onnx);
        agree += usize::from(edgelm_runtime::sampling::argmax(onnx) == edgelm_runtime::sampling::argmax(reference));
    }
    let prompt = &reference.inputs[0];
    Ok(VerifyReport {
        max_abs_diff: steps.max_abs_diff,
        logit_scale: steps.worst_scale,
        worst_step: steps.worst_step,
        passed: steps.passed(),
        prompt_tokens: prompt.len(),
        decode_steps: DECODE_STEPS,
        mean_kl: kl / (DECODE_STEPS + 1) as f64,
        top1_agreement: agree as f64 / (DECODE_STEPS + 1) as f64,
    })
}

/// Runs the bundle in `dir` against the bundle in `reference_dir`, both in ONNX Runtime (a
/// quantized bundle against the fp32 one it came from). The reference runs first and is closed
/// before the bundle opens.
pub fn verify_against_bundle(reference_dir: &Path, dir: &Path, tolerance: f32) -> Result<VerifyReport> {
    let reference = {
        let bundle = Bundle::open(reference_dir)?;
        let mut decoder = Decoder::of_bundle(&bundle, &DecoderOptions::default())?;
        let (vocab, context) = (bundle.genai.model.vocab_size, decoder.context_length());
        fits_check(&decoder, check_prompt_len(context) + DECODE_STEPS, reference_dir)?;
        let mut state = decoder.start(check_prompt_len(context) + DECODE_STEPS)?;
        ReferenceLogits::record(vocab, context, |input| Ok(decoder.forward(&mut state, input)?.to_vec()))?
    };
    verify_against_reference(&reference, dir, tolerance)
}

/// Two models read the same token sequences teacher-forced: how far apart their next-token
/// distributions are where they predict an answer token (the positions after each prompt,
/// which is what the model is trained and used for), and how well each predicts those tokens.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SequenceComparison {
    /// Answer-token positions compared.
    pub positions: usize,
    /// Mean KL divergence of the candidate's distribution from the reference's, nats.
    pub mean_kl: f64,
    /// Share of positions where both pick the same greedy token.
    pub top1_agreement: f64,
    /// Largest absolute logit difference (infinite when either side is not finite).
    pub max_abs_diff: f32,
    /// Perplexity of the sequences' target tokens (those after each prompt) under the reference.
    pub reference_perplexity: f64,
    /// The same under the candidate.
    pub perplexity: f64,
}

/// Running sums behind a `SequenceComparison`.
#[derive(Default)]
struct ComparisonSum {
    positions: usize,
    kl: f64,
    agree: usize,
    worst: f32,
    scored: usize,
    reference_nll: f64,
    nll: f64,
}

/// `-log softmax(logits)[id]`.
fn nll(logits: &[f32], id: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z = logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    z - logits.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY) as f64
}

impl ComparisonSum {
    /// One position: both models' logits and, when it predicts an answer token, that token.
    /// Logit differences count everywhere (a NaN anywhere fails); the distributions are
    /// compared where an answer token is predicted.
    fn add(&mut self, reference: &[f32], candidate: &[f32], next: Option<u32>) {
        self.worst = self.worst.max(max_abs_diff(reference, candidate));
        let Some(id) = next else {
            return;
        };
        self.kl += kl_divergence(reference, candidate);
        let argmax = edgelm_runtime::sampling::argmax;
        self.agree += usize::from(argmax(reference) == argmax(candidate));
        self.positions += 1;
        self.reference_nll += nll(reference, id);
        self.nll += nll(candidate, id);
        self.scored += 1;
    }

    fn finish(self) -> SequenceComparison {
        let n = self.positions.max(1) as f64;
        let s = self.scored.max(1) as f64;
        SequenceComparison {
            positions: self.positions,
            mean_kl: self.kl / n,
            top1_agreement: self.agree as f64 / n,
            max_abs_diff: self.worst,
            reference_perplexity: (self.reference_nll / s).exp(),
            perplexity: (self.nll / s).exp(),
        }
    }
}

/// The token that follows position `i` when it is a target (past the prompt) of `seq`.
fn target_after(seq: &Encoded, i: usize) -> Option<u32> {
    seq.ids.get(i + 1).copied().filter(|_| i + 1 >= seq.prompt_len)
}

/// Runs two bundles in ONNX Runtime over real token sequences, teacher-forced, one token at a
/// time through the KV cache (a quantized bundle against the fp32 one it came from).
pub fn compare_bundles_on(reference_dir: &Path, dir: &Path, sequences: &[Encoded]) -> Result<SequenceComparison> {
    let open = |d: &Path| -> Result<Decoder> {
        let b = Bundle::open(d)?;
        Ok(Decoder::of_bundle(&b, &DecoderOptions::default())?)
    };
    let (mut reference, mut candidate) = (open(reference_dir)?, open(dir)?);
    let mut sum = ComparisonSum::default();
    for seq in sequences.iter().filter(|s| !s.ids.is_empty()) {
        let mut rs = reference.start(seq.ids.len())?;
        let mut cs = candidate.start(seq.ids.len())?;
        for (i, &id) in seq.ids.iter().enumerate() {
            let r = reference.forward(&mut rs, &[id])?.to_vec();
            let c = candidate.forward(&mut cs, &[id])?;
            sum.add(&r, c, target_after(seq, i));
        }
    }
    Ok(sum.finish())
}

/// The same comparison for two checkpoints in candle, each sequence in one forward pass (a
/// pruned model against the one it was cut from).
pub fn compare_checkpoints_on(
    reference: &Checkpoint,
    candidate: &Checkpoint,
    sequences: &[Encoded],
) -> Result<SequenceComparison> {
    let (rm, cm) = (LlamaModel::new(reference)?, LlamaModel::new(candidate)?);
    let mut sum = ComparisonSum::default();
    for seq in sequences.iter().filter(|s| !s.ids.is_empty()) {
        let ids = Tensor::new(seq.ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let r = rm.forward(&ids, &mut rm.new_cache())?.squeeze(0)?.to_vec2::<f32>()?;
        let c = cm.forward(&ids, &mut cm.new_cache())?.squeeze(0)?.to_vec2::<f32>()?;
        for (i, (r, c)) in r.iter().zip(&c).enumerate() {
            sum.add(r, c, target_after(seq, i));
        }
    }
    Ok(sum.finish())
}

fn check_prompt_len(context: usize) -> usize {
    12.min(context.saturating_sub(DECODE_STEPS)).max(1)
}

/// Refuses a check the decoder cannot hold, saying why, rather than failing inside it.
fn fits_check(decoder: &Decoder, positions: usize, dir: &Path) -> Result<()> {
    if positions <= decoder.context_length() {
        return Ok(());
    }
    Err(crate::Error::Unsupported {
        what: format!(
            "{}: the check runs {positions} positions and the decoder holds {} here (a sliding window on ONNX Runtime before 1.24 caps the context at the window); check it with ONNX Runtime 1.24 or newer",
            dir.display(),
            decoder.context_length()
        ),
    })
}

/// Steps of a check, each held to the tolerance its own logits allow: large logits at one step
/// allow nothing at another.
struct StepTolerance {
    tolerance: f32,
    max_abs_diff: f32,
    /// The largest difference over what its step allows, its step and that step's logit scale.
    worst_share: f32,
    worst_step: usize,
    worst_scale: f32,
}

impl StepTolerance {
    fn new(tolerance: f32) -> Self {
        StepTolerance { tolerance, max_abs_diff: 0.0, worst_share: 0.0, worst_step: 0, worst_scale: 0.0 }
    }

    fn add(&mut self, step: usize, reference: &[f32], candidate: &[f32]) {
        let (diff, scale) = (max_abs_diff(reference, candidate), magnitude(reference));
        // A NaN share (non-finite values) counts as the worst.
        let share = if diff == 0.0 { 0.0 } else { diff / allowed_diff(self.tolerance, scale) };
        let share = if share.is_nan() { f32::INFINITY } else { share };
        if share > self.worst_share {
            (self.worst_share, self.worst_step, self.worst_scale) = (share, step, scale);
        }
        self.max_abs_diff = self.max_abs_diff.max(diff);
    }

    fn passed(&self) -> bool {
        self.worst_share <= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_rows_and_matches_a_hand_value() {
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
        // p = (0.5, 0.5), q = softmax(0, ln 3) = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3).
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&[0.0, 0.0], &[0.0, 3f32.ln()]) - want).abs() < 1e-6);
    }

    #[test]
    fn the_tolerance_grows_with_the_logits_above_one() {
        assert_eq!(magnitude(&[0.5, -30.0, f32::NAN, f32::INFINITY, 2.0]), 30.0);
        assert_eq!(allowed_diff(1e-4, 0.2), 1e-4);
        assert!((allowed_diff(1e-4, 30.0) - 3e-3).abs() < 1e-9);
        // Step 0's logits of 100 allow 1e-2; step 1's of 0.5 allow only 1e-4, which 5e-3 passes.
        let mut steps = StepTolerance::new(1e-4);
        steps.add(0, &[100.0, -3.0], &[100.005, -3.0]);
        assert!(steps.passed());
        steps.add(1, &[0.5, 0.1], &[0.505, 0.1]);
        assert!(!steps.passed());
        assert_eq!((steps.worst_step, steps.worst_scale), (1, 0.5));
        assert!((steps.max_abs_diff - 5e-3).abs() < 1e-4);
        let mut exact = StepTolerance::new(0.0);
        exact.add(0, &[1.0], &[1.0]);
        assert!(exact.passed());
        exact.add(1, &[1.0], &[f32::NAN]);
        assert!(!exact.passed());
    }
}
