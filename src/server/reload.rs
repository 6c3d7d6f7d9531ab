//! Hot reload of routes, header settings and signing keys.
//!
//! A reload reads and validates the whole file; only when it is valid is the
//! new route table swapped in, atomically (arc-swap): requests in flight
//! finish on the table they started with. An invalid file changes nothing and
//! every error is logged. Triggers: SIGHUP (which also reloads the key ring)
//! and a change of the file's modification time or size, polled every second.
//! Listeners, the database and timeouts of the server itself need a restart.

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

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Reloads on SIGHUP and on file changes until `shutdown` resolves.
    pub async fn watch(self, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut last = self.stamp();
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
                    last = self.stamp();
                }
                _ = ticker.tick() => {
                    let now = self.stamp();
                    if now.is_some() && now != last {
                        last = now;
                        let _ = self.reload();
                    }
                }
            }
        }
    }
}
