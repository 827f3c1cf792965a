//! The main command: from the recipe's committed teacher to answers on the device runtime.
//!
//! teacher (committed, or pre-trained when the recipe's teacher folder is absent) -> LoRA
//! fine-tune + merge (when the recipe has `[finetune]`) -> distilled student -> exported bundle
//! (checked against candle) -> held-out commands answered through the runtime, streaming.
//! Every stage is scored on the same held-out test examples; `report.json` and `report.svg`
//! are written to the output folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, IoContext, Result};
use crate::eval::{score_bundle, score_checkpoint, Answer, Score};
use crate::export::{export, ExportOptions};
use crate::lora::LoraConfig;
use crate::recipe::Recipe;
use crate::report::{svg, Bar};
use crate::student::StudentShape;
use crate::train::batch::Formatter;
use crate::train::distill::{distill, DistillSpec};
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
    /// Weight bytes on disk (fp32 safetensors, or model.onnx for the bundle).
    pub bytes: u64,
    /// Exact-match rate on the held-out examples.
    pub task_completion: f64,
    /// Perplexity of the expected answers (candle stages).
    pub perplexity: Option<f64>,
    /// Seconds the stage took (training or export, plus its scoring).
    pub seconds: f64,
    /// Up to 10 wrong answers.
    pub misses: Vec<Answer>,
}

/// Runtime figures of the streamed demonstration.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeFigures {
    /// Median time to first token.
    pub ttft_ms: f64,
    /// Median decode speed.
    pub decode_tokens_per_s: f64,
    /// Weights the runtime maps (model.onnx).
    pub weights_mib: f64,
    /// KV cache at the model's full context.
    pub kv_cache_mib: f64,
    /// Peak resident memory of this process (training stages included, so an upper bound).
    pub process_peak_rss_mib: f64,
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
        misses: score.misses,
    }
}

/// Runs the whole pipeline, printing progress and the streamed answers to `out`.
pub fn run(recipe: &Recipe, opts: &PipelineOptions, out: &mut dyn Write) -> Result<PipelineReport> {
    let started = Instant::now();
    // The export check and the last stages need ONNX Runtime: find it before training for
    // minutes, not after.
    edgelm_runtime::ortlib::init(opts.engine.ort_lib.as_deref())?;
    let dir = &opts.output;
    std::fs::create_dir_all(dir).at(dir)?;
    let splits = recipe.splits()?;
    let n_eval = opts.eval_examples.or(recipe.pipeline.eval_examples).unwrap_or(splits.test.len());
    let test = &splits.test[..n_eval.min(splits.test.len())];
    let say = |out: &mut dyn Write, msg: String| -> Result<()> { writeln!(out, "{msg}").at("stdout") };
    let stage = |name: &str| {
        let mut o = StageOptions::new(dir.join(name));
        o.progress = opts.progress;
        o
    };
    let mut rows = Vec::new();
    let mut logs = Vec::new();

    // 1. Teacher.
    let t = Instant::now();
    let committed = recipe.pipeline.teacher.as_ref().map(|p| recipe.path(p)).filter(|p| p.join("config.json").exists());
    let teacher_dir = match committed {
        Some(p) => {
            say(out, format!("teacher: {} (committed)", p.display()))?;
            p
        }
        None => {
            say(out, "teacher: not committed, pre-training it from the recipe".into())?;
            pretrain(recipe, &stage("teacher"))?;
            dir.join("teacher")
        }
    };
    let teacher = Checkpoint::load(&teacher_dir)?;
    logs.extend(read_log(&teacher_dir)?);
    let score = score_checkpoint(&teacher, test, opts.progress)?;
    say(
        out,
        format!("teacher: {:.1}% task completion on {} held-out commands", 100.0 * score.task_completion, test.len()),
    )?;
    rows.push(row("teacher", &teacher, score, t.elapsed().as_secs_f64()));

    // 2. LoRA fine-tune + merge.
    let mut source = teacher;
    if let Some(ft) = &recipe.finetune {
        let t = Instant::now();
        let spec = FinetuneSpec {
            lora: LoraConfig { r: ft.r, lora_alpha: ft.alpha, target_modules: ft.targets.clone() },
            seed: ft.train.seed,
            ewc_lambda: ft.ewc_lambda,
            fisher_batches: ft.fisher_batches,
            train: ft.train.clone(),
        };
        let n = ft.examples.unwrap_or(splits.train.len()).min(splits.train.len());
        let done =
            finetune(&source, (&splits.train[..n], &splits.validation), &splits.train, &spec, &stage("adapter"))?;
        merge(&source, &done.adapter, &dir.join("finetuned"))?;
        logs.push(done.log);
        let merged = Checkpoint::load(dir.join("finetuned"))?;
        let score = score_checkpoint(&merged, test, opts.progress)?;
        say(out, format!("fine-tuned (LoRA r={}, merged): {:.1}%", ft.r, 100.0 * score.task_completion))?;
        rows.push(row("fine-tuned", &merged, score, t.elapsed().as_secs_f64()));
        source = merged;
    }

    // 3. Distil.
    let t = Instant::now();
    let s = &recipe.student;
    let spec = DistillSpec {
        shape: StudentShape {
            layers: s.layers.clone(),
            intermediate_size: s.intermediate_size,
            hidden_size: s.hidden_size,
        },
        temperature: s.temperature,
        alpha: s.alpha,
        train: s.train.clone(),
        teacher_cache: s.teacher_top_k.map(|k| (dir.join("teacher-cache"), k)),
    };
    let log = distill(&source, (&splits.train, &splits.validation), &spec, &stage("student"))?;
    logs.push(log);
    let student = Checkpoint::load(dir.join("student"))?;
    let score = score_checkpoint(&student, test, opts.progress)?;
    say(
        out,
        format!("student: {:.1}% ({} parameters)", 100.0 * score.task_completion, student.config.num_parameters()),
    )?;
    rows.push(row("student", &student, score, t.elapsed().as_secs_f64()));

    // 4. Export and score through the runtime.
    let t = Instant::now();
    let bundle = dir.join("bundle");
    // The pipeline's data are single requests ({instruction, input, output}).
    let exported = export(&student, &bundle, &ExportOptions { single_turn: true, ..ExportOptions::default() })?;
    let diff = exported.verify.as_ref().map(|v| v.max_abs_diff);
    let score = score_bundle(&bundle, test, &opts.engine, opts.progress)?;
    say(out, format!("bundle (ONNX Runtime): {:.1}%", 100.0 * score.task_completion))?;
    rows.push(StageRow {
        stage: "bundle".into(),
        parameters: student.config.num_parameters(),
        bytes: edgelm_runtime::bundle::weight_bytes(&bundle),
        task_completion: score.task_completion,
        perplexity: None,
        seconds: t.elapsed().as_secs_f64(),
        misses: score.misses,
    });

    // 5. Held-out commands, streamed from the runtime.
    let runtime = show(&bundle, &splits.test, recipe.pipeline.show, &opts.engine, out)?;

    let teacher_row = &rows[0];
    let student_row = rows.iter().find(|r| r.stage == "student").expect("student row");
    let report = PipelineReport {
        recipe: recipe.name.clone(),
        test_examples: test.len(),
        student_share: student_row.parameters as f64 / teacher_row.parameters as f64,
        student_relative_completion: student_row.task_completion / teacher_row.task_completion.max(1e-9),
        stages: rows,
        training: logs,
        export_max_abs_diff: diff,
        runtime,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    table(&report, out)?;
    record_in_bundle(&bundle, &report)?;
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
    let mut engine = edgelm_runtime::Engine::open(bundle, engine_opts)?;
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
        "\n{:<11} {:>11} {:>9} {:>16} {:>10} {:>8}\n",
        "stage", "parameters", "MiB", "task completion", "perplexity", "seconds"
    ));
    for s in &r.stages {
        t.push_str(&format!(
            "{:<11} {:>11} {:>9.2} {:>15.1}% {:>10} {:>8.1}\n",
            s.stage,
            s.parameters,
            s.bytes as f64 / (1 << 20) as f64,
            100.0 * s.task_completion,
            s.perplexity.map_or("-".into(), |p| format!("{p:.3}")),
            s.seconds
        ));
    }
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
