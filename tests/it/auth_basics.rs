//! Login, error shapes, input validation, tenant isolation, JWKS and the admin listener.

use std::collections::BTreeSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use reqwest::header::{CONTENT_TYPE, ORIGIN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, assert_error_in, assert_status, both_backends, expect_json, jwt_part, parse_uuid, spawn_app,
    spawn_app_with, TestApp, TestOptions, OTHER_PASSWORD, PASSWORD, WRONG_PASSWORD,
};

const EMAIL: &str = "me@example.com";

/// Verifies the compact JWS `token` against the JWKS entry whose kid matches its header.
fn verify_with_jwks(token: &str, jwks: &Value) {
    let kid = jwt_part(token, 0)["kid"].as_str().expect("token header has a kid").to_owned();
    let x = jwks["keys"]
        .as_array()
        .expect("jwks.keys is an array")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .and_then(|k| k["x"].as_str())
        .unwrap_or_else(|| panic!("kid {kid} is not published in the JWKS: {jwks}"));
    let x = URL_SAFE_NO_PAD.decode(x).expect("JWKS x is base64url");
    let x: [u8; 32] = x.as_slice().try_into().expect("JWKS x is 32 bytes");
    let key = VerifyingKey::from_bytes(&x).expect("JWKS x is an Ed25519 point");
    let (signing_input, signature) = token.rsplit_once('.').expect("token has a signature part");
    let signature = URL_SAFE_NO_PAD.decode(signature).expect("signature is base64url");
    let signature = Signature::from_slice(&signature).expect("signature is 64 bytes");
    key.verify(signing_input.as_bytes(), &signature).expect("access token verifies against the published key");
}

both_backends! {
    #[tokio::test]
    async fn login_returns_signed_access_token_and_refresh_token() {
        let app = spawn_app().await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &["admin"], &["read", "write"]).await;

        let body = expect_json(app.login(EMAIL, PASSWORD, None).await, StatusCode::OK).await;
        assert_eq!(body["token_type"], "Bearer", "{body}");
        assert_eq!(body["expires_in"], 900, "{body}");
        assert_eq!(body["refresh_expires_in"], 30 * 24 * 3600, "{body}");
        let access = body["access_token"].as_str().expect("access_token is a string");
        let refresh = body["refresh_token"].as_str().expect("refresh_token is a string");
        assert!(!refresh.is_empty(), "empty refresh token");
        assert_ne!(access, refresh);
        assert_eq!(access.split('.').count(), 3, "access token is a compact JWS");

        let header = jwt_part(access, 0);
        assert_eq!(header["alg"], "EdDSA", "{header}");
        assert_eq!(header["typ"], "at+jwt", "{header}");
        assert!(header["kid"].is_string(), "{header}");

        let claims = jwt_part(access, 1);
        assert_eq!(claims["sub"], user_id.as_str(), "{claims}");
        assert_eq!(claims["iss"], "gateway", "{claims}");
        assert!(claims["aud"] == "gateway" || claims["aud"] == json!(["gateway"]), "aud: {claims}");
        parse_uuid(claims["tid"].as_str().expect("tid is a string"), "tid");
        parse_uuid(claims["sid"].as_str().expect("sid is a string"), "sid");
        assert!(claims["jti"].as_str().is_some_and(|jti| !jti.is_empty()), "jti: {claims}");
        let iat = claims["iat"].as_i64().expect("iat is an integer");
        let exp = claims["exp"].as_i64().expect("exp is an integer");
        assert_eq!(exp - iat, 900, "exp = iat + access_token_ttl");
        assert_eq!(claims["roles"], json!(["admin"]), "{claims}");
        let scopes: BTreeSet<&str> =
            claims["scope"].as_str().expect("scope is a space-separated string").split_whitespace().collect();
        assert_eq!(scopes, BTreeSet::from(["read", "write"]));

        verify_with_jwks(access, &app.jwks().await);
        app.stop().await;
    }

    #[tokio::test]
    async fn login_failures_are_indistinguishable() {
        let app = spawn_app().await;
        app.create_user("default", "alive@example.com", PASSWORD, &[], &[]).await;
        app.create_user("default", "gone@example.com", PASSWORD, &[], &[]).await;
        app.cli(&["user", "disable", "--tenant", "default", "--email", "gone@example.com"], "")
            .await
            .expect("user disable succeeds");

        let attempts = [
            ("wrong password", app.login("alive@example.com", WRONG_PASSWORD, None).await),
            ("unknown email", app.login("nobody@example.com", PASSWORD, None).await),
            ("unknown tenant", app.login("alive@example.com", PASSWORD, Some("no-such-tenant")).await),
            ("disabled user", app.login("gone@example.com", PASSWORD, None).await),
        ];

        let mut bodies = Vec::new();
        for (case, resp) in attempts {
            let status = resp.status();
            let bytes = resp.bytes().await.expect("read body");
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {}", String::from_utf8_lossy(&bytes));
            bodies.push((case, bytes));
        }
        let (first_case, first_body) = bodies.first().expect("at least one attempt");
        let parsed: Value = serde_json::from_slice(first_body).expect("error body is JSON");
        assert_eq!(parsed["error"], "invalid_credentials", "{parsed}");
        assert!(parsed["message"].is_string(), "{parsed}");
        for (case, body) in &bodies {
            assert_eq!(body, first_body, "{case} must answer byte-identically to {first_case}");
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn email_is_trimmed_and_case_insensitive() {
        let app = spawn_app().await;
        let user_id = app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let tokens = app.login_ok("  Me@Example.COM ", PASSWORD, None).await;
        assert_eq!(jwt_part(&tokens.access_token, 1)["sub"], user_id.as_str());

        let mixed_id = app.create_user("default", "Mixed.Case@Example.org", PASSWORD, &[], &[]).await;
        let tokens = app.login_ok("mixed.case@example.org", PASSWORD, Some("default")).await;
        assert_eq!(jwt_part(&tokens.access_token, 1)["sub"], mixed_id.as_str());
        app.stop().await;
    }

    #[tokio::test]
    async fn malformed_login_requests_are_invalid_request() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let valid = json!({ "email": EMAIL, "password": PASSWORD }).to_string();

        let cases = [
            (
                "malformed JSON",
                app.client
                    .post(app.url("/auth/login"))
                    .header(CONTENT_TYPE, "application/json")
                    .body(r#"{"email": "me@example.com", "#),
            ),
            ("missing password", app.client.post(app.url("/auth/login")).json(&json!({ "email": EMAIL }))),
            ("missing email", app.client.post(app.url("/auth/login")).json(&json!({ "password": PASSWORD }))),
            (
                "wrong field types",
                app.client.post(app.url("/auth/login")).json(&json!({ "email": 42, "password": ["x"] })),
            ),
            ("empty body", app.client.post(app.url("/auth/login")).header(CONTENT_TYPE, "application/json").body("")),
            (
                "wrong content type",
                app.client.post(app.url("/auth/login")).header(CONTENT_TYPE, "text/plain").body(valid.clone()),
            ),
            ("no content type", app.client.post(app.url("/auth/login")).body(valid)),
            // PostgreSQL refuses NUL in text: it must be a 400 before any query, not a 500.
            (
                "NUL in the email",
                app.client.post(app.url("/auth/login")).json(&json!({ "email": "me\u{0}@example.com", "password": PASSWORD })),
            ),
            (
                "NUL in the tenant",
                app.client
                    .post(app.url("/auth/login"))
                    .json(&json!({ "email": EMAIL, "password": PASSWORD, "tenant": "acme\u{0}" })),
            ),
            (
                "tenant that is not a slug",
                app.client
                    .post(app.url("/auth/login"))
                    .json(&json!({ "email": EMAIL, "password": PASSWORD, "tenant": "Acme Corp!" })),
            ),
        ];
        for (case, request) in cases {
            let resp = request.send().await.expect(case);
            assert_error_in(case, resp, StatusCode::BAD_REQUEST, "invalid_request").await;
        }

        // The well-formed request still works: the cases above failed for their stated reason.
        app.login_ok(EMAIL, PASSWORD, None).await;
        app.stop().await;
    }

    #[tokio::test]
    async fn overlong_password_is_invalid_request() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        let long = "x".repeat(2000);
        assert_error(app.login(EMAIL, &long, None).await, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert_error(app.login("nobody@example.com", &long, None).await, StatusCode::BAD_REQUEST, "invalid_request")
            .await;
        app.stop().await;
    }

    #[tokio::test]
    async fn oversized_bodies_are_rejected() {
        let app = spawn_app().await;
        let huge = "x".repeat(20 * 1024);

        let resp = app
            .client
            .post(app.url("/auth/login"))
            .json(&json!({ "email": EMAIL, "password": huge }))
            .send()
            .await
            .expect("POST /auth/login");
        assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

        let resp = app
            .client
            .post(app.url("/auth/refresh"))
            .json(&json!({ "refresh_token": huge }))
            .send()
            .await
            .expect("POST /auth/refresh");
        assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
        app.stop().await;
    }

    #[tokio::test]
    async fn tenants_are_isolated() {
        let app = spawn_app().await;
        let acme_id = app.create_tenant("acme").await;
        let email = "shared@example.com";
        let default_user = app.create_user("default", email, PASSWORD, &[], &[]).await;
        let acme_user = app.create_user("acme", email, OTHER_PASSWORD, &[], &[]).await;
        assert_ne!(default_user, acme_user);

        // Each password works only in its own tenant; no tenant means `default`.
        let in_default = app.login_ok(email, PASSWORD, None).await;
        app.login_ok(email, PASSWORD, Some("default")).await;
        let in_acme = app.login_ok(email, OTHER_PASSWORD, Some("acme")).await;
        assert_error(app.login(email, PASSWORD, Some("acme")).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;
        assert_error(app.login(email, OTHER_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;
        assert_error(
            app.login(email, OTHER_PASSWORD, Some("default")).await,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        )
        .await;

        let default_claims = jwt_part(&in_default.access_token, 1);
        let acme_claims = jwt_part(&in_acme.access_token, 1);
        assert_ne!(default_claims["tid"], acme_claims["tid"]);
        assert_eq!(acme_claims["tid"], acme_id.as_str());
        assert_eq!(default_claims["sub"], default_user.as_str());
        assert_eq!(acme_claims["sub"], acme_user.as_str());

        let me = app.me_ok(&in_acme.access_token).await;
        assert_eq!(me["tenant"], "acme", "{me}");
        assert_eq!(me["tenant_id"], acme_id.as_str(), "{me}");
        assert_eq!(me["user_id"], acme_user.as_str(), "{me}");
        let me = app.me_ok(&in_default.access_token).await;
        assert_eq!(me["tenant"], "default", "{me}");
        app.stop().await;
    }

    #[tokio::test]
    async fn jwks_has_expected_shape() {
        let app = spawn_app().await;
        let resp = app.client.get(app.url("/.well-known/jwks.json")).send().await.expect("GET jwks");
        let content_type =
            resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(
            content_type.starts_with("application/json") || content_type.starts_with("application/jwk-set+json"),
            "content-type: {content_type}"
        );
        let jwks = expect_json(resp, StatusCode::OK).await;
        let keys = jwks["keys"].as_array().expect("keys is an array");
        assert!(!keys.is_empty(), "{jwks}");
        for key in keys {
            assert_eq!(key["kty"], "OKP", "{key}");
            assert_eq!(key["crv"], "Ed25519", "{key}");
            assert_eq!(key["alg"], "EdDSA", "{key}");
            assert_eq!(key["use"], "sig", "{key}");
            assert!(key["kid"].as_str().is_some_and(|k| !k.is_empty()), "{key}");
            let x = key["x"].as_str().expect("x is a string");
            let x = URL_SAFE_NO_PAD.decode(x).expect("x is base64url");
            assert_eq!(x.len(), 32, "{key}");
            assert!(key.get("d").is_none(), "JWKS leaks private key material: {key}");
        }

        // The key on disk is the published one.
        let (kid, signing_key) = app.gateway_signing_key();
        let published = keys
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("kid {kid} of the key on disk is not published: {jwks}"));
        assert_eq!(published["x"], URL_SAFE_NO_PAD.encode(signing_key.verifying_key().as_bytes()));
        // The JWKS is the same through the helper.
        assert_eq!(app.jwks().await, jwks);
        app.stop().await;
    }

    #[tokio::test]
    async fn admin_listener_serves_health_and_metrics() {
        let app = spawn_app().await;
        app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
        app.login_ok(EMAIL, PASSWORD, None).await;
        assert_error(app.login(EMAIL, WRONG_PASSWORD, None).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;

        for path in ["/healthz", "/readyz"] {
            let resp = app.client.get(app.admin_url(path)).send().await.expect(path);
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
        }
        let resp = app.client.get(app.admin_url("/metrics")).send().await.expect("GET /metrics");
        let metrics = assert_status(resp, StatusCode::OK).await;
        assert!(metrics.contains("gateway_logins_total"), "metrics lack gateway_logins_total:\n{metrics}");

        // Metrics are only on the admin listener.
        let resp = app.client.get(app.url("/metrics")).send().await.expect("GET public /metrics");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        app.stop().await;
    }
}

/// Browser apps on the origins in `auth.cors_origins` may call the API from
/// another origin: preflights are answered, answers name the origin and let
/// scripts read the request id. Other origins get no CORS header, no answer
/// ever allows credentials, and without the setting nothing changes.
#[tokio::test]
async fn cors_is_granted_only_to_the_configured_origins() {
    const APP: &str = "https://app.example.com";
    let opts = TestOptions { auth_extra: format!("cors_origins = [{APP:?}]"), ..TestOptions::default() };
    let app = spawn_app_with(opts).await;
    app.create_user("default", EMAIL, PASSWORD, &[], &[]).await;
    let preflight = |app: &TestApp, origin: &str| {
        app.client
            .request(Method::OPTIONS, app.url("/auth/login"))
            .header(ORIGIN, origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "content-type")
    };
    let header = |resp: &reqwest::Response, name: &str| {
        resp.headers().get(name).map(|v| v.to_str().expect("ASCII").to_ascii_lowercase())
    };
    let login = |app: &TestApp, origin: &str| {
        app.client
            .post(app.url("/auth/login"))
            .header(ORIGIN, origin)
            .json(&json!({"email": EMAIL, "password": PASSWORD}))
    };

    let resp = preflight(&app, APP).send().await.expect("preflight");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "access-control-allow-origin").as_deref(), Some(APP));
    let methods = header(&resp, "access-control-allow-methods").expect("allowed methods");
    assert!(methods.contains("post") && methods.contains("get") && methods.contains("delete"), "{methods}");
    let headers = header(&resp, "access-control-allow-headers").expect("allowed headers");
    assert!(headers.contains("content-type") && headers.contains("authorization"), "{headers}");
    assert_eq!(header(&resp, "access-control-allow-credentials"), None);

    let resp = login(&app, APP).send().await.expect("login");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "access-control-allow-origin").as_deref(), Some(APP));
    let exposed = header(&resp, "access-control-expose-headers").expect("exposed headers");
    assert!(exposed.contains("x-request-id") && exposed.contains("retry-after"), "{exposed}");
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(header(&resp, "access-control-allow-credentials"), None);

    for resp in [preflight(&app, "https://evil.example").send().await, login(&app, "https://evil.example").send().await]
    {
        let resp = resp.expect("a request from another origin");
        assert_eq!(resp.status(), StatusCode::OK, "answered, but not readable by the other origin's scripts");
        assert_eq!(header(&resp, "access-control-allow-origin"), None, "another origin was allowed");
    }
    app.stop().await;

    // `*`: any origin, still never with credentials.
    let opts = TestOptions { auth_extra: "cors_origins = [\"*\"]".to_owned(), ..TestOptions::default() };
    let app = spawn_app_with(opts).await;
    let resp = preflight(&app, "https://anyone.example").send().await.expect("preflight");
    assert_eq!(header(&resp, "access-control-allow-origin").as_deref(), Some("*"));
    assert_eq!(header(&resp, "access-control-allow-credentials"), None);
    app.stop().await;

    // Without `cors_origins`, a preflight is a method the route lacks, and no
    // answer carries a CORS header.
    let app = spawn_app().await;
    let resp = preflight(&app, APP).send().await.expect("preflight");
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    app.stop().await;
}
