//! Board profiles through the CLI: `edgelm board` reads them for scripts, `edgelm doctor`
//! checks a device and a bundle against them, and the providers they list are applied.

use edgelm_e2e::{bundle, edgelm, root, scratch};

fn profile_with(name: &str, change: impl Fn(String) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("boards/x86_64-linux.toml")).unwrap();
    let p = scratch().join(format!("boards/{name}.toml"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, change(text)).unwrap();
    p
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn board_prints_one_key_for_scripts_and_names_the_keys_it_has() {
    let pi = root().join("boards/raspberry-pi-5.toml");
    let out = edgelm(&["--board", pi.to_str().unwrap(), "board", "--get", "target"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out).trim(), "aarch64-unknown-linux-gnu");
    let out = edgelm(&["--board", pi.to_str().unwrap(), "board", "--get", "ort.version"]);
    assert_eq!(stdout(&out).trim(), edgelm_runtime::ortlib::ORT_VERSION);
    let out = edgelm(&["--board", pi.to_str().unwrap(), "board", "--get", "turbo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("install_prefix"));
}

#[test]
fn doctor_passes_a_bundle_that_fits_and_fails_what_the_device_cannot_run() {
    let b = bundle("tiny");
    // The shipped x86 profile with a budget any test host has (doctor fails a budget above the
    // device's memory, checked below).
    let host = profile_with("small-host", |t| t.replace("memory_budget_mib = 4096", "memory_budget_mib = 256"));
    let out = edgelm(&["--board", host.to_str().unwrap(), "doctor", b.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ok    ONNX Runtime: ") && text.contains("fits the budget of 256 MiB"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    // An encoder bundle is checked too (its weights alone: it has no KV cache).
    let enc = edgelm_e2e::minilm_bundle();
    let out = edgelm(&["--board", host.to_str().unwrap(), "doctor", enc.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("loads: ") && !text.contains("KV cache") && text.contains("fits the budget"), "{text}");
    // (A bundle over the budget is refused by the same check `run` uses, unit-tested in the CLI.)
    // A GPU-only list on ONNX Runtime's CPU build: doctor says so, and so does `run`.
    let gpu = profile_with("gpu-only", |t| t.replace("kind = \"cpu\"", "kind = \"cuda\""));
    let out = edgelm(&["--board", gpu.to_str().unwrap(), "doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("none of the execution providers cuda"), "{}", stdout(&out));
    let out = edgelm(&["--board", gpu.to_str().unwrap(), "run", b.to_str().unwrap(), "--prompt-ids", "1,2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("add `cpu`"));
    // A profile for another architecture: doctor names the build to make.
    let arm = root().join("boards/generic-aarch64-linux.toml");
    let out = edgelm(&["--board", arm.to_str().unwrap(), "doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("just build-board generic-aarch64-linux"), "{}", stdout(&out));
    // A budget larger than any machine's memory.
    let huge = profile_with("huge", |t| t.replace("memory_budget_mib = 4096", "memory_budget_mib = 1073741824"));
    let out = edgelm(&["--board", huge.to_str().unwrap(), "doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("exceeds this device's memory"), "{}", stdout(&out));
}
