//! Sampling through the whole stack: top-k 1 is greedy, a seed repeats, seeds differ, and
//! streamed text is whole UTF-8 that adds up to the final text.

use edgelm_e2e::{bundle, edgelm, ids, json_ok};

fn generate(extra: &[&str]) -> serde_json::Value {
    let b = bundle("tiny-tied");
    let mut args = vec![
        "run",
        b.to_str().unwrap(),
        "--prompt",
        "Set the kitchen heater to 21.5 degrees at 7pm",
        "--max-new-tokens",
        "32",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    json_ok(&edgelm(&args))
}

#[test]
fn top_k_one_is_greedy() {
    let greedy = ids(&generate(&["--temperature", "0"])["generated_ids"]);
    let top1 = ids(&generate(&["--temperature", "1.0", "--top-k", "1", "--seed", "9"])["generated_ids"]);
    assert_eq!(greedy, top1);
}

#[test]
fn a_seed_repeats_and_seeds_differ() {
    let run =
        |seed: &str| ids(&generate(&["--temperature", "1.5", "--top-p", "0.95", "--seed", seed])["generated_ids"]);
    let a = run("1");
    assert_eq!(a, run("1"), "same seed, same tokens");
    let others: Vec<_> = ["2", "3", "4"].iter().map(|s| run(s)).collect();
    assert!(others.iter().any(|o| o != &a), "different seeds should sample differently");
}

#[test]
fn streamed_text_is_valid_utf8_and_equals_the_final_text() {
    let b = bundle("tiny-tied");
    let args = [
        "run",
        b.to_str().unwrap(),
        "--prompt",
        "温度は二十一度です。 Le café est prêt.",
        "--max-new-tokens",
        "48",
        "--ignore-eos",
        "--temperature",
        "1.2",
        "--seed",
        "5",
    ];
    let streamed = edgelm(&args);
    assert!(streamed.status.success());
    let text = String::from_utf8(streamed.stdout).expect("stdout is valid UTF-8");
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let full = generate_json(&json_args);
    // The CLI ends the stream with one newline.
    assert_eq!(text.strip_suffix('\n').unwrap(), full["text"].as_str().unwrap());
}

fn generate_json(args: &[&str]) -> serde_json::Value {
    json_ok(&edgelm(args))
}

#[test]
fn stop_string_ends_generation_before_it() {
    let free = generate(&["--temperature", "0"]);
    let text = free["text"].as_str().unwrap().to_owned();
    // Pick a stop string from the middle of the free-running text.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "need some text: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let stopped = generate(&["--temperature", "0", "--stop", &stop]);
    let t = stopped["text"].as_str().unwrap();
    assert_eq!(stopped["stop_reason"], "stop_string");
    assert!(text.starts_with(t), "{t:?} is a prefix of {text:?}");
    assert!(!t.contains(&stop));
}

#[test]
fn chat_applies_the_checkpoint_template() {
    use edgelm_runtime::{Engine, EngineOptions};
    let b = bundle("tiny");
    let engine = Engine::open(&b, &EngineOptions::default()).unwrap();
    let codec = engine.codec().unwrap();
    let msgs = vec![edgelm_runtime::ChatMessage::user("Open the garage door")];
    let rendered = codec.apply_chat_template(&msgs).unwrap();
    assert_eq!(rendered, "<|im_start|>user\nOpen the garage door<|im_end|>\n<|im_start|>assistant\n");
    let ids = engine.encode_chat(&msgs).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is a special token with id 1");

    // The chat command reads turns from stdin and streams an answer per turn.
    let mut child = std::process::Command::new(edgelm_e2e::bin("edgelm"))
        .args(["chat", b.to_str().unwrap(), "--max-new-tokens", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"Open the garage door\nAnd close it\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A prompt marker before each turn and after the last one: both turns were answered.
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches("> ").count(), 3);
    assert!(String::from_utf8(out.stdout).unwrap().ends_with('\n'));
}
