//! Security notices: with a mailer, the owner's mailbox is told when the
//! password, the email or the second factor changes (a signed delivery
//! with no credential in it, saying from which address), so that a change
//! an intruder made is noticed; `auth.mailer.notices = false` leaves only
//! the links.

use std::time::Duration;

use gateway::auth::totp::{code, step_at};
use gateway::db::unix_now;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{both_backends, eventually, expect_json, TestApp, TestOptions, OTHER_PASSWORD, PASSWORD};
use crate::password_reset::{spawn_with_mailer, spawn_with_mailer_settings, Mailer};

const EMAIL: &str = "watchful@example.com";

/// Waits for a delivery of `kind` and returns its body.
async fn notice(mailer: &Mailer, kind: &str) -> Value {
    let find = || mailer.deliveries().into_iter().find(|d| d.json()["type"] == kind);
    eventually("the notice is delivered", Duration::from_secs(15), || async { find().is_some() }).await;
    let delivery = find().expect("a delivery");
    delivery.assert_signed();
    delivery.json()
}

/// The notice names the account and where the change came from, and
/// carries nothing that could act on it.
fn assert_about_the_owner(notice: &Value, email: &str) {
    let data = &notice["data"];
    assert_eq!(data["email"], email, "{notice}");
    assert_eq!(data["tenant"], "default", "{notice}");
    assert_eq!(data["ip"], "127.0.0.1", "{notice}");
    assert!(data["user_id"].as_str().is_some_and(|id| id.len() == 36), "{notice}");
    assert!(data.get("token").is_none(), "a notice carries no credential: {notice}");
    assert!(data.get("user_agent").is_none(), "nor text a client chose: {notice}");
}

async fn spawn(mailer: &Mailer, auth_extra: &str) -> (TestApp, String) {
    let options = TestOptions { auth_extra: auth_extra.to_owned(), ..TestOptions::default() };
    let app = spawn_with_mailer(mailer, options).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let access = app.login_ok(EMAIL, PASSWORD, None).await.access_token;
    (app, access)
}

both_backends! {
    #[tokio::test]
    async fn the_owner_is_told_of_password_and_second_factor_changes() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer, "").await;

        let change = json!({ "current_password": PASSWORD, "new_password": OTHER_PASSWORD });
        assert_eq!(app.post_authed("/auth/password", &access, &change).await.status(), StatusCode::NO_CONTENT);
        let changed = notice(&mailer, "password.changed").await;
        assert_about_the_owner(&changed, EMAIL);
        assert_eq!(changed["data"]["via"], "password_change", "{changed}");

        let start = json!({ "password": OTHER_PASSWORD });
        let setup = expect_json(app.post_authed("/auth/mfa/totp", &access, &start).await, StatusCode::OK).await;
        let secret = setup["secret"].as_str().expect("a secret");
        let confirm = json!({ "code": code(secret, step_at(unix_now())).expect("a code") });
        let confirmed = expect_json(app.post_authed("/auth/mfa/totp/confirm", &access, &confirm).await, StatusCode::OK).await;
        let recovery: Vec<&str> = confirmed["recovery_codes"].as_array().expect("codes").iter().filter_map(Value::as_str).collect();
        assert_about_the_owner(&notice(&mailer, "mfa.enabled").await, EMAIL);

        let again = json!({ "password": OTHER_PASSWORD, "code": recovery[0] });
        let fresh = expect_json(app.post_authed("/auth/mfa/recovery-codes", &access, &again).await, StatusCode::OK).await;
        assert_about_the_owner(&notice(&mailer, "mfa.recovery_codes_regenerated").await, EMAIL);
        let remove = json!({ "password": OTHER_PASSWORD, "code": fresh["recovery_codes"][0] });
        assert_eq!(app.post_authed("/auth/mfa/totp/disable", &access, &remove).await.status(), StatusCode::NO_CONTENT);
        assert_about_the_owner(&notice(&mailer, "mfa.disabled").await, EMAIL);

        // One of a kind a minute: a second change is not told again.
        let back = json!({ "current_password": OTHER_PASSWORD, "new_password": PASSWORD });
        assert_eq!(app.post_authed("/auth/password", &access, &back).await.status(), StatusCode::NO_CONTENT);

        // A reset by a mailed link is told too (another user: one a minute).
        app.create_user("default", "second@example.com", PASSWORD, &[], &[]).await;
        let resp = app.client.post(app.url("/auth/password/forgot")).json(&json!({ "email": "second@example.com" })).send().await;
        assert_eq!(resp.expect("POST forgot").status(), StatusCode::ACCEPTED);
        let link = notice(&mailer, "password_reset.requested").await;
        let reset = json!({ "token": link["data"]["token"], "new_password": OTHER_PASSWORD });
        let resp = app.client.post(app.url("/auth/password/reset")).json(&reset).send().await;
        assert_eq!(resp.expect("POST reset").status(), StatusCode::NO_CONTENT);
        app.stop().await;
        let told: Vec<Value> = mailer.deliveries().iter().map(|d| d.json()).filter(|n| n["type"] == "password.changed").collect();
        assert_eq!(told.len(), 2, "the first change and the reset: {told:?}");
        assert_eq!(told[1]["data"]["via"], "password_reset", "{told:?}");
        assert_about_the_owner(&told[1], "second@example.com");
        assert_eq!(mailer.deliveries().len(), 6, "one delivery per change told, and the link");
    }

    #[tokio::test]
    async fn with_notices_off_only_links_are_mailed() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer_settings(&mailer, "notices = false, ", TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let access = app.login_ok(EMAIL, PASSWORD, None).await.access_token;
        let change = json!({ "current_password": PASSWORD, "new_password": OTHER_PASSWORD });
        assert_eq!(app.post_authed("/auth/password", &access, &change).await.status(), StatusCode::NO_CONTENT);
        // A link asked for after the change is still mailed, and is the only delivery.
        let resp = app.client.post(app.url("/auth/password/forgot")).json(&json!({ "email": EMAIL })).send().await;
        assert_eq!(resp.expect("POST forgot").status(), StatusCode::ACCEPTED);
        notice(&mailer, "password_reset.requested").await;
        app.stop().await;
        let kinds: Vec<Value> = mailer.deliveries().iter().map(|d| d.json()["type"].clone()).collect();
        assert_eq!(kinds, ["password_reset.requested"]);
    }

    /// Guesses that lock the logins are told to the owner (once a lock),
    /// with where the attempt that started it came from; guesses at an
    /// address with no account tell no one.
    #[tokio::test]
    async fn the_owner_is_told_when_failed_attempts_lock_the_account() {
        let mailer = Mailer::spawn(0).await;
        let options = TestOptions { lockout_threshold: 3, ..TestOptions::default() };
        let app = spawn_with_mailer(&mailer, options).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        for email in ["nobody@example.com", EMAIL] {
            for _ in 0..4 {
                let resp = app.login(email, OTHER_PASSWORD, None).await;
                assert!(matches!(resp.status().as_u16(), 401 | 429), "{}", resp.status());
            }
        }
        let locked = notice(&mailer, "account.locked").await;
        assert_about_the_owner(&locked, EMAIL);
        assert_eq!(locked["data"]["via"], "login", "{locked}");
        let until = humantime::parse_rfc3339(locked["data"]["locked_until"].as_str().expect("an end")).expect("RFC 3339");
        assert!(until > std::time::SystemTime::now() + Duration::from_secs(60), "{locked}");
        app.stop().await;
        let kinds: Vec<Value> = mailer.deliveries().iter().map(|d| d.json()["type"].clone()).collect();
        assert_eq!(kinds, ["account.locked"], "one notice, for the account that exists");
    }
}
