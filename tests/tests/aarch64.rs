//! The aarch64 build on an emulated ARM CPU: `edgelm` and the C test program cross-built for
//! aarch64-unknown-linux-gnu (`just cross-aarch64`) run under qemu-aarch64 (qemu-user 10) with
//! the aarch64 ONNX Runtime library from its PyPI wheel, and give the x86 build's greedy
//! tokens (fp32, int8, int4, int8-dynamic). Only correctness: emulated timings say nothing
//! about a board.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edgelm_e2e::{bin, bundle, csv, root, run, scratch};
use edgelm_runtime::{Engine, EngineOptions, GenerateParams};

const TARGET: &str = "aarch64-unknown-linux-gnu";
const PROMPT: [u32; 6] = [1, 40, 97, 200, 31, 150];
const NEW: usize = 12;

/// The cross-built binaries and libraries.
fn cross_dir() -> PathBuf {
    // `just cross-aarch64` builds the debug profile, whichever profile runs the tests.
    let profile = "debug";
    let d = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join(TARGET)
        .join(profile);
    assert!(d.join("edgelm").exists(), "cross-build first: just cross-aarch64 ({} missing)", d.display());
    d
}

fn aarch64_ort() -> PathBuf {
    let p = root().join(format!(".ort/linux-aarch64/libonnxruntime.so.{}", edgelm_runtime::ortlib::ORT_VERSION));
    assert!(p.exists(), "fetch the aarch64 library first: scripts/setup-ort.sh aarch64");
    p
}

/// `program args` under qemu-aarch64 with Debian's aarch64 system libraries.
fn qemu(program: &Path, args: &[&str], lib_path: Option<&Path>) -> Output {
    qemu_with(program, args, lib_path, Default::default())
}

fn qemu_with(
    program: &Path,
    args: &[&str],
    lib_path: Option<&Path>,
    env: std::collections::BTreeMap<String, PathBuf>,
) -> Output {
    let mut cmd = Command::new("qemu-aarch64");
    cmd.envs(env);
    cmd.args(["-L", "/usr/aarch64-linux-gnu"]).arg(program).args(args).env("EDGELM_ORT_LIB", aarch64_ort());
    if let Some(l) = lib_path {
        cmd.env("LD_LIBRARY_PATH", l);
    }
    run(&mut cmd)
}

fn x86_greedy(b: &Path) -> Vec<u32> {
    let engine = Engine::open(b, &EngineOptions::default()).unwrap();
    let p = GenerateParams::default().with_max_new_tokens(NEW).with_ignore_eos(true);
    engine.generate(&PROMPT, &p, |_| ControlFlow::Continue(())).unwrap().generated_ids
}

#[test]
fn the_aarch64_edgelm_gives_the_x86_greedy_tokens_under_qemu_at_every_precision() {
    let exe = cross_dir().join("edgelm");
    let fp32 = bundle("tiny");
    let mut bundles = vec![fp32.clone()];
    // The quantized kernels too: 8- and 4-bit MatMulNBits, and int8 with dynamic activations.
    for precision in ["int8", "int4", "int8-dynamic"] {
        let q = scratch().join(format!("aarch64/tiny-{precision}"));
        if !q.join("edgelm.json").exists() {
            let out = run(Command::new(bin("edgelm-distill"))
                .args(["quantize", fp32.to_str().unwrap(), "-o", q.to_str().unwrap(), "--precision", precision])
                .args(["--max-kl", "10"]));
            assert!(out.status.success(), "{precision}: {}", String::from_utf8_lossy(&out.stderr));
        }
        bundles.push(q);
    }
    for b in &bundles {
        let want = x86_greedy(b);
        let args = ["run", b.to_str().unwrap(), "--prompt-ids", &csv(&PROMPT), "--max-new-tokens", "12"];
        let out = qemu(&exe, &[&args[..], &["--ignore-eos", "--json"]].concat(), None);
        assert!(out.status.success(), "{}: {}", b.display(), String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(edgelm_e2e::ids(&json["generated_ids"]), want, "{}", b.display());
    }
}

#[test]
fn the_c_test_program_built_for_aarch64_passes_under_qemu() {
    let libs = cross_dir();
    let b = bundle("tiny");
    let dir = scratch().join("aarch64");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("test_capi");
    let out = run(Command::new("aarch64-linux-gnu-gcc")
        .args(["-std=c99", "-pedantic-errors", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(root().join("tests/c/test_capi.c"))
        .arg("-L")
        .arg(&libs)
        .args(["-ledgelm", "-lpthread", "-o"])
        .arg(&exe));
    assert!(out.status.success(), "aarch64-linux-gnu-gcc: {}", String::from_utf8_lossy(&out.stderr));
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/minilm-expected.json")).unwrap())
            .unwrap();
    let emb: Vec<String> =
        fixture["sentences"][0]["embedding"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let enc = edgelm_e2e::minilm_bundle();
    let expected = csv(&x86_greedy(&b));
    let args = [b.to_str().unwrap(), expected.as_str(), &csv(&PROMPT), enc.to_str().unwrap(), &emb.join(",")];
    let out = qemu_with(&exe, &args, Some(&libs), edgelm_e2e::signature_files(&b, &dir));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "C test under qemu failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
