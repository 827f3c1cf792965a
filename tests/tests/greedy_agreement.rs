//! Conformance: for every tiny preset (GQA, tied embeddings, Qwen2 bias, llama3 rope scaling,
//! a wide-head Mistral, a sliding window on every layer and on one, LongRoPE switching tables
//! mid-generation, Qwen3 head norms), the exported bundle run by `edgelm` gives the same greedy tokens as the
//! candle reference, in both KV cache modes, and as onnxruntime-genai; the graph passes
//! onnx.checker.

use std::process::Command;

use candle_core::Device;
use edgelm_distill::{Checkpoint, LlamaModel};
use edgelm_e2e::{bundle, checkpoint, csv, edgelm, ids, json_ok, python, root, run};

const PRESETS: [&str; 9] = [
    "tiny",
    "tiny-tied",
    "tiny-qwen2",
    "tiny-llama3",
    "tiny-mistral",
    "tiny-mistral-window",
    "tiny-qwen2-window",
    "tiny-longrope",
    "tiny-qwen3",
];
const NEW: usize = 24;

fn prompt() -> Vec<u32> {
    vec![1, 40, 97, 200, 31, 150, 77, 12, 255, 300, 5]
}

fn candle_greedy(preset: &str) -> Vec<u32> {
    candle_greedy_in(&checkpoint(preset))
}

fn candle_greedy_in(dir: &std::path::Path) -> Vec<u32> {
    let ck = Checkpoint::load(dir).unwrap();
    let _ = Device::Cpu;
    LlamaModel::new(&ck).unwrap().greedy(&prompt(), NEW, &[]).unwrap()
}

fn edgelm_greedy(preset: &str, kv: &str) -> Vec<u32> {
    edgelm_greedy_in(&bundle(preset), kv)
}

fn edgelm_greedy_in(dir: &std::path::Path, kv: &str) -> Vec<u32> {
    let n = NEW.to_string();
    let ids_csv = csv(&prompt());
    let args =
        ["run", dir.to_str().unwrap(), "--prompt-ids", &ids_csv, "--max-new-tokens", &n, "--ignore-eos", "--json"];
    let out = edgelm(&[&args[..], &["--kv-cache", kv, "--temperature", "0"]].concat());
    ids(&json_ok(&out)["generated_ids"])
}

#[test]
fn edgelm_matches_candle_in_both_cache_modes() {
    for preset in PRESETS {
        let reference = candle_greedy(preset);
        assert_eq!(reference.len(), NEW);
        for kv in ["shared", "growing"] {
            assert_eq!(edgelm_greedy(preset, kv), reference, "{preset} with the {kv} KV cache");
        }
    }
}

/// Greedy tokens of onnxruntime-genai on the bundle in `dir`.
fn genai_greedy_in(dir: &std::path::Path) -> Vec<u32> {
    let out = run(Command::new(python()).arg(root().join("tests/python/genai_generate.py")).arg(dir).args([
        "--ids",
        &csv(&prompt()),
        "--max-new-tokens",
        &NEW.to_string(),
        "--ignore-eos",
    ]));
    assert!(out.status.success(), "genai failed on {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Greedy tokens of the candle model with the end-of-sequence ids never picked: what genai
/// generates under `min_length`.
fn candle_greedy_without(preset: &str, eos: &[u32]) -> Vec<u32> {
    let ck = Checkpoint::load(checkpoint(preset)).unwrap();
    let model = LlamaModel::new(&ck).unwrap();
    let mut cache = model.new_cache();
    let (mut input, mut out) = (prompt(), Vec::new());
    while out.len() < NEW {
        let ids = candle_core::Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&ids, &mut cache).unwrap();
        let mut last: Vec<f32> = logits.squeeze(0).unwrap().get(input.len() - 1).unwrap().to_vec1().unwrap();
        for &e in eos {
            last[e as usize] = f32::NEG_INFINITY;
        }
        let next = edgelm_runtime::sampling::argmax(&last);
        out.push(next);
        input = vec![next];
    }
    out
}

/// genai keeps end-of-sequence out of reach until `min_length` (how the script ignores it),
/// where edgelm's `--ignore-eos` lets greedy pick it and goes on: the two agree up to the first
/// end-of-sequence token edgelm picks, and genai agrees with candle held back the same way all
/// the way.
#[test]
fn onnxruntime_genai_matches_edgelm() {
    for preset in PRESETS {
        let dir = bundle(preset);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("genai_config.json")).unwrap()).unwrap();
        let eos = match &config["model"]["eos_token_id"] {
            serde_json::Value::Number(n) => vec![n.as_u64().unwrap() as u32],
            list => ids(list),
        };
        let ours = edgelm_greedy(preset, "shared");
        let n = ours.iter().position(|t| eos.contains(t)).unwrap_or(ours.len());
        assert!(n >= 8, "{preset}: only {n} tokens before end-of-sequence to compare");
        let genai = genai_greedy_in(&dir);
        assert_eq!(genai[..n], ours[..n], "{preset}: genai vs edgelm");
        if n < ours.len() {
            assert_eq!(
                genai,
                candle_greedy_without(preset, &eos),
                "{preset}: genai vs candle, end-of-sequence held back"
            );
        }
    }
}

/// `edgelm-distill check` holds any bundle to a checkpoint: the LongRoPE bundle passes against
/// its own checkpoint and fails against the same weights with plain RoPE (the presets share a
/// seed and shapes, so only the rotary tables differ).
#[test]
fn check_command_tells_the_source_checkpoint_apart() {
    let check = |preset: &str| {
        run(Command::new(edgelm_e2e::bin("edgelm-distill"))
            .arg("check")
            .arg(checkpoint(preset))
            .arg(bundle("tiny-longrope"))
            .arg("--json"))
    };
    let own = check("tiny-longrope");
    assert!(own.status.success(), "{}", String::from_utf8_lossy(&own.stderr));
    let report: serde_json::Value = serde_json::from_slice(&own.stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert!(report["check"]["max_abs_diff"].as_f64().unwrap() < 1e-3);
    let other = check("tiny-mistral");
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("check failed: logits differ"), "{err}");
}

/// A low-memory export (weights read from the checkpoint as the graph needs them, spilled in
/// their stored type and quantized from there; the reference taken one layer at a time) writes
/// the same bundle as the export that loads the checkpoint: from bf16 storage, with a tied
/// table and head norms (Qwen3), and through LongRoPE's switch, whose check must see the
/// decode steps as decoding runs them.
#[test]
fn low_memory_export_writes_the_same_bundle() {
    use edgelm_distill::checkpoint::write::{write_checkpoint, WriteOptions};
    use edgelm_distill::export::{export, export_deferred, ExportOptions};
    let tmp = tempfile::tempdir().unwrap();
    for preset in ["tiny-qwen3", "tiny-longrope"] {
        // The layer-at-a-time reference is the fp32 graph's numbers, step by step.
        let (ck, index) = Checkpoint::load_deferred(checkpoint(preset)).unwrap();
        let streamed = edgelm_distill::export::ReferenceLogits::streamed(&ck.config, &index).unwrap();
        let fp32 = edgelm_distill::export::verify_against_reference(&streamed, &bundle(preset), 1e-4).unwrap();
        assert!(fp32.passed, "{preset}: {fp32:?}");
        let f32_ck = Checkpoint::load(checkpoint(preset)).unwrap();
        let bf16 = tmp.path().join(format!("{preset}-bf16"));
        let opts = WriteOptions { dtype: candle_core::DType::BF16, max_shard_bytes: None };
        write_checkpoint(&bf16, &f32_ck.config, &f32_ck.tensors, opts).unwrap();
        // int8 also with its embedding left in fp32: a spilled weight that stays unquantized.
        for (bits, embedding) in [(8, true), (4, true), (8, false)] {
            let mut q = edgelm_distill::quantize::QuantizeOptions::for_bits(bits).unwrap();
            q.embedding = embedding;
            let opts = ExportOptions { quantize: Some(q), max_kl: 5.0, ..Default::default() };
            let loaded = tmp.path().join(format!("{preset}-{bits}-{embedding}"));
            let by_loading = export(&Checkpoint::load(&bf16).unwrap(), &loaded, &opts).unwrap();
            let (ck, index) = Checkpoint::load_deferred(&bf16).unwrap();
            let deferred = tmp.path().join(format!("{preset}-{bits}-{embedding}-deferred"));
            let report = export_deferred(&ck, &index, &deferred, &opts).unwrap();
            let quantized = report.quantized.unwrap();
            let (a, b) = (&by_loading.quantized.unwrap().summary, &quantized.summary);
            assert_eq!((a.bytes_before, a.bytes_after), (b.bytes_before, b.bytes_after), "{preset} int{bits}");
            let check = quantized.verify.unwrap();
            assert!(check.mean_kl < 5.0 && check.top1_agreement > 0.0, "{preset} int{bits}: {check:?}");
            for file in ["model.onnx", "model.onnx.data"] {
                let (a, b) = (std::fs::read(loaded.join(file)).unwrap(), std::fs::read(deferred.join(file)).unwrap());
                assert!(a == b, "{preset} int{bits}: {file} differs");
            }
            assert!(!deferred.join("weights.spill").exists(), "the spill file is removed");
        }
    }
}

#[test]
fn exported_graphs_pass_onnx_checker() {
    let models: Vec<_> = PRESETS.iter().map(|p| bundle(p).join("model.onnx")).collect();
    let out = run(Command::new(python()).arg(root().join("tests/python/check_onnx.py")).args(&models));
    assert!(out.status.success(), "onnx.checker: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn all_position_logits_export_decodes_the_same() {
    use edgelm_distill::export::{export, ExportOptions, LogitsMode};
    let ck = Checkpoint::load(checkpoint("tiny-qwen2")).unwrap();
    let dir = edgelm_e2e::scratch().join("bundle-all-logits");
    export(&ck, &dir, &ExportOptions { logits: LogitsMode::All, ..ExportOptions::default() }).unwrap();
    assert_eq!(edgelm_greedy_in(&dir, "shared"), candle_greedy("tiny-qwen2"));
}

/// Weights in `model.onnx.data` beside the graph (ONNX external data, the default, and what
/// models past protobuf's 2 GiB limit need): the bundle hashes the data file, decodes as candle
/// does, and a bundle quantized from it keeps its weights apart too, without the fp32 data
/// copied along.
#[test]
fn weights_kept_beside_the_graph_decode_the_same_and_quantize() {
    use edgelm_distill::export::{export, quantize_bundle, ExportOptions};
    let ck = Checkpoint::load(checkpoint("tiny-llama3")).unwrap();
    let dir = edgelm_e2e::scratch().join("bundle-external-data");
    export(&ck, &dir, &ExportOptions::default()).unwrap();
    let m = edgelm_runtime::bundle::verify_files(&dir).unwrap();
    let data = m.files.iter().find(|f| f.path == "model.onnx.data").expect("the data file is hashed");
    let graph = m.files.iter().find(|f| f.path == "model.onnx").unwrap();
    assert!(data.bytes > 10 * graph.bytes, "weights {} vs graph {} bytes", data.bytes, graph.bytes);
    assert_eq!(edgelm_greedy_in(&dir, "shared"), candle_greedy("tiny-llama3"));
    let int8 = edgelm_e2e::scratch().join("bundle-external-data-int8");
    let opts = edgelm_distill::quantize::QuantizeOptions::for_bits(8).unwrap();
    quantize_bundle(&dir, &int8, &opts, Some(0.5)).unwrap();
    let m = edgelm_runtime::bundle::verify_files(&int8).unwrap();
    let int8_data = m.files.iter().find(|f| f.path == "model.onnx.data").expect("apart, as its source");
    assert!(int8_data.bytes < data.bytes / 2, "int8 weights {} vs fp32 {} bytes", int8_data.bytes, data.bytes);
    assert_eq!(edgelm_greedy_in(&int8, "shared").len(), NEW);
    // From a bundle written as one file, one file again.
    let one = edgelm_e2e::scratch().join("bundle-one-file");
    export(&ck, &one, &ExportOptions { external_data: false, ..ExportOptions::default() }).unwrap();
    assert!(!one.join("model.onnx.data").exists());
    let one_int8 = edgelm_e2e::scratch().join("bundle-one-file-int8");
    quantize_bundle(&one, &one_int8, &opts, Some(0.5)).unwrap();
    assert!(!one_int8.join("model.onnx.data").exists());
    // Exported straight to int8: with the flag the int8 weights are apart too, without it the
    // bundle is one file.
    let direct = edgelm_e2e::scratch().join("bundle-external-data-direct-int8");
    let opts = ExportOptions { external_data: false, quantize: Some(opts), max_kl: 0.5, ..ExportOptions::default() };
    let mut first = opts.clone();
    first.external_data = true;
    export(&ck, &direct, &first).unwrap();
    assert!(direct.join("model.onnx.data").exists(), "asked for, the quantized weights go apart too");
    export(&ck, &direct, &opts).unwrap();
    assert!(!direct.join("model.onnx.data").exists());
    assert!(edgelm_runtime::bundle::verify_files(&direct).unwrap().files.iter().all(|f| f.path != "model.onnx.data"));
}

/// A decoder in the layout Hugging Face Optimum's ONNX export writes (standard operators,
/// position_ids input, transformers' config.json and no genai_config.json; built by
/// tests/python/optimum_layout_export.py) runs in edgelm as the checkpoint runs in candle.
#[test]
fn optimum_layout_folders_run() {
    for preset in ["tiny", "tiny-mistral"] {
        let dir = edgelm_e2e::scratch().join("optimum").join(preset);
        let out = run(Command::new(python())
            .arg(root().join("tests/python/optimum_layout_export.py"))
            .arg(checkpoint(preset))
            .arg(&dir));
        assert!(out.status.success(), "{preset}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!dir.join("genai_config.json").exists());
        // Its graph appends to the cache itself: the growing cache, whatever is asked for.
        let reference = candle_greedy(preset);
        assert_eq!(edgelm_greedy_in(&dir, "shared"), reference, "{preset}");
        let text = edgelm(&["run", dir.to_str().unwrap(), "--prompt", "turn on the lamp", "--max-new-tokens", "4"]);
        assert!(text.status.success(), "{preset}: {}", String::from_utf8_lossy(&text.stderr));
        // Quantized into an edgelm bundle (a genai_config.json written for it), checked against it.
        let int8 = edgelm_e2e::scratch().join("optimum").join(format!("{preset}-int8"));
        let opts = edgelm_distill::quantize::QuantizeOptions::for_bits(8).unwrap();
        let r = edgelm_distill::export::quantize_bundle(&dir, &int8, &opts, Some(0.1)).unwrap();
        assert!(r.quantized.unwrap().verify.unwrap().mean_kl < 0.1);
        assert!(edgelm_runtime::bundle::verify_files(&int8)
            .unwrap()
            .files
            .iter()
            .any(|f| f.path == "genai_config.json"));
        assert_eq!(edgelm_greedy_in(&int8, "shared").len(), NEW);
    }
    // The one graph of a folder, whatever its name (Optimum's quantizer writes model_quantized.onnx).
    let renamed = edgelm_e2e::scratch().join("optimum").join("renamed");
    edgelm_e2e::copy_dir(&edgelm_e2e::scratch().join("optimum").join("tiny"), &renamed);
    std::fs::rename(renamed.join("model.onnx"), renamed.join("model_quantized.onnx")).unwrap();
    assert_eq!(edgelm_greedy_in(&renamed, "growing"), candle_greedy("tiny"));
    // A cache kept in fp16 is named when the model is opened.
    let half = edgelm_e2e::scratch().join("optimum").join("fp16-cache");
    let out = run(Command::new(python())
        .arg(root().join("tests/python/optimum_layout_export.py"))
        .arg(checkpoint("tiny"))
        .arg(&half)
        .arg("--fp16-cache"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = edgelm(&["run", half.to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Float16") && err.contains("fp32"), "{err}");
    // A checkpoint is not a bundle, and is told how to become one.
    let out = edgelm(&["run", checkpoint("tiny").to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("edgelm-distill export"), "{err}");
    // The older split layout is named, not misread.
    let old = edgelm_e2e::scratch().join("optimum").join("old-layout");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::copy(checkpoint("tiny").join("config.json"), old.join("config.json")).unwrap();
    std::fs::write(old.join("decoder_model_merged.onnx"), b"x").unwrap();
    let out = edgelm(&["run", old.to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("older Optimum"), "{err}");
}

/// Heads whose size ONNX Runtime's rotary attention does not take (4 as in transformers' tiny
/// test llamas, 8, 24, 72; it rotates multiples of 16) are padded inside the graph: the bundle
/// decodes as candle does in both cache modes and in onnxruntime-genai, and quantizes.
#[test]
fn heads_of_any_even_size_export_decode_and_quantize() {
    use edgelm_distill::checkpoint::preset::{preset_config, random_weights};
    use edgelm_distill::checkpoint::write::{write_checkpoint, WriteOptions};
    use edgelm_distill::export::{export, quantize_bundle, ExportOptions};
    // (preset, hidden, heads, kv heads, head_dim, tied); Qwen3 normalises each head before it
    // is padded.
    for (preset, hidden, heads, kv_heads, head_dim, tied) in [
        ("tiny", 16, 4, 2, 4, true),
        ("tiny", 64, 8, 4, 8, false),
        ("tiny", 144, 2, 1, 72, false),
        ("tiny-qwen3", 48, 4, 2, 24, true),
    ] {
        let mut cfg = preset_config(preset).unwrap();
        (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) = (hidden, heads, kv_heads);
        (cfg.head_dim, cfg.tie_word_embeddings) = (head_dim, tied);
        let name = format!("{preset}-head-dim-{head_dim}");
        let ck_dir = edgelm_e2e::scratch().join("ck").join(&name);
        write_checkpoint(&ck_dir, &cfg, &random_weights(&cfg, 3).unwrap(), WriteOptions::default()).unwrap();
        let ck = Checkpoint::load(&ck_dir).unwrap();
        assert_eq!(ck.config.head_dim, head_dim);
        let dir = edgelm_e2e::scratch().join("bundle").join(&name);
        // The export's own check compares ORT's logits with candle's over prefill and decode.
        export(&ck, &dir, &ExportOptions::default()).unwrap();
        let genai_cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("genai_config.json")).unwrap()).unwrap();
        assert_eq!(genai_cfg["model"]["decoder"]["head_size"], head_dim.div_ceil(16) * 16, "{name}");
        let reference = candle_greedy_in(&ck_dir);
        for kv in ["shared", "growing"] {
            assert_eq!(edgelm_greedy_in(&dir, kv), reference, "{name} with the {kv} KV cache");
        }
        assert_eq!(genai_greedy_in(&dir), reference, "{name}: genai vs candle");
        let int4 = edgelm_e2e::scratch().join("bundle").join(format!("{name}-int4"));
        let mut opts = edgelm_distill::quantize::QuantizeOptions::for_bits(4).unwrap();
        opts.scheme.block_size = 16;
        quantize_bundle(&dir, &int4, &opts, Some(0.5)).unwrap();
        assert_eq!(edgelm_greedy_in(&int4, "shared").len(), NEW);
    }
}

/// fp16 bundles (every internal tensor fp16, inputs and outputs fp32) of every preset load in
/// the runtime unchanged, hold half the bytes, and decode like the fp32 graph: the export's own
/// check bounds the KL of next-token distributions, and greedy decoding agrees with candle on
/// nearly every token (random weights leave near-ties that fp16 rounding may flip).
#[test]
fn fp16_bundles_decode_like_fp32() {
    use edgelm_distill::export::{export, ExportOptions};
    let tmp = tempfile::tempdir().unwrap();
    for preset in PRESETS {
        let ck = Checkpoint::load(checkpoint(preset)).unwrap();
        let mut q = edgelm_distill::quantize::QuantizeOptions::for_bits(8).unwrap();
        q.method = edgelm_distill::quantize::graph::Method::Fp16;
        let dir = tmp.path().join(preset);
        let r = export(&ck, &dir, &ExportOptions { quantize: Some(q), max_kl: 0.01, ..Default::default() }).unwrap();
        let qr = r.quantized.unwrap();
        assert!(
            (r.model_bytes as f64) < 0.55 * qr.fp32_bytes as f64,
            "{preset}: {} of {}",
            r.model_bytes,
            qr.fp32_bytes
        );
        assert!(qr.verify.unwrap().mean_kl < 0.01);
        // Qwen3's head norms compute in fp32 (their squares overflow fp16); nothing else does.
        let kept_norms = qr.summary.kept.iter().filter(|k| k.contains("_norm/")).count();
        assert_eq!(kept_norms > 0, preset == "tiny-qwen3", "{preset}: {:?}", qr.summary.kept);
        assert_eq!(kept_norms, qr.summary.kept.len(), "{preset}: {:?}", qr.summary.kept);
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("edgelm.json")).unwrap()).unwrap();
        assert_eq!(m["quantization"], "fp16");
        let reference = candle_greedy(preset);
        let got = edgelm_greedy_in(&dir, "shared");
        let same = got.iter().zip(&reference).take_while(|(a, b)| a == b).count();
        eprintln!("{preset}: fp16 greedy agrees with candle on the first {same} of {NEW} tokens");
        assert!(same >= NEW / 2, "{preset}: fp16 {got:?} vs {reference:?}");
    }
}

/// int8-dynamic with some matrices block-wise (`--blockwise`), asymmetric blocks of 32: the
/// manifest records every scheme in the bundle (the per-column matrices, the block-wise ones
/// and the untied token table, both in the asked blocks), as format version 4, and the bundle
/// decodes every token.
#[test]
fn int8_dynamic_records_the_scheme_of_every_weight() {
    let fp32 = bundle("tiny");
    let out = edgelm_e2e::scratch().join("bundle-int8-dynamic-blockwise");
    let r = run(Command::new(edgelm_e2e::bin("edgelm-distill"))
        .args(["quantize", fp32.to_str().unwrap(), "-o", out.to_str().unwrap(), "--precision", "int8-dynamic"])
        .args(["--blockwise", "down_proj", "--block-size", "32", "--asymmetric", "--max-kl", "1"]));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("edgelm.json")).unwrap()).unwrap();
    let w = &m["weights"];
    assert_eq!(
        (w["operator"].as_str(), w["bits"].as_u64(), w["block_size"].as_u64()),
        (Some("DynamicQuantizeMatMul"), Some(7), Some(0))
    );
    let blocks = serde_json::json!({"bits": 8, "block_size": 32, "symmetric": false});
    assert_eq!(w["blockwise"], serde_json::json!(["down_proj"]));
    assert_eq!(w["blockwise_scheme"], blocks);
    assert_eq!(w["embedding_table"], blocks);
    assert_eq!(m["format_version"], 4);
    let graph = std::fs::read(out.join("model.onnx")).unwrap();
    let count = |op: &str| graph.windows(op.len()).filter(|w| *w == op.as_bytes()).count();
    assert!(count("MatMulNBits") > 0 && count("GatherBlockQuantized") > 0, "the blocks are in the graph");
    assert_eq!(edgelm_greedy_in(&out, "shared").len(), NEW);
}
