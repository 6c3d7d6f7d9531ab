//! Deleting what no longer serves, so the tables stop growing with time.
//!
//! Every refresh writes a refresh-token row and every login a session, and
//! nothing else ever removes them; the audit log only grows. [`Store::prune`]
//! deletes, with `database.session_retention` = R:
//! - **sessions that ended more than R ago**, with their refresh tokens: a
//!   revoked one R after its revocation, another R after its last refresh
//!   token expired (nothing can revive it then);
//! - **spent refresh tokens that expired more than R ago**: a session that
//!   lives for months by rotation keeps R plus one refresh-token lifetime of
//!   its chain, not every token it ever had. Reuse detection forgets them
//!   with them: such a token, presented again, is refused as unknown, and
//!   its session is not revoked (see the README's "Retention");
//! - with `database.audit_retention`, **audit events older than it**.
//!
//! R is at least `access_token_ttl + leeway` and an hour (config check): a
//! revoked session must stay readable for as long as an access token of it
//! may live, because a replica that starts loads its revocation state from
//! those rows.
//!
//! The cutoff is the database's clock less R (not the caller's: `gateway
//! prune` may run on any machine).
//!
//! Work is cut small so that no lock is held for long, a first run on a
//! large table included. Ids are read [`BATCH`] at a time, by index (revoked
//! sessions by `revoked_at`, spent tokens by `expires_at`, audit events by
//! `at`) or, for sessions that lapsed unrevoked, by walking the sessions in
//! id order once per run; what they name cannot come back to life
//! meanwhile (an ended session stays ended, an expired token stays expired).
//! Each session then goes in a transaction of its own, with its tokens,
//! locking one session row: a `user disable` or `tenant disable` revoking
//! several sessions at once can wait for it but never deadlock with it.
//! Spent tokens go a batch per transaction, each after the chain link
//! (`parent_id`) of the token after it is cleared. On PostgreSQL every
//! transaction first takes one advisory lock, so replicas pruning at once
//! take turns instead of locking rows in different orders.

use std::time::Duration;

use uuid::Uuid;

use super::{on_pool, secs, Pool, Store, StoreResult};

/// Ids read at a time.
pub const BATCH: i64 = 500;

/// Audit events deleted per statement.
const AUDIT_BATCH: i64 = 5_000;

/// The PostgreSQL advisory lock every pruning transaction takes first
/// (`pg_advisory_xact_lock`; any constant, the same in every replica).
const PRUNE_LOCK: i64 = 0x6761_7465_7761_7901;

const PRUNE_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1)";

/// How long ended data is kept; `None`: for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub sessions: Option<Duration>,
    pub audit: Option<Duration>,
}

/// What one [`Store::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub sessions: u64,
    pub refresh_tokens: u64,
    pub audit_events: u64,
}

/// Sessions revoked before `$1` (the partial index on `revoked_at`).
const REVOKED_SESSIONS: &str = "SELECT id FROM sessions WHERE revoked_at < $1 LIMIT $2";

/// Open sessions created before `$1` whose every refresh token expired
/// before it, after id `$3`, in id order (one walk of the table per run).
const LAPSED_SESSIONS: &str = "
    SELECT s.id FROM sessions s
    WHERE s.id > $3 AND s.revoked_at IS NULL AND s.created_at < $1
      AND NOT EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.session_id = s.id AND r.expires_at >= $1)
    ORDER BY s.id LIMIT $2";

const DELETE_SESSION: [&str; 2] =
    ["DELETE FROM refresh_tokens WHERE session_id = $1", "DELETE FROM sessions WHERE id = $1"];

/// Spent refresh tokens that expired before `$1` (the index on `expires_at`).
const OLD_SPENT_TOKENS: &str =
    "SELECT id FROM refresh_tokens WHERE expires_at < $1 AND spent_at IS NOT NULL ORDER BY expires_at LIMIT $2";

const DELETE_TOKEN: [&str; 2] =
    ["UPDATE refresh_tokens SET parent_id = NULL WHERE parent_id = $1", "DELETE FROM refresh_tokens WHERE id = $1"];

const DELETE_AUDIT: &str = "
    DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE at < $1 ORDER BY at LIMIT $2)";

impl Store {
    /// Deletes what `retention` no longer keeps, batch after batch until
    /// none is left.
    pub async fn prune(&self, retention: Retention) -> StoreResult<Pruned> {
        let mut pruned = Pruned::default();
        if retention.sessions.is_none() && retention.audit.is_none() {
            return Ok(pruned);
        }
        let now = self.database_now().await?;
        if let Some(keep) = retention.sessions {
            let cutoff = now - secs(keep);
            loop {
                let ids: Vec<(Uuid,)> =
                    on_pool!(self, |p| sqlx::query_as(REVOKED_SESSIONS).bind(cutoff).bind(BATCH).fetch_all(p).await)?;
                self.delete_sessions(&ids, &mut pruned).await?;
                if ids.len() < batch_len() {
                    break;
                }
            }
            let mut after = Uuid::nil();
            loop {
                let ids: Vec<(Uuid,)> = on_pool!(self, |p| sqlx::query_as(LAPSED_SESSIONS)
                    .bind(cutoff)
                    .bind(BATCH)
                    .bind(after)
                    .fetch_all(p)
                    .await)?;
                self.delete_sessions(&ids, &mut pruned).await?;
                match ids.last() {
                    Some((last,)) if ids.len() == batch_len() => after = *last,
                    _ => break,
                }
            }
            loop {
                let ids: Vec<(Uuid,)> =
                    on_pool!(self, |p| sqlx::query_as(OLD_SPENT_TOKENS).bind(cutoff).bind(BATCH).fetch_all(p).await)?;
                if !ids.is_empty() {
                    pruned.refresh_tokens += self.delete_each(&ids, &DELETE_TOKEN).await?[1];
                }
                if ids.len() < batch_len() {
                    break;
                }
            }
        }
        if let Some(keep) = retention.audit {
            let cutoff = now - secs(keep);
            loop {
                let deleted = on_pool!(self, |p| {
                    let mut tx = p.begin().await?;
                    if self.is_postgres() {
                        sqlx::query(PRUNE_LOCK_SQL).bind(PRUNE_LOCK).execute(&mut *tx).await?;
                    }
                    let done = sqlx::query(DELETE_AUDIT).bind(cutoff).bind(AUDIT_BATCH).execute(&mut *tx).await?;
                    tx.commit().await?;
                    done.rows_affected()
                });
                pruned.audit_events += deleted;
                if deleted < AUDIT_BATCH.unsigned_abs() {
                    break;
                }
            }
        }
        Ok(pruned)
    }

    fn is_postgres(&self) -> bool {
        matches!(self.pool(), Pool::Postgres(_))
    }

    /// Unix seconds by the database's clock.
    async fn database_now(&self) -> StoreResult<i64> {
        let now: (i64,) = match self.pool() {
            Pool::Sqlite(p) => sqlx::query_as("SELECT CAST(strftime('%s', 'now') AS INTEGER)").fetch_one(p).await,
            Pool::Postgres(p) => sqlx::query_as("SELECT CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)").fetch_one(p).await,
        }?;
        Ok(now.0)
    }

    /// Deletes each session of `ids` with its refresh tokens, a transaction
    /// per session.
    async fn delete_sessions(&self, ids: &[(Uuid,)], pruned: &mut Pruned) -> StoreResult<()> {
        for id in ids.chunks(1) {
            let [tokens, sessions] = self.delete_each(id, &DELETE_SESSION).await?;
            pruned.refresh_tokens += tokens;
            pruned.sessions += sessions;
        }
        Ok(())
    }

    /// Runs each of `steps` (bound to the id) for every id, in one
    /// transaction; returns the rows each step changed.
    ///
    /// The ids are read before: on SQLite a transaction that reads before
    /// it writes cannot wait for the write lock (its snapshot would be
    /// stale), so this one starts with a write and queues behind the other
    /// writers instead.
    async fn delete_each<const N: usize>(&self, ids: &[(Uuid,)], steps: &[&str; N]) -> StoreResult<[u64; N]> {
        let mut rows = [0; N];
        on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            if self.is_postgres() {
                sqlx::query(PRUNE_LOCK_SQL).bind(PRUNE_LOCK).execute(&mut *tx).await?;
            }
            for (id,) in ids {
                for (step, count) in steps.iter().zip(rows.iter_mut()) {
                    *count += sqlx::query(step).bind(id).execute(&mut *tx).await?.rows_affected();
                }
            }
            tx.commit().await?;
        });
        Ok(rows)
    }
}

/// [`BATCH`] as a length.
fn batch_len() -> usize {
    usize::try_from(BATCH).unwrap_or(usize::MAX)
}
