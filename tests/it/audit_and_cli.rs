//! Audit log, CLI commands, migrations, key rotation and config validation.

use gateway::config::DatabaseUrl;
use gateway::db::Pool;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    assert_error, assert_status, backend, both_backends, config_only_database_url, config_toml, jwt_part, parse_uuid,
    run_binary, run_cli, spawn_app, write_config, Backend, TestOptions, PASSWORD, WRONG_PASSWORD,
};

const EMAIL: &str = "audited@example.com";

/// Index of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line contains {needle:?} in:\n{text}"))
}

/// The Display of `err` and of every source, joined.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

both_backends! {
    #[tokio::test]
    async fn audit_log_records_events_without_secrets() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        let first = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.login(EMAIL, WRONG_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;
        let rotated = app.refresh_ok(&first.refresh_token).await;
        assert_error(app.refresh(&first.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        let second = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_status(app.post_authed("/auth/logout", &second.access_token, &json!({})).await, StatusCode::NO_CONTENT)
            .await;

        let out = app
            .cli(&["audit", "list", "--tenant", "default", "--limit", "100"], "")
            .await
            .unwrap_or_else(|e| panic!("audit list failed: {e:#}"));
        for event in
            ["user_created", "login_succeeded", "login_failed", "refresh_rotated", "refresh_reuse_detected", "logout"]
        {
            assert!(out.contains(event), "audit log lacks {event}:\n{out}");
        }
        assert!(out.contains(EMAIL), "audit log lacks the email:\n{out}");
        for (what, secret) in [
            ("password", PASSWORD),
            ("wrong password", WRONG_PASSWORD),
            ("first access token", first.access_token.as_str()),
            ("first refresh token", first.refresh_token.as_str()),
            ("rotated access token", rotated.access_token.as_str()),
            ("rotated refresh token", rotated.refresh_token.as_str()),
            ("second access token", second.access_token.as_str()),
            ("second refresh token", second.refresh_token.as_str()),
        ] {
            assert!(!out.contains(secret), "audit log leaks the {what}:\n{out}");
        }
        // Newest first.
        assert!(line_of(&out, "logout") < line_of(&out, "user_created"), "audit list is not newest first:\n{out}");
        let newest = app
            .cli(&["audit", "list", "--tenant", "default", "--limit", "1"], "")
            .await
            .unwrap_or_else(|e| panic!("audit list --limit 1 failed: {e:#}"));
        assert!(newest.contains("logout"), "{newest}");
        assert!(!newest.contains("user_created"), "--limit 1 ignored:\n{newest}");

        // Tenant filter.
        app.create_tenant("acme").await;
        app.create_user("acme", "other@acme.test", PASSWORD, &[], &[]).await;
        let default_only = app
            .cli(&["audit", "list", "--tenant", "default"], "")
            .await
            .unwrap_or_else(|e| panic!("audit list failed: {e:#}"));
        assert!(!default_only.contains("other@acme.test"), "{default_only}");
        let acme_only = app
            .cli(&["audit", "list", "--tenant", "acme"], "")
            .await
            .unwrap_or_else(|e| panic!("audit list failed: {e:#}"));
        assert!(acme_only.contains("other@acme.test"), "{acme_only}");
        assert!(acme_only.contains("user_created"), "{acme_only}");
        assert!(!acme_only.contains(EMAIL), "{acme_only}");
        let everything = app.cli(&["audit", "list"], "").await.unwrap_or_else(|e| panic!("audit list failed: {e:#}"));
        assert!(everything.contains("other@acme.test"), "{everything}");
        assert!(everything.contains(EMAIL), "{everything}");
        app.stop().await;
    }

    #[tokio::test]
    async fn audit_list_filters_by_event_email_and_time_and_prints_json_lines() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.create_user("default", "other@example.com", PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.login(EMAIL, WRONG_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;
        app.login_ok("other@example.com", PASSWORD, None).await;
        // A logout records the user, not the email.
        assert_status(app.post_authed("/auth/logout", &tokens.access_token, &json!({})).await, StatusCode::NO_CONTENT)
            .await;
        let list = |args: &'static [&'static str]| {
            let mut all = vec!["audit", "list"];
            all.extend_from_slice(args);
            let app = &app;
            async move { app.cli(&all, "").await.unwrap_or_else(|e| panic!("{all:?} failed: {e:#}")) }
        };

        let out = list(&["--event", "login_failed", "--json"]).await;
        let lines: Vec<serde_json::Value> =
            out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
        assert_eq!(lines.len(), 1, "{out}");
        let e = &lines[0];
        assert_eq!((e["event"].as_str(), e["email"].as_str()), (Some("login_failed"), Some(EMAIL)), "{e}");
        assert_eq!((e["tenant"].as_str(), e["ip"].as_str()), (Some("default"), Some("127.0.0.1")), "{e}");
        assert_eq!(e["detail"]["reason"], "wrong_password", "{e}");
        assert!(e["at"].as_str().is_some_and(|at| at.ends_with('Z')), "{e}");
        assert!(e["user_id"].is_string(), "{e}");

        let out = list(&["--email", " Audited@Example.com "]).await;
        assert_eq!(out.lines().count(), 4, "created, logged in, failed, logged out, and no one else's: {out}");
        let user_id = lines[0]["user_id"].as_str().expect("the user's id");
        assert!(out.lines().all(|l| l.contains(&format!("user={user_id}"))), "{out}");
        assert!(out.lines().next().is_some_and(|l| l.contains("logout")), "{out}");
        // user_created, login_succeeded (twice), login_failed, logout, and
        // the two keys generated at the start (signing, and sealing).
        assert_eq!(list(&["--since", "1h"]).await.lines().count(), 8, "every event of the last hour");
        assert_eq!(list(&["--since", "2999-01-01T00:00:00Z"]).await, "", "none from the future");
        let err = app.cli(&["audit", "list", "--since", "yesterday-ish"], "").await.expect_err("a bad time");
        assert!(format!("{err:#}").contains("since: \"yesterday-ish\""), "{err:#}");
        let err = app.cli(&["audit", "list", "--since", "2026-12-01T00:00:00"], "").await.expect_err("no zone");
        assert!(format!("{err:#}").contains("since: "), "a time without its Z is refused: {err:#}");
        app.stop().await;
    }

    #[tokio::test]
    async fn migrations_are_idempotent_and_data_survives_a_restart() {
        let app = spawn_app().await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.cli(&["migrate"], "").await.unwrap_or_else(|e| panic!("first migrate failed: {e:#}"));
        app.cli(&["migrate"], "").await.unwrap_or_else(|e| panic!("second migrate failed: {e:#}"));
        // A newer release's migration, unknown to this one (a rollback, or
        // an old replica restarting mid-upgrade), does not stop it.
        let newer = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                     VALUES (999999, 'from a newer release', TRUE, $1, 0)";
        let store = crate::user_admin::open_store(&app).await;
        let added = match store.pool() {
            Pool::Sqlite(p) => sqlx::query(newer).bind(vec![0_u8; 48]).execute(p).await.map(|d| d.rows_affected()),
            Pool::Postgres(p) => sqlx::query(newer).bind(vec![0_u8; 48]).execute(p).await.map(|d| d.rows_affected()),
        };
        assert_eq!(added.expect("record a newer migration"), 1);
        store.close().await;
        app.cli(&["migrate"], "").await.unwrap_or_else(|e| panic!("migrate after a newer release failed: {e:#}"));
        let before = app.login_ok(EMAIL, PASSWORD, None).await;
        let jwks_before = app.jwks().await;

        // A second App on the same config: migrations re-applied, key loaded, not regenerated.
        let app = app.restart().await;
        assert_eq!(app.jwks().await, jwks_before, "signing keys changed across a restart");
        let after = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(jwt_part(&after.access_token, 1)["sub"], user_id.as_str());
        app.me_ok(&before.access_token).await;
        app.refresh_ok(&before.refresh_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn tenant_create_and_list() {
        let app = spawn_app().await;
        let acme_id = app.create_tenant("acme").await;
        let globex = app
            .cli(&["tenant", "create", "globex", "--name", "Globex Corporation"], "")
            .await
            .unwrap_or_else(|e| panic!("tenant create --name failed: {e:#}"));
        parse_uuid(globex.trim(), "tenant create --name output");

        let list = app.cli(&["tenant", "list"], "").await.unwrap_or_else(|e| panic!("tenant list failed: {e:#}"));
        for needle in ["default", "acme", "globex", acme_id.as_str()] {
            assert!(list.contains(needle), "tenant list lacks {needle}:\n{list}");
        }

        assert!(app.cli(&["tenant", "create", "acme"], "").await.is_err(), "duplicate tenant slug accepted");
        app.stop().await;
    }

    #[tokio::test]
    async fn user_cli_validates_tenant_and_uniqueness() {
        let app = spawn_app().await;
        let stdin = format!("{PASSWORD}\n");
        let err = app
            .cli(
                &["user", "create", "--tenant", "no-such-tenant", "--email", "x@example.com", "--password-stdin"],
                &stdin,
            )
            .await
            .expect_err("user create in an unknown tenant must fail");
        assert!(format!("{err:#}").contains("no-such-tenant"), "error does not name the tenant: {err:#}");

        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        assert!(
            app.cli(
                &["user", "create", "--tenant", "default", "--email", "  AUDITED@example.com ", "--password-stdin",],
                &stdin,
            )
            .await
            .is_err(),
            "duplicate email (case-insensitive) accepted"
        );

        let list = app
            .cli(&["user", "list", "--tenant", "default"], "")
            .await
            .unwrap_or_else(|e| panic!("user list failed: {e:#}"));
        assert!(list.contains(EMAIL), "{list}");
        assert!(list.contains(user_id.as_str()), "{list}");
        assert!(!list.contains("$argon2"), "user list leaks password hashes:\n{list}");
        assert!(!list.contains(PASSWORD), "user list leaks the password:\n{list}");
        app.stop().await;
    }

    #[tokio::test]
    async fn keys_generate_rotates_the_signer_and_keeps_old_tokens_valid() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let before = app.login_ok(EMAIL, PASSWORD, None).await;
        let old_kid = jwt_part(&before.access_token, 0)["kid"].as_str().expect("kid is a string").to_owned();

        let new_kid = app
            .cli(&["keys", "generate"], "")
            .await
            .unwrap_or_else(|e| panic!("keys generate failed: {e:#}"))
            .trim()
            .to_owned();
        assert!(!new_kid.is_empty(), "keys generate printed no kid");
        assert_ne!(new_kid, old_kid);
        let listing = app.cli(&["keys", "list"], "").await.unwrap_or_else(|e| panic!("keys list failed: {e:#}"));
        assert!(listing.contains(old_kid.as_str()), "{listing}");
        assert!(listing.contains(new_kid.as_str()), "{listing}");
        let stems: Vec<String> = app
            .key_pem_paths()
            .iter()
            .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned))
            .collect();
        assert_eq!(stems.len(), 2, "{stems:?}");
        assert!(stems.contains(&old_kid) && stems.contains(&new_kid), "{stems:?}");

        let app = app.restart().await;
        let jwks = app.jwks().await;
        let kids: Vec<&str> =
            jwks["keys"].as_array().expect("keys is an array").iter().filter_map(|k| k["kid"].as_str()).collect();
        assert!(kids.contains(&old_kid.as_str()), "old key dropped: {jwks}");
        assert!(kids.contains(&new_kid.as_str()), "new key not published: {jwks}");

        // Tokens signed by the old key still verify; new tokens use the new key.
        app.me_ok(&before.access_token).await;
        let after = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(jwt_part(&after.access_token, 0)["kid"], new_kid.as_str());
        app.me_ok(&after.access_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn config_check_names_every_bad_field() {
        let dir = tempfile::tempdir().expect("create temp dir");
        // Nothing connects to the database here: the URL only has to be the backend's kind.
        let opts = TestOptions { database_url: config_only_database_url(), ..TestOptions::default() };

        // The valid config passes both ways.
        let good = write_config(dir.path(), &opts);
        match gateway::config::Config::load(&good) {
            Ok(config) => assert_eq!(
                matches!(config.database.url, DatabaseUrl::Postgres(_)),
                backend() == Backend::Postgres,
                "database.url of the wrong kind: {:?}",
                config.database.url
            ),
            Err(e) => panic!("valid config rejected: {}", error_chain(&e)),
        }
        run_cli(&good, &["config", "check"], "")
            .await
            .unwrap_or_else(|e| panic!("config check on a valid config failed: {e:#}"));

        let valid = config_toml(&opts);
        let bad_text = valid
            .replace(r#"access_token_ttl = "15m""#, r#"access_token_ttl = "banana""#)
            .replace("lockout_threshold = 5", "lockout_threshold = 0")
            .replace("[auth]\n", "[auth]\ncolour = \"red\"\n");
        assert!(bad_text.contains(r#"access_token_ttl = "banana""#));
        assert!(bad_text.contains("lockout_threshold = 0"));
        assert!(bad_text.contains("colour = \"red\""));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, bad_text).expect("write bad.toml");
        let fields = ["access_token_ttl", "lockout_threshold", "colour"];

        let message = match gateway::config::Config::load(&bad) {
            Ok(_) => panic!("Config::load accepted an invalid config"),
            Err(e) => error_chain(&e),
        };
        for field in fields {
            assert!(message.contains(field), "Config::load error does not name {field}: {message}");
        }

        let err =
            run_cli(&bad, &["config", "check"], "").await.expect_err("config check must fail on an invalid config");
        let message = format!("{err:#}");
        for field in fields {
            assert!(message.contains(field), "config check error does not name {field}: {message}");
        }

        // The real binary exits non-zero and says why.
        let output = run_binary(&bad, &["config", "check"]).await;
        assert!(!output.status.success(), "gateway config check exited 0 on a bad config");
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        for field in fields {
            assert!(printed.contains(field), "binary output does not name {field}: {printed}");
        }
    }
}
