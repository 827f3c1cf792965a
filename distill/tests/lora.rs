//! LoRA: an adapter changes the outputs, merging it gives the same logits as applying it
//! (max abs diff 1e-5), a fresh adapter is a no-op, and the PEFT files round-trip.

use candle_core::{Device, Tensor};
use edgelm_distill::checkpoint::preset::{preset_config, random_weights};
use edgelm_distill::lora::{Adapter, LoraConfig};
use edgelm_distill::LlamaModel;

fn logits(m: &LlamaModel) -> Vec<f32> {
    let ids = Tensor::new(&[[1u32, 40, 97, 200, 31]], &Device::Cpu).unwrap();
    m.forward(&ids, &mut m.new_cache()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn adapter_applied_equals_adapter_merged() {
    let cfg = preset_config("tiny-qwen2").unwrap();
    let base = random_weights(&cfg, 9).unwrap();
    let lcfg = LoraConfig {
        r: 8,
        lora_alpha: 32.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let fresh = Adapter::init(&cfg, lcfg.clone(), 1).unwrap();
    let plain = logits(&LlamaModel::from_tensors(&cfg, &base).unwrap());
    assert_eq!(logits(&LlamaModel::with_adapter(&cfg, &base, Some(&fresh)).unwrap()), plain, "B = 0 starts as a no-op");

    // A trained adapter: give B fixed pseudo-random values (|b| <= 0.05), the same every run.
    let mut trained = fresh.clone();
    let mut names: Vec<String> = trained.modules.keys().cloned().collect();
    names.sort();
    for (k, name) in names.iter().enumerate() {
        let b = &mut trained.modules.get_mut(name).unwrap().1;
        let n = b.elem_count();
        let vals: Vec<f32> = (0..n).map(|i| (((i * 7919 + k * 104_729) % 2001) as f32 / 1000.0 - 1.0) * 0.05).collect();
        *b = Tensor::from_vec(vals, b.dims(), &Device::Cpu).unwrap();
    }
    let applied = logits(&LlamaModel::with_adapter(&cfg, &base, Some(&trained)).unwrap());
    assert!(max_diff(&applied, &plain) > 1e-2, "the adapter changes the outputs");
    let merged = logits(&LlamaModel::from_tensors(&cfg, &trained.merge(&base).unwrap()).unwrap());
    let d = max_diff(&applied, &merged);
    eprintln!("merged vs applied: max abs diff {d}");
    assert!(d < 1e-5, "merged vs applied differ by {d}");

    // PEFT layout round trip.
    let dir = tempfile::tempdir().unwrap();
    trained.save_peft(dir.path(), "tiny-qwen2").unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 8);
    let names = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(names.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let back = Adapter::load_peft(dir.path()).unwrap();
    assert_eq!(back.config, lcfg);
    assert_eq!(logits(&LlamaModel::with_adapter(&cfg, &base, Some(&back)).unwrap()), applied);
}
