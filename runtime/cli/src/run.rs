//! `edgelm run`: one prompt, streamed to stdout (or one JSON object with `--json`).

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::board::Placement;
use crate::gen_args::{open, print_metrics, stream_to_stdout, GenArgs};

#[derive(Args)]
pub struct RunArgs {
    /// Bundle folder (edgelm bundle or onnxruntime-genai model folder).
    bundle: PathBuf,
    /// Prompt text, rendered as one user turn with the bundle's chat template (see --raw).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as they are.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokenize --prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    gen: GenArgs,
    /// Print one JSON object (ids, text, metrics) instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RunArgs, place: &Placement) -> Result<()> {
    let engine = open(&a.bundle, place, a.gen.threads, a.gen.kv_cache)?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => engine.encode_prompt(text, a.raw)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let p = a.gen.params(&engine, prompt.len());
    place.check_budget(&engine, prompt.len() + p.max_new_tokens)?;
    if a.json {
        let g = engine.generate(&prompt, &p, |_| ControlFlow::Continue(()))?;
        // One flat object: the prompt, the generation and every metric at the top level.
        let mut v = serde_json::json!({ "prompt": a.prompt });
        for part in [serde_json::to_value(&g)?, serde_json::to_value(&g.metrics)?] {
            if let serde_json::Value::Object(fields) = part {
                v.as_object_mut().expect("object").extend(fields);
            }
        }
        v.as_object_mut().expect("object").remove("metrics");
        println!("{v}");
    } else {
        let has_text = engine.codec().is_some();
        let g = engine.generate(&prompt, &p, stream_to_stdout(has_text))?;
        println!();
        print_metrics(&g);
    }
    Ok(())
}
