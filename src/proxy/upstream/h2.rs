//! HTTP/2 to upstreams (a route's `upstream_protocol = "http2"`): for gRPC
//! and other backends that speak only HTTP/2 or answer with trailers.
//!
//! Why hyper's client here, when HTTP/1.1 uses the gateway's own: HTTP/2
//! multiplexes every request to an upstream on one connection, whose frames
//! must be read and written by a task of its own whatever any one request
//! does (flow control, pings, other streams). hyper's connection task is
//! that task, and the h2 crate under it the protocol. Per worker, one
//! connection per upstream carries every request, as many at once as the
//! upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` allows (more wait for a
//! stream).
//!
//! What differs from HTTP/1.1 ([`super`]):
//! - the upstream's trailers (gRPC's `grpc-status` is one) pass to clients
//!   that speak HTTP/2; an HTTP/1.1 client gets the body without them. A
//!   client's trailers are dropped, as on HTTP/1.1: no field the gateway
//!   strips from a head can come in through them;
//! - the request names its upstream in `:authority` (the upstream's host,
//!   or the client's with `preserve_host`), not in `Host`, and its
//!   `Content-Length` comes from the body's own;
//! - a request that could not be sent on the pooled connection (closed
//!   meanwhile: a GOAWAY, an idle close) goes once on a new one; one that
//!   was sent is never sent again here. Requests that find no connection
//!   wait for the one being made rather than each making their own;
//! - the request body is sent by hyper's connection task, so a failure of
//!   the client's side of it (too large, cut short) is kept aside and
//!   reported as the client's (413, 400), not as the upstream's;
//! - a connection unused for `pool_idle_timeout`, closed, or made before
//!   the last reload of the upstream TLS files is not used again (streams
//!   still open on it finish): dropped at the next checkout or sweep;
//! - over TLS, the upstream must choose ALPN `h2`: one that does not is a
//!   failed handshake (502), as is one that speaks only HTTP/1.1 over
//!   cleartext (`h2c` with prior knowledge, RFC 9113 §3.3).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::{self, SendRequest};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{
    not_forwarded, Pool, PoolKey, Stream, Target, UpstreamBody, UpstreamClient, UpstreamError, MAX_RESPONSE_HEAD,
};
use crate::body::Body;
use crate::config::UpstreamTarget;

/// How often an HTTP/2 connection is pinged while a request is in flight,
/// and how long the answer may take before the connection is given up: a
/// stream waiting on a dead upstream (a host gone without a FIN) fails
/// instead of hanging until its read timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled HTTP/2 connection: its request handle, the TLS set it was
/// made with (0 for cleartext) and when a request last went on it.
pub(super) struct Shared {
    sender: SendRequest<Body>,
    generation: u64,
    used: Instant,
}

impl Shared {
    fn usable(&self, now: Instant, timeout: Duration, generation: u64) -> bool {
        !self.sender.is_closed() && self.generation == generation && now.duration_since(self.used) < timeout
    }
}

impl UpstreamClient {
    /// [`UpstreamClient::send`] for an upstream spoken to over HTTP/2.
    pub(super) async fn send_h2(
        &self,
        key: PoolKey,
        target: &UpstreamTarget,
        origin: &Target<'_>,
        extra: &[(&HeaderName, &HeaderValue)],
        request: Request<Body>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let failed = Arc::new(Mutex::new(None));
        let watched = Arc::clone(&failed);
        let request = request.map(|body| Body::new(Watched { body, failed: watched }));
        let mut request = h2_request(target, origin, extra, request)?;
        let mut pooled = self.pool.h2_checkout(&key, now);
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => Box::pin(self.pool.h2_connect(&key, now)).await?,
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    // Past here the answer is handled as any other.
                    parts.version = Version::HTTP_11;
                    return Ok(Response::from_parts(parts, UpstreamBody::h2(body)));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the pooled connection had closed under us.
                    Some(unsent) if reused => {
                        self.pool.h2_forget(&key);
                        request = unsent;
                    }
                    _ => {
                        let client_side = failed.lock().unwrap_or_else(PoisonError::into_inner).take();
                        return Err(match client_side {
                            Some(e) => UpstreamError::RequestBody(e),
                            None => failure(e.into_error(), !reused),
                        });
                    }
                },
            }
        }
    }
}

/// An HTTP/2 failure as an upstream error: on a new connection, one that a
/// TLS alert caused (an upstream refusing the gateway's client certificate
/// after a TLS 1.3 handshake) counts as a failed connection, as on
/// HTTP/1.1 (cool-down, and the retry of an idempotent request).
fn failure(e: hyper::Error, fresh: bool) -> UpstreamError {
    let e = io::Error::other(e);
    if fresh && tls_caused(&e) {
        UpstreamError::Tls(e)
    } else {
        UpstreamError::Request(e)
    }
}

/// Whether a rustls error is in `e`'s cause chain (an `io::Error` wrapping
/// one shows it through `get_ref`, not `source`).
fn tls_caused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        let wrapped = err.downcast_ref::<io::Error>().and_then(io::Error::get_ref);
        if err.is::<rustls::Error>() || wrapped.is_some_and(|inner| inner.is::<rustls::Error>() || tls_caused(inner)) {
            return true;
        }
        next = err.source();
    }
    false
}

/// The client's request body on its way to an HTTP/2 upstream: its data,
/// without trailers (a client's trailers are dropped, as on HTTP/1.1), and
/// its failure kept in `failed` for [`UpstreamClient::send_h2`], since
/// hyper's connection task, which reads it, only resets the stream.
struct Watched {
    body: Body,
    failed: Arc<Mutex<Option<axum::Error>>>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            return match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => continue,
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(e))) => {
                    *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    Poll::Ready(Some(Err(io::Error::other("the client's request body failed"))))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request as HTTP/2 sends it: an absolute URI (the `:scheme`,
/// `:authority` and `:path` pseudo-fields) in place of `Host`, without the
/// client's framing fields (hyper states the length from the body), and
/// with the `extra` fields.
fn h2_request(
    target: &UpstreamTarget,
    origin: &Target<'_>,
    extra: &[(&HeaderName, &HeaderValue)],
    request: Request<Body>,
) -> Result<Request<Body>, UpstreamError> {
    let (mut parts, body) = request.into_parts();
    let host = parts.headers.remove(HOST);
    let authority = match &host {
        Some(value) => value.to_str().map_err(|_| super::invalid("the Host is not an HTTP/2 authority"))?,
        None => target.authority.as_str(),
    };
    let mut uri = String::with_capacity(
        16 + authority.len() + origin.base.len() + origin.path.len() + origin.query.map_or(0, |q| q.len() + 1),
    );
    uri.push_str(target.scheme.as_str());
    uri.push_str("://");
    uri.push_str(authority);
    uri.push_str(origin.base);
    uri.push_str(origin.path);
    if let Some(query) = origin.query {
        uri.push('?');
        uri.push_str(query);
    }
    parts.uri = uri.parse::<Uri>().map_err(|_| super::invalid("the Host is not an HTTP/2 authority"))?;
    parts.version = Version::HTTP_2;
    let framing: Vec<HeaderName> = parts.headers.keys().filter(|name| not_forwarded(name)).cloned().collect();
    for name in framing {
        parts.headers.remove(name);
    }
    for (name, value) in extra {
        parts.headers.append((*name).clone(), (*value).clone());
    }
    Ok(Request::from_parts(parts, body))
}

impl Pool {
    /// The pooled connection to `key`'s upstream, if it can take a request.
    fn h2_checkout(&self, key: &PoolKey, now: Instant) -> Option<SendRequest<Body>> {
        let generation = if key.https { self.tls.generation() } else { 0 };
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let conn = shared.get_mut(key)?;
        if !conn.usable(now, self.idle_timeout, generation) {
            shared.remove(key);
            return None;
        }
        conn.used = now;
        Some(conn.sender.clone())
    }

    /// Forgets the pooled connection to `key`'s upstream if it has closed.
    fn h2_forget(&self, key: &PoolKey) {
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        if shared.get(key).is_some_and(|conn| conn.sender.is_closed()) {
            shared.remove(key);
        }
    }

    /// A connection to `key`'s upstream: the pooled one if another request
    /// made it while this one waited its turn, else a new one, pooled for
    /// the requests that follow. Its frames are read and written by a task
    /// of its own, which ends when the connection does.
    async fn h2_connect(&self, key: &PoolKey, now: Instant) -> Result<SendRequest<Body>, UpstreamError> {
        let turn = {
            let mut turns = self.h2_turns.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(turns.entry(key.clone()).or_default())
        };
        let _turn = turn.lock().await;
        if let Some(sender) = self.h2_checkout(key, now) {
            return Ok(sender);
        }
        let stream = self.connect(key, true).await?;
        let generation = match &stream {
            Stream::Plain(_) => 0,
            Stream::Tls(_, generation) => *generation,
        };
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            // As long a head as HTTP/1.1 upstreams may send.
            .max_header_list_size(u32::try_from(MAX_RESPONSE_HEAD).unwrap_or(u32::MAX));
        let (sender, connection) = builder.handshake(TokioIo::new(stream)).await.map_err(|e| failure(e, true))?;
        let authority = key.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(upstream = %authority, error = %e, "an upstream HTTP/2 connection failed");
            }
        });
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        shared.insert(key.clone(), Shared { sender: sender.clone(), generation, used: Instant::now() });
        Ok(sender)
    }

    /// Drops the pooled connections [`Pool::h2_checkout`] would not use.
    pub(super) fn h2_sweep(&self, now: Instant) {
        let generation = self.tls.generation();
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        shared.retain(|key, conn| conn.usable(now, self.idle_timeout, if key.https { generation } else { 0 }));
    }
}

impl UpstreamBody {
    /// The body of an answer that came over HTTP/2: its frames, trailers
    /// included, as they come.
    fn h2(body: Incoming) -> Self {
        Self { h2: Some(body), ..Self::empty() }
    }
}
