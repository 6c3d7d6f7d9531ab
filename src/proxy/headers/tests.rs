use super::*;
use crate::config::Config;

fn names() -> HeaderNames {
    Config::parse("[headers]\nreserved = [\"X-Internal\"]", std::path::Path::new("/tmp/g.toml"))
        .expect("config")
        .proxy
        .headers
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
    }
    h
}

#[test]
fn reserved_names_go_in_every_spelling() {
    let mut h = map(&[
        ("x-user-id", "a"),
        ("X_User_Id", "b"),
        ("x.user.id", "c"),
        ("x-tenant-id", "d"),
        ("x-tenant-id", "e"),
        ("x_internal", "f"),
        ("x-user-idx", "keep"),
        ("accept", "keep"),
    ]);
    strip_reserved(&mut h, &names());
    let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, ["accept", "x-user-idx"]);
}

#[test]
fn connection_nominated_headers_go_but_injected_ones_stay() {
    let n = names();
    let mut h =
        map(&[("connection", "X-User-Id, x-custom"), ("x-custom", "1"), ("keep-alive", "5"), ("te", "trailers")]);
    strip_hop_by_hop(&mut h, false);
    strip_reserved(&mut h, &n);
    let id = IdentityHeaders {
        user_id: HeaderValue::from_static("u"),
        tenant_id: HeaderValue::from_static("t"),
        roles: HeaderValue::from_static("admin"),
        scopes: HeaderValue::from_static("a b"),
        session_id: HeaderValue::from_static("s"),
    };
    inject_identity(&mut h, &n, &id);
    assert!(h.get("x-custom").is_none() && h.get("keep-alive").is_none() && h.get("te").is_none());
    assert_eq!(h.get("x-user-id").map(|v| v.as_bytes()), Some(&b"u"[..]));
}

#[test]
fn websocket_upgrade_detection_and_keeping() {
    let mut h = map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
    assert!(is_websocket_upgrade(&h));
    strip_hop_by_hop(&mut h, true);
    assert_eq!(h.get("upgrade").map(|v| v.as_bytes()), Some(&b"websocket"[..]));
    assert_eq!(h.get("connection").map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
    let mut plain = map(&[("upgrade", "websocket")]);
    assert!(!is_websocket_upgrade(&plain));
    strip_hop_by_hop(&mut plain, false);
    assert!(plain.get("upgrade").is_none());
}

#[test]
fn request_ids_are_kept_only_when_safe() {
    let name = HeaderName::from_static("x-request-id");
    assert_eq!(request_id(&map(&[("x-request-id", "abc-123")]), &name), "abc-123");
    let fresh = request_id(&map(&[("x-request-id", "has space")]), &name);
    assert_eq!(fresh.len(), 36);
    let two = request_id(&map(&[("x-request-id", "a"), ("x-request-id", "b")]), &name);
    assert_eq!(two.len(), 36);
}

#[test]
fn forwarded_headers_replace_unless_trusted() {
    let peer: IpAddr = [10, 0, 0, 9].into();
    let host = HeaderValue::from_static("api.example.com");
    let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-host", "evil")]);
    set_forwarded(&mut h, peer, false, true, Some(&host));
    assert_eq!(h.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"10.0.0.9"[..]));
    assert_eq!(h.get("x-forwarded-proto").map(|v| v.as_bytes()), Some(&b"https"[..]));
    assert_eq!(h.get("x-forwarded-host").map(|v| v.as_bytes()), Some(&b"api.example.com"[..]));
    let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
    set_forwarded(&mut h, peer, true, false, None);
    assert_eq!(h.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"1.2.3.4, 10.0.0.9"[..]));
}
