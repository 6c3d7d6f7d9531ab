//! One client connection spoken to in HTTP/1.1: read a head, answer it
//! through [`Proxy::serve`], write the answer, and again while the
//! connection is kept alive.
//!
//! The connection's socket and read buffer sit behind a mutex shared with
//! the request body ([`RequestBody`]), which the upstream client reads
//! while this loop waits for the answer; the lock is only ever held inside
//! a poll, never across an await.
//!
//! Memory: an idle connection holds no buffer. Reads wait on a per-thread
//! scratch buffer and only the bytes read are copied out, and the read
//! buffer is released between requests.
//!
//! Time limits: `header_read_timeout` bounds the first head from the
//! accept (a connection that never sends a byte is closed after it), and
//! each later head from its first byte; between requests a kept-alive
//! connection waits up to `idle_timeout` for that byte. One timer per
//! connection is re-armed only when it fires, not per request: while a
//! connection is idle it fires at least every `header_read_timeout`, so a
//! head that starts during a long idle wait is still held to its own limit.
//! The time a head started is only taken when it did not arrive whole in
//! one read.
//!
//! After an answer, the connection closes when the client asked for it,
//! when the gateway is shutting down, or when the request's body was
//! neither read to its end nor already received (the rest of it cannot be
//! skipped otherwise); then the gateway stops writing
//! and reads what the client still sends for a moment before closing, so
//! that the client reads the answer rather than a reset.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::sync::{oneshot, watch};

use super::upgrade::{Io, OnUpgrade, Upgraded};
use super::{header_map, poll_read_head, write_chunk_size, write_decimal, write_headers};
use super::{BodyError, Decoded, Decoder, Framing, HEAD_CAPACITY, MAX_HEADERS};
use crate::body::Body;
use crate::proxy::error::ProxyError;
use crate::proxy::{Conn, Proxy};

/// The HTTP/2 connection preface: a connection that starts with it is
/// handed back to be served as HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Response bytes gathered before a write; larger body frames are written
/// as they come.
const WRITE_BATCH: usize = 64 * 1024;
/// How long, and how much, a closing connection keeps reading what the
/// client still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection waits for its next request.
    pub idle_timeout: Duration,
    /// How long a write may wait for the client to take bytes.
    pub send_timeout: Duration,
    pub max_head_bytes: usize,
}

struct Shared<I> {
    io: I,
    rbuf: BytesMut,
    decoder: Decoder,
    /// How far the search for the end of the next head has got.
    head_scan: usize,
    /// When a head that did not arrive whole in one read started (noted
    /// when its reader first waits for more).
    head_started: Option<Instant>,
    send_timeout: Duration,
    /// Bytes of the `100 Continue` still to be written before the body is
    /// read (when the client asked for one).
    continue_left: usize,
    /// Which request's body may be read: bumped once a request has been
    /// answered, so that a body still held somewhere cannot read the next
    /// request's bytes.
    generation: u64,
    /// The request body's reader, while it waits for bytes: woken when the
    /// body is cut off (the loop then reads the socket itself, and tokio
    /// keeps one read waker per socket, so it would otherwise never wake).
    body_waker: Option<Waker>,
}

impl<I> Shared<I> {
    /// Ends the current request's body for whoever still holds it.
    fn end_body(&mut self) {
        self.generation += 1;
        if let Some(waker) = self.body_waker.take() {
            waker.wake();
        }
    }
}

/// Cuts the request body off however the connection's loop ends (an error,
/// a hand-over), so that a task still reading it is woken and stops.
struct EndBodyOnDrop<I>(SharedIo<I>);

impl<I> Drop for EndBodyOnDrop<I> {
    fn drop(&mut self) {
        lock(&self.0).end_body();
    }
}

type SharedIo<I> = Arc<Mutex<Shared<I>>>;

fn lock<I>(shared: &Mutex<Shared<I>>) -> MutexGuard<'_, Shared<I>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request head, parsed.
struct Head {
    request: Request<()>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    /// The request asks for a protocol upgrade (`Upgrade`).
    upgrade: bool,
    /// Its only `Authorization` value, kept out of the header map
    /// ([`header_map`] says why).
    authorization: Option<Bytes>,
}

/// Why a head was refused.
enum HeadError {
    /// Refused before a request could be made of it.
    Unparsable(ProxyError),
    /// A head that parsed, with framing or headers the gateway refuses.
    Refused(Box<Request<()>>, ProxyError),
}

/// How the connection ended.
pub enum Served<I> {
    Done,
    /// The client opened with the HTTP/2 preface: here is its connection
    /// and the bytes read so far, to be served as HTTP/2.
    Http2(I, Bytes),
}

/// Serves `io` until the client closes, the keep-alive limit passes, or
/// `shutdown` turns true.
pub async fn serve<I: Io>(
    io: I,
    conn: Conn,
    proxy: Arc<Proxy>,
    settings: Arc<Settings>,
    shutdown: watch::Receiver<bool>,
) -> Served<I> {
    let shared: SharedIo<I> = Arc::new(Mutex::new(Shared {
        io,
        rbuf: BytesMut::new(),
        decoder: Decoder::new(Framing::Empty),
        head_scan: 0,
        head_started: None,
        send_timeout: settings.send_timeout,
        continue_left: 0,
        generation: 0,
        body_waker: None,
    }));
    let end_body = EndBodyOnDrop(Arc::clone(&shared));
    let timeout = settings.header_read_timeout;
    let idle_first = settings.idle_timeout < timeout;
    let timer = tokio::time::sleep(timeout);
    tokio::pin!(timer);
    // One wait for the shutdown signal for the connection's whole life: made
    // afresh for every head, it registered and unregistered a waiter each time.
    let mut stop = shutdown.clone();
    let stopping = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopping);
    // Bounds each upstream answer (the route's timeout): one timer for the
    // connection's life, pushed later per request, which is cheap.
    let route_timer = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(route_timer);
    let mut first = true;
    loop {
        // Wait for a complete head: the first within `timeout` of the
        // accept; a later one within `idle_timeout` for its first byte, then
        // `timeout` from that byte.
        let waiting_since = Instant::now();
        // The timer is only moved later when it fires: an idle limit
        // shorter than the one it is set for must pull it earlier.
        if idle_first && !first && timer.deadline() > (waiting_since + settings.idle_timeout).into() {
            timer.as_mut().reset((waiting_since + settings.idle_timeout).into());
        }
        let head = loop {
            let idle = lock(&shared).rbuf.is_empty();
            tokio::select! {
                biased;
                head = poll_fn(|cx| poll_head(&shared, cx, settings.max_head_bytes, first)) => break head,
                () = &mut timer => {
                    let now = Instant::now();
                    let deadline = match lock(&shared).head_started {
                        _ if first => waiting_since + timeout,
                        Some(started) => started + timeout,
                        None => waiting_since + settings.idle_timeout,
                    };
                    if now >= deadline {
                        tracing::debug!(
                            peer = %conn.peer,
                            "no complete request head within the header read (or idle) timeout"
                        );
                        return Served::Done;
                    }
                    timer.as_mut().reset(deadline.min(now + timeout).into());
                }
                () = &mut stopping, if idle => return Served::Done,
            }
        };
        let head = match head {
            Ok(Polled::Head(head)) => head,
            Ok(Polled::Closed) => return Served::Done,
            Ok(Polled::Preface) => {
                drop(end_body);
                let Ok(shared) = Arc::try_unwrap(shared) else { return Served::Done };
                let shared = shared.into_inner().unwrap_or_else(PoisonError::into_inner);
                return Served::Http2(shared.io, shared.rbuf.freeze());
            }
            Ok(Polled::Refused(e)) => {
                let (request, error) = match e {
                    HeadError::Unparsable(error) => (None, error),
                    HeadError::Refused(request, error) => (Some(*request), error),
                };
                tracing::debug!(peer = %conn.peer, error = %error, "refused a request head");
                let response = proxy.refuse(request.as_ref(), error);
                let _ = write_response(&shared, response, false, Version::HTTP_11, false).await;
                linger(&shared).await;
                return Served::Done;
            }
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "reading a request head failed");
                return Served::Done;
            }
        };
        first = false;

        let Head { request, framing, keep_alive, expect_continue, upgrade, authorization } = head;
        let is_head = request.method() == Method::HEAD;
        let version = request.version();
        let (parts, ()) = request.into_parts();
        let body = {
            let mut g = lock(&shared);
            g.decoder = Decoder::new(framing);
            if g.decoder.is_done() {
                Body::empty()
            } else {
                g.continue_left = if expect_continue { CONTINUE.len() } else { 0 };
                Body::new(RequestBody { shared: Arc::clone(&shared), generation: g.generation })
            }
        };
        let mut request = Request::from_parts(parts, body);
        let upgrade = if upgrade {
            let (on_upgrade, tx) = OnUpgrade::pair();
            request.extensions_mut().insert(on_upgrade);
            Some(tx)
        } else {
            None
        };

        // Boxed: held inline, the answer's future would be part of every
        // idle connection's task. Made in its box rather than moved there
        // (it is about 3 KB): the optimiser then writes it in place, which
        // callgrind shows (no 3 KB copy per request), though it is not
        // guaranteed.
        let response = boxed(|| proxy.serve(request, authorization, &conn, Some(route_timer.as_mut()))).await;

        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let (continue_left, body_done) = {
            let mut g = lock(&shared);
            let g = &mut *g;
            let left = std::mem::take(&mut g.continue_left);
            if left > 0 {
                // A body task waiting to write the rest of it goes on to
                // read instead (the loop writes it below).
                if let Some(waker) = g.body_waker.take() {
                    waker.wake();
                }
            }
            (left, g.decoder.rest_is_in(&g.rbuf))
        };
        if continue_left > 0 && continue_left < CONTINUE.len() {
            // A `100 Continue` cut short by a full socket: finished first,
            // or the answer would follow half an interim line.
            if let Err(e) = write_all(&shared, &CONTINUE[CONTINUE.len() - continue_left..]).await {
                tracing::debug!(peer = %conn.peer, error = %e, "writing a response failed");
                return Served::Done;
            }
        }
        // A body neither read nor already here (an upload answered early,
        // or one the client waits to be asked for) will close the
        // connection: say so.
        let keep_alive = keep_alive && body_done && !switching && !*shutdown.borrow();
        let kept = match write_response(&shared, response, is_head, version, keep_alive).await {
            Ok(kept) => kept,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "writing a response failed");
                return Served::Done;
            }
        };
        if switching {
            if let Some(tx) = upgrade.filter(|tx| !tx.is_closed()) {
                drop(end_body);
                hand_over(shared, tx);
            }
            return Served::Done;
        }
        // A request body not read to its end cannot be skipped unless the
        // rest of it is already here.
        let kept = kept && finish_body(&shared);
        if !kept {
            linger(&shared).await;
            return Served::Done;
        }
        let mut g = lock(&shared);
        if g.rbuf.is_empty() {
            // Nothing pipelined: give the buffer back while idle.
            g.rbuf = BytesMut::new();
        }
    }
}

/// Boxes the future `make` returns, written straight into its allocation
/// rather than built on the stack and copied there.
fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Ends the answered request's body: whatever of it is already buffered is
/// dropped; false when more of it is still to come.
fn finish_body<I>(shared: &Mutex<Shared<I>>) -> bool {
    let mut g = lock(shared);
    let g = &mut *g;
    g.end_body();
    loop {
        match g.decoder.decode(&mut g.rbuf) {
            Ok(Decoded::Done) => return true,
            Ok(Decoded::Data(_)) => {}
            Ok(Decoded::NeedMore) | Err(_) => return false,
        }
    }
}

/// After a 101: the client's connection, with whatever it sent past the
/// request, goes to the tunnel.
fn hand_over<I: Io>(shared: SharedIo<I>, tx: oneshot::Sender<Upgraded>) {
    let Ok(shared) = Arc::try_unwrap(shared) else { return };
    let shared = shared.into_inner().unwrap_or_else(PoisonError::into_inner);
    let _ = tx.send(Upgraded::new(Box::new(shared.io), shared.rbuf.freeze()));
}

#[allow(
    clippy::large_enum_variant,
    reason = "a head is the usual outcome; boxing it would cost an allocation per request"
)]
enum Polled {
    Head(Head),
    Closed,
    Preface,
    Refused(HeadError),
}

/// Reads until the buffer holds a complete head (or the client closes).
fn poll_head<I: Io>(
    shared: &Mutex<Shared<I>>,
    cx: &mut Context<'_>,
    max: usize,
    first: bool,
) -> Poll<io::Result<Polled>> {
    let mut g = lock(shared);
    let g = &mut *g;
    loop {
        let preface = first && H2_PREFACE.starts_with(&g.rbuf[..g.rbuf.len().min(H2_PREFACE.len())]);
        if !g.rbuf.is_empty() && preface {
            // The HTTP/2 preface, or (so far) the start of it.
            if g.rbuf.len() >= H2_PREFACE.len() {
                return Poll::Ready(Ok(Polled::Preface));
            }
        } else if !g.rbuf.is_empty() && head_complete(&g.rbuf, &mut g.head_scan, max) {
            match parse_head(&mut g.rbuf, max) {
                Ok(Some(head)) => {
                    g.head_scan = 0;
                    g.head_started = None;
                    return Poll::Ready(Ok(Polled::Head(head)));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Ok(Polled::Refused(e))),
            }
        }
        let n = match poll_read_head(&mut g.io, cx, &mut g.rbuf) {
            Poll::Ready(n) => n?,
            Poll::Pending => {
                if !g.rbuf.is_empty() && g.head_started.is_none() {
                    g.head_started = Some(Instant::now());
                }
                return Poll::Pending;
            }
        };
        if n == 0 {
            return Poll::Ready(Ok(Polled::Closed));
        }
    }
}

/// Whether `buf` holds the end of a head (an empty line), or as much as a
/// head may be: only then is it parsed, so a head arriving a byte at a time
/// is not parsed again for every byte. `scanned` keeps how far the search
/// got.
fn head_complete(buf: &[u8], scanned: &mut usize, max: usize) -> bool {
    if buf.ends_with(b"\n\r\n") || buf.ends_with(b"\n\n") || buf.len() >= max {
        return true;
    }
    let from = scanned.saturating_sub(2);
    *scanned = buf.len();
    let rest = &buf[from..];
    rest.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (rest.get(i + 1) == Some(&b'\n') || rest.get(i + 1..i + 3) == Some(&b"\r\n"[..])))
}

/// Parses a head from the front of `buf`: `Ok(None)` when incomplete.
fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, HeadError> {
    // Parsed from a frozen view of the buffer, so that the target and the
    // header values can be cut from it without copies.
    let bytes = buf.split().freeze();
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(&bytes, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max => len,
        Ok(httparse::Status::Partial) if bytes.len() < max => {
            *buf = BytesMut::from(bytes);
            return Ok(None);
        }
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Unparsable(ProxyError::HeaderTooLarge)),
        Err(_) => return Err(HeadError::Unparsable(ProxyError::BadRequest("malformed request head"))),
    };
    let unparsable = |e| HeadError::Unparsable(ProxyError::BadRequest(e));
    let method =
        Method::from_bytes(parsed.method.unwrap_or("").as_bytes()).map_err(|_| unparsable("invalid method"))?;
    let target = bytes.slice_ref(parsed.path.unwrap_or("").as_bytes());
    let uri = Uri::from_maybe_shared(target).map_err(|_| unparsable("invalid request target"))?;
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Room for a `Host` (the proxy writes its other fields after the map).
    let (headers, mut s) = header_map(&bytes, parsed.headers, 1, true).map_err(unparsable)?;
    if bytes.len() > len {
        // A body or a pipelined request: back to the buffer.
        buf.extend_from_slice(&bytes[len..]);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let framing = if s.has_transfer_encoding {
        let refusal = if s.content_length.is_some() {
            Some(ProxyError::BadRequest("the request has both Content-Length and Transfer-Encoding"))
        } else if version == Version::HTTP_10 {
            Some(ProxyError::BadRequest("Transfer-Encoding in an HTTP/1.0 request"))
        } else if !s.chunked_only {
            Some(ProxyError::NotImplemented("only the chunked transfer coding is supported"))
        } else {
            None
        };
        if let Some(e) = refusal {
            return Err(HeadError::Refused(Box::new(request), e));
        }
        Framing::Chunked
    } else {
        s.content_length.map_or(Framing::Empty, Framing::Length)
    };
    let keep_alive = if version == Version::HTTP_11 { !s.close } else { s.keep_alive && !s.close };
    let expect_continue = version == Version::HTTP_11 && s.expect_continue;
    let upgrade = version == Version::HTTP_11 && s.upgrade;
    let authorization = s.authorization.take();
    Ok(Some(Head { request, framing, keep_alive, expect_continue, upgrade, authorization }))
}

/// Writes `response`; `Ok(false)` when the connection must close after it.
async fn write_response<I: Io>(
    shared: &Mutex<Shared<I>>,
    response: Response<Body>,
    is_head: bool,
    version: Version,
    mut keep_alive: bool,
) -> io::Result<bool> {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    let headers = &mut parts.headers;
    if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(TRANSFER_ENCODING);
    }
    let no_body =
        is_head || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let framing = if no_body {
        Framing::Empty
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        let mut text = Vec::new();
        write_decimal(&mut text, n);
        if let Ok(v) = HeaderValue::from_bytes(&text) {
            headers.insert(CONTENT_LENGTH, v);
        }
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        Framing::Chunked
    } else {
        keep_alive = false;
        Framing::Close
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !keep_alive {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        } else if version == Version::HTTP_10 {
            headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        }
    }
    if !headers.contains_key(DATE) {
        headers.insert(DATE, http_date());
    }

    let mut out = Vec::with_capacity(HEAD_CAPACITY);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_headers(&mut out, headers);
    out.extend_from_slice(b"\r\n");

    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    if framing != Framing::Empty && !body.is_end_stream() {
        loop {
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing more for now: send what there is (streaming).
                    write_all(shared, &out).await?;
                    out.clear();
                    body.frame().await
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => {
                    // Cut short: for chunked framing the missing last chunk
                    // tells the client; for a length, the close does.
                    write_all(shared, &out).await?;
                    return Err(io::Error::other(format!("the response body failed: {e}")));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers are not forwarded
                },
            };
            if data.is_empty() {
                continue;
            }
            match framing {
                Framing::Length(_) => {
                    let len = data.len() as u64;
                    if len > left {
                        write_all(shared, &out).await?;
                        return Err(io::Error::other("the response body is longer than its Content-Length"));
                    }
                    left -= len;
                    put(shared, &mut out, &data).await?;
                }
                Framing::Chunked => {
                    write_chunk_size(&mut out, data.len());
                    put(shared, &mut out, &data).await?;
                    out.extend_from_slice(b"\r\n");
                }
                _ => put(shared, &mut out, &data).await?,
            }
            if body.is_end_stream() {
                break;
            }
        }
    } else if framing == Framing::Length(0) {
        left = 0;
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(_) if left != 0 => {
            write_all(shared, &out).await?;
            return Err(io::Error::other("the response body is shorter than its Content-Length"));
        }
        _ => {}
    }
    write_all(shared, &out).await?;
    // A no-op for plain TCP; as for writes, the timer is only armed when
    // the flush has to wait.
    let flush = |cx: &mut Context<'_>| Pin::new(&mut lock(shared).io).poll_flush(cx);
    match poll_fn(|cx| Poll::Ready(flush(cx))).await {
        Poll::Ready(flushed) => flushed?,
        Poll::Pending => {
            let limit = lock(shared).send_timeout;
            tokio::time::timeout(limit, poll_fn(flush))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))??;
        }
    }
    Ok(keep_alive)
}

/// Appends `data` to `out`, or, for large data, writes both out.
async fn put<I: Io>(shared: &Mutex<Shared<I>>, out: &mut Vec<u8>, data: &Bytes) -> io::Result<()> {
    if out.len() + data.len() <= WRITE_BATCH {
        out.extend_from_slice(data);
        return Ok(());
    }
    write_all(shared, out).await?;
    out.clear();
    write_all(shared, data).await
}

/// Writes all of `buf`. A write the client leaves waiting for longer than
/// `send_timeout` fails; the timer is only armed once a write has to wait.
async fn write_all<I: Io>(shared: &Mutex<Shared<I>>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let write = |cx: &mut Context<'_>| Pin::new(&mut lock(shared).io).poll_write(cx, buf);
        let n = match poll_fn(|cx| Poll::Ready(write(cx))).await {
            Poll::Ready(n) => n?,
            Poll::Pending => {
                let limit = lock(shared).send_timeout;
                tokio::time::timeout(limit, poll_fn(write))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))??
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Closes the connection politely: no more writes, then whatever the client
/// still sends is read and dropped for a moment, so that the close does not
/// turn into a reset that destroys the answer before the client reads it.
async fn linger<I: Io>(shared: &Mutex<Shared<I>>) {
    lock(shared).end_body();
    // The whole of it is bounded: a TLS close waits for the client to take
    // the close_notify, which a client that stopped reading never does.
    let _ = tokio::time::timeout(LINGER_TIME, linger_inner(shared)).await;
}

async fn linger_inner<I: Io>(shared: &Mutex<Shared<I>>) {
    let _ = poll_fn(|cx| Pin::new(&mut lock(shared).io).poll_shutdown(cx)).await;
    let mut drained = 0;
    let drain = poll_fn(|cx| loop {
        let mut g = lock(shared);
        let g = &mut *g;
        let before = g.rbuf.len();
        let read = poll_read_head(&mut g.io, cx, &mut g.rbuf);
        g.rbuf.truncate(before);
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(n)) => {
                drained += n;
                if drained >= LINGER_BYTES {
                    return Poll::Ready(());
                }
            }
        }
    });
    drain.await;
}

/// The request body, read from the connection as the upstream client asks
/// for it.
struct RequestBody<I> {
    shared: SharedIo<I>,
    generation: u64,
}

impl<I: Io> hyper::body::Body for RequestBody<I> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut g = lock(&self.shared);
        let g = &mut *g;
        if g.generation != self.generation {
            return Poll::Ready(Some(Err(BodyError::Incomplete)));
        }
        while g.continue_left > 0 {
            let sent = CONTINUE.len() - g.continue_left;
            let Poll::Ready(written) = Pin::new(&mut g.io).poll_write(cx, &CONTINUE[sent..]) else {
                g.body_waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            match written {
                Ok(0) => return Poll::Ready(Some(Err(BodyError::Io(io::ErrorKind::WriteZero.into())))),
                Ok(n) => {
                    g.continue_left -= n;
                    if g.continue_left == 0 {
                        if let Err(e) = ready!(Pin::new(&mut g.io).poll_flush(cx)) {
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
        loop {
            match g.decoder.decode(&mut g.rbuf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::Done) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let want = g.decoder.remaining().map_or(16 * 1024, |n| usize::try_from(n).unwrap_or(usize::MAX));
            g.rbuf.reserve(want.clamp(1, 64 * 1024));
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut g.io), cx, &mut g.rbuf);
            let Poll::Ready(read) = read else {
                if !g.body_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    g.body_waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            };
            match read {
                Ok(0) => {
                    if let Err(e) = g.decoder.eof() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let g = lock(&self.shared);
        g.generation == self.generation && g.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        let g = lock(&self.shared);
        match g.decoder.remaining().filter(|_| g.generation == self.generation) {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The `Date` header, rendered once a second per thread.
fn http_date() -> HeaderValue {
    thread_local! {
        static DATE_CACHE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE_CACHE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                *value = v;
                *at = secs;
            }
        }
        value.clone()
    })
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::parse_head;

    /// A head using every header the parser reads for itself, with random
    /// bytes overwritten, dropped or added; and random bytes alone. Each is
    /// a head, "need more" or a refusal, and nothing panics.
    #[test]
    fn mangled_heads_never_panic() {
        const HEAD: &[u8] = b"POST /api/x?q=1 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\
            Transfer-Encoding: chunked\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
            Authorization: Bearer abc\r\nExpect: 100-continue\r\nCookie: a=1\r\n\r\n";
        const BYTES: &[u8] = b":\r\n \t\0,;=%/0123456789abcdefABCDEF\x7f\x80\xff";
        let mut rand = crate::testrand::Rand::new(0x2545_F491_4F6C_DD1D);
        let mut heads = 0;
        for i in 0..50_000 {
            let input: Vec<u8> = if i % 10 == 0 {
                (0..rand.below(200)).map(|_| *rand.pick(BYTES)).chain(*b"\r\n\r\n").collect()
            } else {
                let mut input = HEAD.to_vec();
                rand.mangle(&mut input, BYTES, 4);
                input
            };
            let mut buf = BytesMut::from(&input[..]);
            if let Ok(Some(_)) = parse_head(&mut buf, 16 * 1024) {
                heads += 1;
            }
        }
        assert!(heads > 1_000, "too few heads parsed ({heads}) for the mangling to reach the header checks");
    }
}
