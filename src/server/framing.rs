//! Request framing as the client sent it, watched on the raw bytes.
//!
//! A request that carries both `Content-Length` and `Transfer-Encoding` is
//! the classic request-smuggling vector: two hops that trust different headers
//! disagree on where the request ends. hyper's HTTP/1 server settles the
//! conflict on its own (Transfer-Encoding wins, `Content-Length` is dropped,
//! the connection closes after the response), so the request our service gets
//! looks clean and it cannot tell that the client was ambiguous. The spec
//! wants such requests answered `400`. So [`ScannedIo`] sits between the
//! transport (after TLS) and hyper and hands every byte the client sends, in
//! order, to a [`FramingScanner`], which records the index of the first head
//! on the connection that carries both headers; the service counts the
//! requests hyper hands it ([`Framing::next_request_is_ambiguous`]) and
//! answers that one 400. hyper closes the connection after such a request, so
//! only the first conflict matters and the scanner stops there.
//!
//! Invariants:
//!
//! - Bodies are framed exactly as hyper 1.12's server frames them
//!   (`Server::parse` in `proto/h1/role.rs`, the chunked decoder in
//!   `proto/h1/decode.rs`), with the same `httparse`, hyper's default parser
//!   settings and its default limit of 100 headers. That is what makes head
//!   `n` of the scanner request `n` of the service: hyper hands requests over
//!   one at a time, in order, and drains or closes an unread body, so it never
//!   skips one.
//! - When in doubt, stop and report nothing: a parse error, a head hyper
//!   refuses, a head over `max_head_bytes` split across reads, a malformed
//!   chunk, an upgrade or `CONNECT` (what follows may be a tunnel), the HTTP/2
//!   preface. Stopping can only miss a conflict; guessing could answer 400 to
//!   an innocent request, or take body bytes for a head.
//! - Where hyper gives up and the scanner does not (its caps on chunk
//!   extensions and trailers, trailers it cannot parse, a head it refuses
//!   after `httparse` accepted it), the scanner may go on, harmlessly: hyper
//!   closes the connection, so no later index ever reaches the service.
//! - Never panics: the input is whatever the network sends. Once stopped,
//!   a read costs nothing more.
//! - No allocation on the common path: a head that arrives whole in one read
//!   is parsed in place; only a head split across reads is copied, and never
//!   beyond `max_head_bytes` (past its own limit hyper answers 431).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// hyper's default (`h1_max_headers` unset); more is a 431 from hyper.
const MAX_HEADERS: usize = 100;

/// hyper refuses a larger `Content-Length` (`DecodedLength::MAX_LEN`).
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

/// Watches the bytes a client sends for the first request head that carries
/// both `Content-Length` and `Transfer-Encoding`. Sans-IO: see [`ScannedIo`].
#[derive(Debug)]
pub struct FramingScanner {
    state: State,
    /// The start of a head split across reads; empty otherwise.
    partial: Vec<u8>,
    max_head_bytes: usize,
    /// Heads parsed so far, i.e. the index of the next one.
    heads: u64,
    conflict: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Body { remaining: u64 },
    Chunked(Chunk),
    Done,
}

/// Where in a chunked body we are; one state per state of hyper's decoder,
/// so that both accept and refuse the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// The first hex digit of a chunk-size line.
    Start,
    Size {
        size: u64,
    },
    /// Blanks after the size: no more digits may follow.
    SizeLws {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk's line or a trailer line: the empty line that
    /// ends the body, or another trailer field.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// What a complete head means for the bytes after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    NoBody,
    Length(u64),
    Chunked,
    /// Both headers: the one we are looking for.
    Conflict,
    /// hyper refuses the head, or the connection may stop being HTTP/1.
    Stop,
}

enum Parsed {
    Complete { len: usize, after: After },
    Partial,
    Invalid,
}

impl FramingScanner {
    /// `max_head_bytes`: the limit hyper enforces on a head (its
    /// `max_buf_size`); a split head that reaches it is given up on.
    pub fn new(max_head_bytes: usize) -> Self {
        Self { state: State::Head, partial: Vec::new(), max_head_bytes, heads: 0, conflict: None }
    }

    /// The next bytes read from the client, in order, split anywhere.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // Each step consumes at least one byte or stops the scanner, so
            // the loop ends.
            let consumed = match self.state {
                State::Done => return,
                State::Head => self.head(bytes),
                State::Body { remaining } => {
                    let (consumed, remaining) = skip(remaining, bytes.len());
                    self.state = if remaining == 0 { State::Head } else { State::Body { remaining } };
                    consumed
                }
                State::Chunked(chunk) => self.chunked(chunk, bytes),
            };
            bytes = bytes.get(consumed..).unwrap_or_default();
        }
    }

    /// Index (0-based, on this connection) of the first head that carried
    /// both `Content-Length` and `Transfer-Encoding`.
    pub fn conflict(&self) -> Option<u64> {
        self.conflict
    }

    /// Whether the scanner has stopped: more bytes change nothing.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn stop(&mut self) {
        self.state = State::Done;
        self.partial = Vec::new();
    }

    fn head(&mut self, bytes: &[u8]) -> usize {
        if self.partial.is_empty() {
            return match parse_head(bytes) {
                // A complete head is never empty; the guard only keeps `feed`
                // from spinning if it ever were.
                Parsed::Complete { len, after } if len > 0 => {
                    self.on_head(after);
                    len
                }
                Parsed::Partial => {
                    // Like hyper: a partial head as large as the limit is
                    // refused, and hyper does not wait for more of it.
                    if bytes.len() >= self.max_head_bytes {
                        self.stop();
                    } else {
                        self.partial.extend_from_slice(bytes);
                    }
                    bytes.len()
                }
                Parsed::Complete { .. } | Parsed::Invalid => {
                    self.stop();
                    bytes.len()
                }
            };
        }

        let old = self.partial.len();
        // Copy no more than the limit allows: the rest of a large read may be
        // body, and a head that does not fit is given up on anyway.
        let room = self.max_head_bytes.saturating_sub(old);
        let taken = bytes.get(..room).unwrap_or(bytes);
        self.partial.extend_from_slice(taken);
        // Re-parsing after every short read would be quadratic; a head can
        // only have been completed by an end of line the new bytes bring.
        let parsed = if ends_a_line_pair(&self.partial, old.saturating_sub(3)) {
            parse_head(&self.partial)
        } else {
            Parsed::Partial
        };
        match parsed {
            Parsed::Complete { len, after } => match len.checked_sub(old) {
                // The old bytes alone were partial, so the head must end in
                // the new ones; anything else would mean we misread.
                Some(used) if used > 0 => {
                    self.partial.clear();
                    self.on_head(after);
                    used
                }
                _ => {
                    self.stop();
                    bytes.len()
                }
            },
            Parsed::Partial if self.partial.len() < self.max_head_bytes && !taken.is_empty() => taken.len(),
            Parsed::Partial | Parsed::Invalid => {
                self.stop();
                bytes.len()
            }
        }
    }

    fn on_head(&mut self, after: After) {
        let index = self.heads;
        self.heads = self.heads.saturating_add(1);
        self.state = match after {
            After::NoBody => State::Head,
            After::Length(remaining) => State::Body { remaining },
            After::Chunked => State::Chunked(Chunk::Start),
            After::Conflict => {
                self.conflict = Some(index);
                State::Done
            }
            After::Stop => State::Done,
        };
        if self.state == State::Done {
            self.stop();
        }
    }

    fn chunked(&mut self, chunk: Chunk, bytes: &[u8]) -> usize {
        if let Chunk::Data { remaining } = chunk {
            let (consumed, remaining) = skip(remaining, bytes.len());
            let next = if remaining == 0 { Chunk::DataCr } else { Chunk::Data { remaining } };
            self.state = State::Chunked(next);
            return consumed;
        }
        let Some(&byte) = bytes.first() else { return 0 };
        self.state = chunk_byte(chunk, byte);
        if self.state == State::Done {
            self.stop();
        }
        1
    }
}

/// Skips up to `remaining` body bytes out of `available`: how many were
/// skipped, and how many are left.
fn skip(remaining: u64, available: usize) -> (usize, u64) {
    let available_u64 = u64::try_from(available).unwrap_or(u64::MAX);
    if remaining >= available_u64 {
        (available, remaining - available_u64)
    } else {
        // Less than `available`, so it fits a usize.
        (usize::try_from(remaining).unwrap_or(available), 0)
    }
}

/// Whether `buf[from..]` holds the end of a head (`\n\n` or `\n\r\n`); the
/// same quick test hyper makes before re-parsing.
fn ends_a_line_pair(buf: &[u8], from: usize) -> bool {
    let tail = buf.get(from..).unwrap_or_default();
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Parses one request head at the start of `bytes` (after any empty lines,
/// which `httparse` skips, as for hyper) and decides, header by header and in
/// order, as hyper's `Server::parse` does, what follows it.
fn parse_head(bytes: &[u8]) -> Parsed {
    // Uninitialised, like hyper's: zeroing 100 headers would cost more than
    // parsing a typical head.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(bytes, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Including too many headers: hyper rejects the head itself.
        Err(_) => return Parsed::Invalid,
    };
    let http_11 = request.version == Some(1);
    let mut upgrade = request.method == Some("CONNECT");
    // `Some(chunked)` once a Transfer-Encoding header was seen: the last one
    // decides, as in hyper.
    let mut transfer_encoding = None;
    let mut has_content_length = false;
    let mut content_length = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http_11 {
                return Parsed::Complete { len, after: After::Stop };
            }
            transfer_encoding = Some(is_chunked(header.value));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            has_content_length = true;
            // hyper does not even parse a length after Transfer-Encoding.
            if transfer_encoding.is_some() {
                continue;
            }
            match (digits(header.value), content_length) {
                (Some(n), None) if n <= MAX_CONTENT_LENGTH => content_length = Some(n),
                (Some(n), Some(previous)) if n == previous => {}
                _ => return Parsed::Complete { len, after: After::Stop },
            }
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            // Also undoes CONNECT on HTTP/1.0, exactly as in hyper.
            upgrade = http_11;
        }
    }
    let after = match transfer_encoding {
        Some(false) => After::Stop,
        Some(true) if has_content_length => After::Conflict,
        _ if upgrade => After::Stop,
        Some(true) => After::Chunked,
        None => match content_length {
            None | Some(0) => After::NoBody,
            Some(n) => After::Length(n),
        },
    };
    Parsed::Complete { len, after }
}

/// hyper's `headers::is_chunked_`: the value must be visible ASCII (or it
/// is not a `str` to hyper), and its last coding `chunked`.
fn is_chunked(value: &[u8]) -> bool {
    let visible = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    visible
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// hyper's `headers::from_digits`: ASCII digits only (no sign, no blanks),
/// no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// One step of hyper's chunked decoder (`ChunkedState::step`), for every
/// state but chunk data: `Head` when the body is over, `Done` where hyper
/// fails.
fn chunk_byte(chunk: Chunk, byte: u8) -> State {
    let next = match (chunk, byte) {
        (Chunk::Start, _) => hex(byte).map(|size| Chunk::Size { size }),
        (Chunk::Size { size }, b'\t' | b' ') => Some(Chunk::SizeLws { size }),
        (Chunk::Size { size } | Chunk::SizeLws { size }, b';') => Some(Chunk::Extension { size }),
        (Chunk::Size { size } | Chunk::SizeLws { size } | Chunk::Extension { size }, b'\r') => {
            Some(Chunk::SizeLf { size })
        }
        // Overflow is an error in hyper; leading zeros are not.
        (Chunk::Size { size }, _) => {
            hex(byte).and_then(|digit| size.checked_mul(16)?.checked_add(digit)).map(|size| Chunk::Size { size })
        }
        (Chunk::SizeLws { size }, b'\t' | b' ') => Some(Chunk::SizeLws { size }),
        (Chunk::SizeLws { .. }, _) => None,
        // hyper refuses a bare LF in an extension: a peer that ends the line
        // there would frame the body differently.
        (Chunk::Extension { .. }, b'\n') => None,
        (Chunk::Extension { size }, _) => Some(Chunk::Extension { size }),
        (Chunk::SizeLf { size: 0 }, b'\n') => Some(Chunk::EndCr),
        (Chunk::SizeLf { size }, b'\n') => Some(Chunk::Data { remaining: size }),
        (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
        (Chunk::DataLf, b'\n') => Some(Chunk::Start),
        (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
        (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
        (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
        (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
        (Chunk::EndLf, b'\n') => return State::Head,
        (Chunk::SizeLf { .. } | Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf, _) => None,
        // Handled in bulk by the caller; never a single byte.
        (Chunk::Data { .. }, _) => None,
    };
    next.map_or(State::Done, State::Chunked)
}

fn hex(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

/// What the scanner found, shared between the connection's IO and its
/// service (`Send + Sync`).
#[derive(Debug)]
pub struct Framing {
    /// Index of the conflicting head; `u64::MAX` for none (no connection
    /// sees that many requests).
    conflict: AtomicU64,
    /// Requests the service has seen.
    requests: AtomicU64,
}

impl Framing {
    const NO_CONFLICT: u64 = u64::MAX;

    fn new() -> Self {
        Self { conflict: AtomicU64::new(Self::NO_CONFLICT), requests: AtomicU64::new(0) }
    }

    fn record(&self, index: u64) {
        self.conflict.store(index, Ordering::Relaxed);
    }

    /// Call exactly once per request, in the order hyper hands them over:
    /// takes the next request index and says whether that request's head
    /// carried both `Content-Length` and `Transfer-Encoding`.
    ///
    /// `Relaxed` is enough: hyper reads the connection and calls the service
    /// on the same task, and it can only call the service for a request once
    /// it has parsed its head, that is after the `poll_read` that showed those
    /// bytes to the scanner (and stored any conflict) has returned. A task
    /// runs one poll at a time and the runtime orders its polls even across
    /// threads, so that store happens before this load.
    pub fn next_request_is_ambiguous(&self) -> bool {
        let index = self.requests.fetch_add(1, Ordering::Relaxed);
        index == self.conflict.load(Ordering::Relaxed)
    }
}

/// A transport that shows the bytes it reads to a [`FramingScanner`] and
/// publishes its finding in a shared [`Framing`]. Wrap the plaintext stream
/// (inside TLS), below hyper and below any protocol sniffing, so that every
/// byte is seen exactly once.
#[derive(Debug)]
pub struct ScannedIo<I> {
    io: I,
    scanner: FramingScanner,
    framing: Arc<Framing>,
}

impl<I> ScannedIo<I> {
    /// Returns the wrapped transport and the [`Framing`] its service should
    /// consult; `max_head_bytes` as for [`FramingScanner::new`].
    pub fn new(io: I, max_head_bytes: usize) -> (Self, Arc<Framing>) {
        let framing = Arc::new(Framing::new());
        let scanned = Self { io, scanner: FramingScanner::new(max_head_bytes), framing: Arc::clone(&framing) };
        (scanned, framing)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ScannedIo<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.scanner.is_done() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.scanner.feed(buf.filled().get(before..).unwrap_or_default());
            // A conflict stops the scanner, so this stores at most once.
            if let Some(index) = this.scanner.conflict() {
                this.framing.record(index);
            }
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ScannedIo<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
