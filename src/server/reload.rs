//! Hot reload of routes, header settings, CORS origins, signing keys and
//! the TLS certificates.
//!
//! A reload reads and validates the whole file; only when it is valid is the
//! new route table swapped in, atomically (arc-swap): requests in flight
//! finish on the table they started with. An invalid file changes nothing and
//! every error is logged. Triggers: SIGHUP (which also reloads the key ring
//! and the admin API's token files)
//! and a change of the file ([`FileStamp`]: modification time, size, inode,
//! status-change time), polled every `server.config_poll` (1 s; 0 turns
//! polling off). The listener's certificate and key ([`ServerCert`]), and
//! the upstream client's CA file, certificate and key ([`UpstreamTls`]),
//! are read again on SIGHUP and when one of their files changes, by the
//! same rule; SIGHUP also reads the platform's trust store again.
//! Of `[auth]`, only `cors_origins` is taken on reload (with the API's
//! router rebuilt for it), and of `[server]` only `trusted_proxies` (with
//! the routes, which forward auth and the client's address read it
//! with); listeners, the database, the rest of `[auth]` and timeouts of
//! the server itself need a restart. A reload that finds those changed
//! says so: a warning naming the tables ([`Config::restart_pending`]) and
//! `gateway_config_restart_pending` (how many tables differ from what the
//! process started with; 0 again once the file matches), so an edit that
//! waits for a restart is never silently ignored.
//!
//! Why a change must hold still for a whole poll before it is read: an
//! editor or `cat >` writes the file in pieces, and a file cut short is
//! often still valid (every key has a default, an empty file included).
//! Read mid-write, it could drop routes or, worse, keep a route whose
//! `roles` line had not been written yet. A file with the same stamp on two
//! polls a poll apart is one the writer has finished with. (Writing a new
//! file and renaming it over the old is safest, and SIGHUP reads the file
//! at once.) The stamp is taken before the file is read, so a write racing
//! a read is seen as a change on the next poll.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::auth::keys::KeyRing;
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, FileStamp};
use crate::proxy::cors::CorsOrigins;
use crate::proxy::identity::IdentityCache;
use crate::proxy::router::RouteTable;
use crate::proxy::upstream::tls::UpstreamTls;
use crate::server::tls::ServerCert;

/// What a reload swaps: the route table (rate limiters handed over),
/// `[headers]` and the CORS origins (the API's router rebuilt for them);
/// on SIGHUP the key ring too; and the listener's and upstream client's
/// TLS sets when their files change. One reload at a time.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) path: PathBuf,
    /// The file as it was when the running config was read.
    pub(crate) stamp: Option<FileStamp>,
    pub(crate) keys_dir: PathBuf,
    /// The keys that seal the TOTP secrets, read again with the signing
    /// keys.
    pub(crate) sealer: Arc<crate::auth::seal::SealingKeys>,
    pub(crate) routes: Arc<ArcSwap<RouteTable>>,
    /// The API, rebuilt with the new CORS origins and request id name.
    pub(crate) api: crate::api::Api,
    pub(crate) authenticator: Authenticator,
    pub(crate) identities: IdentityCache,
    /// The listener's certificate, when it terminates TLS.
    pub(crate) tls: Option<Arc<ServerCert>>,
    /// The upstream client's roots and certificate.
    pub(crate) upstream_tls: Arc<UpstreamTls>,
    /// Starts the health checks of the routes a reload brings.
    pub(crate) probes: crate::proxy::health::Probes,
    /// Held through a reload: the API router and the route table are two
    /// swaps, and two reloads at once (the watcher and a caller) must not
    /// leave them from two different files.
    pub(crate) reloading: Arc<std::sync::Mutex<()>>,
    /// The configuration the process started with: what runs of the
    /// settings a reload does not take.
    pub(crate) started: Arc<Config>,
    /// The admin API's tokens, whose files SIGHUP reads again.
    pub(crate) admin_tokens: Option<crate::admin::api::ApiTokens>,
}

/// Publishes `gateway_config_restart_pending` as 0 at start, so that the
/// series exists before the first reload.
pub fn publish_nothing_pending() {
    metrics::gauge!("gateway_config_restart_pending").set(0.0);
}

impl Reloader {
    /// Re-reads the config file and swaps in its routes, header settings
    /// and CORS origins; returns the number of routes.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match Config::load(&self.path) {
            Ok(config) => {
                let pending = config.restart_pending(&self.started);
                metrics::gauge!("gateway_config_restart_pending").set(pending.len() as f64);
                if !pending.is_empty() {
                    tracing::warn!(
                        tables = pending.join(", "),
                        "the file changed settings a reload does not take: they apply at the next restart"
                    );
                }
                let n = config.proxy.routes.len();
                let cors = CorsOrigins::new(&config.auth.cors_origins);
                self.api.rebuild(&cors, &config.proxy.headers.request_id);
                let table = Arc::new(RouteTable::new(config.proxy, cors, Some(&self.routes.load())));
                self.probes.start(&table);
                self.routes.store(table);
                metrics::counter!("gateway_config_reloads_total", "result" => "ok").increment(1);
                tracing::info!(routes = n, path = %self.path.display(), "configuration reloaded");
                Ok(n)
            }
            Err(e) => {
                metrics::counter!("gateway_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "configuration reload refused; keeping the running routes");
                Err(e)
            }
        }
    }

    /// Re-reads the key directory: a new newest key starts signing; removed
    /// keys stop verifying. Verified-token cache entries are dropped. The
    /// secrets keys too: a new newest one starts sealing. And the admin
    /// API's token files: a replaced token takes over.
    pub fn reload_keys(&self) {
        if let Some(tokens) = &self.admin_tokens {
            let problems = tokens.reload();
            for e in &problems {
                tracing::error!(
                    error = format!("{e:#}"),
                    "an admin API token was not loaded: it no longer opens the API"
                );
            }
            tracing::info!(refused = problems.len(), "admin API tokens reloaded");
        }
        match self.sealer.reload() {
            Ok(()) => tracing::info!(keys = ?self.sealer.files(), "secrets keys reloaded"),
            Err(e) => tracing::error!(error = format!("{e:#}"), "secrets keys reload refused; keeping the loaded keys"),
        }
        match KeyRing::load(&self.keys_dir) {
            Ok(ring) => {
                tracing::info!(signer = ring.signer().0, keys = ring.public_keys().len(), "signing keys reloaded");
                self.authenticator.replace_keys(ring);
                self.identities.clear();
            }
            Err(e) => tracing::error!(error = %e, "key reload refused; keeping the loaded keys"),
        }
    }

    /// Reloads on SIGHUP, and on file changes every `every` (never when
    /// zero), until `shutdown` resolves.
    pub async fn watch(self, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = Settled::new(self.stamp);
        let listener_files = |t: &ServerCert| vec![t.files().cert.clone(), t.files().key.clone()];
        let mut cert_seen = self.tls.as_ref().map(|t| {
            let (cert, key) = t.loaded_stamps();
            CertFiles::since(listener_files(t), vec![cert, key])
        });
        let upstream = &self.upstream_tls;
        let mut upstream_seen = CertFiles::since(upstream.files(), upstream.loaded_stamps());
        let mut ticker = (!every.is_zero()).then(|| {
            let mut ticker = tokio::time::interval(every);
            // After a stall, the next poll comes a whole period later, not at
            // once: two polls microseconds apart would agree on a file that
            // is still being written.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        tokio::pin!(shutdown);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                () = hup => {
                    tracing::info!("SIGHUP: reloading configuration and keys");
                    let before = FileStamp::of(&self.path);
                    let _ = self.reload();
                    self.reload_keys();
                    seen = Settled::new(before);
                    if let Some(tls) = &self.tls {
                        let before = CertFiles::now(listener_files(tls));
                        let _ = tls.reload();
                        cert_seen = Some(before);
                    }
                    // With the platform's store, hundreds of files: not on
                    // this runtime's thread.
                    let before = CertFiles::now(upstream.files());
                    let reading = Arc::clone(upstream);
                    let _ = tokio::task::spawn_blocking(move || reading.reload(true)).await;
                    upstream_seen = before;
                }
                () = tick => {
                    match seen.changed(FileStamp::of(&self.path)) {
                        Poll::Read => {
                            let _ = self.reload();
                        }
                        Poll::Unsettled(UNSETTLED_WARNING) => tracing::warn!(
                            path = %self.path.display(),
                            polls = UNSETTLED_WARNING,
                            "the config file has changed on every poll; it is read once it holds still, or on SIGHUP"
                        ),
                        Poll::Unchanged | Poll::Unsettled(_) => {}
                    }
                    if let (Some(tls), Some(files)) = (&self.tls, cert_seen.as_mut()) {
                        if files.changed() {
                            let _ = tls.reload();
                        }
                    }
                    if upstream_seen.changed() {
                        let _ = upstream.reload(false);
                    }
                }
            }
        }
    }
}

/// Certificate files (the listener's pair; the upstream client's CA file
/// and pair), each watched like the config file. They are read again once
/// a change has held still and none of them is still moving: a renewal
/// that writes the key first and the chain slowly is not read with the
/// chain cut short (a leaf without its intermediates would still match the
/// key). A pair that does not match yet is refused and read again when the
/// other file settles.
struct CertFiles {
    files: Vec<(PathBuf, Settled)>,
    /// A settled change not read yet, because another file was moving.
    due: bool,
}

impl CertFiles {
    /// Watching `files` from the given stamps (taken before they were read).
    fn since(files: Vec<PathBuf>, stamps: Vec<Option<FileStamp>>) -> Self {
        debug_assert_eq!(files.len(), stamps.len(), "a stamp for each file");
        let files = files.into_iter().zip(stamps).map(|(path, stamp)| (path, Settled::new(stamp)));
        Self { files: files.collect(), due: false }
    }

    /// Watching `files` from now, for a read about to happen (SIGHUP).
    fn now(files: Vec<PathBuf>) -> Self {
        let stamps = files.iter().map(|p| FileStamp::of(p)).collect();
        Self::since(files, stamps)
    }

    /// Given this poll: whether to read the files now.
    fn changed(&mut self) -> bool {
        let mut moving = false;
        for (path, seen) in &mut self.files {
            match seen.changed(FileStamp::of(path)) {
                Poll::Read => self.due = true,
                Poll::Unsettled(_) => moving = true,
                Poll::Unchanged => {}
            }
        }
        let read = self.due && !moving;
        if read {
            self.due = false;
        }
        read
    }
}

/// After this many polls that each saw a new stamp, a warning says why
/// the file is not being read.
const UNSETTLED_WARNING: u32 = 10;

/// What one poll of the file decided.
#[derive(Debug, PartialEq, Eq)]
enum Poll {
    /// As last read (or missing: a file being replaced is not read).
    Unchanged,
    /// Changed, and not yet the same on two polls; the number of polls in
    /// a row that have seen it so.
    Unsettled(u32),
    /// Changed and then held still for a whole poll: read it.
    Read,
}

/// Tells when the file has changed and then held still for a whole poll.
struct Settled {
    /// The stamp of the file last read.
    read: Option<FileStamp>,
    /// A new stamp seen on the previous poll, not read yet.
    pending: Option<FileStamp>,
    /// Polls in a row that saw a new, unsettled stamp.
    moving: u32,
}

impl Settled {
    fn new(read: Option<FileStamp>) -> Self {
        Self { read, pending: None, moving: 0 }
    }

    /// Given this poll's stamp: whether to read the file now.
    fn changed(&mut self, now: Option<FileStamp>) -> Poll {
        if now.is_none() || now == self.read {
            self.pending = None;
            self.moving = 0;
            Poll::Unchanged
        } else if now == self.pending {
            self.read = now;
            self.pending = None;
            self.moving = 0;
            Poll::Read
        } else {
            self.pending = now;
            self.moving = self.moving.saturating_add(1);
            Poll::Unsettled(self.moving)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::{CertFiles, FileStamp, Poll, Settled};
    use crate::config::TlsConfig;
    use crate::server::tls::ServerCert;

    /// Stamps of a scratch file written with `len` bytes, one per call.
    fn stamp(path: &Path, len: usize) -> Option<FileStamp> {
        std::fs::write(path, vec![b'#'; len]).expect("write the scratch file");
        FileStamp::of(path)
    }

    #[test]
    fn a_change_is_read_once_it_has_held_still_for_a_poll() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        let first = stamp(&path, 100);
        let mut seen = Settled::new(first);
        assert_eq!(seen.changed(first), Poll::Unchanged);
        let partial = stamp(&path, 40);
        assert_eq!(seen.changed(partial), Poll::Unsettled(1), "new: maybe still being written");
        let whole = stamp(&path, 90);
        assert_eq!(seen.changed(whole), Poll::Unsettled(2), "still moving");
        assert_eq!(seen.changed(whole), Poll::Read, "held still for a poll");
        assert_eq!(seen.changed(whole), Poll::Unchanged, "read already");
        // A file that disappears (being replaced) is not read, and resets the wait.
        let next = stamp(&path, 10);
        assert_eq!(seen.changed(next), Poll::Unsettled(1));
        assert_eq!(seen.changed(None), Poll::Unchanged);
        assert_eq!(seen.changed(next), Poll::Unsettled(1));
        assert_eq!(seen.changed(next), Poll::Read);
    }

    #[test]
    fn a_copy_renamed_over_the_file_is_a_change_even_with_the_same_time_and_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        let old = stamp(&path, 64);
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
        let aside = dir.path().join("gateway.toml.new");
        std::fs::write(&aside, vec![b'-'; 64]).expect("write the copy");
        let file = std::fs::File::options().write(true).open(&aside).expect("open the copy");
        file.set_modified(modified).expect("keep the old mtime (cp -p)");
        drop(file);
        std::fs::rename(&aside, &path).expect("rename over");
        let new = FileStamp::of(&path);
        assert_ne!(new, old, "a new file with the old time and size looked unchanged");
        let mut seen = Settled::new(old);
        assert_eq!(seen.changed(new), Poll::Unsettled(1));
        assert_eq!(seen.changed(new), Poll::Read);
    }

    /// A self-signed pair for "localhost", as PEM (certificate, key).
    fn pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
        (c.cert.pem(), c.key_pair.serialize_pem())
    }

    /// A pair written into `dir` and loaded, as at start.
    fn loaded(dir: &Path) -> (TlsConfig, Arc<ServerCert>) {
        let files = TlsConfig { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        let (cert, key) = pair();
        std::fs::write(&files.cert, cert).expect("write cert");
        std::fs::write(&files.key, key).expect("write key");
        let tls = ServerCert::load(&files).expect("a valid pair");
        (files, tls)
    }

    /// Watching the pair from the stamps of its first read, as the reloader does.
    fn watch(files: &TlsConfig, tls: &ServerCert) -> CertFiles {
        let (cert, key) = tls.loaded_stamps();
        CertFiles::since(vec![files.cert.clone(), files.key.clone()], vec![cert, key])
    }

    #[test]
    fn a_certificate_pair_is_read_once_both_files_hold_still() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (files, tls) = loaded(dir.path());
        let mut seen = watch(&files, &tls);
        assert!(!seen.changed(), "nothing changed");

        // A renewal writing the key first and the chain in two steps: read
        // only after the chain, too, has held still.
        let (cert, key) = pair();
        std::fs::write(&files.key, key).expect("write the new key");
        assert!(!seen.changed(), "the key may still be moving");
        std::fs::write(&files.cert, &cert[..cert.len() / 2]).expect("write half the chain");
        assert!(!seen.changed(), "the key held still, but the chain is moving");
        std::fs::write(&files.cert, &cert).expect("write the whole chain");
        assert!(!seen.changed(), "the chain is still moving");
        assert!(seen.changed(), "both held still: read");
        assert!(!seen.changed(), "read already");
    }

    #[test]
    fn a_renewal_between_the_first_read_and_the_watcher_is_seen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (files, tls) = loaded(dir.path());
        let (cert, key) = pair();
        std::fs::write(&files.cert, cert).expect("write the new cert");
        std::fs::write(&files.key, key).expect("write the new key");
        // The watcher starts only now, from the stamps taken at the read.
        let mut seen = watch(&files, &tls);
        assert!(!seen.changed(), "changed: wait for a poll");
        assert!(seen.changed(), "the renewal is read");
    }
}
