//! `login_attempts`: the per-(tenant, email) lockout counter.
//!
//! An attempt is *reserved* before the password is hashed, by one upsert that
//! only succeeds while the key is not locked. Twenty parallel wrong guesses
//! therefore cannot all pass a "not locked yet" check and then all be
//! evaluated: the database serialises the reservations (a row lock in
//! PostgreSQL, the write lock in SQLite) and at most `threshold` of them get
//! through, across every process sharing the database. The attempt that
//! reaches the threshold sets the lock in the same statement; a success
//! deletes the row.

use super::{on_pool, Store, StoreResult};

/// The outcome of reserving a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Go ahead; `failures` counts this attempt. `locks` is true when a
    /// failure of this attempt is the one that started the lock.
    Allowed { failures: i64, locks: bool },
    /// Locked until this unix time; do not hash anything.
    Locked { until: i64 },
}

// `expired`: a previous lock has run out, so the count starts again.
const RESERVE: &str = "
    INSERT INTO login_attempts (tenant, email, failures, locked_until, updated_at)
    VALUES ($1, $2, 1, CASE WHEN 1 >= $3 THEN $4 END, $5)
    ON CONFLICT (tenant, email) DO UPDATE SET
      failures = CASE WHEN login_attempts.locked_until IS NOT NULL AND login_attempts.locked_until <= $5
                      THEN 1 ELSE login_attempts.failures + 1 END,
      locked_until = CASE WHEN (CASE WHEN login_attempts.locked_until IS NOT NULL AND login_attempts.locked_until <= $5
                                     THEN 1 ELSE login_attempts.failures + 1 END) >= $3
                          THEN $4 END,
      updated_at = $5
    WHERE login_attempts.locked_until IS NULL OR login_attempts.locked_until <= $5
    RETURNING failures, locked_until";

impl Store {
    /// Reserves one attempt for `(tenant, email)` at time `now`.
    pub async fn reserve_login_attempt(
        &self,
        tenant: &str,
        email: &str,
        threshold: u32,
        lock_until: i64,
        now: i64,
    ) -> StoreResult<Attempt> {
        let row: Option<(i64, Option<i64>)> = on_pool!(self, |p| sqlx::query_as(RESERVE)
            .bind(tenant)
            .bind(email)
            .bind(i64::from(threshold))
            .bind(lock_until)
            .bind(now)
            .fetch_optional(p)
            .await)?;
        if let Some((failures, locked_until)) = row {
            return Ok(Attempt::Allowed { failures, locks: locked_until.is_some() });
        }
        let sql = "SELECT locked_until FROM login_attempts WHERE tenant = $1 AND email = $2";
        let until: Option<(Option<i64>,)> =
            on_pool!(self, |p| sqlx::query_as(sql).bind(tenant).bind(email).fetch_optional(p).await)?;
        Ok(Attempt::Locked { until: until.and_then(|(u,)| u).unwrap_or(now + 1) })
    }

    /// Forgets the failures of `(tenant, email)` after a successful login.
    pub async fn clear_login_attempts(&self, tenant: &str, email: &str) -> StoreResult<()> {
        let sql = "DELETE FROM login_attempts WHERE tenant = $1 AND email = $2";
        on_pool!(self, |p| sqlx::query(sql).bind(tenant).bind(email).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes counters idle past [`idle_counter_cutoff`] (the hourly
    /// upkeep and `gateway prune`); returns how many.
    pub async fn purge_idle_login_attempts(&self, lockout: std::time::Duration) -> StoreResult<u64> {
        self.purge_login_attempts(idle_counter_cutoff(lockout, super::unix_now())).await
    }

    /// Deletes counters that are not locked and saw no attempt since `before`,
    /// so guesses at made-up emails cannot grow the table without bound.
    pub async fn purge_login_attempts(&self, before: i64) -> StoreResult<u64> {
        let sql = "DELETE FROM login_attempts
                   WHERE updated_at < $1 AND (locked_until IS NULL OR locked_until < $1)";
        Ok(on_pool!(self, |p| sqlx::query(sql).bind(before).execute(p).await.map(|d| d.rows_affected()))?)
    }
}

/// Counters idle since before this are forgotten: a day, or the lockout
/// duration if longer (a counter must outlive its lock).
pub fn idle_counter_cutoff(lockout: std::time::Duration, now: i64) -> i64 {
    now - super::secs(lockout.max(std::time::Duration::from_secs(86_400)))
}
