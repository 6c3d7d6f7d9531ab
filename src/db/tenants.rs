//! `tenants`: the isolation boundary. Slugs are what people type; ids are what
//! tokens carry.

use uuid::Uuid;

use super::{parse_uuid, unix_now, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub created_at: i64,
}

type Row = (String, String, String, i64);

fn from_row((id, slug, name, created_at): Row) -> StoreResult<Tenant> {
    Ok(Tenant { id: parse_uuid(&id)?, slug, name, created_at })
}

impl Store {
    pub async fn create_tenant(&self, slug: &str, name: &str) -> StoreResult<Tenant> {
        let tenant =
            Tenant { id: Uuid::new_v4(), slug: slug.to_owned(), name: name.to_owned(), created_at: unix_now() };
        sqlx::query("INSERT INTO tenants (id, slug, name, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(tenant.id.to_string())
            .bind(&tenant.slug)
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(self.pool())
            .await?;
        Ok(tenant)
    }

    pub async fn tenant_by_slug(&self, slug: &str) -> StoreResult<Option<Tenant>> {
        let row: Option<Row> = sqlx::query_as("SELECT id, slug, name, created_at FROM tenants WHERE slug = ?1")
            .bind(slug)
            .fetch_optional(self.pool())
            .await?;
        row.map(from_row).transpose()
    }

    pub async fn tenant_by_id(&self, id: Uuid) -> StoreResult<Option<Tenant>> {
        let row: Option<Row> = sqlx::query_as("SELECT id, slug, name, created_at FROM tenants WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?;
        row.map(from_row).transpose()
    }

    pub async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let rows: Vec<Row> = sqlx::query_as("SELECT id, slug, name, created_at FROM tenants ORDER BY slug")
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(from_row).collect()
    }
}
