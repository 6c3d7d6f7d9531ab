//! Email verification: with `auth.email_verification.required`, a user who
//! registered through `POST /auth/register` logs in only once the email is
//! proved, so that nobody holds an account in someone else's name (or
//! keeps its owner from registering).
//!
//! The registration answers at once; the first link is mailed after it
//! (see [`super::links`] for what every mailed link keeps). `POST
//! /auth/email/resend` asks for another, `POST /auth/email/verify` with the
//! token proves the email (no session is opened: the user logs in), and
//! `gateway user verify-email` lets an operator vouch for one. Users an
//! operator creates, and those registered while verification was not
//! required, count as verified.

use secrecy::SecretString;
use uuid::Uuid;

use super::links::VERIFICATION;
use super::{check_password_size, Accounts, AuthService, ClientContext, UserKey};
use crate::auth::AuthError;
use crate::db::email_links::LinkPurpose;
use crate::db::unix_now;

/// The metric of presented verification links, by result.
const VERIFICATIONS: &str = "gateway_email_verifications_total";

impl AuthService {
    /// Whether a registered user must prove the email before logging in.
    pub fn verification_required(&self) -> bool {
        self.config.email_verification.required
    }

    /// After a registration that must prove its email: the first link,
    /// mailed after the answer (with no mailer, none: `config check`
    /// refuses that with registration on).
    pub(super) fn send_first_verification(&self, email: &str, tenant: &str, client: &ClientContext) {
        if let Some(webhook) = self.mailer.clone() {
            let (email, tenant) = (email.to_owned(), tenant.to_owned());
            self.spawn_link(&VERIFICATION, webhook, (tenant, email), None, "registration", client);
        }
    }

    /// `POST /auth/email/resend`: another verification link for `email`,
    /// mailed after the answer if the account still needs one.
    pub async fn resend_verification(
        &self,
        email: &str,
        tenant: Option<&str>,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.mail_link(&VERIFICATION, (email, tenant), None, "email", client).await
    }

    /// `POST /auth/email/verify`: marks the link's email verified, given
    /// the user's password too (checked as at login: a wrong one counts
    /// towards the lockout and leaves the link unspent), so that the
    /// mailbox's owner following a link someone else's registration sent
    /// does not hand that someone the account.
    /// [`AuthError::InvalidVerificationToken`] for a link that is unknown,
    /// spent, replaced, expired, of another email, or of a disabled user or
    /// tenant.
    pub async fn verify_email(
        &self,
        token: &str,
        password: &SecretString,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.rate_limit(client.ip)?;
        check_password_size(password).map_err(AuthError::InvalidRequest)?;
        let refused = "email_verification_failed";
        let (link, user, tenant) = match self.presented_link(LinkPurpose::EmailVerification, token).await? {
            Ok(found) => found,
            Err((reason, user)) => {
                self.link_refused(refused, VERIFICATIONS, reason, user.as_ref(), client).await;
                return Err(AuthError::InvalidVerificationToken);
            }
        };
        if user.email_verified_at.is_some() {
            // An operator vouched meanwhile: the link has nothing to do.
            self.link_refused(refused, VERIFICATIONS, "already_verified", Some(&user), client).await;
            return Err(AuthError::InvalidVerificationToken);
        }
        self.link_password((refused, VERIFICATIONS, "email_verification"), &user, &tenant, password, client).await?;
        if let Err(gone) = self.store.redeem_email_verification(&link, &user.email, unix_now()).await? {
            self.link_refused(refused, VERIFICATIONS, gone.reason(), Some(&user), client).await;
            return Err(AuthError::InvalidVerificationToken);
        }
        metrics::counter!(VERIFICATIONS, "result" => "success").increment(1);
        self.audit_user("email_verified", &user, client, serde_json::json!({ "via": "link" })).await;
        Ok(())
    }
}

impl Accounts {
    /// An operator vouches for a user's email (the CLI's `user
    /// verify-email`); the user's verification links stop mattering.
    pub async fn mark_email_verified(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<(), AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        if !self.store.mark_email_verified(tenant_id, user.id).await? {
            return Err(AuthError::InvalidRequest(format!("email: {:?} is verified already", user.email)));
        }
        self.audit_change("email_verified", &user, Some(serde_json::json!({ "via": "operator" }))).await;
        Ok(())
    }
}
