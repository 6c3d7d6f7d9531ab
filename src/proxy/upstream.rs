//! The upstream HTTP client: a pool of HTTP/1.1 keep-alive connections per
//! worker thread, spoken to with the gateway's own HTTP/1.1
//! ([`crate::http1`]), with TCP_NODELAY, a connect timeout, and rustls for
//! https upstreams; and, for routes with `upstream_protocol = "http2"`
//! (gRPC), one shared HTTP/2 connection per upstream ([`h2`]).
//!
//! Why our own: the exchange runs inside the request's task. A bodiless
//! request is one write of its head; its response head is parsed where it
//! lands and its body read as the client's side asks for it. hyper's client
//! ran each connection as a task of its own behind a channel, which cost
//! about a third of the proxy's instructions per request. A request body is
//! sent by a task of its own, so that an upstream can answer (or stream its
//! answer) before the upload ends.
//!
//! The pool's rules:
//! - a connection goes back to the pool only when its response body has been
//!   read to the end ([`UpstreamBody`]), its request body sent to the end,
//!   nothing unexpected follows the response, and neither side asked to
//!   close; one whose response was abandoned or failed is closed (HTTP/1.1
//!   cannot skip the rest of a response), and so is one answered before its
//!   request body was sent, or that carried a body on a GET, HEAD, OPTIONS,
//!   TRACE or upgrade request (an upstream that ignored such a body could
//!   read it as a request of its own);
//! - a checkout takes the most recently used connection (the one least
//!   likely to have been closed by the upstream's keep-alive timer) and drops
//!   connections idle for longer than `pool_idle_timeout` — which must be
//!   shorter than the upstreams' own keep-alive timeout —, TLS connections
//!   made before the last reload of the upstream TLS files, or already closed
//!   (a read that costs no system call unless the socket has news);
//!   [`UpstreamClient::sweep`] closes expired ones when no request comes;
//! - a request whose head could not be written to a pooled connection, or
//!   a bodiless GET, HEAD, OPTIONS or TRACE whose pooled connection closed before a
//!   byte of answer, is sent once more on a new connection; no other request
//!   is retried here;
//! - at most `pool_max_idle_per_host` idle connections per upstream.
//!
//! https upstreams are verified against the webpki roots, the platform's
//! store (`upstream.platform_roots`) and `upstream.ca_file`; where an
//! upstream asks for a client certificate, the gateway presents
//! `upstream.client_cert` (mutual TLS), so a backend can accept no
//! connection that did not come from the gateway. All of it is reloadable
//! ([`tls`]).
//!
//! TCP_NODELAY is set on every connection: the request and response pairs
//! are small, and Nagle's algorithm would hold them back. `connect_timeout`
//! bounds the name lookup and the TCP connect (shared between the resolved
//! addresses), and separately the TLS handshake.

use std::collections::HashMap;
use std::future::{poll_fn, Future as _};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, EXPECT};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode, Version};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

use crate::body::Body;
use crate::config::{UpstreamSettings, UpstreamTarget};
use crate::http1::upgrade::Upgraded;
use crate::http1::{self, BodyError, Decoded, Decoder, Framing, MAX_HEADERS};

mod h2;
pub mod tls;

use tls::UpstreamTls;

/// A response head longer than this is an upstream failure.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A cheap-to-clone handle on one worker's connection pool.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

struct Pool {
    tls: Arc<UpstreamTls>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Uncontended in practice (one worker thread uses it), so a plain mutex.
    idle: Mutex<HashMap<PoolKey, Vec<Idle>, foldhash::fast::RandomState>>,
    /// One shared connection per upstream spoken to over HTTP/2 ([`h2`]).
    h2: Mutex<HashMap<PoolKey, h2::Shared, foldhash::fast::RandomState>>,
    /// Taken while a connection to an HTTP/2 upstream is made, so that the
    /// requests waiting for one share it.
    h2_turns: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>, foldhash::fast::RandomState>>,
}

#[derive(Clone, Debug)]
struct PoolKey {
    https: bool,
    authority: Authority,
}

// By the authority's exact text, hashed in one call: `Authority`'s own
// `Hash` feeds the hasher byte by byte (case-insensitively), which made the
// pool lookup one of the costlier steps of a request. The texts come from
// the config, so one upstream always has one spelling.
impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.https == other.https && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.https.hash(state);
        self.authority.as_str().hash(state);
    }
}

struct Idle {
    stream: Stream,
    since: Instant,
}

impl Idle {
    /// Not idle for longer than `timeout`, made with the current TLS set
    /// (`generation`; see [`UpstreamTls::generation`]) if TLS, and not
    /// closed by the upstream.
    fn usable(&mut self, now: Instant, timeout: Duration, generation: u64) -> bool {
        let current = match &self.stream {
            Stream::Plain(_) => true,
            Stream::Tls(_, made_with) => *made_with == generation,
        };
        now.duration_since(self.since) < timeout && current && is_open(&mut self.stream)
    }
}

/// Whether an idle connection is still open: a read that must find
/// nothing. Unless the reactor has seen the socket become readable (data
/// or a close), tokio answers it without a system call.
fn is_open(stream: &mut Stream) -> bool {
    let mut byte = [0_u8; 1];
    match stream {
        // `try_read` answers from the readiness bits alone, where a poll
        // would also lock the socket's waiter list to swap in a waker.
        Stream::Plain(tcp) => matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        Stream::Tls(..) => {
            let mut buf = ReadBuf::new(&mut byte);
            // Ready means closed, failed, or bytes nobody asked for: all
            // unusable. Polled outside the task's cooperative budget, which,
            // spent, would answer "pending" (open) for a closed connection.
            let probe = std::pin::pin!(tokio::task::unconstrained(poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut *stream).poll_read(cx, &mut buf).is_pending())
            })));
            matches!(probe.poll(&mut Context::from_waker(Waker::noop())), Poll::Ready(true))
        }
    }
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    #[error("{0}")]
    Request(#[source] io::Error),
    /// The request body could not be read from the client (or was too large).
    #[error("{0}")]
    RequestBody(#[source] axum::Error),
}

impl UpstreamError {
    /// Whether no connection could be made (the request never left): the
    /// upstream is cooled down, and an idempotent request may go elsewhere.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::Tls(_))
    }
}

fn invalid(what: &'static str) -> UpstreamError {
    UpstreamError::Request(io::Error::new(io::ErrorKind::InvalidData, what))
}

impl UpstreamClient {
    pub fn new(settings: &UpstreamSettings) -> anyhow::Result<Self> {
        Ok(Self {
            pool: Arc::new(Pool {
                tls: UpstreamTls::load(settings)?,
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.pool_idle_timeout,
                max_idle: settings.pool_max_idle_per_host,
                idle: Mutex::new(HashMap::default()),
                h2: Mutex::new(HashMap::default()),
                h2_turns: Mutex::new(HashMap::default()),
            }),
        })
    }

    /// The TLS configuration every worker's pool shares, for the reloader.
    pub fn tls(&self) -> Arc<UpstreamTls> {
        Arc::clone(&self.pool.tls)
    }

    /// A client with the same settings and trust roots (built once: a few
    /// hundred certificates), and an empty pool of its own, for a worker.
    pub fn with_own_pool(&self) -> Self {
        let p = &self.pool;
        Self {
            pool: Arc::new(Pool {
                tls: Arc::clone(&p.tls),
                connect_timeout: p.connect_timeout,
                idle_timeout: p.idle_timeout,
                max_idle: p.max_idle,
                idle: Mutex::new(HashMap::default()),
                h2: Mutex::new(HashMap::default()),
                h2_turns: Mutex::new(HashMap::default()),
            }),
        }
    }

    /// Sends `request` (with its `Host` set) to `target`, for `origin` (its
    /// origin-form target, with any query; the request's URI is not read),
    /// with the `extra` header fields after its own, and returns once the
    /// response head has arrived. `now` is the caller's reading of the
    /// clock, which judges the pooled connections' idle time.
    pub async fn send(
        &self,
        target: &UpstreamTarget,
        origin: &Target<'_>,
        extra: &[(&HeaderName, &HeaderValue)],
        request: Request<Body>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let key =
            PoolKey { https: target.scheme == hyper::http::uri::Scheme::HTTPS, authority: target.authority.clone() };
        if target.http2 {
            // Boxed: HTTP/1.1 requests' futures stay the size they were.
            return Box::pin(self.send_h2(key, target, origin, extra, request, now)).await;
        }
        let (parts, body) = request.into_parts();
        let (head, framing) = encode_request(&parts, origin, extra, &body);
        let retry_unanswered = framing == Framing::Empty && is_safe(&parts.method);
        // An upstream that answers without reading a body it did not expect
        // (on GET, or an upgrade) may read that body as a request of its
        // own: such a connection is not used again.
        let body_unexpected =
            framing != Framing::Empty && (is_safe(&parts.method) || parts.headers.contains_key(hyper::header::UPGRADE));
        let mut pooled = self.pool.checkout(&key, now);
        let mut body = Some(body);
        loop {
            let reused = pooled.is_some();
            let mut stream = match pooled.take() {
                Some(stream) => stream,
                // Boxed: connecting (TCP, TLS) is a large future, and inline
                // it would make every request's future as large.
                None => Box::pin(self.pool.connect(&key, false)).await?,
            };
            if let Err(e) = write_all_flush(&mut stream, &head).await {
                if reused {
                    continue; // closed under us, and nothing was taken in
                }
                return Err(failure_on_new_connection(e));
            }
            let mut exchange = match body.take() {
                Some(body) if framing != Framing::Empty => {
                    let (reader, mut writer) = tokio::io::split(stream);
                    let (done, sent) = oneshot::channel();
                    let task = tokio::spawn(async move {
                        let result = write_body(&mut writer, body, framing).await;
                        let _ = done.send(match result {
                            Ok(()) => Ok(writer),
                            Err(e) => {
                                // The upstream must not wait for the rest.
                                let _ = writer.shutdown().await;
                                Err(e)
                            }
                        });
                    });
                    let task = AbortOnDrop(task.abort_handle());
                    Exchange { reader: Reader::Half(reader), writer: Writer::Sending(sent, task) }
                }
                _ => Exchange { reader: Reader::Whole(stream), writer: Writer::Done },
            };
            let mut rbuf = BytesMut::new();
            match read_response(&mut exchange, &mut rbuf, &parts.method).await {
                Ok(mut head) => {
                    if let Writer::Sending(sent, _) = &mut exchange.writer {
                        match sent.try_recv() {
                            Ok(Ok(w)) => exchange.writer = Writer::Sent(w),
                            // Answered before the body was sent: the upstream
                            // may not have read it, so the connection's state is
                            // unknown.
                            _ => head.reusable = false,
                        }
                    }
                    head.reusable &= !body_unexpected;
                    return Ok(self.hand_out(key, exchange, rbuf, head));
                }
                Err(ReadError::Closed) if reused && retry_unanswered => continue,
                Err(ReadError::Closed) => {
                    return Err(UpstreamError::Request(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection without answering",
                    )))
                }
                Err(ReadError::Failed(UpstreamError::Request(e))) if !reused => {
                    return Err(failure_on_new_connection(e));
                }
                Err(ReadError::Failed(e)) => return Err(e),
            }
        }
    }

    fn hand_out(&self, key: PoolKey, exchange: Exchange, rbuf: BytesMut, head: ResponseHead) -> Response<UpstreamBody> {
        let ResponseHead { mut response, framing, reusable } = head;
        let upgrade = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let mut body = UpstreamBody {
            decoder: Decoder::new(framing),
            rbuf,
            exchange: Some(exchange),
            owner: reusable.then(|| (Arc::clone(&self.pool), key)),
            upgrade,
            read_timeout: None,
            stall: None,
            waiting: false,
            h2: None,
            trailer_strip: None,
        };
        if body.decoder.is_done() && !upgrade {
            body.finish();
        }
        *response.body_mut() = body;
        response
    }

    /// Closes connections idle for longer than the pool's idle timeout, or
    /// made before the last reload of the TLS files (HTTP/2 ones: stops
    /// using them).
    pub fn sweep(&self) {
        let now = Instant::now();
        let generation = self.pool.tls.generation();
        let mut idle = self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain_mut(|c| c.usable(now, self.pool.idle_timeout, generation));
        }
        idle.retain(|_, list| !list.is_empty());
        drop(idle);
        self.pool.h2_sweep(now);
    }

    /// How often [`UpstreamClient::sweep`] should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.pool.idle_timeout / 2).max(Duration::from_millis(100))
    }
}

/// Methods that may be sent again after a connection failed under them.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// The origin-form target of an upstream request (`base` `path` `?query`),
/// written straight into its head. Made of a normalised path and a query
/// that parsed as part of the client's URI, so it is always a valid target.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The upstream's own base path (`""` or `/base`).
    pub base: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// The request head, and how its body is framed.
fn encode_request(
    parts: &hyper::http::request::Parts,
    target: &Target<'_>,
    extra: &[(&HeaderName, &HeaderValue)],
    body: &Body,
) -> (Vec<u8>, Framing) {
    let mut out = Vec::with_capacity(http1::HEAD_CAPACITY);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.base.as_bytes());
    out.extend_from_slice(target.path.as_bytes());
    if let Some(query) = target.query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if not_forwarded(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in extra {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if body.is_end_stream() {
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Empty
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        http1::write_decimal(&mut out, n);
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    (out, framing)
}

/// Headers of the client's request the upstream never sees: the framing
/// (ours to state, below), in any spelling an upstream might read as it
/// (`Content_Length` is `HTTP_CONTENT_LENGTH` to CGI-style servers); and
/// `Expect`, which the gateway has answered itself.
fn not_forwarded(name: &HeaderName) -> bool {
    let folded_eq = |canonical: &str| {
        name.as_str().bytes().zip(canonical.bytes()).all(|(a, b)| a == b || (b == b'-' && matches!(a, b'_' | b'.')))
    };
    match name.as_str().len() {
        6 => name == EXPECT,
        14 => folded_eq("content-length"),
        17 => folded_eq("transfer-encoding"),
        _ => false,
    }
}

async fn write_all_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Sends the request body (the head is already out).
/// Sends the request body (the head is already out). Frames that are
/// ready together are gathered into one write (up to 64 KiB), so a client
/// sending many small chunks does not cost a system call each. A body that
/// does not match the `Content-Length` the upstream was told fails, and the
/// upstream then sees its connection close short.
async fn write_body<W: AsyncWrite + Unpin>(w: &mut W, mut body: Body, framing: Framing) -> Result<(), UpstreamError> {
    const GATHER: usize = 64 * 1024;
    let chunked = framing == Framing::Chunked;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut out = Vec::new();
    let mut next = body.frame().await;
    while let Some(frame) = next {
        let Ok(data) = frame.map_err(UpstreamError::RequestBody)?.into_data() else {
            next = body.frame().await;
            continue;
        };
        if !data.is_empty() {
            left =
                left.checked_sub(data.len() as u64).ok_or_else(|| invalid("the request body is longer than stated"))?;
            if chunked {
                http1::write_chunk_size(&mut out, data.len());
            }
            if data.len() <= 16 * 1024 {
                out.extend_from_slice(&data);
            } else {
                // Large: written as it is rather than copied.
                w.write_all(&out).await.map_err(UpstreamError::Request)?;
                out.clear();
                w.write_all(&data).await.map_err(UpstreamError::Request)?;
            }
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        // Another frame ready now joins this write; otherwise the write
        // goes out before waiting.
        next = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) if out.len() < GATHER => frame,
            ready => {
                w.write_all(&out).await.map_err(UpstreamError::Request)?;
                out.clear();
                match ready {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => body.frame().await,
                }
            }
        };
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    } else if left != 0 {
        return Err(invalid("the request body is shorter than stated"));
    }
    w.write_all(&out).await.map_err(UpstreamError::Request)?;
    w.flush().await.map_err(UpstreamError::Request)
}

/// One request's use of a connection.
struct Exchange {
    reader: Reader,
    writer: Writer,
}

enum Reader {
    Whole(Stream),
    /// The write half is with the task sending the request body.
    Half(ReadHalf<Stream>),
}

enum Writer {
    /// Nothing to send (or all sent, write half back: see `Reader`).
    Done,
    /// The task sending the body, stopped if the exchange is dropped first
    /// (a timeout, a failed or abandoned response): it holds the client's
    /// body and the upstream's write half.
    Sending(oneshot::Receiver<Result<WriteHalf<Stream>, UpstreamError>>, AbortOnDrop),
    Sent(WriteHalf<Stream>),
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Exchange {
    /// The whole connection again, if the request body has been sent.
    fn into_stream(self) -> Option<Stream> {
        match (self.reader, self.writer) {
            (Reader::Whole(stream), _) => Some(stream),
            (Reader::Half(r), Writer::Sent(w)) => Some(r.unsplit(w)),
            (Reader::Half(r), Writer::Sending(mut rx, _task)) => match rx.try_recv() {
                Ok(Ok(w)) => Some(r.unsplit(w)),
                _ => None,
            },
            (Reader::Half(_), Writer::Done) => None,
        }
    }
}

impl AsyncRead for Reader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Reader::Whole(s) => Pin::new(s).poll_read(cx, buf),
            Reader::Half(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

struct ResponseHead {
    response: Response<UpstreamBody>,
    framing: Framing,
    reusable: bool,
}

enum ReadError {
    /// The connection closed before a byte of the answer.
    Closed,
    Failed(UpstreamError),
}

/// Reads the response head (skipping interim 1xx answers other than 101).
/// While the request body is still being sent, a failure to send it ends
/// the wait: it is the client's fault, not the upstream's.
async fn read_response(
    exchange: &mut Exchange,
    rbuf: &mut BytesMut,
    method: &Method,
) -> Result<ResponseHead, ReadError> {
    let mut answered = false;
    loop {
        if !rbuf.is_empty() {
            answered = true;
            match parse_response(rbuf, method).map_err(ReadError::Failed)? {
                Some(head) => return Ok(head),
                None if rbuf.len() > MAX_RESPONSE_HEAD => {
                    return Err(ReadError::Failed(invalid("response head too large")));
                }
                None => {}
            }
        }
        let n = match &mut exchange.writer {
            Writer::Sending(sent, _) => {
                tokio::select! {
                    biased;
                    n = poll_fn(|cx| http1::poll_read_head(&mut exchange.reader, cx, rbuf)) => n,
                    result = sent => {
                        exchange.writer = match result {
                            Ok(Ok(w)) => Writer::Sent(w),
                            Ok(Err(e)) => return Err(ReadError::Failed(e)),
                            Err(_) => return Err(ReadError::Failed(invalid("the request body task ended"))),
                        };
                        continue;
                    }
                }
            }
            _ => poll_fn(|cx| http1::poll_read_head(&mut exchange.reader, cx, rbuf)).await,
        };
        match n {
            Ok(0) if !answered => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Failed(invalid("the connection closed inside the response head"))),
            Ok(_) => {}
            Err(e) if !answered && is_reset(&e) => return Err(ReadError::Closed),
            Err(e) => return Err(ReadError::Failed(UpstreamError::Request(e))),
        }
    }
}

/// A failure on a connection just made: a TLS error there (an alert, most
/// often) means the handshake failed after all, since in TLS 1.3 a server
/// refuses the client's certificate only after the client has finished its
/// side and sent the request, which the server never reads. That is a
/// connection failure (cool-down, and another upstream for an idempotent
/// request), whichever TLS version was spoken; anything else is the
/// request's.
fn failure_on_new_connection(e: io::Error) -> UpstreamError {
    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        UpstreamError::Tls(e)
    } else {
        UpstreamError::Request(e)
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe)
}

/// Parses a response head from the front of `rbuf`: `Ok(None)` when
/// incomplete; an interim 1xx (other than 101) is consumed and skipped.
fn parse_response(rbuf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, UpstreamError> {
    loop {
        // Parsed from a frozen view of the buffer, so that header values can
        // be cut from it without copies.
        let bytes = rbuf.split().freeze();
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &bytes,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                *rbuf = BytesMut::from(bytes);
                return Ok(None);
            }
            Err(_) => return Err(invalid("malformed response head")),
        };
        let status = StatusCode::from_u16(parsed.code.unwrap_or(0)).map_err(|_| invalid("invalid status code"))?;
        let version = parsed.version.unwrap_or(1);
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            rbuf.extend_from_slice(&bytes[len..]);
            continue;
        }
        let (mut headers, s) = http1::header_map(&bytes, parsed.headers, 1, false).map_err(invalid)?;
        rbuf.extend_from_slice(&bytes[len..]);
        let mut reusable = !s.close && (version == 1 || s.keep_alive);
        let framing = if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else if *method == Method::CONNECT && status.is_success() {
            reusable = false;
            Framing::Empty
        } else if s.has_transfer_encoding {
            if !s.chunked_only {
                // The client would get the coded bytes with nothing saying
                // which coding they are in.
                return Err(invalid("unsupported transfer coding"));
            }
            if s.content_length.is_some() {
                // Both: Transfer-Encoding wins, the length goes, and the
                // connection is not trusted with another request.
                headers.remove(CONTENT_LENGTH);
                reusable = false;
            }
            Framing::Chunked
        } else if let Some(n) = s.content_length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        if framing == Framing::Close || status == StatusCode::SWITCHING_PROTOCOLS {
            reusable = false;
        }
        let mut response = Response::new(UpstreamBody::empty());
        *response.status_mut() = status;
        *response.version_mut() = if version == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
        *response.headers_mut() = headers;
        return Ok(Some(ResponseHead { response, framing, reusable }));
    }
}

/// An upstream response body: decodes the upstream's framing as the client
/// side reads it and, once it has been read to the end, returns the
/// connection to the pool.
pub struct UpstreamBody {
    decoder: Decoder,
    rbuf: BytesMut,
    exchange: Option<Exchange>,
    /// Where the connection goes back to; None when it cannot be reused.
    owner: Option<(Arc<Pool>, PoolKey)>,
    upgrade: bool,
    /// The longest wait for the upstream's next bytes ([`Self::limit_reads`]).
    read_timeout: Option<(Duration, metrics::SharedString)>,
    /// Made on the first read that has to wait, then re-armed on the first
    /// wait after bytes arrived (`waiting`): a body that arrives with its
    /// head needs no timer.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    /// An answer that came over HTTP/2: read from here, not `exchange`.
    h2: Option<hyper::body::Incoming>,
    /// Fields taken out of its trailers ([`Self::strip_trailers`]).
    trailer_strip: Option<Arc<[HeaderName]>>,
}

impl UpstreamBody {
    fn empty() -> Self {
        Self {
            decoder: Decoder::new(Framing::Empty),
            rbuf: BytesMut::new(),
            exchange: None,
            owner: None,
            upgrade: false,
            read_timeout: None,
            stall: None,
            waiting: false,
            h2: None,
            trailer_strip: None,
        }
    }

    /// Ends the body with an error (and counts
    /// `gateway_upstream_errors_total{route, kind="read_timeout"}`) when the
    /// upstream sends nothing for `timeout` while the client waits for more:
    /// the route's `read_timeout`.
    pub fn limit_reads(&mut self, timeout: Duration, route: metrics::SharedString) {
        self.read_timeout = Some((timeout, route));
    }

    /// Takes `names` out of the answer's trailers, if it has any (only an
    /// HTTP/2 upstream's answer can): a route's `remove_response_headers`
    /// and the fields the gateway sets hold for the whole answer.
    pub fn strip_trailers(&mut self, names: &Arc<[HeaderName]>) {
        if self.h2.is_some() && !names.is_empty() {
            self.trailer_strip = Some(Arc::clone(names));
        }
    }

    /// Called when a read must wait: true once the upstream has been silent
    /// for the read timeout.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((timeout, _)) = &self.read_timeout else { return false };
        if !self.waiting {
            let deadline = tokio::time::Instant::now() + *timeout;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.waiting = true;
        }
        self.stall.as_mut().is_some_and(|stall| stall.as_mut().poll(cx).is_ready())
    }

    /// The upstream was silent for the read timeout: counted, logged, and
    /// the error that ends the body.
    fn timed_out(&self) -> BodyError {
        if let Some((timeout, route)) = &self.read_timeout {
            metrics::counter!("gateway_upstream_errors_total", "route" => route.clone(), "kind" => "read_timeout")
                .increment(1);
            tracing::warn!(route = %route, ?timeout, "the upstream sent nothing of its answer for the read timeout");
        }
        io::Error::new(io::ErrorKind::TimedOut, "the upstream sent nothing for the read timeout").into()
    }

    /// [`HttpBody::poll_frame`] for an answer that came over HTTP/2.
    fn poll_h2(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(body) = self.h2.as_mut() else { return Poll::Ready(None) };
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.waiting = false;
                let frame = match (frame, &self.trailer_strip) {
                    (Some(Ok(frame)), Some(names)) => Some(Ok(match frame.into_trailers() {
                        Ok(mut fields) => {
                            for name in names.iter() {
                                fields.remove(name);
                            }
                            Frame::trailers(fields)
                        }
                        Err(data) => data,
                    })),
                    (frame, _) => frame,
                };
                Poll::Ready(frame.map(|f| f.map_err(|e| BodyError::Io(io::Error::other(e)))))
            }
            Poll::Pending if self.stalled(cx) => {
                // Dropping the body resets the stream.
                self.h2 = None;
                Poll::Ready(Some(Err(self.timed_out())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// After a 101: the upstream's connection, for the tunnel.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        if !self.upgrade {
            return None;
        }
        let stream = self.exchange.take()?.into_stream()?;
        Some(Upgraded::new(Box::new(stream), self.rbuf.split().freeze()))
    }

    /// The body has ended: the connection goes back to the pool if it can.
    fn finish(&mut self) {
        let exchange = self.exchange.take();
        if let (Some(exchange), Some((pool, key))) = (exchange, self.owner.take()) {
            if self.rbuf.is_empty() {
                if let Some(stream) = exchange.into_stream() {
                    pool.put_back(key, stream);
                }
            }
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.h2.is_some() {
            return this.poll_h2(cx);
        }
        loop {
            match this.decoder.decode(&mut this.rbuf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(exchange) = this.exchange.as_mut() else {
                return Poll::Ready(Some(Err(BodyError::Incomplete)));
            };
            let want = this.decoder.remaining().map_or(16 * 1024, |n| usize::try_from(n).unwrap_or(usize::MAX));
            this.rbuf.reserve(want.clamp(1, 64 * 1024));
            let read = match tokio_util::io::poll_read_buf(Pin::new(&mut exchange.reader), cx, &mut this.rbuf) {
                Poll::Ready(read) => {
                    this.waiting = false;
                    read
                }
                Poll::Pending if this.stalled(cx) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(this.timed_out())));
                }
                Poll::Pending => return Poll::Pending,
            };
            match read {
                Ok(0) => {
                    // The end of a close-delimited body; otherwise cut short.
                    this.exchange = None;
                    if let Err(e) = this.decoder.eof() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.h2 {
            Some(body) => body.is_end_stream(),
            None => self.decoder.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(body) = &self.h2 {
            return body.size_hint();
        }
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Pool {
    fn checkout(&self, key: &PoolKey, now: Instant) -> Option<Stream> {
        let generation = if key.https { self.tls.generation() } else { 0 };
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(key)?;
        while let Some(mut c) = list.pop() {
            if c.usable(now, self.idle_timeout, generation) {
                return Some(c.stream);
            }
        }
        None
    }

    fn put_back(&self, key: PoolKey, stream: Stream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle {
            list.push(Idle { stream, since: Instant::now() });
        }
    }

    /// A new connection; over TLS, offering ALPN `h2` alone when `http2`
    /// (and refusing an upstream that does not take it), else `http/1.1`.
    async fn connect(&self, key: &PoolKey, http2: bool) -> Result<Stream, UpstreamError> {
        let host = key.authority.host();
        let port = key.authority.port_u16().unwrap_or(if key.https { 443 } else { 80 });
        let tcp = connect_tcp(host, port, self.connect_timeout).await.map_err(UpstreamError::Connect)?;
        tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
        let stream = if key.https {
            // An IPv6 authority keeps its brackets in `host()`.
            let name = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| UpstreamError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let (connector, generation) = self.tls.connector(http2);
            let tls = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| UpstreamError::Tls(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")))?
                .map_err(UpstreamError::Tls)?;
            if http2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                let refused = "the upstream did not choose HTTP/2 (ALPN h2) for upstream_protocol = \"http2\"";
                return Err(UpstreamError::Tls(io::Error::new(io::ErrorKind::InvalidData, refused)));
            }
            Stream::Tls(Box::new(tls), generation)
        } else {
            Stream::Plain(tcp)
        };
        // Against requests, this shows how well connections are reused.
        let scheme = if key.https { "https" } else { "http" };
        metrics::counter!("gateway_upstream_connections_total", "upstream" => format!("{scheme}://{}", key.authority))
            .increment(1);
        Ok(stream)
    }
}

/// Tries each address `host` resolves to, in order. As hyper-util's
/// connector does, `timeout` is shared evenly between the addresses, so an
/// unreachable first address (a black-holed IPv6 route) leaves time for the
/// next one. The lookup itself (none for an IP literal) is bounded by it too.
pub(crate) async fn connect_tcp(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> =
        tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await.map_err(|_| timed_out())??.collect();
    let each = timeout / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(each, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(timed_out()),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))))
}

/// A plain or TLS connection to an upstream; a TLS one with the
/// generation of the set it was made with ([`UpstreamTls::generation`]).
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>, u64),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UpstreamClient;
    use crate::config::Config;

    /// The gateway's client certificate is checked at start: a key that is
    /// not the certificate's is refused with the settings named, not found
    /// out at the first handshake.
    #[test]
    fn a_client_certificate_with_the_wrong_key_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let one = rcgen::generate_simple_self_signed(vec!["gateway".to_owned()]).expect("a certificate");
        let other = rcgen::generate_simple_self_signed(vec!["gateway".to_owned()]).expect("a certificate");
        std::fs::write(dir.path().join("client.pem"), one.cert.pem()).expect("write client.pem");
        std::fs::write(dir.path().join("right.key"), one.key_pair.serialize_pem()).expect("write right.key");
        std::fs::write(dir.path().join("wrong.key"), other.key_pair.serialize_pem()).expect("write wrong.key");
        let settings = |key: &str| {
            let text =
                format!("[upstream]\nclient_cert = \"client.pem\"\nclient_key = {key:?}\nplatform_roots = false");
            Config::parse(&text, &dir.path().join("gateway.toml")).expect("valid settings").upstream
        };
        assert!(UpstreamClient::new(&settings("right.key")).is_ok());
        let err = UpstreamClient::new(&settings("wrong.key")).err().expect("a mismatched pair is refused");
        assert!(format!("{err:#}").contains("upstream.client_cert and client_key do not match"), "{err:#}");
        let err = UpstreamClient::new(&settings("missing.key")).err().expect("a missing key is refused");
        assert!(format!("{err:#}").contains("upstream.client_key"), "{err:#}");
    }
}
