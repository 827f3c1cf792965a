//! The export check: the ONNX graph in ONNX Runtime against the candle model, on a fixed
//! prompt, for the prefill and for cached decode steps.

use std::path::Path;

use candle_core::{Device, Tensor};

use edgelm_runtime::bundle::Bundle;
use edgelm_runtime::decoder::{Decoder, DecoderOptions};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::model::LlamaModel;

/// Decode steps checked after the prefill.
pub const DECODE_STEPS: usize = 8;

/// Outcome of the check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Largest absolute logit difference over all checked positions.
    pub max_abs_diff: f32,
    /// Step with the largest difference (0 = prefill).
    pub worst_step: usize,
    /// Whether every step was within tolerance.
    pub passed: bool,
    /// Prompt length used.
    pub prompt_tokens: usize,
    /// Decode steps compared.
    pub decode_steps: usize,
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

/// Runs the bundle in `dir` and the candle model side by side.
pub fn verify_bundle(ck: &Checkpoint, dir: &Path, tolerance: f32) -> Result<VerifyReport> {
    let model = LlamaModel::new(ck)?;
    let bundle = Bundle::open(dir)?;
    let mut decoder = Decoder::load(&bundle.model_path, &bundle.genai, &DecoderOptions::default())?;
    let prompt = check_prompt(ck.config.vocab_size, 12.min(ck.config.max_position_embeddings - DECODE_STEPS));
    let mut state = decoder.start(prompt.len() + DECODE_STEPS)?;
    let mut cache = model.new_cache();
    let mut input = prompt.clone();
    let (mut worst, mut worst_step) = (0f32, 0usize);
    for step in 0..=DECODE_STEPS {
        let reference = model.forward(&Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?, &mut cache)?;
        let reference: Vec<f32> = reference.squeeze(0)?.get(input.len() - 1)?.to_vec1()?;
        let onnx = decoder.forward(&mut state, &input)?;
        let diff = max_abs_diff(&reference, onnx);
        if diff > worst {
            worst = diff;
            worst_step = step;
        }
        // Follow the reference's greedy choice so both sides see the same tokens.
        let next = edgelm_runtime::sampling::argmax(&reference);
        input = vec![next];
    }
    Ok(VerifyReport {
        max_abs_diff: worst,
        worst_step,
        passed: worst <= tolerance,
        prompt_tokens: prompt.len(),
        decode_steps: DECODE_STEPS,
    })
}
