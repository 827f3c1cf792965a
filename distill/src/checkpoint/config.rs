//! The model configuration edgelm works with, parsed once from a Hugging Face `config.json`.
//!
//! Everything after loading (the candle model, export, presets) reads [`ModelConfig`], never the
//! raw JSON, so the many spellings transformers has used over the years are handled here only:
//! `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5),
//! `num_key_value_heads` missing (plain multi-head attention), `head_dim` missing or explicit.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rope::{parse_rope, RopeSource};
pub use super::rope::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

/// The architecture families edgelm can load; all are decoder-only transformers with RMSNorm,
/// rotary embeddings, SwiGLU MLPs and (optionally grouped) multi-head attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM, TinyLlama).
    Llama,
    /// `MistralForCausalLM`: Llama plus an optional sliding attention window.
    Mistral,
    /// `Qwen2ForCausalLM`: bias on the q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: an RMSNorm over each query and key head before rotary embedding
    /// (`q_norm`, `k_norm`), no projection bias unless `attention_bias`.
    Qwen3,
}

impl Architecture {
    /// The `model_type` string transformers writes for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// The class name transformers writes into `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    fn from_hf(model_type: Option<&str>, architectures: &[String]) -> Result<Self> {
        let by_type = match model_type {
            Some("llama") => Some(Architecture::Llama),
            Some("mistral") => Some(Architecture::Mistral),
            Some("qwen2") => Some(Architecture::Qwen2),
            Some("qwen3") => Some(Architecture::Qwen3),
            _ => None,
        };
        let by_class = architectures.iter().find_map(|a| match a.as_str() {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            _ => None,
        });
        by_type.or(by_class).ok_or_else(|| Error::UnsupportedArchitecture {
            found: model_type
                .map(str::to_owned)
                .or_else(|| architectures.first().cloned())
                .unwrap_or_else(|| "<none>".into()),
        })
    }
}

/// A llama-family model's shape and numerics, independent of how config.json spelled them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture family.
    pub architecture: Architecture,
    /// Rows of the embedding table and of the LM head.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (equal to query heads without GQA).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Longest context the model supports; the exported KV cache is sized to it.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding settings.
    pub rope: RopeConfig,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Attention window in tokens, when the model uses sliding-window attention.
    pub sliding_window: Option<usize>,
    /// Layers that attend to everything although the model has a window (Qwen2/Qwen3 below
    /// `max_window_layers`, or marked `full_attention`); empty: every layer slides.
    #[serde(default)]
    pub full_attention_layers: Vec<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens: generation stops at any of them.
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

/// The subset of transformers' config.json that edgelm reads. Unknown keys are ignored because
/// transformers writes dozens that do not change the computation.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    /// Phi-3 states LongRoPE's original context here, beside the rope parameters.
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3: layers below this index attend to everything even with the window on.
    max_window_layers: Option<usize>,
    /// transformers 4.53+: `full_attention` or `sliding_attention` per layer.
    layer_types: Option<Vec<String>>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// The window of a Qwen2/Qwen3 model with `use_sliding_window` on, and the layers that do not
/// slide: those `layer_types` marks `full_attention`, else those below `max_window_layers` (28
/// by default). No window when no layer slides.
fn qwen_window(raw: &HfConfig) -> Result<(Option<usize>, Vec<usize>)> {
    let layers = raw.num_hidden_layers;
    // Qwen2/Qwen3 layers run only these two kinds, one per layer: another list is refused
    // rather than read as full attention on the layers it does not name.
    if let Some(types) = &raw.layer_types {
        if types.len() != layers {
            return Err(Error::InvalidConfig {
                what: format!("layer_types names {} layers, the model has {layers}", types.len()),
            });
        }
        if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
            return Err(Error::InvalidConfig {
                what: format!("layer_types holds {t:?}; only full_attention and sliding_attention are known"),
            });
        }
    }
    let Some(window) = raw.sliding_window else {
        return Ok((None, vec![]));
    };
    let full: Vec<usize> = match &raw.layer_types {
        Some(types) => (0..layers).filter(|&i| types[i] == "full_attention").collect(),
        None => (0..layers.min(raw.max_window_layers.unwrap_or(28))).collect(),
    };
    Ok(layer_windows(Some(window), full, layers))
}

/// A model's window and the layers that attend to everything, with no window at all when no
/// layer slides (every layer is full, or there is no window).
pub(crate) fn layer_windows(window: Option<usize>, full: Vec<usize>, layers: usize) -> (Option<usize>, Vec<usize>) {
    match window {
        Some(w) if full.len() < layers => (Some(w), full),
        _ => (None, vec![]),
    }
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// Token ids in HF configs are a number, a list of numbers, or null.
pub(crate) fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses the text of a transformers `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        // The family first: a config of another one (DistilBERT, T5) is refused as that, not
        // for the first llama field it lacks.
        #[derive(Deserialize)]
        struct Family {
            model_type: Option<String>,
            #[serde(default)]
            architectures: Vec<String>,
        }
        if let Ok(f) = serde_json::from_str::<Family>(text) {
            Architecture::from_hf(f.model_type.as_deref(), &f.architectures)?;
        }
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig { what: format!("config.json is not a llama-family config: {e}") })?;
        let architecture = Architecture::from_hf(raw.model_type.as_deref(), &raw.architectures)?;
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" && act != "swish" {
                return Err(Error::InvalidConfig {
                    what: format!("hidden_act `{act}` is not supported (edgelm implements SwiGLU with silu)"),
                });
            }
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0
            || num_key_value_heads == 0
            || !raw.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(Error::InvalidConfig {
                what: format!(
                    "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                    raw.num_attention_heads, num_key_value_heads
                ),
            });
        }
        // Qwen3's config class has its own default head size instead of hidden / heads.
        let default_head_dim = match architecture {
            Architecture::Qwen3 => Some(128),
            _ => None,
        };
        let given_head_dim = raw.head_dim.or(default_head_dim);
        if given_head_dim.is_none() && !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(Error::InvalidConfig {
                what: format!(
                    "hidden_size {} is not divisible by num_attention_heads {} and head_dim is not given",
                    raw.hidden_size, raw.num_attention_heads
                ),
            });
        }
        if raw.vocab_size < 4 || raw.max_position_embeddings < 16 || raw.hidden_size == 0 || raw.num_hidden_layers == 0
        {
            return Err(Error::InvalidConfig {
                what: format!(
                    "implausible shape: vocab_size {}, max_position_embeddings {}, hidden_size {}, num_hidden_layers {}",
                    raw.vocab_size, raw.max_position_embeddings, raw.hidden_size, raw.num_hidden_layers
                ),
            });
        }
        let head_dim = given_head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::InvalidConfig { what: format!("head_dim {head_dim} must be even and positive") });
        }
        let rope = parse_rope(RopeSource {
            theta: raw.rope_theta,
            scaling: raw.rope_scaling.as_ref(),
            parameters: raw.rope_parameters.as_ref(),
            original_context: raw.original_max_position_embeddings,
            context: raw.max_position_embeddings,
            head_dim,
        })?;
        let (sliding_window, full_attention_layers) = match architecture {
            Architecture::Mistral => (raw.sliding_window, vec![]),
            Architecture::Qwen2 | Architecture::Qwen3 if raw.use_sliding_window == Some(true) => qwen_window(&raw)?,
            _ => (None, vec![]),
        };
        // A window as long as the context changes nothing.
        let (sliding_window, full_attention_layers) = match sliding_window {
            Some(w) if w < raw.max_position_embeddings => (Some(w), full_attention_layers),
            _ => (None, vec![]),
        };
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (raw.attention_bias, raw.attention_bias),
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope,
            // Llama, Mistral and Qwen2 configs default to untied; Checkpoint::load treats a
            // checkpoint without lm_head.weight as tied.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias,
            sliding_window,
            full_attention_layers,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
        })
    }

    /// Writes a transformers-style config.json (transformers 4 spelling, which both 4 and 5 read).
    pub fn to_hf_json(&self) -> Value {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let mut v = serde_json::json!({
            "architectures": [self.architecture.class_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": self.rope.scaling_json(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        let obj = v.as_object_mut().expect("literal object");
        if let Some(original) = self.rope.top_level_original_context() {
            obj.insert("original_max_position_embeddings".into(), Value::from(original));
        }
        match self.architecture {
            Architecture::Qwen2 | Architecture::Qwen3 => {
                obj.insert("use_sliding_window".into(), Value::from(self.sliding_window.is_some()));
                obj.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
                // Layers that do not slide lead (max_window_layers, which every transformers
                // version reads), or are named one by one (layer_types, transformers 4.53+).
                let full = &self.full_attention_layers;
                let leading = full.iter().enumerate().take_while(|(i, l)| i == *l).count();
                obj.insert("max_window_layers".into(), Value::from(leading));
                if leading < full.len() {
                    let types: Vec<&str> = (0..self.num_hidden_layers)
                        .map(|i| if full.contains(&i) { "full_attention" } else { "sliding_attention" })
                        .collect();
                    obj.insert("layer_types".into(), serde_json::json!(types));
                }
                if self.architecture == Architecture::Qwen3 {
                    obj.insert("attention_bias".into(), Value::from(self.qkv_bias));
                }
            }
            Architecture::Mistral => {
                obj.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
            }
            Architecture::Llama => {
                obj.insert("attention_bias".into(), Value::from(self.qkv_bias));
                obj.insert("mlp_bias".into(), Value::from(self.mlp_bias));
            }
        }
        v
    }

    /// The attention window of layer `i`, when it slides.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        self.sliding_window.filter(|_| !self.full_attention_layers.contains(&i))
    }

    /// Query projection width (`num_attention_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Whether each query and key head is RMS-normalised (weights `[head_dim]`) before rotary
    /// embedding, as Qwen3 does.
    pub fn qk_norm(&self) -> bool {
        self.architecture == Architecture::Qwen3
    }

    /// Key/value projection width (`num_key_value_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let attn = h * self.q_dim()
            + 2 * h * self.kv_dim()
            + self.q_dim() * h
            + if self.qkv_bias { self.q_dim() + 2 * self.kv_dim() } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size + if self.mlp_bias { 2 * self.intermediate_size + h } else { 0 };
        let per_layer = attn + mlp + 2 * h + if self.qk_norm() { 2 * self.head_dim } else { 0 };
        let emb = self.vocab_size * h;
        emb + if self.tie_word_embeddings { 0 } else { emb } + self.num_hidden_layers * per_layer + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
        "max_position_embeddings":256"#;

    fn parse(extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn rope_theta_and_rope_parameters_agree() {
        let old = parse(r#","rope_theta":50000.0,"rope_scaling":{"type":"linear","factor":2.0}"#).unwrap();
        let new = parse(r#","rope_parameters":{"rope_type":"linear","rope_theta":50000.0,"factor":2.0}"#).unwrap();
        assert_eq!(old.rope, new.rope);
        assert_eq!(old.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(old.head_dim, 16);
        assert!(!old.tie_word_embeddings, "llama configs default to untied embeddings");
    }

    #[test]
    fn unknown_rope_and_architecture_are_refused() {
        let e = parse(r#","rope_scaling":{"rope_type":"mrope","factor":4.0}"#).unwrap_err();
        assert!(matches!(e, Error::UnsupportedRope { ref rope_type } if rope_type == "mrope"), "{e}");
        let e = ModelConfig::from_hf_json(
            &BASE
                .replace("llama", "gpt2")
                .replace("\"max_position_embeddings\":256", "\"max_position_embeddings\":256}"),
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsupportedArchitecture { .. }), "{e}");
        // Another family's config is refused as that family, not for a llama field it lacks.
        let distilbert = r#"{"model_type":"distilbert","architectures":["DistilBertModel"],"dim":768,"n_layers":6}"#;
        let e = ModelConfig::from_hf_json(distilbert).unwrap_err();
        assert!(matches!(e, Error::UnsupportedArchitecture { .. }) && e.to_string().contains("distilbert"), "{e}");
    }

    /// Phi-3.5-mini's config.json shape: LongRoPE without `factor` or `attention_factor`, the
    /// original context at the top level, a window longer than the context.
    #[test]
    fn phi35_longrope_reads_its_original_context_from_the_top_level() {
        let half = 8;
        let factors: Vec<f64> = (0..half).map(|i| 1.0 + i as f64).collect();
        let text = serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 1024, "original_max_position_embeddings": 64, "sliding_window": 2047,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "short_factor": factors, "long_factor": factors},
        });
        let c = ModelConfig::from_hf_json(&crate::checkpoint::phi3::as_mistral_config(text).unwrap()).unwrap();
        let RopeScaling::LongRope { original_max_position_embeddings, attention_factor, .. } = c.rope.scaling else {
            panic!("{:?}", c.rope)
        };
        assert_eq!(original_max_position_embeddings, 64);
        // Context grown 16x: sqrt(1 + ln 16 / ln 64) = sqrt(5 / 3).
        assert!((attention_factor - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(c.sliding_window, None);
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn json_round_trip() {
        let c = parse(r#","rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":128},"eos_token_id":[1,2],"tie_word_embeddings":false"#).unwrap();
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c, back);
        assert_eq!(back.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn qwen3_normalises_its_heads_and_round_trips() {
        // As Qwen3-0.6B's config.json states it: head_dim apart from hidden / heads, a sliding
        // window that is off.
        let text = r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "head_dim":32,"max_position_embeddings":256,"rms_norm_eps":1e-6,"rope_theta":1000000,
            "attention_bias":false,"use_sliding_window":false,"sliding_window":null,"max_window_layers":28,
            "tie_word_embeddings":true,"hidden_act":"silu"}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert!(c.qk_norm() && !c.qkv_bias && !c.o_bias && c.sliding_window.is_none());
        assert_eq!((c.head_dim, c.q_dim()), (32, 128));
        assert!(!parse("").unwrap().qk_norm());
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c, back);
        // Qwen3's own default head size when the config leaves it out.
        let no_head_dim = text.replace(r#""head_dim":32,"#, "");
        assert_eq!(ModelConfig::from_hf_json(&no_head_dim).unwrap().head_dim, 128);
        // The window slides from layer max_window_layers on: on none of these 2 layers, on
        // both, or on one.
        let window = |extra: &str| {
            ModelConfig::from_hf_json(
                &text.replace(r#""use_sliding_window":false,"sliding_window":null,"max_window_layers":28"#, extra),
            )
        };
        assert_eq!(
            window(r#""use_sliding_window":true,"sliding_window":64,"max_window_layers":28"#).unwrap().sliding_window,
            None
        );
        let all = window(r#""use_sliding_window":true,"sliding_window":64,"max_window_layers":0"#).unwrap();
        assert_eq!(all.sliding_window, Some(64));
        assert_eq!(ModelConfig::from_hf_json(&all.to_hf_json().to_string()).unwrap(), all);
        // Layer 0 attends to everything, layer 1 slides; written back and read again the same.
        let one = window(r#""use_sliding_window":true,"sliding_window":64,"max_window_layers":1"#).unwrap();
        assert_eq!((one.layer_window(0), one.layer_window(1)), (None, Some(64)));
        assert_eq!(ModelConfig::from_hf_json(&one.to_hf_json().to_string()).unwrap(), one);
        // Layer types in any order name the full layers one by one.
        let typed =
            r#""use_sliding_window":true,"sliding_window":64,"layer_types":["sliding_attention","full_attention"]"#;
        let last_full = window(typed).unwrap();
        assert_eq!((last_full.layer_window(0), last_full.layer_window(1)), (Some(64), None));
        let json = last_full.to_hf_json();
        assert_eq!(
            (json["max_window_layers"].as_u64(), json["layer_types"][1].as_str()),
            (Some(0), Some("full_attention"))
        );
        assert_eq!(ModelConfig::from_hf_json(&json.to_string()).unwrap(), last_full);
        let typed =
            r#""use_sliding_window":true,"sliding_window":64,"layer_types":["full_attention","full_attention"]"#;
        assert_eq!(window(typed).unwrap().sliding_window, None);
        // A list of the wrong length or with an unknown name is refused, not read as full layers.
        for bad in [r#"["sliding_attention"]"#, r#"["sliding_attention","chunked_attention"]"#] {
            let typed = format!(r#""use_sliding_window":true,"sliding_window":64,"layer_types":{bad}"#);
            let e = window(&typed).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { ref what } if what.contains("layer_types")), "{e}");
        }
    }
}
