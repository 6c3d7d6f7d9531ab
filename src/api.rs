//! The gateway's own HTTP API: `/auth/*` and the JWKS.
//!
//! Handlers are thin: extract, call the flow in [`crate::auth::service`],
//! serialise. Layers, outermost first: request metrics (so every answer,
//! errors included, is counted), `Cache-Control: no-store` (every answer
//! here is personal or a credential), CORS when `auth.cors_origins` names
//! any (it answers preflights itself), a handler's panic turned into a 500,
//! then the 16 KiB body limit.

pub mod error;
pub mod extract;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use secrecy::SecretString;
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;

use crate::auth::service::AuthService;
use crate::proxy::cors::CorsOrigins;
use error::ApiError;
use extract::{Authenticated, Client, JsonBody};

/// Largest request body accepted on `/auth/*`.
pub const MAX_AUTH_BODY: usize = 16 * 1024;

/// The API as the proxy serves it: the router, rebuilt on reload with the
/// CORS origins and the request id's name of the new file.
#[derive(Clone)]
pub struct Api {
    service: AuthService,
    current: Arc<ArcSwap<Router>>,
}

impl Api {
    pub fn new(service: AuthService, origins: &CorsOrigins, request_id: &HeaderName) -> Self {
        let current = Arc::new(ArcSwap::from_pointee(router(service.clone(), origins, request_id)));
        Self { service, current }
    }

    /// Serves requests that arrive from now on with these settings; those
    /// in flight finish with the router they started with.
    pub fn rebuild(&self, origins: &CorsOrigins, request_id: &HeaderName) {
        self.current.store(Arc::new(router(self.service.clone(), origins, request_id)));
    }

    /// The current router (a cheap clone).
    pub fn router(&self) -> Router {
        Router::clone(&self.current.load())
    }
}

/// The `/auth` and JWKS routes. `origins` (`auth.cors_origins`) lets browser
/// apps on those origins call them, and read the request id the gateway
/// adds (`request_id`, its name): see [`cors`].
pub fn router(service: AuthService, origins: &CorsOrigins, request_id: &HeaderName) -> Router {
    let api = Router::new()
        .route("/auth/login", post(login))
        .route("/auth/login/link", post(request_login_link))
        .route("/auth/login/link/confirm", post(login_with_link))
        .route("/auth/refresh", post(refresh))
        .route("/auth/logout", post(logout))
        .route("/auth/logout-all", post(logout_all))
        .route("/auth/me", get(me))
        .route("/auth/sessions", get(sessions))
        .route("/auth/sessions/{id}", delete(delete_session))
        .route("/auth/register", post(register))
        .route("/auth/password", post(change_password))
        .route("/auth/password/forgot", post(forgot_password))
        .route("/auth/password/reset", post(reset_password))
        .route("/auth/email/verify", post(verify_email))
        .route("/auth/email/resend", post(resend_verification))
        .route("/auth/email/change", post(request_email_change))
        .route("/auth/email/change/confirm", post(confirm_email_change))
        .route("/auth/email/revert", post(revert_email_change))
        .route("/auth/mfa/totp", post(totp_setup))
        .route("/auth/mfa/totp/confirm", post(totp_confirm))
        .route("/auth/mfa/totp/disable", post(totp_disable))
        .route("/auth/mfa/recovery-codes", post(recovery_codes))
        .route("/.well-known/jwks.json", get(jwks))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_AUTH_BODY));
    layered(api, origins, request_id).with_state(service)
}

/// The layers around the handlers (see the module docs). Innermost, a
/// handler that panics becomes a 500 `internal_error` the layers still
/// see: counted, `no-store`, and with the CORS fields a browser app needs
/// to read it (a bug's answer, not a network failure).
fn layered<S: Clone + Send + Sync + 'static>(
    api: Router<S>,
    origins: &CorsOrigins,
    request_id: &HeaderName,
) -> Router<S> {
    let api = api.layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
        // Not the panic's message, which could quote what the handler
        // held, in the structured log (the panic hook prints it to stderr).
        tracing::error!("an API handler panicked");
        crate::body::json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error")
    }));
    // Inside `no_store`, so that the preflights it answers are not cached
    // by anything but the browser's own preflight cache.
    let api = match cors(origins, request_id) {
        Some(layer) => api.layer(layer),
        None => api,
    };
    api.layer(middleware::from_fn(no_store)).layer(middleware::from_fn(track))
}

/// CORS for browser apps served from another origin, or `None` when no
/// origin is configured (then no CORS header is ever sent and browsers keep
/// cross-origin scripts out).
///
/// No credentials mode: the API takes tokens in the `Authorization` header
/// and JSON bodies, never from cookies, so a browser holds nothing that a
/// foreign page could spend, and `Access-Control-Allow-Credentials` is never
/// sent. Preflights (`OPTIONS`) are answered here, before any handler, so
/// they count against no rate limit.
fn cors(origins: &CorsOrigins, request_id: &HeaderName) -> Option<CorsLayer> {
    Some(
        CorsLayer::new()
            .allow_origin(origins.allow_origin()?)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE, request_id.clone()])
            .max_age(Duration::from_secs(600)),
    )
}

async fn no_store(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response.headers_mut().entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Counts and times every request by route template (never by raw path, so
/// the label set stays bounded).
async fn track(req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| match p.as_str() {
        // MatchedPath borrows from the request; map to 'static labels.
        "/auth/login" => "/auth/login",
        "/auth/refresh" => "/auth/refresh",
        "/auth/logout" => "/auth/logout",
        "/auth/logout-all" => "/auth/logout-all",
        "/auth/me" => "/auth/me",
        "/auth/sessions" => "/auth/sessions",
        "/auth/sessions/{id}" => "/auth/sessions/{id}",
        "/auth/register" => "/auth/register",
        "/auth/password" => "/auth/password",
        "/auth/password/forgot" => "/auth/password/forgot",
        "/auth/password/reset" => "/auth/password/reset",
        "/auth/email/verify" => "/auth/email/verify",
        "/auth/email/resend" => "/auth/email/resend",
        "/auth/email/change" => "/auth/email/change",
        "/auth/email/change/confirm" => "/auth/email/change/confirm",
        "/auth/email/revert" => "/auth/email/revert",
        "/auth/mfa/totp" => "/auth/mfa/totp",
        "/auth/mfa/totp/confirm" => "/auth/mfa/totp/confirm",
        "/auth/mfa/totp/disable" => "/auth/mfa/totp/disable",
        "/auth/mfa/recovery-codes" => "/auth/mfa/recovery-codes",
        "/.well-known/jwks.json" => "/.well-known/jwks.json",
        _ => "other",
    });
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("gateway_http_requests_total", "endpoint" => endpoint, "status" => status).increment(1);
    metrics::histogram!("gateway_http_request_duration_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    response
}

#[derive(Deserialize)]
struct Credentials {
    email: String,
    password: SecretString,
    #[serde(default)]
    tenant: Option<String>,
    /// The TOTP code of a user with a second factor (login only).
    #[serde(default)]
    otp: Option<String>,
}

#[derive(Deserialize)]
struct TotpStart {
    password: SecretString,
}

#[derive(Deserialize)]
struct TotpCode {
    code: String,
}

#[derive(Deserialize)]
struct TotpRemoval {
    password: SecretString,
    code: String,
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

#[derive(Deserialize)]
struct Forgotten {
    email: String,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize)]
struct LoginLinkPresented {
    token: String,
    /// The TOTP (or recovery) code of a user with a second factor.
    #[serde(default)]
    otp: Option<String>,
    /// The PKCE verifier of a link asked for with a `code_challenge`.
    #[serde(default)]
    code_verifier: Option<String>,
}

#[derive(Deserialize)]
struct LoginLinkAsked {
    email: String,
    #[serde(default)]
    tenant: Option<String>,
    /// PKCE (S256): the base64url SHA-256 of a verifier the app keeps.
    #[serde(default)]
    code_challenge: Option<String>,
}

#[derive(Deserialize)]
struct Verification {
    token: String,
    password: SecretString,
}

#[derive(Deserialize)]
struct EmailChange {
    new_email: String,
    password: SecretString,
    /// A TOTP (or recovery) code, for a user with a second factor.
    #[serde(default)]
    code: Option<String>,
}

#[derive(Deserialize)]
struct PasswordReset {
    token: String,
    new_password: SecretString,
}

#[derive(Deserialize)]
struct PasswordChange {
    current_password: SecretString,
    new_password: SecretString,
}

async fn login(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let pair = s.login(&body.email, &body.password, body.tenant.as_deref(), body.otp.as_deref(), &client).await?;
    Ok(Json(pair).into_response())
}

/// 202 whatever the email, as `forgot`.
async fn request_login_link(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<LoginLinkAsked>,
) -> Result<StatusCode, ApiError> {
    s.request_login_link(&body.email, body.tenant.as_deref(), body.code_challenge.as_deref(), &client).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn login_with_link(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<LoginLinkPresented>,
) -> Result<Response, ApiError> {
    let pair = s.login_with_link(&body.token, body.otp.as_deref(), body.code_verifier.as_deref(), &client).await?;
    Ok(Json(pair).into_response())
}

async fn refresh(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<RefreshBody>,
) -> Result<Response, ApiError> {
    let pair = s.refresh(&body.refresh_token, &client).await?;
    Ok(Json(pair).into_response())
}

async fn totp_setup(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    JsonBody(body): JsonBody<TotpStart>,
) -> Result<Response, ApiError> {
    Ok(Json(s.totp_setup(&who, &body.password, &client).await?).into_response())
}

async fn totp_confirm(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    JsonBody(body): JsonBody<TotpCode>,
) -> Result<Response, ApiError> {
    Ok(Json(s.totp_confirm(&who, &body.code, &client).await?).into_response())
}

async fn totp_disable(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    JsonBody(body): JsonBody<TotpRemoval>,
) -> Result<StatusCode, ApiError> {
    s.totp_disable(&who, &body.password, &body.code, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Same body as a removal: the password and a current code.
async fn recovery_codes(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    JsonBody(body): JsonBody<TotpRemoval>,
) -> Result<Response, ApiError> {
    Ok(Json(s.regenerate_recovery_codes(&who, &body.password, &body.code, &client).await?).into_response())
}

async fn logout(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
) -> Result<StatusCode, ApiError> {
    s.logout(&who, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn logout_all(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
) -> Result<StatusCode, ApiError> {
    s.logout_all(&who, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(State(s): State<AuthService>, Authenticated(who): Authenticated) -> Result<Response, ApiError> {
    Ok(Json(s.me(&who).await?).into_response())
}

async fn sessions(State(s): State<AuthService>, Authenticated(who): Authenticated) -> Result<Response, ApiError> {
    Ok(Json(s.sessions(&who).await?).into_response())
}

async fn delete_session(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    // An undecodable id names no session of the caller's.
    let Ok(Path(id)) = id else { return Err(ApiError::NotFound) };
    s.revoke_own_session(&who, &id, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn register(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let (user_id, email_verified) = s.register(&body.email, &body.password, body.tenant.as_deref(), &client).await?;
    let body = serde_json::json!({ "user_id": user_id, "email_verified": email_verified });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn change_password(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    JsonBody(body): JsonBody<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    s.change_password(&who, &body.current_password, &body.new_password, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 202 whatever the email: whether a link is sent is decided after the
/// answer (see `auth::service::reset`).
async fn forgot_password(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<Forgotten>,
) -> Result<StatusCode, ApiError> {
    s.forgot_password(&body.email, body.tenant.as_deref(), &client).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn reset_password(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<PasswordReset>,
) -> Result<StatusCode, ApiError> {
    s.reset_password_with_link(&body.token, &body.new_password, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn verify_email(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<Verification>,
) -> Result<StatusCode, ApiError> {
    s.verify_email(&body.token, &body.password, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 202 whatever the email, as `forgot`.
async fn resend_verification(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<Forgotten>,
) -> Result<StatusCode, ApiError> {
    s.resend_verification(&body.email, body.tenant.as_deref(), &client).await?;
    Ok(StatusCode::ACCEPTED)
}

/// 202 with where the link went and until when it works.
async fn request_email_change(
    State(s): State<AuthService>,
    Authenticated(who): Authenticated,
    Client(client): Client,
    JsonBody(body): JsonBody<EmailChange>,
) -> Result<Response, ApiError> {
    let requested =
        s.request_email_change(&who, &body.new_email, &body.password, body.code.as_deref(), &client).await?;
    let body = serde_json::json!({
        "new_email": requested.new_email,
        "expires_at": crate::auth::service::rfc3339(requested.expires_at),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The same body as `/auth/email/verify`: the link's token and the password.
async fn confirm_email_change(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<Verification>,
) -> Result<StatusCode, ApiError> {
    s.confirm_email_change(&body.token, &body.password, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The same body as `/auth/password/reset`: the revert link's token and
/// the new password.
async fn revert_email_change(
    State(s): State<AuthService>,
    Client(client): Client,
    JsonBody(body): JsonBody<PasswordReset>,
) -> Result<StatusCode, ApiError> {
    s.revert_email_change(&body.token, &body.new_password, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn jwks(State(s): State<AuthService>) -> Response {
    let keys = s.authenticator.keys();
    let keys: Vec<_> = keys
        .public_keys()
        .iter()
        .map(|k| serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid, "alg": "EdDSA", "use": "sig" }))
        .collect();
    let mut response = Json(serde_json::json!({ "keys": keys })).into_response();
    // Public material: caches may keep it briefly (overrides no-store).
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{header, HeaderName, Request, StatusCode};
    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use crate::proxy::cors::CorsOrigins;

    async fn buggy() -> &'static str {
        panic!("a bug in a handler")
    }

    /// A handler that panics answers a 500 `internal_error` that has been
    /// through the layers: `no-store`, and CORS for an allowed origin.
    #[tokio::test]
    async fn a_panicking_handler_answers_a_json_500_with_the_layers_fields() {
        let origin = "https://app.example.com";
        let api = super::layered(
            Router::new().route("/auth/buggy", get(buggy)),
            &CorsOrigins::new(&[origin.to_owned()]),
            &HeaderName::from_static("x-request-id"),
        );
        let request =
            Request::get("/auth/buggy").header(header::ORIGIN, origin).body(Body::empty()).expect("a request");
        let response = api.oneshot(request).await.expect("the router is infallible");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], origin);
        let body = response.into_body().collect().await.expect("the body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
        assert_eq!(json["error"], "internal_error", "{json}");
    }
}
