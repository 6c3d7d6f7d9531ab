//! HTTP/1.1 conformance of the public listener (server side) and of the upstream
//! client (client side): the behaviours hyper gave us, pinned so that an HTTP/1.1
//! implementation of our own keeps them.
//!
//! Server side: raw sockets against the gateway, with a small response reader of
//! this file's own ([`RawConn`]) that keeps the bytes following a response, so
//! pipelined answers, HEAD framing and what comes after a response can be checked.
//! Client side: [`RawUpstream`], a canned-bytes upstream on a plain `TcpListener`,
//! to feed the gateway's client framings hyper's test upstream never produces.
//!
//! What `proxy_transport` and `proxy_pool` already cover is not repeated here
//! (CL + TE smuggling, bad chunk sizes, headers without a colon, garbage request
//! lines, 431, silent connections, pool reuse of a hyper upstream).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::{assert_error, assert_error_in, route, spawn_app_with, TestApp, TestOptions};
use crate::upstream::{echo, spawn_upstream, Upstream};

const PUBLIC: &str = "auth = \"public\"";
/// The longest any raw-socket step may take before the test fails.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a (wrongly) forwarded request to reach the upstream before `hits()` is read.
const SETTLE: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// A raw HTTP/1.x response reader
// ---------------------------------------------------------------------------

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// Status line and header lines, as received (without the final empty line).
    head: String,
    /// (lower-case name, trimmed value), in order.
    headers: Vec<(String, String)>,
    /// The body, de-chunked.
    body: Vec<u8>,
    /// The body bytes exactly as framed on the wire (chunk-size lines and all).
    wire_body: Vec<u8>,
}

impl Resp {
    /// The first value of header `name` (any case).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether some `name` line carries the comma-separated `token` (any case).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn is_chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    fn text(&self) -> String {
        lossy(&self.body)
    }

    /// Asserts 200 and parses the body as JSON.
    fn json_ok(&self, case: &str) -> Value {
        let text = self.text();
        assert_eq!(self.status, 200, "{case}: unexpected status; head: {:?}, body: {text}", self.head);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {text:?}"))
    }

    /// Asserts 200 and an upstream echo; returns it.
    fn echo(&self, case: &str) -> Value {
        let v = self.json_ok(case);
        assert!(v["upstream"].is_string(), "{case}: not an upstream echo: {v}");
        v
    }

    /// Asserts `status` and a JSON error body `{"error": code, ...}`.
    fn assert_error(&self, case: &str, status: u16, code: &str) {
        let text = self.text();
        assert_eq!(self.status, status, "{case}: unexpected status; head: {:?}, body: {text}", self.head);
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: error body is not JSON ({e}): {text:?}"));
        assert_eq!(v["error"], code, "{case}: unexpected error code; body: {text}");
    }
}

/// Decodes the chunked body at the start of `data`. `Ok(Some((body, used)))` once it
/// is complete (last chunk and trailer section included), `Ok(None)` while it is
/// not, `Err` when it is malformed.
fn dechunk(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_len) = find(&data[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = lossy(&data[pos..pos + line_len]);
        // Chunk extensions (`;name=value`) are ignored.
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|e| format!("bad chunk-size line {line:?} ({e}); body so far {:?}", lossy(&body)))?;
        pos += line_len + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(line_len) = find(&data[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += line_len + 2;
                if line_len == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[pos..pos + size]);
        if &data[pos + size..pos + size + 2] != b"\r\n" {
            return Err(format!("a chunk of {size} bytes is not followed by CRLF: {:?}", lossy(data)));
        }
        pos += size + 2;
    }
}

/// Parses the response at the start of `buf`: `Ok(Some((response, bytes used)))` once
/// complete, `Ok(None)` while more is needed. `closed`: no more bytes will come
/// (a body without framing ends here). `head_request`: the response to a HEAD,
/// which has no body whatever its headers say.
fn parse_response(buf: &[u8], head_request: bool, closed: bool) -> Result<Option<(Resp, usize)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if closed {
            Err(format!("the connection closed before a complete response head; received {:?}", lossy(buf)))
        } else {
            Ok(None)
        };
    };
    let head = lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}; received {:?}", lossy(buf)));
    }
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) =
            line.split_once(':').ok_or_else(|| format!("header line without a colon {line:?} in {head:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut resp = Resp { status, head, headers, body: Vec::new(), wire_body: Vec::new() };
    let start = head_end + 4;
    let rest = &buf[start..];
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Some((resp, start)));
    }
    let chunked = resp.is_chunked();
    let length = resp.header("content-length").map(str::to_owned);
    if chunked {
        match dechunk(rest)? {
            Some((body, used)) => {
                resp.body = body;
                resp.wire_body = rest[..used].to_vec();
                Ok(Some((resp, start + used)))
            }
            None if closed => {
                Err(format!("the connection closed mid chunked body; head {:?}, body {:?}", resp.head, lossy(rest)))
            }
            None => Ok(None),
        }
    } else if let Some(length) = length {
        let length: usize =
            length.parse().map_err(|e| format!("bad Content-Length {length:?} ({e}) in {:?}", resp.head))?;
        if rest.len() >= length {
            resp.body = rest[..length].to_vec();
            resp.wire_body = resp.body.clone();
            Ok(Some((resp, start + length)))
        } else if closed {
            Err(format!(
                "the connection closed after {} of {length} body bytes; head {:?}, body {:?}",
                rest.len(),
                resp.head,
                lossy(rest)
            ))
        } else {
            Ok(None)
        }
    } else if closed {
        // Delimited by the end of the connection.
        resp.body = rest.to_vec();
        resp.wire_body = resp.body.clone();
        Ok(Some((resp, buf.len())))
    } else {
        Ok(None)
    }
}

/// Parses what is left in `buf` once the peer has closed (or reset) the connection.
fn finish_closed(buf: &mut Vec<u8>, head_request: bool, how: &str) -> Result<Resp, String> {
    match parse_response(buf.as_slice(), head_request, true) {
        Ok(Some((resp, used))) => {
            buf.drain(..used);
            Ok(resp)
        }
        Ok(None) => Err(format!("the connection ended ({how}) without a response")),
        Err(e) => Err(format!("the connection ended ({how}): {e}")),
    }
}

async fn read_until_response<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> Result<Resp, String> {
    let mut chunk = vec![0_u8; 16 * 1024];
    loop {
        if let Some((resp, used)) = parse_response(buf.as_slice(), head_request, false)? {
            buf.drain(..used);
            return Ok(resp);
        }
        let n = match io.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => return finish_closed(buf, head_request, &format!("read error: {e}")),
        };
        if n == 0 {
            return finish_closed(buf, head_request, "EOF");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one response from `io`, starting with what `buf` already holds; what
/// follows the response stays in `buf`.
async fn read_response<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    head_request: bool,
    within: Duration,
) -> Result<Resp, String> {
    let result = tokio::time::timeout(within, read_until_response(io, buf, head_request)).await;
    match result {
        Ok(response) => response,
        Err(_) => Err(format!("no complete response within {within:?}; received so far {:?}", lossy(buf.as_slice()))),
    }
}

/// A client connection to the gateway, on a raw socket.
struct RawConn {
    stream: TcpStream,
    /// Bytes received and not yet parsed (the start of the next response).
    buf: Vec<u8>,
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> RawConn {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connected to the gateway within 5 s")
            .expect("connect to the gateway");
        RawConn { stream, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("the gateway took the request bytes within 5 s")
            .expect("write to the gateway");
    }

    async fn try_response_within(&mut self, head_request: bool, within: Duration) -> Result<Resp, String> {
        read_response(&mut self.stream, &mut self.buf, head_request, within).await
    }

    /// The next response; panics (naming `case`) on a timeout, an early close or bad framing.
    async fn response(&mut self, case: &str) -> Resp {
        self.try_response_within(false, IO_TIMEOUT).await.unwrap_or_else(|e| panic!("{case}: {e}"))
    }

    /// The next response, which answers a HEAD (no body).
    async fn head_response(&mut self, case: &str) -> Resp {
        self.try_response_within(true, IO_TIMEOUT).await.unwrap_or_else(|e| panic!("{case}: {e}"))
    }

    /// Writes `bytes` while reading the response, as a client that sends its whole
    /// upload regardless does. Returns the response and how the write went (an error
    /// there is fine: the server may stop reading once it has answered).
    async fn send_while_reading(&mut self, bytes: &[u8]) -> (Result<Resp, String>, Result<(), String>) {
        let (mut reader, mut writer) = self.stream.split();
        let write = async move {
            match tokio::time::timeout(IO_TIMEOUT, writer.write_all(bytes)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("write failed: {e}")),
                Err(_) => Err("the write was still blocked after 5 s".to_owned()),
            }
        };
        let read = read_response(&mut reader, &mut self.buf, false, IO_TIMEOUT);
        let (written, response) = tokio::join!(write, read);
        (response, written)
    }

    /// Asserts that the gateway closes the connection (EOF or reset) within 5 s
    /// without sending anything more.
    async fn expect_close(&mut self, case: &str) {
        let mut extra = std::mem::take(&mut self.buf);
        let stream = &mut self.stream;
        let closed = tokio::time::timeout(IO_TIMEOUT, async {
            let mut chunk = [0_u8; 4096];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => extra.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{case}: the connection was still open {IO_TIMEOUT:?} after the response; received meanwhile {:?}",
            lossy(&extra)
        );
        assert!(extra.is_empty(), "{case}: unexpected bytes after the response: {:?}", lossy(&extra));
    }
}

// ---------------------------------------------------------------------------
// A raw upstream: canned response bytes on a plain TCP listener
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawMode {
    /// Answer the first request of a connection, then close it.
    Close,
    /// Answer the first request of a connection and keep the connection open, never
    /// answering another request on it (a later request there is only recorded).
    Linger,
    /// Answer every request of a connection.
    KeepAlive,
}

struct RawState {
    connections: AtomicUsize,
    /// (connection index, request head without the final empty line), in arrival order.
    requests: Mutex<Vec<(usize, String)>>,
}

/// An upstream that answers with fixed bytes; stops accepting when dropped.
struct RawUpstream {
    addr: SocketAddr,
    state: Arc<RawState>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(usize, String)> {
        self.state.requests.lock().expect("raw upstream record lock is not poisoned").clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_raw_upstream(response: &'static [u8], mode: RawMode) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the raw upstream");
    let addr = listener.local_addr().expect("raw upstream address");
    let state = Arc::new(RawState { connections: AtomicUsize::new(0), requests: Mutex::new(Vec::new()) });
    let accept_state = Arc::clone(&state);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let index = accept_state.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_raw(stream, index, response, mode, Arc::clone(&accept_state)));
        }
    });
    RawUpstream { addr, state, task }
}

/// Reads a request head (up to the empty line) into a string; None at EOF.
async fn read_request_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0_u8; 4096];
    loop {
        if let Some(end) = find(buf.as_slice(), b"\r\n\r\n") {
            let head = lossy(&buf[..end]);
            buf.drain(..end + 4);
            return Some(head);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn request_content_length(head: &str) -> usize {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

async fn serve_raw(mut stream: TcpStream, index: usize, response: &'static [u8], mode: RawMode, state: Arc<RawState>) {
    let mut buf = Vec::new();
    let mut answered = false;
    let mut chunk = [0_u8; 4096];
    loop {
        let Some(head) = read_request_head(&mut stream, &mut buf).await else {
            return;
        };
        // Skip a Content-Length body (the tests send none through here).
        let body_len = request_content_length(&head);
        while buf.len() < body_len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..body_len);
        state.requests.lock().expect("raw upstream record lock is not poisoned").push((index, head));
        if answered && mode == RawMode::Linger {
            continue;
        }
        if stream.write_all(response).await.is_err() {
            return;
        }
        answered = true;
        if mode == RawMode::Close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// An echo upstream behind the public route `/raw`.
async fn public_echo() -> (Upstream, TestApp) {
    let svc = spawn_upstream("raw").await;
    let app = spawn_app_with(TestOptions::with_extra(route("raw", "/raw", &[svc.url()], PUBLIC))).await;
    (svc, app)
}

/// Asserts a plain GET through the `/raw` route still works.
async fn assert_still_serving(app: &TestApp, case: &str) {
    let e = echo(app.get("/raw/still-serving").await).await;
    assert_eq!(e.path(), "/raw/still-serving", "{case}: the gateway stopped serving");
}

/// One worker (so one upstream pool), the public route `/rawup` to `up`, 3 s timeout.
async fn raw_upstream_app(up: &RawUpstream) -> TestApp {
    spawn_app_with(TestOptions {
        server_extra: "workers = 1".to_owned(),
        extra: route("rawup", "/rawup", &[up.url()], &format!("{PUBLIC}\ntimeout = \"3s\"")),
        ..TestOptions::default()
    })
    .await
}

// ---------------------------------------------------------------------------
// Server side: what the gateway accepts from clients and how it answers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (svc, app) = public_echo().await;

    // Two GETs in one write.
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"GET /raw/one HTTP/1.1\r\nHost: x\r\n\r\nGET /raw/two HTTP/1.1\r\nHost: x\r\n\r\n").await;
    for want in ["/raw/one", "/raw/two"] {
        let case = format!("two pipelined GETs, response for {want}");
        let e = conn.response(&case).await.echo(&case);
        assert_eq!(e["path"], want, "{case}: responses out of order: {e}");
    }

    // Three in one write, the middle one with a body, the last asking to close.
    let mut conn3 = RawConn::connect(app.addr).await;
    conn3
        .send(
            b"GET /raw/a HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /raw/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              GET /raw/c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
    for (want, method, body_len) in [("/raw/a", "GET", 0), ("/raw/b", "POST", 5), ("/raw/c", "GET", 0)] {
        let case = format!("three pipelined requests, response for {want}");
        let e = conn3.response(&case).await.echo(&case);
        assert_eq!(e["path"], want, "{case}: responses out of order: {e}");
        assert_eq!(e["method"], method, "{case}: {e}");
        assert_eq!(e["body_len"], body_len, "{case}: {e}");
    }
    conn3.expect_close("three pipelined requests, the last with Connection: close").await;

    // The upstream saw every request once (the order of arrival there is not pinned:
    // a server may work on pipelined requests concurrently).
    let mut seen: Vec<String> = svc.seen().into_iter().map(|s| s.path).collect();
    seen.sort();
    assert_eq!(seen, ["/raw/a", "/raw/b", "/raw/c", "/raw/one", "/raw/two"], "requests the upstream received");
    drop(conn);
    drop(conn3);
    app.stop().await;
}

#[tokio::test]
async fn http10_request_without_keep_alive_is_answered_then_closed() {
    let (svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"GET /raw/ten HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let case = "HTTP/1.0 without keep-alive";
    let resp = conn.response(case).await;
    assert!(!resp.is_chunked(), "{case}: a chunked response to an HTTP/1.0 client: {:?}", resp.head);
    let e = resp.echo(case);
    assert_eq!(e["path"], "/raw/ten", "{e}");
    conn.expect_close(case).await;
    assert_eq!(svc.hits(), 1);
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn http10_keep_alive_is_honoured_with_content_length_framing() {
    let (svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    for path in ["/raw/first", "/raw/second"] {
        let case = format!("HTTP/1.0 with Connection: keep-alive, {path}");
        conn.send(format!("GET {path} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").as_bytes()).await;
        let resp = conn.response(&case).await;
        assert!(!resp.is_chunked(), "{case}: HTTP/1.0 clients do not know chunked: {:?}", resp.head);
        assert!(
            resp.header("content-length").is_some(),
            "{case}: a kept-alive response to HTTP/1.0 must carry Content-Length: {:?}",
            resp.head
        );
        assert!(
            resp.has_token("connection", "keep-alive"),
            "{case}: an HTTP/1.0 client assumes close unless told `Connection: keep-alive`: {:?}",
            resp.head
        );
        let e = resp.echo(&case);
        assert_eq!(e["path"], path, "{case}: {e}");
    }
    assert_eq!(svc.hits(), 2);
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn connection_close_from_an_http11_client_is_honoured() {
    let (_svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"GET /raw/bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let case = "HTTP/1.1 with Connection: close";
    let resp = conn.response(case).await;
    assert!(
        resp.has_token("connection", "close"),
        "{case}: the response does not say `Connection: close`: {:?}",
        resp.head
    );
    let e = resp.echo(case);
    assert_eq!(e["path"], "/raw/bye", "{e}");
    conn.expect_close(case).await;
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let (svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;

    // A client that waits for 100 Continue before sending its body.
    conn.send(
        b"POST /raw/upload HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = conn
        .try_response_within(false, Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("waiting 2 s for `100 Continue` before sending the body: {e}"));
    assert_eq!(interim.status, 100, "expected `100 Continue` first; got head {:?}", interim.head);
    assert!(interim.head.starts_with("HTTP/1.1 100"), "interim status line: {:?}", interim.head);
    conn.send(b"hello").await;
    let case = "final response after 100 Continue";
    let e = conn.response(case).await.echo(case);
    assert_eq!(e["method"], "POST", "{e}");
    assert_eq!(e["path"], "/raw/upload", "{e}");
    assert_eq!(e["body_len"], 5, "{case}: {e}");

    // A client that sends its body at once anyway, on the same connection: a
    // `100 Continue` may come or not, the final answer must.
    conn.send(b"POST /raw/eager HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello").await;
    let case = "Expect: 100-continue with the body sent at once";
    let mut resp = conn.response(case).await;
    if resp.status == 100 {
        resp = conn.response(case).await;
    }
    let e = resp.echo(case);
    assert_eq!(e["path"], "/raw/eager", "{e}");
    assert_eq!(e["body_len"], 5, "{case}: {e}");
    assert_eq!(svc.hits(), 2);
    drop(conn);
    app.stop().await;
}

/// A request refused before its body is needed gets its final answer, not a
/// `100 Continue` inviting the body first.
#[tokio::test]
async fn expect_100_continue_is_not_sent_for_a_refused_request() {
    let svc = spawn_upstream("private").await;
    let app = spawn_app_with(TestOptions::with_extra(route("private", "/private", &[svc.url()], ""))).await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"POST /private/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await;
    let case = "Expect: 100-continue without a token";
    let resp = conn.response(case).await;
    assert_ne!(resp.status, 100, "{case}: got `100 Continue` for a request the gateway refuses: {:?}", resp.head);
    resp.assert_error(case, 401, "unauthorized");
    assert_eq!(svc.hits(), 0, "{case}: the refused request reached the upstream");
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn head_response_has_no_body_and_the_next_pipelined_response_follows() {
    let (svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"HEAD /raw/head HTTP/1.1\r\nHost: x\r\n\r\nGET /raw/after-head HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let head = conn.head_response("HEAD").await;
    assert_eq!(head.status, 200, "HEAD: head {:?}", head.head);
    // Any body bytes after the HEAD's head would stand where the GET's status line must.
    let case = "GET pipelined after HEAD";
    let resp = conn.response(case).await;
    let e = resp.echo(case);
    assert_eq!(e["method"], "GET", "{case}: {e}");
    assert_eq!(e["path"], "/raw/after-head", "{case}: {e}");
    let seen = svc.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().any(|s| s.method == "HEAD" && s.path == "/raw/head"),
        "the HEAD reached the upstream as HEAD: {seen:?}"
    );
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn chunked_request_with_extensions_and_trailers_is_decoded() {
    let (_svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(
        b"POST /raw/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    .await;
    let case = "chunked body with an extension and a trailer";
    let e = conn.response(case).await.echo(case);
    assert_eq!(e["method"], "POST", "{e}");
    assert_eq!(e["body_len"], 11, "{case}: the upstream did not get the 11 bytes of \"hello world\": {e}");
    // The trailer section was consumed whole: the connection goes on.
    conn.send(b"GET /raw/after-trailers HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let case = "GET after the chunked request on the same connection";
    let e = conn.response(case).await.echo(case);
    assert_eq!(e["path"], "/raw/after-trailers", "{e}");
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn chunked_upstream_response_reaches_a_raw_client_decodable() {
    let (_svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"GET /raw/s?mode=stream&chunks=4&delay_ms=20 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let case = "streamed upstream response";
    let resp = conn.response(case).await;
    assert_eq!(resp.status, 200, "{case}: head {:?}", resp.head);
    assert!(
        resp.is_chunked() || resp.header("content-length").is_some(),
        "{case}: an HTTP/1.1 keep-alive response needs chunked or Content-Length framing: {:?}",
        resp.head
    );
    if resp.is_chunked() {
        assert!(resp.header("content-length").is_none(), "{case}: both chunked and Content-Length: {:?}", resp.head);
        assert!(
            resp.wire_body.ends_with(b"0\r\n\r\n"),
            "{case}: the chunked body does not end with the last chunk: {:?}",
            lossy(&resp.wire_body)
        );
    }
    assert_eq!(resp.text(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n", "{case}: wire body {:?}", lossy(&resp.wire_body));
    // The connection is still usable.
    conn.send(b"GET /raw/after-stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let e = conn.response("GET after the streamed response").await.echo("GET after the streamed response");
    assert_eq!(e["path"], "/raw/after-stream", "{e}");
    drop(conn);
    app.stop().await;
}

/// A client that sends its whole upload still receives the refusal intact, though
/// the gateway answered without reading the body.
#[tokio::test]
async fn refused_uploads_get_their_full_answer_without_a_reset() {
    let svc = spawn_upstream("guarded").await;
    let extra = route("private", "/private", &[svc.url()], "")
        + &route("small", "/small", &[svc.url()], &format!("{PUBLIC}\nmax_body = \"1KiB\""));
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    let body = vec![b'a'; 64 * 1024];
    for (case, path, status, code) in [
        ("64 KiB upload without a token", "/private/upload", 401, "unauthorized"),
        ("64 KiB upload over max_body = 1KiB", "/small/upload", 413, "payload_too_large"),
    ] {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let mut conn = RawConn::connect(app.addr).await;
        let (response, written) = conn.send_while_reading(&request).await;
        let resp = response.unwrap_or_else(|e| panic!("{case}: no intact response ({e}); the write: {written:?}"));
        resp.assert_error(case, status, code);
        if status == 401 {
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{case}: head {:?}", resp.head);
        }
        drop(conn);
    }
    assert_eq!(svc.hits(), 0, "a refused upload reached the upstream");
    // Still serving, and a small upload passes.
    let resp = app.client.post(app.url("/small/ok")).body(vec![b'b'; 100]).send().await.expect("POST /small/ok");
    assert_eq!(echo(resp).await.body_len(), 100);
    app.stop().await;
}

#[tokio::test]
async fn differing_duplicate_content_lengths_are_refused() {
    let (svc, app) = public_echo().await;
    let cases: [(&str, &[u8]); 2] = [
        (
            "two Content-Length lines, 5 and 6",
            b"POST /raw/dup HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        ("one Content-Length line `5, 6`", b"POST /raw/dup HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!"),
    ];
    for (case, request) in cases {
        let mut conn = RawConn::connect(app.addr).await;
        conn.send(request).await;
        let resp = conn.response(case).await;
        assert_eq!(resp.status, 400, "{case}: head {:?}, body {}", resp.head, resp.text());
        conn.expect_close(case).await;
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(svc.hits(), 0, "a request with conflicting lengths reached the upstream: {:?}", svc.seen());
    assert_still_serving(&app, "after conflicting Content-Length").await;
    app.stop().await;
}

#[tokio::test]
async fn identical_duplicate_content_lengths_are_accepted_and_forwarded_once() {
    let (_svc, app) = public_echo().await;
    let mut conn = RawConn::connect(app.addr).await;
    conn.send(b"POST /raw/same HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello").await;
    let case = "two identical Content-Length lines";
    let e = conn.response(case).await.echo(case);
    assert_eq!(e["body_len"], 5, "{case}: {e}");
    let lengths: Vec<&str> = e["headers"]
        .as_array()
        .expect("echo header list")
        .iter()
        .filter(|pair| pair[0] == "content-length")
        .filter_map(|pair| pair[1].as_str())
        .collect();
    assert_eq!(lengths, ["5"], "{case}: the upstream must get one Content-Length: {e}");
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn non_chunked_transfer_encoding_is_refused() {
    let (svc, app) = public_echo().await;
    let cases: [(&str, &[u8]); 2] = [
        ("Transfer-Encoding: gzip", b"POST /raw/te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
        (
            "Transfer-Encoding: chunked, gzip (chunked not last)",
            b"POST /raw/te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (case, request) in cases {
        let mut conn = RawConn::connect(app.addr).await;
        conn.send(request).await;
        let resp = conn.response(case).await;
        assert!(
            (400..500).contains(&resp.status) || resp.status == 501,
            "{case}: expected 4xx or 501; head {:?}, body {}",
            resp.head,
            resp.text()
        );
        conn.expect_close(case).await;
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(svc.hits(), 0, "a request with an unknown transfer coding reached the upstream: {:?}", svc.seen());
    assert_still_serving(&app, "after unknown transfer codings").await;
    app.stop().await;
}

#[tokio::test]
async fn obsolete_line_folding_is_refused() {
    let (svc, app) = public_echo().await;
    let cases: [(&str, &[u8]); 2] = [
        ("folded with a space", b"GET /raw/fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
        ("folded with a tab", b"GET /raw/fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n"),
    ];
    for (case, request) in cases {
        let mut conn = RawConn::connect(app.addr).await;
        conn.send(request).await;
        let resp = conn.response(case).await;
        assert_eq!(resp.status, 400, "{case}: head {:?}, body {}", resp.head, resp.text());
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(svc.hits(), 0, "a request with a folded header reached the upstream: {:?}", svc.seen());
    assert_still_serving(&app, "after folded headers").await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Client side: how the gateway reads what upstreams send
// ---------------------------------------------------------------------------

#[tokio::test]
async fn close_delimited_upstream_response_is_read_to_eof() {
    let up =
        spawn_raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello until close", RawMode::Close)
            .await;
    let app = raw_upstream_app(&up).await;
    let resp = app.get("/rawup/close-delimited").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.expect("read the body"), "hello until close");
    let requests = up.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].1.starts_with("GET /rawup/close-delimited HTTP/1.1\r\n"),
        "the upstream request line: {:?}",
        requests[0].1
    );

    // To an HTTP/1.1 client the gateway frames the body itself, so the client's
    // connection survives the upstream's close.
    let mut conn = RawConn::connect(app.addr).await;
    for i in 0..2 {
        let case = format!("close-delimited upstream body, raw client request {i}");
        conn.send(format!("GET /rawup/raw-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
        let resp = conn.response(&case).await;
        assert_eq!(resp.status, 200, "{case}: head {:?}", resp.head);
        assert!(
            resp.is_chunked() || resp.header("content-length").is_some(),
            "{case}: the gateway must frame the body for a keep-alive client: {:?}",
            resp.head
        );
        assert_eq!(resp.text(), "hello until close", "{case}");
    }
    assert_eq!(up.connections(), 3, "a close-delimited response uses up its connection");
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn interim_100_from_the_upstream_is_skipped() {
    let up = spawn_raw_upstream(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
        RawMode::Close,
    )
    .await;
    let app = raw_upstream_app(&up).await;
    let resp = app.get("/rawup/interim").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.expect("read the body"), "ok");
    app.stop().await;
}

#[tokio::test]
async fn chunked_upstream_response_with_trailers_is_decoded() {
    let up = spawn_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
          5\r\nhello\r\n6;ext=x\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
        RawMode::KeepAlive,
    )
    .await;
    let app = raw_upstream_app(&up).await;
    for i in 0..2 {
        let resp = app.get(&format!("/rawup/trailers-{i}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        assert_eq!(resp.text().await.expect("read the body"), "hello world", "request {i}");
    }
    // The trailer section was consumed whole: the same connection carried the second exchange.
    let requests = up.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(up.connections(), 1, "the connection was not reused after a response with trailers: {requests:?}");
    app.stop().await;
}

#[tokio::test]
async fn truncated_upstream_body_is_not_delivered_as_complete() {
    let up = spawn_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nabcd",
        RawMode::Close,
    )
    .await;
    let app = raw_upstream_app(&up).await;
    let outcome = match app.client.get(app.url("/rawup/short")).send().await {
        Err(e) => format!("request failed: {e}"),
        Ok(resp) => {
            let status = resp.status();
            match resp.bytes().await {
                Err(e) => format!("{status}, then the body failed: {e}"),
                Ok(body) => {
                    assert!(
                        !(status == StatusCode::OK && body.len() == 10),
                        "an upstream body cut short after 4 of 10 bytes arrived as a complete 10-byte body: {:?}",
                        lossy(&body)
                    );
                    format!("{status} with {} body bytes", body.len())
                }
            }
        }
    };
    eprintln!("truncated upstream body: the client saw: {outcome}");
    assert_error(app.get("/elsewhere").await, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn malformed_upstream_responses_are_502() {
    let cases: [(&str, &'static [u8]); 4] = [
        ("a non-numeric status code", b"HTTP/1.1 abc\r\n\r\n"),
        (
            "a transfer coding other than chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        ("differing Content-Length lines", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        ("not HTTP at all", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    ];
    let mut upstreams = Vec::new();
    let mut extra = String::new();
    for (i, (_, response)) in cases.iter().enumerate() {
        let up = spawn_raw_upstream(response, RawMode::Close).await;
        extra.push_str(&route(
            &format!("bad{i}"),
            &format!("/bad{i}"),
            &[up.url()],
            &format!("{PUBLIC}\ntimeout = \"3s\""),
        ));
        upstreams.push(up);
    }
    let app = spawn_app_with(TestOptions::with_extra(extra)).await;
    for (i, (case, _)) in cases.iter().enumerate() {
        let resp = app.get(&format!("/bad{i}/x")).await;
        assert_error_in(case, resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    }
    for (i, up) in upstreams.iter().enumerate() {
        assert_eq!(up.requests().len(), 1, "{}: requests {:?}", cases[i].0, up.requests());
    }
    assert_error(app.get("/elsewhere").await, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

/// The upstream says `Connection: close` but leaves the socket open (and would never
/// answer on it again): the gateway must not send the next request there.
#[tokio::test]
async fn upstream_connection_close_is_not_reused() {
    let up = spawn_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        RawMode::Linger,
    )
    .await;
    let app = raw_upstream_app(&up).await;
    for i in 0..2 {
        let resp = app.get(&format!("/rawup/close-{i}")).await;
        let status = resp.status();
        let text = resp.text().await.expect("read the body");
        assert_eq!(status, StatusCode::OK, "request {i}: body {text}");
        assert_eq!(text, "hello", "request {i}");
    }
    let requests = up.requests();
    let per_connection: Vec<usize> = requests.iter().map(|(conn, _)| *conn).collect();
    assert_eq!(per_connection, [0, 1], "one request per connection after `Connection: close`: {requests:?}");
    assert_eq!(up.connections(), 2);
    app.stop().await;
}

#[tokio::test]
async fn custom_response_headers_pass_and_hop_by_hop_ones_do_not() {
    let up = spawn_raw_upstream(
        b"HTTP/1.1 418 Short And Stout\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-Custom: 1\r\n\
          X-Multi: a\r\nX-Multi: b\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n\r\nok",
        RawMode::Close,
    )
    .await;
    let app = raw_upstream_app(&up).await;
    let resp = app.get("/rawup/headers").await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("read the body");
    assert_eq!(status.as_u16(), 418, "the upstream's status passes through; body {text}");
    assert_eq!(text, "ok");
    assert_eq!(headers.get("x-custom").and_then(|v| v.to_str().ok()), Some("1"), "{headers:?}");
    let multi: Vec<&str> = headers.get_all("x-multi").iter().filter_map(|v| v.to_str().ok()).collect();
    assert_eq!(multi, ["a", "b"], "every X-Multi line passes, in order: {headers:?}");
    assert!(headers.get("x-secret").is_none(), "a header the upstream's Connection named was forwarded: {headers:?}");
    assert!(headers.get("keep-alive").is_none(), "the upstream's Keep-Alive was forwarded: {headers:?}");
    for value in headers.get_all("connection") {
        let value = value.to_str().unwrap_or_default().to_ascii_lowercase();
        assert!(!value.contains("x-secret"), "the upstream's Connection was forwarded: {headers:?}");
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Found in review: resources, desync and header spellings
// ---------------------------------------------------------------------------

/// A client that announces a large upload, sends a few bytes and goes quiet gets its 504,
/// and the upstream connection the upload was going to is closed, not held by a task
/// still waiting for the client's body.
#[tokio::test]
async fn a_stalled_upload_does_not_hold_the_upstream_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
    let up = listener.local_addr().expect("upstream address");
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<usize>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("the gateway connects");
        // Never answers; reads until the gateway closes the connection.
        let mut seen = 0;
        let mut buf = [0_u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
        let _ = closed_tx.send(seen);
    });
    let app = spawn_app_with(TestOptions::with_extra(route(
        "stall",
        "/stall",
        &[format!("http://{up}")],
        &format!("{PUBLIC}\ntimeout = \"500ms\""),
    )))
    .await;
    let mut client = RawConn::connect(app.addr).await;
    client.send(b"POST /stall/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789").await;
    client.response("the stalled upload").await.assert_error("the stalled upload", 504, "gateway_timeout");
    // The client stays connected and silent; the upstream connection must still close.
    let seen = tokio::time::timeout(Duration::from_secs(10), closed_rx)
        .await
        .expect("the upstream connection was still open 10 s after the 504")
        .expect("the upstream task ended");
    assert!(seen > 0, "the upstream never saw the request");
    drop(client);
    app.stop().await;
}

/// `Content_Length`, `Transfer.Encoding` (read as framing by CGI-style servers) and
/// `Expect` (answered by the gateway) never reach the upstream.
#[tokio::test]
async fn framing_headers_in_other_spellings_are_not_forwarded() {
    let (svc, app) = public_echo().await;
    let resp = app
        .client
        .get(app.url("/raw/x"))
        .header("Content_Length", "5")
        .header("Transfer.Encoding", "chunked")
        .header("Expect", "100-continue")
        .send()
        .await
        .expect("request");
    let e = echo(resp).await;
    for name in ["content_length", "transfer.encoding", "expect", "content-length", "transfer-encoding"] {
        assert!(!e.has(name), "{name} reached the upstream: {:?}", e.names());
    }
    drop(svc);
    app.stop().await;
}

/// A GET that carries a body: an upstream may answer without reading it and then read it
/// as a request of its own, so that upstream connection is not used again.
#[tokio::test]
async fn an_upstream_connection_is_not_reused_after_a_get_with_a_body() {
    let svc = spawn_upstream("raw").await;
    let app = spawn_app_with(TestOptions {
        server_extra: "workers = 1".to_owned(),
        extra: route("raw", "/raw", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    })
    .await;
    for i in 0..2 {
        let resp = app.client.get(app.url("/raw/x")).body("hello").send().await.expect("request");
        assert_eq!(echo(resp).await.body_len(), 5, "request {i}");
    }
    assert_eq!(svc.connections(), 2, "a connection that carried a GET body was used again");
    // Bodiless GETs share one.
    for _ in 0..2 {
        echo(app.get("/raw/y").await).await;
    }
    assert_eq!(svc.connections(), 3, "bodiless GETs did not share a connection");
    app.stop().await;
}

/// A client that asks for a large answer and does not read it is disconnected after
/// `send_timeout`, instead of holding its connection (and the upstream's) forever.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_send_timeout() {
    const BIG: usize = 64 * 1024 * 1024;
    let svc = spawn_upstream("raw").await;
    let app = spawn_app_with(TestOptions {
        server_extra: "send_timeout = \"500ms\"".to_owned(),
        extra: route("raw", "/raw", &[svc.url()], PUBLIC),
        ..TestOptions::default()
    })
    .await;
    let mut client = TcpStream::connect(app.addr).await.expect("connect to the gateway");
    let request = format!("GET /raw/x?mode=big&bytes={BIG} HTTP/1.1\r\nHost: x\r\n\r\n");
    client.write_all(request.as_bytes()).await.expect("write the request");
    // Not reading: the socket buffers fill and the gateway's writes wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = 0;
    let mut buf = vec![0_u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was still open; {received} bytes read");
    assert!(received < BIG, "the whole answer arrived ({received} bytes): the stall was not cut off");
    assert_still_serving(&app, "after a client stopped reading").await;
    app.stop().await;
}

/// An early refusal of a small upload whose body has already arrived keeps the
/// connection: the buffered body is skipped, and the next request is answered on it.
#[tokio::test]
async fn a_refused_small_upload_keeps_its_connection() {
    let svc = spawn_upstream("raw").await;
    let app = spawn_app_with(TestOptions::with_extra(
        [route("raw", "/raw", &[svc.url()], PUBLIC), route("private", "/private", &[svc.url()], "")].concat(),
    ))
    .await;
    let mut client = RawConn::connect(app.addr).await;
    client.send(b"POST /private/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await;
    let refused = client.response("the refused upload").await;
    refused.assert_error("the refused upload", 401, "unauthorized");
    assert!(!refused.has_token("connection", "close"), "the connection was closed: {:?}", refused.head);
    client.send(b"GET /raw/after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let after = client.response("the request after it").await.echo("the request after it");
    assert_eq!(after["path"], "/raw/after", "{after}");
    app.stop().await;
}

/// A thousand tiny chunks in one burst arrive whole (the upstream client gathers the
/// frames that are ready together into one write).
#[tokio::test]
async fn many_small_chunks_arrive_whole() {
    let (svc, app) = public_echo().await;
    let mut request = b"POST /raw/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..1000 {
        request.extend_from_slice(b"3\r\nabc\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut client = RawConn::connect(app.addr).await;
    client.send(&request).await;
    let echoed = client.response("the chunked upload").await.echo("the chunked upload");
    assert_eq!(echoed["body_len"], 3000, "the upstream got a different body: {echoed}");
    assert_eq!(svc.hits(), 1);
    app.stop().await;
}

/// One keep-alive connection keeps one timer for the routes' timeouts, pushed later or
/// earlier per request: a shorter timeout after a longer one still fires, a longer one
/// after a fired shorter one is not cut short, and the connection serves on after each.
#[tokio::test]
async fn route_timeouts_hold_request_after_request_on_one_connection() {
    let svc = spawn_upstream("timed").await;
    let routes = [
        route("quick", "/quick", &[svc.url()], &format!("{PUBLIC}\ntimeout = \"1s\"")),
        route("patient", "/patient", &[svc.url()], &format!("{PUBLIC}\ntimeout = \"8s\"")),
    ]
    .concat();
    let app = spawn_app_with(TestOptions::with_extra(routes)).await;
    let mut client = RawConn::connect(app.addr).await;
    let steps: [(&str, Result<&str, ()>); 5] = [
        ("/patient/a?mode=slow&ms=10", Ok("/patient/a")),
        ("/quick/b?mode=slow&ms=3000", Err(())),
        ("/patient/c?mode=slow&ms=1500", Ok("/patient/c")),
        ("/quick/d?mode=slow&ms=3000", Err(())),
        ("/quick/e", Ok("/quick/e")),
    ];
    for (target, want) in steps {
        client.send(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
        let resp = client.response(target).await;
        match want {
            Ok(path) => assert_eq!(resp.echo(target)["path"], path, "{target}"),
            Err(()) => resp.assert_error(target, 504, "gateway_timeout"),
        }
    }
    app.stop().await;
}

/// An upstream that answers with an endless stream of `100 Continue` keeps the upstream
/// client busy reading: the route's timeout still ends the exchange with a 504 (the
/// timer is not starved by the task's cooperative budget), and the gateway serves on.
#[tokio::test]
async fn an_endless_run_of_interim_answers_still_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the flooding upstream");
    let addr = listener.local_addr().expect("flooding upstream address");
    let flood = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                read_request_head(&mut stream, &mut buf).await;
                let burst = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(64);
                while stream.write_all(&burst).await.is_ok() {}
            });
        }
    });
    let svc = spawn_upstream("raw").await;
    let routes = [
        route("flood", "/flood", &[format!("http://{addr}")], &format!("{PUBLIC}\ntimeout = \"1s\"")),
        route("raw", "/raw", &[svc.url()], PUBLIC),
    ]
    .concat();
    let app =
        spawn_app_with(TestOptions { server_extra: "workers = 1".to_owned(), ..TestOptions::with_extra(routes) }).await;
    let mut client = RawConn::connect(app.addr).await;
    client.send(b"GET /flood/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    client.response("the flooded request").await.assert_error("the flooded request", 504, "gateway_timeout");
    assert_still_serving(&app, "after the flood").await;
    flood.abort();
    app.stop().await;
}
