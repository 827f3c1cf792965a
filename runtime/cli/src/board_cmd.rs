//! `edgelm --board B board`: a profile's settings as `key = value` lines, or one value with
//! `--get KEY` for scripts (`just build-board` reads the target and the ONNX Runtime wheel
//! from it), so the profile has one parser.

use anyhow::{bail, Result};
use clap::Args;

use crate::board::Placement;

#[derive(Args)]
pub struct BoardArgs {
    /// Print only this key's value (e.g. target, ort.platform, install_prefix).
    #[arg(long, value_name = "KEY")]
    get: Option<String>,
}

/// Prints the profile given with `--board`.
pub fn board(a: BoardArgs, place: &Placement) -> Result<()> {
    let Some(b) = &place.board else {
        bail!("no board profile: give one with --board boards/NAME.toml");
    };
    let lines = b.describe();
    match a.get {
        Some(key) => match lines.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => println!("{v}"),
            None => {
                let keys: Vec<&str> = lines.iter().map(|(k, _)| k.as_str()).collect();
                bail!("board `{}` has no key `{key}`; it has: {}", b.name, keys.join(", "));
            }
        },
        None => {
            for (k, v) in lines {
                println!("{k} = {v}");
            }
        }
    }
    Ok(())
}
