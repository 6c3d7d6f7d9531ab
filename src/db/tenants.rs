//! `tenants`: the isolation boundary. Slugs are what people type; ids are what
//! tokens carry.
//!
//! A disabled tenant keeps its users and data; none of them can log in or
//! refresh, and the disable revoked every session they had (see
//! [`Store::disable_tenant`]).

use uuid::Uuid;

use super::{on_pool, unix_now, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub disabled: bool,
    pub created_at: i64,
}

const SELECT: &str = "SELECT id, slug, name, disabled, created_at FROM tenants";

impl Store {
    pub async fn create_tenant(&self, slug: &str, name: &str) -> StoreResult<Tenant> {
        let tenant = Tenant {
            id: Uuid::new_v4(),
            slug: slug.to_owned(),
            name: name.to_owned(),
            disabled: false,
            created_at: unix_now(),
        };
        let sql = "INSERT INTO tenants (id, slug, name, disabled, created_at, updated_at)
                   VALUES ($1, $2, $3, FALSE, $4, $4)";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(tenant.id)
            .bind(&tenant.slug)
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(p)
            .await
            .map(drop))?;
        Ok(tenant)
    }

    pub async fn tenant_by_slug(&self, slug: &str) -> StoreResult<Option<Tenant>> {
        let sql = format!("{SELECT} WHERE slug = $1");
        Ok(on_pool!(self, |p| sqlx::query_as(&sql).bind(slug).fetch_optional(p).await)?)
    }

    pub async fn tenant_by_id(&self, id: Uuid) -> StoreResult<Option<Tenant>> {
        let sql = format!("{SELECT} WHERE id = $1");
        Ok(on_pool!(self, |p| sqlx::query_as(&sql).bind(id).fetch_optional(p).await)?)
    }

    pub async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let sql = format!("{SELECT} ORDER BY slug");
        Ok(on_pool!(self, |p| sqlx::query_as(&sql).fetch_all(p).await)?)
    }

    /// Disables the tenant and revokes every open session in it, in one
    /// transaction; returns the revoked session ids, or `None` when the
    /// tenant is unknown or already disabled (nothing written).
    ///
    /// A login racing this cannot open a session that escapes it: the
    /// login's session insert checks the tenant's row in its own
    /// transaction (under a share lock on PostgreSQL, behind the write lock
    /// on SQLite), so it either commits first, and then this revokes its
    /// session with the others (on PostgreSQL the revoking statement runs
    /// after the tenant's row lock was granted, so it sees that commit), or
    /// it sees the tenant disabled and writes nothing.
    pub async fn disable_tenant(&self, id: Uuid) -> StoreResult<Option<Vec<Uuid>>> {
        let now = unix_now();
        let disable = "UPDATE tenants SET disabled = TRUE, updated_at = $2 WHERE id = $1 AND NOT disabled";
        let revoke = "UPDATE sessions SET revoked_at = $2, revoke_reason = 'tenant_disabled'
                      WHERE tenant_id = $1 AND revoked_at IS NULL RETURNING id";
        // Password reset links die with the disable (enabling again does
        // not bring them back); see `db::email_links`.
        let void = "UPDATE email_links SET used_at = $2 WHERE tenant_id = $1 AND used_at IS NULL";
        let ids: Option<Vec<(Uuid,)>> = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            if sqlx::query(disable).bind(id).bind(now).execute(&mut *tx).await?.rows_affected() == 0 {
                None
            } else {
                let ids = sqlx::query_as(revoke).bind(id).bind(now).fetch_all(&mut *tx).await?;
                sqlx::query(void).bind(id).bind(now).execute(&mut *tx).await?;
                tx.commit().await?;
                Some(ids)
            }
        });
        Ok(ids.map(|ids| ids.into_iter().map(|(id,)| id).collect()))
    }

    /// Enables a disabled tenant; false when it is unknown or was not
    /// disabled. The sessions the disable revoked stay revoked.
    pub async fn enable_tenant(&self, id: Uuid) -> StoreResult<bool> {
        let sql = "UPDATE tenants SET disabled = FALSE, updated_at = $2 WHERE id = $1 AND disabled";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(id)
            .bind(unix_now())
            .execute(p)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(done == 1)
    }

    /// Tenants disabled and last changed at or after `since`, with that
    /// time (for the revocation poller; see `users_disabled_since`).
    pub async fn tenants_disabled_since(&self, since: i64) -> StoreResult<Vec<(Uuid, i64)>> {
        let sql = "SELECT id, updated_at FROM tenants WHERE disabled AND updated_at >= $1";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(since).fetch_all(p).await)?)
    }
}
