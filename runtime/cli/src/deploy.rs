//! `edgelm deploy`: a runtime and a bundle installed so that stopping at any moment (a kill, a
//! power cut) leaves a board that starts.
//!
//! Under the board's install prefix inside `--to` (a mounted device root, the board's own `/`,
//! or a staging folder):
//!
//! ```text
//! slots/a/  slots/b/   each a whole installation: bin/edgelm, lib/, share/edgelm/board.toml
//!                      (and its keys), model/ (the bundle), slot.json (written last)
//! current -> slots/a   the active slot: a relative symlink, replaced by one rename
//! deploy.lock          held (flock) while a deploy runs
//! etc/systemd/system/edgelm.service (under --to, not the prefix): serves from current/
//! ```
//!
//! A deploy writes the inactive slot only, fsyncs every file and folder it wrote, runs the
//! health check (`edgelm check`, with the slot's own binary and libraries) in that slot, points
//! `current` at it with a rename of a fresh symlink (fsynced before and after), checks again
//! through `current`, and renames the old link back if that fails. The active slot is never
//! touched, so until the rename the old installation is whole, and after it the new one is
//! (checked before the switch). `--rollback` switches to the other slot when it is complete.
//!
//! For tests, `EDGELM_DEPLOY_CRASH_AT=N` ends the process at the N-th step (every write, fsync
//! and rename is a step), as a kill at that moment would; `EDGELM_DEPLOY_TRACE=1` prints the
//! steps; `EDGELM_DEPLOY_FAIL_LIVE_CHECK=1` fails the check through `current` (after the
//! switch), to show the switch back.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::board::{arch_of, BoardProfile, Placement};

#[derive(Args)]
pub struct DeployArgs {
    /// Bundle folder to install (not with --rollback).
    #[arg(required_unless_present = "rollback")]
    bundle: Option<PathBuf>,
    /// Device root (a mounted image or card, or `/` on the board itself) or a staging folder;
    /// the installation goes to its <install_prefix>.
    #[arg(long)]
    to: PathBuf,
    /// The board's runtime tree (bin/edgelm, lib/) [default: out/boards/<board><install_prefix>,
    /// what `just build-board <board>` writes].
    #[arg(long)]
    runtime: Option<PathBuf>,
    /// Switch back to the other slot instead of installing (it must be complete).
    #[arg(long, conflicts_with = "bundle")]
    rollback: bool,
    /// Skip the health checks (when the board's binary cannot run on this machine).
    #[arg(long)]
    no_health_check: bool,
    /// The ssh command for a `--to [user@]host:/root` board (rsync's `-e`), e.g.
    /// "ssh -p 2222 -i ~/.ssh/board".
    #[arg(long, default_value = "ssh")]
    ssh: String,
}

/// The numbered moments of a deploy, where a test may stop it.
struct Steps {
    n: u32,
    stop_at: Option<u32>,
    trace: bool,
}

impl Steps {
    fn from_env() -> Self {
        Steps {
            n: 0,
            stop_at: std::env::var("EDGELM_DEPLOY_CRASH_AT").ok().and_then(|v| v.parse().ok()),
            trace: std::env::var_os("EDGELM_DEPLOY_TRACE").is_some(),
        }
    }

    fn at(&mut self, what: &str) {
        self.n += 1;
        if self.trace {
            eprintln!("edgelm deploy: step {}: {what}", self.n);
        }
        if self.stop_at == Some(self.n) {
            eprintln!("edgelm deploy: stopped at step {} ({what}) by EDGELM_DEPLOY_CRASH_AT", self.n);
            // No cleanup, no unwinding: what a kill at this moment leaves.
            std::process::exit(86);
        }
    }
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", path.display()))
}

/// Copies the tree `from` into `to` (created), symlinks as symlinks, fsyncing each file and
/// then each folder.
fn copy_tree(from: &Path, to: &Path, steps: &mut Steps) -> Result<()> {
    std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type()?;
        if kind.is_symlink() {
            symlink(std::fs::read_link(&src)?, &dst).with_context(|| format!("linking {}", dst.display()))?;
        } else if kind.is_dir() {
            copy_tree(&src, &dst, steps)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            steps.at(&format!("copied {}", dst.display()));
            fsync(&dst)?;
            steps.at(&format!("synced {}", dst.display()));
        }
    }
    fsync(to)?;
    steps.at(&format!("synced folder {}", to.display()));
    Ok(())
}

/// Writes `text` to `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, text: &str, steps: &mut Steps) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    steps.at(&format!("wrote {}", tmp.display()));
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    fsync(path.parent().expect("a file in a folder"))?;
    steps.at(&format!("renamed to {}", path.display()));
    Ok(())
}

/// `root` + an absolute `prefix`.
fn under(root: &Path, prefix: &Path) -> PathBuf {
    let rel: PathBuf = prefix.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    root.join(rel)
}

/// The slot `current` points at (`a` or `b`), if any.
fn active_slot(install: &Path) -> Option<&'static str> {
    let target = std::fs::read_link(install.join("current")).ok()?;
    match target.to_str()? {
        "slots/a" => Some("a"),
        "slots/b" => Some("b"),
        _ => None,
    }
}

fn other(slot: &str) -> &'static str {
    if slot == "a" {
        "b"
    } else {
        "a"
    }
}

/// Points `current` at `slot`: a new symlink, synced, renamed over the old one, synced.
fn switch(install: &Path, slot: &str, steps: &mut Steps) -> Result<()> {
    let tmp = install.join("current.tmp");
    if tmp.symlink_metadata().is_ok() {
        std::fs::remove_file(&tmp)?;
    }
    symlink(format!("slots/{slot}"), &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    steps.at("switch: new link written");
    fsync(install)?;
    steps.at("switch: new link synced, before the rename");
    std::fs::rename(&tmp, install.join("current")).context("switching the active slot")?;
    steps.at("switch: renamed");
    fsync(install)?;
    steps.at("switch: rename synced");
    Ok(())
}

/// Holds `deploy.lock` (released when the process ends, however it ends).
struct Lock(#[allow(dead_code)] File);

fn lock(install: &Path) -> Result<Lock> {
    let path = install.join("deploy.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another deploy into {} is running ({} is locked)", install.display(), path.display());
    }
    Ok(Lock(f))
}

/// Runs `edgelm check` of the installation in `root` (a slot, or `current`) with its own
/// binary, libraries and profile, through qemu when the board is another architecture.
fn health_check(board: &BoardProfile, root: &Path) -> Result<String> {
    let exe = root.join("bin/edgelm");
    let mut cmd = match arch_of(&board.target) {
        a if a == std::env::consts::ARCH => Command::new(&exe),
        a => {
            let qemu = format!("qemu-{a}");
            if Command::new(&qemu).arg("--version").output().is_err() {
                bail!(
                    "the health check runs the board's {a} binary, and this machine has no {qemu} to run it; install qemu-user or pass --no-health-check"
                );
            }
            let mut c = Command::new(qemu);
            c.arg("-L").arg(format!("/usr/{a}-linux-gnu")).arg(&exe);
            c
        }
    };
    cmd.arg("--board").arg(root.join("share/edgelm/board.toml")).arg("check").arg(root.join("model"));
    // The slot's own ONNX Runtime (lib/ beside bin/) or the board's system one, nothing of this
    // shell's.
    cmd.env_remove("EDGELM_ORT_LIB").env_remove("ORT_DYLIB_PATH");
    let out = run_bounded(cmd, Duration::from_secs(300))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("health check of {} failed: {}", root.display(), text.trim());
    }
    Ok(text.trim().to_owned())
}

fn run_bounded(mut cmd: Command, limit: Duration) -> Result<std::process::Output> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            bail!("the health check did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The systemd unit serving the active slot on the board's serial port.
fn unit(board: &BoardProfile) -> String {
    let current = board.install_prefix.join("current");
    format!(
        "# Written by `edgelm deploy`: serves the active slot ({current}).\n\
         [Unit]\nDescription=edgelm board daemon ({name})\nAfter=local-fs.target\n\n\
         [Service]\nExecStart={current}/bin/edgelm --board {current}/share/edgelm/board.toml serve --bundle {current}/model\n\
         Restart=on-failure\nRestartSec=2\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        current = current.display(),
        name = board.name,
    )
}

pub fn deploy(a: DeployArgs, place: &Placement) -> Result<()> {
    let Some(board) = place.board.as_ref() else {
        bail!("deploy needs the board: give --board boards/NAME.toml");
    };
    if let Some((host, root)) = remote_target(&a.to) {
        return deploy_remote(&a, board, &host, &root);
    }
    let install = under(&a.to, &board.install_prefix);
    std::fs::create_dir_all(install.join("slots")).with_context(|| format!("creating {}", install.display()))?;
    let _lock = lock(&install)?;
    let mut steps = Steps::from_env();
    if a.rollback {
        return rollback(board, &install, a.no_health_check, &mut steps);
    }
    let bundle = a.bundle.as_ref().expect("clap requires a bundle without --rollback");

    // Refuse what would not run before anything is written: a damaged or unsigned bundle.
    edgelm_runtime::bundle::verify_files(bundle).with_context(|| format!("bundle {}", bundle.display()))?;
    board.trusted_keys()?.check(bundle)?;
    let runtime = runtime_tree(&a, board)?;

    let active = active_slot(&install);
    let slot = active.map_or("a", other);
    let dir = install.join("slots").join(slot);
    // The inactive slot holds an older installation or the remains of a stopped deploy.
    if dir.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        fsync(&install.join("slots"))?;
        steps.at("cleared the inactive slot");
    }
    copy_tree(&runtime, &dir, &mut steps)?;
    copy_tree(bundle, &dir.join("model"), &mut steps)?;
    // The profile as given, with the keys it names by relative path.
    let share = dir.join("share/edgelm");
    std::fs::create_dir_all(&share)?;
    let profile_text = std::fs::read_to_string(board.dir.join(format!("{}.toml", board.id)))
        .with_context(|| format!("reading the profile of board {}", board.id))?;
    write_atomic(&share.join("board.toml"), &profile_text, &mut steps)?;
    for key in board.signatures.keys.iter().filter(|k| k.is_relative()) {
        let (src, dst) = (board.dir.join(key), share.join(key));
        std::fs::create_dir_all(dst.parent().expect("a key file in a folder"))?;
        if src.is_dir() {
            if dst.exists() {
                std::fs::remove_dir_all(&dst)?;
            }
            copy_tree(&src, &dst, &mut steps)?;
        } else {
            let text = std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
            write_atomic(&dst, &text, &mut steps)?;
        }
    }
    let manifest = std::fs::read(bundle.join("edgelm.json")).unwrap_or_default();
    let record = serde_json::json!({
        "slot": slot,
        "board": board.id,
        "bundle": bundle.display().to_string(),
        "manifest_sha256": sha256_hex(&manifest),
        "edgelm": env!("CARGO_PKG_VERSION"),
    });
    write_atomic(&dir.join("slot.json"), &format!("{record:#}\n"), &mut steps)?;
    fsync(&dir)?;
    fsync(&install.join("slots"))?;
    steps.at("slot complete and synced");

    if !a.no_health_check {
        if let Err(e) = health_check(board, &dir) {
            bail!("{e:#}\nthe active slot is unchanged ({}); nothing was switched", active.unwrap_or("none"));
        }
        steps.at("slot passed its health check");
    }
    write_unit(&a.to, board, &mut steps)?;
    switch(&install, slot, &mut steps)?;
    if !a.no_health_check {
        let live = match std::env::var_os("EDGELM_DEPLOY_FAIL_LIVE_CHECK") {
            Some(_) => Err(anyhow::anyhow!("health check of the live slot failed (EDGELM_DEPLOY_FAIL_LIVE_CHECK)")),
            None => health_check(board, &install.join("current")),
        };
        if let Err(e) = live {
            match active {
                Some(old) => {
                    switch(&install, old, &mut steps)?;
                    bail!("{e:#}\nrolled back to slot {old}");
                }
                None => bail!("{e:#}\nno earlier slot to roll back to"),
            }
        }
    }
    println!(
        "edgelm deploy: slot {slot} active in {} ({}; previous: {})",
        install.display(),
        bundle.display(),
        active.unwrap_or("none")
    );
    Ok(())
}

/// The runtime tree to install: `--runtime`, or what `just build-board` wrote for the board.
fn runtime_tree(a: &DeployArgs, board: &BoardProfile) -> Result<PathBuf> {
    let runtime =
        a.runtime.clone().unwrap_or_else(|| under(&Path::new("out/boards").join(&board.id), &board.install_prefix));
    if !runtime.join("bin/edgelm").is_file() {
        bail!(
            "no runtime tree at {} (bin/edgelm missing); build it with `just build-board {}` or name one with --runtime",
            runtime.display(),
            board.id
        );
    }
    Ok(runtime)
}

fn write_unit(root: &Path, board: &BoardProfile, steps: &mut Steps) -> Result<()> {
    if board.serial.is_none() {
        eprintln!("edgelm deploy: board {} has no [serial] port: no systemd unit written", board.id);
        return Ok(());
    }
    let dir = root.join("etc/systemd/system");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("edgelm.service"), &unit(board), steps)
}

fn rollback(board: &BoardProfile, install: &Path, no_check: bool, steps: &mut Steps) -> Result<()> {
    let Some(active) = active_slot(install) else {
        bail!("nothing is deployed in {}", install.display());
    };
    let target = other(active);
    if !install.join("slots").join(target).join("slot.json").is_file() {
        bail!("slot {target} is not a complete installation; nothing to roll back to");
    }
    if !no_check {
        health_check(board, &install.join("slots").join(target))
            .with_context(|| format!("slot {target} fails its health check; staying on slot {active}"))?;
    }
    switch(install, target, steps)?;
    println!("edgelm deploy: rolled back to slot {target} in {}", install.display());
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `[user@]host:path` (a colon before any slash, as rsync reads it): a board over ssh.
fn remote_target(to: &Path) -> Option<(String, String)> {
    let s = to.to_str()?;
    let (host, path) = s.split_once(':')?;
    if host.is_empty() || host.contains('/') || !path.starts_with('/') {
        return None;
    }
    Some((host.to_owned(), path.to_owned()))
}

/// One word for a POSIX shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Deploys on a board over ssh: stages the runtime, the bundle and the profile (with its keys)
/// under `<install_prefix>/.incoming` with rsync (only what changed travels), then runs the
/// staged edgelm's own `deploy` there, so the slots, the switch and the health checks happen
/// on the board, natively.
fn deploy_remote(a: &DeployArgs, board: &BoardProfile, host: &str, root: &str) -> Result<()> {
    let ssh: Vec<String> = a.ssh.split_whitespace().map(str::to_owned).collect();
    let Some((ssh_prog, ssh_args)) = ssh.split_first() else { bail!("--ssh is empty") };
    let install = format!(
        "{}/{}",
        root.trim_end_matches('/'),
        board.install_prefix.display().to_string().trim_start_matches('/')
    );
    let remote = |command: &str| -> Result<std::process::ExitStatus> {
        Command::new(ssh_prog)
            .args(ssh_args)
            .arg(host)
            .arg(command)
            .status()
            .with_context(|| format!("running {ssh_prog} {host}"))
    };
    if a.rollback {
        let current = format!("{install}/current");
        let cmd = [
            format!("{current}/bin/edgelm"),
            "--board".into(),
            format!("{current}/share/edgelm/board.toml"),
            "deploy".into(),
            "--rollback".into(),
            "--to".into(),
            root.to_owned(),
        ];
        let status = remote(&cmd.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "))?;
        if !status.success() {
            bail!("the rollback on {host} failed (see above)");
        }
        return Ok(());
    }
    let bundle = a.bundle.as_ref().expect("clap requires a bundle without --rollback");
    edgelm_runtime::bundle::verify_files(bundle).with_context(|| format!("bundle {}", bundle.display()))?;
    board.trusted_keys()?.check(bundle)?;
    let runtime = runtime_tree(a, board)?;
    if Command::new("rsync").arg("--version").output().is_err() {
        bail!("deploying to {host} needs rsync here and on the board (apt install rsync)");
    }
    let staging = format!("{install}/.incoming");
    let status = remote(&format!("mkdir -p {}", shell_quote(&staging)))?;
    if !status.success() {
        bail!("cannot create {staging} on {host}");
    }
    // The profile and the keys it names by relative path, as one folder.
    let local = tempfile_dir()?;
    std::fs::copy(board.dir.join(format!("{}.toml", board.id)), local.join(format!("{}.toml", board.id)))
        .with_context(|| format!("copying the profile of board {}", board.id))?;
    for key in board.signatures.keys.iter().filter(|k| k.is_relative()) {
        let dst = local.join(key);
        std::fs::create_dir_all(dst.parent().expect("a key file in a folder"))?;
        let src = board.dir.join(key);
        let ok = Command::new("cp").arg("-r").arg(&src).arg(&dst).status()?.success();
        if !ok {
            bail!("copying key {}", src.display());
        }
    }
    for (from, to) in [(&runtime, "runtime"), (bundle, "bundle"), (&local, "board")] {
        let status = Command::new("rsync")
            .args(["-a", "--delete", "-e", &a.ssh])
            .arg(format!("{}/", from.display()))
            .arg(format!("{host}:{staging}/{to}/"))
            .status()
            .context("running rsync")?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&local);
            bail!("rsync of {} to {host}:{staging}/{to} failed", from.display());
        }
    }
    let _ = std::fs::remove_dir_all(&local);
    let mut cmd = vec![
        format!("{staging}/runtime/bin/edgelm"),
        "--board".into(),
        format!("{staging}/board/{}.toml", board.id),
        "deploy".into(),
        format!("{staging}/bundle"),
        "--to".into(),
        root.to_owned(),
        "--runtime".into(),
        format!("{staging}/runtime"),
    ];
    if a.no_health_check {
        cmd.push("--no-health-check".into());
    }
    let status = remote(&cmd.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "))?;
    if !status.success() {
        bail!("the deploy on {host} failed (see above)");
    }
    Ok(())
}

/// A fresh private folder for staging.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("edgelm-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
