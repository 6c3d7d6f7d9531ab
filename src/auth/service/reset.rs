//! Password reset links: the flow for a user who forgot the password.
//!
//! `POST /auth/password/forgot` asks for a link, mailed through the
//! operator's mailer (see [`super::links`] for what every mailed link
//! keeps: no answer tells whether the account exists, one a minute, ...);
//! `gateway user reset-token` makes one for an operator to pass on. `POST
//! /auth/password/reset` with the token and a new password sets it, revokes
//! every session of the user (one may be the intruder's who made the user
//! reset) and clears the login lockout. It opens no session: the user logs
//! in with the new password, and with the second factor, which a reset does
//! not touch (a mailbox is not a second factor).
//!
//! A reset link is valid `auth.password_reset.token_ttl` and dies when the
//! password hash changes by any path (it is bound to the hash it was made
//! against).

use secrecy::SecretString;
use uuid::Uuid;

use super::links::{EmailLink, RESET};
use super::notices::Notice;
use super::{rfc3339, Accounts, AuthService, ClientContext, UserKey};
use crate::auth::AuthError;
use crate::db::email_links::{LinkMade, LinkPurpose};
use crate::db::unix_now;

/// The metric of presented reset links, by result.
const RESETS: &str = "gateway_password_resets_total";

impl AuthService {
    /// `POST /auth/password/forgot`: a reset link for `email`, mailed after
    /// the answer if the account may have one.
    pub async fn forgot_password(
        &self,
        email: &str,
        tenant: Option<&str>,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.mail_link(&RESET, (email, tenant), None, "email", client).await
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
        let (link, user, tenant) = match self.presented_link(LinkPurpose::PasswordReset, token).await? {
            Ok(found) => found,
            Err((reason, user)) => {
                let reason = if reason == "user_changed" { "password_changed" } else { reason };
                self.link_refused("password_reset_failed", RESETS, reason, user.as_ref(), client).await;
                return Err(AuthError::InvalidResetToken);
            }
        };
        let hash = self.hasher.hash(password).await?;
        let revoked = match self.store.redeem_password_reset(&link, &user.password_hash, &hash, unix_now()).await? {
            Ok(revoked) => revoked,
            Err(gone) => {
                self.link_refused("password_reset_failed", RESETS, gone.reason(), Some(&user), client).await;
                return Err(AuthError::InvalidResetToken);
            }
        };
        for id in &revoked {
            self.authenticator.revocations().revoke_session(*id);
        }
        metrics::counter!(RESETS, "result" => "success").increment(1);
        let detail = serde_json::json!({ "via": "link", "sessions_revoked": revoked.len() });
        self.audit_user("password_reset", &user, client, detail).await;
        self.notify(user.tenant_id, user.id, Notice::PasswordChanged { via: "password_reset" }, client);
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
    /// A reset link for an operator to hand to the user (the CLI's `user
    /// reset-token`); earlier links of the user stop working.
    pub async fn reset_link(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<EmailLink, AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        let link = match self.make_link(&user, LinkPurpose::PasswordReset, 0, (None, None)).await? {
            Ok(link) => link,
            Err(LinkMade::Refused) => {
                return Err(AuthError::InvalidRequest(format!(
                    "email: {:?} is disabled, or its tenant is; a link would not work",
                    user.email
                )))
            }
            Err(LinkMade::Throttled | LinkMade::Made) => {
                return Err(AuthError::Unexpected(anyhow::anyhow!("a link without a minimum interval was not made")))
            }
        };
        let detail =
            serde_json::json!({ "via": "operator", "result": "issued", "expires_at": rfc3339(link.expires_at) });
        self.audit_change("password_reset_requested", &user, Some(detail)).await;
        Ok(link)
    }
}
