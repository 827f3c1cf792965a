//! A record of bundle files whose sha256 has been checked, so that opening the same bundle again
//! does not hash all of its weights again: about 0.3 s per GB with SHA instructions, ten times
//! that on a board without them (Raspberry Pi 4).
//!
//! A file is taken as checked only while everything the kernel reports about it is as it was:
//! device, inode, size, modification time and change time. Any write or rename changes one of
//! them, and a user cannot set the change time back, so a file altered since the check is hashed
//! again. File-system clocks are coarse (a few milliseconds), so a write right after a change
//! could leave the same times behind; files changed in the last two seconds before their check
//! are therefore not recorded (git's "racily clean" rule).
//!
//! The record lives in the user's cache folder (`EDGELM_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/edgelm`, else `~/.cache/edgelm`), never inside a bundle, so whoever can write
//! a bundle cannot vouch for it; a folder or record others can write is not used. Signed
//! bundles are hashed in full at every open: the record is not signed, and a signature is
//! meant to hold against anyone who can write files. `EDGELM_VERIFY=full` turns the record off
//! for every bundle. Where the folder cannot be written (a read-only board image) files are
//! hashed every time, as before.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bundle::sha256_file;
use crate::error::{Error, Result};

/// File name of the record in the cache folder.
const RECORD_FILE: &str = "verified-files.json";

/// Entries kept; the oldest checks go first.
const MAX_ENTRIES: usize = 512;

/// Files changed less than this before their check are not recorded.
const SETTLE: Duration = Duration::from_secs(2);

/// What identifies a file's bytes without reading them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    bytes: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    #[cfg(unix)]
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            bytes: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_path: &Path) -> Option<Stamp> {
        // No change time to rely on: always hash.
        None
    }

    /// Whether the file last changed at least [`SETTLE`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let now_ns = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        now_ns - self.mtime_ns.max(self.ctime_ns) >= SETTLE.as_nanos() as i128
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// Absolute path with symlinks resolved.
    path: PathBuf,
    stamp: Stamp,
    sha256: String,
    /// Seconds since the epoch when the hash was taken (for evicting the oldest).
    checked: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    version: u32,
    entries: Vec<Entry>,
}

/// The files checked during one bundle open, against the record on disk.
pub(crate) struct VerifiedFiles {
    /// Where the record is read from and written to; `None`: hash everything, record nothing.
    record_path: Option<PathBuf>,
    record: Record,
    changed: bool,
    now: SystemTime,
    /// Bytes hashed so far (files not trusted from the record).
    pub(crate) hashed_bytes: u64,
}

impl VerifiedFiles {
    /// Hashes every file and records nothing (signing and deploying check the bytes themselves).
    pub(crate) fn full() -> Self {
        VerifiedFiles::at(None, SystemTime::now())
    }

    /// The record in the user's cache folder, unless `EDGELM_VERIFY=full`.
    pub(crate) fn from_env() -> Self {
        let full = std::env::var("EDGELM_VERIFY").is_ok_and(|v| v.eq_ignore_ascii_case("full"));
        let folder = if full { None } else { cache_folder() };
        VerifiedFiles::at(folder.map(|f| f.join(RECORD_FILE)), SystemTime::now())
    }

    fn at(record_path: Option<PathBuf>, now: SystemTime) -> Self {
        // A record others could write would vouch for files nobody checked: a cache folder or
        // record not private to this user is not used at all.
        let record_path = record_path.filter(|p| {
            let private = [p.parent().unwrap_or(Path::new("/")), p.as_path()]
                .iter()
                .all(|q| !q.exists() || private_to_this_user(q));
            if !private {
                tracing::warn!(
                    "not using {}: it or its folder can be written by others; every bundle file is hashed",
                    p.display()
                );
            }
            private
        });
        // An unreadable or damaged record is only a cache: start afresh.
        let record = record_path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| r.version == 1)
            .unwrap_or(Record { version: 1, entries: Vec::new() });
        VerifiedFiles { record_path, record, changed: false, now, hashed_bytes: 0 }
    }

    /// Checks that `path`'s bytes hash to `expected` (lower-case hex sha256): from the record
    /// when the file is unchanged since a check that found `expected`, else by hashing it.
    pub(crate) fn check(&mut self, path: &Path, expected: &str) -> Result<()> {
        // The record is JSON: paths that are not UTF-8 are hashed every time.
        let key =
            self.record_path.as_ref().and_then(|_| std::fs::canonicalize(path).ok()).filter(|k| k.to_str().is_some());
        let stamp = key.as_ref().and_then(|_| Stamp::of(path));
        if let (Some(key), Some(stamp)) = (&key, &stamp) {
            let known = self.record.entries.iter().any(|e| &e.path == key && &e.stamp == stamp && e.sha256 == expected);
            if known && stamp.settled(self.now) {
                return Ok(());
            }
        }
        let actual = sha256_file(path)?;
        self.hashed_bytes += std::fs::metadata(path).map_or(0, |m| m.len());
        if actual != expected {
            return Err(Error::HashMismatch { path: path.to_path_buf(), expected: expected.to_owned(), actual });
        }
        // Recorded only when the file did not change while it was read, long enough ago.
        if let (Some(key), Some(stamp)) = (key, stamp) {
            if stamp.settled(self.now) && Stamp::of(path).as_ref() == Some(&stamp) {
                self.record.entries.retain(|e| e.path != key);
                let checked = self.now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                self.record.entries.push(Entry { path: key, stamp, sha256: actual, checked });
                self.changed = true;
            }
        }
        Ok(())
    }

    /// Writes the record back when it gained entries. Failing to write is not an error: the
    /// next open hashes again.
    pub(crate) fn save(mut self) {
        let Some(path) = self.record_path.take().filter(|_| self.changed) else {
            return;
        };
        let entries = &mut self.record.entries;
        entries.sort_by_key(|e| std::cmp::Reverse(e.checked));
        entries.truncate(MAX_ENTRIES);
        if let Err(e) = write_record(&path, &self.record) {
            tracing::debug!("not recording checked files in {}: {e}", path.display());
        }
    }
}

/// Writes through a file of its own and a rename, so a reader never sees half a record and two
/// processes saving at once leave one of their records whole.
fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    create_private_dir(folder)?;
    // Unique per save: threads of one process may save at once.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = folder.join(format!(".{RECORD_FILE}.{}.{n}", std::process::id()));
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let written = (|| {
        use std::io::Write;
        // A new file of its own, never one planted there (or a symlink to one).
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&temp)?.write_all(&bytes)?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(unix)]
fn create_private_dir(folder: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(folder)?;
    if private_to_this_user(folder) {
        Ok(())
    } else {
        Err(std::io::Error::other("the folder can be written by others"))
    }
}

#[cfg(not(unix))]
fn create_private_dir(folder: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(folder)
}

/// Whether `path` (not followed if a symlink) belongs to this process's effective user and no
/// one else may write it.
#[cfg(unix)]
fn private_to_this_user(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(uid) = effective_uid() else {
        return false;
    };
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| !m.file_type().is_symlink() && m.uid() == uid && m.mode() & 0o022 == 0)
}

#[cfg(not(unix))]
fn private_to_this_user(_path: &Path) -> bool {
    false
}

/// The effective user id, from `/proc/self/status` (`Uid:` real, effective, saved, fs); none
/// where that file is missing, and then nothing is recorded.
#[cfg(unix)]
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// `EDGELM_CACHE_DIR`, else `$XDG_CACHE_HOME/edgelm`, else `$HOME/.cache/edgelm` (absolute
/// paths only, as the XDG rules ask).
fn cache_folder() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from).filter(|p| p.is_absolute());
    var("EDGELM_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("edgelm")))
        .or_else(|| var("HOME").map(|p| p.join(".cache").join("edgelm")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        crate::bundle::hex(&Sha256::digest(bytes))
    }

    #[test]
    fn an_unchanged_file_is_trusted_and_a_changed_one_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("cache").join(RECORD_FILE);
        let file = dir.path().join("model.onnx");
        std::fs::write(&file, b"weights one").unwrap();
        let good = sha(b"weights one");
        // As if opened a minute after the file was written.
        let later = SystemTime::now() + Duration::from_secs(60);

        let mut v = VerifiedFiles::at(Some(record.clone()), later);
        v.check(&file, &good).unwrap();
        assert_eq!(v.hashed_bytes, 11);
        v.save();
        let mut v = VerifiedFiles::at(Some(record.clone()), later);
        v.check(&file, &good).unwrap();
        assert_eq!(v.hashed_bytes, 0, "unchanged since its check: not read again");
        // A manifest expecting other bytes is not answered from the record.
        let err = v.check(&file, &sha(b"weights two")).unwrap_err();
        assert!(matches!(err, Error::HashMismatch { .. }), "{err}");

        // Same size, new bytes: the change time moved, so the file is read and found out.
        std::fs::write(&file, b"weights two").unwrap();
        let mut v = VerifiedFiles::at(Some(record.clone()), later + Duration::from_secs(60));
        let err = v.check(&file, &good).unwrap_err();
        assert!(matches!(err, Error::HashMismatch { .. }), "{err}");
        assert_eq!(v.hashed_bytes, 11);
    }

    #[cfg(unix)]
    #[test]
    fn a_record_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("cache");
        let file = dir.path().join("model.onnx");
        std::fs::write(&file, b"weights").unwrap();
        let good = sha(b"weights");
        let later = SystemTime::now() + Duration::from_secs(60);
        let mut v = VerifiedFiles::at(Some(folder.join(RECORD_FILE)), later);
        v.check(&file, &good).unwrap();
        v.save();
        assert!(folder.join(RECORD_FILE).exists());
        // Group-writable: another user could plant entries.
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o770)).unwrap();
        let mut v = VerifiedFiles::at(Some(folder.join(RECORD_FILE)), later);
        v.check(&file, &good).unwrap();
        assert_eq!(v.hashed_bytes, 7, "the record is not trusted");
    }

    #[test]
    fn files_just_written_and_full_checks_are_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join(RECORD_FILE);
        let file = dir.path().join("model.onnx");
        std::fs::write(&file, b"fresh").unwrap();
        let good = sha(b"fresh");
        // Checked the moment it was written: a write in the same clock tick could hide.
        let mut v = VerifiedFiles::at(Some(record.clone()), SystemTime::now());
        v.check(&file, &good).unwrap();
        v.save();
        assert!(!record.exists(), "nothing settled to record");
        let mut v = VerifiedFiles::full();
        v.check(&file, &good).unwrap();
        v.check(&file, &good).unwrap();
        assert_eq!(v.hashed_bytes, 10, "a full check reads every time");
        // A damaged record is ignored, not an error.
        std::fs::write(&record, b"{not json").unwrap();
        let mut v = VerifiedFiles::at(Some(record), SystemTime::now() + Duration::from_secs(60));
        v.check(&file, &good).unwrap();
        assert_eq!(v.hashed_bytes, 5);
    }
}
