//! The revocation state every token check consults, without database I/O.
//!
//! It holds the sessions revoked, and the users disabled, while an access
//! token minted before the revocation could still be alive. That bound is
//! `access_token_ttl + leeway`, so each entry carries exactly that
//! time-to-live and the state stays as small as the revocation rate allows.
//! moka's concurrent cache gives lock-free reads and expiry for free; there
//! is deliberately no size cap, because evicting a live revocation would
//! silently honour a revoked token (fail open).
//!
//! Revocations made by this process are inserted before the HTTP answer is
//! sent, so they hold from the next request on. Those made elsewhere (the
//! CLI, another replica) arrive through [`poll`], which re-reads recent
//! revocations from the database every `auth.revocation_poll`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use uuid::Uuid;

use crate::db::{unix_now, Store};

/// How far back each poll looks before the previous poll started, to cover
/// clock skew between the processes that write revocations.
const POLL_OVERLAP_SECS: i64 = 10;

#[derive(Clone)]
pub struct RevocationState {
    sessions: Cache<Uuid, ()>,
    users: Cache<Uuid, ()>,
    /// Unix time of the last successful poll (0 before the first).
    last_poll: Arc<AtomicI64>,
}

impl std::fmt::Debug for RevocationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationState").field("entries", &self.len()).finish()
    }
}

impl RevocationState {
    /// `horizon` = access_token_ttl + leeway: the longest a token can live.
    pub fn new(horizon: Duration) -> Self {
        Self {
            sessions: Cache::builder().time_to_live(horizon).build(),
            users: Cache::builder().time_to_live(horizon).build(),
            last_poll: Arc::new(AtomicI64::new(0)),
        }
    }

    pub fn revoke_session(&self, session_id: Uuid) {
        self.sessions.insert(session_id, ());
    }

    pub fn revoke_user(&self, user_id: Uuid) {
        self.users.insert(user_id, ());
    }

    /// Two hash lookups; no I/O, no allocation.
    pub fn is_revoked(&self, session_id: Uuid, user_id: Uuid) -> bool {
        self.sessions.contains_key(&session_id) || self.users.contains_key(&user_id)
    }

    /// Approximate number of entries (for metrics).
    pub fn len(&self) -> u64 {
        self.sessions.entry_count() + self.users.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unix time of the last successful database poll.
    pub fn last_poll(&self) -> i64 {
        self.last_poll.load(Ordering::Relaxed)
    }

    /// Reads revocations recorded at or after `since`; returns how many.
    pub async fn load_since(&self, store: &Store, since: i64) -> Result<usize, crate::db::StoreError> {
        let sessions = store.sessions_revoked_since(since).await?;
        let users = store.users_disabled_since(since).await?;
        let n = sessions.len() + users.len();
        for s in sessions {
            self.revoke_session(s);
        }
        for u in users {
            self.revoke_user(u);
        }
        Ok(n)
    }
}

/// Keeps `state` in step with the database until `shutdown` resolves.
/// The first load covers the whole horizon; later ones only the recent past.
pub async fn poll(
    state: RevocationState,
    store: Store,
    every: Duration,
    horizon: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut since = unix_now() - crate::db::secs(horizon) - POLL_OVERLAP_SECS;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let started = unix_now();
        match state.load_since(&store, since).await {
            Ok(_) => {
                since = started - POLL_OVERLAP_SECS;
                state.last_poll.store(started, Ordering::Relaxed);
                metrics::gauge!("gateway_revocation_state_size").set(state.len() as f64);
            }
            Err(e) => tracing::warn!(error = %e, "revocation poll failed; keeping the previous state"),
        }
    }
}
