//! Path normalisation: the one path both the policy and the upstream see.
//!
//! The route is chosen, and the policy judged, on the normalised path, and
//! exactly that path is what the upstream receives. Anything that could make
//! an upstream see a different path than the one judged is refused:
//!
//! - percent-encoded unreserved characters (`%41`, `%2e`) are decoded;
//! - `.` and `..` segments are resolved (RFC 3986 §5.2.4), and a `..` that
//!   would climb above the root is an error;
//! - runs of `/` collapse to one, since many servers treat `//a` as `/a`;
//! - an encoded `/` or `\` (`%2f`, `%5c`), a raw `\`, and any encoded NUL or
//!   control character are errors: upstreams disagree on what they mean;
//! - malformed percent-escapes are errors;
//! - a `;` (raw or encoded) is an error: servlet containers read `;params`
//!   and `..;` as path syntax, so `/admin;x` or `/api/..;/admin` would reach
//!   a different resource than the route that judged it.
//!
//! Matching is case-sensitive: an upstream that treats paths
//! case-insensitively must be routed by a case-insensitive-safe prefix.
//!
//! Other escapes (`%20`, `%25`) are kept, with upper-case hex.

use std::borrow::Cow;

/// Why a path was refused (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path contains an encoded '/' or '\\', a ';', NUL or a control character")]
    ForbiddenEscape,
    #[error("the path climbs above the root")]
    EscapesRoot,
}

/// Normalises the path part of a request target (no query). Borrowed when
/// the path is already normal (the usual case: no copy per request).
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: nothing to decode, resolve or refuse.
    if !raw.bytes().any(|b| matches!(b, b'%' | b'\\' | b';') || b < 0x20 || b == 0x7f)
        && !raw.contains("//")
        && !raw.contains("/.")
    {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(raw)?;
    let mut out: Vec<&str> = Vec::new();
    let mut segments = decoded.split('/').skip(1).peekable();
    // Whether the path ends with a '/' (kept, it matters to upstreams).
    let mut trailing_slash = false;
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "" => trailing_slash = last,
            "." => trailing_slash = last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
                trailing_slash = last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16));
                let lo = bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                let byte = (hi * 16 + lo) as u8;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(byte as char);
                } else if byte == b'/' || byte == b'\\' || byte == b';' || byte < 0x20 || byte == 0x7f {
                    return Err(PathError::ForbiddenEscape);
                } else {
                    out.push('%');
                    out.push(char::from_digit(hi, 16).unwrap_or('0').to_ascii_uppercase());
                    out.push(char::from_digit(lo, 16).unwrap_or('0').to_ascii_uppercase());
                }
                i += 3;
            }
            b'\\' | b';' => return Err(PathError::ForbiddenEscape),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ForbiddenEscape),
            _ => {
                // Copy the run up to the next '%' or '\' in one go (UTF-8 safe:
                // those are ASCII and never inside a multi-byte sequence).
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(*b, b'%' | b'\\' | b';') || *b < 0x20 || *b == 0x7f)
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&raw[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_dots_and_slashes() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/public/../api/orders", "/api/orders"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("//api//orders", "/api/orders"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E/b", "/a/b"),
            ("/%61pi", "/api"),
            ("/a%20b", "/a%20b"),
            ("/a%2a", "/a%2A"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/..a/b", "/..a/b"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses_tricks() {
        let cases = [
            ("/..", PathError::EscapesRoot),
            ("/a/../..", PathError::EscapesRoot),
            ("/%2e%2e/etc", PathError::EscapesRoot),
            ("/a/..%2fb", PathError::ForbiddenEscape),
            ("/a%2fb", PathError::ForbiddenEscape),
            ("/a%2Fb", PathError::ForbiddenEscape),
            ("/a%5cb", PathError::ForbiddenEscape),
            ("/a\\b", PathError::ForbiddenEscape),
            ("/a%00", PathError::ForbiddenEscape),
            ("/a%0d%0a", PathError::ForbiddenEscape),
            ("/a%7f", PathError::ForbiddenEscape),
            ("/admin;x/users", PathError::ForbiddenEscape),
            ("/api/..;/admin", PathError::ForbiddenEscape),
            ("/a%3bb", PathError::ForbiddenEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("a/b", PathError::NotAbsolute),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    /// Random paths built from the pieces that matter (dots, slashes,
    /// escapes): whatever is accepted is absolute, has no empty or dot
    /// segment and is its own normal form, so what the policy judged is
    /// what the upstream gets; nothing panics.
    #[test]
    fn random_paths_normalise_to_fixed_points() {
        const PIECES: [&str; 18] = [
            "/", "/", ".", "..", "%2e", "%2E", "%2f", "%5c", "%", "a", "%41", "%7e", "~", ";", "%00", "\\", "%zz",
            "%25",
        ];
        let mut rand = crate::testrand::Rand::new(0x9E37_79B9_7F4A_7C15);
        let mut accepted = 0;
        for _ in 0..50_000 {
            let mut raw = String::from("/");
            for _ in 0..rand.below(12) {
                let piece: &&str = rand.pick(&PIECES);
                raw.push_str(piece);
            }
            let Ok(path) = normalize(&raw) else { continue };
            accepted += 1;
            assert!(path.starts_with('/') && !path.contains("//"), "{raw} -> {path}");
            assert!(path.split('/').all(|s| s != "." && s != ".."), "{raw} -> {path}");
            assert_eq!(normalize(&path).as_deref(), Ok(&*path), "not a fixed point: {raw} -> {path}");
        }
        assert!(accepted > 5_000, "too few paths accepted ({accepted}) for the check to mean much");
    }
}
