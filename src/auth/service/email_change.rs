//! Email change: a signed-in user moves the account to another address,
//! once that address's mailbox is proved.
//!
//! `POST /auth/email/change` (with the access token, the password, a code
//! for a user with a second factor, and the new address) mails a link to
//! the new address (see [`super::links`] for what every mailed link keeps);
//! `POST /auth/email/change/confirm` with the token and the password moves
//! the account there, marked verified. Until then nothing changes: the user
//! logs in with the old address, and a mistyped address costs nothing.
//! Once moved, every other link of the user is void (they went to the old
//! address), and the old address is told (`email.changed`, a
//! [`super::notices`] notice, unless `auth.mailer.notices` is off), so that
//! its owner learns of a change an intruder made. Sessions stay open: the account's owner made the change,
//! and the access tokens carry no email.
//!
//! Chosen where users of other gateways could expect otherwise:
//! - the request answers alike whether the address is free or another
//!   user's (that is looked at after the answer, and a taken address is
//!   mailed nothing): a signed-in user learns no more about other accounts
//!   than anyone; the confirmation refuses a taken address (409);
//! - both steps ask for the password (a wrong one counts towards the
//!   lockout, as at login): a stolen access token alone changes nothing,
//!   and the owner of the new mailbox following a link someone else asked
//!   for does not move that someone's account onto the address; the
//!   request asks a user with a second factor for a code too (the new
//!   mailbox is where resets will go);
//! - a change link is bound to the email, the password hash and whether a
//!   second factor was set when it was made, so a password reset kills the
//!   change an intruder asked for, and so does a factor set up since; a
//!   sign-out everywhere drops it too;
//! - it lives `auth.email_verification.token_ttl` (both prove a mailbox),
//!   one a minute per user.
//!
//! Undoing a move: the `email.changed` notice carries a revert link
//! (`auth.email_change.revert_ttl`, 7 days), made in the transaction that
//! confirms the change (when notices are on and the old address was
//! proved), and `POST /auth/email/revert` with it and a new password moves
//! the account back to the address the notice went to, verified, revokes
//! every session, tells the address it leaves, and removes a second factor
//! that is not the one the account had when it moved (its secret or
//! recovery codes set up, changed or regenerated since: it may be the
//! intruder's). An intruder who had the password can change everything but
//! the old mailbox, so the link is bound to nothing they can change: no
//! later change voids it (not even a revert link of a later move: only the
//! newest link of a kind works, except this kind), a revert voids every
//! link but the revert links of earlier changes (numbered in the change's
//! transaction), which stay the owner's, and while it works the address is
//! kept for its user (no registration or other user's change takes it).
//! The old mailbox keeps for that while the power it had before the move
//! (resets went there); `"0s"` ends it at the move.
//!
//! `gateway user set-email` lets an operator move a user without a link
//! (and voids every link, revert links too: the operator acted).

use secrecy::SecretString;
use uuid::Uuid;

use subtle::ConstantTimeEq as _;

use super::links::{EmailLink, CHANGE, LINK_MIN_INTERVAL};
use super::notices::{email_changed, Notice};
use super::{
    check_password_size, normalize_email, rfc3339, validate_email, Accounts, AuthService, ClientContext, UserKey,
};
use crate::auth::refresh;
use crate::auth::{AuthError, Principal};
use crate::db::email_links::{LinkMade, LinkPurpose, NewRevert};
use crate::db::users::User;
use crate::db::{secs, unix_now, StoreError};

/// The metric of presented change links, by result.
const CHANGES: &str = "gateway_email_changes_total";

/// The audit event of a request or a link that changed nothing.
const FAILED: &str = "email_change_failed";

/// The metric of presented revert links, by result.
const REVERTS: &str = "gateway_email_reverts_total";

/// The audit event of a revert link that changed nothing.
const REVERT_FAILED: &str = "email_revert_failed";

/// What `POST /auth/email/change` answers: where the link went, and until
/// when it works.
#[derive(Debug)]
pub struct ChangeRequested {
    pub new_email: String,
    pub expires_at: i64,
}

/// The normalized `new_email` of a request, or what is wrong with it.
fn new_address(new_email: &str) -> Result<String, AuthError> {
    let email = normalize_email(new_email);
    validate_email(&email).map_err(|e| AuthError::InvalidRequest(format!("new_email: {e}")))?;
    Ok(email)
}

impl AuthService {
    /// `POST /auth/email/change`: mails a link to `new_email` that moves
    /// the signed-in user there (see the module docs), given the password
    /// and, for a user with a second factor, a code. Without a mailer,
    /// [`AuthError::NotFound`].
    pub async fn request_email_change(
        &self,
        who: &Principal,
        new_email: &str,
        password: &SecretString,
        code: Option<&str>,
        client: &ClientContext,
    ) -> Result<ChangeRequested, AuthError> {
        let Some(webhook) = self.mailer.clone() else { return Err(AuthError::NotFound) };
        let new_email = new_address(new_email)?;
        let current = self.store.user_by_id(who.tenant_id, who.user_id).await?.ok_or(AuthError::NotFound)?;
        // The token was checked against a revocation state up to a poll
        // old: fail closed on what the database says now.
        if current.disabled || current.is_deleted() {
            return Err(AuthError::InvalidCredentials);
        }
        if new_email == current.email {
            return Err(AuthError::InvalidRequest("new_email: this is the account's email already".to_owned()));
        }
        // The mailbox a change moves to is where resets go: moving it takes
        // what removing the second factor takes.
        let code = match (current.totp_secret.is_some(), code) {
            (true, None) => return Err(AuthError::MfaRequired),
            (true, Some(code)) => Some(code),
            (false, _) => None,
        };
        let user = self.check_identity(who, password, code, "email_change", client).await?;
        let tenant = self.store.tenant_by_id(who.tenant_id).await?.ok_or(AuthError::NotFound)?;
        if tenant.disabled {
            return Err(AuthError::InvalidCredentials);
        }
        // Before the link: one made that no task can deliver would hold the
        // user's one-a-minute.
        let Some(permit) = self.link_permit() else {
            Self::link_overloaded(&CHANGE);
            return Err(AuthError::RateLimited { retry_after: 1 });
        };
        let link = match self
            .accounts
            .make_link(&user, LinkPurpose::EmailChange, LINK_MIN_INTERVAL, (Some(&new_email), None))
            .await?
        {
            Ok(link) => link,
            Err(LinkMade::Throttled) => {
                self.change_requested(&user, "throttled", client).await;
                let retry_after = u64::try_from(LINK_MIN_INTERVAL).unwrap_or(60);
                return Err(AuthError::RateLimited { retry_after });
            }
            // Disabled, or its tenant, since it was read.
            Err(LinkMade::Refused | LinkMade::Made) => {
                self.change_requested(&user, "user_changed", client).await;
                return Err(AuthError::InvalidCredentials);
            }
        };
        let expires_at = link.expires_at;
        let data = serde_json::json!({
            "tenant": tenant.slug,
            "user_id": user.id,
            "email": new_email,
            "current_email": user.email,
            "token": link.token,
            "expires_at": rfc3339(expires_at),
        });
        let (this, client_later, to) = (self.clone(), client.clone(), new_email.clone());
        // Whether the address is someone else's is looked at after the
        // answer, which is the same either way: a signed-in user learns no
        // more about other accounts than anyone else (the confirmation
        // refuses a taken address).
        let work = async move {
            let taken = match this.store.user_by_email(tenant.id, &to).await {
                Ok(Some(_)) => Ok(true),
                Ok(None) => this.store.address_reserved(tenant.id, &to, Some(user.id)).await,
                Err(e) => Err(e),
            };
            let result = match taken {
                Ok(true) => "email_taken",
                Ok(false) => match webhook.deliver(CHANGE.webhook_type, data, expires_at).await {
                    Ok(_) => "sent",
                    Err(_) => "delivery_failed",
                },
                Err(e) => {
                    tracing::error!(error = %e, "an email change link was not sent");
                    "error"
                }
            };
            this.change_requested(&user, result, &client_later).await;
        };
        Self::spawn_with_permit(permit, work);
        Ok(ChangeRequested { new_email, expires_at })
    }

    /// Counts and audits a change request (`result`). Recorded with the
    /// user's email, not the address asked for: that may be someone
    /// else's, whose erasure (`user delete --forget`) would not find it
    /// under this user.
    async fn change_requested(&self, user: &User, result: &'static str, client: &ClientContext) {
        metrics::counter!(CHANGE.metric, "result" => result).increment(1);
        self.audit_user(CHANGE.requested, user, client, serde_json::json!({ "via": "api", "result": result })).await;
    }

    /// `POST /auth/email/change/confirm`: moves the link's user to the
    /// address the link was mailed to, given the user's password too
    /// (checked as at login: a wrong one leaves the link unspent).
    /// [`AuthError::InvalidEmailChangeToken`] for a link that is unknown,
    /// spent, replaced, expired, made before the email or password last
    /// changed, or of a disabled user or tenant; [`AuthError::EmailTaken`]
    /// when another user took the address meanwhile.
    pub async fn confirm_email_change(
        &self,
        token: &str,
        password: &SecretString,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.rate_limit(client.ip)?;
        check_password_size(password).map_err(AuthError::InvalidRequest)?;
        let refused = || AuthError::InvalidEmailChangeToken;
        let presented =
            self.presented_address_link(LinkPurpose::EmailChange, token, (FAILED, CHANGES), refused, client);
        let (link, user, tenant, new_email) = presented.await?;
        self.link_password((FAILED, CHANGES, "email_change"), &user, &tenant, password, client).await?;
        // Where another user's revert link would move that user back.
        if self.store.address_reserved(tenant.id, &new_email, Some(user.id)).await? {
            self.link_refused(FAILED, CHANGES, "email_taken", Some(&user), client).await;
            return Err(AuthError::EmailTaken);
        }
        // The change and the link that undoes it are one write, bound to the
        // factor this read found (a factor set up meanwhile refuses it).
        let factor = self.factor_of(&user).await?;
        let now = unix_now();
        let revert = match self.revert_ttl(&user) {
            Some(ttl) => {
                let (token, hash) = refresh::generate().map_err(|e| AuthError::Unexpected(anyhow::anyhow!(e)))?;
                Some((EmailLink { token, expires_at: now + secs(ttl) }, hash))
            }
            None => None,
        };
        let stored = revert.as_ref().map(|(link, hash)| NewRevert {
            token_hash: hash,
            factor: &factor.digest,
            address: &user.email,
            expires_at: link.expires_at,
        });
        // The notice to the old address, with the revert link, is stored
        // with them (the outbox sends it): a crash or a mailer down cannot
        // lose the link the change made.
        let notice = match (&self.mailer, self.config.mailer.as_ref().is_some_and(|m| m.notices)) {
            (Some(outbox), true) => {
                let revert = revert.as_ref().map(|(link, _)| link);
                let (data, expires_at) =
                    email_changed(&tenant.slug, user.id, (&user.email, &new_email), revert, "link");
                Some(outbox.prepare("email.changed", &data, expires_at).map_err(AuthError::Unexpected)?)
            }
            _ => None,
        };
        let redeemed = self.store.redeem_email_change(
            &link,
            &user.email,
            &user.password_hash,
            factor.read(),
            &new_email,
            (stored, notice.as_ref()),
            now,
        );
        self.address_redeemed(redeemed.await, (FAILED, CHANGES), refused, &user, client).await?;
        metrics::counter!(CHANGES, "result" => "success").increment(1);
        let moved = User { email: new_email.clone(), ..user.clone() };
        self.audit_user("email_changed", &moved, client, serde_json::json!({ "via": "link" })).await;
        if notice.is_some() {
            metrics::counter!("gateway_notices_total", "type" => "email.changed", "result" => "queued").increment(1);
        }
        Ok(())
    }

    /// How long the revert link of a change `user` (as the change found
    /// it) confirms works, if one is made: only with notices to mail it in,
    /// `auth.email_change.revert_ttl` not `0s`, and an old address that was
    /// proved (a mistyped one's owner is no one to hand the account to).
    fn revert_ttl(&self, user: &User) -> Option<std::time::Duration> {
        let ttl = self.config.revert_token_ttl;
        let notices = self.mailer.is_some() && self.config.mailer.as_ref().is_some_and(|m| m.notices);
        (notices && !ttl.is_zero() && user.email_verified_at.is_some()).then_some(ttl)
    }

    /// `POST /auth/email/revert`: moves the revert link's user back to the
    /// address the link was mailed to, with `password` (see the module
    /// docs), revokes every session, and clears the lockout of that
    /// address. [`AuthError::InvalidRevertToken`] for a link that is
    /// unknown, spent, voided, expired, or of a disabled user or tenant;
    /// [`AuthError::EmailTaken`] when another user has the address now.
    pub async fn revert_email_change(
        &self,
        token: &str,
        password: &SecretString,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.rate_limit(client.ip)?;
        // Before the link is looked at: a weak password spends nothing.
        self.accounts.check_password_strength(password)?;
        let refused = || AuthError::InvalidRevertToken;
        let presented =
            self.presented_address_link(LinkPurpose::EmailRevert, token, (REVERT_FAILED, REVERTS), refused, client);
        let (link, user, tenant, address) = presented.await?;
        // A factor set up, changed or removed since the change (its secret
        // or its recovery codes) may be the intruder's: it goes, and the
        // owner sets one up again.
        let factor = self.factor_of(&user).await?;
        let drop_factor = !bool::from(factor.digest.ct_eq(&link.fingerprint));
        let hash = self.hasher.hash(password).await?;
        let redeemed = self.store.redeem_email_revert(&link, &address, &hash, (factor.read(), drop_factor), unix_now());
        let revoked = self.address_redeemed(redeemed.await, (REVERT_FAILED, REVERTS), refused, &user, client).await?;
        for id in &revoked {
            self.authenticator.revocations().revoke_session(*id);
        }
        metrics::counter!(REVERTS, "result" => "success").increment(1);
        let back = User { email: address.clone(), ..user.clone() };
        let had_factor = user.totp_secret.is_some() || !factor.recovery.is_empty();
        let detail = serde_json::json!({
            "via": "link",
            "sessions_revoked": revoked.len(),
            "mfa_removed": drop_factor && had_factor,
        });
        self.audit_user("email_reverted", &back, client, detail).await;
        // The address left is told (no link: the two mailboxes would take
        // the account from each other in turn).
        if user.email != address {
            let notice = Notice::EmailChanged { old: user.email.clone(), new: address.clone(), via: "revert" };
            self.notify(user.tenant_id, user.id, notice, client);
        }
        // The owner proved the mailbox and chose a new password: a lock
        // earned by the intruder, or by guesses, no longer keeps them out.
        if let Err(e) = self.store.clear_login_attempts(&tenant.slug, &address).await {
            tracing::warn!(error = %e, "could not clear the lockout after an email revert");
        }
        Ok(())
    }
}

impl Accounts {
    /// An operator moves a user to `new_email` (the CLI's `user
    /// set-email`), verified on the operator's word; the user's links stop
    /// working. Sessions stay open.
    pub async fn set_email(&self, tenant_id: Uuid, key: UserKey<'_>, new_email: &str) -> Result<(), AuthError> {
        let new_email = new_address(new_email)?;
        let user = self.find_user(tenant_id, key).await?;
        if new_email == user.email {
            return Err(AuthError::InvalidRequest(format!("new_email: {new_email:?} is the user's email already")));
        }
        match self.store.set_email(tenant_id, user.id, &new_email).await {
            Ok(true) => {}
            Ok(false) => return Err(AuthError::NotFound),
            Err(StoreError::Conflict) => return Err(AuthError::EmailTaken),
            Err(e) => return Err(e.into()),
        }
        let moved = User { email: new_email, ..user };
        self.audit_change("email_changed", &moved, Some(serde_json::json!({ "via": "operator" }))).await;
        Ok(())
    }
}
