//! Deliveries the mailer misses are kept (`outbox`) and sent later, with
//! the same `webhook-id`: after the three attempts at once fail, after a
//! restart of the gateway, and by one replica of several. What waits is
//! sealed (no link's token in the clear), and a row the gateway did not
//! seal, or one past its expiry, is never sent.

use std::time::Duration;

use gateway::auth::outbox::aad;
use gateway::auth::seal::SealingKeys;
use gateway::auth::webhook::event;
use gateway::config::Config;
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
        // And the key that sealed it is not to be removed yet.
        let keys = app.cli(&["keys", "list"], "").await.expect("keys list");
        assert!(keys.contains("secrets.key  sealing      holds 0 TOTP secret(s), 1 waiting mailer deliveries"), "{keys}");

        nth(&mailer, 4).await;
        assert_one_event(&mailer.deliveries());
        assert_eq!(sign_in(&app, &token).await, StatusCode::OK, "the late link works");
        eventually("the row goes once sent", Duration::from_secs(10), || async { waiting(&app).await.is_empty() })
            .await;
        assert_eq!(mailer.deliveries().len(), 4, "sent once the mailer took it: {:?}", mailer.deliveries());
        app.stop().await;
    }

    #[tokio::test]
    async fn an_operator_lists_the_waiting_deliveries_and_makes_them_due_now() {
        // Refused at once and at the first retry: the next one would wait
        // 20 seconds.
        let mailer = Mailer::spawn(4).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        ask(&app).await;
        nth(&mailer, 4).await;
        let id = mailer.deliveries()[0].header("webhook-id").to_owned();
        let listed = app.cli(&["mailer", "list"], "").await.expect("mailer list");
        assert!(listed.starts_with(&format!("{id}  login_link.requested  attempts=4 ")), "{listed}");
        assert!(!listed.contains(&mailer.deliveries()[0].token()), "no body, no token: {listed}");
        let hurried = app.cli(&["mailer", "retry"], "").await.expect("mailer retry");
        assert_eq!(hurried.trim(), "1 deliveries due now");
        // Within a sweep or two, well before the 20-second pause ends.
        eventually("the hurried delivery", Duration::from_secs(12), || async { mailer.deliveries().len() >= 5 }).await;
        assert_one_event(&mailer.deliveries());
        eventually("the row goes", Duration::from_secs(10), || async { waiting(&app).await.is_empty() }).await;
        let listed = app.cli(&["mailer", "list"], "").await.expect("mailer list");
        assert_eq!(listed, "", "nothing waits");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_link_spent_meanwhile_is_not_mailed_late() {
        let mailer = Mailer::spawn(3).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        ask(&app).await;
        assert_eq!(results_of(&app, "login_link_requested", 1).await, ["delivery_failed"]);
        // The mailer answered 503 but got the link (say it mailed it all
        // the same), and it is used.
        assert_eq!(sign_in(&app, &mailer.deliveries()[0].token()).await, StatusCode::OK);
        eventually("the row goes", LATE, || async { waiting(&app).await.is_empty() }).await;
        assert_eq!(mailer.deliveries().len(), 3, "a dead link is not mailed again: {:?}", mailer.deliveries());
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
        eventually("the row goes once sent", Duration::from_secs(10), || async { waiting(&app).await.is_empty() })
            .await;
        assert_eq!(mailer.deliveries().len(), 4, "sent once the mailer took it: {:?}", mailer.deliveries());
        app.stop().await;
    }

    #[tokio::test]
    async fn only_what_the_gateway_sealed_for_the_row_is_sent_and_not_once_expired() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, with_links()).await;
        let user_id = Uuid::parse_str(&app.create_user("default", EMAIL, PASSWORD, &[], &[]).await).expect("an id");
        let config = Config::load(&app.config_path).expect("the app's config");
        let keys = SealingKeys::load(&config.auth.keys_dir).expect("the keys").expect("a secrets key");
        let now = unix_now();
        let event = |kind: &str| {
            let body = event(kind, &json!({ "email": EMAIL, "token": "attacker-chosen" }), now).expect("an event");
            String::from_utf8(body.to_vec()).expect("UTF-8")
        };
        let sealed_for = |id: Uuid, kind: &str| keys.seal(&event(kind), &aad(id)).expect("sealed");
        let (control, copied_from) = (Uuid::new_v4(), Uuid::new_v4());
        // Someone who can write to the database, but has not the secrets
        // key, would have the gateway sign a mail of their making: none of
        // these is sent.
        let rows = [
            // In the clear.
            (Uuid::new_v4(), "mfa.enabled", event("mfa.enabled"), now + 3_600),
            // Another row's sealed body.
            (Uuid::new_v4(), "mfa.enabled", sealed_for(copied_from, "mfa.enabled"), now + 3_600),
            // Another sealed value (a TOTP secret is sealed for its user's
            // id) under that id.
            (user_id, "mfa.enabled", keys.seal("JBSWY3DPEHPK3PXP", user_id.as_bytes()).expect("sealed"), now + 3_600),
            // Sealed for the row, but another kind than the row says.
            (Uuid::new_v4(), "mfa.enabled", String::new(), now + 3_600),
            // The gateway's own, but expired.
            (Uuid::new_v4(), "mfa.enabled", String::new(), now - 1),
            // The control: the gateway's own, due: sent.
            (control, "mfa.enabled", sealed_for(control, "mfa.enabled"), now + 3_600),
        ];
        let store = open_store(&app).await;
        for (n, (id, kind, body, expires_at)) in rows.into_iter().enumerate() {
            let body = match n {
                3 => sealed_for(id, "password_reset.requested"),
                4 => sealed_for(id, kind),
                _ => body,
            };
            store.insert_delivery((id, kind, &body), now - 60, now - 1, expires_at).await.expect("insert a row");
        }
        store.close().await;
        eventually("the rows are gone", Duration::from_secs(15), || async { waiting(&app).await.is_empty() }).await;
        let sent = mailer.deliveries();
        assert_eq!(sent.len(), 1, "only the control was sent: {sent:?}");
        assert_eq!(sent[0].header("webhook-id"), format!("msg_{}", control.simple()));
        sent[0].assert_signed();

        // One sealed with a key this gateway has not (another replica's, or
        // one removed too early) waits rather than being dropped.
        let store = open_store(&app).await;
        let unknown_key = "v2:20991231T000000Z:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        store.insert_delivery((Uuid::new_v4(), "mfa.enabled", unknown_key), now, now - 1, now + 3_600).await.expect("insert");
        store.close().await;
        eventually("it was looked at", Duration::from_secs(15), || async {
            let store = open_store(&app).await;
            let rows = store.due_deliveries(i64::MAX, 10).await.expect("the store");
            store.close().await;
            rows.len() == 1 && rows[0].attempts > 1 && rows[0].next_attempt_at > unix_now()
        })
        .await;
        assert_eq!(mailer.deliveries().len(), 1, "and not sent");
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
