//! Rotary position embedding: the frequencies transformers computes for each `rope_type`, and
//! the cos/sin tables the candle model and the exported graph both read.
//!
//! Every supported type fixes its frequencies when the model loads, so one table covers the
//! whole context. LongRoPE has two: the short one while a sequence fits the length the base
//! model was trained on, the long one once it is longer, switched per forward pass on the
//! longest sequence as transformers and onnxruntime-genai switch. Dynamic NTK scaling changes
//! nothing inside `max_position_embeddings` (transformers grows it only past that length), the
//! longest context edgelm runs, so it is plain RoPE here.
//!
//! The formulas follow current transformers (`modeling_rope_utils`): the original context of
//! llama3, YaRN and LongRoPE is config.json's top-level `original_max_position_embeddings`
//! (Phi-3 states it there), else the rope parameters', else `max_position_embeddings`; YaRN's
//! attention factor comes from `mscale` / `mscale_all_dim` when both are set. Attention factors
//! are resolved at load and written back explicitly; YaRN's original context is written back
//! only where the source stated it, as transformers 4.48-4.55 read a stated one as a reason to
//! replace `factor`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// How rotary frequencies are adjusted for contexts longer than the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor applied to every frequency.
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling: low frequencies divided by `factor`, high ones kept,
    /// a smooth blend in between.
    Llama3 {
        /// Divisor for the low-frequency band.
        factor: f64,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the base model was trained with.
        original_max_position_embeddings: usize,
    },
    /// Dynamic NTK scaling: the base grows only for sequences past `max_position_embeddings`,
    /// which edgelm never runs, so the frequencies are plain RoPE's. Kept to be written back
    /// (any `original_max_position_embeddings` it had is not: transformers does not read it).
    Dynamic {
        /// Growth of the base past the context.
        factor: f64,
    },
    /// YaRN: high frequencies kept, low ones divided by `factor`, a linear ramp between, and
    /// cos and sin multiplied by `attention_factor`.
    Yarn {
        /// Divisor for the interpolated band.
        factor: f64,
        /// The context length the base model was trained with; places the ramp.
        original_max_position_embeddings: usize,
        /// Whether config.json stated the original context (else it is `max_position_embeddings`
        /// and is not written back).
        #[serde(skip)]
        original_stated: bool,
        /// Rotations over the original context above which a frequency is kept.
        beta_fast: f64,
        /// Rotations below which a frequency is fully interpolated.
        beta_slow: f64,
        /// Whether the ramp's ends are rounded to whole dimensions.
        truncate: bool,
        /// Multiplier of cos and sin (and so of the query and key).
        attention_factor: f64,
    },
    /// LongRoPE (Phi-3-mini-128k, Phi-3.5): each frequency divided by its own factor, from
    /// `short_factor` while the longest sequence fits `original_max_position_embeddings`, from
    /// `long_factor` once it is longer; cos and sin multiplied by `attention_factor`.
    #[serde(rename = "longrope")]
    LongRope {
        /// Per-frequency divisors within the original context (`head_dim / 2` values).
        short_factor: Vec<f64>,
        /// Per-frequency divisors past it.
        long_factor: Vec<f64>,
        /// The context length the base model was trained with.
        original_max_position_embeddings: usize,
        /// Multiplier of cos and sin.
        attention_factor: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Base of the frequency ladder.
    pub theta: f64,
    /// Frequency adjustment.
    pub scaling: RopeScaling,
}

/// Rotary tables `[positions, dim / 2]`, row-major f32, the attention factor folded in: the
/// layout both ONNX Runtime's rotary attention and the candle model use.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryTable {
    /// Cosines.
    pub cos: Vec<f32>,
    /// Sines.
    pub sin: Vec<f32>,
}

/// A second table that replaces the first for forward passes whose longest sequence is longer
/// than `after` tokens (LongRoPE past its original context).
#[derive(Debug, Clone, PartialEq)]
pub struct LongTable {
    /// Sequence length up to which the first table applies.
    pub after: usize,
    /// The table used past it.
    pub table: RotaryTable,
}

impl RopeConfig {
    /// Plain RoPE with base `theta`.
    pub fn plain(theta: f64) -> Self {
        RopeConfig { theta, scaling: RopeScaling::Default }
    }

    fn base_inv_freq(&self, dim: usize) -> Vec<f64> {
        (0..dim / 2).map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / dim as f64)).collect()
    }

    /// Inverse frequencies for a rotary dimension `dim` (even), after scaling: `dim / 2` values.
    /// For LongRoPE, those within the original context.
    pub fn inv_freq(&self, dim: usize) -> Vec<f64> {
        let base = self.base_inv_freq(dim);
        match &self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
                let (low, high) = yarn_ramp_ends(
                    *beta_fast,
                    *beta_slow,
                    dim,
                    self.theta,
                    *original_max_position_embeddings,
                    *truncate,
                );
                base.into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        // 0 keeps the frequency, 1 divides it by the factor.
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * ramp + f * (1.0 - ramp)
                    })
                    .collect()
            }
            RopeScaling::LongRope { short_factor, .. } => base.iter().zip(short_factor).map(|(f, s)| f / s).collect(),
        }
    }

    /// The frequencies past the original context, with the length they start after: LongRoPE
    /// only.
    fn long_inv_freq(&self, dim: usize) -> Option<(usize, Vec<f64>)> {
        match &self.scaling {
            RopeScaling::LongRope { long_factor, original_max_position_embeddings, .. } => {
                let base = self.base_inv_freq(dim);
                Some((*original_max_position_embeddings, base.iter().zip(long_factor).map(|(f, l)| f / l).collect()))
            }
            _ => None,
        }
    }

    /// The multiplier of cos and sin: 1 except for YaRN and LongRoPE.
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn { attention_factor, .. } | RopeScaling::LongRope { attention_factor, .. } => {
                *attention_factor
            }
            _ => 1.0,
        }
    }

    /// The table for `positions` positions of a rotary dimension `dim`.
    pub fn table(&self, dim: usize, positions: usize) -> RotaryTable {
        table_of(&self.inv_freq(dim), self.attention_factor(), positions)
    }

    /// The table that takes over past the original context, when a sequence of `positions`
    /// tokens can get there (LongRoPE only).
    pub fn long_table(&self, dim: usize, positions: usize) -> Option<LongTable> {
        let (after, inv) = self.long_inv_freq(dim)?;
        (after < positions).then(|| LongTable { after, table: table_of(&inv, self.attention_factor(), positions) })
    }

    /// The `rope_scaling` object transformers reads back (null for plain RoPE).
    pub(crate) fn scaling_json(&self) -> Value {
        let mut v = match &self.scaling {
            RopeScaling::Default => return Value::Null,
            other => serde_json::to_value(other).expect("rope scaling serializes"),
        };
        if let (RopeScaling::Yarn { original_stated: false, .. }, Some(obj)) = (&self.scaling, v.as_object_mut()) {
            obj.remove("original_max_position_embeddings");
        }
        v
    }

    /// The original context a LongRoPE config also states at the top level of config.json,
    /// where transformers before 5 reads it.
    pub(crate) fn top_level_original_context(&self) -> Option<usize> {
        match &self.scaling {
            RopeScaling::LongRope { original_max_position_embeddings, .. } => Some(*original_max_position_embeddings),
            _ => None,
        }
    }
}

fn table_of(inv: &[f64], scale: f64, positions: usize) -> RotaryTable {
    let mut cos = Vec::with_capacity(positions * inv.len());
    let mut sin = Vec::with_capacity(positions * inv.len());
    for p in 0..positions {
        for f in inv {
            let angle = p as f64 * f;
            cos.push((angle.cos() * scale) as f32);
            sin.push((angle.sin() * scale) as f32);
        }
    }
    RotaryTable { cos, sin }
}

/// The dimension indices (of `dim / 2`) where YaRN's ramp starts and ends: the frequencies that
/// turn `beta_fast` and `beta_slow` times over the original context.
fn yarn_ramp_ends(
    beta_fast: f64,
    beta_slow: f64,
    dim: usize,
    theta: f64,
    original: usize,
    truncate: bool,
) -> (f64, f64) {
    let index_of = |rotations: f64| {
        dim as f64 * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (index_of(beta_fast), index_of(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001;
    }
    (low, high)
}

/// YaRN's attention scale for a context grown `scale` times.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The parts of config.json rotary settings are read from.
pub(crate) struct RopeSource<'a> {
    /// transformers 4's `rope_theta`.
    pub theta: Option<f64>,
    /// transformers 4's `rope_scaling`.
    pub scaling: Option<&'a Value>,
    /// transformers 5's `rope_parameters` (theta and scaling in one object).
    pub parameters: Option<&'a Value>,
    /// The top-level `original_max_position_embeddings` (Phi-3 states it there).
    pub original_context: Option<usize>,
    /// `max_position_embeddings`.
    pub context: usize,
    /// Width of one head, which LongRoPE's factor lists must match.
    pub head_dim: usize,
}

/// Reads the rotary settings of a config.json.
pub(crate) fn parse_rope(src: RopeSource<'_>) -> Result<RopeConfig> {
    let (theta, scaling) = match src.parameters {
        Some(p @ Value::Object(_)) => (p.get("rope_theta").and_then(Value::as_f64).or(src.theta), Some(p)),
        _ => (src.theta, src.scaling),
    };
    let theta = theta.unwrap_or(10_000.0);
    let Some(s) = scaling.filter(|s| !s.is_null()) else {
        return Ok(RopeConfig::plain(theta));
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let invalid = |what: String| Error::InvalidConfig { what: format!("rope type `{kind}`: {what}") };
    let opt = |key: &str| s.get(key).filter(|v| !v.is_null());
    let opt_num = |key: &str| -> Result<Option<f64>> {
        opt(key).map(|v| v.as_f64().ok_or_else(|| invalid(format!("`{key}` is not a number")))).transpose()
    };
    let num = |key: &str| -> Result<f64> { opt_num(key)?.ok_or_else(|| invalid(format!("needs a numeric `{key}`"))) };
    let positive = |key: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(invalid(format!("`{key}` must be positive, got {v}")))
        }
    };
    // The top-level key wins over the rope parameters' (transformers' `standardize_rope_params`).
    let stated = match src.original_context {
        Some(top) => Some(top),
        None => opt_num("original_max_position_embeddings")?.map(|v| v as usize),
    };
    let original = || -> Result<usize> {
        match stated.unwrap_or(src.context) {
            0 => Err(invalid("`original_max_position_embeddings` must be positive".into())),
            n => Ok(n),
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: positive("factor", num("factor")?)? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        },
        "dynamic" => RopeScaling::Dynamic { factor: positive("factor", num("factor")?)? },
        "yarn" => {
            let original_max_position_embeddings = original()?;
            let factor = match opt_num("factor")? {
                Some(f) => f,
                None => src.context as f64 / original_max_position_embeddings as f64,
            };
            let factor = positive("factor", factor)?;
            let attention_factor = match opt_num("attention_factor")? {
                Some(a) => a,
                None => {
                    match (opt_num("mscale")?.filter(|m| *m != 0.0), opt_num("mscale_all_dim")?.filter(|m| *m != 0.0)) {
                        (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                        _ => yarn_mscale(factor, 1.0),
                    }
                }
            };
            // transformers reads `beta_fast or 32`: zero means the default too.
            let beta =
                |key: &str, default: f64| -> Result<f64> { Ok(opt_num(key)?.filter(|b| *b != 0.0).unwrap_or(default)) };
            let truncate = match opt("truncate") {
                None => true,
                Some(v) => v.as_bool().ok_or_else(|| invalid("`truncate` is not true or false".into()))?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                original_stated: stated.is_some(),
                beta_fast: positive("beta_fast", beta("beta_fast", 32.0)?)?,
                beta_slow: positive("beta_slow", beta("beta_slow", 1.0)?)?,
                truncate,
                attention_factor: positive("attention_factor", attention_factor)?,
            }
        }
        "longrope" => {
            let original_max_position_embeddings = original()?;
            let factors = |key: &str| -> Result<Vec<f64>> {
                let list =
                    opt(key).and_then(Value::as_array).ok_or_else(|| invalid(format!("needs a `{key}` list")))?;
                let values: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
                if values.len() != list.len() || values.len() != src.head_dim / 2 {
                    return Err(invalid(format!(
                        "`{key}` must hold {} numbers (head_dim / 2), found {} entries",
                        src.head_dim / 2,
                        list.len()
                    )));
                }
                values.iter().try_for_each(|v| positive(key, *v).map(drop))?;
                Ok(values)
            };
            // The context growth sets the default attention factor; transformers takes it from
            // the two lengths when the parameters do not state `factor`.
            let factor = match opt_num("factor")? {
                Some(f) => f,
                None => src.context as f64 / original_max_position_embeddings as f64,
            };
            let attention_factor = match opt_num("attention_factor")? {
                Some(a) => positive("attention_factor", a)?,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original_max_position_embeddings as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings,
                attention_factor,
            }
        }
        other => return Err(Error::UnsupportedRope { rope_type: other.to_owned() }),
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(scaling: Value, context: usize, head_dim: usize) -> Result<RopeConfig> {
        parse_rope(RopeSource {
            theta: Some(10_000.0),
            scaling: Some(&scaling),
            parameters: None,
            original_context: None,
            context,
            head_dim,
        })
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let r = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let plain = RopeConfig::plain(500_000.0).inv_freq(128);
        let scaled = r.inv_freq(128);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-15);
        assert!(scaled.iter().zip(&plain).any(|(s, p)| s < p && *s > p / 8.0), "a blended band exists");
    }

    #[test]
    fn yarn_matches_hand_computed_frequencies_and_scale() {
        // dim 16, theta 10000, original context 64, factor 4, betas 32 / 1:
        // the ramp's ends are 16 ln(64 / (2 pi b)) / (2 ln 10000) for b = 32 and 1,
        // -0.9943 and 2.0160, truncated to -1 and 3, clamped to 0 and 3.
        let r = parse(
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
            256,
            16,
        )
        .unwrap();
        let plain = RopeConfig::plain(10_000.0).inv_freq(16);
        let inv = r.inv_freq(16);
        assert_eq!(inv[0], plain[0], "ramp 0 keeps the frequency");
        let third = plain[1] / 4.0 / 3.0 + plain[1] * 2.0 / 3.0;
        assert!((inv[1] - third).abs() < 1e-15, "ramp 1/3 at index 1");
        for i in 3..8 {
            assert!((inv[i] - plain[i] / 4.0).abs() < 1e-15, "index {i} divided by the factor");
        }
        // 0.1 ln 4 + 1.
        assert!((r.attention_factor() - 1.138_629_436_111_989).abs() < 1e-12);
        let t = r.table(16, 3);
        assert!((t.cos[0] - 1.138_629_4).abs() < 1e-6 && t.sin[0] == 0.0, "cos and sin carry the factor");
        // mscale over mscale_all_dim, as DeepSeek-style configs set it; both equal gives 1.
        let even = parse(
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
            256,
            16,
        )
        .unwrap();
        assert_eq!(even.attention_factor(), 1.0);
        // Without truncation the upper end stays fractional: index 1 lies at 1 / 2.0160.
        let exact = parse(serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": false}), 256, 16).unwrap();
        let ramp = 1.0 / 2.016_000_2;
        let want = plain[1] / 4.0 * ramp + plain[1] * (1.0 - ramp);
        assert!((exact.inv_freq(16)[1] - want).abs() < 1e-6 * plain[1]);
    }

    #[test]
    fn longrope_switches_tables_past_the_original_context() {
        let short: Vec<f64> = (0..8).map(|i| 1.0 + i as f64 * 0.1).collect();
        let long: Vec<f64> = (0..8).map(|i| 2.0 + i as f64).collect();
        let s = serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
        let r = parse_rope(RopeSource {
            theta: Some(10_000.0),
            scaling: Some(&s),
            parameters: None,
            original_context: Some(64),
            context: 256,
            head_dim: 16,
        })
        .unwrap();
        // Context grown 4x over 64: sqrt(1 + ln 4 / ln 64) = sqrt(4/3).
        assert!((r.attention_factor() - (4.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let plain = RopeConfig::plain(10_000.0).inv_freq(16);
        assert!((r.inv_freq(16)[2] - plain[2] / 1.2).abs() < 1e-15);
        let switch = r.long_table(16, 256).expect("a long table");
        assert_eq!(switch.after, 64);
        let angle = 5.0 * plain[7] / 9.0;
        assert!((switch.table.sin[5 * 8 + 7] as f64 - angle.sin() * r.attention_factor()).abs() < 1e-6);
        assert!(r.long_table(16, 64).is_none(), "a context within the original never switches");
        // A list of the wrong length is named.
        let bad = serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": long});
        let e = parse(bad, 256, 16).unwrap_err();
        assert!(e.to_string().contains("short_factor") && e.to_string().contains("8 numbers"), "{e}");
    }

    #[test]
    fn dynamic_is_plain_inside_the_context() {
        // transformers grows the base only past max_position_embeddings, whatever
        // original_max_position_embeddings says.
        for s in [
            serde_json::json!({"type": "dynamic", "factor": 2.0}),
            serde_json::json!({"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128}),
        ] {
            let r = parse(s, 256, 16).unwrap();
            assert_eq!(r.inv_freq(16), RopeConfig::plain(10_000.0).inv_freq(16));
            assert_eq!(r.scaling_json(), serde_json::json!({"rope_type": "dynamic", "factor": 2.0}));
        }
    }

    #[test]
    fn the_top_level_original_context_wins_and_yarn_writes_back_only_a_stated_one() {
        let inner = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64});
        let top = parse_rope(RopeSource {
            theta: Some(10_000.0),
            scaling: Some(&inner),
            parameters: None,
            original_context: Some(32),
            context: 256,
            head_dim: 16,
        })
        .unwrap();
        assert!(matches!(top.scaling, RopeScaling::Yarn { original_max_position_embeddings: 32, .. }));
        assert_eq!(top.scaling_json()["original_max_position_embeddings"], 32);
        let unstated = parse(serde_json::json!({"rope_type": "yarn", "factor": 4.0}), 256, 16).unwrap();
        assert!(matches!(unstated.scaling, RopeScaling::Yarn { original_max_position_embeddings: 256, .. }));
        assert!(unstated.scaling_json().get("original_max_position_embeddings").is_none());
        // llama3 falls back to the context too.
        let l3 =
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
        assert!(matches!(
            parse(l3, 256, 16).unwrap().scaling,
            RopeScaling::Llama3 { original_max_position_embeddings: 256, .. }
        ));
    }
}
