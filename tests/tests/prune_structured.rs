//! `edgelm-distill prune-structured` alone, as a user runs it on a checkpoint: the matrices
//! shrink by the asked shares, a short recovery runs, the report says what was cut, the pruned
//! checkpoint exports and generates, and impossible shares are refused with the flag named.

use std::process::Command;

use edgelm_e2e::{bin, checkpoint, edgelm, root, run, scratch};

fn prune(args: &[&str]) -> std::process::Output {
    run(Command::new(bin("edgelm-distill")).arg("prune-structured").args(args))
}

#[test]
fn prune_structured_shrinks_recovers_and_exports() {
    let ck = checkpoint("tiny");
    let dir = scratch().join("prune-structured");
    let (out, bundle) = (dir.join("pruned"), dir.join("bundle"));
    let _ = std::fs::remove_dir_all(&dir);
    let recipe = root().join("models/tiny/recipe.toml");
    let o = prune(&[
        ck.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--mlp",
        "0.25",
        "--heads",
        "0",
        "--query-heads",
        "0.5",
        "--calibration",
        "32",
        "--recover",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read =
        |p: std::path::PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let (before, after) = (read(ck.join("config.json")), read(out.join("config.json")));
    // 160 MLP units -> 120; 4 query heads in 2 KV groups -> 2 in 2.
    assert_eq!(before["intermediate_size"], 160);
    assert_eq!(after["intermediate_size"], 120);
    assert_eq!((after["num_attention_heads"].as_u64(), after["num_key_value_heads"].as_u64()), (Some(2), Some(2)));
    let report = read(out.join("structured_prune_report.json"));
    let text = report.to_string();
    assert!(text.contains("120") && text.contains("160"), "the report names the widths: {text}");
    assert!(out.join("tokenizer.json").exists(), "the tokenizer travels with the checkpoint");
    // The recovery left a training log with validation points.
    let log = std::fs::read_to_string(out.join("train_log.json"))
        .or_else(|_| std::fs::read_to_string(dir.join("pruned.run/train_log.json")))
        .unwrap_or_default();
    assert!(log.contains("val_loss"), "recovery ran: {log}");

    let o = run(Command::new(bin("edgelm-distill")).args([
        "export",
        out.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = edgelm(&["run", bundle.to_str().unwrap(), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));

    // A share outside [0, 1) is refused before any work, naming the flag's setting.
    let bad = prune(&[
        ck.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        dir.join("bad").to_str().unwrap(),
        "--mlp",
        "1.5",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("mlp") || err.contains("MLP"), "{err}");
    assert!(!dir.join("bad/config.json").exists());
}
