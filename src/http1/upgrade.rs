//! Connections handed over after a `101 Switching Protocols`: the client's
//! (from [`super::server`], through [`OnUpgrade`] in the request's
//! extensions) and the upstream's (from the upstream client), spliced
//! together by the proxy's tunnel.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// Any connection, boxed: the tunnel does not care which kind.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A connection after its HTTP exchange, with the bytes already read past
/// the exchange's end, which are read first.
pub struct Upgraded {
    io: Box<dyn Io>,
    pending: Bytes,
}

impl Upgraded {
    pub fn new(io: Box<dyn Io>, pending: Bytes) -> Self {
        Self { io, pending }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// In a request's extensions when its connection can be upgraded: taken
/// by whoever will use the connection after a 101.
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    pub(crate) fn pair() -> (Self, oneshot::Sender<Upgraded>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(Mutex::new(Some(rx)))), tx)
    }

    /// The connection, once the 101 has been written to it; an error if
    /// the connection closed instead, or was already taken.
    pub async fn connection(self) -> io::Result<Upgraded> {
        let rx = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match rx {
            Some(rx) => rx.await.map_err(|_| io::Error::other("the connection was not upgraded")),
            None => Err(io::Error::other("the upgraded connection was already taken")),
        }
    }
}
