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
}

impl IdentityCache {
    pub fn new(capacity: u64, leeway: Duration) -> Self {
        let leeway = crate::db::secs(leeway);
        let cache = Cache::builder()
            .max_capacity(capacity)
            .expire_after(UntilExp { leeway })
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self { cache, leeway }
    }

    /// Verifies `token` (cached), then checks revocation (always).
    pub fn verify(&self, auth: &Authenticator, token: &str) -> Result<Arc<Identity>, TokenError> {
        // Read before verifying: an entry verified while the ring changes
        // carries the old generation and is never trusted afterwards.
        let generation = auth.key_generation();
        if let Some(id) = self.cache.get(token).filter(|id| id.generation == generation) {
            if id.principal.expires_at + self.leeway < crate::db::unix_now() {
                // moka's expiry is approximate; the token's own exp is not.
                return Err(TokenError::Expired);
            }
            let p = &id.principal;
            auth.check_revocation(p.session_id, p.user_id, p.issued_at, crate::db::unix_now())?;
            return Ok(id);
        }
        let id = Arc::new(Identity::new(auth.verify_bearer(token)?, generation));
        self.cache.insert(token.into(), Arc::clone(&id));
        Ok(id)
    }

    pub fn clear(&self) {
        self.cache.invalidate_all();
    }
}
