//! A tokenizer trained on the built-in task: special tokens first, exact round trips, and a
//! vocabulary that actually compresses the task's text.

use edgelm_distill::checkpoint::preset::{train_tokenizer, SPECIAL_TOKENS};
use edgelm_distill::data::task;

#[test]
fn trained_tokenizer_round_trips_and_compresses_the_task() {
    let s = task::generate(0, 3000);
    let texts: Vec<&str> = s.train.iter().flat_map(|e| [e.input.as_str(), e.output.as_str()]).collect();
    let tok = train_tokenizer(texts.into_iter(), 800).unwrap();
    for (i, sp) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(sp), Some(i as u32));
    }
    let (mut chars, mut tokens) = (0usize, 0usize);
    for e in &s.test {
        for text in [&e.input, &e.output] {
            let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(&tok.decode(&ids, false).unwrap(), text, "exact round trip");
            chars += text.len();
            tokens += ids.len();
        }
    }
    let ratio = chars as f64 / tokens as f64;
    assert!(ratio > 2.5, "about {ratio:.2} characters per token on held-out text");
}
