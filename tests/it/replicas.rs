//! Several gateways on one PostgreSQL database (PostgreSQL only; each test is skipped, with a
//! notice, when `GATEWAY_TEST_POSTGRES_URL` is unset): tokens, revocations, refresh rotation
//! and lockout are shared; revocations reach the other replica through LISTEN/NOTIFY well
//! before the 1 s `revocation_poll`; and a replica cut off from the database keeps serving
//! valid tokens, answers 503 on what needs the database, fails closed once its revocation
//! state is stale, and recovers by itself.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::helpers::{
    assert_error, assert_error_in, assert_invalid_token, assert_status, eventually, jwt_part, parse_tokens,
    postgres_or_skip, retry_after_secs, route, spawn_replicas, Cluster, TestApp, TestOptions, PASSWORD, WRONG_PASSWORD,
};
use crate::upstream::{echo, spawn_upstream, Upstream};

const EMAIL: &str = "me@example.com";

/// How soon the other replica must refuse a revoked token. The poll runs every second, so
/// meeting this by polling alone would be luck; the push path makes it milliseconds.
const PUSH_BOUND: Duration = Duration::from_secs(1);

/// Waits (up to 10 s) until `app`'s revocation listener is LISTENing, so that a
/// measured lag is the push's and not a start-up race with the poll.
async fn push_ready(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready: Value = app
            .client
            .get(format!("http://{}/readyz", app.admin_addr))
            .send()
            .await
            .expect("GET /readyz")
            .json()
            .await
            .expect("readyz is JSON");
        if ready["revocation_push"] == json!(true) {
            return;
        }
        assert!(Instant::now() < deadline, "the revocation listener never started: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replica options: `revocation_poll = "1s"` and a required route `/svc` to `svc`.
fn replica_options(svc: &Upstream) -> TestOptions {
    TestOptions { revocation_poll: "1s", ..TestOptions::with_extra(route("svc", "/svc", &[svc.url()], "")) }
}

fn now_secs() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock is after 1970").as_secs();
    i64::try_from(secs).expect("time fits in i64")
}

/// Sends `request` every 10 ms until it is refused with 401 `invalid_token` (until then it
/// must be 200); returns the time from `since` to the refusal. Gives up after 5 s.
async fn refused_after<F, Fut>(what: &str, since: Instant, mut request: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Response>,
{
    let cap = Duration::from_secs(5);
    loop {
        let resp = request().await;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let lag = since.elapsed();
            assert_invalid_token(resp).await;
            return lag;
        }
        assert_status(resp, StatusCode::OK).await;
        assert!(since.elapsed() < cap, "{what}: still accepted {cap:?} after the revocation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`refused_after`], printing the lag and asserting it is under [`PUSH_BOUND`].
async fn assert_refused_promptly<F, Fut>(what: &str, since: Instant, request: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Response>,
{
    let lag = refused_after(what, since, request).await;
    eprintln!("cross-replica revocation lag ({what}): {} ms", lag.as_millis());
    assert!(lag < PUSH_BOUND, "{what}: the other replica refused the token only after {lag:?}");
}

#[tokio::test]
async fn a_token_issued_by_one_replica_is_accepted_by_the_other() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let (a, b) = spawn_replicas(replica_options(&svc)).await;
    let user_id = a.create_user("default", EMAIL, PASSWORD, &["ops"], &["read"]).await;
    let tokens = a.login_ok(EMAIL, PASSWORD, None).await;

    let me = b.me_ok(&tokens.access_token).await;
    assert_eq!(me["user_id"], user_id.as_str(), "{me}");
    assert_eq!(me["session_id"], jwt_part(&tokens.access_token, 1)["sid"], "{me}");
    let e = echo(b.get_authed("/svc/x", &tokens.access_token).await).await;
    assert_eq!(e.one("x-user-id"), user_id, "{}", e.0);
    // Both publish the one shared key.
    assert_eq!(a.jwks().await, b.jwks().await);
    // And B's refresh of A's session works too.
    let rotated = b.refresh_ok(&tokens.refresh_token).await;
    a.me_ok(&rotated.access_token).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn logout_on_one_replica_is_refused_by_the_other_within_a_second() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let (a, b) = spawn_replicas(replica_options(&svc)).await;
    push_ready(&b).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let api = a.login_ok(EMAIL, PASSWORD, None).await;
    let proxied = a.login_ok(EMAIL, PASSWORD, None).await;
    let bystander = a.login_ok(EMAIL, PASSWORD, None).await;
    // Both accepted on B first (and cached by B's proxy).
    b.me_ok(&api.access_token).await;
    echo(b.get_authed("/svc/x", &proxied.access_token).await).await;

    // The gateway's own API on B.
    let resp = a.post_authed("/auth/logout", &api.access_token, &json!({})).await;
    let since = Instant::now();
    assert_status(resp, StatusCode::NO_CONTENT).await;
    let (b_ref, token) = (&b, api.access_token.as_str());
    assert_refused_promptly("logout on A, GET /auth/me on B", since, move || b_ref.get_authed("/auth/me", token)).await;

    // A proxied required route on B.
    let resp = a.post_authed("/auth/logout", &proxied.access_token, &json!({})).await;
    let since = Instant::now();
    assert_status(resp, StatusCode::NO_CONTENT).await;
    let token = proxied.access_token.as_str();
    assert_refused_promptly("logout on A, proxied GET /svc/x on B", since, move || b_ref.get_authed("/svc/x", token))
        .await;
    let hits = svc.hits();
    assert_invalid_token(b.get_authed("/svc/x", &proxied.access_token).await).await;
    assert_eq!(svc.hits(), hits, "a revoked token reached the upstream");

    // Only those sessions ended.
    b.me_ok(&bystander.access_token).await;
    echo(b.get_authed("/svc/x", &bystander.access_token).await).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_across_replicas_have_exactly_one_winner() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let (a, b) = spawn_replicas(replica_options(&svc)).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let tokens = a.login_ok(EMAIL, PASSWORD, None).await;

    let responses = join_all((0..10).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.refresh(&tokens.refresh_token)
    }))
    .await;
    let mut winners = 0_usize;
    for (i, resp) in responses.into_iter().enumerate() {
        let replica = if i % 2 == 0 { "A" } else { "B" };
        if resp.status() == StatusCode::OK {
            winners += 1;
            parse_tokens(resp, &format!("winning refresh #{i} on {replica}")).await;
        } else {
            let case = format!("losing refresh #{i} on {replica}");
            assert_error_in(&case, resp, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        }
    }
    assert_eq!(winners, 1, "exactly one of 10 concurrent refreshes on two replicas may succeed");
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn lockout_is_shared_between_replicas() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let (a, b) = spawn_replicas(replica_options(&svc)).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    for attempt in 1..=5 {
        let resp = a.login(EMAIL, WRONG_PASSWORD, None).await;
        assert_error_in(
            &format!("wrong password #{attempt} on A"),
            resp,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        )
        .await;
    }
    let resp = b.login(EMAIL, PASSWORD, None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "the correct password on B after 5 failures on A");
    retry_after_secs(&resp);
    assert_error(resp, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts").await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn user_disabled_by_the_cli_is_refused_by_the_other_replica_within_a_second() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let (a, b) = spawn_replicas(replica_options(&svc)).await;
    push_ready(&b).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    a.create_user("default", "bystander@example.com", PASSWORD, &[], &[]).await;
    let tokens = a.login_ok(EMAIL, PASSWORD, None).await;
    let bystander = a.login_ok("bystander@example.com", PASSWORD, None).await;
    b.me_ok(&tokens.access_token).await;
    echo(b.get_authed("/svc/x", &tokens.access_token).await).await;

    // In-process `gateway user disable` against A's config: neither gateway did it.
    let out = a
        .cli(&["user", "disable", "--tenant", "default", "--email", EMAIL], "")
        .await
        .unwrap_or_else(|e| panic!("user disable failed: {e:#}"));
    let since = Instant::now();
    assert!(out.contains(EMAIL), "{out}");
    let (b_ref, token) = (&b, tokens.access_token.as_str());
    assert_refused_promptly("CLI user disable, proxied GET /svc/x on B", since, move || {
        b_ref.get_authed("/svc/x", token)
    })
    .await;
    assert_invalid_token(b.get_authed("/auth/me", &tokens.access_token).await).await;
    assert_error(b.refresh(&tokens.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
    assert_error(b.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    // Other users are untouched.
    b.me_ok(&bystander.access_token).await;
    b.stop().await;
    a.stop().await;
}

struct RelayState {
    up: bool,
    live: Vec<AbortHandle>,
}

/// A TCP relay in front of the PostgreSQL server that can cut the line.
struct Relay {
    addr: SocketAddr,
    state: Arc<Mutex<RelayState>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1:0 and forwards each connection to `target`.
    async fn start(target: (String, u16)) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let state = Arc::new(Mutex::new(RelayState { up: true, live: Vec::new() }));
        let accept = tokio::spawn(relay_loop(listener, target, Arc::clone(&state)));
        Relay { addr, state, accept }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().expect("relay lock is not poisoned")
    }

    /// Kills every relayed connection; new ones are dropped at once until [`Relay::restore`].
    fn cut(&self) {
        let mut state = self.lock();
        state.up = false;
        for task in state.live.drain(..) {
            task.abort();
        }
    }

    /// Forwards new connections again.
    fn restore(&self) {
        self.lock().up = true;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay_loop(listener: TcpListener, target: (String, u16), state: Arc<Mutex<RelayState>>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Under the lock, so a connection accepted while `cut` runs is either aborted or dropped.
        let mut state = state.lock().expect("relay lock is not poisoned");
        if !state.up {
            drop(client);
            continue;
        }
        state.live.retain(|task| !task.is_finished());
        let target = target.clone();
        let task = tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect((target.0.as_str(), target.1)).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        state.live.push(task.abort_handle());
    }
}

/// GET /readyz on the admin listener: (status, body).
async fn readyz(app: &TestApp) -> (StatusCode, Value) {
    let resp = app.client.get(app.admin_url("/readyz")).send().await.expect("GET /readyz");
    let status = resp.status();
    let text = resp.text().await.expect("read /readyz body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("/readyz body is not JSON ({e}): {text}"));
    (status, body)
}

#[tokio::test]
async fn a_replica_cut_off_from_the_database_serves_valid_tokens_fails_closed_and_recovers() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let cluster = Cluster::new().await;
    let a = cluster.spawn(replica_options(&svc)).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let relay = Relay::start(cluster.server()).await;
    let c = cluster
        .spawn(TestOptions {
            database_url: Some(cluster.database_url_via(relay.addr)),
            database_extra: "acquire_timeout = \"1s\"".to_owned(),
            auth_extra: "revocation_max_staleness = \"3s\"".to_owned(),
            ..replica_options(&svc)
        })
        .await;
    let tokens = c.login_ok(EMAIL, PASSWORD, None).await;
    let iat = jwt_part(&tokens.access_token, 1)["iat"].as_i64().expect("iat is an integer");
    // A second session, which A will revoke while C cannot hear of it.
    let doomed = c.login_ok(EMAIL, PASSWORD, None).await;
    echo(c.get_authed("/svc/x", &tokens.access_token).await).await;
    let (status, body) = readyz(&c).await;
    assert_eq!(status, StatusCode::OK, "C before the outage: {body}");

    relay.cut();
    // Valid tokens keep flowing: the proxy path does no database I/O.
    let e = echo(c.get_authed("/svc/x", &tokens.access_token).await).await;
    assert_eq!(e.path(), "/svc/x", "{}", e.0);
    // Also one C has never seen (issued by A after the cut): verified with
    // the shared keys alone.
    let fresh = a.login_ok(EMAIL, PASSWORD, None).await;
    let e = echo(c.get_authed("/svc/fresh", &fresh.access_token).await).await;
    assert_eq!(e.one("x-session-id"), jwt_part(&fresh.access_token, 1)["sid"].as_str().expect("sid"), "{}", e.0);
    // What needs the database answers 503 promptly instead of hanging.
    let limit = Duration::from_secs(10);
    let resp = tokio::time::timeout(limit, c.login(EMAIL, PASSWORD, None)).await.expect("login answered within 10 s");
    assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    let resp =
        tokio::time::timeout(limit, c.refresh(&tokens.refresh_token)).await.expect("refresh answered within 10 s");
    assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    // Meanwhile A, still connected, revokes the other session.
    assert_status(a.post_authed("/auth/logout", &doomed.access_token, &json!({})).await, StatusCode::NO_CONTENT).await;

    // Past revocation_max_staleness C cannot vouch for what was revoked meanwhile: not ready,
    // and tokens issued before the window (3 s) are refused.
    let c_ref = &c;
    eventually(
        "C's revocation state stale and the token issued over 3 s ago",
        Duration::from_secs(15),
        || async move {
            let (status, body) = readyz(c_ref).await;
            status == StatusCode::SERVICE_UNAVAILABLE && body["revocations_fresh"] == false && now_secs() - iat > 3
        },
    )
    .await;
    let hits = svc.hits();
    assert_invalid_token(c.get_authed("/svc/x", &tokens.access_token).await).await;
    assert_eq!(svc.hits(), hits, "a token C could not vouch for reached the upstream");

    relay.restore();
    eventually("C ready again", Duration::from_secs(15), || async move { readyz(c_ref).await.0 == StatusCode::OK })
        .await;
    let (_, body) = readyz(&c).await;
    assert_eq!(body["revocations_fresh"], true, "{body}");
    echo(c.get_authed("/svc/x", &tokens.access_token).await).await;
    // Fresh again means caught up: the revocation made during the outage holds on C.
    assert_invalid_token(c.get_authed("/svc/x", &doomed.access_token).await).await;
    c.login_ok(EMAIL, PASSWORD, None).await;
    c.refresh_ok(&tokens.refresh_token).await;
    drop(relay);
    c.stop().await;
    a.stop().await;
}

/// `keys generate` on one host, then a reload (what SIGHUP does) on every replica: the new
/// key signs everywhere, tokens signed by the old key keep verifying, and the JWKS of both
/// replicas lists both keys. Replica B talks to PostgreSQL over TLS (`sslmode=require`).
#[tokio::test]
async fn a_generated_key_is_adopted_by_every_replica_on_reload() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let cluster = Cluster::new().await;
    let a = cluster.spawn(replica_options(&svc)).await;
    let tls_url = {
        let mut url = reqwest::Url::parse(&cluster.database_url()).expect("the database URL parses");
        url.query_pairs_mut().append_pair("sslmode", "require");
        url.to_string()
    };
    let b = cluster.spawn(TestOptions { database_url: Some(tls_url), ..replica_options(&svc) }).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let before = a.login_ok(EMAIL, PASSWORD, None).await;
    let old_kid = jwt_part(&before.access_token, 0)["kid"].as_str().expect("kid").to_owned();

    let new_kid = a.cli(&["keys", "generate"], "").await.expect("keys generate").trim().to_owned();
    assert_ne!(new_kid, old_kid);
    a.reloader.reload_keys();
    b.reloader.reload_keys();

    let after = b.login_ok(EMAIL, PASSWORD, None).await;
    assert_eq!(jwt_part(&after.access_token, 0)["kid"], new_kid.as_str(), "B signs with the new key");
    let from_a = a.login_ok(EMAIL, PASSWORD, None).await;
    assert_eq!(jwt_part(&from_a.access_token, 0)["kid"], new_kid.as_str(), "A signs with the new key");
    for app in [&a, &b] {
        app.me_ok(&before.access_token).await;
        app.me_ok(&after.access_token).await;
        echo(app.get_authed("/svc/x", &before.access_token).await).await;
        let jwks = app.jwks().await;
        let kids: Vec<&str> = jwks["keys"].as_array().expect("keys").iter().filter_map(|k| k["kid"].as_str()).collect();
        assert!(kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()), "{jwks}");
    }
    b.stop().await;
    a.stop().await;
}

/// Two replicas starting at the same moment on an empty database: sqlx's migration lock
/// makes them take turns, both come up, and they serve the same users and keys. The key is
/// provisioned first, as the README asks (replicas racing to generate the first key in an
/// empty shared directory could each pick a different signer).
#[tokio::test]
async fn replicas_starting_together_migrate_once() {
    if !postgres_or_skip() {
        return;
    }
    let svc = spawn_upstream("svc").await;
    let cluster = Cluster::new().await;
    let kid = gateway::auth::keys::generate(&cluster.keys_dir()).expect("provision the signing key");
    let (a, b) = tokio::join!(cluster.spawn(replica_options(&svc)), cluster.spawn(replica_options(&svc)));
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let tokens = b.login_ok(EMAIL, PASSWORD, None).await;
    assert_eq!(jwt_part(&tokens.access_token, 0)["kid"], kid.as_str());
    a.me_ok(&tokens.access_token).await;
    let tenants = a.cli(&["tenant", "list"], "").await.expect("tenant list");
    assert_eq!(tenants.lines().filter(|l| l.contains("default")).count(), 1, "{tenants}");
    b.stop().await;
    a.stop().await;
}

/// `database.statement_timeout` reaches every pooled PostgreSQL session.
#[tokio::test]
async fn statement_timeout_is_set_on_pooled_connections() {
    if !postgres_or_skip() {
        return;
    }
    let cluster = Cluster::new().await;
    let url = cluster.database_url();
    let text = format!("[database]\nurl = \"{url}\"\nstatement_timeout = \"1500ms\"\n");
    let config = gateway::config::Config::parse(&text, std::path::Path::new("/tmp/gateway.toml")).expect("config");
    let store = gateway::db::Store::connect(&config.database).await.expect("connect");
    let gateway::db::Pool::Postgres(pool) = store.pool() else { panic!("a PostgreSQL store") };
    let shown: String = sqlx::query_scalar("SHOW statement_timeout").fetch_one(pool).await.expect("SHOW");
    assert_eq!(shown, "1500ms");
    store.close().await;
    // Keep the cluster (and its database) alive until the store is closed.
    drop(cluster);
}
