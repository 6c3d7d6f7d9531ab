//! A real upstream for the proxy tests: hyper 1 HTTP/1.1 (with upgrades) on 127.0.0.1:0.
//!
//! The behaviour is chosen by the `mode` query parameter, whatever the path (so it works
//! behind any route prefix, `strip_prefix` or upstream base path):
//!
//! - no `mode` (default): 200 JSON echo of what the upstream received:
//!   `{"upstream": name, "method", "path" (path only), "query" (string or null),
//!   "headers": [[name, value], ...] (all, in order, lower-case names), "body_len"}`.
//!   The whole request body is read to count it. The answer carries `X-Powered-By`.
//! - `mode=slow&ms=N`: reads the body, sleeps N ms, then echoes.
//! - `mode=stream&chunks=N&delay_ms=D`: 200 `text/plain`, chunked: `chunk 0\n` at once,
//!   then `chunk 1\n` ... `chunk N-1\n`, each D ms after the previous one.
//! - `mode=big&bytes=N`: 200 `application/octet-stream`, N bytes of `x` streamed in 64 KiB
//!   chunks (no Content-Length).
//! - `mode=early`: 200 `text/plain` "early" at once; the request body is read afterwards.
//! - `mode=close`: the echo, with `Connection: close` (the connection ends after it).
//! - `mode=trailers`: the echo, then the trailers `grpc-status: 0` and
//!   `grpc-message: done` (as a gRPC server ends a call; HTTP/2 only), and
//!   `x-served-by: <name>` and `x-cache: upstream`.
//!
//! The echo also names the request's `"version"` (`"HTTP/1.1"`, `"HTTP/2.0"`),
//! over HTTP/2 its `"authority"` (the `:authority` pseudo-field; null without one),
//! and the request's `"trailers"` (`[[name, value], ...]`).
//! - `mode=ws`: WebSocket echo (answers 101 when the request asks for `Upgrade: websocket`,
//!   else 400): every text and binary message is sent back.
//! - `pause_ms=P` (any mode that reads the body): a slow reader, resting P ms after each MiB.
//!
//! - path `/healthz` (whatever the query): an empty answer with the status
//!   [`Upstream::set_health`] chose (200 at first), for health checks.
//!
//! Every request (WebSocket handshakes included) is counted in [`Upstream::hits`] as soon as
//! its head arrives, and its method, path+query and headers are recorded ([`Upstream::last`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reqwest::Response as ClientResponse;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::helpers::expect_json;

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// Size of the chunks of `mode=big`.
const BIG_CHUNK: usize = 64 * 1024;
static BIG_CHUNK_DATA: [u8; BIG_CHUNK] = [b'x'; BIG_CHUNK];

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, exactly as received.
    pub path: String,
    /// Every header, in order, lower-case names.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// Every value of header `name` (lower-case).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    /// The value of header `name`, asserting it was received exactly once.
    pub fn one(&self, name: &str) -> &str {
        let values = self.all(name);
        assert_eq!(values.len(), 1, "upstream expected exactly one {name} header; got {:?}", self.headers);
        values[0]
    }

    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }
}

struct State {
    name: String,
    hits: AtomicUsize,
    connections: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    /// The status `/healthz` answers with.
    health: AtomicU16,
    /// The connections being served, for [`Upstream::drop_connections`].
    served: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A running upstream; stops accepting when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (counted when the request head arrives).
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Closes every connection it serves (the listener stays).
    pub fn drop_connections(&self) {
        for task in self.state.served.lock().expect("upstream connections lock is not poisoned").drain(..) {
            task.abort();
        }
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("upstream record lock is not poisoned").clone()
    }

    /// Makes `/healthz` answer `status` from now on.
    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::SeqCst);
    }

    /// Requests for `/healthz` received so far.
    pub fn health_checks(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path.starts_with("/healthz")).collect()
    }

    /// Requests other than `/healthz` received so far.
    pub fn requests(&self) -> usize {
        self.seen().iter().filter(|s| !s.path.starts_with("/healthz")).count()
    }

    /// The latest request received; panics when there was none.
    pub fn last(&self) -> Seen {
        self.seen().pop().unwrap_or_else(|| panic!("upstream {} received no request", self.state.name))
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts an upstream called `name` (echoed as `"upstream"`) on 127.0.0.1:0.
pub async fn spawn_upstream(name: &str) -> Upstream {
    spawn(name, None, false).await
}

/// Like [`spawn_upstream`], speaking HTTP/2 only (cleartext, with prior
/// knowledge: an HTTP/1.1 request is refused), as a gRPC server does.
pub async fn spawn_h2_upstream(name: &str) -> Upstream {
    spawn(name, None, true).await
}

/// Like [`spawn_tls_upstream`], speaking HTTP/2 only: choosing ALPN `h2`
/// when `offer_h2`, else taking no part in ALPN, as servers older than
/// HTTP/2 do (and then speaking HTTP/2 all the same, so that a client
/// that did not check what was chosen would be caught out).
pub async fn spawn_tls_h2_upstream(name: &str, cert_pem: &str, key_pem: &str, offer_h2: bool) -> Upstream {
    let mut config = tls_config(cert_pem, key_pem);
    if offer_h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    spawn(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))), true).await
}

async fn spawn(name: &str, tls: Option<tokio_rustls::TlsAcceptor>, http2: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream listener");
    let addr = listener.local_addr().expect("upstream listener address");
    let state = Arc::new(State {
        name: name.to_owned(),
        hits: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
        health: AtomicU16::new(200),
        served: Mutex::new(Vec::new()),
    });
    let task = tokio::spawn(accept_loop(listener, Arc::clone(&state), tls, http2));
    Upstream { addr, state, task }
}

/// Like [`spawn_upstream`], serving HTTPS (HTTP/1.1) with `cert_pem` and
/// `key_pem`; [`Upstream::url`] stays `http://`, so build the `https://`
/// URL from [`Upstream::addr`].
pub async fn spawn_tls_upstream(name: &str, cert_pem: &str, key_pem: &str) -> Upstream {
    let config = tls_config(cert_pem, key_pem);
    spawn(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))), false).await
}

pub fn tls_config(cert_pem: &str, key_pem: &str) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("parse the upstream's certificate");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("parse the upstream's key");
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("the upstream's certificate and key")
}

/// Like [`spawn_tls_upstream`], and asking every client for a certificate
/// that `client_ca_pem` vouches for (mutual TLS): a handshake without one
/// fails, and no request is read.
pub async fn spawn_mtls_upstream(name: &str, cert_pem: &str, key_pem: &str, client_ca_pem: &str) -> Upstream {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("parse the upstream's certificate");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("parse the upstream's key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(client_ca_pem.as_bytes()).expect("parse the client CA")).expect("a root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .expect("a client certificate verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .expect("the upstream's certificate and key");
    spawn(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))), false).await
}

/// A URL on which nothing listens: a port bound but never listened on, and
/// kept bound for the rest of the process so no parallel test can take it
/// (connections to it are refused).
pub fn dead_upstream_url() -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("create a socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind a throwaway port");
    let addr = socket.local_addr().expect("throwaway port address");
    std::mem::forget(socket);
    format!("http://{addr}")
}

/// The URL of a port whose listener never completes another handshake:
/// its accept queue (backlog 0) is full with one connection nobody
/// accepts, so the kernel drops further SYNs and a connect times out.
/// Both sockets live as long as the test process.
pub fn hanging_upstream_url() -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("create a socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind a throwaway port");
    let addr = socket.local_addr().expect("throwaway port address");
    let listener = socket.listen(0).expect("listen with backlog 0");
    let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("fill the accept queue");
    std::mem::forget((listener, filler));
    format!("http://{addr}")
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, tls: Option<tokio_rustls::TlsAcceptor>, http2: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        state.connections.fetch_add(1, Ordering::SeqCst);
        let served = Arc::clone(&state);
        let state = Arc::clone(&state);
        let tls = tls.clone();
        let task = tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            // Errors here are clients (the gateway) going away, or failed
            // handshakes; nothing to do.
            let h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            let http = http1::Builder::new();
            match tls {
                None if http2 => {
                    let _ = h2.serve_connection(TokioIo::new(stream), service).await;
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), service).with_upgrades().await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        if http2 {
                            let _ = h2.serve_connection(TokioIo::new(stream), service).await;
                        } else {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                }
            }
        });
        served.served.lock().expect("upstream connections lock is not poisoned").push(task.abort_handle());
    }
}

/// The value of query parameter `key` (raw, not decoded).
fn param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

fn num(query: Option<&str>, key: &str, default: u64) -> u64 {
    param(query, key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn handle(state: Arc<State>, mut req: Request<Incoming>) -> Response<RespBody> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let path_and_query = req.uri().path_and_query().map_or_else(|| req.uri().path().to_owned(), ToString::to_string);
    state.seen.lock().expect("upstream record lock is not poisoned").push(Seen {
        method: req.method().to_string(),
        path: path_and_query,
        headers: headers.clone(),
    });

    if req.uri().path() == "/healthz" {
        let status = StatusCode::from_u16(state.health.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
        return full(status, "text/plain", "");
    }
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let mode = param(query, "mode").unwrap_or("echo").to_owned();
    if mode == "ws" {
        return websocket(&mut req);
    }

    if mode == "early" {
        // Answers before reading the request body, which is then read (and
        // dropped) in the background, as servers refusing an upload do.
        let mut body = req.into_body();
        tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
        return full(StatusCode::OK, "text/plain", "early");
    }

    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let version = format!("{:?}", req.version());
    let authority = req.uri().authority().map(ToString::to_string);
    let mut body = req.into_body();
    let mut body_len: u64 = 0;
    let mut body_error = false;
    let mut trailers: Vec<Value> = Vec::new();
    // `pause_ms`: a slow reader, resting that long after each MiB it reads.
    let pause = Duration::from_millis(num(query, "pause_ms", 0));
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(fields) = frame.trailers_ref() {
                    trailers.extend(fields.iter().map(|(n, v)| json!([n.as_str(), v.to_str().unwrap_or("?")])));
                }
                if let Some(data) = frame.data_ref() {
                    let before = body_len;
                    body_len += data.len() as u64;
                    if !pause.is_zero() && before >> 20 != body_len >> 20 {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            Err(_) => {
                body_error = true;
                break;
            }
        }
    }
    if body_error {
        return full(StatusCode::BAD_REQUEST, "text/plain", "request body error");
    }

    match mode.as_str() {
        "stream" => {
            let chunks = num(query, "chunks", 5);
            let delay = Duration::from_millis(num(query, "delay_ms", 100));
            let stream = futures::stream::unfold(0_u64, move |i| async move {
                if i >= chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i}\n")))), i + 1))
            });
            let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
        "big" => {
            let total = usize::try_from(num(query, "bytes", 0)).expect("bytes fits in usize");
            let sizes = (0..total).step_by(BIG_CHUNK).map(move |start| (total - start).min(BIG_CHUNK));
            let stream = futures::stream::iter(sizes)
                .map(|n| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&BIG_CHUNK_DATA[..n]))));
            let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            response
        }
        other => {
            if other == "slow" {
                tokio::time::sleep(Duration::from_millis(num(query, "ms", 1000))).await;
            }
            let echo = json!({
                "upstream": state.name,
                "method": method,
                "path": path,
                "query": query,
                "headers": headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<Value>>(),
                "body_len": body_len,
                "version": version,
                "authority": authority,
                "trailers": trailers,
            });
            if other == "trailers" {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                trailers.insert("grpc-message", HeaderValue::from_static("done"));
                trailers.insert("x-served-by", HeaderValue::from_str(&state.name).expect("a field value"));
                trailers.insert("x-cache", HeaderValue::from_static("upstream"));
                let frames = [Frame::data(Bytes::from(echo.to_string())), Frame::trailers(trailers)];
                let stream = futures::stream::iter(frames.map(Ok::<_, Infallible>));
                let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return response;
            }
            let mut response = full(StatusCode::OK, "application/json", echo.to_string());
            // What a route's remove_response_headers may drop.
            response.headers_mut().insert("x-powered-by", HeaderValue::from_static("test-upstream"));
            if other == "close" {
                // hyper closes the connection after this response.
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// Answers a WebSocket handshake with 101 and echoes messages on the upgraded connection.
fn websocket(req: &mut Request<Incoming>) -> Response<RespBody> {
    let wants_ws =
        req.headers().get(UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).filter(|_| wants_ws) else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "expected a WebSocket upgrade");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            let echo = matches!(message, Message::Text(_) | Message::Binary(_));
            if matches!(message, Message::Close(_)) || (echo && ws.send(message).await.is_err()) {
                return;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("accept key is a valid header value"));
    response
}

/// The JSON echo of the default endpoint, as the client received it.
#[derive(Debug, Clone)]
pub struct Echo(pub Value);

impl Echo {
    /// The upstream's name.
    pub fn upstream(&self) -> &str {
        self.0["upstream"].as_str().unwrap_or_else(|| panic!("echo has no upstream name: {}", self.0))
    }

    pub fn method(&self) -> &str {
        self.0["method"].as_str().unwrap_or_else(|| panic!("echo has no method: {}", self.0))
    }

    /// The path the upstream received (no query).
    pub fn path(&self) -> &str {
        self.0["path"].as_str().unwrap_or_else(|| panic!("echo has no path: {}", self.0))
    }

    /// The query the upstream received, if any.
    pub fn query(&self) -> Option<&str> {
        self.0["query"].as_str()
    }

    pub fn body_len(&self) -> u64 {
        self.0["body_len"].as_u64().unwrap_or_else(|| panic!("echo has no body_len: {}", self.0))
    }

    /// Every header the upstream received, in order: (lower-case name, value).
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        let list = self.0["headers"].as_array().unwrap_or_else(|| panic!("echo has no header list: {}", self.0));
        list.iter()
            .map(|pair| {
                let name = pair[0].as_str().unwrap_or_else(|| panic!("bad echoed header {pair}"));
                let value = pair[1].as_str().unwrap_or_else(|| panic!("bad echoed header {pair}"));
                (name, value)
            })
            .collect()
    }

    /// Every header name the upstream received, in order.
    pub fn names(&self) -> Vec<&str> {
        self.pairs().into_iter().map(|(n, _)| n).collect()
    }

    /// Every value of header `name` (lower-case) the upstream received.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.pairs().into_iter().filter(|(n, _)| *n == name).map(|(_, v)| v).collect()
    }

    /// The value of header `name`, asserting the upstream received it exactly once.
    pub fn one(&self, name: &str) -> &str {
        let values = self.all(name);
        assert_eq!(values.len(), 1, "upstream expected exactly one {name} header; echo: {}", self.0);
        values[0]
    }

    pub fn has(&self, name: &str) -> bool {
        self.pairs().iter().any(|(n, _)| *n == name)
    }
}

/// Asserts 200 and parses the upstream's echo.
pub async fn echo(resp: ClientResponse) -> Echo {
    let body = expect_json(resp, StatusCode::OK).await;
    assert!(body["upstream"].is_string(), "not an upstream echo: {body}");
    Echo(body)
}
