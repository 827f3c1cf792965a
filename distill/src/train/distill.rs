//! `distill`: trains a student initialised from the teacher's layers on
//! `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`, with the teacher's logits
//! computed on the fly for the same positions, or read from a top-k cache on disk
//! ([`TeacherCache`]) for runs that read the data many times. The student keeps the teacher's
//! tokenizer.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

use super::batch::{Batch, Formatter};
use super::fit::{FitData, Objective};
use super::kd::{kd_loss, kd_loss_top_k};
use super::stage::{flop_parameters, lm_loss, load_best, train_stage, Stage, StageOptions, TrainLog};
use super::teacher_cache::TeacherCache;
use super::Trainer;
use crate::checkpoint::write::{copy_tokenizer_files, write_checkpoint, write_generation_config, WriteOptions};
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
}

/// The student before training.
#[derive(Debug, Clone)]
pub enum StudentInit {
    /// Layers and units sliced from the teacher.
    Slice(StudentShape),
    /// Weights made elsewhere (a structurally pruned copy of the teacher, recovering).
    Weights(ModelConfig, HashMap<String, Tensor>),
}

/// Distills `teacher` into a student written to `opts.output`.
pub fn distill(
    teacher: &Checkpoint,
    data: (&[Example], &[Example]),
    spec: &DistillSpec,
    opts: &StageOptions,
) -> Result<TrainLog> {
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
            (c.clone(), w)
        }
    };
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
    write_generation_config(out, &config)?;
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
