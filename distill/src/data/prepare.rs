//! Preparing users' own data: JSONL instruction triples or plain text, normalised (Unicode NFC,
//! trimmed, runs of blanks folded), exact duplicates removed, split into train / validation /
//! test with a seeded shuffle, and optionally augmented by swapping entities.

use std::collections::HashSet;
use std::path::Path;

use unicode_normalization::UnicodeNormalization;

use super::{read_jsonl, Example};
use crate::error::{IoContext, Result};
use crate::rng::Rng;

/// Split and augmentation settings.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Share of examples for validation.
    pub validation: f64,
    /// Share of examples for test.
    pub test: f64,
    /// Shuffle seed.
    pub seed: u64,
    /// Interchangeable entities (e.g. room names): an example mentioning one of them in both
    /// input and output gets copies with another one swapped in, in the training split only.
    pub swap_entities: Vec<String>,
    /// Most augmented copies per example.
    pub augment_per_example: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions { validation: 0.05, test: 0.05, seed: 0, swap_entities: vec![], augment_per_example: 0 }
    }
}

/// The prepared splits and what happened on the way.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prepared {
    /// Training examples (with augmentation).
    #[serde(skip)]
    pub train: Vec<Example>,
    /// Validation examples.
    #[serde(skip)]
    pub validation: Vec<Example>,
    /// Test examples.
    #[serde(skip)]
    pub test: Vec<Example>,
    /// Examples read.
    pub read: usize,
    /// Exact duplicates dropped (after normalisation).
    pub duplicates: usize,
    /// Examples added by entity swaps.
    pub augmented: usize,
}

/// NFC, trimmed, blanks folded to one space (newlines kept).
pub fn normalize(s: &str) -> String {
    let nfc: String = s.nfc().collect();
    nfc.lines()
        .map(|l| l.split([' ', '\t']).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// Reads JSONL triples, or plain text (one example per non-empty line, as `output`).
pub fn read_any(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if first.trim_start().starts_with('{') {
        return read_jsonl(path);
    }
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Example { instruction: String::new(), input: String::new(), output: l.to_owned() })
        .collect())
}

/// Replaces whole-word occurrences of `from` with `to`.
fn swap_word(s: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(from) {
        let before_ok = rest[..i].chars().last().is_none_or(|c| !c.is_alphanumeric());
        let after_ok = rest[i + from.len()..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        out.push_str(&rest[..i]);
        out.push_str(if before_ok && after_ok { to } else { from });
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

fn mentions(s: &str, word: &str) -> bool {
    swap_word(s, word, "\u{0}") != s
}

/// Normalises, deduplicates, splits and augments.
pub fn prepare(examples: Vec<Example>, opts: &PrepareOptions) -> Prepared {
    let read = examples.len();
    let mut seen = HashSet::new();
    let mut unique: Vec<Example> = examples
        .into_iter()
        .map(|e| Example {
            instruction: normalize(&e.instruction),
            input: normalize(&e.input),
            output: normalize(&e.output),
        })
        .filter(|e| !e.output.is_empty() && seen.insert(e.clone()))
        .collect();
    let duplicates = read - unique.len();
    let mut rng = Rng::new(opts.seed);
    rng.shuffle(&mut unique);
    let n = unique.len();
    let n_test = ((n as f64) * opts.test).round() as usize;
    let n_val = ((n as f64) * opts.validation).round() as usize;
    let test: Vec<Example> = unique.drain(..n_test.min(n)).collect();
    let validation: Vec<Example> = unique.drain(..n_val.min(unique.len())).collect();
    let mut train = unique;
    let mut augmented = 0;
    if opts.augment_per_example > 0 && opts.swap_entities.len() > 1 {
        let mut extra = Vec::new();
        for e in &train {
            for from in &opts.swap_entities {
                if !(mentions(&e.input, from) && mentions(&e.output, from)) {
                    continue;
                }
                let mut others: Vec<&String> = opts.swap_entities.iter().filter(|t| *t != from).collect();
                rng.shuffle(&mut others);
                for to in others.into_iter().take(opts.augment_per_example) {
                    let copy = Example {
                        instruction: e.instruction.clone(),
                        input: swap_word(&e.input, from, to),
                        output: swap_word(&e.output, from, to),
                    };
                    if seen.insert(copy.clone()) {
                        extra.push(copy);
                    }
                }
            }
        }
        augmented = extra.len();
        train.extend(extra);
    }
    Prepared { train, validation, test, read, duplicates, augmented }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(input: &str, output: &str) -> Example {
        Example { instruction: "do".into(), input: input.into(), output: output.into() }
    }

    #[test]
    fn normalisation_folds_blanks_and_composes_unicode() {
        assert_eq!(normalize("  cafe\u{301}  \t au   lait \n  next  line "), "café au lait\nnext line");
    }

    #[test]
    fn duplicates_after_normalisation_are_dropped_and_splits_are_disjoint() {
        let mut data: Vec<Example> =
            (0..100).map(|i| ex(&format!("open door {i}"), &format!("lock d{i} unlock"))).collect();
        data.push(ex("open   door 5", "lock d5 unlock"));
        data.push(ex(" open door 7 ", "lock d7 unlock"));
        let p = prepare(data, &PrepareOptions { validation: 0.1, test: 0.1, ..Default::default() });
        assert_eq!(p.read, 102);
        assert_eq!(p.duplicates, 2);
        assert_eq!((p.train.len(), p.validation.len(), p.test.len()), (80, 10, 10));
        let train: HashSet<_> = p.train.iter().collect();
        assert!(p.test.iter().chain(&p.validation).all(|e| !train.contains(e)));
    }

    #[test]
    fn entity_swaps_change_input_and_output_together_and_only_whole_words() {
        let data = vec![
            ex("turn on the kitchen light", "light kitchen on"),
            ex("open the kitchenette", "blinds kitchenette open"),
        ];
        let opts = PrepareOptions {
            validation: 0.0,
            test: 0.0,
            swap_entities: vec!["kitchen".into(), "garage".into(), "office".into()],
            augment_per_example: 2,
            ..Default::default()
        };
        let p = prepare(data, &opts);
        assert_eq!(p.augmented, 2);
        assert!(p.train.contains(&ex("turn on the garage light", "light garage on")));
        assert!(p.train.contains(&ex("turn on the office light", "light office on")));
        assert!(!p.train.iter().any(|e| e.input.contains("garageette")));
    }
}
