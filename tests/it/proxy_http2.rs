//! Routes with `upstream_protocol = "http2"`: the gateway speaks HTTP/2 to
//! the upstream (h2c with prior knowledge, or TLS with ALPN `h2`), as gRPC
//! servers need: trailers reach the client, `TE: trailers` reaches the
//! upstream, identity is injected and spoofs stripped as on any route, and
//! one connection per upstream carries every request.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, AUTHORIZATION, TE};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::helpers::{
    assert_error, eventually, metric, route, spawn_app_in, spawn_app_with, TestApp, TestOptions, PASSWORD,
};
use crate::upstream::{spawn_h2_upstream, spawn_tls_h2_upstream, spawn_upstream, Echo};

const EMAIL: &str = "caller@example.com";
const HTTP2: &str = "upstream_protocol = \"http2\"";

/// A gateway with `routes`, one worker (so one upstream pool), and a user.
async fn gateway(routes: String) -> (TestApp, String) {
    let opts = TestOptions { server_extra: "workers = 1".to_owned(), ..TestOptions::with_extra(routes) };
    let app = spawn_app_with(opts).await;
    app.create_user("default", EMAIL, PASSWORD, &["reader"], &[]).await;
    let access = app.login_ok(EMAIL, PASSWORD, None).await.access_token;
    (app, access)
}

/// An HTTP/2 connection to the gateway (h2c with prior knowledge), as a
/// gRPC client makes.
async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<ClientBody> {
    let tcp = TcpStream::connect(addr).await.expect("connect to the gateway");
    let (send, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    send
}

type ClientBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

/// A request body: `data`, then `trailers` if any.
fn body(data: &'static [u8], trailers: &[(&'static str, &'static str)]) -> ClientBody {
    let mut frames = vec![Frame::data(Bytes::from_static(data))];
    if !trailers.is_empty() {
        let mut map = hyper::HeaderMap::new();
        for (name, value) in trailers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        frames.push(Frame::trailers(map));
    }
    StreamBody::new(futures::stream::iter(frames.into_iter().map(Ok))).boxed_unsync()
}

/// Sends `request` on `client`; the status, the echo and the trailers.
async fn call(
    client: &mut hyper::client::conn::http2::SendRequest<ClientBody>,
    request: hyper::Request<ClientBody>,
) -> (StatusCode, Value, Option<hyper::HeaderMap>) {
    let response = client.send_request(request).await.expect("an answer");
    let status = StatusCode::from_u16(response.status().as_u16()).expect("a status");
    let collected = response.into_body().collect().await.expect("the whole body");
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (status, value, trailers)
}

#[tokio::test]
async fn a_grpc_style_call_gets_its_trailers_identity_and_te() {
    let upstream = spawn_h2_upstream("grpc").await;
    let (app, access) = gateway(route("grpc", "/pkg.Service", &[upstream.url()], HTTP2)).await;
    let mut client = h2_client(app.addr).await;

    let request = hyper::Request::post(format!("http://{}/pkg.Service/./Method?mode=trailers", app.addr))
        .header(AUTHORIZATION, format!("Bearer {access}"))
        .header(TE, "trailers")
        .header("content-type", "application/grpc")
        .header("x-user-id", "forged")
        .header("x_user_id", "forged")
        .body(body(b"\x00\x00\x00\x00\x05hello", &[("x-checksum", "5"), ("x-user-id", "forged-in-a-trailer")]))
        .expect("a request");
    let (status, echo, trailers) = call(&mut client, request).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    let e = Echo(echo);
    assert_eq!(e.0["version"], "HTTP/2.0", "{}", e.0);
    assert_eq!(e.path(), "/pkg.Service/Method", "the normalised path: {}", e.0);
    assert_eq!(e.query(), Some("mode=trailers"));
    assert_eq!(e.body_len(), 10);
    // The upstream is named in `:authority`, and no `Host` goes along.
    assert_eq!(e.0["authority"].as_str(), Some(upstream.addr.to_string().as_str()), "{}", e.0);
    assert!(!e.has("host"), "{}", e.0);
    assert_eq!(e.all("te"), vec!["trailers"], "{}", e.0);
    assert_eq!(e.all("content-type"), vec!["application/grpc"]);
    // Identity as on any route: injected once, spoofs gone, no token.
    let user = e.one("x-user-id").to_owned();
    assert_ne!(user, "forged");
    assert_eq!(e.all("x-user-id").len(), 1, "{}", e.0);
    assert!(!e.has("x_user_id") && !e.has("authorization"), "{}", e.0);
    assert_eq!(e.one("x-user-roles"), "reader");
    // The client's trailers are dropped, as on HTTP/1.1: no forged
    // identity comes in through them.
    assert_eq!(e.0["trailers"], serde_json::json!([]), "{}", e.0);
    // The upstream's trailers reach the client.
    let trailers = trailers.expect("the answer ends with trailers");
    assert_eq!(trailers.get("grpc-status"), Some(&HeaderValue::from_static("0")), "{trailers:?}");
    assert_eq!(trailers.get("grpc-message"), Some(&HeaderValue::from_static("done")), "{trailers:?}");

    // Without `TE: trailers` from the client, none is sent on.
    let request = hyper::Request::get(format!("http://{}/pkg.Service/Method", app.addr))
        .header(AUTHORIZATION, format!("Bearer {access}"))
        .body(body(b"", &[]))
        .expect("a request");
    let (status, echo, _) = call(&mut client, request).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert!(!Echo(echo.clone()).has("te"), "{echo}");

    // Unauthenticated: refused before any upstream contact.
    let hits = upstream.hits();
    let request = hyper::Request::post(format!("http://{}/pkg.Service/Method", app.addr))
        .header(TE, "trailers")
        .body(body(b"", &[]))
        .expect("a request");
    let (status, body, _) = call(&mut client, request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(upstream.hits(), hits);
    app.stop().await;
}

/// A route's `remove_response_headers` hold for the upstream's trailers
/// too, and so do the fields the gateway sets on the answer: a field taken
/// out of (or set in) the head cannot come back after the body.
#[tokio::test]
async fn removed_response_fields_are_taken_out_of_trailers_too() {
    let upstream = spawn_h2_upstream("grpc").await;
    let lines = format!(
        "{HTTP2}\nremove_response_headers = [\"x-served-by\"]\nresponse_headers = {{ \"X-Cache\" = \"gateway\" }}"
    );
    let (app, access) = gateway(route("trimmed", "/pkg.Service", &[upstream.url()], &lines)).await;
    let mut client = h2_client(app.addr).await;
    let request = hyper::Request::post(format!("http://{}/pkg.Service/Method?mode=trailers", app.addr))
        .header(AUTHORIZATION, format!("Bearer {access}"))
        .header(TE, "trailers")
        .header("content-type", "application/grpc")
        .body(body(b"\x00\x00\x00\x00\x00", &[]))
        .expect("a request");
    let response = client.send_request(request).await.expect("an answer");
    assert_eq!(response.headers()["x-cache"], "gateway", "set in the head");
    let trailers = response.into_body().collect().await.expect("the body").trailers().cloned();
    let trailers = trailers.expect("the answer ends with trailers");
    assert_eq!(trailers.get("grpc-status"), Some(&HeaderValue::from_static("0")), "{trailers:?}");
    assert_eq!(trailers.get("grpc-message"), Some(&HeaderValue::from_static("done")), "{trailers:?}");
    assert!(trailers.get("x-served-by").is_none(), "removed: {trailers:?}");
    assert!(trailers.get("x-cache").is_none(), "set by the gateway, not contradicted: {trailers:?}");
    app.stop().await;
}

/// A gRPC call the gateway refuses is told so as gRPC clients read it: a
/// Trailers-Only answer (HTTP 200, no body, `grpc-status` and a
/// percent-encoded `grpc-message`), counted under the HTTP status it stands
/// for. Other requests on the same route keep their JSON refusals.
#[tokio::test]
async fn refused_grpc_calls_get_a_grpc_status() {
    let upstream = spawn_h2_upstream("grpc").await;
    // Route names of their own: the metrics recorder is the test process's.
    let routes = route("refusing", "/pkg.Service", &[upstream.url()], &format!("{HTTP2}\nroles = [\"reader\"]"))
        + &route("refusing-admin", "/pkg.Admin", &[upstream.url()], &format!("{HTTP2}\nroles = [\"admin\"]"));
    let (app, access) = gateway(routes).await;
    let mut client = h2_client(app.addr).await;
    let grpc_call = |path: &str, token: Option<&str>| {
        let mut request = hyper::Request::post(format!("http://{}{path}", app.addr))
            .header(TE, "trailers")
            .header("content-type", "application/grpc+proto");
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        request.body(body(b"\x00\x00\x00\x00\x00", &[])).expect("a request")
    };
    let cases = [
        ("/pkg.Service/Method", None, "16", "unauthorized: a bearer access token is required"),
        ("/pkg.Service/Method", Some("not-a-token"), "16", "invalid_token: "),
        ("/pkg.Admin/Method", Some(access.as_str()), "7", "forbidden: "),
        ("/pkg.Nowhere/Method", Some(access.as_str()), "12", "not_found: "),
        ("/pkg.Service/a%2fb", Some(access.as_str()), "13", "invalid_request: "),
    ];
    for (path, token, code, message) in cases {
        let response = client.send_request(grpc_call(path, token)).await.expect("an answer");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        // Trailers-Only: the head ends the stream (no DATA frame follows).
        assert!(hyper::body::Body::is_end_stream(response.body()), "{path}: the head ends the stream");
        let fields = response.headers().clone();
        assert_eq!(fields["content-type"], "application/grpc", "{path}");
        assert_eq!(fields["grpc-status"], code, "{path}: {fields:?}");
        let told = fields["grpc-message"].to_str().expect("ASCII");
        assert!(told.starts_with(message), "{path}: {told}");
        let collected = response.into_body().collect().await.expect("the body");
        assert!(collected.trailers().is_none(), "{path}: Trailers-Only, all in the head");
        assert!(collected.to_bytes().is_empty(), "{path}: no body");
        if token.is_none() {
            assert_eq!(fields["www-authenticate"], "Bearer", "the challenge stays");
        }
    }
    assert_eq!(upstream.hits(), 0, "no refused call reached the upstream");

    // The same refusal to a request that is no gRPC call: JSON. gRPC-Web
    // is not, nor is anything over HTTP/1.1 (gRPC is HTTP/2 only).
    let plain = hyper::Request::post(format!("http://{}/pkg.Service/Method", app.addr))
        .header("content-type", "application/grpc-web")
        .body(body(b"", &[]))
        .expect("a request");
    let (status, json, _) = call(&mut client, plain).await;
    assert_eq!((status, json["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")), "{json}");
    let http1 = app.client.post(app.url("/pkg.Service/Method")).header("content-type", "application/grpc").send().await;
    assert_error(http1.expect("an answer"), StatusCode::UNAUTHORIZED, "unauthorized").await;

    let metrics = app.metrics().await;
    let counted =
        |route: &str, status: &str| metric(&metrics, "gateway_requests_total", &[("route", route), ("status", status)]);
    assert_eq!(counted("refusing", "401"), 4.0, "counted with the HTTP status they stand for:\n{metrics}");
    assert_eq!(counted("refusing", "200"), 0.0, "{metrics}");
    assert_eq!(counted("refusing-admin", "403"), 1.0, "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn one_connection_carries_every_request_and_a_closed_one_is_replaced() {
    let upstream = spawn_h2_upstream("shared").await;
    let (app, access) = gateway(route("shared", "/shared", &[upstream.url()], HTTP2)).await;

    // Requests that come together before any connection is up wait for
    // the one being made.
    let calls = (0..8).map(|_| app.client.get(app.url("/shared/y")).bearer_auth(&access).send());
    for resp in futures::future::join_all(calls).await {
        assert_eq!(resp.expect("GET").status(), StatusCode::OK);
    }
    assert_eq!(upstream.connections(), 1, "concurrent first requests made one connection");
    // HTTP/1.1 clients too: the gateway speaks HTTP/2 upstream whatever
    // the client speaks (the body arrives; trailers have no HTTP/1.1 form
    // here and are left out, so `TE: trailers` is not passed on).
    for _ in 0..3 {
        let resp = app
            .client
            .get(app.url("/shared/x?mode=trailers"))
            .bearer_auth(&access)
            .header("connection", "te")
            .header("te", "trailers")
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::OK);
        let e = crate::upstream::echo(resp).await;
        assert_eq!(e.0["version"], "HTTP/2.0", "{}", e.0);
        assert!(!e.has("te"), "{}", e.0);
    }
    assert_eq!(upstream.hits(), 11);
    assert_eq!(upstream.connections(), 1, "every request, concurrent ones too, on one connection");

    // The upstream closes it: the next request goes on a new one.
    upstream.drop_connections();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let resp = app.client.get(app.url("/shared/z")).bearer_auth(&access).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.connections(), 2);
    app.stop().await;
}

#[tokio::test]
async fn an_upstream_that_does_not_speak_http2_is_a_502() {
    // An HTTP/1.1-only server behind an http2 route: the HTTP/2 preface
    // is refused, and the gateway answers 502 and goes on serving.
    let h1 = spawn_upstream("h1").await;
    let (app, access) = gateway(route("h1only", "/h1only", &[h1.url()], HTTP2)).await;
    let resp = app.client.get(app.url("/h1only/x")).bearer_auth(&access).send().await.expect("GET");
    assert_error(resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    let resp = app.client.get(app.url("/h1only/x")).bearer_auth(&access).send().await.expect("GET");
    assert_error(resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    app.me_ok(&access).await;
    app.stop().await;
}

#[tokio::test]
async fn https_upstreams_must_choose_h2_in_alpn() {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("generate a self-signed certificate");
    let (cert_pem, key_pem) = (cert.pem(), key_pair.serialize_pem());
    let good = spawn_tls_h2_upstream("alpn-h2", &cert_pem, &key_pem, true).await;
    let bad = spawn_tls_h2_upstream("no-alpn", &cert_pem, &key_pem, false).await;
    let routes = route("good", "/good", &[format!("https://{}", good.addr)], HTTP2)
        + &route("bad", "/bad", &[format!("https://{}", bad.addr)], HTTP2)
        + "\n[upstream]\nca_file = \"ca.pem\"\n";
    let dir = tempfile::tempdir().expect("create temp dir");
    std::fs::write(dir.path().join("ca.pem"), &cert_pem).expect("write ca.pem");
    let app = spawn_app_in(dir, TestOptions::with_extra(routes)).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let access = app.login_ok(EMAIL, PASSWORD, None).await.access_token;

    let resp = app.client.get(app.url("/good/x?mode=trailers")).bearer_auth(&access).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let e = crate::upstream::echo(resp).await;
    assert_eq!((e.upstream(), e.0["version"].as_str()), ("alpn-h2", Some("HTTP/2.0")), "{}", e.0);

    // An upstream that does not choose h2 is refused at the handshake,
    // like one whose certificate is not trusted: no request reaches it.
    let resp = app.client.get(app.url("/bad/x")).bearer_auth(&access).send().await.expect("GET");
    assert_error(resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    assert_eq!(bad.hits(), 0);
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "gateway_upstream_errors_total", &[("route", "bad"), ("kind", "connect")]), 1.0);
    app.stop().await;
}

#[tokio::test]
async fn health_checks_speak_http2_too() {
    let upstream = spawn_h2_upstream("probed").await;
    let check = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"1s\", unhealthy_after = 1, \
                 healthy_after = 1 }";
    let routes = route("probed", "/probed", &[upstream.url()], &format!("{HTTP2}\n{check}"));
    let (app, _) = gateway(routes).await;
    eventually("an HTTP/2 health check", std::time::Duration::from_secs(5), || async {
        upstream.health_checks().iter().any(|seen| seen.path == "/healthz")
    })
    .await;
    upstream.set_health(503);
    eventually("the upstream marked unhealthy", std::time::Duration::from_secs(5), || async {
        let metrics = app.metrics().await;
        metric(&metrics, "gateway_upstream_healthy", &[("route", "probed")]) == 0.0
            && metrics.contains("gateway_upstream_healthy{route=\"probed\"")
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_silent_http2_answer_is_cut_at_the_read_timeout() {
    let upstream = spawn_h2_upstream("silent").await;
    let lines = format!("{HTTP2}\nread_timeout = \"300ms\"");
    let (app, access) = gateway(route("silent", "/silent", &[upstream.url()], &lines)).await;
    let resp = app
        .client
        .get(app.url("/silent/x?mode=stream&chunks=3&delay_ms=3000"))
        .bearer_auth(&access)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.is_err(), "the answer is cut, not ended as if whole");
    let metrics = app.metrics().await;
    let cut = metric(&metrics, "gateway_upstream_errors_total", &[("route", "silent"), ("kind", "read_timeout")]);
    assert_eq!(cut, 1.0, "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_preserved_host_must_be_a_bare_authority() {
    let upstream = spawn_h2_upstream("preserved").await;
    let lines = format!("{HTTP2}\npreserve_host = true");
    let (app, access) = gateway(route("preserved", "/pkg.Service", &[upstream.url()], &lines)).await;
    let get = |host: &'static str| {
        app.client.get(app.url("/pkg.Service/Get")).bearer_auth(&access).header("host", host).send()
    };
    let e = crate::upstream::echo(get("app.example:8443").await.expect("GET")).await;
    assert_eq!(e.0["authority"], "app.example:8443", "{}", e.0);
    assert_eq!(e.path(), "/pkg.Service/Get");

    // A Host that would carry a path, query or userinfo into the
    // `:authority` (and so move the path the policy judged) is refused.
    for host in ["app.example/pkg.Admin/Delete#", "app.example:443/x?", "user@app.example", "app.example#frag"] {
        let resp = get(host).await.expect("GET");
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_eq!(upstream.hits(), 1, "nothing refused reached the upstream");
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_the_clients_fault() {
    let upstream = spawn_h2_upstream("limited").await;
    let lines = format!("{HTTP2}\nmax_body = \"1KiB\"");
    let (app, access) = gateway(route("limited", "/limited", &[upstream.url()], &lines)).await;
    // Chunked, so no length announces it: found out while it streams.
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(vec![b'x'; 800]), Ok(vec![b'y'; 800])]);
    let resp = app
        .client
        .post(app.url("/limited/upload"))
        .bearer_auth(&access)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("POST");
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "gateway_upstream_errors_total", &[("route", "limited")]), 0.0, "{metrics}");
    app.stop().await;
}
