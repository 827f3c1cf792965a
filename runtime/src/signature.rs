//! Bundle signatures: ed25519 over the manifest, checked against the public keys a board
//! trusts.
//!
//! edgelm.json already records the size and sha256 of every file the runtime reads, so one
//! signature over it covers the whole bundle: the signature proves the manifest, the manifest
//! proves the files (checked when the bundle opens). The signature lives in `edgelm.sig`
//! beside the manifest:
//!
//! ```json
//! {"format": 1, "algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<128 hex>"}
//! ```
//!
//! The signed message is `b"edgelm bundle signature v1\0"` followed by the 32-byte sha256 of
//! edgelm.json's bytes (the prefix keeps a bundle signature from being mistaken for anything
//! else the same key signs). `key_id` is the first 8 bytes of the sha256 of the 32-byte public
//! key, in hex: it names the key in messages and picks it among the trusted ones. Public keys
//! are PEM `PUBLIC KEY` files (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes them).

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::DecodePublicKey;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{hex, MANIFEST};
use crate::error::{Error, IoContext, Result};

/// The signature file in a bundle folder.
pub const SIGNATURE_FILE: &str = "edgelm.sig";
/// What `format` in edgelm.sig says for this layout.
pub const SIGNATURE_FORMAT: u32 = 1;
const DOMAIN: &[u8] = b"edgelm bundle signature v1\0";

/// The contents of edgelm.sig.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Layout version of this file ([`SIGNATURE_FORMAT`]).
    pub format: u32,
    /// Always `ed25519`.
    pub algorithm: String,
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// The 64-byte signature, in hex.
    pub signature: String,
}

/// The message a bundle signature signs, for a manifest's bytes.
pub fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&Sha256::digest(manifest));
    m
}

/// A short, stable name of a public key: the first 8 bytes of its sha256, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// Reads a PEM public key (`-----BEGIN PUBLIC KEY-----`, ed25519).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let text = std::fs::read_to_string(path).at(path)?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| Error::Signature {
        path: path.to_path_buf(),
        what: format!("not an ed25519 public key in PEM (`-----BEGIN PUBLIC KEY-----`): {e}"),
    })
}

/// The public keys bundles may be signed with, and whether a signature is required.
///
/// With no keys and `require` off (the default) nothing is checked. With keys, a bundle that
/// carries a signature must verify against one of them, required or not (a signature that
/// does not verify means the bundle was altered). With `require` on, an unsigned bundle is
/// refused too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
    require: bool,
}

impl TrustedKeys {
    /// No keys, nothing required.
    pub fn none() -> Self {
        TrustedKeys::default()
    }

    /// Refuse unsigned bundles (`true`) or accept them (`false`).
    pub fn require(mut self, require: bool) -> Self {
        self.require = require;
        self
    }

    /// Whether unsigned bundles are refused.
    pub fn is_required(&self) -> bool {
        self.require
    }

    /// Adds a key.
    pub fn with_key(mut self, key: VerifyingKey) -> Self {
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
        self
    }

    /// Adds the keys of `paths`: each a PEM public key file, or a folder whose `*.pub` files
    /// are read.
    pub fn with_key_files<P: AsRef<Path>>(mut self, paths: impl IntoIterator<Item = P>) -> Result<Self> {
        for p in paths {
            let p = p.as_ref();
            if p.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                    .at(p)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "pub"))
                    .collect();
                files.sort();
                for f in files {
                    self = self.with_key(read_public_key(&f)?);
                }
            } else {
                self = self.with_key(read_public_key(p)?);
            }
        }
        Ok(self)
    }

    /// The key ids of the trusted keys.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(key_id).collect()
    }

    /// Checks the bundle in `dir` against this policy, or [`Error::Signature`]. A verified
    /// signature also means the folder holds nothing the manifest does not hash (see
    /// [`crate::bundle::check_coverage`]); the files' hashes are checked when the bundle opens,
    /// against the bytes returned here.
    pub fn check(&self, dir: &Path) -> Result<Checked> {
        if self.keys.is_empty() && !self.require {
            return Ok(Checked::default());
        }
        let refuse = |what: String| Error::Signature { path: dir.to_path_buf(), what };
        if self.require && self.keys.is_empty() {
            return Err(refuse("signatures are required but no public key is trusted; configure one".into()));
        }
        let sig_path = dir.join(SIGNATURE_FILE);
        let manifest_path = dir.join(MANIFEST);
        if !sig_path.exists() {
            if !self.require {
                return Ok(Checked::default());
            }
            let what = if manifest_path.exists() {
                format!("unsigned (no {SIGNATURE_FILE}); sign it with `edgelm-distill sign --key KEY BUNDLE`")
            } else {
                format!("unsigned: no {MANIFEST} to sign; export it with edgelm-distill and sign it")
            };
            return Err(refuse(what));
        }
        let text = std::fs::read_to_string(&sig_path).at(&sig_path)?;
        let file: SignatureFile = serde_json::from_str(&text)
            .map_err(|e| refuse(format!("{SIGNATURE_FILE} is not a signature file: {e}")))?;
        if file.format != SIGNATURE_FORMAT || file.algorithm != "ed25519" {
            return Err(refuse(format!(
                "{SIGNATURE_FILE} is format {} / {}; this edgelm reads format {SIGNATURE_FORMAT} / ed25519",
                file.format, file.algorithm
            )));
        }
        let Some(key) = self.keys.iter().find(|k| key_id(k) == file.key_id) else {
            return Err(refuse(format!(
                "signed by key {}, which is not trusted here (trusted: {})",
                file.key_id,
                self.key_ids().join(", ")
            )));
        };
        let bytes = unhex(&file.signature)
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or_else(|| refuse(format!("{SIGNATURE_FILE}: the signature is not 128 hex digits")))?;
        let manifest = std::fs::read(&manifest_path).at(&manifest_path)?;
        key.verify_strict(&signed_message(&manifest), &Signature::from_bytes(&bytes)).map_err(|_| {
            refuse(format!("the signature of key {} does not match {MANIFEST} (altered after signing)", file.key_id))
        })?;
        let parsed = crate::bundle::parse_manifest(dir, &manifest)?;
        crate::bundle::check_coverage(dir, &parsed).map_err(|e| match e {
            Error::Bundle { what, .. } => refuse(what),
            other => other,
        })?;
        Ok(Checked { key_id: Some(file.key_id), manifest: Some(manifest) })
    }
}

/// What a signature check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// The trusted key that signed the bundle, when a signature was verified.
    pub key_id: Option<String>,
    /// The edgelm.json bytes the signature covers, when one was verified: the bundle is opened
    /// from these, not from a second read of the file.
    pub manifest: Option<Vec<u8>>,
}

/// Writes `signature` (made by the key with `id` over [`signed_message`]) into the bundle in
/// `dir` as edgelm.sig, replacing any earlier one atomically.
pub fn write_signature(dir: &Path, id: &str, signature: &[u8; 64]) -> Result<()> {
    let file = SignatureFile {
        format: SIGNATURE_FORMAT,
        algorithm: "ed25519".into(),
        key_id: id.to_owned(),
        signature: hex(signature),
    };
    let path = dir.join(SIGNATURE_FILE);
    let tmp = dir.join(format!("{SIGNATURE_FILE}.tmp"));
    let text = serde_json::to_string_pretty(&file).expect("a signature file serialises");
    std::fs::write(&tmp, text + "\n").at(&tmp)?;
    std::fs::rename(&tmp, &path).at(&path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn signed_bundle(k: &SigningKey) -> tempfile::TempDir {
        use crate::bundle::{BundleInfo, BundleWriter, GenerationDefaults, Kind, Precision};
        let dir = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(dir.path(), Kind::Encoder).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        w.finish(BundleInfo {
            generation: GenerationDefaults::none(),
            chat_template: None,
            precision: Precision::Fp32,
            weights: None,
            checkpoint: "ck".into(),
            checkpoint_sha256: "00".into(),
            encoder: None,
            report: serde_json::json!({}),
        })
        .unwrap();
        let manifest = std::fs::read(dir.path().join(MANIFEST)).unwrap();
        let sig = k.sign(&signed_message(&manifest));
        write_signature(dir.path(), &key_id(&k.verifying_key()), &sig.to_bytes()).unwrap();
        dir
    }

    #[test]
    fn a_good_signature_passes_and_unsigned_wrong_key_or_altered_are_refused() {
        let k = key(7);
        let trusted = TrustedKeys::none().with_key(k.verifying_key()).require(true);
        let dir = signed_bundle(&k);
        let checked = trusted.check(dir.path()).unwrap();
        assert_eq!(checked.key_id, Some(key_id(&k.verifying_key())));
        assert_eq!(checked.manifest.unwrap(), std::fs::read(dir.path().join(MANIFEST)).unwrap());

        // Another key signed it.
        let other = signed_bundle(&key(8));
        let e = trusted.check(other.path()).unwrap_err().to_string();
        assert!(e.contains("not trusted"), "{e}");

        // A file the manifest does not hash, or a symlink, is refused beside a good signature.
        std::fs::write(dir.path().join("model.onnx.data"), b"weights").unwrap();
        let e = trusted.check(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.onnx.data") && e.contains("not hashed"), "{e}");
        std::fs::remove_file(dir.path().join("model.onnx.data")).unwrap();
        std::os::unix::fs::symlink("model.onnx", dir.path().join("link.onnx")).unwrap();
        assert!(trusted.check(dir.path()).unwrap_err().to_string().contains("symlink"));
        std::fs::remove_file(dir.path().join("link.onnx")).unwrap();
        assert!(trusted.check(dir.path()).is_ok());

        // One byte of the manifest changed after signing, whether signatures are required or not.
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap().replacen(": ", ":  ", 1);
        std::fs::write(dir.path().join(MANIFEST), text).unwrap();
        let e = trusted.check(dir.path()).unwrap_err().to_string();
        assert!(e.contains("altered"), "{e}");
        let e = trusted.clone().require(false).check(dir.path()).unwrap_err().to_string();
        assert!(e.contains("altered"), "{e}");

        // No signature: refused when required, accepted otherwise.
        std::fs::remove_file(dir.path().join(SIGNATURE_FILE)).unwrap();
        assert!(trusted.check(dir.path()).unwrap_err().to_string().contains("unsigned"));
        assert_eq!(trusted.clone().require(false).check(dir.path()).unwrap().key_id, None);
        // Nothing configured: nothing checked.
        assert_eq!(TrustedKeys::none().check(other.path()).unwrap().key_id, None);
    }

    #[test]
    fn the_message_is_the_domain_and_the_manifest_hash() {
        let m = signed_message(b"abc");
        assert_eq!(&m[..DOMAIN.len()], DOMAIN);
        // sha256("abc"), from FIPS 180-2's example.
        assert_eq!(hex(&m[DOMAIN.len()..]), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(unhex("0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn pem_public_keys_are_read_from_files_and_folders() {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let dir = tempfile::tempdir().unwrap();
        for s in [1u8, 2] {
            let pem = key(s).verifying_key().to_public_key_pem(Default::default()).unwrap();
            std::fs::write(dir.path().join(format!("k{s}.pub")), pem).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not a key").unwrap();
        let t = TrustedKeys::none().with_key_files([dir.path()]).unwrap();
        assert_eq!(t.key_ids(), vec![key_id(&key(1).verifying_key()), key_id(&key(2).verifying_key())]);
        let e = TrustedKeys::none().with_key_files([dir.path().join("notes.txt")]).unwrap_err();
        assert!(e.to_string().contains("PUBLIC KEY"), "{e}");
    }
}
