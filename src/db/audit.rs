//! `audit_events`: an append-only record of security-relevant events. Details
//! are a JSON object; secrets (passwords, tokens) are never put in it.

use serde_json::Value;
use uuid::Uuid;

use super::{on_pool, unix_now, Store, StoreResult};

/// One event to record. `event` is a stable snake_case name.
#[derive(Debug, Clone, Default)]
pub struct NewAuditEvent<'a> {
    pub event: &'a str,
    pub tenant_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub email: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub detail: Option<Value>,
}

/// A stored event, with the tenant's slug for display.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    pub at: i64,
    pub event: String,
    pub tenant: Option<String>,
    pub user_id: Option<Uuid>,
    pub email: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub detail: Value,
}

impl Store {
    pub async fn record_audit(&self, e: NewAuditEvent<'_>) -> StoreResult<()> {
        let detail = e.detail.unwrap_or_else(|| Value::Object(Default::default()));
        let sql = "INSERT INTO audit_events (at, event, tenant_id, user_id, email, ip, user_agent, detail)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(unix_now())
            .bind(e.event)
            .bind(e.tenant_id)
            .bind(e.user_id)
            .bind(e.email)
            .bind(e.ip)
            .bind(e.user_agent)
            .bind(&detail)
            .execute(p)
            .await
            .map(drop))?;
        Ok(())
    }

    /// Newest first; all tenants when `tenant_id` is `None`.
    pub async fn list_audit(&self, tenant_id: Option<Uuid>, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        let sql = "SELECT a.id, a.at, a.event, t.slug AS tenant, a.user_id, a.email, a.ip, a.user_agent, a.detail
                   FROM audit_events a LEFT JOIN tenants t ON t.id = a.tenant_id
                   WHERE $1 IS NULL OR a.tenant_id = $1
                   ORDER BY a.id DESC LIMIT $2";
        Ok(on_pool!(self, |p| sqlx::query_as(sql).bind(tenant_id).bind(limit).fetch_all(p).await)?)
    }
}
