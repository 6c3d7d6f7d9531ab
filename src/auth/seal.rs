//! Sealing of the secrets the gateway keeps in the database for its own
//! use: the users' TOTP secrets, and the deliveries waiting for the mailer
//! (which may hold a link's token; see [`crate::auth::outbox`], which seals
//! them for their row, `outbox\0` and its id, and which no reseal
//! rewrites: they expire). A dump or backup of the database alone no
//! longer yields anyone's second factor, nor a working link.
//!
//! AES-256-GCM (ring, already in the tree through rustls) with 32-byte keys
//! in the keys directory (mode 0600; replicas share them as they share the
//! keys directory): `secrets.key`, made on first start beside the signing
//! keys, and `secrets-<UTC time>.key`, one per `gateway keys
//! rotate-secrets`. The newest seals; every one opens what it sealed. Every
//! sealed value has a fresh random 96-bit nonce and is bound to its owner
//! (the user's id as associated data), so a value copied to another user's
//! row does not open. A value names its key, so nothing is opened on a
//! guess and the database tells which values a key still holds: `v1:` and
//! the base64 of nonce, ciphertext and tag for `secrets.key` (the format
//! from before rotation, so a release from before it reads them), `v2:<UTC
//! time>:` and the same for a rotated key. A value without either prefix is
//! a secret stored before sealing existed: it is read as it is, and sealed
//! at the next start ([`crate::app`]).
//!
//! Rotation without a stop: `gateway keys rotate-secrets` writes the new
//! key and reseals every stored value with it. A running gateway that meets
//! a value naming a key it has not loaded reads the directory again (at
//! most once a second) and seals with the newest from then on, as it does
//! on SIGHUP; a start reseals what an older key still holds. An old key
//! file is removed once `gateway keys list` shows it holds nothing (no
//! TOTP secret, no waiting delivery).
//!
//! The stored text, not the secret, is what queries compare (a code is
//! spent only against the secret it was checked with): callers keep it and
//! open it only to compute codes.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::db::Store;

/// The first key's file in the keys directory.
pub const KEY_FILE: &str = "secrets.key";

/// What a value sealed with [`KEY_FILE`] starts with.
const V1: &str = "v1:";

/// What a value sealed with a rotated key starts with, before the key's id.
const V2: &str = "v2:";

/// Rotated keys' files: `secrets-<id>.key`, the id a UTC time
/// (`20261208T101500Z`), so that the newest sorts last.
const ROTATED: (&str, &str) = ("secrets-", ".key");

/// How often, at most, meeting a value of an unknown key reads the
/// directory again.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Readings {
    any: Option<Instant>,
    missed: Option<Instant>,
}

/// One key of the ring: its id (`""` for [`KEY_FILE`]) and the key.
struct Key {
    id: String,
    key: LessSafeKey,
}

impl Key {
    /// What the values this key seals start with.
    fn prefix(&self) -> String {
        if self.id.is_empty() {
            V1.to_owned()
        } else {
            format!("{V2}{}:", self.id)
        }
    }

    /// The file the key is read from.
    fn file(&self) -> String {
        if self.id.is_empty() {
            KEY_FILE.to_owned()
        } else {
            format!("{}{}{}", ROTATED.0, self.id, ROTATED.1)
        }
    }
}

/// The keys that seal and open stored secrets: the newest seals, each
/// opens the values that name it.
pub struct SealingKeys {
    dir: PathBuf,
    /// Newest first; never empty.
    ring: ArcSwap<Vec<Key>>,
    /// When the directory was last read again, and when a reading last
    /// failed to find a key a value named (neither at load: the first
    /// unknown key is looked for at once); held through a reading.
    read_at: Mutex<Readings>,
}

impl std::fmt::Debug for SealingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKeys").field("files", &self.files()).finish_non_exhaustive()
    }
}

/// A stored value that does not open: sealed with a key this process does
/// not have (a replica with a keys directory of its own, a removed or lost
/// key file) or altered.
#[derive(Debug, thiserror::Error)]
#[error("a sealed secret does not open with the secrets keys of auth.keys_dir: sealed with another key, or altered")]
pub struct SealError;

impl SealingKeys {
    /// Reads the keys of `dir`, or makes [`KEY_FILE`] (32 random bytes,
    /// base64, mode 0600) when there is none; true when it was made. Two
    /// processes starting at once on one directory end up with the same
    /// key: the file appears whole, by a link that fails if it exists.
    pub fn load_or_generate(dir: &Path) -> anyhow::Result<(SealingKeys, bool)> {
        let ring = read_ring(dir)?;
        if !ring.is_empty() {
            return Ok((Self::new(dir, ring), false));
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let made = match write_key(dir, KEY_FILE) {
            Ok(()) => true,
            // Made by another process meanwhile: that one is the key.
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists) =>
            {
                false
            }
            Err(e) => return Err(e),
        };
        let ring = read_ring(dir)?;
        anyhow::ensure!(!ring.is_empty(), "{} holds no secrets key after making one", dir.display());
        Ok((Self::new(dir, ring), made))
    }

    /// Reads the keys of `dir`; `None` when it holds none (nothing is made).
    pub fn load(dir: &Path) -> anyhow::Result<Option<SealingKeys>> {
        let ring = read_ring(dir)?;
        Ok((!ring.is_empty()).then(|| Self::new(dir, ring)))
    }

    fn new(dir: &Path, ring: Vec<Key>) -> SealingKeys {
        SealingKeys { dir: dir.to_owned(), ring: ArcSwap::from_pointee(ring), read_at: Mutex::default() }
    }

    /// Makes a new key, `secrets-<UTC time>.key`, newer than every key of
    /// `dir` (which must hold one: rotation follows a first key): named
    /// after now, or a second after the newest if that is not older (a
    /// clock behind; said on standard error); returns its file name. The
    /// file gets the owner of the directory's newest key, so that a
    /// command run as another user (root) leaves a key the gateways can
    /// read.
    pub fn rotate(dir: &Path) -> anyhow::Result<String> {
        let ring = read_ring(dir)?;
        let Some(newest) = ring.first() else {
            anyhow::bail!(
                "{} holds no secrets key: the first one is made by `gateway keys generate` or the first start",
                dir.display()
            );
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let after = if newest.id.is_empty() { None } else { id_time(&newest.id).map(|t| t + 1) };
        let id = id_at(after.map_or(now, |after| after.max(now)));
        if after.is_some_and(|after| after > now) {
            eprintln!("note: {} is not older than this host's clock; the new key is named after it", newest.file());
        }
        let file = format!("{}{id}{}", ROTATED.0, ROTATED.1);
        write_key(dir, &file).with_context(|| format!("making {}", dir.join(&file).display()))?;
        let path = dir.join(&file);
        let owner = std::fs::metadata(dir.join(newest.file())).map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            (m.uid(), m.gid())
        });
        if let Ok((uid, gid)) = owner {
            if let Err(e) = std::os::unix::fs::chown(&path, Some(uid), Some(gid)) {
                let _ = std::fs::remove_file(&path);
                anyhow::bail!(
                    "{} belongs to uid {uid}, and {} could not be given to it ({e}): run this as that user",
                    newest.file(),
                    file
                );
            }
        }
        Ok(file)
    }

    /// Reads the directory again: a newer key starts sealing, a removed one
    /// stops opening. A directory that holds no key, or a bad one, keeps
    /// the loaded keys (and says why).
    pub fn reload(&self) -> anyhow::Result<()> {
        let mut read_at = self.read_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        read_at.any = Some(Instant::now());
        let ring = read_ring(&self.dir)?;
        anyhow::ensure!(!ring.is_empty(), "{} holds no secrets key", self.dir.display());
        self.ring.store(Arc::new(ring));
        Ok(())
    }

    /// The key files loaded, newest (the one that seals) first.
    pub fn files(&self) -> Vec<String> {
        self.ring.load().iter().map(Key::file).collect()
    }

    /// What the values the newest key seals start with.
    pub fn sealing_prefix(&self) -> String {
        self.ring.load()[0].prefix()
    }

    /// For each loaded key, newest first: its file and what the values it
    /// sealed start with.
    pub fn prefixes(&self) -> Vec<(String, String)> {
        self.ring.load().iter().map(|k| (k.file(), k.prefix())).collect()
    }

    /// `secret` sealed for `owner` with the newest key.
    pub fn seal(&self, secret: &str, owner: &[u8]) -> Result<String, SealError> {
        // Not per request (a factor set up, a reseal, a delivery to the
        // mailer), and the one place a key not yet read would do harm
        // (sealing with one that may be removed): the directory is read
        // again first, once a second at most.
        self.read_again(None);
        let ring = self.ring.load();
        let key = &ring[0];
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| SealError)?;
        let mut sealed = secret.as_bytes().to_vec();
        key.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(owner), &mut sealed)
            .map_err(|_| SealError)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{}{}", key.prefix(), STANDARD.encode(out)))
    }

    /// The secret in `stored`, sealed for `owner`; a value stored before
    /// sealing existed (no prefix) is the secret itself. A value naming a
    /// key not loaded reads the directory again first (once a second at
    /// most): another process rotated.
    pub fn open(&self, stored: &str, owner: &[u8]) -> Result<String, SealError> {
        let plain = match parse_value(stored) {
            Value::Plain => return Ok(stored.to_owned()),
            Value::Malformed => return Err(SealError),
            Value::Sealed { id, encoded } => {
                if !self.has(id) {
                    self.read_again(Some(id));
                }
                let ring = self.ring.load();
                let key = ring.iter().find(|k| k.id == id).ok_or(SealError)?;
                let mut bytes = STANDARD.decode(encoded).map_err(|_| SealError)?;
                if bytes.len() < NONCE_LEN {
                    return Err(SealError);
                }
                let mut sealed = bytes.split_off(NONCE_LEN);
                let nonce = Nonce::try_assume_unique_for_key(&bytes).map_err(|_| SealError)?;
                let plain = key.key.open_in_place(nonce, Aad::from(owner), &mut sealed).map_err(|_| SealError)?;
                String::from_utf8(plain.to_vec()).map_err(|_| SealError)?
            }
        };
        // A release from before rotation took a `v2:` value for a secret
        // stored as it is and sealed it again: what it sealed is opened too.
        if is_sealed(&plain) {
            return self.open(&plain, owner);
        }
        Ok(plain)
    }

    fn has(&self, id: &str) -> bool {
        self.ring.load().iter().any(|k| k.id == id)
    }

    /// Whether the key a sealed `stored` value names is loaded (the
    /// directory read again first if not, as [`SealingKeys::open`] does);
    /// true for a value that names none (it opens, or fails, on its own).
    pub fn knows_key_of(&self, stored: &str) -> bool {
        match parse_value(stored) {
            Value::Sealed { id, .. } => {
                if !self.has(id) {
                    self.read_again(Some(id));
                }
                self.has(id)
            }
            Value::Plain | Value::Malformed => true,
        }
    }

    /// Reads the directory again: for a seal (`wanted` `None`), unless it
    /// was read within [`RELOAD_EVERY`]; for a value naming the key
    /// `wanted`, unless another thread's reading brought it meanwhile or a
    /// reading within [`RELOAD_EVERY`] looked for a key in vain (a value
    /// whose key is gone does not read the directory at every login). One
    /// reading at a time: a thread that meets a new key while another reads
    /// waits for that reading rather than failing.
    fn read_again(&self, wanted: Option<&str>) {
        let mut read_at = self.read_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let recent = |at: Option<Instant>| at.is_some_and(|at| at.elapsed() < RELOAD_EVERY);
        let skip = match wanted {
            Some(id) => self.has(id) || recent(read_at.missed),
            None => recent(read_at.any),
        };
        if skip {
            return;
        }
        read_at.any = Some(Instant::now());
        match read_ring(&self.dir) {
            Ok(ring) if !ring.is_empty() => {
                let before = self.files();
                self.ring.store(Arc::new(ring));
                if self.files() != before {
                    tracing::info!(keys = ?self.files(), "secrets keys read again: the newest seals");
                }
            }
            Ok(_) => tracing::error!(dir = %self.dir.display(), "no secrets key in the keys directory any more"),
            Err(e) => tracing::error!(error = format!("{e:#}"), "secrets keys reload refused; keeping the loaded ones"),
        }
        if let Some(id) = wanted.filter(|id| !self.has(id)) {
            read_at.missed = read_at.any;
            tracing::warn!(key = id, "a stored secret names a secrets key the keys directory does not hold");
        }
    }
}

/// What a stored value is.
enum Value<'a> {
    /// A secret stored as it is (from before sealing).
    Plain,
    /// Sealed with the key `id` (`""` for [`KEY_FILE`]).
    Sealed { id: &'a str, encoded: &'a str },
    /// `v2:` without a key id: sealed, by no key.
    Malformed,
}

fn parse_value(stored: &str) -> Value<'_> {
    if let Some(encoded) = stored.strip_prefix(V1) {
        return Value::Sealed { id: "", encoded };
    }
    let Some(rest) = stored.strip_prefix(V2) else { return Value::Plain };
    match rest.split_once(':') {
        Some((id, encoded)) if is_key_id(id) => Value::Sealed { id, encoded },
        _ => Value::Malformed,
    }
}

/// A rotated key's id: a UTC time, `20261208T101500Z`.
fn is_key_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 16 && b[8] == b'T' && b[15] == b'Z' && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

/// The time a key id names, as unix seconds.
fn id_time(id: &str) -> Option<u64> {
    let text = format!("{}-{}-{}T{}:{}:{}Z", &id[0..4], &id[4..6], &id[6..8], &id[9..11], &id[11..13], &id[13..15]);
    let at = humantime::parse_rfc3339(&text).ok()?;
    at.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// The key id of unix second `secs`.
fn id_at(secs: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(at).to_string().replace(['-', ':'], "")
}

/// Whether `stored` is sealed (else it is a secret from before sealing).
pub fn is_sealed(stored: &str) -> bool {
    !matches!(parse_value(stored), Value::Plain)
}

/// The keys of `dir`, newest first: the rotated ones by id, then
/// [`KEY_FILE`]. Empty when there is none (or no directory); a key file
/// that does not hold a key is an error naming it.
fn read_ring(dir: &Path) -> anyhow::Result<Vec<Key>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut ring = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let id = if name == KEY_FILE {
            String::new()
        } else {
            match name.strip_prefix(ROTATED.0).and_then(|n| n.strip_suffix(ROTATED.1)) {
                Some(id) if is_key_id(id) => id.to_owned(),
                Some(_) => {
                    // A copy (`secrets-old.key`) would otherwise sort as the
                    // newest and seal everything.
                    tracing::warn!(file = name, "not a secrets key name (secrets-<UTC time>.key): ignored");
                    continue;
                }
                None => continue,
            }
        };
        let path = entry.path();
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        if entry.metadata().is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 != 0) {
            tracing::warn!(file = %path.display(), "a secrets key is readable by others than its owner: chmod 600 it");
        }
        ring.push(Key { id, key: parse(&text, &path)? });
    }
    // Rotated ids are UTC times: the greatest is the newest; "" sorts last.
    ring.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(ring)
}

fn parse(text: &str, path: &Path) -> anyhow::Result<LessSafeKey> {
    let bytes = STANDARD
        .decode(text.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .with_context(|| format!("{} must hold the base64 of 32 bytes", path.display()))?;
    let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| anyhow::anyhow!("not an AES-256 key"))?;
    Ok(LessSafeKey::new(key))
}

/// Writes 32 random bytes (base64) to `dir/file`, whole, mode 0600: to a
/// temporary file, linked to its name (which fails if the name exists).
fn write_key(dir: &Path, file: &str) -> anyhow::Result<()> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for {file}: {e}"))?;
    let temp = dir.join(format!(".{file}.{}", uuid::Uuid::new_v4().simple()));
    let path = dir.join(file);
    let written = write_new(&temp, &STANDARD.encode(bytes));
    let linked = written.and_then(|()| std::fs::hard_link(&temp, &path).map_err(anyhow::Error::from));
    let _ = std::fs::remove_file(&temp);
    linked?;
    // The name, not only the bytes, must outlive a crash: values sealed
    // with the key are stored next.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// Rewrites the stored TOTP secrets (and secrets being set up) that the
/// newest key did not seal, sealed with it (`seal`: those stored as they
/// are, and those an older key sealed), or every sealed one as it is
/// (`!seal`: before a rollback to a release from before sealing); returns
/// how many were rewritten. A value changed meanwhile is left as it now
/// is; sealed ones that do not open are left too, and named (user and
/// column) in the error that follows the rest.
pub async fn rewrite_stored(store: &Store, keys: &SealingKeys, seal: bool) -> anyhow::Result<usize> {
    let mut rewritten = 0;
    let mut unopened = Vec::new();
    let current = keys.sealing_prefix();
    let rows = match seal {
        true => store.stored_totp_not_with(Some(&current)).await?,
        false => store.stored_totp_not_with(None).await?,
    };
    for (tenant_id, user_id, secret, pending) in rows {
        for (is_pending, stored) in [(false, secret), (true, pending)] {
            let wanted = |s: &String| if seal { !s.starts_with(&current) } else { is_sealed(s) };
            let Some(stored) = stored.filter(wanted) else { continue };
            let plain = match keys.open(&stored, user_id.as_bytes()) {
                Ok(plain) => plain,
                Err(_) => {
                    let column = if is_pending { "totp_pending" } else { "totp_secret" };
                    unopened.push(format!("user {user_id} ({column})"));
                    continue;
                }
            };
            let new = if seal { keys.seal(&plain, user_id.as_bytes())? } else { plain };
            if store.reseal_totp(tenant_id, user_id, is_pending, &stored, &new).await? {
                rewritten += 1;
            }
        }
    }
    if !unopened.is_empty() {
        anyhow::bail!(
            "{rewritten} rewritten; {} sealed value(s) do not open with the secrets keys of {}: {}",
            unopened.len(),
            keys.dir.display(),
            unopened.join(", ")
        );
    }
    Ok(rewritten)
}

/// Whether the keys open a stored sealed secret (one is tried): a replica
/// with a key file of its own, or a lost one, is told at start rather than
/// at its users' logins. `Ok` when none is stored.
pub async fn check_opens(store: &Store, keys: &SealingKeys) -> anyhow::Result<()> {
    for (_, user_id, secret, pending) in store.stored_totp_sealed(1).await? {
        let stored = secret.filter(|s| is_sealed(s)).or(pending).unwrap_or_default();
        keys.open(&stored, user_id.as_bytes()).with_context(|| format!("the TOTP secret of user {user_id}"))?;
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

    use super::{is_sealed, SealingKeys, KEY_FILE};

    #[test]
    fn sealed_secrets_open_for_their_owner_only() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (key, made) = SealingKeys::load_or_generate(dir.path()).expect("a key");
        assert!(made);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).expect("the key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = key.seal("JBSWY3DPEHPK3PXP", b"alice").expect("sealed");
        assert!(is_sealed(&sealed) && sealed.starts_with("v1:") && !sealed.contains("JBSWY3DP"), "{sealed}");
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
        let (again, made) = SealingKeys::load_or_generate(dir.path()).expect("the key again");
        assert!(!made);
        assert_eq!(again.open(&sealed, b"alice").expect("opens"), "JBSWY3DPEHPK3PXP");
        let other = tempfile::tempdir().expect("a temp dir");
        let (stranger, _) = SealingKeys::load_or_generate(other.path()).expect("another key");
        assert!(stranger.open(&sealed, b"alice").is_err());
    }

    #[test]
    fn a_rotated_key_seals_and_every_key_opens_what_it_sealed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (first, _) = SealingKeys::load_or_generate(dir.path()).expect("a key");
        let old = first.seal("JBSWY3DPEHPK3PXP", b"alice").expect("sealed");
        let file = SealingKeys::rotate(dir.path()).expect("rotated");
        assert!(file.starts_with("secrets-") && file.ends_with("Z.key"), "{file}");
        let mode = std::fs::metadata(dir.path().join(&file)).expect("the key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let ring = SealingKeys::load(dir.path()).expect("load").expect("keys");
        assert_eq!(ring.files(), [file.clone(), KEY_FILE.to_owned()], "newest first");
        let new = ring.seal("JBSWY3DPEHPK3PXP", b"alice").expect("sealed");
        let id = file.trim_start_matches("secrets-").trim_end_matches(".key");
        assert!(new.starts_with(&format!("v2:{id}:")), "the value names its key: {new}");
        assert_eq!(ring.open(&new, b"alice").expect("opens"), "JBSWY3DPEHPK3PXP");
        assert_eq!(ring.open(&old, b"alice").expect("the old key still opens"), "JBSWY3DPEHPK3PXP");

        // A process that loaded only the first key reads the directory again
        // when it meets a value of the new one, and seals with it since.
        assert_eq!(first.files(), [KEY_FILE.to_owned()]);
        assert_eq!(first.open(&new, b"alice").expect("reloaded"), "JBSWY3DPEHPK3PXP");
        assert!(first.seal("x", b"alice").expect("sealed").starts_with("v2:"), "the newest seals");

        // Rotated again within the second: named a second later, and newest.
        let next = SealingKeys::rotate(dir.path()).expect("rotated again");
        assert!(next > file, "{next} after {file}");
        ring.reload().expect("reload");
        assert_eq!(ring.files()[0], next);

        // A removed key opens nothing any more; a value naming no key, or no
        // key id, neither (and is no secret stored as it is).
        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("remove");
        ring.reload().expect("reload");
        assert!(ring.open(&old, b"alice").is_err());
        for odd in ["v2:19700101T000000Z:AAAA", "v2:AAAA", "v2::AAAA", "v2:../../x:AAAA"] {
            assert!(ring.open(odd, b"alice").is_err() && is_sealed(odd), "{odd}");
        }
        assert!(SealingKeys::load(tempfile::tempdir().expect("dir").path()).expect("empty").is_none());

        // A copy under another name is no key: it would sort as the newest.
        std::fs::copy(dir.path().join(&next), dir.path().join("secrets-old.key")).expect("copy");
        ring.reload().expect("reload");
        assert_eq!(ring.files()[0], next, "secrets-old.key is ignored");
    }

    /// What a release from before rotation makes of a `v2:` value (it takes
    /// it for a secret stored as it is and seals it with `secrets.key`)
    /// opens to the secret.
    #[test]
    fn a_v2_value_sealed_again_by_an_older_release_opens() {
        let dir = tempfile::tempdir().expect("a temp dir");
        SealingKeys::load_or_generate(dir.path()).expect("a key");
        let older = tempfile::tempdir().expect("a temp dir");
        std::fs::copy(dir.path().join(KEY_FILE), older.path().join(KEY_FILE)).expect("copy");
        let older = SealingKeys::load(older.path()).expect("load").expect("secrets.key alone");
        SealingKeys::rotate(dir.path()).expect("rotated");
        let ring = SealingKeys::load(dir.path()).expect("load").expect("keys");
        let v2 = ring.seal("JBSWY3DPEHPK3PXP", b"alice").expect("sealed");
        let wrapped = older.seal(&v2, b"alice").expect("sealed again");
        assert!(wrapped.starts_with("v1:"), "{wrapped}");
        assert_eq!(ring.open(&wrapped, b"alice").expect("opens"), "JBSWY3DPEHPK3PXP");
    }

    #[test]
    fn a_bad_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join(KEY_FILE), "too short").expect("write");
        let err = SealingKeys::load_or_generate(dir.path()).expect_err("refused");
        assert!(err.to_string().contains(KEY_FILE), "{err}");
        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("remove");
        std::fs::write(dir.path().join("secrets-20260101T000000Z.key"), "bad").expect("write");
        let err = SealingKeys::load_or_generate(dir.path()).expect_err("refused");
        assert!(err.to_string().contains("secrets-20260101T000000Z.key"), "{err}");
    }
}
