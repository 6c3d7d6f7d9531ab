//! A route's rules on who may call it at what rate: `rate_limit`, so many
//! requests per period for each user, tenant or client address (past it a
//! 429 `rate_limited` with `Retry-After`, and the upstream never sees the
//! request; a reload that leaves the limit alone leaves every allowance
//! where it was); and `allow_ips`, the addresses a route takes requests
//! from.

use reqwest::StatusCode;

use crate::helpers::{assert_error_in, config_toml, metric, route, spawn_app_with, TestApp, TestOptions, PASSWORD};
use crate::upstream::{echo, spawn_upstream, Upstream};

/// Two requests an hour for each key (one each half hour, after the burst).
const TWO_AN_HOUR: &str = "requests = 2, per = \"1h\"";

/// A 429 from the route's limit, with the wait until the next allowed
/// request (half an hour here) in `Retry-After`.
async fn assert_limited(case: &str, resp: reqwest::Response) {
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().expect("ASCII").to_owned());
    assert_error_in(case, resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let retry: u64 = retry.unwrap_or_else(|| panic!("{case}: no Retry-After")).parse().expect("seconds");
    assert!((1790..=1800).contains(&retry), "{case}: Retry-After {retry}");
}

async fn limited_app(svc: &Upstream, name: &str, lines: &str) -> TestApp {
    let extra = route(name, &format!("/{name}"), &[svc.url()], lines);
    spawn_app_with(TestOptions::with_extra(extra)).await
}

/// By user (the default on a required route): each user has an allowance
/// of their own, and one user's 429s reach no upstream.
#[tokio::test]
async fn each_user_has_an_allowance_of_their_own() {
    let svc = spawn_upstream("per-user").await;
    let app = limited_app(&svc, "per-user", &format!("rate_limit = {{ {TWO_AN_HOUR} }}")).await;
    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    app.create_user("default", "b@example.com", PASSWORD, &[], &[]).await;
    let a = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    let b = app.login_ok("b@example.com", PASSWORD, None).await.access_token;
    for _ in 0..2 {
        echo(app.get_authed("/per-user/x", &a).await).await;
    }
    assert_limited("a's third", app.get_authed("/per-user/x", &a).await).await;
    assert_eq!(svc.hits(), 2, "a refused request reached the upstream");
    echo(app.get_authed("/per-user/x", &b).await).await;
    // Unauthenticated requests are refused as ever, not counted.
    assert_error_in("no token", app.get("/per-user/x").await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    echo(app.get_authed("/per-user/x", &b).await).await;
    assert_limited("b's third", app.get_authed("/per-user/x", &b).await).await;
    let limited = metric(&app.metrics().await, "gateway_rate_limited_total", &[("route", "per-user")]);
    assert_eq!(limited, 2.0);
    app.stop().await;
}

/// By tenant: the users of one tenant share its allowance; another
/// tenant's are untouched.
#[tokio::test]
async fn a_tenants_users_share_its_allowance() {
    let svc = spawn_upstream("per-tenant").await;
    let app = limited_app(&svc, "per-tenant", &format!("rate_limit = {{ {TWO_AN_HOUR}, by = \"tenant\" }}")).await;
    app.create_tenant("acme").await;
    app.create_user("acme", "a@acme.example", PASSWORD, &[], &[]).await;
    app.create_user("acme", "b@acme.example", PASSWORD, &[], &[]).await;
    app.create_user("default", "c@example.com", PASSWORD, &[], &[]).await;
    let a = app.login_ok("a@acme.example", PASSWORD, Some("acme")).await.access_token;
    let b = app.login_ok("b@acme.example", PASSWORD, Some("acme")).await.access_token;
    let c = app.login_ok("c@example.com", PASSWORD, None).await.access_token;
    echo(app.get_authed("/per-tenant/x", &a).await).await;
    echo(app.get_authed("/per-tenant/x", &b).await).await;
    assert_limited("a after the tenant's two", app.get_authed("/per-tenant/x", &a).await).await;
    assert_limited("b after the tenant's two", app.get_authed("/per-tenant/x", &b).await).await;
    echo(app.get_authed("/per-tenant/x", &c).await).await;
    assert_eq!(svc.hits(), 3, "a refused request reached the upstream");
    app.stop().await;
}

/// By address (the default on a public route): counted before any token
/// is looked at, so on a required route a flood of forged tokens is
/// refused with 429 once the allowance is spent, without a verification.
#[tokio::test]
async fn a_limit_by_address_counts_before_the_token() {
    let svc = spawn_upstream("per-ip").await;
    let public =
        route("per-ip", "/per-ip", &[svc.url()], &format!("auth = \"public\"\nrate_limit = {{ {TWO_AN_HOUR} }}"));
    let forged = route("forged", "/forged", &[svc.url()], &format!("rate_limit = {{ {TWO_AN_HOUR}, by = \"ip\" }}"));
    let app = spawn_app_with(TestOptions::with_extra(format!("{public}{forged}"))).await;
    for _ in 0..2 {
        echo(app.get("/per-ip/x").await).await;
    }
    assert_limited("the public route's third", app.get("/per-ip/x").await).await;

    let bad = "eyJhbGciOiJFZERTQSIsImtpZCI6Im5vIn0.e30.c2lnbmF0dXJl";
    for i in 0..2 {
        let resp = app.get_authed("/forged/x", bad).await;
        assert_error_in(&format!("forged token {i}"), resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
    assert_limited("a third forged token", app.get_authed("/forged/x", bad).await).await;
    assert_eq!(svc.hits(), 2);
    app.stop().await;
}

/// A reload that leaves a route's limit as it was keeps every allowance
/// where it was (reloads happen for any edit of the file); one that
/// changes the limit starts the route afresh.
#[tokio::test]
async fn a_reload_keeps_allowances_unless_the_limit_changes() {
    let svc = spawn_upstream("kept").await;
    let limit = |requests: u32| {
        route("kept", "/kept", &[svc.url()], &format!("rate_limit = {{ requests = {requests}, per = \"1h\" }}"))
    };
    let opts =
        TestOptions { extra: limit(2), server_extra: "config_poll = \"0s\"".to_owned(), ..TestOptions::default() };
    let app = spawn_app_with(opts).await;
    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    let a = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    for _ in 0..2 {
        echo(app.get_authed("/kept/x", &a).await).await;
    }
    let reload = |extra: String| {
        app.write_raw_config(&config_toml(&TestOptions { extra, ..app.opts.clone() }));
        app.reloader.reload().unwrap_or_else(|e| panic!("reload failed: {e}"));
    };
    // Another route added: this one's limit is unchanged.
    reload(limit(2) + &route("other", "/other", &[svc.url()], ""));
    assert_limited("after an unrelated reload", app.get_authed("/kept/x", &a).await).await;
    reload(limit(3));
    echo(app.get_authed("/kept/x", &a).await).await;
    app.stop().await;
}

/// Behind a trusted proxy, the client is the right-most address of
/// `X-Forwarded-For` the proxy did not vouch for, read from the right. A
/// client cannot dodge a limit by address by writing a new address left of
/// the proxy's entry each time: an entry with a port is still an address,
/// and one that is no address at all stops the walk at the proxy.
#[tokio::test]
async fn a_limit_by_address_cannot_be_dodged_through_x_forwarded_for() {
    let svc = spawn_upstream("xff").await;
    let lines = format!("auth = \"public\"\nrate_limit = {{ {TWO_AN_HOUR} }}");
    let opts = TestOptions {
        extra: route("xff", "/xff", &[svc.url()], &lines),
        server_extra: "trusted_proxies = [\"127.0.0.1/32\"]".to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let get = |xff: String| {
        let app = &app;
        async move {
            let resp = app.client.get(app.url("/xff/x")).header("x-forwarded-for", &xff).send().await;
            (resp.unwrap_or_else(|e| panic!("GET with {xff}: {e}")), xff)
        }
    };
    // Two clients behind the proxy: an allowance each.
    for client in ["198.51.100.1", "198.51.100.2"] {
        for _ in 0..2 {
            echo(get(client.to_owned()).await.0).await;
        }
        let (resp, xff) = get(client.to_owned()).await;
        assert_limited(&xff, resp).await;
    }
    // The proxy wrote the client with its port; the client's own entries vary.
    for tail in ["203.0.113.9:4711", "[2001:db8::9]:443", "unknown"] {
        for i in 0..2 {
            echo(get(format!("10.9.9.{i}, {tail}")).await.0).await;
        }
        let (resp, xff) = get(format!("10.9.9.7, {tail}")).await;
        assert_limited(&xff, resp).await;
    }
    app.stop().await;
}

/// `allow_ips`: a client outside the ranges gets 403 before its token is
/// read (a valid one included) and reaches no upstream; one inside goes on
/// to the usual checks. The address is the client's as
/// `server.trusted_proxies` resolve it, in forward auth too.
#[tokio::test]
async fn allow_ips_refuses_other_addresses_before_the_token() {
    let svc = spawn_upstream("allow").await;
    let routes = [
        route("office", "/office", &[svc.url()], "allow_ips = [\"198.51.100.0/24\", \"2001:db8::7\"]"),
        route("lan", "/lan", &[svc.url()], "auth = \"public\"\nallow_ips = [\"127.0.0.1\"]"),
    ];
    let opts = TestOptions {
        extra: format!("{}\n[forward_auth]\nenabled = true\n", routes.concat()),
        server_extra: "trusted_proxies = [\"127.0.0.1/32\"]".to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    app.create_user("default", "a@example.com", PASSWORD, &[], &[]).await;
    let token = app.login_ok("a@example.com", PASSWORD, None).await.access_token;
    let get = |path: &'static str, xff: Option<&'static str>, token: Option<&str>| {
        let mut req = app.client.get(app.url(path));
        if let Some(xff) = xff {
            req = req.header("x-forwarded-for", xff);
        }
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        async move { req.send().await.unwrap_or_else(|e| panic!("GET {path}: {e}")) }
    };

    // The peer itself (no X-Forwarded-For) is 127.0.0.1: outside the office.
    let before = svc.hits();
    assert_error_in("the peer", get("/office/x", None, Some(&token)).await, StatusCode::FORBIDDEN, "forbidden").await;
    let far = get("/office/x", Some("203.0.113.5"), Some(&token)).await;
    assert_error_in("another address", far, StatusCode::FORBIDDEN, "forbidden").await;
    let forged = get("/office/x", Some("203.0.113.5"), Some("forged.token.here")).await;
    assert_error_in("before the token is read", forged, StatusCode::FORBIDDEN, "forbidden").await;
    assert_eq!(svc.hits(), before, "no refused request reached the upstream");
    // Inside: the token is still required, then the request goes through.
    let inside = get("/office/x", Some("198.51.100.23"), None).await;
    assert_error_in("inside, without a token", inside, StatusCode::UNAUTHORIZED, "unauthorized").await;
    echo(get("/office/x", Some("198.51.100.23"), Some(&token)).await).await;
    echo(get("/office/x", Some("2001:db8::7"), Some(&token)).await).await;
    // A public route with the local address only.
    echo(get("/lan/x", None, None).await).await;
    let far = get("/lan/x", Some("198.51.100.23"), None).await;
    assert_error_in("the public route, from afar", far, StatusCode::FORBIDDEN, "forbidden").await;

    // Forward auth judges the described request by the same rule.
    let ask = |xff: &'static str| {
        let req = app
            .client
            .get(app.url("/auth/forward-auth"))
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-host", "app.example")
            .header("x-forwarded-uri", "/office/x")
            .header("x-forwarded-for", xff)
            .bearer_auth(&token);
        async move { req.send().await.expect("GET /auth/forward-auth") }
    };
    assert_eq!(ask("198.51.100.23").await.status(), StatusCode::OK);
    assert_error_in("forward auth from afar", ask("203.0.113.5").await, StatusCode::FORBIDDEN, "forbidden").await;

    // A client's own bytes left of the proxy's entry change nothing: not
    // bytes that are no text (the entry on their right still counts)...
    let with_xff = |xff: &'static [u8]| {
        let value = reqwest::header::HeaderValue::from_bytes(xff).expect("a header value");
        let req = app.client.get(app.url("/office/x")).header("x-forwarded-for", value).bearer_auth(&token);
        async move { req.send().await.expect("GET /office/x") }
    };
    echo(with_xff(b"\xff\xfe, 198.51.100.23").await).await;
    let far = with_xff(b"198.51.100.23\xff, 203.0.113.5").await;
    assert_error_in("junk and a far address", far, StatusCode::FORBIDDEN, "forbidden").await;
    // ...and an entry that is no address, where the walk stops at the
    // proxy, admits no one, though the proxy's own address would.
    let lan = app.client.get(app.url("/lan/x")).header("x-forwarded-for", "unknown").send().await.expect("GET");
    assert_error_in("an unknown client at the proxy", lan, StatusCode::FORBIDDEN, "forbidden").await;
    app.stop().await;
}

/// Without trusted proxies the peer is the client, whatever
/// `X-Forwarded-For` says; and a limit by address on a route with
/// `allow_ips` counts only the requests it admits.
#[tokio::test]
async fn allow_ips_without_trusted_proxies_reads_the_peer_only() {
    let svc = spawn_upstream("peer").await;
    let routes = [
        route("near", "/near", &[svc.url()], "auth = \"public\"\nallow_ips = [\"127.0.0.0/8\"]"),
        route("far", "/far", &[svc.url()], "auth = \"public\"\nallow_ips = [\"198.51.100.0/24\"]"),
        route(
            "both",
            "/both",
            &[svc.url()],
            &format!("auth = \"public\"\nallow_ips = [\"127.0.0.1\"]\nrate_limit = {{ {TWO_AN_HOUR} }}"),
        ),
    ];
    let app = spawn_app_with(TestOptions::with_extra(routes.concat())).await;
    let get = |path: &'static str, xff: &'static str| {
        let req = app.client.get(app.url(path)).header("x-forwarded-for", xff);
        async move { req.send().await.unwrap_or_else(|e| panic!("GET {path}: {e}")) }
    };
    echo(get("/near/x", "203.0.113.5").await).await;
    let forged = get("/far/x", "198.51.100.23").await;
    assert_error_in("a forged X-Forwarded-For", forged, StatusCode::FORBIDDEN, "forbidden").await;
    for _ in 0..2 {
        echo(get("/both/x", "-").await).await;
    }
    assert_limited("past the allowance", get("/both/x", "-").await).await;
    app.stop().await;
}
