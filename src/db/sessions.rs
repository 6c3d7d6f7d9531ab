//! `sessions` and `refresh_tokens`: one session per login, one chain of
//! refresh tokens per session (the "family").
//!
//! Rotation is a single conditional `UPDATE … WHERE spent_at IS NULL`: of any
//! number of concurrent refreshes of one token, in this process or another,
//! exactly one sees its row change and wins. A token that is presented after
//! it was spent is evidence of theft, so the whole session is revoked.

use uuid::Uuid;

use super::{parse_uuid, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub created_at: i64,
    pub last_used_at: i64,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// Who opened a session, as recorded for `GET /auth/sessions`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientInfo<'a> {
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// A refresh token as the database sees it: only its hash.
#[derive(Debug, Clone, Copy)]
pub struct RefreshHash<'a> {
    pub hash: &'a [u8],
    pub expires_at: i64,
}

/// The result of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live and is now spent; a successor was stored.
    Rotated { tenant_id: Uuid, user_id: Uuid, session_id: Uuid },
    /// The token had already been spent: its session is now revoked.
    Reused { tenant_id: Uuid, user_id: Uuid, session_id: Uuid },
    /// Unknown, expired, or belonging to a revoked session or disabled user.
    Invalid,
}

impl Store {
    /// Opens a session with its first refresh token.
    pub async fn create_session(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        client: ClientInfo<'_>,
        refresh: RefreshHash<'_>,
        now: i64,
    ) -> StoreResult<Uuid> {
        let session_id = Uuid::new_v4();
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO sessions (id, tenant_id, user_id, created_at, last_used_at, ip, user_agent)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)",
        )
        .bind(session_id.to_string())
        .bind(tenant_id.to_string())
        .bind(user_id.to_string())
        .bind(now)
        .bind(client.ip)
        .bind(client.user_agent)
        .execute(&mut *tx)
        .await?;
        insert_refresh(&mut tx, tenant_id, session_id, None, refresh, now).await?;
        tx.commit().await?;
        Ok(session_id)
    }

    /// Spends `presented` and stores `next` in its place, or reports reuse.
    pub async fn rotate_refresh_token(
        &self,
        presented: &[u8],
        next: RefreshHash<'_>,
        now: i64,
    ) -> StoreResult<Rotation> {
        let mut tx = self.pool().begin().await?;
        // The write comes first so SQLite takes the write lock at once and
        // concurrent rotations queue behind it instead of failing on upgrade.
        let won: Option<(String, String, String)> = sqlx::query_as(
            "UPDATE refresh_tokens SET spent_at = ?2
             WHERE token_hash = ?1 AND spent_at IS NULL AND expires_at > ?2
             RETURNING id, tenant_id, session_id",
        )
        .bind(presented)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;

        let Some((token_id, tenant_id, session_id)) = won else {
            let spent: Option<(String, String)> = sqlx::query_as(
                "SELECT tenant_id, session_id FROM refresh_tokens WHERE token_hash = ?1 AND spent_at IS NOT NULL",
            )
            .bind(presented)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((tenant_id, session_id)) = spent else {
                return Ok(Rotation::Invalid);
            };
            let user: Option<(String,)> = sqlx::query_as(
                "UPDATE sessions SET revoked_at = COALESCE(revoked_at, ?3),
                        revoke_reason = COALESCE(revoke_reason, 'refresh_reuse')
                 WHERE tenant_id = ?1 AND id = ?2 RETURNING user_id",
            )
            .bind(&tenant_id)
            .bind(&session_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            let Some((user_id,)) = user else { return Ok(Rotation::Invalid) };
            return Ok(Rotation::Reused {
                tenant_id: parse_uuid(&tenant_id)?,
                user_id: parse_uuid(&user_id)?,
                session_id: parse_uuid(&session_id)?,
            });
        };

        let live: Option<(String,)> = sqlx::query_as(
            "SELECT s.user_id FROM sessions s JOIN users u ON u.id = s.user_id AND u.tenant_id = s.tenant_id
             WHERE s.tenant_id = ?1 AND s.id = ?2 AND s.revoked_at IS NULL AND u.disabled = 0",
        )
        .bind(&tenant_id)
        .bind(&session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((user_id,)) = live else {
            tx.commit().await?;
            return Ok(Rotation::Invalid);
        };
        let tenant = parse_uuid(&tenant_id)?;
        let session = parse_uuid(&session_id)?;
        insert_refresh(&mut tx, tenant, session, Some(&token_id), next, now).await?;
        sqlx::query("UPDATE sessions SET last_used_at = ?3 WHERE tenant_id = ?1 AND id = ?2")
            .bind(&tenant_id)
            .bind(&session_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Rotation::Rotated { tenant_id: tenant, user_id: parse_uuid(&user_id)?, session_id: session })
    }

    /// Revokes one session of one user; false if it was not theirs or not open.
    pub async fn revoke_session(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        session_id: Uuid,
        reason: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = ?4, revoke_reason = ?5
             WHERE tenant_id = ?1 AND user_id = ?2 AND id = ?3 AND revoked_at IS NULL",
        )
        .bind(tenant_id.to_string())
        .bind(user_id.to_string())
        .bind(session_id.to_string())
        .bind(now)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes every open session of a user except `keep`; returns their ids.
    pub async fn revoke_user_sessions(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: &str,
        now: i64,
    ) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoked_at = ?4, revoke_reason = ?5
             WHERE tenant_id = ?1 AND user_id = ?2 AND revoked_at IS NULL AND (?3 IS NULL OR id <> ?3)
             RETURNING id",
        )
        .bind(tenant_id.to_string())
        .bind(user_id.to_string())
        .bind(keep.map(|k| k.to_string()))
        .bind(now)
        .bind(reason)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|(id,)| parse_uuid(id)).collect()
    }

    /// The user's sessions that are still open, newest first.
    pub async fn active_sessions(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Vec<Session>> {
        type Row = (String, i64, i64, Option<String>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, created_at, last_used_at, ip, user_agent FROM sessions
             WHERE tenant_id = ?1 AND user_id = ?2 AND revoked_at IS NULL
             ORDER BY created_at DESC, id",
        )
        .bind(tenant_id.to_string())
        .bind(user_id.to_string())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(id, created_at, last_used_at, ip, user_agent)| {
                Ok(Session { id: parse_uuid(&id)?, tenant_id, user_id, created_at, last_used_at, ip, user_agent })
            })
            .collect()
    }

    /// Sessions revoked at or after `since` (for the revocation poller).
    pub async fn sessions_revoked_since(&self, since: i64) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM sessions WHERE revoked_at >= ?1").bind(since).fetch_all(self.pool()).await?;
        rows.iter().map(|(id,)| parse_uuid(id)).collect()
    }
}

async fn insert_refresh(
    tx: &mut sqlx::SqliteConnection,
    tenant_id: Uuid,
    session_id: Uuid,
    parent: Option<&str>,
    refresh: RefreshHash<'_>,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (id, token_hash, session_id, tenant_id, parent_id, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(refresh.hash)
    .bind(session_id.to_string())
    .bind(tenant_id.to_string())
    .bind(parent)
    .bind(now)
    .bind(refresh.expires_at)
    .execute(tx)
    .await?;
    Ok(())
}
