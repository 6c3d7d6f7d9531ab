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
    // The identity fields are written after the map by the upstream client,
    // so nothing the client nominated can touch them.
    let fields = identity_fields(&n, &id);
    assert!(h.get("x-custom").is_none() && h.get("keep-alive").is_none() && h.get("te").is_none());
    assert!(h.get("x-user-id").is_none(), "a client's X-User-Id survived the strip");
    let user = fields.iter().find(|(name, _)| name.as_str() == "x-user-id").map(|(_, v)| v.as_bytes());
    assert_eq!(user, Some(&b"u"[..]));
    assert_eq!(fields.len(), 5);
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
    let peer = HeaderValue::from_static("10.0.0.9");
    let host = HeaderValue::from_static("api.example.com");
    let mut h = map(&[
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-host", "evil"),
        ("x-forwarded-proto", "ftp"),
        ("x_forwarded_for", "5.6.7.8"),
        ("x.forwarded.host", "evil"),
    ]);
    let ours = set_forwarded(&mut h, &peer, false, true, Some(&host)).expect("an untrusted peer gets ours");
    assert!(h.is_empty(), "client-sent X-Forwarded-* survived: {h:?}");
    let fields: Vec<(&str, &[u8])> = ours.fields().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
    assert_eq!(
        fields,
        [
            ("x-forwarded-for", &b"10.0.0.9"[..]),
            ("x-forwarded-proto", b"https"),
            ("x-forwarded-host", b"api.example.com")
        ]
    );
    // From a trusted proxy the canonical chain is extended, and every
    // other spelling still goes (a proxy in front may pass those on).
    let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("x_forwarded_for", "6.6.6.6"), ("x.forwarded.proto", "ftp")]);
    assert!(set_forwarded(&mut h, &peer, true, false, None).is_none());
    assert_eq!(h.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"1.2.3.4, 10.0.0.9"[..]));
    assert_eq!(h.get("x-forwarded-proto").map(|v| v.as_bytes()), Some(&b"http"[..]));
    assert_eq!(h.len(), 2, "other spellings survived from a trusted proxy: {h:?}");
    // A trusted proxy's Proto and Host are kept as sent.
    let mut h = map(&[("x-forwarded-proto", "https"), ("x-forwarded-host", "shop.example.com")]);
    assert!(set_forwarded(&mut h, &peer, true, false, Some(&host)).is_none());
    assert_eq!(h.get("x-forwarded-proto").map(|v| v.as_bytes()), Some(&b"https"[..]));
    assert_eq!(h.get("x-forwarded-host").map(|v| v.as_bytes()), Some(&b"shop.example.com"[..]));
    assert_eq!(h.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"10.0.0.9"[..]));
}

#[test]
fn forwarding_and_path_override_headers_are_reserved() {
    let mut h =
        map(&[("forwarded", "for=1.2.3.4"), ("x-real-ip", "1.2.3.4"), ("x-original-url", "/admin"), ("a", "b")]);
    strip_reserved(&mut h, &names());
    assert_eq!(h.len(), 1);
}

#[test]
fn upgrade_is_pinned_to_websocket_and_cookies_are_joined() {
    let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]);
    strip_hop_by_hop(&mut h, true);
    assert_eq!(h.get_all("upgrade").iter().count(), 1);
    assert_eq!(h.get("upgrade").map(|v| v.as_bytes()), Some(&b"websocket"[..]));
    let accepted = map(&[("upgrade", "websocket"), ("sec-websocket-accept", "x")]);
    assert!(is_websocket_accept(&accepted));
    assert!(!is_websocket_accept(&map(&[("upgrade", "h2c"), ("sec-websocket-accept", "x")])));
    let mut c = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
    join_cookies(&mut c);
    assert_eq!(c.get_all("cookie").iter().count(), 1);
    assert_eq!(c.get("cookie").map(|v| v.as_bytes()), Some(&b"a=1; b=2"[..]));
}

/// Every `Connection` value counts, its tokens in any case and spacing; a
/// token that is no header name removes nothing and stops nothing; names
/// longer than the lookup's stack buffer go too; with an upgrade kept, the
/// rest goes all the same.
#[test]
fn every_connection_value_and_spelling_nominates() {
    let long = "x-".to_owned() + &"a".repeat(100);
    let mut h = map(&[
        ("connection", "X-ONE ,, bad name, x-two"),
        ("connection", &format!("{}, Upgrade", long.to_uppercase())),
        ("x-one", "1"),
        ("x-two", "2"),
        (&long, "3"),
        ("upgrade", "websocket"),
        ("proxy-connection", "keep-alive"),
        ("accept", "keep"),
    ]);
    let mut kept = h.clone();
    strip_hop_by_hop(&mut h, false);
    let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(left, ["accept"]);
    strip_hop_by_hop(&mut kept, true);
    let mut left: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
    left.sort_unstable();
    assert_eq!(left, ["accept", "connection", "upgrade"]);
}

#[test]
fn the_length_filter_keeps_every_hop_by_hop_name() {
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        assert_eq!(hop_by_hop_index(name), u32::try_from(i).ok(), "{name}");
    }
    assert_eq!(hop_by_hop_index(&header::UPGRADE), Some(UPGRADE_BIT));
    for other in ["host", "x-user-id", "content-length", "connectio", "keep-alive2", "accept"] {
        assert_eq!(hop_by_hop_index(&HeaderName::from_static(other)), None, "{other}");
    }
}

#[test]
fn generated_request_ids_are_distinct_version_4_uuids() {
    let name = HeaderName::from_static("x-request-id");
    let ids: std::collections::HashSet<String> =
        (0..1000).map(|_| request_id(&HeaderMap::new(), &name).to_str().expect("ascii").to_owned()).collect();
    assert_eq!(ids.len(), 1000, "a request id repeated");
    for id in &ids {
        let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4, "{id}");
    }
}

#[test]
fn a_forwarded_preflight_keeps_only_what_a_browser_sends() {
    let mut h = map(&[
        ("host", "api.example.com"),
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "PUT"),
        ("access-control-request-headers", "authorization"),
        ("access-control-request-headers", "content-type"),
        ("user-agent", "browser"),
        ("sec-fetch-site", "cross-site"),
        ("referer", "https://app.example.com/page"),
        ("x-forwarded-for", "10.0.0.1"),
        ("authorization", "Bearer forged"),
        ("cookie", "session=1"),
        ("x-api-key", "k"),
        ("content-type", "application/json"),
        ("x_forwarded_for", "10.9.9.9"),
    ]);
    keep_preflight_fields(&mut h);
    let mut kept: Vec<(String, String)> =
        h.iter().map(|(k, v)| (k.as_str().to_owned(), v.to_str().expect("ASCII").to_owned())).collect();
    kept.sort();
    let expected = [
        ("access-control-request-headers", "authorization"),
        ("access-control-request-headers", "content-type"),
        ("access-control-request-method", "PUT"),
        ("host", "api.example.com"),
        ("origin", "https://app.example.com"),
        ("sec-fetch-site", "cross-site"),
        ("user-agent", "browser"),
        ("x-forwarded-for", "10.0.0.1"),
    ];
    assert_eq!(kept, expected.map(|(k, v)| (k.to_owned(), v.to_owned())));
}
