//! Structured pruning: remove whole MLP hidden units and whole attention KV groups, so every
//! pruned matrix is smaller and a dense kernel runs it faster.
//!
//! Importance is measured on calibration tokens (`LlamaModel::accumulate_importance`): an MLP
//! unit by how much it writes into the residual stream (`|unit| * ||down column||`), a KV group
//! by the same for the query heads that read it (through their `o_proj` columns). Under GQA a
//! group goes with all of its query heads, so `heads / kv_heads` stays whole. A HF config has one
//! MLP width and one head count for every layer, so each layer loses the same number of units
//! and groups, each layer its own least important ones. Kept units stay in their order.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::checkpoint::write::{copy_tokenizer_files, derive_generation_config, write_checkpoint, WriteOptions};
use crate::checkpoint::{names, Checkpoint, ModelConfig};
use crate::error::{Error, IoContext, Result};
use crate::model::{LlamaModel, UnitImportance};

/// How much to remove.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOptions {
    /// Share of each layer's MLP hidden units to remove (0..1).
    pub mlp: f64,
    /// Share of each layer's attention heads to remove (0..1), rounded to whole KV groups; at
    /// least one group stays.
    pub heads: f64,
    /// Share of the query heads of every remaining KV group to remove (0..1), the same number in
    /// each group; keys and values stay. At least one query head per group stays.
    #[serde(default)]
    pub query_heads: f64,
}

impl StructuredOptions {
    /// Fails on a share outside [0, 1), or a share above 0 that removes nothing from `config`
    /// (each rounds to whole units per layer: MLP units, KV groups, query heads per group):
    /// checked before the importance is measured, which takes a pass over the calibration data.
    pub fn check(&self, config: &ModelConfig) -> Result<()> {
        let (mlp, groups, queries) = kept_counts(config, self)?;
        let per_group = config.num_attention_heads / config.num_key_value_heads;
        let shares = [
            ("mlp", self.mlp, mlp, config.intermediate_size, "MLP units"),
            ("heads", self.heads, groups, config.num_key_value_heads, "KV groups"),
            ("query_heads", self.query_heads, queries, per_group, "query heads per KV group"),
        ];
        for (name, share, kept, whole, what) in shares {
            if share > 0.0 && kept == whole {
                let why = if whole == 1 {
                    "one must stay".to_string()
                } else {
                    format!(
                        "each layer keeps a whole number; a share of at least {:.3} removes one",
                        0.5 / whole as f64
                    )
                };
                return Err(Error::InvalidConfig {
                    what: format!("structured pruning: {name} {share} removes none of the {whole} {what} ({why})"),
                });
            }
        }
        Ok(())
    }
}

/// What structured pruning did.
#[derive(Debug, Clone, Serialize)]
pub struct StructuredReport {
    /// MLP width before and after.
    pub intermediate_size: (usize, usize),
    /// Query heads before and after.
    pub attention_heads: (usize, usize),
    /// KV groups before and after.
    pub kv_heads: (usize, usize),
    /// Parameters before and after.
    pub parameters: (usize, usize),
    /// Per layer, the KV groups removed (original indices).
    pub removed_groups: Vec<Vec<usize>>,
    /// Per layer, the share of the MLP's calibration importance the kept units carry.
    pub mlp_importance_kept: Vec<f64>,
    /// Calibration tokens the importance was measured on.
    pub calibration_tokens: usize,
}

/// The first `n` of `examples` as `ck` reads them (prompt and answer), cut to its context:
/// the calibration sequences importance is measured on.
pub fn calibration_sequences(ck: &Checkpoint, examples: &[crate::data::Example], n: usize) -> Result<Vec<Vec<u32>>> {
    let f = crate::train::batch::Formatter::for_checkpoint(ck)?;
    let ctx = ck.config.max_position_embeddings;
    examples.iter().take(n).map(|e| f.encode(e).map(|x| x.ids.into_iter().take(ctx).collect())).collect()
}

/// Sums the importance of every unit over `sequences` (token ids, each run on its own so no
/// padding enters the statistics).
pub fn measure_importance(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    sequences: &[Vec<u32>],
) -> Result<UnitImportance> {
    if sequences.iter().all(|s| s.is_empty()) {
        return Err(Error::InvalidConfig { what: "structured pruning needs calibration tokens, got none".into() });
    }
    let model = LlamaModel::from_tensors(config, tensors)?;
    let mut acc = UnitImportance::default();
    for seq in sequences.iter().filter(|s| !s.is_empty()) {
        let ids = &seq[..seq.len().min(config.max_position_embeddings)];
        model.accumulate_importance(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?, &mut acc)?;
    }
    Ok(acc)
}

/// Indices of the `k` largest scores, in ascending index order (ties: the lower index).
pub(crate) fn keep_top(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Units, groups and query heads per group each layer keeps.
fn kept_counts(config: &ModelConfig, opts: &StructuredOptions) -> Result<(usize, usize, usize)> {
    for (what, share) in [("mlp", opts.mlp), ("heads", opts.heads), ("query_heads", opts.query_heads)] {
        if !(0.0..1.0).contains(&share) {
            return Err(Error::InvalidConfig {
                what: format!("structured pruning: {what} share {share} is not in [0, 1)"),
            });
        }
    }
    let inter = config.intermediate_size;
    let mlp = (inter - (inter as f64 * opts.mlp).round() as usize).max(1);
    let kv = config.num_key_value_heads;
    let groups = (kv - (kv as f64 * opts.heads).round() as usize).max(1);
    let per_group = config.num_attention_heads / kv;
    let queries = (per_group - (per_group as f64 * opts.query_heads).round() as usize).max(1);
    Ok((mlp, groups, queries))
}

/// The pruned configuration and weights. `importance` must come from this model.
pub fn prune_structured(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    importance: &UnitImportance,
    opts: &StructuredOptions,
) -> Result<(ModelConfig, HashMap<String, Tensor>, StructuredReport)> {
    let c = config;
    let layers = c.num_hidden_layers;
    if importance.mlp.len() != layers
        || importance.heads.len() != layers
        || importance.mlp.iter().any(|m| m.len() != c.intermediate_size)
        || importance.heads.iter().any(|h| h.len() != c.num_attention_heads)
    {
        return Err(Error::InvalidConfig {
            what: "structured pruning: the importance scores were measured on a model of another shape".into(),
        });
    }
    let (mlp_keep, groups_keep, queries_keep) = kept_counts(c, opts)?;
    let per_group = c.num_attention_heads / c.num_key_value_heads;
    let d = c.head_dim;
    let get = |name: &str| -> Result<&Tensor> {
        tensors.get(name).ok_or_else(|| Error::Tensor { name: name.into(), what: "missing from the checkpoint".into() })
    };
    let index = |rows: &[usize]| -> Result<Tensor> {
        let v: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(Tensor::new(v.as_slice(), &Device::Cpu)?)
    };
    // Every tensor outside the layers' projections is kept whole.
    let mut out: HashMap<String, Tensor> = tensors.clone();
    let mut removed_groups = Vec::with_capacity(layers);
    let mut mlp_importance_kept = Vec::with_capacity(layers);
    for l in 0..layers {
        let name = |proj: &str, part: &str| format!("{}.{part}", names::projection(l, proj));
        // KV groups: score = sum over the group's query heads.
        let group_scores: Vec<f64> = (0..c.num_key_value_heads)
            .map(|g| importance.heads[l][g * per_group..(g + 1) * per_group].iter().sum())
            .collect();
        let groups = keep_top(&group_scores, groups_keep);
        removed_groups.push((0..c.num_key_value_heads).filter(|g| !groups.contains(g)).collect());
        // In each kept group its most important query heads; the rows of q (and columns of
        // o_proj) of those heads, and the rows of k and v of the kept groups.
        let heads: Vec<usize> = groups
            .iter()
            .flat_map(|&g| {
                let first = g * per_group;
                keep_top(&importance.heads[l][first..first + per_group], queries_keep)
                    .into_iter()
                    .map(move |h| first + h)
            })
            .collect();
        let q_rows: Vec<usize> = heads.iter().flat_map(|&h| h * d..(h + 1) * d).collect();
        let kv_rows: Vec<usize> = groups.iter().flat_map(|&g| g * d..(g + 1) * d).collect();
        let (q_idx, kv_idx) = (index(&q_rows)?, index(&kv_rows)?);
        for (proj, idx) in [("q_proj", &q_idx), ("k_proj", &kv_idx), ("v_proj", &kv_idx)] {
            out.insert(name(proj, "weight"), get(&name(proj, "weight"))?.index_select(idx, 0)?);
            if c.qkv_bias {
                out.insert(name(proj, "bias"), get(&name(proj, "bias"))?.index_select(idx, 0)?);
            }
        }
        out.insert(name("o_proj", "weight"), get(&name("o_proj", "weight"))?.index_select(&q_idx, 1)?);
        // MLP units.
        let units = keep_top(&importance.mlp[l], mlp_keep);
        let total: f64 = importance.mlp[l].iter().sum();
        let kept: f64 = units.iter().map(|&u| importance.mlp[l][u]).sum();
        mlp_importance_kept.push(if total > 0.0 { kept / total } else { 1.0 });
        let unit_idx = index(&units)?;
        for proj in ["gate_proj", "up_proj"] {
            out.insert(name(proj, "weight"), get(&name(proj, "weight"))?.index_select(&unit_idx, 0)?);
            if c.mlp_bias {
                out.insert(name(proj, "bias"), get(&name(proj, "bias"))?.index_select(&unit_idx, 0)?);
            }
        }
        out.insert(name("down_proj", "weight"), get(&name("down_proj", "weight"))?.index_select(&unit_idx, 1)?);
    }
    let pruned = ModelConfig {
        intermediate_size: mlp_keep,
        num_attention_heads: groups_keep * queries_keep,
        num_key_value_heads: groups_keep,
        // head_dim stays; the config states it, as hidden / heads no longer gives it.
        ..c.clone()
    };
    let out = out.into_iter().map(|(k, v)| Ok((k, v.contiguous()?.copy()?))).collect::<Result<_>>()?;
    let report = StructuredReport {
        intermediate_size: (c.intermediate_size, pruned.intermediate_size),
        attention_heads: (c.num_attention_heads, pruned.num_attention_heads),
        kv_heads: (c.num_key_value_heads, pruned.num_key_value_heads),
        parameters: (c.num_parameters(), pruned.num_parameters()),
        removed_groups,
        mlp_importance_kept,
        calibration_tokens: importance.tokens,
    };
    Ok((pruned, out, report))
}

impl StructuredReport {
    /// What was removed, in one line: widths, heads, groups and parameters before and after.
    pub fn summary(&self) -> String {
        format!(
            "MLP {} -> {} units, heads {} -> {} ({} -> {} KV groups), {} -> {} parameters",
            self.intermediate_size.0,
            self.intermediate_size.1,
            self.attention_heads.0,
            self.attention_heads.1,
            self.kv_heads.0,
            self.kv_heads.1,
            self.parameters.0,
            self.parameters.1
        )
    }

    /// Writes the report as `structured_prune_report.json` into the checkpoint folder `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join("structured_prune_report.json");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Format { path: path.clone(), what: e.to_string() })?;
        std::fs::write(&path, text).at(&path)
    }
}

/// Writes a pruned checkpoint (weights, generation config, the source's tokenizer files and
/// the report) to `out`; `source` is the folder of the model it was cut from.
pub fn write_pruned(
    source: &Path,
    out: &Path,
    (config, tensors): (&ModelConfig, &HashMap<String, Tensor>),
    report: &StructuredReport,
) -> Result<()> {
    write_checkpoint(out, config, tensors, WriteOptions::default())?;
    derive_generation_config(source, out, config)?;
    copy_tokenizer_files(source, out)?;
    report.write(out)
}

/// Measures importance on `calibration`, prunes `ck` and writes the smaller checkpoint (with
/// its tokenizer and `structured_prune_report.json`) to `out`.
pub fn prune_checkpoint_structured(
    ck: &Checkpoint,
    calibration: &[Vec<u32>],
    out: &Path,
    opts: &StructuredOptions,
) -> Result<StructuredReport> {
    opts.check(&ck.config)?;
    let importance = measure_importance(&ck.config, &ck.tensors, calibration)?;
    let (config, tensors, report) = prune_structured(&ck.config, &ck.tensors, &importance, opts)?;
    write_pruned(&ck.dir, out, (&config, &tensors), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset::{preset_config, random_weights};

    fn ids(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7919 + seed * 104_729) % vocab as u32).collect()
    }

    /// A share above 0 that rounds to no unit is refused by name; one that removes some passes.
    #[test]
    fn a_share_that_removes_nothing_is_refused() {
        let cfg = preset_config("tiny").unwrap();
        let opts = |mlp, heads| StructuredOptions { mlp, heads, query_heads: 0.0 };
        assert!(opts(0.25, 0.5).check(&cfg).is_ok());
        let groups = cfg.num_key_value_heads;
        let tiny_share = 0.4 / groups as f64;
        let e = opts(0.25, tiny_share).check(&cfg).unwrap_err().to_string();
        assert!(e.contains("heads") && e.contains(&format!("none of the {groups} KV groups")), "{e}");
        let e = opts(0.1 / cfg.intermediate_size as f64, 0.0).check(&cfg).unwrap_err().to_string();
        assert!(e.contains("mlp") && e.contains("MLP units"), "{e}");
        assert!(opts(1.0, 0.0).check(&cfg).unwrap_err().to_string().contains("not in [0, 1)"));
    }

    #[test]
    fn keep_top_keeps_the_largest_in_order() {
        assert_eq!(keep_top(&[0.5, 3.0, 1.0, 3.0, 0.1], 3), vec![1, 2, 3]);
        assert_eq!(keep_top(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
    }

    #[test]
    fn pruning_nothing_is_the_same_model() {
        let cfg = preset_config("tiny").unwrap();
        let w = random_weights(&cfg, 1).unwrap();
        let imp = measure_importance(&cfg, &w, &[ids(12, 1, cfg.vocab_size)]).unwrap();
        let (pcfg, pw, rep) =
            prune_structured(&cfg, &w, &imp, &StructuredOptions { mlp: 0.0, heads: 0.0, query_heads: 0.0 }).unwrap();
        assert_eq!(pcfg, cfg);
        assert_eq!(rep.parameters.0, rep.parameters.1);
        let x = Tensor::new(ids(9, 2, cfg.vocab_size).as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = LlamaModel::from_tensors(&cfg, &w).unwrap().forward(&x, &mut Default::default()).unwrap();
        let b = LlamaModel::from_tensors(&pcfg, &pw).unwrap().forward(&x, &mut Default::default()).unwrap();
        assert_eq!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// A unit or group whose output is zeroed contributes nothing: pruning must pick it first,
    /// and removing it must leave the model's outputs exactly as they were.
    #[test]
    fn dead_units_and_groups_go_first_and_their_removal_changes_nothing() {
        let cfg = preset_config("tiny-qwen2").unwrap();
        assert!(cfg.num_key_value_heads >= 2 && cfg.num_attention_heads > cfg.num_key_value_heads);
        let mut w = random_weights(&cfg, 7).unwrap();
        let per_group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let d = cfg.head_dim;
        let dead_group = 1;
        let dead_units: Vec<usize> = (0..cfg.intermediate_size).step_by(2).collect();
        for l in 0..cfg.num_hidden_layers {
            // Zero the o_proj columns of group 1's query heads and half the down_proj columns.
            let o = format!("{}.weight", names::projection(l, "o_proj"));
            let mut ov = w[&o].to_vec2::<f32>().unwrap();
            for row in ov.iter_mut() {
                for v in &mut row[dead_group * per_group * d..(dead_group + 1) * per_group * d] {
                    *v = 0.0;
                }
            }
            w.insert(o, Tensor::new(ov, &Device::Cpu).unwrap());
            let down = format!("{}.weight", names::projection(l, "down_proj"));
            let mut dv = w[&down].to_vec2::<f32>().unwrap();
            for row in dv.iter_mut() {
                for &u in &dead_units {
                    row[u] = 0.0;
                }
            }
            w.insert(down, Tensor::new(dv, &Device::Cpu).unwrap());
        }
        let calib: Vec<Vec<u32>> = (0..3).map(|s| ids(10, s, cfg.vocab_size)).collect();
        let imp = measure_importance(&cfg, &w, &calib).unwrap();
        assert_eq!(imp.tokens, 30);
        let share_groups = 1.0 / cfg.num_key_value_heads as f64;
        let opts = StructuredOptions { mlp: 0.5, heads: share_groups, query_heads: 0.0 };
        let (pcfg, pw, rep) = prune_structured(&cfg, &w, &imp, &opts).unwrap();
        assert_eq!(pcfg.intermediate_size, cfg.intermediate_size / 2);
        assert_eq!(pcfg.num_key_value_heads, cfg.num_key_value_heads - 1);
        assert_eq!(pcfg.num_attention_heads, pcfg.num_key_value_heads * per_group);
        assert_eq!(pcfg.head_dim, cfg.head_dim);
        assert!(rep.removed_groups.iter().all(|g| g == &vec![dead_group]), "{:?}", rep.removed_groups);
        assert!(rep.mlp_importance_kept.iter().all(|&k| (k - 1.0).abs() < 1e-9));
        assert!(rep.parameters.1 < rep.parameters.0);
        // Query heads: zero the o_proj columns of the second query head of every group; pruning
        // half of each group's queries removes exactly those and keeps every KV group.
        let mut wq = random_weights(&cfg, 8).unwrap();
        for l in 0..cfg.num_hidden_layers {
            let o = format!("{}.weight", names::projection(l, "o_proj"));
            let mut ov = wq[&o].to_vec2::<f32>().unwrap();
            for row in ov.iter_mut() {
                for g in 0..cfg.num_key_value_heads {
                    let h = g * per_group + 1;
                    row[h * d..(h + 1) * d].iter_mut().for_each(|v| *v = 0.0);
                }
            }
            wq.insert(o, Tensor::new(ov, &Device::Cpu).unwrap());
        }
        let impq = measure_importance(&cfg, &wq, &calib).unwrap();
        let qopts = StructuredOptions { mlp: 0.0, heads: 0.0, query_heads: 0.5 };
        let (qcfg, qw, _) = prune_structured(&cfg, &wq, &impq, &qopts).unwrap();
        assert_eq!(qcfg.num_key_value_heads, cfg.num_key_value_heads);
        assert_eq!(qcfg.num_attention_heads, cfg.num_attention_heads / 2);
        let x0 = Tensor::new(ids(11, 3, cfg.vocab_size).as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = LlamaModel::from_tensors(&cfg, &wq).unwrap().forward(&x0, &mut Default::default()).unwrap();
        let b = LlamaModel::from_tensors(&qcfg, &qw).unwrap().forward(&x0, &mut Default::default()).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "query-pruned model differs by {diff}");
        // Same outputs (up to summation order) from a smaller model.
        let x = Tensor::new(ids(11, 9, cfg.vocab_size).as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = LlamaModel::from_tensors(&cfg, &w).unwrap().forward(&x, &mut Default::default()).unwrap();
        let b = LlamaModel::from_tensors(&pcfg, &pw).unwrap().forward(&x, &mut Default::default()).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "pruned model differs by {diff}");
    }

    #[test]
    fn bad_shares_and_foreign_scores_are_refused() {
        let cfg = preset_config("tiny").unwrap();
        let w = random_weights(&cfg, 1).unwrap();
        let imp = measure_importance(&cfg, &w, &[ids(5, 1, cfg.vocab_size)]).unwrap();
        for (mlp, heads) in [(1.0, 0.0), (-0.1, 0.0), (0.0, 1.5)] {
            let e = prune_structured(&cfg, &w, &imp, &StructuredOptions { mlp, heads, query_heads: 0.0 }).unwrap_err();
            assert!(e.to_string().contains("not in [0, 1)"), "{e}");
        }
        let other = UnitImportance { mlp: vec![vec![1.0; 3]], heads: vec![vec![1.0; 2]], tokens: 1 };
        assert!(
            prune_structured(&cfg, &w, &other, &StructuredOptions { mlp: 0.5, heads: 0.0, query_heads: 0.0 }).is_err()
        );
        assert!(measure_importance(&cfg, &w, &[vec![]]).is_err());
    }
}
