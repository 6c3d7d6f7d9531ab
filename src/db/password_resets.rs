//! `password_resets`: one row per reset link. Only the SHA-256 of a link's
//! token is stored (as for refresh tokens), and the SHA-256 of the password
//! hash the link was made against: a link sets the password only while that
//! password is still the user's, so a link made before a change (by the
//! user, an operator or another link) is dead.
//!
//! A link is spent in the same transaction that sets the password and
//! revokes the user's sessions, by a conditional update: of two requests
//! presenting one link, one sets the password.

use uuid::Uuid;

use super::{on_pool, Store, StoreResult};

/// A link to store.
pub struct NewReset<'a> {
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub token_hash: &'a [u8; 32],
    pub password_fingerprint: &'a [u8; 32],
    pub now: i64,
    pub expires_at: i64,
    /// No link is made when the user got one less than this many seconds
    /// ago (0: always made).
    pub min_interval: i64,
}

/// A link that is neither spent, replaced nor expired.
#[derive(Debug, Clone)]
pub struct PendingReset {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub password_fingerprint: Vec<u8>,
    pub expires_at: i64,
}

/// What [`Store::create_password_reset`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetMade {
    Made,
    /// The user got a link within the minimum interval: none was made.
    Throttled,
    /// The user or its tenant is disabled (or gone): none was made.
    Refused,
}

/// Why [`Store::redeem_password_reset`] set nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unredeemed {
    /// Spent, replaced or expired meanwhile.
    LinkGone,
    /// The password changed meanwhile, or the user or tenant was disabled
    /// (or is gone).
    UserChanged,
}

const INSERT: &str = "
    INSERT INTO password_resets (id, token_hash, tenant_id, user_id, password_fingerprint, created_at, expires_at)
    SELECT $1, $2, $3, $4, $5, $6, $7
    WHERE NOT EXISTS (SELECT 1 FROM password_resets WHERE tenant_id = $3 AND user_id = $4 AND created_at > $8)";

/// Voids the user's other unspent links (`$3`: now, `$4`: the one kept).
const VOID_OTHERS: &str = "
    UPDATE password_resets SET used_at = $3
    WHERE tenant_id = $1 AND user_id = $2 AND used_at IS NULL AND ($4 IS NULL OR id <> $4)";

impl Store {
    /// Stores a link and voids the user's earlier unspent ones (only the
    /// newest link works), in one transaction, if the user and its tenant
    /// are enabled and the user got no link within `min_interval`.
    ///
    /// The transaction starts by locking the user's row (a write that
    /// changes nothing, and checks the user is enabled): on SQLite it
    /// queues for the write lock rather than failing on a stale read; on
    /// PostgreSQL two links for one user are made one after the other, so
    /// the second sees the first (the one-a-minute rule holds, and one link
    /// stays). The tenant's row is then share-locked and checked: a tenant
    /// disable, which voids the tenant's links in its own transaction,
    /// either sees this link or is seen by it.
    pub async fn create_password_reset(&self, new: NewReset<'_>) -> StoreResult<ResetMade> {
        const LOCK_USER: &str = "UPDATE users SET updated_at = updated_at
                                 WHERE tenant_id = $1 AND id = $2 AND NOT disabled";
        const TENANT: &str = "SELECT disabled FROM tenants WHERE id = $1";
        let tenant = match self.pool() {
            super::Pool::Sqlite(_) => TENANT.to_owned(),
            super::Pool::Postgres(_) => format!("{TENANT} FOR SHARE"),
        };
        let id = Uuid::new_v4();
        let since = if new.min_interval > 0 { new.now - new.min_interval } else { i64::MAX };
        let made = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let locked = sqlx::query(LOCK_USER).bind(new.tenant_id).bind(new.user_id).execute(&mut *tx).await?;
            let tenant: Option<(bool,)> = sqlx::query_as(&tenant).bind(new.tenant_id).fetch_optional(&mut *tx).await?;
            if locked.rows_affected() == 0 || tenant.is_none_or(|(disabled,)| disabled) {
                tx.rollback().await?;
                ResetMade::Refused
            } else {
                let inserted = sqlx::query(INSERT)
                    .bind(id)
                    .bind(&new.token_hash[..])
                    .bind(new.tenant_id)
                    .bind(new.user_id)
                    .bind(&new.password_fingerprint[..])
                    .bind(new.now)
                    .bind(new.expires_at)
                    .bind(since)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if inserted == 1 {
                    let void =
                        sqlx::query(VOID_OTHERS).bind(new.tenant_id).bind(new.user_id).bind(new.now).bind(Some(id));
                    void.execute(&mut *tx).await?;
                    tx.commit().await?;
                    ResetMade::Made
                } else {
                    tx.rollback().await?;
                    ResetMade::Throttled
                }
            }
        });
        Ok(made)
    }

    /// The link whose token hashes to `token_hash`, if it is unspent and
    /// unexpired at `now`.
    pub async fn pending_password_reset(&self, token_hash: &[u8; 32], now: i64) -> StoreResult<Option<PendingReset>> {
        let sql = "SELECT id, tenant_id, user_id, password_fingerprint, expires_at FROM password_resets
                   WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2";
        let row: Option<(Uuid, Uuid, Uuid, Vec<u8>, i64)> =
            on_pool!(self, |p| sqlx::query_as(sql).bind(&token_hash[..]).bind(now).fetch_optional(p).await)?;
        Ok(row.map(|(id, tenant_id, user_id, password_fingerprint, expires_at)| PendingReset {
            id,
            tenant_id,
            user_id,
            password_fingerprint,
            expires_at,
        }))
    }

    /// Spends `link`, replaces the user's password hash `old` (the one the
    /// link was made against) by `new`, voids the user's other links and
    /// revokes every open session (reason `password_reset`), all in one
    /// transaction; returns the revoked sessions. Nothing is written when
    /// the link was spent meanwhile, or the user's password is no longer
    /// `old`, or the user or its tenant is disabled.
    pub async fn redeem_password_reset(
        &self,
        link: &PendingReset,
        old: &str,
        new: &str,
        now: i64,
    ) -> StoreResult<Result<Vec<Uuid>, Unredeemed>> {
        let spend = "UPDATE password_resets SET used_at = $2 WHERE id = $1 AND used_at IS NULL AND expires_at > $2";
        let set = "UPDATE users SET password_hash = $4, updated_at = $5
                   WHERE tenant_id = $1 AND id = $2 AND password_hash = $3 AND NOT disabled
                     AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = $1 AND NOT t.disabled)";
        let revoke = "UPDATE sessions SET revoked_at = $3, revoke_reason = 'password_reset'
                      WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING id";
        let (tenant_id, user_id) = (link.tenant_id, link.user_id);
        let outcome = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            if sqlx::query(spend).bind(link.id).bind(now).execute(&mut *tx).await?.rows_affected() == 0 {
                tx.rollback().await?;
                Err(Unredeemed::LinkGone)
            } else if sqlx::query(set)
                .bind(tenant_id)
                .bind(user_id)
                .bind(old)
                .bind(new)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 0
            {
                tx.rollback().await?;
                Err(Unredeemed::UserChanged)
            } else {
                sqlx::query(VOID_OTHERS)
                    .bind(tenant_id)
                    .bind(user_id)
                    .bind(now)
                    .bind(None::<Uuid>)
                    .execute(&mut *tx)
                    .await?;
                let revoked: Vec<(Uuid,)> =
                    sqlx::query_as(revoke).bind(tenant_id).bind(user_id).bind(now).fetch_all(&mut *tx).await?;
                tx.commit().await?;
                Ok(revoked.into_iter().map(|(id,)| id).collect())
            }
        });
        Ok(outcome)
    }

    /// Deletes links that expired or were spent before `before` (the hourly
    /// upkeep and `gateway prune`: the audit log keeps their story); returns
    /// how many.
    pub async fn purge_password_resets(&self, before: i64) -> StoreResult<u64> {
        let sql = "DELETE FROM password_resets WHERE expires_at < $1 OR used_at < $1";
        Ok(on_pool!(self, |p| sqlx::query(sql).bind(before).execute(p).await.map(|d| d.rows_affected()))?)
    }
}
