//! `edgelm deploy` into a device root: A/B slots, the switch, health checks and rollback, and a
//! crash test that stops deploy at every step and at random moments, then shows the tree still
//! holds a runtime that starts and a bundle that loads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use edgelm_e2e::{bin, bundle, copy_dir, root, run, scratch};

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A runtime tree as `just build-board` lays it out (bin/edgelm, lib/libonnxruntime.so*), built
/// for this machine; and the x86 profile with a serial port (so the unit is written).
struct Fixture {
    dir: PathBuf,
    runtime: PathBuf,
    profile: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let dir = scratch().join("deploy").join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        let runtime = dir.join("runtime");
        std::fs::create_dir_all(runtime.join("bin")).unwrap();
        std::fs::create_dir_all(runtime.join("lib")).unwrap();
        std::fs::copy(bin("edgelm"), runtime.join("bin/edgelm")).unwrap();
        let version = edgelm_runtime::ortlib::ORT_VERSION;
        let ort = std::fs::canonicalize(std::env::var("EDGELM_ORT_LIB").expect("cargo sets EDGELM_ORT_LIB")).unwrap();
        std::fs::copy(ort, runtime.join(format!("lib/libonnxruntime.so.{version}"))).unwrap();
        std::os::unix::fs::symlink(format!("libonnxruntime.so.{version}"), runtime.join("lib/libonnxruntime.so"))
            .unwrap();
        let shipped = std::fs::read_to_string(root().join("boards/x86_64-linux.toml")).unwrap();
        let profile = dir.join("x86_64-linux.toml");
        let body = shipped.replace("memory_budget_mib = 4096", "memory_budget_mib = 256");
        std::fs::write(&profile, format!("{body}\n[serial]\ndevice = \"/dev/ttyS1\"\n")).unwrap();
        Fixture { dir, runtime, profile }
    }

    fn device(&self) -> PathBuf {
        self.dir.join("device")
    }

    fn install(&self) -> PathBuf {
        self.device().join("opt/edgelm")
    }

    fn deploy_cmd(&self, bundle: &Path) -> Command {
        let mut c = Command::new(bin("edgelm"));
        c.arg("--board").arg(&self.profile).arg("deploy").arg(bundle).arg("--to").arg(self.device());
        c.arg("--runtime").arg(&self.runtime);
        c
    }

    fn deploy(&self, bundle: &Path) -> Output {
        run(&mut self.deploy_cmd(bundle))
    }

    /// The active slot's name and which of `bundles` its model is (by the manifest's bytes).
    fn active_of(&self, bundles: &[&Path]) -> (String, usize) {
        let link = std::fs::read_link(self.install().join("current")).expect("current exists");
        let installed = std::fs::read(self.install().join(&link).join("model/edgelm.json")).unwrap();
        let which = bundles
            .iter()
            .position(|b| std::fs::read(b.join("edgelm.json")).unwrap() == installed)
            .expect("the active model is one of the bundles deployed");
        (link.display().to_string(), which)
    }

    /// What the board would do at boot: start the active slot's own edgelm on its own
    /// library and profile, and load and run its bundle.
    fn assert_boots(&self, after: &str) {
        let current = self.install().join("current");
        let out = run(Command::new(current.join("bin/edgelm"))
            .env_remove("EDGELM_ORT_LIB")
            .arg("--board")
            .arg(current.join("share/edgelm/board.toml"))
            .arg("check")
            .arg(current.join("model")));
        assert!(out.status.success(), "after {after}: the active slot does not start: {}", text(&out));
        assert!(text(&out).contains("one token generated"), "{}", text(&out));
    }
}

/// Two bundles to alternate between: the same model, manifests that differ (a note in the
/// report), so which one is installed can be told from the slot's model.
fn versions(f: &Fixture) -> [PathBuf; 2] {
    let v = [f.dir.join("bundle-v1"), f.dir.join("bundle-v2")];
    for (i, d) in v.iter().enumerate() {
        copy_dir(&bundle("tiny"), d);
        let path = d.join("edgelm.json");
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        m["report"]["deploy_test_version"] = (i + 1).into();
        std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    }
    v
}

#[test]
fn deploy_switches_slots_writes_the_unit_and_rolls_back() {
    let f = Fixture::new("slots");
    let [v1, v2] = versions(&f);
    let out = f.deploy(&v1);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/a".into(), 0));
    f.assert_boots("the first deploy");
    let unit = std::fs::read_to_string(f.device().join("etc/systemd/system/edgelm.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/edgelm/current/bin/edgelm --board /opt/edgelm/current/share/edgelm/board.toml serve --bundle /opt/edgelm/current/model"), "{unit}");
    assert!(unit.contains("Restart=on-failure"), "{unit}");
    // Enabled as `systemctl enable` would: a board booted from this root starts it.
    let wanted = f.device().join("etc/systemd/system/multi-user.target.wants/edgelm.service");
    assert_eq!(std::fs::read_link(&wanted).unwrap(), Path::new("../edgelm.service"));
    assert!(wanted.exists());

    let out = f.deploy(&v2);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/b".into(), 1));
    // The previous slot is kept whole: rollback returns to it.
    let out = run(Command::new(bin("edgelm"))
        .arg("--board")
        .arg(&f.profile)
        .args(["deploy", "--rollback", "--to"])
        .arg(f.device()));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/a".into(), 0));

    // A bundle whose files match its manifest but whose model does not load: the check in the
    // new slot fails and nothing is switched.
    let broken = f.dir.join("bundle-broken");
    copy_dir(&bundle("tiny"), &broken);
    let garbage = b"this is not an ONNX graph".to_vec();
    std::fs::write(broken.join("model.onnx"), &garbage).unwrap();
    let manifest = broken.join("edgelm.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    for file in m["files"].as_array_mut().unwrap() {
        if file["path"] == "model.onnx" {
            file["bytes"] = garbage.len().into();
            file["sha256"] = sha256_hex(&garbage).into();
        }
    }
    std::fs::write(&manifest, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let out = f.deploy(&broken);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("nothing was switched"), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/a".into(), 0));
    f.assert_boots("a refused bundle");

    // A check that fails once the new slot is live switches back to the previous one.
    let out = run(f.deploy_cmd(&v2).env("EDGELM_DEPLOY_FAIL_LIVE_CHECK", "1"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rolled back to slot a"), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/a".into(), 0));
    f.assert_boots("a rollback");

    // A damaged bundle is refused before anything is written.
    let damaged = f.dir.join("bundle-damaged");
    copy_dir(&bundle("tiny"), &damaged);
    std::fs::write(damaged.join("tokenizer.json"), b"{}").unwrap();
    let out = f.deploy(&damaged);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("tokenizer.json"), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/a".into(), 0));
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn steps_come_in_a_safe_order_and_keys_travel_with_the_profile() {
    let f = Fixture::new("order");
    let [v1, _] = versions(&f);
    // A board that requires signatures, its key beside the profile.
    let key = f.dir.join("keys/release");
    let out = run(Command::new(bin("edgelm-distill")).args(["keygen", "-o"]).arg(&key));
    assert!(out.status.success(), "{}", text(&out));
    let body = std::fs::read_to_string(&f.profile).unwrap();
    std::fs::write(&f.profile, format!("{body}\n[signatures]\nrequire = true\nkeys = [\"keys/release.pub\"]\n"))
        .unwrap();
    // Unsigned: refused before anything is written.
    let out = f.deploy(&v1);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("unsigned"), "{}", text(&out));
    assert!(!f.install().join("slots/a").exists());
    let out = run(Command::new(bin("edgelm-distill")).args(["sign", "--key"]).arg(&key).arg(&v1));
    assert!(out.status.success(), "{}", text(&out));

    let out = run(f.deploy_cmd(&v1).env("EDGELM_DEPLOY_TRACE", "1"));
    assert!(out.status.success(), "{}", text(&out));
    // The key went into the slot with the profile, and the slot's own check used it.
    assert!(f.install().join("slots/a/share/edgelm/keys/release.pub").is_file());
    f.assert_boots("a signed deploy");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let steps: Vec<&str> = log.lines().filter_map(|l| l.split_once(": step ").map(|(_, s)| s)).collect();
    let at = |needle: &str| {
        steps.iter().position(|s| s.contains(needle)).unwrap_or_else(|| panic!("no step `{needle}` in\n{log}"))
    };
    // Every copied file is synced before anything else happens.
    for (i, s) in steps.iter().enumerate() {
        if let Some(file) = s.split_once("copied ").map(|(_, f)| f) {
            assert!(steps[i + 1].ends_with(&format!("synced {file}")), "{s} then {}", steps[i + 1]);
        }
    }
    // Every folder of the slot is synced before slot.json marks it complete, which comes
    // after the check and before the switch; the new link is synced before the rename.
    let slot = f.install().join("slots/a");
    for d in ["bin", "lib", "model", "share/edgelm/keys", "share/edgelm", "share", ""] {
        let folder = slot.join(d);
        let folder = folder.to_str().unwrap().trim_end_matches('/');
        assert!(at(&format!("synced folder {folder}")) < at("slot.json"), "{folder}");
    }
    assert!(at("slot passed its health check") < at("renamed to").max(at("slot.json")));
    assert!(at("slot.json") < at("switch: new link written"));
    assert!(at("switch: new link synced, before the rename") < at("switch: renamed"));
}

#[test]
fn a_deploy_stopped_at_any_moment_leaves_a_board_that_starts() {
    let f = Fixture::new("crash");
    let vs = versions(&f);
    let out = f.deploy(&vs[0]);
    assert!(out.status.success(), "{}", text(&out));

    // Stopped at every step in turn (the step count grows by one once the inactive slot holds
    // something to clear, so go until a run completes twice in a row).
    let mut stopped_at = Vec::new();
    let mut completed = 0;
    let mut n = 1;
    let mut next = 1;
    while completed < 2 {
        let out = run(f.deploy_cmd(&vs[next]).env("EDGELM_DEPLOY_CRASH_AT", n.to_string()));
        match out.status.code() {
            Some(86) => {
                let line = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_owned();
                stopped_at.push(line);
                completed = 0;
            }
            Some(0) => {
                completed += 1;
                next = 1 - next;
            }
            _ => panic!("deploy stopped at step {n} failed otherwise: {}", text(&out)),
        }
        f.assert_boots(&format!("a stop at step {n}"));
        n += 1;
    }
    let every = stopped_at.join("\n");
    assert!(stopped_at.len() >= 25, "{every}");
    for moment in ["copied", "synced", "before the rename", "switch: renamed", "health check"] {
        assert!(every.contains(moment), "no stop at `{moment}`:\n{every}");
    }

    // Killed (SIGKILL) at random moments of a whole deploy.
    let start = Instant::now();
    let out = f.deploy(&vs[next]);
    assert!(out.status.success(), "{}", text(&out));
    next = 1 - next;
    let whole = start.elapsed();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let runs = 50usize.saturating_sub(stopped_at.len()).max(25);
    for i in 0..runs {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // Squared: more kills early, in the copying and syncing, fewer in the health checks
        // that take most of a deploy's time.
        let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let delay = whole.mul_f64(u * u);
        let mut child = f.deploy_cmd(&vs[next]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            next = 1 - next;
        }
        f.assert_boots(&format!("a kill after {delay:?} (run {i})"));
    }
    // And the next deploy goes through.
    let out = f.deploy(&vs[next]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.active_of(&[&vs[0], &vs[1]]).1, next);
    f.assert_boots("the last deploy");
}

/// An sshd of the test's own on loopback (key login for this user only), and the ssh command
/// that reaches it.
struct Sshd {
    child: std::process::Child,
    ssh: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd(dir: &Path) -> Sshd {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["host_key", "client_key"] {
        let _ = std::fs::remove_file(dir.join(name));
        let out = run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(name)));
        assert!(out.status.success(), "{}", text(&out));
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // sshd wants its privilege-separation folder.
    let _ = std::fs::create_dir_all("/run/sshd");
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"].into_iter().find(|p| Path::new(p).exists());
    let sshd = sshd.expect("sshd is missing: `just setup-tools` installs openssh-server");
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ssh = format!(
        "ssh -p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
        dir.join("client_key").display()
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed().as_secs() < 30, "sshd did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Sshd { child, ssh }
}

#[test]
fn deploy_over_ssh_installs_and_rolls_back_on_the_board() {
    let f = Fixture::new("ssh");
    let [v1, v2] = versions(&f);
    let d = sshd(&f.dir.join("sshd"));
    let user = String::from_utf8(run(Command::new("id").arg("-un")).stdout).unwrap().trim().to_owned();
    let to = format!("{user}@127.0.0.1:{}", f.device().display());
    let deploy = |bundle: Option<&Path>| {
        let mut c = Command::new(bin("edgelm"));
        c.arg("--board").arg(&f.profile).arg("deploy");
        match bundle {
            Some(b) => c.arg(b).arg("--runtime").arg(&f.runtime),
            None => c.arg("--rollback"),
        };
        run(c.args(["--to", &to, "--ssh", &d.ssh]))
    };
    for (i, (v, slot)) in [(&v1, "slots/a"), (&v2, "slots/b")].into_iter().enumerate() {
        let out = deploy(Some(v));
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(f.active_of(&[&v1, &v2]), (slot.into(), i));
        f.assert_boots("a deploy over ssh");
    }
    let out = deploy(None);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.active_of(&[&v1, &v2]), ("slots/a".into(), 0));
    f.assert_boots("a rollback over ssh");
}
