//! Deleting what no longer serves, so the tables stop growing with time.
//!
//! Every refresh writes a refresh-token row and every login a session, and
//! nothing else ever removes them; the audit log only grows. [`Store::prune`]
//! deletes, with `database.session_retention` = R:
//! - **sessions that ended more than R ago**, with their refresh tokens: a
//!   revoked one R after its revocation, another R after its last refresh
//!   token expired (nothing can revive it then);
//! - **spent refresh tokens that expired more than R ago**, in sessions still
//!   open: a session that lives for months by rotation keeps R plus one
//!   refresh-token lifetime of its chain, not every token it ever had. Such
//!   a token, presented again, is refused as unknown rather than as a reuse
//!   (no session is revoked then; it has not been usable for R anyway);
//! - with `database.audit_retention`, **audit events older than it**.
//!
//! R is at least `access_token_ttl + leeway` and an hour (config check): a
//! revoked session must stay readable for as long as an access token of it
//! may live, because a replica that starts loads its revocation state from
//! those rows.
//!
//! Deletes run in batches of [`BATCH`] ids, each its own short transaction,
//! so a first run on a large table never holds SQLite's write lock (or
//! PostgreSQL's row locks) for long. The ids of a batch are read first and
//! then deleted one by one: the rows they name cannot come back to life
//! meanwhile (an ended session stays ended, an expired token stays
//! expired), and the chain links (`parent_id`) of the tokens left are
//! cleared before their parent goes. Several replicas pruning at once
//! delete each row once; the others find it gone.

use std::time::Duration;

use uuid::Uuid;

use super::{on_pool, secs, Store, StoreResult};

/// Ids per transaction.
pub const BATCH: i64 = 500;

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

/// Sessions revoked before `$1`, and open ones created before it whose
/// every refresh token expired before it.
const ENDED_SESSIONS: &str = "
    SELECT s.id FROM sessions s
    WHERE s.revoked_at < $1
       OR (s.revoked_at IS NULL AND s.created_at < $1
           AND NOT EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.session_id = s.id AND r.expires_at >= $1))
    LIMIT $2";
const DELETE_SESSION: [&str; 2] =
    ["DELETE FROM refresh_tokens WHERE session_id = $1", "DELETE FROM sessions WHERE id = $1"];

/// Spent refresh tokens that expired before `$1`.
const OLD_SPENT_TOKENS: &str = "SELECT id FROM refresh_tokens WHERE expires_at < $1 AND spent_at IS NOT NULL LIMIT $2";
const DELETE_TOKEN: [&str; 2] =
    ["UPDATE refresh_tokens SET parent_id = NULL WHERE parent_id = $1", "DELETE FROM refresh_tokens WHERE id = $1"];

const DELETE_AUDIT: &str = "
    DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE at < $1 ORDER BY id LIMIT $2)";

impl Store {
    /// Deletes what `retention` no longer keeps as of `now` (unix seconds),
    /// batch after batch until none is left.
    pub async fn prune(&self, retention: Retention, now: i64) -> StoreResult<Pruned> {
        let mut pruned = Pruned::default();
        if let Some(keep) = retention.sessions {
            let cutoff = now - secs(keep);
            loop {
                let (ids, rows) = self.delete_batch(ENDED_SESSIONS, cutoff, &DELETE_SESSION).await?;
                pruned.refresh_tokens += rows[0];
                pruned.sessions += rows[1];
                if ids < BATCH {
                    break;
                }
            }
            loop {
                let (ids, rows) = self.delete_batch(OLD_SPENT_TOKENS, cutoff, &DELETE_TOKEN).await?;
                pruned.refresh_tokens += rows[1];
                if ids < BATCH {
                    break;
                }
            }
        }
        if let Some(keep) = retention.audit {
            let cutoff = now - secs(keep);
            loop {
                let deleted = on_pool!(self, |p| sqlx::query(DELETE_AUDIT)
                    .bind(cutoff)
                    .bind(BATCH * 10)
                    .execute(p)
                    .await
                    .map(|done| done.rows_affected()))?;
                pruned.audit_events += deleted;
                if deleted < u64::try_from(BATCH * 10).unwrap_or(u64::MAX) {
                    break;
                }
            }
        }
        Ok(pruned)
    }

    /// Reads up to [`BATCH`] ids with `select` (bound to `cutoff` and the
    /// batch size), then runs each of `steps` (bound to the id) for every
    /// id, in one transaction. Returns how many ids it read and the rows
    /// each step changed.
    ///
    /// The read comes before the transaction: on SQLite a transaction that
    /// reads before it writes cannot wait for the write lock (its snapshot
    /// would be stale), so the transaction starts with a write and queues
    /// behind the other writers instead.
    async fn delete_batch<const N: usize>(
        &self,
        select: &str,
        cutoff: i64,
        steps: &[&str; N],
    ) -> StoreResult<(i64, [u64; N])> {
        let ids: Vec<(Uuid,)> = on_pool!(self, |p| sqlx::query_as(select).bind(cutoff).bind(BATCH).fetch_all(p).await)?;
        let mut rows = [0; N];
        if ids.is_empty() {
            return Ok((0, rows));
        }
        on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            for (id,) in &ids {
                for (step, count) in steps.iter().zip(rows.iter_mut()) {
                    *count += sqlx::query(step).bind(id).execute(&mut *tx).await?.rows_affected();
                }
            }
            tx.commit().await?;
        });
        Ok((i64::try_from(ids.len()).unwrap_or(i64::MAX), rows))
    }
}
