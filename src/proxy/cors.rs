//! CORS headers on the answers the gateway makes itself on proxied routes.
//!
//! A browser app on another origin (`auth.cors_origins`) gets its preflights
//! answered by the backend (`cors_preflight` on the route) and its
//! responses' CORS headers from the backend too. But a 401, 403, 404, 413,
//! 429, 502 or 504 made by the gateway never reached a backend: without these
//! headers the browser hides it from the app, which then cannot tell an
//! expired token (refresh and retry) from a network failure. The same
//! origins, converted at each (re)load, also drive the API's CORS layer
//! ([`CorsOrigins::allow_origin`]); never credentials mode.

use hyper::header::{self, HeaderName, HeaderValue};
use hyper::Response;
use tower_http::cors::AllowOrigin;

use crate::body::Body;

/// The origins of `auth.cors_origins` as header values; empty for none.
#[derive(Debug, Clone, Default)]
pub struct CorsOrigins {
    any: bool,
    origins: Vec<HeaderValue>,
}

static ANY: HeaderValue = HeaderValue::from_static("*");

impl CorsOrigins {
    /// From `auth.cors_origins`, already validated (`*` alone, or origins).
    pub fn new(origins: &[String]) -> Self {
        Self {
            any: origins.iter().any(|o| o == "*"),
            origins: origins.iter().filter(|o| *o != "*").filter_map(|o| HeaderValue::from_str(o).ok()).collect(),
        }
    }

    /// The origins for tower-http's layer on the API, or `None` when no
    /// origin is allowed (then the API sends no CORS field at all).
    pub fn allow_origin(&self) -> Option<AllowOrigin> {
        if self.any {
            Some(AllowOrigin::any())
        } else if self.origins.is_empty() {
            None
        } else {
            Some(AllowOrigin::list(self.origins.iter().cloned()))
        }
    }

    /// Whether no origin is allowed (then a request's `Origin` need not be kept).
    pub fn is_off(&self) -> bool {
        !self.any && self.origins.is_empty()
    }

    /// Adds the CORS fields to a gateway-made `response` to a request from
    /// `origin`: `Access-Control-Allow-Origin` when the origin is allowed,
    /// with the fields a script needs exposed (`request_id` is the configured
    /// request id header); `Vary: Origin` whenever the answer depends on it.
    pub fn apply(&self, origin: Option<&HeaderValue>, request_id: &HeaderName, response: &mut Response<Body>) {
        if self.is_off() {
            return;
        }
        let h = response.headers_mut();
        let allow = match origin {
            _ if self.any => Some(ANY.clone()),
            Some(o) => self.origins.iter().find(|allowed| *allowed == o).cloned(),
            None => None,
        };
        if !self.any {
            h.append(header::VARY, HeaderValue::from_static("origin"));
        }
        if let Some(allow) = allow {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
            let exposed = format!("www-authenticate, retry-after, {request_id}");
            if let Ok(exposed) = HeaderValue::from_str(&exposed) {
                h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(cors: &CorsOrigins, origin: Option<&str>) -> Response<Body> {
        let mut r = Response::new(Body::empty());
        let origin = origin.map(|o| HeaderValue::from_str(o).expect("origin"));
        cors.apply(origin.as_ref(), &HeaderName::from_static("x-request-id"), &mut r);
        r
    }

    fn field<'a>(r: &'a Response<Body>, name: &str) -> Option<&'a str> {
        r.headers().get(name).map(|v| v.to_str().expect("ASCII"))
    }

    #[test]
    fn only_listed_origins_may_read_the_gateways_answers() {
        let cors = CorsOrigins::new(&["https://app.example.com".to_owned()]);
        let r = answer(&cors, Some("https://app.example.com"));
        assert_eq!(field(&r, "access-control-allow-origin"), Some("https://app.example.com"));
        assert_eq!(field(&r, "access-control-expose-headers"), Some("www-authenticate, retry-after, x-request-id"));
        assert_eq!(field(&r, "vary"), Some("origin"));
        assert_eq!(field(&r, "access-control-allow-credentials"), None);
        for other in [Some("https://evil.example"), Some("https://app.example.com.evil.example"), None] {
            let r = answer(&cors, other);
            assert_eq!(field(&r, "access-control-allow-origin"), None, "{other:?}");
            assert_eq!(field(&r, "vary"), Some("origin"), "{other:?}");
        }
    }

    #[test]
    fn any_origin_is_a_star_and_none_adds_nothing() {
        let r = answer(&CorsOrigins::new(&["*".to_owned()]), Some("https://x.example"));
        assert_eq!(field(&r, "access-control-allow-origin"), Some("*"));
        assert_eq!(field(&r, "vary"), None);
        let off = CorsOrigins::new(&[]);
        assert!(off.is_off());
        assert!(answer(&off, Some("https://x.example")).headers().is_empty());
    }
}
