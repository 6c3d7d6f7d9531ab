//! Authentication: who the caller is, and whether that still holds.
//!
//! - [`password`]: Argon2id hashing on the blocking pool.
//! - [`keys`]: the Ed25519 key ring (newest signs, all verify).
//! - [`token`]: access-token JWTs, signing and verification.
//! - [`refresh`]: opaque refresh tokens, stored hashed.
//! - [`revocation`]: the in-memory revocation state and its poller.
//! - [`ratelimit`]: the per-IP limit on credential endpoints.
//! - [`seal`]: the TOTP secrets and the waiting mailer deliveries,
//!   encrypted in the database.
//! - [`service`]: the flows (login, refresh, logout, …) built from the above.
//! - [`webhook`]: signed deliveries to the operator's mailer (mailed links
//!   and notices); [`outbox`] keeps those it has not taken and sends them
//!   later.
//!
//! [`Authenticator::verify_bearer`] is the single function every protected
//! request goes through, here and in the proxy: signature and claims, then
//! the revocation state. It does no database I/O.

pub mod error;
pub mod keys;
pub mod outbox;
pub mod password;
pub mod ratelimit;
pub mod refresh;
pub mod revocation;
pub mod seal;
pub mod service;
pub mod token;
pub mod totp;
pub mod webhook;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use uuid::Uuid;

pub use error::AuthError;
use keys::KeyRing;
use revocation::{RevocationState, Seen, Subject};
use token::{TokenError, TokenRules};

/// Why no bearer token could be taken from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization` header.
    Missing,
    /// More than one `Authorization` header: ambiguous, so refused.
    Duplicate,
    /// Not `Bearer <token>`.
    Malformed,
}

/// The text after `Bearer ` in the only `Authorization` header. Tokens are
/// taken from this header only, never from a query parameter or a cookie.
///
/// Returned as bytes, all of them ASCII (so `str::from_utf8` on them cannot
/// fail): the proxy's token cache is keyed by bytes and only a token it has
/// not seen needs the text.
pub fn bearer_token(headers: &hyper::HeaderMap) -> Result<&[u8], BearerError> {
    let mut values = headers.get_all(hyper::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(BearerError::Missing)?;
    if values.next().is_some() {
        return Err(BearerError::Duplicate);
    }
    bearer_value(value.as_bytes())
}

/// The token in one `Authorization` value (`Bearer <token>`, the scheme in
/// any case): ASCII only, as `to_str` would have it (it also refuses control
/// bytes, which never get into a value, so only ASCII whitespace is
/// trimmed), but on bytes, a word at a time where it can: `to_str` goes byte
/// by byte over a token of several hundred bytes.
pub fn bearer_value(bytes: &[u8]) -> Result<&[u8], BearerError> {
    let space = bytes.iter().position(|&b| b == b' ').ok_or(BearerError::Malformed)?;
    let (scheme, rest) = (&bytes[..space], &bytes[space + 1..]);
    let token = rest.trim_ascii();
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.is_empty() || !token.is_ascii() {
        return Err(BearerError::Malformed);
    }
    Ok(token)
}

/// While the revocation state is stale, tokens issued before the staleness
/// window are refused (part of [`Authenticator::check_revocation`]).
pub fn check_staleness(seen: Seen, iat: i64) -> Result<(), TokenError> {
    if seen.refuses_as_stale(iat) {
        return Err(TokenError::Stale);
    }
    Ok(())
}

/// The authenticated caller, as proven by a verified, unrevoked access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    pub tenant_id: Uuid,
    pub session_id: Uuid,
    pub token_id: Uuid,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// Unix time the token was issued.
    pub issued_at: i64,
    /// Unix time the token expires.
    pub expires_at: i64,
    /// How the session's login authenticated (the token's `amr`): with a
    /// password or a sign-in link, and whether a second factor followed.
    pub amr: token::Amr,
}

impl Principal {
    /// What of the token the revocation state judges.
    pub fn subject(&self) -> Subject {
        Subject { session: self.session_id, user: self.user_id, tenant: self.tenant_id, iat: self.issued_at }
    }
}

/// Verifies access tokens against the key ring and the revocation state.
#[derive(Clone)]
pub struct Authenticator {
    keys: Arc<ArcSwap<KeyRing>>,
    /// Bumped on every key-ring change, so caches of verified tokens can
    /// tell an entry verified against an older ring.
    generation: Arc<AtomicU64>,
    rules: Arc<TokenRules>,
    revocations: RevocationState,
    /// Shared by clones; unique among authenticators.
    id: u64,
}

impl Authenticator {
    pub fn new(keys: KeyRing, rules: TokenRules, revocations: RevocationState) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            keys: Arc::new(ArcSwap::from_pointee(keys)),
            generation: Arc::new(AtomicU64::new(0)),
            rules: Arc::new(rules),
            revocations,
        }
    }

    /// The current key ring (cheap: an atomic load).
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeyRing>> {
        self.keys.load()
    }

    /// Adopts a reloaded key ring; in-flight checks finish on the old one.
    pub fn replace_keys(&self, ring: KeyRing) {
        self.keys.store(Arc::new(ring));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes whenever the key ring does.
    pub fn key_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn revocations(&self) -> &RevocationState {
        &self.revocations
    }

    /// Revoked sessions, and disabled users and tenants, are refused; while
    /// the revocation state is stale, so is every token issued before the
    /// staleness window.
    pub fn check_revocation(&self, token: &Subject, now: i64) -> Result<(), TokenError> {
        self.check_revocation_as_of(self.revocations.seen(now), token)
    }

    /// [`Self::check_revocation`], with the state as read before it
    /// (`seen`): read after the lookups, a refresh that landed in between
    /// could vouch for a state they did not see.
    pub fn check_revocation_as_of(&self, seen: Seen, token: &Subject) -> Result<(), TokenError> {
        if self.revocations.is_revoked(token) {
            return Err(TokenError::Revoked);
        }
        check_staleness(seen, token.iat)
    }

    /// Tells this authenticator's state apart from another's (caches keyed
    /// by its generation and revocation counts, which start at 0 in every
    /// authenticator).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `auth.issuer`, as the running process signs with it.
    pub fn issuer(&self) -> &str {
        self.rules.issuer()
    }

    /// Verifies `token` (the text after `Bearer `) and returns its principal.
    pub fn verify_bearer(&self, token: &str) -> Result<Principal, TokenError> {
        let now = crate::db::unix_now();
        let claims = self.rules.verify(&self.keys.load(), token, now)?;
        let subject = Subject { session: claims.sid, user: claims.sub, tenant: claims.tid, iat: claims.iat };
        self.check_revocation(&subject, now)?;
        Ok(Principal {
            user_id: claims.sub,
            tenant_id: claims.tid,
            session_id: claims.sid,
            token_id: claims.jti,
            roles: claims.roles,
            scopes: claims.scope.split_whitespace().map(str::to_owned).collect(),
            issued_at: claims.iat,
            expires_at: claims.exp,
            amr: token::Amr::read(&claims.amr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(AUTHORIZATION, HeaderValue::from_bytes(v).expect("a header value"));
        }
        headers
    }

    #[test]
    fn bearer_token_forms() {
        assert_eq!(bearer_token(&with(&[b"Bearer abc.def"])), Ok(&b"abc.def"[..]));
        assert_eq!(bearer_token(&with(&[b"bearer \tabc "])), Ok(&b"abc"[..]));
        assert_eq!(bearer_token(&with(&[])), Err(BearerError::Missing));
        assert_eq!(bearer_token(&with(&[b"Bearer a", b"Bearer b"])), Err(BearerError::Duplicate));
        for bad in [&b"Basic abc"[..], b"Bearer ", b"Bearer", b"abc"] {
            assert_eq!(bearer_token(&with(&[bad])), Err(BearerError::Malformed), "{bad:?}");
        }
    }

    /// Non-ASCII bytes (obs-text) are refused, not trimmed away: a no-break
    /// space around a valid token must not make it acceptable.
    #[test]
    fn non_ascii_around_a_token_is_malformed() {
        for bad in [&b"Bearer \xc2\xa0abc.def"[..], b"Bearer abc.def\xe3\x80\x80", b"Bearer abc\xffdef"] {
            assert_eq!(bearer_token(&with(&[bad])), Err(BearerError::Malformed), "{bad:?}");
        }
    }
}
