//! WebSocket tunnels: after a 101, the client's and the upstream's upgraded
//! connections are spliced both ways until either side closes — or until
//! no byte has moved either way for `server.tunnel_idle_timeout`.
//!
//! Why the idle limit: a tunnel holds a connection slot (it counts against
//! `server.max_connections`) and two sockets. Without a limit, a peer that
//! vanished without closing (a laptop lid shut, a NAT that forgot the flow)
//! would hold them forever. Applications that keep a socket open but quiet
//! should send WebSocket pings more often than the limit.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock, like the sleeps below (and paused with them in tests).
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Copies both ways until either side closes or errs, or until both have
/// been silent for `idle`. Dropping the connections closes them.
pub async fn splice<A, B>(client: A, upstream: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    // Milliseconds since `epoch` of the last byte read from either side.
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active { io: client, last: Arc::clone(&last), epoch };
    let mut upstream = Active { io: upstream, last: Arc::clone(&last), epoch };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let quiet = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        let Some(left) = idle.checked_sub(quiet).filter(|left| !left.is_zero()) else {
            tracing::debug!(idle = ?idle, "closing an idle WebSocket tunnel");
            return;
        };
        tokio::select! {
            result = &mut copy => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "WebSocket tunnel closed with an error");
                }
                return;
            }
            () = tokio::time::sleep(left) => {}
        }
    }
}

/// Records when bytes were last read through it.
struct Active<T> {
    io: T,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(now, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
