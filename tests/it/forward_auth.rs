//! Forward auth (`/auth/forward-auth`): a proxy in front (nginx
//! `auth_request`, Traefik `ForwardAuth`, Caddy `forward_auth`) asks about a
//! request it holds, described by `X-Forwarded-Method`, `-Host` and `-Uri`;
//! the gateway judges it by its routes and policies and answers 200 with the
//! identity fields, or the refusal it would have given itself. These tests
//! ask as such a proxy does, over real HTTP.

use reqwest::header::{CACHE_CONTROL, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use serde_json::json;

use crate::helpers::{
    assert_error_in, assert_status, config_toml, metric, route, spawn_app_with, TestApp, TestOptions, Tokens, PASSWORD,
};
use crate::upstream::{spawn_upstream, Upstream};

const ON: &str = "\n[forward_auth]\nenabled = true\n";
const TRUST_LOCAL: &str = "trusted_proxies = [\"127.0.0.1/32\"]";

/// The identity fields a 200 carries on a required route.
const IDENTITY: [&str; 5] = ["x-user-id", "x-tenant-id", "x-user-roles", "x-user-scopes", "x-session-id"];

/// A gateway answering forward auth to this machine, with `routes`.
async fn judge(routes: &str) -> TestApp {
    let opts =
        TestOptions { extra: format!("{ON}{routes}"), server_extra: TRUST_LOCAL.to_owned(), ..TestOptions::default() };
    spawn_app_with(opts).await
}

/// What a proxy in front says about the request it holds.
struct Asked<'a> {
    method: &'a str,
    host: &'a str,
    uri: &'a str,
    token: Option<&'a str>,
    /// More of the client's header fields, passed along.
    fields: &'a [(&'a str, &'a str)],
}

impl<'a> Asked<'a> {
    fn get(uri: &'a str, token: Option<&'a str>) -> Self {
        Self { method: "GET", host: "app.example", uri, token, fields: &[] }
    }
}

async fn ask(app: &TestApp, asked: &Asked<'_>) -> Response {
    let mut req = app
        .client
        .get(app.url("/auth/forward-auth"))
        .header("x-forwarded-method", asked.method)
        .header("x-forwarded-host", asked.host)
        .header("x-forwarded-uri", asked.uri);
    if let Some(token) = asked.token {
        req = req.bearer_auth(token);
    }
    for (name, value) in asked.fields {
        req = req.header(*name, *value);
    }
    req.send().await.expect("GET /auth/forward-auth")
}

/// Allowed: 200, an empty body, never cached.
async fn assert_allowed(case: &str, resp: Response) -> reqwest::header::HeaderMap {
    assert_eq!(resp.status(), StatusCode::OK, "{case}");
    let headers = resp.headers().clone();
    assert_eq!(headers.get(CACHE_CONTROL).map(|v| v.to_str().ok()), Some(Some("no-store")), "{case}");
    assert!(headers.contains_key("x-request-id"), "{case}: no request id");
    assert_eq!(resp.text().await.expect("body"), "", "{case}: the body is not empty");
    headers
}

fn field<'h>(headers: &'h reqwest::header::HeaderMap, name: &str) -> &'h str {
    headers.get(name).map_or("<absent>", |v| v.to_str().expect("ASCII"))
}

/// A fixture: a required route with a policy, a public one, and a user of
/// each kind.
struct Fixture {
    app: TestApp,
    svc: Upstream,
    admin_id: String,
    admin: Tokens,
    reader: Tokens,
}

async fn fixture() -> Fixture {
    let svc = spawn_upstream("fa").await;
    let routes = [
        // Fields of the route's own may not replace what the proxy in front
        // copies, nor make a decision cacheable.
        route(
            "orders",
            "/orders",
            &[svc.url()],
            "roles = [\"admin\"]\nscopes = [\"orders:write\"]\n\
             response_headers = { \"X-User-Roles\" = \"root\", \"Cache-Control\" = \"max-age=60\" }",
        ),
        route("admin-host", "/", &[svc.url()], "host = \"admin.example\""),
        route("reports", "/reports", &[svc.url()], "scopes = [\"reports:read\"]"),
        route("home", "/", &[svc.url()], "auth = \"public\""),
        route("only-get", "/only-get", &[svc.url()], "methods = [\"GET\", \"HEAD\"]"),
    ]
    .concat();
    let app = judge(&routes).await;
    let admin_id = app.create_user("default", "admin@example.com", PASSWORD, &["admin"], &["orders:write"]).await;
    app.create_user("default", "reader@example.com", PASSWORD, &["ops"], &["reports:read"]).await;
    let admin = app.login_ok("admin@example.com", PASSWORD, None).await;
    let reader = app.login_ok("reader@example.com", PASSWORD, None).await;
    Fixture { app, svc, admin_id, admin, reader }
}

/// A valid token on a required route: 200 with every identity field, as
/// the gateway would inject them; refused without a token, with a bad one
/// and once the session is logged out; the upstream never asked.
#[tokio::test]
async fn a_valid_token_is_allowed_with_its_identity_and_dies_at_logout() {
    let f = fixture().await;
    let app = &f.app;
    let token = f.admin.access_token.as_str();
    let headers = assert_allowed("admin", ask(app, &Asked::get("/orders/7?x=1", Some(token))).await).await;
    assert_eq!(field(&headers, "x-user-id"), f.admin_id);
    assert_eq!(field(&headers, "x-user-roles"), "admin", "a route's response_headers replaced an identity field");
    assert_eq!(field(&headers, "x-user-scopes"), "orders:write");
    let me = app.me_ok(token).await;
    assert_eq!(field(&headers, "x-tenant-id"), me["tenant_id"].as_str().expect("tenant_id"));
    assert_eq!(field(&headers, "x-session-id"), me["session_id"].as_str().expect("session_id"));

    let resp = ask(app, &Asked::get("/orders/7", None)).await;
    assert_eq!(resp.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().ok()), Some(Some("Bearer")));
    assert_error_in("no token", resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let resp = ask(app, &Asked::get("/orders/7", Some("not.a.token"))).await;
    assert_error_in("a bad token", resp, StatusCode::UNAUTHORIZED, "invalid_token").await;

    assert_status(app.post_authed("/auth/logout", token, &json!({})).await, StatusCode::NO_CONTENT).await;
    let resp = ask(app, &Asked::get("/orders/7", Some(token))).await;
    assert_error_in("after logout", resp, StatusCode::UNAUTHORIZED, "invalid_token").await;

    let m = app.metrics().await;
    assert_eq!(metric(&m, "gateway_forward_auth_total", &[("route", "orders"), ("status", "200")]), 1.0);
    assert_eq!(metric(&m, "gateway_forward_auth_total", &[("route", "orders"), ("status", "401")]), 3.0);
    assert_eq!(f.svc.hits(), 0, "a decision reached the upstream");
    f.app.stop().await;
}

/// The route's roles and scopes judge the described request: 403, with the
/// `insufficient_scope` challenge where a scope is missing.
#[tokio::test]
async fn route_policies_refuse_as_the_gateway_would() {
    let f = fixture().await;
    let reader = f.reader.access_token.as_str();
    let resp = ask(&f.app, &Asked::get("/orders/7", Some(reader))).await;
    assert_error_in("a reader on orders", resp, StatusCode::FORBIDDEN, "forbidden").await;
    let headers = assert_allowed("a reader on reports", ask(&f.app, &Asked::get("/reports", Some(reader))).await).await;
    assert_eq!(field(&headers, "x-user-scopes"), "reports:read");
    let resp = ask(&f.app, &Asked::get("/reports/q", Some(&f.admin.access_token))).await;
    let challenge = resp.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().expect("ASCII").to_owned());
    assert_error_in("admin on reports", resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert_eq!(challenge.as_deref(), Some("Bearer error=\"insufficient_scope\""));
    f.app.stop().await;
}

/// The described path is normalised and routed as one the gateway serves:
/// `..` cannot climb from a public route into a required one, an ambiguous
/// escape is a 400, the query takes no part, and a public route hands back
/// no identity even for a valid token (nor echoes one the client made up).
#[tokio::test]
async fn the_described_request_is_routed_like_one_the_gateway_serves() {
    let f = fixture().await;
    let app = &f.app;
    for uri in ["/public/../orders/7", "/%2e%2e/orders", "//orders/7", "/./orders", "/orders?to=/public"] {
        let resp = ask(app, &Asked::get(uri, None)).await;
        // `/%2e%2e/orders` climbs above the root: 400; the rest reach orders.
        let (status, code) = if uri.starts_with("/%2e") {
            (StatusCode::BAD_REQUEST, "invalid_request")
        } else {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        };
        assert_error_in(uri, resp, status, code).await;
    }
    // `#`: `/reports#x` would be judged by the public root route, and a
    // server that cuts the fragment off would serve `/reports`.
    let refused =
        ["/orders%2f7", "/orders/..%2fx", "/orders%5c7", "/orders;x=1", "orders/7", "*", "/orders#x", "/orders 7"];
    for uri in refused {
        let resp = ask(app, &Asked::get(uri, None)).await;
        assert_error_in(uri, resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    // `/ordersx` is not under `/orders`: the public root route takes it.
    let token = f.admin.access_token.as_str();
    let forged = [("x-user-id", "00000000-0000-0000-0000-000000000000"), ("x_user_roles", "admin")];
    let asked = Asked { fields: &forged, ..Asked::get("/ordersx", Some(token)) };
    let headers = assert_allowed("a public route", ask(app, &asked).await).await;
    for name in IDENTITY {
        assert!(!headers.contains_key(name), "a public route handed back {name}");
    }
    // The host as a proxy may send it (case, port, trailing dot) picks a
    // host's own routes.
    for host in ["admin.example", "Admin.EXAMPLE:8443", "admin.example.:80"] {
        let resp = ask(app, &Asked { host, ..Asked::get("/ordersx", None) }).await;
        assert_error_in(host, resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // A method no route at the path takes: 405 with `Allow`, as served.
    let asked = Asked { method: "POST", ..Asked::get("/only-get/x", Some(token)) };
    let resp = ask(app, &asked).await;
    assert_eq!(resp.headers().get("allow").map(|v| v.to_str().ok()), Some(Some("GET, HEAD")));
    assert_error_in("POST on a GET route", resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    assert_allowed("GET", ask(app, &Asked::get("/only-get/x", Some(token))).await).await;
    f.app.stop().await;
}

/// Each of the three fields must come exactly once, and say one thing:
/// the gateway does not guess what the request was.
#[tokio::test]
async fn the_described_request_must_be_stated_once_and_plainly() {
    let f = fixture().await;
    let app = &f.app;
    let token = f.admin.access_token.as_str();
    let url = app.url("/auth/forward-auth");
    let full = [("x-forwarded-method", "GET"), ("x-forwarded-host", "app.example"), ("x-forwarded-uri", "/orders")];
    for left_out in 0..full.len() {
        let mut req = app.client.get(&url).bearer_auth(token);
        for (i, (name, value)) in full.iter().enumerate() {
            if i != left_out {
                req = req.header(*name, *value);
            }
        }
        let resp = req.send().await.expect("ask");
        assert_error_in(full[left_out].0, resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    for (name, second) in
        [("x-forwarded-method", "DELETE"), ("x-forwarded-host", "b.example"), ("x-forwarded-uri", "/x")]
    {
        let mut req = app.client.get(&url).bearer_auth(token);
        for (n, v) in full {
            req = req.header(n, v);
        }
        let resp = req.header(name, second).send().await.expect("ask");
        assert_error_in(&format!("two {name}"), resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    for (method, host) in
        [("get", "app.example"), ("G ET", "app.example"), ("GET", "a.example, b.example"), ("GET", "")]
    {
        let resp = ask(app, &Asked { method, host, ..Asked::get("/orders", Some(token)) }).await;
        assert_error_in(&format!("{method:?} {host:?}"), resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    // Two `Authorization` fields, as the proxy would refuse them.
    let asked = Asked { fields: &[("authorization", "Bearer x")], ..Asked::get("/orders", Some(token)) };
    assert_error_in("two tokens", ask(app, &asked).await, StatusCode::BAD_REQUEST, "invalid_request").await;
    f.app.stop().await;
}

/// Only a peer in `server.trusted_proxies` is answered, whatever it holds,
/// and the list is taken on reload (in both directions); with forward auth
/// off, the path is the API's 404.
#[tokio::test]
async fn only_a_trusted_proxy_is_answered_and_only_when_enabled() {
    let svc = spawn_upstream("fa-trust").await;
    let routes = route("guarded", "/guarded", &[svc.url()], "");
    let opts = TestOptions {
        extra: format!("{ON}{routes}"),
        server_extra: "trusted_proxies = [\"10.0.0.0/8\"]\nconfig_poll = \"0s\"".to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    let token = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    let resp = ask(&app, &Asked::get("/guarded", Some(&token))).await;
    assert_error_in("an untrusted peer", resp, StatusCode::FORBIDDEN, "forbidden").await;
    let trust = |list: &str| {
        let server_extra = format!("trusted_proxies = [{list}]\nconfig_poll = \"0s\"");
        app.write_raw_config(&config_toml(&TestOptions { server_extra, ..app.opts.clone() }));
        app.reloader.reload().unwrap_or_else(|e| panic!("reload failed: {e}"));
    };
    trust("\"127.0.0.1/32\"");
    assert_allowed("trusted after a reload", ask(&app, &Asked::get("/guarded", Some(&token))).await).await;
    trust("\"10.0.0.0/8\"");
    let resp = ask(&app, &Asked::get("/guarded", Some(&token))).await;
    assert_error_in("no longer trusted", resp, StatusCode::FORBIDDEN, "forbidden").await;
    app.stop().await;

    let app =
        spawn_app_with(TestOptions { server_extra: TRUST_LOCAL.to_owned(), ..TestOptions::with_extra(routes) }).await;
    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    let token = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    let resp = ask(&app, &Asked::get("/guarded", Some(&token))).await;
    assert_error_in("forward auth off", resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(svc.hits(), 0);
    app.stop().await;
}

/// A route without upstreams only judges: the gateway allows a request for
/// it to the proxy in front, and answers 404 to one sent to the gateway.
#[tokio::test]
async fn a_route_without_upstreams_only_judges() {
    let svc = spawn_upstream("fa-home").await;
    let routes = format!(
        "{}\n[[routes]]\nname = \"elsewhere\"\nprefix = \"/elsewhere\"\nroles = [\"ops\"]\n",
        route("home", "/", &[svc.url()], "auth = \"public\"")
    );
    let app = judge(&routes).await;
    app.create_user("default", "ops@example.com", PASSWORD, &["ops"], &[]).await;
    let token = app.login_ok("ops@example.com", PASSWORD, None).await.access_token;
    let headers = assert_allowed("judged", ask(&app, &Asked::get("/elsewhere/x", Some(&token))).await).await;
    assert_eq!(field(&headers, "x-user-roles"), "ops");
    let resp = app.get_authed("/elsewhere/x", &token).await;
    assert_error_in("served by the gateway", resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(svc.hits(), 0, "the request fell through to a shorter prefix");
    app.stop().await;
}

/// A route's rate limit counts decisions: by the client's address, read
/// from `X-Forwarded-For` through the trusted proxy, before the token is
/// looked at; by user after the policy.
#[tokio::test]
async fn rate_limits_count_decisions() {
    let svc = spawn_upstream("fa-limits").await;
    let limit = "rate_limit = { requests = 2, per = \"1h\", by = \"ip\" }";
    let routes = [
        route("by-ip", "/by-ip", &[svc.url()], &format!("auth = \"public\"\n{limit}")),
        route("by-user", "/by-user", &[svc.url()], "rate_limit = { requests = 2, per = \"1h\" }"),
        route("guarded-ip", "/guarded-ip", &[svc.url()], limit),
    ]
    .concat();
    let app = judge(&routes).await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    let one = from("203.0.113.7");
    for i in 0..2 {
        assert_allowed(&format!("by ip {i}"), ask(&app, &Asked { fields: &one, ..Asked::get("/by-ip", None) }).await)
            .await;
    }
    let resp = ask(&app, &Asked { fields: &one, ..Asked::get("/by-ip", None) }).await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_error_in("a third from one address", resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // On a required route, a limit by address counts before the token is
    // looked at: forged tokens are refused with 429 once it is spent.
    let forged = "eyJhbGciOiJFZERTQSIsImtpZCI6Im5vIn0.e30.c2lnbmF0dXJl";
    for i in 0..2 {
        let resp = ask(&app, &Asked { fields: &one, ..Asked::get("/guarded-ip", Some(forged)) }).await;
        assert_error_in(&format!("forged {i}"), resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
    let resp = ask(&app, &Asked { fields: &one, ..Asked::get("/guarded-ip", Some(forged)) }).await;
    assert_error_in("a third forged token", resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let other = from("203.0.113.8");
    assert_allowed("another address", ask(&app, &Asked { fields: &other, ..Asked::get("/by-ip", None) }).await).await;

    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    let token = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    for i in 0..2 {
        assert_allowed(&format!("by user {i}"), ask(&app, &Asked::get("/by-user", Some(&token))).await).await;
    }
    let resp = ask(&app, &Asked::get("/by-user", Some(&token))).await;
    assert_error_in("a user's third", resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    app.stop().await;
}

/// A CORS preflight (the browser sends no token) is allowed, without an
/// identity, only where the route says `cors_preflight`, and picks its
/// route by the method it announces. The gateway cannot cut the request
/// down here, so one carrying credentials or a body is no preflight: it is
/// judged like any `OPTIONS`.
#[tokio::test]
async fn preflights_pass_without_a_token_only_where_the_route_allows() {
    let svc = spawn_upstream("fa-cors").await;
    let routes = [
        route("open", "/open", &[svc.url()], "cors_preflight = true"),
        route("closed", "/closed", &[svc.url()], ""),
        route("deletes", "/deletes", &[svc.url()], "methods = [\"DELETE\"]\ncors_preflight = true"),
    ]
    .concat();
    let app = judge(&routes).await;
    let preflight = [("origin", "https://app.example"), ("access-control-request-method", "DELETE")];
    let asked = |uri: &'static str| Asked { method: "OPTIONS", fields: &preflight, ..Asked::get(uri, None) };
    assert_allowed("open", ask(&app, &asked("/open/x")).await).await;
    assert_allowed("routed by the announced DELETE", ask(&app, &asked("/deletes/x")).await).await;
    assert_error_in("closed", ask(&app, &asked("/closed/x")).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // Not a preflight (no announced method): judged like any OPTIONS.
    let bare = Asked { method: "OPTIONS", ..Asked::get("/open/x", None) };
    assert_error_in("a bare OPTIONS", ask(&app, &bare).await, StatusCode::UNAUTHORIZED, "unauthorized").await;

    // With more than a preflight carries, the OPTIONS is routed as itself:
    // `deletes` does not take it.
    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    let token = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    let bearer = format!("Bearer {token}");
    let more: [(&str, &str); 3] = [("authorization", &bearer), ("cookie", "session=1"), ("content-length", "5")];
    for extra in more {
        let fields = [preflight[0], preflight[1], extra];
        let resp = ask(&app, &Asked { method: "OPTIONS", fields: &fields, ..Asked::get("/deletes/x", None) }).await;
        assert_error_in(extra.0, resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
    // On a route taking every method, the token is checked as on any
    // request, and the identity handed back.
    let fields = [preflight[0], preflight[1], ("authorization", bearer.as_str())];
    let resp = ask(&app, &Asked { method: "OPTIONS", fields: &fields, ..Asked::get("/open/x", None) }).await;
    let headers = assert_allowed("a preflight with a token", resp).await;
    assert!(headers.contains_key("x-user-id"), "a token-bearing OPTIONS was passed as a preflight");
    assert_eq!(svc.hits(), 0);
    app.stop().await;
}

/// Turning forward auth on and off is taken on reload, like the routes.
#[tokio::test]
async fn a_reload_turns_forward_auth_on_and_off() {
    let svc = spawn_upstream("fa-reload").await;
    let routes = route("open", "/open", &[svc.url()], "auth = \"public\"");
    let opts = TestOptions {
        extra: routes.clone(),
        server_extra: format!("{TRUST_LOCAL}\nconfig_poll = \"0s\""),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let reload = |extra: String| {
        app.write_raw_config(&config_toml(&TestOptions { extra, ..app.opts.clone() }));
        app.reloader.reload().unwrap_or_else(|e| panic!("reload failed: {e}"));
    };
    assert_error_in("off", ask(&app, &Asked::get("/open", None)).await, StatusCode::NOT_FOUND, "not_found").await;
    reload(format!("{ON}{routes}"));
    assert_allowed("on", ask(&app, &Asked::get("/open", None)).await).await;
    reload(routes.clone());
    assert_error_in("off again", ask(&app, &Asked::get("/open", None)).await, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn a_route_with_mfa_is_judged_as_the_proxy_judges_it() {
    let app = judge("\n[[routes]]\nname = \"vault\"\nprefix = \"/vault\"\nmfa = true\n").await;
    app.create_user("default", "judged@example.com", PASSWORD, &[], &[]).await;
    let plain = app.login_ok("judged@example.com", PASSWORD, None).await;
    let resp = ask(&app, &Asked::get("/vault/x", Some(&plain.access_token))).await;
    let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_owned());
    assert_error_in("a password-only token", resp, StatusCode::UNAUTHORIZED, "insufficient_user_authentication").await;
    assert!(challenge.is_some_and(|c| c.contains("insufficient_user_authentication")));

    // A login that passed a second factor is allowed.
    let start = json!({ "password": PASSWORD });
    let resp = app.post_authed("/auth/mfa/totp", &plain.access_token, &start).await;
    let setup = crate::helpers::expect_json(resp, StatusCode::OK).await;
    let secret = setup["secret"].as_str().expect("a secret").to_owned();
    let step = gateway::auth::totp::step_at(gateway::db::unix_now());
    let code = |s: i64| gateway::auth::totp::code(&secret, step + s).expect("a code");
    let resp = app.post_authed("/auth/mfa/totp/confirm", &plain.access_token, &json!({ "code": code(0) })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json!({ "email": "judged@example.com", "password": PASSWORD, "otp": code(1) });
    let resp = app.client.post(app.url("/auth/login")).json(&body).send().await.expect("login");
    let stepped = crate::helpers::parse_tokens(resp, "login with a code").await;
    let resp = ask(&app, &Asked::get("/vault/x", Some(&stepped.access_token))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    app.stop().await;
}
