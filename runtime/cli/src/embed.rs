//! `edgelm embed`: the sentence embedding of one text (encoder bundles).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::encoder::Encoder;

use crate::board::Placement;

#[derive(Args)]
pub struct EmbedArgs {
    /// Encoder bundle folder.
    bundle: PathBuf,
    /// Text to embed.
    #[arg(long)]
    text: String,
    /// Print JSON ({"dim": N, "embedding": [...]}) instead of one number per line.
    #[arg(long)]
    json: bool,
    /// Intra-op threads; 0 = the board's count, else one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn embed(a: EmbedArgs, place: &Placement) -> Result<()> {
    let opts = place.engine_options(a.threads, KvCacheMode::default())?;
    let mut enc = Encoder::open(&a.bundle, &opts).with_context(|| format!("opening {}", a.bundle.display()))?;
    let v = enc.embed(&a.text)?;
    if a.json {
        println!("{}", serde_json::json!({"dim": v.len(), "embedding": v}));
    } else {
        for x in v {
            println!("{x}");
        }
    }
    Ok(())
}
