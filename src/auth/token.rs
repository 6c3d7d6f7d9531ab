//! Access tokens: EdDSA-signed JWTs with `typ: at+jwt` (RFC 9068).
//!
//! Verification trusts nothing in the header but `kid`, and only to pick one
//! of our own keys: the algorithm is pinned to EdDSA, `jku`/`x5u`/`jwk` are
//! never followed, and an unknown kid is a failure (no "try every key").
//! `iss`, `aud`, `exp`, `nbf` and `iat` are checked with the configured leeway.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::KeyRing;

/// The claims of our access tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: Uuid,
    pub tid: Uuid,
    pub sid: Uuid,
    pub jti: Uuid,
    pub iat: i64,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub roles: Vec<String>,
    /// Space-separated, as in OAuth.
    pub scope: String,
    /// How the session's login authenticated (RFC 8176, [`Amr`]). Absent
    /// from tokens minted before it existed: read as a password alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
}

/// How a session's login proved who the user is, kept with the session so
/// that its refreshed tokens say the same: the first factor, a password
/// (`pwd`) or a link mailed to the user's address (`email`, the value
/// Okta and others use: RFC 8176 names none for a mailbox), and whether a
/// second factor followed (`otp`, `mfa`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amr {
    /// The first factor was a sign-in link, not a password.
    pub link: bool,
    /// A TOTP code or a recovery code followed it.
    pub mfa: bool,
}

impl Amr {
    /// The token's `amr` claim.
    pub fn values(self) -> &'static [&'static str] {
        match (self.link, self.mfa) {
            (false, false) => &["pwd"],
            (false, true) => &["pwd", "otp", "mfa"],
            (true, false) => &["email"],
            (true, true) => &["email", "otp", "mfa"],
        }
    }

    /// What a token's `amr` claim says (absent: a password alone).
    pub fn read(claim: &[String]) -> Self {
        Amr { link: claim.first().is_some_and(|m| m == "email"), mfa: claim.iter().any(|m| m == "otp") }
    }
}

/// Why a token was refused. Clients only ever see `invalid_token`; the
/// variant goes to metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm is not EdDSA")]
    Algorithm,
    #[error("typ is not at+jwt")]
    Type,
    #[error("unknown or missing kid")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    Immature,
    #[error("wrong issuer or audience")]
    Audience,
    #[error("session revoked")]
    Revoked,
    #[error("issued before the revocation state went stale")]
    Stale,
}

impl TokenError {
    /// A short label for the `reason` metric dimension.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::Type => "type",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::Immature => "immature",
            TokenError::Audience => "audience",
            TokenError::Revoked => "revoked",
            TokenError::Stale => "stale_revocation_state",
        }
    }
}

const TYP: &str = "at+jwt";

/// Signs tokens with the ring's newest key.
pub fn sign(keys: &KeyRing, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
    sign_typed(keys, TYP, claims)
}

/// `claims` as a JWT of type `typ`, signed with the ring's newest key.
fn sign_typed(keys: &KeyRing, typ: &str, claims: &impl Serialize) -> Result<String, jsonwebtoken::errors::Error> {
    let (kid, key) = keys.signer();
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(typ.to_owned());
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key)
}

/// The claims of an identity assertion (a route's `jwt_assertion`): the
/// verified token's identity, restated for one audience.
#[derive(Debug, Serialize)]
pub struct AssertionClaims<'a> {
    pub iss: &'a str,
    pub aud: &'a str,
    pub sub: Uuid,
    pub tid: Uuid,
    pub sid: Uuid,
    pub jti: Uuid,
    pub iat: i64,
    pub exp: i64,
    pub roles: &'a [String],
    /// Space-separated, as in the access token.
    pub scope: String,
    /// As in the access token ([`Amr`]).
    pub amr: &'static [&'static str],
}

/// Signs an identity assertion with the ring's newest key, typed `JWT`:
/// never `at+jwt`, so that [`TokenRules::verify`] refuses it whatever its
/// audience.
pub fn sign_assertion(keys: &KeyRing, claims: &AssertionClaims<'_>) -> Result<String, jsonwebtoken::errors::Error> {
    sign_typed(keys, "JWT", claims)
}

/// Issuer/audience/leeway settings for verification, built once.
#[derive(Debug, Clone)]
pub struct TokenRules {
    validation: Validation,
    leeway: i64,
    issuer: String,
}

impl TokenRules {
    pub fn new(issuer: &str, audience: &str, leeway_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Self { validation, leeway: i64::try_from(leeway_secs).unwrap_or(0), issuer: issuer.to_owned() }
    }

    /// `auth.issuer`, which the gateway's tokens and assertions carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Checks signature and claims (not revocation) at unix time `now`.
    pub fn verify(&self, keys: &KeyRing, token: &str, now: i64) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Algorithm);
        }
        let typ_ok = header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(TYP) || t.eq_ignore_ascii_case("application/at+jwt"));
        if !typ_ok {
            return Err(TokenError::Type);
        }
        let key = header.kid.as_deref().and_then(|kid| keys.verifier(kid)).ok_or(TokenError::UnknownKey)?;
        // An expired token is refused before its signature is checked: a
        // client replaying a dead token (or a flood of them) would otherwise
        // cost a full Ed25519 verification per request, since only valid
        // tokens are cached. Refusing without verifying is always safe.
        if unverified_exp(token).is_some_and(|exp| exp.saturating_add(self.leeway) < now) {
            return Err(TokenError::Expired);
        }
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => TokenError::Signature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::Immature,
            ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => TokenError::Audience,
            _ => TokenError::Malformed,
        })?;
        if data.claims.iat > now + self.leeway {
            return Err(TokenError::Immature);
        }
        Ok(data.claims)
    }
}

/// The `exp` claim of a token, read without checking anything else. Only
/// ever used to refuse a token early.
fn unverified_exp(token: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Exp {
        exp: i64,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).ok()?;
    serde_json::from_slice::<Exp>(&json).ok().map(|e| e.exp)
}

#[cfg(test)]
pub(crate) mod tests;
