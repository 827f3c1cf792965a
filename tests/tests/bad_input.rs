//! Bad input gets a typed error with a clear message, never a panic or a wrong answer.

use edgelm_e2e::{bundle, checkpoint, copy_dir, edgelm, scratch};
use edgelm_runtime::{Engine, EngineOptions, Error, GenerateParams};
use std::ops::ControlFlow;

fn fails_with(args: &[&str], needle: &str) {
    let out = edgelm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected failure for {args:?}, stderr: {err}");
    assert!(err.contains(needle), "stderr of {args:?} lacks `{needle}`: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
}

#[test]
fn changed_byte_is_a_hash_mismatch() {
    let dir = scratch().join("bad/changed");
    // In the graph, and in the weights beside it.
    for file in ["model.onnx", "model.onnx.data"] {
        copy_dir(&bundle("tiny"), &dir);
        let model = dir.join(file);
        let mut bytes = std::fs::read(&model).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&model, bytes).unwrap();
        match Engine::open(&dir, &EngineOptions::default()) {
            Err(Error::HashMismatch { path, .. }) => assert!(path.ends_with(file)),
            other => panic!("expected HashMismatch in {file}, got {:?}", other.err()),
        }
        fails_with(&["run", dir.to_str().unwrap(), "--prompt-ids", "1,2"], "is corrupt");
    }
}

#[test]
fn a_file_changed_after_its_hash_was_recorded_is_hashed_again() {
    let dir = scratch().join("bad/recorded");
    copy_dir(&bundle("tiny"), &dir);
    let cache = scratch().join("bad/recorded-cache");
    let run = || {
        let mut cmd = std::process::Command::new(edgelm_e2e::bin("edgelm"));
        cmd.args(["run", dir.to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "2"]);
        edgelm_e2e::run(cmd.env("EDGELM_CACHE_DIR", &cache).env_remove("EDGELM_VERIFY"))
    };
    // Files changed in the last two seconds are not recorded; let the copy settle.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(run().status.success());
    let record = std::fs::read_to_string(cache.join("verified-files.json")).expect("checked files recorded");
    let model = dir.join("model.onnx").canonicalize().unwrap();
    assert!(record.contains(model.to_str().unwrap()), "{record}");
    assert!(run().status.success(), "opens again from the record");
    // One byte changed, size and modification time put back: the change time still moved.
    let modified = std::fs::metadata(&model).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    std::fs::File::options().write(true).open(&model).unwrap().set_modified(modified).unwrap();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is corrupt"), "{err}");
}

#[test]
fn truncated_model_is_refused_with_or_without_manifest() {
    let dir = scratch().join("bad/truncated");
    copy_dir(&bundle("tiny"), &dir);
    let model = dir.join("model.onnx");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    fails_with(&["run", dir.to_str().unwrap(), "--prompt-ids", "1,2"], "truncated or replaced");
    // Without edgelm.json (a genai-style folder) the hash check cannot catch it; ONNX
    // Runtime's parse error must come back as an error all the same.
    std::fs::remove_file(dir.join("edgelm.json")).unwrap();
    match Engine::open(&dir, &EngineOptions::default()) {
        Err(Error::Ort(_)) => {}
        other => panic!("expected an ONNX Runtime error, got {:?}", other.err()),
    }
}

#[test]
fn missing_tokenizer_file_and_tokenizerless_bundle() {
    let dir = scratch().join("bad/no-tokenizer-file");
    copy_dir(&bundle("tiny"), &dir);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    fails_with(&["run", dir.to_str().unwrap(), "--prompt", "hi"], "tokenizer.json` listed in edgelm.json is missing");

    // A checkpoint exported without a tokenizer gives an ids-only bundle.
    let ck = scratch().join("bad/ck-no-tok");
    copy_dir(&checkpoint("tiny"), &ck);
    std::fs::remove_file(ck.join("tokenizer.json")).unwrap();
    let loaded = edgelm_distill::Checkpoint::load(&ck).unwrap();
    let out = scratch().join("bad/bundle-no-tok");
    let report = edgelm_distill::export::export(&loaded, &out, &Default::default()).unwrap();
    assert!(report.warnings.iter().any(|w| w.contains("token ids only")));
    fails_with(&["run", out.to_str().unwrap(), "--prompt", "hi"], "no tokenizer.json");
    let ok = edgelm(&["run", out.to_str().unwrap(), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn prompt_errors() {
    let b = bundle("tiny");
    let b = b.to_str().unwrap();
    // tiny has a context of 256 tokens.
    let long: Vec<String> = (0..300).map(|i| (3 + i % 300).to_string()).collect();
    fails_with(&["run", b, "--prompt-ids", &long.join(",")], "does not fit the context");
    fails_with(&["run", b, "--prompt", ""], "prompt is empty");
    fails_with(&["run", b, "--prompt-ids", "1,99999"], "outside the vocabulary");

    let engine = Engine::open(b, &EngineOptions::default()).unwrap();
    let p = GenerateParams::default();
    assert!(matches!(engine.generate(&[], &p, |_| ControlFlow::Continue(())), Err(Error::InvalidRequest(_))));
    assert!(matches!(
        engine.generate(&[5, 384], &p, |_| ControlFlow::Continue(())),
        Err(Error::TokenOutOfRange { id: 384, vocab: 384 })
    ));
    // The engine is still usable after refusing requests.
    let g = engine
        .generate(&[5, 6, 7], &p.clone().with_max_new_tokens(3).with_ignore_eos(true), |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(g.generated_ids.len(), 3);
}

#[test]
fn missing_ort_library_names_where_it_looked() {
    fails_with(
        &["--ort-lib", "/nonexistent/libonnxruntime.so", "run", bundle("tiny").to_str().unwrap(), "--prompt-ids", "1"],
        "/nonexistent/libonnxruntime.so does not exist",
    );
}

#[test]
fn board_profiles_apply_and_bad_ones_are_refused() {
    let b = bundle("tiny");
    let board = edgelm_e2e::root().join("boards/x86_64-linux.toml");
    let out = edgelm(&[
        "--board",
        board.to_str().unwrap(),
        "run",
        b.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = scratch().join("bad-board.toml");
    std::fs::write(&bad, "name = 'x'\n").unwrap();
    fails_with(
        &["--board", bad.to_str().unwrap(), "run", b.to_str().unwrap(), "--prompt-ids", "1"],
        "not a valid board profile",
    );
}

#[test]
fn a_damaged_manifest_is_a_bad_bundle_whether_bytes_or_json_broke() {
    let b = bundle("tiny");
    let manifest = std::fs::read(b.join("edgelm.json")).unwrap();
    let mut flipped = manifest.clone();
    let at = flipped.iter().position(|&c| c == b'c').expect("a letter to damage");
    flipped[at] = 0xFF; // no longer UTF-8
    let half = manifest[..manifest.len() / 2].to_vec();
    for (name, bytes) in [("not-utf8", flipped), ("half", half)] {
        let dir = scratch().join(format!("bad/manifest-{name}"));
        copy_dir(&b, &dir);
        std::fs::write(dir.join("edgelm.json"), bytes).unwrap();
        match Engine::open(&dir, &EngineOptions::default()) {
            Err(Error::Bundle { path, what }) => {
                assert!(path.ends_with("edgelm.json"), "{name}: {}", path.display());
                assert!(what.contains("damaged"), "{name}: {what}");
            }
            other => panic!("{name}: expected a Bundle error, got {:?}", other.err()),
        }
        fails_with(&["run", dir.to_str().unwrap(), "--prompt-ids", "1,2"], "is damaged");
    }
}

#[test]
fn a_closed_stdout_ends_every_binary_quietly() {
    use std::process::{Command, Stdio};
    let enc = edgelm_e2e::minilm_bundle();
    let runs: [(std::path::PathBuf, Vec<String>); 2] = [
        (
            edgelm_e2e::bin("edgelm"),
            vec!["embed".into(), enc.display().to_string(), "--text".into(), "hi".into(), "--json".into()],
        ),
        (edgelm_e2e::bin("edgelm-distill"), vec!["presets".into()]),
    ];
    for (exe, args) in runs {
        let mut child = Command::new(&exe).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // Close the reading end before the program prints, as `| head -c 0` would: its
        // first write meets a closed pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{exe:?} {args:?}: {err}");
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{exe:?} {args:?} ended with {:?}: {err}",
            out.status
        );
    }
}

#[test]
fn a_checkpoint_the_graph_cannot_express_is_refused_before_anything_is_written() {
    use edgelm_distill::checkpoint::preset::{preset_config, random_weights};
    use edgelm_distill::checkpoint::write::{write_checkpoint, WriteOptions};
    use edgelm_distill::export::{export, ExportOptions};
    // A config.json that does not describe its weights (an MLP wider than the tensors).
    let cfg = preset_config("tiny-mistral").unwrap();
    let ck_dir = scratch().join("bad/misdescribed");
    write_checkpoint(&ck_dir, &cfg, &random_weights(&cfg, 0).unwrap(), WriteOptions::default()).unwrap();
    let config_path = ck_dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(cfg.intermediate_size + 8);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let ck = edgelm_distill::Checkpoint::load(&ck_dir).unwrap();
    let out = scratch().join("bad/misdescribed-bundle");
    let err = export(&ck, &out, &ExportOptions::default()).unwrap_err().to_string();
    assert!(err.contains("mlp.gate_proj.weight") && err.contains("expected"), "{err}");
    assert!(!out.exists(), "a refused export left {} behind", out.display());
}

#[test]
fn a_failed_quantization_leaves_the_bundle_it_would_have_replaced() {
    use edgelm_e2e::{bin, run};
    use std::process::Command;
    let fp32 = bundle("tiny");
    let parent = scratch().join("bad/replace");
    let out = parent.join("tiny-int8");
    let quantize = |precision: &str, max_kl: &str| {
        run(Command::new(bin("edgelm-distill"))
            .args(["quantize", fp32.to_str().unwrap(), "-o", out.to_str().unwrap(), "--precision", precision])
            .args(["--max-kl", max_kl]))
    };
    let first = quantize("int8", "10");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let model = std::fs::read(out.join("model.onnx")).unwrap();
    // int4 cannot come within 1e-9 nats of fp32: the check fails after the whole bundle was written.
    let failed = quantize("int4", "1e-9");
    let err = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(err.contains("too far from the fp32 model"), "{err}");
    assert_eq!(std::fs::read(out.join("model.onnx")).unwrap(), model, "the int8 bundle was overwritten");
    let m = edgelm_runtime::bundle::verify_files(&out).unwrap();
    assert_eq!(m.quantization, edgelm_runtime::bundle::Precision::Int8);
    let left: Vec<_> = std::fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("tiny-int8")], "files left beside the bundle");
    let ran = edgelm(&["run", out.to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "2"]);
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
}

/// A bundle quantized into its own folder, or into a folder that holds it, would replace the
/// fp32 source the quantization reads (and any other precision needs again): refused before
/// anything is written, the source intact and still running.
#[test]
fn quantizing_a_bundle_over_itself_is_refused_and_the_source_kept() {
    use edgelm_e2e::{bin, run};
    use std::process::Command;
    let parent = scratch().join("bad/in-place");
    let _ = std::fs::remove_dir_all(&parent);
    let fp32 = parent.join("tiny");
    copy_dir(&bundle("tiny"), &fp32);
    let before = std::fs::read(fp32.join("model.onnx")).unwrap();
    for out in [fp32.clone(), fp32.join("."), parent.clone()] {
        let r = run(Command::new(bin("edgelm-distill")).args([
            "quantize",
            fp32.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--precision",
            "int4",
        ]));
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{}: {err}", out.display());
        assert!(err.contains("the bundle is made from") && err.contains("nothing was changed"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(std::fs::read(fp32.join("model.onnx")).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("tiny")], "files left beside the bundle");
    let m = edgelm_runtime::bundle::verify_files(&fp32).unwrap();
    assert_eq!(m.quantization, edgelm_runtime::bundle::Precision::Fp32);
    // A checkpoint exported into its own folder (one that also holds a bundle, so the folder
    // would otherwise be taken as one to replace): refused, the checkpoint kept.
    let ck = parent.join("ck");
    copy_dir(&checkpoint("tiny"), &ck);
    std::fs::copy(fp32.join("edgelm.json"), ck.join("edgelm.json")).unwrap();
    let config = std::fs::read(ck.join("config.json")).unwrap();
    let r = run(Command::new(bin("edgelm-distill")).args(["export", ck.to_str().unwrap(), "-o", ck.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("the bundle is made from"), "{err}");
    assert_eq!(std::fs::read(ck.join("config.json")).unwrap(), config);
}

/// A quantization flag the chosen precision would ignore is refused by name, before any
/// work: the bundle would not be what the command line asked for.
#[test]
fn a_flag_the_precision_ignores_is_refused() {
    use edgelm_e2e::{bin, run};
    use std::process::Command;
    let fp32 = bundle("tiny");
    let out = scratch().join("bad/unused-flag");
    for (flags, needle) in [
        (&["--precision", "fp16", "--block-size", "32"][..], "--block-size does nothing with --precision fp16"),
        (&["--precision", "int4", "--full-range"][..], "--full-range does nothing with --precision int4"),
        (&["--precision", "int8", "--smooth", "0.5"][..], "--smooth does nothing with --precision int8"),
        (&["--precision", "int8-dynamic", "--accuracy-level", "1"][..], "--accuracy-level does nothing"),
        (&["--precision", "int4", "--embedding-block-size", "64"][..], "--embedding-bits"),
        (&["--precision", "fp32"][..], "leaves nothing to quantize"),
        (&["--precision", "int4", "--max-kl", "1", "--no-verify"][..], "--no-verify skips the check"),
        (&["--precision", "int4", "--calibration", "Cargo.toml"][..], "--calibration does nothing"),
        (&["--precision", "int8-dynamic", "--fp32-embedding", "--block-size", "64"][..], "--block-size does nothing"),
    ] {
        let r = run(Command::new(bin("edgelm-distill"))
            .args(["quantize", fp32.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .args(flags));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{flags:?} was accepted");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?} wrote {}", out.display());
    }
    // The same flag where it does something is taken.
    let r = run(Command::new(bin("edgelm-distill"))
        .args(["quantize", fp32.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--precision", "int4", "--block-size", "64", "--max-kl", "10"]));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = edgelm_runtime::bundle::verify_files(&out).unwrap();
    assert_eq!(m.weights.map(|w| (w.bits, w.block_size)), Some((4, 64)));
}
