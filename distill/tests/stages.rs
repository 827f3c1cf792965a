//! The training stages on the tiny recipe: an interrupted run resumes bit for bit, LoRA
//! fine-tuning trains adapters only and EWC holds the adapted weights back, and a distilled
//! student is smaller than its teacher and trained by the distillation loss.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edgelm_distill::lora::{Adapter, LoraConfig};
use edgelm_distill::model::LlamaModel;
use edgelm_distill::recipe::Recipe;
use edgelm_distill::student::StudentShape;
use edgelm_distill::train::batch::{Batch, Formatter};
use edgelm_distill::train::distill::{distill, DistillSpec, StudentInit};
use edgelm_distill::train::finetune::{finetune, fisher_diagonal, merge, FinetuneSpec};
use edgelm_distill::train::kd::hidden_state_loss;
use edgelm_distill::train::pretrain::pretrain;
use edgelm_distill::train::stage::StageOptions;
use edgelm_distill::Checkpoint;

fn recipe() -> Recipe {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/recipe.toml");
    let mut r = Recipe::load(&path).unwrap();
    r.data.train = 160;
    r.teacher.train.epochs = 2;
    r.teacher.train.eval_every = 5;
    r
}

fn quiet(out: PathBuf) -> StageOptions {
    StageOptions { progress: false, ..StageOptions::new(out) }
}

fn weights(dir: &Path) -> HashMap<String, Vec<f32>> {
    let ck = Checkpoint::load(dir).unwrap();
    ck.tensors.iter().map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1().unwrap())).collect()
}

#[test]
fn an_interrupted_run_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe();
    let whole = tmp.path().join("whole");
    let log = pretrain(&r, &quiet(whole.clone())).unwrap();
    assert!(log.steps >= 15, "{} steps", log.steps);

    // Same run, stopped after step 7 (mid-epoch, between checkpoints), then resumed.
    let split = tmp.path().join("split");
    let mut first = quiet(split.clone());
    first.halt_after = Some(7);
    let err = pretrain(&r, &first).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let halted = Checkpoint::load(&split).err();
    assert!(halted.is_some(), "a halted run writes no checkpoint yet");
    let mut second = quiet(split.clone());
    second.resume = true;
    let log2 = pretrain(&r, &second).unwrap();
    assert_eq!(log2.steps, log.steps);
    assert_eq!(log2.history, log.history, "the same losses at every logged step");
    let (a, b) = (weights(&whole), weights(&split));
    assert_eq!(a.len(), b.len());
    for (name, wa) in &a {
        assert!(wa == &b[name], "{name} differs after resuming");
    }

    // Without --resume the state is not silently reused, and a missing state is a clear error.
    let mut bad = quiet(tmp.path().join("none"));
    bad.resume = true;
    let err = pretrain(&r, &bad).unwrap_err().to_string();
    assert!(err.contains("no saved run"), "{err}");
}

fn adapter_norm(a: &Adapter) -> f32 {
    let mut sum = 0f32;
    for m in a.modules.keys() {
        let d = a.delta(m).unwrap().unwrap();
        sum += d.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    }
    sum.sqrt()
}

#[test]
fn lora_finetune_trains_adapters_only_and_ewc_holds_them_back() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe();
    let base_dir = tmp.path().join("teacher");
    pretrain(&r, &quiet(base_dir.clone())).unwrap();
    let base = Checkpoint::load(&base_dir).unwrap();
    let before = weights(&base_dir);
    let splits = r.splits().unwrap();
    let ft = r.finetune.clone().unwrap();
    let spec = |lambda: f64| FinetuneSpec {
        lora: LoraConfig { r: 4, lora_alpha: 8.0, target_modules: vec!["q_proj".into(), "v_proj".into()] },
        seed: 1,
        ewc_lambda: lambda,
        fisher_batches: 4,
        train: ft.train.clone(),
    };
    let free =
        finetune(&base, (&splits.train, &splits.validation), &splits.train, &spec(0.0), &quiet(tmp.path().join("a")))
            .unwrap();
    let held =
        finetune(&base, (&splits.train, &splits.validation), &splits.train, &spec(1e5), &quiet(tmp.path().join("b")))
            .unwrap();
    // PEFT layout on disk, with trained (non-zero) B matrices.
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(tmp.path().join("a").join(f).exists(), "{f}");
    }
    let loaded = Adapter::load_peft(&tmp.path().join("a")).unwrap();
    assert_eq!(loaded.modules.len(), 2 * base.config.num_hidden_layers);
    let (n_free, n_held) = (adapter_norm(&free.adapter), adapter_norm(&held.adapter));
    assert!(n_free > 0.0, "the adapter learned something");
    assert!(n_held < 0.5 * n_free, "EWC keeps the update small: {n_held} vs {n_free}");
    // The Fisher estimate is made of per-example gradients: the same examples in batches of 1
    // or of 4 give the same estimate (the square of a batch's mean gradient would not).
    let fmt = Formatter::for_checkpoint(&base).unwrap();
    let examples = fmt.encode_within(&splits.train[..8], base.config.max_position_embeddings, "Fisher data").unwrap();
    let modules = vec!["model.layers.0.self_attn.q_proj".to_string(), "model.layers.1.mlp.down_proj".to_string()];
    let ones = fisher_diagonal(&base, &modules, &examples, fmt.pad(), 8, 1).unwrap();
    let fours = fisher_diagonal(&base, &modules, &examples, fmt.pad(), 2, 4).unwrap();
    for m in &modules {
        let (a, b) = (
            ones[m].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            fours[m].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a.iter().any(|&x| x > 0.0), "{m}: the estimate is not zero");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-9), "{m}: {x} vs {y}");
        }
    }
    // Per layer: q (A 4x64, B 64x4) and v (A 4x64, B 32x4).
    assert_eq!(free.log.trainable_parameters, base.config.num_hidden_layers * (4 * 64 * 2 + 4 * 64 + 32 * 4));
    // The base checkpoint is untouched; the merged one differs only in adapted projections.
    assert_eq!(weights(&base_dir), before);
    let merged_dir = tmp.path().join("merged");
    merge(&base, &free.adapter, &merged_dir).unwrap();
    let merged = weights(&merged_dir);
    for (name, w) in &before {
        let adapted = name.contains("q_proj") || name.contains("v_proj");
        assert_eq!(&merged[name] != w, adapted, "{name}");
    }
    assert!(merged_dir.join("tokenizer.json").exists());
}

#[test]
fn distilled_student_is_a_trained_subset_of_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe();
    let teacher_dir = tmp.path().join("teacher");
    pretrain(&r, &quiet(teacher_dir.clone())).unwrap();
    let teacher = Checkpoint::load(&teacher_dir).unwrap();
    let splits = r.splits().unwrap();
    let spec = DistillSpec {
        student: StudentInit::Slice(StudentShape { layers: vec![1], intermediate_size: Some(64), hidden_size: None }),
        temperature: 2.0,
        alpha: 0.5,
        train: r.student.train.clone(),
        teacher_cache: None,
        hidden_weight: 0.0,
    };
    let out = tmp.path().join("student");
    let log = distill(&teacher, (&splits.train, &splits.validation), &spec, &quiet(out.clone())).unwrap();
    let student = Checkpoint::load(&out).unwrap();
    assert_eq!(student.config.num_hidden_layers, 1);
    assert!(student.config.num_parameters() * 2 < teacher.config.num_parameters() + 1);
    assert_eq!(log.trainable_parameters, student.config.num_parameters());
    let vals: Vec<f64> = log.history.iter().filter_map(|p| p.val_loss).collect();
    assert!(vals.len() >= 2 && log.best_val_loss.unwrap() < vals[0], "validation loss falls: {vals:?}");
    // The student keeps the teacher's tokenizer and template.
    let tok = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
    assert_eq!(tok(&out), tok(&teacher_dir));
    // Written over its teacher, a student is refused before training and the teacher kept.
    let config = std::fs::read(teacher_dir.join("config.json")).unwrap();
    let err = distill(&teacher, (&splits.train, &splits.validation), &spec, &quiet(teacher_dir.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is the teacher's folder"), "{err}");
    assert_eq!(std::fs::read(teacher_dir.join("config.json")).unwrap(), config);
}

#[test]
fn stages_accept_checkpoints_saved_by_transformers() {
    // Qwen2 with q/k/v bias and tied embeddings, and Llama 3 rope scaling, both written by
    // transformers (tests/fixtures/make_fixtures.py), with their own tokenizers and templates.
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe();
    let splits = r.splits().unwrap();
    let data = (&splits.train[..64], &splits.validation[..16]);
    let mut settings = r.student.train.clone();
    settings.max_steps = Some(3);
    settings.eval_every = 3;
    for name in ["qwen2-bias", "llama3-rope"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf").join(name);
        let base = Checkpoint::load(&src).unwrap();
        let spec = FinetuneSpec {
            lora: LoraConfig { r: 2, lora_alpha: 4.0, target_modules: vec!["q_proj".into(), "down_proj".into()] },
            seed: 0,
            ewc_lambda: 1.0,
            fisher_batches: 1,
            train: settings.clone(),
        };
        let ft = finetune(&base, data, data.0, &spec, &quiet(tmp.path().join(name).join("adapter"))).unwrap();
        assert_eq!(ft.log.steps, 3);
        let merged_dir = tmp.path().join(name).join("merged");
        merge(&base, &ft.adapter, &merged_dir).unwrap();
        let merged = Checkpoint::load(&merged_dir).unwrap();
        assert_eq!(merged.config, base.config, "{name}: merge keeps the configuration");
        let spec = DistillSpec {
            student: StudentInit::Slice(StudentShape {
                layers: vec![base.config.num_hidden_layers - 1],
                intermediate_size: None,
                hidden_size: None,
            }),
            temperature: 2.0,
            alpha: 0.5,
            train: settings.clone(),
            teacher_cache: None,
            hidden_weight: 0.0,
        };
        let out = tmp.path().join(name).join("student");
        distill(&merged, data, &spec, &quiet(out.clone())).unwrap();
        let student = Checkpoint::load(&out).unwrap();
        assert_eq!(student.config.architecture, base.config.architecture);
        assert_eq!(student.config.qkv_bias, base.config.qkv_bias);
        assert_eq!(student.config.rope, base.config.rope);
        assert_eq!(student.chat_template(), base.chat_template(), "{name}: the teacher's template is kept");
        // The student exports and its ONNX graph matches candle.
        let report = edgelm_distill::export::export(
            &student,
            &tmp.path().join(name).join("bundle"),
            &edgelm_distill::export::ExportOptions::default(),
        )
        .unwrap();
        assert!(report.verify.unwrap().max_abs_diff < 1e-4);
    }
}

#[test]
fn matching_hidden_states_brings_the_students_layers_closer_to_the_teachers() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe();
    let teacher_dir = tmp.path().join("teacher");
    pretrain(&r, &quiet(teacher_dir.clone())).unwrap();
    let teacher = Checkpoint::load(&teacher_dir).unwrap();
    let splits = r.splits().unwrap();
    let data = (&splits.train[..], &splits.validation[..]);
    let every: Vec<usize> = (0..teacher.config.num_hidden_layers).collect();
    let last = vec![teacher.config.num_hidden_layers - 1];
    let mut train = r.student.train.clone();
    train.max_steps = Some(12);
    // A narrower MLP and the teacher's width and depth: what a structurally pruned copy is
    // (or, with fewer layers, a sliced student that meets the layers it came from).
    let spec = |layers: &[usize], hidden_weight: f64, hidden_size: Option<usize>, cache: Option<(PathBuf, usize)>| {
        DistillSpec {
            student: StudentInit::Slice(StudentShape {
                layers: layers.to_vec(),
                intermediate_size: Some(16),
                hidden_size,
            }),
            temperature: 2.0,
            alpha: 0.5,
            train: train.clone(),
            teacher_cache: cache,
            hidden_weight,
        }
    };
    // Relative distance of the student's residual stream from the teacher's on validation
    // answers, layer by layer.
    let fmt = Formatter::for_checkpoint(&teacher).unwrap();
    let encoded = fmt.encode_within(&splits.validation, teacher.config.max_position_embeddings, "v").unwrap();
    let batch = Batch::new(&encoded.iter().collect::<Vec<_>>(), fmt.pad()).unwrap();
    let (_, targets) = LlamaModel::new(&teacher).unwrap().logits_and_states_at(&batch.input_ids, &batch.rows).unwrap();
    let distance = |dir: &Path, layers: &[usize]| {
        let student = LlamaModel::new(&Checkpoint::load(dir).unwrap()).unwrap();
        let (_, states) = student.logits_and_states_at(&batch.input_ids, &batch.rows).unwrap();
        hidden_state_loss(&states, &targets, layers).unwrap().to_scalar::<f32>().unwrap()
    };
    for layers in [&every, &last] {
        let name = format!("{layers:?}");
        let (plain, matched) = (tmp.path().join(format!("plain{name}")), tmp.path().join(format!("matched{name}")));
        distill(&teacher, data, &spec(layers, 0.0, None, None), &quiet(plain.clone())).unwrap();
        distill(&teacher, data, &spec(layers, 10.0, None, None), &quiet(matched.clone())).unwrap();
        let (d_plain, d_matched) = (distance(&plain, layers), distance(&matched, layers));
        assert!(d_matched < 0.8 * d_plain, "layers {name}: matched {d_matched} against logits only {d_plain}");
    }
    // Streams of different widths, a teacher read from a cache, or a model given as weights
    // whose depth is not the teacher's cannot be matched.
    let narrow = distill(&teacher, data, &spec(&every, 1.0, Some(32), None), &quiet(tmp.path().join("narrow")));
    assert!(narrow.unwrap_err().to_string().contains("residual stream is 32 wide"));
    let cached = spec(&every, 1.0, None, Some((tmp.path().join("cache"), 8)));
    let cached = distill(&teacher, data, &cached, &quiet(tmp.path().join("cached")));
    assert!(cached.unwrap_err().to_string().contains("teacher cache"));
    let shallow = Checkpoint::load(tmp.path().join(format!("plain{last:?}"))).unwrap();
    let given = DistillSpec {
        student: StudentInit::Weights(Box::new(shallow.config.clone()), shallow.tensors.clone()),
        ..spec(&every, 1.0, None, None)
    };
    let given = distill(&teacher, data, &given, &quiet(tmp.path().join("given")));
    assert!(given.unwrap_err().to_string().contains("layer by layer"));
}

#[test]
fn distilling_from_a_teacher_cache_matches_the_teacher_on_the_fly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe();
    let teacher_dir = tmp.path().join("teacher");
    pretrain(&r, &quiet(teacher_dir.clone())).unwrap();
    let teacher = Checkpoint::load(&teacher_dir).unwrap();
    let splits = r.splits().unwrap();
    let mut train = r.student.train.clone();
    train.max_steps = Some(6);
    let spec = |cache: Option<(PathBuf, usize)>| DistillSpec {
        student: StudentInit::Slice(StudentShape { layers: vec![0], intermediate_size: None, hidden_size: None }),
        temperature: 2.0,
        alpha: 0.5,
        train: train.clone(),
        teacher_cache: cache,
        hidden_weight: 0.0,
    };
    let data = (&splits.train[..], &splits.validation[..]);
    let vocab = teacher.config.vocab_size;
    distill(&teacher, data, &spec(None), &quiet(tmp.path().join("fly"))).unwrap();
    let cache_dir = tmp.path().join("cache");
    distill(&teacher, data, &spec(Some((cache_dir.clone(), vocab))), &quiet(tmp.path().join("cached"))).unwrap();
    // With every logit cached the loss is the same function: the students agree (a cached row
    // paired with the wrong example would not).
    let (a, b) = (weights(&tmp.path().join("fly")), weights(&tmp.path().join("cached")));
    let mut worst = 0f32;
    for (name, wa) in &a {
        worst = wa.iter().zip(&b[name]).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
    }
    assert!(worst < 1e-4, "students differ by {worst}");

    // The cache is reused while teacher and data are unchanged, and rebuilt otherwise.
    let file = cache_dir.join(format!("teacher-top{vocab}.safetensors"));
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let first = stamp(&file);
    std::thread::sleep(std::time::Duration::from_millis(20));
    distill(&teacher, data, &spec(Some((cache_dir.clone(), vocab))), &quiet(tmp.path().join("again"))).unwrap();
    assert_eq!(stamp(&file), first, "reused");
    let fewer = (&splits.train[..100], data.1);
    distill(&teacher, fewer, &spec(Some((cache_dir.clone(), vocab))), &quiet(tmp.path().join("other"))).unwrap();
    assert_ne!(stamp(&file), first, "other data: rebuilt");
    // A top-k cache with k = 8 trains too.
    distill(&teacher, data, &spec(Some((cache_dir, 8))), &quiet(tmp.path().join("top8"))).unwrap();
}
