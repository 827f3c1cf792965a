//! Checkpoint storage variants load to the same model: sharded with an index, f16 and bf16
//! weights, and transformers 5's `rope_parameters` spelling; LongRoPE switches as transformers
//! does.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use edgelm_distill::checkpoint::preset::{preset_config, random_weights};
use edgelm_distill::checkpoint::write::{write_checkpoint, WriteOptions};
use edgelm_distill::{Checkpoint, LlamaModel};

fn logits(ck: &Checkpoint) -> Vec<f32> {
    let model = LlamaModel::new(ck).unwrap();
    let ids = Tensor::new(&[[1u32, 50, 60, 70]], &candle_core::Device::Cpu).unwrap();
    model.forward(&ids, &mut model.new_cache()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn rounded(w: &HashMap<String, Tensor>, dt: DType) -> HashMap<String, Tensor> {
    w.iter().map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap())).collect()
}

#[test]
fn sharded_and_half_precision_checkpoints_load_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = preset_config("tiny-qwen2").unwrap();
    let w = random_weights(&cfg, 3).unwrap();
    let single = tmp.path().join("single");
    write_checkpoint(&single, &cfg, &w, WriteOptions::default()).unwrap();
    let sharded = tmp.path().join("sharded");
    write_checkpoint(&sharded, &cfg, &w, WriteOptions { dtype: DType::F32, max_shard_bytes: Some(100_000) }).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(
        std::fs::read_dir(&sharded)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"))
            .count()
            > 2
    );
    let a = Checkpoint::load(&single).unwrap();
    let b = Checkpoint::load(&sharded).unwrap();
    assert_eq!(logits(&a), logits(&b));

    for dt in [DType::F16, DType::BF16] {
        let dir = tmp.path().join(format!("{dt:?}"));
        write_checkpoint(&dir, &cfg, &w, WriteOptions { dtype: dt, max_shard_bytes: None }).unwrap();
        let half = Checkpoint::load(&dir).unwrap();
        let q = half.tensors["model.layers.0.self_attn.q_proj.weight"].clone();
        assert_eq!(q.dtype(), DType::F32, "half weights are widened on load");
        let expect = rounded(&w, dt);
        let diff = (q - &expect["model.layers.0.self_attn.q_proj.weight"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{dt:?} weights load exactly");
    }
}

#[test]
fn rope_parameters_spelling_gives_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = preset_config("tiny-llama3").unwrap();
    let w = random_weights(&cfg, 1).unwrap();
    let dir = tmp.path().join("ck");
    write_checkpoint(&dir, &cfg, &w, WriteOptions::default()).unwrap();
    let old = Checkpoint::load(&dir).unwrap();
    // Rewrite config.json the way transformers 5 does.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    let mut rp = o.remove("rope_scaling").unwrap();
    rp["rope_theta"] = o.remove("rope_theta").unwrap();
    o.insert("rope_parameters".into(), rp);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let new = Checkpoint::load(&dir).unwrap();
    assert_eq!(old.config, new.config);
    assert_eq!(logits(&old), logits(&new));
}

/// Logits of position 8 after one forward pass over `len` tokens.
fn logits_at_8(ck: &Checkpoint, len: usize) -> Vec<f32> {
    let model = LlamaModel::new(ck).unwrap();
    let ids: Vec<u32> = (0..len as u32).map(|i| 3 + i * 7).collect();
    let ids = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&ids, &mut model.new_cache()).unwrap();
    logits.squeeze(0).unwrap().get(8).unwrap().to_vec1().unwrap()
}

/// LongRoPE's long factors apply to a whole forward pass once its sequence is longer than the
/// original context (16 positions in the preset), as transformers switches them; shorter passes
/// keep the short factors. A model whose long factors equal its short ones never changes.
#[test]
fn longrope_switches_to_its_long_factors_past_the_original_context() {
    use edgelm_distill::checkpoint::{RopeConfig, RopeScaling};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = preset_config("tiny-longrope").unwrap();
    let w = random_weights(&cfg, 5).unwrap();
    let ck = write_and_load(&tmp.path().join("longrope"), &cfg, &w);
    assert_eq!(ck.config, cfg, "LongRoPE round-trips through config.json");
    let RopeScaling::LongRope { short_factor, original_max_position_embeddings, attention_factor, .. } =
        cfg.rope.scaling.clone()
    else {
        panic!("the preset uses LongRoPE")
    };
    let same = RopeScaling::LongRope {
        long_factor: short_factor.clone(),
        short_factor,
        original_max_position_embeddings,
        attention_factor,
    };
    let flat_cfg = edgelm_distill::ModelConfig { rope: RopeConfig { scaling: same, ..cfg.rope.clone() }, ..cfg };
    let flat = write_and_load(&tmp.path().join("flat"), &flat_cfg, &w);
    let (within, past) = (original_max_position_embeddings, original_max_position_embeddings + 4);
    let gap = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    // A longer pass only changes summation order where the tables agree.
    assert!(gap(logits_at_8(&ck, within), logits_at_8(&flat, within)) < 1e-4);
    assert!(gap(logits_at_8(&flat, within), logits_at_8(&flat, past)) < 1e-4);
    let switched = gap(logits_at_8(&ck, within), logits_at_8(&ck, past));
    assert!(switched > 0.1, "long factors past 16 moved logits by only {switched}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = preset_config("tiny").unwrap();
    let mut w = random_weights(&cfg, 0).unwrap();
    w.remove("model.layers.1.mlp.up_proj.weight");
    write_checkpoint(tmp.path(), &cfg, &w, WriteOptions::default()).unwrap();
    let ck = Checkpoint::load(tmp.path()).unwrap();
    let e = LlamaModel::new(&ck).err().expect("missing tensor must fail").to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"), "{e}");
}

#[test]
fn a_checkpoint_written_over_another_replaces_it_whole() {
    use edgelm_distill::checkpoint::write::copy_tokenizer_files;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = preset_config("tiny").unwrap();
    let dir = tmp.path().join("ck");
    let old = random_weights(&cfg, 1).unwrap();
    write_checkpoint(&dir, &cfg, &old, WriteOptions { dtype: DType::F32, max_shard_bytes: Some(100_000) }).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{\"x\": 1}").unwrap();
    // Someone's own file that only looks like weights.
    std::fs::write(dir.join("model-step-500.safetensors"), "mine").unwrap();
    // A stage that writes into the folder it read from (prune ck -o ck): one file now, the old
    // shards and their index gone (a loader would read them instead), the tokenizer files kept.
    let new = random_weights(&cfg, 2).unwrap();
    write_checkpoint(&dir, &cfg, &new, WriteOptions::default()).unwrap();
    copy_tokenizer_files(&dir, &dir).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model-step-500.safetensors", "model.safetensors", "tokenizer_config.json"]);
    assert_eq!(std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(), "{\"x\": 1}");
    let expect = write_and_load(&tmp.path().join("fresh"), &cfg, &new);
    assert_eq!(logits(&Checkpoint::load(&dir).unwrap()), logits(&expect));
}

/// Pruning a checkpoint into its own folder (prune ck -o ck) keeps its decoding defaults, as a
/// copy elsewhere does: the sampling settings and every end-of-sequence id. Written over
/// another checkpoint, it leaves none of that one's tokenizer files.
#[test]
fn pruning_in_place_keeps_the_sources_decoding_defaults() {
    use edgelm_distill::prune::magnitude::{prune_checkpoint, PruneAmount, PruneOptions, PruneScope};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let cfg = preset_config("tiny").unwrap();
    write_checkpoint(&dir, &cfg, &random_weights(&cfg, 1).unwrap(), WriteOptions::default()).unwrap();
    let theirs = r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "eos_token_id": [2, 7]}"#;
    std::fs::write(dir.join("generation_config.json"), theirs).unwrap();
    let ck = Checkpoint::load(&dir).unwrap();
    let opts = PruneOptions { amount: PruneAmount::Sparsity(0.5), scope: PruneScope::Global, embeddings: false };
    let stale = tmp.path().join("pruned/chat_template.jinja");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "{{ another model's template }}").unwrap();
    for out in [tmp.path().join("pruned"), dir.clone()] {
        prune_checkpoint(&ck, &out, &opts).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("generation_config.json")).unwrap(), theirs, "{}", out.display());
    }
    assert!(!stale.exists(), "a template the source does not have was left");
    assert_eq!(logits(&Checkpoint::load(&dir).unwrap()), logits(&Checkpoint::load(tmp.path().join("pruned")).unwrap()));
}

fn write_and_load(dir: &std::path::Path, cfg: &edgelm_distill::ModelConfig, w: &HashMap<String, Tensor>) -> Checkpoint {
    write_checkpoint(dir, cfg, w, WriteOptions::default()).unwrap();
    Checkpoint::load(dir).unwrap()
}

#[test]
fn the_chat_template_is_found_in_each_place_transformers_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let template = |config: &str| {
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        Checkpoint::load(&dir).unwrap().chat_template()
    };
    assert_eq!(template(r#"{"chat_template": "plain"}"#).as_deref(), Some("plain"));
    // Named templates: the default one.
    let named = r#"{"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "old"},
        {"name": "default", "template": "chat"}]}"#;
    assert_eq!(template(named).as_deref(), Some("chat"));
    assert_eq!(template(r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#), None);
    // A chat_template.jinja file beside it wins, as in checkpoints saved by recent transformers.
    std::fs::write(dir.join("chat_template.jinja"), "from the file").unwrap();
    assert_eq!(template(named).as_deref(), Some("from the file"));
}

#[test]
fn a_checkpoint_without_safetensors_says_what_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = |dir: &std::path::Path| Checkpoint::load(dir).err().expect("no weights to load").to_string();
    assert!(err(&dir).contains("neither model.safetensors"), "{}", err(&dir));
    std::fs::write(dir.join("pytorch_model.bin"), b"PK").unwrap();
    assert!(err(&dir).contains("PyTorch pickle weights") && err(&dir).contains("safetensors"), "{}", err(&dir));
}

/// The tiny preset's checkpoint written into `parent/ck`.
fn tiny_checkpoint(parent: &std::path::Path) -> std::path::PathBuf {
    let cfg = preset_config("tiny").unwrap();
    let dir = parent.join("ck");
    write_checkpoint(&dir, &cfg, &random_weights(&cfg, 1).unwrap(), WriteOptions::default()).unwrap();
    dir
}
