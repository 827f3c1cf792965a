//! Scoring a model on the task: task completion (exact match of the greedy answer with the
//! expected output) and perplexity of the expected outputs.
//!
//! Bundles are scored through the edgelm runtime (ONNX Runtime), so an export error shows up as
//! a lower score rather than hiding behind the reference model. Checkpoints are answered the
//! same way from a temporary export that first passes the export check (logits within 1e-4 of
//! candle's per unit of the largest logit): greedy decoding one request at a time is about 20x faster in ONNX Runtime than in
//! candle. Where the export or the runtime is not available they are answered in candle.
//! Perplexity is always computed in candle.

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

/// Scores a checkpoint: greedy answers (through a checked temporary export, else candle) and
/// perplexity (candle).
pub fn score_checkpoint(ck: &Checkpoint, examples: &[Example], progress: bool) -> Result<Score> {
    let fmt = Formatter::for_checkpoint(ck)?;
    let (n, right, misses) = checkpoint_answers(ck, &fmt, examples, progress)?;
    let encoded = fmt.encode_within(examples, ck.config.max_position_embeddings, "test set")?;
    let loss = evaluate(&encoded, 32, fmt.pad(), &|b| lm_loss(&ck.config, &ck.tensors, b))?;
    Ok(Score { examples: n, task_completion: right as f64 / n.max(1) as f64, perplexity: Some(loss.exp()), misses })
}

/// Task completion of `ck` on `examples` alone: [`score_checkpoint`] without the perplexity
/// pass (a teacher-forced forward in candle that costs more than the answers).
pub fn checkpoint_completion(ck: &Checkpoint, examples: &[Example], progress: bool) -> Result<f64> {
    let fmt = Formatter::for_checkpoint(ck)?;
    let (n, right, _) = checkpoint_answers(ck, &fmt, examples, progress)?;
    Ok(right as f64 / n.max(1) as f64)
}

/// Greedy answers of `ck`, through ONNX Runtime where it can be exported, else in candle.
fn checkpoint_answers(
    ck: &Checkpoint,
    fmt: &Formatter,
    examples: &[Example],
    progress: bool,
) -> Result<(usize, usize, Vec<Answer>)> {
    match answers_through_runtime(ck, examples, progress) {
        Ok(Some(t)) => Ok(t),
        Ok(None) => answers_in_candle(ck, fmt, examples, progress),
        Err(e) => {
            tracing::warn!("answering through ONNX Runtime failed ({e}); answering in candle");
            answers_in_candle(ck, fmt, examples, progress)
        }
    }
}

/// Greedy answers of `ck` in candle.
fn answers_in_candle(
    ck: &Checkpoint,
    fmt: &Formatter,
    examples: &[Example],
    progress: bool,
) -> Result<(usize, usize, Vec<Answer>)> {
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
    let t = tally(answers)?;
    bar.finish_and_clear();
    Ok(t)
}

/// Greedy answers of `ck` from a checked fp32 export in a temporary folder, run by the edgelm
/// runtime; `None` when the checkpoint has no tokenizer (a bundle without one takes ids only).
fn answers_through_runtime(
    ck: &Checkpoint,
    examples: &[Example],
    progress: bool,
) -> Result<Option<(usize, usize, Vec<Answer>)>> {
    if ck.tokenizer_json.is_none() {
        return Ok(None);
    }
    let tmp = tempfile::Builder::new()
        .prefix("edgelm-score-")
        .tempdir()
        .map_err(|err| crate::Error::Io { path: std::env::temp_dir(), err })?;
    let dir = tmp.path().join("bundle");
    crate::export::export(ck, &dir, &crate::export::ExportOptions::default())?;
    let label = ck.dir.display().to_string();
    Ok(Some(bundle_answers(&dir, examples, &edgelm_runtime::EngineOptions::default(), progress, &label)?))
}

/// Scores an exported bundle through the runtime (greedy, chat template of the bundle).
pub fn score_bundle(
    bundle: &Path,
    examples: &[Example],
    opts: &edgelm_runtime::EngineOptions,
    progress: bool,
) -> Result<Score> {
    let (n, right, misses) = bundle_answers(bundle, examples, opts, progress, &bundle.display().to_string())?;
    Ok(Score { examples: n, task_completion: right as f64 / n.max(1) as f64, perplexity: None, misses })
}

/// Greedy answers of a bundle, tallied: (answers, right, misses); the progress bar says `label`.
/// With ONNX Runtime's thread count left to it (`threads` 0), the examples are shared among
/// one single-threaded session per core: small models answer one token at a time in well under
/// a millisecond, where a second intra-op thread mostly waits, and a second session doubles
/// the answers per second.
fn bundle_answers(
    bundle: &Path,
    examples: &[Example],
    opts: &edgelm_runtime::EngineOptions,
    progress: bool,
    label: &str,
) -> Result<(usize, usize, Vec<Answer>)> {
    let bar = answer_bar(examples.len(), label, progress);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let sessions = if opts.decoder.threads == 0 { cores.min(examples.len() / 16).max(1) } else { 1 };
    let (parts, per_session) = if sessions > 1 {
        (crate::train::workers::split(examples, sessions), opts.clone().with_threads(1))
    } else {
        (vec![examples], opts.clone())
    };
    let answer = |part: &[Example]| -> Result<Vec<Answer>> {
        let engine = edgelm_runtime::Engine::open(bundle, &per_session)?;
        let params = edgelm_runtime::GenerateParams::default().with_max_new_tokens(MAX_ANSWER_TOKENS);
        let mut answers = Vec::with_capacity(part.len());
        for e in part {
            bar.inc(1);
            let prompt = engine.encode_chat(&[edgelm_runtime::ChatMessage::user(Formatter::user_message(e))])?;
            let out = engine.generate(&prompt, &params, |_| std::ops::ControlFlow::Continue(()))?;
            answers.push(Answer { input: e.input.clone(), expected: e.output.clone(), got: out.text });
        }
        Ok(answers)
    };
    let mut answers: Vec<Result<Answer>> = Vec::with_capacity(examples.len());
    for r in crate::train::workers::map_parts(&parts, "scoring", |p| answer(p)) {
        answers.extend(r?.into_iter().map(Ok));
    }
    bar.finish_and_clear();
    tally(answers.into_iter())
}
