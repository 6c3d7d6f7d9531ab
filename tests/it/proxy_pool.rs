//! The upstream connection pool: keep-alive reuse, and the connections it
//! must not reuse (closed by the upstream, idle too long, or abandoned with
//! their response half read). One worker, so one pool, in every test.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::helpers::{route, spawn_app_with, TestOptions};
use crate::upstream::{echo, spawn_upstream, Upstream};

const PUBLIC: &str = "auth = \"public\"";

async fn one_worker_app(svc: &Upstream, upstream_table: &str) -> crate::helpers::TestApp {
    spawn_app_with(TestOptions {
        server_extra: "workers = 1".to_owned(),
        extra: format!("{}\n{upstream_table}", route("pool", "/pool", &[svc.url()], PUBLIC)),
        ..TestOptions::default()
    })
    .await
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let svc = spawn_upstream("pool").await;
    let app = one_worker_app(&svc, "").await;
    for i in 0..10 {
        let e = echo(app.get(&format!("/pool/{i}")).await).await;
        assert_eq!(e.path(), format!("/pool/{i}"));
    }
    assert_eq!(svc.hits(), 10);
    assert_eq!(svc.connections(), 1, "keep-alive connections to the upstream are reused");
    let metrics = app.metrics().await;
    let line = format!("gateway_upstream_connections_total{{upstream=\"{}\"}} 1", svc.url());
    assert!(metrics.lines().any(|l| l == line), "expected {line:?} in:\n{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_replaced() {
    let svc = spawn_upstream("pool").await;
    let app = one_worker_app(&svc, "").await;
    let e = echo(app.get("/pool/a?mode=close").await).await;
    assert_eq!(e.path(), "/pool/a");
    // The pooled connection is gone: the next requests must not fail on it.
    for path in ["/pool/b", "/pool/c"] {
        let e = echo(app.get(path).await).await;
        assert_eq!(e.path(), path);
    }
    assert_eq!(svc.hits(), 3);
    assert_eq!(svc.connections(), 2, "one connection closed by the upstream, one reused after it");
    app.stop().await;
}

#[tokio::test]
async fn connections_idle_past_the_pool_idle_timeout_are_not_reused() {
    let svc = spawn_upstream("pool").await;
    let app = one_worker_app(&svc, "[upstream]\npool_idle_timeout = \"200ms\"").await;
    echo(app.get("/pool/a").await).await;
    echo(app.get("/pool/b").await).await;
    assert_eq!(svc.connections(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    echo(app.get("/pool/c").await).await;
    assert_eq!(svc.connections(), 2, "the idle connection expired; a new one was opened");
    app.stop().await;
}

#[tokio::test]
async fn a_response_abandoned_half_read_does_not_return_its_connection() {
    let svc = spawn_upstream("pool").await;
    let app = one_worker_app(&svc, "").await;
    // 64 MiB streamed; the client reads a little and hangs up.
    let mut client = TcpStream::connect(app.addr).await.expect("connect");
    client
        .write_all(b"GET /pool/big?mode=big&bytes=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write the request");
    let mut buf = vec![0_u8; 64 * 1024];
    let n = client.read(&mut buf).await.expect("read the start of the response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{:?}", &buf[..n.min(200)]);
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The half-read connection cannot carry another request; a new one does.
    let e = echo(app.get("/pool/after").await).await;
    assert_eq!(e.path(), "/pool/after");
    assert_eq!(svc.connections(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_connection_still_carrying_an_upload_is_not_handed_to_the_next_request() {
    let svc = spawn_upstream("pool").await;
    let app = spawn_app_with(TestOptions {
        server_extra: "workers = 1".to_owned(),
        extra: route("pool", "/pool", &[svc.url()], &format!("{PUBLIC}\ntimeout = \"3s\"")),
        ..TestOptions::default()
    })
    .await;
    // An upload the upstream answers before reading it, and that the client
    // keeps trickling: its upstream connection stays busy meanwhile.
    let mut uploader = TcpStream::connect(app.addr).await.expect("connect");
    uploader
        .write_all(b"POST /pool/up?mode=early HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nsome bytes")
        .await
        .expect("write the start of the upload");
    let mut buf = vec![0_u8; 4096];
    let n = uploader.read(&mut buf).await.expect("read the early answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));

    // The next request must not queue behind the upload (it would time out: 504).
    let e = echo(app.get("/pool/next").await).await;
    assert_eq!(e.path(), "/pool/next");
    assert_eq!(svc.connections(), 2, "the busy connection was not reused");
    drop(uploader);
    app.stop().await;
}
