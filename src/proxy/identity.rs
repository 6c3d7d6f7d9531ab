//! Verified-token cache for the proxy's hot path.
//!
//! An Ed25519 verification costs tens of microseconds, far more than the rest
//! of the proxy path, and a client sends the same access token many times. So
//! a verified token is cached, keyed by the token text, until its `exp` (plus
//! leeway), in a size-capped moka cache, together with its pre-rendered
//! identity header values. A hit is still checked against the revocation
//! state every time, so logout takes effect on the next request exactly as
//! without the cache. Evicting an entry early only costs a re-verification.
//! The cache is cleared whenever the key ring changes.
//!
//! In front of it, each worker thread keeps a small map of the tokens it
//! saw last: a moka lookup (its bookkeeping for eviction) cost more than
//! the rest of the token check. An entry there is trusted only under the
//! same rules (same cache, same key-ring generation, not past `exp`). It
//! also remembers when the thread last found the token unrevoked: while
//! the revocation state has not changed since, that answer stands, and the
//! lookups in the revocation sets are skipped. Any revocation, from
//! this process or another, changes the state before the next request can
//! see it (see [`IdentityCache::verify`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use moka::sync::Cache;
use moka::Expiry;

use super::headers::IdentityHeaders;
use crate::auth::token::TokenError;
use crate::auth::{check_staleness, Authenticator, Principal};

/// A verified principal and its header values.
#[derive(Debug)]
pub struct Identity {
    pub principal: Principal,
    pub headers: IdentityHeaders,
    /// Its assertions, by audience (routes with `jwt_assertion`).
    pub assertions: super::assertion::Assertions,
    /// The key-ring generation it was verified against.
    generation: u64,
}

impl Identity {
    fn new(principal: Principal, generation: u64) -> Self {
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
        let headers = IdentityHeaders {
            user_id: value(&principal.user_id.to_string()),
            tenant_id: value(&principal.tenant_id.to_string()),
            // Role and scope names are validated to safe characters on creation,
            // so these cannot carry CR/LF; from_str would refuse them anyway.
            roles: value(&principal.roles.join(",")),
            scopes: value(&principal.scopes.join(" ")),
            session_id: value(&principal.session_id.to_string()),
        };
        Self { principal, headers, assertions: Default::default(), generation }
    }
}

struct UntilExp {
    leeway: i64,
}

impl Expiry<Box<[u8]>, Arc<Identity>> for UntilExp {
    fn expire_after_create(&self, _: &Box<[u8]>, value: &Arc<Identity>, _: Instant) -> Option<Duration> {
        let left = value.principal.expires_at + self.leeway - crate::db::unix_now();
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

#[derive(Clone)]
pub struct IdentityCache {
    /// foldhash, not SipHash: the key is a whole token (hundreds of bytes),
    /// hashed on every request, and only verified tokens are ever inserted,
    /// so hash flooding is not a concern.
    cache: Cache<Box<[u8]>, Arc<Identity>, foldhash::fast::RandomState>,
    leeway: i64,
    /// Tells this cache's entries apart in the per-thread maps.
    id: u64,
}

/// Most tokens a worker thread remembers in front of the shared cache; past
/// it the map starts over.
const RECENT_MAX: usize = 1024;

/// One token a worker thread saw lately.
struct Recent {
    /// Which [`IdentityCache`] and which [`Authenticator`] it came from
    /// (tests run several of each per thread).
    cache: u64,
    auth: u64,
    identity: Arc<Identity>,
    /// The revocation state's change count when this thread last found the
    /// token's session and user unrevoked ([`crate::auth::revocation::Seen::changes`]).
    unrevoked_at: u64,
}

thread_local! {
    /// Token bytes → what this thread knows of it.
    static RECENT: RefCell<HashMap<Box<[u8]>, Recent, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

impl IdentityCache {
    pub fn new(capacity: u64, leeway: Duration) -> Self {
        let leeway = crate::db::secs(leeway);
        let cache = Cache::builder()
            .max_capacity(capacity)
            .expire_after(UntilExp { leeway })
            .build_with_hasher(foldhash::fast::RandomState::default());
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self { cache, leeway, id: NEXT_ID.fetch_add(1, Ordering::Relaxed) }
    }

    /// Verifies `token` (cached), then checks revocation (always). `token`
    /// is the text after `Bearer `, as bytes ([`crate::auth::bearer_token`]).
    ///
    /// The revocation check is skipped only where it would repeat one this
    /// thread made since the last change to the revocation state: the
    /// state's change count is read before the check, and every revocation
    /// is in the state before the count moves past it. So a revocation that
    /// the earlier check could have missed has moved the count, and the
    /// check runs again. Staleness, which depends on the clock rather than
    /// on changes, is checked every time.
    pub fn verify(&self, auth: &Authenticator, token: &[u8]) -> Result<Arc<Identity>, TokenError> {
        // Read before verifying or checking: an entry verified while the
        // ring changes carries the old generation and is never trusted
        // afterwards; and see `RevocationState::seen`.
        let generation = auth.key_generation();
        let now = crate::db::unix_now();
        let seen = auth.revocations().seen(now);
        let recent = RECENT.with_borrow(|recent| {
            recent
                .get(token)
                .filter(|e| e.cache == self.id && e.auth == auth.id() && e.identity.generation == generation)
                .map(|e| (Arc::clone(&e.identity), e.unrevoked_at))
        });
        let (id, unrevoked_at) = match recent {
            Some((id, at)) => (id, Some(at)),
            None => match self.cache.get(token).filter(|id| id.generation == generation) {
                Some(id) => (id, None),
                None => {
                    let text = std::str::from_utf8(token).map_err(|_| TokenError::Malformed)?;
                    // Checks revocation itself, after `seen` was read.
                    let id = Arc::new(Identity::new(auth.verify_bearer(text)?, generation));
                    self.cache.insert(token.into(), Arc::clone(&id));
                    self.remember(auth, token, &id, seen.changes);
                    return Ok(id);
                }
            },
        };
        let p = &id.principal;
        if p.expires_at + self.leeway < now {
            // moka's expiry is approximate; the token's own exp is not.
            return Err(TokenError::Expired);
        }
        if unrevoked_at == Some(seen.changes) {
            check_staleness(seen, p.issued_at)?;
        } else {
            auth.check_revocation_as_of(seen, &p.subject())?;
            self.remember(auth, token, &id, seen.changes);
        }
        Ok(id)
    }

    /// Records in this thread's map that `id` was found unrevoked at the
    /// revocation state's change count `changes`.
    fn remember(&self, auth: &Authenticator, token: &[u8], id: &Arc<Identity>, changes: u64) {
        let entry = Recent { cache: self.id, auth: auth.id(), identity: Arc::clone(id), unrevoked_at: changes };
        RECENT.with_borrow_mut(|recent| {
            if let Some(e) = recent.get_mut(token) {
                *e = entry;
                return;
            }
            if recent.len() >= RECENT_MAX {
                recent.clear();
            }
            recent.insert(token.into(), entry);
        });
    }

    /// Drops the shared cache's entries. The per-thread maps are not
    /// reached from here: their entries stop being trusted because the key
    /// ring's generation moved first (`Authenticator::replace_keys`, which
    /// every caller runs before this).
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests;
