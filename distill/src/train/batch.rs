//! Turning instruction triples into token sequences and padded batches.
//!
//! An example is rendered the way the runtime will see it at inference: the checkpoint's chat
//! template over one user message (`instruction`, a newline, `input`), with the generation
//! prompt; the target is the `output` followed by the end-of-sequence token. Only target
//! positions carry loss. Checkpoints without a chat template use `instruction\ninput\n`.

use std::path::Path;

use candle_core::{Device, Tensor};
use edgelm_runtime::tokenizer::TextCodec;

use crate::checkpoint::Checkpoint;
use crate::data::Example;
use crate::error::{Error, Result};

/// One tokenized example: `ids = prompt ++ target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Prompt and target tokens.
    pub ids: Vec<u32>,
    /// How many leading ids are prompt (no loss on them).
    pub prompt_len: usize,
}

/// Renders and tokenizes examples for one checkpoint's tokenizer and template.
pub struct Formatter {
    codec: TextCodec,
    chat: bool,
    eos: u32,
    pad: u32,
}

impl Formatter {
    /// The formatter of a checkpoint (its tokenizer.json, chat template and EOS id).
    pub fn for_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let tok = ck.tokenizer_json.as_deref().ok_or_else(|| Error::Training {
            what: format!("{} has no tokenizer.json, and training needs one", ck.dir.display()),
        })?;
        Self::load(tok, ck.chat_template(), ck.bos_token_id(), &ck.eos_token_ids(), ck.config.pad_token_id)
    }

    /// A formatter from a tokenizer file, an optional chat template and the special ids.
    pub fn load(
        tokenizer: &Path,
        chat_template: Option<String>,
        bos: Option<u32>,
        eos: &[u32],
        pad: Option<u32>,
    ) -> Result<Self> {
        let eos_id = *eos.first().ok_or_else(|| Error::Training {
            what: "the checkpoint names no end-of-sequence token, so answers could not end".into(),
        })?;
        let chat = chat_template.is_some();
        let codec = TextCodec::load(tokenizer, chat_template, bos, Some(eos_id))?;
        Ok(Formatter { codec, chat, eos: eos_id, pad: pad.unwrap_or(eos_id) })
    }

    /// End-of-sequence id that closes every target.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Id used to pad batches (never scored).
    pub fn pad(&self) -> u32 {
        self.pad
    }

    /// The tokenizer and template.
    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// The user message of an example.
    pub fn user_message(e: &Example) -> String {
        if e.input.is_empty() {
            e.instruction.clone()
        } else {
            format!("{}\n{}", e.instruction, e.input)
        }
    }

    /// Prompt ids for an example, exactly as the runtime's chat encoding produces them.
    pub fn prompt(&self, e: &Example) -> Result<Vec<u32>> {
        let user = Self::user_message(e);
        if self.chat {
            let text = self.codec.apply_chat_template(&[edgelm_runtime::ChatMessage::user(user)])?;
            Ok(self.codec.encode(&text, false)?)
        } else {
            Ok(self.codec.encode(&format!("{user}\n"), true)?)
        }
    }

    /// Prompt plus target ids.
    pub fn encode(&self, e: &Example) -> Result<Encoded> {
        let mut ids = self.prompt(e)?;
        let prompt_len = ids.len();
        ids.extend(self.codec.encode(&e.output, false)?);
        ids.push(self.eos);
        Ok(Encoded { ids, prompt_len })
    }

    /// Encodes many examples.
    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<Encoded>> {
        examples.iter().map(|e| self.encode(e)).collect()
    }

    /// Encodes many examples and drops those longer than `context` (see [`fit_context`]).
    pub fn encode_within(&self, examples: &[Example], context: usize, what: &str) -> Result<Vec<Encoded>> {
        fit_context(self.encode_all(examples)?, context, what)
    }
}

/// A padded batch and its scored positions.
pub struct Batch {
    /// Input ids `[B, S]` (right-padded).
    pub input_ids: Tensor,
    /// Flat indices `b * S + s` of the positions whose next token is scored, `[N]`.
    pub rows: Tensor,
    /// The scored next tokens, `[N]`.
    pub labels: Tensor,
    /// Non-padding tokens in the batch (what the model reads).
    pub tokens: usize,
    /// Indices of the batch's examples in the training set, in batch order (set by the
    /// training loop; empty elsewhere).
    pub examples: Vec<usize>,
}

impl Batch {
    /// Pads `examples` to the longest and marks every target token for scoring.
    pub fn new(examples: &[&Encoded], pad: u32) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::Training { what: "a batch needs at least one example".into() });
        }
        let s = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * s);
        let (mut rows, mut labels) = (Vec::new(), Vec::new());
        let mut tokens = 0;
        for (b, e) in examples.iter().enumerate() {
            ids.extend_from_slice(&e.ids);
            ids.resize((b + 1) * s, pad);
            tokens += e.ids.len();
            // Position p predicts ids[p + 1]; targets start at prompt_len.
            for p in e.prompt_len.max(1) - 1..e.ids.len() - 1 {
                rows.push((b * s + p) as u32);
                labels.push(e.ids[p + 1]);
            }
        }
        let dev = &Device::Cpu;
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (examples.len(), s), dev)?,
            rows: Tensor::new(rows.as_slice(), dev)?,
            labels: Tensor::new(labels.as_slice(), dev)?,
            tokens,
            examples: Vec::new(),
        })
    }

    /// Number of scored positions.
    pub fn targets(&self) -> usize {
        self.labels.dims()[0]
    }
}

/// Drops examples longer than the model's context (they could not be trained on whole), with
/// a warning naming how many.
fn fit_context(encoded: Vec<Encoded>, context: usize, what: &str) -> Result<Vec<Encoded>> {
    let before = encoded.len();
    let kept: Vec<Encoded> = encoded.into_iter().filter(|e| e.ids.len() <= context).collect();
    if kept.len() < before {
        tracing::warn!(
            "{what}: dropped {} of {before} examples longer than the context of {context} tokens",
            before - kept.len()
        );
    }
    if kept.is_empty() && before > 0 {
        return Err(Error::Training {
            what: format!("{what}: every example is longer than the model's context of {context} tokens"),
        });
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_target_positions_are_scored() {
        let a = Encoded { ids: vec![5, 6, 7, 8, 9], prompt_len: 3 };
        let b = Encoded { ids: vec![1, 2, 3], prompt_len: 2 };
        let batch = Batch::new(&[&a, &b], 0).unwrap();
        assert_eq!(batch.input_ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7, 8, 9], vec![1, 2, 3, 0, 0]]);
        // a: positions 2, 3 predict 8, 9; b: position 1 (row 5 + 1) predicts 3.
        assert_eq!(batch.rows.to_vec1::<u32>().unwrap(), vec![2, 3, 6]);
        assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), vec![8, 9, 3]);
        assert_eq!(batch.tokens, 8);
    }
}
