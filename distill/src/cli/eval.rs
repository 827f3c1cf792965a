//! `eval` and `pipeline`: scoring, and the main command that runs a recipe end to end.

use std::path::PathBuf;

use anyhow::{Context, Result};

use edgelm_distill::recipe::Recipe;
use edgelm_distill::Checkpoint;

use super::data::DataArgs;

/// Score checkpoints (candle) and bundles (ONNX Runtime) on the test split.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint or bundle folders.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Score only the first N test examples.
    #[arg(long)]
    examples: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Scores checkpoints and bundles.
pub fn eval(a: EvalArgs) -> Result<()> {
    let EvalArgs { models, data, examples, json } = a;
    use edgelm_distill::eval::{score_bundle, score_checkpoint};
    let splits = data.splits()?;
    let test = &splits.test[..examples.unwrap_or(splits.test.len()).min(splits.test.len())];
    let mut all = Vec::new();
    for m in &models {
        // A bundle (edgelm's, genai's or an Optimum export), else a checkpoint.
        let score = if edgelm_runtime::bundle::is_model_folder(m) {
            score_bundle(m, test, &Default::default(), !json)
        } else {
            Checkpoint::load(m).and_then(|ck| score_checkpoint(&ck, test, !json))
        }
        .with_context(|| format!("scoring {}", m.display()))?;
        if !json {
            println!(
                "{}: task completion {:.1}% of {}{}",
                m.display(),
                100.0 * score.task_completion,
                score.examples,
                score.perplexity.map_or(String::new(), |p| format!(", perplexity {p:.3}"))
            );
            for miss in score.misses.iter().take(3) {
                println!("  miss: {:?} -> {:?} (expected {:?})", miss.input, miss.got, miss.expected);
            }
        }
        all.push(serde_json::json!({"model": m, "score": score}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

/// The main command: distil the recipe's teacher, export, answer held-out commands on the
/// runtime, and write report.json + report.svg.
#[derive(clap::Args)]
pub struct PipelineArgs {
    /// Recipe file.
    #[arg(long, default_value = "models/devcmd/recipe.toml")]
    recipe: PathBuf,
    /// Output folder (default out/<recipe name>).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Score only the first N test examples per stage.
    #[arg(long)]
    eval_examples: Option<usize>,
    /// ONNX Runtime library to load.
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Runs the whole pipeline of a recipe.
pub fn pipeline(a: PipelineArgs) -> Result<()> {
    let PipelineArgs { recipe, output, eval_examples, ort_lib, quiet } = a;
    use edgelm_distill::pipeline::{run as run_pipeline, PipelineOptions};
    let r = Recipe::load(&recipe)?;
    let mut engine = edgelm_runtime::EngineOptions::default();
    if let Some(p) = ort_lib {
        engine = engine.with_ort_library(p);
    }
    let opts = PipelineOptions {
        output: output.unwrap_or_else(|| PathBuf::from("out").join(&r.name)),
        eval_examples,
        engine,
        progress: !quiet,
    };
    run_pipeline(&r, &opts, &mut std::io::stdout().lock()).context("pipeline")?;
    Ok(())
}
