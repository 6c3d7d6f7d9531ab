//! `sessions` and `refresh_tokens`: one session per login, one chain of
//! refresh tokens per session (the "family").
//!
//! Rotation is a single conditional `UPDATE … WHERE spent_at IS NULL`: of any
//! number of concurrent refreshes of one token, in this process or another,
//! exactly one sees its row change and wins (in PostgreSQL the losers wait on
//! the row lock, then find `spent_at` set). A token that is presented after
//! it was spent is evidence of theft, so the whole session is revoked.

use uuid::Uuid;

use super::email_links::{PendingLink, Unredeemed};
use super::users::User;
use super::{on_pool, split_list, Pool, Store, StoreResult};
use crate::auth::token::Amr;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub created_at: i64,
    pub last_used_at: i64,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// When the session ends unless refreshed: its refresh token's expiry.
    pub expires_at: i64,
    /// Whether its login passed a second factor.
    pub mfa: bool,
    /// Whether its login was a sign-in link rather than a password.
    pub via_link: bool,
}

impl Session {
    /// How its login authenticated, as its tokens say.
    pub fn amr(&self) -> Amr {
        Amr { link: self.via_link, mfa: self.mfa }
    }
}

/// Who opened a session, as recorded for `GET /auth/sessions`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientInfo<'a> {
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// How the login authenticated (a sign-in link or a password, and
    /// whether a second factor followed): kept with the session, so that
    /// its refreshed tokens say so too (`amr`).
    pub amr: Amr,
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
    /// The token was live and is now spent; a successor was stored,
    /// expiring no later than `ends_at`, the end of the session's lifetime
    /// when one was given.
    Rotated { tenant_id: Uuid, user_id: Uuid, session_id: Uuid, ends_at: Option<i64>, amr: Amr },
    /// The token had already been spent: its session is now revoked.
    Reused { tenant_id: Uuid, user_id: Uuid, session_id: Uuid },
    /// Unknown, expired, or belonging to a revoked session, a session past
    /// its lifetime, a disabled user or a disabled tenant.
    Invalid,
}

/// `sessions` as they stand under a session `lifetime` (seconds) at
/// `now`: those past it are left out, and the others end no later than it.
pub fn within_lifetime(mut sessions: Vec<Session>, lifetime: Option<i64>, now: i64) -> Vec<Session> {
    if let Some(lifetime) = lifetime {
        sessions.retain_mut(|s| {
            let end = s.created_at.saturating_add(lifetime);
            s.expires_at = s.expires_at.min(end);
            end > now
        });
    }
    sessions
}

const INSERT_SESSION: &str = "
    INSERT INTO sessions (id, tenant_id, user_id, created_at, last_used_at, ip, user_agent, mfa, via_link)
    VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $8)";
const INSERT_REFRESH: &str = "
    INSERT INTO refresh_tokens (id, token_hash, session_id, tenant_id, parent_id, created_at, expires_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7)";
const SPEND: &str = "
    UPDATE refresh_tokens SET spent_at = $2
    WHERE token_hash = $1 AND spent_at IS NULL AND expires_at > $2
    RETURNING id, tenant_id, session_id";
const FIND_SPENT: &str =
    "SELECT tenant_id, session_id FROM refresh_tokens WHERE token_hash = $1 AND spent_at IS NOT NULL";
const REVOKE_FAMILY: &str = "
    UPDATE sessions SET revoked_at = COALESCE(revoked_at, $3), revoke_reason = COALESCE(revoke_reason, 'refresh_reuse')
    WHERE tenant_id = $1 AND id = $2 RETURNING user_id";
const LIVE_SESSION: &str = "
    SELECT s.user_id, s.created_at, s.mfa, s.via_link FROM sessions s
    JOIN users u ON u.id = s.user_id AND u.tenant_id = s.tenant_id
    JOIN tenants t ON t.id = s.tenant_id
    WHERE s.tenant_id = $1 AND s.id = $2 AND s.revoked_at IS NULL AND NOT u.disabled AND NOT t.disabled";
const TOUCH_SESSION: &str = "UPDATE sessions SET last_used_at = $3 WHERE tenant_id = $1 AND id = $2";

impl Store {
    /// Opens a session for `user` with its first refresh token, if the
    /// user's row is still as the login read it (enabled, same roles,
    /// scopes, TOTP secret and `password_hash`, the hash the password was
    /// verified against) and its tenant is enabled; `None` when either changed
    /// meanwhile, and nothing is written.
    ///
    /// This closes the race between a login and a `user disable`, `user
    /// revoke`, `user set-password` or `tenant disable`: those revoke
    /// sessions, and a session inserted while they ran would escape them.
    /// The check comes after the insert, in the same transaction: on SQLite
    /// the insert holds the write lock, so no change can commit in between;
    /// on PostgreSQL the check takes a share lock on the user's and the
    /// tenant's rows, so a change that already holds one is waited for and
    /// then seen, and one that comes later waits for this commit and then
    /// revokes the new session with the others.
    pub async fn create_session(
        &self,
        user: &User,
        password_hash: &str,
        client: ClientInfo<'_>,
        refresh: RefreshHash<'_>,
        now: i64,
    ) -> StoreResult<Option<Uuid>> {
        Ok(self.insert_session(user, password_hash, client, refresh, now, None).await?.ok())
    }

    /// Opens a session for `user` as [`Store::create_session`] does, in
    /// the transaction that spends the sign-in `link`, if the user's
    /// address is still the one it was mailed to, and proved: the link is
    /// spent if and only if the session opens. Refused, and nothing written, when the
    /// link was spent, replaced or expired meanwhile ([`Unredeemed::LinkGone`]),
    /// or the user's row changed as [`Store::create_session`] says, its
    /// email included ([`Unredeemed::UserChanged`]).
    pub async fn create_session_with_link(
        &self,
        user: &User,
        link: &PendingLink,
        client: ClientInfo<'_>,
        refresh: RefreshHash<'_>,
        now: i64,
    ) -> StoreResult<Result<Uuid, Unredeemed>> {
        self.insert_session(user, &user.password_hash, client, refresh, now, Some(link.id)).await
    }

    /// Both of the above: the session, its first refresh token, the check
    /// of the user's row, and with `link` its spending, in one transaction.
    async fn insert_session(
        &self,
        user: &User,
        password_hash: &str,
        client: ClientInfo<'_>,
        refresh: RefreshHash<'_>,
        now: i64,
        link: Option<Uuid>,
    ) -> StoreResult<Result<Uuid, Unredeemed>> {
        const SPEND_LINK: &str = "UPDATE email_links SET used_at = $2
                                  WHERE id = $1 AND purpose = 'login' AND used_at IS NULL AND expires_at > $2";
        // Locks the user's row before the link's, as every transaction
        // that touches both does (see `email_links`), and checks that the
        // address is the one the link was mailed to, still proved.
        const SAME_ADDRESS: &str = "UPDATE users SET updated_at = updated_at
                                    WHERE tenant_id = $1 AND id = $2 AND email = $3 AND email_verified_at IS NOT NULL";
        const CHECK: &str =
            "SELECT u.disabled, u.roles, u.scopes, u.password_hash, t.disabled, u.totp_secret FROM users u
                             JOIN tenants t ON t.id = u.tenant_id WHERE u.tenant_id = $1 AND u.id = $2";
        let check = match self.pool() {
            Pool::Sqlite(_) => CHECK.to_owned(),
            Pool::Postgres(_) => format!("{CHECK} FOR SHARE"),
        };
        type Check = (bool, String, String, String, bool, Option<String>);
        let unchanged = |(disabled, roles, scopes, hash, tenant_disabled, totp): Check| {
            !disabled
                && !tenant_disabled
                && split_list(&roles) == user.roles
                && split_list(&scopes) == user.scopes
                && hash == password_hash
                // A second factor added meanwhile was not asked for.
                && totp == user.totp_secret
        };
        let tenant_id = user.tenant_id;
        let session_id = Uuid::new_v4();
        let opened = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            sqlx::query(INSERT_SESSION)
                .bind(session_id)
                .bind(tenant_id)
                .bind(user.id)
                .bind(now)
                .bind(client.ip)
                .bind(client.user_agent)
                .bind(client.amr.mfa)
                .bind(client.amr.link)
                .execute(&mut *tx)
                .await?;
            sqlx::query(INSERT_REFRESH)
                .bind(Uuid::new_v4())
                .bind(refresh.hash)
                .bind(session_id)
                .bind(tenant_id)
                .bind(None::<Uuid>)
                .bind(now)
                .bind(refresh.expires_at)
                .execute(&mut *tx)
                .await?;
            // Rows are locked user, tenant, link: the order of every other
            // transaction that touches them (a tenant disable locks the
            // tenant, then its links; a user disable the user, then its
            // links), so none waits on this one in a cycle.
            let mut outcome = Ok(session_id);
            if link.is_some() {
                let same = sqlx::query(SAME_ADDRESS).bind(tenant_id).bind(user.id).bind(&user.email);
                if same.execute(&mut *tx).await?.rows_affected() != 1 {
                    outcome = Err(Unredeemed::UserChanged);
                }
            }
            if outcome.is_ok() {
                let row = sqlx::query_as(&check).bind(tenant_id).bind(user.id).fetch_optional(&mut *tx).await?;
                if !row.is_some_and(unchanged) {
                    outcome = Err(Unredeemed::UserChanged);
                }
            }
            if let (Some(link), true) = (link, outcome.is_ok()) {
                if sqlx::query(SPEND_LINK).bind(link).bind(now).execute(&mut *tx).await?.rows_affected() != 1 {
                    outcome = Err(Unredeemed::LinkGone);
                }
            }
            if outcome.is_ok() {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            outcome
        });
        Ok(opened)
    }

    /// Spends `presented` and stores `next` in its place, or reports reuse.
    ///
    /// With a session `lifetime` (seconds), a session that has lived that
    /// long since its login is over: the token is spent and `Invalid`; a
    /// younger one gets `next` cut to expire when the lifetime does.
    pub async fn rotate_refresh_token(
        &self,
        presented: &[u8],
        next: RefreshHash<'_>,
        lifetime: Option<i64>,
        now: i64,
    ) -> StoreResult<Rotation> {
        Ok(on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            // The write comes first, so SQLite takes its write lock at once and
            // concurrent rotations queue instead of failing on a lock upgrade.
            let won: Option<(Uuid, Uuid, Uuid)> =
                sqlx::query_as(SPEND).bind(presented).bind(now).fetch_optional(&mut *tx).await?;
            match won {
                None => {
                    let spent: Option<(Uuid, Uuid)> =
                        sqlx::query_as(FIND_SPENT).bind(presented).fetch_optional(&mut *tx).await?;
                    match spent {
                        None => Rotation::Invalid,
                        Some((tenant_id, session_id)) => {
                            let user: Option<(Uuid,)> = sqlx::query_as(REVOKE_FAMILY)
                                .bind(tenant_id)
                                .bind(session_id)
                                .bind(now)
                                .fetch_optional(&mut *tx)
                                .await?;
                            tx.commit().await?;
                            match user {
                                None => Rotation::Invalid,
                                Some((user_id,)) => Rotation::Reused { tenant_id, user_id, session_id },
                            }
                        }
                    }
                }
                Some((token_id, tenant_id, session_id)) => {
                    let live: Option<(Uuid, i64, bool, bool)> =
                        sqlx::query_as(LIVE_SESSION).bind(tenant_id).bind(session_id).fetch_optional(&mut *tx).await?;
                    let ends_at = live.and_then(|(_, created_at, _, _)| lifetime.map(|l| created_at.saturating_add(l)));
                    match live {
                        Some((user_id, _, mfa, link)) if ends_at.is_none_or(|end| end > now) => {
                            sqlx::query(INSERT_REFRESH)
                                .bind(Uuid::new_v4())
                                .bind(next.hash)
                                .bind(session_id)
                                .bind(tenant_id)
                                .bind(Some(token_id))
                                .bind(now)
                                .bind(ends_at.map_or(next.expires_at, |end| end.min(next.expires_at)))
                                .execute(&mut *tx)
                                .await?;
                            sqlx::query(TOUCH_SESSION)
                                .bind(tenant_id)
                                .bind(session_id)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            tx.commit().await?;
                            Rotation::Rotated { tenant_id, user_id, session_id, ends_at, amr: Amr { link, mfa } }
                        }
                        // The session is over (revoked, its user or tenant
                        // disabled, or past its lifetime): the token is left
                        // unspent, so that presenting it again is refused
                        // the same way rather than taken for reuse.
                        _ => {
                            tx.rollback().await?;
                            Rotation::Invalid
                        }
                    }
                }
            }
        }))
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
        let sql = "UPDATE sessions SET revoked_at = $4, revoke_reason = $5
                   WHERE tenant_id = $1 AND user_id = $2 AND id = $3 AND revoked_at IS NULL";
        let affected = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(session_id)
            .bind(now)
            .bind(reason)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(affected == 1)
    }

    /// Revokes one open session of the tenant, whoever's it is (an
    /// operator's `session revoke`); returns its user, or `None` when no
    /// open session of the tenant has that id.
    pub async fn revoke_tenant_session(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        reason: &str,
        now: i64,
    ) -> StoreResult<Option<Uuid>> {
        let sql = "UPDATE sessions SET revoked_at = $3, revoke_reason = $4
                   WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL RETURNING user_id";
        let row: Option<(Uuid,)> = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(tenant_id)
            .bind(session_id)
            .bind(now)
            .bind(reason)
            .fetch_optional(p)
            .await)?;
        Ok(row.map(|(user_id,)| user_id))
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
        let sql = "UPDATE sessions SET revoked_at = $4, revoke_reason = $5
                   WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL AND ($3 IS NULL OR id <> $3)
                   RETURNING id";
        let rows: Vec<(Uuid,)> = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(keep)
            .bind(now)
            .bind(reason)
            .fetch_all(p)
            .await)?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The user's sessions that are still open at `now`, newest first: not
    /// revoked, and holding a refresh token that is neither spent nor
    /// expired (a session nobody refreshed in time is over, though no one
    /// revoked it).
    pub async fn active_sessions(&self, tenant_id: Uuid, user_id: Uuid, now: i64) -> StoreResult<Vec<Session>> {
        let sql = "SELECT s.id, s.tenant_id, s.user_id, s.created_at, s.last_used_at, s.ip, s.user_agent,
                          MAX(r.expires_at) AS expires_at, s.mfa, s.via_link
                   FROM sessions s
                   JOIN refresh_tokens r ON r.session_id = s.id AND r.spent_at IS NULL AND r.expires_at > $3
                   WHERE s.tenant_id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL
                   GROUP BY s.id, s.tenant_id, s.user_id, s.created_at, s.last_used_at, s.ip, s.user_agent,
                            s.mfa, s.via_link
                   ORDER BY s.created_at DESC, s.id";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(tenant_id).bind(user_id).bind(now).fetch_all(p).await)?)
    }

    /// Sessions revoked at or after `since` (for the revocation poller).
    pub async fn sessions_revoked_since(&self, since: i64) -> StoreResult<Vec<Uuid>> {
        let sql = "SELECT id FROM sessions WHERE revoked_at >= $1";
        let rows: Vec<(Uuid,)> = on_pool!(self, |p| sqlx::query_as(sql).bind(since).fetch_all(p).await)?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}
