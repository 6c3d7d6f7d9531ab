//! The proxy's error: what went wrong, whose fault it was, and the answer.
//!
//! Client faults are 4xx with a JSON `error` code; upstream faults are 502 or
//! 504; the body never names internal details.
//!
//! A gRPC call (`content-type: application/grpc…`) gets the same refusal as
//! gRPC clients read it: a Trailers-Only answer, HTTP 200 with
//! `grpc-status` and `grpc-message` and no body, as a gRPC server (or
//! Envoy) would send, instead of a JSON body its client cannot decode.
//! The status follows gRPC's HTTP-to-gRPC mapping (doc/http-grpc-status-mapping.md),
//! see [`grpc_status`].

use hyper::header::{HeaderMap, HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Response, StatusCode, Version};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

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
        let response = json_error(status, code, &self.to_string());
        self.with_fields(response)
    }

    /// The refusal of a gRPC call: HTTP 200, no body, and the error in
    /// `grpc-status` (see [`grpc_status`]) and `grpc-message` (`<code>:
    /// <message>`), with the same `WWW-Authenticate`, `Retry-After` and
    /// `Allow` as [`ProxyError::into_response`].
    pub fn into_grpc_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let mut response = Response::new(Body::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(grpc_status(status)));
        let message = grpc_message(&format!("{code}: {self}"));
        if let Ok(value) = HeaderValue::from_str(&message) {
            headers.insert("grpc-message", value);
        }
        self.with_fields(response)
    }

    fn with_fields(self, mut response: Response<Body>) -> Response<Body> {
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

/// Whether a request is a gRPC call: a POST over HTTP/2 whose
/// `content-type` is `application/grpc`, alone or with a `+format` or
/// parameters. gRPC-Web (`application/grpc-web…`) is not: its trailers
/// travel in the body; nor is anything over HTTP/1.1, which gRPC does not
/// use and whose clients could not be told a status without a body.
pub fn is_grpc(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    // The method first: a GET (most traffic) costs one comparison.
    *method == Method::POST
        && version == Version::HTTP_2
        && headers.get(CONTENT_TYPE).is_some_and(|v| {
            let v = v.as_bytes();
            v.len() >= 16
                && v[..16].eq_ignore_ascii_case(b"application/grpc")
                && matches!(v.get(16), None | Some(b'+' | b';'))
        })
}

/// gRPC's code for an HTTP status the gateway answers with: the mapping
/// gRPC publishes for 400, 401, 403, 404, 429 and 502-504 (INTERNAL,
/// UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED, UNAVAILABLE); where
/// it has none, UNIMPLEMENTED for 405 and 501, RESOURCE_EXHAUSTED for 413
/// and 431 (what gRPC servers answer to an oversized message), INTERNAL for
/// 500, else UNKNOWN.
pub fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 | 500 => 13,
        401 => 16,
        403 => 7,
        404 | 405 | 501 => 12,
        413 | 431 => 8,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// What `grpc-message` percent-encodes: every byte outside printable
/// ASCII (controls here, the rest by `utf8_percent_encode`), and `%`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// `text` percent-encoded as `grpc-message` wants it.
fn grpc_message(text: &str) -> String {
    utf8_percent_encode(text, GRPC_MESSAGE).to_string()
}

#[cfg(test)]
mod tests {
    use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
    use hyper::{Method, Version};

    use super::{grpc_message, is_grpc};

    #[test]
    fn grpc_calls_are_posts_of_application_grpc() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            headers
        };
        let h2 = Version::HTTP_2;
        for yes in ["application/grpc", "application/grpc+proto", "Application/GRPC+json", "application/grpc;x=1"] {
            assert!(is_grpc(&Method::POST, h2, &with(yes)), "{yes}");
        }
        for no in ["application/grpc-web", "application/grpc-web+proto", "application/json", "application/grp"] {
            assert!(!is_grpc(&Method::POST, h2, &with(no)), "{no}");
        }
        assert!(!is_grpc(&Method::GET, h2, &with("application/grpc")), "gRPC calls are POSTs");
        assert!(!is_grpc(&Method::POST, Version::HTTP_11, &with("application/grpc")), "over HTTP/2");
        assert!(!is_grpc(&Method::POST, h2, &HeaderMap::new()));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("forbidden: 100% é"), "forbidden: 100%25 %C3%A9");
    }
}
