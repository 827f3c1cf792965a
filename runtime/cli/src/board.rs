//! Board profiles (`boards/*.toml`): what a device is and how edgelm should run on it, and
//! the one place where a profile turns into engine settings for every subcommand.
//!
//! A profile fixes the settings that depend on the hardware rather than on the model: the
//! Rust target and ONNX Runtime build to deploy, the execution providers to try in order, the
//! number of intra-op threads, and the memory budget a bundle must fit in.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::EngineOptions;

/// One board. Every key is parsed (unknown ones are refused); the deployment keys (`target`,
/// `ort`, `notes`) are for the tools that build and copy a board image, not for running.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BoardProfile {
    /// Human-readable name.
    pub name: String,
    /// Rust target triple of the edgelm binary for this board.
    pub target: String,
    /// The ONNX Runtime build to deploy.
    pub ort: OrtBuild,
    /// Execution providers in order of preference (`cpu` always works).
    pub execution_providers: Vec<String>,
    /// Intra-op threads (usually the number of big cores).
    pub threads: usize,
    /// Memory a bundle may use at run time (weights plus KV cache plus arena), in MiB.
    pub memory_budget_mib: u64,
    /// Free-form notes for whoever flashes the board.
    #[serde(default)]
    pub notes: String,
}

/// Where the board's ONNX Runtime library comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct OrtBuild {
    /// Architecture folder `just setup-ort` fills (`x86_64`, `aarch64`).
    pub arch: String,
    /// `pypi-wheel` (the CPU build from the onnxruntime wheel) or `vendor` (a build shipped
    /// with the board's SDK, e.g. with CUDA/TensorRT on Jetson).
    pub source: String,
}

impl BoardProfile {
    /// Reads and checks a profile.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading board profile {}", path.display()))?;
        let p: BoardProfile = toml::from_str(&text)
            .with_context(|| format!("board profile {}: not a valid board profile", path.display()))?;
        if p.threads == 0 || p.memory_budget_mib == 0 {
            bail!("board profile {}: threads and memory_budget_mib must be positive", path.display());
        }
        if !matches!(p.ort.source.as_str(), "pypi-wheel" | "vendor") {
            bail!("board profile {}: ort.source `{}` must be `pypi-wheel` or `vendor`", path.display(), p.ort.source);
        }
        Ok(p)
    }

    /// Checks that a bundle's weights plus a KV cache of `kv_bytes` fit the memory budget.
    pub fn check_fits(&self, weight_bytes: u64, kv_bytes: u64) -> Result<()> {
        let need_bytes = weight_bytes + kv_bytes;
        if need_bytes > self.memory_budget_mib << 20 {
            let need = need_bytes.div_ceil(1 << 20);
            bail!(
                "the bundle needs about {need} MiB (weights + KV cache) but board `{}` has a budget of {} MiB; use a smaller or quantized bundle, or fewer new tokens",
                self.name,
                self.memory_budget_mib
            );
        }
        Ok(())
    }
}

/// How a subcommand opens bundles: the board profile, the ONNX Runtime library and the
/// per-command thread and KV cache choices, resolved in one place for run, chat, bench, embed
/// and serve alike.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The board profile given with `--board`.
    pub board: Option<BoardProfile>,
    /// `--ort-lib`.
    pub ort_lib: Option<PathBuf>,
}

impl Placement {
    /// Engine options for `threads` (0: the board's count, else one per core) and `kv_cache`.
    /// Warns once on stderr when the board asks for an execution provider this build lacks.
    pub fn engine_options(&self, threads: usize, kv_cache: KvCacheMode) -> EngineOptions {
        let threads = match (threads, &self.board) {
            (0, Some(b)) => b.threads,
            (t, _) => t,
        };
        if let Some(ep) = self.board.as_ref().and_then(|b| b.execution_providers.first()).filter(|ep| *ep != "cpu") {
            eprintln!("warning: execution provider `{ep}` is not built into this edgelm; running on the CPU");
        }
        let opts = EngineOptions::default().with_threads(threads).with_kv_cache(kv_cache);
        match &self.ort_lib {
            Some(p) => opts.with_ort_library(p),
            None => opts,
        }
    }

    /// Refuses a request whose weights plus KV cache exceed the board's memory budget.
    pub fn check_budget(&self, engine: &edgelm_runtime::Engine, positions: usize) -> Result<()> {
        if let Some(b) = &self.board {
            b.check_fits(engine.weight_bytes(), engine.kv_cache_bytes(positions.min(engine.context_length())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../boards");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                BoardProfile::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3);
    }

    #[test]
    fn unknown_keys_and_budget_overflow_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        std::fs::write(&p, "name='x'\ntarget='t'\nthreads=2\nmemory_budget_mib=100\nexecution_providers=['cpu']\nturbo=true\n[ort]\narch='x86_64'\nsource='pypi-wheel'\n").unwrap();
        assert!(format!("{:#}", BoardProfile::load(&p).unwrap_err()).contains("turbo"));
        std::fs::write(&p, "name='x'\ntarget='t'\nthreads=2\nmemory_budget_mib=100\nexecution_providers=['cpu']\n[ort]\narch='x86_64'\nsource='pypi-wheel'\n").unwrap();
        let b = BoardProfile::load(&p).unwrap();
        assert!(b.check_fits(50 << 20, 10 << 20).is_ok());
        assert!(b.check_fits(200 << 20, 0).unwrap_err().to_string().contains("budget of 100 MiB"));
    }
}
