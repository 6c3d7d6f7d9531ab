//! `users`: accounts inside a tenant. Emails are stored trimmed and
//! lower-cased, so uniqueness per tenant is case-insensitive.

use uuid::Uuid;

use super::{on_pool, split_list, unix_now, Store, StoreResult};

#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub email: String,
    /// PHC string; never logged (Debug below leaves it out).
    pub password_hash: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub disabled: bool,
    pub created_at: i64,
    /// The confirmed TOTP secret (base32), when the user has a second
    /// factor; never logged.
    pub totp_secret: Option<String>,
    /// Wrong codes since the last right one.
    pub totp_failures: i64,
    /// When the user proved the email (`None`: not yet; see
    /// `auth.email_verification`).
    pub email_verified_at: Option<i64>,
}

/// The email a deleted user's row keeps (with its id): no address, so no
/// login, registration or command finds it.
const TOMBSTONE: &str = "deleted:";

impl User {
    /// Whether this is a deleted user's tombstone (`gateway user delete`).
    pub fn is_deleted(&self) -> bool {
        self.email.starts_with(TOMBSTONE) && !self.email.contains('@')
    }
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("email", &self.email)
            .field("roles", &self.roles)
            .field("scopes", &self.scopes)
            .field("disabled", &self.disabled)
            .field("totp", &self.totp_secret.is_some())
            .field("email_verified", &self.email_verified_at.is_some())
            .finish_non_exhaustive()
    }
}

/// What `create_user` needs; the hash is computed by the caller.
pub struct NewUser<'a> {
    pub tenant_id: Uuid,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub roles: &'a [String],
    pub scopes: &'a [String],
    /// Whether the email counts as proved from the start (an operator's
    /// user, or registration that asks for no proof).
    pub verified: bool,
}

/// Why [`Store::forget_deleted_user`] erased nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgetRefused {
    /// The id is no deleted user of the tenant.
    NotDeleted,
    /// None of the user's audit events carries the email.
    NotItsEmail,
}

/// A user's roles and scopes.
pub struct Access<'a> {
    pub roles: &'a [String],
    pub scopes: &'a [String],
}

type Row = (Uuid, Uuid, String, String, String, String, bool, i64, Option<String>, i64, Option<i64>);

/// A user's stored second factor: tenant, user, secret, secret being set
/// up.
pub type TotpRow = (Uuid, Uuid, Option<String>, Option<String>);

/// Erases the email, address and user agent of a user's audit events
/// (`$1` tenant, `$2` user) and of those recorded with its email (`$3`)
/// and no other user, in the tenant or in none (a request that named an
/// unknown tenant), up to `$4` (when the address stopped being the user's).
/// Before [`FORGET`]: events with no user recorded with an address the
/// user's own events carry (one it had before an email change), in the
/// tenant or in none, lose the same, up to the last of the user's events
/// with that address (after it, the address was someone else's, or
/// no one's) and the deletion. Run first, while the user's events still
/// hold the addresses.
const FORGET_FORMER_ADDRESSES: &str = "UPDATE audit_events SET email = NULL, ip = NULL, user_agent = NULL
    WHERE user_id IS NULL AND (tenant_id = $1 OR tenant_id IS NULL) AND at <= $3
      AND at <= (SELECT MAX(mine.at) FROM audit_events mine
                 WHERE mine.tenant_id = $1 AND mine.user_id = $2 AND mine.email = audit_events.email)";

const FORGET: &str = "UPDATE audit_events SET email = NULL, ip = NULL, user_agent = NULL
                      WHERE (tenant_id = $1 AND user_id = $2)
                         OR (email = $3 AND (user_id IS NULL OR user_id = $2)
                             AND (tenant_id = $1 OR tenant_id IS NULL) AND at <= $4)";

const SELECT: &str = "SELECT id, tenant_id, email, password_hash, roles, scopes, disabled, created_at, totp_secret,
                             totp_failures, email_verified_at FROM users";

fn from_row(row: Row) -> User {
    let (
        id,
        tenant_id,
        email,
        password_hash,
        roles,
        scopes,
        disabled,
        created_at,
        totp_secret,
        totp_failures,
        email_verified_at,
    ) = row;
    User {
        id,
        tenant_id,
        email,
        password_hash,
        roles: split_list(&roles),
        scopes: split_list(&scopes),
        disabled,
        created_at,
        totp_secret,
        totp_failures,
        email_verified_at,
    }
}

impl Store {
    pub async fn create_user(&self, new: NewUser<'_>) -> StoreResult<User> {
        let now = unix_now();
        let user = User {
            id: Uuid::new_v4(),
            tenant_id: new.tenant_id,
            email: new.email.to_owned(),
            password_hash: new.password_hash.to_owned(),
            roles: new.roles.to_vec(),
            scopes: new.scopes.to_vec(),
            disabled: false,
            created_at: now,
            totp_secret: None,
            totp_failures: 0,
            email_verified_at: new.verified.then_some(now),
        };
        let sql =
            "INSERT INTO users (id, tenant_id, email, password_hash, roles, scopes, disabled, created_at, updated_at,
                                      email_verified_at)
                   VALUES ($1, $2, $3, $4, $5, $6, FALSE, $7, $7, $8)";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(user.id)
            .bind(user.tenant_id)
            .bind(&user.email)
            .bind(&user.password_hash)
            .bind(user.roles.join(" "))
            .bind(user.scopes.join(" "))
            .bind(now)
            .bind(user.email_verified_at)
            .execute(p)
            .await
            .map(drop))?;
        Ok(user)
    }

    /// A deleted user (a tombstone) is found by no email.
    pub async fn user_by_email(&self, tenant_id: Uuid, email: &str) -> StoreResult<Option<User>> {
        let sql = format!("{SELECT} WHERE tenant_id = $1 AND email = $2 AND deleted_at IS NULL");
        let row: Option<Row> =
            on_pool!(self, |p| sqlx::query_as(&sql).bind(tenant_id).bind(email).fetch_optional(p).await)?;
        Ok(row.map(from_row))
    }

    pub async fn user_by_id(&self, tenant_id: Uuid, id: Uuid) -> StoreResult<Option<User>> {
        let sql = format!("{SELECT} WHERE tenant_id = $1 AND id = $2");
        let row: Option<Row> =
            on_pool!(self, |p| sqlx::query_as(&sql).bind(tenant_id).bind(id).fetch_optional(p).await)?;
        Ok(row.map(from_row))
    }

    pub async fn list_users(&self, tenant_id: Uuid) -> StoreResult<Vec<User>> {
        let sql = format!("{SELECT} WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY email");
        let rows: Vec<Row> = on_pool!(self, |p| sqlx::query_as(&sql).bind(tenant_id).fetch_all(p).await)?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// Replaces the hash only if it is still `old`, the one the caller
    /// verified a password against (a login upgrading it, a password
    /// change): a password set meanwhile is never overwritten. Returns
    /// whether it did.
    pub async fn replace_password_hash(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        old: &str,
        new: &str,
    ) -> StoreResult<bool> {
        let sql = "UPDATE users SET password_hash = $4, updated_at = $5
                   WHERE tenant_id = $1 AND id = $2 AND password_hash = $3";
        self.swap(sql, tenant_id, user_id, old, new).await
    }

    /// Runs `sql`, a compare-and-swap on the user's row, bound to tenant
    /// id, user id, the value it must still hold (`held`), the one to put
    /// (`new`), and now; whether it changed the row.
    async fn swap(&self, sql: &str, tenant_id: Uuid, user_id: Uuid, held: &str, new: &str) -> StoreResult<bool> {
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(held)
            .bind(new)
            .bind(unix_now())
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Disables the user and revokes every open session in one transaction;
    /// returns the revoked session ids, or `None` for an unknown user.
    ///
    /// The user's password reset links are voided in the same transaction
    /// (enabling again does not bring them back).
    pub async fn disable_user(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Option<Vec<Uuid>>> {
        let sql = "UPDATE users SET disabled = TRUE, updated_at = $3 WHERE tenant_id = $1 AND id = $2";
        let void = "UPDATE email_links SET used_at = $3 WHERE tenant_id = $1 AND user_id = $2 AND used_at IS NULL";
        self.update_and_revoke_then(tenant_id, user_id, sql, &[], Some("user_disabled"), Some(void)).await
    }

    /// Sets roles and scopes to `new` if they are still `old` (what the
    /// caller read: a concurrent change is not overwritten), and with
    /// `revoke` also revokes every open session, in one transaction.
    /// Returns the revoked session ids, or `None` when the user changed
    /// meanwhile or is gone.
    pub async fn update_access(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        old: &Access<'_>,
        new: &Access<'_>,
        revoke: Option<&str>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        let sql = "UPDATE users SET roles = $4, scopes = $5, updated_at = $3
                   WHERE tenant_id = $1 AND id = $2 AND roles = $6 AND scopes = $7";
        let args = [new.roles.join(" "), new.scopes.join(" "), old.roles.join(" "), old.scopes.join(" ")];
        self.update_and_revoke(tenant_id, user_id, sql, &args, revoke).await
    }

    /// Replaces the password hash and revokes every open session in one
    /// transaction; `None` for an unknown user.
    pub async fn reset_password(&self, tenant_id: Uuid, user_id: Uuid, hash: &str) -> StoreResult<Option<Vec<Uuid>>> {
        let sql = "UPDATE users SET password_hash = $4, updated_at = $3 WHERE tenant_id = $1 AND id = $2";
        self.update_and_revoke(tenant_id, user_id, sql, &[hash.to_owned()], Some("password_reset")).await
    }

    /// Runs `update` (bound to tenant id, user id, now, then `args`) and, if
    /// it changed the user's row and `revoke` names a reason, revokes every
    /// open session with it, in one transaction. Returns the revoked ids
    /// (none without a reason), or `None` when the update matched no row.
    async fn update_and_revoke(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        update: &str,
        args: &[String],
        revoke: Option<&str>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        self.update_and_revoke_then(tenant_id, user_id, update, args, revoke, None).await
    }

    /// [`Store::update_and_revoke`], running `then` (bound to tenant id,
    /// user id and now) last in the same transaction when the update
    /// changed the row.
    async fn update_and_revoke_then(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        update: &str,
        args: &[String],
        revoke: Option<&str>,
        then: Option<&str>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        let now = unix_now();
        let revoke_sql = "UPDATE sessions SET revoked_at = $3, revoke_reason = $4
                          WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING id";
        let ids: Option<Vec<(Uuid,)>> = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let mut query = sqlx::query(update).bind(tenant_id).bind(user_id).bind(now);
            for arg in args {
                query = query.bind(arg);
            }
            if query.execute(&mut *tx).await?.rows_affected() == 0 {
                None
            } else {
                let ids = match revoke {
                    Some(reason) => {
                        let revoked = sqlx::query_as(revoke_sql).bind(tenant_id).bind(user_id).bind(now).bind(reason);
                        revoked.fetch_all(&mut *tx).await?
                    }
                    None => Vec::new(),
                };
                if let Some(then) = then {
                    sqlx::query(then).bind(tenant_id).bind(user_id).bind(now).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Some(ids)
            }
        });
        Ok(ids.map(|ids| ids.into_iter().map(|(id,)| id).collect()))
    }

    /// Enables a disabled user; false when the user is unknown or was not
    /// disabled. Sessions revoked by the disable stay revoked.
    pub async fn enable_user(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<bool> {
        let sql = "UPDATE users SET disabled = FALSE, updated_at = $3 WHERE tenant_id = $1 AND id = $2 AND disabled";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(unix_now())
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Stores `secret` as the user's TOTP secret being set up at `now`
    /// (replacing one set up before and never confirmed); false when the
    /// user already has a confirmed one, or is unknown.
    pub async fn set_totp_pending(&self, tenant_id: Uuid, user_id: Uuid, secret: &str, now: i64) -> StoreResult<bool> {
        let sql = "UPDATE users SET totp_pending = $3, totp_pending_at = $4
                   WHERE tenant_id = $1 AND id = $2 AND totp_secret IS NULL";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(secret)
            .bind(now)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Forgets the TOTP setups made before `before` (never confirmed, or
    /// from before their time was kept); returns how many.
    pub async fn clear_stale_totp_setups(&self, before: i64) -> StoreResult<u64> {
        let sql = "UPDATE users SET totp_pending = NULL, totp_pending_at = NULL
                   WHERE totp_pending IS NOT NULL AND (totp_pending_at IS NULL OR totp_pending_at < $1)";
        Ok(on_pool!(self, |p| sqlx::query(sql).bind(before).execute(p).await.map(|done| done.rows_affected()))?)
    }

    /// Users whose TOTP secret, or one being set up, is stored sealed (by
    /// any key: `v1:` or `v2:`; see `auth::seal`): tenant, user, secret,
    /// pending. At most `limit` of them.
    pub async fn stored_totp_sealed(&self, limit: i64) -> StoreResult<Vec<TotpRow>> {
        let sql = "SELECT tenant_id, id, totp_secret, totp_pending FROM users
                   WHERE totp_secret LIKE 'v1:%' OR totp_secret LIKE 'v2:%'
                      OR totp_pending LIKE 'v1:%' OR totp_pending LIKE 'v2:%' LIMIT $1";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(limit).fetch_all(p).await)?)
    }

    /// Users with a TOTP secret, or one being set up, stored otherwise than
    /// sealed by the key whose values start with `prefix` (as they are, or
    /// by another key); with `None`, every user with either: tenant, user,
    /// secret, pending.
    pub async fn stored_totp_not_with(&self, prefix: Option<&str>) -> StoreResult<Vec<TotpRow>> {
        let sql = "SELECT tenant_id, id, totp_secret, totp_pending FROM users
                   WHERE (totp_secret IS NOT NULL AND ($1 IS NULL OR totp_secret NOT LIKE $1))
                      OR (totp_pending IS NOT NULL AND ($1 IS NULL OR totp_pending NOT LIKE $1))";
        let pattern = prefix.map(|p| format!("{p}%"));
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(pattern.as_deref()).fetch_all(p).await)?)
    }

    /// How many stored TOTP secrets (and secrets being set up) start with
    /// `prefix`: what one sealing key holds.
    pub async fn count_totp_with(&self, prefix: &str) -> StoreResult<i64> {
        let sql = "SELECT
                     (SELECT COUNT(*) FROM users WHERE totp_secret LIKE $1)
                   + (SELECT COUNT(*) FROM users WHERE totp_pending LIKE $1)";
        let pattern = format!("{prefix}%");
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(sql).bind(&pattern).fetch_one(p).await)?;
        Ok(n)
    }

    /// Replaces the user's stored TOTP secret (or, with `pending`, the one
    /// being set up) `old` by `new`, its sealed form, if it is still `old`.
    pub async fn reseal_totp(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        pending: bool,
        old: &str,
        new: &str,
    ) -> StoreResult<bool> {
        let sql = if pending {
            "UPDATE users SET totp_pending = $4 WHERE tenant_id = $1 AND id = $2 AND totp_pending = $3"
        } else {
            "UPDATE users SET totp_secret = $4 WHERE tenant_id = $1 AND id = $2 AND totp_secret = $3"
        };
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(old)
            .bind(new)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Deletes the user (an operator's `user delete`), in one transaction:
    /// the row becomes a tombstone (disabled, `deleted_at` set, the email
    /// replaced by `deleted:<id>`, which is no email, so that the address
    /// is free again and nobody can take the tombstone's, and the password
    /// hash, roles, scopes and second factor erased), every open session
    /// is revoked (running gateways refuse its tokens), every session
    /// loses its address and user agent, and its mailed links are deleted.
    /// With `forget`, the audit events of the user, and those with no user
    /// recorded with its email, or an address it had before (as its events
    /// show), in its tenant or in none (a request naming an unknown
    /// tenant), lose the email, address and user agent. Returns the
    /// revoked sessions, or `None` for an unknown (or deleted) user.
    pub async fn delete_user(&self, tenant_id: Uuid, user: &User, forget: bool) -> StoreResult<Option<Vec<Uuid>>> {
        let tombstone = "UPDATE users SET disabled = TRUE, deleted_at = $3, updated_at = $3, email = $4,
                                          password_hash = '!', roles = '', scopes = '', totp_secret = NULL,
                                          totp_pending = NULL, totp_pending_at = NULL, totp_last_step = NULL, totp_recovery = NULL,
                                          totp_failures = 0, email_verified_at = NULL
                         WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL";
        let links = "DELETE FROM email_links WHERE tenant_id = $1 AND user_id = $2";
        let sessions = "UPDATE sessions SET ip = NULL, user_agent = NULL WHERE tenant_id = $1 AND user_id = $2";
        let now = unix_now();
        let tombstone_email = format!("{TOMBSTONE}{}", user.id.simple());
        let revoked: Option<Vec<(Uuid,)>> = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let done = sqlx::query(tombstone)
                .bind(tenant_id)
                .bind(user.id)
                .bind(now)
                .bind(&tombstone_email)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if done == 0 {
                tx.rollback().await?;
                None
            } else {
                let revoke = "UPDATE sessions SET revoked_at = $3, revoke_reason = 'user_deleted'
                              WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING id";
                let ids = sqlx::query_as(revoke).bind(tenant_id).bind(user.id).bind(now).fetch_all(&mut *tx).await?;
                sqlx::query(links).bind(tenant_id).bind(user.id).execute(&mut *tx).await?;
                sqlx::query(sessions).bind(tenant_id).bind(user.id).execute(&mut *tx).await?;
                if forget {
                    let former = sqlx::query(FORGET_FORMER_ADDRESSES).bind(tenant_id).bind(user.id).bind(now);
                    former.execute(&mut *tx).await?;
                    let erase = sqlx::query(FORGET).bind(tenant_id).bind(user.id).bind(&user.email).bind(now);
                    erase.execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Some(ids)
            }
        });
        Ok(revoked.map(|ids| ids.into_iter().map(|(id,)| id).collect()))
    }

    /// Erases the email, address and user agent from the audit events of
    /// the deleted user `user_id`, and from those recorded with `email`, or
    /// another address its events carry, and no other user, in the tenant
    /// or in none, up to the deletion (the
    /// CLI's `user forget`, for a user deleted without `--forget`; the
    /// address may be someone else's since). Returns how many events it
    /// changed, or why not: `user_id` is no deleted user of the tenant, or
    /// none of its events carries `email` (a typo; or retention pruned
    /// them).
    pub async fn forget_deleted_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        email: &str,
    ) -> StoreResult<Result<u64, ForgetRefused>> {
        let deleted = "SELECT deleted_at FROM users WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NOT NULL";
        let carried = "SELECT COUNT(*) FROM audit_events WHERE tenant_id = $1 AND user_id = $2 AND email = $3";
        let at: Option<(i64,)> =
            on_pool!(self, |p| sqlx::query_as(deleted).bind(tenant_id).bind(user_id).fetch_optional(p).await)?;
        let Some((deleted_at,)) = at else { return Ok(Err(ForgetRefused::NotDeleted)) };
        let (count,): (i64,) =
            on_pool!(self, |p| sqlx::query_as(carried).bind(tenant_id).bind(user_id).bind(email).fetch_one(p).await)?;
        if count == 0 {
            return Ok(Err(ForgetRefused::NotItsEmail));
        }
        let erased = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let former = sqlx::query(FORGET_FORMER_ADDRESSES).bind(tenant_id).bind(user_id).bind(deleted_at);
            let former = former.execute(&mut *tx).await?.rows_affected();
            let erase = sqlx::query(FORGET).bind(tenant_id).bind(user_id).bind(email).bind(deleted_at);
            let erased = erase.execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            former + erased
        });
        Ok(Ok(erased))
    }

    /// Marks the user's email verified (an operator's `user verify-email`);
    /// false when it was already, or the user is unknown.
    /// The user's verification links are voided in the same transaction.
    pub async fn mark_email_verified(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<bool> {
        let sql = "UPDATE users SET email_verified_at = $3, updated_at = $3
                   WHERE tenant_id = $1 AND id = $2 AND email_verified_at IS NULL";
        let void = "UPDATE email_links SET used_at = $3
                    WHERE tenant_id = $1 AND user_id = $2 AND purpose = 'email_verification' AND used_at IS NULL";
        Ok(self.update_and_revoke_then(tenant_id, user_id, sql, &[], None, Some(void)).await?.is_some())
    }

    /// Moves the user to the email `new` (an operator's `user set-email`),
    /// marked verified (the operator vouches for it), and voids every link
    /// of the user (mailed to the old address), in one transaction; false
    /// for an unknown or deleted user. [`StoreError::Conflict`](super::StoreError::Conflict)
    /// when another user of the tenant has `new`.
    pub async fn set_email(&self, tenant_id: Uuid, user_id: Uuid, new: &str) -> StoreResult<bool> {
        let sql = "UPDATE users SET email = $4, email_verified_at = $3, updated_at = $3
                   WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL";
        let void = "UPDATE email_links SET used_at = $3 WHERE tenant_id = $1 AND user_id = $2 AND used_at IS NULL";
        let args = [new.to_owned()];
        Ok(self.update_and_revoke_then(tenant_id, user_id, sql, &args, None, Some(void)).await?.is_some())
    }

    /// The TOTP secret being set up, if any was made at `since` or later.
    pub async fn totp_pending(&self, tenant_id: Uuid, user_id: Uuid, since: i64) -> StoreResult<Option<String>> {
        let sql = "SELECT totp_pending FROM users WHERE tenant_id = $1 AND id = $2 AND totp_pending_at >= $3";
        let row: Option<(Option<String>,)> =
            on_pool!(self, |p| sqlx::query_as(sql).bind(tenant_id).bind(user_id).bind(since).fetch_optional(p).await)?;
        Ok(row.and_then(|(pending,)| pending))
    }

    /// Makes `pending` (if it is still the one being set up, and no secret
    /// was confirmed meanwhile) the user's TOTP secret, with `step` (the
    /// code that confirmed it) spent, and revokes every other open session
    /// (`keep` excepted), in one transaction. Returns the revoked ids, or
    /// `None` when nothing changed.
    pub async fn confirm_totp(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        pending: &str,
        step: i64,
        recovery: &str,
        keep: Uuid,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        let update = "UPDATE users SET totp_secret = totp_pending, totp_pending = NULL, totp_pending_at = NULL,
                                     totp_last_step = $4, totp_failures = 0, totp_recovery = $5
                      WHERE tenant_id = $1 AND id = $2 AND totp_pending = $3 AND totp_secret IS NULL";
        let revoke = "UPDATE sessions SET revoked_at = $3, revoke_reason = 'mfa_enabled'
                      WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL AND id <> $4 RETURNING id";
        let now = unix_now();
        let ids: Option<Vec<(Uuid,)>> = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let query = sqlx::query(update).bind(tenant_id).bind(user_id).bind(pending).bind(step).bind(recovery);
            if query.execute(&mut *tx).await?.rows_affected() == 0 {
                None
            } else {
                let query = sqlx::query_as(revoke).bind(tenant_id).bind(user_id).bind(now).bind(keep);
                let ids = query.fetch_all(&mut *tx).await?;
                tx.commit().await?;
                Some(ids)
            }
        });
        Ok(ids.map(|ids| ids.into_iter().map(|(id,)| id).collect()))
    }

    /// Spends `step` of the user's TOTP secret `secret`: true only if the
    /// secret is still theirs and no code of this step or a later one was
    /// accepted before (one conditional update, so that a code replayed at
    /// once, here or to another replica, is refused), and the factor is not
    /// locked (fewer than `max_failures` wrong codes in a row, counted in
    /// the same statement: a login that read the row before a lock does not
    /// slip past it). Clears the count of wrong codes.
    pub async fn spend_totp_step(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        secret: &str,
        step: i64,
        max_failures: i64,
    ) -> StoreResult<bool> {
        let sql = "UPDATE users SET totp_last_step = $4, totp_failures = 0
                   WHERE tenant_id = $1 AND id = $2 AND totp_secret = $3
                     AND (totp_last_step IS NULL OR totp_last_step < $4) AND totp_failures < $5";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(secret)
            .bind(step)
            .bind(max_failures)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// The hashes of the user's unused recovery codes (space-separated).
    pub async fn totp_recovery(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Option<String>> {
        self.text_of("SELECT totp_recovery FROM users WHERE tenant_id = $1 AND id = $2", tenant_id, user_id).await
    }

    /// Replaces the user's recovery hashes `old` with `new` (one code
    /// used), if they are still `old`, the secret still `secret` and the
    /// factor not locked: of two logins with one code, one wins. Clears the
    /// count of wrong codes.
    pub async fn spend_recovery_code(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        secret: &str,
        [old, new]: [&str; 2],
        max_failures: i64,
    ) -> StoreResult<bool> {
        let sql = "UPDATE users SET totp_recovery = $5, totp_failures = 0
                   WHERE tenant_id = $1 AND id = $2 AND totp_secret = $3 AND totp_recovery = $4
                     AND totp_failures < $6";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(secret)
            .bind(old)
            .bind(new)
            .bind(max_failures)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Replaces the recovery hashes of the user's secret `secret` (the one
    /// a code was just checked against) by `hashes`: every code given
    /// before stops working. False when the secret is no longer theirs.
    pub async fn replace_recovery_codes(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        secret: &str,
        hashes: &str,
    ) -> StoreResult<bool> {
        let sql = "UPDATE users SET totp_recovery = $4, updated_at = $5
                   WHERE tenant_id = $1 AND id = $2 AND totp_secret = $3";
        self.swap(sql, tenant_id, user_id, secret, hashes).await
    }

    /// Counts a wrong (or spent) code against the user's secret `secret`;
    /// returns the count, or `None` when the secret is no longer theirs.
    pub async fn count_totp_failure(&self, tenant_id: Uuid, user_id: Uuid, secret: &str) -> StoreResult<Option<i64>> {
        let sql = "UPDATE users SET totp_failures = totp_failures + 1
                   WHERE tenant_id = $1 AND id = $2 AND totp_secret = $3 RETURNING totp_failures";
        let row: Option<(i64,)> =
            on_pool!(self, |p| sqlx::query_as(sql).bind(tenant_id).bind(user_id).bind(secret).fetch_optional(p).await)?;
        Ok(row.map(|(n,)| n))
    }

    /// Removes the user's TOTP secret `secret` (the one a code was just
    /// checked against), with one being set up: the password alone logs
    /// in again. False when it is no longer theirs.
    pub async fn clear_totp(&self, tenant_id: Uuid, user_id: Uuid, secret: &str) -> StoreResult<bool> {
        let sql = "UPDATE users SET totp_secret = NULL, totp_pending = NULL, totp_pending_at = NULL, totp_last_step = NULL, totp_failures = 0,
                                    totp_recovery = NULL
                   WHERE tenant_id = $1 AND id = $2 AND totp_secret = $3";
        self.changed(sql, tenant_id, user_id, secret).await
    }

    /// Removes the user's second factor, confirmed or being set up (an
    /// operator's `user mfa-reset`), and revokes every open session, in one
    /// transaction. Returns the revoked ids, or `None` when there was none.
    pub async fn reset_totp(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Option<Vec<Uuid>>> {
        let sql = "UPDATE users SET totp_secret = NULL, totp_pending = NULL, totp_pending_at = NULL, totp_last_step = NULL, totp_failures = 0,
                                    totp_recovery = NULL, updated_at = $3
                   WHERE tenant_id = $1 AND id = $2 AND (totp_secret IS NOT NULL OR totp_pending IS NOT NULL)";
        self.update_and_revoke(tenant_id, user_id, sql, &[], Some("mfa_reset")).await
    }

    /// Reads one nullable text column of a user (`sql` bound to tenant and
    /// user); `None` for an unknown user too.
    async fn text_of(&self, sql: &str, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Option<String>> {
        let row: Option<(Option<String>,)> =
            on_pool!(self, |p| sqlx::query_as(sql).bind(tenant_id).bind(user_id).fetch_optional(p).await)?;
        Ok(row.and_then(|(text,)| text))
    }

    /// Runs an update bound to tenant, user and a text; whether it changed a row.
    async fn changed(&self, sql: &str, tenant_id: Uuid, user_id: Uuid, text: &str) -> StoreResult<bool> {
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(text)
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Users disabled and last changed at or after `since`, with that time
    /// (for the revocation poller): a row of a disabled user changes only by
    /// the disable or by later edits, so the time is the disable's or later
    /// (or, from a writer whose clock runs behind, earlier: the state keeps
    /// the latest time it has seen for a user, so that does not matter).
    pub async fn users_disabled_since(&self, since: i64) -> StoreResult<Vec<(Uuid, i64)>> {
        let sql = "SELECT id, updated_at FROM users WHERE disabled AND updated_at >= $1";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(since).fetch_all(p).await)?)
    }
}
