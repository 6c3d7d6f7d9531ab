//! Deliveries the mailer misses are kept (`outbox`) and sent later, with
//! the same `webhook-id`: after the three attempts at once fail, after a
//! restart of the gateway, and by one replica of several. What waits is
//! sealed (no link's token in the clear), and a row the gateway did not
//! seal, or one past its expiry, is never sent.

use std::time::Duration;

use gateway::db::unix_now;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{both_backends, eventually, postgres_or_skip, spawn_replicas, TestApp, TestOptions, PASSWORD};
use crate::password_reset::{results_of, spawn_with_mailer, Delivery, Mailer, SECRET};
use crate::user_admin::open_store;

const EMAIL: &str = "patient@example.com";

/// How long a delivery the first attempts missed may take to arrive: the
/// attempts at once (5 s), the pause before the next ([`FIRST_RETRY`]),
/// a sweep, and slack for a loaded machine.
///
/// [`FIRST_RETRY`]: gateway::auth::outbox::FIRST_RETRY
const LATE: Duration = Duration::from_secs(45);

/// Sign-in links are what these tests mail (no other test counts their
/// deliveries in the process's metrics).
fn with_links() -> TestOptions {
    TestOptions { auth_extra: "login_link = { enabled = true }".to_owned(), ..TestOptions::default() }
}

async fn ask(app: &TestApp) {
    let answer = app
        .client
        .post(app.url("/auth/login/link"))
        .json(&json!({ "email": EMAIL }))
        .send()
        .await
        .expect("POST /auth/login/link");
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
}

async fn sign_in(app: &TestApp, token: &str) -> StatusCode {
    let body = json!({ "token": token });
    let answer = app.client.post(app.url("/auth/login/link/confirm")).json(&body).send().await.expect("POST confirm");
    answer.status()
}

/// Waits for the mailer's `n`th delivery, however late.
async fn nth(mailer: &Mailer, n: usize) -> Delivery {
    eventually("a late delivery", LATE, || async { mailer.deliveries().len() >= n }).await;
    mailer.deliveries()[n - 1].clone()
}

/// The deliveries waiting in the gateway's table: (kind, body as stored).
async fn waiting(app: &TestApp) -> Vec<(String, String)> {
    let store = open_store(app).await;
    let due = store.due_deliveries(i64::MAX, 100).await.expect("the store");
    store.close().await;
    due.into_iter().map(|d| (d.kind, d.body)).collect()
}

/// Every delivery is the same event with the same id, and the last one is
/// a valid signature of its own time.
fn assert_one_event(deliveries: &[Delivery]) {
    let first = &deliveries[0];
    for d in deliveries {
        assert_eq!(d.header("webhook-id"), first.header("webhook-id"), "one id on every attempt");
        assert_eq!(d.json(), first.json(), "the same event on every attempt");
    }
    deliveries.last().expect("one at least").assert_signed();
}

both_backends! {
    #[tokio::test]
    async fn a_delivery_the_mailer_missed_is_sent_later_with_the_same_id() {
        // The three attempts at once are answered 503; the one after the
        // pause is taken.
        let mailer = Mailer::spawn(3).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        ask(&app).await;
        assert_eq!(results_of(&app, "login_link_requested", 1).await, ["delivery_failed"]);

        // It waits sealed: the token is not in the database in the clear.
        let token = mailer.deliveries()[0].token();
        let kept = waiting(&app).await;
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].0, "login_link.requested");
        assert!(kept[0].1.starts_with("v1:") || kept[0].1.starts_with("v2:"), "sealed: {}", kept[0].1);
        assert!(!kept[0].1.contains(&token), "the token is not stored in the clear");

        nth(&mailer, 4).await;
        assert_one_event(&mailer.deliveries());
        assert_eq!(sign_in(&app, &token).await, StatusCode::OK, "the late link works");
        eventually("the row goes once sent", Duration::from_secs(10), || async { waiting(&app).await.is_empty() })
            .await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_waiting_delivery_survives_a_restart() {
        let mailer = Mailer::spawn(3).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        ask(&app).await;
        assert_eq!(results_of(&app, "login_link_requested", 1).await, ["delivery_failed"]);
        let app = app.restart().await;
        assert_eq!(waiting(&app).await.len(), 1, "kept across the stop");
        nth(&mailer, 4).await;
        assert_one_event(&mailer.deliveries());
        assert_eq!(sign_in(&app, &mailer.deliveries()[3].token()).await, StatusCode::OK);
        app.stop().await;
    }

    #[tokio::test]
    async fn what_the_gateway_did_not_seal_or_what_expired_is_never_sent() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        // Someone who can write to the database, but has not the secrets
        // key, would have the gateway sign a mail of their making.
        let forged = json!({
            "type": "password_reset.requested",
            "timestamp": "2026-01-01T00:00:00Z",
            "data": { "email": "victim@example.com", "token": "attacker-chosen" },
        })
        .to_string();
        let store = open_store(&app).await;
        let now = unix_now();
        let rows = [(Uuid::new_v4(), forged.as_str(), now + 3_600), (Uuid::new_v4(), "v1:AAAA", now - 1)];
        for (id, body, expires_at) in rows {
            store
                .insert_delivery((id, "password_reset.requested", body), now - 60, now - 1, expires_at)
                .await
                .expect("insert a row");
        }
        store.close().await;
        eventually("the rows are dropped", Duration::from_secs(15), || async { waiting(&app).await.is_empty() }).await;
        assert!(mailer.deliveries().is_empty(), "nothing was sent: {:?}", mailer.deliveries());
        app.stop().await;
    }

    #[tokio::test]
    async fn of_two_gateways_that_read_a_due_delivery_one_takes_it() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        let store = open_store(&app).await;
        let now = unix_now();
        // Due an hour from now: the gateway's own sweeps leave it alone.
        let later = now + 3_600;
        store.insert_delivery((Uuid::new_v4(), "mfa.enabled", "v1:AAAA"), now, later, later + 60).await.expect("insert");
        let read = store.due_deliveries(later, 10).await.expect("the store");
        assert_eq!(read.len(), 1);
        // Both read the row as it was; the first moves it, the second
        // finds it moved.
        assert!(store.take_delivery(&read[0], later + 60).await.expect("the store"));
        assert!(!store.take_delivery(&read[0], later + 60).await.expect("the store"));
        let again = store.due_deliveries(later + 60, 10).await.expect("the store");
        assert_eq!(again[0].attempts, read[0].attempts + 1, "the attempt is counted");
        store.close().await;
        app.stop().await;
    }
}

/// Two replicas sweep one table: a delivery waiting there is sent once.
#[tokio::test]
async fn replicas_send_a_waiting_delivery_once() {
    if !postgres_or_skip() {
        return;
    }
    let mailer = Mailer::spawn(3).await;
    let secret_dir = tempfile::tempdir().expect("a temp dir");
    let secret = secret_dir.path().join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write the secret");
    let auth_extra = format!(
        "login_link = {{ enabled = true }}\nmailer = {{ webhook = \"{}\", webhook_secret_file = \"{}\" }}",
        mailer.url(),
        secret.to_str().expect("a UTF-8 path")
    );
    let (a, b) = spawn_replicas(TestOptions { auth_extra, ..TestOptions::default() }).await;
    a.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    ask(&a).await;
    nth(&mailer, 4).await;
    // Several sweeps of both replicas later, still one late delivery.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(mailer.deliveries().len(), 4, "{:?}", mailer.deliveries());
    assert_one_event(&mailer.deliveries());
    assert!(waiting(&b).await.is_empty());
    a.stop().await;
    b.stop().await;
}
