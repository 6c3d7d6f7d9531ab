//! `tenants`: the isolation boundary. Slugs are what people type; ids are what
//! tokens carry.

use uuid::Uuid;

use super::{on_pool, unix_now, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub created_at: i64,
}

impl Store {
    pub async fn create_tenant(&self, slug: &str, name: &str) -> StoreResult<Tenant> {
        let tenant =
            Tenant { id: Uuid::new_v4(), slug: slug.to_owned(), name: name.to_owned(), created_at: unix_now() };
        on_pool!(self, |p| sqlx::query("INSERT INTO tenants (id, slug, name, created_at) VALUES ($1, $2, $3, $4)")
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
        let sql = "SELECT id, slug, name, created_at FROM tenants WHERE slug = $1";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(slug).fetch_optional(p).await)?)
    }

    pub async fn tenant_by_id(&self, id: Uuid) -> StoreResult<Option<Tenant>> {
        let sql = "SELECT id, slug, name, created_at FROM tenants WHERE id = $1";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(id).fetch_optional(p).await)?)
    }

    pub async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let sql = "SELECT id, slug, name, created_at FROM tenants ORDER BY slug";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).fetch_all(p).await)?)
    }
}
