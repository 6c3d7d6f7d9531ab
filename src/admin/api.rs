//! The admin API: what the CLI's `tenant`, `user` and `session` commands
//! do, over HTTP on the admin listener, for a backend or a console that
//! provisions accounts (Supabase's and Ory Kratos's admin APIs are what
//! users of those expect).
//!
//! Off unless `admin.api_token_file` or `[[admin.tenant_tokens]]` names a
//! file with a token (32 characters or more): every `/admin/*` request
//! then carries one as `Authorization: Bearer <token>`, compared with each
//! in constant time (as SHA-256 digests, so neither length nor content nor
//! which token matched leaks through timing); without one, `/admin/*`
//! answers 404. `api_token_file`'s token reaches everything; a tenant
//! token reaches its tenants' users and sessions only: other tenants do
//! not exist for it (404), a disabled one is closed to it, tenants
//! themselves (make, disable, enable) and forgetting (which reaches events
//! of no tenant) are refused (403, before the body is read: see
//! [`GlobalAdmin`]), and it gives only the roles and scopes its entry
//! lists, so that a tenant's own console can hold one. The admin listener is loopback by
//! default: the token is a second lock, not a reason to expose it.
//!
//! Users are named by id in paths (an email is a user's to change), and
//! acted on by id ([`UserKey::Id`]): a user who moves to another address
//! while a call runs, and another who takes the old one, cannot swap
//! places under it. Every
//! change goes through [`Accounts`], as the CLI's do, so it is validated
//! and audited alike, with `"by": "admin_api"` (or `admin_api:<name>`) in
//! the event's detail; the
//! sessions a change revokes are refused by this process at once and by
//! the other replicas within `auth.revocation_poll` (or at once with the
//! PostgreSQL push). No password, token or secret is ever logged or
//! answered, but the reset token that `reset-token` exists to return.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use secrecy::SecretString;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::api::extract::{JsonBody, PathParams};
use crate::auth::service::{rfc3339, Accounts, AuthService, UserKey};
use crate::auth::AuthError;
use crate::body::json_error;
use crate::config::AdminConfig;
use crate::db::tenants::Tenant;
use crate::db::users::{ForgetRefused, User};

/// Shortest token accepted: 32 characters (`openssl rand -hex 32` makes 64).
pub const MIN_TOKEN_LEN: usize = 32;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The admin API's tokens: the SHA-256 of each, and what it reaches. The
/// files are read at start and again on [`ApiTokens::reload`] (SIGHUP), so
/// that a token is replaced without a restart; which files, and what each
/// reaches, is `[admin]`'s as the process started.
#[derive(Clone)]
pub struct ApiTokens {
    tokens: Arc<arc_swap::ArcSwap<Vec<Token>>>,
    config: Arc<AdminConfig>,
}

struct Token {
    digest: [u8; 32],
    caller: Caller,
}

/// Who a request's token is: recorded as `by` in what it changes, and
/// what it reaches (`None`: `api_token_file`'s, everything).
#[derive(Clone, Debug)]
struct Caller {
    by: Arc<str>,
    scope: Option<Arc<Scope>>,
}

/// What a tenant token reaches: its tenants' users and sessions, the
/// roles and scopes it may give, and whether it only reads.
#[derive(Debug)]
struct Scope {
    tenants: Vec<String>,
    roles: Vec<String>,
    scopes: Vec<String>,
    read_only: bool,
}

impl Caller {
    /// Whether the caller reaches tenant `slug`'s users and sessions.
    fn reaches(&self, slug: &str) -> bool {
        self.scope.as_ref().is_none_or(|s| s.tenants.iter().any(|t| t == slug))
    }

    /// Refuses a tenant token roles or scopes it may not give.
    fn may_give(&self, roles: &[String], scopes: &[String]) -> Result<(), ApiError> {
        let Some(scope) = &self.scope else { return Ok(()) };
        if roles.iter().all(|r| scope.roles.contains(r)) && scopes.iter().all(|s| scope.scopes.contains(s)) {
            return Ok(());
        }
        Err(ApiError::Forbidden("a tenant token gives only the roles and scopes its admin.tenant_tokens entry lists"))
    }
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTokens").field("tokens", &self.tokens.load().len()).finish_non_exhaustive()
    }
}

impl ApiTokens {
    /// Reads `admin.api_token_file` and the `[[admin.tenant_tokens]]`
    /// files; `None` when there is neither (the API is off). An error
    /// names the setting, never the token.
    pub fn load(admin: &AdminConfig) -> anyhow::Result<Option<Self>> {
        let (tokens, problems) = read_tokens(admin);
        if let Some(first) = problems.into_iter().next() {
            return Err(first);
        }
        let config = Arc::new(admin.clone());
        Ok((!tokens.is_empty()).then(|| Self { tokens: Arc::new(arc_swap::ArcSwap::from_pointee(tokens)), config }))
    }

    /// Reads the token files again: a token replaced in its file takes
    /// over from the old one. A file that cannot be read (removed to
    /// revoke a leaked token, say), or holds another entry's token, drops
    /// its entry's token (fail closed) while the others are read; the
    /// problems are returned, each naming its setting.
    pub fn reload(&self) -> Vec<anyhow::Error> {
        let (tokens, problems) = read_tokens(&self.config);
        self.tokens.store(Arc::new(tokens));
        problems
    }

    /// The caller whose token `presented` is, comparing it with every
    /// token in constant time (as SHA-256 digests, so neither length nor
    /// content leaks through timing, nor which token matched).
    fn caller(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for token in self.tokens.load().iter() {
            if bool::from(digest.ct_eq(&token.digest)) {
                found = Some(token.caller.clone());
            }
        }
        found
    }
}

/// The tokens of `admin.api_token_file` and `[[admin.tenant_tokens]]`
/// that could be read, and what kept the others out (a file that cannot
/// be read, or holds an earlier entry's token).
fn read_tokens(admin: &AdminConfig) -> (Vec<Token>, Vec<anyhow::Error>) {
    let mut tokens = Vec::new();
    let mut problems = Vec::new();
    if let Some(path) = &admin.api_token_file {
        let caller = Caller { by: "admin_api".into(), scope: None };
        match read_token(path, "admin.api_token_file") {
            Ok(digest) => tokens.push(Token { digest, caller }),
            Err(e) => problems.push(e),
        }
    }
    for (i, t) in admin.tenant_tokens.iter().enumerate() {
        let setting = format!("admin.tenant_tokens[{i}].file");
        let digest = match read_token(&t.file, &setting) {
            Ok(digest) => digest,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if tokens.iter().any(|other: &Token| other.digest == digest) {
            problems.push(anyhow::anyhow!(
                "{setting} ({}): the same token as another one; make each with its own `openssl rand -hex 32`",
                t.file.display()
            ));
            continue;
        }
        let scope = Scope {
            tenants: t.tenants.clone(),
            roles: t.roles.clone(),
            scopes: t.scopes.clone(),
            read_only: t.read_only,
        };
        let caller = Caller { by: format!("admin_api:{}", t.name).into(), scope: Some(Arc::new(scope)) };
        tokens.push(Token { digest, caller });
    }
    (tokens, problems)
}

/// One token from `path`: one line, 32 characters or more, no spaces.
fn read_token(path: &Path, setting: &str) -> anyhow::Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{setting}: reading {}", path.display()))?;
    let token = text.trim();
    if token.chars().count() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!(
            "{setting} ({}): the token must be one line of at least {MIN_TOKEN_LEN} characters \
             without spaces (make one with `openssl rand -hex 32`)",
            path.display()
        );
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// The router's state.
#[derive(Clone)]
struct Shared {
    service: AuthService,
}

/// What a handler acts with: the service, its account rules auditing the
/// caller's `by`, and the caller (see [`Caller`]).
struct Admin {
    service: AuthService,
    accounts: Accounts,
    caller: Caller,
}

impl FromRequestParts<Shared> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Self::Rejection> {
        // Set by `authorize`, which every route is behind.
        let caller = parts.extensions.get::<Caller>().cloned().ok_or(ApiError::NotFound)?;
        if caller.scope.as_ref().is_some_and(|s| s.read_only) && parts.method != Method::GET {
            return Err(ApiError::Forbidden("a read-only tenant token lists and reads; it changes nothing"));
        }
        let accounts = Accounts { by: Some(Arc::clone(&caller.by)), ..state.service.accounts.clone() };
        Ok(Admin { service: state.service.clone(), accounts, caller })
    }
}

/// An [`Admin`] with `api_token_file`'s token: what makes, disables or
/// enables tenants, or erases events no tenant holds. A tenant token is
/// refused (403) before the body is read.
struct GlobalAdmin(Admin);

impl FromRequestParts<Shared> for GlobalAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Self::Rejection> {
        let admin = Admin::from_request_parts(parts, state).await?;
        if admin.caller.scope.is_some() {
            return Err(ApiError::Forbidden(
                "a tenant token reaches its tenants' users and sessions, not tenants, nor what no tenant holds",
            ));
        }
        Ok(GlobalAdmin(admin))
    }
}

/// The `/admin` routes: the API with `token`, or a 404 for every path
/// without.
pub fn router(service: AuthService, tokens: Option<ApiTokens>) -> Router {
    let Some(tokens) = tokens else {
        let off = || async {
            let message = "the admin API is off: set admin.api_token_file (or admin.tenant_tokens)";
            json_error(StatusCode::NOT_FOUND, "not_found", message)
        };
        return Router::new().route("/admin", any(off)).route("/admin/{*rest}", any(off));
    };
    Router::new()
        .route("/admin/tenants", get(list_tenants).post(create_tenant))
        .route("/admin/tenants/{slug}/disable", post(disable_tenant))
        .route("/admin/tenants/{slug}/enable", post(enable_tenant))
        .route("/admin/tenants/{slug}/users", get(list_users).post(create_user))
        .route("/admin/tenants/{slug}/users/{id}", get(get_user).delete(delete_user))
        .route("/admin/tenants/{slug}/users/{id}/forget", post(forget_user))
        .route("/admin/tenants/{slug}/users/{id}/disable", post(disable_user))
        .route("/admin/tenants/{slug}/users/{id}/enable", post(enable_user))
        .route("/admin/tenants/{slug}/users/{id}/password", post(set_password))
        .route("/admin/tenants/{slug}/users/{id}/email", post(set_email))
        .route("/admin/tenants/{slug}/users/{id}/verify-email", post(verify_email))
        .route("/admin/tenants/{slug}/users/{id}/reset-token", post(reset_token))
        .route("/admin/tenants/{slug}/users/{id}/grant", post(grant))
        .route("/admin/tenants/{slug}/users/{id}/revoke", post(revoke))
        .route("/admin/tenants/{slug}/users/{id}/mfa-reset", post(mfa_reset))
        .route("/admin/tenants/{slug}/users/{id}/sessions", get(list_sessions).delete(revoke_sessions))
        .route("/admin/tenants/{slug}/sessions/{session_id}", delete(revoke_session))
        .route("/admin/{*rest}", any(|| async { ApiError::NotFound }))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(tokens, authorize))
        .layer(middleware::from_fn(no_store))
        .with_state(Shared { service })
}

/// Lets through a request that carries the token; 401 for the rest.
async fn authorize(State(tokens): State<ApiTokens>, mut req: Request, next: Next) -> Response {
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let presented = presented.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    if let Some(caller) = presented.and_then(|p| tokens.caller(p.trim())) {
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    }
    // Counted, not logged at warn: any local page can send these in a loop.
    metrics::counter!("gateway_admin_api_refused_total").increment(1);
    tracing::debug!(path = %req.uri().path(), "an admin API request without the right token was refused");
    let mut response = json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin API needs a bearer token of admin.api_token_file or admin.tenant_tokens",
    );
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

async fn no_store(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn tenant_view(t: &Tenant) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "slug": t.slug, "name": t.name, "disabled": t.disabled, "created_at": rfc3339(t.created_at),
    })
}

fn user_view(tenant: &Tenant, u: &User) -> serde_json::Value {
    serde_json::json!({
        "id": u.id,
        "tenant": tenant.slug,
        "email": u.email,
        "roles": u.roles,
        "scopes": u.scopes,
        "disabled": u.disabled,
        "mfa": u.totp_secret.is_some(),
        "email_verified": u.email_verified_at.is_some(),
        "created_at": rfc3339(u.created_at),
    })
}

fn revoked(n: usize) -> Response {
    Json(serde_json::json!({ "sessions_revoked": n })).into_response()
}

impl Admin {
    /// The tenant `slug`, if the caller reaches it (a tenant token's other
    /// tenants do not exist for it, and a disabled one is closed to it:
    /// the operator disabled it).
    async fn tenant(&self, slug: &str) -> Result<Tenant, ApiError> {
        // No slug is no tenant (and text PostgreSQL refuses never reaches it).
        if !crate::auth::service::is_slug(slug) || !self.caller.reaches(slug) {
            return Err(ApiError::NotFound);
        }
        let tenant =
            self.service.store.tenant_by_slug(slug).await.map_err(AuthError::from)?.ok_or(ApiError::NotFound)?;
        if tenant.disabled && self.caller.scope.is_some() {
            return Err(ApiError::Forbidden("the tenant is disabled: a tenant token reaches it again once enabled"));
        }
        Ok(tenant)
    }

    /// The tenant and the (not deleted) user `id` of it.
    async fn user(&self, slug: &str, id: &str) -> Result<(Tenant, User), ApiError> {
        let tenant = self.tenant(slug).await?;
        let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
        let user = self.service.store.user_by_id(tenant.id, id).await.map_err(AuthError::from)?;
        let user = user.filter(|u| !u.is_deleted()).ok_or(ApiError::NotFound)?;
        Ok((tenant, user))
    }

    /// Refuses the revoked sessions' tokens in this process at once.
    fn refuse(&self, sessions: &[Uuid]) {
        for id in sessions {
            self.service.authenticator.revocations().revoke_session(*id);
        }
    }
}

async fn list_tenants(a: Admin) -> Result<Response, ApiError> {
    let tenants = a.service.store.list_tenants().await.map_err(AuthError::from)?;
    let reached = tenants.iter().filter(|t| a.caller.reaches(&t.slug));
    Ok(Json(reached.map(tenant_view).collect::<Vec<_>>()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    slug: String,
    #[serde(default)]
    name: Option<String>,
}

async fn create_tenant(GlobalAdmin(a): GlobalAdmin, JsonBody(body): JsonBody<NewTenant>) -> Result<Response, ApiError> {
    let name = body.name.unwrap_or_else(|| body.slug.clone());
    let tenant = a.accounts.create_tenant(&body.slug, &name).await?;
    Ok((StatusCode::CREATED, Json(tenant_view(&tenant))).into_response())
}

async fn disable_tenant(
    GlobalAdmin(a): GlobalAdmin,
    PathParams(slug): PathParams<String>,
) -> Result<Response, ApiError> {
    let tenant = a.tenant(&slug).await?;
    let sessions = a.accounts.disable_tenant(&tenant).await?;
    a.refuse(&sessions);
    a.service.authenticator.revocations().revoke_tenant(tenant.id, crate::db::unix_now());
    Ok(revoked(sessions.len()))
}

async fn enable_tenant(
    GlobalAdmin(a): GlobalAdmin,
    PathParams(slug): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = a.tenant(&slug).await?;
    a.accounts.enable_tenant(&tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_users(a: Admin, PathParams(slug): PathParams<String>) -> Result<Response, ApiError> {
    let tenant = a.tenant(&slug).await?;
    let users = a.service.store.list_users(tenant.id).await.map_err(AuthError::from)?;
    Ok(Json(users.iter().map(|u| user_view(&tenant, u)).collect::<Vec<_>>()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    password: SecretString,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

async fn create_user(
    a: Admin,
    PathParams(slug): PathParams<String>,
    JsonBody(body): JsonBody<NewUser>,
) -> Result<Response, ApiError> {
    let tenant = a.tenant(&slug).await?;
    a.caller.may_give(&body.roles, &body.scopes)?;
    let user =
        a.accounts.create_user(tenant.id, &body.email, &body.password, &body.roles, &body.scopes, None, None, true);
    let user = user.await?;
    Ok((StatusCode::CREATED, Json(user_view(&tenant, &user))).into_response())
}

async fn get_user(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    Ok(Json(user_view(&tenant, &user)).into_response())
}

/// `?forget=true` (or `false`, the default); any other query is refused.
fn forget_asked(uri: &Uri) -> Result<bool, AuthError> {
    match uri.query().unwrap_or("") {
        "" | "forget=false" => Ok(false),
        "forget=true" => Ok(true),
        _ => Err(AuthError::InvalidRequest("forget: the query is ?forget=true or ?forget=false".to_owned())),
    }
}

async fn delete_user(
    a: Admin,
    PathParams((slug, id)): PathParams<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let forget = forget_asked(&uri)?;
    if forget && a.caller.scope.is_some() {
        return Err(ApiError::Forbidden(FORGET_IS_GLOBAL));
    }
    let (tenant, user) = a.user(&slug, &id).await?;
    let sessions = a.accounts.delete_user(tenant.id, UserKey::Id(user.id), forget).await?;
    a.refuse(&sessions);
    a.service.authenticator.revocations().revoke_user(user.id, crate::db::unix_now());
    Ok(revoked(sessions.len()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormerEmail {
    email: String,
}

/// Why a tenant token does not forget: forgetting also erases the events
/// no tenant holds (a login naming an unknown tenant) that carry the
/// address, whichever tenant's person made them.
const FORGET_IS_GLOBAL: &str =
    "forgetting erases events no tenant holds too: it takes admin.api_token_file's token (delete without forget)";

/// The CLI's `user forget`: for a user deleted without `?forget=true`, the
/// audit events of the user, and those recorded with its former `email`
/// and no other user, lose the email, address and user agent. A user that
/// is not deleted is refused (delete it first); one that never was is 404.
async fn forget_user(
    GlobalAdmin(a): GlobalAdmin,
    PathParams((slug, id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<FormerEmail>,
) -> Result<Response, ApiError> {
    let tenant = a.tenant(&slug).await?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let user = a.service.store.user_by_id(tenant.id, id).await.map_err(AuthError::from)?;
    let user = user.ok_or(ApiError::NotFound)?;
    let events = match a.accounts.forget_user(tenant.id, user.id, &body.email).await? {
        Ok(events) => events,
        Err(ForgetRefused::NotDeleted) => {
            let message = format!("id: user {id} is not deleted (DELETE it first, or with ?forget=true)");
            return Err(AuthError::InvalidRequest(message).into());
        }
        Err(ForgetRefused::NotItsEmail) => {
            let message = format!(
                "email: no audit event of user {id} carries {:?} (a typo? or retention pruned them)",
                body.email
            );
            return Err(AuthError::InvalidRequest(message).into());
        }
    };
    Ok(Json(serde_json::json!({ "events_erased": events })).into_response())
}

async fn disable_user(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    let sessions = a.accounts.disable_user(tenant.id, UserKey::Id(user.id)).await?;
    a.refuse(&sessions);
    a.service.authenticator.revocations().revoke_user(user.id, crate::db::unix_now());
    Ok(revoked(sessions.len()))
}

async fn enable_user(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<StatusCode, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    a.accounts.enable_user(tenant.id, UserKey::Id(user.id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPassword {
    password: SecretString,
}

async fn set_password(
    a: Admin,
    PathParams((slug, id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<NewPassword>,
) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    let sessions = a.accounts.reset_password(tenant.id, UserKey::Id(user.id), &body.password).await?;
    a.refuse(&sessions);
    Ok(revoked(sessions.len()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEmail {
    new_email: String,
}

async fn set_email(
    a: Admin,
    PathParams((slug, id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<NewEmail>,
) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    a.accounts.set_email(tenant.id, UserKey::Id(user.id), &body.new_email).await?;
    let (tenant, user) = a.user(&slug, &id).await?;
    Ok(Json(user_view(&tenant, &user)).into_response())
}

async fn verify_email(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<StatusCode, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    a.accounts.mark_email_verified(tenant.id, UserKey::Id(user.id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The one answer that holds a credential: the reset token an operator
/// hands over (as `gateway user reset-token` prints it).
async fn reset_token(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    if tenant.disabled {
        let message = format!("tenant {:?} is disabled; a link would not work", tenant.slug);
        return Err(AuthError::InvalidRequest(message).into());
    }
    let link = a.accounts.reset_link(tenant.id, UserKey::Id(user.id)).await?;
    let body = serde_json::json!({ "token": link.token, "expires_at": rfc3339(link.expires_at) });
    Ok(Json(body).into_response())
}

/// Roles and scopes to add or remove: a misspelled field is refused, and
/// so is a change that names none (the CLI asks for one too).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessChange {
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

impl AccessChange {
    fn named(&self) -> Result<(), AuthError> {
        if self.roles.is_empty() && self.scopes.is_empty() {
            return Err(AuthError::InvalidRequest("roles, scopes: name at least one".to_owned()));
        }
        Ok(())
    }
}

async fn grant(
    a: Admin,
    PathParams((slug, id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<AccessChange>,
) -> Result<Response, ApiError> {
    body.named()?;
    a.caller.may_give(&body.roles, &body.scopes)?;
    let (tenant, user) = a.user(&slug, &id).await?;
    let (user, _) = a.accounts.grant(tenant.id, UserKey::Id(user.id), &body.roles, &body.scopes).await?;
    Ok(Json(user_view(&tenant, &user)).into_response())
}

/// Removes roles and scopes and revokes every session (no live token
/// keeps them); the answer is the user with `sessions_revoked`.
async fn revoke(
    a: Admin,
    PathParams((slug, id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<AccessChange>,
) -> Result<Response, ApiError> {
    body.named()?;
    let (tenant, user) = a.user(&slug, &id).await?;
    let (user, sessions) = a.accounts.revoke(tenant.id, UserKey::Id(user.id), &body.roles, &body.scopes).await?;
    let sessions = sessions.unwrap_or_default();
    a.refuse(&sessions);
    let mut view = user_view(&tenant, &user);
    view["sessions_revoked"] = sessions.len().into();
    Ok(Json(view).into_response())
}

async fn mfa_reset(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    let sessions = a.accounts.reset_mfa(tenant.id, UserKey::Id(user.id)).await?;
    a.refuse(&sessions);
    Ok(revoked(sessions.len()))
}

async fn list_sessions(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    let sessions = a.accounts.sessions(tenant.id, UserKey::Id(user.id)).await?;
    let views: Vec<_> = sessions
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "created_at": rfc3339(s.created_at),
                "last_used_at": rfc3339(s.last_used_at),
                "expires_at": rfc3339(s.expires_at),
                "amr": s.amr().values(),
                "ip": s.ip,
                "user_agent": s.user_agent,
            })
        })
        .collect();
    Ok(Json(views).into_response())
}

async fn revoke_sessions(a: Admin, PathParams((slug, id)): PathParams<(String, String)>) -> Result<Response, ApiError> {
    let (tenant, user) = a.user(&slug, &id).await?;
    let sessions = a.accounts.revoke_all_sessions(tenant.id, UserKey::Id(user.id)).await?;
    a.refuse(&sessions);
    Ok(revoked(sessions.len()))
}

async fn revoke_session(
    a: Admin,
    PathParams((slug, session_id)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let tenant = a.tenant(&slug).await?;
    let session_id = Uuid::parse_str(&session_id).map_err(|_| ApiError::NotFound)?;
    a.accounts.revoke_session(tenant.id, session_id).await?;
    a.refuse(&[session_id]);
    Ok(StatusCode::NO_CONTENT)
}
