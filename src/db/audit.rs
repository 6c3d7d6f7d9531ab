//! `audit_events`: an append-only record of security-relevant events. Details
//! are a JSON object; secrets (passwords, tokens) are never put in it.
//!
//! Every event is also written to the log (target `gateway::audit`, level
//! info), before the insert: a log shipper gets the audit trail without
//! reading the database, and an event whose insert failed is still told.

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

/// What `gateway audit list` selects.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery<'a> {
    pub tenant_id: Option<Uuid>,
    pub event: Option<&'a str>,
    /// As stored: trimmed and lower-cased. Selects the events recorded
    /// with it and those of the users who have it (some, a logout for
    /// one, record no email).
    pub email: Option<&'a str>,
    /// Unix seconds: events at or after it.
    pub since: Option<i64>,
    pub limit: i64,
}

impl Store {
    pub async fn record_audit(&self, e: NewAuditEvent<'_>) -> StoreResult<()> {
        let detail = e.detail.unwrap_or_else(|| Value::Object(Default::default()));
        tracing::info!(
            target: "gateway::audit",
            event = e.event,
            tenant_id = e.tenant_id.map(tracing::field::display),
            user_id = e.user_id.map(tracing::field::display),
            email = e.email,
            ip = e.ip,
            user_agent = e.user_agent,
            detail = %detail,
            "audit"
        );
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

    /// Newest first, the events `q` selects (every field left out selects
    /// all).
    pub async fn list_audit(&self, q: &AuditQuery<'_>) -> StoreResult<Vec<AuditEvent>> {
        let sql = "SELECT a.id, a.at, a.event, t.slug AS tenant, a.user_id, a.email, a.ip, a.user_agent, a.detail
                   FROM audit_events a LEFT JOIN tenants t ON t.id = a.tenant_id
                   WHERE ($1 IS NULL OR a.tenant_id = $1) AND ($2 IS NULL OR a.event = $2)
                     AND ($3 IS NULL OR a.email = $3 OR a.user_id IN (SELECT u.id FROM users u WHERE u.email = $3))
                     AND ($4 IS NULL OR a.at >= $4)
                   ORDER BY a.id DESC LIMIT $5";
        Ok(on_pool!(self, |p| sqlx::query_as(sql)
            .bind(q.tenant_id)
            .bind(q.event)
            .bind(q.email)
            .bind(q.since)
            .bind(q.limit)
            .fetch_all(p)
            .await)?)
    }
}
