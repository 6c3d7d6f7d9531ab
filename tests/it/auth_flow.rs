//! Authenticated endpoints: me, logout, sessions, password change, registration, expiry,
//! and revocation by the CLI running in another process.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::{USER_AGENT, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;
use uuid::Uuid;

use crate::helpers::{
    assert_error, assert_error_in, assert_invalid_token, assert_status, both_backends, expect_json, jwt_part,
    parse_tokens, parse_uuid, run_binary, spawn_app, spawn_app_with, TestApp, TestOptions, OTHER_PASSWORD, PASSWORD,
};

const EMAIL: &str = "me@example.com";

const NEW_PASSWORD: &str = "a brand new and rather long passphrase";

fn sid_of(access: &str) -> String {
    jwt_part(access, 1)["sid"].as_str().expect("sid claim is a string").to_owned()
}

async fn assert_unauthorized(case: &str, resp: Response) {
    let www = resp.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().expect("WWW-Authenticate is ASCII").to_owned());
    let status = resp.status();
    let text = resp.text().await.expect("read body");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {text}"));
    assert_eq!(body["error"], "unauthorized", "{case}: {text}");
    assert_eq!(www.as_deref(), Some("Bearer"), "{case}: WWW-Authenticate");
}

async fn register(app: &TestApp, email: &str, password: &str) -> Response {
    app.client
        .post(app.url("/auth/register"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .expect("POST /auth/register")
}

both_backends! {
    #[tokio::test]
    async fn me_returns_identity_of_the_token() {
        let app = spawn_app().await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &["admin", "ops"], &["read", "write"]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let claims = jwt_part(&tokens.access_token, 1);

        let me = app.me_ok(&tokens.access_token).await;
        assert_eq!(me["user_id"], user_id.as_str(), "{me}");
        assert_eq!(me["tenant"], "default", "{me}");
        assert_eq!(me["tenant_id"], claims["tid"], "{me}");
        assert_eq!(me["email"], EMAIL, "{me}");
        assert_eq!(me["session_id"], claims["sid"], "{me}");
        let roles: BTreeSet<&str> = me["roles"]
            .as_array()
            .expect("roles is an array")
            .iter()
            .map(|r| r.as_str().expect("role is a string"))
            .collect();
        assert_eq!(roles, BTreeSet::from(["admin", "ops"]));
        let scopes: BTreeSet<&str> = me["scopes"]
            .as_array()
            .expect("scopes is an array")
            .iter()
            .map(|s| s.as_str().expect("scope is a string"))
            .collect();
        assert_eq!(scopes, BTreeSet::from(["read", "write"]));
        app.stop().await;
    }

    #[tokio::test]
    async fn logout_revokes_only_the_current_session() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;
        let b = app.login_ok(EMAIL, PASSWORD, None).await;
        app.me_ok(&a.access_token).await;

        let resp = app.post_authed("/auth/logout", &a.access_token, &json!({})).await;
        assert_status(resp, StatusCode::NO_CONTENT).await;

        assert_invalid_token(app.get_authed("/auth/me", &a.access_token).await).await;
        assert_error(app.refresh(&a.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        // The other session is untouched.
        app.me_ok(&b.access_token).await;
        app.refresh_ok(&b.refresh_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn logout_all_revokes_every_session() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.create_user("default", "bystander@example.com", PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;
        let b = app.login_ok(EMAIL, PASSWORD, None).await;
        let bystander = app.login_ok("bystander@example.com", PASSWORD, None).await;

        let resp = app.post_authed("/auth/logout-all", &a.access_token, &json!({})).await;
        assert_status(resp, StatusCode::NO_CONTENT).await;

        for (case, tokens) in [("calling session", &a), ("second session", &b)] {
            assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;
            let resp = app.refresh(&tokens.refresh_token).await;
            assert_error_in(case, resp, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        }
        // Other users are untouched, and the user can log in again.
        app.me_ok(&bystander.access_token).await;
        let again = app.login_ok(EMAIL, PASSWORD, None).await;
        app.me_ok(&again.access_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn sessions_list_marks_the_current_session() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.create_user("default", "other@example.com", PASSWORD, &[], &[]).await;
        let agent = "integration-test-agent/1.0";
        let resp = app
            .client
            .post(app.url("/auth/login"))
            .header(USER_AGENT, agent)
            .json(&json!({ "email": EMAIL, "password": PASSWORD }))
            .send()
            .await
            .expect("POST /auth/login");
        let first = parse_tokens(resp, "login with a custom User-Agent").await;
        let second = app.login_ok(EMAIL, PASSWORD, None).await;
        // Another user's session must not show up.
        app.login_ok("other@example.com", PASSWORD, None).await;

        let sessions = expect_json(app.get_authed("/auth/sessions", &first.access_token).await, StatusCode::OK).await;
        let list = sessions.as_array().expect("sessions is an array");
        assert_eq!(list.len(), 2, "{sessions}");
        for session in list {
            parse_uuid(session["id"].as_str().expect("id is a string"), "session id");
            assert!(!session["created_at"].is_null(), "{session}");
            assert!(!session["last_used_at"].is_null(), "{session}");
            assert!(session["current"].is_boolean(), "{session}");
        }
        let current: Vec<&Value> = list.iter().filter(|s| s["current"].as_bool() == Some(true)).collect();
        assert_eq!(current.len(), 1, "exactly one current session: {sessions}");
        let current = current.first().expect("one current session");
        assert_eq!(current["id"], sid_of(&first.access_token), "{sessions}");
        assert_eq!(current["user_agent"], agent, "{sessions}");
        let ip = current["ip"].as_str().expect("ip is a string");
        assert!(ip.contains("127.0.0.1"), "ip: {ip}");

        // Seen from the second session, the other one is current.
        let sessions = expect_json(app.get_authed("/auth/sessions", &second.access_token).await, StatusCode::OK).await;
        let current: Vec<&Value> = sessions
            .as_array()
            .expect("sessions is an array")
            .iter()
            .filter(|s| s["current"].as_bool() == Some(true))
            .collect();
        assert_eq!(current.len(), 1, "{sessions}");
        assert_eq!(current.first().expect("one current session")["id"], sid_of(&second.access_token));
        app.stop().await;
    }

    #[tokio::test]
    async fn deleting_own_other_session_revokes_it() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;
        let b = app.login_ok(EMAIL, PASSWORD, None).await;

        let path = format!("/auth/sessions/{}", sid_of(&b.access_token));
        assert_status(app.delete_authed(&path, &a.access_token).await, StatusCode::NO_CONTENT).await;

        assert_invalid_token(app.get_authed("/auth/me", &b.access_token).await).await;
        assert_error(app.refresh(&b.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        app.me_ok(&a.access_token).await;
        let sessions = expect_json(app.get_authed("/auth/sessions", &a.access_token).await, StatusCode::OK).await;
        let list = sessions.as_array().expect("sessions is an array");
        assert_eq!(list.len(), 1, "{sessions}");
        assert_eq!(list.first().expect("one session")["id"], sid_of(&a.access_token));
        app.stop().await;
    }

    #[tokio::test]
    async fn deleting_foreign_or_unknown_sessions_is_not_found() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.create_user("default", "victim@example.com", PASSWORD, &[], &[]).await;
        let me = app.login_ok(EMAIL, PASSWORD, None).await;
        let victim = app.login_ok("victim@example.com", PASSWORD, None).await;

        let random = Uuid::new_v4().to_string();
        let cases = [
            ("another user's session", sid_of(&victim.access_token)),
            ("random uuid", random),
            ("not a uuid", "not-a-uuid".to_owned()),
            ("not UTF-8 once decoded", "%FF".to_owned()),
        ];
        for (case, id) in cases {
            let resp = app.delete_authed(&format!("/auth/sessions/{id}"), &me.access_token).await;
            assert_error_in(case, resp, StatusCode::NOT_FOUND, "not_found").await;
        }
        // Nothing was revoked.
        app.me_ok(&victim.access_token).await;
        app.me_ok(&me.access_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn password_change_revokes_other_sessions() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;
        let b = app.login_ok(EMAIL, PASSWORD, None).await;

        let resp = app
            .post_authed(
                "/auth/password",
                &a.access_token,
                &json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
            )
            .await;
        assert_status(resp, StatusCode::NO_CONTENT).await;

        // The current session keeps working, refresh included.
        app.me_ok(&a.access_token).await;
        // Every other session is revoked.
        assert_invalid_token(app.get_authed("/auth/me", &b.access_token).await).await;
        assert_error(app.refresh(&b.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        // Old password out, new password in.
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        app.login_ok(EMAIL, NEW_PASSWORD, None).await;
        app.refresh_ok(&a.refresh_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn password_change_rejects_wrong_current_and_weak_new() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;
        let b = app.login_ok(EMAIL, PASSWORD, None).await;

        let resp = app
            .post_authed(
                "/auth/password",
                &a.access_token,
                &json!({ "current_password": "not my current password", "new_password": NEW_PASSWORD }),
            )
            .await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

        let resp = app
            .post_authed(
                "/auth/password",
                &a.access_token,
                &json!({ "current_password": PASSWORD, "new_password": "short" }),
            )
            .await;
        assert_error(resp, StatusCode::BAD_REQUEST, "weak_password").await;

        // Nothing changed: both sessions live, the old password still works, the new one does not.
        app.me_ok(&a.access_token).await;
        app.me_ok(&b.access_token).await;
        app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.login(EMAIL, NEW_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn registration_disabled_is_not_found() {
        let app = spawn_app().await;
        let resp = register(&app, "new@example.com", PASSWORD).await;
        assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
        assert_error(
            app.login("new@example.com", PASSWORD, None).await,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        )
        .await;
        app.stop().await;
    }

    #[tokio::test]
    async fn registration_enabled_creates_users() {
        let app = spawn_app_with(TestOptions { registration: true, ..TestOptions::default() }).await;

        let body = expect_json(register(&app, "new@example.com", PASSWORD).await, StatusCode::CREATED).await;
        let user_id = parse_uuid(body["user_id"].as_str().expect("user_id is a string"), "user_id");
        let tokens = app.login_ok("new@example.com", PASSWORD, None).await;
        assert_eq!(jwt_part(&tokens.access_token, 1)["sub"], user_id.as_str());

        // Duplicate, differing only in case and whitespace.
        assert_error(register(&app, "  NEW@Example.com ", OTHER_PASSWORD).await, StatusCode::CONFLICT, "email_taken")
            .await;
        // The duplicate attempt did not change the password.
        app.login_ok("new@example.com", PASSWORD, None).await;

        // 14 characters: too short; 15: accepted.
        assert_error(
            register(&app, "weak@example.com", "abcdefghijklmn").await,
            StatusCode::BAD_REQUEST,
            "weak_password",
        )
        .await;
        assert_error(
            app.login("weak@example.com", "abcdefghijklmn", None).await,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        )
        .await;
        expect_json(register(&app, "edge@example.com", "xkcd-horse-1234").await, StatusCode::CREATED).await;
        app.login_ok("edge@example.com", "xkcd-horse-1234", None).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn missing_bearer_is_unauthorized() {
        let app = spawn_app().await;
        let resp = app.client.get(app.url("/auth/me")).send().await.expect("GET /auth/me");
        assert_unauthorized("GET /auth/me", resp).await;
        let resp = app.client.get(app.url("/auth/sessions")).send().await.expect("GET /auth/sessions");
        assert_unauthorized("GET /auth/sessions", resp).await;
        let resp = app.client.post(app.url("/auth/logout")).json(&json!({})).send().await.expect("POST /auth/logout");
        assert_unauthorized("POST /auth/logout", resp).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn access_token_expires() {
        let app = spawn_app_with(TestOptions { access_token_ttl: "1s", leeway: "0s", ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(tokens.expires_in, 1);
        let claims = jwt_part(&tokens.access_token, 1);
        let iat = claims["iat"].as_i64().expect("iat is an integer");
        let exp = claims["exp"].as_i64().expect("exp is an integer");
        assert_eq!(exp - iat, 1, "{claims}");

        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;

        // The refresh token outlives the access token.
        let fresh = app.refresh_ok(&tokens.refresh_token).await;
        assert_eq!(fresh.expires_in, 1);
        app.stop().await;
    }

    #[tokio::test]
    async fn disabling_a_user_with_the_binary_revokes_live_tokens() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        app.me_ok(&tokens.access_token).await;

        let output = run_binary(&app.config_path, &["user", "disable", "--tenant", "default", "--email", EMAIL]).await;
        assert!(
            output.status.success(),
            "gateway user disable failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        // Revocation reaches the running app through polling: bounded wait, not a fixed sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let resp = app.get_authed("/auth/me", &tokens.access_token).await;
            if resp.status() == StatusCode::UNAUTHORIZED {
                assert_invalid_token(resp).await;
                break;
            }
            assert_status(resp, StatusCode::OK).await;
            assert!(Instant::now() < deadline, "access token still accepted 5 s after `gateway user disable`");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        assert_error(app.refresh(&tokens.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        app.stop().await;
    }
}
