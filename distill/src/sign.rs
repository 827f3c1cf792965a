//! Signing keys and bundle signatures: ed25519, as `edgelm_runtime::signature` checks them.
//!
//! A key pair is two PEM files: the private key in PKCS#8 (`-----BEGIN PRIVATE KEY-----`,
//! created readable by its owner alone) and the public key beside it with `.pub` appended
//! (`-----BEGIN PUBLIC KEY-----`), the file a board is given. OpenSSL reads both. The private
//! key's bytes go nowhere else: not into bundles, not into messages.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey};
use edgelm_runtime::signature::{key_id, signed_message, write_signature};

use crate::error::{Error, IoContext, Result};

/// The public key file of the private key at `key`: its path with `.pub` appended.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Makes a new key pair at `key` and `key.pub`; returns the key id. Refuses to overwrite
/// either file (a lost private key cannot be made again).
pub fn keygen(key: &Path) -> Result<String> {
    let public = public_key_path(key);
    for p in [key, public.as_path()] {
        if p.exists() {
            return Err(Error::Format {
                path: p.to_path_buf(),
                what: "already exists; choose another name or move it away first".into(),
            });
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::Format { path: key.to_path_buf(), what: format!("no randomness from the OS: {e}") })?;
    let signing = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let encode = |what: String| Error::Format { path: key.to_path_buf(), what };
    let private_pem = signing.to_pkcs8_pem(Default::default()).map_err(|e| encode(e.to_string()))?;
    let public_pem =
        signing.verifying_key().to_public_key_pem(Default::default()).map_err(|e| encode(e.to_string()))?;
    if let Some(dir) = key.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    // Created owner-only and never replacing a file: `create_new` fails if one appeared since
    // the check above.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(key).at(key)?;
    f.write_all(private_pem.as_bytes()).at(key)?;
    f.sync_all().at(key)?;
    std::fs::write(&public, public_pem.as_bytes()).at(&public)?;
    Ok(key_id(&signing.verifying_key()))
}

/// Signs the bundle in `dir` with the private key at `key` (writing `dir/edgelm.sig`) after
/// checking every file against the manifest; returns the key id.
pub fn sign_bundle(key: &Path, dir: &Path) -> Result<String> {
    let pem = std::fs::read_to_string(key).at(key)?;
    // The PEM parser's message never quotes the key.
    let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|e| Error::Format {
        path: key.to_path_buf(),
        what: format!("not an ed25519 private key in PEM (`-----BEGIN PRIVATE KEY-----`): {e}"),
    })?;
    // Sign only what verifies: a signature over a damaged bundle would vouch for the damage,
    // and one over a folder with unhashed files would not cover them.
    let m = edgelm_runtime::bundle::verify_files(dir)?;
    edgelm_runtime::bundle::check_coverage(dir, &m)?;
    let manifest_path = dir.join(edgelm_runtime::bundle::MANIFEST);
    let manifest = std::fs::read(&manifest_path).at(&manifest_path)?;
    let signature = signing.sign(&signed_message(&manifest));
    let id = key_id(&signing.verifying_key());
    write_signature(dir, &id, &signature.to_bytes())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgelm_runtime::signature::TrustedKeys;

    #[test]
    fn keygen_writes_a_pair_that_signs_and_verifies_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("keys/release");
        let id = keygen(&key).unwrap();
        assert!(std::fs::read_to_string(&key).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let before = std::fs::read(&key).unwrap();
        assert!(keygen(&key).unwrap_err().to_string().contains("already exists"));
        assert_eq!(std::fs::read(&key).unwrap(), before);

        // A bundle with one file.
        let b = dir.path().join("bundle");
        let mut w = edgelm_runtime::bundle::BundleWriter::create(&b, edgelm_runtime::bundle::Kind::Encoder).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        use edgelm_runtime::bundle::{BundleInfo, GenerationDefaults, Precision};
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
        assert_eq!(sign_bundle(&key, &b).unwrap(), id);
        let trust = TrustedKeys::none().with_key_files([public_key_path(&key)]).unwrap().require(true);
        assert_eq!(trust.check(&b).unwrap().key_id, Some(id));
        // A damaged bundle is not signed.
        std::fs::write(b.join("model.onnx"), b"grapH").unwrap();
        assert!(sign_bundle(&key, &b).is_err());
    }
}
