//! `edgelm doctor [BUNDLE]`: whether this device can run edgelm (and a bundle) as its board
//! profile says: the ONNX Runtime library and its providers, the CPU's features, memory, and
//! the bundle against the board's budget and precision. One line per check; a failed check
//! says what to do, and the command exits non-zero.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::ortlib::{ORT_API, ORT_VERSION};
use edgelm_runtime::ExecutionProvider;

use crate::board::{arch_of, precision_name, OrtSource, Placement};

#[derive(Args)]
pub struct DoctorArgs {
    /// A bundle to check against the board (loads, fits the memory budget, precision).
    bundle: Option<PathBuf>,
}

/// The checks' findings, printed as they come.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: impl AsRef<str>) {
        println!("ok    {}", what.as_ref());
    }

    fn warn(&mut self, what: impl AsRef<str>) {
        println!("warn  {}", what.as_ref());
    }

    fn fail(&mut self, what: impl AsRef<str>, fix: impl AsRef<str>) {
        println!("FAIL  {}\n      fix: {}", what.as_ref(), fix.as_ref());
        self.failures += 1;
    }
}

/// The instruction-set extensions that decide which ONNX Runtime kernels run fast.
fn cpu_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        vec![
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512vnni", std::arch::is_x86_feature_detected!("avx512vnni")),
            ("avxvnni", std::arch::is_x86_feature_detected!("avxvnni")),
        ]
    }
    #[cfg(target_arch = "aarch64")]
    {
        vec![
            ("neon", std::arch::is_aarch64_feature_detected!("neon")),
            ("dotprod", std::arch::is_aarch64_feature_detected!("dotprod")),
            ("i8mm", std::arch::is_aarch64_feature_detected!("i8mm")),
            ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
        ]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        vec![]
    }
}

/// `MemTotal` of /proc/meminfo and the memory available to this process (a container's limit
/// counts), in MiB.
fn memory_mib() -> Option<(u64, u64)> {
    use edgelm_runtime::metrics::{available_memory_bytes, meminfo_bytes};
    Some((meminfo_bytes("MemTotal:")? >> 20, available_memory_bytes()? >> 20))
}

/// Runs every check; fails when one failed.
pub fn doctor(a: DoctorArgs, place: &Placement) -> Result<()> {
    let mut r = Report::default();
    let board = place.board.as_ref();
    let arch = std::env::consts::ARCH;
    match board {
        Some(b) => r.ok(format!("board profile: {} ({})", b.name, b.target)),
        None => r.warn("no board profile given (--board boards/NAME.toml): checking this machine only"),
    }
    if let Some(b) = board {
        if arch_of(&b.target) != arch {
            r.fail(
                format!("this edgelm is built for {arch}, the board is {}", b.target),
                format!("build it for the board: just build-board {}", b.id),
            );
        }
        if b.ort.api() < ORT_API {
            r.fail(
                format!("the board's ONNX Runtime offers C API {}, this edgelm asks for {ORT_API}", b.ort.api()),
                format!(
                    "build edgelm for the board's level (just build-board {} does), or deploy ONNX Runtime 1.{ORT_API} or newer (edgelm is tested with {ORT_VERSION})",
                    b.id
                ),
            );
        }
    }

    // ONNX Runtime and its providers.
    let opts = match place.engine_options(0, KvCacheMode::default()) {
        Ok(opts) => {
            if let Some(b) = board.filter(|b| !b.signatures.keys.is_empty()) {
                let required = if b.signatures.require { "required" } else { "checked when present" };
                r.ok(format!("bundle signatures {required}; trusted keys: {}", opts.trust.key_ids().join(", ")));
            }
            opts
        }
        Err(e) => {
            r.fail(format!("{e:#}"), "put the public keys the profile's [signatures] names on the device");
            // The other checks still run, without signature checks.
            let mut unchecked = place.clone();
            if let Some(b) = unchecked.board.as_mut() {
                b.signatures = Default::default();
            }
            unchecked.engine_options(0, KvCacheMode::default())?
        }
    };
    let ort_loaded = edgelm_runtime::ortlib::init(opts.ort_lib.as_deref());
    match &ort_loaded {
        Ok(_) => {
            let (path, info) = edgelm_runtime::ortlib::loaded().expect("loaded after init");
            r.ok(format!("ONNX Runtime: {} ({info})", path.display()));
            if let Some(OrtSource::System { version, .. }) = board.map(|b| &b.ort) {
                if !info.contains(version.as_str()) {
                    r.warn(format!("the profile says ONNX Runtime {version}; the library says: {info}"));
                }
            }
            let known = [
                ExecutionProvider::Cpu {},
                ExecutionProvider::Xnnpack {},
                ExecutionProvider::Cuda { device_id: 0 },
                ExecutionProvider::Tensorrt { device_id: 0, fp16: false, engine_cache: None },
            ];
            let have: Vec<&str> =
                known.iter().filter(|ep| ep.is_available().unwrap_or(false)).map(ExecutionProvider::name).collect();
            r.ok(format!("execution providers in the library: {}", have.join(", ")));
            if let Some(b) = board {
                match edgelm_runtime::providers::plan(&b.execution_providers, ExecutionProvider::is_available) {
                    Ok(p) => {
                        let on: Vec<&str> = p.register.iter().map(ExecutionProvider::name).collect();
                        let runs = if on.is_empty() { "cpu".to_owned() } else { on.join(", ") };
                        if p.missing.is_empty() {
                            r.ok(format!("the board's providers: runs on {runs}"));
                        } else {
                            r.warn(format!(
                                "the board's providers: {} not in this library; runs on {runs}",
                                p.missing.join(", ")
                            ));
                        }
                    }
                    Err(e) => r.fail(
                        format!("the board's providers: {e}"),
                        "point [ort] at a library built with them, or add { kind = \"cpu\" } to execution_providers",
                    ),
                }
            }
        }
        Err(e) => r.fail(format!("{e}"), "install the library (just setup-ort fetches it) or pass --ort-lib PATH"),
    }

    // CPU and memory.
    let features = cpu_features();
    let on: Vec<&str> = features.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    let off: Vec<&str> = features.iter().filter(|(_, on)| !*on).map(|(n, _)| *n).collect();
    r.ok(format!(
        "CPU: {arch}, {} cores; has {}; lacks {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if on.is_empty() { "-".into() } else { on.join(" ") },
        if off.is_empty() { "-".into() } else { off.join(" ") }
    ));
    let memory = memory_mib();
    match memory {
        Some((total, available)) => {
            r.ok(format!("memory: {total} MiB, {available} MiB available"));
            if let Some(b) = board.filter(|b| b.memory_budget_mib > total) {
                r.fail(
                    format!("the board's memory budget ({} MiB) exceeds this device's memory", b.memory_budget_mib),
                    "lower memory_budget_mib in the profile",
                );
            }
        }
        None => r.warn("memory: /proc/meminfo unreadable"),
    }

    // The bundle.
    if let Some(dir) = a.bundle.as_ref().filter(|_| ort_loaded.is_ok()) {
        match edgelm_runtime::Model::open(dir, &opts) {
            Ok(model) => {
                // An encoder holds no KV cache: its weights are all it needs.
                let (weights, kv, manifest) = match &model {
                    edgelm_runtime::Model::CausalLm(engine) => (
                        engine.weight_bytes(),
                        engine.kv_cache_bytes(engine.context_length()),
                        engine.bundle().manifest.as_ref(),
                    ),
                    edgelm_runtime::Model::Encoder(enc) => (enc.weight_bytes(), 0, enc.manifest()),
                };
                let need = (weights + kv).div_ceil(1 << 20);
                let what = if kv > 0 { " with a full KV cache" } else { "" };
                r.ok(format!("bundle {} loads: {need} MiB{what}", dir.display()));
                if let Some(b) = board {
                    match b.check_fits(weights, kv) {
                        Ok(()) => r.ok(format!("fits the budget of {} MiB", b.memory_budget_mib)),
                        Err(e) => r.fail(
                            format!("{e}"),
                            "quantize the bundle (edgelm-distill quantize) or shorten its context",
                        ),
                    }
                    let precision = manifest.map(|m| m.quantization);
                    if let Some(p) = precision.filter(|p| *p != b.precision) {
                        r.warn(format!(
                            "the bundle is {}, the board is meant for {} bundles",
                            precision_name(p),
                            precision_name(b.precision)
                        ));
                    }
                }
            }
            Err(e) => r.fail(format!("bundle {}: {e}", dir.display()), "re-export or copy the bundle again"),
        }
    }
    if r.failures > 0 {
        bail!("doctor: {} problem(s) found", r.failures);
    }
    Ok(())
}
