//! Deliveries to the operator's mailer that outlive a mailer's outage and
//! a gateway's stop.
//!
//! Every delivery (a mailed link, a security notice) is written to the
//! `outbox` table ([`crate::db::outbox`]) before its first attempt, and
//! deleted once the mailer answers 2xx. The flow that made it tries it at
//! once, as before ([`Webhook::deliver`]: three attempts over five
//! seconds); what still fails waits in the table, and every gateway with a
//! mailer looks there every [`SWEEP_EVERY`] ([`Outbox::sweep`]) and tries
//! what is due again, one attempt at a time, [`FIRST_RETRY`] seconds later
//! and twice as long after each failure (at most [`MAX_RETRY`]), until the
//! delivery expires: with the link it carries (a link that no longer works
//! is not worth a mail), a day after a notice ([`NOTICE_LIFETIME`]). So the
//! link in an `email.changed` notice, which lets the owner take the
//! account back, survives a mailer that is down for an hour and a gateway
//! that restarts; that notice is even stored in the transaction that
//! confirms the change ([`Outbox::prepare`]), so no crash falls between
//! the two.
//!
//! What it keeps:
//! - **One `webhook-id` per delivery**, the same on every attempt by any
//!   gateway, so a mailer drops a repeat (an attempt whose answer was lost
//!   is sent again). Each attempt is signed with its own timestamp.
//! - **One gateway at a time.** A gateway takes a row by moving its
//!   `next_attempt_at` forward ([`LEASE`] seconds) in a conditional
//!   update; another that read the same row finds it moved. A gateway that
//!   stops while it holds a row leaves it for the others once the lease
//!   ends.
//! - **No credential in the clear, and only what the gateway wrote.** A
//!   body may hold a link's token, which the database otherwise keeps only
//!   hashed: it is sealed with the secrets key ([`SealingKeys`]) for the
//!   row ([`aad`]: `outbox`, then the row's id, so that no other sealed
//!   value, a TOTP secret say, passes for a body, nor one row's body for
//!   another's), and must open as an event of the row's `kind`. A row that
//!   is not sealed, or opens as something else, is deleted unsent and
//!   logged (`unreadable`): what the gateway signs for the mailer is only
//!   what it wrote. One sealed with a key this gateway does not have (a
//!   replica whose keys differ, a key removed too early) waits, logged, as
//!   if the mailer had missed it, until it expires.
//! - **No stale link.** A link mailed late must still work when it is
//!   sent: one spent, replaced by a newer one or voided meanwhile is
//!   dropped unsent (`link_gone`), so that it cannot arrive after the
//!   newer one.
//! - **Counted**: `gateway_mailer_deliveries_total{result}` (`sent`,
//!   `failed`: kept after the attempts at once, `lost`: not kept and not
//!   taken, `sent_late`, `retry_failed`, `expired`, `unreadable`, `no_key`,
//!   `link_gone`)
//!   and `gateway_mailer_deliveries_waiting` (the table's rows, being
//!   attempted or not: every replica reports the same count).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::refresh;
use super::seal::{is_sealed, SealingKeys};
use super::webhook::{self, Webhook};
use crate::db::email_links::LinkPurpose;
use crate::db::outbox::{Delivery, NewDelivery};
use crate::db::{unix_now, Store};

/// How long a gateway holds a delivery it attempts (seconds): longer than
/// the three attempts at once take at most.
pub const LEASE: i64 = 60;

/// How often every gateway looks for deliveries due.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// The pause after the first three attempts failed (seconds); it doubles
/// after each failure since.
pub const FIRST_RETRY: i64 = 10;

/// The longest pause between two attempts (seconds).
pub const MAX_RETRY: i64 = 600;

/// How long a notice is tried (seconds).
pub const NOTICE_LIFETIME: i64 = 86_400;

/// Deliveries due that one look takes at most.
const SWEEP_BATCH: i64 = 16;

/// The metric of deliveries, by result.
const DELIVERIES: &str = "gateway_mailer_deliveries_total";

/// The mailer's webhook, with the table that keeps what it has not taken.
pub struct Outbox {
    webhook: Webhook,
    store: Store,
    sealer: Arc<SealingKeys>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("webhook", &self.webhook).finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new(webhook: Webhook, store: Store, sealer: Arc<SealingKeys>) -> Self {
        Self { webhook, store, sealer }
    }

    /// Delivers an event of type `kind` (keeping it until `expires_at` if
    /// the mailer does not take it now); returns how many attempts it
    /// took, or the last failure (the delivery then waits in the table).
    /// A delivery the table cannot take (the database is down) is still
    /// attempted now, and lost if that fails.
    pub async fn deliver(&self, kind: &str, data: serde_json::Value, expires_at: i64) -> anyhow::Result<usize> {
        let id = Uuid::new_v4();
        let now = unix_now();
        let body = webhook::event(kind, &data, now)?;
        let kept = match self.keep(id, kind, &body, now, expires_at).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(kind, error = format!("{e:#}"), "a delivery could not be kept: it is tried now only");
                false
            }
        };
        let sent = self.webhook.deliver(&webhook_id(id), &body).await;
        let result = match (&sent, kept) {
            (Ok(_), true) => self.store.delete_delivery(id).await.map_err(anyhow::Error::from),
            (Err(_), true) => {
                let at = unix_now() + FIRST_RETRY;
                let attempts = i64::try_from(webhook::ATTEMPTS).unwrap_or(i64::MAX);
                self.store.retry_delivery_at(id, now + LEASE, attempts, at).await.map_err(anyhow::Error::from)
            }
            (_, false) => Ok(()),
        };
        if let Err(e) = result {
            // Left leased: the sweep takes it when the lease ends (and a
            // delivery the mailer took is sent again, with the same id).
            tracing::warn!(kind, error = format!("{e:#}"), "a delivery's row could not be updated");
        }
        let outcome = match (&sent, kept) {
            (Ok(_), _) => "sent",
            (Err(_), true) => "failed",
            (Err(_), false) => "lost",
        };
        metrics::counter!(DELIVERIES, "result" => outcome).increment(1);
        sent
    }

    /// A delivery of an event of type `kind`, due at once, for a flow to
    /// store in the transaction of what it tells (see
    /// [`crate::db::email_links`]): the sweep sends it, within
    /// [`SWEEP_EVERY`].
    pub fn prepare(
        &self,
        kind: &'static str,
        data: &serde_json::Value,
        expires_at: i64,
    ) -> anyhow::Result<NewDelivery> {
        let id = Uuid::new_v4();
        let now = unix_now();
        let body = self.sealed(id, &webhook::event(kind, data, now)?)?;
        Ok(NewDelivery { id, kind, body, now, expires_at })
    }

    /// Writes the delivery, sealed for its id, leased to this call.
    async fn keep(&self, id: Uuid, kind: &str, body: &Bytes, now: i64, expires_at: i64) -> anyhow::Result<()> {
        let sealed = self.sealed(id, body)?;
        self.store.insert_delivery((id, kind, &sealed), now, now + LEASE, expires_at).await?;
        Ok(())
    }

    /// An event's `body` as the row `id` keeps it.
    fn sealed(&self, id: Uuid, body: &Bytes) -> anyhow::Result<String> {
        Ok(self.sealer.seal(std::str::from_utf8(body)?, &aad(id))?)
    }

    /// Tries the deliveries due every [`SWEEP_EVERY`], until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut reachable = true;
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            tokio::select! {
                () = &mut shutdown => return,
                looked = Arc::clone(&self).sweep_once() => match looked {
                    // Once per outage, not every two seconds.
                    Err(e) if reachable => {
                        reachable = false;
                        tracing::warn!(error = %e, "could not read the deliveries waiting for the mailer");
                    }
                    Ok(()) if !reachable => {
                        reachable = true;
                        tracing::info!("the deliveries waiting for the mailer can be read again");
                    }
                    _ => {}
                },
            }
        }
    }

    /// One look: the deliveries due now, tried at once (a stop cuts the
    /// attempts under way short: their rows stay, leased).
    async fn sweep_once(self: Arc<Self>) -> Result<(), crate::db::StoreError> {
        let now = unix_now();
        let due = self.store.due_deliveries(now, SWEEP_BATCH).await?;
        let mut attempts = tokio::task::JoinSet::new();
        for delivery in due {
            let this = Arc::clone(&self);
            attempts.spawn(async move { this.retry(delivery, now).await });
        }
        while attempts.join_next().await.is_some() {}
        let waiting = self.store.waiting_deliveries().await?;
        metrics::gauge!("gateway_mailer_deliveries_waiting").set(waiting as f64);
        Ok(())
    }

    /// One attempt at a delivery due (if this gateway takes it).
    async fn retry(&self, delivery: Delivery, now: i64) {
        let kind = delivery.kind.as_str();
        let result = if delivery.expires_at <= now {
            tracing::warn!(kind, attempts = delivery.attempts, "a delivery expired before the mailer took it");
            self.store.delete_delivery(delivery.id).await.map(|()| "expired")
        } else {
            match self.store.take_delivery(&delivery, now + LEASE).await {
                Ok(false) => return,
                Ok(true) => self.attempt(&delivery, now + LEASE).await,
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(result) => metrics::counter!(DELIVERIES, "result" => result).increment(1),
            Err(e) => tracing::warn!(kind, error = %e, "a waiting delivery's row could not be updated"),
        }
    }

    /// The attempt at a delivery this gateway took (until `leased_until`):
    /// deleted once sent, or when it is not what the gateway wrote; else
    /// put off.
    async fn attempt(&self, delivery: &Delivery, leased_until: i64) -> Result<&'static str, crate::db::StoreError> {
        let kind = delivery.kind.as_str();
        let attempts = delivery.attempts + 1;
        let put_off = || {
            let at = unix_now() + backoff(attempts);
            self.store.retry_delivery_at(delivery.id, leased_until, attempts, at)
        };
        let body = match self.opened(delivery) {
            Opened::Event(body) if self.link_gone(kind, &body).await? => {
                return self.store.delete_delivery(delivery.id).await.map(|()| "link_gone");
            }
            Opened::Event(body) => body,
            Opened::NoKey => {
                tracing::error!(kind, "a waiting delivery is sealed with a secrets key this gateway does not have");
                return put_off().await.map(|()| "no_key");
            }
            Opened::Forged => {
                tracing::error!(kind, "a waiting delivery is not one this gateway wrote: dropped unsent");
                return self.store.delete_delivery(delivery.id).await.map(|()| "unreadable");
            }
        };
        match self.webhook.attempt(&webhook_id(delivery.id), &Bytes::from(body)).await {
            // A delivery stored with what it tells (`prepare`) was never
            // attempted before: sent, not late.
            Ok(()) if delivery.attempts == 0 => self.store.delete_delivery(delivery.id).await.map(|()| "sent"),
            Ok(()) => {
                tracing::info!(kind, attempts, "a delivery the mailer missed was sent");
                self.store.delete_delivery(delivery.id).await.map(|()| "sent_late")
            }
            Err(_) => put_off().await.map(|()| "retry_failed"),
        }
    }

    /// Whether the event `body` of type `kind` mails a link that no longer
    /// works (spent, replaced by a newer one, voided): not worth a late
    /// mail, which could arrive after the newer link's.
    async fn link_gone(&self, kind: &str, body: &str) -> Result<bool, crate::db::StoreError> {
        let purpose = match kind {
            "password_reset.requested" => LinkPurpose::PasswordReset,
            "email_verification.requested" => LinkPurpose::EmailVerification,
            "email_change.requested" => LinkPurpose::EmailChange,
            "login_link.requested" => LinkPurpose::Login,
            _ => return Ok(false),
        };
        let event: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let Some(token) = event["data"]["token"].as_str() else { return Ok(false) };
        Ok(self.store.pending_email_link(purpose, &refresh::hash(token), unix_now()).await?.is_none())
    }

    /// What a stored body is: an event of the row's kind sealed for the
    /// row, or sealed with a key not loaded, or anything else.
    fn opened(&self, delivery: &Delivery) -> Opened {
        if !is_sealed(&delivery.body) {
            return Opened::Forged;
        }
        if !self.sealer.knows_key_of(&delivery.body) {
            return Opened::NoKey;
        }
        let Ok(body) = self.sealer.open(&delivery.body, &aad(delivery.id)) else { return Opened::Forged };
        let kind = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|event| match &event["type"] {
            serde_json::Value::String(kind) => Some(kind.clone()),
            _ => None,
        });
        match kind {
            Some(kind) if kind == delivery.kind => Opened::Event(body),
            _ => Opened::Forged,
        }
    }
}

/// See [`Outbox::opened`].
enum Opened {
    Event(String),
    NoKey,
    Forged,
}

/// What a delivery's body is sealed for: `outbox`, a NUL, and the row's
/// id (other sealed values are sealed for a user's id alone).
pub fn aad(id: Uuid) -> Vec<u8> {
    let mut aad = b"outbox\0".to_vec();
    aad.extend_from_slice(id.as_bytes());
    aad
}

/// The `webhook-id` of the delivery stored as `id`.
fn webhook_id(id: Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// The pause (seconds) after `attempts` failed ones: [`FIRST_RETRY`] after
/// the first three, doubling since, at most [`MAX_RETRY`].
fn backoff(attempts: i64) -> i64 {
    let first = i64::try_from(webhook::ATTEMPTS).unwrap_or(3);
    let doublings = u32::try_from((attempts - first).clamp(0, 16)).unwrap_or(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_from_the_first_retry_up_to_the_longest() {
        assert_eq!(backoff(3), FIRST_RETRY);
        assert_eq!(backoff(4), 2 * FIRST_RETRY);
        assert_eq!(backoff(5), 4 * FIRST_RETRY);
        assert_eq!(backoff(9), MAX_RETRY);
        assert_eq!(backoff(1_000), MAX_RETRY);
        assert_eq!(backoff(0), FIRST_RETRY, "fewer than the first three: still the first pause");
    }

    #[test]
    fn a_webhook_id_is_the_rows_id() {
        let id = Uuid::nil();
        assert_eq!(webhook_id(id), "msg_00000000000000000000000000000000");
    }
}
