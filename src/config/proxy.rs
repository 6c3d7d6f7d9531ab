//! The proxy's part of the configuration: routes and header names, which
//! are re-read on SIGHUP or when the file changes, and the upstream
//! client's settings (`[upstream]`), which need a restart (the TLS files
//! they name are read again on reload: [`crate::proxy::upstream::tls`]).

use std::path::Path;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Uri};

use super::reader::{Errors, Fields};
use crate::auth::service::{is_slug, validate_name};

/// Routes and header settings, swapped atomically on reload.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub routes: Vec<RouteConfig>,
    pub headers: HeaderNames,
    /// `forward_auth.enabled`: whether `/auth/forward-auth` judges requests
    /// for a proxy in front ([`crate::proxy::forward_auth`]).
    pub forward_auth: bool,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-*` are extended
    /// and believed (for the client's address, and by forward auth).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid, unrevoked access token is required.
    Required,
    /// No token needed; identity headers are still stripped, never injected.
    Public,
}

/// A route's `rate_limit`: `requests` per `per` for each `by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: std::num::NonZeroU32,
    pub per: Duration,
    pub by: RateLimitKey,
}

/// What a route's rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitKey {
    /// The token's subject (required routes; the default there).
    User,
    /// The token's tenant: one allowance shared by its users.
    Tenant,
    /// The client's address (IPv6 per /64), as `server.trusted_proxies`
    /// resolve it; the default on public routes.
    Ip,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Normalised, no trailing '/' (except the root route "/").
    pub prefix: String,
    /// Lower-case, without port or trailing dot.
    pub host: Option<String>,
    /// The methods this route serves (empty: all). Routes may share a host
    /// and prefix when their methods do not overlap.
    pub methods: Vec<Method>,
    /// Empty only with `forward_auth.enabled`: a route that only judges
    /// requests a proxy in front serves (the gateway itself answers 404).
    pub upstreams: Vec<UpstreamTarget>,
    pub auth: AuthMode,
    /// The token must hold at least one of these (empty: no requirement).
    pub roles: Vec<String>,
    /// The token must hold all of these.
    pub scopes: Vec<String>,
    /// Tenant slugs allowed (empty: any).
    pub tenants: Vec<String>,
    pub strip_prefix: bool,
    /// Deadline for the upstream's response head.
    pub timeout: Duration,
    /// The longest the upstream may send nothing while the client waits
    /// for more of its answer's body.
    pub read_timeout: Duration,
    pub preserve_host: bool,
    /// Request body limit in bytes (413 past it).
    pub max_body: u64,
    /// Whether `Upgrade: websocket` requests are forwarded.
    pub websocket: bool,
    /// `upstream_protocol = "http2"`: the upstreams are spoken to over
    /// HTTP/2 (each [`UpstreamTarget::http2`] says so too).
    pub upstream_http2: bool,
    /// Whether the client's `Authorization` header is forwarded on required
    /// routes (default: removed, so backends never see bearer tokens).
    pub pass_token: bool,
    /// Whether a CORS preflight (a bodiless `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) is forwarded without a token on a
    /// required route, for the backend to answer with its CORS policy.
    pub cors_preflight: bool,
    /// Set on every request forwarded (a preflight excepted), replacing
    /// what the client sent under those names.
    pub request_headers: Vec<(HeaderName, HeaderValue)>,
    /// Set on every answer to a request this route took, the gateway's own
    /// (401, 403, 502, ...) included.
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Removed from the upstream's answers (not from the gateway's own).
    pub remove_response_headers: Vec<HeaderName>,
    pub rate_limit: Option<RateLimit>,
    /// Only tokens of a login that passed a second factor (`amr` has
    /// `otp`); others get 401 `insufficient_user_authentication`.
    pub mfa: bool,
    /// `jwt_assertion`: the audience of the signed identity sent with each
    /// request (`jwt_assertion_audience`, default the route's name); None
    /// when the route sends none.
    pub jwt_assertion: Option<String>,
    /// `health_check`: probe each upstream and send no requests to those
    /// that fail (see [`crate::proxy::health`]).
    pub health_check: Option<HealthCheck>,
    /// `allow_ips`: the client's address (as `server.trusted_proxies`
    /// resolve it) must be in one of these, else 403 before any token is
    /// read; empty: any address.
    pub allow_ips: Vec<ipnet::IpNet>,
}

/// A route's `health_check = { path = "/healthz", interval = "10s", ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path and query sent to each upstream, as written (not under the
    /// upstream's base path).
    pub path: String,
    pub interval: Duration,
    /// Deadline for the whole probe (connect, answer head and body).
    pub timeout: Duration,
    /// Consecutive failed probes that take an upstream out.
    pub unhealthy_after: u32,
    /// Consecutive passed probes that bring it back.
    pub healthy_after: u32,
}

/// One upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub scheme: Scheme,
    pub authority: Authority,
    /// A path prefix on the upstream ("" or "/base", no trailing '/').
    pub base_path: String,
    /// The `Host` header sent upstream (unless the route preserves the
    /// client's): the authority, without the scheme's default port.
    pub host: HeaderValue,
    /// Spoken to over HTTP/2 (the route's `upstream_protocol = "http2"`):
    /// h2c with prior knowledge for `http://`, ALPN `h2` for `https://`.
    pub http2: bool,
}

impl std::fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// The names of the headers the gateway injects and of those it strips, and
/// the fields it sets on every answer (`[headers]`).
#[derive(Debug, Clone)]
pub struct HeaderNames {
    pub user_id: HeaderName,
    pub tenant_id: HeaderName,
    pub roles: HeaderName,
    pub scopes: HeaderName,
    pub session_id: HeaderName,
    pub request_id: HeaderName,
    /// The signed identity a route with `jwt_assertion` sends.
    pub jwt_assertion: HeaderName,
    /// Every reserved name, lower-case with `_` and `.` mapped to `-`.
    pub reserved: Vec<String>,
    /// `headers.response_headers`: set on every answer of the public
    /// listener (a route's own `response_headers` win over these).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
}

/// Headers stripped from every request whatever `[headers]` says: the
/// identity headers, and those upstream frameworks read as the client's
/// address, the request's "real" path (`Forwarded`, `X-Real-IP`,
/// `X-Original-URL`, …) or its "real" method (Rack, ASP.NET, Express and
/// Symfony honour `X-HTTP-Method-Override` on a POST), which only the
/// gateway may state: a route's `methods` judged the method it saw.
pub const DEFAULT_RESERVED: [&str; 16] = [
    "x-user-id",
    "x-tenant-id",
    "x-user-roles",
    "x-user-scopes",
    "x-session-id",
    "x-jwt-assertion",
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Lower-cases and maps `_` and `.` to `-`, the way some servers and CGI
/// gateways fold header names, so `X_User_Id` cannot slip through.
pub fn fold_header_name(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'_' | b'.' => '-',
            b => b.to_ascii_lowercase() as char,
        })
        .collect()
}

pub(super) fn build_headers(table: toml::Table, errors: &mut Errors) -> HeaderNames {
    let mut f = Fields::new("headers", table, errors);
    let name = |f: &mut Fields<'_>, key: &str, default: &'static str| {
        let text = f.string_or(key, default);
        HeaderName::from_bytes(text.as_bytes()).unwrap_or_else(|_| {
            f.error(key, format!("{text:?} is not a valid header name"));
            HeaderName::from_static(default)
        })
    };
    let user_id = name(&mut f, "user_id", "x-user-id");
    let tenant_id = name(&mut f, "tenant_id", "x-tenant-id");
    let roles = name(&mut f, "roles", "x-user-roles");
    let scopes = name(&mut f, "scopes", "x-user-scopes");
    let session_id = name(&mut f, "session_id", "x-session-id");
    let request_id = name(&mut f, "request_id", "x-request-id");
    let jwt_assertion = name(&mut f, "jwt_assertion", "x-jwt-assertion");
    // The identity fields are written after the request's own, and the
    // request id into it: a name shared with another of them, or with a
    // header the gateway sets or reads itself, would let a client's value
    // ride along with (or replace) the gateway's.
    const GATEWAY_OWNED: [&str; 9] = [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "content-length",
        "transfer-encoding",
        "connection",
        "authorization",
        "expect",
    ];
    let named = [
        ("user_id", &user_id),
        ("tenant_id", &tenant_id),
        ("roles", &roles),
        ("scopes", &scopes),
        ("session_id", &session_id),
        ("request_id", &request_id),
        ("jwt_assertion", &jwt_assertion),
    ];
    for (i, (key, n)) in named.iter().enumerate() {
        let folded = fold_header_name(n.as_str());
        if GATEWAY_OWNED.contains(&folded.as_str()) {
            f.error(key, format!("{n:?} is a header the gateway sets or reads itself"));
        } else if let Some((other, _)) = named[..i].iter().find(|(_, m)| fold_header_name(m.as_str()) == folded) {
            f.error(key, format!("{n:?} is already the name of headers.{other}"));
        }
    }
    let extra = f.string_list("reserved");
    for e in &extra {
        if HeaderName::from_bytes(e.as_bytes()).is_err() {
            f.error("reserved", format!("{e:?} is not a valid header name"));
        } else if GATEWAY_OWNED.contains(&fold_header_name(e).as_str())
            && !fold_header_name(e).starts_with("x-forwarded-")
        {
            // Stripping these would take the token, the host or the framing
            // from every request before the gateway reads them.
            f.error("reserved", format!("{e:?} is a header the gateway reads itself"));
        }
    }
    let folded_id = fold_header_name(request_id.as_str());
    let response_headers = header_table(&mut f, "response_headers", |folded| {
        refused_answer_field(folded, &folded_id, true).or_else(|| {
            describes_one_answer(folded).then_some("describes one answer and cannot be set on every answer")
        })
    });
    f.finish();
    let mut reserved: Vec<String> = DEFAULT_RESERVED.iter().map(|s| (*s).to_owned()).collect();
    for n in [&user_id, &tenant_id, &roles, &scopes, &session_id, &jwt_assertion] {
        reserved.push(fold_header_name(n.as_str()));
    }
    reserved.extend(extra.iter().map(|e| fold_header_name(e)));
    reserved.sort();
    reserved.dedup();
    // The request id keeps a client's value when it looks safe, and is set
    // after the strip: under a reserved or hop-by-hop name it would carry
    // the client's value past both.
    if reserved.contains(&folded_id) || HOP_BY_HOP.contains(&folded_id.as_str()) {
        errors.push("headers.request_id", format!("{request_id:?} is a reserved or hop-by-hop header"));
    }
    HeaderNames { user_id, tenant_id, roles, scopes, session_id, request_id, jwt_assertion, reserved, response_headers }
}

/// `[forward_auth]`. It answers only peers in `server.trusted_proxies`
/// (`trusted`): with none listed, it could answer no one.
pub(super) fn build_forward_auth(table: toml::Table, trusted: &[ipnet::IpNet], errors: &mut Errors) -> bool {
    let mut f = Fields::new("forward_auth", table, errors);
    let enabled = f.bool_or("enabled", false);
    if enabled && trusted.is_empty() {
        f.error("enabled", "answers only peers in server.trusted_proxies, which is empty: list the proxy that asks");
    }
    f.finish();
    enabled
}

/// `forward_auth`: whether routes may leave out `upstreams`;
/// `token_audience`: `auth.audience`, which no `jwt_assertion_audience`
/// may be.
pub(super) fn build_routes(
    tables: Vec<toml::Table>,
    names: &HeaderNames,
    forward_auth: bool,
    token_audience: &str,
    errors: &mut Errors,
) -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(tables.len());
    let mut lone_gets = Vec::new();
    for (i, table) in tables.into_iter().enumerate() {
        let mut f = Fields::new(&format!("routes[{i}]"), table, errors);
        if let Some(route) = build_route(&mut f, names, forward_auth, token_audience) {
            if routes.iter().any(|r| r.name == route.name) {
                f.error("name", format!("{:?} is used by another route", route.name));
            } else if let Some(other) = routes.iter().find(|r| {
                r.prefix == route.prefix && r.host == route.host && methods_overlap(&r.methods, &route.methods)
            }) {
                if route.methods.is_empty() {
                    f.error("prefix", format!("{:?} is already routed for this host", route.prefix));
                } else {
                    let shared: Vec<&str> =
                        route.methods.iter().filter(|m| other.methods.contains(m)).map(Method::as_str).collect();
                    f.error(
                        "methods",
                        format!(
                            "{} at {:?} is already routed for this host by route {:?}",
                            shared.join(", "),
                            route.prefix,
                            other.name
                        ),
                    );
                }
            } else {
                if route.methods.contains(&Method::GET) && !route.methods.contains(&Method::HEAD) {
                    lone_gets.push((i, routes.len()));
                }
                routes.push(route);
            }
        }
        f.finish();
    }
    // A HEAD runs the GET handler in most frameworks (headers, side
    // effects): one left to a route without `methods` would be judged by
    // that route's policy instead of the GET route's.
    for (i, at) in lone_gets {
        let get = &routes[at];
        let rest = routes.iter().find(|r| r.host == get.host && r.prefix == get.prefix && r.methods.is_empty());
        if let Some(rest) = rest {
            errors.push(
                &format!("routes[{i}].methods"),
                format!(
                    "lists GET but not HEAD, so a HEAD would go to route {:?} and its policy; list HEAD too",
                    rest.name
                ),
            );
        }
    }
    routes
}

/// Whether two routes at the same host and prefix would both take some
/// method. A route without `methods` takes what the others there do not
/// list, so it overlaps only another such route.
fn methods_overlap(a: &[Method], b: &[Method]) -> bool {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => true,
        (false, false) => a.iter().any(|m| b.contains(m)),
        _ => false,
    }
}

/// `methods`: absent means every method; a listed one must be written as
/// sent (methods are case-sensitive, so `get` would never match a `GET`).
fn build_methods(f: &mut Fields<'_>) -> Vec<Method> {
    const STANDARD: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    let present = f.has("methods");
    let texts = f.string_list("methods");
    if present && texts.is_empty() {
        f.error("methods", "lists no method (leave it out for every method)");
    }
    let mut methods = Vec::with_capacity(texts.len());
    for text in &texts {
        if let Some(s) = STANDARD.iter().find(|s| s.eq_ignore_ascii_case(text) && *s != text) {
            f.error("methods", format!("{text:?}: methods are case-sensitive (did you mean {s:?}?)"));
        } else if text.bytes().any(|b| b.is_ascii_lowercase()) {
            f.error("methods", format!("{text:?}: requests whose method has lower-case letters are refused"));
        } else if text == "CONNECT" {
            f.error("methods", "CONNECT is never proxied");
        } else {
            match Method::from_bytes(text.as_bytes()) {
                Ok(m) if methods.contains(&m) => f.error("methods", format!("{text:?} is listed twice")),
                Ok(m) => methods.push(m),
                Err(_) => f.error("methods", format!("{text:?} is not an HTTP method")),
            }
        }
    }
    methods
}

/// `none`: requests refused before routing, or matching no route (metrics
/// and the access log); `gateway`: the gateway's own API (`/auth/*`, the
/// JWKS; the access log, as its metrics have names of their own).
pub const RESERVED_ROUTE_NAMES: [&str; 2] = ["none", "gateway"];

/// Hop-by-hop fields (folded), which the gateway strips and sets per hop.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Whether a route may not set or remove `folded`: the gateway frames the
/// message with it (hop-by-hop fields, the length, `Expect`).
fn frames(folded: &str) -> bool {
    HOP_BY_HOP.contains(&folded) || folded == "content-length" || folded == "expect"
}

/// Whether a field (folded) describes one particular answer, so that
/// `headers.response_headers` may not set it on all of them: it would
/// replace the API's `no-store` on tokens, an upstream's `private`, a
/// redirect's target, a 405's `Allow`, a 429's wait, a body's digest, or
/// the CORS fields the gateway and upstreams decide per request.
fn describes_one_answer(folded: &str) -> bool {
    const ONE_ANSWER: [&str; 16] = [
        "cache-control",
        "pragma",
        "expires",
        "age",
        "etag",
        "last-modified",
        "location",
        "content-location",
        "content-range",
        "content-disposition",
        "content-digest",
        "repr-digest",
        "digest",
        "content-md5",
        "allow",
        "retry-after",
    ];
    folded.starts_with("access-control-") || ONE_ANSWER.contains(&folded)
}

/// Fields (folded) that neither kind of `response_headers` may set: they
/// would replace the upstream's values (every cookie, a `Vary` a cache
/// needs) or the gateway's own (a 401's challenge, the type of its JSON
/// errors).
const SENT_BY_OTHERS: [&str; 6] =
    ["vary", "set-cookie", "date", "www-authenticate", "content-type", "content-encoding"];

/// Why an answer field may not be named (folded) by a route's
/// `response_headers` (`set`) or `remove_response_headers`, or by
/// `headers.response_headers`; `request_id` is the folded request id name.
fn refused_answer_field(folded: &str, request_id: &str, set: bool) -> Option<&'static str> {
    if folded.starts_with("sec-websocket-") {
        Some("belongs to a WebSocket handshake, which only its client and upstream may write")
    } else if frames(folded) {
        Some("frames the answer: the gateway handles it")
    } else if folded == request_id {
        Some("is the request id header")
    } else if matches!(folded, "grpc-status" | "grpc-message" | "grpc-status-details-bin") {
        Some("is how a gRPC call ends (its status): the upstream or the gateway sends it")
    } else if set && SENT_BY_OTHERS.contains(&folded) {
        Some("would replace values the upstream or the gateway must send")
    } else {
        None
    }
}

/// `request_headers` or `response_headers`: a table of name = value.
fn header_table(
    f: &mut Fields<'_>,
    key: &str,
    refused: impl Fn(&str) -> Option<&'static str>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    for (name, value) in f.table(key) {
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            f.error(key, format!("{name:?} is not a valid header name"));
            continue;
        };
        let folded = fold_header_name(&name);
        if let Some(why) = refused(&folded) {
            f.error(key, format!("{name:?} {why}"));
            continue;
        }
        match value.as_str().map(HeaderValue::from_str) {
            Some(Ok(v))
                if !out.iter().any(|(n, _): &(HeaderName, HeaderValue)| fold_header_name(n.as_str()) == folded) =>
            {
                out.push((header, v));
            }
            Some(Ok(_)) => f.error(key, format!("{name:?} is set twice (names compare with _ and . as -)")),
            Some(Err(_)) => f.error(key, format!("{name:?}: the value cannot be a header value (control characters)")),
            None => f.error(key, format!("{name:?}: expected a string, found {}", value.type_str())),
        }
    }
    out
}

fn build_route(
    f: &mut Fields<'_>,
    names: &HeaderNames,
    forward_auth: bool,
    token_audience: &str,
) -> Option<RouteConfig> {
    let name = f.string("name");
    match &name {
        None => f.error("name", "is required"),
        Some(n)
            if n.is_empty() || n.len() > 64 || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            f.error("name", format!("{n:?} must be 1-64 of A-Z a-z 0-9 - _ ."));
        }
        // Labels of what no route serves: "none" in metrics and the access
        // log, "gateway" (the gateway's own API) in the access log.
        Some(n) if RESERVED_ROUTE_NAMES.contains(&n.as_str()) => {
            f.error("name", format!("{n:?} is reserved (requests no route serves are labelled so)"));
        }
        Some(_) => {}
    }
    let prefix = f.string("prefix");
    let prefix = match prefix {
        None => {
            f.error("prefix", "is required");
            None
        }
        Some(p) => match crate::proxy::path::normalize(&p) {
            Ok(norm) => {
                let norm = if norm.len() > 1 { norm.trim_end_matches('/').to_owned() } else { norm.into_owned() };
                let plain = if p.len() > 1 { p.trim_end_matches('/') } else { &p };
                if norm != plain {
                    f.error("prefix", format!("{p:?} is not a normalised path (did you mean {norm:?}?)"));
                }
                Some(norm)
            }
            Err(e) => {
                f.error("prefix", format!("{p:?}: {e}"));
                None
            }
        },
    };
    let host = f.string("host").and_then(|h| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        if h.is_empty() || h.contains([':', '/', ' ']) || h.parse::<Authority>().is_err() {
            f.error("host", format!("{h:?} is not a host name (no port, no scheme)"));
            None
        } else {
            Some(h)
        }
    });
    let methods = build_methods(f);
    let upstream_texts = f.string_list("upstreams");
    if upstream_texts.is_empty() && !forward_auth {
        f.error(
            "upstreams",
            "needs at least one URL (a route without upstreams only judges requests for forward_auth, which is off)",
        );
    }
    let mut upstreams = Vec::new();
    for text in &upstream_texts {
        match parse_upstream(text) {
            Ok(u) => upstreams.push(u),
            Err(e) => f.error("upstreams", format!("{text:?}: {e}")),
        }
    }
    let auth = match f.string_or("auth", "required").as_str() {
        "required" => AuthMode::Required,
        "public" => AuthMode::Public,
        other => {
            f.error("auth", format!("{other:?} is not \"required\" or \"public\""));
            AuthMode::Required
        }
    };
    let roles = f.string_list("roles");
    let scopes = f.string_list("scopes");
    let tenants = f.string_list("tenants");
    for (key, list) in [("roles", &roles), ("scopes", &scopes)] {
        for item in list {
            if let Err(e) = validate_name(item) {
                f.error(key, e);
            }
        }
    }
    // A slug no tenant can have would make the route refuse everyone.
    for slug in tenants.iter().filter(|t| !is_slug(t)) {
        f.error("tenants", format!("{slug:?} is not a tenant slug (1-64 of a-z 0-9 -)"));
    }
    if auth == AuthMode::Public && !(roles.is_empty() && scopes.is_empty() && tenants.is_empty()) {
        f.error("auth", "a public route cannot require roles, scopes or tenants");
    }
    let jwt_assertion = jwt_assertion(f, auth, name.as_deref(), token_audience);
    let mfa = f.bool_or("mfa", false);
    if mfa && auth == AuthMode::Public {
        f.error("mfa", "a public route reads no token to find a second factor in");
    }
    let strip_prefix = f.bool_or("strip_prefix", false);
    let timeout = f.duration_or("timeout", "30s", Duration::from_millis(1));
    let read_timeout = f.duration_or("read_timeout", "60s", Duration::from_millis(1));
    let preserve_host = f.bool_or("preserve_host", false);
    let max_body = f.size_or("max_body", 10 << 20);
    let http2 = match f.string_or("upstream_protocol", "http1").as_str() {
        "http1" => false,
        "http2" => true,
        other => {
            f.error("upstream_protocol", format!("{other:?} is not \"http1\" or \"http2\""));
            false
        }
    };
    for upstream in &mut upstreams {
        upstream.http2 = http2;
    }
    // A WebSocket handshake is an HTTP/1.1 upgrade; over HTTP/2 it would
    // take an extended CONNECT (RFC 8441), which the gateway does not send.
    let websocket = f.bool_or("websocket", !http2);
    if websocket && http2 {
        f.error("websocket", "cannot be forwarded to an upstream spoken to over HTTP/2 (upstream_protocol)");
    }
    let pass_token = f.bool_or("pass_token", false);
    let cors_preflight = f.bool_or("cors_preflight", false);
    if cors_preflight && auth == AuthMode::Public {
        f.error("cors_preflight", "only for required routes: a public route forwards preflights anyway");
    }
    let request_id = fold_header_name(names.request_id.as_str());
    let request_headers = header_table(f, "request_headers", |folded| {
        if folded.starts_with("sec-websocket-") {
            Some("belongs to a WebSocket handshake, which only its client and upstream may write")
        } else if frames(folded) || folded == "host" {
            Some("frames the request: the gateway sets it")
        } else if names.reserved.iter().any(|r| r == folded) || folded.starts_with("x-forwarded-") {
            Some("is reserved: only the gateway states it, from the token or the connection")
        } else if folded == request_id {
            Some("is the request id header")
        } else if folded == "authorization" && pass_token {
            Some("would replace the token pass_token forwards")
        } else {
            None
        }
    });
    let response_headers =
        header_table(f, "response_headers", |folded| refused_answer_field(folded, &request_id, true));
    let mut remove_response_headers = Vec::new();
    for name in f.string_list("remove_response_headers") {
        match HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => f.error("remove_response_headers", format!("{name:?} is not a valid header name")),
            Ok(h) => match refused_answer_field(&fold_header_name(&name), &request_id, false) {
                Some(why) => f.error("remove_response_headers", format!("{name:?} {why}")),
                None => remove_response_headers.push(h),
            },
        }
    }
    let rate_limit = rate_limit(f, auth);
    let health_check = health_check(f, upstream_texts.is_empty());
    let mut allow_ips = Vec::new();
    if f.has("allow_ips") {
        let texts = f.string_list("allow_ips");
        if texts.is_empty() {
            f.error("allow_ips", "is empty, which would admit no one; leave it out to admit every address");
        }
        for text in texts {
            match parse_range(&text) {
                Ok(net) => allow_ips.push(net),
                Err(e) => f.error("allow_ips", e),
            }
        }
    }
    Some(RouteConfig {
        name: name?,
        prefix: prefix?,
        host,
        methods,
        upstreams,
        auth,
        roles,
        scopes,
        tenants,
        strip_prefix,
        timeout,
        read_timeout,
        preserve_host,
        max_body,
        websocket,
        upstream_http2: http2,
        pass_token,
        cors_preflight,
        request_headers,
        response_headers,
        remove_response_headers,
        rate_limit,
        jwt_assertion,
        mfa,
        health_check,
        allow_ips,
    })
}

/// An address range (`10.0.0.0/8`, `2001:db8::/32`), or one address (as
/// its /32 or /128). IPv4-mapped IPv6 ranges are refused: addresses are
/// compared in their IPv4 form, so such a range would never match.
pub fn parse_range(text: &str) -> Result<ipnet::IpNet, String> {
    let net =
        text.parse::<ipnet::IpNet>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from));
    match net {
        Some(ipnet::IpNet::V6(v6)) if v6.addr().to_ipv4_mapped().is_some() => {
            Err(format!("{text:?} is IPv4-mapped: write the IPv4 address or range"))
        }
        Some(net) => Ok(net),
        None => Err(format!("{text:?} is not an address or a CIDR like \"10.0.0.0/8\"")),
    }
}

/// `health_check = { path = "/healthz", interval = "10s", timeout = "2s",
/// unhealthy_after = 2, healthy_after = 2 }`.
fn health_check(f: &mut Fields<'_>, judge_only: bool) -> Option<HealthCheck> {
    let mut t = f.sub("health_check")?;
    let path = t.string("path");
    let path = match path {
        None => {
            t.error("path", "is required: the path each upstream is asked for, e.g. \"/healthz\"");
            None
        }
        Some(p)
            if !p.starts_with('/')
                || !p.bytes().all(|b| b.is_ascii_graphic() && !b"#\"<>\\^`{|}".contains(&b))
                || p.parse::<PathAndQuery>().is_err() =>
        {
            t.error("path", format!("{p:?} is not a path (and query) starting with \"/\", in URL characters"));
            None
        }
        Some(p) => Some(p),
    };
    // A probe that outlasts the interval delays the next one: one at a time.
    let interval = t.duration_or("interval", "10s", Duration::from_millis(100));
    let timeout = t.duration_or("timeout", "2s", Duration::from_millis(1));
    let unhealthy_after = t.int_or("unhealthy_after", 2, 1, 100) as u32;
    let healthy_after = t.int_or("healthy_after", 2, 1, 100) as u32;
    t.finish();
    if judge_only {
        f.error("health_check", "a route without upstreams has nothing to probe");
    }
    Some(HealthCheck { path: path?, interval, timeout, unhealthy_after, healthy_after })
}

/// `jwt_assertion` and `jwt_assertion_audience`: the audience, when the
/// route sends a signed identity.
fn jwt_assertion(f: &mut Fields<'_>, auth: AuthMode, name: Option<&str>, token_audience: &str) -> Option<String> {
    let on = f.bool_or("jwt_assertion", false);
    let audience = f.string("jwt_assertion_audience");
    if !on {
        if audience.is_some() {
            f.error("jwt_assertion_audience", "needs jwt_assertion = true");
        }
        return None;
    }
    if auth == AuthMode::Public {
        f.error("jwt_assertion", "a public route has no identity to assert");
        return None;
    }
    let audience = audience.or_else(|| name.map(str::to_owned))?;
    if audience.is_empty() {
        f.error("jwt_assertion_audience", "is empty");
    } else if audience == token_audience {
        // The gateway would then take an assertion for an access token.
        f.error("jwt_assertion_audience", format!("{audience:?} is auth.audience, the access tokens' own"));
    }
    Some(audience)
}

/// `rate_limit = { requests = 100, per = "1m", by = "user" }`.
fn rate_limit(f: &mut Fields<'_>, auth: AuthMode) -> Option<RateLimit> {
    let mut t = f.sub("rate_limit")?;
    let requests = if t.has("requests") {
        std::num::NonZeroU32::new(t.int_or("requests", 1, 1, 1_000_000_000) as u32)
    } else {
        t.error("requests", "is required: how many requests each key may make per `per`");
        None
    };
    let per = t.duration_or("per", "1m", Duration::from_millis(1));
    let default = if auth == AuthMode::Public { "ip" } else { "user" };
    let by = match t.string_or("by", default).as_str() {
        "ip" => Some(RateLimitKey::Ip),
        "user" | "tenant" if auth == AuthMode::Public => {
            t.error("by", "a public route knows no user or tenant: use \"ip\"");
            None
        }
        "user" => Some(RateLimitKey::User),
        "tenant" => Some(RateLimitKey::Tenant),
        other => {
            t.error("by", format!("{other:?} is not \"user\", \"tenant\" or \"ip\""));
            None
        }
    };
    t.finish();
    Some(RateLimit { requests: requests?, per, by: by? })
}

fn parse_upstream(text: &str) -> Result<UpstreamTarget, String> {
    let uri: Uri = text.parse().map_err(|e| format!("not a URL ({e})"))?;
    let scheme = uri.scheme().cloned().ok_or("needs http:// or https://")?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err("the scheme must be http or https".into());
    }
    let authority = uri.authority().cloned().ok_or("needs a host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in upstream URLs are not supported".into());
    }
    if uri.query().is_some() {
        return Err("an upstream URL cannot have a query".into());
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => authority.as_str(),
        _ => authority.host(),
    };
    let host = HeaderValue::from_str(host).map_err(|_| "the host cannot be a Host header")?;
    Ok(UpstreamTarget { scheme, authority, base_path, host, http2: false })
}

/// Settings of the upstream HTTP client.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Must be shorter than the upstreams' own keep-alive timeout.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// How long an upstream that refused a connection is skipped.
    pub cooldown: Duration,
    /// Extra CA certificates (PEM) trusted for https upstreams.
    pub ca_file: Option<std::path::PathBuf>,
    /// Also trust the platform's store (`/etc/ssl/certs`, or what
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR` name), besides the webpki roots.
    pub platform_roots: bool,
    /// The gateway's own certificate chain and key (PEM), presented to
    /// https upstreams that ask for one (mutual TLS); both or neither.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

pub(super) fn build_upstream(table: toml::Table, base: &Path, errors: &mut Errors) -> UpstreamSettings {
    let mut f = Fields::new("upstream", table, errors);
    let cert = f.string("client_cert").map(|p| super::resolve(base, &p));
    let key = f.string("client_key").map(|p| super::resolve(base, &p));
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(_), None) => {
            f.error("client_key", "is needed with upstream.client_cert");
            None
        }
        (None, Some(_)) => {
            f.error("client_cert", "is needed with upstream.client_key");
            None
        }
        (None, None) => None,
    };
    let s = UpstreamSettings {
        connect_timeout: f.duration_or("connect_timeout", "5s", Duration::from_millis(1)),
        pool_idle_timeout: f.duration_or("pool_idle_timeout", "30s", Duration::from_millis(1)),
        pool_max_idle_per_host: f.int_or("pool_max_idle_per_host", 64, 0, 100_000) as usize,
        cooldown: f.duration_or("cooldown", "5s", Duration::ZERO),
        ca_file: f.string("ca_file").map(|p| super::resolve(base, &p)),
        platform_roots: f.bool_or("platform_roots", true),
        client_cert,
    };
    f.finish();
    s
}
