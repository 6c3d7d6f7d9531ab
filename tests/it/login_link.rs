//! Sign-in links: with `auth.login_link.enabled`, `POST /auth/login/link`
//! mails a link (through the operator's mailer, received here by a real
//! hyper server) and `POST /auth/login/link/confirm` opens one session with
//! it, whose tokens say `amr: ["email"]`. The second factor is still asked
//! for; a link goes only to a proved address; it dies with the password or
//! the address it was mailed to, with a disable, and when it expires; the
//! login lockout does not hold it back.

use std::time::Duration;

use gateway::auth::totp::{code, step_at};
use gateway::db::unix_now;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use crate::email_change::enable_mfa;
use crate::helpers::{
    assert_error, both_backends, eventually, expect_json, jwt_part, TestApp, TestOptions, Tokens, OTHER_PASSWORD,
    PASSWORD, WRONG_PASSWORD,
};
use crate::password_reset::{audit_events, results_of, spawn_with_mailer, Delivery, Mailer};
use crate::user_admin::open_store;

const EMAIL: &str = "linked@example.com";

/// A gateway with sign-in links on (and `auth_extra`'s settings), mailing
/// through `mailer`.
async fn spawn(mailer: &Mailer, options: TestOptions) -> TestApp {
    let auth_extra = match options.auth_extra.is_empty() {
        true => "login_link = { enabled = true }".to_owned(),
        false => options.auth_extra.clone(),
    };
    spawn_with_mailer(mailer, TestOptions { auth_extra, ..options }).await
}

async fn post(app: &TestApp, path: &str, body: Value) -> Response {
    app.client.post(app.url(path)).json(&body).send().await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn ask(app: &TestApp, email: &str) -> Response {
    post(app, "/auth/login/link", json!({ "email": email })).await
}

async fn confirm(app: &TestApp, token: &str, otp: Option<&str>) -> Response {
    post(app, "/auth/login/link/confirm", json!({ "token": token, "otp": otp })).await
}

async fn confirm_ok(app: &TestApp, token: &str, otp: Option<&str>) -> Tokens {
    let pair = expect_json(confirm(app, token, otp).await, StatusCode::OK).await;
    serde_json::from_value(pair).expect("a token pair")
}

/// The sign-in links mailed to `email` (notices left out), oldest first.
fn links_to(mailer: &Mailer, email: &str) -> Vec<Delivery> {
    let link = |d: &Delivery| d.json()["type"] == "login_link.requested" && d.json()["data"]["email"] == email;
    mailer.deliveries().into_iter().filter(link).collect()
}

/// The token of the first sign-in link mailed to `email`, once it is.
async fn mailed(mailer: &Mailer, email: &str) -> String {
    eventually("the link is mailed", Duration::from_secs(15), || async { !links_to(mailer, email).is_empty() }).await;
    links_to(mailer, email)[0].token()
}

/// The reason of the newest `login_link_failed` event.
async fn refusal(app: &TestApp) -> String {
    let failed = audit_events(app, "login_link_failed").await;
    failed[0]["detail"]["reason"].as_str().expect("a reason").to_owned()
}

both_backends! {
    #[tokio::test]
    async fn a_mailed_link_opens_one_session_whose_tokens_say_how() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer, TestOptions::default()).await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let by_password = app.login_ok(EMAIL, PASSWORD, None).await;

        let answer = ask(&app, " Linked@Example.com ").await;
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        assert_eq!(answer.text().await.expect("a body"), "");
        let token = mailed(&mailer, EMAIL).await;
        let delivery = links_to(&mailer, EMAIL).remove(0);
        delivery.assert_signed();
        let event = delivery.json();
        assert_eq!(event["data"]["user_id"], user_id.as_str(), "{event}");
        assert!(event["data"]["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
        assert_eq!(token.len(), 43, "256 bits, base64url");

        let opened = confirm_ok(&app, &token, None).await;
        assert_eq!(jwt_part(&opened.access_token, 1)["amr"], json!(["email"]));
        assert_eq!(app.me_ok(&opened.access_token).await["email"], EMAIL);
        // The session keeps saying so through its refreshes, and the
        // user's list of sessions tells the two logins apart.
        let refreshed = app.refresh_ok(&opened.refresh_token).await;
        assert_eq!(jwt_part(&refreshed.access_token, 1)["amr"], json!(["email"]));
        let sessions = expect_json(app.get_authed("/auth/sessions", &refreshed.access_token).await, StatusCode::OK).await;
        let amr_of = |sid: &Value| {
            let listed = sessions.as_array().expect("a list").iter().find(|s| s["id"] == *sid).expect("listed");
            listed["amr"].clone()
        };
        assert_eq!(amr_of(&jwt_part(&opened.access_token, 1)["sid"]), json!(["email"]), "{sessions}");
        assert_eq!(amr_of(&jwt_part(&by_password.access_token, 1)["sid"]), json!(["pwd"]), "{sessions}");

        // Once only.
        assert_error(confirm(&app, &token, None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        assert_eq!(refusal(&app).await, "unknown_link");

        assert_eq!(results_of(&app, "login_link_requested", 1).await, ["sent"]);
        let logins = audit_events(&app, "login_succeeded").await;
        assert_eq!(logins[0]["detail"]["via"], "link", "{logins:?}");
        assert_eq!(logins[0]["user_id"], user_id.as_str(), "{logins:?}");
        let all = app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list");
        assert!(!all.contains(&token), "the audit log never holds a link's token");
        app.stop().await;
    }

    #[tokio::test]
    async fn off_unless_enabled_and_asking_tells_nothing_about_the_account() {
        let mailer = Mailer::spawn(0).await;
        let off = spawn(&mailer, TestOptions { auth_extra: "login_link = { enabled = false }".to_owned(), ..TestOptions::default() })
            .await;
        off.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert_error(ask(&off, EMAIL).await, StatusCode::NOT_FOUND, "not_found").await;
        assert_error(confirm(&off, &"a".repeat(43), None).await, StatusCode::NOT_FOUND, "not_found").await;
        off.stop().await;

        let app = spawn(&mailer, TestOptions::default()).await;
        app.create_user("default", "disabled@example.com", PASSWORD, &[], &[]).await;
        app.cli(&["user", "disable", "--tenant", "default", "--email", "disabled@example.com"], "")
            .await
            .expect("user disable");
        let asks = [
            json!({ "email": "nobody@example.com" }),
            json!({ "email": EMAIL, "tenant": "no-such-tenant" }),
            json!({ "email": "disabled@example.com" }),
        ];
        for (n, body) in asks.iter().enumerate() {
            let answer = post(&app, "/auth/login/link", body.clone()).await;
            assert_eq!(answer.status(), StatusCode::ACCEPTED, "{body}");
            assert_eq!(answer.text().await.expect("a body"), "", "{body}: the same empty answer");
            results_of(&app, "login_link_requested", n + 1).await;
        }
        assert_eq!(
            results_of(&app, "login_link_requested", asks.len()).await,
            ["unknown_user", "unknown_tenant", "user_disabled"]
        );
        assert!(mailer.deliveries().is_empty(), "nothing was sent: {:?}", mailer.deliveries());

        // Shapes a client got wrong are told at once, and no made-up token
        // opens anything.
        assert_error(ask(&app, "not-an-email").await, StatusCode::BAD_REQUEST, "invalid_request").await;
        let no_token = post(&app, "/auth/login/link/confirm", json!({ "otp": "123456" })).await;
        assert_error(no_token, StatusCode::BAD_REQUEST, "invalid_request").await;
        for made_up in [String::new(), "a".repeat(43), "a".repeat(4096)] {
            assert_error(confirm(&app, &made_up, None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn a_second_factor_is_asked_for_and_the_link_waits_for_it() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (secret, recovery) = enable_mfa(&app, &tokens.access_token).await;

        assert_eq!(ask(&app, EMAIL).await.status(), StatusCode::ACCEPTED);
        let token = mailed(&mailer, EMAIL).await;
        // A mailbox is not a second factor: without the code, nothing opens
        // and the link is not spent; a wrong code fails like at a login.
        assert_error(confirm(&app, &token, None).await, StatusCode::UNAUTHORIZED, "mfa_required").await;
        assert_eq!(refusal(&app).await, "mfa_required");
        let wrong = code(&secret, step_at(unix_now()) + 20).expect("a code");
        assert_error(confirm(&app, &token, Some(&wrong)).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(refusal(&app).await, "wrong_otp");
        let store = open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("the store").expect("the tenant");
        let user = store.user_by_email(tenant.id, EMAIL).await.expect("the store").expect("the user");
        assert_eq!(user.totp_failures, 1, "the wrong code counts towards the factor's lock");
        store.close().await;

        // The code enable_mfa used is spent; the next step's is not.
        let next = code(&secret, step_at(unix_now()) + 1).expect("a code");
        let opened = confirm_ok(&app, &token, Some(&next)).await;
        assert_eq!(jwt_part(&opened.access_token, 1)["amr"], json!(["email", "otp", "mfa"]));
        let refreshed = app.refresh_ok(&opened.refresh_token).await;
        assert_eq!(jwt_part(&refreshed.access_token, 1)["amr"], json!(["email", "otp", "mfa"]));
        assert_error(confirm(&app, &token, Some(&recovery)).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_link_dies_with_the_password_the_address_or_a_disable_and_expires() {
        let mailer = Mailer::spawn(0).await;
        let options = TestOptions {
            auth_extra: "login_link = { enabled = true, token_ttl = \"2s\" }".to_owned(),
            ..TestOptions::default()
        };
        let app = spawn(&mailer, options).await;
        let cases = ["password@example.com", "moved@example.com", "disabled@example.com", "late@example.com"];
        let mut tokens = Vec::new();
        for email in cases {
            app.create_user("default", email, PASSWORD, &[], &[]).await;
            assert_eq!(ask(&app, email).await.status(), StatusCode::ACCEPTED);
            tokens.push(mailed(&mailer, email).await);
        }
        let user = |email: &'static str| ["--tenant", "default", "--email", email];

        // A new password (a reset after a compromise, say) kills the links
        // mailed before it.
        let mut set = vec!["user", "set-password"];
        set.extend(user(cases[0]));
        set.push("--password-stdin");
        app.cli(&set, &format!("{OTHER_PASSWORD}\n")).await.expect("user set-password");
        assert_error(confirm(&app, &tokens[0], None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        assert_eq!(refusal(&app).await, "user_changed");

        // So does a move to another address.
        let mut move_to = vec!["user", "set-email"];
        move_to.extend(user(cases[1]));
        move_to.extend(["--new-email", "elsewhere@example.com"]);
        app.cli(&move_to, "").await.expect("user set-email");
        assert_error(confirm(&app, &tokens[1], None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;

        // A disable voids it, and an enable does not bring it back.
        for verb in ["disable", "enable"] {
            let mut args = vec!["user", verb];
            args.extend(user(cases[2]));
            app.cli(&args, "").await.unwrap_or_else(|e| panic!("user {verb}: {e}"));
        }
        assert_error(confirm(&app, &tokens[2], None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;

        // And it lives `token_ttl`.
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_error(confirm(&app, &tokens[3], None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        assert_eq!(refusal(&app).await, "unknown_link");
        for email in cases {
            let sessions = app.cli(&["session", "list", "--tenant", "default", "--email", email], "").await;
            let none = sessions.map_or(true, |listed| listed.trim().is_empty());
            assert!(none, "{email}: no link opened a session");
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn a_recovery_code_stands_in_for_the_code_and_signing_out_everywhere_voids_links() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (_, recovery) = enable_mfa(&app, &tokens.access_token).await;
        assert_eq!(ask(&app, EMAIL).await.status(), StatusCode::ACCEPTED);
        let token = mailed(&mailer, EMAIL).await;
        let opened = confirm_ok(&app, &token, Some(&recovery)).await;
        assert_eq!(jwt_part(&opened.access_token, 1)["amr"], json!(["email", "otp", "mfa"]));

        // A link read by someone else dies when its owner signs out
        // everywhere.
        app.create_user("default", "careful@example.com", PASSWORD, &[], &[]).await;
        let careful = app.login_ok("careful@example.com", PASSWORD, None).await;
        assert_eq!(ask(&app, "careful@example.com").await.status(), StatusCode::ACCEPTED);
        let read_by_someone = mailed(&mailer, "careful@example.com").await;
        let out = app.post_authed("/auth/logout-all", &careful.access_token, &json!({})).await;
        assert_eq!(out.status(), StatusCode::NO_CONTENT);
        let refused = confirm(&app, &read_by_someone, None).await;
        assert_error(refused, StatusCode::BAD_REQUEST, "invalid_login_link").await;

        // And a tenant disable voids its users' links (an enable does not
        // bring them back).
        app.create_tenant("closed").await;
        app.create_user("closed", EMAIL, PASSWORD, &[], &[]).await;
        let asked = post(&app, "/auth/login/link", json!({ "email": EMAIL, "tenant": "closed" })).await;
        assert_eq!(asked.status(), StatusCode::ACCEPTED);
        results_of(&app, "login_link_requested", 3).await;
        let closed = links_to(&mailer, EMAIL).into_iter().map(|d| d.json()).find(|e| e["data"]["tenant"] == "closed");
        let closed_token = closed.expect("a link in the closed tenant")["data"]["token"].as_str().expect("a token").to_owned();
        for verb in ["disable", "enable"] {
            app.cli(&["tenant", verb, "closed"], "").await.unwrap_or_else(|e| panic!("tenant {verb}: {e}"));
        }
        assert_error(confirm(&app, &closed_token, None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_link_goes_only_to_a_proved_address() {
        let mailer = Mailer::spawn(0).await;
        let options = TestOptions {
            registration: true,
            auth_extra: "login_link = { enabled = true }\nemail_verification = { required = true }".to_owned(),
            ..TestOptions::default()
        };
        let app = spawn(&mailer, options).await;
        // Someone registers an address that is not theirs: its owner asks
        // for a link, and none is made (they would be signed in to an
        // account whose password the someone chose).
        let registered = post(&app, "/auth/register", json!({ "email": EMAIL, "password": WRONG_PASSWORD })).await;
        expect_json(registered, StatusCode::CREATED).await;
        assert_eq!(mailer.delivery(1).await.json()["type"], "email_verification.requested");
        assert_eq!(ask(&app, EMAIL).await.status(), StatusCode::ACCEPTED);
        // The result is audited after the delivery would have been made.
        assert_eq!(results_of(&app, "login_link_requested", 1).await, ["email_not_verified"]);
        assert!(links_to(&mailer, EMAIL).is_empty(), "no sign-in link was mailed: {:?}", mailer.deliveries());
        app.stop().await;
    }

    #[tokio::test]
    async fn one_link_presented_twice_at_once_opens_one_session() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert_eq!(ask(&app, EMAIL).await.status(), StatusCode::ACCEPTED);
        let token = mailed(&mailer, EMAIL).await;
        let (a, b) = tokio::join!(confirm(&app, &token, None), confirm(&app, &token, None));
        let mut statuses = [a.status(), b.status()];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_REQUEST]);
        let sessions = app.cli(&["session", "list", "--tenant", "default", "--email", EMAIL], "").await;
        let sessions = sessions.expect("session list");
        assert_eq!(sessions.lines().count(), 1, "{sessions}");
        assert!(sessions.contains("amr=email "), "{sessions}");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_link_asked_for_with_a_code_challenge_opens_a_session_only_with_its_verifier() {
        let mailer = Mailer::spawn(0).await;
        let options = TestOptions {
            auth_extra: "login_link = { enabled = true, require_code_challenge = true }".to_owned(),
            ..TestOptions::default()
        };
        let app = spawn(&mailer, options).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        // RFC 7636, appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        let with = |challenge: Option<&str>| json!({ "email": EMAIL, "code_challenge": challenge });
        assert_error(post(&app, "/auth/login/link", with(None)).await, StatusCode::BAD_REQUEST, "invalid_request").await;
        let plain = post(&app, "/auth/login/link", with(Some("plain-text-is-not-s256"))).await;
        assert_error(plain, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert_eq!(post(&app, "/auth/login/link", with(Some(challenge))).await.status(), StatusCode::ACCEPTED);
        let token = mailed(&mailer, EMAIL).await;

        // Whoever reads the mail without the app's verifier opens nothing,
        // and the link is not spent by trying.
        let present = |verifier: Option<&str>| {
            let body = json!({ "token": token, "code_verifier": verifier });
            post(&app, "/auth/login/link/confirm", body)
        };
        assert_error(present(None).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        assert_eq!(refusal(&app).await, "no_code_verifier");
        for wrong in [challenge, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK"] {
            assert_error(present(Some(wrong)).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
            assert_eq!(refusal(&app).await, "wrong_code_verifier");
        }
        let opened = expect_json(present(Some(verifier)).await, StatusCode::OK).await;
        assert_eq!(jwt_part(opened["access_token"].as_str().expect("a token"), 1)["amr"], json!(["email"]));
        assert_error(present(Some(verifier)).await, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        app.stop().await;

        // A link asked for without a challenge is not opened by a request
        // that presents a verifier (the app expected PKCE: a downgrade).
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer, TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert_eq!(ask(&app, EMAIL).await.status(), StatusCode::ACCEPTED);
        let token = mailed(&mailer, EMAIL).await;
        let body = json!({ "token": token, "code_verifier": verifier });
        let downgraded = post(&app, "/auth/login/link/confirm", body).await;
        assert_error(downgraded, StatusCode::BAD_REQUEST, "invalid_login_link").await;
        assert_eq!(refusal(&app).await, "unexpected_code_verifier");
        confirm_ok(&app, &token, None).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_locked_account_still_signs_in_by_link_and_stays_locked_to_passwords() {
        let mailer = Mailer::spawn(0).await;
        let app = spawn(&mailer, TestOptions { lockout_threshold: 2, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        for _ in 0..2 {
            assert_error(app.login(EMAIL, WRONG_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
                .await;
        }
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts").await;
        assert_eq!(ask(&app, EMAIL).await.status(), StatusCode::ACCEPTED);
        let token = mailed(&mailer, EMAIL).await;
        let opened = confirm_ok(&app, &token, None).await;
        assert_eq!(app.me_ok(&opened.access_token).await["email"], EMAIL);
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts").await;
        app.stop().await;
    }
}
