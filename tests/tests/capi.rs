//! The C ABI from C: `tests/c/test_capi.c` compiled with gcc against `include/edgelm.h` and
//! both the shared and the static library, checked against the Rust runtime's greedy tokens,
//! and run under valgrind with zero errors.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgelm_e2e::{bundle, csv, root, run, scratch};
use edgelm_runtime::{Engine, EngineOptions, GenerateParams};

const PROMPT: [u32; 6] = [1, 40, 97, 200, 31, 150];
const NEW: usize = 12;

fn lib_dir() -> PathBuf {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let d =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target")).join(profile);
    assert!(d.join("libedgelm.so").exists(), "build the C library first: cargo build -p edgelm-capi");
    d
}

fn rust_greedy(b: &Path) -> Vec<u32> {
    let engine = Engine::open(b, &EngineOptions::default()).unwrap();
    let p = GenerateParams::default().with_max_new_tokens(NEW).with_ignore_eos(true);
    engine.generate(&PROMPT, &p, |_| ControlFlow::Continue(())).unwrap().generated_ids
}

/// Builds the C test with `compiler` and `std`, strictly: the header must be ISO C (and C++).
fn compile(compiler: &str, std: &[&str], out: &Path, link: &[&str]) {
    let status = run(Command::new(compiler)
        .args(std)
        .args(["-pedantic-errors", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(root().join("include"))
        .arg(root().join("tests/c/test_capi.c"))
        .args(link)
        .arg("-o")
        .arg(out));
    assert!(status.status.success(), "{compiler} {std:?} failed: {}", String::from_utf8_lossy(&status.stderr));
}

fn run_c(cmd: &mut Command) {
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "C test failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn c_program_against_shared_and_static_library_and_under_valgrind() {
    let b = bundle("tiny");
    let expected = csv(&rust_greedy(&b));
    let libs = lib_dir();
    let dir = scratch().join("capi");
    std::fs::create_dir_all(&dir).unwrap();
    let rpath = format!("-Wl,-rpath,{}", libs.display());
    let dynamic = ["-L", libs.to_str().unwrap(), "-ledgelm", &rpath, "-lpthread"];
    let shared = dir.join("test_shared");
    compile("gcc", &["-std=c99"], &shared, &dynamic);
    let cxx = dir.join("test_cxx");
    compile("g++", &["-x", "c++", "-std=c++11"], &cxx, &dynamic);
    let static_ = dir.join("test_static");
    let archive = libs.join("libedgelm.a");
    compile("gcc", &["-std=c11"], &static_, &[archive.to_str().unwrap(), "-lpthread", "-ldl", "-lm", "-lgcc_s"]);

    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/minilm-expected.json")).unwrap())
            .unwrap();
    let emb = fixture["sentences"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let enc = edgelm_e2e::minilm_bundle();
    let args = [b.to_str().unwrap(), expected.as_str(), &csv(&PROMPT), enc.to_str().unwrap(), &emb];
    let signed = edgelm_e2e::signature_files(&b, &dir);
    run_c(Command::new(&shared).args(args).envs(&signed));
    run_c(Command::new(&cxx).args(args).envs(&signed));
    run_c(Command::new(&static_).args(args).envs(&signed));

    // valgrind: memory errors anywhere (edgelm, the C program, ONNX Runtime) fail the test.
    if Command::new("valgrind").arg("--version").output().is_err() {
        panic!("valgrind is not installed (apt-get install valgrind); just test installs it");
    }
    let log = dir.join("valgrind.log");
    let out = run(Command::new("valgrind")
        .args(["--error-exitcode=99", "--leak-check=no", "--track-origins=no", "--quiet"])
        .arg(format!("--suppressions={}", root().join("tests/c/valgrind.supp").display()))
        .arg(format!("--log-file={}", log.display()))
        .arg(&shared)
        .envs(&signed)
        // The causal-LM part only: with the encoder session, an ONNX Runtime thread reads a
        // static string while exit() destroys it (inside libonnxruntime; an open question).
        .args(&args[..3]));
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(0),
        "valgrind reported errors:\n{report}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A library shipped to boards searches only run-time places for ONNX Runtime: no path of the
/// machine that built it is in its data (where `strings` finds it).
#[test]
fn the_library_carries_no_path_of_the_build_tree() {
    let so = lib_dir().join("libedgelm.so");
    let data = scratch().join("libedgelm.rodata");
    let out = run(Command::new("objcopy").args(["-O", "binary", "--only-section=.rodata"]).arg(&so).arg(&data));
    assert!(out.status.success(), "objcopy: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&data).unwrap();
    let tree = std::fs::canonicalize(root()).unwrap();
    for needle in [tree.to_str().unwrap(), ".ort/linux-"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "libedgelm.so holds `{needle}`: the build machine's path must not ship"
        );
    }
}
