//! `audit_events`: an append-only record of security-relevant events. Details
//! are a JSON object; secrets (passwords, tokens) are never put in it.

use serde_json::Value;
use uuid::Uuid;

use super::{unix_now, Store, StoreResult};

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
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub id: i64,
    pub at: i64,
    pub event: String,
    pub tenant: Option<String>,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub detail: String,
}

type Row = (i64, i64, String, Option<String>, Option<String>, Option<String>, Option<String>, Option<String>, String);

impl Store {
    pub async fn record_audit(&self, e: NewAuditEvent<'_>) -> StoreResult<()> {
        let detail = e.detail.unwrap_or_else(|| Value::Object(Default::default())).to_string();
        sqlx::query(
            "INSERT INTO audit_events (at, event, tenant_id, user_id, email, ip, user_agent, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(unix_now())
        .bind(e.event)
        .bind(e.tenant_id.map(|t| t.to_string()))
        .bind(e.user_id.map(|u| u.to_string()))
        .bind(e.email)
        .bind(e.ip)
        .bind(e.user_agent)
        .bind(detail)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Newest first; all tenants when `tenant_id` is `None`.
    pub async fn list_audit(&self, tenant_id: Option<Uuid>, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT a.id, a.at, a.event, t.slug, a.user_id, a.email, a.ip, a.user_agent, a.detail
             FROM audit_events a LEFT JOIN tenants t ON t.id = a.tenant_id
             WHERE ?1 IS NULL OR a.tenant_id = ?1
             ORDER BY a.id DESC LIMIT ?2",
        )
        .bind(tenant_id.map(|t| t.to_string()))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at, event, tenant, user_id, email, ip, user_agent, detail)| AuditEvent {
                id,
                at,
                event,
                tenant,
                user_id,
                email,
                ip,
                user_agent,
                detail,
            })
            .collect())
    }
}
