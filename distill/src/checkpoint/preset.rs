//! Named model shapes and random checkpoints built from them, in the Hugging Face layout.
//!
//! The tiny presets exist for tests (each covers one feature of the family: GQA, tied
//! embeddings, Qwen2 bias, llama3 rope scaling); `smollm2-135m` has the shape of SmolLM2-135M
//! for speed work. Weights are random but seeded, and scaled so that attention and logits are
//! far from uniform: a wrong position or cache shows up as a different greedy token.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, Tokenizer, TokenizerBuilder, TokenizerImpl};

use super::config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use super::names;
use super::write::{write_checkpoint, WriteOptions};
use crate::error::{Error, IoContext, Result};
use crate::rng::Rng;

/// Special tokens every preset tokenizer starts with, in id order (ChatML, as SmolLM2 uses).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML template, the one SmolLM2-Instruct ships.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const CORPUS: &str = include_str!("preset_corpus.txt");

/// The names `init --preset` accepts, with a one-line description each.
pub const PRESETS: [(&str, &str); 10] = [
    ("tiny", "llama, 2 layers, GQA 4/2 heads, untied embeddings"),
    ("tiny-tied", "llama, 2 layers, 4 heads without GQA, tied embeddings"),
    ("tiny-qwen2", "qwen2, 2 layers, GQA 4/2, q/k/v bias, tied embeddings"),
    ("tiny-llama3", "llama, 3 layers, GQA 8/2, llama3 rope scaling, rope_theta 500000"),
    ("tiny-mistral", "mistral, 2 layers, GQA 4/1, head_dim 32 wider than hidden/heads"),
    ("tiny-mistral-window", "mistral with a sliding attention window of 8 positions"),
    ("tiny-qwen2-window", "qwen2 with a window of 8 on layer 1 and full attention on layer 0 (max_window_layers 1)"),
    ("tiny-longrope", "mistral with Phi-3.5's LongRoPE: short and long factors, original context 16"),
    ("tiny-qwen3", "qwen3, 2 layers, GQA 4/2, q/k head norms, head_dim 32, tied"),
    ("smollm2-135m", "the shape of SmolLM2-135M: 30 layers, 576 wide, GQA 9/3, vocab 49152"),
];

/// The configuration of a named preset.
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    let tiny = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 384,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta: 10_000.0, scaling: RopeScaling::Default },
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        full_attention_layers: vec![],
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
    };
    Ok(match name {
        "tiny" => tiny,
        "tiny-tied" => ModelConfig { num_key_value_heads: 4, tie_word_embeddings: true, ..tiny },
        "tiny-qwen2" => ModelConfig {
            architecture: Architecture::Qwen2,
            qkv_bias: true,
            tie_word_embeddings: true,
            rope: RopeConfig { theta: 1_000_000.0, scaling: RopeScaling::Default },
            rms_norm_eps: 1e-6,
            ..tiny
        },
        "tiny-llama3" => ModelConfig {
            num_hidden_layers: 3,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: 16,
            rope: RopeConfig {
                theta: 500_000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 64,
                },
            },
            ..tiny
        },
        "tiny-mistral" => {
            ModelConfig { architecture: Architecture::Mistral, num_key_value_heads: 1, head_dim: 32, ..tiny }
        }
        "tiny-mistral-window" => ModelConfig { sliding_window: Some(8), ..preset_config("tiny-mistral")? },
        "tiny-qwen2-window" => {
            ModelConfig { sliding_window: Some(8), full_attention_layers: vec![0], ..preset_config("tiny-qwen2")? }
        }
        "tiny-longrope" => {
            let base = preset_config("tiny-mistral")?;
            // Factors shaped like Phi-3.5's: near 1 within the original context, growing to
            // many times the context growth for the slowest frequencies past it.
            let half = base.head_dim / 2;
            let ramp = |i: usize| i as f64 / (half - 1) as f64;
            let scaling = RopeScaling::LongRope {
                short_factor: (0..half).map(|i| 1.0 + 0.5 * ramp(i)).collect(),
                long_factor: (0..half).map(|i| 1.0 + 30.0 * ramp(i).powi(2)).collect(),
                original_max_position_embeddings: 16,
                // As transformers derives it: sqrt(1 + ln(256 / 16) / ln 16).
                attention_factor: std::f64::consts::SQRT_2,
            };
            ModelConfig { rope: RopeConfig { theta: 10_000.0, scaling }, ..base }
        }
        "tiny-qwen3" => {
            ModelConfig { architecture: Architecture::Qwen3, head_dim: 32, tie_word_embeddings: true, ..tiny }
        }
        "smollm2-135m" => ModelConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            max_position_embeddings: 8192,
            rope: RopeConfig { theta: 100_000.0, scaling: RopeScaling::Default },
            tie_word_embeddings: true,
            ..tiny
        },
        other => {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            return Err(Error::UnknownPreset { name: other.to_owned(), known: names.join(", ") });
        }
    })
}

/// Seeded random weights for `config`, named as transformers names them.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let c = config;
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    let mut put = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let t = Tensor::from_vec(rng.normal_vec(n, mean, std), shape, &Device::Cpu)?;
        out.insert(name, t);
        Ok(())
    };
    let h = c.hidden_size;
    // Unit-variance activations: std 1/sqrt(fan_in) keeps attention scores and logits spread.
    let lin = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    // Logits end up with a standard deviation of about 4, as in trained models.
    put(names::EMBED.into(), &[c.vocab_size, h], 0.0, 4.0 * lin(h))?;
    for i in 0..c.num_hidden_layers {
        put(names::in_layer(i, names::INPUT_NORM), &[h], 1.0, 0.1)?;
        put(names::in_layer(i, names::POST_ATTENTION_NORM), &[h], 1.0, 0.1)?;
        if c.qk_norm() {
            put(names::in_layer(i, names::Q_NORM), &[c.head_dim], 1.0, 0.1)?;
            put(names::in_layer(i, names::K_NORM), &[c.head_dim], 1.0, 0.1)?;
        }
        for (proj, out_dim) in [("q_proj", c.q_dim()), ("k_proj", c.kv_dim()), ("v_proj", c.kv_dim())] {
            put(format!("{}.weight", names::projection(i, proj)), &[out_dim, h], 0.0, lin(h))?;
            if c.qkv_bias {
                put(format!("{}.bias", names::projection(i, proj)), &[out_dim], 0.0, 0.1)?;
            }
        }
        put(format!("{}.weight", names::projection(i, "o_proj")), &[h, c.q_dim()], 0.0, lin(c.q_dim()))?;
        if c.o_bias {
            put(format!("{}.bias", names::projection(i, "o_proj")), &[h], 0.0, 0.1)?;
        }
        for (proj, o, i_) in [
            ("gate_proj", c.intermediate_size, h),
            ("up_proj", c.intermediate_size, h),
            ("down_proj", h, c.intermediate_size),
        ] {
            put(format!("{}.weight", names::projection(i, proj)), &[o, i_], 0.0, lin(i_))?;
            if c.mlp_bias {
                put(format!("{}.bias", names::projection(i, proj)), &[o], 0.0, 0.1)?;
            }
        }
    }
    put(names::FINAL_NORM.into(), &[h], 1.0, 0.1)?;
    if !c.tie_word_embeddings {
        put(names::LM_HEAD.into(), &[c.vocab_size, h], 0.0, 4.0 * lin(h))?;
    }
    Ok(out)
}

/// Trains a byte-level BPE tokenizer on `lines` with at most `vocab_size` entries, the
/// [`SPECIAL_TOKENS`] first.
pub fn train_tokenizer<'a>(lines: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut tok: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(err)?;
    let specials = SPECIAL_TOKENS.iter().map(|s| AddedToken::from(*s, true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tok.train(&mut trainer, lines).map_err(err)?;
    Ok(tok.into())
}

/// Writes a random checkpoint of a preset into `dir`: config.json, generation_config.json,
/// model.safetensors (or shards), tokenizer.json and tokenizer_config.json with a chat template.
pub fn write_preset(name: &str, dir: &Path, seed: u64, opts: WriteOptions) -> Result<ModelConfig> {
    let config = preset_config(name)?;
    let weights = random_weights(&config, seed)?;
    write_checkpoint(dir, &config, &weights, opts)?;
    let tok = train_tokenizer(CORPUS.lines(), config.vocab_size)?;
    write_tokenizer(dir, &tok, config.max_position_embeddings)?;
    super::write::write_generation_config(dir, &config)?;
    Ok(config)
}

/// Writes `tokenizer.json` and a `tokenizer_config.json` naming the special tokens and the
/// ChatML template, as transformers' fast tokenizers save them.
pub fn write_tokenizer(dir: &Path, tok: &Tokenizer, max_length: usize) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let tok_path = dir.join("tokenizer.json");
    tok.save(&tok_path, true).map_err(|e| Error::Format { path: tok_path.clone(), what: e.to_string() })?;
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0],
        "unk_token": null,
        "add_bos_token": false,
        "model_max_length": max_length,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
    });
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tok_cfg).expect("json")).at(&p)
}
