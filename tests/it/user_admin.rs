//! The operator's account commands against a running gateway: `user grant`,
//! `user revoke` and `user set-password`, and what each does to live tokens.

use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{
    assert_error, assert_invalid_token, both_backends, eventually, jwt_part, route, spawn_app_with, TestApp,
    TestOptions, PASSWORD,
};
use crate::upstream::{echo, spawn_upstream};

const EMAIL: &str = "staff@example.com";
const NEW_PASSWORD: &str = "a brand new passphrase, long enough";

/// Runs `user <args>` for [`EMAIL`] in the default tenant and returns its output.
async fn user(app: &TestApp, command: &str, more: &[&str], stdin: &str) -> anyhow::Result<String> {
    let mut args = vec!["user", command, "--tenant", "default", "--email", EMAIL];
    args.extend_from_slice(more);
    app.cli(&args, stdin).await
}

async fn user_ok(app: &TestApp, command: &str, more: &[&str], stdin: &str) -> String {
    user(app, command, more, stdin).await.unwrap_or_else(|e| panic!("user {command} {more:?} failed: {e:#}"))
}

/// Waits (5 s at most: the test's revocation poll is 100 ms) until the
/// running gateway refuses `access`, and checks that it says why.
async fn refused_soon(app: &TestApp, access: &str, what: &str) {
    eventually(what, Duration::from_secs(5), || async {
        app.get_authed("/auth/me", access).await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_invalid_token(app.get_authed("/admin/x", access).await).await;
}

both_backends! {
    #[tokio::test]
    async fn grant_and_revoke_change_what_a_route_allows() {
        let svc = spawn_upstream("admin").await;
        let app = spawn_app_with(TestOptions::with_extra(route("admin", "/admin", &[svc.url()], "roles = [\"admin\"]")))
            .await;
        app.create_user("default", EMAIL, PASSWORD, &[], &["read"]).await;
        let first = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.get_authed("/admin/x", &first.access_token).await, StatusCode::FORBIDDEN, "forbidden").await;

        // Grant: the live token keeps its claims; the refreshed one has the role.
        let out = user_ok(&app, "grant", &["--role", "admin", "--scope", "write"], "").await;
        assert!(out.contains("roles=admin scopes=read,write"), "{out}");
        assert_error(app.get_authed("/admin/x", &first.access_token).await, StatusCode::FORBIDDEN, "forbidden").await;
        let granted = app.refresh_ok(&first.refresh_token).await;
        let e = echo(app.get_authed("/admin/x", &granted.access_token).await).await;
        assert_eq!(e.one("x-user-roles"), "admin", "{}", e.0);
        assert_eq!(e.one("x-user-scopes"), "read write", "{}", e.0);
        let out = user_ok(&app, "grant", &["--role", "admin"], "").await;
        assert!(out.contains("nothing changed"), "granting a held role again: {out}");

        // Revoke: the session ends, so no live token carries the role any more.
        let out = user_ok(&app, "revoke", &["--role", "admin"], "").await;
        assert!(out.contains("roles= scopes=read,write; 1 session(s) revoked"), "{out}");
        refused_soon(&app, &granted.access_token, "the token holding a revoked role is refused").await;
        assert_error(app.refresh(&granted.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let again = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(jwt_part(&again.access_token, 1)["scope"], "read write");
        assert_error(app.get_authed("/admin/x", &again.access_token).await, StatusCode::FORBIDDEN, "forbidden").await;

        // Revoking what is not held changes nothing, and keeps the session.
        let out = user_ok(&app, "revoke", &["--role", "admin", "--scope", "delete"], "").await;
        assert!(out.contains("nothing changed"), "{out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.me_ok(&again.access_token).await;

        let audit = app.cli(&["audit", "list", "--tenant", "default"], "").await.expect("audit list");
        assert_eq!(audit.matches("access_granted").count(), 1, "one grant changed something:\n{audit}");
        assert_eq!(audit.matches("access_revoked").count(), 1, "one revoke changed something:\n{audit}");
        assert!(audit.contains(r#""roles_removed":["admin"]"#), "{audit}");
        app.stop().await;
    }

    #[tokio::test]
    async fn set_password_replaces_the_password_and_ends_every_session() {
        let svc = spawn_upstream("admin").await;
        let app = spawn_app_with(TestOptions::with_extra(route("admin", "/admin", &[svc.url()], ""))).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let first = app.login_ok(EMAIL, PASSWORD, None).await;
        let second = app.login_ok(EMAIL, PASSWORD, None).await;

        // A weak password is refused, naming the field, and changes nothing.
        let err = user(&app, "set-password", &["--password-stdin"], "short\n").await.expect_err("weak password");
        assert!(format!("{err:#}").starts_with("password:"), "{err:#}");
        let err = user(&app, "set-password", &["--password-stdin"], "\n").await.expect_err("empty password");
        assert!(format!("{err:#}").starts_with("password:"), "{err:#}");
        app.me_ok(&first.access_token).await;

        let out = user_ok(&app, "set-password", &["--password-stdin"], &format!("{NEW_PASSWORD}\n")).await;
        assert!(out.contains("2 session(s) revoked"), "{out}");
        refused_soon(&app, &first.access_token, "a token from before the reset is refused").await;
        refused_soon(&app, &second.access_token, "every session ends at a reset").await;
        assert_error(app.refresh(&second.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert_error(app.login(EMAIL, PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let fresh = app.login_ok(EMAIL, NEW_PASSWORD, None).await;
        echo(app.get_authed("/admin/x", &fresh.access_token).await).await;

        let audit = app.cli(&["audit", "list", "--tenant", "default"], "").await.expect("audit list");
        assert!(audit.contains("password_reset"), "{audit}");
        assert!(!audit.contains(NEW_PASSWORD) && !audit.contains("$argon2"), "the audit log leaks a secret:\n{audit}");
        app.stop().await;
    }

    #[tokio::test]
    async fn account_commands_name_what_is_wrong() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &["admin"], &[]).await;
        let grant = ["user", "grant", "--tenant", "default", "--email", EMAIL];
        let revoke = ["user", "revoke", "--tenant", "default", "--email", EMAIL];
        let cases: [(&[&str], &[&str], &str); 6] = [
            (&grant, &[], "--role"),
            (&revoke, &[], "--role"),
            (&grant, &["--role", "bad name"], "\"bad name\" is not a valid role or scope name"),
            (&revoke, &["--scope", ""], "\"\" is not a valid role or scope name"),
            (&["user", "grant", "--tenant", "default", "--email", "nobody@example.com"], &["--role", "x"], "email:"),
            (&["user", "set-password", "--tenant", "no-such-tenant", "--email", EMAIL], &["--password-stdin"], "no-such-tenant"),
        ];
        for (command, more, expected) in cases {
            let args = [command, more].concat();
            let err = app.cli(&args, &format!("{NEW_PASSWORD}\n")).await.expect_err("a refused command");
            assert!(format!("{err:#}").contains(expected), "{args:?}: {err:#}");
        }
        // Nothing was changed by any of them.
        let list = app.cli(&["user", "list", "--tenant", "default"], "").await.expect("user list");
        assert!(list.contains("roles=admin scopes="), "{list}");
        app.login_ok(EMAIL, PASSWORD, None).await;
        app.stop().await;
    }
}
