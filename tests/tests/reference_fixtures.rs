//! Agreement with the Python reference implementations, through committed fixtures made by
//! `tests/fixtures/make_fixtures.py`: checkpoints saved by transformers (with its own logits and
//! greedy tokens) and models built by onnxruntime-genai's builder (fp32, int8 and int4
//! MatMulNBits, with genai's greedy tokens).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use edgelm_distill::export::{export, ExportOptions};
use edgelm_distill::{Checkpoint, LlamaModel};
use edgelm_e2e::{csv, edgelm, ids, json_ok, root, scratch};

fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn edgelm_greedy(dir: &std::path::Path, prompt: &[u32], n: usize, kv: &str) -> Vec<u32> {
    let out = edgelm(&[
        "run",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &csv(prompt),
        "--max-new-tokens",
        &n.to_string(),
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
        "--kv-cache",
        kv,
    ]);
    ids(&json_ok(&out)["generated_ids"])
}

#[test]
fn transformers_checkpoints_match_candle_and_the_exported_bundle() {
    let e = expected();
    let prompt = ids(&e["prompt_ids"]);
    let n = e["new_tokens"].as_u64().unwrap() as usize;
    for (name, m) in e["models"].as_object().unwrap() {
        let ck = Checkpoint::load(fixtures().join("hf").join(name)).unwrap();
        let model = LlamaModel::new(&ck).unwrap();
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, &mut model.new_cache()).unwrap();
        let last: Vec<f32> = logits.squeeze(0).unwrap().get(prompt.len() - 1).unwrap().to_vec1().unwrap();
        let reference: Vec<f32> =
            m["last_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let diff = edgelm_distill::export::max_abs_diff(&last, &reference);
        assert!(diff < 1e-4, "{name}: candle vs transformers logits differ by {diff}");
        let greedy = ids(&m["transformers_greedy"]);
        assert_eq!(model.greedy(&prompt, n, &[]).unwrap(), greedy, "{name}: candle greedy");

        let bundle = scratch().join("hf-bundles").join(name);
        export(&ck, &bundle, &ExportOptions::default()).unwrap();
        assert_eq!(edgelm_greedy(&bundle, &prompt, n, "shared"), greedy, "{name}: edgelm greedy");
    }
}

#[test]
fn genai_builder_models_reproduce_genai_greedy_tokens() {
    let e = expected();
    let prompt = ids(&e["prompt_ids"]);
    let n = e["new_tokens"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (name, m) in e["models"].as_object().unwrap() {
        for (prec, want) in m["genai_greedy"].as_object().unwrap() {
            let dir = fixtures().join("genai").join(format!("{name}-{prec}"));
            let want = ids(want);
            for kv in ["shared", "growing"] {
                assert_eq!(edgelm_greedy(&dir, &prompt, n, kv), want, "{name}-{prec} ({kv} KV cache)");
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "fp32, int8 and int4 builds are all covered");
}

#[test]
fn genai_folder_takes_text_prompts_with_its_tokenizer() {
    let dir = fixtures().join("genai/llama-gqa-int4");
    let out = json_ok(&edgelm(&[
        "run",
        dir.to_str().unwrap(),
        "--prompt",
        "Open the garage door",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(ids(&out["generated_ids"]).len(), 5);
    assert!(ids(&out["prompt_ids"]).len() >= 3, "the prompt was tokenized");
}

#[test]
fn add_bos_token_from_tokenizer_config_is_honoured() {
    // The fixture tokenizer's post-processor adds nothing; tokenizer_config.json decides.
    let prompt_ids = |add_bos: bool| {
        let dir = scratch().join(format!("add-bos-{add_bos}"));
        edgelm_e2e::copy_dir(&fixtures().join("genai/llama-gqa-fp32"), &dir);
        let cfg_path = dir.join("tokenizer_config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["add_bos_token"] = add_bos.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let out = edgelm(&[
            "run",
            dir.to_str().unwrap(),
            "--prompt",
            "Open the door",
            "--raw",
            "--max-new-tokens",
            "1",
            "--json",
        ]);
        ids(&json_ok(&out)["prompt_ids"])
    };
    let with = prompt_ids(true);
    let without = prompt_ids(false);
    assert_eq!(with[0], 1, "BOS (id 1 in genai_config.json) is prepended");
    assert_eq!(&with[1..], without.as_slice());
    assert_ne!(without[0], 1);
}

/// A folder built by genai's model builder in fp32 quantizes into an edgelm bundle (its files
/// copied, the result checked against it); one genai quantized already is refused.
#[test]
fn genai_fp32_folders_quantize_and_quantized_ones_are_refused() {
    use edgelm_distill::export::quantize_bundle;
    use edgelm_distill::quantize::QuantizeOptions;
    let src = fixtures().join("genai/llama-gqa-fp32");
    let out = scratch().join("genai-quantized-int4");
    let r = quantize_bundle(&src, &out, &QuantizeOptions::for_bits(4).unwrap(), Some(1.0)).unwrap();
    let q = r.quantized.unwrap();
    assert!(q.verify.unwrap().mean_kl < 1.0);
    assert!(r.model_bytes < q.fp32_bytes / 3, "{} of {}", r.model_bytes, q.fp32_bytes);
    let m = edgelm_runtime::bundle::verify_files(&out).unwrap();
    for f in ["genai_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(m.files.iter().any(|e| e.path == f), "{f} is carried over");
    }
    assert_eq!(m.quantization, edgelm_runtime::bundle::Precision::Int4);
    let e = expected();
    assert_eq!(edgelm_greedy(&out, &ids(&e["prompt_ids"]), 4, "shared").len(), 4);
    // A folder of symlinks (how a Hugging Face cache snapshot holds its files) quantizes alike.
    let linked = scratch().join("genai-linked");
    std::fs::create_dir_all(&linked).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path().canonicalize().unwrap(), linked.join(e.file_name())).unwrap();
    }
    let out_linked = scratch().join("genai-linked-int4");
    quantize_bundle(&linked, &out_linked, &QuantizeOptions::for_bits(4).unwrap(), Some(1.0)).unwrap();
    let copied: Vec<String> =
        edgelm_runtime::bundle::verify_files(&out_linked).unwrap().files.into_iter().map(|f| f.path).collect();
    assert_eq!(copied, m.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>());
    let again = scratch().join("genai-quantized-twice");
    let err =
        quantize_bundle(&fixtures().join("genai/llama-gqa-int4"), &again, &QuantizeOptions::for_bits(8).unwrap(), None)
            .unwrap_err()
            .to_string();
    assert!(err.contains("quantized already") && err.contains("MatMulNBits"), "{err}");
    assert!(!again.exists());
}
