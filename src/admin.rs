//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and the admin
//! API under `/admin` ([`api`]) when `admin.api_token_file` or
//! `admin.tenant_tokens` is set.
//!
//! It binds its own address (loopback by default) so that health, metrics
//! and account administration are never reachable through the public
//! listener.

pub mod api;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::service::AuthService;

#[derive(Clone)]
struct AdminState {
    service: AuthService,
    metrics: PrometheusHandle,
}

pub fn router(service: AuthService, metrics: PrometheusHandle, api_token: Option<api::ApiTokens>) -> Router {
    let admin_api = api::router(service.clone(), api_token);
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { service, metrics })
        .merge(admin_api)
}

/// Ready when the database answers, a signing key is loaded and the
/// revocation state is fresh.
async fn readyz(State(s): State<AdminState>) -> Response {
    let database = s.service.store.ping().await;
    let keys = !s.service.authenticator.keys().public_keys().is_empty();
    let fresh = !s.service.authenticator.revocations().is_stale(crate::db::unix_now());
    let status = if database && keys && fresh { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    // `revocation_push` is informative (false on SQLite, and while the
    // PostgreSQL listener reconnects); the poll still covers it.
    let push = s.service.authenticator.revocations().is_listening();
    let body = serde_json::json!({
        "database": database, "signing_key": keys, "revocations_fresh": fresh, "revocation_push": push,
    });
    (status, Json(body)).into_response()
}

async fn render_metrics(State(s): State<AdminState>) -> Response {
    metrics::gauge!("gateway_revocation_state_size").set(s.service.authenticator.revocations().len() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}
