//! Links mailed to users: what password resets ([`super::reset`]), email
//! verifications ([`super::verify`]), email changes and their reverts
//! ([`super::email_change`]) and sign-in links ([`super::login_link`])
//! share.
//!
//! A link is a token (256 random bits, base64url), stored hashed in
//! `email_links` ([`crate::db::email_links`]), valid for its kind's
//! lifetime and once, voided by a newer link of its kind (not a revert
//! link: see [`crate::db::email_links`]) and by a user or tenant disable,
//! and bound to what it acts on (the password hash it may replace; the
//! email it proves).
//!
//! Asking for one (`forgot`, `resend`, a sign-in link) tells nothing about the account: the
//! request's shape and the per-IP limit are checked, and the answer is a
//! 202 before anything is looked up; the lookups, the link and the delivery
//! to the operator's mailer ([`crate::auth::webhook`], kept by
//! [`crate::auth::outbox`] until the mailer takes it) run after it,
//! bounded by [`MAX_LINK_TASKS`] at once. The audit log records what was
//! done (`<kind>_requested` with a `result`). A user gets at most one link
//! of a kind a minute this way, so a mailbox cannot be flooded.

use std::future::Future;
use std::sync::Arc;

use secrecy::SecretString;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::OwnedSemaphorePermit;

use super::{normalize_email, rfc3339, tenant_slug, validate_email, Accounts, AuthService, ClientContext};
use crate::auth::outbox::Outbox;
use crate::auth::password::Verdict;
use crate::auth::refresh;
use crate::auth::AuthError;
use crate::db::audit::NewAuditEvent;
use crate::db::email_links::{FactorRead, LinkMade, LinkPurpose, NewLink, PendingLink, Unredeemed};
use crate::db::tenants::Tenant;
use crate::db::users::User;
use crate::db::{secs, unix_now, StoreError};

/// The least time between two links of a kind asked for one user, in
/// seconds.
pub const LINK_MIN_INTERVAL: i64 = 60;

/// Link requests whose work (lookups, link, delivery with its retries) may
/// run at once; past it a request is answered alike and does nothing
/// (counted as `overloaded`), so that a flood of requests from many
/// addresses cannot take the database connections logins need.
pub const MAX_LINK_TASKS: usize = 32;

/// A link's token and when it expires (unix seconds).
#[derive(Clone)]
pub struct EmailLink {
    pub token: String,
    pub expires_at: i64,
}

impl std::fmt::Debug for EmailLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailLink").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// The names a kind of link goes by: its audit event when asked for, its
/// metric, and its webhook event type.
pub(super) struct Kind {
    pub purpose: LinkPurpose,
    pub requested: &'static str,
    pub metric: &'static str,
    pub webhook_type: &'static str,
}

pub(super) const RESET: Kind = Kind {
    purpose: LinkPurpose::PasswordReset,
    requested: "password_reset_requested",
    metric: "gateway_password_reset_requests_total",
    webhook_type: "password_reset.requested",
};

pub(super) const VERIFICATION: Kind = Kind {
    purpose: LinkPurpose::EmailVerification,
    requested: "email_verification_requested",
    metric: "gateway_email_verification_requests_total",
    webhook_type: "email_verification.requested",
};

pub(super) const CHANGE: Kind = Kind {
    purpose: LinkPurpose::EmailChange,
    requested: "email_change_requested",
    metric: "gateway_email_change_requests_total",
    webhook_type: "email_change.requested",
};

pub(super) const LOGIN: Kind = Kind {
    purpose: LinkPurpose::Login,
    requested: "login_link_requested",
    metric: "gateway_login_link_requests_total",
    webhook_type: "login_link.requested",
};

/// What a link is bound to: for a reset, the SHA-256 of the password hash
/// it was made against; for a verification, of the email it proves; for an
/// email change, of the email, the password hash (a reset after a
/// compromise kills the change an intruder asked for) and whether a second
/// factor is set (one set up since kills a change asked for without it);
/// for a sign-in link, of the email and the password hash (a reset or a
/// password change kills the links mailed before it). A revert's is [`AuthService::factor_fingerprint`], made by the caller.
pub(super) fn fingerprint(purpose: LinkPurpose, user: &User) -> [u8; 32] {
    match purpose {
        LinkPurpose::PasswordReset => Sha256::digest(user.password_hash.as_bytes()).into(),
        LinkPurpose::EmailVerification => Sha256::digest(user.email.as_bytes()).into(),
        // An email holds no NUL: the two parts cannot be told apart otherwise.
        LinkPurpose::EmailChange => Sha256::new()
            .chain_update(&user.email)
            .chain_update([0])
            .chain_update(&user.password_hash)
            .chain_update([0, u8::from(user.totp_secret.is_some())])
            .finalize()
            .into(),
        LinkPurpose::Login => Sha256::new()
            .chain_update(&user.email)
            .chain_update([0])
            .chain_update(&user.password_hash)
            .finalize()
            .into(),
        // Made with the change it undoes, bound to [`Factor::digest`]
        // (never here: `make_link` refuses the kind), and not compared by
        // [`AuthService::presented_link`].
        LinkPurpose::EmailRevert => [0; 32],
    }
}

/// A user's second factor as stored now: the stored secret and recovery
/// codes (`""` for none), which the write that relies on them requires
/// unchanged, and the digest a revert link holds, of the secret as it is
/// (not as stored: resealing with another key changes the text) and the
/// recovery codes' hashes.
pub(super) struct Factor {
    secret: String,
    pub recovery: String,
    pub digest: [u8; 32],
}

impl Factor {
    pub(super) fn read(&self) -> FactorRead<'_> {
        FactorRead { secret: &self.secret, recovery: &self.recovery }
    }
}

impl AuthService {
    /// The second factor of `user` (read with it; the recovery codes are
    /// read now, and the write's condition catches a change between). A
    /// secret that does not open is an error (logged): no link is made, or
    /// revert done, on a guess.
    pub(super) async fn factor_of(&self, user: &User) -> Result<Factor, AuthError> {
        let recovery = self.store.totp_recovery(user.tenant_id, user.id).await?.unwrap_or_default();
        let opened = user.totp_secret.as_deref().map(|stored| self.open_secret(user.id, stored)).transpose()?;
        let digest = Sha256::new()
            .chain_update(opened.unwrap_or_default())
            .chain_update([0])
            .chain_update(&recovery)
            .finalize()
            .into();
        Ok(Factor { secret: user.totp_secret.clone().unwrap_or_default(), recovery, digest })
    }
}

impl AuthService {
    /// With a mailer's webhook (and the outbox that keeps what it misses),
    /// `forgot`, `resend`, email changes and sign-in links make links and
    /// send them there (and a registration that must prove its email sends
    /// its first one); without one they answer 404.
    #[must_use]
    pub fn with_mailer(mut self, outbox: Option<Arc<Outbox>>) -> Self {
        self.mailer = outbox;
        self
    }

    /// Waits until no link request or notice is being worked on (at
    /// shutdown, once the listeners have drained, so that deliveries under
    /// way, retries included, go out).
    pub async fn links_delivered(&self) {
        let all = u32::try_from(MAX_LINK_TASKS).unwrap_or(u32::MAX);
        // Held until the process ends: nothing starts after this.
        for tasks in [&self.link_tasks, &self.notice_tasks] {
            if let Ok(permits) = tasks.acquire_many(all).await {
                permits.forget();
            }
        }
    }

    /// Asks for a link of `kind` for `email`: checks the request's shape
    /// and the rate limit, then answers; the rest runs after the answer
    /// (see the module docs). `via` is recorded with the request;
    /// `challenge` is a sign-in link's PKCE challenge.
    pub(super) async fn mail_link(
        &self,
        kind: &'static Kind,
        (email, tenant): (&str, Option<&str>),
        challenge: Option<String>,
        via: &'static str,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        let Some(webhook) = self.mailer.clone() else { return Err(AuthError::NotFound) };
        self.rate_limit(client.ip)?;
        let email = normalize_email(email);
        validate_email(&email).map_err(AuthError::InvalidRequest)?;
        let slug = tenant_slug(tenant)?;
        self.spawn_link(kind, webhook, (slug, email), challenge, via, client);
        Ok(())
    }

    /// Runs `work` (a delivery, and what goes with it) after the answer,
    /// within [`MAX_LINK_TASKS`]; false, and nothing runs, when that many
    /// are under way.
    pub(super) fn spawn_link_task(&self, work: impl Future<Output = ()> + Send + 'static) -> bool {
        let Some(permit) = self.link_permit() else { return false };
        Self::spawn_with_permit(permit, work);
        true
    }

    /// One of the [`MAX_LINK_TASKS`] places, if one is free.
    pub(super) fn link_permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.link_tasks).try_acquire_owned().ok()
    }

    /// Runs `work` in the place `permit` holds.
    pub(super) fn spawn_with_permit(permit: OwnedSemaphorePermit, work: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(async move {
            let _permit = permit;
            work.await;
        });
    }

    /// Counts and logs a link request dropped because [`MAX_LINK_TASKS`]
    /// are under way.
    pub(super) fn link_overloaded(kind: &Kind) {
        metrics::counter!(kind.metric, "result" => "overloaded").increment(1);
        tracing::warn!(
            kind = kind.requested,
            "link requests are arriving faster than they are handled: one was dropped"
        );
    }

    /// Runs the work of a link request after the answer (see
    /// [`AuthService::send_link`]), and audits it, within
    /// [`MAX_LINK_TASKS`].
    pub(super) fn spawn_link(
        &self,
        kind: &'static Kind,
        webhook: Arc<Outbox>,
        (slug, email): (String, String),
        challenge: Option<String>,
        via: &'static str,
        client: &ClientContext,
    ) {
        let this = self.clone();
        let client = client.clone();
        let work = async move {
            let (result, user) = match this.send_link(&webhook, kind, (&slug, &email), challenge.as_deref()).await {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), kind = kind.requested, "a link request failed");
                    ("error", None)
                }
            };
            metrics::counter!(kind.metric, "result" => result).increment(1);
            let ip = client.ip.to_string();
            this.audit(NewAuditEvent {
                event: kind.requested,
                tenant_id: user.as_ref().map(|u: &User| u.tenant_id),
                user_id: user.as_ref().map(|u| u.id),
                email: Some(&email),
                ip: Some(&ip),
                user_agent: client.user_agent.as_deref(),
                detail: Some(serde_json::json!({ "tenant": slug, "via": via, "result": result })),
            })
            .await;
        };
        if !self.spawn_link_task(work) {
            Self::link_overloaded(kind);
        }
    }

    /// The work a link request leaves for after its answer: why nothing was
    /// sent (`unknown_tenant`, `tenant_disabled`, `unknown_user`,
    /// `user_disabled`, `already_verified`, `email_not_verified`,
    /// `throttled`), or `sent`, or
    /// `delivery_failed`; and the user, if there is one.
    async fn send_link(
        &self,
        webhook: &Outbox,
        kind: &Kind,
        (slug, email): (&str, &str),
        challenge: Option<&str>,
    ) -> Result<(&'static str, Option<User>), AuthError> {
        let Some(tenant) = self.store.tenant_by_slug(slug).await? else { return Ok(("unknown_tenant", None)) };
        let Some(user) = self.store.user_by_email(tenant.id, email).await? else { return Ok(("unknown_user", None)) };
        if tenant.disabled {
            return Ok(("tenant_disabled", Some(user)));
        }
        if user.disabled {
            return Ok(("user_disabled", Some(user)));
        }
        if kind.purpose == LinkPurpose::EmailVerification && user.email_verified_at.is_some() {
            return Ok(("already_verified", Some(user)));
        }
        if kind.purpose == LinkPurpose::Login && user.email_verified_at.is_none() {
            return Ok(("email_not_verified", Some(user)));
        }
        let link = match self.accounts.make_link(&user, kind.purpose, LINK_MIN_INTERVAL, (None, challenge)).await? {
            Ok(link) => link,
            // Changed since it was read (disabled, or verified).
            Err(LinkMade::Refused) => return Ok(("user_changed", Some(user))),
            Err(_) => return Ok(("throttled", Some(user))),
        };
        let data = serde_json::json!({
            "tenant": tenant.slug,
            "user_id": user.id,
            "email": user.email,
            "token": link.token,
            "expires_at": rfc3339(link.expires_at),
        });
        match webhook.deliver(kind.webhook_type, data, link.expires_at).await {
            Ok(_) => Ok(("sent", Some(user))),
            Err(_) => Ok(("delivery_failed", Some(user))),
        }
    }
}

impl AuthService {
    /// The link of `purpose` a request presents, with its user and tenant,
    /// if it may act: else why not (`unknown_link` for a token that is no
    /// unspent, unexpired link of the kind; `user_disabled`,
    /// `tenant_disabled`; `user_changed` when what the link is bound to
    /// changed), with the user if known.
    pub(super) async fn presented_link(
        &self,
        purpose: LinkPurpose,
        token: &str,
    ) -> Result<Result<(PendingLink, User, Tenant), (&'static str, Option<User>)>, AuthError> {
        // Tokens are 43 characters; a longer text is no token of ours.
        if token.is_empty() || token.len() > 128 {
            return Ok(Err(("unknown_link", None)));
        }
        let Some(link) = self.store.pending_email_link(purpose, &refresh::hash(token), unix_now()).await? else {
            return Ok(Err(("unknown_link", None)));
        };
        let Some(user) = self.store.user_by_id(link.tenant_id, link.user_id).await? else {
            return Ok(Err(("unknown_link", None)));
        };
        let Some(tenant) = self.store.tenant_by_id(user.tenant_id).await? else {
            return Ok(Err(("unknown_link", None)));
        };
        if user.disabled || tenant.disabled {
            return Ok(Err((if user.disabled { "user_disabled" } else { "tenant_disabled" }, Some(user))));
        }
        // A revert link is bound to nothing the user may change: the
        // intruder it undoes changes what they can.
        if purpose != LinkPurpose::EmailRevert && !bool::from(fingerprint(purpose, &user).ct_eq(&link.fingerprint)) {
            return Ok(Err(("user_changed", Some(user))));
        }
        Ok(Ok((link, user, tenant)))
    }

    /// [`AuthService::presented_link`] for a link that holds an address
    /// (an email change's or a revert's), with the address; what refuses
    /// it is counted (`metric`) and audited (`event`) with why, and
    /// answered `refused()`.
    pub(super) async fn presented_address_link(
        &self,
        purpose: LinkPurpose,
        token: &str,
        (event, metric): (&str, &'static str),
        refused: fn() -> AuthError,
        client: &ClientContext,
    ) -> Result<(PendingLink, User, Tenant, String), AuthError> {
        let (link, user, tenant) = match self.presented_link(purpose, token).await? {
            Ok(found) => found,
            Err((reason, user)) => {
                self.link_refused(event, metric, reason, user.as_ref(), client).await;
                return Err(refused());
            }
        };
        let Some(address) = link.new_email.clone() else {
            self.link_refused(event, metric, "unknown_link", Some(&user), client).await;
            return Err(refused());
        };
        Ok((link, user, tenant, address))
    }

    /// What a link's redemption came to, for a link that moves its user to
    /// an address: the store's answer, or the refusal (counted and audited
    /// with why) of a link gone or a user changed meanwhile (`refused()`),
    /// or of an address another user took (409 `email_taken`).
    pub(super) async fn address_redeemed<T>(
        &self,
        outcome: crate::db::StoreResult<Result<T, Unredeemed>>,
        (event, metric): (&str, &'static str),
        refused: fn() -> AuthError,
        user: &User,
        client: &ClientContext,
    ) -> Result<T, AuthError> {
        match outcome {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(gone)) => {
                self.link_refused(event, metric, gone.reason(), Some(user), client).await;
                Err(refused())
            }
            Err(StoreError::Conflict) => {
                self.link_refused(event, metric, "email_taken", Some(user), client).await;
                Err(AuthError::EmailTaken)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the password presented with a link, as a login would: a
    /// wrong one counts towards the lockout (audited `locked_out`, `via`
    /// the flow, when it starts one) and is refused like the link would be
    /// (`event` and `metric` with `wrong_password`), leaving the link
    /// unspent; a right one clears the (tenant, email) counter.
    pub(super) async fn link_password(
        &self,
        (event, metric, via): (&str, &'static str, &'static str),
        user: &User,
        tenant: &Tenant,
        password: &SecretString,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        let locks = self.reserve_attempt(&tenant.slug, &user.email).await?;
        if let Verdict::Wrong = self.hasher.verify(password, Some(&user.password_hash)).await? {
            self.link_refused(event, metric, "wrong_password", Some(user), client).await;
            if locks {
                let detail = serde_json::json!({ "tenant": tenant.slug, "via": via });
                self.audit_user("locked_out", user, client, detail).await;
                self.lock_started(user.tenant_id, user.id, via, client);
            }
            return Err(AuthError::InvalidCredentials);
        }
        self.store.clear_login_attempts(&tenant.slug, &user.email).await?;
        Ok(())
    }

    /// Counts and audits a link that did not act (`event`, with `reason`).
    pub(super) async fn link_refused(
        &self,
        event: &str,
        metric: &'static str,
        reason: &'static str,
        user: Option<&User>,
        client: &ClientContext,
    ) {
        metrics::counter!(metric, "result" => reason).increment(1);
        let ip = client.ip.to_string();
        self.audit(NewAuditEvent {
            event,
            tenant_id: user.map(|u| u.tenant_id),
            user_id: user.map(|u| u.id),
            email: user.map(|u| u.email.as_str()),
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(serde_json::json!({ "reason": reason })),
        })
        .await;
    }
}

impl Accounts {
    /// Makes a link of `purpose` for `user` (voiding its earlier ones of
    /// the kind), or says why not: the user got one less than
    /// `min_interval` seconds ago, or the user or its tenant is disabled
    /// (or, for a verification, the email is verified). `new_email` is the
    /// address an email change moves the user to, `code_challenge` a
    /// sign-in link's PKCE challenge.
    pub(super) async fn make_link(
        &self,
        user: &User,
        purpose: LinkPurpose,
        min_interval: i64,
        (new_email, code_challenge): (Option<&str>, Option<&str>),
    ) -> Result<Result<EmailLink, LinkMade>, AuthError> {
        let ttl = match purpose {
            LinkPurpose::PasswordReset => self.reset_token_ttl,
            // Both prove a mailbox.
            LinkPurpose::EmailVerification | LinkPurpose::EmailChange => self.verification_token_ttl,
            LinkPurpose::Login => self.login_token_ttl,
            LinkPurpose::EmailRevert => {
                let why = "a revert link is made in the transaction of the change it undoes";
                return Err(AuthError::Unexpected(anyhow::anyhow!(why)));
            }
        };
        let (token, token_hash) = refresh::generate().map_err(|e| AuthError::Unexpected(anyhow::anyhow!(e)))?;
        let now = unix_now();
        let expires_at = now + secs(ttl);
        let made = self
            .store
            .create_email_link(NewLink {
                purpose,
                tenant_id: user.tenant_id,
                user_id: user.id,
                token_hash: &token_hash,
                fingerprint: &fingerprint(purpose, user),
                new_email,
                code_challenge,
                now,
                expires_at,
                min_interval,
            })
            .await?;
        Ok(match made {
            LinkMade::Made => Ok(EmailLink { token, expires_at }),
            other => Err(other),
        })
    }
}
