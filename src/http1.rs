//! Our own HTTP/1.1: message heads and body framing, shared by the public
//! listener's connections ([`server`]) and the upstream client
//! ([`crate::proxy::upstream`]).
//!
//! Why not hyper's HTTP/1 on the proxy's hot path: hyper keeps a 16 KiB read
//! buffer and an 8 KiB write buffer for every connection's whole life (idle
//! keep-alive connections included), runs every upstream connection as a task
//! of its own behind a channel, and could not refuse a request carrying both
//! `Content-Length` and `Transfer-Encoding` (it dropped one before we saw the
//! request). Here an idle connection holds no buffer at all, a request and
//! its upstream exchange run in one task, and the framing rules are ours:
//!
//! - requests: `Transfer-Encoding` must be exactly `chunked` (anything else
//!   is 501), never together with `Content-Length` (400), never on HTTP/1.0
//!   (400); several `Content-Length` values must agree (400); no framing
//!   header means no body;
//! - responses (RFC 9112 §6.3): no body after `HEAD`, `1xx`, `204` and
//!   `304`; `chunked` when it is the last coding; else `Content-Length`;
//!   else the body runs to the close of the connection.
//!
//! Head parsing is httparse (strict: no obsolete line folding, no spaces
//! before a colon); header values are slices of the bytes read, not copies.
//! HTTP/2 stays with hyper (see [`crate::server`]).

pub mod server;
pub mod upgrade;

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, ReadBuf};

/// The buffer a head is written into starts this large: under glibc's
/// 1 KiB mark, above which each allocation is slower and first merges the
/// allocator's free lists (a pause on the request that pays for it).
pub const HEAD_CAPACITY: usize = 960;

/// Most header fields a head may carry; more is a 431 (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only).
    Close,
}

/// A body that broke its framing, or a peer gone mid-body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    #[error("the connection closed before the body ended")]
    Incomplete,
    #[error("reading the body: {0}")]
    Io(#[from] io::Error),
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    /// Needs more bytes from the peer.
    NeedMore,
    /// The body has ended.
    Done,
}

/// An incremental body decoder over a read buffer: it consumes framing and
/// data from the front of the buffer and leaves what follows the body (a
/// pipelined request) in place.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    Length(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    Close,
    Done,
}

/// A chunk-size line (with extensions) or a trailer section longer than
/// this is refused, so a peer cannot make us buffer without bound.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Self { state }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the rest of the body is already in `buf` (without consuming
    /// it): then it can be skipped and the connection kept.
    pub fn rest_is_in(&self, buf: &[u8]) -> bool {
        match self.state {
            State::Done => true,
            State::Length(n) => buf.len() as u64 >= n,
            State::Close => false,
            _ => {
                let mut decoder = self.clone();
                let mut copy = BytesMut::from(buf);
                loop {
                    match decoder.decode(&mut copy) {
                        Ok(Decoded::Done) => return true,
                        Ok(Decoded::Data(_)) => {}
                        Ok(Decoded::NeedMore) | Err(_) => return false,
                    }
                }
            }
        }
    }

    /// Bytes of body still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Decodes the next piece of body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Length(left) => {
                    let Some((data, left)) = take(buf, left) else { return Ok(Decoded::NeedMore) };
                    self.state = if left == 0 { State::Done } else { State::Length(left) };
                    return Ok(Decoded::Data(data));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => match parse_chunk_line(buf)? {
                    Some((used, size)) => {
                        buf.advance(used);
                        self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                    }
                    None if buf.len() <= MAX_CHUNK_LINE => return Ok(Decoded::NeedMore),
                    None => return Err(BodyError::Chunked("chunk-size line too long")),
                },
                State::ChunkData(left) => {
                    let Some((data, left)) = take(buf, left) else { return Ok(Decoded::NeedMore) };
                    self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                    return Ok(Decoded::Data(data));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    // Trailers are read and dropped: the gateway forwards
                    // neither the client's nor the upstream's.
                    match trailers_end(buf)? {
                        Some(end) => {
                            buf.advance(end);
                            self.state = State::Done;
                        }
                        None if buf.len() <= MAX_TRAILERS => return Ok(Decoded::NeedMore),
                        None => return Err(BodyError::Chunked("trailers too large")),
                    }
                }
            }
        }
    }

    /// The peer closed the connection: the end of a close-delimited body,
    /// an error for any other unfinished one.
    pub fn eof(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Incomplete),
        }
    }
}

/// Up to `left` bytes from the front of `buf` (None when it is empty), and
/// how many are still to come after them.
fn take(buf: &mut BytesMut, left: u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    Some((buf.split_to(n).freeze(), left - n as u64))
}

/// Parses a chunk-size line: at least one and at most 16 hex digits,
/// optional spaces, an optional extension (`;` then printable bytes, no
/// bare LF), then CRLF. Stricter than httparse's, which read an empty size
/// as 0 (the last chunk) and let a bare LF end an extension: a hop in front
/// of the gateway that reads such a line otherwise would see a different
/// request end. `Ok(None)`: the line is not complete yet.
fn parse_chunk_line(buf: &[u8]) -> Result<Option<(usize, u64)>, BodyError> {
    let bad = |what| Err(BodyError::Chunked(what));
    let mut size: u64 = 0;
    let mut i = 0;
    while let Some(digit) = buf.get(i).and_then(|&b| char::from(b).to_digit(16)) {
        if i == 16 {
            return bad("chunk size too large");
        }
        size = size << 4 | u64::from(digit);
        i += 1;
    }
    if i == buf.len() {
        return Ok(None);
    }
    if i == 0 {
        return bad("missing chunk size");
    }
    while matches!(buf.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    if buf.get(i) == Some(&b';') {
        while let Some(&b) = buf.get(i) {
            if b == b'\r' {
                break;
            }
            if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                return bad("invalid chunk extension");
            }
            i += 1;
        }
    }
    match (buf.get(i), buf.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((i + 2, size))),
        _ => bad("invalid chunk size"),
    }
}

/// The length of the trailer section at the front of `buf` (its lines and
/// the empty line that ends it), once complete. Every line must end in
/// CRLF and be a header field.
fn trailers_end(buf: &[u8]) -> Result<Option<usize>, BodyError> {
    let mut line = 0;
    let end = loop {
        let Some(lf) = buf[line..].iter().position(|&b| b == b'\n').map(|p| line + p) else { return Ok(None) };
        if lf == line || buf[lf - 1] != b'\r' {
            return Err(BodyError::Chunked("bare LF in trailers"));
        }
        if lf == line + 1 {
            break lf + 1;
        }
        line = lf + 1;
    };
    let mut fields = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(&buf[..end], &mut fields) {
        Ok(httparse::Status::Complete((used, _))) if used == end => Ok(Some(end)),
        _ => Err(BodyError::Chunked("bad trailer")),
    }
}

/// Builds a header map from the parsed `fields` of `head` (with room for
/// `spare` more), reading the framing and connection headers on the way:
/// the values are slices of `head`, not copies. `fields` must have been
/// parsed from `head`.
///
/// With `authorization_apart` (requests), a request's only `Authorization`
/// field is not put in the map but returned in
/// [`Semantics::authorization`]. Making a `HeaderValue` checks every byte
/// again (about 2.6 instructions a byte in the release build, by callgrind:
/// the check is not vectorised there) after httparse has (httparse accepts
/// exactly the bytes `HeaderValue` does: HTAB, 0x20–0x7E, 0x80–0xFF); for a
/// token of several hundred bytes that was a quarter of what a valid token
/// costs the proxy over a public request, for a value that is then read once
/// and dropped. [`crate::proxy::Proxy::serve`] puts it back wherever it is
/// forwarded. Two or more all stay in the map, in the order sent.
pub fn header_map(
    head: &Bytes,
    fields: &[httparse::Header<'_>],
    spare: usize,
    authorization_apart: bool,
) -> Result<(HeaderMap, Semantics), &'static str> {
    let mut map = HeaderMap::with_capacity(fields.len() + spare);
    let mut s = Semantics::default();
    let mut more_authorization = false;
    for f in fields {
        s.observe(f.name.as_bytes(), f.value)?;
        if authorization_apart
            && f.name.len() == 13
            && f.name.eq_ignore_ascii_case("authorization")
            && keep_apart(&mut s, &mut more_authorization, &mut map, head.slice_ref(f.value))?
        {
            continue;
        }
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(f.value)).map_err(|_| "invalid header value")?;
        map.append(name, value);
    }
    s.chunked_only = s.codings == 1 && s.chunked_last;
    Ok((map, s))
}

/// An `Authorization` field of a request: kept apart (true) if it is the
/// first, else it goes in the map (false), after the first one if that was
/// kept apart. Out of line: in [`header_map`]'s loop this made the loop too
/// large for the optimiser to inline `HeaderMap::append` into it.
#[inline(never)]
fn keep_apart(s: &mut Semantics, more: &mut bool, map: &mut HeaderMap, value: Bytes) -> Result<bool, &'static str> {
    if s.authorization.is_none() && !*more {
        s.authorization = Some(value);
        return Ok(true);
    }
    *more = true;
    if let Some(first) = s.authorization.take() {
        // A second one: both go in the map, in the order sent.
        put_authorization(map, &first)?;
    }
    Ok(false)
}

/// Adds a kept-apart `Authorization` value to `map` (which, where it is
/// called, has none yet). Copied, and through `entry` rather than `append`,
/// so that this rare path adds no call site to the functions the optimiser
/// inlines into [`header_map`]'s loop, which every field of every head goes
/// through. The value is only put back on its way to a 400, a public route,
/// `pass_token` or the API.
#[cold]
pub fn put_authorization(map: &mut HeaderMap, value: &[u8]) -> Result<(), &'static str> {
    let value = HeaderValue::from_bytes(value).map_err(|_| "invalid header value")?;
    match map.entry(hyper::header::AUTHORIZATION) {
        hyper::header::Entry::Vacant(slot) => {
            slot.insert(value);
        }
        hyper::header::Entry::Occupied(mut slot) => slot.append(value),
    }
    Ok(())
}

/// What a message's headers say about its framing and its connection.
#[derive(Debug, Default)]
pub struct Semantics {
    pub content_length: Option<u64>,
    /// `Transfer-Encoding` was present.
    pub has_transfer_encoding: bool,
    /// Its codings are exactly `chunked`.
    pub chunked_only: bool,
    /// Its last coding is `chunked`.
    pub chunked_last: bool,
    codings: usize,
    pub close: bool,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub upgrade: bool,
    /// A request's only `Authorization` value, when [`header_map`] was
    /// asked to keep it out of the map.
    pub authorization: Option<Bytes>,
}

impl Semantics {
    /// Takes in one header field (names compared without case).
    fn observe(&mut self, name: &[u8], value: &[u8]) -> Result<(), &'static str> {
        // By length first: most fields are none of these.
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                for part in value.split(|&b| b == b',') {
                    let n = parse_length(trim(part)).ok_or("invalid Content-Length")?;
                    if self.content_length.is_some_and(|m| m != n) {
                        return Err("conflicting Content-Length values");
                    }
                    self.content_length = Some(n);
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.has_transfer_encoding = true;
                for part in value.split(|&b| b == b',').map(trim).filter(|p| !p.is_empty()) {
                    self.codings += 1;
                    self.chunked_last = part.eq_ignore_ascii_case(b"chunked");
                }
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for part in value.split(|&b| b == b',').map(trim) {
                    if part.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if part.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    }
                }
            }
            6 if name.eq_ignore_ascii_case(b"expect") => {
                self.expect_continue = trim(value).eq_ignore_ascii_case(b"100-continue");
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => self.upgrade = true,
            _ => {}
        }
        Ok(())
    }
}

/// Reads the framing and connection headers of a built map (the hot path
/// reads them in [`header_map`] instead). Content-Length values that
/// disagree (or are not numbers) are an error.
#[cfg(test)]
fn semantics(headers: &HeaderMap) -> Result<Semantics, &'static str> {
    let mut s = Semantics::default();
    for (name, value) in headers {
        s.observe(name.as_str().as_bytes(), value.as_bytes())?;
    }
    s.chunked_only = s.codings == 1 && s.chunked_last;
    Ok(s)
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if !first.is_ascii_whitespace() {
            break;
        }
        b = rest;
    }
    while let [rest @ .., last] = b {
        if !last.is_ascii_whitespace() {
            break;
        }
        b = rest;
    }
    b
}

/// Digits only (no sign, no spaces), at most 19 of them.
fn parse_length(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0_u64, |n, d| n * 10 + u64::from(d - b'0')))
}

thread_local! {
    /// Reads of message heads land here first, and only the bytes read are
    /// copied out: a connection waiting for its next message holds no
    /// buffer of its own.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; 16 * 1024].into_boxed_slice());
}

/// Reads what `io` has into `buf` (through the per-thread scratch buffer);
/// `Ok(0)` at the end of the stream.
pub fn poll_read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut read = ReadBuf::new(scratch);
        ready!(Pin::new(io).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
}

/// Appends `name: value\r\n` for every header of `headers`.
pub fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends the framing of a chunk of `len` bytes (its size line).
pub fn write_chunk_size(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0_u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends a decimal number.
pub fn write_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests;
