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
    trained.save_peft(dir.path(), "tiny-qwen2", None).unwrap();
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

/// Rewrites the adapter_config.json `save_peft` wrote with `edit`.
fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn peft_scales_rslora_and_per_module_alphas_are_applied() {
    let cfg = preset_config("tiny-qwen2").unwrap();
    let lcfg = LoraConfig { r: 4, lora_alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into()] };
    let mut adapter = Adapter::init(&cfg, lcfg, 3).unwrap();
    for (_, b) in adapter.modules.values_mut() {
        let vals: Vec<f32> = (0..b.elem_count()).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        *b = Tensor::from_vec(vals, b.dims(), &Device::Cpu).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(dir.path(), "tiny-qwen2", None).unwrap();
    // The raw product B A of a module, without any scale.
    let raw = |m: &str| {
        let (a, b) = &adapter.modules[m];
        b.matmul(a).unwrap()
    };
    let diff = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let q0 = "model.layers.0.self_attn.q_proj";
    let v0 = "model.layers.0.self_attn.v_proj";

    edit_config(dir.path(), |v| {
        v["use_rslora"] = true.into();
        v["alpha_pattern"] = serde_json::json!({ "layers.0.self_attn.v_proj": 2.0 });
    });
    let back = Adapter::load_peft(dir.path()).unwrap();
    // rslora: alpha / sqrt(r) = 16 / 2 = 8 (plain LoRA's 16 / 4 would be 4).
    let want_q = (raw(q0) * 8.0).unwrap();
    assert!(diff(&back.delta(q0).unwrap().unwrap(), &want_q) < 1e-6);
    // The pattern's alpha for that one module: 2 / sqrt(4) = 1.
    assert!(diff(&back.delta(v0).unwrap().unwrap(), &raw(v0)) < 1e-6);
    // Other layers keep the adapter-wide alpha.
    let v1 = "model.layers.1.self_attn.v_proj";
    assert!(diff(&back.delta(v1).unwrap().unwrap(), &(raw(v1) * 8.0).unwrap()) < 1e-6);

    // What the reader cannot apply is refused with the setting named, not dropped.
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("lora_only")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("rank_pattern", serde_json::json!({ "q_pr.*": 2 })),
    ] {
        edit_config(dir.path(), |v| v[key] = value.clone());
        let err = Adapter::load_peft(dir.path()).unwrap_err().to_string();
        assert!(err.contains(key) || (key == "rank_pattern" && err.contains("pattern key")), "{key}: {err}");
        edit_config(dir.path(), |v| {
            v.as_object_mut().unwrap().remove(key);
        });
    }
    // A rank the tensors do not have.
    edit_config(dir.path(), |v| v["rank_pattern"] = serde_json::json!({ "q_proj": 2 }));
    let err = Adapter::load_peft(dir.path()).unwrap_err().to_string();
    assert!(err.contains("rank 2"), "{err}");
}

/// An adapter trained on Phi-3's fused projections (PEFT names `qkv_proj`, `gate_up_proj`)
/// merges into the separate projections edgelm reads Phi-3 as, exactly as the same update
/// given to each projection (A shared, B's rows split).
#[test]
fn an_adapter_on_fused_phi3_projections_merges_into_the_split_ones() {
    use std::collections::HashMap;
    let cfg = preset_config("tiny-mistral").unwrap();
    let base = random_weights(&cfg, 4).unwrap();
    let lcfg = LoraConfig { r: 4, lora_alpha: 8.0, target_modules: vec!["qkv_proj".into(), "gate_up_proj".into()] };
    let h = cfg.hidden_size;
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0) * 0.05).collect()
    };
    let (mut fused, mut split) = (HashMap::new(), HashMap::new());
    let groups = [
        ("self_attn.qkv_proj", vec![("q_proj", cfg.q_dim()), ("k_proj", cfg.kv_dim()), ("v_proj", cfg.kv_dim())]),
        ("mlp.gate_up_proj", vec![("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)]),
    ];
    for layer in 0..cfg.num_hidden_layers {
        for (g, (module, parts)) in groups.iter().enumerate() {
            let rows: usize = parts.iter().map(|(_, n)| n).sum();
            let a = Tensor::from_vec(values(4 * h, layer * 10 + g), (4, h), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(values(rows * 4, layer * 10 + g + 5), (rows, 4), &Device::Cpu).unwrap();
            let mut start = 0;
            for (part, n) in parts {
                let name = edgelm_distill::checkpoint::names::projection(layer, part);
                split.insert(name, (a.clone(), b.narrow(0, start, *n).unwrap()));
                start += n;
            }
            fused.insert(format!("model.layers.{layer}.{module}"), (a, b));
        }
    }
    let fused = Adapter { config: lcfg.clone(), modules: fused }.merge(&base).unwrap();
    let split = Adapter { config: lcfg, modules: split }.merge(&base).unwrap();
    assert_eq!(fused.len(), base.len(), "no fused tensor added");
    for (name, t) in &split {
        let diff = max_diff(
            &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &fused[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(diff, 0.0, "{name}");
        if name.contains("q_proj") || name.contains("up_proj") {
            assert_ne!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                base[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name} changed"
            );
        }
    }
}

/// For a Phi-3 base the adapter is saved on the fused `qkv_proj` / `gate_up_proj` PEFT applies
/// to Phi-3 (ranks and alphas per fused module, zero rows for a part left unadapted), and what
/// it saves merges exactly as the adapter trained on the split projections does.
#[test]
fn an_adapter_for_a_phi3_base_is_saved_on_the_fused_projections() {
    let cfg = preset_config("tiny-mistral").unwrap();
    let base = random_weights(&cfg, 4).unwrap();
    // q and v (k left out), up (gate left out) and down.
    let lcfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "up_proj".into(), "down_proj".into()],
    };
    let mut adapter = Adapter::init(&cfg, lcfg, 9).unwrap();
    for (i, (_, b)) in adapter.modules.values_mut().enumerate() {
        *b = (Tensor::randn(0f32, 0.05, b.dims(), &Device::Cpu).unwrap() + i as f64 * 1e-3).unwrap();
    }
    // One module of its own rank (as PEFT's rank_pattern gives): 6 where the rest have 4.
    let q0 = "model.layers.0.self_attn.q_proj".to_owned();
    let (a0, b0) = &adapter.modules[&q0];
    let (a6, b6) = (
        Tensor::randn(0f32, 0.2, (6, a0.dims()[1]), &Device::Cpu).unwrap(),
        Tensor::randn(0f32, 0.05, (b0.dims()[0], 6), &Device::Cpu).unwrap(),
    );
    adapter.modules.insert(q0, (a6, b6));
    let split = adapter.merge(&base).unwrap();
    // Saved as it is, the odd rank is named; read back, it merges the same.
    let plain = tempfile::tempdir().unwrap();
    adapter.save_peft(plain.path(), "mistral", None).unwrap();
    let again = Adapter::load_peft(plain.path()).unwrap().merge(&base).unwrap();
    for (name, t) in &split {
        let d = max_diff(
            &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &again[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(d < 1e-6, "{name}: {d}");
    }
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(dir.path(), "phi3", Some(&cfg)).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved["target_modules"], serde_json::json!(["down_proj", "gate_up_proj", "qkv_proj"]));
    // Layer 0's qkv_proj is 6 + 4, the other layers' 4 + 4.
    assert_eq!(
        saved["rank_pattern"],
        serde_json::json!({"qkv_proj": 8, "gate_up_proj": 4, "model.layers.0.self_attn.qkv_proj": 10})
    );
    assert_eq!(
        saved["alpha_pattern"],
        serde_json::json!({"qkv_proj": 16.0, "gate_up_proj": 8.0, "model.layers.0.self_attn.qkv_proj": 20.0})
    );
    let back = Adapter::load_peft(dir.path()).unwrap();
    assert!(back.modules.keys().all(|m| [".q_proj", ".v_proj", ".up_proj"].iter().all(|s| !m.ends_with(s))));
    let fused = back.merge(&base).unwrap();
    for (name, t) in &split {
        let diff = max_diff(
            &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &fused[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(diff < 1e-6, "{name}: {diff}");
    }
}

/// The fused names Phi-3 recipes give as targets (`qkv_proj`, `gate_up_proj`) select the
/// projections they fuse, each once (also when named again alone), and a base without fused
/// projections gets the adapter saved on those it trained.
#[test]
fn fused_target_names_select_the_projections_they_fuse() {
    let cfg = preset_config("tiny-mistral").unwrap();
    let targets = vec!["qkv_proj".into(), "gate_up_proj".into(), "q_proj".into()];
    let adapter = Adapter::init(&cfg, LoraConfig { r: 2, lora_alpha: 4.0, target_modules: targets }, 3).unwrap();
    let kinds: std::collections::BTreeSet<&str> =
        adapter.modules.keys().map(|m| m.rsplit('.').next().unwrap()).collect();
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]);
    assert_eq!(adapter.modules.len(), 5 * cfg.num_hidden_layers);
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(dir.path(), "mistral", None).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved["target_modules"], serde_json::json!(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]));
    assert_eq!(Adapter::load_peft(dir.path()).unwrap().modules.len(), adapter.modules.len());
}
