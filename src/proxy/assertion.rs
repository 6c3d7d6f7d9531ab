//! Identity assertions (a route's `jwt_assertion`): the caller's identity,
//! signed by the gateway for one audience, so that a backend can check who
//! sent a request without trusting the network it came over.
//!
//! An Ed25519 signature costs tens of microseconds, more than the rest of
//! the proxy path, so an assertion is not signed per request. It is signed
//! once per verified token and audience, kept with the token's
//! [`super::identity::Identity`], and reused until half its lifetime has
//! passed; then the next request signs a fresh one, so an assertion handed
//! out always has at least half of [`LIFETIME`] left. It never outlives
//! the token: one whose `exp` is the token's own is reused until the token
//! dies, since signing again could not make it last longer. A key rotation
//! clears the token cache, and with it the assertions signed with the old
//! key.
//!
//! Revocation: a logout stops new assertions at once (the token is refused
//! first), but one already handed out stays valid until its `exp`, at most
//! [`LIFETIME`] seconds. An assertion is not bound to one request (many
//! carry the same `jti`): it proves who, within that window, not which
//! request. Within `auth.leeway` after the token's `exp`, the gateway still
//! takes the token but the assertion it forwards has expired: backends
//! should allow the same leeway.

use std::sync::{Mutex, PoisonError};

use hyper::header::HeaderValue;
use uuid::Uuid;

use super::error::ProxyError;
use crate::auth::token::{sign_assertion, AssertionClaims};
use crate::auth::{Authenticator, Principal};

/// Longest an assertion is valid, in seconds.
pub const LIFETIME: i64 = 60;

/// Audiences kept per token: a token used on more routes with assertions
/// than this signs again for the oldest (correct, just slower).
const MAX_AUDIENCES: usize = 8;

/// The assertions signed for one verified token, by audience.
#[derive(Debug, Default)]
pub struct Assertions(Mutex<Vec<Signed>>);

#[derive(Debug)]
struct Signed {
    audience: Box<str>,
    value: HeaderValue,
    /// Its `iat`: a clock set back before it signs afresh too.
    iat: i64,
    /// Unix time from which the next request signs a fresh one.
    renew_at: i64,
}

impl Assertions {
    /// The assertion of `principal` for `audience` at unix time `now`.
    /// Signing holds the lock, so that concurrent requests with one token
    /// sign once, not once each.
    pub fn get(
        &self,
        principal: &Principal,
        audience: &str,
        authenticator: &Authenticator,
        now: i64,
    ) -> Result<HeaderValue, ProxyError> {
        let mut signed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let at = signed.iter().position(|s| &*s.audience == audience);
        if let Some(s) = at.map(|i| &signed[i]).filter(|s| s.iat <= now && now < s.renew_at) {
            return Ok(s.value.clone());
        }
        let exp = (now + LIFETIME).min(principal.expires_at);
        // Within the leeway after the token's `exp`, the assertion carries
        // that `exp` (already past), with `iat` no later.
        let iat = now.min(exp);
        let claims = AssertionClaims {
            iss: authenticator.issuer(),
            aud: audience,
            sub: principal.user_id,
            tid: principal.tenant_id,
            sid: principal.session_id,
            jti: Uuid::new_v4(),
            iat,
            exp,
            roles: &principal.roles,
            scope: principal.scopes.join(" "),
            amr: principal.amr.values(),
        };
        let text = sign_assertion(&authenticator.keys(), &claims).map_err(|e| {
            tracing::error!(error = %e, "signing an identity assertion");
            ProxyError::Internal
        })?;
        // Base64url and dots: always a valid header value.
        let value = HeaderValue::from_str(&text).map_err(|_| ProxyError::Internal)?;
        let renew_at = if exp == principal.expires_at { i64::MAX } else { iat + LIFETIME / 2 };
        let fresh = Signed { audience: audience.into(), value: value.clone(), iat, renew_at };
        match at {
            Some(i) => signed[i] = fresh,
            None => {
                if signed.len() == MAX_AUDIENCES {
                    signed.remove(0);
                }
                signed.push(fresh);
            }
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests;
