//! Email verification: with `auth.email_verification.required`, a user who
//! registers logs in only after following the link mailed through the
//! operator's mailer, with the password (or once an operator vouches with
//! `gateway user verify-email`). The link works once; another can be asked
//! for (`/auth/email/resend`, answered alike for every email); a link of one
//! kind never serves the other (a verification token resets nothing), and a
//! password reset, which proves the mailbox too, verifies the email.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    assert_error, both_backends, expect_json, TestApp, TestOptions, OTHER_PASSWORD, PASSWORD, WRONG_PASSWORD,
};
use crate::password_reset::{audit_events, results_of, spawn_with_mailer, Mailer};

const EMAIL: &str = "newcomer@example.com";

async fn post(app: &TestApp, path: &str, body: serde_json::Value) -> reqwest::Response {
    app.client.post(app.url(path)).json(&body).send().await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn register(app: &TestApp) -> serde_json::Value {
    let resp = post(app, "/auth/register", json!({ "email": EMAIL, "password": PASSWORD })).await;
    expect_json(resp, StatusCode::CREATED).await
}

/// A gateway with registration, verification required, and `mailer`.
async fn spawn(mailer: &Mailer) -> TestApp {
    let options = TestOptions {
        registration: true,
        auth_extra: "email_verification = { required = true }".to_owned(),
        ..TestOptions::default()
    };
    spawn_with_mailer(mailer, options).await
}

both_backends! {
    #[tokio::test]
    async fn a_taken_address_is_answered_as_a_new_one_and_its_owner_is_told() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer).await;
        let owner_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        // The same answer as for an address nobody has.
        let fresh = post(&app, "/auth/register", json!({ "email": "fresh@example.com", "password": PASSWORD })).await;
        let fresh = expect_json(fresh, StatusCode::CREATED).await;
        let taken = post(&app, "/auth/register", json!({ "email": " Newcomer@Example.com", "password": OTHER_PASSWORD })).await;
        let taken = expect_json(taken, StatusCode::CREATED).await;
        let keys = |v: &serde_json::Value| v.as_object().expect("an object").keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&taken), keys(&fresh));
        assert_eq!(taken["email_verified"], false, "{taken}");
        assert_ne!(taken["user_id"], owner_id.as_str(), "the owner's id is not given away");
        // Client mistakes are still told as for any registration.
        let weak = post(&app, "/auth/register", json!({ "email": EMAIL, "password": "short" })).await;
        assert_error(weak, StatusCode::BAD_REQUEST, "weak_password").await;

        // Logging in with the password one registered with tells the two
        // apart no more than the registration did.
        for (email, password) in [("fresh@example.com", PASSWORD), (EMAIL, OTHER_PASSWORD)] {
            assert_error(app.login(email, password, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        }
        // Nothing changed for the owner, who is told of the attempt.
        app.login_ok(EMAIL, PASSWORD, None).await;
        let told = || mailer.deliveries().into_iter().map(|d| d.json()).find(|e| e["type"] == "registration.attempted");
        crate::helpers::eventually("the owner is told", std::time::Duration::from_secs(15), || async { told().is_some() })
            .await;
        let notice = told().expect("a notice");
        assert_eq!(notice["data"]["email"], EMAIL, "{notice}");
        assert_eq!(notice["data"]["user_id"], owner_id.as_str(), "{notice}");
        let refused = audit_events(&app, "registration_refused").await;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["detail"]["reason"], "email_taken", "{refused:?}");
        // The fresh address got its verification link; the taken one none.
        let links: Vec<_> = mailer
            .deliveries()
            .into_iter()
            .map(|d| d.json())
            .filter(|e| e["type"] == "email_verification.requested")
            .map(|e| e["data"]["email"].clone())
            .collect();
        assert!(!links.contains(&json!(EMAIL)), "{links:?}");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_registered_user_logs_in_once_the_mailed_link_is_followed() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer).await;
        let registered = register(&app).await;
        assert_eq!(registered["email_verified"], false, "{registered}");

        // The right password is answered as a wrong one (a registrant of a
        // taken address must not learn it this way), and a new link is
        // asked for on the user's behalf (one a minute: none here).
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_error(app.login(EMAIL, WRONG_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let failed = audit_events(&app, "login_failed").await;
        assert_eq!(failed[1]["detail"]["reason"], "email_not_verified", "told apart in the audit log: {failed:?}");
        assert_eq!(failed[0]["detail"]["reason"], "wrong_password", "{failed:?}");

        let delivery = mailer.delivery(1).await;
        delivery.assert_signed();
        let event = delivery.json();
        assert_eq!(event["type"], "email_verification.requested", "{event}");
        assert_eq!(event["data"]["email"], EMAIL, "{event}");
        assert_eq!(event["data"]["user_id"], registered["user_id"], "{event}");
        let token = delivery.token();
        // A link of one kind serves no other.
        let reset = json!({ "token": token, "new_password": WRONG_PASSWORD });
        assert_error(post(&app, "/auth/password/reset", reset).await, StatusCode::BAD_REQUEST, "invalid_reset_token").await;
        let refused = audit_events(&app, "password_reset_failed").await;
        assert_eq!(refused[0]["detail"]["reason"], "unknown_link", "no reset link has this token: {refused:?}");

        // The mailbox alone is not enough: whoever registered must know the
        // password (the mailbox's owner following a link someone else's
        // registration sent does not hand that someone the account).
        let guessed = post(&app, "/auth/email/verify", json!({ "token": token, "password": WRONG_PASSWORD })).await;
        assert_error(guessed, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let verify = post(&app, "/auth/email/verify", json!({ "token": token, "password": PASSWORD })).await;
        assert_eq!(verify.status(), StatusCode::NO_CONTENT, "the link was not spent by the wrong password");
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(app.me_ok(&tokens.access_token).await["email_verified"], true);
        // Once only.
        let again = post(&app, "/auth/email/verify", json!({ "token": token, "password": PASSWORD })).await;
        assert_error(again, StatusCode::BAD_REQUEST, "invalid_verification_token").await;

        // The registration's and the logins' requests run after their
        // answers, in any order: one link was sent, for one of them.
        let mut results = results_of(&app, "email_verification_requested", 3).await;
        results.sort();
        assert_eq!(results, ["sent", "throttled", "throttled"]);
        let requested = audit_events(&app, "email_verification_requested").await;
        let mut via: Vec<&str> = requested.iter().map(|e| e["detail"]["via"].as_str().expect("a via")).collect();
        via.sort_unstable();
        assert_eq!(via, ["login", "login", "registration"], "{requested:?}");
        let verified = audit_events(&app, "email_verified").await;
        assert_eq!(verified[0]["detail"]["via"], "link", "{verified:?}");
        let all = app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list");
        assert!(!all.contains(&token), "the audit log never holds a link's token");
        app.stop().await;
    }

    #[tokio::test]
    async fn resend_answers_alike_and_an_operator_may_vouch() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer).await;
        register(&app).await;
        mailer.delivery(1).await;
        results_of(&app, "email_verification_requested", 1).await;
        for email in [EMAIL, "nobody@example.com"] {
            let resp = post(&app, "/auth/email/resend", json!({ "email": email })).await;
            assert_eq!(resp.status(), StatusCode::ACCEPTED, "{email}");
        }
        let mut results = results_of(&app, "email_verification_requested", 3).await.split_off(1);
        results.sort();
        assert_eq!(results, ["throttled", "unknown_user"], "one mail a minute, none for a stranger");
        assert_eq!(mailer.deliveries().len(), 1);

        let list = app.cli(&["user", "list", "--tenant", "default"], "").await.expect("user list");
        assert!(list.contains("UNVERIFIED"), "{list}");
        app.cli(&["user", "verify-email", "--tenant", "default", "--email", EMAIL], "").await.expect("verify-email");
        app.login_ok(EMAIL, PASSWORD, None).await;
        let twice = app.cli(&["user", "verify-email", "--tenant", "default", "--email", EMAIL], "").await;
        assert!(twice.expect_err("verified already").to_string().contains("verified already"));
        // The mailed link no longer does anything, and a verified user is sent none.
        let body = json!({ "token": mailer.delivery(1).await.token(), "password": PASSWORD });
        let stale = post(&app, "/auth/email/verify", body).await;
        assert_error(stale, StatusCode::BAD_REQUEST, "invalid_verification_token").await;
        assert_eq!(post(&app, "/auth/email/resend", json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
        assert_eq!(results_of(&app, "email_verification_requested", 4).await[3], "already_verified");
        let failed = audit_events(&app, "email_verification_failed").await;
        assert_eq!(failed[0]["detail"]["reason"], "unknown_link", "voided by the operator's word: {failed:?}");
        app.stop().await;
    }

    /// The owner of an address someone else registered takes the account
    /// over with a password reset: it proves the mailbox, so it verifies
    /// the email, and the squatter's password is gone.
    #[tokio::test]
    async fn a_password_reset_verifies_the_email() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer).await;
        register(&app).await;
        let out = app.cli(&["user", "reset-token", "--tenant", "default", "--email", EMAIL], "").await;
        let token = out.expect("user reset-token").trim().to_owned();
        let reset = json!({ "token": token, "new_password": OTHER_PASSWORD });
        assert_eq!(post(&app, "/auth/password/reset", reset).await.status(), StatusCode::NO_CONTENT);
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let tokens = app.login_ok(EMAIL, OTHER_PASSWORD, None).await;
        assert_eq!(app.me_ok(&tokens.access_token).await["email_verified"], true);
        // The registration's link has nothing left to do.
        let body = json!({ "token": mailer.delivery(1).await.token(), "password": OTHER_PASSWORD });
        let stale = post(&app, "/auth/email/verify", body).await;
        assert_error(stale, StatusCode::BAD_REQUEST, "invalid_verification_token").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn without_the_requirement_and_for_operators_users_emails_count_as_verified() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn_with_mailer(&mailer, TestOptions { registration: true, ..TestOptions::default() }).await;
        let registered = register(&app).await;
        assert_eq!(registered["email_verified"], true, "{registered}");
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(app.me_ok(&tokens.access_token).await["email_verified"], true);
        app.create_user("default", "made@example.com", PASSWORD, &[], &[]).await;
        let list = app.cli(&["user", "list", "--tenant", "default"], "").await.expect("user list");
        assert!(!list.contains("UNVERIFIED"), "{list}");
        // Nobody needs a link, and none is sent.
        assert_eq!(post(&app, "/auth/email/resend", json!({ "email": EMAIL })).await.status(), StatusCode::ACCEPTED);
        assert_eq!(results_of(&app, "email_verification_requested", 1).await, ["already_verified"]);
        assert!(mailer.deliveries().is_empty());
        app.stop().await;
    }
}
