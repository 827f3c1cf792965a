//! `edgelm check BUNDLE`: the health check. Opens the bundle as the board profile says
//! (signature policy, providers, ONNX Runtime library) and runs one step of it: one generated
//! token, or one embedding. Exit 0 means this runtime can serve this bundle; `deploy` runs it
//! in a new slot before and after switching to it.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::{GenerateParams, Model};

use crate::board::Placement;

#[derive(Args)]
pub struct CheckArgs {
    /// Bundle folder.
    bundle: PathBuf,
}

pub fn check(a: CheckArgs, place: &Placement) -> Result<()> {
    let opts = place.engine_options(0, KvCacheMode::default())?;
    let signed = opts.trust.check(&a.bundle)?.key_id;
    let model = Model::open(&a.bundle, &opts).with_context(|| format!("opening {}", a.bundle.display()))?;
    let what = match model {
        Model::CausalLm(engine) => {
            let prompt = match engine.codec() {
                // Through the chat template when there is one, as `serve` renders prompts.
                Some(_) => engine.encode_prompt("hello", false)?,
                None => vec![engine.bundle().generation.bos_token_id.unwrap_or(0)],
            };
            let p = GenerateParams::default().with_max_new_tokens(1).with_ignore_eos(true);
            let g = engine.generate(&prompt, &p, |_| ControlFlow::Continue(()))?;
            format!("causal LM, one token generated ({:?})", g.generated_ids)
        }
        Model::Encoder(mut enc) => {
            let v = enc.embed("hello")?;
            format!("encoder, one embedding of {} values", v.len())
        }
    };
    let signature = match signed {
        Some(id) => format!("signed by key {id}"),
        None => "signature not checked".into(),
    };
    println!("ok: {}: {what}; {signature}", a.bundle.display());
    Ok(())
}
