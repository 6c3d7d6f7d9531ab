//! Forward auth: the gateway as the judge of requests that another proxy
//! serves (nginx `auth_request`, Traefik `ForwardAuth`, Caddy
//! `forward_auth`), by the same routes and policies it applies itself.
//!
//! The proxy in front asks `/auth/forward-auth` about each request it holds,
//! passing the client's header fields (the `Authorization` among them) and
//! saying what the request is in three fields, each required exactly once:
//! `X-Forwarded-Method`, `X-Forwarded-Host` and `X-Forwarded-Uri` (path and
//! query, as Traefik and Caddy send them). The gateway then runs the
//! phases of [`super::Proxy::serve`] that judge, in the same order, on what
//! those fields describe:
//!
//! 1. the path is normalised ([`super::path`]; a path that could be read two
//!    ways, or holds a `#`, is a 400, which the proxy in front takes as a
//!    refusal);
//! 2. the route is chosen by host, path and method (404, 405), a CORS
//!    preflight by the method it announces;
//! 3. a route limited by client address counts the request (the client's
//!    address read from `X-Forwarded-For` through `server.trusted_proxies`);
//! 4. on a required route, the bearer token is verified and checked against
//!    revocation (401), then the route's tenants, roles and scopes (403)
//!    and second factor (401 `insufficient_user_authentication`), then a
//!    limit by user or tenant (429).
//!
//! Allowed: `200` with an empty body, `Cache-Control: no-store`, and on a
//! required route the identity fields, for the proxy in front to copy onto
//! the request it forwards (`auth_request_set`, `authResponseHeaders`,
//! `copy_headers`). Refused: the answer the gateway would have given itself
//! (status, JSON `error`, `WWW-Authenticate`, `Retry-After`).
//!
//! Only peers in `server.trusted_proxies` (re-read on reload, with the
//! routes) are answered (others get 403): the three fields, and
//! `X-Forwarded-For`, are believed only from a proxy the operator named.
//! A CORS preflight cannot be cut down to its CORS fields here as the proxy
//! does, so an `OPTIONS` carrying credentials or a body is not taken for
//! one (`is_preflight`). What the gateway cannot do here, the proxy in front
//! must: strip the client's identity headers (every spelling) and its
//! `Authorization`, and send exactly the path that was judged. The README's
//! "Forward auth" section shows how, for nginx, Traefik and Caddy.
//!
//! Like phases 1–5 of the proxy, a decision does no database I/O and no
//! blocking work.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCESS_CONTROL_REQUEST_METHOD, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH,
    COOKIE, ORIGIN, TRANSFER_ENCODING,
};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response};

use super::error::ProxyError;
use super::identity::Identity;
use super::router::{Miss, Route, RouteTable};
use super::{by_address, count_auth_failure, headers, is_trusted, path, policy, router, status_label};
use super::{Access, Conn, Proxy};
use crate::body::Body;
use crate::config::AuthMode;

/// Where the proxy in front asks (when `forward_auth.enabled`).
pub const PATH: &str = "/auth/forward-auth";

const METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

/// What the access line and the metrics record of one decision.
struct Decision<'t> {
    route: Option<&'t Route>,
    user: Option<uuid::Uuid>,
    method: Option<Method>,
    path: Option<String>,
}

impl Proxy {
    /// Answers the proxy in front about the request it describes.
    /// `authorization`: as in [`Proxy::serve`], the request's only
    /// `Authorization` value when the HTTP/1 parser kept it apart.
    pub(super) fn forward_auth(
        &self,
        table: &RouteTable,
        req: &Request<Body>,
        authorization: Option<&[u8]>,
        conn: &Conn,
        started: Instant,
    ) -> Response<Body> {
        let request_id = headers::request_id(req.headers(), &table.headers.request_id);
        let mut decision = Decision { route: None, user: None, method: None, path: None };
        let judged = self.judge(table, req.headers(), authorization, conn, &mut decision);
        let (mut response, allowed) = match judged {
            Ok(allowed) => (Response::new(Body::empty()), Some(allowed)),
            Err(e) => {
                count_auth_failure(&e);
                let mut response = e.into_response();
                table.cors.apply(req.headers().get(ORIGIN), &table.headers.request_id, &mut response);
                (response, None)
            }
        };
        let h = response.headers_mut();
        headers::set_answer_fields(h, &table.headers.response_headers);
        if let Some(route) = decision.route {
            headers::set_answer_fields(h, &route.config.response_headers);
        }
        // Last, so that no configured answer field can replace them: the
        // proxy in front copies these onto the request it forwards.
        if let Some((identity, assertion)) = allowed {
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            for (name, value) in identity.iter().flat_map(|id| headers::identity_fields(&table.headers, &id.headers)) {
                h.insert(name.clone(), value.clone());
            }
            if let Some(value) = assertion {
                h.insert(table.headers.jwt_assertion.clone(), value);
            }
        }
        let status = response.status();
        let label = decision.route.map_or_else(|| metrics::SharedString::const_str("none"), |r| r.label.clone());
        metrics::counter!("gateway_forward_auth_total", "route" => label, "status" => status_label(status))
            .increment(1);
        let line = Access {
            route: decision.route.map_or("none", |r| r.config.name.as_str()),
            method: decision.method.as_ref(),
            path: decision.path.as_deref().unwrap_or("-"),
            user: decision.user,
            upstream: None,
            forward_auth: true,
        };
        self.access(&request_id, line, status, started.elapsed());
        response.headers_mut().insert(table.headers.request_id.clone(), request_id);
        response
    }

    /// The decision: the identity to hand back (none on a public route or
    /// for a CORS preflight) and, where the route sends one, its
    /// assertion; or the refusal.
    fn judge<'t>(
        &self,
        table: &'t RouteTable,
        h: &HeaderMap,
        authorization: Option<&[u8]>,
        conn: &Conn,
        decision: &mut Decision<'t>,
    ) -> Result<(Option<Arc<Identity>>, Option<HeaderValue>), ProxyError> {
        if !is_trusted(&table.trusted_proxies, conn.peer.ip()) {
            return Err(ProxyError::Forbidden);
        }
        let method = one(h, &METHOD, "forward auth needs one X-Forwarded-Method field")?;
        let host = one(h, &HOST, "forward auth needs one X-Forwarded-Host field")?;
        let uri = one(h, &URI, "forward auth needs one X-Forwarded-Uri field")?;
        // The proxy's own rule: a backend may upper-case `delete` and run a
        // DELETE that no route judged as one.
        let method = Method::from_bytes(method.as_bytes())
            .ok()
            .filter(|m| !m.as_str().bytes().any(|b| b.is_ascii_lowercase()))
            .ok_or(ProxyError::BadRequest("X-Forwarded-Method is not an upper-case method"))?;
        decision.method = Some(method.clone());
        // One host, never a list a chain of proxies made.
        if host.is_empty() || host.contains(',') {
            return Err(ProxyError::BadRequest("X-Forwarded-Host is not one host"));
        }
        // Path and query (origin form), checked as a request target is; the
        // query never takes part. A fragment is never part of one: a `#`
        // that a server in front or behind cuts off could make it serve
        // another path than the one judged.
        if uri.contains('#') {
            return Err(ProxyError::BadRequest("X-Forwarded-Uri holds a '#'"));
        }
        let target = PathAndQuery::try_from(uri)
            .map_err(|_| ProxyError::BadRequest("X-Forwarded-Uri is not a path and query"))?;
        let path: Cow<'_, str> = path::normalize(target.path()).map_err(ProxyError::BadPath)?;
        decision.path = Some(path.clone().into_owned());

        // (An `Authorization` the HTTP/1 parser kept apart counts too.)
        let preflight = method == Method::OPTIONS && authorization.is_none() && is_preflight(h);
        let announced = preflight
            .then(|| h.get(ACCESS_CONTROL_REQUEST_METHOD).and_then(|m| Method::from_bytes(m.as_bytes()).ok()))
            .flatten();
        let route = match table.find(Some(router::normalize_host(host)), &path, &method, announced.as_ref()) {
            Ok(route) => &**route,
            Err(Miss::NoRoute) => return Err(ProxyError::NoRoute),
            Err(Miss::Method(allow)) => return Err(ProxyError::MethodNotAllowed(allow)),
        };
        decision.route = Some(route);
        let cfg = &route.config;

        by_address(route, &table.trusted_proxies, conn.peer.ip(), h)?;
        match cfg.auth {
            // Chosen for the method a preflight announced: never allow a
            // method the route does not list otherwise.
            _ if !route.takes(&method) && !preflight => {
                Err(ProxyError::BadRequest("an OPTIONS routed as a CORS preflight that is not one"))
            }
            AuthMode::Public => Ok((None, None)),
            // The gateway cannot cut the request down to its CORS fields
            // here, as it does when it forwards one: it hands back no
            // identity, and the backend sees an anonymous OPTIONS.
            AuthMode::Required if cfg.cors_preflight && preflight => Ok((None, None)),
            AuthMode::Required => {
                let id = self.authenticate(h, authorization)?;
                decision.user = Some(id.principal.user_id);
                policy::authorize(cfg, &id.principal, &self.tenants)?;
                self.limit_by_identity(route, &id)?;
                let assertion = self.assertion(cfg, &id)?;
                Ok((Some(id), assertion))
            }
        }
    }
}

/// Whether an `OPTIONS` described by these fields is a CORS preflight as a
/// browser sends it: `Origin` and `Access-Control-Request-Method`, and
/// none of what a preflight never carries (credentials, by the Fetch
/// standard; a body, where the proxy in front lets its framing through).
/// The gateway cannot cut such a request down to its CORS fields, as it
/// does when it forwards one, so anything more is judged like any
/// `OPTIONS`. Only a preflight announces a method that picks its route.
fn is_preflight(h: &HeaderMap) -> bool {
    let bodiless = h.get(CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0") && !h.contains_key(TRANSFER_ENCODING);
    h.contains_key(ORIGIN)
        && h.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        && !h.contains_key(AUTHORIZATION)
        && !h.contains_key(COOKIE)
        && bodiless
}

/// The value of `name`, which must come exactly once, as text.
fn one<'h>(h: &'h HeaderMap, name: &HeaderName, missing: &'static str) -> Result<&'h str, ProxyError> {
    let mut values = h.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().map_err(|_| ProxyError::BadRequest(missing)),
        _ => Err(ProxyError::BadRequest(missing)),
    }
}
