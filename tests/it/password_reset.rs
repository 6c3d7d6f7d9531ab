//! Password reset links: `POST /auth/password/forgot` hands a link's token
//! to the operator's mailer (a signed Standard Webhooks POST, received here
//! by a real hyper server), `gateway user reset-token` prints one, and `POST
//! /auth/password/reset` spends it once: the password is set, every session
//! revoked, the lockout cleared, the second factor kept. `forgot` answers
//! alike for every email and sends nothing for unknown or disabled
//! accounts; links die when replaced, when the password changes and when
//! they expire.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use gateway::auth::totp::{code, step_at};
use gateway::db::unix_now;
use hmac::{Hmac, Mac as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use gateway::db::email_links::{LinkMade, LinkPurpose, NewLink};
use gateway::db::Store;

use crate::helpers::{
    assert_error, assert_invalid_token, both_backends, eventually, expect_json, spawn_app_in, spawn_app_with, TestApp,
    TestOptions, OTHER_PASSWORD, PASSWORD, WRONG_PASSWORD,
};

const EMAIL: &str = "forgetful@example.com";
/// A Standard Webhooks secret (the specification's test key).
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One POST the mailer received.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    headers: HeaderMap,
    body: Bytes,
}

impl Delivery {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} field"))
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub(crate) fn token(&self) -> String {
        self.json()["data"]["token"].as_str().expect("a token").to_owned()
    }

    /// Checks the signature as a receiver would, with its own HMAC.
    pub(crate) fn assert_signed(&self) {
        let key = STANDARD.decode(SECRET.trim_start_matches("whsec_")).expect("base64");
        let mut mac = <Hmac<Sha256>>::new_from_slice(&key).expect("a key");
        let signed = format!("{}.{}.", self.header("webhook-id"), self.header("webhook-timestamp"));
        mac.update(signed.as_bytes());
        mac.update(&self.body);
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(self.header("webhook-signature"), expected, "the signature over id, timestamp and body");
        let timestamp: i64 = self.header("webhook-timestamp").parse().expect("unix seconds");
        assert!((timestamp - unix_now()).abs() < 60, "a current timestamp: {timestamp}");
    }
}

/// A mailer's webhook endpoint on 127.0.0.1:0: records every POST and
/// answers 503 to the first `failures` of them, 200 to the rest.
pub(crate) struct Mailer {
    addr: SocketAddr,
    https: bool,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    task: JoinHandle<()>,
}

impl Drop for Mailer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mailer {
    pub(crate) async fn spawn(failures: usize) -> Mailer {
        Self::spawn_with(failures, None).await
    }

    /// Over TLS with `acceptor`, when given.
    async fn spawn_with(failures: usize, acceptor: Option<tokio_rustls::TlsAcceptor>) -> Mailer {
        let https = acceptor.is_some();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the mailer");
        let addr = listener.local_addr().expect("the mailer's address");
        let deliveries: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let log = Arc::clone(&deliveries);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (log, seen, acceptor) = (Arc::clone(&log), Arc::clone(&seen), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (log, seen) = (Arc::clone(&log), Arc::clone(&seen));
                        async move {
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            log.lock().expect("the log").push(Delivery { headers, body });
                            let status = if seen.fetch_add(1, Ordering::SeqCst) < failures { 503 } else { 200 };
                            let answer = Response::builder().status(status).body(Full::new(Bytes::new()));
                            Ok::<_, Infallible>(answer.expect("an answer"))
                        }
                    });
                    let connection = http1::Builder::new();
                    let _ = match acceptor {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => connection.serve_connection(TokioIo::new(tls), service).await,
                            Err(_) => return,
                        },
                        None => connection.serve_connection(TokioIo::new(stream), service).await,
                    };
                });
            }
        });
        Mailer { addr, https, deliveries, task }
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/hooks/mail?key=mailer-own-key", self.addr)
    }

    pub(crate) fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().expect("the log").clone()
    }

    /// Waits for the `n`th delivery and returns it.
    pub(crate) async fn delivery(&self, n: usize) -> Delivery {
        eventually("a webhook delivery", Duration::from_secs(15), || async { self.deliveries().len() >= n }).await;
        self.deliveries()[n - 1].clone()
    }
}

/// A gateway whose `forgot` sends links to `mailer`.
pub(crate) async fn spawn_with_mailer(mailer: &Mailer, options: TestOptions) -> TestApp {
    spawn_with_mailer_in(tempfile::tempdir().expect("a temp dir"), mailer, options).await
}

async fn spawn_with_mailer_in(dir: tempfile::TempDir, mailer: &Mailer, options: TestOptions) -> TestApp {
    spawn_with_webhook_in(dir, &mailer.url(), options).await
}

async fn spawn_with_webhook_in(dir: tempfile::TempDir, url: &str, options: TestOptions) -> TestApp {
    spawn_with_webhook_settings(dir, url, "", options).await
}

/// A gateway whose mailer is `mailer`, with `settings` (`key = value, `
/// pairs) added to `[auth.mailer]`.
pub(crate) async fn spawn_with_mailer_settings(mailer: &Mailer, settings: &str, options: TestOptions) -> TestApp {
    spawn_with_webhook_settings(tempfile::tempdir().expect("a temp dir"), &mailer.url(), settings, options).await
}

async fn spawn_with_webhook_settings(
    dir: tempfile::TempDir,
    url: &str,
    settings: &str,
    options: TestOptions,
) -> TestApp {
    std::fs::write(dir.path().join("webhook.secret"), format!("{SECRET}\n")).expect("write the secret");
    let reset = format!("mailer = {{ {settings}webhook = \"{url}\", webhook_secret_file = \"webhook.secret\" }}\n");
    let options = TestOptions { auth_extra: format!("{}\n{reset}", options.auth_extra), ..options };
    spawn_app_in(dir, options).await
}

async fn forgot(app: &TestApp, body: Value) -> reqwest::Response {
    app.client.post(app.url("/auth/password/forgot")).json(&body).send().await.expect("POST /auth/password/forgot")
}

async fn reset(app: &TestApp, token: &str, password: &str) -> reqwest::Response {
    let body = json!({ "token": token, "new_password": password });
    app.client.post(app.url("/auth/password/reset")).json(&body).send().await.expect("POST /auth/password/reset")
}

/// The audit events named `event`, newest first.
pub(crate) async fn audit_events(app: &TestApp, event: &str) -> Vec<Value> {
    let out = app.cli(&["audit", "list", "--json", "--event", event, "--limit", "100"], "").await.expect("audit list");
    out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// Waits until `n` `password_reset_requested` events are recorded; returns
/// their results, oldest first.
async fn request_results(app: &TestApp, n: usize) -> Vec<String> {
    results_of(app, "password_reset_requested", n).await
}

/// Waits until `n` `event`s (link requests) are recorded; returns their
/// results, oldest first.
pub(crate) async fn results_of(app: &TestApp, event: &str, n: usize) -> Vec<String> {
    eventually("the link requests are audited", Duration::from_secs(15), || async {
        audit_events(app, event).await.len() >= n
    })
    .await;
    let events = audit_events(app, event).await;
    events.iter().rev().map(|e| e["detail"]["result"].as_str().expect("a result").to_owned()).collect()
}

async fn reset_token(app: &TestApp, email: &str) -> String {
    let out = app.cli(&["user", "reset-token", "--tenant", "default", "--email", email], "").await;
    out.expect("user reset-token").trim().to_owned()
}

both_backends! {
    #[tokio::test]
    async fn a_mailed_link_sets_the_password_once_and_ends_every_session() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let before = app.login_ok(EMAIL, PASSWORD, None).await;

        let answer = forgot(&app, json!({ "email": "  Forgetful@Example.com " })).await;
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        let delivery = mailer.delivery(1).await;
        delivery.assert_signed();
        assert_eq!(delivery.header("content-type"), "application/json");
        let event = delivery.json();
        assert_eq!(event["type"], "password_reset.requested", "{event}");
        assert_eq!(event["data"]["email"], EMAIL, "{event}");
        assert_eq!(event["data"]["tenant"], "default", "{event}");
        assert_eq!(event["data"]["user_id"], user_id.as_str(), "{event}");
        assert!(event["data"]["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
        let token = delivery.token();
        assert_eq!(token.len(), 43, "256 bits, base64url");

        assert_eq!(reset(&app, &token, OTHER_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        // Every session is over: its access token is refused at once, its
        // refresh token mints nothing.
        assert_invalid_token(app.get_authed("/auth/me", &before.access_token).await).await;
        assert_error(app.refresh(&before.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        app.login_ok(EMAIL, OTHER_PASSWORD, None).await;
        // Once only.
        assert_error(reset(&app, &token, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        app.login_ok(EMAIL, OTHER_PASSWORD, None).await;

        assert_eq!(request_results(&app, 1).await, ["sent"]);
        let done = audit_events(&app, "password_reset").await;
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0]["detail"]["sessions_revoked"], 1, "{done:?}");
        let all = app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list");
        assert!(!all.contains(&token), "the audit log never holds a link's token");
        app.stop().await;
    }

    #[tokio::test]
    async fn forgot_answers_alike_and_sends_nothing_for_unknown_or_disabled_accounts() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.create_user("default", "disabled@example.com", PASSWORD, &[], &[]).await;
        app.cli(&["user", "disable", "--tenant", "default", "--email", "disabled@example.com"], "")
            .await
            .expect("user disable");
        app.create_tenant("closed").await;
        app.create_user("closed", EMAIL, PASSWORD, &[], &[]).await;
        app.cli(&["tenant", "disable", "closed"], "").await.expect("tenant disable");

        let asks = [
            json!({ "email": "nobody@example.com" }),
            json!({ "email": EMAIL, "tenant": "no-such-tenant" }),
            json!({ "email": "disabled@example.com" }),
            json!({ "email": EMAIL, "tenant": "closed" }),
        ];
        for ask in &asks {
            let answer = forgot(&app, ask.clone()).await;
            assert_eq!(answer.status(), StatusCode::ACCEPTED, "{ask}");
            assert_eq!(answer.text().await.expect("a body"), "", "{ask}: the same empty answer");
            // One at a time, so that the audit order is the asking order.
            let n = asks.iter().position(|a| a == ask).expect("listed") + 1;
            request_results(&app, n).await;
        }
        assert_eq!(
            request_results(&app, asks.len()).await,
            ["unknown_user", "unknown_tenant", "user_disabled", "tenant_disabled"]
        );
        assert!(mailer.deliveries().is_empty(), "nothing was sent: {:?}", mailer.deliveries());

        // Shapes a client got wrong are told at once.
        assert_error(forgot(&app, json!({ "email": "not-an-email" })).await, StatusCode::BAD_REQUEST, "invalid_request").await;
        let bad_tenant = json!({ "email": EMAIL, "tenant": "Not A Slug!" });
        assert_error(forgot(&app, bad_tenant).await, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert_error(forgot(&app, json!({ "mail": EMAIL })).await, StatusCode::BAD_REQUEST, "invalid_request").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn one_mail_a_minute_and_only_the_newest_link_works() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
        let mailed = mailer.delivery(1).await.token();
        request_results(&app, 1).await;
        assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
        assert_eq!(request_results(&app, 2).await, ["sent", "throttled"]);
        assert_eq!(mailer.deliveries().len(), 1, "the second request within a minute sent nothing");

        // An operator's link replaces the mailed one.
        let handed = reset_token(&app, EMAIL).await;
        assert_ne!(handed, mailed);
        assert_error(reset(&app, &mailed, OTHER_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        assert_eq!(reset(&app, &handed, OTHER_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        app.login_ok(EMAIL, OTHER_PASSWORD, None).await;
        let failed = audit_events(&app, "password_reset_failed").await;
        assert_eq!(failed[0]["detail"]["reason"], "unknown_link", "{failed:?}");

        // Asked for at the same moment, a link is still made once.
        app.create_user("default", "twice@example.com", PASSWORD, &[], &[]).await;
        let ask = json!({ "email": "twice@example.com" });
        let (a, b) = tokio::join!(forgot(&app, ask.clone()), forgot(&app, ask.clone()));
        assert_eq!((a.status(), b.status()), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
        let mut results = request_results(&app, 5).await.split_off(3);
        results.sort();
        assert_eq!(results, ["sent", "throttled"]);
        let links = mailer.deliveries().iter().filter(|d| d.json()["type"] == "password_reset.requested").count();
        assert_eq!(links, 2, "one link per user (the reset's notice aside)");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_failing_mailer_is_tried_again_with_the_same_message_id() {
        let mailer = Mailer::spawn(1).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
        let (first, second) = (mailer.delivery(1).await, mailer.delivery(2).await);
        second.assert_signed();
        assert_eq!(first.header("webhook-id"), second.header("webhook-id"), "one message, delivered twice");
        assert_eq!(first.body, second.body);
        assert_eq!(request_results(&app, 1).await, ["sent"]);
        assert_eq!(reset(&app, &second.token(), OTHER_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        app.stop().await;
    }

    /// A delivery under way when the gateway stops (here waiting for its
    /// retry) goes out, within the shutdown grace, and is audited.
    #[tokio::test]
    async fn a_stop_waits_for_deliveries_under_way() {
        let mailer = Mailer::spawn(1).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
        mailer.delivery(1).await;
        // A restart stops the gateway (and its drain) before starting anew.
        let app = app.restart().await;
        assert_eq!(mailer.deliveries().len(), 2, "the retry went out before the gateway stopped");
        let events = audit_events(&app, "password_reset_requested").await;
        assert_eq!(events.len(), 1, "audited before the database closed: {events:?}");
        assert_eq!(events[0]["detail"]["result"], "sent");
        app.stop().await;
    }

    #[tokio::test]
    async fn links_die_with_a_password_change_a_disable_and_their_expiry() {
        let app = spawn_app_with(TestOptions {
            auth_extra: "password_reset = { token_ttl = \"2s\" }".to_owned(),
            ..TestOptions::default()
        })
        .await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        // The user remembered and changed the password: the link is dead.
        let token = reset_token(&app, EMAIL).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let change = json!({ "current_password": PASSWORD, "new_password": OTHER_PASSWORD });
        assert_eq!(app.post_authed("/auth/password", &tokens.access_token, &change).await.status(), StatusCode::NO_CONTENT);
        assert_error(reset(&app, &token, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        let failed = audit_events(&app, "password_reset_failed").await;
        assert_eq!(failed[0]["detail"]["reason"], "password_changed", "{failed:?}");

        // A disable voids the user's links: enabled again, the user asks for a new one.
        let token = reset_token(&app, EMAIL).await;
        app.cli(&["user", "disable", "--tenant", "default", "--email", EMAIL], "").await.expect("user disable");
        let refused = app.cli(&["user", "reset-token", "--tenant", "default", "--email", EMAIL], "").await;
        assert!(refused.expect_err("a disabled user").to_string().contains("disabled"), "says why");
        assert_error(reset(&app, &token, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        app.cli(&["user", "enable", "--tenant", "default", "--email", EMAIL], "").await.expect("user enable");
        assert_error(reset(&app, &token, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        let failed = audit_events(&app, "password_reset_failed").await;
        assert_eq!(failed[0]["detail"]["reason"], "unknown_link", "voided: {failed:?}");
        assert_eq!(failed[1]["detail"]["reason"], "unknown_link", "voided: {failed:?}");
        let refused = app.cli(&["user", "reset-token", "--tenant", "default", "--email", "nobody@example.com"], "").await;
        assert!(refused.expect_err("an unknown email").to_string().contains("email:"), "names the field");

        // So does a tenant disable.
        app.create_tenant("closing").await;
        app.create_user("closing", EMAIL, PASSWORD, &[], &[]).await;
        let out = app.cli(&["user", "reset-token", "--tenant", "closing", "--email", EMAIL], "").await;
        let closing = out.expect("user reset-token").trim().to_owned();
        app.cli(&["tenant", "disable", "closing"], "").await.expect("tenant disable");
        app.cli(&["tenant", "enable", "closing"], "").await.expect("tenant enable");
        assert_error(reset(&app, &closing, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        app.login_ok(EMAIL, PASSWORD, Some("closing")).await;

        // Expired.
        let token = reset_token(&app, EMAIL).await;
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert_error(reset(&app, &token, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        app.login_ok(EMAIL, OTHER_PASSWORD, None).await;
        let long = "A".repeat(500);
        for garbage in ["", "x", long.as_str()] {
            assert_error(reset(&app, garbage, WRONG_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        }
        // `forgot` is off without a mailer.
        assert_error(forgot(&app, json!({ "email": EMAIL })).await, StatusCode::NOT_FOUND, "not_found").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_weak_password_spends_nothing_and_a_reset_lifts_the_lockout_but_keeps_the_second_factor() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 3, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let setup = expect_json(
            app.post_authed("/auth/mfa/totp", &tokens.access_token, &json!({ "password": PASSWORD })).await,
            StatusCode::OK,
        )
        .await;
        let secret = setup["secret"].as_str().expect("a secret").to_owned();
        let now_code = |steps: i64| code(&secret, step_at(unix_now()) + steps).expect("a code");
        let confirm = json!({ "code": now_code(0) });
        expect_json(app.post_authed("/auth/mfa/totp/confirm", &tokens.access_token, &confirm).await, StatusCode::OK).await;
        for _ in 0..3 {
            app.login(EMAIL, WRONG_PASSWORD, None).await;
        }
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts").await;

        let token = reset_token(&app, EMAIL).await;
        assert_error(reset(&app, &token, "short").await, StatusCode::BAD_REQUEST, "weak_password").await;
        assert_eq!(reset(&app, &token, OTHER_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        // The lock is lifted, and the second factor is still asked for.
        assert_error(app.login(EMAIL, OTHER_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "mfa_required").await;
        let body = json!({ "email": EMAIL, "password": OTHER_PASSWORD, "otp": now_code(1) });
        let login = app.client.post(app.url("/auth/login")).json(&body).send().await.expect("POST /auth/login");
        expect_json(login, StatusCode::OK).await;
        app.stop().await;
    }

    /// Links for one user made at the same moment, on every connection of
    /// the pool: one is made, the rest are throttled (on PostgreSQL the
    /// user's row is locked first, or two inserts could each miss the
    /// other's uncommitted row).
    #[tokio::test]
    async fn links_made_at_once_for_one_user_are_one_link() {
        let app = spawn_app_with(TestOptions::default()).await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = crate::user_admin::open_store(&app).await;
        let user = store
            .user_by_id(default_tenant(&store).await, user_id.parse().expect("a uuid"))
            .await
            .expect("the store")
            .expect("the user");
        for round in 0..3 {
            let made = futures::future::join_all((0..16).map(|i| {
                let (store, user) = (store.clone(), user.clone());
                async move {
                    let hash = [u8::try_from(round * 16 + i).expect("small"); 32];
                    store
                        .create_email_link(NewLink {
                            purpose: LinkPurpose::PasswordReset,
                            tenant_id: user.tenant_id,
                            user_id: user.id,
                            token_hash: &hash,
                            fingerprint: &[0; 32],
                            new_email: None,
                            code_challenge: None,
                            now: unix_now() + round * 120,
                            expires_at: unix_now() + 3600,
                            min_interval: 60,
                        })
                        .await
                        .expect("the store")
                }
            }))
            .await;
            let made = made.iter().filter(|m| **m == LinkMade::Made).count();
            assert_eq!(made, 1, "round {round}: one link of sixteen at once");
        }
        store.close().await;
        app.stop().await;
    }

    #[tokio::test]
    async fn two_requests_with_one_link_set_one_password() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        for _ in 0..3 {
            let token = reset_token(&app, EMAIL).await;
            let (a, b) = tokio::join!(reset(&app, &token, OTHER_PASSWORD), reset(&app, &token, WRONG_PASSWORD));
            let statuses = [a.status(), b.status()];
            let won = statuses.iter().filter(|s| **s == StatusCode::NO_CONTENT).count();
            assert_eq!(won, 1, "exactly one request sets the password: {statuses:?}");
            let winner = if a.status() == StatusCode::NO_CONTENT { OTHER_PASSWORD } else { WRONG_PASSWORD };
            let loser = if winner == OTHER_PASSWORD { b } else { a };
            assert_error(loser, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
            app.login_ok(EMAIL, winner, None).await;
        }
        app.stop().await;
    }
}

/// The mailer is a backend like the upstreams: over HTTPS its certificate
/// is verified with their roots and `upstream.ca_file`. An untrusted one is
/// sent nothing (the handshake fails, three times), and the request is
/// audited as `delivery_failed`.
#[tokio::test]
async fn an_https_mailer_is_verified_like_an_upstream() {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("a self-signed certificate");
    let tls = crate::upstream::tls_config(&cert.pem(), &key_pair.serialize_pem());
    let mailer = Mailer::spawn_with(0, Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))).await;

    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
    let trusting = TestOptions::with_extra("[upstream]\nca_file = \"ca.pem\"\n");
    let app = spawn_with_mailer_in(dir, &mailer, trusting).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
    let delivery = mailer.delivery(1).await;
    delivery.assert_signed();
    assert_eq!(request_results(&app, 1).await, ["sent"]);
    app.stop().await;

    let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
    assert_eq!(request_results(&app, 1).await, ["delivery_failed"]);
    assert_eq!(mailer.deliveries().len(), 1, "nothing reached an untrusted mailer");
    let metrics = app.metrics().await;
    let failed =
        crate::helpers::metric(&metrics, "gateway_password_reset_requests_total", &[("result", "delivery_failed")]);
    assert_eq!(failed, 1.0, "{metrics}");
    app.stop().await;
}

/// `forgot` answers before its work is done: with a mailer that never
/// takes the connection (each attempt waits out the connect timeout), the
/// 202 is back while the request is still unrecorded, its delivery pending.
#[tokio::test]
async fn forgot_answers_before_the_work_is_done() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let app = spawn_with_webhook_in(dir, &crate::upstream::hanging_upstream_url(), TestOptions::default()).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    assert_eq!(forgot(&app, json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
    assert!(
        audit_events(&app, "password_reset_requested").await.is_empty(),
        "the answer came before the delivery ended"
    );
    app.stop().await;
}

async fn default_tenant(store: &Store) -> uuid::Uuid {
    store.tenant_by_slug("default").await.expect("the store").expect("the default tenant").id
}
