//! Proxy routing: longest segment-aware prefix, host-specific routes first, 404 for the
//! rest; the upstream receives exactly the normalised path (minus the prefix with
//! `strip_prefix`, under the upstream's base path) and the query untouched; paths that
//! could be read two ways are 400. Paths reqwest would normalise itself go over raw TCP.

use reqwest::header::HOST;
use reqwest::StatusCode;

use crate::helpers::{
    assert_error, assert_error_in, raw_get, route, spawn_app, spawn_app_with, TestApp, TestOptions, PASSWORD,
};
use crate::upstream::{echo, spawn_upstream, Echo, Upstream};

const EMAIL: &str = "me@example.com";

struct Fixture {
    app: TestApp,
    upstreams: Vec<Upstream>,
}

impl Fixture {
    fn total_hits(&self) -> usize {
        self.upstreams.iter().map(Upstream::hits).sum()
    }

    async fn get(&self, path: &str) -> Echo {
        echo(self.app.get(path).await).await
    }

    async fn get_host(&self, path: &str, host: &str) -> reqwest::Response {
        self.app
            .client
            .get(self.app.url(path))
            .header(HOST, host)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} (Host: {host}): {e}"))
    }

    /// A raw GET (the path goes out exactly as written); asserts 200 and parses the echo.
    async fn raw_echo(&self, path: &str) -> Echo {
        Echo(raw_get(self.app.addr, path, "gateway.test", &[]).await.json_ok(&format!("GET {path}")))
    }
}

/// Public routes (no token needed), each on its own upstream named after the route.
async fn fixture() -> Fixture {
    let api = spawn_upstream("api").await;
    let orders = spawn_upstream("orders").await;
    let strip = spawn_upstream("strip").await;
    let based = spawn_upstream("based").await;
    let host_api = spawn_upstream("host-api").await;
    let host_only = spawn_upstream("host-only").await;
    let public = "auth = \"public\"";
    let strip_lines = "auth = \"public\"\nstrip_prefix = true";
    let extra = [
        route("api", "/api", &[api.url()], public),
        route("orders", "/api/orders", &[orders.url()], public),
        route("strip", "/strip", &[strip.url()], strip_lines),
        route("based", "/based", &[format!("{}/base", based.url())], strip_lines),
        route("based-unstripped", "/unstripped", &[format!("{}/base", based.url())], public),
        route("host-api", "/api", &[host_api.url()], "auth = \"public\"\nhost = \"api.example.com\""),
        route("host-only", "/hostonly", &[host_only.url()], "auth = \"public\"\nhost = \"admin.example.com\""),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    Fixture { app, upstreams: vec![api, orders, strip, based, host_api, host_only] }
}

#[tokio::test]
async fn longest_segment_aware_prefix_wins() {
    let f = fixture().await;
    for (path, upstream, seen) in [
        ("/api/orders/7", "orders", "/api/orders/7"),
        ("/api/orders", "orders", "/api/orders"),
        ("/api/orders/", "orders", "/api/orders/"),
        ("/api/orders/7/items/3", "orders", "/api/orders/7/items/3"),
        ("/api/ordersx", "api", "/api/ordersx"),
        ("/api/ordersx/7", "api", "/api/ordersx/7"),
        ("/api", "api", "/api"),
        ("/api/", "api", "/api/"),
        ("/api/other/deep/path", "api", "/api/other/deep/path"),
    ] {
        let e = f.get(path).await;
        assert_eq!(e.upstream(), upstream, "GET {path}: {}", e.0);
        assert_eq!(e.path(), seen, "GET {path}: {}", e.0);
        assert_eq!(e.method(), "GET", "GET {path}: {}", e.0);
        assert_eq!(e.query(), None, "GET {path}: {}", e.0);
    }
    assert_eq!(f.total_hits(), 9);
    f.app.stop().await;
}

#[tokio::test]
async fn unmatched_paths_are_404_not_found() {
    let f = fixture().await;
    for path in ["/", "/apix", "/ap", "/nothing/here", "/stripx", "/hostonly/x", "/orders"] {
        let resp = f.app.get(path).await;
        assert!(resp.headers().contains_key("x-request-id"), "GET {path}: 404 carries X-Request-Id");
        assert_error_in(&format!("GET {path}"), resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    assert_eq!(f.total_hits(), 0, "a 404 reached an upstream");

    // No routes at all: everything but the gateway's own API is 404.
    let empty = spawn_app().await;
    assert_error(empty.get("/api/orders").await, StatusCode::NOT_FOUND, "not_found").await;
    empty.stop().await;
    f.app.stop().await;
}

#[tokio::test]
async fn upstream_receives_the_normalised_path() {
    let f = fixture().await;
    for (raw, upstream, path, query) in [
        ("/api//orders/./7?b=2&a=1", "orders", "/api/orders/7", Some("b=2&a=1")),
        ("//api///orders//7/", "orders", "/api/orders/7/", None),
        ("/api/x/../orders/7", "orders", "/api/orders/7", None),
        ("/api/x/%2e%2e/orders/7", "orders", "/api/orders/7", None),
        ("/api/x/%2E%2E/orders/7", "orders", "/api/orders/7", None),
        ("/api/orders/%2e/7", "orders", "/api/orders/7", None),
        ("/api/%6Frders/7", "orders", "/api/orders/7", None),
        ("/%61pi/orders", "orders", "/api/orders", None),
        ("/api/orders/./", "orders", "/api/orders/", None),
        ("/api/orders/7/..", "orders", "/api/orders/", None),
        ("/api/a%20b", "api", "/api/a%20b", None),
        ("/api/a%2a", "api", "/api/a%2A", None),
        ("/api/caf%C3%A9", "api", "/api/caf%C3%A9", None),
        // The query is never normalised, whatever it contains.
        ("/api/orders/7?x=%2F..%2F&y=a//b&z=%2e", "orders", "/api/orders/7", Some("x=%2F..%2F&y=a//b&z=%2e")),
    ] {
        let e = f.raw_echo(raw).await;
        assert_eq!(e.upstream(), upstream, "GET {raw}: {}", e.0);
        assert_eq!(e.path(), path, "GET {raw}: {}", e.0);
        assert_eq!(e.query(), query, "GET {raw}: {}", e.0);
    }
    f.app.stop().await;
}

#[tokio::test]
async fn query_string_is_forwarded_untouched() {
    let f = fixture().await;
    let query = "a=1&a=2&b=%2F%2e%2E&c=x+y&empty=&flag&d=%C3%A9";
    let e = f.get(&format!("/api/orders/1?{query}")).await;
    assert_eq!(e.upstream(), "orders", "{}", e.0);
    assert_eq!(e.path(), "/api/orders/1", "{}", e.0);
    assert_eq!(e.query(), Some(query), "{}", e.0);

    // With strip_prefix too.
    let e = f.get(&format!("/strip/x?{query}")).await;
    assert_eq!(e.path(), "/x", "{}", e.0);
    assert_eq!(e.query(), Some(query), "{}", e.0);

    let e = f.get("/api/orders/1").await;
    assert_eq!(e.query(), None, "no query must stay no query: {}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn path_tricks_are_400_invalid_request() {
    let f = fixture().await;
    for raw in [
        "/api/a%2fb",
        "/api/a%2Fb",
        "/api/orders%2f7",
        "/api/a%5cb",
        "/api/a%5Cb",
        "/api/a%00b",
        "/api/a%0d%0aX-Injected:%20yes",
        "/api/..%2f..%2fetc",
        "/api/orders/..%2F7",
        "/..%2f..",
        "/%2e%2e/x",
        "/%2E%2E/api/orders",
        "/..",
        "/../api/orders",
        "/api/../../etc",
        "/api/%2e%2e/%2e%2e/x",
        "/api/a%zz",
        "/api/a%2",
    ] {
        let resp = raw_get(f.app.addr, raw, "gateway.test", &[]).await;
        assert!(resp.header("x-request-id").is_some(), "GET {raw}: 400 carries X-Request-Id; head: {}", resp.head);
        resp.assert_error(&format!("GET {raw}"), 400, "invalid_request");
    }
    assert_eq!(f.total_hits(), 0, "a refused path reached an upstream");
    f.app.stop().await;
}

#[tokio::test]
async fn dot_segments_are_resolved_before_the_policy() {
    let api = spawn_upstream("api").await;
    let public = spawn_upstream("public").await;
    let extra =
        [route("private", "/api", &[api.url()], ""), route("public", "/public", &[public.url()], "auth = \"public\"")]
            .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let tokens = app.login_ok(EMAIL, PASSWORD, None).await;

    // Judged as /api/x (required): no token, 401, and neither upstream sees anything.
    // Empty segments are dropped before dot segments are resolved, so
    // `/public//../api/x` is /api/x too, the path the upstream would get.
    for raw in [
        "/public/../api/x",
        "/public/%2e%2e/api/x",
        "/public/%2E%2E/api/x",
        "/public/./../api/x",
        "/public/.%2e/api/x",
        "/public/%2e./api/x",
        "//api/x",
        "/public//../api/x",
        "/./api/x",
        "/public/x/../../api/x",
    ] {
        let resp = raw_get(app.addr, raw, "gateway.test", &[]).await;
        assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "GET {raw}: head: {}", resp.head);
        resp.assert_error(&format!("GET {raw}"), 401, "unauthorized");
    }
    assert_eq!(api.hits(), 0, "an unauthenticated request reached the private upstream");
    assert_eq!(public.hits(), 0, "a path resolving to /api reached the public upstream");

    // With a token, the same trick is simply /api/x.
    let bearer = format!("Authorization: Bearer {}", tokens.access_token);
    let e = Echo(
        raw_get(app.addr, "/public/%2e%2e/api/x", "gateway.test", &[bearer.as_str()])
            .await
            .json_ok("GET /public/%2e%2e/api/x with a token"),
    );
    assert_eq!(e.upstream(), "api", "{}", e.0);
    assert_eq!(e.path(), "/api/x", "{}", e.0);
    assert_eq!(public.hits(), 0);

    // Control: the public route itself needs no token.
    let e = echo(app.get("/public/x").await).await;
    assert_eq!(e.upstream(), "public", "{}", e.0);
    app.stop().await;
}

#[tokio::test]
async fn strip_prefix_removes_the_route_prefix() {
    let f = fixture().await;
    for (path, upstream, seen, query) in [
        ("/strip/a/b?q=1", "strip", "/a/b", Some("q=1")),
        ("/strip/a/b/", "strip", "/a/b/", None),
        ("/strip", "strip", "/", None),
        ("/strip/", "strip", "/", None),
        ("/strip?q=1", "strip", "/", Some("q=1")),
        // Upstream with a base path: the rest goes under it.
        ("/based/7", "based", "/base/7", None),
        ("/based/7?x=y", "based", "/base/7", Some("x=y")),
        ("/based", "based", "/base/", None),
        // Base path without strip_prefix: the whole path goes under it.
        ("/unstripped/x", "based", "/base/unstripped/x", None),
    ] {
        let e = f.get(path).await;
        assert_eq!(e.upstream(), upstream, "GET {path}: {}", e.0);
        assert_eq!(e.path(), seen, "GET {path}: {}", e.0);
        assert_eq!(e.query(), query, "GET {path}: {}", e.0);
        // What was stripped, so that the backend can write links the
        // client can follow; nothing where nothing was.
        let prefix = path.split(['/', '?']).nth(1).map(|p| format!("/{p}"));
        let stripped = prefix.filter(|p| p != "/unstripped");
        assert_eq!(e.all("x-forwarded-prefix"), stripped.as_slice(), "GET {path}: {}", e.0);
    }
    // A client's X-Forwarded-Prefix (any spelling) never passes; the route's stands.
    let req = f
        .app
        .client
        .get(f.app.url("/strip/a"))
        .header("X-Forwarded-Prefix", "/evil")
        .header("X_Forwarded_Prefix", "/evil");
    let e = echo(req.send().await.expect("GET /strip/a")).await;
    assert_eq!(
        e.pairs().into_iter().filter(|(n, _)| n.contains("prefix")).collect::<Vec<_>>(),
        [("x-forwarded-prefix", "/strip")],
        "{}",
        e.0
    );
    let req = f.app.client.get(f.app.url("/unstripped/a")).header("X-Forwarded-Prefix", "/evil");
    let e = echo(req.send().await.expect("GET /unstripped/a")).await;
    assert!(!e.has("x-forwarded-prefix"), "{}", e.0);
    // Segment-aware: /stripx is not under /strip.
    assert_error(f.app.get("/stripx/a").await, StatusCode::NOT_FOUND, "not_found").await;
    // Stripping happens after normalisation.
    let e = f.raw_echo("/strip/./a/../b").await;
    assert_eq!(e.path(), "/b", "{}", e.0);
    f.app.stop().await;
}

#[tokio::test]
async fn host_specific_routes_win_over_hostless_ones() {
    let f = fixture().await;
    let gateway_host = f.app.addr.to_string();
    for (host, path, upstream) in [
        ("api.example.com", "/api/x", "host-api"),
        ("API.Example.COM", "/api/x", "host-api"),
        ("api.example.com.", "/api/x", "host-api"),
        ("api.example.com:8443", "/api/x", "host-api"),
        ("api.example.com.:8443", "/api/x", "host-api"),
        // Host-specific before host-less, even against a longer host-less prefix.
        ("api.example.com", "/api/orders/7", "host-api"),
        ("other.example.com", "/api/orders/7", "orders"),
        ("other.example.com", "/api/x", "api"),
        (gateway_host.as_str(), "/api/x", "api"),
        ("admin.example.com", "/hostonly/x", "host-only"),
        // Host-less routes serve every host.
        ("admin.example.com", "/api/orders/7", "orders"),
    ] {
        let e = echo(f.get_host(path, host).await).await;
        assert_eq!(e.upstream(), upstream, "GET {path} Host: {host}: {}", e.0);
        assert_eq!(e.path(), path, "GET {path} Host: {host}: {}", e.0);
    }
    // A route for one host does not serve another.
    for host in ["api.example.com", "other.example.com", "admin.example.com.evil", gateway_host.as_str()] {
        assert_error_in(
            &format!("GET /hostonly/x Host: {host}"),
            f.get_host("/hostonly/x", host).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    f.app.stop().await;
}

#[tokio::test]
async fn semicolons_in_the_path_are_400_invalid_request() {
    // Servlet containers read `;params` and `..;` as path syntax: `/admin;x/users` is their
    // /admin/users, `/api/..;/admin` their /admin. A catch-all route shows the 400 is not a 404.
    let svc = spawn_upstream("svc").await;
    let public = "auth = \"public\"";
    let extra = [
        route("admin", "/admin", &[svc.url()], public),
        route("api", "/api", &[svc.url()], public),
        route("root", "/", &[svc.url()], public),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    for raw in [
        "/admin;x/users",
        "/api/..;/admin",
        "/a%3bb",
        "/a%3Bb",
        "/admin/users;jsessionid=0123",
        "/api;/x",
        "/;",
        "/auth/me;x",
    ] {
        let resp = raw_get(app.addr, raw, "gateway.test", &[]).await;
        assert!(resp.header("x-request-id").is_some(), "GET {raw}: 400 carries X-Request-Id; head: {}", resp.head);
        resp.assert_error(&format!("GET {raw}"), 400, "invalid_request");
    }
    assert_eq!(svc.hits(), 0, "a path with a ';' reached the upstream");

    // Control: the same routes serve the paths without it, and a ';' in the query is no path syntax.
    for (raw, path, query) in
        [("/admin/users", "/admin/users", None), ("/api/x?a=1;b=2", "/api/x", Some("a=1;b=2")), ("/ab", "/ab", None)]
    {
        let e = Echo(raw_get(app.addr, raw, "gateway.test", &[]).await.json_ok(&format!("GET {raw}")));
        assert_eq!(e.path(), path, "GET {raw}: {}", e.0);
        assert_eq!(e.query(), query, "GET {raw}: {}", e.0);
    }
    assert_eq!(svc.hits(), 3);
    app.stop().await;
}
