//! Finding and loading the ONNX Runtime shared library at run time.
//!
//! The search order is fixed and documented, so a board image can rely on it:
//! an explicit path (`--ort-lib`), `EDGELM_ORT_LIB`, `ORT_DYLIB_PATH`, the executable's folder
//! (and its `lib/`), the project-local folder that `just setup` fills, then the system's
//! library path. A missing or too-old library is an [`Error::OrtLibrary`] naming every place
//! that was tried.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The ONNX Runtime version this build is pinned to (from `ort-version.txt`).
pub const ORT_VERSION: &str = include_str!("../../ort-version.txt").trim_ascii();

static ENV: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

fn lib_names() -> [String; 2] {
    [format!("libonnxruntime.so.{ORT_VERSION}"), "libonnxruntime.so".to_owned()]
}

/// The folder `just setup` extracts the library into, for this machine's architecture.
pub fn project_lib_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(".ort").join(format!("linux-{}", std::env::consts::ARCH))
}

/// Candidate library paths in search order. `explicit` is `--ort-lib` when given.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    for var in ["EDGELM_ORT_LIB", "ORT_DYLIB_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(v));
        }
    }
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("lib"));
        dirs.push(exe_dir);
    }
    dirs.push(project_lib_dir());
    for d in dirs {
        for n in lib_names() {
            out.push(d.join(n));
        }
    }
    out
}

/// Loads ONNX Runtime once per process and creates the global environment. Later calls return
/// the outcome of the first (a process can hold only one ONNX Runtime).
pub fn init(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    let outcome = ENV.get_or_init(|| load(explicit));
    match outcome {
        Ok((_, env)) => Ok(env),
        Err(reason) => Err(Error::OrtLibrary {
            wanted: ORT_VERSION,
            reason: reason.clone(),
            looked: candidates(explicit)
                .iter()
                .map(|p| p.display().to_string())
                .chain(["system library path".into()])
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The library that [`init`] loaded, if it succeeded.
pub fn loaded_path() -> Option<&'static Path> {
    ENV.get()?.as_ref().ok().map(|(p, _)| p.as_path())
}

fn load(explicit: Option<&Path>) -> std::result::Result<(PathBuf, ort::environment::Environment), String> {
    let mut tried: Vec<PathBuf> = candidates(explicit).into_iter().filter(|p| p.exists()).collect();
    if let Some(p) = explicit.filter(|p| !p.exists()) {
        return Err(format!("--ort-lib {} does not exist", p.display()));
    }
    // Last resort: let the dynamic loader search LD_LIBRARY_PATH and the system folders.
    tried.push(PathBuf::from(format!("libonnxruntime.so.{ORT_VERSION}")));
    tried.push(PathBuf::from("libonnxruntime.so"));
    let mut last = String::from("no candidate exists");
    for path in tried {
        match ort::init_from(&path) {
            Ok(builder) => {
                // ORT's own log lines go to tracing: errors reach the caller as values already.
                let logger: ort::logging::LoggerFunction =
                    std::sync::Arc::new(|level, category, _id, location, message| {
                        use ort::logging::LogLevel;
                        match level {
                            LogLevel::Fatal | LogLevel::Error => {
                                tracing::debug!(target: "onnxruntime", %category, %location, "{message}")
                            }
                            LogLevel::Warning => tracing::debug!(target: "onnxruntime", %category, "{message}"),
                            _ => tracing::trace!(target: "onnxruntime", %category, "{message}"),
                        }
                    });
                let env = builder.with_name("edgelm").with_telemetry(false).with_logger(logger).build();
                return match env {
                    Ok(env) => Ok((path, env)),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                };
            }
            Err(e) => {
                last = e.to_string();
                // A library that loaded but is too old stops the search: it is the one the
                // user pointed at, and a later candidate would hide the real problem.
                if last.contains("not compatible") {
                    break;
                }
            }
        }
    }
    Err(last)
}
