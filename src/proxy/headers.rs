//! Header hygiene: what is removed from requests and responses, and what the
//! gateway adds.
//!
//! Order matters and is fixed by `Proxy::forward` in `proxy.rs`: first everything a
//! client could use to impersonate someone (reserved identity names, in any
//! spelling `_`/`.`/case), hop-by-hop headers and whatever `Connection`
//! nominates; only then the gateway's own headers. So `Connection: X-User-Id`
//! cannot remove an injected header, and no spelling of a reserved name
//! reaches the upstream.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderNames;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies drop.
const HOP_BY_HOP: [HeaderName; UPGRADE_BIT as usize] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
];

/// `Upgrade`'s bit in [`strip_hop_by_hop`]'s set, after [`HOP_BY_HOP`]'s.
const UPGRADE_BIT: u32 = 7;

/// Which of [`HOP_BY_HOP`] `name` is (its index), or [`UPGRADE_BIT`] for
/// `Upgrade`. Filtered on length first (2, 7, 10, 16, 17 or 19 bytes):
/// most names fail that test and are never compared.
fn hop_by_hop_index(name: &HeaderName) -> Option<u32> {
    if !matches!(name.as_str().len(), 2 | 7 | 10 | 16 | 17 | 19) {
        return None;
    }
    if name == header::UPGRADE {
        return Some(UPGRADE_BIT);
    }
    HOP_BY_HOP.iter().position(|h| h == name).and_then(|i| u32::try_from(i).ok())
}

/// True when the request asks for a WebSocket upgrade.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"))));
    upgrade && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().flat_map(tokens)
}

/// The comma-separated tokens of one `Connection` value (none if it is not
/// visible ASCII).
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value.to_str().unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers and those nominated by `Connection`.
/// With `keep_upgrade`, `Upgrade` survives and `Connection: upgrade` is restored.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds what is there (usually nothing, or just
    // `Connection`), as a set of bits; only those are removed, each removal
    // a hash lookup. No allocation unless `Connection` comes more than once.
    let mut present = 0_u32;
    // `keys()` yields each name once, however many values it has.
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & 1 != 0 {
        // `Connection` is `HOP_BY_HOP[0]`. Its values are cloned (shared
        // bytes) so that the map can change while they are read.
        let (first, more) = {
            let mut values = headers.get_all(header::CONNECTION).iter();
            (values.next().cloned(), values.next().is_some())
        };
        if more {
            let all: Vec<HeaderValue> = headers.get_all(header::CONNECTION).iter().cloned().collect();
            for value in &all {
                remove_nominated(headers, value);
            }
        } else if let Some(value) = first {
            remove_nominated(headers, &value);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & (1 << UPGRADE_BIT) != 0 {
        headers.remove(header::UPGRADE);
    }
    if keep_upgrade {
        // Exactly one protocol may be asked for: no `h2c` or others riding along.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// Removes the fields one `Connection` value nominates (a kept `Upgrade`
/// is put back by [`strip_hop_by_hop`] anyway). A name given as `&str` is
/// lower-cased on the stack for the lookup (one over 64 bytes is compared
/// case-insensitively in place); one that is not a valid name matches
/// nothing.
fn remove_nominated(headers: &mut HeaderMap, connection: &HeaderValue) {
    for token in tokens(connection) {
        headers.remove(token);
    }
}

/// True when a 101 answer really switched to WebSocket (and nothing else).
pub fn is_websocket_accept(headers: &HeaderMap) -> bool {
    let mut upgrade = headers.get_all(header::UPGRADE).iter();
    let websocket =
        matches!((upgrade.next(), upgrade.next()), (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    websocket && headers.contains_key(header::SEC_WEBSOCKET_ACCEPT)
}

/// HTTP/2 clients send each cookie as its own field; HTTP/1.1 upstreams
/// expect one `Cookie` line (RFC 9113 §8.2.3), so they are joined with "; ".
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if let (Some(_), Some(_)) = (values.next(), values.next()) {
        let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Sets `fields` (`headers.response_headers`, a route's `response_headers`)
/// on an answer, each replacing whatever was there under its name.
pub fn set_answer_fields(headers: &mut HeaderMap, fields: &[(HeaderName, HeaderValue)]) {
    for (name, value) in fields {
        headers.insert(name.clone(), value.clone());
    }
}

/// Whether the client's `TE` fields name `trailers` (RFC 9110 §10.1.4:
/// a list of codings with parameters, and `trailers`).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|item| {
            let coding = item.split(|&b| b == b';').next().unwrap_or_default();
            coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
    })
}

/// Removes every header whose folded name is reserved (identity headers).
pub fn strip_reserved(headers: &mut HeaderMap, names: &HeaderNames) {
    // Compared byte by byte, folding on the fly: no allocation per header.
    let doomed: Vec<HeaderName> =
        headers.keys().filter(|k| names.reserved.iter().any(|r| same_folded(k.as_str(), r))).cloned().collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// Sets a route's `request_headers`, first removing every spelling of
/// their names the client sent (`X_Api_Key` too, which a CGI-style backend
/// would read as the same field).
pub fn set_route_fields(headers: &mut HeaderMap, set: &[(HeaderName, HeaderValue)]) {
    if set.is_empty() {
        return;
    }
    let doomed: Vec<HeaderName> =
        headers.keys().filter(|k| set.iter().any(|(n, _)| same_folded(k.as_str(), n.as_str()))).cloned().collect();
    for name in doomed {
        headers.remove(&name);
    }
    for (name, value) in set {
        headers.append(name.clone(), value.clone());
    }
}

/// `fold_header_name(a) == fold_header_name(b)`, without allocating (and,
/// as folding twice changes nothing, `fold_header_name(a) == b` for a `b`
/// already folded).
fn same_folded(a: &str, b: &str) -> bool {
    let fold = |c: u8| match c {
        b'_' | b'.' => b'-',
        c => c.to_ascii_lowercase(),
    };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// The pre-rendered identity header values of one verified token.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub user_id: HeaderValue,
    pub tenant_id: HeaderValue,
    pub roles: HeaderValue,
    pub scopes: HeaderValue,
    pub session_id: HeaderValue,
}

/// The identity header fields, as the upstream client writes them after
/// the request's own headers. They are not put in the request's header map:
/// every spelling of these names has been stripped from it, so nothing can
/// duplicate or remove them, and five map insertions cost more than the
/// rest of the token check on a cache hit.
pub fn identity_fields<'a>(names: &'a HeaderNames, id: &'a IdentityHeaders) -> [(&'a HeaderName, &'a HeaderValue); 5] {
    [
        (&names.user_id, &id.user_id),
        (&names.tenant_id, &id.tenant_id),
        (&names.roles, &id.roles),
        (&names.scopes, &id.scopes),
        (&names.session_id, &id.session_id),
    ]
}

/// A client's request id is kept only when it is a short token of safe
/// characters; anything else is replaced by a fresh UUID (version 4, from
/// a fast per-thread generator: request ids must be unique, not secret).
pub fn request_id(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    let mut values = headers.get_all(name).iter();
    if let (Some(v), None) = (values.next(), values.next()) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c)) {
            return v.clone();
        }
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("invalid"))
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Set on routes that strip their prefix (a reserved name: no client's
/// value passes).
pub const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// The `X-Forwarded-*` fields the gateway states for a peer it does not
/// trust, written by the upstream client after the request's own headers
/// (which hold none any more): cheaper than three map insertions.
#[derive(Debug)]
pub struct Forwarded {
    pub for_peer: HeaderValue,
    pub https: bool,
    pub host: Option<HeaderValue>,
}

impl Forwarded {
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let proto = if self.https { &HTTPS } else { &HTTP };
        [(&X_FORWARDED_FOR, &self.for_peer), (&X_FORWARDED_PROTO, proto)]
            .into_iter()
            .chain(self.host.as_ref().map(|h| (&X_FORWARDED_HOST, h)))
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`. From a trusted proxy the client's
/// chain is extended in `headers`; from anyone else every client-sent value
/// is removed and the gateway's own are returned, to be written after the
/// request's headers. `peer` is the peer's address as a header value.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    trusted: bool,
    https: bool,
    host: Option<&HeaderValue>,
) -> Option<Forwarded> {
    // Every other spelling goes either way (`X_Forwarded_For` is
    // `HTTP_X_FORWARDED_FOR` to CGI-style servers too, and a trusted proxy
    // in front may pass it on untouched); from an untrusted peer the
    // canonical names go as well. One pass over the names (usually none of
    // these is there), then a removal only for what is.
    let sent: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            matches!(k.len(), 15..=17)
                && [X_FORWARDED_FOR.as_str(), X_FORWARDED_PROTO.as_str(), X_FORWARDED_HOST.as_str()]
                    .iter()
                    .any(|f| same_folded(k, f) && (!trusted || k != *f))
        })
        .cloned()
        .collect();
    for name in &sent {
        headers.remove(name);
    }
    if !trusted {
        return Some(Forwarded { for_peer: peer.clone(), https, host: host.cloned() });
    }
    let previous: Vec<&[u8]> = headers.get_all(&X_FORWARDED_FOR).iter().map(HeaderValue::as_bytes).collect();
    let xff = if previous.is_empty() {
        peer.clone()
    } else {
        let mut chain = previous.join(&b", "[..]);
        chain.extend_from_slice(b", ");
        chain.extend_from_slice(peer.as_bytes());
        HeaderValue::from_bytes(&chain).unwrap_or_else(|_| peer.clone())
    };
    let keep_proto_host = headers.contains_key(&X_FORWARDED_PROTO);
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    if !keep_proto_host {
        headers.insert(X_FORWARDED_PROTO.clone(), if https { HTTPS.clone() } else { HTTP.clone() });
        match host {
            Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    None
}

/// Reduces a CORS preflight forwarded without a token to the fields a
/// backend needs to answer it: `Origin`, the `Access-Control-Request-*` and
/// `Sec-Fetch-*` fields, and those that describe the hop (`Host`, the
/// canonical `X-Forwarded-*`, which [`set_forwarded`] then judges as for
/// any request) and the client (`User-Agent`). Everything else goes:
/// credentials first (`Authorization`, `Cookie`: browsers send none on a
/// preflight, so one here was not sent by a browser's preflight), and also
/// what a browser does send but a preflight's answer should not depend on
/// (`Accept`, `Accept-Language`, `Referer`).
pub fn keep_preflight_fields(headers: &mut HeaderMap) {
    let kept = std::mem::take(headers);
    let mut name = None;
    for (key, value) in kept {
        // `None` repeats the previous name (the map's iteration order).
        if key.is_some() {
            name = key;
        }
        let Some(n) = &name else { continue };
        let keep = *n == header::ORIGIN
            || *n == header::HOST
            || *n == header::USER_AGENT
            || *n == X_FORWARDED_FOR
            || *n == X_FORWARDED_PROTO
            || *n == X_FORWARDED_HOST
            || n.as_str().starts_with("access-control-request-")
            || n.as_str().starts_with("sec-fetch-");
        if keep {
            headers.append(n.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests;
