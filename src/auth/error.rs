//! The auth boundary's error: what went wrong, in terms a caller can act on.
//! `api::error` is the one place that maps these to HTTP statuses and codes.

use super::password::PasswordError;
use super::token::TokenError;
use crate::db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The request is malformed (bad JSON, missing or oversized field).
    #[error("{0}")]
    InvalidRequest(String),
    /// Unknown tenant, unknown email, wrong password or disabled user, a
    /// right password while the email must still be proved, a wrong, spent
    /// or locked code (with a password or a sign-in link): one answer for
    /// all, so the response reveals nothing.
    #[error("invalid email or password")]
    InvalidCredentials,
    /// This (tenant, email) is locked after too many failures.
    #[error("too many failed attempts; try again later")]
    TooManyAttempts { retry_after: u64 },
    /// This client IP sent too many requests.
    #[error("too many requests; slow down")]
    RateLimited { retry_after: u64 },
    /// The refresh token is unknown, spent, expired or revoked.
    #[error("the refresh token is invalid, expired or revoked")]
    InvalidGrant,
    /// No bearer token was sent.
    #[error("a bearer access token is required")]
    MissingToken,
    /// The bearer token was refused; the reason is for logs and metrics only.
    #[error("the access token is invalid, expired or revoked")]
    InvalidToken(TokenError),
    #[error("not found")]
    NotFound,
    #[error("this email is already registered")]
    EmailTaken,
    /// A tenant with this slug exists.
    #[error("a tenant with this slug exists")]
    TenantExists,
    /// The password (or the sign-in link) was right, and the user has a
    /// second factor: the login must carry a TOTP code (`otp`).
    #[error("this account needs a one-time code (otp)")]
    MfaRequired,
    /// The code does not confirm the second factor being set up.
    #[error("the code is not valid for the secret being set up")]
    InvalidCode,
    /// A second factor is already set: remove it before setting another.
    #[error("a second factor is already set up")]
    MfaEnabled,
    /// Registration into a tenant an operator disabled.
    #[error("this tenant is disabled")]
    TenantDisabled,
    #[error("{0}")]
    WeakPassword(String),
    /// A password reset link that is unknown, spent, replaced, expired,
    /// made before the password last changed, or of a disabled account.
    #[error("the reset link is invalid or expired; ask for a new one")]
    InvalidResetToken,
    /// A verification link that is unknown, spent, replaced, expired, of
    /// another email, or of a disabled account.
    #[error("the verification link is invalid or expired; ask for a new one")]
    InvalidVerificationToken,
    /// An email change link that is unknown, spent, replaced, expired,
    /// made before the email or password last changed, or of a disabled
    /// account.
    #[error("the email change link is invalid or expired; ask for a new one")]
    InvalidEmailChangeToken,
    /// A revert link that is unknown, spent, voided or expired, or of a
    /// disabled account.
    #[error("the revert link is invalid or expired")]
    InvalidRevertToken,
    /// A sign-in link that is unknown, spent, replaced, expired, mailed
    /// before the password or the address changed, or of a disabled
    /// account.
    #[error("the sign-in link is invalid or expired; ask for a new one")]
    InvalidLoginLink,
    /// The database cannot be reached: retry later.
    #[error("the service is temporarily unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Unexpected(#[source] anyhow::Error),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => AuthError::Unavailable(e),
            other => AuthError::Unexpected(other.into()),
        }
    }
}

impl From<PasswordError> for AuthError {
    fn from(e: PasswordError) -> Self {
        AuthError::Unexpected(e.into())
    }
}
