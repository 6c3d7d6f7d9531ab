//! Security notices: what happened to an account, told to its owner's
//! mailbox, so that a change the owner did not make is noticed (an
//! intruder who has the password can change it, or the email, or remove
//! the second factor; the notice reaches the owner before the owner next
//! fails to log in).
//!
//! They go to the operator's mailer like the links ([`crate::auth::webhook`],
//! same signature and retries), after the answer and within the same
//! bound ([`super::links::MAX_LINK_TASKS`]), when `auth.mailer.notices` is
//! on (the default). A notice carries no credential: its `data` says who
//! (`tenant`, `user_id`, `email`: the address to write to), what (the
//! `type`, and `via` or `new_email`), and from where (`ip`, `user_agent`).
//! A lost notice changes nothing: the change stands, the failure is
//! counted (`gateway_notices_total{type, result}`) and logged.
//!
//! Changes an operator makes with the CLI send none: the operator acted,
//! and the CLI holds no mailer.

use uuid::Uuid;

use super::{AuthService, ClientContext};
use crate::auth::AuthError;

/// What happened to the account.
#[derive(Debug, Clone)]
pub(super) enum Notice {
    /// The password changed: `via` `password_change` (the user, signed
    /// in) or `password_reset` (a mailed link).
    PasswordChanged { via: &'static str },
    /// The email changed; the notice goes to the old address.
    EmailChanged { old: String, new: String },
    /// A second factor was set up.
    MfaEnabled,
    /// The second factor was removed.
    MfaDisabled,
    /// New recovery codes replaced the old ones.
    RecoveryCodesRegenerated,
}

impl Notice {
    fn webhook_type(&self) -> &'static str {
        match self {
            Notice::PasswordChanged { .. } => "password.changed",
            Notice::EmailChanged { .. } => "email.changed",
            Notice::MfaEnabled => "mfa.enabled",
            Notice::MfaDisabled => "mfa.disabled",
            Notice::RecoveryCodesRegenerated => "mfa.recovery_codes_regenerated",
        }
    }
}

/// The metric of notices, by type and result.
const NOTICES: &str = "gateway_notices_total";

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
        let this = self.clone();
        let (ip, user_agent) = (client.ip.to_string(), client.user_agent.clone());
        let work = async move {
            let result = match this.notice_data(tenant_id, user_id, notice, ip, user_agent).await {
                Ok(Some(data)) => match webhook.deliver(kind, data).await {
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
        };
        if !self.spawn_link_task(work) {
            metrics::counter!(NOTICES, "type" => kind, "result" => "overloaded").increment(1);
            tracing::warn!(kind, "a security notice was dropped: too many deliveries under way");
        }
    }

    /// The notice's `data`, addressed to the user's email as it is now (for
    /// an email change, the old one); `None` for a user that is gone.
    async fn notice_data(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        notice: Notice,
        ip: String,
        user_agent: Option<String>,
    ) -> Result<Option<serde_json::Value>, AuthError> {
        let user = self.store.user_by_id(tenant_id, user_id).await?;
        let Some(user) = user.filter(|u| !u.is_deleted()) else { return Ok(None) };
        let Some(tenant) = self.store.tenant_by_id(tenant_id).await? else { return Ok(None) };
        let mut data = serde_json::json!({
            "tenant": tenant.slug,
            "user_id": user.id,
            "email": user.email,
            "ip": ip,
            "user_agent": user_agent,
        });
        match notice {
            Notice::PasswordChanged { via } => data["via"] = via.into(),
            Notice::EmailChanged { old, new } => {
                data["email"] = old.into();
                data["new_email"] = new.into();
            }
            Notice::MfaEnabled | Notice::MfaDisabled | Notice::RecoveryCodesRegenerated => {}
        }
        Ok(Some(data))
    }
}
