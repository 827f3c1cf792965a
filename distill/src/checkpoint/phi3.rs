//! Phi-3 checkpoints (`Phi3ForCausalLM`, Phi-3-mini-4k and its fine-tunes) read as the Mistral
//! computation they are. transformers builds Phi-3's decoder from Mistral's: RMSNorm, rotary
//! attention with grouped heads and an optional sliding window, a SwiGLU MLP. Only the storage
//! differs: q, k and v are one `qkv_proj` matrix (rows in that order) and gate and up one
//! `gate_up_proj` (gate rows first). So the config is read as Mistral's and the fused matrices
//! are split into the names the rest of edgelm reads; checkpoints written afterwards are
//! `MistralForCausalLM` folders, which transformers loads as the same model.
//!
//! Long-context Phi-3 models (Phi-3-mini-128k, Phi-3.5-mini) use LongRoPE, which the rope
//! parser reads with the original context Phi-3 states at the top level. Partial rotary
//! embedding (Phi-4-mini) computes something else and is refused by name.

use std::collections::HashMap;

use candle_core::Tensor;
use serde_json::Value;

use super::{names, ModelConfig};
use crate::error::{Error, Result};

/// Whether a parsed config.json describes a Phi-3 model.
pub fn is_phi3(config: &Value) -> bool {
    let class = |c: &Value| c.as_str() == Some("Phi3ForCausalLM");
    config.get("model_type").and_then(Value::as_str) == Some("phi3")
        || config.get("architectures").and_then(Value::as_array).is_some_and(|a| a.iter().any(class))
}

/// The config.json text of a Phi-3 model rewritten as Mistral's, after refusing what Mistral's
/// computation does not cover.
pub fn as_mistral_config(mut config: Value) -> Result<String> {
    // transformers 5 keeps it among the rope parameters.
    let partial = config
        .get("partial_rotary_factor")
        .or_else(|| config.get("rope_parameters")?.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    if partial != 1.0 {
        return Err(Error::Unsupported {
            what: format!(
                "Phi-3 with partial_rotary_factor {partial} (rotary embedding over part of each head, as in Phi-4-mini)"
            ),
        });
    }
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::InvalidConfig { what: "config.json is not a JSON object".into() })?;
    // Phi3Config's defaults where the file leaves a key out (Mistral's differ).
    let defaults = [
        ("rms_norm_eps", Value::from(1e-5)),
        ("max_position_embeddings", Value::from(4096)),
        // What LongRoPE's switch is measured against when the file leaves it out.
        ("original_max_position_embeddings", Value::from(4096)),
        ("rope_theta", Value::from(10000.0)),
        ("bos_token_id", Value::from(1)),
        ("eos_token_id", Value::from(32000)),
        ("pad_token_id", Value::from(32000)),
        ("tie_word_embeddings", Value::from(false)),
    ];
    for (key, value) in defaults {
        obj.entry(key).or_insert(value);
    }
    obj.insert("model_type".into(), Value::from("mistral"));
    obj.insert("architectures".into(), Value::from(vec!["MistralForCausalLM"]));
    Ok(config.to_string())
}

/// Phi-3's fused projections and the separate ones each joins, in row order (within a layer).
pub const FUSED: [(&str, &[&str]); 2] = [
    ("self_attn.qkv_proj", &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"]),
];

/// The separate projections a fused module joins (`model.layers.3.self_attn.qkv_proj` ->
/// `model.layers.3.self_attn.q_proj`, ...), in row order; `None` for any other module.
pub fn fused_parts(module: &str) -> Option<Vec<String>> {
    FUSED.iter().find_map(|(fused, parts)| {
        let prefix = module.strip_suffix(fused)?;
        Some(parts.iter().map(|part| format!("{prefix}{part}")).collect())
    })
}

/// Output rows of one of the projections in [`FUSED`] under `c`.
pub(crate) fn rows_of(c: &ModelConfig, part: &str) -> usize {
    match part {
        "self_attn.q_proj" => c.q_dim(),
        "self_attn.k_proj" | "self_attn.v_proj" => c.kv_dim(),
        _ => c.intermediate_size,
    }
}

/// Where each of `parts` lies in its fused matrix: `(part, first row, rows)`, in row order.
pub(crate) fn part_rows(c: &ModelConfig, parts: &[&'static str]) -> Vec<(&'static str, usize, usize)> {
    let mut start = 0;
    parts
        .iter()
        .map(|&p| {
            let rows = rows_of(c, p);
            start += rows;
            (p, start - rows, rows)
        })
        .collect()
}

/// Splits each layer's `qkv_proj` and `gate_up_proj` into the separate projections, checking
/// their shapes against `c`. Checkpoints that already have separate projections pass unchanged.
pub fn split_fused(tensors: &mut HashMap<String, Tensor>, c: &ModelConfig) -> Result<()> {
    let h = c.hidden_size;
    for i in 0..c.num_hidden_layers {
        for (fused, parts) in FUSED {
            let name = names::in_layer(i, &format!("{fused}.weight"));
            let Some(t) = tensors.remove(&name) else { continue };
            let rows: usize = parts.iter().map(|p| rows_of(c, p)).sum();
            if t.dims() != [rows, h] {
                return Err(Error::Tensor {
                    name,
                    what: format!("shape {:?}, expected [{rows}, {h}] (the projections it joins)", t.dims()),
                });
            }
            for (part, start, n) in part_rows(c, parts) {
                tensors.insert(names::in_layer(i, &format!("{part}.weight")), t.narrow(0, start, n)?.contiguous()?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::{preset, Checkpoint};
    use crate::model::LlamaModel;
    use candle_core::Device;

    /// A Phi-3 folder holding a Mistral preset's weights in Phi-3's storage (fused q/k/v and
    /// gate/up), with Phi-3's config keys.
    pub(crate) fn phi3_folder(dir: &std::path::Path, mistral: &std::path::Path) {
        let ck = Checkpoint::load(mistral).unwrap();
        let c = &ck.config;
        let mut fused: HashMap<String, Tensor> = ck.tensors.clone();
        for i in 0..c.num_hidden_layers {
            let mut take = |n: &str| fused.remove(&names::in_layer(i, n)).unwrap();
            let qkv = Tensor::cat(
                &[take("self_attn.q_proj.weight"), take("self_attn.k_proj.weight"), take("self_attn.v_proj.weight")],
                0,
            )
            .unwrap();
            let gate_up = Tensor::cat(&[take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")], 0).unwrap();
            fused.insert(names::in_layer(i, "self_attn.qkv_proj.weight"), qkv);
            fused.insert(names::in_layer(i, "mlp.gate_up_proj.weight"), gate_up);
        }
        std::fs::create_dir_all(dir).unwrap();
        candle_core::safetensors::save(&fused, dir.join("model.safetensors")).unwrap();
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(mistral.join("config.json")).unwrap()).unwrap();
        config["model_type"] = Value::from("phi3");
        config["architectures"] = Value::from(vec!["Phi3ForCausalLM"]);
        config["original_max_position_embeddings"] = config["max_position_embeddings"].clone();
        config["embd_pdrop"] = Value::from(0.0);
        config["resid_pdrop"] = Value::from(0.0);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }

    #[test]
    fn a_phi3_checkpoint_reads_as_the_mistral_model_it_stores() {
        let tmp = tempfile::tempdir().unwrap();
        let mistral = tmp.path().join("mistral");
        preset::write_preset("tiny-mistral-window", &mistral, 3, Default::default()).unwrap();
        let phi3 = tmp.path().join("phi3");
        phi3_folder(&phi3, &mistral);
        let (a, b) = (Checkpoint::load(&mistral).unwrap(), Checkpoint::load(&phi3).unwrap());
        assert_eq!(b.config, a.config, "the same configuration, window included");
        let ids = Tensor::new(&[1u32, 40, 97, 200, 31, 150, 77, 12, 255, 300, 5][..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = |ck: &Checkpoint| {
            let m = LlamaModel::new(ck).unwrap();
            m.forward(&ids, &mut m.new_cache()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(logits(&a), logits(&b));
        // Opened without its weights, the index reads each split projection out of its fused
        // matrix, the same as loading splits them.
        let (deferred, index) = Checkpoint::load_deferred(&phi3).unwrap();
        assert_eq!(deferred.config, b.config);
        assert!(deferred.tensors.is_empty());
        for (name, t) in &b.tensors {
            let read = index.read(name, t.dims()).unwrap();
            let diff = (read - t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }

        // Keys left out take Phi3Config's defaults, not Mistral's.
        let sparse: Value =
            serde_json::from_str(&as_mistral_config(serde_json::json!({"model_type": "phi3"})).unwrap()).unwrap();
        assert_eq!((sparse["rms_norm_eps"].as_f64(), sparse["eos_token_id"].as_u64()), (Some(1e-5), Some(32000)));
        // Rotary over part of each head (Phi-4-mini) is refused by name, in either spelling.
        let nested = serde_json::json!({"model_type": "phi3", "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}});
        assert!(as_mistral_config(nested).unwrap_err().to_string().contains("partial_rotary_factor 0.5"));
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(phi3.join("config.json")).unwrap()).unwrap();
        config["partial_rotary_factor"] = Value::from(0.75);
        std::fs::write(phi3.join("config.json"), config.to_string()).unwrap();
        let err = Checkpoint::load(&phi3).err().unwrap().to_string();
        assert!(err.contains("partial_rotary_factor 0.75"), "{err}");
        // A fused matrix of the wrong size names itself.
        config["partial_rotary_factor"] = Value::from(1.0);
        config["intermediate_size"] = Value::from(a.config.intermediate_size + 4);
        std::fs::write(phi3.join("config.json"), config.to_string()).unwrap();
        let err = Checkpoint::load(&phi3).err().unwrap().to_string();
        assert!(err.contains("gate_up_proj"), "{err}");
    }
}
