//! A TOTP second factor: set up with `POST /auth/mfa/totp` (and the
//! password), confirmed with a code, then asked for at every login; removed
//! with the password and a code, or by an operator (`gateway user
//! mfa-reset`). Codes are accepted once, wrong ones count towards the
//! lockout like wrong passwords and, past ten, lock the factor; the secret
//! never appears in the audit log.

use gateway::auth::totp::{code, step_at};
use gateway::db::unix_now;
use reqwest::{Response, StatusCode};
use serde_json::json;

use crate::helpers::{
    assert_error, assert_invalid_token, both_backends, expect_json, jwt_part, parse_tokens, route, spawn_app_with,
    TestApp, TestOptions, Tokens, PASSWORD, WRONG_PASSWORD,
};
use crate::upstream::spawn_upstream;

const EMAIL: &str = "two.factors@example.com";

async fn login_with(app: &TestApp, password: &str, otp: Option<&str>) -> Response {
    let mut body = json!({ "email": EMAIL, "password": password });
    if let Some(otp) = otp {
        body["otp"] = json!(otp);
    }
    app.client.post(app.url("/auth/login")).json(&body).send().await.expect("POST /auth/login")
}

/// The code of `secret` for `steps` steps from now.
fn code_in(secret: &str, steps: i64) -> String {
    code(secret, step_at(unix_now()) + steps).expect("a base32 secret")
}

/// A code that is none of the three `secret` accepts now.
fn wrong_code(secret: &str) -> String {
    let taken: Vec<String> = (-1..=2).map(|s| code_in(secret, s)).collect();
    (0..10).map(|d| format!("{d}{d}{d}{d}{d}{d}")).find(|c| !taken.contains(c)).expect("a code not taken")
}

/// Sets up and confirms a second factor for the holder of `access`;
/// returns its secret. The confirming code spends the current step.
async fn enable(app: &TestApp, access: &str) -> String {
    enable_with_recovery(app, access).await.0
}

/// [`enable`], and the recovery codes the confirmation gave.
async fn enable_with_recovery(app: &TestApp, access: &str) -> (String, Vec<String>) {
    let start = json!({ "password": PASSWORD });
    let setup = expect_json(app.post_authed("/auth/mfa/totp", access, &start).await, StatusCode::OK).await;
    let secret = setup["secret"].as_str().expect("a secret").to_owned();
    let confirm = json!({ "code": code_in(&secret, 0) });
    let confirmed =
        expect_json(app.post_authed("/auth/mfa/totp/confirm", access, &confirm).await, StatusCode::OK).await;
    let codes = confirmed["recovery_codes"].as_array().expect("recovery codes");
    let codes: Vec<String> = codes.iter().map(|c| c.as_str().expect("a code").to_owned()).collect();
    (secret, codes)
}

async fn audit(app: &TestApp) -> String {
    app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list")
}

both_backends! {
    #[tokio::test]
    async fn a_setup_not_confirmed_within_ten_minutes_is_over() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let start = json!({ "password": PASSWORD });
        let setup = expect_json(app.post_authed("/auth/mfa/totp", &tokens.access_token, &start).await, StatusCode::OK).await;
        let secret = setup["secret"].as_str().expect("a secret").to_owned();
        // Eleven minutes pass.
        let backdate = "UPDATE users SET totp_pending_at = totp_pending_at - 660 WHERE email = $1";
        crate::user_admin::hold_update(&app, backdate, EMAIL, std::time::Duration::ZERO).await.await.expect("backdated");
        let confirm = json!({ "code": code_in(&secret, 0) });
        let late = app.post_authed("/auth/mfa/totp/confirm", &tokens.access_token, &confirm).await;
        let body = assert_error(late, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(body["message"].as_str().is_some_and(|m| m.contains("10 minutes")), "{body}");
        // Logins still need no code, and the stale secret is cleared (by
        // `gateway prune`, or by the gateway's hourly upkeep if its first
        // round came after the eleven minutes).
        app.login_ok(EMAIL, PASSWORD, None).await;
        let pruned = app.cli(&["prune"], "").await.expect("prune");
        assert!(pruned.contains(" stale TOTP setup(s)"), "{pruned}");
        let store = crate::user_admin::open_store(&app).await;
        // No secret, and no setup, is stored any more (whatever its time).
        assert_eq!(store.count_totp_with("").await.expect("the store"), 0);
        store.close().await;
        // A new setup works as ever.
        enable(&app, &tokens.access_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_confirmed_factor_is_asked_for_at_every_login() {
        // Many refusals here; the lockout has a test of its own.
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let here = app.login_ok(EMAIL, PASSWORD, None).await;
        let elsewhere = app.login_ok(EMAIL, PASSWORD, None).await;

        // Set up, with the password: a stolen access token is not enough to
        // put a factor of the thief's on the account.
        let wrong = json!({ "password": WRONG_PASSWORD });
        let resp = app.post_authed("/auth/mfa/totp", &here.access_token, &wrong).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let resp = app.post_authed("/auth/mfa/totp", &here.access_token, &json!({})).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        // A secret and the URI an authenticator app takes.
        let start = json!({ "password": PASSWORD });
        let setup = expect_json(app.post_authed("/auth/mfa/totp", &here.access_token, &start).await, StatusCode::OK).await;
        let secret = setup["secret"].as_str().expect("a secret").to_owned();
        assert_eq!(secret.len(), 32, "{setup}");
        let uri = setup["otpauth_uri"].as_str().expect("a URI");
        assert!(uri.starts_with("otpauth://totp/gateway:two.factors%40example.com?secret="), "{uri}");
        assert!(uri.contains(&secret), "{uri}");
        // Not in force until confirmed.
        assert_eq!(app.me_ok(&here.access_token).await["mfa"], false);
        app.login_ok(EMAIL, PASSWORD, None).await;
        let bad = json!({ "code": wrong_code(&secret) });
        let resp = app.post_authed("/auth/mfa/totp/confirm", &here.access_token, &bad).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_code").await;

        let confirm = json!({ "code": code_in(&secret, 0) });
        let resp = app.post_authed("/auth/mfa/totp/confirm", &here.access_token, &confirm).await;
        let confirmed = expect_json(resp, StatusCode::OK).await;
        assert_eq!(confirmed["recovery_codes"].as_array().map(Vec::len), Some(10), "{confirmed}");
        assert_eq!(app.me_ok(&here.access_token).await["mfa"], true);
        // Sessions opened with the password alone are over; this one goes on.
        assert_invalid_token(app.get_authed("/auth/me", &elsewhere.access_token).await).await;
        assert_error(app.refresh(&elsewhere.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let resp = app.post_authed("/auth/mfa/totp", &here.access_token, &start).await;
        assert_error(resp, StatusCode::CONFLICT, "mfa_enabled").await;
        // The confirming code is spent.
        let resp = login_with(&app, PASSWORD, Some(&code_in(&secret, 0))).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

        // The password alone: told a code is needed (only once it is right).
        assert_error(login_with(&app, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "mfa_required").await;
        let resp = login_with(&app, WRONG_PASSWORD, None).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let wrong = wrong_code(&secret);
        let resp = login_with(&app, PASSWORD, Some(&wrong)).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        // A right code for the password and a wrong password for a right code.
        let next = code_in(&secret, 1);
        let resp = login_with(&app, WRONG_PASSWORD, Some(&next)).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let tokens: Tokens = parse_tokens(login_with(&app, PASSWORD, Some(&next)).await, "login with a code").await;
        app.me_ok(&tokens.access_token).await;
        app.refresh_ok(&tokens.refresh_token).await;
        // Accepted once: the same code again is refused, and so is one of
        // an earlier step.
        let resp = login_with(&app, PASSWORD, Some(&next)).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let resp = login_with(&app, PASSWORD, Some(&code_in(&secret, -1))).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

        let events = audit(&app).await;
        for reason in ["mfa_required", "wrong_otp", "otp_reused"] {
            assert!(events.contains(&format!("\"reason\":\"{reason}\"")), "no {reason}:\n{events}");
        }
        assert!(events.contains("\"event\":\"mfa_enabled\""), "{events}");
        assert!(!events.contains(&secret), "the secret is in the audit log:\n{events}");
        app.stop().await;
    }

    #[tokio::test]
    async fn wrong_codes_lock_the_account_like_wrong_passwords() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 4, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let secret = enable(&app, &tokens.access_token).await;
        // Asking without a code does not clear the count either, or codes
        // could be guessed between two such asks; and the ask that starts
        // the lock is not told the password was right.
        let wrong = wrong_code(&secret);
        for (otp, says) in [
            (Some(wrong.as_str()), "invalid_credentials"),
            (None, "mfa_required"),
            (Some(wrong.as_str()), "invalid_credentials"),
            (None, "invalid_credentials"),
        ] {
            assert_error(login_with(&app, PASSWORD, otp).await, StatusCode::UNAUTHORIZED, says).await;
        }
        let resp = login_with(&app, PASSWORD, Some(&code_in(&secret, 1))).await;
        assert_error(resp, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn removing_the_factor_takes_the_password_and_a_code_or_an_operator() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let secret = enable(&app, &tokens.access_token).await;
        let list = app.cli(&["user", "list", "--tenant", "default"], "").await.expect("user list");
        assert!(list.contains("  MFA"), "{list}");

        // A stolen access token is not enough.
        let next = code_in(&secret, 1);
        for (password, otp) in [(WRONG_PASSWORD, next.clone()), (PASSWORD, wrong_code(&secret))] {
            let body = json!({ "password": password, "code": otp });
            let resp = app.post_authed("/auth/mfa/totp/disable", &tokens.access_token, &body).await;
            assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        }
        let body = json!({ "password": PASSWORD, "code": next });
        let resp = app.post_authed("/auth/mfa/totp/disable", &tokens.access_token, &body).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(app.me_ok(&tokens.access_token).await["mfa"], false);
        let again = app.login_ok(EMAIL, PASSWORD, None).await;
        let resp = app.post_authed("/auth/mfa/totp/disable", &again.access_token, &body).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;

        // An operator removes it for a user who lost the device.
        enable(&app, &again.access_token).await;
        assert_error(login_with(&app, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "mfa_required").await;
        let out = app.cli(&["user", "mfa-reset", "--tenant", "default", "--email", EMAIL], "").await.expect("mfa-reset");
        assert!(out.contains("second factor of") && out.contains("1 session(s) revoked"), "{out}");
        // The sessions end with it: one may be a thief's who set it up.
        crate::helpers::eventually("the reset's revocation", std::time::Duration::from_secs(5), || async {
            app.get_authed("/auth/me", &again.access_token).await.status() == StatusCode::UNAUTHORIZED
        })
        .await;
        app.login_ok(EMAIL, PASSWORD, None).await;
        let list = app.cli(&["user", "list", "--tenant", "default"], "").await.expect("user list");
        assert!(!list.contains("  MFA"), "{list}");
        let err = app.cli(&["user", "mfa-reset", "--tenant", "default", "--email", EMAIL], "").await;
        let err = err.expect_err("nothing to remove");
        assert!(format!("{err:#}").contains("has no second factor"), "{err:#}");
        let events = audit(&app).await;
        for event in ["mfa_disable_failed", "mfa_disabled", "mfa_reset"] {
            assert!(events.contains(&format!("\"event\":\"{event}\"")), "no {event}:\n{events}");
        }
        app.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_code_opens_one_session_however_many_race() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let secret = enable(&app, &tokens.access_token).await;
        let next = code_in(&secret, 1);
        let logins = (0..4).map(|_| login_with(&app, PASSWORD, Some(&next)));
        let statuses: Vec<StatusCode> = futures::future::join_all(logins).await.iter().map(Response::status).collect();
        let opened = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(opened, 1, "{statuses:?}");
        app.stop().await;
    }

    #[tokio::test]
    async fn ten_wrong_codes_lock_the_factor_until_an_operator_resets_it() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 100, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let secret = enable(&app, &tokens.access_token).await;
        // A right code clears the count: nine wrong, one right, nine wrong.
        let wrong = wrong_code(&secret);
        for _ in 0..9 {
            let resp = login_with(&app, PASSWORD, Some(&wrong)).await;
            assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        }
        parse_tokens(login_with(&app, PASSWORD, Some(&code_in(&secret, 1))).await, "a right code").await;
        for _ in 0..9 {
            let resp = login_with(&app, PASSWORD, Some(&wrong)).await;
            assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        }
        assert!(!audit(&app).await.contains("\"event\":\"mfa_locked\""));
        // The tenth in a row locks it: a right code is refused from then on.
        let resp = login_with(&app, PASSWORD, Some(&wrong)).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let resp = login_with(&app, PASSWORD, Some(&code_in(&secret, 0))).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let events = audit(&app).await;
        assert!(events.contains("\"event\":\"mfa_locked\"") && events.contains("\"reason\":\"mfa_locked\""), "{events}");
        // A login that read the row before the lock cannot spend a code
        // (and clear the count) after it: the store checks the count too.
        let store = crate::user_admin::open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("read").expect("the default tenant");
        let user = store.user_by_email(tenant.id, EMAIL).await.expect("read").expect("the user");
        let later = step_at(unix_now()) + 5;
        let spent = store.spend_totp_step(tenant.id, user.id, &secret, later, gateway::auth::service::MAX_OTP_FAILURES);
        assert!(!spent.await.expect("update"), "a code was spent on a locked factor");
        store.close().await;
        app.cli(&["user", "mfa-reset", "--tenant", "default", "--email", EMAIL], "").await.expect("mfa-reset");
        app.login_ok(EMAIL, PASSWORD, None).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_route_with_mfa_takes_only_tokens_of_a_login_with_a_second_factor() {
        let upstream = spawn_upstream("stepped-up").await;
        let routes = route("vault", "/vault", &[upstream.url()], "mfa = true");
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::with_extra(routes) }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let plain = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(jwt_part(&plain.access_token, 1)["amr"], json!(["pwd"]));
        let refused = |resp: Response| async move {
            let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_owned());
            assert_error(resp, StatusCode::UNAUTHORIZED, "insufficient_user_authentication").await;
            let challenge = challenge.expect("a challenge");
            assert!(challenge.contains("error=\"insufficient_user_authentication\""), "{challenge}");
        };
        refused(app.get_authed("/vault/x", &plain.access_token).await).await;

        // Setting a factor up does not step up the session that did it.
        let secret = enable(&app, &plain.access_token).await;
        refused(app.get_authed("/vault/x", &plain.access_token).await).await;
        let stepped = parse_tokens(login_with(&app, PASSWORD, Some(&code_in(&secret, 1))).await, "login").await;
        assert_eq!(jwt_part(&stepped.access_token, 1)["amr"], json!(["pwd", "otp", "mfa"]));
        assert_eq!(app.get_authed("/vault/x", &stepped.access_token).await.status(), StatusCode::OK);
        // The session keeps it through its refreshes.
        let refreshed = app.refresh_ok(&stepped.refresh_token).await;
        assert_eq!(jwt_part(&refreshed.access_token, 1)["amr"], json!(["pwd", "otp", "mfa"]));
        assert_eq!(app.get_authed("/vault/x", &refreshed.access_token).await.status(), StatusCode::OK);
        assert_eq!(upstream.hits(), 2, "a refused request reached the upstream");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_recovery_code_stands_in_for_a_code_once() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (_, codes) = enable_with_recovery(&app, &tokens.access_token).await;
        assert_eq!(codes.len(), 10);
        assert!(codes.iter().all(|c| c.len() == 11 && c.as_bytes()[5] == b'-'), "{codes:?}");

        // As typed from paper: any case, with or without the dash.
        let typed = codes[0].to_uppercase().replace('-', "");
        let opened = parse_tokens(login_with(&app, PASSWORD, Some(&typed)).await, "login with a recovery code").await;
        assert_eq!(jwt_part(&opened.access_token, 1)["amr"], json!(["pwd", "otp", "mfa"]));
        // Used up, and a made-up one is no code.
        for code in [codes[0].as_str(), "aaaaa-aaaaa"] {
            let resp = login_with(&app, PASSWORD, Some(code)).await;
            assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        }
        // Another is still good, and the wrong password with it is not.
        let resp = login_with(&app, WRONG_PASSWORD, Some(&codes[1])).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        parse_tokens(login_with(&app, PASSWORD, Some(&codes[1])).await, "a second recovery code").await;
        let events = audit(&app).await;
        assert!(events.contains("\"event\":\"mfa_recovery_code_used\""), "{events}");
        assert!(events.contains("\"left\":8"), "{events}");
        assert!(events.contains("\"reason\":\"wrong_recovery_code\""), "{events}");
        for code in &codes {
            assert!(!events.contains(code.as_str()), "a recovery code is in the audit log");
        }
        app.stop().await;
    }

    /// The database holds TOTP secrets sealed (AES-256-GCM with the key in
    /// the keys directory), never as they are; one stored as it is by a
    /// gateway from before sealing still works, and is sealed at the next
    /// start.
    #[tokio::test]
    async fn totp_secrets_are_sealed_in_the_database() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::default() }).await;
        let user_id: uuid::Uuid = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await.parse().expect("a uuid");
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (secret, codes) = enable_with_recovery(&app, &tokens.access_token).await;
        let store = crate::user_admin::open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("the store").expect("the default tenant").id;
        let stored = |store: gateway::db::Store| async move {
            store.user_by_id(tenant, user_id).await.expect("the store").expect("the user").totp_secret.expect("a secret")
        };
        let sealed = stored(store.clone()).await;
        assert!(sealed.starts_with("v1:") && !sealed.contains(&secret), "sealed: {sealed}");
        assert!(app.key_pem_paths().len() == 1 && app.config_path.parent().expect("dir").join("keys/secrets.key").exists());

        // As a gateway from before sealing stored it: read as it is.
        assert!(store.reseal_totp(tenant, user_id, false, &sealed, &secret).await.expect("the store"));
        parse_tokens(login_with(&app, PASSWORD, Some(&code_in(&secret, 1))).await, "a secret stored as it is").await;
        let app = app.restart().await;
        let resealed = stored(store.clone()).await;
        assert!(resealed.starts_with("v1:") && !resealed.contains(&secret), "sealed at the start: {resealed}");
        // And it opens: a login (here with a recovery code, the current
        // step being spent) reads it.
        parse_tokens(login_with(&app, PASSWORD, Some(&codes[0])).await, "after the start").await;

        // Before a rollback to a release that cannot open them: written
        // back as they are, and still read.
        let out = app.cli(&["keys", "unseal-totp"], "").await.expect("keys unseal-totp");
        assert!(out.starts_with("1 TOTP secret(s) written back unsealed"), "{out}");
        assert_eq!(stored(store.clone()).await, secret);
        parse_tokens(login_with(&app, PASSWORD, Some(&codes[1])).await, "unsealed").await;
        store.close().await;
        app.stop().await;
    }

    /// `gateway keys rotate-secrets` makes a new secrets key and reseals
    /// every stored secret with it while a gateway serves: the gateway,
    /// which loaded only the old key, reads the new one when it meets a
    /// secret it sealed, and seals with it from then on; the old file can
    /// go once `keys list` says it holds nothing.
    #[tokio::test]
    async fn secrets_keys_rotate_while_the_gateway_serves() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::default() }).await;
        let user_id: uuid::Uuid = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await.parse().expect("a uuid");
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (secret, _) = enable_with_recovery(&app, &tokens.access_token).await;
        let store = crate::user_admin::open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("the store").expect("the default tenant").id;
        let stored = |store: gateway::db::Store, user_id| async move {
            store.user_by_id(tenant, user_id).await.expect("the store").expect("the user").totp_secret.expect("a secret")
        };
        let first_sealed = stored(store.clone(), user_id).await;
        assert!(first_sealed.starts_with("v1:"));

        let file = app.cli(&["keys", "rotate-secrets"], "").await.expect("keys rotate-secrets").trim().to_owned();
        let id = file.strip_prefix("secrets-").and_then(|f| f.strip_suffix(".key")).expect("secrets-<id>.key").to_owned();
        let resealed = stored(store.clone(), user_id).await;
        assert!(resealed.starts_with(&format!("v2:{id}:")) && !resealed.contains(&secret), "resealed: {resealed}");
        // The running gateway opens it, reading the new key.
        parse_tokens(login_with(&app, PASSWORD, Some(&code_in(&secret, 1))).await, "after the rotation").await;
        let list = app.cli(&["keys", "list"], "").await.expect("keys list");
        assert!(list.contains(&format!("{file}  sealing      holds 1 TOTP secret(s)")), "{list}");
        assert!(list.contains("secrets.key  open-only    holds 0 TOTP secret(s)"), "{list}");

        // A factor set up now is sealed with the new key.
        let second = "second@example.com";
        let second_id: uuid::Uuid = app.create_user("default", second, PASSWORD, &[], &[]).await.parse().expect("a uuid");
        let access = app.login_ok(second, PASSWORD, None).await.access_token;
        let (second_secret, _) = enable_with_recovery(&app, &access).await;
        assert!(stored(store.clone(), second_id).await.starts_with(&format!("v2:{id}:")));

        // A secret an older key sealed since (a gateway that had not met the
        // new one) is resealed at the next start.
        let now = stored(store.clone(), user_id).await;
        assert!(store.reseal_totp(tenant, user_id, false, &now, &first_sealed).await.expect("the store"));
        let app = app.restart().await;
        assert!(stored(store.clone(), user_id).await.starts_with(&format!("v2:{id}:")), "resealed at the start");

        // The old key goes; a restarted gateway opens everything without it.
        std::fs::remove_file(app.config_path.parent().expect("dir").join("keys/secrets.key")).expect("remove");
        let app = app.restart().await;
        // A secret still sealed with it would not open: `keys list` says so.
        let now = stored(store.clone(), user_id).await;
        assert!(store.reseal_totp(tenant, user_id, false, &now, &first_sealed).await.expect("the store"));
        let list = app.cli(&["keys", "list"], "").await.expect("keys list");
        assert!(list.contains("1 TOTP secret(s) name a secrets key this directory does not hold"), "{list}");
        assert!(!list.contains("secrets.key "), "{list}");
        let body = json!({ "email": second, "password": PASSWORD, "otp": code_in(&second_secret, 1) });
        let login = app.client.post(app.url("/auth/login")).json(&body).send().await.expect("POST /auth/login");
        parse_tokens(login, "with the new key alone").await;
        let generated = crate::password_reset::audit_events(&app, "key_generated").await;
        assert!(generated.iter().any(|e| e["detail"]["key"] == file.as_str() && e["detail"]["resealed"] == 1), "{generated:?}");
        store.close().await;
        app.stop().await;
    }

    /// A reseal (a rotation's, a start's) that rewrites a secret while a
    /// login holding the old text runs does not fail that login: the same
    /// secret under a new text is no spent code, by TOTP or recovery code.
    /// (On SQLite the held write keeps the login from reading the user until
    /// it commits, so the login reads the new text; PostgreSQL lets it read
    /// the old one, and exercises the retry.)
    #[tokio::test]
    async fn a_login_racing_a_reseal_is_not_refused() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::default() }).await;
        let user_id: uuid::Uuid = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await.parse().expect("a uuid");
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (secret, codes) = enable_with_recovery(&app, &tokens.access_token).await;
        let dir = app.config_path.parent().expect("dir").join("keys");
        let keys = gateway::auth::seal::SealingKeys::load(&dir).expect("load").expect("the secrets key");
        let update: &'static str =
            Box::leak(format!("UPDATE users SET totp_secret = $1 WHERE email = '{EMAIL}'").into_boxed_str());
        for (case, otp) in [("a code", code_in(&secret, 1)), ("a recovery code", codes[0].clone())] {
            let resealed: &'static str =
                Box::leak(keys.seal(&secret, user_id.as_bytes()).expect("sealed").into_boxed_str());
            let held = crate::user_admin::hold_update(&app, update, resealed, std::time::Duration::from_millis(1500)).await;
            let (login, committed) = tokio::join!(login_with(&app, PASSWORD, Some(&otp)), held);
            committed.expect("the reseal committed");
            parse_tokens(login, case).await;
        }
        app.stop().await;
    }

    /// With `auth.seal_totp_secrets = false` (while replicas of an older
    /// release still serve), secrets are stored as they are and nothing
    /// is sealed at the start; sealed ones are still read.
    #[tokio::test]
    async fn with_sealing_off_secrets_are_stored_as_they_are() {
        let options = TestOptions {
            lockout_threshold: 20,
            auth_extra: "seal_totp_secrets = false".to_owned(),
            ..TestOptions::default()
        };
        let app = spawn_app_with(options).await;
        let user_id: uuid::Uuid = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await.parse().expect("a uuid");
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let (secret, codes) = enable_with_recovery(&app, &tokens.access_token).await;
        let store = crate::user_admin::open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("the store").expect("the default tenant").id;
        let user = store.user_by_id(tenant, user_id).await.expect("the store").expect("the user");
        assert_eq!(user.totp_secret.as_deref(), Some(secret.as_str()), "stored as it is");
        let app = app.restart().await;
        let user = store.user_by_id(tenant, user_id).await.expect("the store").expect("the user");
        assert_eq!(user.totp_secret.as_deref(), Some(secret.as_str()), "not sealed at the start");
        parse_tokens(login_with(&app, PASSWORD, Some(&codes[0])).await, "read as it is").await;
        store.close().await;
        app.stop().await;
    }

    #[tokio::test]
    async fn new_recovery_codes_take_the_password_and_a_code_and_void_the_old_ones() {
        let app = spawn_app_with(TestOptions { lockout_threshold: 20, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let regenerate = |password: &str, code: &str| json!({ "password": password, "code": code });
        let none = app.post_authed("/auth/mfa/recovery-codes", &tokens.access_token, &regenerate(PASSWORD, "123456")).await;
        assert_error(none, StatusCode::BAD_REQUEST, "invalid_request").await;
        let (secret, old) = enable_with_recovery(&app, &tokens.access_token).await;

        // A stolen token alone gets nothing: the password and a code are checked as at login.
        for (password, code) in [(WRONG_PASSWORD, code_in(&secret, 1)), (PASSWORD, wrong_code(&secret))] {
            let resp = app.post_authed("/auth/mfa/recovery-codes", &tokens.access_token, &regenerate(password, &code)).await;
            assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        }
        let resp = app.post_authed("/auth/mfa/recovery-codes", &tokens.access_token, &regenerate(PASSWORD, &code_in(&secret, 1))).await;
        let body = expect_json(resp, StatusCode::OK).await;
        let new: Vec<String> = body["recovery_codes"]
            .as_array()
            .expect("recovery codes")
            .iter()
            .map(|c| c.as_str().expect("a code").to_owned())
            .collect();
        assert_eq!(new.len(), 10);
        assert!(new.iter().all(|c| !old.contains(c)), "new codes");

        // The old sheet is void, the new one works; the factor itself is unchanged.
        assert_error(login_with(&app, PASSWORD, Some(&old[1])).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        parse_tokens(login_with(&app, PASSWORD, Some(&new[0])).await, "login with a new recovery code").await;
        // A recovery code stands in for the code here too, and is spent by it.
        let resp = app.post_authed("/auth/mfa/recovery-codes", &tokens.access_token, &regenerate(PASSWORD, &new[1])).await;
        let newest = expect_json(resp, StatusCode::OK).await;
        assert!(!newest["recovery_codes"].as_array().expect("codes").contains(&json!(new[2])), "a third sheet");
        assert_error(login_with(&app, PASSWORD, Some(&new[2])).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(app.me_ok(&tokens.access_token).await["mfa"], true, "the factor itself stays");
        let events = audit(&app).await;
        assert!(events.contains("\"event\":\"mfa_recovery_codes_regenerated\""), "{events}");
        assert!(events.contains("\"event\":\"mfa_recovery_codes_failed\""), "{events}");
        app.stop().await;
    }
}
