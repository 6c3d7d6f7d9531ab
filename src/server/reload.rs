//! Hot reload of routes, header settings and signing keys.
//!
//! A reload reads and validates the whole file; only when it is valid is the
//! new route table swapped in, atomically (arc-swap): requests in flight
//! finish on the table they started with. An invalid file changes nothing and
//! every error is logged. Triggers: SIGHUP (which also reloads the key ring)
//! and a change of the file's modification time or size, polled every second.
//! Listeners, the database and timeouts of the server itself need a restart.
//!
//! Why a change must hold still for a whole poll before it is read: an
//! editor or `cat >` writes the file in pieces, and a file cut short is
//! often still valid (every key has a default, an empty file included).
//! Read mid-write, it could drop routes or, worse, keep a route whose
//! `roles` line had not been written yet. A file seen with the same time
//! and size on two polls a second apart is one the writer has finished
//! with. (Writing a new file and renaming it over the old is safest, and
//! SIGHUP reads the file at once.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::auth::keys::KeyRing;
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::proxy::identity::IdentityCache;
use crate::proxy::router::RouteTable;

#[derive(Clone)]
pub struct Reloader {
    pub(crate) path: PathBuf,
    pub(crate) keys_dir: PathBuf,
    pub(crate) routes: Arc<ArcSwap<RouteTable>>,
    pub(crate) authenticator: Authenticator,
    pub(crate) identities: IdentityCache,
}

impl Reloader {
    /// Re-reads the config file and swaps in its routes; returns their number.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        match Config::load(&self.path) {
            Ok(config) => {
                let n = config.proxy.routes.len();
                self.routes.store(Arc::new(RouteTable::new(config.proxy)));
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
    /// keys stop verifying. Verified-token cache entries are dropped.
    pub fn reload_keys(&self) {
        match KeyRing::load(&self.keys_dir) {
            Ok(ring) => {
                tracing::info!(signer = ring.signer().0, keys = ring.public_keys().len(), "signing keys reloaded");
                self.authenticator.replace_keys(ring);
                self.identities.clear();
            }
            Err(e) => tracing::error!(error = %e, "key reload refused; keeping the loaded keys"),
        }
    }

    fn stamp(&self) -> Stamp {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Reloads on SIGHUP and on file changes until `shutdown` resolves.
    pub async fn watch(self, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = Settled::new(self.stamp());
        let mut ticker = tokio::time::interval(every);
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
            tokio::select! {
                () = &mut shutdown => return,
                () = hup => {
                    tracing::info!("SIGHUP: reloading configuration and keys");
                    let _ = self.reload();
                    self.reload_keys();
                    seen = Settled::new(self.stamp());
                }
                _ = ticker.tick() => {
                    if seen.changed(self.stamp()) {
                        let _ = self.reload();
                    }
                }
            }
        }
    }
}

/// The file's (modification time, size), as of one poll.
type Stamp = Option<(SystemTime, u64)>;

/// Tells when the file has changed and then held still for a whole poll.
struct Settled {
    /// The stamp of the file last read.
    read: Stamp,
    /// A new stamp seen on the previous poll, not read yet.
    pending: Stamp,
}

impl Settled {
    fn new(read: Stamp) -> Self {
        Self { read, pending: None }
    }

    /// Given this poll's stamp: whether to read the file now.
    fn changed(&mut self, now: Stamp) -> bool {
        if now.is_none() || now == self.read {
            self.pending = None;
            false
        } else if now == self.pending {
            self.read = now;
            self.pending = None;
            true
        } else {
            self.pending = now;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{Settled, Stamp};

    fn at(secs: u64, len: u64) -> Stamp {
        Some((SystemTime::UNIX_EPOCH + Duration::from_secs(secs), len))
    }

    #[test]
    fn a_change_is_read_once_it_has_held_still_for_a_poll() {
        let mut seen = Settled::new(at(1, 100));
        assert!(!seen.changed(at(1, 100)), "unchanged");
        assert!(!seen.changed(at(2, 40)), "new: maybe still being written");
        assert!(!seen.changed(at(3, 90)), "still moving");
        assert!(seen.changed(at(3, 90)), "held still for a poll");
        assert!(!seen.changed(at(3, 90)), "read already");
        // Changed back before it settled: nothing to read.
        assert!(!seen.changed(at(4, 10)));
        assert!(!seen.changed(at(3, 90)));
        // A file that disappears (being replaced) is not read.
        assert!(!seen.changed(None));
        assert!(!seen.changed(at(5, 90)));
        assert!(!seen.changed(None));
        assert!(!seen.changed(at(5, 90)), "the missing poll reset the wait");
        assert!(seen.changed(at(5, 90)));
    }
}
