//! `pretrain`: trains the recipe's teacher from random weights on the recipe's data, with its
//! own byte-level BPE tokenizer, and writes it as a Hugging Face checkpoint.

use std::collections::HashMap;

use candle_core::Tensor;

use super::batch::{Batch, Formatter};
use super::fit::{FitData, Objective};
use super::stage::{flop_parameters, lm_loss, load_best, train_stage, Stage, StageOptions, TrainLog};
use super::Trainer;
use crate::checkpoint::preset::{random_weights, train_tokenizer, write_tokenizer, CHATML_TEMPLATE};
use crate::checkpoint::write::{write_checkpoint, write_generation_config, WriteOptions};
use crate::data::Example;
use crate::error::Result;
use crate::recipe::Recipe;

/// Trains the recipe's teacher and writes it to `opts.output`.
pub fn pretrain(recipe: &Recipe, opts: &StageOptions) -> Result<TrainLog> {
    let splits = recipe.splits()?;
    let tok = train_tokenizer(splits.train.iter().flat_map(Example::texts), recipe.tokenizer.vocab_size)?;
    let config = recipe.teacher_config(tok.get_vocab_size(true));
    let out = &opts.output;
    write_tokenizer(out, &tok, config.max_position_embeddings)?;
    let fmt = Formatter::load(
        &out.join("tokenizer.json"),
        Some(CHATML_TEMPLATE.into()),
        config.bos_token_id,
        &config.eos_token_ids,
        config.pad_token_id,
    )?;
    let train = fmt.encode_within(&splits.train, config.max_position_embeddings, "training set")?;
    let validation = fmt.encode_within(&splits.validation, config.max_position_embeddings, "validation set")?;
    let settings = &recipe.teacher.train;
    let total = settings.fit_options("teacher").total_steps(train.len());
    let mut trainer = Trainer::new(random_weights(&config, recipe.teacher.init_seed)?, settings.train_config(total))?;
    tracing::info!(
        "teacher: {} parameters, {} training sequences, {total} steps",
        config.num_parameters(),
        train.len()
    );
    let loss = |p: &HashMap<String, Tensor>, b: &Batch| lm_loss(&config, p, b);
    let val = |p: &HashMap<String, Tensor>, b: &Batch| lm_loss(&config, p, b);
    let data = FitData { train: &train, validation: &validation, pad: fmt.pad() };
    let stage = Stage { label: "teacher", settings, data, opts };
    let report = train_stage(stage, &mut trainer, Objective::new(&loss), &val)?;
    let best = load_best(&report)?;
    write_checkpoint(out, &config, &best, WriteOptions::default())?;
    write_generation_config(out, &config)?;
    let log = TrainLog::new("pretrain", trainer.num_parameters(), flop_parameters(&config), &report);
    log.write(out)?;
    Ok(log)
}
