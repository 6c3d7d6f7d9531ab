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
//! same rules (same cache, same key-ring generation, not past `exp`), and
//! revocation is still checked on every request.

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
use crate::auth::{Authenticator, Principal};

/// A verified principal and its header values.
#[derive(Debug)]
pub struct Identity {
    pub principal: Principal,
    pub headers: IdentityHeaders,
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
        Self { principal, headers, generation }
    }
}

struct UntilExp {
    leeway: i64,
}

impl Expiry<Box<str>, Arc<Identity>> for UntilExp {
    fn expire_after_create(&self, _: &Box<str>, value: &Arc<Identity>, _: Instant) -> Option<Duration> {
        let left = value.principal.expires_at + self.leeway - crate::db::unix_now();
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

#[derive(Clone)]
pub struct IdentityCache {
    /// foldhash, not SipHash: the key is a whole token (hundreds of bytes),
    /// hashed on every request, and only verified tokens are ever inserted,
    /// so hash flooding is not a concern.
    cache: Cache<Box<str>, Arc<Identity>, foldhash::fast::RandomState>,
    leeway: i64,
    /// Tells this cache's entries apart in the per-thread maps.
    id: u64,
}

/// Most tokens a worker thread remembers in front of the shared cache; past
/// it the map starts over.
const RECENT_MAX: usize = 1024;

/// Token → (cache id, identity).
type Recent = HashMap<Box<str>, (u64, Arc<Identity>), foldhash::fast::RandomState>;

thread_local! {
    static RECENT: RefCell<Recent> = RefCell::new(HashMap::default());
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

    /// Verifies `token` (cached), then checks revocation (always).
    pub fn verify(&self, auth: &Authenticator, token: &str) -> Result<Arc<Identity>, TokenError> {
        // Read before verifying: an entry verified while the ring changes
        // carries the old generation and is never trusted afterwards.
        let generation = auth.key_generation();
        let recent = RECENT.with_borrow(|recent| {
            recent
                .get(token)
                .filter(|(cache, id)| *cache == self.id && id.generation == generation)
                .map(|e| Arc::clone(&e.1))
        });
        let cached = recent.clone().or_else(|| self.cache.get(token).filter(|id| id.generation == generation));
        if let Some(id) = cached {
            if id.principal.expires_at + self.leeway < crate::db::unix_now() {
                // moka's expiry is approximate; the token's own exp is not.
                return Err(TokenError::Expired);
            }
            let p = &id.principal;
            auth.check_revocation(p.session_id, p.user_id, p.issued_at, crate::db::unix_now())?;
            if recent.is_none() {
                self.remember(token, &id);
            }
            return Ok(id);
        }
        let id = Arc::new(Identity::new(auth.verify_bearer(token)?, generation));
        self.cache.insert(token.into(), Arc::clone(&id));
        self.remember(token, &id);
        Ok(id)
    }

    /// Puts a verified identity in this thread's map.
    fn remember(&self, token: &str, id: &Arc<Identity>) {
        RECENT.with_borrow_mut(|recent| {
            if recent.len() >= RECENT_MAX {
                recent.clear();
            }
            recent.insert(token.into(), (self.id, Arc::clone(id)));
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
