//! The public listener: accept, TLS, HTTP/1.1 + HTTP/2, limits, graceful
//! shutdown; the reload of routes, headers, CORS origins, keys and the
//! listener's and upstream client's TLS files ([`reload`]); and the plain-HTTP
//! listener that redirects to the TLS one ([`redirect`]).
//!
//! Thread per core: the public listener is served by `server.workers`
//! threads, each running its own single-threaded tokio runtime with its own
//! `SO_REUSEPORT` listening socket (the kernel spreads connections across
//! them) and its own upstream connection pool. A request then never crosses
//! threads on its way through the proxy; on this machine tokio's
//! multi-threaded scheduler cost about a third of the proxy's CPU per
//! request. The gateway's own API (`/auth/*`) runs on the main runtime,
//! which also owns the database pool and the background tasks.
//!
//! HTTP/1.1 is served by the gateway's own code ([`crate::http1::server`]);
//! HTTP/2 (ALPN `h2`, or the HTTP/2 preface on a plain connection) by
//! hyper.
//!
//! Limits, and why they sit here rather than in a layer: the connection cap
//! refuses a socket before any byte is read; the header read timeout
//! (slowloris), the idle timeout (a connection with nothing in flight, in
//! either protocol) and the header size (431) are enforced while a head is
//! awaited or read, before the proxy runs; malformed
//! requests are answered 400 and the connection closes. Body limits are per
//! route, so they live in the proxy.

pub mod redirect;
pub mod reload;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use bytes::Bytes;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

pub use reload::Reloader;

use crate::body::Body;
use crate::config::ServerConfig;
use crate::http1;
use crate::http1::upgrade::{Io, Upgraded};
use crate::proxy::{Conn, Proxy, Slot};

/// Binds `addr` with `SO_REUSEPORT`, so that every worker can listen on the
/// same address with a socket of its own. Needs a tokio runtime context; the
/// returned listener is a plain (non-blocking) std one, for any runtime.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// What every worker shares.
pub struct Workers {
    pub proxy: Proxy,
    pub tls: Option<TlsAcceptor>,
    pub settings: ServerConfig,
    pub slots: Arc<Semaphore>,
}

/// Starts one worker thread per listener; each serves until `shutdown`.
/// Everything that can fail (runtime, socket adoption, upstream client) is
/// done before any thread starts, so an error leaves nothing running.
pub fn spawn_workers(
    listeners: Vec<std::net::TcpListener>,
    shared: &Arc<Workers>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut prepared = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(listener)?
        };
        // Each worker pools its own upstream connections, so a proxied
        // request and its upstream connection live on one thread.
        let proxy = Arc::new(Proxy { client: shared.proxy.client.with_own_pool(), ..shared.proxy.clone() });
        prepared.push((runtime, listener, proxy));
    }
    let mut handles = Vec::with_capacity(prepared.len());
    for (i, (runtime, listener, proxy)) in prepared.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        let shutdown = shutdown.clone();
        let handle = std::thread::Builder::new().name(format!("gateway-worker-{i}")).spawn(move || {
            runtime.block_on(serve_public(
                listener,
                shared.tls.clone(),
                proxy,
                &shared.settings,
                Arc::clone(&shared.slots),
                shutdown,
            ));
            // Tasks still running (tunnels past the grace) are dropped; a
            // blocking DNS lookup is not waited for past a second.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        });
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The threads already started see the stop the caller sends.
                return Err(anyhow::Error::new(e).context("spawning a worker thread"));
            }
        }
    }
    Ok(handles)
}

/// Serves one listening socket until `shutdown` turns true, then stops
/// accepting and waits up to `shutdown_grace` for open requests and
/// WebSocket tunnels.
pub async fn serve_public(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    settings: &ServerConfig,
    slots: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Some(settings.header_read_timeout))
        .keep_alive_timeout(settings.header_read_timeout)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let h2 = Arc::new(h2);
    let http1 = Arc::new(http1::server::Settings {
        header_read_timeout: settings.header_read_timeout,
        idle_timeout: settings.idle_timeout,
        send_timeout: settings.send_timeout,
        max_head_bytes: settings.max_header_bytes,
    });
    let graceful = GracefulShutdown::new();
    // Closes pooled upstream connections nobody used for a while; ends with
    // this worker's runtime.
    let client = proxy.client.clone();
    let mut sweep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(client.sweep_interval());
        loop {
            tokio::select! {
                _ = tick.tick() => client.sweep(),
                _ = sweep_stop.wait_for(|stop| *stop) => return,
            }
        }
    });
    let handshake_timeout = settings.header_read_timeout;
    let mut stop_signal = shutdown.clone();
    let stop = async move {
        let _ = stop_signal.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("gateway_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ConnContext {
            h2: Arc::clone(&h2),
            watcher: graceful.watcher(),
            proxy: Arc::clone(&proxy),
            http1: Arc::clone(&http1),
            shutdown: shutdown.clone(),
        };
        let tls = tls.clone();
        let drain = graceful.watcher();
        let task = async move {
            let slot = Some(Arc::new(Slot::new(permit, drain)));
            match tls {
                None => serve_connection(ctx, stream, Conn::new(peer, false, slot), false).await,
                // Boxed: a TLS handshake is a large future, and inline it
                // would make every connection's task as large.
                Some(acceptor) => {
                    match Box::pin(tokio::time::timeout(handshake_timeout, acceptor.accept(stream))).await {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let conn = Conn::new(peer, true, slot);
                            Box::pin(serve_connection(ctx, stream, conn, h2)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        };
        tokio::spawn(task);
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
}

/// What every connection of a worker needs.
struct ConnContext {
    h2: Arc<http2::Builder<TokioExecutor>>,
    /// Held for the connection's life: graceful shutdown waits for it.
    watcher: Watcher,
    proxy: Arc<Proxy>,
    /// Shared, not copied: every byte here is in every connection's task,
    /// whose allocation jemalloc rounds up to a 1 KiB size class (6 KiB
    /// now; 80 bytes more once made it 7 KiB, +1 KiB per idle connection).
    http1: Arc<http1::server::Settings>,
    shutdown: watch::Receiver<bool>,
}

/// Serves one connection: HTTP/1.1 unless TLS chose `h2` or the client
/// opens with the HTTP/2 preface.
async fn serve_connection<I: Io>(ctx: ConnContext, io: I, conn: Conn, h2: bool) {
    if h2 {
        // Boxed: inline, its state (hyper's connection among it) would
        // size every connection's task, HTTP/1.1 ones included.
        return Box::pin(serve_h2(ctx, Upgraded::new(Box::new(io), Bytes::new()), conn)).await;
    }
    let proxy = Arc::clone(&ctx.proxy);
    match http1::server::serve(io, conn.clone(), proxy, Arc::clone(&ctx.http1), ctx.shutdown.clone()).await {
        http1::server::Served::Done => {}
        http1::server::Served::Http2(io, read) => {
            // Boxed: rare, and large.
            Box::pin(serve_h2(ctx, Upgraded::new(Box::new(io), read), conn)).await;
        }
    }
}

/// Serves an HTTP/2 connection with hyper. One that has not started a
/// request within the header read timeout is closed, as HTTP/1.1 ones are;
/// one with no open stream for `server.idle_timeout` is sent a GOAWAY and
/// given the header read timeout to go (hyper has no idle timer of its
/// own, and its keep-alive pings, which any client answers, would keep an
/// idle connection and its slot forever); one that leaves an answer
/// unsent for `server.send_timeout` (its window shut) is dropped, as an
/// HTTP/1.1 client that stops reading is.
async fn serve_h2(ctx: ConnContext, io: Upgraded, conn: Conn) {
    let peer = conn.peer;
    let streams = Arc::new(Streams::new());
    let tracked = Arc::clone(&streams);
    let proxy = ctx.proxy;
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // Held by the answer's body until hyper is done with it (sent, or
        // the stream reset), or by this future if it is dropped first.
        let open = StreamGuard::new(&tracked);
        let proxy = Arc::clone(&proxy);
        let conn = conn.clone();
        async move {
            let response = Box::pin(proxy.serve(req.map(Body::new), None, &conn, None)).await;
            let stalled = open.answer_started();
            Ok::<_, Infallible>(response.map(|inner| Body::new(Tracked { inner, stalled, open })))
        }
    });
    // Held for the connection's life: graceful shutdown waits for it.
    let _watcher = ctx.watcher;
    // Inline: both callers box this whole future (see `serve_connection`).
    let mut connection = std::pin::pin!(ctx.h2.serve_connection(TokioIo::new(io), service));
    let (header_read, idle, send) = (ctx.http1.header_read_timeout, ctx.http1.idle_timeout, ctx.http1.send_timeout);
    // Fires at least every `idle`: a stream may start and end between two
    // checks, and its end starts the idle wait.
    let timer = tokio::time::sleep(header_read.min(idle));
    tokio::pin!(timer);
    let mut stop = ctx.shutdown.clone();
    // A GOAWAY went out (idle, or shutdown); shutdown's grace bounds the rest.
    let (mut goaway, mut stopping) = (false, false);
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                if !goaway {
                    connection.as_mut().graceful_shutdown();
                    goaway = true;
                }
            }
            () = &mut timer, if !stopping => {
                let now = Instant::now();
                if streams.stalled_since().is_some_and(|since| now.duration_since(since) >= send) {
                    tracing::debug!(%peer, "an HTTP/2 client took no byte of an answer for the send timeout");
                    return;
                }
                let next = match streams.idle_since() {
                    // A stream is open: only a stalled answer to judge
                    // until it ends.
                    None => now + (send / 4).max(std::time::Duration::from_millis(10)).min(idle),
                    Some(None) if !goaway => {
                        let limit = streams.epoch + header_read;
                        if now >= limit {
                            tracing::debug!(%peer, "no request within the header read timeout; closing");
                            return;
                        }
                        limit.min(now + idle)
                    }
                    Some(Some(since)) if !goaway => {
                        let limit = since + idle;
                        if now < limit {
                            limit
                        } else {
                            tracing::debug!(%peer, "idle for server.idle_timeout; sending GOAWAY");
                            connection.as_mut().graceful_shutdown();
                            goaway = true;
                            now + header_read
                        }
                    }
                    // The GOAWAY went out a header read timeout ago, nothing
                    // is open, and the client is still here.
                    Some(_) => {
                        tracing::debug!(%peer, "closing after a GOAWAY the client did not act on");
                        return;
                    }
                };
                timer.as_mut().reset(next.into());
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection closed with an error");
    }
}

/// The open streams of one HTTP/2 connection and when the last one ended:
/// what its idle timer judges.
struct Streams {
    open: AtomicUsize,
    /// Milliseconds after `epoch` at which the last stream ended; `u64::MAX`
    /// while none has started.
    last_end: AtomicU64,
    epoch: Instant,
    /// Per answer being sent: milliseconds after `epoch` since which hyper
    /// has held a frame it could not send (the client's flow-control window
    /// is shut), `u64::MAX` while it is not waiting on the client.
    answers: Mutex<Vec<Weak<AtomicU64>>>,
}

impl Streams {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            answers: Mutex::new(Vec::new()),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Since when the longest-waiting answer has waited for the client to
    /// take a byte, if one does.
    fn stalled_since(&self) -> Option<Instant> {
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.retain(|a| a.strong_count() > 0);
        let oldest = answers.iter().filter_map(Weak::upgrade).map(|a| a.load(Ordering::Relaxed)).min()?;
        (oldest != u64::MAX).then(|| self.epoch + std::time::Duration::from_millis(oldest))
    }

    /// `None` while a stream is open; else when the last one ended, or
    /// `Some(None)` if none has started.
    fn idle_since(&self) -> Option<Option<Instant>> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.last_end.load(Ordering::Acquire) {
            u64::MAX => Some(None),
            ms => Some(Some(self.epoch + std::time::Duration::from_millis(ms))),
        }
    }
}

/// One open stream: counted from the request until its answer is done with.
struct StreamGuard(Arc<Streams>);

impl StreamGuard {
    fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(streams))
    }

    /// Registers the stream's answer with the connection's send-stall watch.
    fn answer_started(&self) -> Arc<AtomicU64> {
        let stalled = Arc::new(AtomicU64::new(u64::MAX));
        self.0.answers.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::downgrade(&stalled));
        stalled
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = self.0.ms(Instant::now());
        // `fetch_max`: the latest end wins whatever order guards drop in
        // (`u64::MAX`, none yet, is replaced by the first).
        let _ = self
            .0
            .last_end
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| (last == u64::MAX || last < ms).then_some(ms));
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/2 answer's body, holding its stream's [`StreamGuard`]. hyper
/// asks it for the next frame only once the last one fits the client's
/// flow-control window: a frame handed over and not followed by a request
/// for the next one is a frame the client will not take.
struct Tracked {
    inner: Body,
    /// See [`Streams::answers`].
    stalled: Arc<AtomicU64>,
    open: StreamGuard,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let since = match &polled {
            std::task::Poll::Ready(Some(Ok(_))) => self.open.0.ms(Instant::now()),
            _ => u64::MAX,
        };
        self.stalled.store(since, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
