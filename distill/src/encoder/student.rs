//! A shallower sentence encoder distilled from a deeper one on unlabelled text: the student
//! keeps some of the teacher's layers (initialised from them) and its embeddings (frozen), and
//! learns to give each sentence the teacher's embedding. Loss per sentence:
//! `(1 - cos(s, t)) + ||s - t||^2 + w * mean_j mse(h_j, H_j) + a * mean_j KL(A_j || a_j)`,
//! averaged over a batch, where `h_j` are the hidden states after the student's layer `j` and
//! `H_j` the teacher's after the layer it was taken from: one target per token and layer
//! instead of one per sentence, which is what lets a few thousand sentences teach a 3-layer
//! student (the pooled loss alone reached a held-out cosine of 0.82). `A_j` and `a_j` are the
//! two layers' attention distributions, each query's row over the keys, KL averaged over heads
//! and queries (MiniLM's self-attention transfer, at every matched layer).
//!
//! Sentences run in batches of similar length, padded and masked, so that each operation is
//! big enough to be worth running: on two cores that trains several times faster than one
//! sentence at a time.
//!
//! The student is written in the teacher's layout (config.json with the new depth, the
//! sentence-transformers pooling files, the tokenizer), so `export` and `quantize` take it as
//! they take the teacher.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use super::qat::{FakeQuant, FakeQuantSpec};
use super::{BatchStates, BertModel, EncoderCheckpoint};
use crate::error::{Error, IoContext, Result};
use crate::rng::Rng;
use crate::train::workers::{map_parts, split, training_workers};
use crate::train::{CosineSchedule, TrainConfig, Trainer};

/// Student shape and training settings.
#[derive(Debug, Clone)]
pub struct EncoderDistillSpec {
    /// Teacher layers the student keeps, in order.
    pub layers: Vec<usize>,
    /// Passes over the text.
    pub epochs: usize,
    /// Sentences per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate (cosine decay to a tenth, 5% warm-up).
    pub lr: f64,
    /// Longest sentence in tokens (longer ones are cut).
    pub max_tokens: usize,
    /// Weight of the per-layer hidden-state term (0: the sentence embedding alone).
    pub hidden_weight: f64,
    /// Which of the student's layers the hidden-state term matches to the teacher's.
    pub hidden_states: HiddenStates,
    /// Weight of the attention term at the same layers (0: none).
    pub attention_weight: f64,
    /// Seed of the sentence order and the held-out split.
    pub seed: u64,
    /// A student of this teacher to start from instead of the teacher's layers (a second stage
    /// of training, on more text): its layers are trained on, the teacher's embeddings stay.
    pub init: Option<PathBuf>,
    /// Train through int8-static's rounding (see [`super::qat`]).
    pub qat: Option<QatSpec>,
    /// Feed-forward width of the student: when narrower than the one it starts from, each
    /// layer keeps the units that matter most on the training text ([`super::prune`]) before
    /// training, which then recovers what the rest carried (none: the start's width).
    pub ffn_size: Option<usize>,
}

/// Sentences of the training text the feed-forward units are ranked on.
const PRUNE_SAMPLES: usize = 512;

/// What narrowing the feed-forward blocks did.
#[derive(Debug, Clone, Serialize)]
pub struct FfnPruning {
    /// Width before and after.
    pub intermediate_size: (usize, usize),
    /// Per layer, the share of the units' importance the kept ones carry.
    pub importance_kept: Vec<f64>,
    /// Training sentences the units were ranked on.
    pub sentences: usize,
}

/// Quantization-aware training: the scheme the student's int8-static bundle will be quantized
/// with and the calibration text its scales are measured on (the same the `quantize` command
/// will be given).
#[derive(Debug, Clone)]
pub struct QatSpec {
    /// Smoothing, ranges and weight bits.
    pub scheme: FakeQuantSpec,
    /// Calibration texts.
    pub calibration: Vec<String>,
    /// How many times the scales are measured again as training moves the weights.
    pub recalibrations: usize,
}

/// The student layers whose hidden states are matched, token by token, to those of the teacher
/// layer each was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiddenStates {
    /// Every kept layer: the student's first layers must do what the teacher's did up to the
    /// layer they came from.
    #[default]
    All,
    /// The last layer only, the one the sentence embedding is pooled from: the layers below are
    /// free to share the work differently (and the targets take a third of the memory for a
    /// 3-layer student).
    Last,
}

/// The teacher layer each matched student layer meets: student layer `j` was taken from
/// teacher layer `kept[j]`.
fn teacher_layers_of(kept: &[usize], matched: &[usize]) -> Vec<usize> {
    matched.iter().map(|&j| kept[j]).collect()
}

impl HiddenStates {
    /// Indices of the student's `n` layers that are matched.
    fn matched(self, n: usize) -> Vec<usize> {
        match self {
            Self::All => (0..n).collect(),
            Self::Last => n.checked_sub(1).into_iter().collect(),
        }
    }
}

/// What the distillation did.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderDistillReport {
    /// Teacher layers kept.
    pub layers: Vec<usize>,
    /// Sentences trained on.
    pub train_sentences: usize,
    /// Sentences held out.
    pub held_out_sentences: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Mean cosine to the teacher on the held-out sentences, before and after training.
    pub held_out_cosine: (f64, f64),
    /// Seconds of training.
    pub seconds: f64,
    /// The student training started from, when not the teacher's layers.
    pub init: Option<PathBuf>,
    /// The int8-static scheme trained through, if any (the held-out cosines are then the
    /// fake-quantized student's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_aware: Option<String>,
    /// Feed-forward width of the student.
    pub intermediate_size: usize,
    /// The feed-forward pruning done before training, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ffn_pruning: Option<FfnPruning>,
}

/// One tokenized sentence, the teacher's embedding of it `[H]`, and at each teacher layer a
/// matched student layer meets, the teacher's hidden states `[S, H]` and attention
/// distributions `[heads, S, S]` when those terms are trained (in f16: they are the bulk of the
/// memory distillation holds, for MiniLM's three matched layers 3 x 384 values per token and
/// 3 x 12 x S per token, and targets need no more digits).
struct Target {
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    embedding: Tensor,
    layers: Vec<Tensor>,
    attentions: Vec<Tensor>,
}

/// Weights of the per-layer terms of the loss.
#[derive(Debug, Clone, Copy)]
struct TermWeights {
    hidden: f64,
    attention: f64,
}

/// Sentences per run of the model when only scoring or making targets.
const SCORE_BATCH: usize = 32;

/// Splits `items` into runs of at most `n` that each hold sentences of similar length: sorted
/// by length inside windows of `n * 32`, so batches waste little on padding and the order
/// stays random at the scale of the window.
fn length_batches<'t>(items: &[&'t Target], n: usize) -> Vec<Vec<&'t Target>> {
    let n = n.max(1);
    let mut out = Vec::new();
    for window in items.chunks(n * 32) {
        let mut w = window.to_vec();
        w.sort_by_key(|t| t.ids.len());
        out.extend(w.chunks(n).map(<[_]>::to_vec));
    }
    out
}

/// The first `n` of a sentence's `values` (ids or type ids); when that cuts the sentence and it
/// `closes` with a special token, that token ends the cut one too.
fn cut_keeping_close(values: &[u32], n: usize, closes: bool) -> Vec<u32> {
    let mut kept = values[..n.min(values.len())].to_vec();
    if n < values.len() && n >= 2 && closes {
        kept[n - 1] = values[values.len() - 1];
    }
    kept
}

fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot", ".pt"].iter().any(|s| name.ends_with(s))
}

/// Copies the teacher's folder without its weights (and without folders other than the
/// sentence-transformers module folders such as `1_Pooling`).
fn copy_layout(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).at(to)?;
    for entry in std::fs::read_dir(from).at(from)? {
        let entry = entry.at(from)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            if name.chars().next().is_some_and(|c| c.is_ascii_digit()) && name.contains('_') {
                copy_layout(&path, &to.join(&name))?;
            }
        } else if !is_weight_file(&name) && !name.ends_with(".index.json") {
            // (A shard index would name the teacher's weight files, which are not copied.)
            crate::checkpoint::write::copy_file(&path, &to.join(&name))?;
        }
    }
    Ok(())
}

/// Mean cosine of the student's embeddings to the targets' (the sentences shared among the
/// training workers).
fn mean_cosine(ck: &EncoderCheckpoint, fake_quant: Option<&FakeQuant>, targets: &[Target]) -> Result<f64> {
    let model = BertModel::new(ck);
    let model = if let Some(q) = fake_quant { model.with_fake_quant(q) } else { model };
    let sums = map_parts(&split(targets, training_workers()), "encoder scoring", |part| {
        let refs: Vec<&Target> = part.iter().collect();
        let mut sum = 0.0;
        for batch in length_batches(&refs, SCORE_BATCH) {
            let (_, s, t) = run_batch(&model, &batch, false)?;
            sum += row_cosines(&s, &t)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sum)
    });
    let mut sum = 0.0;
    for s in sums {
        sum += s?;
    }
    Ok(sum / targets.len().max(1) as f64)
}

/// Runs `batch` through `model` as one padded batch: its hidden states, its sentence
/// embeddings `[B, H]` and the teacher's `[B, H]`.
fn run_batch(model: &BertModel, batch: &[&Target], with_scores: bool) -> Result<(BatchStates, Tensor, Tensor)> {
    let seqs: Vec<(&[u32], &[u32])> = batch.iter().map(|t| (&t.ids[..], &t.type_ids[..])).collect();
    let (out, s) = model.batch_embed(&seqs, with_scores)?;
    let t = Tensor::stack(&batch.iter().map(|t| &t.embedding).collect::<Vec<_>>(), 0)?;
    Ok((out, s, t))
}

/// Which per-layer targets the teacher makes (each kept only when trained on: hidden states
/// cost `S x H` values per layer and sentence, attention distributions `heads x S x S`).
#[derive(Debug, Clone, Copy)]
struct TargetKinds {
    hidden: bool,
    attention: bool,
}

/// The teacher's targets for `batch`, run as one padded batch: each sentence's embedding and,
/// at the teacher layers `layers` (one per matched student layer, in the student's order), its
/// own hidden states `[S, H]` and attention distributions `[heads, S, S]` as `kinds` asks.
fn teacher_targets(
    model: &BertModel,
    batch: &[(&[u32], &[u32])],
    layers: &[usize],
    kinds: TargetKinds,
) -> Result<Vec<Target>> {
    use candle_core::DType::F16;
    let (run, pooled) = model.batch_embed(batch, kinds.attention)?;
    let mut out = Vec::with_capacity(batch.len());
    for (row, &(ids, type_ids)) in batch.iter().enumerate() {
        let n = ids.len();
        let mut target = Target {
            ids: ids.to_vec(),
            type_ids: type_ids.to_vec(),
            // Its own storage: a view (and candle's `copy` of one) would keep the whole batch's
            // (with CLS pooling and no normalisation, the last layer's states of every token).
            embedding: pooled.get(row)?.force_contiguous()?.detach(),
            layers: Vec::new(),
            attentions: Vec::new(),
        };
        for &l in layers {
            if kinds.hidden {
                target.layers.push(run.states[l].get(row)?.narrow(0, 0, n)?.to_dtype(F16)?);
            }
            if kinds.attention {
                // The sentence's own keys: the padded ones had weight 0 anyway.
                let scores = run.scores[l].get(row)?.narrow(1, 0, n)?.narrow(2, 0, n)?;
                target.attentions.push(candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?.to_dtype(F16)?);
            }
        }
        out.push(target);
    }
    Ok(out)
}

/// The mean of the scalar `terms`, times `weight`; none: nothing.
fn weighted_mean(terms: Vec<Tensor>, weight: f64) -> Result<Option<Tensor>> {
    if terms.is_empty() {
        return Ok(None);
    }
    Ok(Some((Tensor::stack(&terms, 0)?.mean_all()? * weight)?))
}

/// The summed loss of a batch of sentences (see the module comment), run as one padded batch.
/// `matched` are the student layers that `Target::layers` and `Target::attentions` hold
/// targets for, in order.
fn batch_loss(student: &BertModel, batch: &[&Target], weights: TermWeights, matched: &[usize]) -> Result<Tensor> {
    let attention = weights.attention > 0.0 && !batch[0].attentions.is_empty();
    let (out, s, t) = run_batch(student, batch, attention)?;
    let n = batch.len() as f64;
    let mut loss = ((n - row_cosines(&s, &t)?.sum_all()?)? + (&s - &t)?.sqr()?.sum_all()?)?;
    let (b, len) = (batch.len(), out.mask.dim(1)?);
    if attention {
        let heads = out.scores[0].dim(1)?;
        // Each sentence's mean over its heads and real query rows; padded rows and keys have
        // teacher probability 0 and add nothing.
        let per_row = (out.mask.sum_keepdim(1)? * heads as f64)?.recip()?.reshape((b, 1, 1))?;
        let mut terms = Vec::with_capacity(matched.len());
        for (j, &layer) in matched.iter().enumerate() {
            let log_student = candle_nn::ops::log_softmax(&out.scores[layer], candle_core::D::Minus1)?;
            let rows = batch
                .iter()
                .map(|t| {
                    let x = t.attentions[j].to_dtype(candle_core::DType::F32)?;
                    let pad = len - x.dim(1)?;
                    Ok(x.pad_with_zeros(1, 0, pad)?.pad_with_zeros(2, 0, pad)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let teacher = Tensor::stack(&rows, 0)?;
            // KL = sum p (log p - log q); p log p at p = 0 is 0.
            let entropy = (&teacher * teacher.maximum(1e-30)?.log()?)?;
            let kl = (entropy - (&teacher * log_student)?)?.sum(candle_core::D::Minus1)?;
            terms.push(kl.broadcast_mul(&per_row)?.sum_all()?);
        }
        if let Some(term) = weighted_mean(terms, weights.attention)? {
            loss = (loss + term)?;
        }
    }
    if weights.hidden > 0.0 && !batch[0].layers.is_empty() {
        let h = s.dim(1)?;
        // Each sentence's mean squared error over its own tokens, as if it ran alone.
        let per_value = (out.mask.sum_keepdim(1)? * h as f64)?.recip()?; // [B, 1]
        let per_token = out.mask.broadcast_mul(&per_value)?.unsqueeze(2)?; // [B, S, 1]
        let mut terms = Vec::with_capacity(matched.len());
        for (j, &layer) in matched.iter().enumerate() {
            let state = &out.states[layer];
            let rows = batch
                .iter()
                .map(|t| {
                    let x = t.layers[j].to_dtype(candle_core::DType::F32)?;
                    Ok(x.pad_with_zeros(0, 0, len - x.dim(0)?)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let target = Tensor::stack(&rows, 0)?.reshape((b, len, h))?;
            terms.push((state - target)?.sqr()?.broadcast_mul(&per_token)?.sum_all()?);
        }
        if let Some(term) = weighted_mean(terms, weights.hidden)? {
            loss = (loss + term)?;
        }
    }
    Ok(loss)
}

/// Cosine of each row of `a` `[B, H]` with the same row of `b`: `[B]`.
fn row_cosines(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dot = (a * b)?.sum(1)?;
    let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    dot / norms.maximum(1e-12)?
}

/// Distils `teacher` into a student of `spec.layers` on `text` (one sentence per entry) and
/// writes it to `out`.
pub fn distill_encoder(
    teacher: &EncoderCheckpoint,
    text: &[String],
    spec: &EncoderDistillSpec,
    out: &Path,
) -> Result<EncoderDistillReport> {
    let c = &teacher.config;
    let bad = |what: String| Error::InvalidConfig { what: format!("encoder student: {what}") };
    if spec.layers.is_empty() {
        return Err(bad("no layers kept".into()));
    }
    if let Some(l) = spec.layers.iter().find(|&&l| l >= c.num_hidden_layers) {
        return Err(bad(format!("layer {l} does not exist in a {}-layer teacher", c.num_hidden_layers)));
    }
    if let Some((i, l)) = spec.layers.iter().enumerate().find(|(i, l)| spec.layers[..*i].contains(l)) {
        return Err(bad(format!(
            "teacher layer {l} is named twice (student layer {i}); each student layer starts from its own"
        )));
    }
    if let Some(q) = &spec.qat {
        q.scheme.check().map_err(bad)?;
        if !q.calibration.iter().any(|t| !t.trim().is_empty()) {
            return Err(bad("quantization-aware training needs calibration text (the file has none)".into()));
        }
    }
    // The student replaces what its folder held: not the teacher it is made from.
    crate::checkpoint::write::refuse_writing_over_teacher(&teacher.dir, out)?;
    for (what, w) in [("hidden-state", spec.hidden_weight), ("attention", spec.attention_weight)] {
        if !(w.is_finite() && w >= 0.0) {
            return Err(bad(format!("the {what} weight must be 0 or more, not {w}")));
        }
    }
    let tok_path = teacher.tokenizer_json.as_ref().ok_or_else(|| bad("the teacher has no tokenizer.json".into()))?;
    let mut tokenizer = tokenizers::Tokenizer::from_file(tok_path)
        .map_err(|e| Error::Format { path: tok_path.clone(), what: e.to_string() })?;
    // Sentence-transformers tokenizers often pad every input to a fixed length; the model runs
    // one unpadded sentence at a time (as the runtime does), so padded ids would be attended
    // and pooled as if they were words.
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| Error::Format { path: tok_path.clone(), what: e.to_string() })?;
    // Teacher targets, computed once (the sentences shared among the training workers).
    let model = BertModel::new(teacher);
    let matched = spec.hidden_states.matched(spec.layers.len());
    let sentences: Vec<&str> = text.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    // Token ids and types, cut at the longest sentence trained on.
    // A longer sentence keeps its closing special token ([SEP]) after the cut, as a
    // tokenizer's own truncation does: the model never sees a sentence without one.
    let tokenize = |s: &str| -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = tokenizer.encode(s, true).map_err(|e| bad(format!("tokenizing {s:?}: {e}")))?;
        let n = spec.max_tokens.min(c.max_position_embeddings);
        let closes = enc.get_special_tokens_mask().last() == Some(&1);
        Ok((cut_keeping_close(enc.get_ids(), n, closes), cut_keeping_close(enc.get_type_ids(), n, closes)))
    };
    let tokenized = sentences.iter().map(|s| tokenize(s)).collect::<Result<Vec<_>>>()?;
    let mut tokenized: Vec<(Vec<u32>, Vec<u32>)> = tokenized.into_iter().filter(|(ids, _)| !ids.is_empty()).collect();
    if tokenized.len() < 10 {
        return Err(bad(format!("{} sentences are too few to train on", tokenized.len())));
    }
    // The held-out tenth is drawn before the targets are made: it is scored on the embedding
    // alone and needs no per-layer targets.
    let mut rng = Rng::new(spec.seed);
    rng.shuffle(&mut tokenized);
    let held = tokenized.split_off(tokenized.len() - (tokenized.len() / 10).max(1));
    let teacher_layers = teacher_layers_of(&spec.layers, &matched);
    let make = |sentences: &[(Vec<u32>, Vec<u32>)], kinds: TargetKinds| -> Result<Vec<Target>> {
        // Sorted by length so that the teacher's batches carry little padding, dealt to the
        // workers in turn so that each gets as many long sentences as short ones, and put back
        // in order, so the targets do not depend on how many workers made them.
        let mut order: Vec<usize> = (0..sentences.len()).collect();
        order.sort_by_key(|&i| sentences[i].0.len());
        let workers = training_workers().clamp(1, order.len().max(1));
        let parts: Vec<Vec<usize>> =
            (0..workers).map(|w| order.iter().skip(w).step_by(workers).copied().collect()).collect();
        let teach = |part: &Vec<usize>| -> Result<Vec<(usize, Target)>> {
            let mut out = Vec::with_capacity(part.len());
            for chunk in part.chunks(SCORE_BATCH) {
                let seqs: Vec<(&[u32], &[u32])> =
                    chunk.iter().map(|&i| (&sentences[i].0[..], &sentences[i].1[..])).collect();
                out.extend(chunk.iter().copied().zip(teacher_targets(&model, &seqs, &teacher_layers, kinds)?));
            }
            Ok(out)
        };
        let mut numbered = Vec::with_capacity(sentences.len());
        for part in map_parts(&parts, "encoder teacher", teach) {
            numbered.extend(part?);
        }
        numbered.sort_by_key(|(at, _)| *at);
        Ok(numbered.into_iter().map(|(_, t)| t).collect())
    };
    // The student: the teacher's embeddings (frozen) and its kept layers renumbered (trained).
    let mut frozen = HashMap::new();
    let mut trained = HashMap::new();
    for (name, t) in &teacher.tensors {
        if name.starts_with("embeddings.") {
            frozen.insert(name.clone(), t.clone());
        } else if let Some(rest) = name.strip_prefix("encoder.layer.") {
            let (idx, tail) = rest.split_once('.').ok_or_else(|| bad(format!("unexpected tensor {name}")))?;
            let idx: usize = idx.parse().map_err(|_| bad(format!("unexpected tensor {name}")))?;
            if let Some(i) = spec.layers.iter().position(|&l| l == idx) {
                trained.insert(format!("encoder.layer.{i}.{tail}"), t.copy()?);
            }
        }
    }
    // The whole student: the frozen embeddings and the given layers.
    let with = |trained: HashMap<String, Tensor>| -> HashMap<String, Tensor> {
        frozen.iter().map(|(k, v)| (k.clone(), v.clone())).chain(trained).collect()
    };
    let mut width = c.intermediate_size;
    if let Some(dir) = &spec.init {
        let cannot = |what: String| bad(format!("--init {}: {what}", dir.display()));
        let start = EncoderCheckpoint::load(dir).map_err(|e| cannot(e.to_string()))?;
        // The teacher layers each student layer came from decide the hidden-state targets.
        if let Some(layers) = recorded_layers(dir).map_err(cannot)?.filter(|l| *l != spec.layers) {
            return Err(cannot(format!(
                "it was taken from teacher layers {layers:?} (its distill_report.json), not {:?}: give --layers {}",
                spec.layers,
                layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")
            )));
        }
        start_from(&mut trained, &frozen, &start, spec.layers.len()).map_err(cannot)?;
        width = start.config.intermediate_size;
    }
    // Feed-forward pruning, ranked by the student as it starts (on a sample of the training
    // text; the held-out sentences stay unseen).
    let mut ffn_pruning = None;
    match spec.ffn_size {
        Some(w) if w > width => {
            return Err(bad(format!("--ffn-size {w} is wider than the {width} units the student starts with")))
        }
        Some(0) => return Err(bad("--ffn-size must keep at least one unit".into())),
        Some(w) if w < width => {
            let ck = EncoderCheckpoint {
                dir: out.to_path_buf(),
                config: super::EncoderConfig {
                    num_hidden_layers: spec.layers.len(),
                    intermediate_size: width,
                    ..c.clone()
                },
                tensors: with(trained.clone()),
                tokenizer_json: None,
                tokenizer_config: None,
            };
            let samples = &tokenized[..tokenized.len().min(PRUNE_SAMPLES)];
            let importance = super::prune::ffn_importance(&ck, samples)?;
            let kept = super::prune::prune_ffn(&mut trained, &importance, w)?;
            eprintln!(
                "encoder student: feed-forward {width} -> {w} units per layer, keeping {} of the importance measured on {} sentences",
                kept.iter().map(|k| format!("{:.1}%", k * 100.0)).collect::<Vec<_>>().join(" / "),
                samples.len()
            );
            ffn_pruning =
                Some(FfnPruning { intermediate_size: (width, w), importance_kept: kept, sentences: samples.len() });
            width = w;
        }
        _ => {}
    }
    // Checked before the teacher runs over the text rather than found out part way through.
    let kinds = TargetKinds { hidden: spec.hidden_weight > 0.0, attention: spec.attention_weight > 0.0 };
    let lens: Vec<usize> = tokenized.iter().map(|(ids, _)| ids.len()).collect();
    let need = target_bytes(&lens, matched.len(), c.hidden_size, c.num_attention_heads, kinds);
    let trained_bytes: usize = trained.values().map(|t| t.elem_count() * 4).sum();
    fits(lens.len(), need, trained_bytes as u64, edgelm_runtime::metrics::available_memory_bytes()).map_err(bad)?;
    let made = Instant::now();
    let mut targets = make(&tokenized, kinds)?;
    let held = make(&held, TargetKinds { hidden: false, attention: false })?;
    eprintln!(
        "encoder student: the teacher's targets for {} sentences ({} held out) in {:.0} s",
        targets.len(),
        held.len(),
        made.elapsed().as_secs_f64()
    );
    let student_config =
        super::EncoderConfig { num_hidden_layers: spec.layers.len(), intermediate_size: width, ..c.clone() };
    let student_at = |weights: HashMap<String, Tensor>| EncoderCheckpoint {
        dir: out.to_path_buf(),
        config: student_config.clone(),
        tensors: weights,
        tokenizer_json: teacher.tokenizer_json.clone(),
        tokenizer_config: teacher.tokenizer_config.clone(),
    };
    // Quantization-aware training: the calibration text tokenized as the training text is.
    let calibration = match &spec.qat {
        Some(q) => q
            .calibration
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(tokenize)
            .collect::<Result<Vec<_>>>()?,
        None => vec![],
    };
    let calibrate = |ck: &EncoderCheckpoint| -> Result<Option<FakeQuant>> {
        spec.qat.as_ref().map(|q| FakeQuant::calibrate(ck, &calibration, &q.scheme)).transpose()
    };
    let start = student_at(with(trained.clone()));
    let mut fake_quant = calibrate(&start)?;
    let before = mean_cosine(&start, fake_quant.as_ref(), &held)?;

    let batch = spec.batch_size.max(1);
    let total = spec.epochs.max(1) * targets.len().div_ceil(batch);
    let schedule = CosineSchedule { peak: spec.lr, floor: spec.lr / 10.0, warmup: (total / 20).max(1), total };
    let mut trainer =
        Trainer::new(trained, TrainConfig { schedule, weight_decay: 0.01, accumulation: 1, clip_norm: 1.0 })?;
    let term_weights = TermWeights { hidden: spec.hidden_weight, attention: spec.attention_weight };
    let started = Instant::now();
    tracing::info!("encoder student: {} sentences, {total} steps", targets.len());
    let recalibrate_every = spec.qat.as_ref().map_or(usize::MAX, |q| (total / (q.recalibrations + 1)).max(1));
    let mut steps = 0;
    let mut after = before;
    // A line every twentieth of the run: a stage over a large text trains for an hour.
    let report_every = (total / 20).max(1);
    let mut recent_loss = (0.0, 0usize);
    for epoch in 0..spec.epochs.max(1) {
        rng.shuffle(&mut targets);
        let refs: Vec<&Target> = targets.iter().collect();
        let mut batches = length_batches(&refs, batch);
        rng.shuffle(&mut batches);
        for chunk in &batches {
            let ck = student_at(with(trainer.tensors()));
            if steps > 0 && steps % recalibrate_every == 0 {
                fake_quant = calibrate(&ck)?;
            }
            steps += 1;
            let m = BertModel::new(&ck);
            let m = if let Some(q) = &fake_quant { m.with_fake_quant(q) } else { m };
            // Each worker takes a share of the batch: its part of the batch's mean loss.
            let share = |part: &&[&Target]| -> Result<(candle_core::backprop::GradStore, f64)> {
                let loss = (batch_loss(&m, part, term_weights, &matched)? / chunk.len() as f64)?;
                Ok((trainer.gradients(&loss)?, loss.to_scalar::<f32>()? as f64))
            };
            let shares = map_parts(&split(chunk, training_workers()), "encoder training worker", share);
            let (grads, losses): (Vec<_>, Vec<f64>) =
                shares.into_iter().collect::<Result<Vec<_>>>()?.into_iter().unzip();
            trainer.accumulate(grads)?;
            recent_loss = (recent_loss.0 + losses.iter().sum::<f64>(), recent_loss.1 + 1);
            if steps % report_every == 0 || steps == total {
                let seconds = started.elapsed().as_secs_f64();
                eprintln!(
                    "encoder student: step {steps} of {total}, loss {:.5}, {seconds:.0} s, about {:.0} s left",
                    recent_loss.0 / recent_loss.1.max(1) as f64,
                    seconds / steps as f64 * (total - steps) as f64
                );
                recent_loss = (0.0, 0);
            }
        }
        let ck = student_at(with(trainer.tensors()));
        fake_quant = calibrate(&ck)?;
        after = mean_cosine(&ck, fake_quant.as_ref(), &held)?;
        eprintln!(
            "encoder student: epoch {} of {}: held-out cosine to the teacher {after:.4}{} ({:.0} s)",
            epoch + 1,
            spec.epochs.max(1),
            if fake_quant.is_some() { " (fake-quantized)" } else { "" },
            started.elapsed().as_secs_f64()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let weights = with(trainer.tensors());

    copy_layout(&teacher.dir, out)?;
    let cfg_path = out.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).at(&cfg_path)?)
        .map_err(|e| Error::Format { path: cfg_path.clone(), what: e.to_string() })?;
    cfg["num_hidden_layers"] = spec.layers.len().into();
    cfg["intermediate_size"] = width.into();
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).expect("json")).at(&cfg_path)?;
    let weights: HashMap<String, Tensor> =
        weights.into_iter().map(|(k, v)| Ok((k, v.contiguous()?))).collect::<Result<_>>()?;
    let st = out.join("model.safetensors");
    candle_core::safetensors::save(&weights, &st)
        .map_err(|e| Error::Format { path: st.clone(), what: e.to_string() })?;
    let report = EncoderDistillReport {
        layers: spec.layers.clone(),
        train_sentences: targets.len(),
        held_out_sentences: held.len(),
        steps: trainer.step(),
        held_out_cosine: (before, after),
        seconds,
        init: spec.init.as_ref().map(|d| d.canonicalize().unwrap_or_else(|_| d.clone())),
        quantization_aware: spec.qat.as_ref().map(|q| q.scheme.describe()),
        intermediate_size: width,
        ffn_pruning,
    };
    let rp = out.join("distill_report.json");
    std::fs::write(&rp, serde_json::to_string_pretty(&report).expect("json")).at(&rp)?;
    Ok(report)
}

/// Bookkeeping of one stored tensor besides its values: candle's tensor record, its shape and
/// strides, the allocation's header (an estimate).
const TENSOR_OVERHEAD_BYTES: u64 = 200;

/// Bytes the teacher's targets of sentences of `lens` tokens take in memory (see `Target`): the
/// f32 embedding, the token and type ids, and per matched layer the f16 hidden states and
/// attention distributions `kinds` asks for.
fn target_bytes(lens: &[usize], matched: usize, hidden: usize, heads: usize, kinds: TargetKinds) -> u64 {
    let per_layer = |n: u64| {
        let states = if kinds.hidden { n * hidden as u64 * 2 + TENSOR_OVERHEAD_BYTES } else { 0 };
        let attention = if kinds.attention { heads as u64 * n * n * 2 + TENSOR_OVERHEAD_BYTES } else { 0 };
        states + attention
    };
    lens.iter()
        .map(|&n| hidden as u64 * 4 + TENSOR_OVERHEAD_BYTES + 8 * n as u64 + matched as u64 * per_layer(n as u64))
        .sum()
}

/// Whether targets of `need` bytes for `sentences` fit in `available` bytes
/// beside training (a fixed 1 GiB for the runs' activations, and eight times the `trained`
/// weights' bytes for their copies, gradients and the optimizer's moments); the error says how
/// many sentences would. Unknown memory passes.
fn fits(sentences: usize, need: u64, trained: u64, available: Option<u64>) -> std::result::Result<(), String> {
    let Some(available) = available else { return Ok(()) };
    let training = (1 << 30) + 8 * trained;
    let room = available.saturating_sub(training);
    if need <= room {
        return Ok(());
    }
    let share = room as f64 / need as f64;
    Err(format!(
        "the teacher's targets for {} sentences take about {:.1} GB and training about {:.1} GB more, with {:.1} GB \
         of memory available: train on about {} sentences, then go on from that student with --init on the rest",
        sentences,
        need as f64 / 1e9,
        training as f64 / 1e9,
        available as f64 / 1e9,
        (sentences as f64 * share) as usize
    ))
}

/// The teacher layers a student was taken from, as its distill_report.json records them; none
/// for a student without one (made elsewhere).
fn recorded_layers(dir: &Path) -> std::result::Result<Option<Vec<usize>>, String> {
    #[derive(serde::Deserialize)]
    struct Recorded {
        layers: Vec<usize>,
    }
    let path = dir.join("distill_report.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let report: Recorded = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(report.layers))
}

/// Replaces the teacher's layers in `trained` by those of `start`, a student of `depth` layers
/// distilled from the same teacher: the embeddings it was trained with must be the teacher's
/// (`frozen`), which the student keeps. The error says what does not fit.
fn start_from(
    trained: &mut HashMap<String, Tensor>,
    frozen: &HashMap<String, Tensor>,
    start: &EncoderCheckpoint,
    depth: usize,
) -> std::result::Result<(), String> {
    if start.config.num_hidden_layers != depth {
        return Err(format!(
            "it has {} layers, the student {depth} (--layers names the teacher layers the start was taken from)",
            start.config.num_hidden_layers
        ));
    }
    let same = |a: &Tensor, b: &Tensor| -> candle_core::Result<bool> {
        Ok(a.dims() == b.dims() && a.ne(b)?.flatten_all()?.max(0)?.to_scalar::<u8>()? == 0)
    };
    for (name, t) in frozen {
        let theirs = start.tensors.get(name).ok_or_else(|| format!("it has no {name}"))?;
        if !same(t, theirs).map_err(|e| e.to_string())? {
            return Err(format!("its {name} differs from the teacher's (a student of another teacher?)"));
        }
    }
    // Every tensor is checked before any is replaced. The start may have narrower feed-forward
    // blocks than the teacher (an earlier stage pruned them): those tensors take its width.
    let width = start.config.intermediate_size;
    for (name, t) in trained.iter() {
        let theirs = start.tensors.get(name).ok_or_else(|| format!("it has no {name}"))?;
        let mut want = t.dims().to_vec();
        let units = super::prune::unit_axis(name).and_then(|axis| want.get_mut(axis));
        let feed_forward = units.is_some();
        if let Some(units) = units {
            if width > *units {
                return Err(format!(
                    "its config.json says {width} feed-forward units, more than the teacher's {units}"
                ));
            }
            *units = width;
        }
        if theirs.dims() != want {
            return Err(if feed_forward {
                format!("its config.json says {width} feed-forward units, but its {name} is {:?}", theirs.dims())
            } else {
                format!("its {name} is {:?}, the student's {want:?}", theirs.dims())
            });
        }
    }
    for (name, t) in trained.iter_mut() {
        *t = start.tensors[name].copy().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reads one sentence per line (blank lines skipped).
pub fn read_sentences(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).at(path)?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{tiny_encoder, Pooling};
    use crate::quantize::RangeMethod;

    /// The teacher's targets for `seqs`, one sentence at a time, for a student matched at the
    /// teacher's layers `matched`.
    fn targets(teacher: &EncoderCheckpoint, seqs: &[(&[u32], &[u32])], matched: &[usize]) -> Vec<Target> {
        let m = BertModel::new(teacher);
        let kinds = TargetKinds { hidden: true, attention: true };
        seqs.iter().flat_map(|&seq| teacher_targets(&m, &[seq], matched, kinds).unwrap()).collect()
    }

    #[test]
    fn a_cut_sentence_keeps_its_closing_token() {
        // [CLS] a b c d [SEP] cut to 4: [CLS] a b [SEP].
        assert_eq!(cut_keeping_close(&[101, 1, 2, 3, 4, 102], 4, true), [101, 1, 2, 102]);
        assert_eq!(cut_keeping_close(&[101, 1, 2, 3, 4, 102], 4, false), [101, 1, 2, 3]);
        assert_eq!(cut_keeping_close(&[101, 1, 102], 4, true), [101, 1, 102], "short enough: as it is");
    }

    /// A student's folder takes the teacher's files but its weights, and no shard index that
    /// would name the teacher's weight files.
    #[test]
    fn the_copied_layout_leaves_out_weights_and_their_index() {
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("teacher"), tmp.path().join("student"));
        std::fs::create_dir_all(from.join("1_Pooling")).unwrap();
        for f in [
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "1_Pooling/config.json",
        ] {
            std::fs::write(from.join(f), "x").unwrap();
        }
        copy_layout(&from, &to).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(&to).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["1_Pooling", "config.json", "tokenizer.json"]);
    }

    /// Input that would only fail after the teacher's pass over the text, or would lose the
    /// teacher, is refused first, and nothing is written.
    #[test]
    fn bad_students_are_refused_before_the_teacher_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let mut teacher = tiny_encoder(Pooling::Mean, 1);
        teacher.dir = tmp.path().join("teacher");
        std::fs::create_dir_all(&teacher.dir).unwrap();
        let spec = EncoderDistillSpec {
            layers: vec![0],
            epochs: 1,
            batch_size: 4,
            lr: 1e-3,
            max_tokens: 12,
            hidden_weight: 0.0,
            hidden_states: HiddenStates::All,
            attention_weight: 0.0,
            seed: 0,
            init: None,
            qat: None,
            ffn_size: None,
        };
        let text = vec!["a sentence".to_string(); 20];
        let out = tmp.path().join("student");
        let refused = |spec: &EncoderDistillSpec, out: &Path| {
            distill_encoder(&teacher, &text, spec, out).unwrap_err().to_string()
        };
        let twice = EncoderDistillSpec { layers: vec![1, 1], ..spec.clone() };
        assert!(refused(&twice, &out).contains("teacher layer 1 is named twice"));
        let qat = |smooth: f32, calibration: &str| QatSpec {
            scheme: FakeQuantSpec { smooth: Some(smooth), range: RangeMethod::MinMax, full_range: false },
            calibration: vec![calibration.into()],
            recalibrations: 0,
        };
        let err = refused(&EncoderDistillSpec { qat: Some(qat(1.5, "text")), ..spec.clone() }, &out);
        assert!(err.contains("smoothing strength 1.5"), "{err}");
        let err = refused(&EncoderDistillSpec { qat: Some(qat(0.5, "  ")), ..spec.clone() }, &out);
        assert!(err.contains("needs calibration text"), "{err}");
        assert!(!out.exists());
        let err = refused(&spec, &teacher.dir.join("."));
        assert!(err.contains("is the teacher's folder"), "{err}");
    }

    #[test]
    fn teacher_targets_hold_each_sentences_own_states_at_the_named_layers() {
        let teacher = tiny_encoder(Pooling::Mean, 1);
        let m = BertModel::new(&teacher);
        let seqs: [(&[u32], &[u32]); 3] = [(&[1, 5, 9], &[0; 3]), (&[2, 30, 7, 7, 11, 3, 8], &[0; 7]), (&[39], &[1])];
        let kinds = TargetKinds { hidden: true, attention: true };
        // Layers in the student's order, not the teacher's: student layer 0 meets teacher layer 1.
        let batch = teacher_targets(&m, &seqs, &[1, 0], kinds).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            let d =
                (a.to_dtype(candle_core::DType::F32).unwrap() - b.to_dtype(candle_core::DType::F32).unwrap()).unwrap();
            d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        for (t, &(ids, types)) in batch.iter().zip(&seqs) {
            let alone = m.batch_run(&[(ids, types)], true).unwrap();
            let n = ids.len();
            assert_eq!((t.layers.len(), t.attentions.len()), (2, 2));
            for (j, l) in [1, 0].into_iter().enumerate() {
                assert_eq!(t.layers[j].dims(), &[n, 16]);
                assert_eq!(t.attentions[j].dims(), &[4, n, n]);
                assert!(diff(&t.layers[j], &alone.states[l].squeeze(0).unwrap()) < 1e-2, "states, layer {l}");
                let probs =
                    candle_nn::ops::softmax(&alone.scores[l].squeeze(0).unwrap(), candle_core::D::Minus1).unwrap();
                assert!(diff(&t.attentions[j], &probs) < 1e-3, "attention, layer {l}");
            }
            assert!(diff(&t.layers[0], &t.layers[1]) > 1e-2, "two different layers");
        }
        // Without the kinds, no per-layer targets are kept.
        let none = teacher_targets(&m, &seqs, &[1, 0], TargetKinds { hidden: false, attention: false }).unwrap();
        assert!(none.iter().all(|t| t.layers.is_empty() && t.attentions.is_empty()));
    }

    #[test]
    fn the_attention_term_is_the_mean_kl_over_heads_and_queries() {
        let (teacher, student) = (tiny_encoder(Pooling::Mean, 1), tiny_encoder(Pooling::Mean, 2));
        let seq: (&[u32], &[u32]) = (&[2, 30, 7, 11, 3], &[0; 5]);
        let t = targets(&teacher, &[seq], &[0]);
        let m = BertModel::new(&student);
        let loss = |attention: f64| {
            let w = TermWeights { hidden: 0.0, attention };
            batch_loss(&m, &[&t[0]], w, &[0]).unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let term = loss(1.0) - loss(0.0);
        // The same KL(teacher || student) written out in f64 over the 4 heads and 5 queries.
        let p: Vec<Vec<Vec<f32>>> = t[0].attentions[0].to_dtype(candle_core::DType::F32).unwrap().to_vec3().unwrap();
        let scores: Vec<Vec<Vec<f32>>> =
            m.batch_run(&[seq], true).unwrap().scores[0].squeeze(0).unwrap().to_vec3().unwrap();
        let mut kl = 0.0;
        for (ph, sh) in p.iter().zip(&scores) {
            for (prow, srow) in ph.iter().zip(sh) {
                let max = srow.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
                let log_z = srow.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
                for (&pk, &sk) in prow.iter().zip(srow) {
                    if pk > 0.0 {
                        kl += pk as f64 * ((pk as f64).ln() - (sk as f64 - log_z));
                    }
                }
            }
        }
        let expected = kl / (4.0 * 5.0);
        assert!(expected > 1e-4, "the two models attend differently ({expected})");
        assert!((term - expected).abs() < 1e-3 * expected + 1e-6, "term {term} against {expected}");
    }

    #[test]
    fn a_batch_loss_is_the_sum_of_its_sentences_losses() {
        for pooling in [Pooling::Mean, Pooling::Cls] {
            let (teacher, student) = (tiny_encoder(pooling, 1), tiny_encoder(pooling, 2));
            let seqs: [(&[u32], &[u32]); 3] =
                [(&[1, 5, 9], &[0, 0, 0]), (&[2, 30, 7, 7, 11, 3, 8], &[0; 7]), (&[39, 4], &[1, 1])];
            let loss_of = |model: &EncoderCheckpoint, matched: &[usize], hidden: f64, attention: f64| {
                let m = BertModel::new(model);
                let w = TermWeights { hidden, attention };
                let t = targets(&teacher, &seqs, matched);
                let refs: Vec<&Target> = t.iter().collect();
                let whole = batch_loss(&m, &refs, w, matched).unwrap().to_scalar::<f32>().unwrap();
                let alone: f32 =
                    refs.iter().map(|t| batch_loss(&m, &[*t], w, matched).unwrap().to_scalar::<f32>().unwrap()).sum();
                assert!(
                    (whole - alone).abs() < 1e-4 * alone.max(1.0),
                    "{pooling:?} {w:?}: batch {whole} against {alone}"
                );
                whole
            };
            let loss = |matched: &[usize], hidden: f64, attention: f64| {
                let whole = loss_of(&student, matched, hidden, attention);
                assert!(whole > 0.1, "{pooling:?}: a different student has a loss ({whole})");
                whole
            };
            let all = HiddenStates::All.matched(2);
            let last = HiddenStates::Last.matched(2);
            assert_eq!((all.as_slice(), last.as_slice()), (&[0, 1][..], &[1][..]));
            // A student of teacher layers 0 and 5 meets layers 0 and 5, or 5 alone.
            assert_eq!(teacher_layers_of(&[0, 5], &all), [0, 5]);
            assert_eq!(teacher_layers_of(&[0, 5], &last), [5]);
            // Each term counts: a weight changes the loss.
            let base = loss(&all, 0.0, 0.0);
            assert!(loss(&all, 0.7, 0.0) > base + 1e-3);
            assert!(loss(&all, 0.0, 0.7) > base + 1e-3);
            // Each matched layer meets its own target: the term over both layers is the mean of
            // the terms over each alone.
            for (h, a) in [(1.0, 0.0), (0.0, 1.0)] {
                let (first, second, both) =
                    (loss(&[0], h, a) - base, loss(&last, h, a) - base, loss(&all, h, a) - base);
                assert!(first > 5e-4 && second > 5e-4 && (first - second).abs() > 1e-4, "{first} {second}");
                assert!((both - (first + second) / 2.0).abs() < 1e-4 * both, "{both} against {first} and {second}");
            }
            // The teacher against its own attention: KL 0 up to the targets' f16 rounding.
            let own = loss_of(&teacher, &all, 0.0, 1.0) - loss_of(&teacher, &all, 0.0, 0.0);
            assert!(own.abs() < 1e-3, "{pooling:?}: the teacher's own attention costs {own}");
        }
    }

    #[test]
    fn target_memory_counts_each_kind_of_target() {
        let none = TargetKinds { hidden: false, attention: false };
        let hidden = TargetKinds { hidden: true, attention: false };
        let both = TargetKinds { hidden: true, attention: true };
        // Sentences of 3 and 5 tokens, 2 matched layers, H 4, 2 heads.
        // Each: 16 (embedding) + 200 + 8 n (ids).
        assert_eq!(target_bytes(&[3, 5], 2, 4, 2, none), (16 + 200 + 24) + (16 + 200 + 40));
        // Hidden states: 2 layers x (n x 4 x 2 + 200).
        assert_eq!(target_bytes(&[3, 5], 2, 4, 2, hidden), 496 + 2 * (24 + 200) + 2 * (40 + 200));
        // Attention: 2 layers x (2 x n^2 x 2 + 200) besides.
        assert_eq!(target_bytes(&[3, 5], 2, 4, 2, both), 496 + 928 + 2 * (36 + 200) + 2 * (100 + 200));
    }

    #[test]
    fn the_memory_estimate_is_what_the_targets_hold() {
        for pooling in [Pooling::Mean, Pooling::Cls] {
            let teacher = tiny_encoder(pooling, 1);
            let m = BertModel::new(&teacher);
            let seqs: [(&[u32], &[u32]); 2] = [(&[2, 30, 7, 3], &[0; 4]), (&[2, 5, 6, 8, 9, 3], &[0; 6])];
            let kinds = TargetKinds { hidden: true, attention: true };
            let targets = teacher_targets(&m, &seqs, &[0, 1], kinds).unwrap();
            let mut held = 0u64;
            for t in &targets {
                let tensors: Vec<&Tensor> =
                    std::iter::once(&t.embedding).chain(&t.layers).chain(&t.attentions).collect();
                for x in &tensors {
                    // Each tensor's own storage: a view of a batch would hold more than its values.
                    let values = (x.elem_count() * x.dtype().size_in_bytes()) as u64;
                    let (storage, layout) = x.storage_and_layout();
                    assert_eq!(layout.start_offset(), 0, "{pooling:?}: a view into a larger tensor");
                    let stored = match &*storage {
                        candle_core::Storage::Cpu(c) => c
                            .as_slice::<f32>()
                            .map(|v| v.len() * 4)
                            .or_else(|_| c.as_slice::<half::f16>().map(|v| v.len() * 2)),
                        _ => unreachable!("the tests run on the CPU"),
                    }
                    .unwrap() as u64;
                    assert_eq!(stored, values, "{pooling:?}: storage beyond the values");
                    held += values + TENSOR_OVERHEAD_BYTES;
                }
                held += (t.ids.len() + t.type_ids.len()) as u64 * 4;
            }
            assert_eq!(target_bytes(&[4, 6], 2, 16, 4, kinds), held, "{pooling:?}");
        }
    }

    #[test]
    fn targets_that_do_not_fit_are_refused_with_the_count_that_would() {
        let sentences = 1000;
        let gib = 1u64 << 30;
        // 1 GiB for training, 8 x 64 MiB for the trained weights: 1.5 GiB before the targets.
        assert!(fits(sentences, gib, 64 << 20, Some(3 * gib)).is_ok());
        assert!(fits(sentences, gib, 64 << 20, None).is_ok(), "unknown memory passes");
        let err = fits(sentences, 3 * gib, 64 << 20, Some(3 * gib)).unwrap_err();
        assert!(err.contains("train on about 500 sentences"), "{err}");
        assert!(fits(sentences, 1, 64 << 20, Some(gib)).unwrap_err().contains("train on about 0 sentences"));
    }

    #[test]
    fn a_second_stage_starts_from_a_student_of_the_same_teacher_only() {
        let (teacher, other) = (tiny_encoder(Pooling::Mean, 1), tiny_encoder(Pooling::Mean, 2));
        let split = |ck: &EncoderCheckpoint, embeddings: bool| -> HashMap<String, Tensor> {
            ck.tensors
                .iter()
                .filter(|(k, _)| k.starts_with("embeddings.") == embeddings)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let frozen = split(&teacher, true);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Another teacher's student: its embeddings are not these.
        let mut trained = split(&teacher, false);
        let err = start_from(&mut trained, &frozen, &other, 2).unwrap_err();
        assert!(err.contains("differs from the teacher's"), "{err}");
        // A student of this teacher (its embeddings, its own layers) of another depth, then the same depth.
        let mut start = tiny_encoder(Pooling::Mean, 2);
        start.tensors.extend(frozen.clone());
        let err = start_from(&mut trained, &frozen, &start, 1).unwrap_err();
        assert!(err.starts_with("it has 2 layers, the student 1"), "{err}");
        start_from(&mut trained, &frozen, &start, 2).unwrap();
        for (name, t) in &trained {
            assert_eq!(values(t), values(&other.tensors[name]), "{name} is the start's");
        }
        // A start whose feed-forward blocks an earlier stage narrowed: taken at its width, as
        // long as its config says that width.
        let mut narrow = start.tensors.clone();
        let importance = vec![(0..32).map(|j| j as f64).collect::<Vec<f64>>(); 2];
        crate::encoder::prune::prune_ffn(&mut narrow, &importance, 20).unwrap();
        let mut narrow = EncoderCheckpoint {
            config: crate::encoder::EncoderConfig { intermediate_size: 20, ..start.config.clone() },
            tensors: narrow,
            ..tiny_encoder(Pooling::Mean, 2)
        };
        let mut trained = split(&teacher, false);
        start_from(&mut trained, &frozen, &narrow, 2).unwrap();
        assert_eq!(trained["encoder.layer.0.intermediate.dense.weight"].dims(), &[20, 16]);
        assert_eq!(trained["encoder.layer.1.output.dense.weight"].dims(), &[16, 20]);
        narrow.config.intermediate_size = 24;
        let mut trained = split(&teacher, false);
        let err = start_from(&mut trained, &frozen, &narrow, 2).unwrap_err();
        assert!(err.starts_with("its config.json says 24 feed-forward units, but its encoder.layer."), "{err}");
        narrow.config.intermediate_size = 40;
        let err = start_from(&mut trained, &frozen, &narrow, 2).unwrap_err();
        assert_eq!(err, "its config.json says 40 feed-forward units, more than the teacher's 32");
        // A start that lacks a layer's tensor is named.
        start.tensors.remove("encoder.layer.1.output.dense.weight");
        let err = start_from(&mut trained, &frozen, &start, 2).unwrap_err();
        assert_eq!(err, "it has no encoder.layer.1.output.dense.weight");
    }

    #[test]
    fn length_batches_take_every_sentence_once_in_batches_of_similar_length() {
        let teacher = tiny_encoder(Pooling::Mean, 1);
        let mut rng = Rng::new(3);
        let lens: Vec<usize> = (0..70).map(|_| 1 + rng.below(12)).collect();
        let ids: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1; n]).collect();
        let seqs: Vec<(&[u32], &[u32])> = ids.iter().map(|i| (&i[..], &i[..])).collect();
        let t = targets(&teacher, &seqs, &[0, 1]);
        let refs: Vec<&Target> = t.iter().collect();
        let batches = length_batches(&refs, 8);
        assert_eq!(batches.len(), 70usize.div_ceil(8));
        assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 8));
        let mut seen: Vec<*const Target> = batches.iter().flatten().map(|t| *t as *const Target).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 70);
        // All 70 fit in one window of 8 x 32: each batch is sorted and holds the next lengths.
        for b in &batches {
            assert!(b.windows(2).all(|w| w[0].ids.len() <= w[1].ids.len()));
        }
        for pair in batches.windows(2) {
            assert!(pair[0].last().unwrap().ids.len() <= pair[1][0].ids.len());
        }
    }
}
