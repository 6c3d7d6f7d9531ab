//! The one place where errors become HTTP answers.
//!
//! Every error body is `{"error": "<code>", "message": "<text>"}`. Clients get
//! stable codes and a human sentence; 5xx answers say nothing about the cause,
//! which goes to the log with its whole chain instead.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::body::json_error;

/// An error as the HTTP API reports it.
#[derive(Debug)]
pub enum ApiError {
    Auth(AuthError),
    PayloadTooLarge,
    NotFound,
    MethodNotAllowed,
    /// 403 `forbidden`, with why.
    Forbidden(&'static str),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Auth(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = match self {
            ApiError::PayloadTooLarge => {
                return json_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is too large")
            }
            ApiError::NotFound => return json_error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
            ApiError::Forbidden(why) => return json_error(StatusCode::FORBIDDEN, "forbidden", why),
            ApiError::MethodNotAllowed => {
                return json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed")
            }
            ApiError::Auth(e) => e,
        };
        let message = e.to_string();
        let (status, code) = match &e {
            AuthError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            AuthError::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            AuthError::TooManyAttempts { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts"),
            AuthError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AuthError::InvalidGrant => (StatusCode::UNAUTHORIZED, "invalid_grant"),
            AuthError::MissingToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AuthError::InvalidToken(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            AuthError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            AuthError::EmailTaken => (StatusCode::CONFLICT, "email_taken"),
            AuthError::TenantExists => (StatusCode::CONFLICT, "tenant_exists"),
            AuthError::TenantDisabled => (StatusCode::FORBIDDEN, "tenant_disabled"),
            AuthError::MfaRequired => (StatusCode::UNAUTHORIZED, "mfa_required"),
            AuthError::InvalidCode => (StatusCode::BAD_REQUEST, "invalid_code"),
            AuthError::MfaEnabled => (StatusCode::CONFLICT, "mfa_enabled"),
            AuthError::WeakPassword(_) => (StatusCode::BAD_REQUEST, "weak_password"),
            AuthError::InvalidResetToken => (StatusCode::BAD_REQUEST, "invalid_reset_token"),
            AuthError::InvalidVerificationToken => (StatusCode::BAD_REQUEST, "invalid_verification_token"),
            AuthError::InvalidEmailChangeToken => (StatusCode::BAD_REQUEST, "invalid_email_change_token"),
            AuthError::InvalidRevertToken => (StatusCode::BAD_REQUEST, "invalid_revert_token"),
            AuthError::InvalidLoginLink => (StatusCode::BAD_REQUEST, "invalid_login_link"),
            AuthError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            AuthError::Unexpected(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
        };
        let mut response = json_error(status, code, &message);
        let headers = response.headers_mut();
        match e {
            AuthError::TooManyAttempts { retry_after } | AuthError::RateLimited { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            AuthError::MissingToken => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AuthError::InvalidToken(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
            }
            _ => {}
        }
        response
    }
}
