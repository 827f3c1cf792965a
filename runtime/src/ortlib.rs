//! Finding and loading the ONNX Runtime shared library at run time.
//!
//! The search order is fixed and documented, so a board image can rely on it: an explicit path
//! (the caller's option), `EDGELM_ORT_LIB`, `ORT_DYLIB_PATH`, the executable's `lib/`, the
//! `lib/` beside its folder (`bin/../lib`, the deploy layout), the folder itself, then the
//! system's library path. Only run-time places: nothing of the machine that built edgelm is
//! baked in (a development tree hands its `.ort/` over through `EDGELM_ORT_LIB`). A missing or too-old library is an [`Error::OrtLibrary`] naming every
//! place that was tried; a failed attempt is not remembered, so a later call with a better path
//! or environment can still succeed. The first successful load holds for the process.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// The ONNX Runtime version this build is pinned to (from `ort-version.txt`).
pub const ORT_VERSION: &str = include_str!("../../ort-version.txt").trim_ascii();

/// The ONNX Runtime C API level this build asks the library for (the `ort-api-N` feature): a
/// library offering a lower level cannot be loaded. ONNX Runtime 1.N offers level N.
pub const ORT_API: u32 = ort::MINOR_VERSION;

/// The C API level of the pinned version (its minor number), the highest edgelm knows.
pub fn pinned_api() -> u32 {
    ORT_VERSION.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(ORT_API)
}

/// The library that loaded, the global environment built on it, and its version as it states
/// it (read once, when it loads).
struct Loaded {
    path: PathBuf,
    env: ort::environment::Environment,
    version: Option<String>,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
/// Serialises load attempts, so two threads never load two libraries.
static LOADING: Mutex<()> = Mutex::new(());

fn lib_names() -> [String; 2] {
    [format!("libonnxruntime.so.{ORT_VERSION}"), "libonnxruntime.so".to_owned()]
}

/// Candidate library paths in search order. `explicit` is the caller's path when given.
pub(crate) fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    for var in ["EDGELM_ORT_LIB", "ORT_DYLIB_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(v));
        }
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        // `bin/edgelm` with `lib/` beside `bin/` is the layout `just build-board` installs.
        let prefix_lib = exe_dir.parent().map(|p| p.join("lib"));
        for d in [Some(exe_dir.join("lib")), prefix_lib, Some(exe_dir)].into_iter().flatten() {
            for n in lib_names() {
                out.push(d.join(n));
            }
        }
    }
    out
}

/// Loads ONNX Runtime and creates the global environment, once per process: after the first
/// success every call returns that environment (a process can hold only one ONNX Runtime, so a
/// later `explicit` path is ignored). A failure is returned and forgotten.
pub fn init(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.env);
    }
    let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.env);
    }
    match load(explicit) {
        Ok((path, env)) => {
            let version = version_of(&path);
            Ok(&LOADED.get_or_init(|| Loaded { path, env, version }).env)
        }
        Err(reason) => Err(Error::OrtLibrary {
            wanted: format!("1.{ORT_API} or newer (C API level {ORT_API})"),
            reason,
            looked: candidates(explicit)
                .iter()
                .map(|p| p.display().to_string())
                .chain(["system library path".into()])
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The loaded library's version as it states it (`OrtGetApiBase()->GetVersionString`, e.g.
/// "1.24.1"); `None` before a successful [`init`] or where it cannot be read.
pub fn loaded_version() -> Option<&'static str> {
    LOADED.get()?.version.as_deref()
}

#[cfg(unix)]
fn version_of(path: &Path) -> Option<String> {
    use libloading::os::unix::{Library, Symbol, RTLD_LAZY};
    // SAFETY: RTLD_NOLOAD only finds the library this process loaded already (never a second
    // copy from another path), taking one more reference dropped at the end; OrtGetApiBase
    // takes nothing and returns a pointer to a static table whose GetVersionString returns a
    // static NUL-terminated string.
    unsafe {
        let lib = Library::open(Some(path), libc::RTLD_NOLOAD | RTLD_LAZY).ok()?;
        let get: Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> = lib.get(b"OrtGetApiBase").ok()?;
        let base = get();
        if base.is_null() {
            return None;
        }
        let s = ((*base).GetVersionString)();
        if s.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(s).to_str().ok()?.to_owned())
    }
}

#[cfg(not(unix))]
fn version_of(_path: &Path) -> Option<String> {
    None
}

/// First ONNX Runtime release whose `GroupQueryAttention` lets a position attend to exactly
/// `local_window_size` positions, itself included; earlier ones take one more.
const WINDOW_FIXED: (u32, u32) = (1, 24);

/// How the loaded library applies `GroupQueryAttention`'s `local_window_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowSupport {
    /// As transformers does (1.24 and newer).
    Exact,
    /// One position wider (releases before 1.24).
    Wider,
    /// The version cannot be read.
    Unknown,
}

/// How the loaded library applies sliding attention windows.
pub(crate) fn window_support() -> WindowSupport {
    match loaded_release() {
        None => WindowSupport::Unknown,
        Some(r) if r < WINDOW_FIXED => WindowSupport::Wider,
        Some(_) => WindowSupport::Exact,
    }
}

/// The loaded library's (major, minor) release; `None` before a successful [`init`] or where
/// the version cannot be read.
pub(crate) fn loaded_release() -> Option<(u32, u32)> {
    let mut parts = loaded_version()?.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Some((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// The library that loaded, and ONNX Runtime's own description of its build (version, git
/// commit); `None` before a successful [`init`].
pub fn loaded() -> Option<(&'static Path, &'static str)> {
    LOADED.get().map(|l| (l.path.as_path(), ort::info()))
}

fn load(explicit: Option<&Path>) -> std::result::Result<(PathBuf, ort::environment::Environment), String> {
    let mut tried: Vec<PathBuf> = candidates(explicit).into_iter().filter(|p| p.exists()).collect();
    if let Some(p) = explicit.filter(|p| !p.exists()) {
        return Err(format!("{} does not exist (the library path given)", p.display()));
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
