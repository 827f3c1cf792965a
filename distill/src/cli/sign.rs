//! `keygen` and `sign`: bundle signing keys and signatures.

use std::path::PathBuf;

use anyhow::{Context, Result};

use edgelm_distill::sign::{keygen as make_key, public_key_path, sign_bundle};

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Private key file to create (the public key goes to the same path with `.pub` added).
    #[arg(short, long)]
    output: PathBuf,
}

pub fn keygen(a: KeygenArgs) -> Result<()> {
    let id = make_key(&a.output).context("keygen")?;
    println!(
        "key {id}: private {} (keep it off boards and out of version control), public {}",
        a.output.display(),
        public_key_path(&a.output).display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// Private key file (from `keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Bundle folder to sign.
    bundle: PathBuf,
}

pub fn sign(a: SignArgs) -> Result<()> {
    let id = sign_bundle(&a.key, &a.bundle).with_context(|| format!("sign {}", a.bundle.display()))?;
    println!("signed {} with key {id}", a.bundle.display());
    Ok(())
}
