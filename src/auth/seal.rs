//! Sealing of the secrets the gateway keeps in the database for its own
//! use: the users' TOTP secrets. A dump or backup of the database alone no
//! longer yields anyone's second factor.
//!
//! AES-256-GCM (ring, already in the tree through rustls) with a 32-byte key
//! in `<keys_dir>/secrets.key`, made on first start beside the signing keys
//! (mode 0600; replicas share it as they share the keys directory). Every
//! sealed value has a fresh random 96-bit nonce and is bound to its owner
//! (the user's id as associated data), so a value copied to another user's
//! row does not open. Stored as `v1:` and the base64 of nonce, ciphertext
//! and tag. A value without the prefix is a secret stored before sealing
//! existed: it is read as it is, and sealed at the next start
//! ([`crate::app`]).
//!
//! The stored text, not the secret, is what queries compare (a code is
//! spent only against the secret it was checked with): callers keep it and
//! open it only to compute codes.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::db::Store;

/// The key's file in the keys directory.
pub const KEY_FILE: &str = "secrets.key";

const PREFIX: &str = "v1:";

/// The key that seals and opens stored secrets.
pub struct SealingKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey").finish_non_exhaustive()
    }
}

/// A stored value that does not open: sealed with another key (a replica
/// with a keys directory of its own, a lost key file) or altered.
#[derive(Debug, thiserror::Error)]
#[error("a sealed secret does not open with {KEY_FILE}: sealed with another key, or altered")]
pub struct SealError;

impl SealingKey {
    /// Reads `<dir>/secrets.key`, or makes it (32 random bytes, base64,
    /// mode 0600) when there is none; true when it was made. Two processes
    /// starting at once on one directory end up with the same key: the
    /// file appears whole, by a link that fails if it exists.
    pub fn load_or_generate(dir: &Path) -> anyhow::Result<(SealingKey, bool)> {
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok((Self::parse(&text, &path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for {KEY_FILE}: {e}"))?;
        let temp = dir.join(format!(".{KEY_FILE}.{}", uuid::Uuid::new_v4().simple()));
        let written = write_new(&temp, &STANDARD.encode(bytes));
        let linked = written.and_then(|()| std::fs::hard_link(&temp, &path).map_err(anyhow::Error::from));
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok((Self::from_bytes(&bytes)?, true)),
            // Made by another process meanwhile: that one is the key.
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists) =>
            {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                Ok((Self::parse(&text, &path)?, false))
            }
            Err(e) => Err(e.context(format!("writing {}", path.display()))),
        }
    }

    fn parse(text: &str, path: &Path) -> anyhow::Result<SealingKey> {
        let bytes = STANDARD
            .decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .with_context(|| format!("{} must hold the base64 of 32 bytes", path.display()))?;
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> anyhow::Result<SealingKey> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| anyhow::anyhow!("not an AES-256 key"))?;
        Ok(SealingKey { key: LessSafeKey::new(key) })
    }

    /// `secret` sealed for `owner`.
    pub fn seal(&self, secret: &str, owner: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| SealError)?;
        let mut sealed = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(owner), &mut sealed)
            .map_err(|_| SealError)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{}", STANDARD.encode(out)))
    }

    /// The secret in `stored`, sealed for `owner`; a value stored before
    /// sealing existed (no prefix) is the secret itself.
    pub fn open(&self, stored: &str, owner: &[u8]) -> Result<String, SealError> {
        let Some(encoded) = stored.strip_prefix(PREFIX) else { return Ok(stored.to_owned()) };
        let mut bytes = STANDARD.decode(encoded).map_err(|_| SealError)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError);
        }
        let mut sealed = bytes.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).map_err(|_| SealError)?;
        let plain = self.key.open_in_place(nonce, Aad::from(owner), &mut sealed).map_err(|_| SealError)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError)
    }
}

/// Whether `stored` is sealed (else it is a secret from before sealing).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// Rewrites every stored TOTP secret (and secret being set up) sealed
/// with `key` (`seal`), or as it is (`!seal`: before a rollback to a
/// release from before sealing); returns how many were rewritten. A value
/// changed meanwhile is left as it now is; sealed ones that do not open
/// are left too, and named (user and column) in the error that follows the
/// rest.
pub async fn rewrite_stored(store: &Store, key: &SealingKey, seal: bool) -> anyhow::Result<usize> {
    let mut rewritten = 0;
    let mut unopened = Vec::new();
    for (tenant_id, user_id, secret, pending) in store.stored_totp(!seal, i64::MAX).await? {
        for (is_pending, stored) in [(false, secret), (true, pending)] {
            let Some(stored) = stored.filter(|s| is_sealed(s) != seal) else { continue };
            let new = match seal {
                true => key.seal(&stored, user_id.as_bytes())?,
                false => match key.open(&stored, user_id.as_bytes()) {
                    Ok(plain) => plain,
                    Err(_) => {
                        let column = if is_pending { "totp_pending" } else { "totp_secret" };
                        unopened.push(format!("user {user_id} ({column})"));
                        continue;
                    }
                },
            };
            if store.reseal_totp(tenant_id, user_id, is_pending, &stored, &new).await? {
                rewritten += 1;
            }
        }
    }
    if !unopened.is_empty() {
        anyhow::bail!(
            "{rewritten} rewritten; {} sealed value(s) do not open with {KEY_FILE}: {}",
            unopened.len(),
            unopened.join(", ")
        );
    }
    Ok(rewritten)
}

/// Whether `key` opens a stored sealed secret (one is tried): a replica
/// with a key file of its own, or a lost one, is told at start rather than
/// at its users' logins. `Ok` when none is stored.
pub async fn check_opens(store: &Store, key: &SealingKey) -> anyhow::Result<()> {
    for (_, user_id, secret, pending) in store.stored_totp(true, 1).await? {
        let stored = secret.filter(|s| is_sealed(s)).or(pending).unwrap_or_default();
        key.open(&stored, user_id.as_bytes()).with_context(|| format!("the TOTP secret of user {user_id}"))?;
    }
    Ok(())
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::{is_sealed, SealingKey, KEY_FILE};

    #[test]
    fn sealed_secrets_open_for_their_owner_only() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (key, made) = SealingKey::load_or_generate(dir.path()).expect("a key");
        assert!(made);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).expect("the key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = key.seal("JBSWY3DPEHPK3PXP", b"alice").expect("sealed");
        assert!(is_sealed(&sealed) && !sealed.contains("JBSWY3DP"), "{sealed}");
        assert_ne!(sealed, key.seal("JBSWY3DPEHPK3PXP", b"alice").expect("sealed"), "a fresh nonce each time");
        assert_eq!(key.open(&sealed, b"alice").expect("opens"), "JBSWY3DPEHPK3PXP");
        assert!(key.open(&sealed, b"mallory").is_err(), "bound to its owner");
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(key.open(&String::from_utf8(altered).expect("ASCII"), b"alice").is_err(), "altered");
        // A secret from before sealing is read as it is.
        assert_eq!(key.open("JBSWY3DPEHPK3PXP", b"alice").expect("plain"), "JBSWY3DPEHPK3PXP");

        // The next start reads the same key; another key opens nothing.
        let (again, made) = SealingKey::load_or_generate(dir.path()).expect("the key again");
        assert!(!made);
        assert_eq!(again.open(&sealed, b"alice").expect("opens"), "JBSWY3DPEHPK3PXP");
        let other = tempfile::tempdir().expect("a temp dir");
        let (stranger, _) = SealingKey::load_or_generate(other.path()).expect("another key");
        assert!(stranger.open(&sealed, b"alice").is_err());
    }

    #[test]
    fn a_bad_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join(KEY_FILE), "too short").expect("write");
        let err = SealingKey::load_or_generate(dir.path()).expect_err("refused");
        assert!(err.to_string().contains(KEY_FILE), "{err}");
    }
}
