//! Streaming detokenization that never gives out half a character.
//!
//! A single token can hold part of a UTF-8 character (for example one byte of
//! an emoji in a byte-level BPE vocabulary). Some decoders also change a
//! token's text depending on the tokens before it (for example by dropping
//! the leading space of the first piece). Decoding each token by itself is
//! therefore wrong. [`StreamDecoder`] instead keeps the ids of the current
//! answer and two positions in that list, `prefix_offset <= read_offset`.
//! For each new id it decodes the window `ids[prefix_offset..]` and the
//! shorter window `ids[prefix_offset..read_offset]`, which has already been
//! given out, and returns only the text by which the first is longer. It
//! holds that text back while the decoded window still ends in U+FFFD, the
//! replacement character produced by an incomplete byte sequence. Once text is
//! given out, both positions move forward, so each step decodes only a few
//! tokens, however long the answer grows. The same technique is used by
//! Hugging Face text-generation-inference. Only [`StreamDecoder::flush`], at
//! the end of the answer, may return text with U+FFFD in place of bytes that
//! were never completed. Special tokens are always skipped.

use tokenizers::Tokenizer;

/// The character a lossy UTF-8 decode puts in place of an invalid or
/// incomplete byte sequence.
const REPLACEMENT: char = '\u{FFFD}';

/// Turns generated token ids into text, step by step, and only ever gives out
/// complete UTF-8 characters.
///
/// Call [`push`](Self::push) for every generated id and send on whatever text
/// it returns. At the end of the answer, call [`flush`](Self::flush) to get
/// whatever is still held back. Use one decoder per answer, or call
/// [`reset`](Self::reset) between answers.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    /// The context ids first, then every id generated so far.
    ids: Vec<u32>,
    /// How many entries at the start of `ids` are context and are never emitted.
    context_len: usize,
    /// Start of the decode window. Text from here up to `read_offset` has
    /// already been emitted (or is context) and is decoded again only for
    /// comparison.
    prefix_offset: usize,
    /// End of the text that has already been emitted. Ids from here on are
    /// still pending.
    read_offset: usize,
}

impl StreamDecoder {
    /// Creates a decoder for one answer.
    ///
    /// `prompt_tail` is optional context, normally the last few prompt ids. Its
    /// text is never returned. It is used so that the first generated token
    /// decodes as it would in the middle of a text, and keeps for example its
    /// leading space with SentencePiece/Metaspace decoders. Pass `&[]` when
    /// there is no context. The tail should end on a whole character (any
    /// ordinary prompt does).
    pub fn new(prompt_tail: &[u32]) -> Self {
        let mut dec = Self::default();
        dec.reset(prompt_tail);
        dec
    }

    /// Clears the decoder for a new answer and keeps the memory already
    /// allocated. `prompt_tail` means the same as in [`new`](Self::new).
    pub fn reset(&mut self, prompt_tail: &[u32]) {
        self.ids.clear();
        self.ids.extend_from_slice(prompt_tail);
        self.context_len = prompt_tail.len();
        self.prefix_offset = 0;
        self.read_offset = prompt_tail.len();
    }

    /// The ids added with [`push`](Self::push) so far, without the context.
    #[cfg(test)]
    pub fn generated_ids(&self) -> &[u32] {
        &self.ids[self.context_len..]
    }

    /// Returns `true` if some pushed ids have text that has not been returned
    /// yet, for example the first bytes of a multi-byte character.
    pub fn has_pending(&self) -> bool {
        self.read_offset < self.ids.len()
    }

    /// Adds one generated id. Returns the text it completes, if there is any.
    ///
    /// Returns `Ok(None)` when the new id adds no visible text (for example a
    /// special token, which is skipped) or when the text so far ends in the
    /// middle of a UTF-8 character. The held-back text comes out with a later
    /// `push` or with [`flush`](Self::flush). Text that is returned never
    /// ends in an unfinished character. The id is kept even when decoding
    /// fails.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, tokenizers::Error> {
        self.ids.push(id);
        let prefix_text = self.decode_prefix(tok)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], true)?;

        if new_text.len() > prefix_text.len() && !new_text.ends_with(REPLACEMENT) {
            let piece = suffix_after(&prefix_text, &new_text).to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(non_empty(piece))
        } else {
            Ok(None)
        }
    }

    /// Ends the answer and returns any text still held back.
    ///
    /// Bytes that never formed a complete character show up as U+FFFD in the
    /// result. This is the only method that can return such text. Returns
    /// `Ok(None)` if nothing is pending. After a flush, further pushes carry
    /// on from the flushed position.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, tokenizers::Error> {
        if !self.has_pending() {
            return Ok(None);
        }
        let prefix_text = self.decode_prefix(tok)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if new_text.len() > prefix_text.len() {
            Ok(non_empty(suffix_after(&prefix_text, &new_text).to_owned()))
        } else {
            Ok(None)
        }
    }

    /// Decodes the whole answer so far, without the context and with special
    /// tokens skipped.
    ///
    /// The result includes pending ids, so it can end in U+FFFD if the last
    /// character is not complete yet. It is not cheap, because the whole
    /// answer is decoded again. Use it for logging or for the final text, not
    /// at every step.
    #[cfg(test)]
    pub fn text_so_far(&self, tok: &Tokenizer) -> Result<String, tokenizers::Error> {
        let full = tok.decode(&self.ids, true)?;
        if self.context_len == 0 {
            return Ok(full);
        }
        let context = tok.decode(&self.ids[..self.context_len], true)?;
        Ok(suffix_after(&context, &full).to_owned())
    }

    /// Decodes the part of the window that has already been emitted. Empty
    /// windows are not passed to the tokenizer.
    fn decode_prefix(&self, tok: &Tokenizer) -> Result<String, tokenizers::Error> {
        if self.prefix_offset == self.read_offset {
            Ok(String::new())
        } else {
            tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)
        }
    }
}

/// The part of `full` that comes after `prefix`.
///
/// In the usual case `full` starts with `prefix`. If it does not (a decoder
/// that rewrites earlier text), the first `prefix.len()` bytes of `full` are
/// skipped, as text-generation-inference does, and the cut is moved forward
/// to a character boundary, so this never panics.
fn suffix_after<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let mut cut = prefix.len().min(full.len());
    while !full.is_char_boundary(cut) {
        cut += 1;
    }
    &full[cut..]
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    const END_ID: u32 = 256;

    /// A byte-level BPE tokenizer with no merges: every UTF-8 byte becomes its
    /// own token, so multi-byte characters are always split. Id 256 is a
    /// special `<|end|>` token.
    fn byte_tokenizer() -> Tokenizer {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        assert_eq!(alphabet.len(), 256);
        let mut vocab = serde_json::Map::new();
        for (i, c) in alphabet.iter().enumerate() {
            vocab.insert(c.to_string(), serde_json::json!(i));
        }
        vocab.insert("<|end|>".to_owned(), serde_json::json!(END_ID));

        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{
                "id": END_ID,
                "content": "<|end|>",
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true
            }],
            "normalizer": null,
            "pre_tokenizer": {
                "type": "ByteLevel",
                "add_prefix_space": false,
                "trim_offsets": true,
                "use_regex": true
            },
            "post_processor": null,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": true,
                "use_regex": true
            },
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": serde_json::Value::Object(vocab),
                "merges": []
            }
        });
        Tokenizer::from_str(&spec.to_string()).expect("test tokenizer JSON must load")
    }

    fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).expect("encode").get_ids().to_vec()
    }

    /// Pushes every id and checks each piece. Returns the pieces and the
    /// flushed tail.
    fn stream(tok: &Tokenizer, dec: &mut StreamDecoder, ids: &[u32]) -> (Vec<String>, Option<String>) {
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(piece) = dec.push(tok, id).expect("push") {
                assert!(!piece.is_empty());
                assert!(!piece.contains(REPLACEMENT), "piece {piece:?} contains U+FFFD");
                pieces.push(piece);
            }
        }
        let tail = dec.flush(tok).expect("flush");
        (pieces, tail)
    }

    #[test]
    fn tokenizer_splits_multibyte_characters() {
        let tok = byte_tokenizer();
        let text = "héllo wörld 日本語 🙂";
        let ids = encode(&tok, text);
        assert_eq!(ids.len(), text.len(), "one token per UTF-8 byte");
        assert!(ids.len() > text.chars().count());
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }

    #[test]
    fn streaming_roundtrip_never_emits_broken_utf8() {
        let tok = byte_tokenizer();
        for text in ["héllo wörld 日本語 🙂", "🙂🙂 a🙂b ñ", "plain ascii text", "ends in emoji 👩‍👩‍👧"]
        {
            let ids = encode(&tok, text);
            let mut dec = StreamDecoder::new(&[]);
            let (pieces, tail) = stream(&tok, &mut dec, &ids);
            assert_eq!(tail, None, "nothing pending for a complete text");
            let joined: String = pieces.concat();
            assert_eq!(joined, text);
            assert_eq!(dec.text_so_far(&tok).unwrap(), text);
            assert_eq!(dec.generated_ids(), &ids[..]);
            assert!(!dec.has_pending());
        }
    }

    #[test]
    fn emoji_is_held_until_complete() {
        let tok = byte_tokenizer();
        let ids = encode(&tok, "🙂");
        assert_eq!(ids.len(), 4);
        let mut dec = StreamDecoder::new(&[]);
        for &id in &ids[..3] {
            assert_eq!(dec.push(&tok, id).unwrap(), None);
            assert!(dec.has_pending());
        }
        assert_eq!(dec.push(&tok, ids[3]).unwrap().as_deref(), Some("🙂"));
        assert!(!dec.has_pending());
    }

    #[test]
    fn context_ids_are_never_emitted() {
        let tok = byte_tokenizer();
        let prompt = encode(&tok, "Question: ¿qué? Answer:");
        let answer = " sí, 日本 🙂.";
        let tail = &prompt[prompt.len() - 4..];
        let mut dec = StreamDecoder::new(tail);
        let (pieces, rest) = stream(&tok, &mut dec, &encode(&tok, answer));
        assert_eq!(rest, None);
        assert_eq!(pieces.concat(), answer);
        assert_eq!(dec.text_so_far(&tok).unwrap(), answer);

        // reset() starts a fresh answer with new context.
        dec.reset(&prompt[prompt.len() - 2..]);
        assert!(dec.generated_ids().is_empty());
        let (pieces, rest) = stream(&tok, &mut dec, &encode(&tok, "ok ✓"));
        assert_eq!(rest, None);
        assert_eq!(pieces.concat(), "ok ✓");
    }

    #[test]
    fn special_tokens_are_skipped() {
        let tok = byte_tokenizer();
        let mut ids = encode(&tok, "ab");
        ids.push(END_ID);
        ids.extend(encode(&tok, "ç"));
        let mut dec = StreamDecoder::new(&[]);
        assert_eq!(dec.push(&tok, ids[0]).unwrap().as_deref(), Some("a"));
        assert_eq!(dec.push(&tok, ids[1]).unwrap().as_deref(), Some("b"));
        assert_eq!(dec.push(&tok, END_ID).unwrap(), None);
        assert_eq!(dec.push(&tok, ids[3]).unwrap(), None);
        assert_eq!(dec.push(&tok, ids[4]).unwrap().as_deref(), Some("ç"));
        assert_eq!(dec.flush(&tok).unwrap(), None);
        assert_eq!(dec.text_so_far(&tok).unwrap(), "abç");
    }

    #[test]
    fn flush_returns_incomplete_tail_lossily() {
        let tok = byte_tokenizer();
        let mut ids = encode(&tok, "x");
        let emoji = encode(&tok, "🙂");
        ids.extend_from_slice(&emoji[..2]);
        let mut dec = StreamDecoder::new(&[]);
        let (pieces, tail) = stream(&tok, &mut dec, &ids);
        assert_eq!(pieces, vec!["x".to_owned()]);
        assert_eq!(tail.as_deref(), Some("\u{FFFD}"));
        assert_eq!(dec.flush(&tok).unwrap(), None);
    }

    #[test]
    fn suffix_after_is_panic_free() {
        assert_eq!(suffix_after("ab", "abc"), "c");
        assert_eq!(suffix_after("", "abc"), "abc");
        // Not a prefix: cut by byte length, moved to a char boundary.
        assert_eq!(suffix_after("x", "éa"), "a");
        assert_eq!(suffix_after("xyz", "ab"), "");
    }
}
