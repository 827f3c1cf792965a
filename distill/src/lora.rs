//! LoRA adapters: low-rank updates `W' = W + (alpha / r) * B A` on chosen projections, stored in
//! PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`, tensor names
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) so
//! `peft` loads them, and merged into the base weights for export.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ModelConfig;
use crate::error::{Error, IoContext, Result};
use crate::rng::Rng;

const PEFT_PREFIX: &str = "base_model.model.";

/// Rank, scale and targets of an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r`.
    pub lora_alpha: f64,
    /// Projection names the adapter applies to (`q_proj`, `v_proj`, ...).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }
}

/// An adapter: its config and its A/B matrices by module name (`model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Rank, scale, targets.
    pub config: LoraConfig,
    /// `(A [r, in], B [out, r])` per adapted module.
    pub modules: HashMap<String, (Tensor, Tensor)>,
}

/// The projections a target name selects: itself, or for the fused names Phi-3 checkpoints
/// (and PEFT configs written for them) use, the projections they fuse, each with an adapter of
/// its own (the fused matrix's update then has up to three times the rank).
fn split_target(t: &str) -> Vec<&str> {
    match t {
        "qkv_proj" => vec!["q_proj", "k_proj", "v_proj"],
        "gate_up_proj" => vec!["gate_proj", "up_proj"],
        _ => vec![t],
    }
}

/// The separate projections `targets` select, each once, in order.
fn split_targets(targets: &[String]) -> Vec<&str> {
    let mut split: Vec<&str> = Vec::new();
    for t in targets.iter().flat_map(|t| split_target(t)) {
        if !split.contains(&t) {
            split.push(t);
        }
    }
    split
}

/// `(module name, out, in)` of every projection a target name selects.
fn targets(cfg: &ModelConfig, lora: &LoraConfig) -> Result<Vec<(String, usize, usize)>> {
    let h = cfg.hidden_size;
    let mut out = Vec::new();
    for t in split_targets(&lora.target_modules) {
        let (out_dim, in_dim) = match t {
            "q_proj" => (cfg.q_dim(), h),
            "k_proj" | "v_proj" => (cfg.kv_dim(), h),
            "o_proj" => (h, cfg.q_dim()),
            "gate_proj" | "up_proj" => (cfg.intermediate_size, h),
            "down_proj" => (h, cfg.intermediate_size),
            other => {
                return Err(Error::InvalidConfig {
                    what: format!("LoRA target `{other}` is not a projection of this model"),
                })
            }
        };
        for i in 0..cfg.num_hidden_layers {
            out.push((crate::checkpoint::names::projection(i, t), out_dim, in_dim));
        }
    }
    Ok(out)
}

impl Adapter {
    /// A fresh adapter: A random (normal, std `1/sqrt(in)`; PEFT draws Kaiming-uniform, about
    /// 1.7x narrower), B zero as in PEFT, so it starts as a no-op.
    pub fn init(model: &ModelConfig, config: LoraConfig, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let mut modules = HashMap::new();
        for (name, out, inp) in targets(model, &config)? {
            let a = Tensor::from_vec(
                rng.normal_vec(config.r * inp, 0.0, 1.0 / (inp as f32).sqrt()),
                (config.r, inp),
                &Device::Cpu,
            )?;
            let b = Tensor::zeros((out, config.r), candle_core::DType::F32, &Device::Cpu)?;
            modules.insert(name, (a, b));
        }
        Ok(Adapter { config, modules })
    }

    /// The low-rank update `scale * B A` of one module, `[out, in]`.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        match self.modules.get(module) {
            Some((a, b)) => Ok(Some((b.matmul(a)? * self.config.scale())?)),
            None => Ok(None),
        }
    }

    /// Base weights with every update folded in (for export): `W + scale * B A`. An adapter
    /// trained on Phi-3's fused `qkv_proj` or `gate_up_proj` updates the separate projections
    /// edgelm reads them as ([`crate::checkpoint::phi3`]): the update's rows split the same way.
    pub fn merge(&self, base: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let mut out = base.clone();
        for module in self.modules.keys() {
            let delta = self.delta(module)?.expect("module exists");
            let name = format!("{module}.weight");
            let parts: Vec<String> = match crate::checkpoint::phi3::fused_parts(module) {
                Some(parts) if !out.contains_key(&name) => parts.iter().map(|p| format!("{p}.weight")).collect(),
                _ => vec![name],
            };
            let mut start = 0;
            for part in parts {
                let w = out
                    .get(&part)
                    .ok_or_else(|| Error::Tensor { name: part.clone(), what: "missing from the base".into() })?;
                let rows = w.dims()[0];
                if start + rows > delta.dims()[0] {
                    return Err(Error::Tensor {
                        name: module.clone(),
                        what: format!("an update of {} rows does not cover the base's {part}", delta.dims()[0]),
                    });
                }
                let merged = (w + delta.narrow(0, start, rows)?)?;
                out.insert(part, merged);
                start += rows;
            }
            if start != delta.dims()[0] {
                return Err(Error::Tensor {
                    name: module.clone(),
                    what: format!("an update of {} rows for base weights of {start}", delta.dims()[0]),
                });
            }
        }
        Ok(out)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout. For a base
    /// that stores Phi-3's fused projections (`fused`: its config; see
    /// [`crate::checkpoint::phi3`]) the adapter is written on those, so PEFT loads it onto the Phi-3 model: see
    /// [`Adapter::on_fused_projections`].
    pub fn save_peft(&self, dir: &Path, base_model: &str, fused: Option<&ModelConfig>) -> Result<()> {
        std::fs::create_dir_all(dir).at(dir)?;
        let (modules, targets, mut ranks) = if let Some(c) = fused {
            self.on_fused_projections(c)?
        } else {
            // The modules trained: a fused name given as a target was split.
            let split = split_targets(&self.config.target_modules).into_iter().map(String::from).collect();
            (self.modules.clone(), split, HashMap::new())
        };
        // Any other module of its own rank (one read from PEFT with a rank pattern) is named.
        for (m, (a, _)) in &modules {
            let rank = a.dims()[0];
            if pattern(&ranks, m).copied().unwrap_or(self.config.r) != rank {
                ranks.insert(m.clone(), rank);
            }
        }
        // A fused module's rank is r per adapted part; alphas grow with ranks, so every module
        // keeps the scale alpha / r.
        let alphas: HashMap<&String, f64> =
            ranks.iter().map(|(k, r)| (k, self.config.lora_alpha * *r as f64 / self.config.r as f64)).collect();
        let cfg = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.config.r, "lora_alpha": self.config.lora_alpha, "target_modules": targets,
            "rank_pattern": ranks, "alpha_pattern": alphas,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
            "use_rslora": false, "init_lora_weights": true,
        });
        let p = dir.join("adapter_config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).at(&p)?;
        let mut tensors = HashMap::new();
        for (m, (a, b)) in &modules {
            tensors.insert(format!("{PEFT_PREFIX}{m}.lora_A.weight"), a.clone());
            tensors.insert(format!("{PEFT_PREFIX}{m}.lora_B.weight"), b.clone());
        }
        let file = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &file)
            .map_err(|e| Error::Format { path: file.clone(), what: e.to_string() })
    }

    /// The adapter on Phi-3's fused `qkv_proj` / `gate_up_proj` (of a model shaped `c`) instead
    /// of the separate projections it was trained on: a fused module's A stacks its adapted
    /// parts' A, and its B holds each adapted part's B in that part's rows and rank columns
    /// (zeros elsewhere, and in the rows of parts left unadapted), so its B A is the parts'
    /// updates stacked, exactly. Returns the modules, the target names, and the rank of each
    /// fused target (r per adapted part).
    #[allow(clippy::type_complexity)]
    pub fn on_fused_projections(
        &self,
        c: &ModelConfig,
    ) -> Result<(HashMap<String, (Tensor, Tensor)>, Vec<String>, HashMap<String, usize>)> {
        use crate::checkpoint::{names, phi3};
        let mut modules = self.modules.clone();
        let mut ranks = HashMap::new();
        for layer in 0..c.num_hidden_layers {
            for (fused, parts) in phi3::FUSED {
                let spans = phi3::part_rows(c, parts);
                let total: usize = spans.iter().map(|&(_, _, rows)| rows).sum();
                let (mut a_parts, mut b_cols) = (Vec::new(), Vec::new());
                for (part, start, n) in spans {
                    if let Some((a, b)) = modules.remove(&names::in_layer(layer, part)) {
                        let r = a.dims()[0];
                        let mut col = Vec::new();
                        if start > 0 {
                            col.push(Tensor::zeros((start, r), b.dtype(), b.device())?);
                        }
                        col.push(b);
                        if start + n < total {
                            col.push(Tensor::zeros((total - start - n, r), a.dtype(), a.device())?);
                        }
                        b_cols.push(Tensor::cat(&col, 0)?);
                        a_parts.push(a);
                    }
                }
                if a_parts.is_empty() {
                    continue;
                }
                let rank = a_parts.iter().map(|a| a.dims()[0]).sum();
                ranks.insert(fused.rsplit('.').next().expect("a name").to_owned(), rank);
                modules.insert(names::in_layer(layer, fused), (Tensor::cat(&a_parts, 0)?, Tensor::cat(&b_cols, 1)?));
            }
        }
        let mut targets: Vec<String> = modules.keys().filter_map(|m| m.rsplit('.').next().map(str::to_owned)).collect();
        targets.sort();
        targets.dedup();
        Ok((modules, targets, ranks))
    }

    /// Reads an adapter saved by [`Adapter::save_peft`] or by `peft`. PEFT's rank-stabilised
    /// scale (`use_rslora`: `alpha / sqrt(r)`) and per-module ranks and alphas (`rank_pattern`,
    /// `alpha_pattern`) are folded into each module's B, so [`LoraConfig::scale`] applies to
    /// every module; what an adapter changes besides A and B (DoRA magnitudes, trained biases,
    /// `modules_to_save`, embedding adapters, `fan_in_fan_out` layouts) is refused, not dropped.
    pub fn load_peft(dir: &Path) -> Result<Self> {
        let p = dir.join("adapter_config.json");
        let peft: PeftConfig = serde_json::from_str(&std::fs::read_to_string(&p).at(&p)?)
            .map_err(|e| Error::InvalidConfig { what: format!("{}: {e}", p.display()) })?;
        peft.check().map_err(|what| Error::Unsupported { what: format!("{}: {what}", p.display()) })?;
        let config = peft.lora();
        let file = dir.join("adapter_model.safetensors");
        let raw = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| Error::Tensor { name: file.display().to_string(), what: e.to_string() })?;
        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, t) in raw {
            let t = t.to_dtype(candle_core::DType::F32)?;
            let name = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_owned();
            if let Some(m) = name.strip_suffix(".lora_A.weight") {
                halves.entry(m.to_owned()).or_default().0 = Some(t);
            } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
                halves.entry(m.to_owned()).or_default().1 = Some(t);
            } else {
                return Err(Error::Unsupported {
                    what: format!(
                        "{}: tensor `{name}` is not a LoRA A or B matrix (DoRA, trained biases, \
                         modules_to_save and embedding adapters are not read)",
                        file.display()
                    ),
                });
            }
        }
        let mut modules = HashMap::new();
        for (m, (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let (r, alpha) = (peft.rank_of(&m), peft.alpha_of(&m));
                    if a.dims().first() != Some(&r) || b.dims().get(1) != Some(&r) {
                        return Err(Error::Tensor {
                            name: m,
                            what: format!("A {:?} and B {:?} do not have the configured rank {r}", a.dims(), b.dims()),
                        });
                    }
                    let scale = if peft.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
                    let b = if scale == config.scale() { b } else { (b * (scale / config.scale()))? };
                    modules.insert(m, (a, b));
                }
                _ => return Err(Error::Tensor { name: m, what: "has only one of lora_A and lora_B".into() }),
            }
        }
        Ok(Adapter { config, modules })
    }
}

/// The part of PEFT's `adapter_config.json` that decides what an adapter's tensors mean.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

/// PEFT writes a list of names, or one regular expression as a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl PeftConfig {
    /// What this reader cannot apply faithfully, named.
    fn check(&self) -> std::result::Result<(), String> {
        if let Some(t) = self.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(format!("peft_type {t}: only LORA adapters are read"));
        }
        if self.r == 0 {
            return Err("rank r is 0".into());
        }
        if self.use_dora {
            return Err("use_dora: DoRA adapters are not read (merge them with peft first)".into());
        }
        if self.fan_in_fan_out {
            return Err("fan_in_fan_out: transposed (Conv1D) layouts are not read".into());
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(format!("bias {b}: adapters with trained biases are not read"));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err("modules_to_save: adapters carrying whole modules are not read".into());
        }
        let special = |k: &String| k.chars().any(|c| "*+?[](){}|^$\\".contains(c));
        if let Some(k) = self.rank_pattern.keys().chain(self.alpha_pattern.keys()).find(|k| special(k)) {
            return Err(format!("pattern key `{k}`: only plain module names or name endings are read"));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(format!("rank_pattern gives `{k}` rank 0"));
        }
        Ok(())
    }

    /// The adapter-wide settings (the per-module ones are folded into B).
    fn lora(&self) -> LoraConfig {
        let target_modules = match &self.target_modules {
            TargetModules::List(l) => l.clone(),
            TargetModules::One(s) => vec![s.clone()],
        };
        LoraConfig { r: self.r, lora_alpha: self.lora_alpha, target_modules }
    }

    fn rank_of(&self, module: &str) -> usize {
        pattern(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    fn alpha_of(&self, module: &str) -> f64 {
        pattern(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha)
    }
}

/// The value of the most specific key naming `module` whole or by its ending after a dot
/// (`q_proj`, `layers.3.self_attn.q_proj`), as PEFT matches them.
fn pattern<'a, T>(patterns: &'a HashMap<String, T>, module: &str) -> Option<&'a T> {
    patterns
        .iter()
        .filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v)
}

impl Adapter {
    /// The A and B matrices as one flat map (`<module>.lora_A`, `<module>.lora_B`), the form
    /// the trainer optimises.
    pub fn to_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (m, (a, b)) in &self.modules {
            out.insert(format!("{m}.lora_A"), a.clone());
            out.insert(format!("{m}.lora_B"), b.clone());
        }
        out
    }

    /// The inverse of [`Adapter::to_tensors`].
    pub fn from_tensors(config: LoraConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let mut modules = HashMap::new();
        for (name, a) in tensors {
            let Some(m) = name.strip_suffix(".lora_A") else { continue };
            let b = tensors
                .get(&format!("{m}.lora_B"))
                .ok_or_else(|| Error::Tensor { name: m.into(), what: "has only one of lora_A and lora_B".into() })?;
            modules.insert(m.to_owned(), (a.clone(), b.clone()));
        }
        Ok(Adapter { config, modules })
    }
}
