//! Training throughput against the machine's fp32 matmul peak in candle.
//!
//! `cargo bench -p edgelm-distill --bench training [-- RECIPE]` prints: the best GFLOP/s of a
//! square f32 matmul in candle (the peak), then tokens/s and achieved GFLOP/s
//! (6 x parameters x tokens/s) for full training steps (forward, backward, AdamW) of the
//! recipe's teacher, and of a distillation step of its student (teacher forward included).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use edgelm_distill::checkpoint::preset::random_weights;
use edgelm_distill::recipe::Recipe;
use edgelm_distill::student::{init_student, StudentShape};
use edgelm_distill::train::batch::{Batch, Encoded};
use edgelm_distill::train::kd_loss;
use edgelm_distill::train::stage::{flop_parameters, lm_loss};
use edgelm_distill::train::Trainer;
use edgelm_distill::LlamaModel;

fn matmul_peak() -> (usize, f64) {
    let mut best = (0, 0.0);
    for n in [256usize, 512, 1024, 1536] {
        let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
        let _ = a.matmul(&b).unwrap();
        let reps = (2e9 / (2.0 * (n as f64).powi(3))).ceil().max(3.0) as usize;
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                let _ = a.matmul(&b).unwrap();
            }
            times.push(t.elapsed().as_secs_f64() / reps as f64);
        }
        let t = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let gflops = 2.0 * (n as f64).powi(3) / t / 1e9;
        println!("matmul {n}x{n}x{n}: {gflops:.1} GFLOP/s");
        if gflops > best.1 {
            best = (n, gflops);
        }
    }
    best
}

/// A batch shaped like the task's: `b` sequences of `s` tokens, the last quarter scored.
fn batch(b: usize, s: usize, vocab: usize) -> Batch {
    let seqs: Vec<Encoded> = (0..b)
        .map(|i| Encoded {
            ids: (0..s).map(|j| ((i * 31 + j * 7) % (vocab - 3) + 3) as u32).collect(),
            prompt_len: s * 3 / 4,
        })
        .collect();
    let refs: Vec<&Encoded> = seqs.iter().collect();
    Batch::new(&refs, 0).unwrap()
}

fn time_steps(steps: usize, mut step: impl FnMut()) -> f64 {
    step();
    let t = Instant::now();
    for _ in 0..steps {
        step();
    }
    t.elapsed().as_secs_f64() / steps as f64
}

fn main() {
    let arg = std::env::args().skip(1).find(|a| a.ends_with(".toml"));
    let path = arg
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/devcmd/recipe.toml"));
    let recipe = Recipe::load(&path).expect("recipe");
    let (n, peak) = matmul_peak();
    println!("peak: {peak:.1} GFLOP/s (f32 matmul {n}^3, candle, {} threads)", candle_core::utils::get_num_threads());

    let config = recipe.teacher_config(recipe.tokenizer.vocab_size);
    let weights = random_weights(&config, 0).unwrap();
    let t = &recipe.teacher.train;
    let b = batch(t.batch_size, 40, config.vocab_size);
    let mut trainer = Trainer::new(weights.clone(), t.train_config(1000)).unwrap();
    let secs = time_steps(5, || {
        let loss = lm_loss(&config, &trainer.tensors(), &b).unwrap();
        trainer.backward(&loss).unwrap();
    });
    let tps = b.tokens as f64 / secs;
    let g = 6.0 * flop_parameters(&config) as f64 * tps / 1e9;
    println!(
        "teacher training step ({} params, batch {}x40): {:.0} tokens/s, {g:.1} GFLOP/s = {:.0}% of peak",
        config.num_parameters(),
        t.batch_size,
        tps,
        100.0 * g / peak
    );

    let s = &recipe.student;
    let shape =
        StudentShape { layers: s.layers.clone(), intermediate_size: s.intermediate_size, hidden_size: s.hidden_size };
    let (scfg, sw) = init_student(&config, &weights, &shape).unwrap();
    let teacher = LlamaModel::from_tensors(&config, &weights).unwrap();
    let mut trainer = Trainer::new(sw, s.train.train_config(1000)).unwrap();
    let b = batch(s.train.batch_size, 40, config.vocab_size);
    let secs = time_steps(5, || {
        let soft = teacher.logits_at(&b.input_ids, &b.rows).unwrap();
        let p: HashMap<String, Tensor> = trainer.tensors();
        let student = LlamaModel::from_tensors(&scfg, &p).unwrap().logits_at(&b.input_ids, &b.rows).unwrap();
        let loss = kd_loss(&student, &soft, &b.labels, s.temperature, s.alpha).unwrap();
        trainer.backward(&loss).unwrap();
    });
    let tps = b.tokens as f64 / secs;
    let flops = 6.0 * flop_parameters(&scfg) as f64 + 2.0 * flop_parameters(&config) as f64;
    let g = flops * tps / 1e9;
    println!(
        "distillation step ({} student params + teacher forward): {:.0} tokens/s, {g:.1} GFLOP/s = {:.0}% of peak",
        scfg.num_parameters(),
        tps,
        100.0 * g / peak
    );
}
