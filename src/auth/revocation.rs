//! The revocation state every token check consults, without database I/O.
//!
//! It holds the sessions revoked, and the users and tenants disabled, while an access
//! token minted before the revocation could still be alive. That bound is
//! `access_token_ttl + leeway`, so each entry carries exactly that
//! time-to-live and the state stays as small as the revocation rate allows.
//!
//! A disabled user is held with the time of the disable and refuses every
//! token issued up to `auth.leeway` after it (the disable is stamped by its
//! writer's clock or the database's, the token by a gateway's, and those
//! may disagree by that much). This is a second lock: the disable also
//! revoked the user's sessions. After a `user enable`, tokens from a login
//! past that margin are honoured. A disabled tenant is held the same way,
//! for every token that names it (`tid`).
//!
//! moka's concurrent cache gives lock-free reads and expiry for free; there
//! is deliberately no size cap, because evicting a live revocation would
//! silently honour a revoked token (fail open).
//!
//! Revocations made by this process are inserted before the HTTP answer is
//! sent, so they hold from the next request on. Those made elsewhere (the
//! CLI, another replica) arrive through [`poll`], which re-reads recent
//! revocations from the database every `auth.revocation_poll`, and on
//! PostgreSQL also through [`listen`], which applies the `NOTIFY` sent by
//! the database's triggers within milliseconds. The poll stays as the safety
//! net, and every (re)connection of the listener starts with a catch-up read.
//!
//! Fail closed: when the state has not been refreshed for longer than
//! `auth.revocation_max_staleness`, the process cannot know what was revoked
//! meanwhile, so [`RevocationState::is_stale`] turns true, tokens issued
//! before that window are refused and `/readyz` answers 503. Tokens issued
//! inside the window were minted after the last known-good state minus the
//! window, so at most that much revocation news can be missing for them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use uuid::Uuid;

use crate::db::{unix_now, Store};

/// How far back each poll looks before the previous poll started. A
/// revocation is stamped with its writer's clock before it commits, so it can
/// land "in the past" by the writer's wait for a lock or a connection (SQLite
/// busy timeout 10 s, pool acquire timeout) plus the clock skew the leeway
/// tolerates (at most 60 s). Re-reading a window this wide costs one indexed
/// query per poll; inserting a known revocation again is harmless.
const POLL_OVERLAP_SECS: i64 = 120;

/// What of a token the revocation state judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject {
    /// `sid`
    pub session: Uuid,
    /// `sub`
    pub user: Uuid,
    /// `tid`
    pub tenant: Uuid,
    /// `iat`
    pub iat: i64,
}

/// The state as one check found it before its lookups ([`RevocationState::seen`]).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// Revocations inserted so far (known ones again included: every poll
    /// re-reads a window). While the count stays the same, an "unrevoked"
    /// answer found after reading it stands: any revocation its lookups
    /// could have missed is counted past it. Entries that expire do not
    /// count: an expiry cannot revoke anything.
    pub changes: u64,
    /// While the state is stale, the oldest `iat` accepted.
    stale_cutoff: Option<i64>,
}

impl Seen {
    /// True when a token issued at `iat` is refused because the state is
    /// too old to vouch for it.
    pub fn refuses_as_stale(&self, iat: i64) -> bool {
        self.stale_cutoff.is_some_and(|cutoff| iat < cutoff)
    }
}

#[derive(Clone)]
pub struct RevocationState {
    /// Looked up on every proxied request: foldhash rather than SipHash
    /// (the ids come from our database, not from clients).
    sessions: Cache<Uuid, (), foldhash::fast::RandomState>,
    /// User id → unix time of the disable (the latest one known).
    users: Cache<Uuid, i64, foldhash::fast::RandomState>,
    /// Tenant id → unix time of the disable (the latest one known).
    tenants: Cache<Uuid, i64, foldhash::fast::RandomState>,
    /// `auth.leeway` in seconds: how far clocks may disagree.
    skew: i64,
    /// Unix time of the last successful refresh from the database.
    last_poll: Arc<AtomicI64>,
    max_staleness: i64,
    /// access_token_ttl + leeway, in seconds: no revocation older than this matters.
    horizon: i64,
    /// Whether a PostgreSQL LISTEN is currently active (push delivery).
    listening: Arc<std::sync::atomic::AtomicBool>,
    /// Counts insertions, each counted after its entry is in the set.
    changes: Arc<AtomicU64>,
}

impl std::fmt::Debug for RevocationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationState").field("entries", &self.len()).finish()
    }
}

impl RevocationState {
    /// `horizon` = access_token_ttl + leeway: the longest a token can live;
    /// `skew` = leeway: how far the clocks that stamp disables and tokens
    /// may disagree.
    pub fn new(horizon: Duration, max_staleness: Duration, skew: Duration) -> Self {
        Self {
            sessions: Cache::builder().time_to_live(horizon).build_with_hasher(Default::default()),
            users: Cache::builder().time_to_live(horizon).build_with_hasher(Default::default()),
            tenants: Cache::builder().time_to_live(horizon).build_with_hasher(Default::default()),
            // Stale until the first successful load from the database.
            last_poll: Arc::new(AtomicI64::new(0)),
            max_staleness: crate::db::secs(max_staleness),
            horizon: crate::db::secs(horizon),
            skew: crate::db::secs(skew),
            listening: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            changes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// True when the state is older than `auth.revocation_max_staleness`.
    pub fn is_stale(&self, now: i64) -> bool {
        now - self.last_poll.load(Ordering::Acquire) > self.max_staleness
    }

    pub fn revoke_session(&self, session_id: Uuid) {
        self.sessions.insert(session_id, ());
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// Refuses the user's tokens issued up to `skew` after `disabled_at`
    /// (unix seconds). A later disable moves the time forward; an older one
    /// (a poll re-reading its window) never moves it back.
    pub fn revoke_user(&self, user_id: Uuid, disabled_at: i64) {
        Self::hold_latest(&self.users, user_id, disabled_at);
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// Refuses the tokens of every user of the tenant issued up to `skew`
    /// after `disabled_at`, as [`Self::revoke_user`] does for one user.
    pub fn revoke_tenant(&self, tenant_id: Uuid, disabled_at: i64) {
        Self::hold_latest(&self.tenants, tenant_id, disabled_at);
        self.changes.fetch_add(1, Ordering::Release);
    }

    fn hold_latest(held: &Cache<Uuid, i64, foldhash::fast::RandomState>, id: Uuid, disabled_at: i64) {
        held.entry(id).and_upsert_with(|old| old.map_or(disabled_at, |o| disabled_at.max(*o.value())));
    }

    /// What a check reads of the state before its lookups: first when it
    /// was last refreshed, then how many revocations have been inserted.
    /// [`Self::load_since`] writes them in the other order (inserts, each
    /// counted after it is in the set, then the refresh time), so a check
    /// that finds the state fresh also sees every revocation that refresh
    /// brought, and a lookup made after this returned sees every
    /// revocation counted in it.
    pub fn seen(&self, now: i64) -> Seen {
        let last_poll = self.last_poll.load(Ordering::Acquire);
        let changes = self.changes.load(Ordering::Acquire);
        let stale = now - last_poll > self.max_staleness;
        Seen { changes, stale_cutoff: stale.then_some(now - self.max_staleness) }
    }

    #[cfg(test)]
    pub(crate) fn set_last_poll(&self, at: i64) {
        self.last_poll.store(at, Ordering::Release);
    }

    /// Three hash lookups; no I/O, no allocation.
    pub fn is_revoked(&self, token: &Subject) -> bool {
        let disabled_before = |disabled_at: i64| token.iat <= disabled_at.saturating_add(self.skew);
        self.sessions.contains_key(&token.session)
            || self.users.get(&token.user).is_some_and(disabled_before)
            || self.tenants.get(&token.tenant).is_some_and(disabled_before)
    }

    /// Approximate number of entries (for metrics).
    pub fn len(&self) -> u64 {
        self.sessions.entry_count() + self.users.entry_count() + self.tenants.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True while revocations are pushed to this process (PostgreSQL LISTEN).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Unix time of the last successful database poll.
    pub fn last_poll(&self) -> i64 {
        self.last_poll.load(Ordering::Relaxed)
    }

    /// Reads revocations recorded at or after `since`; returns how many. On
    /// success the state counts as fresh as of the call's start.
    pub async fn load_since(&self, store: &Store, since: i64) -> Result<usize, crate::db::StoreError> {
        let started = unix_now();
        let sessions = store.sessions_revoked_since(since).await?;
        let users = store.users_disabled_since(since).await?;
        let tenants = store.tenants_disabled_since(since).await?;
        let n = sessions.len() + users.len() + tenants.len();
        for s in sessions {
            self.revoke_session(s);
        }
        for (u, disabled_at) in users {
            self.revoke_user(u, disabled_at);
        }
        for (t, disabled_at) in tenants {
            self.revoke_tenant(t, disabled_at);
        }
        // After the inserts: see `seen`.
        self.last_poll.fetch_max(started, Ordering::Release);
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
                metrics::gauge!("gateway_revocation_state_size").set(state.len() as f64);
            }
            Err(e) => tracing::warn!(error = %e, "revocation poll failed; keeping the previous state"),
        }
        metrics::gauge!("gateway_revocation_staleness_seconds").set((unix_now() - state.last_poll()) as f64);
    }
}

/// The channel the PostgreSQL triggers notify.
pub const CHANNEL: &str = "gateway_revocations";

#[derive(serde::Deserialize)]
struct Notice {
    kind: String,
    id: Uuid,
    /// Epoch seconds (with microseconds) when the database made the change.
    at: f64,
}

/// Applies PostgreSQL revocation notifications until `shutdown` resolves.
/// After every (re)connection it re-reads what it may have missed. The
/// listener has its own connection (from `url`), so it never takes one of
/// the pool's connections away from requests.
pub async fn listen(
    state: RevocationState,
    store: Store,
    url: String,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut first = true;
    loop {
        let connected = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = &mut shutdown => return,
            result = connected => match result {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation listener cannot connect; retrying");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        if !first {
            metrics::counter!("gateway_revocation_listener_reconnects_total").increment(1);
        }
        first = false;
        state.listening.store(true, Ordering::Relaxed);
        catch_up(&state, &store).await;
        loop {
            let next = tokio::select! {
                () = &mut shutdown => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(n)) => apply(&state, n.payload()),
                Ok(None) => {
                    // The connection dropped; the next call reconnects. Anything
                    // notified meanwhile is lost, so read it back.
                    tracing::warn!("revocation listener lost its connection; reconnecting");
                    metrics::counter!("gateway_revocation_listener_reconnects_total").increment(1);
                    catch_up(&state, &store).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation listener failed; reconnecting");
                    state.listening.store(false, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

async fn catch_up(state: &RevocationState, store: &Store) {
    // Never further back than the horizon: before the first successful load
    // `last_poll` is 0, and the whole history is not needed.
    let since = state.last_poll().max(unix_now() - state.horizon) - POLL_OVERLAP_SECS;
    if let Err(e) = state.load_since(store, since).await {
        tracing::warn!(error = %e, "revocation catch-up failed; the poll will retry");
    }
}

fn apply(state: &RevocationState, payload: &str) {
    let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
        tracing::warn!("ignoring a malformed revocation notification");
        return;
    };
    match notice.kind.as_str() {
        "session" => state.revoke_session(notice.id),
        // The disable's second; `is_revoked` adds the skew.
        #[allow(clippy::cast_possible_truncation, reason = "epoch seconds fit an i64")]
        "user" => state.revoke_user(notice.id, notice.at.floor() as i64),
        #[allow(clippy::cast_possible_truncation, reason = "epoch seconds fit an i64")]
        "tenant" => state.revoke_tenant(notice.id, notice.at.floor() as i64),
        _ => return,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(notice.at);
    metrics::gauge!("gateway_revocation_lag_seconds").set((now - notice.at).max(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RevocationState {
        RevocationState::new(Duration::from_secs(900), Duration::from_secs(30), Duration::from_secs(5))
    }

    fn subject(session: Uuid, user: Uuid, tenant: Uuid, iat: i64) -> Subject {
        Subject { session, user, tenant, iat }
    }

    #[test]
    fn a_disabled_user_refuses_tokens_issued_up_to_the_latest_disable_and_the_skew() {
        let state = state();
        let (user, session, tenant) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let at = |iat| subject(session, user, tenant, iat);
        assert!(!state.is_revoked(&at(1_000)));
        state.revoke_user(user, 1_000);
        assert!(state.is_revoked(&at(999)));
        assert!(state.is_revoked(&at(1_005)), "a token within the skew after the disable is refused");
        assert!(!state.is_revoked(&at(1_006)), "a token issued past it is honoured");
        // An older disable (a poll re-reading its window) does not move it back.
        state.revoke_user(user, 900);
        assert!(state.is_revoked(&at(1_005)));
        state.revoke_user(user, 2_000);
        assert!(state.is_revoked(&at(1_500)), "a later disable moves it forward");
        assert!(!state.is_revoked(&at(2_006)));
        assert!(!state.is_revoked(&subject(session, Uuid::new_v4(), tenant, 0)), "other users are untouched");
        state.revoke_session(session);
        assert!(
            state.is_revoked(&subject(session, Uuid::new_v4(), tenant, i64::MAX)),
            "a revoked session refuses every token"
        );
    }

    #[test]
    fn a_disabled_tenant_refuses_every_users_tokens_up_to_the_latest_disable_and_the_skew() {
        let state = state();
        let (tenant, other) = (Uuid::new_v4(), Uuid::new_v4());
        let of = |tenant, iat| subject(Uuid::new_v4(), Uuid::new_v4(), tenant, iat);
        assert!(!state.is_revoked(&of(tenant, 1_000)));
        state.revoke_tenant(tenant, 1_000);
        assert!(state.is_revoked(&of(tenant, 999)), "any user of the tenant");
        assert!(state.is_revoked(&of(tenant, 1_005)), "a token within the skew after the disable is refused");
        assert!(!state.is_revoked(&of(tenant, 1_006)), "a token issued past it is honoured");
        assert!(!state.is_revoked(&of(other, 0)), "other tenants are untouched");
        state.revoke_tenant(tenant, 900);
        assert!(state.is_revoked(&of(tenant, 1_005)), "an older disable does not move it back");
        state.revoke_tenant(tenant, 2_000);
        assert!(state.is_revoked(&of(tenant, 2_005)), "a later disable moves it forward");
        state.tenants.run_pending_tasks(); // moka counts entries lazily
        assert_eq!(state.len(), 1, "one entry per tenant, whatever its users");
    }

    #[test]
    fn a_tenant_notification_holds_the_tenant() {
        let state = state();
        let tenant = Uuid::new_v4();
        apply(&state, &format!(r#"{{"kind":"tenant","id":"{tenant}","at":1000.75}}"#));
        assert!(state.is_revoked(&subject(Uuid::new_v4(), Uuid::new_v4(), tenant, 1_005)));
        assert!(!state.is_revoked(&subject(Uuid::new_v4(), Uuid::new_v4(), tenant, 1_006)));
        apply(&state, &format!(r#"{{"kind":"nonsense","id":"{tenant}","at":5000}}"#));
        assert!(
            !state.is_revoked(&subject(Uuid::new_v4(), Uuid::new_v4(), tenant, 1_006)),
            "unknown kinds are ignored"
        );
    }
}
