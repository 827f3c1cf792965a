//! `distill`: trains a student initialised from the teacher's layers on
//! `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`, with the teacher's logits
//! computed on the fly for the same positions, or read from a top-k cache on disk
//! ([`TeacherCache`]) for runs that read the data many times. The student keeps the teacher's
//! tokenizer.
//!
//! Optionally (`hidden_weight > 0`) the student's residual stream after each layer also meets
//! the teacher's after the layer it came from, at the answer positions: `hidden_weight` times
//! the mean over layers and positions of `||s - t||^2 / ||t||^2` ([`hidden_state_loss`]);
//! relative, so one weight fits layers whose streams differ in scale. The widths must agree: a
//! pruned copy recovering, or a sliced student that keeps the teacher's width.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

use super::batch::{Batch, Formatter};
use super::fit::{FitData, Objective};
use super::kd::{hidden_state_loss, kd_loss, kd_loss_top_k};
use super::stage::{flop_parameters, lm_loss, load_best, train_stage, Stage, StageOptions, TrainLog};
use super::teacher_cache::TeacherCache;
use super::Trainer;
use crate::checkpoint::write::{copy_tokenizer_files, derive_generation_config, write_checkpoint, WriteOptions};
use crate::checkpoint::{Checkpoint, ModelConfig};
use crate::data::Example;
use crate::error::Result;
use crate::model::LlamaModel;
use crate::recipe::TrainSettings;
use crate::student::{init_student, StudentShape};

/// Distillation settings besides the loop.
#[derive(Debug, Clone)]
pub struct DistillSpec {
    /// Where the student's starting weights come from.
    pub student: StudentInit,
    /// Softmax temperature of the soft targets.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
    /// Optimizer and loop settings.
    pub train: TrainSettings,
    /// Read the teacher's top-k logits from a cache on disk (built on first use) instead of
    /// running the teacher every step: `(folder, k)`.
    pub teacher_cache: Option<(PathBuf, usize)>,
    /// Weight of matching the teacher's residual stream layer by layer (0: off).
    pub hidden_weight: f64,
}

/// The student before training.
#[derive(Debug, Clone)]
pub enum StudentInit {
    /// Layers and units sliced from the teacher.
    Slice(StudentShape),
    /// Weights made elsewhere (a structurally pruned copy of the teacher, recovering).
    Weights(Box<ModelConfig>, HashMap<String, Tensor>),
}

/// The teacher layer each student layer's residual stream is matched to (empty when
/// `spec.hidden_weight` is 0), or why the two cannot be matched.
fn matched_layers(spec: &DistillSpec, teacher: &ModelConfig, student: &ModelConfig) -> Result<Vec<usize>> {
    let bad = |what: String| crate::Error::InvalidConfig { what: format!("hidden-state matching: {what}") };
    if spec.hidden_weight == 0.0 {
        return Ok(Vec::new());
    }
    if !(spec.hidden_weight.is_finite() && spec.hidden_weight > 0.0) {
        return Err(bad(format!("the weight must be 0 or more, not {}", spec.hidden_weight)));
    }
    if spec.teacher_cache.is_some() {
        return Err(bad("it runs the teacher every step, so it does not combine with a teacher cache".into()));
    }
    if student.hidden_size != teacher.hidden_size {
        return Err(bad(format!(
            "the student's residual stream is {} wide and the teacher's {}",
            student.hidden_size, teacher.hidden_size
        )));
    }
    match &spec.student {
        StudentInit::Slice(shape) => Ok(shape.layers.clone()),
        StudentInit::Weights(..) if student.num_hidden_layers == teacher.num_hidden_layers => {
            Ok((0..student.num_hidden_layers).collect())
        }
        StudentInit::Weights(..) => Err(bad(format!(
            "a {}-layer model given as weights cannot be matched to a {}-layer teacher layer by layer",
            student.num_hidden_layers, teacher.num_hidden_layers
        ))),
    }
}

/// Distills `teacher` into a student written to `opts.output`.
pub fn distill(
    teacher: &Checkpoint,
    data: (&[Example], &[Example]),
    spec: &DistillSpec,
    opts: &StageOptions,
) -> Result<TrainLog> {
    // A student cut from the teacher's layers is another model: written over the teacher it
    // would take the folder the next student is cut from. (A recovery writes a pruned model
    // where its unpruned one was, as `prune ck -o ck` does.)
    if matches!(spec.student, StudentInit::Slice(_)) {
        crate::checkpoint::write::refuse_writing_over_teacher(&teacher.dir, &opts.output)?;
    }
    let fmt = Formatter::for_checkpoint(teacher)?;
    let train = fmt.encode_within(data.0, teacher.config.max_position_embeddings, "training set")?;
    let validation = fmt.encode_within(data.1, teacher.config.max_position_embeddings, "validation set")?;
    let (config, weights) = match &spec.student {
        StudentInit::Slice(shape) => init_student(&teacher.config, &teacher.tensors, shape)?,
        StudentInit::Weights(c, w) => {
            if c.vocab_size != teacher.config.vocab_size {
                return Err(crate::Error::InvalidConfig {
                    what: format!(
                        "student vocabulary {} differs from the teacher's {}",
                        c.vocab_size, teacher.config.vocab_size
                    ),
                });
            }
            // Copies, so training never writes into storage the caller still holds.
            let w = w.iter().map(|(k, v)| Ok((k.clone(), v.copy()?))).collect::<Result<_>>()?;
            ((**c).clone(), w)
        }
    };
    let matched = matched_layers(spec, &teacher.config, &config)?;
    let total = spec.train.fit_options("student").total_steps(train.len());
    let mut trainer = Trainer::new(weights, spec.train.train_config(total))?;
    let teacher_model = LlamaModel::new(teacher)?;
    tracing::info!(
        "student: {} parameters ({:.1}% of the teacher's {}), {total} steps",
        config.num_parameters(),
        100.0 * config.num_parameters() as f64 / teacher.config.num_parameters() as f64,
        teacher.config.num_parameters()
    );
    let cache = match &spec.teacher_cache {
        Some((dir, k)) => {
            Some(TeacherCache::open_or_build(dir, &teacher.dir, &teacher_model, &train, *k, spec.train.batch_size)?)
        }
        None => None,
    };
    let (t, alpha) = (spec.temperature, spec.alpha);
    let loss = |p: &HashMap<String, Tensor>, b: &Batch| -> Result<Tensor> {
        if spec.hidden_weight > 0.0 {
            let (student, states) =
                LlamaModel::from_tensors(&config, p)?.logits_and_states_at(&b.input_ids, &b.rows)?;
            let (soft, targets) = teacher_model.logits_and_states_at(&b.input_ids, &b.rows)?;
            let kd = kd_loss(&student, &soft.detach(), &b.labels, t, alpha)?;
            let hidden = hidden_state_loss(&states, &targets, &matched)?;
            return Ok((kd + (hidden * spec.hidden_weight)?)?);
        }
        let student = LlamaModel::from_tensors(&config, p)?.logits_at(&b.input_ids, &b.rows)?;
        match &cache {
            Some(c) => {
                let (values, indices) = c.rows(&b.examples)?;
                kd_loss_top_k(&student, &values, &indices, &b.labels, t, alpha)
            }
            None => {
                let soft = teacher_model.logits_at(&b.input_ids, &b.rows)?.detach();
                kd_loss(&student, &soft, &b.labels, t, alpha)
            }
        }
    };
    // Early stopping watches the student's own cross-entropy on the real answers.
    let val = |p: &HashMap<String, Tensor>, b: &Batch| lm_loss(&config, p, b);
    let data = FitData { train: &train, validation: &validation, pad: fmt.pad() };
    let stage = Stage { label: "student", settings: &spec.train, data, opts };
    let report = train_stage(stage, &mut trainer, Objective::new(&loss), &val)?;
    let out = &opts.output;
    write_checkpoint(out, &config, &load_best(&report)?, WriteOptions::default())?;
    derive_generation_config(&teacher.dir, out, &config)?;
    copy_tokenizer_files(&teacher.dir, out)?;
    // Each step also runs the teacher forward: 2 x teacher parameters per token on top of the
    // student's 6 x; the log counts the student's share only.
    let kind = match spec.student {
        StudentInit::Slice(_) => "distill",
        StudentInit::Weights(..) => "recover",
    };
    let log = TrainLog::new(kind, trainer.num_parameters(), flop_parameters(&config), &report);
    log.write(out)?;
    Ok(log)
}
