//! Per-(tenant, email) lockout and per-IP rate limiting.

use std::time::Duration;

use futures::future::join_all;
use reqwest::header::RETRY_AFTER;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, assert_error_in, both_backends, retry_after_secs, spawn_app, spawn_app_with, TestApp, TestOptions,
    PASSWORD, WRONG_PASSWORD,
};

const EMAIL: &str = "me@example.com";
const NEW_PASSWORD: &str = "a brand new and rather long passphrase";

/// Asserts 429 `too_many_attempts` with a positive Retry-After; returns the seconds.
async fn assert_locked(case: &str, resp: Response) -> u64 {
    let retry_after = if resp.status() == StatusCode::TOO_MANY_REQUESTS { Some(retry_after_secs(&resp)) } else { None };
    assert_error_in(case, resp, StatusCode::TOO_MANY_REQUESTS, "too_many_attempts").await;
    retry_after.expect("429 carries Retry-After")
}

async fn fail_login(app: &TestApp, case: &str, email: &str) {
    assert_error_in(
        case,
        app.login(email, WRONG_PASSWORD, None).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
}

/// `POST /auth/password` with `current` as the current password and `NEW_PASSWORD` as the new one.
async fn change_password(app: &TestApp, access: &str, current: &str) -> Response {
    let body = json!({ "current_password": current, "new_password": NEW_PASSWORD });
    app.post_authed("/auth/password", access, &body).await
}

/// Status, error code and presence of Retry-After of seven wrong logins for `email`.
async fn failure_pattern(app: &TestApp, email: &str) -> Vec<(StatusCode, String, bool)> {
    let mut pattern = Vec::new();
    for _ in 0..7 {
        let resp = app.login(email, WRONG_PASSWORD, None).await;
        let status = resp.status();
        let has_retry_after = resp.headers().contains_key(RETRY_AFTER);
        let body: Value = resp.json().await.expect("error body is JSON");
        let code = body["error"].as_str().unwrap_or_default().to_owned();
        pattern.push((status, code, has_retry_after));
    }
    pattern
}

both_backends! {
    #[tokio::test]
    async fn lockout_after_threshold_failures() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.create_user("default", "neighbour@example.com", PASSWORD, &[], &[]).await;
        app.create_tenant("acme").await;
        app.create_user("acme", EMAIL, PASSWORD, &[], &[]).await;

        for attempt in 1..=5 {
            fail_login(&app, &format!("wrong password #{attempt}"), EMAIL).await;
        }
        // Locked: even the correct password is refused, and so is a further wrong one.
        let secs = assert_locked("correct password while locked", app.login(EMAIL, PASSWORD, None).await).await;
        // At most lockout_duration (15m), allowing for rounding up.
        assert!(secs <= 15 * 60 + 1, "Retry-After {secs} exceeds lockout_duration");
        assert_locked("wrong password while locked", app.login(EMAIL, WRONG_PASSWORD, None).await).await;
        // Case and whitespace variants of the email share the lock.
        assert_locked("email variant while locked", app.login("  ME@example.com", PASSWORD, None).await).await;

        // The lock is per (tenant, email): other users and the same email elsewhere are unaffected.
        app.login_ok("neighbour@example.com", PASSWORD, None).await;
        app.login_ok(EMAIL, PASSWORD, Some("acme")).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn lockout_expires() {
        let app = spawn_app_with(TestOptions { lockout_duration: "2s", ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        for attempt in 1..=5 {
            fail_login(&app, &format!("wrong password #{attempt}"), EMAIL).await;
        }
        assert_locked("locked", app.login(EMAIL, PASSWORD, None).await).await;

        tokio::time::sleep(Duration::from_millis(2500)).await;
        app.login_ok(EMAIL, PASSWORD, None).await;
        app.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_guesses_are_capped_at_the_threshold() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        let responses = join_all((0..20).map(|_| app.login(EMAIL, WRONG_PASSWORD, None))).await;
        let mut unauthorized = 0_usize;
        let mut locked = 0_usize;
        for resp in responses {
            if resp.status() == StatusCode::UNAUTHORIZED {
                unauthorized += 1;
                assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
            } else {
                locked += 1;
                assert_locked("parallel guess", resp).await;
            }
        }
        assert_eq!((unauthorized, locked), (5, 15), "exactly lockout_threshold guesses may be evaluated");
        assert_locked("after the burst", app.login(EMAIL, PASSWORD, None).await).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn unknown_emails_are_locked_out_too() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        let known = failure_pattern(&app, EMAIL).await;
        let unknown = failure_pattern(&app, "ghost@example.com").await;

        // Five evaluated failures (threshold 5), then locked.
        let expected: Vec<(StatusCode, String, bool)> = (0..7)
            .map(|attempt| {
                if attempt < 5 {
                    (StatusCode::UNAUTHORIZED, "invalid_credentials".to_owned(), false)
                } else {
                    (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts".to_owned(), true)
                }
            })
            .collect();
        assert_eq!(known, expected, "existing account");
        assert_eq!(unknown, known, "an unknown email must look exactly like a known one");
        app.stop().await;
    }

    #[tokio::test]
    async fn successful_login_resets_the_failure_counter() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        for attempt in 1..=4 {
            fail_login(&app, &format!("first round #{attempt}"), EMAIL).await;
        }
        app.login_ok(EMAIL, PASSWORD, None).await;
        for attempt in 1..=4 {
            fail_login(&app, &format!("second round #{attempt}"), EMAIL).await;
        }
        app.login_ok(EMAIL, PASSWORD, None).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn per_ip_rate_limit_on_login() {
        let app = spawn_app_with(TestOptions { rate_limit_per_minute: 3, ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;

        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        fail_login(&app, "second request", "someone@example.com").await;
        fail_login(&app, "third request", "someone.else@example.com").await;

        let resp = app.login(EMAIL, PASSWORD, None).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "fourth request");
        retry_after_secs(&resp);
        assert_error(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

        // Only login and refresh are limited.
        app.me_ok(&tokens.access_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn per_ip_rate_limit_on_refresh() {
        let app = spawn_app_with(TestOptions { rate_limit_per_minute: 3, ..TestOptions::default() }).await;
        for attempt in 1..=3 {
            assert_error_in(
                &format!("refresh #{attempt}"),
                app.refresh("garbage").await,
                StatusCode::UNAUTHORIZED,
                "invalid_grant",
            )
            .await;
        }
        let resp = app.refresh("garbage").await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "fourth refresh");
        retry_after_secs(&resp);
        assert_error(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn password_change_guesses_count_against_the_lockout() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        let other = app.login_ok(EMAIL, PASSWORD, None).await;

        // A stolen access token must not buy unlimited guesses at the current password.
        for attempt in 1..=5 {
            assert_error_in(
                &format!("wrong current password #{attempt}"),
                change_password(&app, &tokens.access_token, WRONG_PASSWORD).await,
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
            )
            .await;
        }
        // The sixth attempt is refused before any hashing, even with the right current password.
        let resp = change_password(&app, &tokens.access_token, PASSWORD).await;
        assert_locked("right current password after 5 wrong ones", resp).await;

        // Nothing changed: a password change would have revoked the other session.
        app.me_ok(&tokens.access_token).await;
        app.me_ok(&other.access_token).await;
        // It is the login's lockout of that (tenant, email).
        assert_locked("login after 5 wrong current passwords", app.login(EMAIL, PASSWORD, None).await).await;
        app.stop().await;
    }
}
