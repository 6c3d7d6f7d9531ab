//! Request extractors for the `/auth` API: JSON bodies with our error codes,
//! the client's address and user agent, and the bearer principal.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::auth::service::{AuthService, ClientContext};
use crate::auth::token::TokenError;
use crate::auth::{bearer_token, AuthError, BearerError, Principal};

/// A JSON body; any rejection is a 400 `invalid_request` (413 when too big).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(rejection) => Err(AuthError::InvalidRequest(describe(&rejection)).into()),
        }
    }
}

fn describe(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => "expected content-type: application/json".into(),
        JsonRejection::JsonDataError(e) => format!("invalid request body: {}", e.body_text()),
        JsonRejection::JsonSyntaxError(_) => "the request body is not valid JSON".into(),
        other => other.body_text(),
    }
}

/// Path parameters; a path that does not decode (a `%FF` that is no
/// UTF-8) or fit names no resource: a JSON 404 rather than axum's
/// plain-text 400. A route whose pattern lacks the parameters (a wiring
/// bug, not the client's) is a 500.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParams(v)),
            Err(PathRejection::MissingPathParams(e)) => {
                Err(AuthError::Unexpected(anyhow::anyhow!("a route without its path parameters: {e}")).into())
            }
            Err(_) => Err(ApiError::NotFound),
        }
    }
}

/// The peer address as recorded by the server (unspecified when absent, as
/// in tests that call the router directly).
pub fn peer_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Who is calling: IP and user agent.
pub struct Client(pub ClientContext);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(512).collect());
        Ok(Client(ClientContext { ip: peer_ip(parts), user_agent }))
    }
}

/// The bearer token from the `Authorization` header, verified and unrevoked.
pub struct Authenticated(pub Principal);

impl FromRequestParts<AuthService> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AuthService) -> Result<Self, Self::Rejection> {
        let token = match bearer_token(&parts.headers).map(std::str::from_utf8) {
            Ok(Ok(token)) => token,
            // ASCII already, so this cannot happen; refused all the same.
            Ok(Err(_)) => return Err(AuthError::InvalidToken(TokenError::Malformed).into()),
            Err(BearerError::Missing) => {
                metrics::counter!("gateway_auth_failures_total", "reason" => "missing").increment(1);
                return Err(AuthError::MissingToken.into());
            }
            Err(BearerError::Duplicate) => {
                return Err(AuthError::InvalidRequest("more than one Authorization header".into()).into())
            }
            Err(BearerError::Malformed) => return Err(AuthError::InvalidToken(TokenError::Malformed).into()),
        };
        match state.authenticator.verify_bearer(token) {
            Ok(principal) => Ok(Authenticated(principal)),
            Err(e) => {
                metrics::counter!("gateway_auth_failures_total", "reason" => e.reason()).increment(1);
                Err(AuthError::InvalidToken(e).into())
            }
        }
    }
}
