//! Magnitude pruning: zero the smallest weights of a checkpoint's projections.
//!
//! Dense kernels run zeros as fast as any other value, so this alone buys no speed on a board;
//! it measures how much of a model is redundant, feeds compression that does exploit zeros,
//! and is the baseline structured pruning is compared with. Norms are never pruned, and the
//! embedding and LM head only when asked (they hold every token's identity).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::checkpoint::{write::WriteOptions, write_checkpoint, Checkpoint, DecoderWeights};
use crate::error::{Error, Result};

/// How much to prune.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PruneAmount {
    /// This share of the targeted weights (0..1), those of smallest magnitude.
    Sparsity(f64),
    /// Every targeted weight with `|w| < threshold`.
    Threshold(f32),
}

/// Over which weights a sparsity's magnitude cut is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneScope {
    /// One cut over every targeted weight: layers that matter less lose more.
    Global,
    /// Each layer (its seven projections together) loses the same share.
    Layer,
}

/// Pruning settings.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Share or threshold.
    pub amount: PruneAmount,
    /// Where a sparsity's cut is chosen.
    pub scope: PruneScope,
    /// Prune the embedding (and an untied LM head) too.
    pub embeddings: bool,
}

/// One tensor's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorSparsity {
    /// Tensor name.
    pub name: String,
    /// Weights in it.
    pub weights: usize,
    /// Share that is zero after pruning.
    pub sparsity: f64,
}

/// What pruning did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    /// Per targeted tensor, in name order.
    pub tensors: Vec<TensorSparsity>,
    /// Zero share over the targeted weights.
    pub targeted_sparsity: f64,
    /// Zero share over every weight of the model.
    pub model_sparsity: f64,
}

/// Names of the tensors pruning may touch, grouped by layer (the embedding group last).
fn targets(ck: &Checkpoint, embeddings: bool) -> Result<Vec<Vec<String>>> {
    let w = DecoderWeights::from_map(&ck.tensors, &ck.config)?;
    let mut groups: Vec<Vec<String>> =
        w.layers.iter().map(|l| l.projections().iter().map(|(_, p)| format!("{}.weight", p.name)).collect()).collect();
    if embeddings {
        let mut g = vec![crate::checkpoint::names::EMBED.to_owned()];
        if w.lm_head.is_some() {
            g.push(crate::checkpoint::names::LM_HEAD.to_owned());
        }
        groups.push(g);
    }
    Ok(groups)
}

/// The magnitude below which `share` of `values` lie (the cut keeps `|w| >= cut`, pruning
/// exactly `round(share * n)` weights when magnitudes are distinct).
fn cut_for(mut magnitudes: Vec<f32>, share: f64) -> f32 {
    let k = ((share * magnitudes.len() as f64).round() as usize).min(magnitudes.len());
    if k == 0 {
        return 0.0;
    }
    if k == magnitudes.len() {
        return f32::INFINITY;
    }
    let (_, kth, _) = magnitudes.select_nth_unstable_by(k, f32::total_cmp);
    *kth
}

fn magnitudes(tensors: &HashMap<String, Tensor>, names: &[String]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for n in names {
        out.extend(tensors[n].flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::abs));
    }
    Ok(out)
}

/// Prunes `ck`'s weights by magnitude; returns the new weights and what was done.
pub fn prune(ck: &Checkpoint, opts: &PruneOptions) -> Result<(HashMap<String, Tensor>, PruneReport)> {
    if let PruneAmount::Sparsity(s) = opts.amount {
        if !(0.0..1.0).contains(&s) {
            return Err(Error::InvalidConfig {
                what: format!("sparsity {s}: give a share from 0 up to (not including) 1"),
            });
        }
    }
    if let PruneAmount::Threshold(t) = opts.amount {
        if !(t >= 0.0 && t.is_finite()) {
            return Err(Error::InvalidConfig { what: format!("threshold {t}: give a finite magnitude >= 0") });
        }
    }
    let groups = targets(ck, opts.embeddings)?;
    // One cut per group of tensors sharing it.
    let cuts: Vec<(Vec<String>, f32)> = match (opts.amount, opts.scope) {
        (PruneAmount::Threshold(t), _) => vec![(groups.concat(), t)],
        (PruneAmount::Sparsity(s), PruneScope::Global) => {
            let all = groups.concat();
            let cut = cut_for(magnitudes(&ck.tensors, &all)?, s);
            vec![(all, cut)]
        }
        (PruneAmount::Sparsity(s), PruneScope::Layer) => groups
            .into_iter()
            .map(|g| Ok((g.clone(), cut_for(magnitudes(&ck.tensors, &g)?, s))))
            .collect::<Result<_>>()?,
    };
    let mut tensors = ck.tensors.clone();
    let mut report = vec![];
    let (mut zeros, mut targeted) = (0usize, 0usize);
    for (names, cut) in cuts {
        for name in names {
            let t = &ck.tensors[&name];
            let keep = t.abs()?.ge(cut as f64)?.to_dtype(t.dtype())?;
            let pruned = (t * keep)?;
            let n = pruned.elem_count();
            let z = n - pruned.ne(0f64)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
            zeros += z;
            targeted += n;
            report.push(TensorSparsity { name: name.clone(), weights: n, sparsity: z as f64 / n as f64 });
            tensors.insert(name, pruned);
        }
    }
    report.sort_by(|a, b| a.name.cmp(&b.name));
    let total: usize = tensors.values().map(Tensor::elem_count).sum();
    let others_zero: usize = tensors
        .iter()
        .filter(|(n, _)| !report.iter().any(|r| &r.name == *n))
        .map(|(_, t)| {
            Ok(t.elem_count() - t.ne(0f64)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize)
        })
        .sum::<Result<usize>>()?;
    Ok((
        tensors,
        PruneReport {
            tensors: report,
            targeted_sparsity: zeros as f64 / targeted.max(1) as f64,
            model_sparsity: (zeros + others_zero) as f64 / total.max(1) as f64,
        },
    ))
}

/// Prunes the checkpoint in `ck` into `out` (config, weights, tokenizer files, and
/// `prune_report.json`).
pub fn prune_checkpoint(ck: &Checkpoint, out: &Path, opts: &PruneOptions) -> Result<PruneReport> {
    let (tensors, report) = prune(ck, opts)?;
    write_checkpoint(out, &ck.config, &tensors, WriteOptions::default())?;
    crate::checkpoint::write::derive_generation_config(&ck.dir, out, &ck.config)?;
    crate::checkpoint::write::copy_tokenizer_files(&ck.dir, out)?;
    let p = out.join("prune_report.json");
    std::fs::write(&p, serde_json::to_string_pretty(&report).expect("json"))
        .map_err(|err| Error::Io { path: p.clone(), err })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{names, preset};

    fn tiny() -> (tempfile::TempDir, Checkpoint) {
        let tmp = tempfile::tempdir().unwrap();
        preset::write_preset("tiny", tmp.path(), 5, WriteOptions::default()).unwrap();
        let ck = Checkpoint::load(tmp.path()).unwrap();
        (tmp, ck)
    }

    fn zero_share(t: &Tensor) -> f64 {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().filter(|x| **x == 0.0).count() as f64 / v.len() as f64
    }

    #[test]
    fn the_cut_prunes_exactly_the_asked_share() {
        let m: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        assert_eq!(cut_for(m.clone(), 0.3), 4.0, "1, 2, 3 go; 4 and up stay");
        assert_eq!(cut_for(m.clone(), 0.0), 0.0);
        assert_eq!(cut_for(m.clone(), 0.94), 10.0, "nine of ten go");
        assert_eq!(cut_for(m, 0.99), f32::INFINITY, "0.99 of ten rounds to all ten");
    }

    #[test]
    fn global_sparsity_hits_its_share_and_spares_norms_and_embeddings() {
        let (_tmp, ck) = tiny();
        let opts = PruneOptions { amount: PruneAmount::Sparsity(0.5), scope: PruneScope::Global, embeddings: false };
        let (w, r) = prune(&ck, &opts).unwrap();
        assert!((r.targeted_sparsity - 0.5).abs() < 1e-3, "{}", r.targeted_sparsity);
        assert_eq!(r.tensors.len(), 7 * ck.config.num_hidden_layers);
        assert_eq!(zero_share(&w[names::EMBED]), 0.0);
        assert_eq!(zero_share(&w[&names::in_layer(0, names::INPUT_NORM)]), 0.0);
        // Each reported share is what the tensor holds.
        for t in &r.tensors {
            assert!((zero_share(&w[&t.name]) - t.sparsity).abs() < 1e-9, "{}", t.name);
        }
        assert!(r.model_sparsity < r.targeted_sparsity);
    }

    #[test]
    fn per_layer_scope_gives_every_layer_the_same_share() {
        let (_tmp, ck) = tiny();
        let mut tensors = ck.tensors.clone();
        // Make layer 1 ten times larger: a global cut would spare it, a per-layer cut does not.
        for (_, p) in DecoderWeights::from_map(&ck.tensors, &ck.config).unwrap().layers[1].projections() {
            let n = format!("{}.weight", p.name);
            tensors.insert(n.clone(), (&tensors[&n] * 10.0).unwrap());
        }
        let ck = Checkpoint { tensors, ..ck };
        let layer_share = |w: &HashMap<String, Tensor>, i: usize| {
            let names: Vec<String> = crate::checkpoint::weights::PROJECTIONS
                .iter()
                .map(|p| format!("{}.weight", names::projection(i, p)))
                .collect();
            let (z, n) = names.iter().fold((0.0, 0.0), |(z, n), name| {
                let c = w[name].elem_count() as f64;
                (z + zero_share(&w[name]) * c, n + c)
            });
            z / n
        };
        let per_layer = PruneOptions { amount: PruneAmount::Sparsity(0.4), scope: PruneScope::Layer, embeddings: true };
        let (w, _) = prune(&ck, &per_layer).unwrap();
        assert!((layer_share(&w, 0) - 0.4).abs() < 1e-3 && (layer_share(&w, 1) - 0.4).abs() < 1e-3);
        assert!(zero_share(&w[names::EMBED]) > 0.39, "embeddings pruned when asked");
        let global = PruneOptions { scope: PruneScope::Global, embeddings: false, ..per_layer };
        let (w, _) = prune(&ck, &global).unwrap();
        assert!(layer_share(&w, 1) < 0.15 && layer_share(&w, 0) > 0.6, "{} {}", layer_share(&w, 0), layer_share(&w, 1));
    }

    #[test]
    fn threshold_zeroes_what_is_below_it_and_bad_amounts_are_refused() {
        let (_tmp, ck) = tiny();
        let opts = PruneOptions { amount: PruneAmount::Threshold(0.01), scope: PruneScope::Global, embeddings: false };
        let (w, r) = prune(&ck, &opts).unwrap();
        for t in &r.tensors {
            let v = w[&t.name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| *x == 0.0 || x.abs() >= 0.01), "{}", t.name);
        }
        for bad in [PruneAmount::Sparsity(1.0), PruneAmount::Sparsity(-0.1), PruneAmount::Threshold(f32::NAN)] {
            let e = prune(&ck, &PruneOptions { amount: bad, ..opts.clone() }).unwrap_err().to_string();
            assert!(e.contains("sparsity") || e.contains("threshold"), "{e}");
        }
    }
}
