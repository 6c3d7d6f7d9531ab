//! `users`: accounts inside a tenant. Emails are stored trimmed and
//! lower-cased, so uniqueness per tenant is case-insensitive.

use uuid::Uuid;

use super::{parse_uuid, split_list, unix_now, Store, StoreResult};

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
}

type Row = (String, String, String, String, String, String, bool, i64);

const COLUMNS: &str = "id, tenant_id, email, password_hash, roles, scopes, disabled, created_at";

fn from_row((id, tenant_id, email, password_hash, roles, scopes, disabled, created_at): Row) -> StoreResult<User> {
    Ok(User {
        id: parse_uuid(&id)?,
        tenant_id: parse_uuid(&tenant_id)?,
        email,
        password_hash,
        roles: split_list(&roles),
        scopes: split_list(&scopes),
        disabled,
        created_at,
    })
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
        };
        sqlx::query(
            "INSERT INTO users (id, tenant_id, email, password_hash, roles, scopes, disabled, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?7)",
        )
        .bind(user.id.to_string())
        .bind(user.tenant_id.to_string())
        .bind(&user.email)
        .bind(&user.password_hash)
        .bind(user.roles.join(" "))
        .bind(user.scopes.join(" "))
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(user)
    }

    pub async fn user_by_email(&self, tenant_id: Uuid, email: &str) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {COLUMNS} FROM users WHERE tenant_id = ?1 AND email = ?2");
        let row: Option<Row> =
            sqlx::query_as(&sql).bind(tenant_id.to_string()).bind(email).fetch_optional(self.pool()).await?;
        row.map(from_row).transpose()
    }

    pub async fn user_by_id(&self, tenant_id: Uuid, id: Uuid) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {COLUMNS} FROM users WHERE tenant_id = ?1 AND id = ?2");
        let row: Option<Row> =
            sqlx::query_as(&sql).bind(tenant_id.to_string()).bind(id.to_string()).fetch_optional(self.pool()).await?;
        row.map(from_row).transpose()
    }

    pub async fn list_users(&self, tenant_id: Uuid) -> StoreResult<Vec<User>> {
        let sql = format!("SELECT {COLUMNS} FROM users WHERE tenant_id = ?1 ORDER BY email");
        let rows: Vec<Row> = sqlx::query_as(&sql).bind(tenant_id.to_string()).fetch_all(self.pool()).await?;
        rows.into_iter().map(from_row).collect()
    }

    pub async fn set_password_hash(&self, tenant_id: Uuid, user_id: Uuid, hash: &str) -> StoreResult<()> {
        sqlx::query("UPDATE users SET password_hash = ?3, updated_at = ?4 WHERE tenant_id = ?1 AND id = ?2")
            .bind(tenant_id.to_string())
            .bind(user_id.to_string())
            .bind(hash)
            .bind(unix_now())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Disables the user and revokes every open session in one transaction;
    /// returns the revoked session ids, or `None` for an unknown user.
    pub async fn disable_user(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Option<Vec<Uuid>>> {
        let now = unix_now();
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query("UPDATE users SET disabled = 1, updated_at = ?3 WHERE tenant_id = ?1 AND id = ?2")
            .bind(tenant_id.to_string())
            .bind(user_id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let ids: Vec<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoked_at = ?3, revoke_reason = 'user_disabled'
             WHERE tenant_id = ?1 AND user_id = ?2 AND revoked_at IS NULL RETURNING id",
        )
        .bind(tenant_id.to_string())
        .bind(user_id.to_string())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        ids.iter().map(|(id,)| parse_uuid(id)).collect::<StoreResult<Vec<_>>>().map(Some)
    }

    /// Users disabled at or after `since` (for the revocation poller).
    pub async fn users_disabled_since(&self, since: i64) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM users WHERE disabled = 1 AND updated_at >= ?1")
            .bind(since)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|(id,)| parse_uuid(id)).collect()
    }
}
