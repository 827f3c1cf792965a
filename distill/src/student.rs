//! Student initialisation from a teacher: keep a chosen subset of its layers, and optionally
//! slice the MLP and the residual stream narrower, keeping the most important units.
//!
//! Importance of an MLP unit j is `|up_proj[j, :]| * |down_proj[:, j]|` (the size of what it can
//! write into the residual stream); importance of a residual dimension is the norm of its
//! embedding column. Kept units stay in their original order.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::checkpoint::{names, ModelConfig};
use crate::error::{Error, Result};

/// Which part of the teacher to keep.
#[derive(Debug, Clone)]
pub struct StudentShape {
    /// Teacher layer indices, in the order the student runs them.
    pub layers: Vec<usize>,
    /// MLP width (the teacher's when None).
    pub intermediate_size: Option<usize>,
    /// Residual width (the teacher's when None).
    pub hidden_size: Option<usize>,
}

/// Indices of the `k` largest scores, in ascending index order.
fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep: Vec<u32> = idx.into_iter().take(k).map(|i| i as u32).collect();
    keep.sort_unstable();
    keep
}

/// L2 norms of a matrix's rows (`dim` 1) or columns (`dim` 0).
fn norms(t: &Tensor, over: usize) -> Result<Vec<f32>> {
    Ok(t.sqr()?.sum(over)?.sqrt()?.to_vec1::<f32>()?)
}

/// Fails when `shape` cannot be cut from `teacher`: no layers, a layer it lacks, or a width
/// of 0 or above the teacher's.
pub fn check_shape(teacher: &ModelConfig, shape: &StudentShape) -> Result<()> {
    let t = teacher;
    let bad = |what: String| Error::InvalidConfig { what: format!("student: {what}") };
    if shape.layers.is_empty() {
        return Err(bad("no layers kept".into()));
    }
    if let Some(&l) = shape.layers.iter().find(|&&l| l >= t.num_hidden_layers) {
        return Err(bad(format!("layer {l} does not exist in a {}-layer teacher", t.num_hidden_layers)));
    }
    let inter = shape.intermediate_size.unwrap_or(t.intermediate_size);
    let hidden = shape.hidden_size.unwrap_or(t.hidden_size);
    if inter == 0 || inter > t.intermediate_size || hidden == 0 || hidden > t.hidden_size {
        return Err(bad(format!(
            "widths must be between 1 and the teacher's (hidden {} <= {}, MLP {} <= {})",
            hidden, t.hidden_size, inter, t.intermediate_size
        )));
    }
    Ok(())
}

/// The student's configuration and weights.
pub fn init_student(
    teacher: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    shape: &StudentShape,
) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    check_shape(teacher, shape)?;
    let t = teacher;
    let inter = shape.intermediate_size.unwrap_or(t.intermediate_size);
    let hidden = shape.hidden_size.unwrap_or(t.hidden_size);
    let get = |name: &str| -> Result<&Tensor> {
        tensors.get(name).ok_or_else(|| Error::Tensor { name: name.into(), what: "missing from the teacher".into() })
    };
    let dev = &Device::Cpu;
    // Residual dimensions to keep (all of them unless narrowed).
    let embed = get(names::EMBED)?;
    let hid_idx = Tensor::new(top_k(&norms(embed, 0)?, hidden).as_slice(), dev)?;
    let narrow_h = hidden < t.hidden_size;
    let cols = |w: &Tensor| -> Result<Tensor> { Ok(if narrow_h { w.index_select(&hid_idx, 1)? } else { w.clone() }) };
    let rows = |w: &Tensor| -> Result<Tensor> { Ok(if narrow_h { w.index_select(&hid_idx, 0)? } else { w.clone() }) };
    let mut out = HashMap::new();
    out.insert(names::EMBED.to_owned(), cols(embed)?);
    out.insert(names::FINAL_NORM.to_owned(), rows(get(names::FINAL_NORM)?)?);
    if !t.tie_word_embeddings {
        out.insert(names::LM_HEAD.to_owned(), cols(get(names::LM_HEAD)?)?);
    }
    for (i, &l) in shape.layers.iter().enumerate() {
        // A tensor of the teacher's layer `l` and the same tensor of the student's layer `i`.
        let src = |proj: &str, part: &str| format!("{}.{part}", names::projection(l, proj));
        let dst = |proj: &str, part: &str| format!("{}.{part}", names::projection(i, proj));
        for n in [names::INPUT_NORM, names::POST_ATTENTION_NORM] {
            out.insert(names::in_layer(i, n), rows(get(&names::in_layer(l, n))?)?);
        }
        if t.qk_norm() {
            for n in [names::Q_NORM, names::K_NORM] {
                out.insert(names::in_layer(i, n), get(&names::in_layer(l, n))?.clone());
            }
        }
        for p in ["q_proj", "k_proj", "v_proj"] {
            out.insert(dst(p, "weight"), cols(get(&src(p, "weight"))?)?);
            if t.qkv_bias {
                out.insert(dst(p, "bias"), get(&src(p, "bias"))?.clone());
            }
        }
        out.insert(dst("o_proj", "weight"), rows(get(&src("o_proj", "weight"))?)?);
        if t.o_bias {
            out.insert(dst("o_proj", "bias"), rows(get(&src("o_proj", "bias"))?)?);
        }
        let (gate, up, down) =
            (get(&src("gate_proj", "weight"))?, get(&src("up_proj", "weight"))?, get(&src("down_proj", "weight"))?);
        let score: Vec<f32> = norms(up, 1)?.iter().zip(norms(down, 0)?).map(|(u, d)| u * d).collect();
        let unit_idx = Tensor::new(top_k(&score, inter).as_slice(), dev)?;
        out.insert(dst("gate_proj", "weight"), cols(&gate.index_select(&unit_idx, 0)?)?);
        out.insert(dst("up_proj", "weight"), cols(&up.index_select(&unit_idx, 0)?)?);
        out.insert(dst("down_proj", "weight"), rows(&down.index_select(&unit_idx, 1)?)?);
        if t.mlp_bias {
            for p in ["gate_proj", "up_proj"] {
                out.insert(dst(p, "bias"), get(&src(p, "bias"))?.index_select(&unit_idx, 0)?);
            }
            out.insert(dst("down_proj", "bias"), rows(get(&src("down_proj", "bias"))?)?);
        }
    }
    // The student's layers keep their teacher layer's attention (full or windowed); a window
    // no layer keeps is dropped.
    let full_attention_layers: Vec<usize> = shape
        .layers
        .iter()
        .enumerate()
        .filter(|(_, &l)| t.full_attention_layers.contains(&l))
        .map(|(i, _)| i)
        .collect();
    let (sliding_window, full_attention_layers) =
        crate::checkpoint::config::layer_windows(t.sliding_window, full_attention_layers, shape.layers.len());
    let config = ModelConfig {
        num_hidden_layers: shape.layers.len(),
        intermediate_size: inter,
        hidden_size: hidden,
        sliding_window,
        full_attention_layers,
        ..t.clone()
    };
    // Copies, so training the student never writes into the teacher's storage.
    let out = out.into_iter().map(|(k, v)| Ok((k, v.contiguous()?.copy()?))).collect::<Result<_>>()?;
    Ok((config, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset::{preset_config, random_weights};
    use crate::model::LlamaModel;

    #[test]
    fn keeping_every_layer_at_full_width_is_the_teacher() {
        let cfg = preset_config("tiny").unwrap();
        let w = random_weights(&cfg, 3).unwrap();
        let all =
            StudentShape { layers: (0..cfg.num_hidden_layers).collect(), intermediate_size: None, hidden_size: None };
        let (scfg, sw) = init_student(&cfg, &w, &all).unwrap();
        assert_eq!(scfg, cfg);
        let ids = Tensor::new(&[[3u32, 9, 27, 81]], &Device::Cpu).unwrap();
        let a = LlamaModel::from_tensors(&cfg, &w).unwrap().forward(&ids, &mut Default::default()).unwrap();
        let b = LlamaModel::from_tensors(&scfg, &sw).unwrap().forward(&ids, &mut Default::default()).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn a_qwen3_student_keeps_the_head_norms_of_its_layers() {
        let cfg = preset_config("tiny-qwen3").unwrap();
        let w = random_weights(&cfg, 4).unwrap();
        let shape = StudentShape { layers: vec![1], intermediate_size: Some(64), hidden_size: Some(48) };
        let (scfg, sw) = init_student(&cfg, &w, &shape).unwrap();
        let m = LlamaModel::from_tensors(&scfg, &sw).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&ids, &mut Default::default()).unwrap().dims(), &[1, 3, cfg.vocab_size]);
        for n in [names::Q_NORM, names::K_NORM] {
            let norm = |m: &HashMap<String, Tensor>, l: usize| m[&names::in_layer(l, n)].to_vec1::<f32>().unwrap();
            assert_eq!(norm(&sw, 0), norm(&w, 1), "{n}");
        }
    }

    #[test]
    fn a_student_layer_keeps_its_teacher_layers_attention() {
        // Teacher layer 0 attends to everything, layer 1 slides over 8 positions.
        let cfg = preset_config("tiny-qwen2-window").unwrap();
        let w = random_weights(&cfg, 4).unwrap();
        let student = |layers: Vec<usize>| {
            let shape = StudentShape { layers, intermediate_size: None, hidden_size: None };
            init_student(&cfg, &w, &shape).unwrap().0
        };
        let swapped = student(vec![1, 0]);
        assert_eq!((swapped.layer_window(0), swapped.layer_window(1)), (Some(8), None));
        assert_eq!(swapped.full_attention_layers, vec![1]);
        // Only the sliding layer kept: every layer slides.
        let sliding = student(vec![1]);
        assert_eq!((sliding.sliding_window, sliding.layer_window(0)), (Some(8), Some(8)));
        // Only full layers kept: no window left to write.
        let full = student(vec![0]);
        assert_eq!((full.sliding_window, full.full_attention_layers.clone()), (None, vec![]));
    }

    #[test]
    fn sliced_student_has_the_asked_shape_and_the_teachers_kept_units() {
        let cfg = preset_config("tiny-qwen2").unwrap();
        let w = random_weights(&cfg, 4).unwrap();
        let shape = StudentShape { layers: vec![1], intermediate_size: Some(64), hidden_size: Some(48) };
        let (scfg, sw) = init_student(&cfg, &w, &shape).unwrap();
        assert_eq!((scfg.num_hidden_layers, scfg.intermediate_size, scfg.hidden_size), (1, 64, 48));
        // Loads (every tensor present with the right shape) and runs.
        let m = LlamaModel::from_tensors(&scfg, &sw).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&ids, &mut Default::default()).unwrap().dims(), &[1, 3, cfg.vocab_size]);
        // The kept q bias comes from teacher layer 1, untouched.
        let qb = |m: &HashMap<String, Tensor>, l: usize| {
            m[&format!("model.layers.{l}.self_attn.q_proj.bias")].to_vec1::<f32>().unwrap()
        };
        assert_eq!(qb(&sw, 0), qb(&w, 1));
        assert!(scfg.num_parameters() < cfg.num_parameters() / 2);
        let too_wide = StudentShape { layers: vec![0], intermediate_size: Some(10_000), hidden_size: None };
        assert!(init_student(&cfg, &w, &too_wide).is_err());
        let no_layer = StudentShape { layers: vec![7], intermediate_size: None, hidden_size: None };
        assert!(init_student(&cfg, &w, &no_layer).is_err());
    }
}
