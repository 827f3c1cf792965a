//! onnxruntime-genai's `genai_config.json`: the decoder's shape and the graph's input and output
//! names. edgelm writes it into every bundle and reads it from folders made by genai's builder,
//! so both kinds of model go through one loading path.
//!
//! Unknown keys are accepted: genai adds keys between releases, and ignoring one it added for
//! another execution provider is the compatible choice.

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenaiConfig {
    /// Model description.
    pub model: ModelSection,
    /// Search (sampling) defaults.
    #[serde(default)]
    pub search: SearchSection,
}

/// `model` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSection {
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Longest sequence (prompt + generated) the model supports.
    pub context_length: usize,
    /// The decoder graph.
    pub decoder: DecoderSection,
    /// End-of-sequence token(s).
    #[serde(default, with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Architecture name (`llama`, `qwen2`, `mistral`, ...).
    #[serde(rename = "type")]
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// `model.decoder` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecoderSection {
    /// ONNX file name, relative to the folder.
    pub filename: String,
    /// Width of one attention head.
    pub head_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Input names.
    pub inputs: DecoderInputs,
    /// Output names.
    pub outputs: DecoderOutputs,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// ORT session options genai applies; kept so a rewritten file loses nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_options: Option<serde_json::Value>,
}

/// Graph input names; `%d` stands for the layer index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecoderInputs {
    /// Token ids, int64 `[batch, seq]`.
    pub input_ids: String,
    /// Mask over all positions so far, int64 `[batch, total]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<String>,
    /// Positions, int64 `[batch, seq]`, when the graph takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_ids: Option<String>,
    /// Past key per layer.
    pub past_key_names: String,
    /// Past value per layer.
    pub past_value_names: String,
}

impl DecoderInputs {
    /// The names onnxruntime-genai's builder, edgelm's export and Optimum give a decoder's
    /// inputs (`position_ids` only when the graph takes positions).
    pub fn standard(position_ids: bool) -> Self {
        DecoderInputs {
            input_ids: "input_ids".into(),
            attention_mask: Some("attention_mask".into()),
            position_ids: position_ids.then(|| "position_ids".into()),
            past_key_names: "past_key_values.%d.key".into(),
            past_value_names: "past_key_values.%d.value".into(),
        }
    }
}

impl DecoderOutputs {
    /// The names onnxruntime-genai's builder, edgelm's export and Optimum give a decoder's
    /// outputs.
    pub fn standard() -> Self {
        DecoderOutputs {
            logits: "logits".into(),
            present_key_names: "present.%d.key".into(),
            present_value_names: "present.%d.value".into(),
        }
    }
}

/// Graph output names; `%d` stands for the layer index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecoderOutputs {
    /// Logits `[batch, seq or 1, vocab]`.
    pub logits: String,
    /// Present key per layer.
    pub present_key_names: String,
    /// Present value per layer.
    pub present_value_names: String,
}

/// `search` section (only the keys edgelm uses are typed; genai's defaults otherwise).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchSection {
    /// Sample instead of greedy.
    #[serde(default)]
    pub do_sample: bool,
    /// Default maximum total length.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Whether past and present share one preallocated buffer (genai's default is false).
    #[serde(default)]
    pub past_present_share_buffer: bool,
    /// Repetition penalty.
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// Temperature.
    #[serde(default = "one")]
    pub temperature: f32,
    /// Top-k.
    #[serde(default)]
    pub top_k: usize,
    /// Top-p.
    #[serde(default = "one")]
    pub top_p: f32,
    /// Other keys, kept verbatim.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn one() -> f32 {
    1.0
}

impl Default for SearchSection {
    fn default() -> Self {
        SearchSection {
            do_sample: false,
            max_length: None,
            past_present_share_buffer: false,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            other: Default::default(),
        }
    }
}

impl GenaiConfig {
    /// The description of a decoder exported by Hugging Face Optimum (`optimum-cli export onnx`),
    /// whose folder carries transformers' `config.json` instead of a `genai_config.json`: the
    /// graph `filename` with inputs `input_ids`, `attention_mask`, `position_ids` and
    /// `past_key_values.N.key|value`, outputs `logits` and `present.N.key|value`, each step's
    /// keys appended by the graph (no shared buffer). `generation` is `generation_config.json`,
    /// whose token ids win over config.json's. Returns what config.json lacks.
    pub fn from_transformers(
        config: &serde_json::Value,
        generation: Option<&serde_json::Value>,
        filename: &str,
    ) -> Result<GenaiConfig, String> {
        // GPT-2-style configs spell the shape their own way.
        fn alias(key: &str) -> &str {
            match key {
                "num_attention_heads" => "n_head",
                "hidden_size" => "n_embd",
                "num_hidden_layers" => "n_layer",
                "max_position_embeddings" => "n_positions",
                other => other,
            }
        }
        let count =
            |key: &str| config.get(key).or_else(|| config.get(alias(key))).and_then(|v| v.as_u64()).map(|v| v as usize);
        let need = |key: &str| count(key).filter(|&v| v > 0).ok_or_else(|| format!("config.json has no `{key}`"));
        let heads = need("num_attention_heads")?;
        let hidden = need("hidden_size")?;
        // Qwen3's config class has its own default head size instead of hidden / heads.
        let qwen3 = config.get("model_type").and_then(|t| t.as_str()) == Some("qwen3");
        let head_size = match count("head_dim").or(qwen3.then_some(128)) {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(format!(
                    "config.json: hidden_size {hidden} is not a multiple of {heads} heads and head_dim is not given"
                ))
            }
        };
        let ids = |key: &str| -> Vec<u32> {
            let v = generation.and_then(|g| g.get(key)).filter(|v| !v.is_null()).or_else(|| config.get(key));
            match v {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => vec![],
            }
        };
        Ok(GenaiConfig {
            model: ModelSection {
                bos_token_id: ids("bos_token_id").first().copied(),
                context_length: count("max_position_embeddings").unwrap_or(2048),
                decoder: DecoderSection {
                    filename: filename.to_owned(),
                    head_size,
                    hidden_size: hidden,
                    inputs: DecoderInputs::standard(true),
                    outputs: DecoderOutputs::standard(),
                    num_attention_heads: heads,
                    num_hidden_layers: need("num_hidden_layers")?,
                    num_key_value_heads: count("num_key_value_heads").unwrap_or(heads),
                    session_options: None,
                },
                eos_token_id: ids("eos_token_id"),
                pad_token_id: ids("pad_token_id").first().copied(),
                model_type: config.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama").to_owned(),
                vocab_size: need("vocab_size")?,
            },
            search: search_of(generation),
        })
    }
}

/// Sampling defaults from transformers' `generation_config.json` (its own defaults where a key
/// is missing: greedy, temperature 1, top-k 50, top-p 1, no repetition penalty).
fn search_of(generation: Option<&serde_json::Value>) -> SearchSection {
    let get = |key: &str| generation.and_then(|g| g.get(key)).filter(|v| !v.is_null());
    let float = |key: &str, default: f32| get(key).and_then(|v| v.as_f64()).map_or(default, |v| v as f32);
    SearchSection {
        do_sample: get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false),
        temperature: float("temperature", 1.0),
        top_k: get("top_k").and_then(|v| v.as_u64()).map_or(50, |v| v as usize),
        top_p: float("top_p", 1.0),
        repetition_penalty: float("repetition_penalty", 1.0),
        ..SearchSection::default()
    }
}

/// Expands a `%d` name template for layer `i`.
pub(crate) fn layer_name(template: &str, i: usize) -> String {
    template.replacen("%d", &i.to_string(), 1)
}

mod one_or_many {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        Ok(match Option::<OneOrMany>::deserialize(d)? {
            None => vec![],
            Some(OneOrMany::One(x)) => vec![x],
            Some(OneOrMany::Many(v)) => v,
        })
    }

    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_optimum_folder_is_described_from_transformers_files() {
        let config = serde_json::json!({"model_type": "mistral", "vocab_size": 300, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 2,
            "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2});
        let generation =
            serde_json::json!({"eos_token_id": [2, 7], "do_sample": true, "temperature": 0.6, "top_p": 0.9});
        let g = GenaiConfig::from_transformers(&config, Some(&generation), "model.onnx").unwrap();
        let d = &g.model.decoder;
        assert_eq!((d.head_size, d.num_key_value_heads, d.num_hidden_layers), (32, 1, 2));
        assert_eq!((g.model.bos_token_id, g.model.eos_token_id.as_slice()), (Some(1), &[2, 7][..]));
        assert_eq!((g.model.context_length, g.model.model_type.as_str()), (512, "mistral"));
        assert_eq!(d.inputs.position_ids.as_deref(), Some("position_ids"));
        assert!(g.search.do_sample && !g.search.past_present_share_buffer);
        assert_eq!((g.search.temperature, g.search.top_k, g.search.top_p), (0.6, 50, 0.9));
        let greedy = GenaiConfig::from_transformers(&config, None, "model.onnx").unwrap();
        assert!(!greedy.search.do_sample);
        let gpt2 = serde_json::json!({"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_head": 4,
            "n_layer": 3, "n_positions": 128});
        let g = GenaiConfig::from_transformers(&gpt2, None, "model.onnx").unwrap();
        let d = &g.model.decoder;
        assert_eq!((d.head_size, d.num_key_value_heads, d.num_hidden_layers, g.model.context_length), (16, 4, 3, 128));
        let qwen3 = serde_json::json!({"model_type": "qwen3", "vocab_size": 300, "hidden_size": 64,
            "num_attention_heads": 4, "num_hidden_layers": 1});
        assert_eq!(GenaiConfig::from_transformers(&qwen3, None, "model.onnx").unwrap().model.decoder.head_size, 128);
        let err = GenaiConfig::from_transformers(&serde_json::json!({"vocab_size": 3}), None, "m.onnx").unwrap_err();
        assert!(err.contains("num_attention_heads"), "{err}");
    }
}
