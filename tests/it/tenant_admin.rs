//! The operator's tenant and session commands against a running gateway:
//! `tenant disable` / `enable` and what they do to logins, refreshes,
//! registrations and live tokens (the tenant's only); a login racing a
//! tenant disable; a disable written in the database alone; and `session
//! list` / `revoke` / `revoke-all`.

use std::time::Duration;

use gateway::db::unix_now;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    assert_error, assert_invalid_token, backend, both_backends, eventually, route, spawn_app_with, Backend, TestApp,
    TestOptions, Tokens, PASSWORD,
};
use crate::upstream::{echo, spawn_upstream};
use crate::user_admin::{hold_update, open_store};

const TENANT: &str = "acme";
const EMAIL: &str = "ops@acme.example";
const BYSTANDER: &str = "someone@example.com";

/// An app with a required route `/svc`, registration on, a user [`EMAIL`]
/// in tenant [`TENANT`] and one [`BYSTANDER`] in the default tenant.
async fn app_with_two_tenants() -> (TestApp, crate::upstream::Upstream) {
    app_polling(false).await
}

/// [`app_with_two_tenants`]; `slowly` polls the revocations once a minute
/// instead of every 100 ms.
async fn app_polling(slowly: bool) -> (TestApp, crate::upstream::Upstream) {
    let svc = spawn_upstream("svc").await;
    let mut opts =
        TestOptions { registration: true, ..TestOptions::with_extra(route("svc", "/svc", &[svc.url()], "")) };
    if slowly {
        opts.revocation_poll = "60s";
        opts.auth_extra = "revocation_max_staleness = \"150s\"".to_owned();
    }
    let app = spawn_app_with(opts).await;
    app.create_tenant(TENANT).await;
    app.create_user(TENANT, EMAIL, PASSWORD, &[], &[]).await;
    app.create_user("default", BYSTANDER, PASSWORD, &[], &[]).await;
    (app, svc)
}

async fn cli_ok(app: &TestApp, args: &[&str]) -> String {
    app.cli(args, "").await.unwrap_or_else(|e| panic!("{args:?} failed: {e:#}"))
}

async fn cli_err(app: &TestApp, args: &[&str]) -> String {
    format!("{:#}", app.cli(args, "").await.expect_err("a refused command"))
}

/// Waits (5 s at most: the test's revocation poll is 100 ms) until the
/// running gateway refuses `access` on the route and on `/auth/me`.
async fn refused_soon(app: &TestApp, access: &str, what: &str) {
    eventually(what, Duration::from_secs(5), || async {
        app.get_authed("/svc/x", access).await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_invalid_token(app.get_authed("/svc/x", access).await).await;
    assert_invalid_token(app.get_authed("/auth/me", access).await).await;
}

async fn register(app: &TestApp, email: &str, tenant: &str) -> reqwest::Response {
    let body = json!({ "email": email, "password": PASSWORD, "tenant": tenant });
    app.client.post(app.url("/auth/register")).json(&body).send().await.expect("POST /auth/register")
}

async fn audit(app: &TestApp, tenant: &str) -> String {
    cli_ok(app, &["audit", "list", "--tenant", tenant]).await
}

/// The session ids `session list` prints for `email` in `tenant`, newest first.
async fn session_ids(app: &TestApp, tenant: &str, email: &str) -> Vec<String> {
    let out = cli_ok(app, &["session", "list", "--tenant", tenant, "--email", email]).await;
    out.lines().map(|l| l.split_whitespace().next().expect("an id first").to_owned()).collect()
}

both_backends! {
    #[tokio::test]
    async fn a_disabled_tenant_loses_its_sessions_logins_refreshes_and_registrations_and_no_one_else_does() {
        let (app, _svc) = app_with_two_tenants().await;
        let acme = app.login_ok(EMAIL, PASSWORD, Some(TENANT)).await;
        let bystander = app.login_ok(BYSTANDER, PASSWORD, None).await;
        echo(app.get_authed("/svc/x", &acme.access_token).await).await;

        let out = cli_ok(&app, &["tenant", "disable", TENANT]).await;
        assert!(out.contains("disabled tenant acme; 1 session(s) revoked"), "{out}");
        refused_soon(&app, &acme.access_token, "the disabled tenant's token is refused").await;
        assert_error(app.refresh(&acme.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let login = app.login(EMAIL, PASSWORD, Some(TENANT)).await;
        assert_error(login, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        let refused = register(&app, "new@acme.example", TENANT).await;
        assert_error(refused, StatusCode::FORBIDDEN, "tenant_disabled").await;

        // The other tenant is untouched.
        echo(app.get_authed("/svc/x", &bystander.access_token).await).await;
        app.me_ok(&bystander.access_token).await;
        app.refresh_ok(&bystander.refresh_token).await;
        app.login_ok(BYSTANDER, PASSWORD, None).await;

        let list = cli_ok(&app, &["tenant", "list"]).await;
        let line = list.lines().find(|l| l.contains(" acme ")).unwrap_or_else(|| panic!("acme listed: {list}"));
        assert!(line.ends_with("DISABLED"), "{list}");
        assert!(!list.lines().find(|l| l.contains(" default ")).expect("default listed").contains("DISABLED"));
        let err = cli_err(&app, &["tenant", "disable", TENANT]).await;
        assert!(err.contains("slug: tenant \"acme\" is already disabled"), "{err}");
        assert!(cli_err(&app, &["tenant", "disable", "nope"]).await.contains("does not exist"));

        let log = audit(&app, TENANT).await;
        let disabled = log.lines().find(|l| l.contains(" tenant_disabled ")).unwrap_or_else(|| panic!("{log}"));
        assert!(disabled.contains(r#""sessions_revoked":1"#) && disabled.contains("tenant=acme"), "{disabled}");
        assert!(log.contains(r#""reason":"tenant_disabled""#), "the refused login is audited with its reason: {log}");
        app.stop().await;
    }

    #[tokio::test]
    async fn enable_lets_the_tenant_back_in_with_new_tokens_only() {
        let (app, _svc) = app_with_two_tenants().await;
        let old = app.login_ok(EMAIL, PASSWORD, Some(TENANT)).await;
        let err = cli_err(&app, &["tenant", "enable", TENANT]).await;
        assert!(err.contains("slug: tenant \"acme\" is not disabled"), "{err}");
        assert!(cli_err(&app, &["tenant", "enable", "nope"]).await.contains("does not exist"));
        cli_ok(&app, &["tenant", "disable", TENANT]).await;
        let disabled_at = unix_now();
        refused_soon(&app, &old.access_token, "the disabled tenant's token is refused").await;
        let out = cli_ok(&app, &["tenant", "enable", TENANT]).await;
        assert!(out.contains("enabled tenant acme"), "{out}");

        // Tokens are refused up to `auth.leeway` after the disable: log in past it.
        let leeway = humantime::parse_duration(app.opts.leeway).expect("the test's leeway");
        let leeway = i64::try_from(leeway.as_secs()).expect("a small leeway");
        while unix_now() <= disabled_at + leeway {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fresh = app.login_ok(EMAIL, PASSWORD, Some(TENANT)).await;
        echo(app.get_authed("/svc/x", &fresh.access_token).await).await;
        app.refresh_ok(&fresh.refresh_token).await;
        let registered = register(&app, "new@acme.example", TENANT).await;
        assert_eq!(registered.status(), StatusCode::CREATED, "registration is open again");
        // What the disable revoked stays revoked.
        assert_invalid_token(app.get_authed("/svc/x", &old.access_token).await).await;
        assert_error(app.refresh(&old.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert!(!cli_ok(&app, &["tenant", "list"]).await.contains("DISABLED"));
        assert!(audit(&app, TENANT).await.contains("tenant_enabled"));
        app.stop().await;
    }

    #[tokio::test]
    async fn a_tenant_disabled_in_the_database_alone_refuses_its_live_tokens() {
        // No session is revoked here: what refuses the token is the
        // tenant's own entry in the revocation state: from the poll on
        // SQLite, and on PostgreSQL from the trigger's notification (its
        // poll is made too slow for the 5 s this waits).
        let (app, _svc) = match backend() {
            Backend::Sqlite => app_polling(false).await,
            Backend::Postgres => app_polling(true).await,
        };
        let acme = app.login_ok(EMAIL, PASSWORD, Some(TENANT)).await;
        let bystander = app.login_ok(BYSTANDER, PASSWORD, None).await;
        let disable = match backend() {
            Backend::Sqlite => {
                "UPDATE tenants SET disabled = TRUE, updated_at = CAST(strftime('%s', 'now') AS INTEGER) WHERE slug = $1"
            }
            Backend::Postgres => {
                "UPDATE tenants SET disabled = TRUE, updated_at = extract(epoch FROM now())::bigint WHERE slug = $1"
            }
        };
        hold_update(&app, disable, TENANT, Duration::ZERO).await.await.expect("the disable committed");
        refused_soon(&app, &acme.access_token, "a token of a tenant disabled in the database").await;
        // Its session is still open in the database: the refresh checks the tenant too.
        assert_error(app.refresh(&acme.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let login = app.login(EMAIL, PASSWORD, Some(TENANT)).await;
        assert_error(login, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        echo(app.get_authed("/svc/x", &bystander.access_token).await).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn a_login_racing_a_tenant_disable_waits_for_it_and_is_refused() {
        let (app, _svc) = app_with_two_tenants().await;
        let disable = "UPDATE tenants SET disabled = TRUE, updated_at = updated_at + 1 WHERE slug = $1";
        let held = hold_update(&app, disable, TENANT, Duration::from_secs(3)).await;
        let body = json!({ "email": EMAIL, "password": PASSWORD, "tenant": TENANT });
        let login = tokio::spawn(app.client.post(app.url("/auth/login")).json(&body).send());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!login.is_finished(), "the login answered before the disable it raced was committed");
        held.await.expect("the held disable committed");
        let resp = login.await.expect("the login task").expect("POST /auth/login");
        assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        // PostgreSQL lets the login read the tenant before the change
        // commits, so it is caught at the session's insert; SQLite's write
        // lock holds the login back before it reads the tenant. Either way
        // the audit says why.
        let log = audit(&app, TENANT).await;
        assert!(log.contains(r#""reason":"tenant_disabled""#), "{log}");
        let store = open_store(&app).await;
        let tenant = store.tenant_by_slug(TENANT).await.expect("read").expect("the tenant");
        let user = store.user_by_email(tenant.id, EMAIL).await.expect("read").expect("the user");
        let sessions = store.active_sessions(tenant.id, user.id, unix_now()).await.expect("list sessions");
        assert!(sessions.is_empty(), "the refused login wrote a session: {sessions:?}");
        store.close().await;
        app.stop().await;
    }

    #[tokio::test]
    async fn session_commands_list_and_revoke_one_or_all_of_a_users_sessions() {
        let (app, _svc) = app_with_two_tenants().await;
        let login_as = |agent: &'static str| {
            let body = json!({ "email": EMAIL, "password": PASSWORD, "tenant": TENANT });
            let request = app.client.post(app.url("/auth/login")).header("user-agent", agent).json(&body);
            async move {
                let resp = request.send().await.expect("POST /auth/login");
                assert_eq!(resp.status(), StatusCode::OK);
                resp.json::<Tokens>().await.expect("tokens")
            }
        };
        let first = login_as("first-agent/1").await;
        // Sessions are listed newest first by their second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = login_as("second-agent/2").await;
        let list = cli_ok(&app, &["session", "list", "--tenant", TENANT, "--email", EMAIL]).await;
        let ids = session_ids(&app, TENANT, EMAIL).await;
        assert_eq!(ids.len(), 2, "{list}");
        assert!(list.lines().next().expect("a line").contains("second-agent/2"), "{list}");
        assert!(list.contains("ip=127.0.0.1"), "{list}");
        let sid = |t: &Tokens| crate::helpers::jwt_part(&t.access_token, 1)["sid"].as_str().expect("sid").to_owned();
        assert_eq!(ids, [sid(&second), sid(&first)], "{list}");

        // Another tenant cannot reach the session; a bad id is named.
        let err = cli_err(&app, &["session", "revoke", "--tenant", "default", &ids[1]]).await;
        assert!(err.contains("no open session"), "{err}");
        let err = cli_err(&app, &["session", "revoke", "--tenant", TENANT, "not-a-uuid"]).await;
        assert!(err.contains("id: \"not-a-uuid\" is not a session id"), "{err}");
        let err = cli_err(&app, &["session", "list", "--tenant", TENANT, "--email", "nobody@acme.example"]).await;
        assert!(err.contains("email: no user"), "{err}");
        echo(app.get_authed("/svc/x", &first.access_token).await).await;

        // One session: the other stays open.
        let out = cli_ok(&app, &["session", "revoke", "--tenant", TENANT, &ids[1]]).await;
        assert!(out.contains("revoked"), "{out}");
        refused_soon(&app, &first.access_token, "the revoked session's token is refused").await;
        assert_error(app.refresh(&first.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        echo(app.get_authed("/svc/x", &second.access_token).await).await;
        assert_eq!(session_ids(&app, TENANT, EMAIL).await, [sid(&second)]);
        let err = cli_err(&app, &["session", "revoke", "--tenant", TENANT, &ids[1]]).await;
        assert!(err.contains("no open session"), "revoking it twice: {err}");

        // Every session, without disabling the user.
        let out = cli_ok(&app, &["session", "revoke-all", "--tenant", TENANT, "--email", EMAIL]).await;
        assert!(out.contains("1 session(s) of ops@acme.example revoked"), "{out}");
        refused_soon(&app, &second.access_token, "every session's token is refused").await;
        assert!(session_ids(&app, TENANT, EMAIL).await.is_empty());
        let again = app.login_ok(EMAIL, PASSWORD, Some(TENANT)).await;
        echo(app.get_authed("/svc/x", &again.access_token).await).await;

        let log = audit(&app, TENANT).await;
        assert!(log.contains("session_revoked") && log.contains(r#""by":"operator""#), "{log}");
        assert!(log.contains("logout_all"), "{log}");
        app.stop().await;
    }
}
