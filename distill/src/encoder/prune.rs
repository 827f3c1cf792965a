//! Structured pruning of an encoder's feed-forward blocks: each layer keeps the hidden units
//! that write most into the residual stream on real text and drops the rest, so both of the
//! block's matrices get narrower and every dense kernel (fp32 or int8) runs them faster. A
//! unit's importance is the mean magnitude of its GELU output over the tokens of sample
//! sentences times the norm of its column in the block's output matrix, the measure the
//! decoder's structured pruning uses (`crate::prune::structured`). A BERT config has one
//! feed-forward width, so every layer keeps the same number of units, each its own.
//!
//! Pruning alone costs accuracy; the encoder student (`super::student`) prunes before it
//! distils, so training recovers what the dropped units carried.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::Tensor;

use super::{BertModel, EncoderCheckpoint};
use crate::error::{Error, Result};
use crate::prune::structured::keep_top;

/// The feed-forward output projection of layer `i`: its input is the block's hidden units.
fn ffn_output(i: usize) -> String {
    format!("encoder.layer.{i}.output.dense")
}

/// The axis of a layer tensor that runs over the feed-forward units, for the tensors pruning
/// narrows: the first of the input projection's weight and bias, the second of the output
/// projection's weight.
pub(crate) fn unit_axis(name: &str) -> Option<usize> {
    let tail = name.strip_prefix("encoder.layer.")?.split_once('.')?.1;
    match tail {
        "intermediate.dense.weight" | "intermediate.dense.bias" => Some(0),
        "output.dense.weight" => Some(1),
        _ => None,
    }
}

/// Each layer's feed-forward units' importance on `samples` (token ids and types, one sentence
/// each): `[layers][intermediate_size]`.
pub fn ffn_importance(ck: &EncoderCheckpoint, samples: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Vec<f64>>> {
    let c = &ck.config;
    if samples.is_empty() {
        return Err(Error::InvalidConfig { what: "feed-forward pruning needs sample text to rank units on".into() });
    }
    let width = c.intermediate_size;
    // Sum of |unit| over tokens, and the token count, per layer.
    let sums: Mutex<HashMap<String, (Vec<f64>, usize)>> = Mutex::new(HashMap::new());
    let outputs: HashSet<String> = (0..c.num_hidden_layers).map(ffn_output).collect();
    let tap = |name: &str, x: &Tensor| -> Result<()> {
        if !outputs.contains(name) {
            return Ok(());
        }
        let rows = x.elem_count() / width;
        let s: Vec<f32> = x.reshape((rows, width))?.abs()?.sum(0)?.to_vec1()?;
        let mut all = sums.lock().expect("importance lock");
        let (acc, n) = all.entry(name.to_string()).or_insert_with(|| (vec![0.0; width], 0));
        acc.iter_mut().zip(&s).for_each(|(a, v)| *a += *v as f64);
        *n += rows;
        Ok(())
    };
    let model = BertModel::new(ck).with_tap(&tap);
    // One sentence per run: no padded position is counted.
    for (ids, types) in samples {
        model.batch_run(&[(ids, types)], false)?;
    }
    let sums = sums.into_inner().expect("importance lock");
    (0..c.num_hidden_layers)
        .map(|i| {
            let name = ffn_output(i);
            let (acc, n) =
                sums.get(&name).ok_or_else(|| Error::InvalidConfig { what: format!("`{name}` never ran") })?;
            let w = ck.get(&format!("{name}.weight"), &[c.hidden_size, width])?;
            let norms: Vec<f32> = w.sqr()?.sum(0)?.sqrt()?.to_vec1()?;
            Ok(acc.iter().zip(&norms).map(|(a, w)| a / (*n).max(1) as f64 * *w as f64).collect())
        })
        .collect()
}

/// Narrows the feed-forward blocks of the layers in `tensors` (names `encoder.layer.{i}.*`, `i`
/// indexing `importance`) to the `keep` most important units of each, in their order. Returns
/// per layer the share of the importance the kept units carry. Nothing is changed when an
/// error is returned.
pub fn prune_ffn(tensors: &mut HashMap<String, Tensor>, importance: &[Vec<f64>], keep: usize) -> Result<Vec<f64>> {
    let bad = |what: String| Error::InvalidConfig { what: format!("feed-forward pruning: {what}") };
    let mut narrowed = Vec::new();
    let mut kept_share = Vec::new();
    for (i, scores) in importance.iter().enumerate() {
        if keep == 0 || keep > scores.len() {
            return Err(bad(format!("cannot keep {keep} of {} units", scores.len())));
        }
        let idx = keep_top(scores, keep);
        let total: f64 = scores.iter().sum();
        kept_share.push(if total > 0.0 { idx.iter().map(|&j| scores[j]).sum::<f64>() / total } else { 1.0 });
        let rows = Tensor::from_slice(
            &idx.iter().map(|&j| j as u32).collect::<Vec<_>>(),
            idx.len(),
            &candle_core::Device::Cpu,
        )?;
        let p = format!("encoder.layer.{i}");
        for name in [
            format!("{p}.intermediate.dense.weight"),
            format!("{p}.intermediate.dense.bias"),
            format!("{}.weight", ffn_output(i)),
        ] {
            let dim = unit_axis(&name).expect("a feed-forward tensor");
            let t = tensors.get(&name).ok_or_else(|| bad(format!("no tensor {name}")))?;
            if t.dims().get(dim) != Some(&scores.len()) {
                return Err(bad(format!("{name} is {:?}, not {} units wide", t.dims(), scores.len())));
            }
            narrowed.push((name, t.index_select(&rows, dim)?.contiguous()?));
        }
    }
    tensors.extend(narrowed);
    Ok(kept_share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{tiny_encoder, Pooling};

    fn samples() -> Vec<(Vec<u32>, Vec<u32>)> {
        vec![(vec![1, 5, 9, 2], vec![0; 4]), (vec![3, 7, 11, 13, 17, 2], vec![0; 6]), (vec![4, 8], vec![0, 1])]
    }

    fn embedding(ck: &EncoderCheckpoint, ids: &[u32]) -> Vec<f32> {
        BertModel::new(ck).embed(ids, &vec![0; ids.len()]).unwrap()
    }

    #[test]
    fn the_unit_axis_is_named_for_the_feed_forward_tensors_only() {
        assert_eq!(unit_axis("encoder.layer.2.intermediate.dense.weight"), Some(0));
        assert_eq!(unit_axis("encoder.layer.0.intermediate.dense.bias"), Some(0));
        assert_eq!(unit_axis("encoder.layer.11.output.dense.weight"), Some(1));
        for other in [
            "encoder.layer.0.output.dense.bias",
            "encoder.layer.0.attention.output.dense.weight",
            "encoder.layer.0.output.LayerNorm.weight",
            "embeddings.word_embeddings.weight",
        ] {
            assert_eq!(unit_axis(other), None, "{other}");
        }
    }

    #[test]
    fn units_that_write_nothing_go_first_and_their_removal_changes_nothing() {
        let mut ck = tiny_encoder(Pooling::Mean, 3);
        // Layer 0's units 4..12 and layer 1's units 20..28 write nothing: their output columns are zero.
        for (i, dead) in [(0usize, 4..12usize), (1, 20..28)] {
            let name = format!("encoder.layer.{i}.output.dense.weight");
            let mut w: Vec<f32> = ck.tensors[&name].flatten_all().unwrap().to_vec1().unwrap();
            for r in 0..16 {
                for j in dead.clone() {
                    w[r * 32 + j] = 0.0;
                }
            }
            ck.tensors.insert(name, Tensor::from_vec(w, (16, 32), &candle_core::Device::Cpu).unwrap());
        }
        let scores = ffn_importance(&ck, &samples()).unwrap();
        assert_eq!(scores.len(), 2);
        assert!(scores[0][4..12].iter().all(|&s| s == 0.0) && scores[0][..4].iter().all(|&s| s > 0.0));
        let before = embedding(&ck, &[1, 6, 10, 2]);
        let mut pruned = ck.tensors.clone();
        let kept = prune_ffn(&mut pruned, &scores, 24).unwrap();
        assert!(kept.iter().all(|&k| (k - 1.0).abs() < 1e-12), "{kept:?}");
        assert_eq!(pruned["encoder.layer.0.intermediate.dense.weight"].dims(), &[24, 16]);
        assert_eq!(pruned["encoder.layer.1.intermediate.dense.bias"].dims(), &[24]);
        assert_eq!(pruned["encoder.layer.1.output.dense.weight"].dims(), &[16, 24]);
        let narrow = EncoderCheckpoint {
            config: crate::encoder::EncoderConfig { intermediate_size: 24, ..ck.config.clone() },
            tensors: pruned,
            ..tiny_encoder(Pooling::Mean, 3)
        };
        let after = embedding(&narrow, &[1, 6, 10, 2]);
        let diff = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "removing dead units moved the embedding by {diff}");
        // Removing live units does move it, and the kept share says so.
        let mut cut = ck.tensors.clone();
        let kept = prune_ffn(&mut cut, &scores, 8).unwrap();
        assert!(kept.iter().all(|&k| k < 1.0), "{kept:?}");
        let narrow = EncoderCheckpoint {
            config: crate::encoder::EncoderConfig { intermediate_size: 8, ..ck.config.clone() },
            tensors: cut,
            ..tiny_encoder(Pooling::Mean, 3)
        };
        let after = embedding(&narrow, &[1, 6, 10, 2]);
        assert!(before.iter().zip(&after).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn impossible_widths_and_foreign_tensors_are_refused_and_change_nothing() {
        let ck = tiny_encoder(Pooling::Mean, 4);
        let scores = ffn_importance(&ck, &samples()).unwrap();
        for keep in [0, 33] {
            let mut t = ck.tensors.clone();
            let e = prune_ffn(&mut t, &scores, keep).unwrap_err().to_string();
            assert!(e.contains(&format!("cannot keep {keep} of 32")), "{e}");
        }
        // Scores for a wider block than the tensors hold: refused before anything changes.
        let mut t = ck.tensors.clone();
        let wide = vec![scores[0].clone(), vec![1.0; 40]];
        let e = prune_ffn(&mut t, &wide, 16).unwrap_err().to_string();
        assert!(e.contains("not 40 units wide"), "{e}");
        assert_eq!(t["encoder.layer.0.intermediate.dense.weight"].dims(), &[32, 16]);
        assert!(ffn_importance(&ck, &[]).is_err());
    }
}
