//! Pruning (`database.session_retention`, `database.audit_retention`):
//! `gateway prune` and the running gateway delete ended sessions with their
//! refresh tokens, spent refresh tokens long expired, and old audit events,
//! and nothing that is still needed: open sessions and their live tokens,
//! recently revoked sessions (the revocation state reads them), and the
//! spent tokens that reuse detection still watches.

use std::time::Duration;

use gateway::db::sessions::{ClientInfo, RefreshHash};
use gateway::db::{unix_now, Pool, Store};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    assert_error, assert_status, both_backends, config_toml, eventually, jwt_part, run_cli, spawn_app_with, TestApp,
    TestOptions, PASSWORD,
};
use crate::user_admin::open_store;

const EMAIL: &str = "keeper@example.com";
const DAY: i64 = 86_400;

/// Runs `sql` with `id` as `$1` (and `$2` = `value`), returning the rows it changed.
pub(crate) async fn exec(store: &Store, sql: &str, id: Uuid, value: i64) -> u64 {
    let done = match store.pool() {
        Pool::Sqlite(p) => sqlx::query(sql).bind(id).bind(value).execute(p).await.map(|d| d.rows_affected()),
        Pool::Postgres(p) => sqlx::query(sql).bind(id).bind(value).execute(p).await.map(|d| d.rows_affected()),
    };
    done.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Runs `sql` (no parameters), returning the rows it changed.
pub(crate) async fn run(store: &Store, sql: &str) -> u64 {
    let done = match store.pool() {
        Pool::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|d| d.rows_affected()),
        Pool::Postgres(p) => sqlx::query(sql).execute(p).await.map(|d| d.rows_affected()),
    };
    done.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub(crate) async fn count(store: &Store, sql: &str, id: Uuid) -> i64 {
    let row: (i64,) = match store.pool() {
        Pool::Sqlite(p) => sqlx::query_as(sql).bind(id).fetch_one(p).await,
        Pool::Postgres(p) => sqlx::query_as(sql).bind(id).fetch_one(p).await,
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.0
}

async fn sessions_with_id(store: &Store, id: Uuid) -> i64 {
    count(store, "SELECT COUNT(*) FROM sessions WHERE id = $1", id).await
}

async fn tokens_of(store: &Store, session: Uuid) -> i64 {
    count(store, "SELECT COUNT(*) FROM refresh_tokens WHERE session_id = $1", session).await
}

fn sid(access: &str) -> Uuid {
    Uuid::parse_str(jwt_part(access, 1)["sid"].as_str().expect("sid")).expect("sid is a uuid")
}

/// Moves a session's creation, revocation and every refresh token's
/// creation and expiry `days` into the past.
async fn age_session(store: &Store, session: Uuid, days: i64) {
    let by = days * DAY;
    let sql = "UPDATE sessions SET created_at = created_at - $2, last_used_at = last_used_at - $2,
               revoked_at = revoked_at - $2 WHERE id = $1";
    assert_eq!(exec(store, sql, session, by).await, 1);
    let sql =
        "UPDATE refresh_tokens SET created_at = created_at - $2, expires_at = expires_at - $2 WHERE session_id = $1";
    assert!(exec(store, sql, session, by).await >= 1);
}

/// The gateways here keep everything (`session_retention = "0s"`), so
/// that their own prune, at start, cannot race the test's aging of rows.
fn keeping_everything() -> TestOptions {
    TestOptions { database_extra: "session_retention = \"0s\"".to_owned(), ..TestOptions::default() }
}

/// `app`'s config with `database_extra` in place of its own, written
/// beside it (same database and keys), for `gateway prune` or a restart.
fn config_with(app: &TestApp, database_extra: &str) -> String {
    config_toml(&TestOptions { database_extra: database_extra.to_owned(), ..app.opts.clone() })
}

/// `gateway prune` with the default retention (30 days for sessions, audit
/// kept).
async fn prune(app: &TestApp) -> String {
    let path = app.dir.path().join("prune.toml");
    std::fs::write(&path, config_with(app, "")).expect("write prune.toml");
    run_cli(&path, &["prune"], "").await.unwrap_or_else(|e| panic!("gateway prune failed: {e:#}"))
}

both_backends! {
    #[tokio::test]
    async fn prune_deletes_ended_sessions_and_old_spent_tokens_and_keeps_what_is_needed() {
        let app = spawn_app_with(keeping_everything()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = open_store(&app).await;
        let logout = |access: String| {
            let app = &app;
            async move {
                assert_status(app.post_authed("/auth/logout", &access, &json!({})).await, StatusCode::NO_CONTENT).await;
            }
        };

        // Revoked 40 days ago (past the default 30 days): pruned.
        let old_revoked = app.login_ok(EMAIL, PASSWORD, None).await;
        logout(old_revoked.access_token.clone()).await;
        age_session(&store, sid(&old_revoked.access_token), 40).await;
        // Revoked now: kept, the revocation state needs it.
        let new_revoked = app.login_ok(EMAIL, PASSWORD, None).await;
        logout(new_revoked.access_token.clone()).await;
        // Never revoked, but its refresh token expired 70 days ago: pruned.
        let lapsed = app.login_ok(EMAIL, PASSWORD, None).await;
        age_session(&store, sid(&lapsed.access_token), 100).await;
        // Revoked 20 days ago: kept (within the 30 days).
        let recent = app.login_ok(EMAIL, PASSWORD, None).await;
        logout(recent.access_token.clone()).await;
        age_session(&store, sid(&recent.access_token), 20).await;
        // Open and rotated twice: its first token, spent, expired 70 days
        // ago (pruned); the second, spent, is still within its lifetime
        // (kept for reuse detection); the third is live.
        let first = app.login_ok(EMAIL, PASSWORD, None).await;
        let live = sid(&first.access_token);
        let second = app.refresh_ok(&first.refresh_token).await;
        let third = app.refresh_ok(&second.refresh_token).await;
        let sql = "UPDATE refresh_tokens SET expires_at = expires_at - $2 WHERE session_id = $1 AND parent_id IS NULL";
        assert_eq!(exec(&store, sql, live, 100 * DAY).await, 1);
        // Opened 100 days ago: its age alone does not end it.
        let sql = "UPDATE sessions SET created_at = created_at - $2 WHERE id = $1";
        assert_eq!(exec(&store, sql, live, 100 * DAY).await, 1);
        assert_eq!(tokens_of(&store, live).await, 3);

        let out = prune(&app).await;
        assert_eq!(out.trim(), "pruned 2 session(s), 3 refresh token(s), 0 audit event(s), 0 idle lockout counter(s), 0 expired or spent email link(s), 0 expired mailer deliveries, 0 stale TOTP setup(s)");
        for (gone, what) in [(&old_revoked, "revoked 40 days ago"), (&lapsed, "lapsed 70 days ago")] {
            let id = sid(&gone.access_token);
            assert_eq!(sessions_with_id(&store, id).await, 0, "{what}");
            assert_eq!(tokens_of(&store, id).await, 0, "{what}");
        }
        for (kept, what) in [(&new_revoked, "revoked now"), (&recent, "revoked 20 days ago")] {
            let id = sid(&kept.access_token);
            assert_eq!(sessions_with_id(&store, id).await, 1, "{what}");
            assert_eq!(tokens_of(&store, id).await, 1, "{what}");
        }
        assert_eq!(sessions_with_id(&store, live).await, 1);
        assert_eq!(tokens_of(&store, live).await, 2, "only the long-expired spent token goes");
        let out = prune(&app).await;
        assert_eq!(out.trim(), "pruned 0 session(s), 0 refresh token(s), 0 audit event(s), 0 idle lockout counter(s), 0 expired or spent email link(s), 0 expired mailer deliveries, 0 stale TOTP setup(s)", "a second run");

        // The open session still works: its live token rotates, and its
        // pruned first token is refused as unknown, without ending it.
        assert_error(app.refresh(&first.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let fourth = app.refresh_ok(&third.refresh_token).await;
        app.me_ok(&fourth.access_token).await;
        // The spent token kept is still caught as a reuse, which ends the session.
        assert_error(app.refresh(&second.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        eventually("the reused session's token is refused", Duration::from_secs(5), || async {
            app.get_authed("/auth/me", &fourth.access_token).await.status() == StatusCode::UNAUTHORIZED
        })
        .await;
        let audit = app.cli(&["audit", "list"], "").await.expect("audit list");
        assert!(audit.contains("refresh_reuse_detected"), "{audit}");
        store.close().await;
        app.stop().await;
    }

    #[tokio::test]
    async fn prune_goes_on_batch_after_batch() {
        let app = spawn_app_with(keeping_everything()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = open_store(&app).await;
        let tenant = store.tenant_by_slug("default").await.expect("read").expect("the default tenant");
        let user = store.user_by_email(tenant.id, EMAIL).await.expect("read").expect("the user");
        let n = 2 * gateway::db::retention::BATCH + 7;
        let open_sessions = || async {
            for _ in 0..n {
                let hash = Uuid::new_v4();
                let refresh = RefreshHash { hash: hash.as_bytes(), expires_at: unix_now() + 60 };
                let opened =
                    store.create_session(&user, &user.password_hash, ClientInfo::default(), refresh, unix_now());
                assert!(opened.await.expect("insert").is_some());
            }
        };
        let run = |sql: &'static str| run(&store, sql);
        let n_rows = u64::try_from(n).expect("a small count");
        // n sessions revoked long ago, and n that lapsed long ago unrevoked.
        open_sessions().await;
        assert_eq!(run("UPDATE sessions SET revoked_at = 1000, revoke_reason = 'test'").await, n_rows);
        open_sessions().await;
        let lapse = "UPDATE refresh_tokens SET expires_at = 1000
                     WHERE session_id IN (SELECT id FROM sessions WHERE revoked_at IS NULL)";
        assert_eq!(run(lapse).await, n_rows);
        assert_eq!(run("UPDATE sessions SET created_at = 1000 WHERE revoked_at IS NULL").await, n_rows);
        let out = prune(&app).await;
        let both = 2 * n;
        assert_eq!(out.trim(), format!("pruned {both} session(s), {both} refresh token(s), 0 audit event(s), 0 idle lockout counter(s), 0 expired or spent email link(s), 0 expired mailer deliveries, 0 stale TOTP setup(s)"));
        let left = count(&store, "SELECT COUNT(*) FROM sessions WHERE user_id = $1", user.id).await;
        assert_eq!(left, 0, "every session was pruned");
        store.close().await;
        app.stop().await;
    }

    #[tokio::test]
    async fn the_running_gateway_prunes_and_audit_retention_deletes_old_events() {
        let app = spawn_app_with(keeping_everything()).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let store = open_store(&app).await;
        let old = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_status(app.post_authed("/auth/logout", &old.access_token, &json!({})).await, StatusCode::NO_CONTENT)
            .await;
        age_session(&store, sid(&old.access_token), 40).await;
        // Age every audit event so far (user_created, login_succeeded,
        // logout) by 8 days; the next ones stay.
        let aged = run(&store, "UPDATE audit_events SET at = at - 8 * 86400").await;
        assert!(aged >= 3, "user_created, login_succeeded, logout (and key_generated): {aged}");
        let fresh = app.login_ok(EMAIL, PASSWORD, None).await;

        // With the default session retention and a week of audit events,
        // the gateway prunes once at start and then hourly.
        app.write_raw_config(&config_with(&app, "audit_retention = \"7d\""));
        let app = app.restart().await;
        let old_id = sid(&old.access_token);
        eventually("the gateway pruned the ended session", Duration::from_secs(5), || async {
            sessions_with_id(&store, old_id).await == 0
        })
        .await;
        // Audit events go after the sessions.
        eventually("the gateway pruned the old audit events", Duration::from_secs(5), || async {
            app.cli(&["audit", "list"], "").await.expect("audit list").lines().count() == 1
        })
        .await;
        let audit = app.cli(&["audit", "list"], "").await.expect("audit list");
        assert!(audit.contains("login_succeeded"), "only the fresh login's event is left: {audit}");
        assert_eq!(sessions_with_id(&store, sid(&fresh.access_token)).await, 1);
        app.me_ok(&fresh.access_token).await;
        store.close().await;
        app.stop().await;
    }

    #[tokio::test]
    async fn prune_forgets_idle_lockout_counters_and_keeps_live_ones() {
        // The running gateway purges idle counters too, first one poll after
        // it starts: with the test's 100 ms poll that raced the command.
        let options = TestOptions {
            revocation_poll: "10m",
            auth_extra: "revocation_max_staleness = \"30m\"".to_owned(),
            ..keeping_everything()
        };
        let app = spawn_app_with(options).await;
        let store = open_store(&app).await;
        let now = unix_now();
        let rows = [
            ("idle@example.com", "NULL", now - 2 * DAY),
            ("recent@example.com", "NULL", now - 60),
            ("locked@example.com", &*format!("{}", now + 600), now - 2 * DAY),
        ];
        for (email, locked, at) in rows {
            let sql = format!(
                "INSERT INTO login_attempts (tenant, email, failures, locked_until, updated_at) \
                 VALUES ('default', '{email}', 3, {locked}, {at})"
            );
            assert_eq!(run(&store, &sql).await, 1);
        }
        let out = prune(&app).await;
        assert!(out.trim().ends_with(", 1 idle lockout counter(s), 0 expired or spent email link(s), 0 expired mailer deliveries, 0 stale TOTP setup(s)"), "{out}");
        let kept = |email: &str| format!("UPDATE login_attempts SET failures = failures WHERE email = '{email}'");
        assert_eq!(run(&store, &kept("idle@example.com")).await, 0, "an idle counter was kept");
        assert_eq!(run(&store, &kept("recent@example.com")).await, 1, "a recent counter was forgotten");
        assert_eq!(run(&store, &kept("locked@example.com")).await, 1, "a counter under its lock was forgotten");
        store.close().await;
        app.stop().await;
    }
}
