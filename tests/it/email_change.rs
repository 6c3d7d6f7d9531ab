//! Email change: a signed-in user asks for a move to another address with
//! `POST /auth/email/change` (access token and password); the link goes to
//! the new address through the operator's mailer, and `POST
//! /auth/email/change/confirm` with it and the password moves the account
//! there, verified, and tells the old address. The link dies with a
//! password change, works once, loses to whoever took the address
//! meanwhile, and voids the links mailed to the old address. `gateway user
//! set-email` moves a user on the operator's word.

use std::time::Duration;

use gateway::auth::totp::{code, step_at};
use gateway::db::unix_now;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, both_backends, eventually, expect_json, retry_after_secs, spawn_app, TestApp, TestOptions,
    OTHER_PASSWORD, PASSWORD, WRONG_PASSWORD,
};
use crate::password_reset::{audit_events, results_of, spawn_with_mailer, Mailer};
use crate::retention::run;

const EMAIL: &str = "mover@example.com";
const NEW: &str = "moved@example.net";

pub(crate) async fn ask(app: &TestApp, access: &str, new_email: &str, password: &str) -> reqwest::Response {
    app.post_authed("/auth/email/change", access, &json!({ "new_email": new_email, "password": password })).await
}

pub(crate) async fn confirm(app: &TestApp, token: &str, password: &str) -> reqwest::Response {
    let body = json!({ "token": token, "password": password });
    let resp = app.client.post(app.url("/auth/email/change/confirm")).json(&body).send().await;
    resp.expect("POST /auth/email/change/confirm")
}

/// A gateway with `mailer`, a user `EMAIL` and its access token.
async fn spawn(mailer: &Mailer) -> (TestApp, String) {
    let app = spawn_with_mailer(mailer, TestOptions::default()).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let access = app.login_ok(EMAIL, PASSWORD, None).await.access_token;
    (app, access)
}

/// Asks for a move to `new_email` and returns the token mailed there.
async fn mailed_token(app: &TestApp, mailer: &Mailer, access: &str, new_email: &str) -> String {
    let answer = expect_json(ask(app, access, new_email, PASSWORD).await, StatusCode::ACCEPTED).await;
    assert_eq!(answer["new_email"], new_email, "{answer}");
    mailed_token_sent(mailer, new_email).await
}

/// The token of the change link mailed to `new_email`, once it is.
pub(crate) async fn mailed_token_sent(mailer: &Mailer, new_email: &str) -> String {
    let link_to = || {
        mailer
            .deliveries()
            .into_iter()
            .map(|d| d.json())
            .find(|event| event["type"] == "email_change.requested" && event["data"]["email"] == new_email)
    };
    eventually("the link is mailed", Duration::from_secs(15), || async { link_to().is_some() }).await;
    link_to().and_then(|event| event["data"]["token"].as_str().map(str::to_owned)).expect("a token")
}

/// Sets up and confirms a second factor for the holder of `access`;
/// returns its secret and a recovery code.
pub(crate) async fn enable_mfa(app: &TestApp, access: &str) -> (String, String) {
    let start = json!({ "password": PASSWORD });
    let setup = expect_json(app.post_authed("/auth/mfa/totp", access, &start).await, StatusCode::OK).await;
    let secret = setup["secret"].as_str().expect("a secret").to_owned();
    let confirm = json!({ "code": code(&secret, step_at(unix_now())).expect("a code") });
    let confirmed =
        expect_json(app.post_authed("/auth/mfa/totp/confirm", access, &confirm).await, StatusCode::OK).await;
    let recovery = confirmed["recovery_codes"][0].as_str().expect("a recovery code").to_owned();
    (secret, recovery)
}

async fn set_email(app: &TestApp, email: &str, new_email: &str) -> anyhow::Result<String> {
    app.cli(&["user", "set-email", "--tenant", "default", "--email", email, "--new-email", new_email], "").await
}

pub(crate) fn reason(events: &[Value]) -> &str {
    events[0]["detail"]["reason"].as_str().expect("a reason")
}

both_backends! {
    #[tokio::test]
    async fn a_user_moves_to_an_address_once_its_mailbox_and_the_password_are_proved() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        let answer = expect_json(ask(&app, &access, " Moved@Example.NET ", PASSWORD).await, StatusCode::ACCEPTED).await;
        assert_eq!(answer["new_email"], NEW, "normalized: {answer}");
        assert!(answer["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{answer}");

        let delivery = mailer.delivery(1).await;
        delivery.assert_signed();
        let event = delivery.json();
        assert_eq!(event["type"], "email_change.requested", "{event}");
        assert_eq!(event["data"]["email"], NEW, "the link goes to the new address: {event}");
        assert_eq!(event["data"]["current_email"], EMAIL, "{event}");
        let token = delivery.token();

        // Nothing changes until the link is followed.
        app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.login(NEW, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        // The new mailbox alone is not enough, and a wrong password spends nothing.
        assert_error(confirm(&app, &token, WRONG_PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "wrong_password");
        assert_eq!(confirm(&app, &token, PASSWORD).await.status(), StatusCode::NO_CONTENT);

        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let tokens = app.login_ok(NEW, PASSWORD, None).await;
        let me = app.me_ok(&tokens.access_token).await;
        assert_eq!((me["email"].as_str(), me["email_verified"].as_bool()), (Some(NEW), Some(true)), "{me}");
        // The session that asked stays open, and sees the new address.
        assert_eq!(app.me_ok(&access).await["email"], NEW);
        // Once only.
        let again = confirm(&app, &token, PASSWORD).await;
        assert_error(again, StatusCode::BAD_REQUEST, "invalid_email_change_token").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "unknown_link", "spent");

        // The old address is told.
        let notice = mailer.delivery(2).await;
        notice.assert_signed();
        let notice = notice.json();
        assert_eq!(notice["type"], "email.changed", "{notice}");
        assert_eq!(notice["data"]["email"], EMAIL, "to the old address: {notice}");
        assert_eq!(notice["data"]["new_email_hint"], "m***@example.net", "the new one masked: {notice}");
        assert!(notice["data"].get("token").is_none(), "{notice}");
        // Its one credential: the link that moves the account back (see email_revert).
        assert!(notice["data"]["revert_token"].as_str().is_some_and(|t| t.len() == 43), "{notice}");
        assert!(notice["data"].get("ip").is_none(), "the old mailbox may be someone else's now: {notice}");

        assert_eq!(results_of(&app, "email_change_requested", 1).await, ["sent"]);
        let changed = audit_events(&app, "email_changed").await;
        assert_eq!((changed[0]["email"].as_str(), changed[0]["detail"]["via"].as_str()), (Some(NEW), Some("link")));
        let all = app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list");
        assert!(!all.contains(&token), "the audit log never holds a link's token");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_request_needs_a_token_the_password_and_a_free_new_address() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        app.create_user("default", "taken@example.com", PASSWORD, &[], &[]).await;
        let body = json!({ "new_email": NEW, "password": PASSWORD });
        let anonymous = app.client.post(app.url("/auth/email/change")).json(&body).send().await.expect("POST");
        assert_error(anonymous, StatusCode::UNAUTHORIZED, "unauthorized").await;
        // A stolen access token alone changes nothing.
        assert_error(ask(&app, &access, NEW, WRONG_PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "wrong_password");
        for (case, new_email) in [("the same address", " MOVER@example.com"), ("no address", "not-an-address")] {
            let refused = ask(&app, &access, new_email, PASSWORD).await;
            let error = assert_error(refused, StatusCode::BAD_REQUEST, "invalid_request").await;
            assert!(error["message"].as_str().is_some_and(|m| m.contains("new_email")), "{case}: {error}");
        }
        // Whether an address is someone else's is not told (the answer is
        // the one a free address gets), and nothing is mailed to it.
        let taken = expect_json(ask(&app, &access, "Taken@example.com", PASSWORD).await, StatusCode::ACCEPTED).await;
        assert_eq!(taken["new_email"], "taken@example.com", "{taken}");
        assert_eq!(results_of(&app, "email_change_requested", 1).await, ["email_taken"]);
        let requested = audit_events(&app, "email_change_requested").await;
        assert_eq!(requested[0]["email"], EMAIL, "recorded with the user's own address: {requested:?}");
        assert!(mailer.deliveries().is_empty(), "no request so far was mailed");
        app.stop().await;
    }

    #[tokio::test]
    async fn one_link_a_minute_and_a_sign_out_everywhere_drops_it() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        let token = mailed_token(&app, &mailer, &access, NEW).await;
        let soon = ask(&app, &access, "elsewhere@example.net", PASSWORD).await;
        assert_eq!(retry_after_secs(&soon), 60);
        assert_error(soon, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
        // The delivery's result is recorded once it is done: in any order.
        let mut results = results_of(&app, "email_change_requested", 2).await;
        results.sort();
        assert_eq!(results, ["sent", "throttled"]);
        assert_eq!(mailer.deliveries().len(), 1, "one link a minute");

        // Signing out everywhere is what a user who fears an intruder does.
        let out = app.post_authed("/auth/logout-all", &access, &json!({})).await;
        assert_eq!(out.status(), StatusCode::NO_CONTENT);
        assert_error(confirm(&app, &token, PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_email_change_token").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "unknown_link");
        app.login_ok(EMAIL, PASSWORD, None).await;
        app.stop().await;
    }

    /// The new mailbox is where resets go: moving it takes the second
    /// factor too, and setting one up drops a change asked for without it.
    #[tokio::test]
    async fn a_user_with_a_second_factor_moves_only_with_a_code() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        let before = mailed_token(&app, &mailer, &access, "before@example.net").await;
        enable_mfa(&app, &access).await;
        assert_error(confirm(&app, &before, PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_email_change_token").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "user_changed", "bound to there being no factor");

        // Another user, with no link this minute.
        app.create_user("default", "second@example.com", PASSWORD, &[], &[]).await;
        let second = app.login_ok("second@example.com", PASSWORD, None).await.access_token;
        let (secret, recovery) = enable_mfa(&app, &second).await;
        assert_error(ask(&app, &second, NEW, PASSWORD).await, StatusCode::UNAUTHORIZED, "mfa_required").await;
        let with = |code: &str| json!({ "new_email": NEW, "password": PASSWORD, "code": code });
        let taken: Vec<String> = (-1..=2).map(|d| code(&secret, step_at(unix_now()) + d).expect("a code")).collect();
        let wrong_code = (0..10).map(|d| d.to_string().repeat(6)).find(|c| !taken.contains(c)).expect("a code");
        let wrong = app.post_authed("/auth/email/change", &second, &with(&wrong_code)).await;
        assert_error(wrong, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "wrong_otp");
        let resp = app.post_authed("/auth/email/change", &second, &with(&recovery)).await;
        assert_eq!(expect_json(resp, StatusCode::ACCEPTED).await["new_email"], NEW);
        assert_eq!(confirm(&app, &mailed_token_sent(&mailer, NEW).await, PASSWORD).await.status(), StatusCode::NO_CONTENT);
        assert_eq!(app.me_ok(&second).await["email"], NEW);
        app.stop().await;
    }

    /// A password change after the request (a reset after a compromise)
    /// kills the change an intruder asked for.
    #[tokio::test]
    async fn a_change_link_dies_with_a_password_change_and_serves_no_other_kind() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        let token = mailed_token(&app, &mailer, &access, NEW).await;
        let args = ["user", "set-password", "--tenant", "default", "--email", EMAIL, "--password-stdin"];
        app.cli(&args, &format!("{OTHER_PASSWORD}\n")).await.expect("user set-password");
        let stale = confirm(&app, &token, OTHER_PASSWORD).await;
        assert_error(stale, StatusCode::BAD_REQUEST, "invalid_email_change_token").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "user_changed");
        app.login_ok(EMAIL, OTHER_PASSWORD, None).await;
        // A link of another kind serves no email change, and a change link
        // resets no password.
        let reset = app.cli(&["user", "reset-token", "--tenant", "default", "--email", EMAIL], "").await;
        let reset = reset.expect("user reset-token").trim().to_owned();
        let wrong_kind = confirm(&app, &reset, OTHER_PASSWORD).await;
        assert_error(wrong_kind, StatusCode::BAD_REQUEST, "invalid_email_change_token").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "unknown_link");
        let body = json!({ "token": token, "new_password": PASSWORD });
        let resp = app.client.post(app.url("/auth/password/reset")).json(&body).send().await.expect("POST");
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        app.stop().await;
    }

    /// Once moved, the links mailed to the old address (a reset, here) are
    /// void; of two confirmations with one link, one acts; and an address
    /// taken between the request and the confirmation stays its taker's.
    #[tokio::test]
    async fn a_move_voids_the_old_addresses_links_and_loses_to_whoever_took_the_address() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        let reset = app.cli(&["user", "reset-token", "--tenant", "default", "--email", EMAIL], "").await;
        let reset = reset.expect("user reset-token").trim().to_owned();
        let token = mailed_token(&app, &mailer, &access, NEW).await;
        let (a, b) = tokio::join!(confirm(&app, &token, PASSWORD), confirm(&app, &token, PASSWORD));
        let mut statuses = [a.status(), b.status()];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::NO_CONTENT, StatusCode::BAD_REQUEST], "one confirmation acts");
        let body = json!({ "token": reset, "new_password": OTHER_PASSWORD });
        let resp = app.client.post(app.url("/auth/password/reset")).json(&body).send().await.expect("POST");
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        app.login_ok(NEW, PASSWORD, None).await;

        // Another user asks for an address, and someone takes it first.
        app.create_user("default", "second@example.com", PASSWORD, &[], &[]).await;
        let second = app.login_ok("second@example.com", PASSWORD, None).await.access_token;
        let token = mailed_token(&app, &mailer, &second, "contested@example.org").await;
        app.create_user("default", "contested@example.org", OTHER_PASSWORD, &[], &[]).await;
        assert_error(confirm(&app, &token, PASSWORD).await, StatusCode::CONFLICT, "email_taken").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "email_taken");
        app.login_ok("second@example.com", PASSWORD, None).await;
        app.login_ok("contested@example.org", OTHER_PASSWORD, None).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn an_operator_moves_a_user_and_the_pending_link_dies() {
        let mailer = Mailer::spawn(0).await;
        let (app, access) = spawn(&mailer).await;
        app.create_user("default", "other@example.com", PASSWORD, &[], &[]).await;
        let token = mailed_token(&app, &mailer, &access, NEW).await;
        let reset = app.cli(&["user", "reset-token", "--tenant", "default", "--email", EMAIL], "").await;
        let reset = reset.expect("user reset-token").trim().to_owned();
        let out = set_email(&app, EMAIL, "Chosen@Example.com").await.expect("user set-email");
        assert!(out.contains("chosen@example.com"), "{out}");
        app.login_ok("chosen@example.com", PASSWORD, None).await;
        assert_eq!(app.me_ok(&access).await["email"], "chosen@example.com", "sessions stay open");
        let changed = audit_events(&app, "email_changed").await;
        assert_eq!(changed[0]["detail"]["via"], "operator", "{changed:?}");
        assert_error(confirm(&app, &token, PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_email_change_token").await;
        assert_eq!(reason(&audit_events(&app, "email_change_failed").await), "unknown_link", "voided, not only stale");
        // A reset link mailed to the old address is void too.
        let body = json!({ "token": reset, "new_password": OTHER_PASSWORD });
        let resp = app.client.post(app.url("/auth/password/reset")).json(&body).send().await.expect("POST");
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_reset_token").await;

        for (email, new_email, names) in [
            ("chosen@example.com", "other@example.com", "new_email"),
            ("chosen@example.com", "chosen@example.com", "new_email"),
            ("chosen@example.com", "nonsense", "new_email"),
            ("nobody@example.com", "free@example.com", "email"),
        ] {
            let err = set_email(&app, email, new_email).await.expect_err("refused").to_string();
            assert!(err.starts_with(&format!("{names}:")), "{email} → {new_email}: {err}");
        }
        app.login_ok("other@example.com", PASSWORD, None).await;
        app.stop().await;
    }

    /// A user deleted with `--forget` after a move loses its former address
    /// from the events that carry it with no user while it was the user's
    /// (up to the user's last event with it); later ones are someone
    /// else's business, and kept.
    #[tokio::test]
    async fn forgetting_a_moved_user_erases_its_former_address_while_it_was_its() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.login_ok(EMAIL, PASSWORD, None).await;
        set_email(&app, EMAIL, NEW).await.expect("user set-email");
        let store = crate::user_admin::open_store(&app).await;
        let now = unix_now();
        // The user's events with the former address, a while ago; one event
        // with no user before them (while the address was the user's), one
        // after (someone else typing it).
        let mine = format!("UPDATE audit_events SET at = {} WHERE email = '{EMAIL}' AND user_id IS NOT NULL", now - 1000);
        assert!(run(&store, &mine).await >= 2, "user_created and login_succeeded carry it");
        for (at, ip) in [(now - 2000, "192.0.2.1"), (now - 500, "192.0.2.2")] {
            let sql = format!(
                "INSERT INTO audit_events (at, event, email, ip, detail) \
                 VALUES ({at}, 'login_failed', '{EMAIL}', '{ip}', '{{\"reason\":\"unknown_tenant\"}}')"
            );
            assert_eq!(run(&store, &sql).await, 1);
        }
        let args = ["user", "delete", "--tenant", "default", "--email", NEW, "--forget"];
        app.cli(&args, "").await.expect("user delete --forget");
        let all = app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list");
        assert!(!all.contains(NEW), "the address at the deletion is erased: {all}");
        assert!(!all.contains("192.0.2.1"), "an event while the address was the user's is erased: {all}");
        let kept: Vec<&str> = all.lines().filter(|l| l.contains(EMAIL)).collect();
        assert_eq!(kept.len(), 1, "only the event after the address left the user names it: {all}");
        assert!(kept[0].contains("192.0.2.2"), "{all}");
        store.close().await;
        app.stop().await;
    }
}

/// Without a mailer there is nowhere to send a link.
#[tokio::test]
async fn without_a_mailer_there_is_no_email_change() {
    let app = spawn_app().await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let access = app.login_ok(EMAIL, PASSWORD, None).await.access_token;
    assert_error(ask(&app, &access, NEW, PASSWORD).await, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}
