//! Signed bundles through the real commands: `edgelm-distill keygen` and `sign`, then a board
//! profile that requires signatures, checked by `edgelm run` and by the serial daemon's
//! LoadModel (the C ABI's checks are in capi.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use edgelm_e2e::{bin, bundle, copy_dir, root, run, scratch};

fn distill(args: &[&str]) -> Output {
    run(Command::new(bin("edgelm-distill")).args(args))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

struct Setup {
    dir: PathBuf,
    profile: PathBuf,
}

impl Setup {
    /// Keys `release` (trusted by the board) and `other`, and the bundles: `signed` (by
    /// release), `unsigned`, `foreign` (signed by other), `manifest-altered` and
    /// `weights-altered` (one byte each, after signing by release).
    fn new(tag: &str) -> Self {
        let dir = scratch().join("signing").join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("models")).unwrap();
        let key = |name: &str| dir.join("boards/keys").join(name);
        for k in ["release", "other"] {
            let out = distill(&["keygen", "-o", key(k).to_str().unwrap()]);
            assert!(out.status.success(), "{}", text(&out));
            // The private key is not printed.
            let private = std::fs::read_to_string(key(k)).unwrap();
            let body = private.lines().nth(1).unwrap();
            assert!(!text(&out).contains(body));
        }
        // keygen never replaces a key.
        let again = distill(&["keygen", "-o", key("release").to_str().unwrap()]);
        assert!(!again.status.success() && text(&again).contains("already exists"), "{}", text(&again));

        let models = dir.join("models");
        for name in ["signed", "unsigned", "foreign", "manifest-altered", "weights-altered"] {
            copy_dir(&bundle("tiny"), &models.join(name));
        }
        let sign = |name: &str, k: &str| {
            let out = distill(&["sign", "--key", key(k).to_str().unwrap(), models.join(name).to_str().unwrap()]);
            assert!(out.status.success(), "{}", text(&out));
        };
        for name in ["signed", "manifest-altered", "weights-altered"] {
            sign(name, "release");
        }
        sign("foreign", "other");
        let manifest = models.join("manifest-altered/edgelm.json");
        let m =
            std::fs::read_to_string(&manifest).unwrap().replacen("\"format_version\": ", "\"format_version\":  ", 1);
        std::fs::write(&manifest, m).unwrap();
        let model = models.join("weights-altered/model.onnx.data");
        let mut bytes = std::fs::read(&model).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&model, bytes).unwrap();

        // The shipped x86 profile, requiring signatures by `release` (a path relative to it).
        let shipped = std::fs::read_to_string(root().join("boards/x86_64-linux.toml")).unwrap();
        let profile = dir.join("boards/signed-only.toml");
        let body = shipped.replace("memory_budget_mib = 4096", "memory_budget_mib = 256");
        std::fs::write(&profile, format!("{body}\n[signatures]\nrequire = true\nkeys = [\"keys/release.pub\"]\n"))
            .unwrap();
        Setup { dir, profile }
    }

    fn bundle(&self, name: &str) -> PathBuf {
        self.dir.join("models").join(name)
    }
}

fn edgelm_run(profile: &Path, bundle: &Path) -> Output {
    run(Command::new(bin("edgelm")).args([
        "--board",
        profile.to_str().unwrap(),
        "run",
        bundle.to_str().unwrap(),
        "--prompt-ids",
        "1,40,97",
        "--max-new-tokens",
        "3",
    ]))
}

#[test]
fn a_board_that_requires_signatures_runs_signed_bundles_only() {
    let s = Setup::new("run");
    let ok = edgelm_run(&s.profile, &s.bundle("signed"));
    assert!(ok.status.success(), "{}", text(&ok));
    for (name, why) in [
        ("unsigned", "unsigned"),
        ("foreign", "not trusted"),
        ("manifest-altered", "altered after signing"),
        ("weights-altered", "sha256"),
    ] {
        let out = edgelm_run(&s.profile, &s.bundle(name));
        assert_eq!(out.status.code(), Some(1), "{name}: {}", text(&out));
        assert!(text(&out).contains(why), "{name}: expected `{why}` in {}", text(&out));
    }
    // Without the board's policy the unsigned bundle runs as before.
    let plain = run(Command::new(bin("edgelm")).args([
        "run",
        s.bundle("unsigned").to_str().unwrap(),
        "--prompt-ids",
        "1,40,97",
        "--max-new-tokens",
        "3",
    ]));
    assert!(plain.status.success(), "{}", text(&plain));
    // An encoder bundle goes through the same check: signed it embeds, altered it is refused.
    let enc = s.dir.join("models/encoder");
    copy_dir(&edgelm_e2e::minilm_bundle(), &enc);
    let key = s.dir.join("boards/keys/release");
    let out = distill(&["sign", "--key", key.to_str().unwrap(), enc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let embed = || {
        run(Command::new(bin("edgelm"))
            .args(["--board", s.profile.to_str().unwrap(), "embed"])
            .arg(&enc)
            .args(["--text", "turn on the light"]))
    };
    let out = embed();
    assert!(out.status.success(), "{}", text(&out));
    let manifest = enc.join("edgelm.json");
    let m = std::fs::read_to_string(&manifest).unwrap().replacen("\"format_version\": ", "\"format_version\":  ", 1);
    std::fs::write(&manifest, m).unwrap();
    let out = embed();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("altered after signing"), "{}", text(&out));
    // doctor names the policy and its key.
    let out = run(Command::new(bin("edgelm")).args(["--board", s.profile.to_str().unwrap(), "doctor"]));
    assert!(text(&out).contains("bundle signatures required; trusted keys: "), "{}", text(&out));
    // A profile naming a key file that is not there fails with the key named.
    let missing = s.dir.join("boards/missing-key.toml");
    let body = std::fs::read_to_string(&s.profile).unwrap().replace("keys/release.pub", "keys/gone.pub");
    std::fs::write(&missing, body).unwrap();
    let out = edgelm_run(&missing, &s.bundle("signed"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("gone.pub"), "{}", text(&out));
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_serial_daemon_refuses_to_load_an_unsigned_or_altered_bundle() {
    use std::io::BufRead;
    let s = Setup::new("serve");
    let mut child = Command::new(bin("edgelm"))
        .args(["--board", s.profile.to_str().unwrap(), "serve", "--tcp", "127.0.0.1:0", "--models-dir"])
        .arg(s.dir.join("models"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let _daemon = Daemon(child);
    let addr = lines
        .find_map(|l| l.ok()?.strip_prefix("edgelm serve: listening on ").map(str::to_owned))
        .expect("serve prints its address");
    std::thread::spawn(move || lines.for_each(drop));
    let load = |name: &str| {
        run(Command::new(bin("edgelm")).args([
            "client",
            "--tcp",
            &addr,
            "--load",
            name,
            "--prompt",
            "turn on the light",
            "--max-new-tokens",
            "3",
        ]))
    };
    for (name, why) in [("unsigned", "unsigned"), ("foreign", "not trusted"), ("manifest-altered", "altered")] {
        let out = load(name);
        assert!(!out.status.success(), "{name} loaded: {}", text(&out));
        assert!(text(&out).contains("signature refused") && text(&out).contains(why), "{name}: {}", text(&out));
    }
    let out = load("signed");
    assert!(out.status.success(), "{}", text(&out));
}
