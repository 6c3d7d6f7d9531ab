//! How bytes move through the proxy: streaming both ways, body limits, upstream failures
//! (502, 504), round-robin and fail-over, WebSocket, TLS + HTTP/2, graceful shutdown,
//! malformed requests on raw sockets, and the metrics of all that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use reqwest::header::{HeaderMap, COOKIE};
use reqwest::{Body, Certificate, Client, StatusCode, Version};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::helpers::{
    assert_error, assert_error_in, eventually, metric, parse_tokens, raw_get, raw_request, raw_request_all, route,
    served_certificate, spawn_app_in, spawn_app_with, Stopping, TestOptions, PASSWORD,
};
use crate::upstream::{
    dead_upstream_url, echo, hanging_upstream_url, spawn_mtls_upstream, spawn_tls_upstream, spawn_upstream, Echo,
};

const EMAIL: &str = "me@example.com";
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const PUBLIC: &str = "auth = \"public\"";

fn public_lines(more: &str) -> String {
    format!("{PUBLIC}\n{more}")
}

#[tokio::test]
async fn large_response_streams_through_complete() {
    let svc = spawn_upstream("files").await;
    let app = spawn_app_with(TestOptions::with_extra(route("files", "/files", &[svc.url()], PUBLIC))).await;
    let total = 20 * MIB;
    let resp = app.get(&format!("/files/big?mode=big&bytes={total}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut received = 0_usize;
    let mut wrong = 0_usize;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("response body chunk");
        received += chunk.len();
        wrong += chunk.iter().filter(|b| **b != b'x').count();
    }
    assert_eq!(received, total, "the streamed response arrived incomplete");
    assert_eq!(wrong, 0, "the streamed response was altered");
    app.stop().await;
}

#[tokio::test]
async fn large_upload_streams_through_complete() {
    let svc = spawn_upstream("files").await;
    let app = spawn_app_with(TestOptions::with_extra(route("files", "/files", &[svc.url()], PUBLIC))).await;
    let total = 3 * MIB;

    // Chunked (no Content-Length): 48 chunks of 64 KiB.
    let chunks = futures::stream::iter(
        (0..total / (64 * KIB)).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'u'; 64 * KIB]))),
    );
    let resp = app
        .client
        .post(app.url("/files/upload"))
        .body(Body::wrap_stream(chunks))
        .send()
        .await
        .expect("POST a streamed 3 MiB body");
    let e = echo(resp).await;
    assert_eq!(e.method(), "POST", "{}", e.0);
    assert_eq!(e.body_len(), total as u64, "the streamed upload arrived incomplete");

    // With Content-Length.
    let resp = app.client.put(app.url("/files/upload")).body(vec![b'v'; total]).send().await.expect("PUT 3 MiB");
    let e = echo(resp).await;
    assert_eq!(e.method(), "PUT", "{}", e.0);
    assert_eq!(e.body_len(), total as u64, "the upload arrived incomplete");
    assert_eq!(e.one("content-length"), total.to_string(), "{}", e.0);
    app.stop().await;
}

#[tokio::test]
async fn responses_are_streamed_not_buffered() {
    let svc = spawn_upstream("stream").await;
    let app = spawn_app_with(TestOptions::with_extra(route("stream", "/stream", &[svc.url()], PUBLIC))).await;
    // Chunk 0 at once, then one every 300 ms: the last leaves the upstream >= 1.2 s after the first.
    let resp = app.get("/stream/x?mode=stream&chunks=5&delay_ms=300").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut body = Vec::new();
    let mut first: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("response body chunk");
        if first.is_none() && !chunk.is_empty() {
            first = Some(Instant::now());
        }
        body.extend_from_slice(&chunk);
    }
    let end = Instant::now();
    let first = first.expect("the response had a body");
    let text = String::from_utf8(body).expect("the streamed body is UTF-8");
    assert_eq!(text, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    // A buffering proxy would deliver everything at once, at the end.
    let spread = end - first;
    assert!(spread >= Duration::from_millis(900), "first chunk arrived only {spread:?} before the end: buffered");
    app.stop().await;
}

#[tokio::test]
async fn body_over_max_body_is_413() {
    let svc = spawn_upstream("small").await;
    let routes = [
        route("small", "/small", &[svc.url()], &public_lines("max_body = \"1KiB\"")),
        route("default", "/default", &[svc.url()], PUBLIC),
    ];
    let app = spawn_app_with(TestOptions::with_extra(routes.concat())).await;
    let resp = app.client.post(app.url("/small/x")).body(vec![b'a'; 4 * KIB]).send().await.expect("POST 4 KiB");
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(svc.hits(), 0, "a body over max_body reached the upstream");

    // At the limit: accepted.
    let resp = app.client.post(app.url("/small/x")).body(vec![b'a'; KIB]).send().await.expect("POST 1 KiB");
    assert_eq!(echo(resp).await.body_len(), KIB as u64);

    // A route without `max_body` takes 10 MiB and no more (refused on its
    // Content-Length, before a byte of the body is read).
    let resp = raw_request(app.addr, b"POST /default/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10485761\r\n\r\n").await;
    resp.assert_error("10 MiB + 1 on a default route", 413, "payload_too_large");
    let resp =
        app.client.post(app.url("/default/x")).body(vec![b'a'; 10 * KIB * KIB]).send().await.expect("POST 10 MiB");
    assert_eq!(echo(resp).await.body_len(), 10 * KIB as u64 * KIB as u64);

    // Without Content-Length the limit still holds.
    let chunks = futures::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; KIB]))));
    let resp =
        app.client.post(app.url("/small/x")).body(Body::wrap_stream(chunks)).send().await.expect("POST 4 KiB chunked");
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    app.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let app = spawn_app_with(TestOptions::with_extra(route("dead", "/dead", &[dead_upstream_url()], PUBLIC))).await;
    assert_error_in("GET", app.get("/dead/x").await, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    let resp = app.client.post(app.url("/dead/x")).json(&json!({ "a": 1 })).send().await.expect("POST /dead/x");
    assert_error_in("POST", resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    app.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let svc = spawn_upstream("slow").await;
    let app = spawn_app_with(TestOptions::with_extra(route(
        "slow",
        "/slow",
        &[svc.url()],
        &public_lines("timeout = \"200ms\""),
    )))
    .await;
    let resp = app.get("/slow/x?mode=slow&ms=2000").await;
    assert_error(resp, StatusCode::GATEWAY_TIMEOUT, "gateway_timeout").await;
    // A prompt answer on the same route is fine.
    let e = echo(app.get("/slow/x").await).await;
    assert_eq!(e.path(), "/slow/x");
    app.stop().await;
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let a = spawn_upstream("a").await;
    let b = spawn_upstream("b").await;
    let app = spawn_app_with(TestOptions::with_extra(route("rr", "/rr", &[a.url(), b.url()], PUBLIC))).await;
    let mut names = Vec::new();
    for i in 0..10 {
        let e = echo(app.get(&format!("/rr/{i}")).await).await;
        assert_eq!(e.path(), format!("/rr/{i}"));
        names.push(e.upstream().to_owned());
    }
    assert_eq!((a.hits(), b.hits()), (5, 5), "order: {names:?}");
    app.stop().await;
}

#[tokio::test]
async fn dead_upstream_is_skipped_for_idempotent_requests() {
    let live = spawn_upstream("live").await;
    let upstreams = [dead_upstream_url(), live.url()];
    let app = spawn_app_with(TestOptions::with_extra(route("failover", "/fo", &upstreams, PUBLIC))).await;
    for i in 0..10 {
        let e = echo(app.get(&format!("/fo/{i}")).await).await;
        assert_eq!(e.upstream(), "live", "GET /fo/{i}");
    }
    assert_eq!(live.hits(), 10);
    app.stop().await;
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_and_refusing_upstreams_cool_down() {
    let live = spawn_upstream("live").await;
    // Round-robin starts at the first upstream: the dead one.
    let extra = [
        route("no-retry", "/no-retry", &[dead_upstream_url(), live.url()], PUBLIC),
        route("retry", "/retry", &[dead_upstream_url(), live.url()], PUBLIC),
        // Longer than the test, however slow the machine.
        "\n[upstream]\ncooldown = \"10m\"\n".to_owned(),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    let client = Client::new();

    // A POST is never sent twice: the dead upstream's refusal is the answer.
    let resp = client.post(app.url("/no-retry/x")).body("an order").send().await.expect("POST");
    assert_error_in("POST to a dead upstream", resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    assert_eq!(live.hits(), 0, "a POST was retried on the next upstream");

    // A bodiless DELETE is idempotent: retried once, on the live one.
    let resp = client.delete(app.url("/retry/x")).send().await.expect("DELETE");
    let e = echo(resp).await;
    assert_eq!((e.method(), e.upstream()), ("DELETE", "live"), "{}", e.0);
    assert_eq!(live.hits(), 1);

    // The dead upstream now cools down: the next requests skip it without
    // trying it again (every other one would otherwise start there).
    for i in 0..10 {
        let e = echo(app.get(&format!("/retry/{i}")).await).await;
        assert_eq!(e.upstream(), "live", "GET /retry/{i}");
    }
    let metrics = app.metrics().await;
    let refused = metric(&metrics, "gateway_upstream_errors_total", &[("route", "retry"), ("kind", "connect")]);
    assert_eq!(refused, 1.0, "the cooling upstream was tried again:\n{metrics}");
    let refused = metric(&metrics, "gateway_upstream_errors_total", &[("route", "no-retry"), ("kind", "connect")]);
    assert_eq!(refused, 1.0, "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_retry_does_not_extend_the_route_timeout() {
    let slow = spawn_upstream("slow").await;
    // The first upstream never completes a handshake: the connect times out
    // after 4 s and the GET is retried on the second, which answers 4 s
    // later. The route's 6 s started with the first attempt, so that is
    // too late (a deadline restarted for the retry would have let it pass
    // at 8 s). Each margin is 2 s, for a loaded machine.
    let opts = TestOptions {
        extra: format!(
            "{}\n[upstream]\nconnect_timeout = \"4s\"\n",
            route(
                "deadline",
                "/deadline",
                &[hanging_upstream_url(), slow.url()],
                "auth = \"public\"\ntimeout = \"6s\""
            )
        ),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let resp = app.get("/deadline/x?mode=slow&ms=4000").await;
    assert_error(resp, StatusCode::GATEWAY_TIMEOUT, "gateway_timeout").await;
    assert_eq!(slow.hits(), 1, "the request was not retried on the second upstream");
    let metrics = app.metrics().await;
    for kind in ["connect", "timeout"] {
        let n = metric(&metrics, "gateway_upstream_errors_total", &[("route", "deadline"), ("kind", kind)]);
        assert_eq!(n, 1.0, "{kind} errors:\n{metrics}");
    }
    app.stop().await;
}

#[tokio::test]
async fn https_upstreams_are_verified_with_the_ca_file() {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("generate a self-signed certificate");
    let cert_pem = cert.pem();
    let svc = spawn_tls_upstream("secure", &cert_pem, &key_pair.serialize_pem()).await;
    let url = format!("https://{}", svc.addr);

    // Trusted through `upstream.ca_file`: proxied over TLS.
    let dir = tempfile::tempdir().expect("create temp dir");
    std::fs::write(dir.path().join("ca.pem"), &cert_pem).expect("write ca.pem");
    let extra = route("secure", "/secure", std::slice::from_ref(&url), PUBLIC) + "\n[upstream]\nca_file = \"ca.pem\"\n";
    let app = spawn_app_in(dir, TestOptions::with_extra(extra)).await;
    let e = echo(app.get("/secure/x?q=1").await).await;
    assert_eq!((e.upstream(), e.path(), e.query()), ("secure", "/secure/x", Some("q=1")), "{}", e.0);
    assert_eq!(svc.hits(), 1);
    app.stop().await;

    // Without it the certificate is not trusted: 502, counted as a
    // connection failure, and no request reaches the upstream.
    let app = spawn_app_with(TestOptions::with_extra(route("untrusted", "/untrusted", &[url], PUBLIC))).await;
    assert_error(app.get("/untrusted/x").await, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    assert_eq!(svc.hits(), 1, "a request went to an upstream whose certificate is not trusted");
    let metrics = app.metrics().await;
    let refused = metric(&metrics, "gateway_upstream_errors_total", &[("route", "untrusted"), ("kind", "connect")]);
    assert_eq!(refused, 1.0, "{metrics}");
    app.stop().await;
}

/// `gateway_upstream_errors_total{route="mtls",kind}` in `app`'s process.
async fn upstream_errors(app: &crate::helpers::TestApp, kind: &str) -> f64 {
    metric(&app.metrics().await, "gateway_upstream_errors_total", &[("route", "mtls"), ("kind", kind)])
}

/// Mutual TLS: an upstream that asks for a client certificate gets the
/// gateway's (`upstream.client_cert`, `client_key`), so a backend can refuse
/// every connection that does not come from the gateway. Without it the
/// handshake fails: 502, and nothing reaches the upstream.
#[tokio::test]
async fn https_upstreams_can_demand_the_gateways_client_certificate() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("the upstream's certificate");
    let client = rcgen::generate_simple_self_signed(vec!["gateway".to_owned()]).expect("the gateway's certificate");
    let stranger = rcgen::generate_simple_self_signed(vec!["gateway".to_owned()]).expect("another certificate");
    let svc =
        spawn_mtls_upstream("mtls", &server.cert.pem(), &server.key_pair.serialize_pem(), &client.cert.pem()).await;
    let url = format!("https://{}", svc.addr);
    let app_with = |pair: Option<&rcgen::CertifiedKey>| {
        let dir = tempfile::tempdir().expect("create temp dir");
        std::fs::write(dir.path().join("ca.pem"), server.cert.pem()).expect("write ca.pem");
        let mut upstream = "\n[upstream]\nca_file = \"ca.pem\"\n".to_owned();
        if let Some(pair) = pair {
            std::fs::write(dir.path().join("client.pem"), pair.cert.pem()).expect("write client.pem");
            std::fs::write(dir.path().join("client.key"), pair.key_pair.serialize_pem()).expect("write client.key");
            upstream.push_str("client_cert = \"client.pem\"\nclient_key = \"client.key\"\n");
        }
        let extra = route("mtls", "/mtls", std::slice::from_ref(&url), PUBLIC) + &upstream;
        spawn_app_in(dir, TestOptions::with_extra(extra))
    };

    let app = app_with(Some(&client)).await;
    let e = echo(app.get("/mtls/x").await).await;
    assert_eq!((e.upstream(), e.path()), ("mtls", "/mtls/x"), "{}", e.0);
    assert_eq!(svc.hits(), 1);
    app.stop().await;

    // Refused in the handshake (TLS 1.3: after the gateway has sent the
    // request, which the upstream never reads): a connection failure, as
    // for TLS 1.2, so the upstream is cooled down like one that refuses.
    for (case, pair) in
        [("no client certificate", None), ("a certificate the upstream does not trust", Some(&stranger))]
    {
        let app = app_with(pair).await;
        let (connections, errors) = (svc.connections(), upstream_errors(&app, "connect").await);
        assert_error_in(case, app.get("/mtls/x").await, StatusCode::BAD_GATEWAY, "bad_gateway").await;
        assert_eq!(svc.connections(), connections + 1, "{case}: the upstream saw no handshake");
        assert_eq!(svc.hits(), 1, "{case}: a request reached the upstream");
        assert_eq!(upstream_errors(&app, "connect").await, errors + 1.0, "{case}: not counted as a connection failure");
        assert_eq!(upstream_errors(&app, "io").await, 0.0, "{case}");
        app.stop().await;
    }
}

/// The upstream client's TLS files are watched like the listener's pair:
/// a new `ca_file` and a renewed client certificate are used from the next
/// handshake without a restart, and a renewal caught halfway (a new
/// certificate beside the old key) is refused, counted, and the running
/// set stays. Without pooling, every request is a new handshake.
#[tokio::test]
async fn upstream_tls_files_are_reloaded_without_a_restart() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("the upstream's certificate");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("another CA");
    let client = rcgen::generate_simple_self_signed(vec!["gateway".to_owned()]).expect("the gateway's certificate");
    let stranger = rcgen::generate_simple_self_signed(vec!["gateway".to_owned()]).expect("another certificate");
    let svc =
        spawn_mtls_upstream("mtls", &server.cert.pem(), &server.key_pair.serialize_pem(), &client.cert.pem()).await;
    let dir = tempfile::tempdir().expect("create temp dir");
    let files = dir.path().to_owned();
    let write = |name: &str, text: String| std::fs::write(files.join(name), text).expect("write a TLS file");
    write("ca.pem", other.cert.pem());
    write("client.pem", client.cert.pem());
    write("client.key", client.key_pair.serialize_pem());
    let upstream = "\n[upstream]\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n\
                    pool_max_idle_per_host = 0\ncooldown = \"0s\"\nplatform_roots = false\n";
    let opts = TestOptions {
        server_extra: "config_poll = \"100ms\"".to_owned(),
        extra: route("mtls", "/mtls", &[format!("https://{}", svc.addr)], PUBLIC) + upstream,
        ..TestOptions::default()
    };
    let app = spawn_app_in(dir, opts).await;
    // (No other in-process test reloads the upstream TLS files.)
    let errors = || async {
        metric(&app.metrics().await, "gateway_tls_reloads_total", &[("tls", "upstream"), ("result", "error")])
    };
    let status = || async { app.get("/mtls/x").await.status() };
    let becomes = |what: &'static str, want: StatusCode| {
        let status = &status;
        eventually(what, Duration::from_secs(10), move || async move { status().await == want })
    };

    // The upstream's certificate is not signed by the CA in ca_file.
    assert_eq!(status().await, StatusCode::BAD_GATEWAY);
    assert_eq!(svc.hits(), 0);
    write("ca.pem", server.cert.pem());
    becomes("the new CA file trusted", StatusCode::OK).await;

    // Halfway through a renewal: refused, and the old pair still presented.
    let before = errors().await;
    write("client.pem", stranger.cert.pem());
    eventually("the mismatched pair refused", Duration::from_secs(10), || async { errors().await > before }).await;
    let hits = svc.hits();
    assert_eq!(status().await, StatusCode::OK, "the running pair was dropped");
    assert_eq!(svc.hits(), hits + 1);

    // The key follows: the new pair (one the upstream does not trust) is
    // presented from the next handshake, and then the trusted one again.
    write("client.key", stranger.key_pair.serialize_pem());
    becomes("the new client certificate presented", StatusCode::BAD_GATEWAY).await;
    write("client.pem", client.cert.pem());
    write("client.key", client.key_pair.serialize_pem());
    becomes("the trusted client certificate presented again", StatusCode::OK).await;
    app.stop().await;
}

/// A reload of the upstream TLS files retires the pooled connections made
/// before it: a CA dropped from `ca_file`, or a client certificate
/// replaced, stops being relied on at once, not when a busy connection
/// happens to close.
#[tokio::test]
async fn pooled_upstream_connections_are_not_reused_after_a_tls_reload() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("the upstream's certificate");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("another CA");
    let svc = spawn_tls_upstream("pooled-tls", &server.cert.pem(), &server.key_pair.serialize_pem()).await;
    let dir = tempfile::tempdir().expect("create temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.cert.pem()).expect("write ca.pem");
    let opts = TestOptions {
        server_extra: "config_poll = \"100ms\"".to_owned(),
        extra: route("pooled-tls", "/pooled-tls", &[format!("https://{}", svc.addr)], PUBLIC)
            + "\n[upstream]\nca_file = \"ca.pem\"\nplatform_roots = false\n",
        ..TestOptions::default()
    };
    let app = spawn_app_in(dir, opts).await;
    let get = || async { echo(app.get("/pooled-tls/x").await).await };
    get().await;
    get().await;
    assert_eq!(svc.connections(), 1, "the second request did not reuse the pooled connection");

    // The file changes (one more CA): the next request makes a connection
    // of its own, which is pooled in turn.
    std::fs::write(&ca, server.cert.pem() + &other.cert.pem()).expect("write ca.pem");
    eventually("a new connection after the reload", Duration::from_secs(10), || async {
        get().await;
        svc.connections() == 2
    })
    .await;
    get().await;
    assert_eq!(svc.connections(), 2, "the connection made after the reload was not pooled");
    app.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Sends `message` and asserts that the upstream's echo comes back through the tunnel.
async fn ws_echo(ws: &mut Ws, message: Message) {
    ws.send(message.clone()).await.unwrap_or_else(|e| panic!("send {message:?}: {e}"));
    let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    match next {
        Ok(Some(Ok(reply))) => assert_eq!(reply, message),
        Ok(Some(Err(e))) => panic!("reading the echo of {message:?}: {e}"),
        Ok(None) => panic!("the tunnel closed before echoing {message:?}"),
        Err(_) => panic!("no echo of {message:?} within 10 s"),
    }
}

/// A route's fields leave a WebSocket handshake intact: the client's
/// `Sec-WebSocket-*` fields reach the upstream, the 101 carries the route's
/// `response_headers`, and the tunnel echoes.
#[tokio::test]
async fn route_fields_leave_websocket_handshakes_intact() {
    let svc = spawn_upstream("ws").await;
    let lines = "request_headers = { \"X-Api-Version\" = \"2\" }\n\
                 response_headers = { \"X-Frame-Options\" = \"DENY\" }\n\
                 remove_response_headers = [\"Server\"]";
    let app =
        spawn_app_with(TestOptions::with_extra(route("ws", "/ws-route", &[svc.url()], &public_lines(lines)))).await;
    let url = format!("ws://{}/ws-route/x?mode=ws", app.addr);
    let (mut ws, resp) = tokio_tungstenite::connect_async(url.as_str()).await.expect("WebSocket handshake via gateway");
    assert_eq!(resp.headers().get("x-frame-options").map(|v| v.as_bytes()), Some(&b"DENY"[..]));
    ws_echo(&mut ws, Message::text("through a route with fields")).await;
    let seen = svc.last();
    assert!(seen.has("sec-websocket-key") && seen.has("sec-websocket-version"), "{seen:?}");
    assert_eq!(seen.one("x-api-version"), "2");
    ws.close(None).await.expect("close the WebSocket");
    app.stop().await;
}

#[tokio::test]
async fn websocket_is_proxied_with_identity() {
    let svc = spawn_upstream("ws").await;
    let app = spawn_app_with(TestOptions::with_extra(route("ws", "/ws-route", &[svc.url()], ""))).await;
    let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let tokens = app.login_ok(EMAIL, PASSWORD, None).await;

    let url = format!("ws://{}/ws-route/x?mode=ws", app.addr);
    let mut request = url.as_str().into_client_request().expect("a valid WebSocket request");
    let bearer = HeaderValue::from_str(&format!("Bearer {}", tokens.access_token)).expect("token is a header value");
    request.headers_mut().insert(AUTHORIZATION, bearer);
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.expect("WebSocket handshake via gateway");
    assert_eq!(response.status().as_u16(), 101);

    for message in [Message::text("hello through the gateway"), Message::binary(vec![0_u8, 1, 2, 254, 255])] {
        ws_echo(&mut ws, message).await;
    }
    // Closing may race the peer's close; either way the session is over.
    // Dropped, so that the tunnel ends now rather than at the shutdown's grace.
    let _ = ws.close(None).await;
    drop(ws);

    let seen = svc.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/ws-route/x?mode=ws");
    assert_eq!(seen.one("x-user-id"), user_id, "{:?}", seen.headers);
    assert!(!seen.has("authorization"), "the bearer token was forwarded: {:?}", seen.headers);
    assert!(seen.one("upgrade").eq_ignore_ascii_case("websocket"), "{:?}", seen.headers);
    assert_eq!(svc.hits(), 1);
    app.stop().await;
}

/// A tunnel that moves bytes stays open; one silent both ways for
/// `server.tunnel_idle_timeout` is closed by the gateway.
#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed() {
    let svc = spawn_upstream("ws").await;
    let opts = TestOptions {
        server_extra: "tunnel_idle_timeout = \"400ms\"".to_owned(),
        extra: route("ws", "/ws-route", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let url = format!("ws://{}/ws-route/x?mode=ws", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("WebSocket handshake via gateway");

    // Busy for three times the limit: the tunnel stays open.
    for i in 0..12 {
        ws_echo(&mut ws, Message::text(format!("ping {i}"))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Then silence: the gateway closes the tunnel.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("the idle tunnel was closed");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "a message arrived on an idle tunnel: {end:?}"
    );
    app.stop().await;
}

/// An upstream that switches protocols while the request's body is still
/// being sent leaves nothing to splice: the client gets a 502 (never a 101
/// with no tunnel behind it), readable by a listed origin like every other
/// 502 the gateway makes, and counted as an upgrade failure. The control:
/// the same upstream, once it has read the whole body, gets its 101 through.
#[tokio::test]
async fn an_upgrade_switched_before_its_body_was_sent_is_a_502_with_cors() {
    const APP: &str = "https://app.example.com";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
    let upstream = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0_u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).await.is_ok() {
                    head.push(byte[0]);
                }
                if head.starts_with(b"GET /early-switch/whole") {
                    let mut body = [0_u8; 10];
                    let _ = stream.read_exact(&mut body).await;
                }
                let accept = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                let _ = stream.write_all(accept.as_bytes()).await;
                // Held open, reading whatever comes, until the gateway leaves.
                let mut sink = [0_u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    let opts = TestOptions {
        auth_extra: format!("cors_origins = [{APP:?}]"),
        extra: route("early-switch", "/early-switch", &[format!("http://{upstream}")], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    // Ten bytes announced; `sent` of them written, the rest never comes.
    let request = |path: &str, sent: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw\r\nOrigin: {APP}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 10\r\n\r\n{sent}"
        )
    };
    let r = raw_request(app.addr, request("/early-switch/whole", "0123456789").as_bytes()).await;
    assert_eq!(r.status, Some(101), "the control: {}", r.head);
    let r = raw_request(app.addr, request("/early-switch/half", "01234").as_bytes()).await;
    assert_eq!(r.status, Some(502), "{}", r.head);
    assert_eq!(r.header("access-control-allow-origin"), Some(APP), "{}", r.head);
    let kind = [("route", "early-switch"), ("kind", "upgrade")];
    assert_eq!(metric(&app.metrics().await, "gateway_upstream_errors_total", &kind), 1.0);
    app.stop().await;
}

#[tokio::test]
async fn websocket_handshake_without_a_valid_token_is_401() {
    let svc = spawn_upstream("ws").await;
    let app = spawn_app_with(TestOptions::with_extra(route("ws", "/ws-route", &[svc.url()], ""))).await;
    let url = format!("ws://{}/ws-route/x?mode=ws", app.addr);

    for token in [None, Some("not-a-jwt")] {
        let mut request = url.as_str().into_client_request().expect("a valid WebSocket request");
        if let Some(token) = token {
            let bearer = HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value");
            request.headers_mut().insert(AUTHORIZATION, bearer);
        }
        match tokio_tungstenite::connect_async(request).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 401, "token {token:?}");
            }
            Err(other) => panic!("token {token:?}: expected an HTTP 401 refusal, got {other}"),
            Ok(_) => panic!("token {token:?}: the WebSocket handshake succeeded"),
        }
    }

    // The same handshake on a raw socket, to read the JSON error.
    let handshake = [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];
    let resp = raw_get(app.addr, "/ws-route/x?mode=ws", "gateway.test", &handshake).await;
    assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "head: {}", resp.head);
    resp.assert_error("raw handshake without a token", 401, "unauthorized");
    assert_eq!(svc.hits(), 0, "an unauthenticated WebSocket handshake reached the upstream");
    app.stop().await;
}

/// A self-signed certificate for `localhost`, written as `cert.pem` and
/// `key.pem` in `dir` (where `[server.tls]` finds them); returns its PEM.
fn write_localhost_cert(dir: &std::path::Path) -> String {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("generate a self-signed certificate");
    let cert_pem = cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert_pem).expect("write cert.pem");
    std::fs::write(dir.join("key.pem"), key_pair.serialize_pem()).expect("write key.pem");
    cert_pem
}

/// `server.http_redirect_listen`: a plain-HTTP request is sent to the TLS
/// listener with a 308 (method and body kept by the client), to the host it
/// named and the TLS port, its path and query intact, and the redirect is
/// followed to the route; one with no usable host is a 400 JSON error. The
/// listener keeps the main one's guards: a head cut short is dropped after
/// the header timeout, and past `max_connections` (one budget with the TLS
/// listener's) a connection is closed at once.
#[tokio::test]
async fn plain_http_is_redirected_to_the_tls_listener() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let cert_pem = write_localhost_cert(dir.path());
    let svc = spawn_upstream("tls").await;
    let opts = TestOptions {
        server_extra: "http_redirect_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"5s\"\nmax_connections = 4"
            .to_owned(),
        extra: route("secure", "/secure", &[svc.url()], PUBLIC)
            + "\n[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
        ..TestOptions::default()
    };
    let app = spawn_app_in(dir, opts).await;
    let plain = app.redirect_addr.expect("the redirect listener is bound");
    let tls_port = app.addr.port();

    let r = raw_request(
        plain,
        format!("GET /secure/x?q=1 HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", plain.port()).as_bytes(),
    )
    .await;
    assert_eq!(r.status, Some(308), "{}", r.head);
    let location = r.header("location").expect("a Location").to_owned();
    assert_eq!(location, format!("https://localhost:{tls_port}/secure/x?q=1"));
    let client = Client::builder()
        .no_proxy()
        .add_root_certificate(Certificate::from_pem(cert_pem.as_bytes()).expect("parse the test CA"))
        .resolve("localhost", app.addr)
        .build()
        .expect("build the TLS client");
    let e = echo(client.get(&location).send().await.expect("follow the redirect")).await;
    assert_eq!((e.path(), e.query()), ("/secure/x", Some("q=1")), "{}", e.0);
    assert_eq!(e.one("x-forwarded-proto"), "https", "{}", e.0);

    let post = "POST /secure/form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc";
    let r = raw_request(plain, post.as_bytes()).await;
    assert_eq!(r.status, Some(308), "{}", r.head);
    assert_eq!(r.header("location"), Some(format!("https://localhost:{tls_port}/secure/form").as_str()));
    for (case, head) in [
        ("no host", "GET /x HTTP/1.0\r\n\r\n"),
        ("userinfo", "GET /x HTTP/1.1\r\nHost: a@evil.example\r\n\r\n"),
        ("two hosts", "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
        ("asterisk", "OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ] {
        let r = raw_request(plain, head.as_bytes()).await;
        assert_eq!(r.status, Some(400), "{case}: {}", r.head);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(body["error"], "invalid_request", "{case}");
        assert_eq!(r.header("location"), None, "{case}");
    }
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "gateway_http_redirects_total", &[("status", "308")]), 2.0);
    assert_eq!(metric(&metrics, "gateway_http_redirects_total", &[("status", "400")]), 4.0);

    // A head that never ends is dropped after the header timeout.
    let mut slow = TcpStream::connect(plain).await.expect("connect");
    slow.write_all(b"GET /secure/x HTTP/1.1\r\nHost: loc").await.expect("write half a head");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut got))
        .await
        .expect("the half head was not dropped")
        .ok();

    // The TLS client's connection (kept alive) and three silent ones fill
    // max_connections: a fifth is closed unanswered, however whole its
    // request.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(plain).await.expect("connect"));
    }
    let r = raw_request(plain, b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(r.status, None, "a connection past max_connections was served: {}", r.head);
    drop((held, client));
    app.stop().await;
}

#[tokio::test]
async fn tls_with_http2() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let cert_pem = write_localhost_cert(dir.path());

    let svc = spawn_upstream("tls").await;
    let extra = route("tls", "/tls", &[svc.url()], "") + "\n[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";
    let app = spawn_app_in(dir, TestOptions::with_extra(extra)).await;
    let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

    let client = Client::builder()
        .no_proxy()
        .add_root_certificate(Certificate::from_pem(cert_pem.as_bytes()).expect("parse the test CA"))
        .resolve("localhost", app.addr)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build the TLS client");
    let base = format!("https://localhost:{}", app.addr.port());

    // The gateway's own API over TLS.
    let resp = client
        .post(format!("{base}/auth/login"))
        .json(&json!({ "email": EMAIL, "password": PASSWORD }))
        .send()
        .await
        .expect("POST /auth/login over TLS");
    assert_eq!(resp.version(), Version::HTTP_2, "ALPN should pick h2");
    let tokens = parse_tokens(resp, "login over TLS").await;

    // Proxied over TLS + h2; the upstream hears it was https. Identity
    // fields a client sends over h2, in any spelling, are stripped as over
    // HTTP/1.1.
    let resp = client
        .get(format!("{base}/tls/x?q=1"))
        .bearer_auth(&tokens.access_token)
        .header("x-user-id", "evil")
        .header("x_user_id", "evil")
        .header("x.tenant.id", "evil")
        .send()
        .await
        .expect("GET /tls/x");
    assert_eq!(resp.version(), Version::HTTP_2, "ALPN should pick h2");
    let e = echo(resp).await;
    assert_eq!(e.path(), "/tls/x", "{}", e.0);
    assert_eq!(e.query(), Some("q=1"), "{}", e.0);
    assert_eq!(e.one("x-forwarded-proto"), "https", "{}", e.0);
    assert_eq!(e.one("x-user-id"), user_id, "{}", e.0);
    assert!(!e.has("x_user_id") && !e.has("x.tenant.id"), "{}", e.0);
    assert!(!e.0.to_string().contains("evil"), "{}", e.0);

    // HTTP/1.1 (ALPN http/1.1) over TLS 1.2 and over TLS 1.3.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("parse the cert")).expect("a root");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .expect("TLS version")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(app.addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("{:?} handshake: {e}", version.version));
        let session = tls.get_ref().1;
        assert_eq!(session.protocol_version(), Some(version.version));
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]), "{:?}", version.version);
        let request = format!(
            "GET /tls/h1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            tokens.access_token
        );
        tls.write_all(request.as_bytes()).await.expect("write the request");
        let mut buf = Vec::new();
        // The end may come without a TLS close_notify: what was read counts.
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 200 "), "{:?}: {text}", version.version);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let e = Echo(serde_json::from_str(body).unwrap_or_else(|err| panic!("echo JSON ({err}): {text}")));
        assert_eq!(e.path(), "/tls/h1", "{}", e.0);
        assert_eq!(e.one("x-forwarded-proto"), "https", "{}", e.0);
        assert_eq!(e.one("x-user-id"), user_id, "{}", e.0);
    }

    // Errors over h2 are the same JSON.
    let resp = client.get(format!("{base}/tls/x")).send().await.expect("GET /tls/x without a token");
    assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = app.client.get(app.url("/tls/x")).send().await;
    assert!(plain.is_err(), "plain HTTP was answered on the TLS listener: {plain:?}");
    drop(client);
    app.stop().await;
}

/// A renewed certificate is served without a restart: the gateway notices
/// the files change, as it does `gateway.toml`, and new handshakes get the
/// new pair. A pair that does not match (a renewal caught halfway: the new
/// certificate, the old key) or does not parse is refused, counted, and the
/// running pair stays.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let pair = || rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a self-signed certificate");
    let (old, new) = (pair(), pair());
    std::fs::write(&cert_path, old.cert.pem()).expect("write cert.pem");
    std::fs::write(&key_path, old.key_pair.serialize_pem()).expect("write key.pem");
    let mut roots = rustls::RootCertStore::empty();
    for c in [&old, &new] {
        roots.add(c.cert.der().clone()).expect("a root");
    }

    let opts = TestOptions {
        server_extra: "config_poll = \"100ms\"".to_owned(),
        extra: "\n[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n".to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_in(dir, opts).await;
    let errors = || async {
        metric(&app.metrics().await, "gateway_tls_reloads_total", &[("tls", "listener"), ("result", "error")])
    };
    assert_eq!(served_certificate(app.addr, &roots).await, old.cert.der().to_vec());

    // Halfway: the new certificate beside the old key. Refused; the old pair stays.
    let before = errors().await;
    std::fs::write(&cert_path, new.cert.pem()).expect("write the new cert.pem");
    eventually("the mismatched pair refused", Duration::from_secs(10), || async { errors().await > before }).await;
    assert_eq!(served_certificate(app.addr, &roots).await, old.cert.der().to_vec(), "a mismatched pair was served");

    // The key follows: the new pair is served from the next handshake.
    std::fs::write(&key_path, new.key_pair.serialize_pem()).expect("write the new key.pem");
    eventually("the new certificate served", Duration::from_secs(10), || async {
        served_certificate(app.addr, &roots).await == new.cert.der().to_vec()
    })
    .await;

    // A file that does not parse changes nothing.
    let before = errors().await;
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        .expect("write a broken cert.pem");
    eventually("the broken file refused", Duration::from_secs(10), || async { errors().await > before }).await;
    assert_eq!(served_certificate(app.addr, &roots).await, new.cert.der().to_vec());
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    for http2 in [false, true] {
        let svc = spawn_upstream("slow").await;
        let app = spawn_app_with(TestOptions::with_extra(route("slow", "/slow", &[svc.url()], PUBLIC))).await;
        let builder = Client::builder().no_proxy().timeout(Duration::from_secs(30));
        let client = if http2 { builder.http2_prior_knowledge() } else { builder }.build().expect("build a client");
        let url = app.url("/slow/x?mode=slow&ms=1500");
        let in_flight = tokio::spawn(async move {
            let resp = client.get(url).send().await.expect("the in-flight request got a response");
            assert_eq!(resp.version(), if http2 { Version::HTTP_2 } else { Version::HTTP_11 });
            echo(resp).await
        });
        let upstream = &svc;
        eventually(
            "the slow request reached the upstream",
            Duration::from_secs(10),
            || async move { upstream.hits() >= 1 },
        )
        .await;

        // Shut down while the request is in flight: the drain waits for it.
        app.stop().await;
        let e = tokio::time::timeout(Duration::from_secs(10), in_flight)
            .await
            .unwrap_or_else(|_| panic!("http2 {http2}: the in-flight request did not finish"))
            .expect("the request task did not panic");
        assert_eq!(e.path(), "/slow/x", "http2 {http2}: {}", e.0);
    }
}

/// Opens a WebSocket on the public route "/ws-route" of an app with
/// `shutdown_grace`, echoes once, then sends the shutdown and waits until
/// the listener has closed, so that what follows happens during the drain.
/// Also returns when the shutdown was sent.
async fn websocket_then_shutdown(shutdown_grace: &'static str) -> (Ws, Stopping, Instant) {
    let svc = spawn_upstream("ws").await;
    let opts =
        TestOptions { shutdown_grace, ..TestOptions::with_extra(route("ws", "/ws-route", &[svc.url()], PUBLIC)) };
    let app = spawn_app_with(opts).await;
    let addr = app.addr;
    let url = format!("ws://{addr}/ws-route/x?mode=ws");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("WebSocket handshake via gateway");
    ws_echo(&mut ws, Message::text("before the shutdown")).await;
    let sent = Instant::now();
    let stopping = app.begin_stop();
    eventually(
        "the listener closed",
        Duration::from_secs(10),
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    (ws, stopping, sent)
}

/// Open tunnels are counted while they last, by route (the route name is
/// this test's own: the metrics recorder is shared by the whole test binary).
#[tokio::test]
async fn open_websocket_tunnels_are_counted() {
    let svc = spawn_upstream("ws").await;
    let app = spawn_app_with(TestOptions::with_extra(route("ws-gauge", "/ws-route", &[svc.url()], PUBLIC))).await;
    let url = format!("ws://{}/ws-route/x?mode=ws", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("WebSocket handshake via gateway");
    ws_echo(&mut ws, Message::text("counted")).await;
    let metrics = app.metrics().await;
    for line in [
        "gateway_websocket_tunnels_open{route=\"ws-gauge\"} 1",
        "gateway_websocket_tunnels_total{route=\"ws-gauge\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "expected {line:?} in:\n{metrics}");
    }
    assert!(
        metrics.lines().any(|l| l.starts_with("gateway_connections_open ")),
        "no gateway_connections_open in:\n{metrics}"
    );

    ws.close(None).await.expect("close the WebSocket");
    drop(ws);
    let running = &app;
    eventually("the closed tunnel is counted out", Duration::from_secs(10), || async move {
        running.metrics().await.lines().any(|l| l == "gateway_websocket_tunnels_open{route=\"ws-gauge\"} 0")
    })
    .await;
    app.stop().await;
}

/// A shutdown waits for open WebSocket tunnels as for requests in flight:
/// they keep carrying messages, and the drain ends when the last one closes
/// (well before the grace period).
#[tokio::test]
async fn graceful_shutdown_waits_for_open_websocket_tunnels() {
    let (mut ws, stopping, _) = websocket_then_shutdown("60s").await;
    for i in 0..3 {
        ws_echo(&mut ws, Message::text(format!("during the drain {i}"))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!stopping.is_finished(), "the shutdown finished while a tunnel was open");
    ws.close(None).await.expect("close the WebSocket");
    drop(ws);
    stopping.finish_within(Duration::from_secs(20)).await;
}

/// A tunnel still open when the grace period ends is closed, and the
/// shutdown completes.
#[tokio::test]
async fn graceful_shutdown_closes_tunnels_left_open_at_the_end_of_the_grace() {
    let grace = Duration::from_secs(5);
    let (mut ws, stopping, sent) = websocket_then_shutdown("5s").await;
    ws_echo(&mut ws, Message::text("during the drain")).await;
    let end = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("the tunnel was closed when the grace period ended");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "a message arrived on a tunnel the shutdown should have closed: {end:?}"
    );
    // Not before: the grace started after the shutdown was sent.
    assert!(sent.elapsed() >= grace, "the tunnel was closed {:?} after the shutdown, before its grace", sent.elapsed());
    stopping.finish_within(Duration::from_secs(20)).await;
}

/// A request-smuggling classic: a Content-Length that covers a second,
/// smuggled request which chunked framing would read as a separate one.
const CL_AND_TE: &[u8] = b"POST /raw/x HTTP/1.1\r\nHost: x\r\n\
    Content-Length: 45\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
    GET /raw/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

/// Answered 400 and never forwarded; the smuggled request behind it is never
/// parsed either, because the connection closes after the answer. (A
/// lenient parser would let Transfer-Encoding win and drop the
/// Content-Length; the gateway refuses the request outright.)
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_cannot_smuggle() {
    let svc = spawn_upstream("raw").await;
    let app = spawn_app_with(TestOptions::with_extra(route("raw", "/raw", &[svc.url()], PUBLIC))).await;
    let te_first = b"POST /raw/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
        Content-Length: 5\r\n\r\n0\r\n\r\n";
    // A clean request first: the conflict is found on the second head of the
    // connection too.
    let second = [&b"GET /raw/first HTTP/1.1\r\nHost: x\r\n\r\n"[..], CL_AND_TE].concat();
    for (case, request) in [("CL then TE", CL_AND_TE), ("TE then CL", &te_first[..])] {
        let resp = raw_request(app.addr, request).await;
        assert_eq!(resp.status, Some(400), "{case}: head: {:?}", resp.head);
        assert_eq!(resp.header("connection"), Some("close"), "{case}: head: {:?}", resp.head);
        assert!(resp.text().contains("\"invalid_request\""), "{case}: {}", resp.text());
        assert!(resp.header("x-request-id").is_some(), "{case}: head: {:?}", resp.head);
    }
    let pipelined = raw_request_all(app.addr, &second).await;
    assert!(pipelined.starts_with("HTTP/1.1 200"), "{pipelined}");
    assert!(pipelined.contains("HTTP/1.1 400"), "the second head was not refused: {pipelined}");
    // Give a (wrongly) pipelined request time to arrive upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = svc.seen();
    assert_eq!(seen.len(), 1, "only the clean request may reach the upstream: {seen:?}");
    assert_eq!(seen[0].path, "/raw/first", "{seen:?}");
    // Chunked alone is fine.
    let chunked = b"POST /raw/y HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let resp = raw_request(app.addr, chunked).await;
    assert_eq!(resp.status, Some(200), "head: {:?}", resp.head);
    app.stop().await;
}

/// Writes `request`, reads until the gateway closes the connection (a
/// panic past 5 s) and returns everything read.
async fn read_until_closed(addr: SocketAddr, request: &[u8], case: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the gateway");
    // The gateway may answer (and close) before reading everything.
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "{case}: the connection was still open after 5 s: {}", String::from_utf8_lossy(&buf));
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn malformed_requests_are_refused_and_the_gateway_keeps_serving() {
    let svc = spawn_upstream("raw").await;
    let app = spawn_app_with(TestOptions::with_extra(route("raw", "/raw", &[svc.url()], PUBLIC))).await;
    let big_header = format!("GET /raw/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 * KIB));
    let cases: [(&str, &[u8], Option<u16>); 4] = [
        (
            "bad chunk size",
            &b"POST /raw/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
            Some(400),
        ),
        ("header line without a colon", &b"GET /raw/x HTTP/1.1\r\nHost: x\r\nThisIsNotAHeader\r\n\r\n"[..], Some(400)),
        ("garbage request line", &b"NOT AN HTTP REQUEST\r\n\r\n"[..], Some(400)),
        ("20 KiB header over the 16 KiB limit", big_header.as_bytes(), Some(431)),
    ];
    for (case, request, want) in cases {
        // A valid request pipelined behind the bad one: the gateway must
        // answer the bad one, close, and never serve the second.
        let mut pipelined = request.to_vec();
        pipelined.extend_from_slice(b"GET /raw/after HTTP/1.1\r\nHost: x\r\n\r\n");
        let all = read_until_closed(app.addr, &pipelined, case).await;
        assert_eq!(all.matches("HTTP/1.1 ").count(), 1, "{case}: one answer, then the close: {all}");
        assert!(!svc.seen().iter().any(|s| s.path == "/raw/after"), "{case}: the pipelined request was served");
        let resp = raw_request(app.addr, request).await;
        match want {
            // Refused with a JSON error code, like every other refusal.
            Some(status) => {
                assert_eq!(resp.status, Some(status), "{case}: head: {:?}", resp.head);
                let code = if status == 431 { "\"header_too_large\"" } else { "\"invalid_request\"" };
                assert!(resp.text().contains(code), "{case}: no {code} in {}", resp.text());
            }
            None => assert!(
                !resp.status.is_some_and(|s| (200..300).contains(&s)),
                "{case}: got a 2xx: {:?} {}",
                resp.head,
                resp.text()
            ),
        }
    }
    // Still serving.
    let e = echo(app.get("/raw/ok").await).await;
    assert_eq!(e.path(), "/raw/ok");
    assert_error(app.get("/elsewhere").await, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn max_header_size_is_configurable() {
    let svc = spawn_upstream("raw").await;
    let opts = TestOptions {
        server_extra: "max_header_size = \"8KiB\"".to_owned(),
        extra: route("raw", "/raw", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let small = format!("X-Fill: {}", "a".repeat(2 * KIB));
    let e = raw_get(app.addr, "/raw/x", "gateway.test", &[small.as_str()]).await.json_ok("2 KiB header");
    assert_eq!(e["path"], "/raw/x", "{e}");
    let big = format!("X-Fill: {}", "a".repeat(10 * KIB));
    let resp = raw_get(app.addr, "/raw/x", "gateway.test", &[big.as_str()]).await;
    assert_eq!(resp.status, Some(431), "10 KiB header over an 8 KiB limit: head: {:?}", resp.head);
    assert_eq!(svc.hits(), 1, "the oversized request reached the upstream");
    // Still serving.
    assert_error(app.get("/elsewhere").await, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_proxied_requests() {
    let svc = spawn_upstream("probe").await;
    let app = spawn_app_with(TestOptions::with_extra(route("metrics-probe", "/probe", &[svc.url()], PUBLIC))).await;
    echo(app.get("/probe/x").await).await;
    assert_error(app.get("/no-such-route").await, StatusCode::NOT_FOUND, "not_found").await;

    let metrics = app.metrics().await;
    let requests = |label: &str| {
        metrics.lines().any(|l| l.starts_with("gateway_requests_total{") && l.contains(&format!("route=\"{label}\"")))
    };
    assert!(requests("metrics-probe"), "no gateway_requests_total for route metrics-probe:\n{metrics}");
    assert!(requests("none"), "404s are not counted under route=\"none\":\n{metrics}");

    // Refused before routing (a path that climbs above the root): counted too.
    let refused = |metrics: &str| metric(metrics, "gateway_requests_total", &[("route", "none"), ("status", "400")]);
    let before = refused(&metrics);
    let resp = raw_get(app.addr, "/probe/../../etc", "x", &[]).await;
    assert_eq!(resp.status, Some(400), "head: {:?}", resp.head);
    let after = refused(&app.metrics().await);
    assert!(after > before, "a request refused before routing was not counted ({before} -> {after})");
    assert!(
        metrics.contains("gateway_upstream_duration_seconds"),
        "metrics lack gateway_upstream_duration_seconds:\n{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn connections_that_send_no_request_head_are_closed() {
    let svc = spawn_upstream("raw").await;
    let opts = TestOptions {
        server_extra: "header_read_timeout = \"500ms\"\nidle_timeout = \"1s\"".to_owned(),
        extra: route("raw", "/raw", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    for (case, sent) in [
        ("silent connection", &b""[..]),
        ("half a request head", &b"GET /raw/x HTTP/1.1\r\nHost: gateway.test\r\n"[..]),
    ] {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect to the gateway");
        stream.write_all(sent).await.expect("write to the gateway");
        // Whatever the gateway says before it hangs up, it must hang up: read until EOF or error.
        let mut received = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0_u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{case}: still open 5 s after connecting, with header_read_timeout = 500ms");
        if sent.is_empty() {
            assert!(received.is_empty(), "{case}: got {:?}", String::from_utf8_lossy(&received));
        }
    }
    // A head dripped one byte every 100 ms: the deadline is for the whole
    // head, so new bytes do not extend it (the drip would take 20 s).
    let (mut reader, mut writer) = TcpStream::connect(app.addr).await.expect("connect to the gateway").into_split();
    let drip = tokio::spawn(async move {
        let head = format!("GET /raw/drip HTTP/1.1\r\nHost: gateway.test\r\nX-Drip: {}\r\n\r\n", "a".repeat(200));
        for byte in head.as_bytes() {
            if writer.write_all(std::slice::from_ref(byte)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a dripping head kept its connection 5 s with header_read_timeout = 500ms");
    drip.abort();
    assert_eq!(svc.hits(), 0, "an incomplete request reached the upstream");

    // An idle keep-alive connection is closed after its answer, too.
    let mut stream = TcpStream::connect(app.addr).await.expect("connect to the gateway");
    stream.write_all(b"GET /raw/kept HTTP/1.1\r\nHost: gateway.test\r\n\r\n").await.expect("write");
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection was still open after 5 s");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 "), "the request before the idle wait: {text}");
    assert_eq!(svc.hits(), 1);
    // Still serving.
    let e = echo(app.get("/raw/ok").await).await;
    assert_eq!(e.path(), "/raw/ok");
    app.stop().await;
}

/// Reads until the peer closes (or fails); false if it is still open after `limit`.
async fn closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0_u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok()
}

/// Reads one answer's head (the echo's bodies are short and come with it).
async fn read_answer(stream: &mut TcpStream, what: &str) -> String {
    let mut buf = vec![0_u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Between requests a kept-alive HTTP/1.1 connection waits up to
/// `idle_timeout` for the next one, longer than the header read timeout,
/// and is closed after it; but a head that starts during that wait must
/// still arrive within the header read timeout of its first byte.
#[tokio::test]
async fn kept_alive_connections_wait_the_idle_timeout_and_heads_still_the_header_timeout() {
    let svc = spawn_upstream("raw").await;
    let opts = TestOptions {
        server_extra: "header_read_timeout = \"300ms\"\nidle_timeout = \"8s\"".to_owned(),
        extra: route("raw", "/raw", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let request = |path: &str| format!("GET /raw/{path} HTTP/1.1\r\nHost: gateway.test\r\n\r\n");

    // Idle for over three header read timeouts, then a second request on
    // the same connection.
    let mut stream = TcpStream::connect(app.addr).await.expect("connect to the gateway");
    stream.write_all(request("one").as_bytes()).await.expect("write");
    assert!(read_answer(&mut stream, "first").await.starts_with("HTTP/1.1 200 "));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream.write_all(request("two").as_bytes()).await.expect("the connection is still open");
    let second = read_answer(&mut stream, "second").await;
    assert!(second.starts_with("HTTP/1.1 200 "), "after 1 s idle: {second}");
    assert_eq!(svc.hits(), 2);

    // A head begun during the idle wait and never finished: closed by the
    // header read timeout, well before the idle timeout would.
    let mut slow = TcpStream::connect(app.addr).await.expect("connect to the gateway");
    slow.write_all(request("three").as_bytes()).await.expect("write");
    assert!(read_answer(&mut slow, "third").await.starts_with("HTTP/1.1 200 "));
    // Past several of the timer's re-arms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    slow.write_all(b"GET /raw/never HTTP/1.1\r\nHost: gateway.test\r\n").await.expect("write half a head");
    assert!(
        closes_within(&mut slow, Duration::from_secs(4)).await,
        "half a head kept its connection 4 s with header_read_timeout = 300ms (idle_timeout = 8s)"
    );
    // So does a head dripped a byte every 100 ms: its bytes do not move
    // its start.
    let mut drip = TcpStream::connect(app.addr).await.expect("connect to the gateway");
    drip.write_all(request("four").as_bytes()).await.expect("write");
    assert!(read_answer(&mut drip, "fourth").await.starts_with("HTTP/1.1 200 "));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut reader, mut writer) = drip.into_split();
    let dripping = tokio::spawn(async move {
        let head = format!("GET /raw/drip HTTP/1.1\r\nHost: gateway.test\r\nX-Drip: {}\r\n\r\n", "a".repeat(200));
        for byte in head.as_bytes() {
            if writer.write_all(std::slice::from_ref(byte)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(4), reader.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a head dripped after an idle wait kept its connection 4 s (header_read_timeout = 300ms)");
    dripping.abort();

    // And the first connection, left idle, is closed by the idle timeout.
    assert!(closes_within(&mut stream, Duration::from_secs(20)).await, "still open 20 s with idle_timeout = 8s");
    assert_eq!(svc.hits(), 4, "an incomplete head reached the upstream");
    app.stop().await;
}

/// An idle timeout shorter than the header read timeout holds too, over
/// HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn an_idle_timeout_shorter_than_the_header_read_timeout_holds() {
    let svc = spawn_upstream("raw").await;
    let opts = TestOptions {
        server_extra: "header_read_timeout = \"5s\"\nidle_timeout = \"300ms\"".to_owned(),
        extra: route("raw", "/raw", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect to the gateway");
    stream.write_all(b"GET /raw/one HTTP/1.1\r\nHost: gateway.test\r\n\r\n").await.expect("write");
    assert!(read_answer(&mut stream, "HTTP/1.1").await.starts_with("HTTP/1.1 200 "));
    assert!(
        closes_within(&mut stream, Duration::from_secs(3)).await,
        "HTTP/1.1: idle for 3 s with idle_timeout = 300ms (header_read_timeout = 5s)"
    );

    let (mut send, mut ended) = h2_connect(app.addr).await;
    let resp = send.send_request(h2_get(app.addr, "/raw/two")).await.expect("an HTTP/2 request");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    let closed = tokio::time::timeout(Duration::from_secs(3), &mut ended).await;
    assert!(closed.is_ok(), "HTTP/2: idle for 3 s with idle_timeout = 300ms (header_read_timeout = 5s)");
    assert_eq!(svc.hits(), 2);
    app.stop().await;
}

/// An HTTP/2 connection (hyper's client) and the task driving it.
async fn h2_connect(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>, tokio::task::JoinHandle<hyper::Result<()>>)
{
    let tcp = TcpStream::connect(addr).await.expect("connect to the gateway");
    let (send, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    (send, tokio::spawn(connection))
}

fn h2_get(addr: SocketAddr, path: &str) -> hyper::Request<http_body_util::Empty<Bytes>> {
    hyper::Request::get(format!("http://{addr}{path}")).body(http_body_util::Empty::new()).expect("a request")
}

/// An HTTP/2 connection is not kept forever by its keep-alive pings: with no
/// open stream for `idle_timeout` it gets a GOAWAY and ends cleanly. An
/// answer streaming for longer than that is not cut, a connection idle for
/// less is still served, and one that never opens a stream is closed after
/// the header read timeout.
#[tokio::test]
async fn idle_http2_connections_are_sent_away_but_open_streams_are_not_cut() {
    let svc = spawn_upstream("h2").await;
    let opts = TestOptions {
        server_extra: "header_read_timeout = \"500ms\"\nidle_timeout = \"2s\"".to_owned(),
        extra: route("h2", "/h2", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let (mut send, mut ended) = h2_connect(app.addr).await;

    let resp = send.send_request(h2_get(app.addr, "/h2/one")).await.expect("first request");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resp = send.send_request(h2_get(app.addr, "/h2/two")).await.expect("a request after 1 s idle");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    // An answer whose body streams for 3 s, longer than the idle timeout.
    let resp = send
        .send_request(h2_get(app.addr, "/h2/stream?mode=stream&chunks=3&delay_ms=1500"))
        .await
        .expect("a streaming answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("the whole streamed answer").to_bytes();
    assert_eq!(&body[..], b"chunk 0\nchunk 1\nchunk 2\n");
    assert_eq!(svc.hits(), 3);

    let closed = tokio::time::timeout(Duration::from_secs(20), &mut ended).await;
    match closed {
        Ok(Ok(Ok(()))) => {}
        Ok(other) => panic!("the idle connection ended, but not with a clean GOAWAY: {other:?}"),
        Err(_) => panic!("an idle HTTP/2 connection was still open 20 s after its last stream (idle_timeout = 2s)"),
    }

    let (_send, mut silent) = h2_connect(app.addr).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), &mut silent).await;
    assert!(closed.is_ok(), "an HTTP/2 connection that opened no stream was open 5 s (header_read_timeout = 500ms)");
    app.stop().await;
}

/// An HTTP/2 client that stops taking an answer (its flow-control window
/// stays shut) is disconnected after `send_timeout`, as an HTTP/1.1 one is,
/// instead of holding its stream, slot and upstream connection for ever;
/// an answer that is slow because its upstream is slow is not cut.
#[tokio::test]
async fn http2_clients_that_stop_reading_are_disconnected_but_slow_upstreams_are_not() {
    let svc = spawn_upstream("h2").await;
    let opts = TestOptions {
        server_extra: "send_timeout = \"1s\"".to_owned(),
        extra: route("h2", "/h2", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    // Chunks 1.5 s apart, each longer than the send timeout: all arrive.
    let (mut send, _connection) = h2_connect(app.addr).await;
    let resp = send
        .send_request(h2_get(app.addr, "/h2/stream?mode=stream&chunks=3&delay_ms=1500"))
        .await
        .expect("a slow answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("the whole slow answer").to_bytes();
    assert_eq!(&body[..], b"chunk 0\nchunk 1\nchunk 2\n");

    // 20 MB asked for and never read: the client's window (2 MiB, hyper's
    // default) shuts, and the gateway hangs up.
    let (mut send, mut ended) = h2_connect(app.addr).await;
    let held =
        send.send_request(h2_get(app.addr, "/h2/big?mode=big&bytes=20000000")).await.expect("the big answer's head");
    assert_eq!(held.status(), StatusCode::OK);
    let closed = tokio::time::timeout(Duration::from_secs(15), &mut ended).await;
    assert!(closed.is_ok(), "a client that took nothing for 15 s (send_timeout = 1s) was still connected");
    drop(held);
    app.stop().await;
}

/// An upstream that stops sending in the middle of its answer is given up
/// on after the route's `read_timeout` (the client's answer ends in an
/// error, and it is counted); one that sends a little at a time, each
/// within the limit, is not cut, however long it takes in all.
#[tokio::test]
async fn an_upstream_silent_mid_answer_is_given_up_after_the_read_timeout() {
    let svc = spawn_upstream("stalls").await;
    let app = spawn_app_with(TestOptions::with_extra(route(
        "stalls",
        "/stalls",
        &[svc.url()],
        &public_lines("read_timeout = \"1s\""),
    )))
    .await;
    let resp = app.get("/stalls/x?mode=stream&chunks=4&delay_ms=500").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.expect("an answer whose pauses are within the read timeout");
    assert_eq!(&body[..], b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n");

    let started = Instant::now();
    let mut resp = app.get("/stalls/x?mode=stream&chunks=2&delay_ms=20000").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let first = resp.chunk().await.expect("the first chunk").expect("a first chunk");
    assert_eq!(&first[..], b"chunk 0\n");
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stalled answer was not ended within 10 s (read_timeout = 1s)");
    assert!(rest.is_err(), "a stalled answer ended as if complete");
    assert!(started.elapsed() < Duration::from_secs(15), "waited for the upstream instead");
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "gateway_upstream_errors_total", &[("route", "stalls"), ("kind", "read_timeout")]),
        1.0,
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once() {
    let svc = spawn_upstream("raw").await;
    let opts = TestOptions {
        server_extra: "max_connections = 2".to_owned(),
        extra: route("limited", "/limited", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let before = metric(&app.metrics().await, "gateway_connections_refused_total", &[]);
    // Two keep-alive connections, each answered once and held open.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect to the gateway");
        stream.write_all(format!("GET /limited/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
        let mut buf = vec![0_u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "), "connection {i}: {}", String::from_utf8_lossy(&buf[..n]));
        held.push(stream);
    }
    // A third is closed without an answer.
    let mut third = TcpStream::connect(app.addr).await.expect("the kernel still accepts");
    let _ = third.write_all(b"GET /limited/3 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut received)).await;
    assert!(closed.is_ok(), "the connection over the limit was kept open");
    assert!(received.is_empty(), "the connection over the limit was answered: {}", String::from_utf8_lossy(&received));
    assert_eq!(svc.hits(), 2);
    // The metric is process-wide; this test's refusal is at least one.
    let after = metric(&app.metrics().await, "gateway_connections_refused_total", &[]);
    assert!(after > before, "refusals not counted: {before} -> {after}");
    // A slot given back is free again.
    drop(held.pop());
    eventually("a freed slot serves again", Duration::from_secs(10), || async {
        app.client.get(app.url("/limited/again")).send().await.is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn http2_cookie_fields_reach_the_upstream_as_one_header() {
    let svc = spawn_upstream("h2").await;
    let app = spawn_app_with(TestOptions::with_extra(route("h2", "/h2", &[svc.url()], PUBLIC))).await;
    let client = Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build an HTTP/2 client");

    // HTTP/2 clients send each cookie as a field of its own (RFC 9113 §8.2.3).
    let mut cookies = HeaderMap::new();
    cookies.append(COOKIE, HeaderValue::from_static("a=1"));
    cookies.append(COOKIE, HeaderValue::from_static("b=2"));
    let resp = client.get(app.url("/h2/x")).headers(cookies).send().await.expect("GET /h2/x over HTTP/2");
    assert_eq!(resp.version(), Version::HTTP_2, "prior knowledge on the plain listener speaks HTTP/2");
    let e = echo(resp).await;
    assert_eq!(e.all("cookie"), ["a=1; b=2"], "the HTTP/1.1 upstream expects one Cookie line: {}", e.0);

    // One cookie field over HTTP/2, and one Cookie line over HTTP/1.1, pass as they are.
    let resp = client.get(app.url("/h2/x")).header(COOKIE, "c=3; d=4").send().await.expect("GET /h2/x over HTTP/2");
    assert_eq!(echo(resp).await.all("cookie"), ["c=3; d=4"]);
    let resp = app.client.get(app.url("/h2/x")).header(COOKIE, "c=3; d=4").send().await.expect("GET /h2/x");
    assert_eq!(echo(resp).await.all("cookie"), ["c=3; d=4"]);
    drop(client);
    app.stop().await;
}
