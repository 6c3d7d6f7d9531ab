//! Active health checks (`health_check` on a route): an upstream that fails
//! its probes gets no requests until it passes again; when every upstream
//! is out, requests go to all of them; a reload keeps what the probes found
//! and ends the probes no route needs any more; a probe carries nothing of
//! any client.

use std::time::Duration;

use crate::helpers::{eventually, metric, route, spawn_app_with, TestApp, TestOptions};
use crate::upstream::{dead_upstream_url, echo, hanging_upstream_url, spawn_upstream};

/// Probes every 100 ms; two failures take an upstream out, two passes bring
/// it back. The timeout is generous: a healthy upstream must not time out
/// on a busy machine.
const CHECK: &str = r#"health_check = { path = "/healthz", interval = "100ms", timeout = "2s", unhealthy_after = 2, healthy_after = 2 }"#;

/// A public route `name` at `/svc` to `upstreams`, with `check`.
fn svc(name: &str, upstreams: &[String], check: &str) -> String {
    route(name, "/svc", upstreams, &format!("auth = \"public\"\n{check}"))
}

/// `gateway_upstream_healthy{route, upstream}` once it exists (each test
/// has a route name of its own: the metrics are the process's).
async fn healthy_gauge(app: &TestApp, route: &str, upstream: &str) -> Option<f64> {
    let text = app.metrics().await;
    let series = format!("gateway_upstream_healthy{{route=\"{route}\",upstream=\"{upstream}\"}}");
    let labels = [("route", route), ("upstream", upstream)];
    text.lines().any(|l| l.starts_with(&series)).then(|| metric(&text, "gateway_upstream_healthy", &labels))
}

async fn wait_health(app: &TestApp, route: &str, upstream: &str, healthy: bool) {
    let want = if healthy { 1.0 } else { 0.0 };
    eventually("the upstream's health gauge", Duration::from_secs(5), || async {
        healthy_gauge(app, route, upstream).await == Some(want)
    })
    .await;
}

/// Sends `n` requests to the route; returns how many each upstream served.
async fn spread(app: &TestApp, n: usize) -> (usize, usize) {
    let (mut a, mut b) = (0, 0);
    for _ in 0..n {
        match echo(app.get("/svc/x").await).await.upstream() {
            "a" => a += 1,
            "b" => b += 1,
            other => panic!("served by {other}"),
        }
    }
    (a, b)
}

#[tokio::test]
async fn an_upstream_failing_its_probes_gets_no_requests_until_it_passes_again() {
    let (a, b) = (spawn_upstream("a").await, spawn_upstream("b").await);
    let app = spawn_app_with(TestOptions::with_extra(svc("hc-flip", &[a.url(), b.url()], CHECK))).await;
    let (to_a, to_b) = spread(&app, 10).await;
    assert!(to_a > 0 && to_b > 0, "both serve at first: {to_a}/{to_b}");

    b.set_health(503);
    wait_health(&app, "hc-flip", &b.url(), false).await;
    assert_eq!(healthy_gauge(&app, "hc-flip", &a.url()).await, Some(1.0));
    let before = b.requests();
    assert_eq!(spread(&app, 20).await, (20, 0), "b is out");
    assert_eq!(b.requests(), before);

    b.set_health(200);
    wait_health(&app, "hc-flip", &b.url(), true).await;
    let (to_a, to_b) = spread(&app, 10).await;
    assert!(to_a > 0 && to_b > 0, "b is back: {to_a}/{to_b}");

    // What a probe carries: the upstream's Host, our user agent, nothing of a client.
    let probe = b.health_checks().pop().expect("b was probed");
    assert_eq!((probe.method.as_str(), probe.path.as_str()), ("GET", "/healthz"));
    let mut fields = probe.headers.clone();
    fields.sort();
    let host = b.url().trim_start_matches("http://").to_owned();
    let expected = [("host".to_owned(), host), ("user-agent".to_owned(), "gateway-health-check".to_owned())];
    assert_eq!(fields, expected);
    app.stop().await;
}

#[tokio::test]
async fn with_every_upstream_out_requests_go_to_all_of_them() {
    let (a, b) = (spawn_upstream("a").await, spawn_upstream("b").await);
    let app = spawn_app_with(TestOptions::with_extra(svc("hc-all", &[a.url(), b.url()], CHECK))).await;
    a.set_health(500);
    b.set_health(404);
    wait_health(&app, "hc-all", &a.url(), false).await;
    wait_health(&app, "hc-all", &b.url(), false).await;
    assert!(!a.health_checks().is_empty() && !b.health_checks().is_empty());
    let (to_a, to_b) = spread(&app, 10).await;
    assert!(to_a > 0 && to_b > 0, "a probe that is wrong must not become an outage: {to_a}/{to_b}");
    app.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_the_probes_findings_and_ends_the_probes_it_drops() {
    let (a, b) = (spawn_upstream("a").await, spawn_upstream("b").await);
    let both = [a.url(), b.url()];
    let app = spawn_app_with(TestOptions::with_extra(svc("hc-reload", &both, CHECK))).await;
    b.set_health(503);
    wait_health(&app, "hc-reload", &b.url(), false).await;

    // The same route and check: b stays out from the first request on.
    app.rewrite_config(&svc("hc-reload", &both, CHECK));
    app.reloader.reload().expect("reload");
    assert_eq!(spread(&app, 10).await, (10, 0), "b is still out right after the reload");

    // Another check: new probes (with the query), and the old ones end.
    app.rewrite_config(&svc("hc-reload", &both, &CHECK.replace("/healthz", "/healthz?v=2")));
    app.reloader.reload().expect("reload");
    eventually("the new check probes", Duration::from_secs(5), || async {
        b.health_checks().iter().any(|p| p.path == "/healthz?v=2")
    })
    .await;
    let old = || b.health_checks().iter().filter(|p| p.path == "/healthz").count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = old();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(old(), settled, "the dropped check's probe still runs");

    // Without the check, every upstream takes requests again.
    app.rewrite_config(&svc("hc-reload", &both, ""));
    app.reloader.reload().expect("reload");
    let (to_a, to_b) = spread(&app, 10).await;
    assert!(to_a > 0 && to_b > 0, "{to_a}/{to_b}");
    app.stop().await;
}

#[tokio::test]
async fn an_upstream_refusing_connections_or_answering_late_is_taken_out() {
    let a = spawn_upstream("a").await;
    let (dead, hanging) = (dead_upstream_url(), hanging_upstream_url());
    let check = CHECK.replace("2s", "300ms");
    let upstreams = [a.url(), dead.clone(), hanging.clone()];
    let app = spawn_app_with(TestOptions::with_extra(svc("hc-down", &upstreams, &check))).await;
    wait_health(&app, "hc-down", &dead, false).await;
    wait_health(&app, "hc-down", &hanging, false).await;
    assert_eq!(healthy_gauge(&app, "hc-down", &a.url()).await, Some(1.0));
    // Neither is tried: every request reaches a, none fails on a connect
    // first (that would be counted as an upstream error).
    let errors = |m: &str| metric(m, "gateway_upstream_errors_total", &[("route", "hc-down")]);
    let before = errors(&app.metrics().await);
    for _ in 0..9 {
        assert_eq!(echo(app.get("/svc/x").await).await.upstream(), "a");
    }
    assert_eq!(errors(&app.metrics().await), before);
    app.stop().await;
}
