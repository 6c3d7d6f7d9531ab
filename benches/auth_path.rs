//! The per-request auth path of the proxy, without sockets: path
//! normalisation, route lookup, header stripping, token verification
//! (uncached and cached), the revocation check, the policy and header
//! injection; a route's rate limit check; and a route's identity
//! assertion, signed and reused. `cargo bench --bench auth_path`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Method;
use uuid::Uuid;

use gateway::auth::keys::KeyRing;
use gateway::auth::revocation::RevocationState;
use gateway::auth::token::{sign, AccessClaims, TokenRules};
use gateway::auth::Authenticator;
use gateway::config::{Config, RateLimit, RateLimitKey};
use gateway::proxy::assertion::Assertions;
use gateway::proxy::cors::CorsOrigins;
use gateway::proxy::identity::IdentityCache;
use gateway::proxy::ratelimit::{Key, RateLimiter};
use gateway::proxy::router::RouteTable;
use gateway::proxy::tenants::TenantDirectory;
use gateway::proxy::{headers, path, policy};

const CONFIG: &str = r#"
[[routes]]
name = "public"
prefix = "/public"
upstreams = ["http://127.0.0.1:9001"]
auth = "public"
[[routes]]
name = "orders"
prefix = "/api/orders"
upstreams = ["http://127.0.0.1:9001"]
roles = ["admin", "clerk"]
scopes = ["orders:read"]
[[routes]]
name = "api"
prefix = "/api"
upstreams = ["http://127.0.0.1:9001"]
"#;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keys, _) = KeyRing::load_or_generate(dir.path()).expect("keys");
    let now = gateway::db::unix_now();
    let claims = AccessClaims {
        iss: "gateway".into(),
        aud: "gateway".into(),
        sub: Uuid::new_v4(),
        tid: Uuid::new_v4(),
        sid: Uuid::new_v4(),
        jti: Uuid::new_v4(),
        iat: now,
        exp: now + 900,
        nbf: None,
        roles: vec!["admin".into()],
        scope: "orders:read orders:write".into(),
        amr: vec!["pwd".into()],
    };
    let token = sign(&keys, &claims).expect("sign");
    let revocations = RevocationState::new(Duration::from_secs(905), Duration::from_secs(30), Duration::from_secs(5));
    // A realistic revocation state: some thousands of revoked sessions.
    for _ in 0..5_000 {
        revocations.revoke_session(Uuid::new_v4());
    }
    let auth = Authenticator::new(keys, TokenRules::new("gateway", "gateway", 5), revocations);
    let cache = IdentityCache::new(100_000, Duration::from_secs(5));
    let config = Config::parse(CONFIG, Path::new("/tmp/gateway.toml")).expect("config");
    let table = RouteTable::new(config.proxy, CorsOrigins::default(), None);
    let tenants = TenantDirectory::default();

    let mut request_headers = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip"),
        ("x-user-id", "spoofed"),
    ] {
        request_headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }

    c.bench_function("verify_token_uncached", |b| b.iter(|| auth.verify_bearer(black_box(&token)).expect("valid")));
    c.bench_function("verify_token_cached", |b| {
        b.iter(|| cache.verify(&auth, black_box(token.as_bytes())).expect("valid"));
    });
    c.bench_function("request_path_authenticated", |b| {
        b.iter(|| {
            let p = path::normalize(black_box("/api/orders/42")).expect("path");
            let route = table.find(Some("api.example.com"), &p, &Method::GET, None).expect("route");
            let mut h = request_headers.clone();
            headers::strip_hop_by_hop(&mut h, false);
            headers::strip_reserved(&mut h, &table.headers);
            let id = cache.verify(&auth, token.as_bytes()).expect("valid");
            policy::authorize(&route.config, &id.principal, &tenants).expect("allowed");
            let fields = headers::identity_fields(&table.headers, &id.headers);
            let rid = headers::request_id(&h, &table.headers.request_id);
            black_box((&h, fields, rid));
        });
    });
    c.bench_function("request_path_public", |b| {
        b.iter(|| {
            let p = path::normalize(black_box("/public/index.html")).expect("path");
            let route = table.find(Some("api.example.com"), &p, &Method::GET, None).expect("route");
            let mut h = request_headers.clone();
            headers::strip_hop_by_hop(&mut h, false);
            headers::strip_reserved(&mut h, &table.headers);
            let rid = headers::request_id(&h, &table.headers.request_id);
            black_box((route, h, rid))
        });
    });
    // A route's `rate_limit`: one key (a user) well within its allowance,
    // and one key out of 100,000 in turn (a cache that is mostly misses in
    // the CPU's caches).
    let limit = RateLimit {
        requests: std::num::NonZeroU32::new(u32::MAX).expect("not zero"),
        per: Duration::from_secs(1),
        by: RateLimitKey::User,
    };
    let limiter = RateLimiter::new(limit, "bench".into());
    let user = Key::User(Uuid::new_v4());
    c.bench_function("rate_limit_one_key", |b| b.iter(|| limiter.check(black_box(user)).expect("within")));
    let users: Vec<Key> = (0..100_000).map(|_| Key::User(Uuid::new_v4())).collect();
    let mut next = users.iter().cycle();
    c.bench_function("rate_limit_100k_keys", |b| {
        b.iter(|| limiter.check(black_box(*next.next().expect("endless"))).expect("within"));
    });

    // A route's `jwt_assertion`: signed (the first request with a token,
    // then one each 30 s), and handed out again (every other request).
    let id = cache.verify(&auth, token.as_bytes()).expect("valid");
    c.bench_function("jwt_assertion_signed", |b| {
        b.iter(|| Assertions::default().get(&id.principal, black_box("orders"), &auth, now).expect("signed"));
    });
    let kept = Assertions::default();
    c.bench_function("jwt_assertion_reused", |b| {
        b.iter(|| kept.get(&id.principal, black_box("orders"), &auth, now).expect("reused"));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
