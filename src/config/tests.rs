use super::*;
use hyper::Method;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/gateway/gateway.toml"))
}

#[test]
fn empty_file_gives_documented_defaults() {
    let c = parse("").expect("defaults are valid");
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.database.url, DatabaseUrl::Sqlite("/etc/gateway/gateway.db".into()));
    assert_eq!(
        (c.server.header_read_timeout, c.server.idle_timeout),
        (Duration::from_secs(10), Duration::from_secs(75))
    );
    assert_eq!(c.auth.access_token_ttl, Duration::from_secs(900));
    assert_eq!(c.auth.refresh_token_ttl, Duration::from_secs(30 * 86400));
    assert_eq!(c.auth.session_lifetime, None);
    assert_eq!(c.auth.keys_dir, PathBuf::from("/etc/gateway/keys"));
    assert_eq!(c.auth.argon2, Argon2Config { memory_kib: 19_456, iterations: 2, parallelism: 1 });
    assert_eq!(c.auth.password_min_length, 15);
    let thirty_days = Duration::from_secs(30 * 86400);
    assert_eq!(c.database.retention, Retention { sessions: Some(thirty_days), audit: None });
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = parse(
        r#"
        colour = "red"
        [server]
        listen = "nowhere"
        [auth]
        access_token_ttl = "banana"
        lockout_threshold = 0
        registration = "yes"
        [auth.argon2]
        memory_kib = "lots"
        "#,
    )
    .expect_err("invalid");
    let text = err.to_string();
    for field in [
        "colour: unknown key",
        "server.listen",
        "auth.access_token_ttl",
        "auth.lockout_threshold",
        "auth.registration",
        "auth.argon2.memory_kib",
    ] {
        assert!(text.contains(field), "{field} missing from {text}");
    }
}

#[test]
fn absolute_sqlite_path_and_redacted_postgres_url() {
    let c = parse("[database]\nurl = \"sqlite:///var/lib/gw.db\"").expect("valid");
    assert_eq!(c.database.url, DatabaseUrl::Sqlite("/var/lib/gw.db".into()));
    let err = parse("[database]\nurl = \"mysql://u:hunter2@db/x\"").expect_err("invalid");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

/// A duration past any clock (it would overflow `Instant + timeout`) is a
/// config error naming the field, not a panic per request.
#[test]
fn durations_have_a_ceiling() {
    let err = parse(
        "[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstreams = [\"http://127.0.0.1:1\"]\ntimeout = \"300000000000y\"",
    )
    .expect_err("invalid");
    assert!(err.to_string().contains("routes[0].timeout"), "{err}");
    assert!(err.to_string().contains("longer than the maximum"), "{err}");
    let err = parse("[server]\nheader_read_timeout = \"101years\"").expect_err("invalid");
    assert!(err.to_string().contains("server.header_read_timeout"), "{err}");
    parse("[server]\nheader_read_timeout = \"99years\"").expect("a long but representable duration");
}

#[test]
fn syntax_errors_are_reported() {
    assert!(matches!(parse("[server"), Err(ConfigError::Syntax { .. })));
}

#[test]
fn staleness_must_outlast_the_poll() {
    let err = parse("[auth]\nrevocation_poll = \"20s\"\nrevocation_max_staleness = \"30s\"").expect_err("invalid");
    assert!(err.to_string().contains("auth.revocation_max_staleness"), "{err}");
}

#[test]
fn session_lifetime_is_off_or_at_least_one_access_token() {
    let err = parse("[auth]\nsession_lifetime = \"10m\"").expect_err("shorter than the 15m access token");
    assert!(
        err.to_string().contains("auth.session_lifetime: must be \"0s\" (no limit) or at least auth.access_token_ttl"),
        "{err}"
    );
    let c = parse("[auth]\nsession_lifetime = \"15m\"").expect("one access token long");
    assert_eq!(c.auth.session_lifetime, Some(Duration::from_secs(900)));
    let c = parse("[auth]\nsession_lifetime = \"0s\"").expect("no limit");
    assert_eq!(c.auth.session_lifetime, None);
}

#[test]
fn mailer_webhooks_are_signed_urls_and_links_are_short_lived() {
    let c = parse("").expect("defaults");
    assert!(c.auth.mailer.is_none(), "off by default");
    assert_eq!(c.auth.reset_token_ttl, Duration::from_secs(1800));
    assert_eq!(
        c.auth.email_verification,
        EmailVerification { required: false, token_ttl: Duration::from_secs(86_400) }
    );
    let c = parse(
        "[auth.mailer]\nwebhook = \"https://mailer.internal:8443/hooks?key=k\"\n\
         webhook_secret_file = \"hook.secret\"\n[auth.password_reset]\ntoken_ttl = \"1h\"\n\
         [auth.email_verification]\nrequired = true\ntoken_ttl = \"2d\"",
    )
    .expect("a mailer");
    let webhook = c.auth.mailer.expect("set");
    assert!(webhook.url.https);
    assert_eq!(webhook.url.host, "mailer.internal:8443");
    assert_eq!(webhook.url.path_and_query, "/hooks?key=k");
    assert_eq!(webhook.url.to_string(), "https://mailer.internal:8443", "shown without its path and query");
    assert_eq!(webhook.secret_file, PathBuf::from("/etc/gateway/hook.secret"));
    assert!(webhook.notices, "security notices are on by default");
    assert_eq!(c.auth.reset_token_ttl, Duration::from_secs(3600));
    assert_eq!(
        c.auth.email_verification,
        EmailVerification { required: true, token_ttl: Duration::from_secs(172_800) }
    );
    let c = parse("[auth.mailer]\nwebhook = \"http://localhost:80\"\nwebhook_secret_file = \"s\"\nnotices = false");
    let mailer = c.expect("ok").auth.mailer.expect("set");
    assert!(!mailer.notices);
    let url = mailer.url;
    assert_eq!((url.host.as_str(), url.path_and_query.as_str()), ("localhost", "/"));
    for loopback in ["http://127.0.0.1:8025/hook", "http://[::1]:8025/hook"] {
        let text = format!("[auth.mailer]\nwebhook = \"{loopback}\"\nwebhook_secret_file = \"s\"");
        parse(&text).expect(loopback);
    }
    let err = parse("[auth.mailer]\nwebhook = \"http://mailer.internal/x?key=hidden\"\nwebhook_secret_file = \"s\"")
        .expect_err("clear text beyond this host")
        .to_string();
    assert!(err.contains("use https://"), "{err}");
    assert!(!err.contains("hidden"), "the URL's key is not quoted back: {err}");

    let err = parse(
        "[auth]\nregistration = true\n[auth.mailer]\nwebhook = \"https://mailer.internal/hooks\"\n\
         [auth.password_reset]\ntoken_ttl = \"2d\"\n[auth.email_verification]\ntoken_ttl = \"30d\"",
    )
    .expect_err("no secret, too long links");
    let err = err.to_string();
    assert!(err.contains("auth.mailer.webhook_secret_file: is required"), "{err}");
    assert!(err.contains("auth.password_reset.token_ttl: must be at most 24h"), "{err}");
    assert!(err.contains("auth.email_verification.token_ttl: must be at most 7d"), "{err}");
    assert_eq!(parse("").expect("defaults").auth.revert_token_ttl, Duration::from_secs(7 * 86_400));
    let c = parse("[auth.email_change]\nrevert_ttl = \"3d\"").expect("3d");
    assert_eq!(c.auth.revert_token_ttl, Duration::from_secs(3 * 86_400));
    assert!(parse("[auth.email_change]\nrevert_ttl = \"0s\"").expect("off").auth.revert_token_ttl.is_zero());
    let err = parse("[auth.email_change]\nrevert_ttl = \"500ms\"").expect_err("too short").to_string();
    assert!(err.contains("auth.email_change.revert_ttl: must be \"0s\" (no link) or at least 1m"), "{err}");
    let err = parse("[auth.email_change]\nrevert_ttl = \"31d\"").expect_err("too long").to_string();
    assert!(err.contains("auth.email_change.revert_ttl: must be at most 30d"), "{err}");
    for bad in ["ftp://mailer/x", "https://user:pw@mailer/x", "/hooks", "https://mailer/x#frag"] {
        let text = format!("[auth.mailer]\nwebhook = \"{bad}\"\nwebhook_secret_file = \"s\"");
        let err = parse(&text).expect_err(bad).to_string();
        assert!(err.contains("auth.mailer.webhook: "), "{bad}: {err}");
    }
    let err = parse("[auth.mailer]\nwebhook_secret_file = \"s\"").expect_err("a secret for nothing");
    assert!(err.to_string().contains("auth.mailer.webhook_secret_file: is only used with"), "{err}");
    // Registered users must be sent their link.
    let err = parse("[auth]\nregistration = true\n[auth.email_verification]\nrequired = true").expect_err("no mailer");
    assert!(err.to_string().contains("auth.email_verification.required: needs auth.mailer"), "{err}");
    parse("[auth.email_verification]\nrequired = true").expect("no registration: operators' users count as verified");
}

#[test]
fn sign_in_links_need_a_mailer_and_proved_addresses() {
    let defaults = parse("").expect("defaults").auth.login_link;
    assert!(!defaults.enabled, "off unless asked for");
    assert_eq!(defaults.token_ttl, Duration::from_secs(15 * 60));
    let mailer = "[auth.mailer]\nwebhook = \"https://mailer/x\"\nwebhook_secret_file = \"s\"\n";
    let on = parse(&format!("{mailer}[auth.login_link]\nenabled = true\ntoken_ttl = \"10m\"")).expect("on");
    let expected = LoginLink { enabled: true, token_ttl: Duration::from_secs(600), require_code_challenge: false };
    assert_eq!(on.auth.login_link, expected);
    let err = parse("[auth.login_link]\nenabled = true").expect_err("no mailer").to_string();
    assert!(err.contains("auth.login_link.enabled: needs auth.mailer"), "{err}");
    let err = parse(&format!("{mailer}[auth.login_link]\nenabled = true\ntoken_ttl = \"2h\"")).expect_err("long");
    assert!(err.to_string().contains("auth.login_link.token_ttl: must be at most 1h"), "{err}");
    // Open registration that proves no address would let anyone hold an
    // account in the name of a mailbox its owner then signs in to.
    let open = format!("[auth]\nregistration = true\n{mailer}[auth.login_link]\nenabled = true");
    let err = parse(&open).expect_err("unproved addresses").to_string();
    assert!(err.contains("auth.login_link.enabled: needs auth.email_verification.required"), "{err}");
    parse(&format!("{open}\n[auth.email_verification]\nrequired = true")).expect("proved addresses");
    let err = parse("[auth.login_link]\nenabeld = true").expect_err("a typo").to_string();
    assert!(err.contains("auth.login_link.enabeld"), "{err}");
}

#[test]
fn session_retention_outlasts_the_access_tokens_or_keeps_everything() {
    let err = parse("[database]\nsession_retention = \"1h\"").expect_err("shorter than 15m + 5s + 1h");
    assert!(
        err.to_string().contains("database.session_retention: must be \"0s\" (keep for ever) or at least"),
        "{err}"
    );
    let err =
        parse("[auth]\naccess_token_ttl = \"1d\"\n[database]\nsession_retention = \"1d\"").expect_err("too short");
    assert!(err.to_string().contains("database.session_retention"), "{err}");
    let c = parse("[database]\nsession_retention = \"1h 15m 5s\"\naudit_retention = \"365d\"").expect("the floor");
    let year = Duration::from_secs(365 * 86400);
    assert_eq!(c.database.retention, Retention { sessions: Some(Duration::from_secs(4505)), audit: Some(year) });
    let c = parse("[auth]\naccess_token_ttl = \"60d\"").expect("the default gives way to the floor");
    let floor = Duration::from_secs(60 * 86400 + 5 + 3600);
    assert_eq!(c.database.retention.sessions, Some(floor));
    let err = parse("[server]\ntrusted_proxies = [\"::ffff:10.0.0.0/104\"]").expect_err("never matches");
    assert!(err.to_string().contains("server.trusted_proxies: \"::ffff:10.0.0.0/104\" is IPv4-mapped"), "{err}");
    let c = parse("[database]\nsession_retention = \"0s\"").expect("keep for ever");
    assert_eq!(c.database.retention, Retention { sessions: None, audit: None });
}

#[test]
fn mfa_is_for_required_routes() {
    let route = |lines: &str| format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstreams = [\"http://h\"]\n{lines}");
    assert!(parse(&route("mfa = true")).expect("a required route").proxy.routes[0].mfa);
    assert!(!parse(&route("")).expect("default").proxy.routes[0].mfa);
    let err = parse(&route("auth = \"public\"\nmfa = true")).expect_err("public");
    assert!(err.to_string().contains("routes[0].mfa: a public route reads no token"), "{err}");
}

#[test]
fn upstream_protocol_is_http1_or_http2_without_websockets() {
    let route = |lines: &str| {
        format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstreams = [\"http://10.0.0.1\", \"https://h\"]\n{lines}")
    };
    let c = parse(&route("")).expect("defaults");
    let r = &c.proxy.routes[0];
    assert!(!r.upstream_http2 && r.websocket && r.upstreams.iter().all(|u| !u.http2));
    let c = parse(&route("upstream_protocol = \"http2\"")).expect("http2");
    let r = &c.proxy.routes[0];
    assert!(r.upstream_http2 && !r.websocket && r.upstreams.iter().all(|u| u.http2));
    for (lines, says) in [
        ("upstream_protocol = \"h2c\"", "routes[0].upstream_protocol: \"h2c\" is not \"http1\" or \"http2\""),
        ("upstream_protocol = \"http2\"\nwebsocket = true", "routes[0].websocket: cannot be forwarded"),
    ] {
        let err = parse(&route(lines)).expect_err(lines);
        assert!(err.to_string().contains(says), "{lines}: {err}");
    }
}

#[test]
fn health_checks_name_a_path_and_probe_one_at_a_time() {
    let route = |hc: &str| {
        format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstreams = [\"http://10.0.0.1\"]\nhealth_check = {hc}")
    };
    let c = parse(&route("{ path = \"/healthz?full=1\" }")).expect("defaults");
    let expected = HealthCheck {
        path: "/healthz?full=1".into(),
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(2),
        unhealthy_after: 2,
        healthy_after: 2,
    };
    assert_eq!(c.proxy.routes[0].health_check, Some(expected));
    for (hc, says) in [
        ("{ interval = \"5s\" }", "routes[0].health_check.path: is required"),
        ("{ path = \"healthz\" }", "routes[0].health_check.path: \"healthz\" is not a path"),
        ("{ path = \"/a#b\" }", "is not a path"),
        ("{ path = \"/h\u{e9}\" }", "is not a path"),
        ("{ path = \"/a b\" }", "is not a path"),
        ("{ path = \"/a{b}\" }", "is not a path"),
        ("{ path = \"/h\", interval = \"10ms\" }", "health_check.interval"),
        ("{ path = \"/h\", unhealthy_after = 0 }", "health_check.unhealthy_after"),
        ("{ path = \"/h\", healthy_after = 101 }", "health_check.healthy_after"),
        ("{ path = \"/h\", colour = \"red\" }", "health_check.colour"),
        ("\"/healthz\"", "expected a table"),
    ] {
        let err = parse(&route(hc)).expect_err(hc);
        assert!(err.to_string().contains(says), "{hc}: {err}");
    }
    let judge_only = "[forward_auth]\nenabled = true\n[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
                      [[routes]]\nname = \"r\"\nprefix = \"/\"\nhealth_check = { path = \"/h\" }";
    let err = parse(judge_only).expect_err("nothing to probe");
    assert!(err.to_string().contains("health_check: a route without upstreams has nothing to probe"), "{err}");
}

#[test]
fn allow_ips_are_addresses_or_ranges() {
    let route = |list: &str| {
        format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstreams = [\"http://10.0.0.1\"]\nallow_ips = {list}")
    };
    let c = parse(&route(r#"["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]"#)).expect("valid");
    let nets: Vec<String> = c.proxy.routes[0].allow_ips.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    let err = parse(&route(r#"["10.0.0.0/33", "office"]"#)).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains(r#"routes[0].allow_ips: "10.0.0.0/33" is not an address or a CIDR"#), "{text}");
    assert!(text.contains(r#""office" is not an address"#), "{text}");
    let err = parse(&route("[]")).expect_err("admits no one");
    assert!(err.to_string().contains("routes[0].allow_ips: is empty"), "{err}");
    let err = parse(&route(r#"["::ffff:10.0.0.0/104"]"#)).expect_err("never matches");
    assert!(err.to_string().contains("IPv4-mapped"), "{err}");
}

#[test]
fn header_names_may_not_collide() {
    for (text, field) in [
        ("[headers]\nrequest_id = \"x-user-id\"", "headers.request_id"),
        ("[headers]\nroles = \"X_Tenant_Id\"", "headers.roles"),
        ("[headers]\nuser_id = \"x-forwarded-for\"", "headers.user_id"),
        ("[headers]\nsession_id = \"host\"", "headers.session_id"),
        ("[headers]\nrequest_id = \"x-real-ip\"", "headers.request_id"),
        ("[headers]\nrequest_id = \"upgrade\"", "headers.request_id"),
        // The request id is written after the map, past the strip of these.
        ("[headers]\nrequest_id = \"X-Forwarded-Host\"", "headers.request_id"),
        ("[headers]\nrequest_id = \"content_length\"", "headers.request_id"),
        ("[headers]\nrequest_id = \"Host\"", "headers.request_id"),
        ("[headers]\nrequest_id = \"connection\"", "headers.request_id"),
        ("[headers]\nrequest_id = \"x-trace\"\nreserved = [\"X_Trace\"]", "headers.request_id"),
        // Reserved names are stripped from every request: not the token,
        // the host or the framing.
        ("[headers]\nreserved = [\"Authorization\"]", "headers.reserved"),
        ("[headers]\nreserved = [\"x-internal\", \"content_length\"]", "headers.reserved"),
        ("[headers]\nreserved = [\"HOST\"]", "headers.reserved"),
    ] {
        let err = parse(text).expect_err(text);
        assert!(err.to_string().contains(field), "{text}: {err}");
    }
    parse("[headers]\nuser_id = \"x-auth-user\"\nrequest_id = \"x-trace-id\"").expect("distinct names are fine");
    parse("[headers]\nreserved = [\"X-Forwarded-For\", \"x-internal\"]")
        .expect("a client's X-Forwarded-For may be stripped");
}

#[test]
fn every_route_problem_is_reported_at_once() {
    let err = parse(
        r#"
        [[routes]]
        name = "none"
        prefix = "no-slash"
        upstreams = ["not a url"]
        [[routes]]
        name = "gateway"
        prefix = "/a"
        upstreams = ["ftp://10.0.0.1"]
        roles = ["has space"]
        scopes = [""]
        tenants = ["Bad/Slug"]
        auth = "sometimes"
        [[routes]]
        name = "ok"
        prefix = "/b"
        upstreams = ["http://10.0.0.1:80"]
        [[routes]]
        name = "ok"
        prefix = "/c"
        upstreams = ["http://10.0.0.1:80"]
        [[routes]]
        name = "public-policy"
        prefix = "/d"
        upstreams = ["http://10.0.0.1:80"]
        auth = "public"
        roles = ["admin"]
        "#,
    )
    .expect_err("invalid");
    let text = err.to_string();
    for field in [
        "routes[0].name",
        "routes[0].prefix",
        "routes[0].upstreams",
        "routes[1].name",
        "routes[1].upstreams",
        "routes[1].roles",
        "routes[1].scopes",
        "routes[1].tenants",
        "routes[1].auth",
        "routes[3].name",
        "routes[4]",
    ] {
        assert!(text.contains(field), "{field} missing from {text}");
    }
    assert!(text.contains("reserved"), "{text}");
}

#[test]
fn cors_origins_are_origins_as_browsers_send_them() {
    let c = parse(
        r#"
        [auth]
        cors_origins = ["https://App.Example.com", "http://localhost:5173", "http://[::1]:8080", "http://app.example.com:443"]
        "#,
    )
    .expect("valid origins");
    assert_eq!(
        c.auth.cors_origins,
        ["https://app.example.com", "http://localhost:5173", "http://[::1]:8080", "http://app.example.com:443"]
    );
    assert_eq!(parse("[auth]\ncors_origins = [\"*\"]").expect("any origin").auth.cors_origins, ["*"]);
    assert!(parse("").expect("defaults").auth.cors_origins.is_empty(), "no CORS unless configured");

    for bad in [
        "https://app.example.com/",
        "https://app.example.com/login",
        "app.example.com",
        "ftp://app.example.com",
        "https://",
        "https://user@app.example.com",
        "https://app.example.com?x=1",
        "null",
        "https://*.example.com",
        "https://app.example.com:443",
        "http://app.example.com:80",
        "https://app.example.com:",
        "https://app.example.com:x1",
        "https://app.example.com:0443",
        "https://app.example.com:99999",
    ] {
        let err = parse(&format!("[auth]\ncors_origins = [{bad:?}]")).expect_err(bad).to_string();
        assert!(err.contains("auth.cors_origins") && err.contains(bad), "{bad}: {err}");
    }
    let err = parse("[auth]\ncors_origins = [\"*\", \"https://a.example\"]").expect_err("* with others").to_string();
    assert!(err.contains("auth.cors_origins"), "{err}");
}

#[test]
fn cors_preflight_is_for_required_routes() {
    let route = |auth: &str| {
        format!("[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstreams = [\"http://10.0.0.1:80\"]\nauth = {auth:?}\ncors_preflight = true")
    };
    let c = parse(&route("required")).expect("a required route may forward preflights");
    assert!(c.proxy.routes[0].cors_preflight);
    let err = parse(&route("public")).expect_err("public").to_string();
    assert!(err.contains("routes[0].cors_preflight"), "{err}");
    assert!(
        !parse(&route("required").replace("cors_preflight = true", "")).expect("default").proxy.routes[0]
            .cors_preflight
    );
}

#[test]
fn an_upstream_client_certificate_needs_its_key_and_the_key_its_certificate() {
    let c = parse("[upstream]\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"").expect("both");
    let (cert, key) = c.upstream.client_cert.expect("a client certificate");
    assert_eq!((cert.as_path(), key.as_path()), (Path::new("/etc/gateway/c.pem"), Path::new("/etc/gateway/k.pem")));
    assert!(parse("").expect("defaults").upstream.client_cert.is_none());
    let err = parse("[upstream]\nclient_cert = \"c.pem\"").expect_err("no key").to_string();
    assert!(err.contains("upstream.client_key"), "{err}");
    let err = parse("[upstream]\nclient_key = \"k.pem\"").expect_err("no cert").to_string();
    assert!(err.contains("upstream.client_cert"), "{err}");
}

#[test]
fn routes_may_share_a_prefix_when_their_methods_do_not_overlap() {
    let route = |name: &str, methods: Option<&str>| {
        let methods = methods.map_or(String::new(), |m| format!("methods = {m}\n"));
        format!("[[routes]]\nname = {name:?}\nprefix = \"/r\"\n{methods}upstreams = [\"http://10.0.0.1:80\"]\n")
    };
    let c = parse(
        &[route("read", Some(r#"["GET", "HEAD"]"#)), route("write", Some(r#"["POST"]"#)), route("rest", None)].concat(),
    )
    .expect("disjoint methods, and one route for the rest");
    assert_eq!(c.proxy.routes[0].methods, [Method::GET, Method::HEAD]);
    assert!(c.proxy.routes[2].methods.is_empty());
    let c = parse(&route("custom", Some(r#"["PROPFIND"]"#))).expect("any method token");
    assert_eq!(c.proxy.routes[0].methods[0].as_str(), "PROPFIND");

    let err = parse(&[route("a", Some(r#"["GET", "POST"]"#)), route("b", Some(r#"["PUT", "POST"]"#))].concat())
        .expect_err("POST twice")
        .to_string();
    assert!(err.contains("routes[1].methods") && err.contains("POST") && err.contains("\"a\""), "{err}");
    let err = parse(&[route("a", None), route("b", None)].concat()).expect_err("both take all").to_string();
    assert!(err.contains("routes[1].prefix"), "{err}");
    for (bad, says) in [
        (r#"[]"#, "no method"),
        (r#"["get"]"#, "did you mean \"GET\""),
        (r#"["GET", "GET"]"#, "twice"),
        (r#"["G T"]"#, "not an HTTP method"),
        (r#"["CONNECT"]"#, "never proxied"),
        (r#"["propfind"]"#, "lower-case"),
        (r#""GET""#, "array"),
    ] {
        let err = parse(&route("r", Some(bad))).expect_err(bad).to_string();
        assert!(err.contains("routes[0].methods") && err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn a_get_route_without_head_next_to_a_route_for_every_method_is_refused() {
    let route = |name: &str, host: &str, methods: Option<&str>| {
        let methods = methods.map_or(String::new(), |m| format!("methods = {m}\n"));
        format!("[[routes]]\nname = {name:?}\nprefix = \"/r\"\n{host}{methods}upstreams = [\"http://10.0.0.1:80\"]\n")
    };
    let err = parse(&[route("rest", "", None), route("read", "", Some(r#"["GET"]"#))].concat())
        .expect_err("HEAD would go to the other route")
        .to_string();
    assert!(err.contains("routes[1].methods") && err.contains("HEAD") && err.contains("\"rest\""), "{err}");
    parse(&[route("rest", "", None), route("read", "", Some(r#"["GET", "HEAD"]"#))].concat()).expect("HEAD listed");
    parse(&[route("head", "", Some(r#"["HEAD"]"#)), route("read", "", Some(r#"["GET"]"#))].concat())
        .expect("HEAD given to a route of its own on purpose");
    parse(&route("read", "", Some(r#"["GET"]"#))).expect("alone, a HEAD is a 405");
    parse(&[route("rest", "host = \"a.example\"\n", None), route("read", "", Some(r#"["GET"]"#))].concat())
        .expect("a route for every method on another host");
}

#[test]
fn route_fields_the_gateway_owns_cannot_be_set_or_removed() {
    let route = |lines: &str| {
        format!("[headers]\nrequest_id = \"x-trace\"\nreserved = [\"X-Internal\"]\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstreams = [\"http://10.0.0.1:80\"]\n{lines}\n")
    };
    let c = parse(&route(
        "request_headers = { \"X-Api-Version\" = \"2\", \"Authorization\" = \"Basic abc\" }\n\
         response_headers = { \"Strict-Transport-Security\" = \"max-age=60\" }\n\
         remove_response_headers = [\"Server\", \"X-Powered-By\"]",
    ))
    .expect("ordinary fields");
    let r = &c.proxy.routes[0];
    assert_eq!(r.request_headers.len(), 2);
    assert_eq!(r.response_headers[0].0.as_str(), "strict-transport-security");
    assert_eq!(r.remove_response_headers.len(), 2);
    for (lines, field) in [
        ("request_headers = { \"X-User-Id\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"x_tenant_id\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"X-HTTP-Method-Override\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"Host\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"Content-Length\" = \"1\" }", "routes[0].request_headers"),
        ("request_headers = { \"X-Forwarded-For\" = \"1.2.3.4\" }", "routes[0].request_headers"),
        ("request_headers = { \"X-Trace\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"Authorization\" = \"Basic a\" }\npass_token = true", "routes[0].request_headers"),
        ("request_headers = { \"X-A\" = \"a\\nb\" }", "routes[0].request_headers"),
        ("request_headers = { \"bad name\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"X-A\" = 1 }", "routes[0].request_headers"),
        ("request_headers = { \"X_Forwarded_For\" = \"1.2.3.4\" }", "routes[0].request_headers"),
        ("request_headers = { \"x.trace\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"X-Internal\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"Te\" = \"trailers\" }", "routes[0].request_headers"),
        ("request_headers = { \"Upgrade\" = \"websocket\" }", "routes[0].request_headers"),
        ("request_headers = { \"Proxy-Authorization\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"Sec-WebSocket-Key\" = \"x\" }", "routes[0].request_headers"),
        ("request_headers = { \"X-A\" = \"1\", \"X_A\" = \"2\" }", "routes[0].request_headers"),
        ("response_headers = { \"Vary\" = \"Origin\" }", "routes[0].response_headers"),
        ("response_headers = { \"Set-Cookie\" = \"a=b\" }", "routes[0].response_headers"),
        ("response_headers = { \"WWW-Authenticate\" = \"Basic\" }", "routes[0].response_headers"),
        ("response_headers = { \"Sec-WebSocket-Extensions\" = \"x\" }", "routes[0].response_headers"),
        ("remove_response_headers = [\"Sec-WebSocket-Accept\"]", "routes[0].remove_response_headers"),
        ("response_headers = { \"Transfer-Encoding\" = \"chunked\" }", "routes[0].response_headers"),
        ("response_headers = { \"X-Trace\" = \"x\" }", "routes[0].response_headers"),
        ("remove_response_headers = [\"Connection\"]", "routes[0].remove_response_headers"),
        ("remove_response_headers = [\"x-trace\"]", "routes[0].remove_response_headers"),
        ("remove_response_headers = [\"grpc-status\"]", "routes[0].remove_response_headers"),
        ("response_headers = { \"Grpc-Message\" = \"ok\" }", "routes[0].response_headers"),
        ("response_headers = { \"grpc-status-details-bin\" = \"x\" }", "routes[0].response_headers"),
    ] {
        let err = parse(&route(lines)).expect_err(lines).to_string();
        assert!(err.contains(field), "{lines}: {err}");
    }
}

#[test]
fn fields_for_every_answer_are_checked_like_a_routes() {
    let headers = |lines: &str| format!("[headers]\nrequest_id = \"x-trace\"\n{lines}\n");
    let c = parse(&headers(
        "response_headers = { \"Strict-Transport-Security\" = \"max-age=63072000\", \"X-Content-Type-Options\" = \"nosniff\" }",
    ))
    .expect("ordinary fields");
    let names: Vec<&str> = c.proxy.headers.response_headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["strict-transport-security", "x-content-type-options"]);
    assert!(parse("").expect("defaults").proxy.headers.response_headers.is_empty());
    // What describes one answer is a route's to set, not every answer's.
    let route = "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstreams = [\"http://10.0.0.1:80\"]\n\
                 response_headers = { \"Cache-Control\" = \"public, max-age=60\" }\n";
    parse(route).expect("a route may set Cache-Control");
    let err = parse(&headers("response_headers = { \"Cache-Control\" = \"no-cache\" }")).expect_err("Cache-Control");
    assert!(err.to_string().contains("describes one answer"), "{err}");
    for lines in [
        "response_headers = { \"Set-Cookie\" = \"a=b\" }",
        "response_headers = { \"Content-Type\" = \"text/html\" }",
        "response_headers = { \"Connection\" = \"close\" }",
        "response_headers = { \"Content-Length\" = \"0\" }",
        "response_headers = { \"X_Trace\" = \"x\" }",
        "response_headers = { \"Sec-WebSocket-Accept\" = \"x\" }",
        "response_headers = { \"X-A\" = \"1\", \"x.a\" = \"2\" }",
        "response_headers = { \"X-A\" = \"a\\rb\" }",
        "response_headers = { \"bad name\" = \"x\" }",
        "response_headers = [\"X-A\"]",
        "response_headers = { \"Cache-Control\" = \"public, max-age=3600\" }",
        "response_headers = { \"Access-Control-Allow-Origin\" = \"*\" }",
        "response_headers = { \"Location\" = \"/\" }",
        "response_headers = { \"Retry-After\" = \"1\" }",
        "response_headers = { \"Content-Digest\" = \"sha-256=:x:\" }",
    ] {
        let err = parse(&headers(lines)).expect_err(lines).to_string();
        assert!(err.contains("headers.response_headers"), "{lines}: {err}");
    }
}

#[test]
fn the_redirect_listener_needs_tls_and_an_address_of_its_own() {
    let tls = "[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    let c = parse(&format!("[server]\nlisten = \"0.0.0.0:8443\"\nhttp_redirect_listen = \"0.0.0.0:8080\"\n{tls}"))
        .expect("a redirect beside TLS");
    let r = c.server.http_redirect.expect("the redirect");
    assert_eq!((r.listen.to_string().as_str(), r.https_port), ("0.0.0.0:8080", None));
    let c = parse(&format!("[server]\nhttp_redirect_listen = \"0.0.0.0:80\"\nhttp_redirect_port = 443\n{tls}"))
        .expect("a redirect to the port clients see");
    assert_eq!(c.server.http_redirect.map(|r| r.https_port), Some(Some(443)));
    assert!(parse("").expect("defaults").server.http_redirect.is_none());
    for (text, field) in [
        ("[server]\nhttp_redirect_listen = \"0.0.0.0:80\"\n", "server.http_redirect_listen"),
        ("[server]\nhttp_redirect_port = 443\n", "server.http_redirect_port"),
        (&format!("[server]\nhttp_redirect_listen = \"port 80\"\n{tls}"), "server.http_redirect_listen"),
        (
            &format!("[server]\nlisten = \"0.0.0.0:80\"\nhttp_redirect_listen = \"0.0.0.0:80\"\n{tls}"),
            "server.http_redirect_listen",
        ),
        (
            &format!("[server]\nhttp_redirect_listen = \"0.0.0.0:80\"\nhttp_redirect_port = 0\n{tls}"),
            "server.http_redirect_port",
        ),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
}

#[test]
fn listeners_that_cannot_all_bind_are_refused() {
    let tls = "[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    let config = |server: &str, admin: &str, redirect: &str| {
        let redirect =
            if redirect.is_empty() { String::new() } else { format!("http_redirect_listen = {redirect:?}\n") };
        format!("[server]\nlisten = {server:?}\n{redirect}{tls}[admin]\nlisten = {admin:?}\n")
    };
    for (server, admin, redirect) in [
        ("0.0.0.0:8443", "127.0.0.1:9090", "0.0.0.0:8080"),
        // Another address of one family, or the other family.
        ("127.0.0.1:8080", "127.0.0.2:8080", ""),
        ("0.0.0.0:8080", "[::1]:8080", ""),
        // Any free port, each its own.
        ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
    ] {
        let text = config(server, admin, redirect);
        parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    for (server, admin, redirect, field) in [
        (
            "0.0.0.0:8080",
            "0.0.0.0:8080",
            "",
            "admin.listen: 0.0.0.0:8080 takes the port of server.listen (0.0.0.0:8080)",
        ),
        ("0.0.0.0:8080", "127.0.0.1:8080", "", "admin.listen"),
        ("127.0.0.1:9090", "0.0.0.0:9090", "", "admin.listen"),
        ("[::]:8080", "127.0.0.1:8080", "", "admin.listen"),
        ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080", "", "admin.listen"),
        ("0.0.0.0:8080", "[::ffff:127.0.0.1]:8080", "", "admin.listen"),
        ("0.0.0.0:443", "127.0.0.1:9090", "0.0.0.0:443", "server.http_redirect_listen"),
        ("0.0.0.0:443", "127.0.0.1:9090", "127.0.0.1:443", "server.http_redirect_listen"),
        (
            "0.0.0.0:443",
            "127.0.0.1:80",
            "0.0.0.0:80",
            "server.http_redirect_listen: 0.0.0.0:80 takes the port of admin.listen",
        ),
    ] {
        let text = config(server, admin, redirect);
        let err = parse(&text).expect_err(&text).to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
}

#[test]
fn rate_limits_name_their_key_and_refuse_what_cannot_be_counted() {
    let route = |auth: &str, limit: &str| {
        format!("[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstreams = [\"http://127.0.0.1:9\"]\n{auth}\nrate_limit = {limit}\n")
    };
    let limit = |text: &str| parse(text).unwrap_or_else(|e| panic!("{text}: {e}")).proxy.routes[0].rate_limit;
    let one = |requests: u32, per: u64, by: RateLimitKey| {
        Some(RateLimit {
            requests: std::num::NonZeroU32::new(requests).expect("not zero"),
            per: Duration::from_secs(per),
            by,
        })
    };
    assert_eq!(limit(&route("", "{ requests = 100 }")), one(100, 60, RateLimitKey::User), "per user by default");
    assert_eq!(
        limit(&route("auth = \"public\"", "{ requests = 5, per = \"1s\" }")),
        one(5, 1, RateLimitKey::Ip),
        "per address on a public route"
    );
    assert_eq!(
        limit(&route("", "{ requests = 7, per = \"1h\", by = \"tenant\" }")),
        one(7, 3600, RateLimitKey::Tenant)
    );
    assert_eq!(limit(&route("", "{ requests = 7, by = \"ip\" }")), one(7, 60, RateLimitKey::Ip));
    assert_eq!(
        parse(&route("", "{ requests = 1 }").replace("rate_limit = { requests = 1 }\n", ""))
            .expect("no limit")
            .proxy
            .routes[0]
            .rate_limit,
        None
    );

    for (auth, text, says) in [
        ("", "{ per = \"1m\" }", "routes[0].rate_limit.requests: is required"),
        ("", "{ requests = 0 }", "routes[0].rate_limit.requests: 0 is out of range"),
        ("", "{ requests = 5, per = \"0s\" }", "routes[0].rate_limit.per"),
        ("", "{ requests = 5, by = \"session\" }", "routes[0].rate_limit.by: \"session\" is not"),
        ("auth = \"public\"", "{ requests = 5, by = \"user\" }", "routes[0].rate_limit.by: a public route"),
        ("auth = \"public\"", "{ requests = 5, by = \"tenant\" }", "routes[0].rate_limit.by: a public route"),
        ("", "{ requests = 5, burst = 10 }", "routes[0].rate_limit.burst: unknown key"),
        ("", "100", "routes[0].rate_limit: expected a table"),
    ] {
        let text = route(auth, text);
        let err = parse(&text).expect_err(&text).to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}

#[test]
fn forward_auth_needs_a_trusted_proxy_and_lets_routes_leave_out_upstreams() {
    let bare = "[[routes]]\nname = \"judged\"\nprefix = \"/judged\"\n";
    let trusted = "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n";
    let on = "[forward_auth]\nenabled = true\n";

    assert!(!parse("").expect("defaults").proxy.forward_auth, "off by default");
    let c = parse(&format!("{trusted}{on}{bare}")).expect("a route without upstreams, with forward auth");
    assert!(c.proxy.forward_auth);
    assert!(c.proxy.routes[0].upstreams.is_empty());

    for (text, says) in [
        (format!("{trusted}{bare}"), "routes[0].upstreams: needs at least one URL"),
        (on.to_owned(), "forward_auth.enabled: answers only peers in server.trusted_proxies"),
        (format!("{trusted}[forward_auth]\nenabled = \"yes\"\n"), "forward_auth.enabled"),
        (format!("{trusted}{on}path = \"/verify\"\n"), "forward_auth.path: unknown key"),
    ] {
        let err = parse(&text).expect_err(&text).to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}

#[test]
fn jwt_assertions_need_an_identity_and_an_audience_of_their_own() {
    let route = |lines: &str| {
        format!("[[routes]]\nname = \"orders\"\nprefix = \"/o\"\nupstreams = [\"http://10.0.0.1:80\"]\n{lines}\n")
    };
    let audience =
        |text: &str| parse(text).unwrap_or_else(|e| panic!("{text}: {e}")).proxy.routes[0].jwt_assertion.clone();
    assert_eq!(audience(&route("")), None);
    assert_eq!(audience(&route("jwt_assertion = true")), Some("orders".to_owned()), "the route's name by default");
    assert_eq!(
        audience(&route("jwt_assertion = true\njwt_assertion_audience = \"orders-service\"")),
        Some("orders-service".to_owned())
    );
    let c = parse(&format!("[headers]\njwt_assertion = \"X-Gateway-Assertion\"\n{}", route("jwt_assertion = true")))
        .expect("a custom name");
    assert_eq!(c.proxy.headers.jwt_assertion, "x-gateway-assertion");
    for name in ["x-gateway-assertion", "x-jwt-assertion"] {
        assert!(c.proxy.headers.reserved.iter().any(|r| r == name), "{name} is not stripped");
    }

    for (text, says) in [
        (route("auth = \"public\"\njwt_assertion = true"), "routes[0].jwt_assertion: a public route"),
        (route("jwt_assertion_audience = \"x\""), "routes[0].jwt_assertion_audience: needs jwt_assertion = true"),
        (route("jwt_assertion = true\njwt_assertion_audience = \"\""), "routes[0].jwt_assertion_audience: is empty"),
        (
            route("jwt_assertion = true\njwt_assertion_audience = \"gateway\""),
            "routes[0].jwt_assertion_audience: \"gateway\" is auth.audience",
        ),
        (
            format!("[auth]\naudience = \"orders\"\n{}", route("jwt_assertion = true")),
            "routes[0].jwt_assertion_audience: \"orders\" is auth.audience",
        ),
        (format!("[headers]\njwt_assertion = \"X-User-Id\"\n{}", route("")), "headers.jwt_assertion"),
    ] {
        let err = parse(&text).expect_err(&text).to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}

#[test]
fn a_reload_names_the_tables_that_wait_for_a_restart() {
    let running = parse("[auth]\ncors_origins = [\"https://a.example\"]").expect("running");
    let same = parse(
        "[auth]\ncors_origins = [\"https://b.example\"]\n[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
         [[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstreams = [\"http://10.0.0.1:80\"]",
    )
    .expect("only what a reload takes");
    assert!(same.restart_pending(&running).is_empty(), "routes, trusted proxies and CORS origins reload");
    let changed = parse(
        "[auth]\ncors_origins = [\"https://a.example\"]\naccess_token_ttl = \"5m\"\n\
         [auth.email_verification]\nrequired = true\n[database]\nmax_connections = 2\n\
         [server]\nidle_timeout = \"5s\"\n[upstream]\nconnect_timeout = \"1s\"\n[log]\naccess = false",
    )
    .expect("start-only settings");
    assert_eq!(changed.restart_pending(&running), ["server", "database", "auth", "log", "upstream"]);
    let admin = parse("[auth]\ncors_origins = [\"https://a.example\"]\n[admin]\nlisten = \"127.0.0.1:9999\"")
        .expect("another admin port");
    assert_eq!(admin.restart_pending(&running), ["admin"]);
}

#[test]
fn the_admin_api_is_off_unless_a_token_file_is_named() {
    assert_eq!(parse("").expect("defaults").admin.api_token_file, None);
    let c = parse("[admin]\napi_token_file = \"admin.token\"").expect("a token file");
    assert_eq!(c.admin.api_token_file, Some(PathBuf::from("/etc/gateway/admin.token")), "beside the config");
    let err = parse("[admin]\napi_token_file = 7").expect_err("not a path").to_string();
    assert!(err.contains("admin.api_token_file"), "{err}");
}

#[test]
fn tenant_tokens_need_a_name_a_file_and_tenants() {
    let c = parse(
        "[admin]\ntenant_tokens = [{ name = \"acme-console\", file = \"acme.token\", tenants = [\"acme\", \"beta\"] }]",
    )
    .expect("a tenant token");
    let t = &c.admin.tenant_tokens[0];
    assert_eq!((t.name.as_str(), t.tenants.clone()), ("acme-console", vec!["acme".to_owned(), "beta".to_owned()]));
    assert!(t.file.ends_with("acme.token") && t.file.is_absolute(), "{t:?}");
    let err = parse(
        "[admin]\ntenant_tokens = [{ name = \"Bad Name\", tenants = [] }, \
         { name = \"a\", file = \"a\", tenants = [\"Not A Slug\"] }, \
         { name = \"a\", file = \"b\", tenants = [\"x\", \"x\"], roles = [\"bad role\"] }]",
    )
    .expect_err("bad tokens")
    .to_string();
    for expected in [
        "admin.tenant_tokens[0].name: is required",
        "admin.tenant_tokens[0].file: is required",
        "admin.tenant_tokens[0].tenants: is required",
        "admin.tenant_tokens[1].tenants: \"Not A Slug\" is no tenant slug",
        "admin.tenant_tokens[2].name: \"a\" names another token too",
        "admin.tenant_tokens[2].tenants: \"x\" is listed twice",
        "admin.tenant_tokens[2].roles:",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
}
