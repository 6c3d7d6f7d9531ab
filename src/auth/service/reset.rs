//! Password reset links: the flow for a user who forgot the password.
//!
//! `POST /auth/password/forgot` makes a link and hands its token to the
//! operator's mailer ([`crate::auth::webhook`]); `gateway user reset-token`
//! makes one for an operator to pass on. `POST /auth/password/reset`
//! with the token and a new password sets it, revokes every session of the
//! user (one may be the intruder's who made the user reset) and clears the
//! login lockout. It opens no session: the user logs in with the new
//! password, and with the second factor, which a reset does not touch (a
//! mailbox is not a second factor).
//!
//! The rules a link keeps:
//! - it is 256 random bits, stored hashed, valid `auth.password_reset.token_ttl`
//!   and once; a newer link of the same user voids it; it dies when the
//!   password changes by any path (it is bound to the password it was made
//!   against), and does nothing for a disabled user or tenant;
//! - `forgot` answers 202 at once whatever the email, and does its work
//!   (lookups, the link, the delivery) after answering, so neither the answer
//!   nor its timing tells whether the account exists; the audit log does
//!   (`password_reset_requested` with its `result`);
//! - a user gets at most one link a minute by `forgot` (a mailbox cannot be
//!   flooded), and the per-IP rate limit of the credential endpoints applies.

use std::sync::Arc;

use secrecy::SecretString;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::{normalize_email, rfc3339, tenant_slug, validate_email, Accounts, AuthService, ClientContext};
use crate::auth::refresh;
use crate::auth::webhook::Webhook;
use crate::auth::AuthError;
use crate::db::audit::NewAuditEvent;
use crate::db::password_resets::{NewReset, ResetMade, Unredeemed};
use crate::db::users::User;
use crate::db::{secs, unix_now};

/// The least time between two links `forgot` makes for one user, in seconds.
pub const RESET_MIN_INTERVAL: i64 = 60;

/// `forgot` requests whose work (lookups, link, delivery with its retries)
/// may run at once; past it a request is answered alike and does nothing
/// (counted as `overloaded`), so that a flood of requests from many
/// addresses cannot take the database connections logins need.
pub const MAX_RESET_TASKS: usize = 32;

/// The `type` of the webhook event that carries a link.
pub const RESET_EVENT: &str = "password_reset.requested";

/// A link's token and when it expires (unix seconds).
pub struct ResetLink {
    pub token: String,
    pub expires_at: i64,
}

impl std::fmt::Debug for ResetLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetLink").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// What a link is bound to: the SHA-256 of the password hash it was made
/// against.
fn fingerprint(password_hash: &str) -> [u8; 32] {
    Sha256::digest(password_hash.as_bytes()).into()
}

impl AuthService {
    /// With a mailer's webhook, `POST /auth/password/forgot` makes links
    /// and sends them there; without one it answers 404.
    #[must_use]
    pub fn with_reset_webhook(mut self, webhook: Option<Arc<Webhook>>) -> Self {
        self.reset_webhook = webhook;
        self
    }

    /// `POST /auth/password/forgot`: checks the request's shape and the
    /// rate limit, then answers; the rest runs after the answer (see the
    /// module docs).
    pub async fn forgot_password(
        &self,
        email: &str,
        tenant: Option<&str>,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        let Some(webhook) = self.reset_webhook.clone() else { return Err(AuthError::NotFound) };
        self.rate_limit(client.ip)?;
        let email = normalize_email(email);
        validate_email(&email).map_err(AuthError::InvalidRequest)?;
        let slug = tenant_slug(tenant)?;
        let Ok(permit) = Arc::clone(&self.reset_tasks).try_acquire_owned() else {
            metrics::counter!("gateway_password_reset_requests_total", "result" => "overloaded").increment(1);
            tracing::warn!("password reset requests are arriving faster than they are handled: one was dropped");
            return Ok(());
        };
        let this = self.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match this.send_reset_link(&webhook, &slug, &email).await {
                Ok((result, user)) => (result, user),
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "password reset request failed");
                    ("error", None)
                }
            };
            metrics::counter!("gateway_password_reset_requests_total", "result" => result.0).increment(1);
            let ip = client.ip.to_string();
            this.audit(NewAuditEvent {
                event: "password_reset_requested",
                tenant_id: result.1.as_ref().map(|u: &User| u.tenant_id),
                user_id: result.1.as_ref().map(|u| u.id),
                email: Some(&email),
                ip: Some(&ip),
                user_agent: client.user_agent.as_deref(),
                detail: Some(serde_json::json!({ "tenant": slug, "via": "email", "result": result.0 })),
            })
            .await;
        });
        Ok(())
    }

    /// The work `forgot` leaves for after its answer: why nothing was sent
    /// (`unknown_tenant`, `tenant_disabled`, `unknown_user`,
    /// `user_disabled`, `throttled`), or `sent`, or `delivery_failed`; and
    /// the user, if there is one.
    async fn send_reset_link(
        &self,
        webhook: &Webhook,
        slug: &str,
        email: &str,
    ) -> Result<(&'static str, Option<User>), AuthError> {
        let Some(tenant) = self.store.tenant_by_slug(slug).await? else { return Ok(("unknown_tenant", None)) };
        let Some(user) = self.store.user_by_email(tenant.id, email).await? else { return Ok(("unknown_user", None)) };
        if tenant.disabled {
            return Ok(("tenant_disabled", Some(user)));
        }
        if user.disabled {
            return Ok(("user_disabled", Some(user)));
        }
        let link = match self.accounts.make_reset_link(&user, RESET_MIN_INTERVAL).await? {
            Ok(link) => link,
            // Disabled since it was read.
            Err(ResetMade::Refused) => return Ok(("user_disabled", Some(user))),
            Err(_) => return Ok(("throttled", Some(user))),
        };
        let data = serde_json::json!({
            "tenant": tenant.slug,
            "user_id": user.id,
            "email": user.email,
            "token": link.token,
            "expires_at": rfc3339(link.expires_at),
        });
        match webhook.deliver(RESET_EVENT, data).await {
            Ok(_) => Ok(("sent", Some(user))),
            Err(_) => Ok(("delivery_failed", Some(user))),
        }
    }

    /// `POST /auth/password/reset`: sets the password of the link's user
    /// and revokes every session; [`AuthError::InvalidResetToken`] for a
    /// link that is unknown, spent, replaced, expired, made before the
    /// password last changed, or of a disabled user or tenant.
    pub async fn reset_password_with_link(
        &self,
        token: &str,
        password: &SecretString,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.rate_limit(client.ip)?;
        // Before the link is looked at: a weak password spends nothing.
        self.accounts.check_password_strength(password)?;
        let ip = client.ip.to_string();
        let fail = |reason: &'static str, user: Option<&User>| {
            let user = user.map(|u| (u.tenant_id, u.id, u.email.clone()));
            let ip = ip.clone();
            async move {
                metrics::counter!("gateway_password_resets_total", "result" => reason).increment(1);
                self.audit(NewAuditEvent {
                    event: "password_reset_failed",
                    tenant_id: user.as_ref().map(|u| u.0),
                    user_id: user.as_ref().map(|u| u.1),
                    email: user.as_ref().map(|u| u.2.as_str()),
                    ip: Some(&ip),
                    user_agent: client.user_agent.as_deref(),
                    detail: Some(serde_json::json!({ "reason": reason })),
                })
                .await;
                AuthError::InvalidResetToken
            }
        };
        // Tokens are 43 characters; a longer text is no token of ours.
        if token.is_empty() || token.len() > 128 {
            return Err(fail("unknown_link", None).await);
        }
        let Some(link) = self.store.pending_password_reset(&refresh::hash(token), unix_now()).await? else {
            return Err(fail("unknown_link", None).await);
        };
        let Some(user) = self.store.user_by_id(link.tenant_id, link.user_id).await? else {
            return Err(fail("unknown_link", None).await);
        };
        let Some(tenant) = self.store.tenant_by_id(user.tenant_id).await? else {
            return Err(fail("unknown_link", None).await);
        };
        if user.disabled || tenant.disabled {
            return Err(fail(if user.disabled { "user_disabled" } else { "tenant_disabled" }, Some(&user)).await);
        }
        if !bool::from(fingerprint(&user.password_hash).ct_eq(&link.password_fingerprint)) {
            return Err(fail("password_changed", Some(&user)).await);
        }
        let hash = self.hasher.hash(password).await?;
        let revoked = match self.store.redeem_password_reset(&link, &user.password_hash, &hash, unix_now()).await? {
            Ok(revoked) => revoked,
            Err(gone) => {
                let reason = match gone {
                    Unredeemed::LinkGone => "link_spent_meanwhile",
                    Unredeemed::UserChanged => "user_changed_meanwhile",
                };
                return Err(fail(reason, Some(&user)).await);
            }
        };
        for id in &revoked {
            self.authenticator.revocations().revoke_session(*id);
        }
        metrics::counter!("gateway_password_resets_total", "result" => "success").increment(1);
        self.audit(NewAuditEvent {
            event: "password_reset",
            tenant_id: Some(user.tenant_id),
            user_id: Some(user.id),
            email: Some(&user.email),
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(serde_json::json!({ "via": "link", "sessions_revoked": revoked.len() })),
        })
        .await;
        // The user proved the mailbox and chose a new password: a lock
        // earned by someone guessing the old one no longer keeps them out.
        // The password is set whatever happens here: a failure is logged,
        // not answered (the lock then runs its course).
        if let Err(e) = self.store.clear_login_attempts(&tenant.slug, &user.email).await {
            tracing::warn!(error = %e, "could not clear the lockout after a password reset");
        }
        Ok(())
    }
}

impl Accounts {
    /// Makes a link for `user` (voiding its earlier ones), or says why not:
    /// the user got one less than `min_interval` seconds ago, or the user
    /// or its tenant is disabled.
    pub(super) async fn make_reset_link(
        &self,
        user: &User,
        min_interval: i64,
    ) -> Result<Result<ResetLink, ResetMade>, AuthError> {
        let (token, token_hash) = refresh::generate().map_err(|e| AuthError::Unexpected(anyhow::anyhow!(e)))?;
        let now = unix_now();
        let expires_at = now + secs(self.reset_token_ttl);
        let made = self
            .store
            .create_password_reset(NewReset {
                tenant_id: user.tenant_id,
                user_id: user.id,
                token_hash: &token_hash,
                password_fingerprint: &fingerprint(&user.password_hash),
                now,
                expires_at,
                min_interval,
            })
            .await?;
        Ok(match made {
            ResetMade::Made => Ok(ResetLink { token, expires_at }),
            other => Err(other),
        })
    }

    /// A link for an operator to hand to the user (the CLI's `user
    /// reset-token`); earlier links of the user stop working.
    pub async fn reset_link(&self, tenant_id: Uuid, email: &str) -> Result<ResetLink, AuthError> {
        let email = normalize_email(email);
        let user = self.store.user_by_email(tenant_id, &email).await?.ok_or(AuthError::NotFound)?;
        if user.disabled {
            return Err(AuthError::InvalidRequest(format!(
                "email: {email:?} is disabled; a link would not work (`gateway user enable` first)"
            )));
        }
        let link = match self.make_reset_link(&user, 0).await? {
            Ok(link) => link,
            Err(ResetMade::Refused) => {
                return Err(AuthError::InvalidRequest(format!(
                    "email: {email:?} or its tenant is disabled; a link would not work"
                )))
            }
            Err(ResetMade::Throttled | ResetMade::Made) => {
                return Err(AuthError::Unexpected(anyhow::anyhow!(
                    "a reset link without a minimum interval was not made"
                )))
            }
        };
        let detail =
            serde_json::json!({ "via": "operator", "result": "issued", "expires_at": rfc3339(link.expires_at) });
        self.audit_change("password_reset_requested", &user, Some(detail)).await;
        Ok(link)
    }
}
