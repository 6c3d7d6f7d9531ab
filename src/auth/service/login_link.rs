//! Sign-in links ("magic links"): with `auth.login_link.enabled`, a user
//! may sign in with a link mailed to the account's address instead of the
//! password.
//!
//! `POST /auth/login/link` asks for one (see [`super::links`] for what
//! every mailed link keeps: the answer is a 202 that tells nothing about
//! the account, one link a minute, only the newest works, a disable voids
//! it); `POST /auth/login/link/confirm` with the token opens a session,
//! whose tokens say so (`amr: ["email"]`, with `otp` and `mfa` after a
//! second factor) for as long as it is refreshed.
//!
//! What it keeps:
//! - **A mailbox is not a second factor.** A user who has one gives the
//!   code with the link, as with the password: without it the answer is
//!   `mfa_required` and the link stays unspent; a wrong code counts towards
//!   the factor's lock ([`super::MAX_OTP_FAILURES`]) as at a login.
//! - **Only to a proved address.** No link is made for a user whose email
//!   is not verified: the owner of a mailbox that someone else registered
//!   would be signed in to an account whose password that someone chose.
//!   (They use a password reset, which replaces it.) For the same reason
//!   `config check` refuses links with open registration that does not
//!   require verification, where every registered address counts as
//!   proved.
//! - **Bound to the address and the password hash.** A link dies when the
//!   user moves to another address, or when the password changes (a reset
//!   after a compromise kills the links mailed before it).
//! - **Spent by the session's opening**, in its transaction: of two
//!   requests presenting one link, one opens a session; a link whose
//!   session could not open (the user changed meanwhile) stays unspent.
//!   A sign-out everywhere voids the user's links (one may have been read
//!   by someone else).
//! - **The code is spent first**, as at a login: a TOTP step (or a
//!   recovery code) given with a link that another request spent a moment
//!   before is used up all the same.
//! - **Bound to the asking app, if it wants** (PKCE, RFC 7636, S256 only):
//!   a link asked for with a `code_challenge` opens a session only for a
//!   confirmation that presents its `code_verifier`, so that a link read
//!   by someone else (a forwarded mail, a scanner that logs what it opens)
//!   signs nobody in elsewhere; `require_code_challenge` makes every
//!   request carry one. A verifier presented for a link asked for without
//!   a challenge is refused too (a downgrade).
//! - **Not held back by the login lockout.** The (tenant, email) lock stops
//!   password guessing; a link cannot be guessed, and the owner of a
//!   locked account can still sign in with one. The lock is not cleared:
//!   whoever was guessing still faces it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::links::LOGIN;
use super::{AuthService, ClientContext, TokenPair};
use crate::auth::AuthError;
use crate::db::audit::NewAuditEvent;
use crate::db::email_links::{LinkPurpose, PendingLink};

/// The metric of presented sign-in links, by result.
const LOGINS_BY_LINK: &str = "gateway_login_links_total";

impl AuthService {
    /// `POST /auth/login/link`: a sign-in link for `email`, mailed after the
    /// answer if the account may have one; [`AuthError::NotFound`] when
    /// sign-in links are off.
    pub async fn request_login_link(
        &self,
        email: &str,
        tenant: Option<&str>,
        code_challenge: Option<&str>,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        if !self.config.login_link.enabled {
            return Err(AuthError::NotFound);
        }
        match code_challenge {
            Some(c) if !is_challenge(c) => {
                return Err(AuthError::InvalidRequest(
                    "code_challenge must be the base64url SHA-256 of the code_verifier (43 characters, S256)".into(),
                ))
            }
            None if self.config.login_link.require_code_challenge => {
                return Err(AuthError::InvalidRequest("a code_challenge is required (PKCE, S256)".into()))
            }
            _ => {}
        }
        self.mail_link(&LOGIN, (email, tenant), code_challenge.map(str::to_owned), "email", client).await
    }

    /// `POST /auth/login/link/confirm`: opens a session for the link's user,
    /// given the TOTP code (`otp`, or a recovery code) of a user who has a
    /// second factor. [`AuthError::InvalidLoginLink`] for a link that is
    /// unknown, spent, replaced, expired, mailed before the password or the
    /// address changed, or of a disabled user or tenant;
    /// [`AuthError::MfaRequired`] without a code (the link stays unspent),
    /// [`AuthError::InvalidCredentials`] with a wrong, spent or locked one.
    pub async fn login_with_link(
        &self,
        token: &str,
        otp: Option<&str>,
        code_verifier: Option<&str>,
        client: &ClientContext,
    ) -> Result<TokenPair, AuthError> {
        if !self.config.login_link.enabled {
            return Err(AuthError::NotFound);
        }
        self.rate_limit(client.ip)?;
        let (link, user, _tenant) = match self.presented_link(LinkPurpose::Login, token).await? {
            Ok(found) => found,
            Err((reason, user)) => return Err(self.link_login_failed(reason, user.as_ref(), client).await),
        };
        if let Some(reason) = verifier_refusal(&link, code_verifier) {
            return Err(self.link_login_failed(reason, Some(&user), client).await);
        }
        if let Some(reason) = self.second_factor(&user, otp, client).await? {
            return Err(self.link_login_failed(reason, Some(&user), client).await);
        }
        let pair = match self.open_session(&user, &user.password_hash, Some(&link), client).await? {
            Ok(pair) => pair,
            Err(reason) => return Err(self.link_login_failed(reason, Some(&user), client).await),
        };
        metrics::counter!(LOGINS_BY_LINK, "result" => "success").increment(1);
        metrics::counter!("gateway_logins_total", "result" => "success").increment(1);
        let ip = client.ip.to_string();
        self.audit(NewAuditEvent {
            event: "login_succeeded",
            tenant_id: Some(user.tenant_id),
            user_id: Some(user.id),
            email: Some(&user.email),
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(serde_json::json!({ "via": "link" })),
        })
        .await;
        Ok(pair)
    }

    /// Counts (as a failed login too) and audits a refused confirmation,
    /// and says what to answer: `mfa_required` for a code not given,
    /// `invalid_credentials` for a wrong, spent or locked one, else
    /// `invalid_login_link`.
    async fn link_login_failed(
        &self,
        reason: &'static str,
        user: Option<&crate::db::users::User>,
        client: &ClientContext,
    ) -> AuthError {
        metrics::counter!("gateway_logins_total", "result" => "failure").increment(1);
        self.link_refused("login_link_failed", LOGINS_BY_LINK, reason, user, client).await;
        match reason {
            "mfa_required" => AuthError::MfaRequired,
            "wrong_otp" | "otp_reused" | "wrong_recovery_code" | "mfa_locked" => AuthError::InvalidCredentials,
            _ => AuthError::InvalidLoginLink,
        }
    }
}

/// Whether `text` can be an S256 challenge: 43 base64url characters (32
/// bytes).
fn is_challenge(text: &str) -> bool {
    text.len() == 43 && URL_SAFE_NO_PAD.decode(text).is_ok_and(|bytes| bytes.len() == 32)
}

/// Why `verifier` does not answer the link's challenge (`no_code_verifier`,
/// `wrong_code_verifier`, or `unexpected_code_verifier` for a link asked
/// for without one), compared in constant time; `None` when it does, or
/// when neither is there.
fn verifier_refusal(link: &PendingLink, verifier: Option<&str>) -> Option<&'static str> {
    match (link.code_challenge.as_deref(), verifier) {
        (None, None) => None,
        (None, Some(_)) => Some("unexpected_code_verifier"),
        (Some(_), None) => Some("no_code_verifier"),
        (Some(challenge), Some(verifier)) => {
            // RFC 7636 §4.1: 43 to 128 unreserved characters.
            let shaped = (43..=128).contains(&verifier.len())
                && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            let answer = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
            let right = bool::from(answer.as_bytes().ct_eq(challenge.as_bytes()));
            (!(shaped && right)).then_some("wrong_code_verifier")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(challenge: Option<&str>) -> PendingLink {
        PendingLink {
            id: uuid::Uuid::nil(),
            tenant_id: uuid::Uuid::nil(),
            user_id: uuid::Uuid::nil(),
            fingerprint: Vec::new(),
            new_email: None,
            code_challenge: challenge.map(str::to_owned),
            expires_at: 0,
        }
    }

    #[test]
    fn a_verifier_answers_its_s256_challenge_only() {
        // RFC 7636, appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(is_challenge(challenge));
        for bad in ["", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-c", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw+cM"] {
            assert!(!is_challenge(bad), "{bad:?}");
        }
        assert_eq!(verifier_refusal(&link(Some(challenge)), Some(verifier)), None);
        assert_eq!(verifier_refusal(&link(None), None), None);
        assert_eq!(verifier_refusal(&link(Some(challenge)), None), Some("no_code_verifier"));
        assert_eq!(verifier_refusal(&link(None), Some(verifier)), Some("unexpected_code_verifier"));
        let other = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK";
        assert_eq!(verifier_refusal(&link(Some(challenge)), Some(other)), Some("wrong_code_verifier"));
        // The challenge itself is no verifier, nor is a verifier too short.
        assert_eq!(verifier_refusal(&link(Some(challenge)), Some(challenge)), Some("wrong_code_verifier"));
        let short = "abc";
        let short_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(short));
        assert_eq!(verifier_refusal(&link(Some(&short_challenge)), Some(short)), Some("wrong_code_verifier"));
    }
}
