//! `edgelm chat`: a conversation on stdin, answers streamed to stdout.
//!
//! The conversation is fitted to the context: the oldest exchanges are dropped until the
//! prompt leaves room for the answer. A bundle that says it answers single requests (a
//! command model) gets each line alone by default.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use edgelm_runtime::{ChatMessage, Engine};

use crate::board::Placement;
use crate::gen_args::{open, stream_to_stdout, GenArgs, DEFAULT_MAX_NEW};

#[derive(Args)]
pub struct ChatArgs {
    /// Bundle folder.
    bundle: PathBuf,
    /// What each prompt holds: the conversation so far, or the new line alone (default: what
    /// the bundle says its model does; multi for bundles that say nothing).
    #[arg(long, value_enum)]
    turns: Option<Turns>,
    #[command(flatten)]
    gen: GenArgs,
}

/// `--turns`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Turns {
    /// Every line is sent alone.
    Single,
    /// Every line is sent after the earlier turns that fit.
    Multi,
}

pub fn chat(a: ChatArgs, place: &Placement) -> Result<()> {
    let mut engine = open(&a.bundle, place, a.gen.threads, a.gen.kv_cache)?;
    if !engine.codec().is_some_and(|c| c.has_chat_template()) {
        bail!("{} has no chat template; use `edgelm run --prompt`", a.bundle.display());
    }
    let turns = a.turns.unwrap_or(if engine.bundle().generation.single_turn { Turns::Single } else { Turns::Multi });
    let mut history: Vec<ChatMessage> = Vec::new();
    eprint!("> ");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if !line.trim().is_empty() {
            if turns == Turns::Single {
                history.clear();
            }
            match answer(&mut engine, &a.gen, &mut history, line) {
                Ok(()) => println!(),
                // One line that cannot be answered does not end the conversation.
                Err(e) => eprintln!("error: {e:#}"),
            }
        }
        eprint!("> ");
    }
    Ok(())
}

/// Answers `line` after as much of `history` as fits, and records both in `history`.
fn answer(engine: &mut Engine, gen: &GenArgs, history: &mut Vec<ChatMessage>, line: String) -> Result<()> {
    let context = engine.context_length();
    // Room kept for the answer: what was asked for, else up to half the context.
    let reserve = gen.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW.min(context / 2)).min(context.saturating_sub(1));
    let prompt_budget = context - reserve;
    let (dropped, ids) = fit(engine, history, &line, prompt_budget)?;
    history.drain(..dropped);
    let params = gen.params(engine, ids.len());
    let g = engine.generate(&ids, &params, stream_to_stdout(true))?;
    history.push(ChatMessage::user(line));
    history.push(ChatMessage::assistant(g.text));
    Ok(())
}

/// The prompt for `line` after the newest earlier turns whose prompt is at most `budget`
/// tokens, and how many of the oldest turns were left out. Drops whole exchanges (a user turn
/// and its answer). The line alone is used even when it is longer than `budget`: generation
/// then reports whether it fits the context at all.
fn fit(engine: &Engine, history: &[ChatMessage], line: &str, budget: usize) -> Result<(usize, Vec<u32>)> {
    let mut dropped = 0;
    loop {
        let mut messages = history[dropped..].to_vec();
        messages.push(ChatMessage::user(line));
        let ids = engine.encode_chat(&messages)?;
        if ids.len() <= budget || dropped >= history.len() {
            return Ok((dropped, ids));
        }
        dropped = (dropped + 2).min(history.len());
    }
}
