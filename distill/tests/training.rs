//! The training step machinery on a tiny model: the loss falls, accumulation of two half
//! batches equals one full batch, and clipping bounds the update.

use candle_core::{Device, Tensor};
use edgelm_distill::checkpoint::preset::{preset_config, random_weights};
use edgelm_distill::train::{CosineSchedule, TrainConfig, Trainer};
use edgelm_distill::LlamaModel;

fn loss(trainer: &Trainer, cfg: &edgelm_distill::ModelConfig, seq: &[u32]) -> Tensor {
    let model = LlamaModel::from_tensors(cfg, &trainer.tensors()).unwrap();
    let input = Tensor::new(&seq[..seq.len() - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let target = Tensor::new(&seq[1..], &Device::Cpu).unwrap();
    let logits = model.forward(&input, &mut model.new_cache()).unwrap().squeeze(0).unwrap();
    candle_nn::loss::cross_entropy(&logits, &target).unwrap()
}

fn config(accumulation: usize) -> TrainConfig {
    TrainConfig {
        schedule: CosineSchedule { peak: 3e-3, floor: 3e-4, warmup: 3, total: 40 },
        weight_decay: 0.0,
        accumulation,
        clip_norm: 1.0,
    }
}

#[test]
fn loss_falls_on_a_tiny_dataset() {
    let cfg = preset_config("tiny").unwrap();
    let mut t = Trainer::new(random_weights(&cfg, 2).unwrap(), config(1)).unwrap();
    let data: Vec<Vec<u32>> = (0..4).map(|k| (0..16).map(|i| (5 + 7 * k + 3 * i) % 300).collect()).collect();
    let mean = |t: &Trainer| data.iter().map(|s| loss(t, &cfg, s).to_scalar::<f32>().unwrap()).sum::<f32>() / 4.0;
    let before = mean(&t);
    for step in 0..40 {
        let l = loss(&t, &cfg, &data[step % 4]);
        let r = t.backward(&l).unwrap().expect("one micro-batch per step");
        assert!(r.grad_norm.is_finite());
    }
    let after = mean(&t);
    assert!(after < before * 0.5, "loss {before} -> {after}");
}

#[test]
fn two_accumulated_halves_equal_one_step_on_their_mean() {
    let cfg = preset_config("tiny").unwrap();
    let w = random_weights(&cfg, 4).unwrap();
    let (a, b): (Vec<u32>, Vec<u32>) = ((0..10).map(|i| 3 + i * 5).collect(), (0..10).map(|i| 200 - i * 7).collect());
    // Accumulated: two micro-batches, one step.
    let mut acc = Trainer::new(w.clone(), config(2)).unwrap();
    assert!(acc.backward(&loss(&acc, &cfg, &a)).unwrap().is_none());
    let r1 = acc.backward(&loss(&acc, &cfg, &b)).unwrap().unwrap();
    // Direct: the mean of both losses, one step.
    let mut one = Trainer::new(w, config(1)).unwrap();
    let mean = ((loss(&one, &cfg, &a) + loss(&one, &cfg, &b)).unwrap() / 2.0).unwrap();
    let r2 = one.backward(&mean).unwrap().unwrap();
    assert!((r1.grad_norm - r2.grad_norm).abs() < 1e-4 * r2.grad_norm, "{} vs {}", r1.grad_norm, r2.grad_norm);
    let (ta, tb) = (acc.tensors(), one.tensors());
    for (k, v) in &ta {
        let d = (v - &tb[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{k} differs by {d}");
    }
}
