//! The signing key ring: Ed25519 keys as PKCS#8 PEM files in `keys_dir`.
//!
//! The file stem is the key id (`kid`). Ids start with a zero-padded creation
//! time in milliseconds, so the lexicographically greatest id is the newest
//! key, and the newest key signs. Every key in the directory verifies, so a
//! rotation is: generate a new key, let old tokens expire, delete the old file.
//! Operators may also drop in keys made by `openssl genpkey -algorithm ed25519`
//! under any name that sorts correctly.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{DecodingKey, EncodingKey};
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot write key file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a PKCS#8 PEM Ed25519 private key")]
    BadKey { path: PathBuf },
    #[error("no signing key in {0}")]
    Empty(PathBuf),
}

/// One public key, as listed by `gateway keys list` and the JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: String,
    /// base64url of the 32-byte Ed25519 public key.
    pub x: String,
}

/// All keys of one directory: the newest signs, all verify.
pub struct KeyRing {
    signer_kid: String,
    signer: EncodingKey,
    verifiers: HashMap<String, DecodingKey>,
    public: Vec<PublicKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("signer_kid", &self.signer_kid).field("public", &self.public).finish()
    }
}

impl KeyRing {
    /// Loads the ring, generating a first key when the directory has none.
    /// Returns the new kid when one was generated.
    pub fn load_or_generate(dir: &Path) -> Result<(KeyRing, Option<String>), KeyError> {
        match Self::load(dir) {
            Err(KeyError::Empty(_)) => {
                let kid = generate(dir)?;
                Ok((Self::load(dir)?, Some(kid)))
            }
            other => other.map(|ring| (ring, None)),
        }
    }

    /// Loads every `*.pem` in `dir`; fails when there is none or one is bad.
    pub fn load(dir: &Path) -> Result<KeyRing, KeyError> {
        let mut keys = Vec::new();
        for (kid, path) in pem_files(dir)? {
            let pem = std::fs::read_to_string(&path).map_err(|source| KeyError::Dir { path: path.clone(), source })?;
            let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::BadKey { path: path.clone() })?;
            keys.push((kid, key));
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let Some((signer_kid, signer_key)) = keys.last() else {
            return Err(KeyError::Empty(dir.to_owned()));
        };
        let der = signer_key.to_pkcs8_der().map_err(|_| KeyError::BadKey { path: dir.join(signer_kid) })?;
        let signer = EncodingKey::from_ed_der(der.as_bytes());
        let mut verifiers = HashMap::new();
        let mut public = Vec::new();
        for (kid, key) in &keys {
            let bytes = key.verifying_key().to_bytes();
            verifiers.insert(kid.clone(), DecodingKey::from_ed_der(&bytes));
            public.push(PublicKey { kid: kid.clone(), x: URL_SAFE_NO_PAD.encode(bytes) });
        }
        Ok(KeyRing { signer_kid: signer_kid.clone(), signer, verifiers, public })
    }

    pub fn signer(&self) -> (&str, &EncodingKey) {
        (&self.signer_kid, &self.signer)
    }

    /// The verifying key for exactly this kid: no fallback to "try every key".
    pub fn verifier(&self, kid: &str) -> Option<&DecodingKey> {
        self.verifiers.get(kid)
    }

    /// Oldest first.
    pub fn public_keys(&self) -> &[PublicKey] {
        &self.public
    }
}

/// Generates a new key in `dir` (created if needed, mode 0600 file) and
/// returns its kid; being the newest, it becomes the signer on next load.
pub fn generate(dir: &Path) -> Result<String, KeyError> {
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Write { path: dir.to_owned(), source })?;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let millis =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
    let fingerprint = Sha256::digest(key.verifying_key().as_bytes());
    let kid = format!("{millis:013}-{}", hex8(&fingerprint));
    let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|_| KeyError::BadKey { path: dir.join(&kid) })?;
    let path = dir.join(format!("{kid}.pem"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| KeyError::Write { path: path.clone(), source })?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Write { path: path.clone(), source })?;
    Ok(kid)
}

fn hex8(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// `(kid, path)` of every `*.pem` file; a missing directory has none.
fn pem_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, KeyError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(KeyError::Dir { path: dir.to_owned(), source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| KeyError::Dir { path: dir.to_owned(), source })?.path();
        if path.extension().is_some_and(|e| e == "pem") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push((stem.to_owned(), path.clone()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_load_generates_and_newest_key_signs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        let (ring, generated) = KeyRing::load_or_generate(&keys).expect("load");
        let first = generated.expect("a key was generated");
        assert_eq!(ring.signer().0, first);
        let (_, again) = KeyRing::load_or_generate(&keys).expect("reload");
        assert_eq!(again, None, "an existing key is reused");

        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = generate(&keys).expect("generate");
        let ring = KeyRing::load(&keys).expect("load");
        assert_eq!(ring.signer().0, second);
        assert!(ring.verifier(&first).is_some(), "old key still verifies");
        assert_eq!(ring.public_keys().len(), 2);
        let mode = std::fs::metadata(keys.join(format!("{second}.pem"))).expect("meta");
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    }

    #[test]
    fn a_bad_pem_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("junk.pem"), "not a key").expect("write");
        let err = KeyRing::load(dir.path()).expect_err("bad key");
        assert!(err.to_string().contains("junk.pem"), "{err}");
    }
}
