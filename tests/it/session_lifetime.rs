//! `auth.session_lifetime`: a session ends that long after its login,
//! however often it is refreshed; its refresh and access tokens are cut to
//! end with it, and `/auth/sessions` and `gateway session list` list only
//! open sessions (not revoked, lifetime left, refresh token unexpired).
//!
//! Time passes by moving rows into the past, as `retention` does.

use gateway::auth::service::rfc3339;
use gateway::db::{unix_now, Store};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{
    assert_error, both_backends, expect_json, jwt_part, spawn_app_with, TestApp, TestOptions, Tokens, PASSWORD,
};
use crate::retention::{count, exec};
use crate::user_admin::open_store;

const EMAIL: &str = "timeboxed@example.com";
const HOUR: i64 = 3600;

fn sid(tokens: &Tokens) -> Uuid {
    Uuid::parse_str(jwt_part(&tokens.access_token, 1)["sid"].as_str().expect("sid")).expect("sid is a uuid")
}

/// Moves the session's login `by` seconds into the past (its tokens keep
/// their expiry).
async fn age_login(store: &Store, session: Uuid, by: i64) {
    let sql = "UPDATE sessions SET created_at = created_at - $2 WHERE id = $1";
    assert_eq!(exec(store, sql, session, by).await, 1);
}

async fn created_at(store: &Store, session: Uuid) -> i64 {
    count(store, "SELECT created_at FROM sessions WHERE id = $1", session).await
}

/// When the session's live refresh token expires, as stored.
async fn stored_expiry(store: &Store, session: Uuid) -> i64 {
    count(store, "SELECT expires_at FROM refresh_tokens WHERE session_id = $1 AND spent_at IS NULL", session).await
}

/// The ids of the sessions `/auth/sessions` lists for `access`, with each one.
async fn listed(app: &TestApp, access: &str) -> Vec<(String, Value)> {
    let sessions = expect_json(app.get_authed("/auth/sessions", access).await, StatusCode::OK).await;
    let list = sessions.as_array().expect("sessions is an array");
    list.iter().map(|s| (s["id"].as_str().expect("id").to_owned(), s.clone())).collect()
}

fn timeboxed() -> TestOptions {
    TestOptions { auth_extra: "session_lifetime = \"1h\"".to_owned(), ..TestOptions::default() }
}

both_backends! {
    #[tokio::test]
    async fn tokens_end_with_the_session_and_a_refresh_past_it_fails() {
        let app = spawn_app_with(timeboxed()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = open_store(&app).await;

        let login = app.login_ok(EMAIL, PASSWORD, None).await;
        // The refresh token (30 days) is cut to the hour; the access token
        // (15 minutes) ends first anyway.
        assert_eq!((login.expires_in, login.refresh_expires_in), (900, 3600));
        let session = sid(&login);

        // 50 minutes into the hour, a refresh gets at most the 10 left.
        age_login(&store, session, 50 * 60).await;
        let before = unix_now();
        let late = app.refresh_ok(&login.refresh_token).await;
        let ends_at = created_at(&store, session).await + HOUR;
        assert!((598..=600).contains(&late.expires_in), "access token cut to the session: {}", late.expires_in);
        assert!((598..=600).contains(&late.refresh_expires_in), "refresh token cut: {}", late.refresh_expires_in);
        let claims = jwt_part(&late.access_token, 1);
        assert_eq!(claims["exp"].as_i64(), Some(ends_at), "exp is the session's end: {claims}");
        assert_eq!(stored_expiry(&store, session).await, ends_at, "the stored refresh token is cut too");
        assert!(claims["iat"].as_i64().is_some_and(|iat| iat >= before), "{claims}");
        let sessions = listed(&app, &late.access_token).await;
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        assert_eq!(sessions[0].1["expires_at"], rfc3339(ends_at), "{sessions:?}");
        app.me_ok(&late.access_token).await;

        // Past the hour, the session is over: its refresh token is refused
        // although its own expiry (cut when it was minted) is still ahead.
        age_login(&store, session, 11 * 60).await;
        assert_error(app.refresh(&late.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        // Presented again (a retry), it is refused the same way, not taken
        // for the reuse of a spent token.
        assert_error(app.refresh(&late.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let reuses = app.cli(&["audit", "list", "--event", "refresh_reuse_detected"], "").await.expect("audit list");
        assert!(reuses.trim().is_empty(), "{reuses}");
        // The refusal is not taken for reuse of the token it spent: a
        // new login opens a session as usual.
        let again = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(again.refresh_expires_in, 3600);
        app.refresh_ok(&again.refresh_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn sessions_past_their_lifetime_or_refresh_expiry_are_not_listed() {
        let app = spawn_app_with(timeboxed()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = open_store(&app).await;
        let current = app.login_ok(EMAIL, PASSWORD, None).await;
        let lived = app.login_ok(EMAIL, PASSWORD, None).await;
        let unrefreshed = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(listed(&app, &current.access_token).await.len(), 3);

        // A login more than an hour ago, as after the lifetime was lowered
        // in the file: its refresh token has not expired, but the session has.
        age_login(&store, sid(&lived), HOUR + 60).await;
        // A session nobody refreshed in time: no revocation, yet over.
        let sql = "UPDATE refresh_tokens SET expires_at = $2 WHERE session_id = $1";
        assert_eq!(exec(&store, sql, sid(&unrefreshed), unix_now() - 1).await, 1);

        let ids: Vec<String> = listed(&app, &current.access_token).await.into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![sid(&current).to_string()]);
        let out = app.cli(&["session", "list", "--tenant", "default", "--email", EMAIL], "").await.expect("session list");
        assert!(out.contains(&sid(&current).to_string()), "{out}");
        assert!(out.contains(" expires="), "{out}");
        for over in [&lived, &unrefreshed] {
            assert!(!out.contains(&sid(over).to_string()), "{out}");
            assert_error(app.refresh(&over.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        }
        assert_eq!(out.lines().count(), 1, "{out}");
        app.stop().await;
    }
}
