//! The main command: from the recipe's committed teacher to answers on the device runtime.
//!
//! teacher (committed, or pre-trained when the recipe's teacher folder is absent) -> LoRA
//! fine-tune + merge (when the recipe has `[finetune]`) -> distilled student -> exported bundle
//! (checked against candle) -> quantized bundles (the recipe's `[[quantize]]`, each gated on
//! task completion and KL against the fp32 bundle) -> held-out commands answered through the
//! runtime from the smallest bundle that passed, streaming.
//! Every stage is scored on the same held-out test examples; `report.json` and `report.svg`
//! are written to the output folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, IoContext, Result};
use crate::eval::{checkpoint_completion, score_bundle, score_checkpoint, Answer, Score};
use crate::export::{
    compare_bundles_on, compare_checkpoints_on, export, quantize_bundle, ExportOptions, SequenceComparison,
};
use crate::lora::LoraConfig;
use crate::prune::structured::{calibration_sequences, measure_importance, prune_structured};
use crate::recipe::Recipe;
use crate::report::{svg, Bar};
use crate::student::StudentShape;
use crate::train::batch::{Encoded, Formatter};
use crate::train::distill::{distill, DistillSpec, StudentInit};
use crate::train::finetune::{finetune, merge, FinetuneSpec};
use crate::train::fit::LogPoint;
use crate::train::pretrain::pretrain;
use crate::train::stage::{StageOptions, TrainLog};

/// Pipeline settings besides the recipe.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Output folder (stages' checkpoints, bundle, report).
    pub output: PathBuf,
    /// Test examples scored per stage (overrides the recipe).
    pub eval_examples: Option<usize>,
    /// Runtime settings for the bundle.
    pub engine: edgelm_runtime::EngineOptions,
    /// Draw progress bars.
    pub progress: bool,
}

/// One stage's row of the summary table.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    /// Stage name.
    pub stage: String,
    /// Parameters.
    pub parameters: usize,
    /// Weight bytes on disk (fp32 safetensors, or model.onnx with model.onnx.data for the bundle).
    pub bytes: u64,
    /// Exact-match rate on the held-out examples.
    pub task_completion: f64,
    /// Perplexity of the expected answers (candle stages).
    pub perplexity: Option<f64>,
    /// Seconds the stage took (training or export, plus its scoring).
    pub seconds: f64,
    /// Median time to first token on a few test commands (bundles only).
    pub ttft_ms: Option<f64>,
    /// Median decode speed on a few test commands (bundles only).
    pub decode_tokens_per_s: Option<f64>,
    /// Up to 10 wrong answers.
    pub misses: Vec<Answer>,
}

/// A pruned or quantized model against the model it came from.
#[derive(Debug, Clone, Serialize)]
pub struct GateResult {
    /// Stage name (`pruned`, `int8`, `int4`).
    pub stage: String,
    /// What it is measured against (`student`, `fp32 bundle`).
    pub against: String,
    /// Task completion lost, in percentage points (negative: gained).
    pub drop_points: f64,
    /// The recipe's limit.
    pub max_drop: f64,
    /// Mean KL divergence of next-token distributions over the first test commands (prompt
    /// and expected answer, read teacher-forced), nats.
    pub mean_kl: f64,
    /// Token positions the KL and top-1 agreement were measured on.
    pub kl_positions: usize,
    /// The recipe's limit (null: not limited).
    pub max_kl: Option<f64>,
    /// Share of checked positions with the same greedy token.
    pub top1_agreement: f64,
    /// Perplexity of those commands' own next tokens: the source's and this stage's.
    pub perplexity: (f64, f64),
    /// Whether both limits held.
    pub passed: bool,
}

impl GateResult {
    /// One line for the progress log: completion, its change, KL, top-1, perplexity, verdict.
    fn summary(&self, completion: f64) -> String {
        format!(
            "{:.1}% ({:+.1} points against the {}), mean KL {:.4}, top-1 {:.0}%, perplexity {:.3} -> {:.3}: gate {}",
            100.0 * completion,
            -self.drop_points,
            self.against,
            self.mean_kl,
            100.0 * self.top1_agreement,
            self.perplexity.0,
            self.perplexity.1,
            if self.passed { "passed" } else { "FAILED" }
        )
    }

    /// The error for a failed gate, naming what was lost against which limit.
    fn error(&self) -> Error {
        let kl_limit = self.max_kl.map(|k| format!(" (max_kl {k})")).unwrap_or_default();
        Error::Gate {
            stage: self.stage.clone(),
            what: format!(
                "task completion dropped {:.1} points against the {} (max_drop {}), mean KL {:.4} nats{kl_limit}, top-1 agreement {:.0}%, perplexity {:.3} -> {:.3}",
                self.drop_points,
                self.against,
                self.max_drop,
                self.mean_kl,
                100.0 * self.top1_agreement,
                self.perplexity.0,
                self.perplexity.1,
            ),
        }
    }
}

/// Runtime figures of the streamed demonstration.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeFigures {
    /// Median time to first token.
    pub ttft_ms: f64,
    /// Median decode speed.
    pub decode_tokens_per_s: f64,
    /// Weights the runtime reads (model.onnx and model.onnx.data).
    pub weights_mib: f64,
    /// KV cache at the model's full context.
    pub kv_cache_mib: f64,
    /// Peak resident memory of this process (training stages included, so an upper bound).
    pub process_peak_rss_mib: f64,
}

/// What the fine-tune taught and what it kept.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    /// Fine-tuning examples (new ones and replayed original ones).
    pub new_examples: usize,
    /// Of those, examples of the original training split.
    pub replayed: usize,
    /// Test commands of the new data scored (0: the fine-tune used the original data).
    pub new_test_examples: usize,
    /// Task completion on the new data's test commands before and after.
    pub new_before: Option<f64>,
    /// See `new_before`.
    pub new_after: Option<f64>,
    /// Task completion on the original test commands before and after (forgetting).
    pub original_before: f64,
    /// See `original_before`.
    pub original_after: f64,
    /// EWC strength of the kept fine-tune.
    pub ewc_lambda: f64,
    /// The same fine-tune without EWC, when the recipe asks for the comparison.
    pub without_ewc: Option<FinetuneOutcome>,
}

/// Task completion after a fine-tune: on the new data and on the original test commands.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOutcome {
    /// On the new data's test commands.
    pub new: Option<f64>,
    /// On the original test commands.
    pub original: f64,
}

/// "x% on the new commands, y% on the original ones".
fn learned(new: Option<f64>, original: f64) -> String {
    match new {
        Some(n) => format!("{:.1}% on the new commands, {:.1}% on the original ones", 100.0 * n, 100.0 * original),
        None => format!("{:.1}%", 100.0 * original),
    }
}

/// Everything the pipeline measured (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// Recipe name.
    pub recipe: String,
    /// Held-out examples each stage was scored on.
    pub test_examples: usize,
    /// One row per stage.
    pub stages: Vec<StageRow>,
    /// The accuracy gates of the pruned model and the quantized bundles.
    pub gates: Vec<GateResult>,
    /// What the LoRA fine-tune taught and kept (when the recipe has one).
    pub finetune: Option<FinetuneReport>,
    /// The bundle the pipeline ships: the last (smallest) one that passed its gate.
    pub shipped: PathBuf,
    /// Training logs (`train_log.json` contents) by stage.
    pub training: Vec<TrainLog>,
    /// Largest ONNX-vs-candle logit difference of the export check.
    pub export_max_abs_diff: Option<f32>,
    /// Runtime speed on the shown examples.
    pub runtime: Option<RuntimeFigures>,
    /// Student parameters as a share of the teacher's.
    pub student_share: f64,
    /// Student task completion relative to the teacher's.
    pub student_relative_completion: f64,
    /// Wall-clock seconds of the whole pipeline.
    pub total_seconds: f64,
}

/// The log a checkpoint's training left next to it, when there is one (a teacher trained
/// elsewhere has none).
fn read_log(dir: &Path) -> Result<Option<TrainLog>> {
    let p = dir.join("train_log.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).at(&p)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Format { path: p, what: e.to_string() })
}

fn row(stage: &str, ck: &Checkpoint, score: Score, seconds: f64) -> StageRow {
    StageRow {
        stage: stage.into(),
        parameters: ck.config.num_parameters(),
        bytes: edgelm_runtime::bundle::weight_bytes(&ck.dir),
        task_completion: score.task_completion,
        perplexity: score.perplexity,
        seconds,
        ttft_ms: None,
        decode_tokens_per_s: None,
        misses: score.misses,
    }
}

/// Runs the whole pipeline, printing progress and the streamed answers to `out`.
pub fn run(recipe: &Recipe, opts: &PipelineOptions, out: &mut dyn Write) -> Result<PipelineReport> {
    let started = Instant::now();
    // The export check and the last stages need ONNX Runtime: find it before training for
    // minutes, not after.
    edgelm_runtime::ortlib::init(opts.engine.ort_lib.as_deref())?;
    // Likewise a pruning stage that cannot run.
    if let Some(p) = &recipe.prune {
        p.runnable().map_err(|what| Error::InvalidConfig { what })?;
    }
    let dir = &opts.output;
    std::fs::create_dir_all(dir).at(dir)?;
    let splits = recipe.splits()?;
    let n_eval = opts.eval_examples.or(recipe.pipeline.eval_examples).unwrap_or(splits.test.len());
    let test = &splits.test[..n_eval.min(splits.test.len())];
    if test.is_empty() {
        return Err(Error::InvalidConfig {
            what: "the pipeline scores every stage on test examples and there are none to score (eval_examples 0, or an empty test split)".into(),
        });
    }
    // Each line says how long the run has been going, so a slow stage shows as it happens.
    let say = |out: &mut dyn Write, msg: String| -> Result<()> {
        writeln!(out, "[{:>4.0} s] {msg}", started.elapsed().as_secs_f64()).at("stdout")
    };
    let stage = |name: &str| {
        let mut o = StageOptions::new(dir.join(name));
        o.progress = opts.progress;
        o
    };
    let mut rows = Vec::new();
    let mut logs = Vec::new();

    // 1. Teacher.
    let t = Instant::now();
    let named = recipe.pipeline.teacher.as_ref().map(|p| recipe.path(p));
    let teacher_dir = match named {
        Some(p) if p.join("config.json").exists() => {
            say(out, format!("teacher: {} (committed)", p.display()))?;
            p
        }
        _ => {
            let why = match &named {
                Some(p) => format!("{} holds no checkpoint (config.json)", p.display()),
                None => "the recipe names no committed teacher ([pipeline] teacher)".into(),
            };
            say(
                out,
                format!("teacher: {why}; pre-training one from the recipe into {}", dir.join("teacher").display()),
            )?;
            pretrain(recipe, &stage("teacher"))?;
            dir.join("teacher")
        }
    };
    let teacher = Checkpoint::load(&teacher_dir)?;
    // What the later stages cut from this teacher, checked now rather than after training.
    let shape = StudentShape {
        layers: recipe.student.layers.clone(),
        intermediate_size: recipe.student.intermediate_size,
        hidden_size: recipe.student.hidden_size,
    };
    crate::student::check_shape(&teacher.config, &shape)?;
    if let Some(p) = &recipe.prune {
        let mut student = teacher.config.clone();
        student.intermediate_size = shape.intermediate_size.unwrap_or(student.intermediate_size);
        p.options().check(&student)?;
    }
    logs.extend(read_log(&teacher_dir)?);
    let score = score_checkpoint(&teacher, test, opts.progress)?;
    say(
        out,
        format!("teacher: {:.1}% task completion on {} held-out commands", 100.0 * score.task_completion, test.len()),
    )?;
    rows.push(row("teacher", &teacher, score, t.elapsed().as_secs_f64()));

    // 2. LoRA fine-tune + merge: on new data (the user's own home) when the recipe brings
    // some, measuring what it taught and, with EWC, what of the original task it kept.
    let mut source = teacher;
    let new_data = recipe.finetune_splits()?;
    let mut finetune_report = None;
    if let Some(ft) = &recipe.finetune {
        let t = Instant::now();
        // Original examples mixed into new data.
        let n_replay = if new_data.is_some() { ft.replay.min(splits.train.len()) } else { 0 };
        let replayed: Vec<crate::data::Example>;
        let (ft_train, ft_validation) = match &new_data {
            Some(d) => {
                replayed = d.train.iter().chain(&splits.train[..n_replay]).cloned().collect();
                (&replayed[..], &d.validation[..])
            }
            None => {
                let n = ft.examples.unwrap_or(splits.train.len()).min(splits.train.len());
                (&splits.train[..n], &splits.validation[..])
            }
        };
        let new_test = new_data.as_ref().map(|d| &d.test[..n_eval.min(d.test.len())]);
        let score_new = |ck: &Checkpoint| -> Result<Option<f64>> {
            new_test.map(|t| checkpoint_completion(ck, t, opts.progress)).transpose()
        };
        let new_before = score_new(&source)?;
        if let Some(b) = new_before {
            say(out, format!("teacher on the fine-tuning data's test commands (never seen): {:.1}%", 100.0 * b))?;
        }
        let spec = |ewc_lambda: f64| FinetuneSpec {
            lora: LoraConfig { r: ft.r, lora_alpha: ft.alpha, target_modules: ft.targets.clone() },
            seed: ft.train.seed,
            ewc_lambda,
            fisher_batches: ft.fisher_batches,
            train: ft.train.clone(),
        };
        // Without EWC first, when asked: the baseline forgetting is measured against.
        let baseline = if ft.ewc_baseline && ft.ewc_lambda > 0.0 {
            let done =
                finetune(&source, (ft_train, ft_validation), &splits.train, &spec(0.0), &stage("adapter-no-ewc"))?;
            merge(&source, &done.adapter, &dir.join("finetuned-no-ewc"))?;
            let merged = Checkpoint::load(dir.join("finetuned-no-ewc"))?;
            let original = checkpoint_completion(&merged, test, opts.progress)?;
            let new = score_new(&merged)?;
            say(out, format!("fine-tuned without EWC: {}", learned(new, original)))?;
            Some((new, original))
        } else {
            None
        };
        let done =
            finetune(&source, (ft_train, ft_validation), &splits.train, &spec(ft.ewc_lambda), &stage("adapter"))?;
        merge(&source, &done.adapter, &dir.join("finetuned"))?;
        logs.push(done.log);
        let merged = Checkpoint::load(dir.join("finetuned"))?;
        let score = score_checkpoint(&merged, test, opts.progress)?;
        let new_after = score_new(&merged)?;
        let with = if ft.ewc_lambda > 0.0 { format!(", EWC lambda {}", ft.ewc_lambda) } else { String::new() };
        say(out, format!("fine-tuned (LoRA r={}{with}, merged): {}", ft.r, learned(new_after, score.task_completion)))?;
        let original_before = rows[0].task_completion;
        finetune_report = Some(FinetuneReport {
            new_examples: ft_train.len(),
            replayed: n_replay,
            new_test_examples: new_test.map(<[_]>::len).unwrap_or(0),
            new_before,
            new_after,
            original_before,
            original_after: score.task_completion,
            ewc_lambda: ft.ewc_lambda,
            without_ewc: baseline.map(|(new, original)| FinetuneOutcome { new, original }),
        });
        rows.push(row("fine-tuned", &merged, score, t.elapsed().as_secs_f64()));
        source = merged;
    }
    // The student learns everything the fine-tuned teacher knows: the original data and the new.
    let distill_train: Vec<crate::data::Example> = match &new_data {
        Some(d) => splits.train.iter().chain(&d.train).cloned().collect(),
        None => splits.train.clone(),
    };

    // 3. Distil.
    let t = Instant::now();
    let s = &recipe.student;
    let spec = DistillSpec {
        student: StudentInit::Slice(shape),
        temperature: s.temperature,
        alpha: s.alpha,
        train: s.train.clone(),
        teacher_cache: s.teacher_top_k.map(|k| (dir.join("teacher-cache"), k)),
        hidden_weight: 0.0,
    };
    let log = distill(&source, (&distill_train, &splits.validation), &spec, &stage("student"))?;
    logs.push(log);
    let student = Checkpoint::load(dir.join("student"))?;
    let score = score_checkpoint(&student, test, opts.progress)?;
    say(
        out,
        format!("student: {:.1}% ({} parameters)", 100.0 * score.task_completion, student.config.num_parameters()),
    )?;
    rows.push(row("student", &student, score, t.elapsed().as_secs_f64()));

    // The gates' fixed token set: the first test commands as the model reads them (prompt and
    // expected answer, teacher-forced).
    let kl_sequences: Vec<Encoded> = {
        let f = Formatter::for_checkpoint(&student)?;
        let ctx = student.config.max_position_embeddings;
        test.iter()
            .take(KL_EXAMPLES)
            .map(|e| f.encode(e).map(|x| Encoded { ids: x.ids.into_iter().take(ctx).collect(), ..x }))
            .collect::<Result<_>>()?
    };
    let mut gates = Vec::new();

    // 3b. Structured pruning with a recovery distillation from the unpruned student, gated.
    let mut student = student;
    if let Some(p) = &recipe.prune {
        let t = Instant::now();
        // The unpruned student's speed, for the table: exported but not scored.
        let unpruned = dir.join("bundle-student");
        export(&student, &unpruned, &ExportOptions { single_turn: true, verify: false, ..ExportOptions::default() })?;
        let (ttft, decode) = speed(&unpruned, test, &opts.engine)?;
        if let Some(r) = rows.last_mut() {
            (r.ttft_ms, r.decode_tokens_per_s) = (Some(ttft), Some(decode));
        }
        let calibration = calibration_sequences(&student, &splits.train, p.calibration)?;
        let importance = measure_importance(&student.config, &student.tensors, &calibration)?;
        let (config, weights, cut) = prune_structured(&student.config, &student.tensors, &importance, &p.options())?;
        say(out, format!("pruning: {}; recovering", cut.summary()))?;
        let spec = DistillSpec {
            student: StudentInit::Weights(Box::new(config), weights),
            temperature: p.temperature,
            alpha: p.alpha,
            train: p.train.clone(),
            teacher_cache: None,
            hidden_weight: p.hidden_weight,
        };
        logs.push(distill(&student, (&distill_train, &splits.validation), &spec, &stage("pruned"))?);
        let pruned_dir = dir.join("pruned");
        cut.write(&pruned_dir)?;
        let pruned = Checkpoint::load(&pruned_dir)?;
        let score = score_checkpoint(&pruned, test, opts.progress)?;
        let check = compare_checkpoints_on(&student, &pruned, &kl_sequences)?;
        let student_completion = rows.last().map(|r| r.task_completion).unwrap_or(0.0);
        let limits = Limits { max_drop: p.max_drop, max_kl: p.max_kl };
        let g = gate(("pruned", "student"), (student_completion, score.task_completion), &check, limits);
        say(out, format!("pruned (recovered): {}", g.summary(score.task_completion)))?;
        rows.push(row("pruned", &pruned, score, t.elapsed().as_secs_f64()));
        gates.push(g);
        stop_at_failed_gate(dir, recipe, &rows, &gates)?;
        student = pruned;
    }

    // 4. Export and score through the runtime.
    let t = Instant::now();
    let bundle = dir.join("bundle");
    // The pipeline's data are single requests ({instruction, input, output}).
    let exported = export(&student, &bundle, &ExportOptions { single_turn: true, ..ExportOptions::default() })?;
    let diff = exported.verify.as_ref().map(|v| v.max_abs_diff);
    let score = score_bundle(&bundle, test, &opts.engine, opts.progress)?;
    say(out, format!("bundle (ONNX Runtime): {:.1}%", 100.0 * score.task_completion))?;
    let fp32_completion = score.task_completion;
    let bundle_row = |stage: &str, dir: &Path, score: Score, t: Instant| -> Result<StageRow> {
        let (ttft, decode) = speed(dir, test, &opts.engine)?;
        Ok(StageRow {
            stage: stage.into(),
            parameters: student.config.num_parameters(),
            bytes: edgelm_runtime::bundle::weight_bytes(dir),
            task_completion: score.task_completion,
            perplexity: None,
            seconds: t.elapsed().as_secs_f64(),
            ttft_ms: Some(ttft),
            decode_tokens_per_s: Some(decode),
            misses: score.misses,
        })
    };
    rows.push(bundle_row("bundle", &bundle, score, t)?);

    // 5. Quantized bundles, each gated against the fp32 one: task completion on the test
    // commands, and next-token distributions over the first of them as the model reads them
    // (prompt and expected answer, teacher-forced).
    let mut shipped = bundle.clone();
    for q in &recipe.quantize {
        let t = Instant::now();
        let name = q.name();
        let qdir = dir.join(format!("bundle-{name}"));
        quantize_bundle(&bundle, &qdir, &q.options()?, None)?;
        let check = compare_bundles_on(&bundle, &qdir, &kl_sequences)?;
        let score = score_bundle(&qdir, test, &opts.engine, opts.progress)?;
        let limits = Limits { max_drop: q.max_drop, max_kl: Some(q.max_kl) };
        let gate = gate((&name, "fp32 bundle"), (fp32_completion, score.task_completion), &check, limits);
        say(out, format!("{name} bundle: {}", gate.summary(score.task_completion)))?;
        rows.push(bundle_row(&name, &qdir, score, t)?);
        gates.push(gate);
        stop_at_failed_gate(dir, recipe, &rows, &gates)?;
        shipped = qdir;
    }

    // 6. Held-out commands, streamed from the runtime.
    let runtime = show(&shipped, &splits.test, recipe.pipeline.show, &opts.engine, out)?;

    let teacher_row = &rows[0];
    let student_row = rows.iter().find(|r| r.stage == "student").expect("student row");
    let report = PipelineReport {
        recipe: recipe.name.clone(),
        test_examples: test.len(),
        student_share: student_row.parameters as f64 / teacher_row.parameters as f64,
        student_relative_completion: student_row.task_completion / teacher_row.task_completion.max(1e-9),
        stages: rows,
        gates,
        finetune: finetune_report,
        shipped: shipped.clone(),
        training: logs,
        export_max_abs_diff: diff,
        runtime,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    table(&report, out)?;
    record_in_bundle(&bundle, &report)?;
    if shipped != bundle {
        record_in_bundle(&shipped, &report)?;
    }
    let p = dir.join("report.json");
    std::fs::write(&p, serde_json::to_string_pretty(&report).expect("json")).at(&p)?;
    let curves: Vec<(String, Vec<LogPoint>)> =
        report.training.iter().map(|l| (l.stage.clone(), l.history.clone())).collect();
    let bars: Vec<Bar> = report
        .stages
        .iter()
        .map(|r| Bar {
            name: r.stage.clone(),
            size: format!("{:.2}M, {:.1} MiB", r.parameters as f64 / 1e6, r.bytes as f64 / (1 << 20) as f64),
            value: r.task_completion,
        })
        .collect();
    let p = dir.join("report.svg");
    std::fs::write(&p, svg(&format!("edgelm pipeline: {}", recipe.name), &curves, &bars)).at(&p)?;
    say(out, format!("report: {} and {}", dir.join("report.json").display(), p.display()))?;
    Ok(report)
}

/// Adds the stage summary to the bundle's `edgelm.json` (`pipeline`), so the bundle carries
/// where it came from and how it scored. The manifest itself is not hashed.
fn record_in_bundle(bundle: &Path, r: &PipelineReport) -> Result<()> {
    use edgelm_runtime::bundle::{update_manifest, PipelineSummary, StageSummary};
    let summary = PipelineSummary {
        recipe: r.recipe.clone(),
        test_examples: r.test_examples,
        stages: r
            .stages
            .iter()
            .map(|s| StageSummary {
                stage: s.stage.clone(),
                parameters: s.parameters,
                bytes: s.bytes,
                task_completion: s.task_completion,
                perplexity: s.perplexity,
            })
            .collect(),
        student_share: r.student_share,
        student_relative_completion: r.student_relative_completion,
    };
    update_manifest(bundle, |m| m.pipeline = Some(summary))?;
    Ok(())
}

/// Test commands the gates' KL is measured on.
const KL_EXAMPLES: usize = 8;

/// When the last gate failed: writes what was measured so far to `report.json` and returns
/// the gate's error.
fn stop_at_failed_gate(dir: &Path, recipe: &Recipe, rows: &[StageRow], gates: &[GateResult]) -> Result<()> {
    match gates.last() {
        Some(g) if !g.passed => {
            let failed = g.error();
            let p = dir.join("report.json");
            let partial =
                serde_json::json!({"recipe": recipe.name, "stages": rows, "gates": gates, "error": failed.to_string()});
            std::fs::write(&p, serde_json::to_string_pretty(&partial).expect("json")).at(&p)?;
            // An earlier run's picture would sit beside this run's report as if it were its.
            let svg = dir.join("report.svg");
            if svg.exists() {
                std::fs::remove_file(&svg).at(&svg)?;
            }
            Err(failed)
        }
        _ => Ok(()),
    }
}

/// Limits a stage is held to.
struct Limits {
    max_drop: f64,
    max_kl: Option<f64>,
}

/// A stage's gate: task completion against its source's, and the teacher-forced comparison.
fn gate(
    (stage, against): (&str, &str),
    (source_completion, completion): (f64, f64),
    check: &SequenceComparison,
    limits: Limits,
) -> GateResult {
    let drop_points = 100.0 * (source_completion - completion);
    GateResult {
        stage: stage.into(),
        against: against.into(),
        drop_points,
        max_drop: limits.max_drop,
        mean_kl: check.mean_kl,
        kl_positions: check.positions,
        max_kl: limits.max_kl,
        top1_agreement: check.top1_agreement,
        perplexity: (check.reference_perplexity, check.perplexity),
        passed: drop_points <= limits.max_drop
            && limits.max_kl.is_none_or(|k| check.mean_kl <= k)
            && check.max_abs_diff.is_finite(),
    }
}

/// Median TTFT and decode speed of a bundle on the first three test commands.
fn speed(
    bundle: &Path,
    test: &[crate::data::Example],
    engine_opts: &edgelm_runtime::EngineOptions,
) -> Result<(f64, f64)> {
    let engine = edgelm_runtime::Engine::open(bundle, engine_opts)?;
    let params = edgelm_runtime::GenerateParams::default()
        .with_max_new_tokens(crate::eval::MAX_ANSWER_TOKENS)
        .with_ignore_eos(true);
    let (mut ttft, mut decode) = (Vec::new(), Vec::new());
    for e in test.iter().take(3) {
        let prompt = engine.encode_chat(&[edgelm_runtime::ChatMessage::user(Formatter::user_message(e))])?;
        let g = engine.generate(&prompt, &params, |_| std::ops::ControlFlow::Continue(()))?;
        ttft.push(g.metrics.ttft_ms);
        decode.push(g.metrics.decode_tokens_per_s);
    }
    use edgelm_runtime::metrics::median;
    Ok((median(ttft), median(decode)))
}

/// Streams the bundle's answers to the first `n` test commands; returns median speed figures.
fn show(
    bundle: &Path,
    test: &[crate::data::Example],
    n: usize,
    engine_opts: &edgelm_runtime::EngineOptions,
    out: &mut dyn Write,
) -> Result<Option<RuntimeFigures>> {
    if n == 0 {
        return Ok(None);
    }
    let engine = edgelm_runtime::Engine::open(bundle, engine_opts)?;
    let params = edgelm_runtime::GenerateParams::default().with_max_new_tokens(crate::eval::MAX_ANSWER_TOKENS);
    let (mut ttft, mut decode) = (Vec::new(), Vec::new());
    writeln!(out, "\nheld-out commands through the runtime ({}):", bundle.display()).at("stdout")?;
    for e in test.iter().take(n) {
        write!(out, "  > {}\n    ", e.input).at("stdout")?;
        let prompt = engine.encode_chat(&[edgelm_runtime::ChatMessage::user(Formatter::user_message(e))])?;
        let mut failed = None;
        let g = engine.generate(&prompt, &params, |ev| {
            if let Err(err) = write!(out, "{}", ev.text).and_then(|_| out.flush()) {
                failed = Some(err);
                return std::ops::ControlFlow::Break(());
            }
            std::ops::ControlFlow::Continue(())
        })?;
        if let Some(err) = failed {
            return Err(Error::Io { path: "stdout".into(), err });
        }
        let mark = if g.text.trim() == e.output { "ok" } else { "expected" };
        writeln!(out, "   [{mark}{}]", if mark == "ok" { String::new() } else { format!(": {}", e.output) })
            .at("stdout")?;
        ttft.push(g.metrics.ttft_ms);
        decode.push(g.metrics.decode_tokens_per_s);
    }
    use edgelm_runtime::metrics::median;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(Some(RuntimeFigures {
        ttft_ms: median(ttft),
        decode_tokens_per_s: median(decode),
        weights_mib: mib(engine.weight_bytes()),
        kv_cache_mib: mib(engine.kv_cache_bytes(engine.context_length())),
        process_peak_rss_mib: mib(edgelm_runtime::metrics::peak_rss_bytes()),
    }))
}

fn table(r: &PipelineReport, out: &mut dyn Write) -> Result<()> {
    let mut t = String::new();
    t.push_str(&format!(
        "\n{:<11} {:>11} {:>9} {:>16} {:>10} {:>8} {:>9} {:>9}\n",
        "stage", "parameters", "MiB", "task completion", "perplexity", "TTFT ms", "tokens/s", "seconds"
    ));
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for s in &r.stages {
        t.push_str(&format!(
            "{:<11} {:>11} {:>9.2} {:>15.1}% {:>10} {:>8} {:>9} {:>8.1}\n",
            s.stage,
            s.parameters,
            s.bytes as f64 / (1 << 20) as f64,
            100.0 * s.task_completion,
            opt(s.perplexity, 3),
            opt(s.ttft_ms, 1),
            opt(s.decode_tokens_per_s, 0),
            s.seconds
        ));
    }
    for g in &r.gates {
        t.push_str(&format!(
            "gate {} (against the {}): {:+.1} points (max drop {}), mean KL {:.4} (max {}), top-1 {:.0}%, \
             perplexity {:.3} -> {:.3}: {}\n",
            g.stage,
            g.against,
            -g.drop_points,
            g.max_drop,
            g.mean_kl,
            g.max_kl.map(|k| k.to_string()).unwrap_or_else(|| "none".into()),
            100.0 * g.top1_agreement,
            g.perplexity.0,
            g.perplexity.1,
            if g.passed { "passed" } else { "failed" }
        ));
    }
    if let Some(f) = &r.finetune {
        let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
        t.push_str(&format!(
            "fine-tune on {} examples ({} of them replayed originals): new commands {} -> {}, original commands \
             {:.1}% -> {:.1}% (EWC lambda {})",
            f.new_examples,
            f.replayed,
            pct(f.new_before),
            pct(f.new_after),
            100.0 * f.original_before,
            100.0 * f.original_after,
            f.ewc_lambda
        ));
        if let Some(w) = &f.without_ewc {
            t.push_str(&format!("; without EWC: new {}, original {:.1}%", pct(w.new), 100.0 * w.original));
        }
        t.push('\n');
    }
    t.push_str(&format!("shipped: {}\n", r.shipped.display()));
    t.push_str(&format!(
        "student: {:.1}% of the teacher's parameters, {:.1}% of its task completion\n",
        100.0 * r.student_share,
        100.0 * r.student_relative_completion
    ));
    if let Some(rt) = &r.runtime {
        t.push_str(&format!(
            "runtime (ONNX Runtime, this machine): TTFT {:.1} ms, decode {:.0} tokens/s; weights {:.1} MiB + KV \
             cache {:.1} MiB at full context\n",
            rt.ttft_ms, rt.decode_tokens_per_s, rt.weights_mib, rt.kv_cache_mib
        ));
    }
    t.push_str(&format!("total: {:.0} s\n", r.total_seconds));
    write!(out, "{t}").at("stdout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{names, preset, write::WriteOptions};

    /// An fp32 bundle of the tiny preset, and one whose first MLP was damaged (down projection
    /// negated): the gate lets an honest int8 bundle through and stops the damaged one, naming
    /// the stage and what it lost.
    #[test]
    fn the_gate_stops_a_damaged_model_and_passes_an_honest_one() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        preset::write_preset("tiny", &good, 3, WriteOptions::default()).unwrap();
        let ck = Checkpoint::load(&good).unwrap();
        let fp32 = tmp.path().join("fp32");
        export(&ck, &fp32, &ExportOptions::default()).unwrap();

        // Two token sequences read teacher-forced by both bundles.
        let seqs: Vec<Encoded> = [(3..40).collect(), (100..130).collect()]
            .into_iter()
            .map(|ids: Vec<u32>| Encoded { ids, prompt_len: 4 })
            .collect();
        let int8 = tmp.path().join("int8");
        quantize_bundle(&fp32, &int8, &crate::quantize::QuantizeOptions::for_bits(8).unwrap(), None).unwrap();
        let check = compare_bundles_on(&fp32, &int8, &seqs).unwrap();
        let limits = || Limits { max_drop: 1.0, max_kl: Some(0.1) };
        let honest = gate(("int8", "fp32 bundle"), (0.9, 0.9), &check, limits());
        // Two sequences of 37 and 30 tokens with 4-token prompts: 33 + 26 answer positions.
        assert!(honest.passed && honest.kl_positions == 59, "{honest:?}");

        let mut tensors = ck.tensors.clone();
        let down = names::projection(0, "down_proj") + ".weight";
        let damaged_weight = (tensors[&down].clone() * -1.0).unwrap();
        tensors.insert(down, damaged_weight);
        let bad = tmp.path().join("bad");
        crate::checkpoint::write_checkpoint(&bad, &ck.config, &tensors, WriteOptions::default()).unwrap();
        std::fs::copy(good.join("tokenizer.json"), bad.join("tokenizer.json")).unwrap();
        let damaged = tmp.path().join("damaged");
        export(&Checkpoint::load(&bad).unwrap(), &damaged, &ExportOptions::default()).unwrap();
        let check = compare_bundles_on(&fp32, &damaged, &seqs).unwrap();
        let failed = gate(("int8", "fp32 bundle"), (0.9, 0.9), &check, limits());
        assert!(!failed.passed && failed.mean_kl > 0.1, "{failed:?}");
        assert!(failed.perplexity.1 > failed.perplexity.0, "{failed:?}");
        let msg = failed.error().to_string();
        assert!(msg.contains("stage int8") && msg.contains("mean KL") && msg.contains("max_kl 0.1"), "{msg}");
        // A drop in task completion past max_drop fails on its own.
        let dropped = gate(("int4", "fp32 bundle"), (0.9, 0.85), &check, Limits { max_drop: 3.0, max_kl: None });
        assert!(!dropped.passed && (dropped.drop_points - 5.0).abs() < 1e-9, "{dropped:?}");
    }
}
