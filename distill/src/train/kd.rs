//! Knowledge-distillation loss:
//! `alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)`,
//! KL averaged over positions (batchmean over rows), CE the mean next-token cross-entropy.
//! The `T^2` keeps the soft-target gradients on the same scale as the hard ones when T changes.
//!
//! Shapes: `student_logits`, `teacher_logits` `[N, vocab]`, `labels` `[N]` (u32).

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Distillation loss of a batch of positions.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    labels: &Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let log_p_student = candle_nn::ops::log_softmax(&(student_logits / temperature)?, D::Minus1)?;
    combine(student_logits, &log_p_student, teacher_logits, labels, temperature, alpha)
}

/// Distillation loss against cached top-k teacher logits: the soft targets are the teacher's
/// softmax over its k largest logits (renormalised), compared with the student's
/// log-probabilities of those same tokens. With k equal to the vocabulary it is [`kd_loss`].
/// `top_values`, `top_indices`: `[N, k]`.
pub fn kd_loss_top_k(
    student_logits: &Tensor,
    top_values: &Tensor,
    top_indices: &Tensor,
    labels: &Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let log_p_student =
        candle_nn::ops::log_softmax(&(student_logits / temperature)?, D::Minus1)?.gather(top_indices, D::Minus1)?;
    combine(student_logits, &log_p_student, top_values, labels, temperature, alpha)
}

/// Mean over the student's layers and the positions of `||s_j - t_m(j)||^2 / ||t_m(j)||^2`: how
/// far each student layer's residual stream `[N, H]` is from the teacher's after layer
/// `matched[j]`, relative to the size of the teacher's vector at the same position. Per position,
/// so a batch shared among workers gives the mean of what its shares give (weighted by their
/// rows). The teacher is a constant target.
pub fn hidden_state_loss(student: &[Tensor], teacher: &[Tensor], matched: &[usize]) -> Result<Tensor> {
    let bad = |what: String| Error::InvalidConfig { what: format!("hidden-state loss: {what}") };
    if student.len() != matched.len() {
        return Err(bad(format!("{} student layers but {} matched teacher layers", student.len(), matched.len())));
    }
    if let Some(l) = matched.iter().find(|&&l| l >= teacher.len()) {
        return Err(bad(format!("teacher layer {l} matched, but the teacher has {} layers", teacher.len())));
    }
    let mut per_layer = Vec::with_capacity(matched.len());
    for (s, &l) in student.iter().zip(matched) {
        let t = teacher[l].detach();
        if s.dims() != t.dims() || s.rank() != 2 {
            return Err(bad(format!("student states {:?} against the teacher's {:?}", s.dims(), t.dims())));
        }
        per_layer.push(((s - &t)?.sqr()?.sum(1)? / t.sqr()?.sum(1)?.maximum(1e-12)?)?);
    }
    if per_layer.is_empty() {
        return Ok(Tensor::zeros((), candle_core::DType::F32, &candle_core::Device::Cpu)?);
    }
    // Every layer has the same positions: the mean of `[layers, N]` is the mean of the layer means.
    Ok(Tensor::stack(&per_layer, 0)?.mean_all()?)
}

/// `alpha * T^2 * KL + (1 - alpha) * CE`, given the student's tempered log-probabilities of the
/// tokens the teacher's logits cover (all of them, or its top k), column for column.
fn combine(
    student_logits: &Tensor,
    log_p_student: &Tensor,
    teacher_logits: &Tensor,
    labels: &Tensor,
    t: f64,
    alpha: f64,
) -> Result<Tensor> {
    // The teacher is a constant target: no gradient flows into it.
    let log_p_teacher = candle_nn::ops::log_softmax(&(teacher_logits.detach() / t)?, D::Minus1)?;
    let p_teacher = log_p_teacher.exp()?;
    let rows = student_logits.dim(0)? as f64;
    let kl = ((&p_teacher * (log_p_teacher - log_p_student)?)?.sum_all()? / rows)?;
    let ce = candle_nn::loss::cross_entropy(student_logits, labels)?;
    Ok(((kl * (alpha * t * t))? + (ce * (1.0 - alpha))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_a_hand_computed_value() {
        // Two positions, three tokens.
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 1.0]], &Device::Cpu).unwrap();
        let te = Tensor::new(&[[2.0f32, 1.0, 0.0], [0.5, 0.5, 0.5]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let (t, alpha) = (2.0f64, 0.7f64);
        // Same formula written out with f64 scalars.
        let softmax = |row: &[f64]| {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect::<Vec<_>>()
        };
        let srows = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]];
        let trows = [[2.0, 1.0, 0.0], [0.5, 0.5, 0.5]];
        let mut kl = 0.0;
        let mut ce = 0.0;
        for r in 0..2 {
            let ps = softmax(&srows[r].map(|x| x / t));
            let pt = softmax(&trows[r].map(|x| x / t));
            kl += (0..3).map(|i| pt[i] * (pt[i].ln() - ps[i].ln())).sum::<f64>();
            let p = softmax(&srows[r]);
            ce -= p[[1, 2][r]].ln();
        }
        let expected = alpha * t * t * kl / 2.0 + (1.0 - alpha) * ce / 2.0;
        let got = kd_loss(&s, &te, &labels, t, alpha).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn top_k_over_the_whole_vocabulary_is_the_full_loss() {
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5, -1.0], [0.0, -1.0, 1.0, 3.0]], &Device::Cpu).unwrap();
        let te = Tensor::new(&[[2.0f32, 1.0, 0.0, 0.3], [0.5, 0.1, 0.7, -2.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
        let full = kd_loss(&s, &te, &labels, 2.0, 0.6).unwrap().to_scalar::<f32>().unwrap();
        let idx = te.arg_sort_last_dim(false).unwrap();
        let vals = te.gather(&idx, D::Minus1).unwrap();
        let top = kd_loss_top_k(&s, &vals, &idx, &labels, 2.0, 0.6).unwrap().to_scalar::<f32>().unwrap();
        assert!((full - top).abs() < 1e-6, "{full} vs {top}");
        // Fewer entries: a different (approximate) value, still finite.
        let idx2 = idx.narrow(1, 0, 2).unwrap().contiguous().unwrap();
        let vals2 = te.gather(&idx2, D::Minus1).unwrap();
        let approx = kd_loss_top_k(&s, &vals2, &idx2, &labels, 2.0, 0.6).unwrap().to_scalar::<f32>().unwrap();
        assert!(approx.is_finite() && (approx - full).abs() > 1e-4);
    }

    #[test]
    fn hidden_state_loss_is_the_mean_relative_squared_error_of_the_matched_layers() {
        let t = |rows: &[[f32; 2]; 2]| Tensor::new(rows, &Device::Cpu).unwrap();
        let teacher = [t(&[[1.0, 0.0], [1.0, 0.0]]), t(&[[3.0, 4.0], [0.0, 1.0]]), t(&[[0.0, 2.0], [1.0, 0.0]])];
        let student = [t(&[[3.0, 4.0], [0.0, 1.0]]), t(&[[0.0, 1.0], [1.0, 1.0]])];
        // Student layer 0 against teacher layer 1 (exact: 0); layer 1 against teacher layer 2:
        // positions ||(0, -1)||^2 / ||(0, 2)||^2 = 1/4 and ||(0, 1)||^2 / ||(1, 0)||^2 = 1, mean
        // 5/8 (a ratio of sums would give 2/5). Mean over the layers: 5/16.
        let got = hidden_state_loss(&student, &teacher, &[1, 2]).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - 5.0 / 16.0).abs() < 1e-7, "{got}");
        // Each position alone, averaged: what two workers holding one position each give.
        let row = |x: &[Tensor], r: usize| x.iter().map(|x| x.narrow(0, r, 1).unwrap()).collect::<Vec<_>>();
        let halves: f32 = (0..2)
            .map(|r| {
                hidden_state_loss(&row(&student, r), &row(&teacher, r), &[1, 2]).unwrap().to_scalar::<f32>().unwrap()
            })
            .sum();
        assert!((halves / 2.0 - got).abs() < 1e-7, "{halves}");
        // Matched to the wrong layers it is larger: layer 0 against 0 gives (20 + 2) / 2, layer
        // 1 against 1 gives (18/25 + 1) / 2.
        let wrong = hidden_state_loss(&student, &teacher, &[0, 1]).unwrap().to_scalar::<f32>().unwrap();
        assert!((wrong - (11.0 + 0.86) / 2.0).abs() < 1e-5, "{wrong}");
        // Layers that do not pair up are a typed error, not a silent partial mean.
        for matched in [&[1][..], &[1, 3], &[1, 2, 0]] {
            let e = hidden_state_loss(&student, &teacher, matched).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{matched:?}: {e}");
        }
    }

    #[test]
    fn identical_logits_leave_only_the_hard_loss() {
        let s = Tensor::new(&[[0.3f32, -0.2, 1.5, 0.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[2u32], &Device::Cpu).unwrap();
        let kd = kd_loss(&s, &s, &labels, 3.0, 0.5).unwrap().to_scalar::<f32>().unwrap();
        let ce = candle_nn::loss::cross_entropy(&s, &labels).unwrap().to_scalar::<f32>().unwrap();
        assert!((kd - 0.5 * ce).abs() < 1e-6);
    }
}
