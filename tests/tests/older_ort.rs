//! edgelm built for an older ONNX Runtime's C API level (`just older-ort`: the release in
//! ort-version-oldest.txt, as JetPack boards carry) loads that library and answers as the
//! pinned build does; a bundle whose quantized token table that release cannot read is
//! refused with a typed error saying how to make one it can (ONNX Runtime's message kept), not
//! a crash; a sliding window runs with the context capped at the window.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::Command;

use edgelm_e2e::{bin, bundle, csv, ids, root, run, scratch};
use edgelm_runtime::{Engine, EngineOptions, GenerateParams};

const OLDEST: &str = include_str!("../../ort-version-oldest.txt");
const PROMPT: [u32; 6] = [1, 40, 97, 200, 31, 150];

fn oldest() -> (PathBuf, PathBuf) {
    let v = OLDEST.trim();
    let exe = root().join("target/ort-api-oldest/debug/edgelm");
    let lib = root().join(format!(".ort/linux-{}/libonnxruntime.so.{v}", std::env::consts::ARCH));
    assert!(exe.exists() && lib.exists(), "build and fetch them first: just older-ort");
    (exe, lib)
}

/// `src` quantized to `out` with 4-bit matrices and an fp32 embedding (operators the older
/// release has), unless an earlier run made it.
fn int4_fp32_embedding(src: &std::path::Path, out: &std::path::Path) {
    if !out.join("edgelm.json").exists() {
        let done = run(Command::new(bin("edgelm-distill"))
            .args(["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--precision", "int4"])
            .args(["--fp32-embedding", "--max-kl", "10"]));
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    }
}

fn pinned_greedy(b: &std::path::Path) -> Vec<u32> {
    let engine = Engine::open(b, &EngineOptions::default()).unwrap();
    let p = GenerateParams::default().with_max_new_tokens(10).with_ignore_eos(true);
    engine.generate(&PROMPT, &p, |_| ControlFlow::Continue(())).unwrap().generated_ids
}

#[test]
fn a_build_for_the_oldest_api_level_runs_on_that_library() {
    let (exe, lib) = oldest();
    let minor = OLDEST.trim().split('.').nth(1).unwrap();
    let version = run(Command::new(&exe).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains(&format!("C API {minor}")));
    let fp32 = bundle("tiny");
    // 4-bit matrices with an fp32 embedding: operators the older release has.
    let int4 = scratch().join("older-ort/tiny-int4-fp32-embedding");
    int4_fp32_embedding(&fp32, &int4);
    for b in [&fp32, &int4] {
        let out = run(Command::new(&exe)
            .arg("--ort-lib")
            .arg(&lib)
            .args(["run", b.to_str().unwrap(), "--prompt-ids", &csv(&PROMPT), "--max-new-tokens", "10"])
            .args(["--ignore-eos", "--json"]));
        assert!(out.status.success(), "{}: {}", b.display(), String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&json["generated_ids"]), pinned_greedy(b), "{}", b.display());
    }
    // A quantized token table (GatherBlockQuantized with `bits`): refused with the way out.
    let table = scratch().join("older-ort/tiny-int4-quantized-table");
    if !table.join("edgelm.json").exists() {
        let done = run(Command::new(bin("edgelm-distill"))
            .args(["quantize", fp32.to_str().unwrap(), "-o", table.to_str().unwrap(), "--precision", "int4"])
            .args(["--max-kl", "10"]));
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    }
    let out = run(Command::new(&exe).arg("--ort-lib").arg(&lib).args([
        "run",
        table.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--fp32-embedding") && err.contains("GatherBlockQuantized"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A sliding attention window: that release's GroupQueryAttention lets each position see
    // one more than the model's window of 8, so the context is capped at the window, where
    // nothing changes. An edgelm bundle names its window; a folder without edgelm.json (as
    // onnxruntime-genai builds them) has it read from the graph.
    let windowed = bundle("tiny-mistral-window");
    let foreign = scratch().join("older-ort/window-without-manifest");
    edgelm_e2e::copy_dir(&windowed, &foreign);
    std::fs::remove_file(foreign.join("edgelm.json")).unwrap();
    // Quantized from such a folder, the bundle's manifest does not name the window either.
    let quantized = scratch().join("older-ort/window-quantized-from-foreign");
    int4_fp32_embedding(&foreign, &quantized);
    let pinned = pinned_greedy(&windowed);
    assert_eq!(pinned.len(), 10, "the pinned release runs the whole context");
    let pinned_quantized = pinned_greedy(&quantized);
    for (b, pinned) in [(&windowed, &pinned), (&foreign, &pinned), (&quantized, &pinned_quantized)] {
        let out = run(Command::new(&exe).arg("--ort-lib").arg(&lib).args([
            "run",
            b.to_str().unwrap(),
            "--prompt-ids",
            &csv(&PROMPT),
            "--max-new-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {err}", b.display());
        assert!(err.contains("capped at the window, 8 positions"), "{}: {err}", b.display());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // 6 prompt tokens and 2 fed back fill the 8 positions (a third token comes from the
        // last of them), and they are the model's.
        assert_eq!(ids(&json["generated_ids"]), pinned[..3], "{}", b.display());
    }
    // The pinned build cannot use the older library: a typed error, no crash.
    let out = run(Command::new(bin("edgelm")).arg("--ort-lib").arg(&lib).args([
        "run",
        fp32.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be loaded"));
}
