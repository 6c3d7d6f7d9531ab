//! Hot reload of routes and header settings: `Reloader::reload` swaps a valid file in
//! atomically, refuses an invalid one (naming the field) and keeps the running routes; the
//! gateway also notices a changed file by itself.

use std::time::Duration;

use reqwest::header::ORIGIN;
use reqwest::{Method, StatusCode};

use crate::helpers::{
    assert_error, assert_error_in, config_toml, eventually, route, spawn_app_with, TestOptions, PASSWORD,
};
use crate::upstream::{echo, spawn_upstream};

const PUBLIC: &str = "auth = \"public\"";

#[tokio::test]
async fn reload_swaps_in_the_new_routes() {
    let first = spawn_upstream("first").await;
    let second = spawn_upstream("second").await;
    let r1 = route("first", "/first", &[first.url()], PUBLIC);
    let r2 = route("second", "/second", &[second.url()], PUBLIC);
    let app = spawn_app_with(TestOptions::with_extra(r1.clone())).await;
    assert_eq!(echo(app.get("/first/x").await).await.upstream(), "first");
    assert_error(app.get("/second/x").await, StatusCode::NOT_FOUND, "not_found").await;

    // Add a route.
    app.rewrite_config(&format!("{r1}{r2}"));
    let n = app.reloader.reload().unwrap_or_else(|e| panic!("reloading a valid config failed: {e}"));
    assert_eq!(n, 2, "reload reports the number of routes");
    let e = echo(app.get("/second/x").await).await;
    assert_eq!(e.upstream(), "second", "{}", e.0);
    assert_eq!(e.path(), "/second/x", "{}", e.0);
    assert_eq!(echo(app.get("/first/x").await).await.upstream(), "first");

    // Remove one; move a prefix to another upstream, while a request on
    // the old route is in flight: it finishes where it started.
    let hits = first.hits();
    let client = app.client.clone();
    let slow = tokio::spawn(client.get(app.url("/first/slow?mode=slow&ms=5000")).send());
    let (first_ref, before) = (&first, hits);
    eventually("the slow request reached the first upstream", Duration::from_secs(10), || async move {
        first_ref.hits() > before
    })
    .await;
    let moved = route("second", "/first", &[second.url()], PUBLIC);
    app.rewrite_config(&moved);
    assert!(!slow.is_finished(), "the slow request ended before the reload: nothing was in flight");
    let n = app.reloader.reload().unwrap_or_else(|e| panic!("reloading a valid config failed: {e}"));
    assert_eq!(n, 1);
    let in_flight = slow.await.expect("the request task").expect("the in-flight request");
    let e = echo(in_flight).await;
    assert_eq!((e.upstream(), e.path()), ("first", "/first/slow"), "{}", e.0);
    assert_error(app.get("/second/x").await, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(echo(app.get("/first/x").await).await.upstream(), "second");

    let metrics = app.metrics().await;
    assert!(metrics.contains("gateway_config_reloads_total"), "metrics lack gateway_config_reloads_total:\n{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn invalid_config_is_refused_and_the_old_routes_keep_serving() {
    let first = spawn_upstream("first").await;
    let r1 = route("first", "/first", &[first.url()], PUBLIC);
    let other = [first.url()];
    let app = spawn_app_with(TestOptions::with_extra(r1.clone())).await;

    for (case, bad_route, field) in [
        ("route without upstreams", route("broken", "/broken", &[], PUBLIC), "routes[1].upstreams"),
        ("prefix without a leading slash", route("broken", "no-slash", &other, PUBLIC), "routes[1].prefix"),
        ("prefix that is not normalised", route("broken", "/a/../broken", &other, PUBLIC), "routes[1].prefix"),
        ("duplicate route name", route("first", "/broken", &other, PUBLIC), "routes[1].name"),
        (
            "upstream that is not a URL",
            route("broken", "/broken", &["ftp://x".to_owned()], PUBLIC),
            "routes[1].upstreams",
        ),
        ("unparsable timeout", route("broken", "/broken", &other, "timeout = \"soon\""), "routes[1].timeout"),
        (
            "public route with roles",
            route("broken", "/broken", &other, "auth = \"public\"\nroles = [\"admin\"]"),
            "routes[1].auth",
        ),
        ("unknown key", route("broken", "/broken", &other, "colour = \"red\""), "routes[1].colour"),
    ] {
        app.rewrite_config(&format!("{r1}{bad_route}"));
        let err = app.reloader.reload().expect_err(case);
        let message = err.to_string();
        assert!(message.contains(field), "{case}: the error does not name {field}: {message}");
        // Nothing changed: the old table serves, the broken route does not exist.
        let e = echo(app.get("/first/x").await).await;
        assert_eq!(e.upstream(), "first", "{case}: {}", e.0);
        assert_error_in(case, app.get("/broken/x").await, StatusCode::NOT_FOUND, "not_found").await;
    }

    // Not TOML at all.
    app.write_raw_config("[server\nthis is not toml");
    assert!(app.reloader.reload().is_err(), "a file that is not TOML was accepted");
    assert_eq!(echo(app.get("/first/x").await).await.upstream(), "first");

    // A valid file is taken again.
    app.rewrite_config(&format!("{r1}{}", route("fixed", "/fixed", &other, PUBLIC)));
    let n = app.reloader.reload().unwrap_or_else(|e| panic!("reloading a valid config failed: {e}"));
    assert_eq!(n, 2);
    assert_eq!(echo(app.get("/fixed/x").await).await.path(), "/fixed/x");
    app.stop().await;
}

#[tokio::test]
async fn reload_applies_new_policies_and_header_names() {
    let svc = spawn_upstream("svc").await;
    let u = [svc.url()];
    let app = spawn_app_with(TestOptions::with_extra(route("svc", "/svc", &u, PUBLIC))).await;
    let user_id = app.create_user("default", "me@example.com", PASSWORD, &["ops"], &[]).await;
    let tokens = app.login_ok("me@example.com", PASSWORD, None).await;
    echo(app.get("/svc/x").await).await;

    // Public → required.
    app.rewrite_config(&route("svc", "/svc", &u, ""));
    app.reloader.reload().unwrap_or_else(|e| panic!("reload failed: {e}"));
    assert_error(app.get("/svc/x").await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let e = echo(app.get_authed("/svc/x", &tokens.access_token).await).await;
    assert_eq!(e.one("x-user-id"), user_id, "{}", e.0);

    // A role the user lacks, and renamed identity headers.
    app.rewrite_config(&format!(
        "{}{}\n[headers]\nuser_id = \"X-Auth-User\"\n",
        route("svc", "/svc", &u, "roles = [\"admin\"]"),
        route("ops", "/ops", &u, "roles = [\"ops\"]"),
    ));
    app.reloader.reload().unwrap_or_else(|e| panic!("reload failed: {e}"));
    assert_error(app.get_authed("/svc/x", &tokens.access_token).await, StatusCode::FORBIDDEN, "forbidden").await;
    let e = echo(app.get_authed("/ops/x", &tokens.access_token).await).await;
    assert_eq!(e.one("x-auth-user"), user_id, "{}", e.0);
    assert!(!e.has("x-user-id"), "{}", e.0);
    app.stop().await;
}

#[tokio::test]
async fn config_file_changes_are_picked_up_without_a_reload_call() {
    let first = spawn_upstream("first").await;
    let second = spawn_upstream("second").await;
    let r1 = route("first", "/first", &[first.url()], PUBLIC);
    let app = spawn_app_with(TestOptions::with_extra(r1.clone())).await;
    assert_error(app.get("/second/x").await, StatusCode::NOT_FOUND, "not_found").await;

    app.rewrite_config(&format!("{r1}{}", route("second", "/second", &[second.url()], PUBLIC)));
    let gateway = &app;
    eventually("the file watcher loaded the new route", Duration::from_secs(10), || async move {
        let resp = gateway.get("/second/x").await;
        if resp.status() == StatusCode::OK {
            return true;
        }
        assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
        false
    })
    .await;
    assert_eq!(echo(app.get("/second/x").await).await.upstream(), "second");
    assert_eq!(echo(app.get("/first/x").await).await.upstream(), "first");
    app.stop().await;
}

/// `auth.cors_origins`, and the request id's name that CORS lets scripts
/// read, take effect on reload, on the API's answers and on those the
/// gateway makes itself on routes: a browser app's new origin needs no
/// restart, and one taken out is refused at once.
#[tokio::test]
async fn reload_applies_new_cors_origins() {
    const OLD: &str = "https://old.example";
    const NEW: &str = "https://new.example";
    let svc = spawn_upstream("cors-reload").await;
    let extra = route("cors-reload", "/cors-reload", &[svc.url()], "");
    // Reloads are the test's own calls: no watcher.
    let opts = TestOptions {
        auth_extra: format!("cors_origins = [{OLD:?}]"),
        extra: extra.clone(),
        server_extra: "config_poll = \"0s\"".to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    // The CORS fields of a GET with `origin`, after checking that the
    // answer carries the request id it exposes: the API's JWKS, a 401 the
    // gateway makes on the route, and a path it refuses before routing.
    let fields = |path: &'static str, origin: &'static str| {
        let app = &app;
        async move {
            let resp = app.client.get(app.url(path)).header(ORIGIN, origin).send().await.expect("GET");
            let get = |name: &str| resp.headers().get(name).map(|v| v.to_str().expect("ASCII").to_ascii_lowercase());
            let exposed = get("access-control-expose-headers").unwrap_or_default();
            if let Some(id) = exposed.split(',').map(str::trim).find(|f| f.ends_with("-id")) {
                assert!(resp.headers().contains_key(id), "{path}: exposes {id}, which it lacks");
            }
            (get("access-control-allow-origin"), exposed)
        }
    };
    let preflight = || async {
        app.client
            .request(Method::OPTIONS, app.url("/auth/login"))
            .header(ORIGIN, NEW)
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
            .expect("a preflight")
    };
    let paths = ["/.well-known/jwks.json", "/cors-reload/x", "/cors-reload/%2e%2e/%2e%2e/x"];
    for path in paths {
        let (allowed, exposed) = fields(path, OLD).await;
        assert_eq!(allowed.as_deref(), Some(OLD), "{path}");
        assert!(exposed.contains("x-request-id"), "{path}: {exposed}");
        assert_eq!(fields(path, NEW).await.0, None, "{path}: an origin not listed yet");
    }

    // Another origin, and another name for the request id.
    let rewrite = |cors: &str, headers: &str| {
        let opts = TestOptions { auth_extra: cors.to_owned(), extra: format!("{extra}{headers}"), ..app.opts.clone() };
        app.write_raw_config(&config_toml(&opts));
        app.reloader.reload().unwrap_or_else(|e| panic!("reload failed: {e}"));
    };
    rewrite(&format!("cors_origins = [{NEW:?}]"), "\n[headers]\nrequest_id = \"X-Trace-Id\"\n");
    for path in paths {
        let (allowed, exposed) = fields(path, NEW).await;
        assert_eq!(allowed.as_deref(), Some(NEW), "{path}");
        assert!(exposed.contains("x-trace-id"), "{path}: {exposed}");
        assert_eq!(fields(path, OLD).await.0, None, "{path}: an origin taken out is still allowed");
    }
    let resp = preflight().await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("access-control-allow-origin").map(|v| v.as_bytes()), Some(NEW.as_bytes()));

    // None at all: no CORS field, and a preflight is a method the API lacks.
    rewrite("", "");
    for path in paths {
        assert_eq!(fields(path, NEW).await, (None, String::new()), "{path}");
    }
    assert_error(preflight().await, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    app.stop().await;
}
