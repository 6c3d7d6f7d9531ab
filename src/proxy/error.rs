//! The proxy's error: what went wrong, whose fault it was, and the answer.
//!
//! Client faults are 4xx with a JSON `error` code; upstream faults are 502 or
//! 504; the body never names internal details.

use hyper::header::{HeaderValue, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use super::path::PathError;
use crate::auth::token::TokenError;
use crate::body::{json_error, Body};

/// Who caused a failure (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Gateway,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches")]
    NoRoute,
    /// Routes match the path, but none takes the method; the methods they
    /// take (the `Allow` field).
    #[error("this path does not take this method")]
    MethodNotAllowed(String),
    #[error("{0}")]
    BadPath(PathError),
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("a bearer access token is required")]
    MissingToken,
    #[error("the access token is invalid, expired or revoked")]
    InvalidToken(TokenError),
    #[error("this route does not allow the caller")]
    Forbidden,
    #[error("the access token lacks a required scope")]
    InsufficientScope,
    /// The route wants a login that passed a second factor (RFC 9470).
    #[error("this route needs a login with a second factor")]
    InsufficientAuthentication,
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// Over the route's `rate_limit`; how long until the next request fits.
    #[error("too many requests on this route: retry later")]
    RateLimited(std::time::Duration),
    #[error("the request head is too large")]
    HeaderTooLarge,
    #[error("{0}")]
    NotImplemented(&'static str),
    #[error("the upstream could not be reached")]
    BadGateway(&'static str),
    #[error("the upstream did not answer in time")]
    GatewayTimeout,
    /// The gateway's own failure (an assertion it could not sign); the
    /// cause is logged where it happened.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::BadGateway(_) | ProxyError::GatewayTimeout => Fault::Upstream,
            ProxyError::Internal => Fault::Gateway,
            _ => Fault::Client,
        }
    }

    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "not_found"),
            ProxyError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ProxyError::BadPath(_) | ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ProxyError::MissingToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ProxyError::InvalidToken(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            ProxyError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ProxyError::InsufficientScope => (StatusCode::FORBIDDEN, "insufficient_scope"),
            ProxyError::InsufficientAuthentication => (StatusCode::UNAUTHORIZED, "insufficient_user_authentication"),
            ProxyError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ProxyError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ProxyError::HeaderTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "header_too_large"),
            ProxyError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            ProxyError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ProxyError::GatewayTimeout => (StatusCode::GATEWAY_TIMEOUT, "gateway_timeout"),
            ProxyError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let mut response = json_error(status, code, &self.to_string());
        if let ProxyError::MethodNotAllowed(allow) = &self {
            if let Ok(v) = HeaderValue::from_str(allow) {
                response.headers_mut().insert(ALLOW, v);
            }
        }
        if let ProxyError::RateLimited(wait) = &self {
            // Whole seconds, rounded up: a client that waits that long fits.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        let challenge = match self {
            ProxyError::MissingToken => Some("Bearer"),
            ProxyError::InvalidToken(_) => Some("Bearer error=\"invalid_token\""),
            ProxyError::InsufficientScope => Some("Bearer error=\"insufficient_scope\""),
            ProxyError::InsufficientAuthentication => Some(
                "Bearer error=\"insufficient_user_authentication\", \
                 error_description=\"A login with a second factor is required\"",
            ),
            _ => None,
        };
        if let Some(c) = challenge {
            response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        response
    }
}
