//! The main command end to end on the tiny recipe: pre-train a teacher, LoRA fine-tune and
//! merge it, distil a student, prune it structurally and recover, export it, quantize it to int8 (dynamic) and int4 behind gates,
//! score every stage, stream answers from the runtime, and write report.json and report.svg.

use std::process::Command;

use edgelm_e2e::{bin, root, run};

fn answers(stage: &serde_json::Value) -> Vec<(String, String)> {
    stage["misses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["input"].as_str().unwrap().to_owned(), m["got"].as_str().unwrap().trim().to_owned()))
        .collect()
}

#[test]
fn pipeline_runs_end_to_end_on_the_tiny_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = root().join("models/tiny/recipe.toml");
    let out = run(Command::new(bin("edgelm-distill"))
        .args(["pipeline", "--quiet", "--recipe"])
        .arg(&recipe)
        .arg("-o")
        .arg(tmp.path()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pipeline failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("held-out commands through the runtime"), "{stdout}");
    assert!(stdout.contains("task completion"), "the summary table is printed: {stdout}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("report.json")).unwrap()).unwrap();
    let stages = report["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(names, ["teacher", "fine-tuned", "student", "pruned", "bundle", "int8-dynamic", "int4"]);
    // Each quantized bundle is smaller than the one before (the tokenizer and the rotary tables
    // stay, so a tiny bundle shrinks by less than its weights), was gated, and has speed figures.
    let bytes = |i: usize| stages[i]["bytes"].as_u64().unwrap();
    assert!(bytes(5) * 2 < bytes(4) && bytes(6) < bytes(5), "sizes {} {} {}", bytes(4), bytes(5), bytes(6));
    // The unpruned student was exported for its speed too.
    for s in stages[2..].iter().filter(|s| s["stage"] != "pruned") {
        assert!(s["ttft_ms"].as_f64().unwrap() > 0.0 && s["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let gates = report["gates"].as_array().unwrap();
    let gated: Vec<&str> = gates.iter().map(|g| g["stage"].as_str().unwrap()).collect();
    assert_eq!(gated, ["pruned", "int8-dynamic", "int4"]);
    assert!(gates.iter().all(|g| g["passed"] == true
        && g["max_kl"].as_f64().is_none_or(|max| g["mean_kl"].as_f64().unwrap() <= max)
        && g["perplexity"][1].as_f64().unwrap() > 1.0));
    assert_eq!((gates[0]["against"].as_str(), gates[1]["against"].as_str()), (Some("student"), Some("fp32 bundle")));
    // The smallest bundle that passed is the one shipped, with the stage summary in its manifest.
    assert!(report["shipped"].as_str().unwrap().ends_with("bundle-int4"), "{}", report["shipped"]);
    let shipped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("bundle-int4/edgelm.json")).unwrap()).unwrap();
    assert_eq!((shipped["quantization"].as_str(), shipped["weights"]["bits"].as_u64()), (Some("int4"), Some(4)));
    assert_eq!(shipped["pipeline"]["stages"][6]["stage"], "int4");
    let params = |i: usize| stages[i]["parameters"].as_u64().unwrap();
    assert!(params(2) < params(0), "the student is smaller");
    assert!(params(3) < params(2), "pruning made it smaller still");
    assert_eq!(params(3), params(4));
    let pruned: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("pruned/config.json")).unwrap()).unwrap();
    assert_eq!((pruned["num_key_value_heads"].as_u64(), pruned["head_dim"].as_u64()), (Some(1), Some(16)));
    // The bundle answers through ONNX Runtime exactly as the pruned student does in candle.
    assert_eq!(stages[3]["task_completion"], stages[4]["task_completion"]);
    assert_eq!(answers(&stages[3]), answers(&stages[4]));
    assert!(report["export_max_abs_diff"].as_f64().unwrap() < 1e-4);
    // Every training stage left a falling validation curve.
    let logs = report["training"].as_array().unwrap();
    let kinds: Vec<&str> = logs.iter().map(|l| l["stage"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["pretrain", "finetune", "distill", "recover"]);
    for l in logs {
        let vals: Vec<f64> = l["history"].as_array().unwrap().iter().filter_map(|p| p["val_loss"].as_f64()).collect();
        assert!(vals.len() >= 2, "{}: {vals:?}", l["stage"]);
        assert!(l["best_val_loss"].as_f64().unwrap() <= vals[0], "{}: {vals:?}", l["stage"]);
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let pretrain_vals: Vec<f64> =
        logs[0]["history"].as_array().unwrap().iter().filter_map(|p| p["val_loss"].as_f64()).collect();
    assert!(pretrain_vals.last().unwrap() < &(pretrain_vals[0] * 0.8), "pre-training learns: {pretrain_vals:?}");
    // The fine-tune taught the home data, scored before and after, with and without EWC.
    let ft = &report["finetune"];
    assert_eq!(
        (ft["new_examples"].as_u64(), ft["replayed"].as_u64(), ft["new_test_examples"].as_u64()),
        (Some(128), Some(32), Some(16)),
        "{ft}"
    );
    for v in [&ft["new_before"], &ft["new_after"], &ft["without_ewc"]["new"], &ft["without_ewc"]["original"]] {
        assert!((0.0..=1.0).contains(&v.as_f64().unwrap()), "{ft}");
    }
    assert_eq!(ft["original_after"], stages[1]["task_completion"]);
    assert!(tmp.path().join("finetuned-no-ewc/config.json").exists());
    assert!(stdout.contains("without EWC"), "{stdout}");
    let svg = std::fs::read_to_string(tmp.path().join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("student") && svg.contains("bundle"));
    for f in [
        "adapter/adapter_model.safetensors",
        "finetuned/config.json",
        "student/model.safetensors",
        "pruned/structured_prune_report.json",
        "bundle/edgelm.json",
    ] {
        assert!(tmp.path().join(f).exists(), "{f}");
    }

    // The bundle's manifest carries the stage summary (and still verifies: eval loads it below).
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("bundle/edgelm.json")).unwrap()).unwrap();
    let recorded = &manifest["pipeline"];
    assert_eq!(recorded["recipe"], "tiny");
    assert_eq!(recorded["stages"][4]["task_completion"], stages[4]["task_completion"]);

    // `eval` scores the bundle through the runtime the same way.
    let eval = run(Command::new(bin("edgelm-distill"))
        .args(["eval", "--json", "--examples", "16", "--recipe"])
        .arg(&recipe)
        .arg(tmp.path().join("bundle")));
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let scores: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(scores[0]["score"]["task_completion"], stages[4]["task_completion"]);
    assert_eq!(answers(&scores[0]["score"]), answers(&stages[4]));
}

#[test]
fn pipeline_without_onnx_runtime_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere/libonnxruntime.so");
    let out = run(Command::new(bin("edgelm-distill"))
        .args(["pipeline", "--quiet", "--recipe"])
        .arg(root().join("models/tiny/recipe.toml"))
        .arg("-o")
        .arg(tmp.path().join("out"))
        .arg("--ort-lib")
        .arg(&missing));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere/libonnxruntime.so"), "names the library it tried: {err}");
    assert!(!tmp.path().join("out/teacher").exists(), "nothing was trained");
}

#[test]
fn a_run_halted_as_asked_exits_cleanly_and_says_how_to_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = root().join("models/tiny/recipe.toml");
    let teacher = tmp.path().join("teacher");
    let out = run(Command::new(bin("edgelm-distill"))
        .args(["pretrain", "--quiet", "--halt-after", "2", "--recipe"])
        .arg(&recipe)
        .arg("-o")
        .arg(&teacher));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "halting is not a failure: {stderr}");
    assert!(stderr.contains("halted after step 2") && stderr.contains("--resume"), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(!teacher.join("model.safetensors").exists(), "a halted run has no checkpoint yet");
}
