//! `gateway user delete`: every session of the user ends (running gateways
//! refuse its tokens), the email is free again, and what is left is a
//! tombstone that names no one; with `--forget`, the audit log stops naming
//! the user too.

use reqwest::StatusCode;

use crate::helpers::{
    assert_error, assert_invalid_token, both_backends, eventually, spawn_app, TestApp, OTHER_PASSWORD, PASSWORD,
    WRONG_PASSWORD,
};

const EMAIL: &str = "leaving@example.com";

async fn forget(app: &TestApp, id: &str, email: &str) -> anyhow::Result<String> {
    app.cli(&["user", "forget", "--tenant", "default", "--user-id", id, "--email", email], "").await
}

both_backends! {
    #[tokio::test]
    async fn a_deleted_user_is_gone_and_with_forget_unnamed() {
        let app = spawn_app().await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &["reader"], &[]).await;
        app.create_user("default", "staying@example.com", PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.login(EMAIL, WRONG_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        // Recorded with the email and no tenant (it names an unknown one).
        let elsewhere = app.login(EMAIL, PASSWORD, Some("no-such-tenant")).await;
        assert_error(elsewhere, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

        let out = app.cli(&["user", "delete", "--tenant", "default", "--email", EMAIL, "--forget"], "").await;
        assert_eq!(
            out.expect("user delete").trim(),
            format!("deleted {EMAIL}; 1 session(s) revoked; its audit events no longer name it")
        );
        let audit = app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list");
        assert!(!audit.contains(EMAIL), "the audit log no longer names the user: {audit}");
        let deleted: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .filter(|e: &serde_json::Value| e["event"] == "user_deleted")
            .collect();
        assert_eq!(deleted.len(), 1, "{audit}");
        assert_eq!(deleted[0]["user_id"], user_id.as_str());
        assert_eq!(deleted[0]["detail"]["forget"], true);
        let failed: Vec<&str> = audit.lines().filter(|l| l.contains("login_failed")).collect();
        assert_eq!(failed.len(), 2, "the failed logins are kept: {audit}");
        assert!(failed.iter().all(|l| l.contains("\"ip\":null")), "their addresses are erased: {failed:?}");
        // The sessions keep no address or user agent either.
        let store = crate::user_admin::open_store(&app).await;
        let address: Vec<(Option<String>, Option<String>)> = match store.pool() {
            gateway::db::Pool::Sqlite(p) => sqlx::query_as("SELECT ip, user_agent FROM sessions").fetch_all(p).await,
            gateway::db::Pool::Postgres(p) => sqlx::query_as("SELECT ip, user_agent FROM sessions").fetch_all(p).await,
        }
        .expect("the sessions");
        assert_eq!(address, [(None, None)], "the one session, unnamed");
        store.close().await;
        assert!(audit.contains("staying@example.com"), "others are still named: {audit}");
        // Its tokens die across the running gateway, its refresh token mints nothing.
        eventually("the deleted user's token is refused", std::time::Duration::from_secs(5), || async {
            app.get_authed("/auth/me", &tokens.access_token).await.status() == StatusCode::UNAUTHORIZED
        })
        .await;
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;
        assert_error(app.refresh(&tokens.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

        let list = app.cli(&["user", "list", "--tenant", "default"], "").await.expect("user list");
        assert!(!list.contains(EMAIL) && !list.contains(&user_id), "{list}");
        assert!(list.contains("staying@example.com"), "{list}");

        // The email is free again; the newcomer is someone else.
        let again = app.create_user("default", EMAIL, OTHER_PASSWORD, &[], &[]).await;
        assert_ne!(again, user_id);
        let fresh = app.login_ok(EMAIL, OTHER_PASSWORD, None).await;
        assert_eq!(app.me_ok(&fresh.access_token).await["roles"], serde_json::json!([]), "nothing inherited");
        let err = app.cli(&["user", "delete", "--tenant", "default", "--email", "nobody@example.com"], "").await;
        assert!(err.expect_err("an unknown user").to_string().contains("email:"), "names the field");
        // The tombstone answers to no email: it cannot be brought back.
        let tombstone = format!("deleted:{}", user_id.replace('-', ""));
        for command in ["enable", "disable", "mfa-reset", "reset-token", "verify-email"] {
            let err = app.cli(&["user", command, "--tenant", "default", "--email", &tombstone], "").await;
            assert!(err.expect_err(command).to_string().contains("no user"), "{command}");
        }
        let err = app.cli(&["user", "set-password", "--tenant", "default", "--email", &tombstone, "--password-stdin"], &format!("{PASSWORD}\n")).await;
        assert!(err.expect_err("set-password").to_string().contains("no user"));
        app.stop().await;
    }

    /// Deleted without `--forget`, the audit log still names the user
    /// until an operator runs `user forget` with its id and former email.
    #[tokio::test]
    async fn a_deleted_user_can_be_forgotten_later() {
        let app = spawn_app().await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let live = app.create_user("default", "staying@example.com", PASSWORD, &[], &[]).await;
        app.login_ok(EMAIL, PASSWORD, None).await;
        let out = app.cli(&["user", "delete", "--tenant", "default", "--email", EMAIL], "").await;
        assert_eq!(out.expect("user delete").trim(), format!("deleted {EMAIL}; 1 session(s) revoked"));
        let audit = || async { app.cli(&["audit", "list", "--json", "--limit", "100"], "").await.expect("audit list") };
        assert!(audit().await.contains(EMAIL), "without --forget the log still names the user");

        // The address is free: a newcomer takes it, and keeps its own story.
        let newcomer = app.create_user("default", EMAIL, OTHER_PASSWORD, &[], &[]).await;
        app.login_ok(EMAIL, OTHER_PASSWORD, None).await;

        let err = forget(&app, &live, EMAIL).await.expect_err("a live user");
        assert!(err.to_string().contains("user-id:"), "names the field: {err}");
        let err = forget(&app, &user_id, "leavng@example.com").await.expect_err("a typo");
        assert!(err.to_string().contains("email:"), "names the field: {err}");
        assert!(audit().await.contains(EMAIL), "nothing erased by a refused command");
        // user_created, login_succeeded, user_deleted.
        let out = forget(&app, &user_id, EMAIL).await.expect("user forget");
        assert_eq!(out.trim(), "3 audit event(s) no longer name the user");
        let events: Vec<serde_json::Value> =
            audit().await.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        for event in &events {
            if event["user_id"] == user_id.as_str() && event["event"] != "user_forgotten" {
                assert!(event["email"].is_null() && event["ip"].is_null(), "erased: {event}");
            }
        }
        let kept = events.iter().filter(|e| e["user_id"] == newcomer.as_str() && e["email"] == EMAIL).count();
        assert_eq!(kept, 2, "the newcomer's user_created and login keep the address: {events:?}");
        assert!(events.iter().any(|e| e["event"] == "user_forgotten"), "{events:?}");
        app.stop().await;
    }
}
