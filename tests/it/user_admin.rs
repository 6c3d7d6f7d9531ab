//! The operator's account commands against a running gateway: `user grant`,
//! `user revoke`, `user set-password`, `user enable`, and what each does to
//! live tokens; and a login racing such a change.

use std::time::Duration;

use gateway::config::Config;
use gateway::db::sessions::{ClientInfo, RefreshHash};
use gateway::db::users::User;
use gateway::db::{unix_now, Pool, Store};
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::helpers::{
    assert_error, assert_invalid_token, backend, both_backends, eventually, jwt_part, parse_tokens, route,
    spawn_app_with, Backend, TestApp, TestOptions, PASSWORD,
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

/// The app's database, opened as the CLI opens it.
pub(crate) async fn open_store(app: &TestApp) -> Store {
    let config = Config::load(&app.config_path).expect("load the app's config");
    Store::connect(&config.database).await.expect("open the app's database")
}

/// Runs `update` (with `bind` as `$1`) in a transaction of its own, the
/// way the CLI changes a user or a tenant, and commits it `hold` later.
/// Returns once the update has run (the row is locked) with the committing
/// task.
pub(crate) async fn hold_update(
    app: &TestApp,
    update: &'static str,
    bind: &'static str,
    hold: Duration,
) -> JoinHandle<()> {
    let store = open_store(app).await;
    let (ran, ran_rx) = oneshot::channel();
    macro_rules! hold {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await.expect("begin");
            sqlx::query(update).bind(bind).execute(&mut *tx).await.expect("the held update");
            let _ = ran.send(());
            tokio::time::sleep(hold).await;
            tx.commit().await.expect("commit the held update");
        }};
    }
    let task = tokio::spawn(async move {
        match store.pool() {
            Pool::Sqlite(p) => hold!(p),
            Pool::Postgres(p) => hold!(p),
        }
        store.close().await;
    });
    ran_rx.await.expect("the held update ran");
    task
}

/// A login of [`EMAIL`] started while `update` is held uncommitted: it must
/// wait for the change and then honour it, never open a session the change
/// could not see. Returns the login's answer.
async fn login_during(app: &TestApp, update: &'static str) -> reqwest::Response {
    let held = hold_update(app, update, EMAIL, Duration::from_secs(3)).await;
    let request = app.client.post(app.url("/auth/login")).json(&json!({"email": EMAIL, "password": PASSWORD}));
    let login = tokio::spawn(request.send());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!login.is_finished(), "the login answered before the change it raced was committed");
    held.await.expect("the held update committed");
    login.await.expect("the login task").expect("POST /auth/login")
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
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.me_ok(&first.access_token).await;
        app.login_ok(EMAIL, PASSWORD, None).await;

        let out = user_ok(&app, "set-password", &["--password-stdin"], &format!("{NEW_PASSWORD}\n")).await;
        assert!(out.contains("3 session(s) revoked"), "{out}");
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
    #[tokio::test]
    async fn enable_lets_a_disabled_user_back_in_with_new_tokens_only() {
        let svc = spawn_upstream("admin").await;
        let app = spawn_app_with(TestOptions::with_extra(route("admin", "/admin", &[svc.url()], ""))).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let old = app.login_ok(EMAIL, PASSWORD, None).await;
        let err = user(&app, "enable", &[], "").await.expect_err("enabling an enabled user");
        assert!(format!("{err:#}").contains("is not disabled"), "{err:#}");

        user_ok(&app, "disable", &[], "").await;
        let disabled_at = unix_now();
        refused_soon(&app, &old.access_token, "the disabled user's token is refused").await;
        let out = user_ok(&app, "enable", &[], "").await;
        assert!(out.contains("enabled"), "{out}");

        // Tokens are refused up to `auth.leeway` after the disable: log in past it.
        let leeway = humantime::parse_duration(app.opts.leeway).expect("the test's leeway");
        let leeway = i64::try_from(leeway.as_secs()).expect("a small leeway");
        while unix_now() <= disabled_at + leeway {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fresh = app.login_ok(EMAIL, PASSWORD, None).await;
        echo(app.get_authed("/admin/x", &fresh.access_token).await).await;
        app.me_ok(&fresh.access_token).await;
        // What the disable revoked stays revoked.
        assert_invalid_token(app.get_authed("/admin/x", &old.access_token).await).await;
        assert_error(app.refresh(&old.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let audit = app.cli(&["audit", "list", "--tenant", "default"], "").await.expect("audit list");
        assert!(audit.contains("user_enabled"), "{audit}");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_login_racing_a_disable_waits_for_it_and_is_refused() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let disable = "UPDATE users SET disabled = TRUE, updated_at = updated_at + 1 WHERE email = $1";
        let resp = login_during(&app, disable).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let audit = app.cli(&["audit", "list", "--tenant", "default"], "").await.expect("audit list");
        // PostgreSQL lets the login read the user before the change commits,
        // so it is caught at the session's insert; SQLite's write lock holds
        // the login back before it reads the user.
        let reason = match backend() {
            Backend::Postgres => "user_changed",
            Backend::Sqlite => "user_disabled",
        };
        assert!(audit.contains(&format!(r#""reason":"{reason}""#)), "{audit}");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_login_racing_a_role_removal_gets_the_new_roles() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &["admin"], &["read"]).await;
        let resp = login_during(&app, "UPDATE users SET roles = '' WHERE email = $1").await;
        let tokens = parse_tokens(resp, "login").await;
        let claims = jwt_part(&tokens.access_token, 1);
        assert_eq!(claims["roles"], json!([]), "the token carries a role removed during the login: {claims}");
        assert_eq!(claims["scope"], "read", "{claims}");
        app.stop().await;
    }
    #[tokio::test]
    async fn a_session_is_not_opened_for_a_user_changed_since_it_was_read() {
        let app = spawn_app_with(TestOptions::default()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("read the tenant").expect("the default tenant");
        let read = || async { store.user_by_email(tenant.id, EMAIL).await.expect("read the user").expect("the user") };
        let open = |user: User| {
            let store = store.clone();
            async move {
                let token_hash = uuid::Uuid::new_v4();
                let refresh = RefreshHash { hash: token_hash.as_bytes(), expires_at: unix_now() + 60 };
                let hash = user.password_hash.clone();
                store.create_session(&user, &hash, ClientInfo::default(), refresh, unix_now()).await.expect("insert")
            }
        };
        assert!(open(read().await).await.is_some(), "an unchanged user gets a session");

        let before = read().await;
        user_ok(&app, "grant", &["--role", "admin"], "").await;
        assert!(open(before).await.is_none(), "a session for roles read before a grant");
        let before = read().await;
        user_ok(&app, "set-password", &["--password-stdin"], &format!("{NEW_PASSWORD}\n")).await;
        let stale = before.password_hash.clone();
        assert!(open(before).await.is_none(), "a session for a password hash read before a reset");
        let upgraded = store.replace_password_hash(tenant.id, read().await.id, &stale, "$argon2id$stale").await;
        assert!(!upgraded.expect("update"), "a hash verified before a reset overwrote the new one");
        let before = read().await;
        let secret = gateway::auth::totp::generate_secret().expect("a secret");
        assert!(store.set_totp_pending(tenant.id, before.id, &secret, unix_now()).await.expect("set up a second factor"));
        let confirmed = store.confirm_totp(tenant.id, before.id, &secret, 1, "", uuid::Uuid::nil()).await;
        assert!(confirmed.expect("confirm it").is_some());
        assert!(open(before).await.is_none(), "a session for a user who added a second factor since it was read");
        let before = read().await;
        user_ok(&app, "disable", &[], "").await;
        assert!(open(before).await.is_none(), "a session for a user disabled since it was read");
        let sessions = store.active_sessions(tenant.id, read().await.id, unix_now()).await.expect("list sessions");
        assert!(sessions.is_empty(), "refused sessions were written, or the reset left one open: {sessions:?}");
        store.close().await;
        app.stop().await;
    }
}
