//! Refresh-token rotation, reuse detection, races and expiry.

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    assert_error, assert_error_in, assert_invalid_token, both_backends, jwt_part, parse_tokens, spawn_app,
    spawn_app_with, TestOptions, PASSWORD,
};

const EMAIL: &str = "me@example.com";

both_backends! {
    #[tokio::test]
    async fn refresh_rotates_the_refresh_token() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;

        let b = app.refresh_ok(&a.refresh_token).await;
        assert_ne!(b.refresh_token, a.refresh_token, "refresh must rotate");
        assert_ne!(b.access_token, a.access_token);
        assert_eq!(b.expires_in, 900);
        // Same session, new tokens.
        assert_eq!(jwt_part(&b.access_token, 1)["sid"], jwt_part(&a.access_token, 1)["sid"]);
        app.me_ok(&b.access_token).await;

        // The new refresh token works...
        let c = app.refresh_ok(&b.refresh_token).await;
        assert_ne!(c.refresh_token, b.refresh_token);
        app.me_ok(&c.access_token).await;

        // ...and the original one is spent.
        assert_error(app.refresh(&a.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn reusing_a_spent_refresh_token_revokes_the_session() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let a = app.login_ok(EMAIL, PASSWORD, None).await;
        let other_session = app.login_ok(EMAIL, PASSWORD, None).await;
        let b = app.refresh_ok(&a.refresh_token).await;
        app.me_ok(&b.access_token).await;

        // A is spent: presenting it again is reuse.
        assert_error(app.refresh(&a.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        // The whole session is gone: B's refresh token and every access token of the session.
        assert_error(app.refresh(&b.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        assert_invalid_token(app.get_authed("/auth/me", &b.access_token).await).await;
        assert_invalid_token(app.get_authed("/auth/me", &a.access_token).await).await;

        // Other sessions of the same user are not affected.
        app.me_ok(&other_session.access_token).await;
        app.refresh_ok(&other_session.refresh_token).await;
        app.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_refreshes_have_exactly_one_winner() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;

        let responses = join_all((0..12).map(|_| app.refresh(&tokens.refresh_token))).await;
        let mut winners = 0_usize;
        for resp in responses {
            if resp.status() == StatusCode::OK {
                winners += 1;
                parse_tokens(resp, "winning refresh").await;
            } else {
                assert_error_in("losing refresh", resp, StatusCode::UNAUTHORIZED, "invalid_grant").await;
            }
        }
        assert_eq!(winners, 1, "exactly one of 12 concurrent refreshes may succeed");
        app.stop().await;
    }

    #[tokio::test]
    async fn refresh_token_expires() {
        let app = spawn_app_with(TestOptions { refresh_token_ttl: "2s", leeway: "0s", ..TestOptions::default() }).await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
        assert_eq!(tokens.refresh_expires_in, 2);

        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_error(app.refresh(&tokens.refresh_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn garbage_refresh_tokens_are_rejected() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;

        let long_garbage = "A".repeat(64);
        let truncated = &tokens.refresh_token[..tokens.refresh_token.len() / 2];
        let first = tokens.refresh_token.chars().next().expect("refresh token is not empty");
        let altered = format!("{}{}", if first == 'x' { 'y' } else { 'x' }, &tokens.refresh_token[first.len_utf8()..]);
        for (case, token) in [
            ("empty", ""),
            ("garbage", "garbage"),
            ("long garbage", long_garbage.as_str()),
            ("truncated", truncated),
            ("first character changed", altered.as_str()),
        ] {
            assert_error_in(case, app.refresh(token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        }

        for (case, body) in [("missing field", json!({})), ("wrong field", json!({ "token": tokens.refresh_token }))] {
            let resp = app.client.post(app.url("/auth/refresh")).json(&body).send().await.expect(case);
            assert_error_in(case, resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        }

        // None of that touched the real session.
        app.refresh_ok(&tokens.refresh_token).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn access_token_is_not_a_refresh_token() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok(EMAIL, PASSWORD, None).await;

        assert_error(app.refresh(&tokens.access_token).await, StatusCode::UNAUTHORIZED, "invalid_grant").await;
        // Not mistaken for reuse: the session is intact.
        app.me_ok(&tokens.access_token).await;
        app.refresh_ok(&tokens.refresh_token).await;
        app.stop().await;
    }
}
