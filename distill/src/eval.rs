//! Scoring a model on the task: task completion (exact match of the greedy answer with the
//! expected output) and perplexity of the expected outputs.
//!
//! Checkpoints are scored in candle; bundles through the edgelm runtime (ONNX Runtime), so an
//! export error shows up as a lower score rather than hiding behind the reference model.

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::data::Example;
use crate::error::Result;
use crate::model::LlamaModel;
use crate::train::batch::Formatter;
use crate::train::fit::evaluate;
use crate::train::stage::lm_loss;

/// Longest answer generated when scoring (the task's answers are far shorter).
pub const MAX_ANSWER_TOKENS: usize = 32;

/// One scored answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The request.
    pub input: String,
    /// Expected output.
    pub expected: String,
    /// What the model answered.
    pub got: String,
}

/// Scores of one model on a set of examples.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Examples scored.
    pub examples: usize,
    /// Share of exact matches.
    pub task_completion: f64,
    /// exp(mean cross-entropy of the expected answer tokens), when computed.
    pub perplexity: Option<f64>,
    /// Up to 10 wrong answers, for reading.
    pub misses: Vec<Answer>,
}

fn tally(answers: impl Iterator<Item = Result<Answer>>) -> Result<(usize, usize, Vec<Answer>)> {
    let (mut n, mut right, mut misses) = (0, 0, Vec::new());
    for a in answers {
        let a = a?;
        n += 1;
        if a.got.trim() == a.expected {
            right += 1;
        } else if misses.len() < 10 {
            misses.push(a);
        }
    }
    Ok((n, right, misses))
}

/// A progress bar over `n` answers (hidden unless `show`; indicatif also hides it when stderr
/// is not a terminal).
fn answer_bar(n: usize, label: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} answers  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("scoring {label}"));
    bar
}

/// Scores a checkpoint in candle: greedy answers and perplexity.
pub fn score_checkpoint(ck: &Checkpoint, examples: &[Example], progress: bool) -> Result<Score> {
    let fmt = Formatter::for_checkpoint(ck)?;
    let model = LlamaModel::new(ck)?;
    let stop = ck.eos_token_ids();
    let bar = answer_bar(examples.len(), &ck.dir.display().to_string(), progress);
    let answers = examples.iter().map(|e| {
        bar.inc(1);
        let prompt = fmt.prompt(e)?;
        let mut ids = model.greedy(&prompt, MAX_ANSWER_TOKENS, &stop)?;
        ids.retain(|i| !stop.contains(i));
        Ok(Answer { input: e.input.clone(), expected: e.output.clone(), got: fmt.codec().decode(&ids)? })
    });
    let (n, right, misses) = tally(answers)?;
    bar.finish_and_clear();
    let encoded = fmt.encode_within(examples, ck.config.max_position_embeddings, "test set")?;
    let loss = evaluate(&encoded, 32, fmt.pad(), &mut |b| lm_loss(&ck.config, &ck.tensors, b))?;
    Ok(Score { examples: n, task_completion: right as f64 / n.max(1) as f64, perplexity: Some(loss.exp()), misses })
}

/// Scores an exported bundle through the runtime (greedy, chat template of the bundle).
pub fn score_bundle(
    bundle: &Path,
    examples: &[Example],
    opts: &edgelm_runtime::EngineOptions,
    progress: bool,
) -> Result<Score> {
    let mut engine = edgelm_runtime::Engine::open(bundle, opts)?;
    let params = edgelm_runtime::GenerateParams::default().with_max_new_tokens(MAX_ANSWER_TOKENS);
    let mut answers = Vec::with_capacity(examples.len());
    let bar = answer_bar(examples.len(), &bundle.display().to_string(), progress);
    for e in examples {
        bar.inc(1);
        let prompt = engine.encode_chat(&[edgelm_runtime::ChatMessage::user(Formatter::user_message(e))])?;
        let out = engine.generate(&prompt, &params, |_| std::ops::ControlFlow::Continue(()))?;
        answers.push(Ok(Answer { input: e.input.clone(), expected: e.output.clone(), got: out.text }));
    }
    bar.finish_and_clear();
    let (n, right, misses) = tally(answers.into_iter())?;
    Ok(Score { examples: n, task_completion: right as f64 / n.max(1) as f64, perplexity: None, misses })
}
