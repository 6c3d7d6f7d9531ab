//! `outbox`: deliveries to the operator's mailer not yet accepted by it
//! (see [`crate::auth::outbox`] for the rules; the migration for the
//! columns). One function per query.
//!
//! Taking a row is a conditional update of `next_attempt_at` from the
//! value read to a lease: of two gateways that read the same due row, one
//! moves it and sends it; the other finds it moved and leaves it.

use uuid::Uuid;

use super::{on_pool, Store, StoreResult};

/// A delivery to store, due at once (see [`Store::insert_delivery`] for
/// one attempted by the caller first).
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: Uuid,
    pub kind: &'static str,
    /// The event, sealed for `id`.
    pub body: String,
    pub now: i64,
    pub expires_at: i64,
}

/// Stores a delivery (`$1` id, `$2` kind, `$3` body, `$4` now, `$5` when
/// it is due, `$6` expiry, `$7` attempts made).
pub(super) const INSERT: &str = "
    INSERT INTO outbox (id, kind, body, created_at, next_attempt_at, attempts, expires_at)
    VALUES ($1, $2, $3, $4, $5, $7, $6)";

/// A delivery as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Delivery {
    pub id: Uuid,
    pub kind: String,
    /// The event, sealed.
    pub body: String,
    pub next_attempt_at: i64,
    pub attempts: i64,
    pub expires_at: i64,
}

impl Store {
    /// Stores a delivery about to be attempted, leased to the caller until
    /// `leased_until`.
    pub async fn insert_delivery(
        &self,
        (id, kind, body): (Uuid, &str, &str),
        now: i64,
        leased_until: i64,
        expires_at: i64,
    ) -> StoreResult<()> {
        on_pool!(self, |p| sqlx::query(INSERT)
            .bind(id)
            .bind(kind)
            .bind(body)
            .bind(now)
            .bind(leased_until)
            .bind(expires_at)
            .bind(1_i64)
            .execute(p)
            .await
            .map(drop))?;
        Ok(())
    }

    /// Up to `limit` deliveries due at `now`, the longest waiting first.
    pub async fn due_deliveries(&self, now: i64, limit: i64) -> StoreResult<Vec<Delivery>> {
        let sql = "SELECT id, kind, body, next_attempt_at, attempts, expires_at FROM outbox
                   WHERE next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(now).bind(limit).fetch_all(p).await)?)
    }

    /// Takes `delivery` (as read) until `leased_until`, counting an
    /// attempt; false when another gateway took it, or it is gone.
    pub async fn take_delivery(&self, delivery: &Delivery, leased_until: i64) -> StoreResult<bool> {
        let sql = "UPDATE outbox SET next_attempt_at = $3, attempts = attempts + 1
                   WHERE id = $1 AND next_attempt_at = $2";
        let taken = on_pool!(self, |p| sqlx::query(sql)
            .bind(delivery.id)
            .bind(delivery.next_attempt_at)
            .bind(leased_until)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(taken == 1)
    }

    /// Schedules the next attempt of a delivery at `at`, if the caller
    /// still holds it (its lease, `leased_until`, is the row's): one whose
    /// lease ran out and that another gateway took is left to that one.
    pub async fn retry_delivery_at(&self, id: Uuid, leased_until: i64, attempts: i64, at: i64) -> StoreResult<()> {
        let sql = "UPDATE outbox SET next_attempt_at = $2, attempts = $3 WHERE id = $1 AND next_attempt_at = $4";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(id)
            .bind(at)
            .bind(attempts)
            .bind(leased_until)
            .execute(p)
            .await
            .map(drop))?;
        Ok(())
    }

    /// Deletes a delivery: accepted, expired, or one that can never go.
    pub async fn delete_delivery(&self, id: Uuid) -> StoreResult<()> {
        on_pool!(self, |p| sqlx::query("DELETE FROM outbox WHERE id = $1").bind(id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes the deliveries that expired before `now` (left by a gateway
    /// that no longer has a mailer to try them); returns how many.
    pub async fn purge_deliveries(&self, now: i64) -> StoreResult<u64> {
        let sql = "DELETE FROM outbox WHERE expires_at < $1";
        Ok(on_pool!(self, |p| sqlx::query(sql).bind(now).execute(p).await.map(|done| done.rows_affected()))?)
    }

    /// Makes every waiting delivery due at `now` (an operator's `gateway
    /// mailer retry`); returns how many. A lease is not told from a pause
    /// by its time: a delivery being attempted at that moment may be
    /// attempted twice, with the same `webhook-id`.
    pub async fn hurry_deliveries(&self, now: i64) -> StoreResult<u64> {
        let sql = "UPDATE outbox SET next_attempt_at = $1 WHERE next_attempt_at > $1";
        Ok(on_pool!(self, |p| sqlx::query(sql).bind(now).execute(p).await.map(|done| done.rows_affected()))?)
    }

    /// How many waiting deliveries are sealed by the key whose values start
    /// with `prefix` (`gateway keys list`: a key is removed once it holds
    /// nothing).
    pub async fn count_deliveries_with(&self, prefix: &str) -> StoreResult<i64> {
        let sql = "SELECT COUNT(*) FROM outbox WHERE body LIKE $1";
        let pattern = format!("{prefix}%");
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(sql).bind(&pattern).fetch_one(p).await)?;
        Ok(n)
    }

    /// How many deliveries wait (for `/metrics`).
    pub async fn waiting_deliveries(&self) -> StoreResult<i64> {
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as("SELECT COUNT(*) FROM outbox").fetch_one(p).await)?;
        Ok(n)
    }
}
