//! Who the upstream is told the caller is: identity headers stripped from every request in
//! every spelling, injected from the verified token on required routes only; tokens and
//! route policies (roles any-of, scopes all-of, tenants); request ids; `X-Forwarded-*`;
//! the Host sent upstream; custom header names; logout taking effect on the next request.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::header::{HeaderValue, AUTHORIZATION, HOST, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, assert_error_in, assert_invalid_token, assert_status, eventually, jwt_part, metric, parse_uuid,
    raw_request, route, spawn_app_with, TestApp, TestOptions, Tokens, PASSWORD,
};
use crate::upstream::{dead_upstream_url, echo, spawn_upstream, Upstream};

const ADMIN: &str = "admin@example.com";
const READER: &str = "reader@example.com";
const NOBODY: &str = "nobody@example.com";

/// The identity header names the gateway strips by default, folded.
const IDENTITY: [&str; 5] = ["x-user-id", "x-tenant-id", "x-user-roles", "x-user-scopes", "x-session-id"];

/// Lower-case, `_` and `.` mapped to `-`: how the gateway compares header names.
fn fold(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn set_of<'a>(items: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
    items.into_iter().collect()
}

fn claim(tokens: &Tokens, name: &str) -> String {
    jwt_part(&tokens.access_token, 1)[name].as_str().unwrap_or_else(|| panic!("claim {name} is a string")).to_owned()
}

struct Fixture {
    app: TestApp,
    svc: Upstream,
    admin_id: String,
    /// roles admin + ops; scopes orders:read + orders:write.
    admin: Tokens,
    /// role ops; scope orders:read.
    reader: Tokens,
    /// No roles, no scopes.
    nobody: Tokens,
}

impl Fixture {
    fn req(&self, path: &str) -> RequestBuilder {
        self.app.client.get(self.app.url(path))
    }

    async fn send(&self, what: &str, req: RequestBuilder) -> Response {
        req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    async fn get_as(&self, path: &str, tokens: &Tokens) -> Response {
        self.app.get_authed(path, &tokens.access_token).await
    }
}

/// One upstream `svc` behind routes with every policy, `reserved = ["X-Internal"]`.
async fn fixture_with(headers_table: &str, server_extra: &str) -> Fixture {
    let svc = spawn_upstream("svc").await;
    let u = [svc.url()];
    let extra = [
        route("private", "/private", &u, ""),
        route("pass", "/pass", &u, "pass_token = true"),
        route("public", "/public", &u, "auth = \"public\""),
        route("preserve", "/preserve", &u, "auth = \"public\"\npreserve_host = true"),
        route("admin", "/admin", &u, "roles = [\"admin\", \"root\"]"),
        route("scoped", "/scoped", &u, "scopes = [\"orders:read\", \"orders:write\"]"),
        route("acme", "/acme", &u, "tenants = [\"acme\"]"),
        headers_table.to_owned(),
    ]
    .concat();
    let opts = TestOptions { extra, server_extra: server_extra.to_owned(), ..TestOptions::default() };
    let app = spawn_app_with(opts).await;
    let admin_id =
        app.create_user("default", ADMIN, PASSWORD, &["admin", "ops"], &["orders:read", "orders:write"]).await;
    app.create_user("default", READER, PASSWORD, &["ops"], &["orders:read"]).await;
    app.create_user("default", NOBODY, PASSWORD, &[], &[]).await;
    let admin = app.login_ok(ADMIN, PASSWORD, None).await;
    let reader = app.login_ok(READER, PASSWORD, None).await;
    let nobody = app.login_ok(NOBODY, PASSWORD, None).await;
    Fixture { app, svc, admin_id, admin, reader, nobody }
}

async fn fixture() -> Fixture {
    fixture_with("\n[headers]\nreserved = [\"X-Internal\"]\n", "").await
}

/// Asserts 401 `unauthorized` with exactly `WWW-Authenticate: Bearer`.
async fn assert_missing_token(case: &str, resp: Response) {
    let www = resp.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().expect("WWW-Authenticate is ASCII").to_owned());
    assert_error_in(case, resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(www.as_deref(), Some("Bearer"), "{case}: WWW-Authenticate");
}

fn request_id_of(resp: &Response) -> String {
    resp.headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{} response has no X-Request-Id", resp.status()))
        .to_str()
        .expect("X-Request-Id is ASCII")
        .to_owned()
}

#[tokio::test]
async fn identity_headers_are_injected_on_required_routes() {
    let f = fixture().await;
    let e = echo(f.get_as("/private/x", &f.admin).await).await;
    assert_eq!(e.path(), "/private/x");
    assert_eq!(e.one("x-user-id"), f.admin_id, "{}", e.0);
    assert_eq!(e.one("x-tenant-id"), claim(&f.admin, "tid"), "{}", e.0);
    parse_uuid(e.one("x-tenant-id"), "X-Tenant-Id");
    assert_eq!(set_of(e.one("x-user-roles").split(',')), set_of(["admin", "ops"]), "{}", e.0);
    assert_eq!(set_of(e.one("x-user-scopes").split(' ')), set_of(["orders:read", "orders:write"]), "{}", e.0);
    assert_eq!(e.one("x-session-id"), claim(&f.admin, "sid"), "{}", e.0);
    assert!(!e.has("authorization"), "the bearer token was forwarded: {}", e.0);

    // Another user, another session: other values.
    let e = echo(f.get_as("/private/x", &f.reader).await).await;
    assert_ne!(e.one("x-user-id"), f.admin_id);
    assert_eq!(e.one("x-user-roles"), "ops", "{}", e.0);
    assert_eq!(e.one("x-user-scopes"), "orders:read", "{}", e.0);
    assert_eq!(e.one("x-session-id"), claim(&f.reader, "sid"), "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn pass_token_forwards_the_authorization_header() {
    let f = fixture().await;
    let e = echo(f.get_as("/pass/x", &f.admin).await).await;
    assert_eq!(e.one("authorization"), format!("Bearer {}", f.admin.access_token), "{}", e.0);
    assert_eq!(e.one("x-user-id"), f.admin_id, "{}", e.0);
    let e = echo(f.get_as("/private/x", &f.admin).await).await;
    assert!(!e.has("authorization"), "pass_token defaults to false: {}", e.0);
    f.app.stop().await;
}

/// A browser sends a CORS preflight without credentials. A required route
/// with `cors_preflight = true` forwards it for the backend to answer, with
/// nothing but what a preflight is made of: no identity, no credential,
/// whatever the client adds; over HTTP/1.1 and HTTP/2. Anything short of a
/// preflight on that route (a body, even an empty chunked one; an upgrade),
/// and a preflight on a route without the option, still needs a token and
/// never reaches the upstream without one.
#[tokio::test]
async fn cors_preflights_pass_without_a_token_only_where_the_route_allows() {
    let svc = spawn_upstream("svc").await;
    let u = [svc.url()];
    let extra = [
        route("cors", "/cors", &u, "cors_preflight = true\nroles = [\"admin\"]"),
        route("cors-pass", "/cors-pass", &u, "cors_preflight = true\npass_token = true"),
        route("strict", "/strict", &u, ""),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    let origin = "https://app.example.com";
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().expect("an HTTP/2 client");
    let preflight_with = |client: &reqwest::Client, path: &str| {
        client
            .request(Method::OPTIONS, app.url(path))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "DELETE")
            .header("Access-Control-Request-Headers", "authorization")
    };
    let preflight = |path: &str| preflight_with(&app.client, path);

    for (path, client) in [("/cors/orders/7", &app.client), ("/cors-pass/orders/7", &app.client), ("/cors/h2", &h2)] {
        let req = preflight_with(client, path)
            .header(AUTHORIZATION, "Bearer forged")
            .header("Cookie", "session=stolen")
            .header("X-Api-Key", "k")
            .header("X-User-Id", "evil")
            .header("X_User_Roles", "admin");
        let e = echo(req.send().await.unwrap_or_else(|err| panic!("{path}: {err}"))).await;
        assert_eq!(e.method(), "OPTIONS", "{path}: {}", e.0);
        assert_eq!(e.path(), path, "{path}: {}", e.0);
        assert_eq!(e.one("origin"), origin, "{path}: {}", e.0);
        assert_eq!(e.one("access-control-request-method"), "DELETE", "{path}: {}", e.0);
        assert_eq!(e.one("access-control-request-headers"), "authorization", "{path}: {}", e.0);
        for (name, _) in e.pairs() {
            let folded = fold(name);
            assert!(!IDENTITY.contains(&folded.as_str()), "{path}: {name} reached the upstream: {}", e.0);
            assert!(
                !["authorization", "cookie", "x-api-key"].contains(&folded.as_str()),
                "{path}: {name} went with a preflight: {}",
                e.0
            );
        }
    }
    assert_eq!(svc.hits(), 3);

    let options = |path: &str| app.client.request(Method::OPTIONS, app.url(path));
    let cases = [
        (
            "GET",
            app.client.get(app.url("/cors/x")).header("Origin", origin).header("Access-Control-Request-Method", "GET"),
        ),
        ("OPTIONS without Access-Control-Request-Method", options("/cors/x").header("Origin", origin)),
        ("OPTIONS without Origin", options("/cors/x").header("Access-Control-Request-Method", "GET")),
        ("a preflight with a body", preflight("/cors/x").body("x")),
        ("a preflight whose Origin Connection nominates", preflight("/cors/x").header("Connection", "Origin")),
        ("a preflight on a route without cors_preflight", preflight("/strict/x")),
    ];
    for (case, req) in cases {
        assert_missing_token(case, req.send().await.unwrap_or_else(|e| panic!("{case}: {e}"))).await;
    }
    // Raw, for what an HTTP client library would not send: an empty chunked
    // body, and a WebSocket upgrade dressed as a preflight (the route allows
    // WebSockets, so only the preflight rule stands between it and a tunnel).
    let head =
        format!("OPTIONS /cors/x HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: GET\r\n");
    let raw_cases = [
        ("an empty chunked body", format!("{head}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")),
        (
            "an upgrade",
            format!(
                "{head}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ),
        ),
    ];
    for (case, request) in raw_cases {
        let resp = raw_request(app.addr, request.as_bytes()).await;
        assert_eq!(resp.status, Some(401), "{case}: {}", resp.head);
    }
    assert_eq!(svc.hits(), 3, "a request that is not an allowed preflight reached the upstream without a token");
    app.stop().await;
}

/// With `auth.cors_origins`, the answers the gateway makes itself on routes
/// (a 401 above all: the app must see it to refresh its token) can be read
/// by scripts from those origins, and only from those.
#[tokio::test]
async fn the_gateways_own_answers_on_routes_carry_cors_for_listed_origins() {
    let svc = spawn_upstream("svc").await;
    const APP: &str = "https://app.example.com";
    let extra = [
        route("private", "/private", &[svc.url()], "roles = [\"admin\"]"),
        route("small", "/small", &[svc.url()], "auth = \"public\"\nmax_body = 4"),
        route("dead", "/dead", &[dead_upstream_url()], "auth = \"public\""),
    ]
    .concat();
    let opts = TestOptions { auth_extra: format!("cors_origins = [{APP:?}]"), extra, ..TestOptions::default() };
    let app = spawn_app_with(opts).await;
    app.create_user("default", NOBODY, PASSWORD, &[], &[]).await;
    let nobody = app.login_ok(NOBODY, PASSWORD, None).await;
    let field = |resp: &Response, name: &str| resp.headers().get(name).map(|v| v.to_str().expect("ASCII").to_owned());

    let cases = [
        ("no token", app.client.get(app.url("/private/x")), StatusCode::UNAUTHORIZED),
        ("a bad token", app.client.get(app.url("/private/x")).bearer_auth("not-a-jwt"), StatusCode::UNAUTHORIZED),
        ("no role", app.client.get(app.url("/private/x")).bearer_auth(&nobody.access_token), StatusCode::FORBIDDEN),
        ("no route", app.client.get(app.url("/nowhere")), StatusCode::NOT_FOUND),
        ("a bad path", app.client.get(app.url("/private/a%2fb")), StatusCode::BAD_REQUEST),
        ("a body too large", app.client.post(app.url("/small/x")).body("0123456789"), StatusCode::PAYLOAD_TOO_LARGE),
        ("an upstream that refuses", app.client.get(app.url("/dead/x")), StatusCode::BAD_GATEWAY),
    ];
    for (case, req, status) in cases {
        for (origin, allowed) in [(APP, true), ("https://evil.example", false)] {
            let req = req.try_clone().expect("a request with a fixed body").header("Origin", origin);
            let resp = req.send().await.unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(resp.status(), status, "{case}");
            let allow = field(&resp, "access-control-allow-origin");
            if allowed {
                assert_eq!(allow.as_deref(), Some(APP), "{case}");
                let exposed = field(&resp, "access-control-expose-headers").unwrap_or_default();
                assert!(exposed.contains("www-authenticate") && exposed.contains("x-request-id"), "{case}: {exposed}");
            } else {
                assert_eq!(allow, None, "{case}: another origin may read the answer");
            }
            assert_eq!(field(&resp, "vary").as_deref(), Some("origin"), "{case}");
            assert_eq!(field(&resp, "access-control-allow-credentials"), None, "{case}");
        }
    }
    assert_eq!(svc.hits(), 0);
    app.stop().await;
}

/// The HTTP/1 parser keeps a lone `Authorization` value out of the header
/// map on its way to the token check. Whatever form the field takes, the
/// request must be judged exactly as sent: any case of the name, several
/// fields, a `Connection` header naming it, HTTP/1.0, bytes past ASCII, and
/// the routes that forward it (public, `pass_token`) or give it to the API.
#[tokio::test]
async fn the_authorization_field_is_judged_as_sent_in_every_form() {
    let f = fixture().await;
    let token = &f.admin.access_token;
    let raw = |head: String| {
        let addr = f.app.addr;
        async move { raw_request(addr, head.as_bytes()).await }
    };
    let get = |path: &str, version: &str, fields: &[String]| {
        let mut head = format!("GET {path} {version}\r\nHost: gw\r\n");
        for field in fields {
            head.push_str(field);
            head.push_str("\r\n");
        }
        head + "\r\n"
    };

    // Any case of the name, with or without a `Connection` header (which
    // puts it back in the map): accepted, and not forwarded.
    for name in ["authorization", "AUTHORIZATION", "aUtHoRiZaTiOn"] {
        for connection in [None, Some("Connection: close")] {
            let mut fields = vec![format!("{name}: Bearer {token}")];
            fields.extend(connection.map(str::to_owned));
            let r = raw(get("/private/x", "HTTP/1.1", &fields)).await;
            assert_eq!(r.status, Some(200), "{fields:?}: {}", r.head);
            let e = crate::upstream::Echo(serde_json::from_slice(&r.body).expect("echo"));
            assert!(!e.has("authorization"), "{fields:?}: forwarded: {}", e.0);
        }
    }
    // HTTP/1.0 (keep-alive asked for with a `Connection` header).
    let r = raw(get(
        "/private/x",
        "HTTP/1.0",
        &[format!("Authorization: Bearer {token}"), "Connection: keep-alive".into()],
    ))
    .await;
    assert_eq!(r.status, Some(200), "HTTP/1.0: {}", r.head);

    let hits = f.svc.hits();

    // Several fields, valid or not, in either order: 400.
    for fields in [
        [format!("Authorization: Bearer {token}"), "Authorization: Bearer x".to_owned()],
        ["Authorization: Bearer x".to_owned(), format!("Authorization: Bearer {token}")],
        [format!("Authorization: Bearer {token}"), format!("authorization: Bearer {token}")],
    ] {
        raw(get("/private/x", "HTTP/1.1", &fields)).await.assert_error(&fields[1], 400, "invalid_request");
    }
    let three = [0, 1, 2].map(|_| format!("Authorization: Bearer {token}"));
    raw(get("/private/x", "HTTP/1.1", &three)).await.assert_error("three fields", 400, "invalid_request");

    // `Connection` names it: a hop-by-hop field, removed before the check.
    for path in ["/private/x", "/pass/x"] {
        let fields = [format!("Authorization: Bearer {token}"), "Connection: authorization".into()];
        let r = raw(get(path, "HTTP/1.1", &fields)).await;
        r.assert_error(path, 401, "unauthorized");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{path}: {}", r.head);
    }

    // Bytes past ASCII: an invalid token, not a server error.
    let req =
        f.req("/private/x").header(AUTHORIZATION, HeaderValue::from_bytes(b"Bearer abc\xff.def").expect("obs-text"));
    assert_invalid_token(f.send("obs-text", req).await).await;
    assert_eq!(f.svc.hits(), hits, "a refused request reached the upstream");

    // Routes that forward it get it exactly as sent.
    let e = echo(f.send("public", f.req("/public/x").header(AUTHORIZATION, "Bearer not-checked-here")).await).await;
    assert_eq!(e.one("authorization"), "Bearer not-checked-here", "{}", e.0);
    let r = raw(get("/public/x", "HTTP/1.1", &["authorization: Basic Zm9vOmJhcg==".into()])).await;
    let e = crate::upstream::Echo(serde_json::from_slice(&r.body).expect("echo"));
    assert_eq!(e.one("authorization"), "Basic Zm9vOmJhcg==", "{}", e.0);
    let e = echo(f.get_as("/pass/x", &f.admin).await).await;
    assert_eq!(e.one("authorization"), format!("Bearer {token}"), "{}", e.0);
    // Several, on a public route: all of them, in the order sent.
    let fields = ["Authorization: Bearer first".to_owned(), "X-Other: 1".into(), "authorization: Bearer second".into()];
    let r = raw(get("/public/x", "HTTP/1.1", &fields)).await;
    let e = crate::upstream::Echo(serde_json::from_slice(&r.body).expect("echo"));
    assert_eq!(e.all("authorization"), ["Bearer first", "Bearer second"], "{}", e.0);

    // The API reads it too (a raw request, no `Connection` header).
    let r = raw(get("/auth/sessions", "HTTP/1.1", &[format!("Authorization: Bearer {token}")])).await;
    assert_eq!(r.status, Some(200), "GET /auth/sessions: {} {}", r.head, r.text());
    f.app.stop().await;
}

#[tokio::test]
async fn spoofed_identity_and_hop_by_hop_headers_never_reach_the_upstream() {
    let f = fixture().await;
    let spoofs = [
        ("X-User-Id", "evil"),
        ("X_User_Id", "evil"),
        ("X.User.Id", "evil"),
        ("x-user-id", "evil-duplicate"),
        ("X-Tenant-Id", "evil"),
        ("X_Tenant_Id", "evil"),
        ("X-User-Roles", "root"),
        ("X.User.Roles", "root"),
        ("X-User-Scopes", "everything"),
        ("x_user_scopes", "everything"),
        ("X-Session-Id", "evil"),
        ("X_Session.Id", "evil"),
        ("X-Internal", "1"),
        ("X_Internal", "1"),
        ("x.internal", "1"),
        ("Connection", "keep-alive, X-Custom-Hop"),
        ("X-Custom-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        // Look-alikes that are not reserved pass through.
        ("X-Benign", "kept"),
        ("X-User-Idx", "kept"),
        ("X-User", "kept"),
    ];
    let injected = [
        ("x-user-id", f.admin_id.clone()),
        ("x-tenant-id", claim(&f.admin, "tid")),
        ("x-session-id", claim(&f.admin, "sid")),
    ];

    for (path, tokens) in [("/private/x", Some(&f.admin)), ("/public/x", None), ("/admin/x", Some(&f.admin))] {
        let mut req = f.req(path);
        if let Some(t) = tokens {
            req = req.bearer_auth(&t.access_token);
        }
        for (name, value) in spoofs {
            req = req.header(name, value);
        }
        let e = echo(f.send(path, req).await).await;
        for (name, value) in e.pairs() {
            let folded = fold(name);
            assert!(folded != "x-internal", "{path}: reserved header {name} reached the upstream: {}", e.0);
            if IDENTITY.contains(&folded.as_str()) {
                assert!(tokens.is_some(), "{path}: identity header {name} reached a public upstream: {}", e.0);
                assert_eq!(name, folded, "{path}: a non-canonical spelling {name} reached the upstream: {}", e.0);
                assert_ne!(value, "evil", "{path}: spoofed {name} reached the upstream: {}", e.0);
            }
        }
        if tokens.is_some() {
            for (name, value) in &injected {
                assert_eq!(e.one(name), value, "{path}: {}", e.0);
            }
            assert_eq!(set_of(e.one("x-user-roles").split(',')), set_of(["admin", "ops"]), "{path}: {}", e.0);
        } else {
            for name in IDENTITY {
                assert!(!e.has(name), "{path}: {name} on a public route: {}", e.0);
            }
        }
        for name in ["x-custom-hop", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer"] {
            assert!(!e.has(name), "{path}: hop-by-hop header {name} reached the upstream: {}", e.0);
        }
        for name in ["x-benign", "x-user-idx", "x-user"] {
            assert_eq!(e.one(name), "kept", "{path}: {}", e.0);
        }
    }
    f.app.stop().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_or_smuggle_identity() {
    let f = fixture().await;
    for nominated in ["X-User-Id", "x-user-id, X-Tenant-Id", "X-User-Roles, X-User-Scopes, X-Session-Id"] {
        let req = f
            .req("/private/x")
            .bearer_auth(&f.admin.access_token)
            .header("Connection", nominated)
            .header("X-User-Id", "evil")
            .header("X-Tenant-Id", "evil");
        let e = echo(f.send(nominated, req).await).await;
        assert_eq!(e.one("x-user-id"), f.admin_id, "Connection: {nominated}: {}", e.0);
        assert_eq!(e.one("x-tenant-id"), claim(&f.admin, "tid"), "Connection: {nominated}: {}", e.0);
        assert_eq!(e.one("x-session-id"), claim(&f.admin, "sid"), "Connection: {nominated}: {}", e.0);
        assert!(e.has("x-user-roles") && e.has("x-user-scopes"), "Connection: {nominated}: {}", e.0);
    }
    // On a public route the nominated identity header is simply gone.
    let req = f.req("/public/x").header("Connection", "X-User-Id").header("X-User-Id", "evil");
    let e = echo(f.send("public", req).await).await;
    assert!(!e.has("x-user-id"), "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn public_routes_get_no_identity_even_with_a_valid_token() {
    let f = fixture().await;
    let e = echo(f.get_as("/public/x", &f.admin).await).await;
    for name in IDENTITY {
        assert!(!e.has(name), "{name} injected on a public route: {}", e.0);
    }
    parse_uuid(e.one("x-request-id"), "X-Request-Id on a public route");
    assert_eq!(e.one("x-forwarded-for"), "127.0.0.1", "{}", e.0);
    // Public routes work without any token, and with a bad one.
    let e = echo(f.app.get("/public/x").await).await;
    assert!(!e.has("x-user-id"), "{}", e.0);
    let e = echo(f.app.get_authed("/public/x", "not-a-jwt").await).await;
    assert!(!e.has("x-user-id"), "{}", e.0);
    f.app.stop().await;
}

/// An access token with the real key and claims, but expired an hour ago.
fn expired_token(app: &TestApp, tokens: &Tokens) -> String {
    let (kid, key) = app.gateway_signing_key();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock is after 1970").as_secs();
    let now = i64::try_from(now).expect("time fits in i64");
    let mut claims: Value = jwt_part(&tokens.access_token, 1);
    claims["iat"] = json!(now - 7200);
    claims["exp"] = json!(now - 3600);
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid);
    header.typ = Some("at+jwt".to_owned());
    let der = key.to_pkcs8_der().expect("encode signing key as PKCS#8");
    encode(&header, &claims, &EncodingKey::from_ed_der(der.as_bytes())).expect("sign expired token")
}

#[tokio::test]
async fn missing_or_invalid_tokens_are_401_and_never_forwarded() {
    let f = fixture().await;

    // Routes are auth = "required" unless they say otherwise.
    assert_missing_token("no Authorization", f.app.get("/private/x").await).await;
    assert_missing_token("no Authorization, policy route", f.app.get("/admin/x").await).await;

    let (head, body, sig) = {
        let parts: Vec<&str> = f.admin.access_token.split('.').collect();
        assert_eq!(parts.len(), 3);
        (parts[0].to_owned(), parts[1].to_owned(), parts[2].to_owned())
    };
    let flipped = match sig.strip_prefix('A') {
        Some(rest) => format!("B{rest}"),
        None => format!("A{}", &sig[1..]),
    };
    let invalid = [
        ("garbage", "not-a-jwt".to_owned()),
        ("three garbage parts", "a.b.c".to_owned()),
        ("signature changed", format!("{head}.{body}.{flipped}")),
        ("signature stripped", format!("{head}.{body}.")),
        ("refresh token as bearer", f.admin.refresh_token.clone()),
        ("expired", expired_token(&f.app, &f.admin)),
    ];
    for (case, token) in &invalid {
        let resp = f.app.get_authed("/private/x", token).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{case}");
        assert_invalid_token(resp).await;
    }

    // Two Authorization headers: ambiguous, refused (even when both are valid).
    for (case, second) in [("same token twice", &f.admin.access_token), ("two tokens", &f.reader.access_token)] {
        let req = f
            .req("/private/x")
            .header(AUTHORIZATION, format!("Bearer {}", f.admin.access_token))
            .header(AUTHORIZATION, format!("Bearer {second}"));
        assert_error_in(case, f.send(case, req).await, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    // A valid token anywhere but the Authorization header counts for
    // nothing: query parameters, cookies, other headers.
    let token = &f.admin.access_token;
    for (case, req) in [
        ("?access_token=", f.req(&format!("/private/x?access_token={token}"))),
        ("?token=", f.req(&format!("/private/x?token={token}"))),
        ("cookie", f.req("/private/x").header("cookie", format!("access_token={token}; token={token}"))),
        ("X-Access-Token", f.req("/private/x").header("x-access-token", token.as_str())),
        ("Proxy-Authorization", f.req("/private/x").header("proxy-authorization", format!("Bearer {token}"))),
    ] {
        assert_missing_token(case, f.send(case, req).await).await;
    }
    assert_eq!(f.svc.hits(), 0, "a request without a valid token reached the upstream");

    // Positive control: the genuine token goes through.
    echo(f.get_as("/private/x", &f.admin).await).await;
    assert_eq!(f.svc.hits(), 1);
    f.app.stop().await;
}

#[tokio::test]
async fn logout_revokes_the_token_on_the_next_proxied_request() {
    let f = fixture().await;
    let other = f.app.login_ok(ADMIN, PASSWORD, None).await;
    echo(f.get_as("/private/x", &f.admin).await).await;
    echo(f.get_as("/private/x", &other).await).await;
    assert_eq!(f.svc.hits(), 2);

    let resp = f.app.post_authed("/auth/logout", &f.admin.access_token, &json!({})).await;
    assert_status(resp, StatusCode::NO_CONTENT).await;

    assert_invalid_token(f.get_as("/private/x", &f.admin).await).await;
    assert_invalid_token(f.get_as("/pass/x", &f.admin).await).await;
    assert_eq!(f.svc.hits(), 2, "a revoked token reached the upstream");
    // Only that session ended.
    let e = echo(f.get_as("/private/x", &other).await).await;
    assert_eq!(e.one("x-session-id"), claim(&other, "sid"), "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn roles_are_any_of() {
    let f = fixture().await;
    let root = {
        f.app.create_user("default", "root@example.com", PASSWORD, &["root"], &[]).await;
        f.app.login_ok("root@example.com", PASSWORD, None).await
    };
    for (case, tokens) in [("admin + ops", &f.admin), ("root only", &root)] {
        let e = echo(f.get_as("/admin/x", tokens).await).await;
        assert_eq!(e.path(), "/admin/x", "{case}");
    }
    let before = f.svc.hits();
    for (case, tokens) in [("ops only", &f.reader), ("no roles", &f.nobody)] {
        assert_error_in(case, f.get_as("/admin/x", tokens).await, StatusCode::FORBIDDEN, "forbidden").await;
    }
    assert_eq!(f.svc.hits(), before, "a forbidden request reached the upstream");
    f.app.stop().await;
}

#[tokio::test]
async fn scopes_are_all_of() {
    let f = fixture().await;
    echo(f.get_as("/scoped/x", &f.admin).await).await;
    let before = f.svc.hits();
    for (case, tokens) in [("orders:read only", &f.reader), ("no scopes", &f.nobody)] {
        let resp = f.get_as("/scoped/x", tokens).await;
        let www = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .map(|v| v.to_str().expect("WWW-Authenticate is ASCII").to_owned())
            .unwrap_or_else(|| panic!("{case}: 403 insufficient_scope carries WWW-Authenticate"));
        assert_error_in(case, resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
        assert!(
            www.starts_with("Bearer") && www.contains(r#"error="insufficient_scope""#),
            "{case}: unexpected WWW-Authenticate: {www}"
        );
    }
    assert_eq!(f.svc.hits(), before, "a request lacking scopes reached the upstream");
    f.app.stop().await;
}

/// Routes sharing a prefix split it by method, each with its own policy: a
/// reader may GET but not DELETE. A method no route there takes is a 405
/// naming the methods that are taken, before any token is judged, and never
/// a fall-through to a shorter prefix with a weaker policy. A CORS preflight
/// goes to the route that will serve the request it announces, whose
/// `cors_preflight` decides.
#[tokio::test]
async fn methods_split_a_prefix_between_policies() {
    let reads = spawn_upstream("reads").await;
    let writes = spawn_upstream("writes").await;
    let open = spawn_upstream("open").await;
    let extra = [
        route(
            "orders-read",
            "/orders",
            &[reads.url()],
            "methods = [\"GET\", \"HEAD\"]\nscopes = [\"orders:read\"]\ncors_preflight = true",
        ),
        route(
            "orders-write",
            "/orders",
            &[writes.url()],
            "methods = [\"POST\", \"DELETE\"]\nscopes = [\"orders:write\"]",
        ),
        route("open", "/open", &[open.url()], "auth = \"public\""),
        route("open-admin", "/open/admin", &[writes.url()], "methods = [\"DELETE\"]\nroles = [\"admin\"]"),
        route("open-get", "/open-get", &[open.url()], "auth = \"public\"\nmethods = [\"GET\", \"HEAD\"]"),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    app.create_user("default", ADMIN, PASSWORD, &["admin"], &["orders:read", "orders:write"]).await;
    app.create_user("default", READER, PASSWORD, &[], &["orders:read"]).await;
    let admin = app.login_ok(ADMIN, PASSWORD, None).await.access_token;
    let reader = app.login_ok(READER, PASSWORD, None).await.access_token;
    let send = |method: Method, path: &str, token: Option<&str>| {
        let mut req = app.client.request(method.clone(), app.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let what = format!("{method} {path}");
        async move { req.send().await.unwrap_or_else(|e| panic!("{what}: {e}")) }
    };

    let e = echo(send(Method::GET, "/orders/7", Some(&reader)).await).await;
    assert_eq!((e.upstream(), e.method()), ("reads", "GET"), "{}", e.0);
    let resp = send(Method::DELETE, "/orders/7", Some(&reader)).await;
    assert_error(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert_eq!(writes.hits(), 0, "a reader's DELETE reached the write upstream");
    let e = echo(send(Method::DELETE, "/orders/7", Some(&admin)).await).await;
    assert_eq!((e.upstream(), e.method(), e.path()), ("writes", "DELETE", "/orders/7"), "{}", e.0);

    for (case, method, path, token) in [
        ("PUT with a token that could write", Method::PUT, "/orders/7", Some(admin.as_str())),
        ("PUT without a token", Method::PUT, "/orders", None),
        ("a bare OPTIONS", Method::OPTIONS, "/orders/7", None),
        ("PATCH", Method::PATCH, "/orders/7", Some(admin.as_str())),
    ] {
        let resp = send(method, path, token).await;
        let allow = resp.headers().get("allow").map(|v| v.to_str().expect("ASCII").to_owned());
        assert_error_in(case, resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
        assert_eq!(allow.as_deref(), Some("GET, HEAD, POST, DELETE"), "{case}: Allow");
    }
    // "/open" is public, but "/open/admin" is the longer prefix: a method it
    // does not take stops there.
    let resp = send(Method::GET, "/open/admin/users", None).await;
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    assert_eq!(open.hits(), 0, "a method the longer prefix refuses fell through to the public route");
    assert_eq!(echo(send(Method::GET, "/open/other", None).await).await.upstream(), "open");
    let resp = send(Method::DELETE, "/open/admin/users", Some(&reader)).await;
    assert_error(resp, StatusCode::FORBIDDEN, "forbidden").await;

    let origin = "https://app.example.com";
    let preflight = |announces: &str| {
        app.client
            .request(Method::OPTIONS, app.url("/orders/7"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", announces)
    };
    let (reads_before, writes_before) = (reads.hits(), writes.hits());
    let e = echo(preflight("GET").send().await.expect("preflight for a GET")).await;
    assert_eq!((e.upstream(), e.method()), ("reads", "OPTIONS"), "{}", e.0);
    assert_eq!(e.one("access-control-request-method"), "GET", "{}", e.0);
    // The write route forwards no preflight without a token.
    assert_missing_token("a preflight for a DELETE", preflight("DELETE").send().await.expect("send")).await;
    let resp = preflight("PUT").send().await.expect("send");
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    // Routed by the method it announces, then not a preflight once its
    // Connection-nominated Origin is gone: refused, never forwarded.
    let resp = preflight("GET").header("Connection", "Origin").send().await.expect("send");
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    // So on a public route, where a preflight needs no token anyway.
    let resp = app
        .client
        .request(Method::OPTIONS, app.url("/open-get/x"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET")
        .header("Connection", "Access-Control-Request-Method")
        .send()
        .await
        .expect("send");
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    // A method with lower-case letters is no method a route judged; a
    // backend could upper-case it.
    for path in ["/orders/7", "/open/x"] {
        let head = format!("delete {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {reader}\r\n\r\n");
        let resp = raw_request(app.addr, head.as_bytes()).await;
        assert_eq!(resp.status, Some(400), "delete {path}: {}", resp.head);
    }
    assert_eq!(open.hits(), 1, "refused requests reached the public upstream");
    assert_eq!(
        (reads.hits(), writes.hits()),
        (reads_before + 1, writes_before),
        "refused requests reached an upstream"
    );

    let metrics = app.metrics().await;
    assert!(metric(&metrics, "gateway_requests_total", &[("route", "none"), ("status", "405")]) >= 6.0, "{metrics}");
    assert!(metric(&metrics, "gateway_requests_total", &[("route", "none"), ("status", "400")]) >= 2.0, "{metrics}");
    app.stop().await;
}

/// `headers.response_headers` (HSTS and friends) are on every answer of the
/// public listener: proxied ones (a route's own fields win), the gateway's
/// refusals before and after routing, 404s, the API and the JWKS, over
/// HTTP/1.1 and HTTP/2; and a reload changes them.
#[tokio::test]
async fn fields_for_every_answer_are_on_every_answer() {
    let svc = spawn_upstream("svc").await;
    let u = [svc.url()];
    let fields = |hsts: &str| {
        format!(
            "[headers]\nresponse_headers = {{ \"Strict-Transport-Security\" = \"{hsts}\", \"X-Frame-Options\" = \"DENY\", \
             \"X-Powered-By\" = \"the gateway\" }}\n"
        )
    };
    let routes = [
        route(
            "static",
            "/static",
            &u,
            "auth = \"public\"\nresponse_headers = { \"X-Frame-Options\" = \"SAMEORIGIN\" }",
        ),
        route("private", "/private", &u, ""),
        route("readonly", "/readonly", &u, "auth = \"public\"\nmethods = [\"GET\", \"HEAD\"]"),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(format!("{}{routes}", fields("max-age=60")))).await;
    let field = |resp: &Response, name: &str| resp.headers().get(name).map(|v| v.to_str().expect("ASCII").to_owned());
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().expect("an HTTP/2 client");

    let cases = [
        ("proxied", app.client.get(app.url("/static/x")), StatusCode::OK, "SAMEORIGIN"),
        ("no token", app.client.get(app.url("/private/x")), StatusCode::UNAUTHORIZED, "DENY"),
        ("no route", app.client.get(app.url("/nowhere")), StatusCode::NOT_FOUND, "DENY"),
        ("no such method", app.client.delete(app.url("/readonly/x")), StatusCode::METHOD_NOT_ALLOWED, "DENY"),
        ("a bad path", app.client.get(app.url("/static/a%2fb")), StatusCode::BAD_REQUEST, "DENY"),
        ("the API", app.client.get(app.url("/auth/me")), StatusCode::UNAUTHORIZED, "DENY"),
        ("the JWKS", app.client.get(app.url("/.well-known/jwks.json")), StatusCode::OK, "DENY"),
        ("HTTP/2, proxied", h2.get(app.url("/static/x")), StatusCode::OK, "SAMEORIGIN"),
        ("HTTP/2, no route", h2.get(app.url("/nowhere")), StatusCode::NOT_FOUND, "DENY"),
    ];
    for (case, req, status, frame) in cases {
        let resp = req.send().await.unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(resp.status(), status, "{case}");
        assert_eq!(field(&resp, "strict-transport-security").as_deref(), Some("max-age=60"), "{case}");
        assert_eq!(field(&resp, "x-frame-options").as_deref(), Some(frame), "{case}");
        // The test upstream sends its own X-Powered-By: replaced.
        assert_eq!(field(&resp, "x-powered-by").as_deref(), Some("the gateway"), "{case}");
    }
    // A head the parser refuses (a field without a colon).
    let r = raw_request(app.addr, b"GET /static/x HTTP/1.1\r\nHost: gw\r\nno colon here\r\n\r\n").await;
    assert_eq!(r.status, Some(400), "{}", r.head);
    assert_eq!(r.header("strict-transport-security"), Some("max-age=60"), "{}", r.head);
    assert_eq!(svc.hits(), 2);

    app.rewrite_config(&format!("{}{routes}", fields("max-age=63072000")));
    app.reloader.reload().unwrap_or_else(|e| panic!("reloading a valid config failed: {e}"));
    let resp = app.get("/nowhere").await;
    assert_eq!(field(&resp, "strict-transport-security").as_deref(), Some("max-age=63072000"));
    app.stop().await;
}

/// A route's `request_headers` replace every spelling the client sent and
/// reach the upstream on judged requests only (not on a preflight); its
/// `response_headers` are on every answer of the route, the gateway's own
/// 401 included; `remove_response_headers` drops the upstream's.
#[tokio::test]
async fn routes_set_request_and_response_fields() {
    let svc = spawn_upstream("svc").await;
    let u = [svc.url()];
    let basic = "Basic dXBzdHJlYW06c2VjcmV0";
    let extra = [
        route(
            "static",
            "/static",
            &u,
            &format!(
                "cors_preflight = true\nremove_response_headers = [\"X-Powered-By\"]\n\
                 request_headers = {{ \"X-Api-Version\" = \"2\", \"Authorization\" = \"{basic}\" }}\n\
                 response_headers = {{ \"Strict-Transport-Security\" = \"max-age=31536000\", \"X-Frame-Options\" = \"DENY\" }}"
            ),
        ),
        route("static-public", "/static-public", &u, "auth = \"public\"\nrequest_headers = { \"X-Api-Version\" = \"2\" }"),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    let user_id = app.create_user("default", ADMIN, PASSWORD, &[], &[]).await;
    let token = app.login_ok(ADMIN, PASSWORD, None).await.access_token;
    let hsts = |resp: &Response| resp.headers().get("strict-transport-security").cloned();

    let resp = app
        .client
        .get(app.url("/static/x"))
        .bearer_auth(&token)
        .header("X-Api-Version", "9")
        .header("X_Api_Version", "9")
        .header("x.api.version", "9")
        .send()
        .await
        .expect("GET /static/x");
    assert_eq!(hsts(&resp), Some(HeaderValue::from_static("max-age=31536000")));
    assert_eq!(resp.headers().get("x-frame-options"), Some(&HeaderValue::from_static("DENY")));
    assert!(resp.headers().get("x-powered-by").is_none(), "the upstream's X-Powered-By was not removed");
    let e = echo(resp).await;
    let versions: Vec<(&str, &str)> = e.pairs().into_iter().filter(|(n, _)| fold(n) == "x-api-version").collect();
    assert_eq!(versions, [("x-api-version", "2")], "{}", e.0);
    assert_eq!(e.all("authorization"), [basic], "the route's credential replaces the client's token: {}", e.0);
    assert_eq!(e.one("x-user-id"), user_id, "{}", e.0);

    // The gateway's own answer on the route carries the route's fields too.
    let resp = app.get("/static/x").await;
    assert_eq!(hsts(&resp), Some(HeaderValue::from_static("max-age=31536000")));
    assert_missing_token("no token", resp).await;
    assert_eq!(svc.hits(), 1);

    // A preflight goes on without the route's credential.
    let resp = app
        .client
        .request(Method::OPTIONS, app.url("/static/x"))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("preflight");
    let e = echo(resp).await;
    assert!(!e.has("authorization") && !e.has("x-api-version"), "a preflight carried the route's fields: {}", e.0);

    // Nominated by Connection, the client's is gone, and the route's set.
    let req =
        app.client.get(app.url("/static-public/x")).header("X-Api-Version", "9").header("Connection", "X-Api-Version");
    let e = echo(req.send().await.expect("GET")).await;
    assert_eq!(e.all("x-api-version"), ["2"], "{}", e.0);
    // Over HTTP/2 as well.
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().expect("an HTTP/2 client");
    let resp = h2.get(app.url("/static/h2")).bearer_auth(&token).header("x_api_version", "9").send().await.expect("h2");
    assert_eq!(hsts(&resp), Some(HeaderValue::from_static("max-age=31536000")));
    let e = echo(resp).await;
    assert_eq!(e.all("x-api-version"), ["2"], "{}", e.0);
    assert!(!e.has("x_api_version"), "{}", e.0);
    assert_eq!(e.all("authorization"), [basic], "{}", e.0);
    app.stop().await;
}

#[tokio::test]
async fn tenants_restrict_routes() {
    let f = fixture().await;
    let acme_id = f.app.create_tenant("acme").await;
    f.app.create_user("acme", "worker@acme.test", PASSWORD, &[], &[]).await;
    let acme = f.app.login_ok("worker@acme.test", PASSWORD, Some("acme")).await;

    // A default-tenant user, whatever their roles, is not acme.
    assert_error(f.get_as("/acme/x", &f.admin).await, StatusCode::FORBIDDEN, "forbidden").await;
    assert_eq!(f.svc.hits(), 0);

    // The acme user gets in once the gateway's tenant directory knows the new tenant.
    let (fx, worker) = (&f, &acme);
    eventually("acme user admitted to the acme route", Duration::from_secs(5), || async move {
        let resp = fx.get_as("/acme/x", worker).await;
        if resp.status() == StatusCode::OK {
            return true;
        }
        assert_error(resp, StatusCode::FORBIDDEN, "forbidden").await;
        false
    })
    .await;
    let e = echo(f.get_as("/acme/x", &acme).await).await;
    assert_eq!(e.one("x-tenant-id"), acme_id, "{}", e.0);
    // Routes without a tenant list admit every tenant.
    let e = echo(f.get_as("/private/x", &acme).await).await;
    assert_eq!(e.one("x-tenant-id"), acme_id, "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn request_id_is_kept_when_safe_and_replaced_otherwise() {
    let f = fixture().await;
    let max = "a".repeat(128);
    for kept in ["abc-123_x.y:Z", "0", max.as_str()] {
        let resp = f.send(kept, f.req("/public/x").header("X-Request-Id", kept)).await;
        assert_eq!(request_id_of(&resp), kept, "response X-Request-Id");
        let e = echo(resp).await;
        assert_eq!(e.one("x-request-id"), kept, "{}", e.0);
    }

    let too_long = "a".repeat(129);
    for replaced in ["has space", too_long.as_str(), "a/b", "", "a;b", "<script>", "ünï"] {
        let value = HeaderValue::from_bytes(replaced.as_bytes())
            .unwrap_or_else(|e| panic!("{replaced:?} is not a sendable header value: {e}"));
        let resp = f.send(replaced, f.req("/public/x").header("X-Request-Id", value)).await;
        let answered = request_id_of(&resp);
        let e = echo(resp).await;
        let seen = e.one("x-request-id");
        parse_uuid(seen, &format!("X-Request-Id replacing {replaced:?}"));
        assert_eq!(answered, seen, "the response carries the id the upstream saw");
    }

    // None sent: one is made up, the same on both sides.
    let resp = f.app.get("/public/x").await;
    let answered = request_id_of(&resp);
    let e = echo(resp).await;
    assert_eq!(e.one("x-request-id"), answered);
    parse_uuid(&answered, "generated X-Request-Id");
    // Fresh per request.
    let again = request_id_of(&f.app.get("/public/x").await);
    assert_ne!(again, answered, "request ids are not reused");

    // Error responses carry it too.
    for (path, status, code) in
        [("/private/x", StatusCode::UNAUTHORIZED, "unauthorized"), ("/nowhere", StatusCode::NOT_FOUND, "not_found")]
    {
        let resp = f.send(path, f.req(path).header("X-Request-Id", "trace-42")).await;
        assert_eq!(request_id_of(&resp), "trace-42", "{path}");
        assert_error_in(path, resp, status, code).await;
        let resp = f.app.get(path).await;
        parse_uuid(&request_id_of(&resp), &format!("{path}: generated X-Request-Id"));
        assert_error_in(path, resp, status, code).await;
    }
    f.app.stop().await;
}

#[tokio::test]
async fn forwarded_headers_are_replaced_for_untrusted_peers() {
    let f = fixture().await;
    let req = f
        .req("/private/x")
        .bearer_auth(&f.admin.access_token)
        .header("X-Forwarded-For", "1.2.3.4")
        .header("X-Forwarded-For", "5.6.7.8")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "evil.example");
    let e = echo(f.send("spoofed X-Forwarded-*", req).await).await;
    assert_eq!(e.one("x-forwarded-for"), "127.0.0.1", "{}", e.0);
    assert_eq!(e.one("x-forwarded-proto"), "http", "{}", e.0);
    assert_eq!(e.one("x-forwarded-host"), f.app.addr.to_string(), "{}", e.0);

    // X-Forwarded-Host is the client's Host.
    let req = f.req("/public/x").header(HOST, "shop.example.com");
    let e = echo(f.send("Host: shop.example.com", req).await).await;
    assert_eq!(e.one("x-forwarded-host"), "shop.example.com", "{}", e.0);
    assert_eq!(e.one("x-forwarded-for"), "127.0.0.1", "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn forwarded_for_is_extended_for_trusted_proxies() {
    let f = fixture_with("", "trusted_proxies = [\"127.0.0.1/32\"]").await;
    for (sent, want) in [
        (Some("1.2.3.4"), "1.2.3.4, 127.0.0.1"),
        (Some("5.6.7.8, 1.2.3.4"), "5.6.7.8, 1.2.3.4, 127.0.0.1"),
        (None, "127.0.0.1"),
    ] {
        // Other spellings never pass, even from a trusted proxy: to a
        // CGI-style backend `X_Forwarded_For` is the same variable.
        let mut req = f.req("/private/x").bearer_auth(&f.admin.access_token).header("X_Forwarded_For", "6.6.6.6");
        if let Some(sent) = sent {
            req = req.header("X-Forwarded-For", sent);
        }
        let e = echo(f.send(want, req).await).await;
        assert_eq!(e.one("x-forwarded-for"), want, "sent {sent:?}: {}", e.0);
        assert!(!e.has("x_forwarded_for"), "{}", e.0);
        // Without a Proto from the proxy, the gateway sets Proto and Host.
        assert_eq!(e.one("x-forwarded-proto"), "http", "{}", e.0);
        assert_eq!(e.one("x-forwarded-host"), f.app.addr.to_string(), "{}", e.0);
    }
    // A trusted proxy's Proto and Host are passed on as it sent them.
    let req = f
        .req("/public/x")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "shop.example.com")
        .header("X-Forwarded-For", "1.2.3.4");
    let e = echo(f.send("trusted proto", req).await).await;
    assert_eq!(e.one("x-forwarded-proto"), "https", "{}", e.0);
    assert_eq!(e.one("x-forwarded-host"), "shop.example.com", "{}", e.0);
    assert_eq!(e.one("x-forwarded-for"), "1.2.3.4, 127.0.0.1", "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn upstream_gets_its_own_host_unless_preserve_host() {
    let f = fixture().await;
    let upstream_host = f.svc.addr.to_string();
    for path in ["/private/x", "/public/x"] {
        let mut req = f.req(path).header(HOST, "shop.example.com");
        if path == "/private/x" {
            req = req.bearer_auth(&f.admin.access_token);
        }
        let e = echo(f.send(path, req).await).await;
        assert_eq!(e.one("host"), upstream_host, "{path}: {}", e.0);
        assert_eq!(e.one("x-forwarded-host"), "shop.example.com", "{path}: {}", e.0);
    }
    let req = f.req("/preserve/x").header(HOST, "shop.example.com");
    let e = echo(f.send("preserve_host", req).await).await;
    assert_eq!(e.one("host"), "shop.example.com", "{}", e.0);
    let e = echo(f.app.get("/preserve/x").await).await;
    assert_eq!(e.one("host"), f.app.addr.to_string(), "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn custom_header_names_replace_the_defaults() {
    let headers_table = r#"
[headers]
user_id = "X-Auth-User"
tenant_id = "X-Auth-Tenant"
roles = "X-Auth-Roles"
scopes = "X-Auth-Scopes"
session_id = "X-Auth-Session"
request_id = "X-Trace-Id"
reserved = ["X-Internal"]
"#;
    let f = fixture_with(headers_table, "").await;
    let req = f
        .req("/private/x")
        .bearer_auth(&f.admin.access_token)
        .header("X-Auth-User", "evil")
        .header("X_Auth_User", "evil")
        .header("X.Auth.Tenant", "evil")
        .header("X-User-Id", "evil")
        .header("X_Tenant_Id", "evil")
        .header("X-Internal", "1")
        .header("X-Trace-Id", "trace-1");
    let resp = f.send("custom names", req).await;
    let trace = resp.headers().get("x-trace-id").map(|v| v.to_str().expect("X-Trace-Id is ASCII").to_owned());
    assert_eq!(trace.as_deref(), Some("trace-1"), "the response carries the configured request id header");
    let e = echo(resp).await;
    assert_eq!(e.one("x-auth-user"), f.admin_id, "{}", e.0);
    assert_eq!(e.one("x-auth-tenant"), claim(&f.admin, "tid"), "{}", e.0);
    assert_eq!(set_of(e.one("x-auth-roles").split(',')), set_of(["admin", "ops"]), "{}", e.0);
    assert_eq!(set_of(e.one("x-auth-scopes").split(' ')), set_of(["orders:read", "orders:write"]), "{}", e.0);
    assert_eq!(e.one("x-auth-session"), claim(&f.admin, "sid"), "{}", e.0);
    assert_eq!(e.one("x-trace-id"), "trace-1", "{}", e.0);
    for name in e.names() {
        let folded = fold(name);
        // The defaults stay reserved whatever the configured names are.
        assert!(
            !IDENTITY.contains(&folded.as_str()) && folded != "x-internal",
            "{name} reached the upstream though it is reserved: {}",
            e.0
        );
        // The configured names arrive only in their canonical spelling (the injected ones).
        if folded.starts_with("x-auth-") {
            assert_eq!(name, folded, "a spoofed spelling {name} reached the upstream: {}", e.0);
        }
    }

    // Public route: none of the renamed identity headers either.
    let req = f.req("/public/x").header("X-Auth-User", "evil").header("X_Auth_Session", "evil");
    let e = echo(f.send("public", req).await).await;
    for name in e.names() {
        assert!(!fold(name).starts_with("x-auth-"), "{name} reached a public upstream: {}", e.0);
    }
    f.app.stop().await;
}

#[tokio::test]
async fn client_sent_forwarding_and_rewrite_headers_never_reach_the_upstream() {
    // What frameworks read as the client's address or the request's "real" path or method
    // (which a route's `methods` judged); only the gateway may state those, so they are
    // dropped even from a trusted proxy.
    let spoofs = [
        ("Forwarded", "for=1.2.3.4;proto=https;host=evil.example"),
        ("Forwarded", "for=5.6.7.8"),
        ("X-Real-IP", "1.2.3.4"),
        ("X_Real_IP", "1.2.3.4"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Original-URL", "/admin/users"),
        ("x.original.url", "/admin/users"),
        ("X-Rewrite-URL", "/admin/users"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X_HTTP_Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
    ];
    let dropped = [
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    for (peer, server_extra) in [("untrusted peer", ""), ("trusted proxy", "trusted_proxies = [\"127.0.0.1/32\"]")] {
        let f = fixture_with("", server_extra).await;
        for (path, tokens) in [("/private/x", Some(&f.admin)), ("/public/x", None)] {
            let case = format!("{peer}, {path}");
            let mut req = f.req(path);
            if let Some(t) = tokens {
                req = req.bearer_auth(&t.access_token);
            }
            for (name, value) in spoofs {
                req = req.header(name, value);
            }
            let e = echo(f.send(&case, req).await).await;
            for name in e.names() {
                assert!(!dropped.contains(&fold(name).as_str()), "{case}: {name} reached the upstream: {}", e.0);
            }
            // The gateway's own account of the hop is there, and the request was otherwise intact.
            assert_eq!(e.one("x-forwarded-for"), "127.0.0.1", "{case}: {}", e.0);
            assert_eq!(e.path(), path, "{case}: {}", e.0);
            if tokens.is_some() {
                assert_eq!(e.one("x-user-id"), f.admin_id, "{case}: {}", e.0);
            }
        }
        f.app.stop().await;
    }
}

/// A token the proxy has verified and cached (in the shared cache and in the worker's own
/// map in front of it) stops working the moment its signing key is removed and the keys
/// are reloaded; a token from the new key works.
#[tokio::test]
async fn a_removed_key_stops_a_cached_token_at_once() {
    let svc = spawn_upstream("svc").await;
    // One worker: every request meets the same per-thread map.
    let app = spawn_app_with(TestOptions {
        server_extra: "workers = 1".to_owned(),
        extra: route("svc", "/svc", &[svc.url()], ""),
        ..TestOptions::default()
    })
    .await;
    app.create_user("default", NOBODY, PASSWORD, &[], &[]).await;
    let old = app.login_ok(NOBODY, PASSWORD, None).await;
    for _ in 0..3 {
        let e = echo(app.get_authed("/svc/x", &old.access_token).await).await;
        assert!(e.has("x-user-id"), "the token was not accepted before the key went");
    }
    let old_keys = app.key_pem_paths();
    app.cli(&["keys", "generate"], "").await.expect("keys generate");
    for path in old_keys {
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }
    app.reloader.reload_keys();
    assert_invalid_token(app.get_authed("/svc/x", &old.access_token).await).await;
    let new = app.login_ok(NOBODY, PASSWORD, None).await;
    let e = echo(app.get_authed("/svc/x", &new.access_token).await).await;
    assert!(e.has("x-user-id"), "a token from the new key was refused");
    app.stop().await;
}
