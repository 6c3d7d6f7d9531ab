//! Email revert: the `email.changed` notice mailed to the address an email
//! change left carries a link (`revert_token`) that `POST
//! /auth/email/revert`, with a new password, redeems to move the account
//! back there: every session is revoked, a second factor set up since the
//! change is removed, and an intruder who moves the account on, or reverts
//! a later move of their own, cannot void the owner's link.

use std::time::Duration;

use gateway::auth::totp::{code, step_at};
use gateway::db::unix_now;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::email_change::{ask, confirm, enable_mfa, mailed_token_sent, reason};
use crate::helpers::{
    assert_error, assert_invalid_token, both_backends, eventually, expect_json, TestApp, TestOptions, OTHER_PASSWORD,
    PASSWORD,
};
use crate::password_reset::{audit_events, results_of, spawn_with_mailer, Mailer};
use crate::user_admin::hold_update;

const OWNER: &str = "owner@example.com";
const INTRUDER: &str = "intruder@evil.example";
const OWNER_NEW_PASSWORD: &str = "the owner's brand new passphrase";

async fn revert(app: &TestApp, token: &str, new_password: &str) -> reqwest::Response {
    let body = json!({ "token": token, "new_password": new_password });
    app.client.post(app.url("/auth/email/revert")).json(&body).send().await.expect("POST /auth/email/revert")
}

/// The `email.changed` notice mailed to `to`, once it is.
async fn change_notice(mailer: &Mailer, to: &str) -> Value {
    let notice = || {
        mailer
            .deliveries()
            .into_iter()
            .map(|d| d.json())
            .find(|event| event["type"] == "email.changed" && event["data"]["email"] == to)
    };
    eventually("the email.changed notice is mailed", Duration::from_secs(15), || async { notice().is_some() }).await;
    notice().expect("a notice")
}

fn revert_token(notice: &Value) -> String {
    notice["data"]["revert_token"].as_str().unwrap_or_else(|| panic!("a revert token: {notice}")).to_owned()
}

/// Moves the holder of `access` to `to` with a mailed link (the password
/// and, with `code`, a second factor's code) and returns the revert token
/// mailed to `from`, the address left.
async fn move_to(app: &TestApp, mailer: &Mailer, access: &str, from: &str, to: &str, code: Option<&str>) -> String {
    let mut body = json!({ "new_email": to, "password": PASSWORD });
    if let Some(code) = code {
        body["code"] = code.into();
    }
    expect_json(app.post_authed("/auth/email/change", access, &body).await, StatusCode::ACCEPTED).await;
    let token = mailed_token_sent(mailer, to).await;
    assert_eq!(confirm(app, &token, PASSWORD).await.status(), StatusCode::NO_CONTENT, "moved to {to}");
    revert_token(&change_notice(mailer, from).await)
}

/// Moves the change links' creation back two minutes: the one-a-minute
/// rule lets the next change request through, as it would a minute later.
/// (Revert links are ordered by the database, not by their times.)
async fn a_minute_passes(app: &TestApp) {
    let update = "UPDATE email_links SET created_at = created_at - 120 WHERE purpose = $1";
    hold_update(app, update, "email_change", Duration::ZERO).await.await.expect("backdated");
}

both_backends! {
    /// The notice that carries the revert link is stored with the change:
    /// a mailer that takes nothing (every attempt answered 503) leaves it
    /// waiting to be sent, not lost.
    #[tokio::test]
    async fn the_notice_with_the_revert_link_waits_for_a_mailer_that_is_down() {
        let mailer = Mailer::spawn(usize::MAX).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(OWNER, PASSWORD, None).await;
        // The mailer refuses each delivery, but what was attempted is seen.
        let token = move_to(&app, &mailer, &tokens.access_token, OWNER, INTRUDER, None).await;
        let store = crate::user_admin::open_store(&app).await;
        let waiting = store.due_deliveries(i64::MAX, 100).await.expect("the store");
        store.close().await;
        let kinds: Vec<&str> = waiting.iter().map(|d| d.kind.as_str()).collect();
        assert!(kinds.contains(&"email.changed"), "the notice waits to be sent: {kinds:?}");
        assert!(waiting.iter().all(|d| !d.body.contains(&token)), "sealed");
        // And what it carries works.
        assert_eq!(revert(&app, &token, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        app.login_ok(OWNER, OWNER_NEW_PASSWORD, None).await;
        app.stop().await;
    }

    /// An intruder with the password moves the account, changes the
    /// password and sets up a second factor; the owner's old mailbox takes
    /// it all back.
    #[tokio::test]
    async fn the_old_mailbox_takes_the_account_back_from_an_intruder() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let intruder = app.login_ok(OWNER, PASSWORD, None).await;
        let token = move_to(&app, &mailer, &intruder.access_token, OWNER, INTRUDER, None).await;
        let notice = change_notice(&mailer, OWNER).await;
        notice_is_signed_and_bounded(&mailer, &notice);
        enable_mfa(&app, &intruder.access_token).await;
        let change = json!({ "current_password": PASSWORD, "new_password": OTHER_PASSWORD });
        let changed = app.post_authed("/auth/password", &intruder.access_token, &change).await;
        assert!(changed.status().is_success(), "the intruder changes the password: {}", changed.status());
        let login = app.login(INTRUDER, OTHER_PASSWORD, None).await;
        assert_error(login, StatusCode::UNAUTHORIZED, "mfa_required").await;

        // A weak password and an unknown token spend nothing.
        assert_error(revert(&app, &token, "short").await, StatusCode::BAD_REQUEST, "weak_password").await;
        let unknown = revert(&app, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", OWNER_NEW_PASSWORD).await;
        assert_error(unknown, StatusCode::BAD_REQUEST, "invalid_revert_token").await;
        assert_eq!(reason(&audit_events(&app, "email_revert_failed").await), "unknown_link");
        // A change link is no revert link, and a revert link no reset link.
        let reset = json!({ "token": token, "new_password": OWNER_NEW_PASSWORD });
        let reset = app.client.post(app.url("/auth/password/reset")).json(&reset).send().await.expect("POST");
        assert_error(reset, StatusCode::BAD_REQUEST, "invalid_reset_token").await;

        assert_eq!(revert(&app, &token, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        // Every session is refused at once: the intruder's (the password
        // change revoked the others).
        let refreshed = app.refresh(&intruder.refresh_token).await;
        assert_error(refreshed, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert_invalid_token(app.get_authed("/auth/me", &intruder.access_token).await).await;
        // The intruder's address, password and factor are gone.
        let theirs = app.login(INTRUDER, OTHER_PASSWORD, None).await;
        assert_error(theirs, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_error(app.login(OWNER, OTHER_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let back = app.login_ok(OWNER, OWNER_NEW_PASSWORD, None).await;
        let me = app.me_ok(&back.access_token).await;
        assert_eq!((me["email"].as_str(), me["email_verified"].as_bool()), (Some(OWNER), Some(true)), "{me}");
        assert_eq!(me["mfa"], false, "the intruder's factor is removed: {me}");
        // Once only.
        let again = revert(&app, &token, OWNER_NEW_PASSWORD).await;
        assert_error(again, StatusCode::BAD_REQUEST, "invalid_revert_token").await;

        // The address left is told, with no link.
        let left = change_notice(&mailer, INTRUDER).await;
        assert_eq!(left["data"]["via"], "revert", "{left}");
        assert!(left["data"].get("revert_token").is_none(), "{left}");

        let reverted = audit_events(&app, "email_reverted").await;
        assert_eq!(reverted.len(), 1, "{reverted:?}");
        assert_eq!(reverted[0]["email"], OWNER, "{reverted:?}");
        assert_eq!(reverted[0]["detail"]["mfa_removed"], true, "{reverted:?}");
        assert_eq!(reverted[0]["detail"]["sessions_revoked"], 1, "{reverted:?}");
        let all = app.cli(&["audit", "list", "--json", "--limit", "200"], "").await.expect("audit list");
        assert!(!all.contains(&token), "the audit log never holds a revert token");
        app.stop().await;
    }

    /// The intruder moves on to a second address, and reverts that second
    /// move with the link mailed to the first: the owner's link, older,
    /// still works.
    #[tokio::test]
    async fn an_intruder_who_moves_on_cannot_void_the_owners_link() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let intruder = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        let owners = move_to(&app, &mailer, &intruder, OWNER, INTRUDER, None).await;
        a_minute_passes(&app).await;
        let second = "second@evil.example";
        let theirs = move_to(&app, &mailer, &intruder, INTRUDER, second, None).await;
        assert_ne!(owners, theirs);

        assert_eq!(revert(&app, &theirs, OTHER_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        app.login_ok(INTRUDER, OTHER_PASSWORD, None).await;
        assert_eq!(revert(&app, &owners, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        app.login_ok(OWNER, OWNER_NEW_PASSWORD, None).await;
        app.stop().await;
    }

    /// The owner's revert voids the links of later moves: the intruder's
    /// mailbox cannot take the account back.
    #[tokio::test]
    async fn the_owners_revert_voids_the_links_of_later_moves() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let intruder = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        let owners = move_to(&app, &mailer, &intruder, OWNER, INTRUDER, None).await;
        a_minute_passes(&app).await;
        let theirs = move_to(&app, &mailer, &intruder, INTRUDER, "second@evil.example", None).await;

        assert_eq!(revert(&app, &owners, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        let theirs = revert(&app, &theirs, OTHER_PASSWORD).await;
        assert_error(theirs, StatusCode::BAD_REQUEST, "invalid_revert_token").await;
        assert_eq!(reason(&audit_events(&app, "email_revert_failed").await), "unknown_link");
        app.login_ok(OWNER, OWNER_NEW_PASSWORD, None).await;
        app.stop().await;
    }

    /// Nothing the intruder can do voids the link (a sign-out everywhere,
    /// another change request); an operator's move or disable does.
    #[tokio::test]
    async fn only_an_operator_voids_a_revert_link() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let intruder = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        let token = move_to(&app, &mailer, &intruder, OWNER, INTRUDER, None).await;
        a_minute_passes(&app).await;
        expect_json(ask(&app, &intruder, "third@evil.example", PASSWORD).await, StatusCode::ACCEPTED).await;
        assert_eq!(app.post_authed("/auth/logout-all", &intruder, &json!({})).await.status(), StatusCode::NO_CONTENT);
        assert_eq!(revert(&app, &token, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);

        let other = "other@example.com";
        app.create_user("default", other, PASSWORD, &[], &[]).await;
        let access = app.login_ok(other, PASSWORD, None).await.access_token;
        let moved = move_to(&app, &mailer, &access, other, "other@example.net", None).await;
        let set = ["user", "set-email", "--tenant", "default", "--email", "other@example.net", "--new-email", "o@example.org"];
        app.cli(&set, "").await.expect("user set-email");
        assert_error(revert(&app, &moved, OWNER_NEW_PASSWORD).await, StatusCode::BAD_REQUEST, "invalid_revert_token").await;
        app.stop().await;
    }

    /// With verification required, registering the address a revert link
    /// keeps is answered as a new registration (201, a made-up id), and
    /// takes nothing: nobody learns the address is kept, and nobody is
    /// told (no user has it).
    #[tokio::test]
    async fn a_kept_address_is_answered_as_a_new_one_when_registrations_must_prove_theirs() {
        let mailer = Mailer::spawn(0).await;
        let options = TestOptions {
            registration: true,
            auth_extra: "email_verification = { required = true }".to_owned(),
            ..TestOptions::default()
        };
        let app = spawn_with_mailer(&mailer, options).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let access = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        let token = move_to(&app, &mailer, &access, OWNER, INTRUDER, None).await;

        let register = json!({ "email": OWNER, "password": OWNER_NEW_PASSWORD });
        let squat = app.client.post(app.url("/auth/register")).json(&register).send().await.expect("POST");
        let answer = expect_json(squat, StatusCode::CREATED).await;
        assert_eq!(answer["email_verified"], false, "{answer}");
        let refused = audit_events(&app, "registration_refused").await;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["detail"]["reason"], "email_taken", "{refused:?}");
        let store = crate::user_admin::open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("the store").expect("the tenant");
        assert!(store.user_by_email(tenant.id, OWNER).await.expect("the store").is_none(), "no account was made");
        store.close().await;
        // The owner still takes the account back to it.
        assert_eq!(revert(&app, &token, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        app.login_ok(OWNER, OWNER_NEW_PASSWORD, None).await;
        let told = mailer.deliveries().iter().any(|d| d.json()["type"] == "registration.attempted");
        assert!(!told, "nobody had the address to be told");
        app.stop().await;
    }

    /// The owner's factor, unchanged since the change, stays. The address
    /// left is kept for the owner: no registration or change takes it; an
    /// operator's user may (409, and the link stays unspent until it is
    /// free again).
    #[tokio::test]
    async fn a_revert_keeps_the_owners_factor_and_loses_to_whoever_took_the_address() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions { registration: true, ..TestOptions::default() }).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let access = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        let (secret, _) = enable_mfa(&app, &access).await;
        let now = code(&secret, step_at(unix_now()) + 1).expect("a code");
        let token = move_to(&app, &mailer, &access, OWNER, INTRUDER, Some(&now)).await;

        // Nobody registers the address, or moves to it, while the link lives.
        let register = json!({ "email": OWNER, "password": PASSWORD });
        let squat = app.client.post(app.url("/auth/register")).json(&register).send().await.expect("POST");
        assert_error(squat, StatusCode::CONFLICT, "email_taken").await;
        app.create_user("default", "squatter@example.com", PASSWORD, &[], &[]).await;
        let squatter = app.login_ok("squatter@example.com", PASSWORD, None).await.access_token;
        expect_json(ask(&app, &squatter, OWNER, PASSWORD).await, StatusCode::ACCEPTED).await;
        assert_eq!(results_of(&app, "email_change_requested", 2).await, ["sent", "email_taken"], "nothing mailed");
        // An operator may: the owner's revert then waits for the address.
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let taken = revert(&app, &token, OWNER_NEW_PASSWORD).await;
        assert_error(taken, StatusCode::CONFLICT, "email_taken").await;
        assert_eq!(reason(&audit_events(&app, "email_revert_failed").await), "email_taken");
        app.cli(&["user", "delete", "--tenant", "default", "--email", OWNER], "").await.expect("user delete");

        assert_eq!(revert(&app, &token, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        let login = app.login(OWNER, OWNER_NEW_PASSWORD, None).await;
        assert_error(login, StatusCode::UNAUTHORIZED, "mfa_required").await;
        let reverted = audit_events(&app, "email_reverted").await;
        assert_eq!(reverted[0]["detail"]["mfa_removed"], false, "{reverted:?}");
        app.stop().await;
    }

    /// New recovery codes are a changed factor: the revert removes it (the
    /// intruder who made them holds them).
    #[tokio::test]
    async fn a_revert_removes_a_factor_whose_recovery_codes_changed() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let access = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        let (secret, recovery) = enable_mfa(&app, &access).await;
        let now = code(&secret, step_at(unix_now()) + 1).expect("a code");
        let token = move_to(&app, &mailer, &access, OWNER, INTRUDER, Some(&now)).await;
        let body = json!({ "password": PASSWORD, "code": recovery });
        expect_json(app.post_authed("/auth/mfa/recovery-codes", &access, &body).await, StatusCode::OK).await;

        assert_eq!(revert(&app, &token, OWNER_NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
        let back = app.login_ok(OWNER, OWNER_NEW_PASSWORD, None).await;
        assert_eq!(app.me_ok(&back.access_token).await["mfa"], false);
        let reverted = audit_events(&app, "email_reverted").await;
        assert_eq!(reverted[0]["detail"]["mfa_removed"], true, "{reverted:?}");
        app.stop().await;
    }

    /// `auth.email_change.revert_ttl = "0s"`: the notice goes without a
    /// link; and so does the notice of a move from an address never proved.
    #[tokio::test]
    async fn with_revert_off_the_notice_carries_no_link() {
        let mailer = Mailer::spawn(0).await;
        let options = TestOptions { auth_extra: "email_change = { revert_ttl = \"0s\" }".to_owned(), ..TestOptions::default() };
        let app = spawn_with_mailer(&mailer, options).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let access = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        expect_json(ask(&app, &access, INTRUDER, PASSWORD).await, StatusCode::ACCEPTED).await;
        let token = mailed_token_sent(&mailer, INTRUDER).await;
        assert_eq!(confirm(&app, &token, PASSWORD).await.status(), StatusCode::NO_CONTENT);
        let notice = change_notice(&mailer, OWNER).await;
        assert!(notice["data"].get("revert_token").is_none(), "{notice}");
        app.stop().await;

        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions::default()).await;
        app.create_user("default", OWNER, PASSWORD, &[], &[]).await;
        let unprove = "UPDATE users SET email_verified_at = NULL WHERE email = $1";
        hold_update(&app, unprove, OWNER, Duration::ZERO).await.await.expect("unverified");
        let access = app.login_ok(OWNER, PASSWORD, None).await.access_token;
        expect_json(ask(&app, &access, INTRUDER, PASSWORD).await, StatusCode::ACCEPTED).await;
        let token = mailed_token_sent(&mailer, INTRUDER).await;
        assert_eq!(confirm(&app, &token, PASSWORD).await.status(), StatusCode::NO_CONTENT);
        let notice = change_notice(&mailer, OWNER).await;
        assert!(notice["data"].get("revert_token").is_none(), "an unproved address gets no link: {notice}");
        app.stop().await;
    }
}

/// The notice is signed, goes to the old address, and says until when its
/// link works (within `auth.email_change.revert_ttl`, 7 days by default).
fn notice_is_signed_and_bounded(mailer: &Mailer, notice: &Value) {
    let delivery = mailer.deliveries().into_iter().find(|d| d.json() == *notice).expect("the delivery");
    delivery.assert_signed();
    let expires = notice["data"]["revert_expires_at"].as_str().expect("an expiry");
    let expires = humantime::parse_rfc3339(expires).expect("RFC 3339");
    let ttl = expires.duration_since(std::time::SystemTime::now()).expect("in the future");
    assert!(ttl > Duration::from_secs(7 * 86_400 - 120) && ttl <= Duration::from_secs(7 * 86_400), "{notice}");
}
