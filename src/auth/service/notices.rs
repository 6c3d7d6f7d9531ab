//! Security notices: what happened to an account, told to its owner's
//! mailbox, so that a change the owner did not make is noticed (an
//! intruder who has the password can change it, or the email, or remove
//! the second factor; the notice reaches the owner before the owner next
//! fails to log in).
//!
//! They go to the operator's mailer like the links ([`crate::auth::webhook`],
//! same signature and retries), after the answer, when `auth.mailer.notices`
//! is on (the default), with places of their own (as many as
//! [`super::links::MAX_LINK_TASKS`]: a flood of link requests cannot crowd
//! a notice out), and at most one of a kind a minute per user in a process
//! (an account made with someone else's address cannot flood that
//! mailbox; `email.changed` excepted, see [`AuthService::notify`]). A notice carries no credential and no text a client chose: its
//! `data` says who (`tenant`, `user_id`, `email`: the address to write to),
//! what (the `type`, and `via`), and from where (`ip`); `email.changed`
//! goes to the old address with the new one masked (`new_email_hint`,
//! `m***@example.net`) and no `ip`, since the old mailbox may be in other
//! hands (a former employer's), and with the one credential a notice may
//! carry: `revert_token`, the link that moves the account back (see
//! [`super::email_change`]; unless `auth.email_change.revert_ttl` is
//! `0s`). That one is stored in the transaction that confirms the change
//! ([`email_changed`], [`crate::auth::outbox`]), and sent from there by the
//! outbox's sweep: no crash falls between the change and its notice. The
//! others are delivered like links, through the outbox (kept for a day
//! when the mailer misses them). A notice that is lost all the same (no
//! place, a database down) changes nothing: the change stands, and it is
//! counted (`gateway_notices_total{type, result}`) and logged.
//!
//! Changes an operator makes (the CLI or the admin API, through
//! `Accounts`) send none: the operator acted.

use std::sync::Arc;

use uuid::Uuid;

use super::links::EmailLink;
use super::{rfc3339, AuthService, ClientContext};
use crate::auth::AuthError;
use crate::db::unix_now;

/// What happened to the account.
#[derive(Debug, Clone)]
pub(super) enum Notice {
    /// The password changed: `via` `password_change` (the user, signed
    /// in) or `password_reset` (a mailed link).
    PasswordChanged { via: &'static str },
    /// A revert moved the account back from `old` to `new`; the notice
    /// goes to the address it left (`via: "revert"`, no link). The notice
    /// of a change confirmed by link, which carries the revert link, is
    /// stored with the change ([`email_changed`]).
    EmailChanged { old: String, new: String, via: &'static str },
    /// Failed attempts locked the account's logins until `until` (unix
    /// seconds); `via` the flow whose attempt started the lock (`login`,
    /// or a signed-in or link flow that asks for the password).
    Locked { until: i64, via: String },
    /// A second factor was set up.
    MfaEnabled,
    /// The second factor was removed.
    MfaDisabled,
    /// New recovery codes replaced the old ones.
    RecoveryCodesRegenerated,
    /// Someone tried to register the address (with email verification
    /// required, the answer did not say it is taken).
    RegistrationAttempted,
}

impl Notice {
    fn webhook_type(&self) -> &'static str {
        match self {
            Notice::PasswordChanged { .. } => "password.changed",
            Notice::EmailChanged { .. } => "email.changed",
            Notice::Locked { .. } => "account.locked",
            Notice::MfaEnabled => "mfa.enabled",
            Notice::MfaDisabled => "mfa.disabled",
            Notice::RecoveryCodesRegenerated => "mfa.recovery_codes_regenerated",
            Notice::RegistrationAttempted => "registration.attempted",
        }
    }
}

/// The metric of notices, by type and result.
const NOTICES: &str = "gateway_notices_total";

/// How long a revert's `email.changed` notice waits for a delivery place when all
/// are taken, before it is dropped (and logged as an error).
const URGENT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl AuthService {
    /// Tells the owner of `user_id` what happened (see the module docs),
    /// after the answer; nothing when there is no mailer or
    /// `auth.mailer.notices` is off.
    pub(super) fn notify(&self, tenant_id: Uuid, user_id: Uuid, notice: Notice, client: &ClientContext) {
        let Some(webhook) = self.mailer.clone() else { return };
        if !self.config.mailer.as_ref().is_some_and(|m| m.notices) {
            return;
        }
        let kind = notice.webhook_type();
        // Not `email.changed` (here, a revert's): each goes to the address
        // a revert left (no flood: each takes a link followed from a
        // mailbox), and tells the owner of a takeover undone: it waits for
        // a place rather than being dropped.
        let urgent = matches!(notice, Notice::EmailChanged { .. });
        if !urgent && self.notices_sent.contains_key(&(user_id, kind)) {
            metrics::counter!(NOTICES, "type" => kind, "result" => "throttled").increment(1);
            return;
        }
        let permit = Arc::clone(&self.notice_tasks).try_acquire_owned().ok();
        if permit.is_none() && !urgent {
            metrics::counter!(NOTICES, "type" => kind, "result" => "overloaded").increment(1);
            tracing::warn!(kind, "a security notice was dropped: too many deliveries under way");
            return;
        }
        self.notices_sent.insert((user_id, kind), ());
        let this = self.clone();
        let ip = client.ip.to_string();
        let tasks = Arc::clone(&self.notice_tasks);
        tokio::spawn(async move {
            let permit = match permit {
                Some(permit) => permit,
                None => match tokio::time::timeout(URGENT_WAIT, tasks.acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        metrics::counter!(NOTICES, "type" => kind, "result" => "overloaded").increment(1);
                        tracing::error!(kind, "a security notice was dropped: no delivery place freed in time");
                        return;
                    }
                },
            };
            let _permit = permit;
            this.deliver_notice(webhook, tenant_id, user_id, notice, ip).await;
        });
    }

    /// Delivers one notice (in its place) and counts the result.
    async fn deliver_notice(
        &self,
        webhook: Arc<crate::auth::outbox::Outbox>,
        tenant_id: Uuid,
        user_id: Uuid,
        notice: Notice,
        ip: String,
    ) {
        let kind = notice.webhook_type();
        let result = match self.notice_data(tenant_id, user_id, notice, ip).await {
            Ok(Some((data, expires_at))) => match webhook.deliver(kind, data, expires_at).await {
                Ok(_) => "sent",
                Err(_) => "delivery_failed",
            },
            // Deleted meanwhile: nobody to tell.
            Ok(None) => "unknown_user",
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), kind, "a notice could not be prepared");
                "error"
            }
        };
        metrics::counter!(NOTICES, "type" => kind, "result" => result).increment(1);
    }

    /// The notice's `data`, addressed to the user's email as it is now (for
    /// a revert, the one it left), and until when it is worth delivering
    /// (a day); `None` for a user that is gone.
    async fn notice_data(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        notice: Notice,
        ip: String,
    ) -> Result<Option<(serde_json::Value, i64)>, AuthError> {
        let user = self.store.user_by_id(tenant_id, user_id).await?;
        let Some(user) = user.filter(|u| !u.is_deleted()) else { return Ok(None) };
        let Some(tenant) = self.store.tenant_by_id(tenant_id).await? else { return Ok(None) };
        let mut expires_at = unix_now() + crate::auth::outbox::NOTICE_LIFETIME;
        let mut data = serde_json::json!({
            "tenant": tenant.slug,
            "user_id": user.id,
            "email": user.email,
            "ip": ip,
        });
        match notice {
            Notice::PasswordChanged { via } => data["via"] = via.into(),
            Notice::EmailChanged { old, new, via } => {
                (data, expires_at) = email_changed(&tenant.slug, user.id, (&old, &new), None, via);
            }
            Notice::Locked { until, via } => {
                data["locked_until"] = rfc3339(until).into();
                data["via"] = via.into();
            }
            Notice::MfaEnabled
            | Notice::MfaDisabled
            | Notice::RecoveryCodesRegenerated
            | Notice::RegistrationAttempted => {}
        }
        Ok(Some((data, expires_at)))
    }
}

/// The `data` of an `email.changed` notice, to the `old` address of the
/// user `user_id` (see the module docs), and until when it is worth
/// delivering.
pub(super) fn email_changed(
    tenant: &str,
    user_id: Uuid,
    (old, new): (&str, &str),
    revert: Option<&EmailLink>,
    via: &str,
) -> (serde_json::Value, i64) {
    let mut expires_at = unix_now() + crate::auth::outbox::NOTICE_LIFETIME;
    let mut data = serde_json::json!({
        "tenant": tenant,
        "user_id": user_id,
        "email": old,
        "new_email_hint": mask(new),
        "via": via,
    });
    if let Some(revert) = revert {
        expires_at = expires_at.min(revert.expires_at);
        data["revert_token"] = revert.token.clone().into();
        data["revert_expires_at"] = rfc3339(revert.expires_at).into();
    }
    (data, expires_at)
}

/// An address with the local part hidden but its first character:
/// `m***@example.net`.
fn mask(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_masked_address_keeps_its_first_character_and_domain() {
        assert_eq!(super::mask("moved@example.net"), "m***@example.net");
        assert_eq!(super::mask("é@x.org"), "é***@x.org");
        assert_eq!(super::mask("nonsense"), "***");
    }
}
