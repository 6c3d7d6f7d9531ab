//! The public listener's request handling: the gateway's own API, and the
//! reverse proxy for everything else.
//!
//! A request goes through these phases, in this order ([`Proxy::serve`]):
//!
//! 1. **Normalise** the path once ([`path`]); a path that could be read two
//!    ways is a 400. `/auth/*` and the JWKS go to the API router (on the
//!    normalised path), and `/auth/forward-auth` (when enabled) to
//!    [`forward_auth`], which runs phases 2–5 on the request a proxy in
//!    front describes; everything else is proxied.
//! 2. **Route**: host + longest segment prefix, then method ([`router`]);
//!    none → 404, a method no route at that prefix takes → 405.
//! 3. **Strip** hop-by-hop headers, what `Connection` nominates, and every
//!    spelling of a reserved identity header ([`headers`]) — before anything
//!    is added, on public and required routes alike. A route's rules on
//!    the client's address apply here: `allow_ips` (403 outside them), then
//!    a limit by address ([`ratelimit`]; 429 past it).
//! 4. **Authenticate** (required routes): the bearer token, verified through
//!    the cache in [`identity`] and always checked against revocation. A
//!    CORS preflight skips this step where the route says `cors_preflight`,
//!    and goes on cut down to its CORS fields
//!    ([`headers::keep_preflight_fields`]).
//! 5. **Authorise** against the route's tenants, roles and scopes
//!    ([`policy`]); a route limited by user or tenant counts the request
//!    here.
//! 6. **Inject** identity (and, on a route with `jwt_assertion`, its
//!    signed assertion: [`assertion`]), request id and `X-Forwarded-*`.
//! 7. **Forward** through the pooled client ([`upstream`]), streaming both
//!    bodies; round-robin, cool-down and one retry for idempotent requests
//!    whose connection was refused; 502/504 on failure.
//! 8. **Respond**: strip hop-by-hop headers (or splice a WebSocket), add the
//!    request id (and, on the gateway's own answers, CORS fields for the
//!    origins of `auth.cors_origins`: [`cors`]), set
//!    `headers.response_headers` (on every answer, the API's and refusals
//!    included) and then the route's own (on answers to requests it took),
//!    count, time and log the request.
//!
//! Steps 1–6 do no database I/O and no blocking work.

pub mod assertion;
pub mod cors;
pub mod error;
pub mod forward_auth;
pub mod headers;
pub mod health;
pub mod identity;
pub mod path;
pub mod policy;
pub mod ratelimit;
pub mod router;
pub mod tenants;
pub mod tunnel;
pub mod upstream;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Body as _;
use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_REQUEST_METHOD, AUTHORIZATION, CACHE_CONTROL, CONNECTION, HOST, ORIGIN,
};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use ipnet::IpNet;
use tokio::time::Sleep;
use tower::ServiceExt as _;

use crate::auth::token::TokenError;
use crate::auth::{bearer_token, bearer_value, Authenticator, BearerError};
use crate::body::Body;
use crate::config::{AuthMode, RateLimitKey};
use crate::http1::upgrade::OnUpgrade;
use error::ProxyError;
use identity::{Identity, IdentityCache};
use ratelimit::RateLimiter;
use router::{Miss, Route, RouteTable};
use tenants::TenantDirectory;
use upstream::{UpstreamBody, UpstreamClient};

/// How the request arrived.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    pub https: bool,
    /// What the connection holds for its life, and its WebSocket tunnel
    /// after it (None in tests that drive the service directly).
    pub slot: Option<Arc<Slot>>,
    /// The peer's address as a header value, rendered once per connection
    /// rather than per request (`X-Forwarded-For`).
    pub peer_header: HeaderValue,
}

impl Conn {
    pub fn new(peer: SocketAddr, https: bool, slot: Option<Arc<Slot>>) -> Self {
        let peer_header =
            HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { peer, https, slot, peer_header }
    }
}

/// What a client connection holds while it lives, and hands to its
/// WebSocket tunnel when it becomes one: its place under
/// `server.max_connections`, so tunnels count against the limit; and a
/// watch on its worker's graceful shutdown, so that a shutdown waits for
/// open tunnels, up to `server.shutdown_grace`, as it waits for requests
/// in flight. Tunnels still open when the grace ends are closed with the
/// worker.
#[derive(Debug)]
pub struct Slot {
    // Fields drop in order: counted out before the permit is given back,
    // so the gauge never shows more than `server.max_connections`.
    _open: Open,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _drain: hyper_util::server::graceful::Watcher,
}

impl Slot {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, drain: hyper_util::server::graceful::Watcher) -> Self {
        let open = Open::new(metrics::gauge!("gateway_connections_open"));
        Self { _open: open, _permit: permit, _drain: drain }
    }
}

/// One unit of a gauge of open things, given back when dropped, so that a
/// task cancelled at shutdown still counts itself out.
#[derive(Debug)]
pub(crate) struct Open(metrics::Gauge);

impl Open {
    pub(crate) fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Everything the public listener needs to answer a request. Cloning is
/// cheap (shared parts are reference-counted); each worker thread holds a
/// clone with its own upstream client.
#[derive(Clone)]
pub struct Proxy {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub api: crate::api::Api,
    pub authenticator: Authenticator,
    pub identities: IdentityCache,
    pub tenants: TenantDirectory,
    pub client: UpstreamClient,
    pub cooldown: Duration,
    /// A WebSocket tunnel silent both ways for this long is closed.
    pub tunnel_idle_timeout: Duration,
    pub access_log: bool,
    /// The main runtime, which owns the database pool: the API runs there.
    pub api_runtime: tokio::runtime::Handle,
}

/// What an access line says besides the request id, status and duration.
#[derive(Clone, Copy)]
struct Access<'a> {
    route: &'a str,
    method: Option<&'a Method>,
    path: &'a str,
    user: Option<uuid::Uuid>,
    upstream: Option<&'a crate::config::UpstreamTarget>,
    /// A decision for a proxy in front ([`forward_auth`]), not a request
    /// served.
    forward_auth: bool,
}

/// What the access log and metrics record about one request.
struct Outcome<'t> {
    /// Borrowed from the route table `serve` holds for the whole request.
    route: Option<&'t Route>,
    user: Option<uuid::Uuid>,
    upstream: Option<usize>,
    /// When the upstream's answer (or its failure) came: the end of both
    /// durations, read from the clock once.
    answered: Option<Instant>,
}

impl Proxy {
    /// Answers one request from the public listener. Never fails: every
    /// error becomes a JSON response.
    ///
    /// `timer`, when the connection lends one, bounds the wait for the
    /// upstream's answer (the route's `timeout`): a timer kept for the
    /// connection's life and pushed later for each request costs an atomic
    /// update, where a fresh one is put into the timer wheel and taken out
    /// again. Without it (HTTP/2 streams), each request makes its own.
    ///
    /// `authorization` is the request's only `Authorization` value when the
    /// HTTP/1 parser kept it out of the header map (its bytes checked by
    /// httparse; [`crate::http1::header_map`] says why). It stays out only
    /// where it is consumed here and forwarded nowhere: on a route that
    /// needs a token and does not pass it on, in a request with no
    /// `Connection` header that could name it. Everywhere else it is put
    /// back in the map first, so what follows sees the request as sent.
    pub async fn serve(
        &self,
        mut req: Request<Body>,
        authorization: Option<Bytes>,
        conn: &Conn,
        timer: Option<Pin<&mut Sleep>>,
    ) -> Response<Body> {
        let started = Instant::now();
        // Kept apart from the request (cheap: shared bytes), so that the
        // normalised path can borrow from it.
        let uri = req.uri().clone();
        let path = match path::normalize(uri.path()) {
            Ok(p) => p,
            Err(e) => return self.refuse(Some(&req), ProxyError::BadPath(e)),
        };
        if path == forward_auth::PATH {
            let table = self.routes.load_full();
            if table.forward_auth {
                return self.forward_auth(&table, &req, authorization.as_deref(), conn, started);
            }
        }
        if is_api(&path) {
            if let Some(value) = authorization {
                if let Err(e) = restore_authorization(req.headers_mut(), &value) {
                    return self.refuse(Some(&req), e);
                }
            }
            // The header's name, not the table: no arc-swap guard is held
            // across the API's database work.
            let id_name = self.routes.load().headers.request_id.clone();
            let request_id = headers::request_id(req.headers(), &id_name);
            let method = req.method().clone();
            let mut response = self.serve_api(req, &path, conn).await;
            let line = Access {
                route: "gateway",
                method: Some(&method),
                path: &path,
                user: None,
                upstream: None,
                forward_auth: false,
            };
            self.access(&request_id, line, response.status(), started.elapsed());
            headers::set_answer_fields(response.headers_mut(), &self.routes.load().headers.response_headers);
            response.headers_mut().insert(id_name, request_id);
            return response;
        }

        let table = self.routes.load_full();
        let request_id = headers::request_id(req.headers(), &table.headers.request_id);
        let method = req.method().clone();
        // Kept only where an answer of the gateway's own may need it.
        let origin = if table.cors.is_off() { None } else { req.headers().get(ORIGIN).cloned() };
        let grpc = error::is_grpc(&method, req.version(), req.headers());
        let mut outcome = Outcome { route: None, user: None, upstream: None, answered: None };
        let result = self.forward(&table, req, authorization, &path, conn, &request_id, &mut outcome, timer).await;
        // A gRPC call's refusal is an HTTP 200; it is counted and logged
        // with the HTTP status it stands for.
        let mut refused_as = None;
        let mut response = result.unwrap_or_else(|e| {
            count_auth_failure(&e);
            let mut response = if grpc {
                refused_as = Some(e.status_and_code().0);
                e.into_grpc_response()
            } else {
                e.into_response()
            };
            table.cors.apply(origin.as_ref(), &table.headers.request_id, &mut response);
            response
        });

        // The route's own fields last: they win over the listener's.
        headers::set_answer_fields(response.headers_mut(), &table.headers.response_headers);
        if let Some(route) = &outcome.route {
            headers::set_answer_fields(response.headers_mut(), &route.config.response_headers);
        }
        let status = refused_as.unwrap_or(response.status());
        let route_name = outcome.route.as_ref().map_or("none", |r| r.config.name.as_str());
        let elapsed = outcome.answered.unwrap_or_else(Instant::now).saturating_duration_since(started);
        match &outcome.route {
            Some(r) => r.count_request(status.as_u16(), status_label(status)),
            None => {
                metrics::counter!("gateway_requests_total", "route" => "none", "status" => status_label(status))
                    .increment(1);
            }
        }
        match &outcome.route {
            Some(r) => r.request_duration.record(elapsed.as_secs_f64()),
            None => {
                metrics::histogram!("gateway_request_duration_seconds", "route" => "none")
                    .record(elapsed.as_secs_f64());
            }
        }
        let upstream = outcome.route.as_ref().zip(outcome.upstream).map(|(r, i)| r.upstream(i));
        let line = Access {
            route: route_name,
            method: Some(&method),
            path: &path,
            user: outcome.user,
            upstream,
            forward_auth: false,
        };
        self.access(&request_id, line, status, elapsed);
        response.headers_mut().insert(table.headers.request_id.clone(), request_id);
        response
    }

    /// Writes the request's access line (target `gateway::access`) when
    /// `log.access` is on. Never a header, a query or a body: the fields
    /// below are all there is, so no token can reach the log this way.
    fn access(&self, request_id: &HeaderValue, line: Access<'_>, status: StatusCode, elapsed: Duration) {
        if self.access_log && tracing::enabled!(target: "gateway::access", tracing::Level::INFO) {
            tracing::info!(
                target: "gateway::access",
                request_id = request_id.to_str().unwrap_or("-"),
                route = line.route,
                method = line.method.map_or("-", Method::as_str),
                path = line.path,
                status = status.as_u16(),
                duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                user_id = line.user.map(|u| u.to_string()),
                upstream = line.upstream.map(ToString::to_string),
                forward_auth = line.forward_auth.then_some(true),
            );
        }
    }

    /// Answers a request refused before any route was chosen (a bad path;
    /// or, from [`crate::http1::server`], a head that could not be parsed or
    /// whose framing is refused, such as both `Content-Length` and
    /// `Transfer-Encoding`): the error, the request id, a count under
    /// `route="none"` and an access line. Its path there is the one sent
    /// (which could not be normalised), without the query.
    pub fn refuse<B>(&self, request: Option<&Request<B>>, error: ProxyError) -> Response<Body> {
        let table = self.routes.load();
        let empty = HeaderMap::new();
        let id = headers::request_id(request.map_or(&empty, Request::headers), &table.headers.request_id);
        // Counted and logged with the HTTP status, also when a gRPC call
        // is told it in `grpc-status`.
        let status = error.status_and_code().0;
        let mut response = match request.is_some_and(|r| error::is_grpc(r.method(), r.version(), r.headers())) {
            true => error.into_grpc_response(),
            false => error.into_response(),
        };
        let origin = request.and_then(|r| r.headers().get(ORIGIN));
        table.cors.apply(origin, &table.headers.request_id, &mut response);
        headers::set_answer_fields(response.headers_mut(), &table.headers.response_headers);
        metrics::counter!("gateway_requests_total", "route" => "none", "status" => status_label(status)).increment(1);
        let line = Access {
            route: "none",
            method: request.map(Request::method),
            path: request.map_or("-", |r| r.uri().path()),
            user: None,
            upstream: None,
            forward_auth: false,
        };
        self.access(&id, line, status, Duration::ZERO);
        response.headers_mut().insert(table.headers.request_id.clone(), id);
        response
    }

    /// Hands `/auth/*` and the JWKS to the API router, on the normalised path.
    async fn serve_api(&self, mut req: Request<Body>, path: &str, conn: &Conn) -> Response<Body> {
        let ip = client_ip(&self.routes.load().trusted_proxies, conn.peer.ip(), req.headers());
        req.extensions_mut().insert(ConnectInfo(SocketAddr::new(ip, conn.peer.port())));
        if req.uri().path() != path {
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            if let Ok(uri) = Uri::builder().path_and_query(pq).build() {
                *req.uri_mut() = uri;
            }
        }
        // Database connections belong to the main runtime's reactor, so the
        // API is run there rather than on this worker's runtime.
        let origin = req.headers().get(ORIGIN).cloned();
        let call = self.api.router().oneshot(req);
        match self.api_runtime.spawn(call).await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(e) => {
                // A panic outside the handlers (whose own become a 500 in
                // the API's layers): the fields those layers would add.
                tracing::error!(error = %e, "API task failed");
                let mut response =
                    crate::body::json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error");
                response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                let table = self.routes.load();
                table.cors.apply(origin.as_ref(), &table.headers.request_id, &mut response);
                response
            }
        }
    }
    #[allow(clippy::too_many_arguments, reason = "one call site, in serve; a struct would only rename them")]
    async fn forward<'t>(
        &self,
        table: &'t RouteTable,
        mut req: Request<Body>,
        authorization: Option<Bytes>,
        path: &str,
        conn: &Conn,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'t>,
        mut timer: Option<Pin<&mut Sleep>>,
    ) -> Result<Response<Body>, ProxyError> {
        // A backend may upper-case `delete` and run a DELETE that no route
        // judged as one (nginx refuses such methods too).
        if req.method().as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(ProxyError::BadRequest("a method with lower-case letters"));
        }
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host());
        // Only an `OPTIONS` that looks like a preflight announces a method.
        let announced = match *req.method() {
            Method::OPTIONS if is_cors_preflight(&req) => {
                req.headers().get(ACCESS_CONTROL_REQUEST_METHOD).and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            }
            _ => None,
        };
        let route = match table.find(host.map(router::normalize_host), path, req.method(), announced.as_ref()) {
            Ok(route) => &**route,
            Err(Miss::NoRoute) => return Err(ProxyError::NoRoute),
            Err(Miss::Method(allow)) => return Err(ProxyError::MethodNotAllowed(allow)),
        };
        outcome.route = Some(route);
        let cfg = &route.config;
        // A route that only judges requests a proxy in front serves
        // (forward auth): the gateway has nowhere to send them.
        if cfg.upstreams.is_empty() {
            return Err(ProxyError::NoRoute);
        }
        let consumed = cfg.auth == AuthMode::Required && !cfg.pass_token;
        let authorization = match authorization {
            Some(value) if !consumed || req.headers().contains_key(CONNECTION) => {
                restore_authorization(req.headers_mut(), &value)?;
                None
            }
            kept => kept,
        };

        // Strip: before anything is added, so nothing added can be removed.
        let upgrade = cfg.websocket && headers::is_websocket_upgrade(req.headers());
        // Over HTTP/2 end to end, the one `TE` there is goes on: a gRPC
        // server refuses a call without `TE: trailers`. An HTTP/1.1 client
        // is not told trailers it could not be given.
        let te_trailers =
            cfg.upstream_http2 && req.version() == Version::HTTP_2 && headers::accepts_trailers(req.headers());
        if cfg.upstream_http2 && req.method() == Method::CONNECT {
            // HTTP/2 would send it as a tunnel to the upstream's authority.
            return Err(ProxyError::BadRequest("CONNECT is not forwarded over HTTP/2"));
        }
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        headers::strip_reserved(req.headers_mut(), &table.headers);
        if te_trailers {
            req.headers_mut().insert(hyper::header::TE, HeaderValue::from_static("trailers"));
        }

        // The address rules come before any token is looked at: a client
        // outside `allow_ips` is refused outright, and a limit by address
        // counts every request the route takes, so a flood of forged tokens
        // costs no verification past the allowance.
        by_address(route, &table.trusted_proxies, conn.peer.ip(), req.headers())?;

        // Authenticate and authorise.
        let identity: Option<Arc<Identity>> = match cfg.auth {
            // Where the route was chosen for the method a preflight
            // announced, what remains after the strip must still be one
            // (its `Origin` or `Access-Control-Request-Method` may have been
            // nominated by `Connection`): never pass on a method the route
            // does not list otherwise, on public routes as on others.
            _ if !route.takes(req.method()) && (upgrade || !is_cors_preflight(&req)) => {
                return Err(ProxyError::BadRequest("an OPTIONS routed as a CORS preflight that is not one"));
            }
            AuthMode::Public => None,
            // A browser sends a preflight without credentials (Fetch
            // standard, CORS-preflight fetch), so a required route would
            // refuse every one: where the route allows it, the backend
            // answers it with its own CORS policy. Only what a preflight
            // is made of goes along: no identity, no credential, nothing
            // a handler that ignores the method could act on.
            AuthMode::Required if cfg.cors_preflight && !upgrade && is_cors_preflight(&req) => {
                headers::keep_preflight_fields(req.headers_mut());
                None
            }
            AuthMode::Required => {
                let id = self.authenticate(req.headers(), authorization.as_deref())?;
                outcome.user = Some(id.principal.user_id);
                policy::authorize(cfg, &id.principal, &self.tenants)?;
                self.limit_by_identity(route, &id)?;
                if !cfg.pass_token && authorization.is_none() {
                    req.headers_mut().remove(AUTHORIZATION);
                }
                Some(id)
            }
        };
        // A preflight goes on with its CORS fields alone: a route's own
        // fields (an upstream credential, say) are for requests it judged.
        let preflight = identity.is_none() && cfg.auth == AuthMode::Required;
        if !preflight {
            headers::set_route_fields(req.headers_mut(), &cfg.request_headers);
        }
        let assertion = match identity.as_deref() {
            Some(id) => self.assertion(cfg, id)?,
            None => None,
        };

        // Inject.
        let client_host = req
            .headers()
            .get(HOST)
            .cloned()
            // An HTTP/2 `:authority` may carry userinfo (`x@host`), which
            // routing ignores: only host and port are passed on.
            .or_else(|| req.uri().authority().and_then(authority_header));
        if req.version() == Version::HTTP_2 {
            headers::join_cookies(req.headers_mut());
        }
        let h = req.headers_mut();
        // The identity fields (and, for an untrusted peer, the
        // `X-Forwarded-*` ones) are written by the upstream client after
        // these: see `headers::identity_fields` and `headers::Forwarded`.
        // The request id, too, is written after them: the client's own
        // value goes here (it was kept in `request_id` if it was usable).
        h.remove(&table.headers.request_id);
        let peer = conn.peer.ip();
        let forwarded = headers::set_forwarded(
            h,
            &conn.peer_header,
            is_trusted(&table.trusted_proxies, peer),
            conn.https,
            client_host.as_ref(),
        );
        // Every client spelling of it went with the reserved names.
        if let Some(prefix) = &route.forwarded_prefix {
            h.insert(headers::X_FORWARDED_PREFIX, prefix.clone());
        }
        // Otherwise the upstream's own Host replaces the client's per
        // attempt, below.
        if let Some(host) = client_host.filter(|_| cfg.preserve_host) {
            // Over HTTP/2 it becomes the `:authority` of the upstream
            // request's URI: it must be one, and nothing more (a `/`, `?`
            // or `#` in it would move the path the policy judged).
            if cfg.upstream_http2 && !is_bare_authority(&host) {
                return Err(ProxyError::BadRequest("the Host is not a host and port"));
            }
            h.insert(HOST, host);
        }

        // The body's own framing says how long it is (`Content-Length`, in
        // however many agreeing fields), before any of it is read.
        if req.body().size_hint().lower() > cfg.max_body {
            return Err(ProxyError::PayloadTooLarge);
        }

        let client_upgrade = if upgrade { req.extensions_mut().remove::<OnUpgrade>() } else { None };
        let (mut parts, body) = req.into_parts();
        let retryable = is_idempotent(&parts.method) && body.is_end_stream() && !upgrade && cfg.upstreams.len() > 1;
        let mut body = Some(body);
        let mut index = route.pick();
        // The route's timeout bounds the whole wait for the answer's head,
        // from the first attempt: a retry does not start a new one.
        let mut deadline = None;
        for attempt in 0..2 {
            outcome.upstream = Some(index);
            let upstream_body = match body.take() {
                // No wrapping (nor its allocation) for a body that is empty.
                Some(b) if b.is_end_stream() => b,
                Some(b) if !retryable => Body::new(Limited::new(
                    b.map_err(ClientBodyError),
                    usize::try_from(cfg.max_body).unwrap_or(usize::MAX),
                )),
                _ => Body::empty(),
            };
            let [base, rest] = route.upstream_path(index, path);
            let target_path = upstream::Target { base, path: rest, query: parts.uri.query() };
            let mut upstream_req = Request::new(upstream_body);
            *upstream_req.method_mut() = parts.method.clone();
            *upstream_req.version_mut() = Version::HTTP_11;
            // Only a retryable first attempt needs to keep a copy for the retry.
            *upstream_req.headers_mut() =
                if retryable && attempt == 0 { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
            let target = route.upstream(index);
            if !cfg.preserve_host || !upstream_req.headers().contains_key(HOST) {
                upstream_req.headers_mut().insert(HOST, target.host.clone());
            }

            let identity = identity.as_deref().map(|id| headers::identity_fields(&table.headers, &id.headers));
            // The request id, at most five identity fields and an
            // assertion, and three forwarding fields, written in place (a
            // chain of iterators cost more per field).
            let mut fields = [(&HOST, &NO_VALUE); 10];
            let mut count = 0;
            let mut put = |field| {
                debug_assert!(count < fields.len(), "more extra fields than slots");
                if let Some(slot) = fields.get_mut(count) {
                    *slot = field;
                    count += 1;
                }
            };
            put((&table.headers.request_id, request_id));
            for field in identity.iter().flatten() {
                put(*field);
            }
            if let Some(value) = &assertion {
                put((&table.headers.jwt_assertion, value));
            }
            for field in forwarded.iter().flat_map(|f| f.fields()) {
                put(field);
            }
            let extra = &fields[..count];
            let sent = Instant::now();
            // Pinned where it is made: the exchange is the larger part of
            // the request's future, and every move of it is a copy.
            let send = std::pin::pin!(self.client.send(target, &target_path, extra, upstream_req, sent));
            let deadline = tokio::time::Instant::from_std(*deadline.get_or_insert(sent + cfg.timeout));
            let result = match timer.as_mut() {
                Some(timer) => {
                    timer.as_mut().reset(deadline);
                    before(timer.as_mut(), send).await
                }
                None => tokio::time::timeout_at(deadline, send).await.map_err(|_| Elapsed),
            };
            let answered = Instant::now();
            outcome.answered = Some(answered);
            route.upstream_duration.record(answered.saturating_duration_since(sent).as_secs_f64());
            match result {
                Err(_) => {
                    upstream_error(&cfg.name, "timeout");
                    return Err(ProxyError::GatewayTimeout);
                }
                Ok(Ok(mut response)) => {
                    for name in &cfg.remove_response_headers {
                        response.headers_mut().remove(name);
                    }
                    response.body_mut().strip_trailers(&route.trailer_strip);
                    response.body_mut().limit_reads(cfg.read_timeout, route.label.clone());
                    return respond(response, client_upgrade, conn.slot.as_ref(), &cfg.name, self.tunnel_idle_timeout);
                }
                Ok(Err(e)) if e.is_connect() => {
                    upstream_error(&cfg.name, "connect");
                    tracing::warn!(route = %cfg.name, upstream = %route.upstream(index), error = %e, "upstream refused");
                    route.cool_down(index, self.cooldown);
                    match route.next_after(index) {
                        Some(next) if retryable && attempt == 0 => index = next,
                        _ => return Err(ProxyError::BadGateway("connect")),
                    }
                }
                Ok(Err(e)) => {
                    if caused_by::<http_body_util::LengthLimitError>(&e) {
                        return Err(ProxyError::PayloadTooLarge);
                    }
                    if caused_by::<ClientBodyError>(&e) {
                        // A bad chunk size, or a client gone mid-upload: the
                        // client's fault, not the upstream's.
                        tracing::debug!(route = %cfg.name, error = %e, "client request body failed");
                        return Err(ProxyError::BadRequest("the request body could not be read"));
                    }
                    upstream_error(&cfg.name, "io");
                    tracing::warn!(route = %cfg.name, upstream = %route.upstream(index), error = %e, "upstream failed");
                    return Err(ProxyError::BadGateway("io"));
                }
            }
        }
        Err(ProxyError::BadGateway("connect"))
    }

    /// The route's signed identity for `id`, where the route sends one:
    /// signed once per token and audience, not per request ([`assertion`]).
    fn assertion(&self, cfg: &crate::config::RouteConfig, id: &Identity) -> Result<Option<HeaderValue>, ProxyError> {
        let Some(audience) = cfg.jwt_assertion.as_deref() else { return Ok(None) };
        id.assertions.get(&id.principal, audience, &self.authenticator, crate::db::unix_now()).map(Some)
    }

    /// Counts a request the route limits by user or tenant (after the
    /// policy: a refused request spends no allowance).
    fn limit_by_identity(&self, route: &Route, id: &Identity) -> Result<(), ProxyError> {
        let Some(limiter) = route.limiter.as_deref() else { return Ok(()) };
        let key = match limiter.key() {
            RateLimitKey::User => ratelimit::Key::User(id.principal.user_id),
            RateLimitKey::Tenant => ratelimit::Key::Tenant(id.principal.tenant_id),
            RateLimitKey::Ip => return Ok(()),
        };
        within_limit(limiter, key)
    }

    /// The token from `apart` (the `Authorization` value kept out of the
    /// map, see [`Proxy::serve`]) or else from the map.
    fn authenticate(&self, headers: &HeaderMap, apart: Option<&[u8]>) -> Result<Arc<Identity>, ProxyError> {
        let token = match apart {
            // The parser keeps one apart only when it is the only one; an
            // `Authorization` in the map as well would be a second.
            Some(_) if headers.contains_key(AUTHORIZATION) => Err(BearerError::Duplicate),
            Some(value) => bearer_value(value),
            None => bearer_token(headers),
        };
        let token = token.map_err(|e| match e {
            BearerError::Missing => ProxyError::MissingToken,
            BearerError::Duplicate => ProxyError::BadRequest("more than one Authorization header"),
            BearerError::Malformed => ProxyError::InvalidToken(TokenError::Malformed),
        })?;
        self.identities.verify(&self.authenticator, token).map_err(ProxyError::InvalidToken)
    }
}

/// The client's address: the peer, or, when the peer is in `trusted`
/// (`server.trusted_proxies`), the right-most `X-Forwarded-For` entry that
/// is not itself trusted. Entries are read from the right, each written by
/// the hop before the one that appended it, and each on its own (bytes a
/// client wrote elsewhere in a merged value cannot spoil the entries on
/// their right). One that is not an address (with or without a port) ends
/// the walk at the last address a trusted hop vouched for: whatever lies
/// left of it, a client may have written (and could vary per request to
/// dodge a limit by address). All trusted: the leftmost.
fn client_ip(trusted: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    resolve_client(trusted, peer, headers).0
}

/// [`client_ip`], and whether the walk reached the client: false when an
/// entry that is not an address stopped it at a trusted hop, whose own
/// address then stands in (good enough to count by, not to admit by).
fn resolve_client(trusted: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> (IpAddr, bool) {
    let mut client = peer.to_canonical();
    if !is_trusted(trusted, client) {
        return (client, true);
    }
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        for hop in value.as_bytes().rsplit(|&b| b == b',') {
            let hop = std::str::from_utf8(hop).map(str::trim).unwrap_or("");
            let parsed = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()));
            let Some(ip) = parsed.map(|ip| ip.to_canonical()) else { return (client, false) };
            if !is_trusted(trusted, ip) {
                return (ip, true);
            }
            client = ip;
        }
    }
    (client, true)
}

/// A route's rules on the client's address, in order: `allow_ips` (403
/// outside them), then a `rate_limit` by address. Nothing to do (and no
/// address resolved) on a route with neither.
fn by_address(route: &Route, trusted: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
    let limiter = route.limiter.as_deref().filter(|l| l.key() == RateLimitKey::Ip);
    if route.config.allow_ips.is_empty() && limiter.is_none() {
        return Ok(());
    }
    let (ip, resolved) = resolve_client(trusted, peer, headers);
    // An address that only stands in for an unknown client admits no one.
    let admitted = resolved && is_trusted(&route.config.allow_ips, ip);
    if !route.config.allow_ips.is_empty() && !admitted {
        return Err(ProxyError::Forbidden);
    }
    match limiter {
        Some(limiter) => within_limit(limiter, ratelimit::Key::ip(ip)),
        None => Ok(()),
    }
}

/// Whether `ip` is in `trusted` (an IPv4-mapped IPv6 address, as a
/// dual-stack listener reports IPv4 peers, as IPv4).
fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// Whether `host` is an authority and nothing else: no userinfo, path,
/// query or fragment.
fn is_bare_authority(host: &HeaderValue) -> bool {
    let bytes = host.as_bytes();
    !bytes.is_empty()
        && !bytes.iter().any(|b| matches!(b, b'@' | b'/' | b'?' | b'#'))
        && hyper::http::uri::Authority::try_from(bytes).is_ok()
}

/// The upstream's answer did not come in time.
struct Elapsed;

/// `future`'s output, unless `timer` fires first. The timer is polled
/// outside tokio's cooperative budget (as `tokio::time::timeout` does): an
/// upstream that keeps the exchange busy (a flood of `100 Continue`) spends
/// the budget, and a budgeted timer would then never see its deadline.
async fn before<F: Future>(timer: Pin<&mut Sleep>, mut future: Pin<&mut F>) -> Result<F::Output, Elapsed> {
    let mut timer = tokio::task::unconstrained(timer);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(&mut timer).poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// Fills the unused slots of the extra header fields.
static NO_VALUE: HeaderValue = HeaderValue::from_static("");

/// Counts one request of `key` against the route's limit; past it, a 429
/// (counted in `gateway_rate_limited_total{route}`).
fn within_limit(limiter: &RateLimiter, key: ratelimit::Key) -> Result<(), ProxyError> {
    limiter.check(key).map_err(ProxyError::RateLimited)
}

/// Counts a failed token check in `gateway_auth_failures_total{reason}`.
fn count_auth_failure(e: &ProxyError) {
    match e {
        ProxyError::InvalidToken(reason) => {
            metrics::counter!("gateway_auth_failures_total", "reason" => reason.reason()).increment(1);
        }
        ProxyError::MissingToken => {
            metrics::counter!("gateway_auth_failures_total", "reason" => "missing").increment(1);
        }
        _ => {}
    }
}

fn upstream_error(route: &str, kind: &'static str) {
    metrics::counter!("gateway_upstream_errors_total", "route" => route.to_owned(), "kind" => kind).increment(1);
}

/// A status code as a `'static` label (no allocation per request).
fn status_label(status: StatusCode) -> metrics::SharedString {
    static LABELS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..600u16).map(|c| &*Box::leak(c.to_string().into_boxed_str())).collect());
    labels.get(usize::from(status.as_u16())).map_or_else(
        || metrics::SharedString::from_owned(status.as_str().to_owned()),
        |s| metrics::SharedString::const_str(s),
    )
}

/// `host[:port]` of an authority, without any userinfo.
fn authority_header(authority: &hyper::http::uri::Authority) -> Option<HeaderValue> {
    let value = match authority.port() {
        Some(port) => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
        None => HeaderValue::from_str(authority.host()),
    };
    value.ok()
}

/// Puts an `Authorization` value kept out of the map back in. Its bytes
/// passed httparse, which accepts what `HeaderValue` does, so this does not
/// fail; if it did, the request would be refused, not let through.
fn restore_authorization(headers: &mut HeaderMap, value: &[u8]) -> Result<(), ProxyError> {
    crate::http1::put_authorization(headers, value).map_err(ProxyError::BadRequest)
}

/// `/auth`, `/auth/...` and the JWKS are the gateway's own.
fn is_api(path: &str) -> bool {
    path == "/.well-known/jwks.json" || path == "/auth" || path.starts_with("/auth/")
}

/// A CORS preflight as a browser sends it: `OPTIONS`, `Origin` and
/// `Access-Control-Request-Method`, and no body (known before any of it is
/// read: an empty chunked body does not count). Anything else is judged like
/// any other request.
fn is_cors_preflight(req: &Request<Body>) -> bool {
    let h = req.headers();
    req.method() == Method::OPTIONS
        && h.contains_key(ORIGIN)
        && h.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        && req.body().is_end_stream()
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// Marks a failure to read the client's request body (malformed chunked
/// framing, a client gone mid-upload), so that it is told apart from an
/// upstream failure when the upstream request fails.
#[derive(Debug, thiserror::Error)]
#[error("reading the client's request body: {0}")]
struct ClientBodyError(#[source] axum::Error);

/// Whether `E` is somewhere in the cause chain of an upstream failure.
fn caused_by<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<E>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Phase 8: the upstream's answer, made fit for the client; an error where
/// the upstream switched protocols but no tunnel can be built, so that the
/// 502 is made (with its CORS fields) where every other one is.
fn respond(
    mut response: Response<UpstreamBody>,
    client_upgrade: Option<OnUpgrade>,
    slot: Option<&Arc<Slot>>,
    route: &str,
    tunnel_idle_timeout: Duration,
) -> Result<Response<Body>, ProxyError> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 goes on only as a WebSocket accept to a client that asked
        // for one, and only with the upstream's connection free to splice
        // (not while the request body is still being sent): else the client
        // must not be told it switched.
        let accepted = client_upgrade.filter(|_| headers::is_websocket_accept(response.headers()));
        let (parts, body) = response.into_parts();
        let (Some(client), Some(upstream)) = (accepted, body.into_upgraded()) else {
            upstream_error(route, "upgrade");
            return Err(ProxyError::BadGateway("upgrade"));
        };
        let route = route.to_owned();
        let slot = slot.cloned();
        tokio::spawn(async move {
            // The tunnel keeps the connection's slot until it closes:
            // it counts against server.max_connections, and a graceful
            // shutdown waits for it.
            let _slot = slot;
            match client.connection().await {
                Ok(client) => {
                    metrics::counter!("gateway_websocket_tunnels_total", "route" => route.clone()).increment(1);
                    let _open = Open::new(metrics::gauge!("gateway_websocket_tunnels_open", "route" => route));
                    tunnel::splice(client, upstream, tunnel_idle_timeout).await;
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    headers::strip_hop_by_hop(response.headers_mut(), false);
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_header_drops_userinfo() {
        let header = |a: &str| authority_header(&a.parse().expect("authority"));
        assert_eq!(header("x@victim.example"), Some(HeaderValue::from_static("victim.example")));
        assert_eq!(header("user:pw@api.example:8443"), Some(HeaderValue::from_static("api.example:8443")));
        assert_eq!(header("api.example"), Some(HeaderValue::from_static("api.example")));
    }
}
