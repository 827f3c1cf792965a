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
//! etc/systemd/system/edgelm.service (under --to, not the prefix), enabled: serves current/
//! ```
//!
//! A deploy writes the inactive slot only (moving an old one aside with one rename before
//! deleting it), fsyncs every file and folder it wrote, runs the health check (`edgelm check`,
//! with the slot's own binary and libraries) in that slot, writes `slot.json` (the mark of a
//! complete, checked slot), points `current` at it with a rename of a fresh symlink (fsynced
//! before and after), checks again through `current`, and renames the old link back if that
//! fails. The active slot is never touched, so until the rename the old installation is whole,
//! and after it the new one is (checked before the switch). `--rollback` switches to the
//! other slot when it has its `slot.json`.
//!
//! For tests, `EDGELM_DEPLOY_CRASH_AT=N` ends the process at the N-th step (every write, fsync
//! and rename is a step), as a kill at that moment would; `EDGELM_DEPLOY_TRACE=1` prints the
//! steps; `EDGELM_DEPLOY_FAIL_LIVE_CHECK=1` fails the check through `current` (after the
//! switch), to show the switch back.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::fs::symlink;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::board::{arch_of, BoardProfile, OrtSource, Placement};

#[derive(Args)]
pub struct DeployArgs {
    /// Bundle folder to install (not with --rollback).
    #[arg(required_unless_present = "rollback")]
    bundle: Option<PathBuf>,
    /// Where the board's root is: a mounted card or image, a staging folder, `/` on the board
    /// itself, or `[user@]host:/` for a board over ssh (rsync on both ends). The installation
    /// goes to <install_prefix> under it.
    #[arg(long)]
    to: PathBuf,
    /// The board's runtime tree (bin/edgelm, lib/) [default: out/boards/<board><install_prefix>,
    /// what `just build-board <board>` writes].
    #[arg(long, conflicts_with = "rollback")]
    runtime: Option<PathBuf>,
    /// Switch back to the other slot instead of installing (it must be complete).
    #[arg(long, conflicts_with = "bundle")]
    rollback: bool,
    /// Skip the health checks (when the board's binary cannot run on this machine).
    #[arg(long)]
    no_health_check: bool,
    /// The ssh command for a `host:/root` target, as rsync's `-e` takes it (split at spaces:
    /// no quoting), e.g. "ssh -p 2222 -i /home/me/.ssh/board".
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

/// Copies the tree `from` into `to` (created), symlinks as symlinks, fsyncing each file.
/// Folders are synced afterwards, all at once ([`sync_folders`]).
fn copy_tree(from: &Path, to: &Path, steps: &mut Steps) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
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
    Ok(())
}

/// Fsyncs every folder under `root`, deepest first, then `root`: each new entry is then on disk
/// in its parent.
fn sync_folders(root: &Path, steps: &mut Steps) -> Result<()> {
    for e in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_folders(&e.path(), steps)?;
        }
    }
    fsync(root)?;
    steps.at(&format!("synced folder {}", root.display()));
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

/// Points the symlink `link` at `target`: a fresh link, synced, renamed over the old one.
fn relink(link: &Path, target: &Path, steps: &mut Steps, what: &str) -> Result<()> {
    let dir = link.parent().expect("a link in a folder");
    let tmp = link.with_extension("tmp");
    if tmp.symlink_metadata().is_ok() {
        std::fs::remove_file(&tmp)?;
    }
    symlink(target, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    steps.at(&format!("{what}: new link written"));
    fsync(dir)?;
    steps.at(&format!("{what}: new link synced, before the rename"));
    std::fs::rename(&tmp, link).with_context(|| format!("renaming to {}", link.display()))?;
    steps.at(&format!("{what}: renamed"));
    fsync(dir)?;
    steps.at(&format!("{what}: rename synced"));
    Ok(())
}

/// `root` + an absolute `prefix`.
fn under(root: &Path, prefix: &Path) -> PathBuf {
    let rel: PathBuf = prefix.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    root.join(rel)
}

/// The slot `current` points at: `None` before the first deploy, an error when `current` is
/// something a deploy did not make (it must never be mistaken for "no slot").
fn active_slot(install: &Path) -> Result<Option<&'static str>> {
    let current = install.join("current");
    if current.symlink_metadata().is_err() {
        return Ok(None);
    }
    let target = std::fs::canonicalize(&current).ok();
    for slot in ["a", "b"] {
        let dir = std::fs::canonicalize(install.join("slots").join(slot)).ok();
        if target.is_some() && target == dir {
            return Ok(Some(slot));
        }
    }
    bail!("{} is not a link to slots/a or slots/b; fix or remove it by hand (nothing was changed)", current.display())
}

fn other(slot: &str) -> &'static str {
    if slot == "a" {
        "b"
    } else {
        "a"
    }
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
/// binary, libraries and profile, through qemu when the board is another architecture. Its
/// output goes to `log` (a file: a pipe nobody reads would stall a chatty check).
fn health_check(board: &BoardProfile, to: &Path, root: &Path, log: &Path) -> Result<String> {
    let exe = root.join("bin/edgelm");
    let mut cmd = match arch_of(&board.target) {
        a if a == std::env::consts::ARCH => Command::new(&exe),
        a => {
            let (qemu, sysroot) = match a {
                "armv7" => ("qemu-arm".to_owned(), "/usr/arm-linux-gnueabihf".to_owned()),
                a => (format!("qemu-{a}"), format!("/usr/{a}-linux-gnu")),
            };
            if Command::new(&qemu).arg("--version").output().is_err() {
                bail!(
                    "the health check runs the board's {a} binary, and this machine has no {qemu} to run it; install qemu-user or pass --no-health-check"
                );
            }
            let mut c = Command::new(qemu);
            c.arg("-L").arg(sysroot).arg(&exe);
            c
        }
    };
    cmd.arg("--board").arg(root.join("share/edgelm/board.toml"));
    // A board's own ONNX Runtime, found under the device root when that is mounted here.
    if let OrtSource::System { path, .. } = &board.ort {
        let mounted = under(to, path);
        if mounted.exists() {
            cmd.arg("--ort-lib").arg(mounted);
        }
    }
    cmd.arg("check").arg(root.join("model"));
    // The slot's own ONNX Runtime (lib/ beside bin/) or the board's, nothing of this shell's.
    cmd.env_remove("EDGELM_ORT_LIB").env_remove("ORT_DYLIB_PATH");
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(out.try_clone()?).stderr(out);
    let mut child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the health check of {} did not finish within 300 s", root.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        bail!("health check of {} failed: {}", root.display(), text.trim());
    }
    Ok(text.trim().to_owned())
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

/// Writes the unit and enables it (the link `systemctl enable` makes), so a board booted from
/// this root starts the daemon.
fn write_unit(root: &Path, board: &BoardProfile, steps: &mut Steps) -> Result<()> {
    if board.serial.is_none() {
        eprintln!("edgelm deploy: board {} has no [serial] port: no systemd unit written", board.id);
        return Ok(());
    }
    let dir = root.join("etc/systemd/system");
    let wants = dir.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants).with_context(|| format!("creating {}", wants.display()))?;
    for d in [root.join("etc"), root.join("etc/systemd"), dir.clone()] {
        fsync(&d)?;
    }
    write_atomic(&dir.join("edgelm.service"), &unit(board), steps)?;
    relink(&wants.join("edgelm.service"), Path::new("../edgelm.service"), steps, "enable the unit")
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
    // An installed slot is not a runtime tree: its slot.json would mark the new slot complete
    // before it is.
    if runtime.join("slot.json").exists() || runtime.join("model").exists() {
        bail!("{} is an installed slot, not a runtime tree (`just build-board` makes one)", runtime.display());
    }
    Ok(runtime)
}

/// Writes the board's profile into `share` as `name` (`share/edgelm/board.toml` of a slot, or
/// a staging folder) with the keys it names by relative path beside it.
fn stage_profile(board: &BoardProfile, share: &Path, name: &str, steps: &mut Steps) -> Result<()> {
    std::fs::create_dir_all(share).with_context(|| format!("creating {}", share.display()))?;
    let text = std::fs::read_to_string(&board.path).with_context(|| format!("reading {}", board.path.display()))?;
    write_atomic(&share.join(name), &text, steps)?;
    for key in board.signatures.keys.iter().filter(|k| k.is_relative()) {
        // The profile check keeps relative keys below the profile's folder.
        let (src, dst) = (board.dir.join(key), share.join(key));
        if src.is_dir() {
            copy_tree(&src, &dst, steps)?;
        } else {
            std::fs::create_dir_all(dst.parent().expect("a key file in a folder"))?;
            let text = std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
            write_atomic(&dst, &text, steps)?;
        }
    }
    Ok(())
}

pub fn deploy(a: DeployArgs, place: &Placement) -> Result<()> {
    let Some(board) = place.board.as_ref() else {
        bail!("deploy needs the board: give --board boards/NAME.toml");
    };
    // Refuse what would not run before anything is written anywhere: a damaged, unsigned or
    // foreign-signed bundle, a runtime tree that is not one.
    let install_from = match &a.bundle {
        Some(bundle) if !a.rollback => {
            edgelm_runtime::bundle::verify_files(bundle).with_context(|| format!("bundle {}", bundle.display()))?;
            board.trusted_keys()?.check(bundle)?;
            Some((bundle.clone(), runtime_tree(&a, board)?))
        }
        _ => None,
    };
    if let Some((host, root)) = remote_target(&a.to) {
        return deploy_remote(&a, board, &host, &root, install_from.as_ref());
    }
    let install = under(&a.to, &board.install_prefix);
    std::fs::create_dir_all(install.join("slots")).with_context(|| format!("creating {}", install.display()))?;
    let _lock = lock(&install)?;
    let mut steps = Steps::from_env();
    let active = active_slot(&install)?;
    let Some((bundle, runtime)) = install_from else {
        return rollback(board, &a.to, &install, active, a.no_health_check, &mut steps);
    };

    let slot = active.map_or("a", other);
    let slots = install.join("slots");
    let dir = slots.join(slot);
    // The inactive slot holds an older installation or the remains of a stopped deploy: one
    // rename takes it (and its slot.json) out of the way before it is deleted.
    let trash = slots.join(format!(".trash-{slot}"));
    if trash.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&trash).with_context(|| format!("clearing {}", trash.display()))?;
    }
    if dir.symlink_metadata().is_ok() {
        std::fs::rename(&dir, &trash).with_context(|| format!("moving {} aside", dir.display()))?;
        fsync(&slots)?;
        steps.at("moved the inactive slot aside");
        std::fs::remove_dir_all(&trash).with_context(|| format!("clearing {}", trash.display()))?;
    }
    copy_tree(&runtime, &dir, &mut steps)?;
    copy_tree(&bundle, &dir.join("model"), &mut steps)?;
    stage_profile(board, &dir.join("share/edgelm"), "board.toml", &mut steps)?;
    sync_folders(&dir, &mut steps)?;
    fsync(&slots)?;

    let log = install.join("health-check.log");
    if !a.no_health_check {
        if let Err(e) = health_check(board, &a.to, &dir, &log) {
            bail!("{e:#}\nthe active slot is unchanged ({}); nothing was switched", active.unwrap_or("none"));
        }
        steps.at("slot passed its health check");
    }
    // Written last: the mark of a complete slot (and, unless checks were skipped, a checked one).
    let manifest_sha256 = edgelm_runtime::bundle::sha256_file(&bundle.join("edgelm.json"))?;
    let record = serde_json::json!({
        "slot": slot,
        "board": board.id,
        "bundle": bundle.display().to_string(),
        "manifest_sha256": manifest_sha256,
        "edgelm": env!("CARGO_PKG_VERSION"),
        "health_checked": !a.no_health_check,
    });
    write_atomic(&dir.join("slot.json"), &format!("{record:#}\n"), &mut steps)?;
    steps.at("slot complete and synced");

    write_unit(&a.to, board, &mut steps)?;
    let current = install.join("current");
    relink(&current, &Path::new("slots").join(slot), &mut steps, "switch")?;
    if !a.no_health_check {
        let live = match std::env::var_os("EDGELM_DEPLOY_FAIL_LIVE_CHECK") {
            Some(_) => Err(anyhow::anyhow!("health check of the live slot failed (EDGELM_DEPLOY_FAIL_LIVE_CHECK)")),
            None => health_check(board, &a.to, &current, &log),
        };
        if let Err(e) = live {
            match active {
                Some(old) => {
                    relink(&current, &Path::new("slots").join(old), &mut steps, "switch back")?;
                    bail!("{e:#}\nrolled back to slot {old}");
                }
                None => {
                    // Nothing to go back to: leave the board as it was before this deploy.
                    std::fs::remove_file(&current).context("removing current")?;
                    fsync(&install)?;
                    bail!("{e:#}\nno earlier slot to roll back to: `current` removed");
                }
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

fn rollback(
    board: &BoardProfile,
    to: &Path,
    install: &Path,
    active: Option<&'static str>,
    no_check: bool,
    steps: &mut Steps,
) -> Result<()> {
    let Some(active) = active else {
        bail!("nothing is deployed in {}", install.display());
    };
    let target = other(active);
    let dir = install.join("slots").join(target);
    if !dir.join("slot.json").is_file() {
        bail!("slot {target} is not a complete installation; nothing to roll back to");
    }
    if !no_check {
        health_check(board, to, &dir, &install.join("health-check.log"))
            .with_context(|| format!("slot {target} fails its health check; staying on slot {active}"))?;
    }
    relink(&install.join("current"), &Path::new("slots").join(target), steps, "switch")?;
    println!("edgelm deploy: rolled back to slot {target} in {}", install.display());
    Ok(())
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

/// A command line for a POSIX shell on the board, each word quoted.
fn shell_line<S: AsRef<str>>(words: &[S]) -> String {
    words.iter().map(|w| format!("'{}'", w.as_ref().replace('\'', r"'\''"))).collect::<Vec<_>>().join(" ")
}

/// Deploys on a board over ssh: stages the runtime, the bundle and the profile (with its keys)
/// under `<install_prefix>/.incoming` with rsync (only what changed travels), then runs the
/// staged edgelm's own `deploy` there, so the slots, the switch and the health checks happen
/// on the board, natively. A lock on the board (`.incoming.lock`, held by an ssh session for
/// the whole exchange) keeps two deploys from staging into each other.
fn deploy_remote(
    a: &DeployArgs,
    board: &BoardProfile,
    host: &str,
    root: &str,
    install_from: Option<&(PathBuf, PathBuf)>,
) -> Result<()> {
    let ssh: Vec<&str> = a.ssh.split_whitespace().collect();
    let Some((ssh_prog, ssh_args)) = ssh.split_first() else { bail!("--ssh is empty") };
    let install = format!(
        "{}/{}",
        root.trim_end_matches('/'),
        board.install_prefix.display().to_string().trim_start_matches('/')
    );
    let remote = |line: &str| -> Result<()> {
        let status = Command::new(ssh_prog)
            .args(ssh_args)
            .arg(host)
            .arg(line)
            .status()
            .with_context(|| format!("running {ssh_prog} {host}"))?;
        if !status.success() {
            bail!("on {host}: `{line}` failed (see above)");
        }
        Ok(())
    };
    let Some((bundle, runtime)) = install_from else {
        let current = format!("{install}/current");
        let mut words = vec![
            format!("{current}/bin/edgelm"),
            "--board".into(),
            format!("{current}/share/edgelm/board.toml"),
            "deploy".into(),
            "--rollback".into(),
            "--to".into(),
            root.to_owned(),
        ];
        if a.no_health_check {
            words.push("--no-health-check".into());
        }
        return remote(&shell_line(&words));
    };
    if Command::new("rsync").arg("--version").output().is_err() {
        bail!("deploying to {host} needs rsync here and on the board (apt install rsync)");
    }
    let staging = format!("{install}/.incoming");
    // The lock: `flock` on the board holds it while this ssh session's stdin stays open.
    let mut holder = Command::new(ssh_prog)
        .args(ssh_args)
        .arg(host)
        .arg(format!(
            "mkdir -p {s} && exec flock -n {l} sh -c 'echo locked; cat >/dev/null'",
            s = shell_line(&[&staging]),
            l = shell_line(&[format!("{install}/.incoming.lock")]),
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {ssh_prog} {host}"))?;
    let mut first = String::new();
    let stdout = holder.stdout.take().expect("piped");
    std::io::BufReader::new(stdout).read_line(&mut first)?;
    if first.trim() != "locked" {
        let _ = holder.kill();
        let _ = holder.wait();
        bail!("another deploy to {host} is staging (or flock is missing there)");
    }
    let result = (|| {
        let local = tempfile::tempdir().context("creating a staging folder")?;
        // Under its own name: the board's id is the profile's file name.
        let name = format!("{}.toml", board.id);
        stage_profile(board, local.path(), &name, &mut Steps { n: 0, stop_at: None, trace: false })?;
        for (from, to) in [(runtime, "runtime"), (bundle, "bundle"), (&local.path().to_path_buf(), "board")] {
            let status = Command::new("rsync")
                // --checksum: rsync's default size-and-mtime test misses a file rewritten to
                // the same size within the same second (a re-signed manifest, say).
                .args(["-a", "--checksum", "--delete", "-e", &a.ssh])
                .arg(format!("{}/", from.display()))
                .arg(format!("{host}:{staging}/{to}/"))
                .status()
                .context("running rsync")?;
            if !status.success() {
                bail!("rsync of {} to {host}:{staging}/{to} failed", from.display());
            }
        }
        let mut words = vec![
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
            words.push("--no-health-check".into());
        }
        remote(&shell_line(&words))
    })();
    drop(holder.stdin.take());
    let _ = holder.wait();
    result
}
