//! `jwt_assertion = true` on a route: the upstream also receives
//! `X-Jwt-Assertion`, a short-lived JWT the gateway signs with its own key
//! (verifiable with the JWKS), stating the caller's identity for that
//! route's audience, so that a backend can check who sent a request without
//! trusting the network it came over. Clients can never send one through,
//! and the gateway never takes one for an access token.

use std::collections::HashSet;

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    assert_error_in, assert_invalid_token, jwt_part, route, spawn_app_with, TestApp, TestOptions, Tokens, PASSWORD,
};
use crate::upstream::{echo, spawn_upstream, Upstream};

const HEADER: &str = "x-jwt-assertion";

struct Fixture {
    app: TestApp,
    svc: Upstream,
    user_id: String,
    tokens: Tokens,
}

async fn fixture(extra: &str, server_extra: &str) -> Fixture {
    let svc = spawn_upstream("assert").await;
    let routes = [
        route("orders", "/orders", &[svc.url()], "jwt_assertion = true"),
        route("shared", "/shared", &[svc.url()], "jwt_assertion = true\njwt_assertion_audience = \"orders-service\""),
        route("plain", "/plain", &[svc.url()], ""),
        route("open", "/open", &[svc.url()], "auth = \"public\""),
    ]
    .concat();
    let opts = TestOptions {
        extra: format!("{extra}{routes}"),
        server_extra: server_extra.to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_with(opts).await;
    let user_id = app.create_user("default", "a@example.com", PASSWORD, &["ops", "admin"], &["orders:read"]).await;
    let tokens = app.login_ok("a@example.com", PASSWORD, None).await;
    Fixture { app, svc, user_id, tokens }
}

/// Verifies `assertion` as a backend would: EdDSA, a key from the JWKS by
/// `kid`, the gateway's issuer and the expected audience. Returns the claims.
async fn verify(app: &TestApp, assertion: &str, audience: &str) -> Value {
    let header = decode_header(assertion).expect("a JWT header");
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.typ.as_deref(), Some("JWT"), "not typed as an access token");
    let kid = header.kid.expect("a kid");
    let jwks = app.jwks().await;
    let key = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS: {jwks}"));
    let key = DecodingKey::from_ed_components(key["x"].as_str().expect("x")).expect("an Ed25519 key");
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["gateway"]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    decode::<Value>(assertion, &key, &validation)
        .unwrap_or_else(|e| panic!("the assertion does not verify: {e}"))
        .claims
}

/// The upstream of a route with `jwt_assertion` gets one signed assertion
/// of exactly the identity the fields state, for the route's audience,
/// valid a minute at most and never past the token; the same one for
/// the next request (signed once, not per request); none on other routes.
#[tokio::test]
async fn a_route_sends_a_signed_assertion_of_the_identity() {
    let f = fixture("", "").await;
    let token = f.tokens.access_token.as_str();
    let seen = echo(f.app.get_authed("/orders/1", token).await).await;
    let assertion = seen.one(HEADER).to_owned();
    let claims = verify(&f.app, &assertion, "orders").await;
    let me = f.app.me_ok(token).await;
    assert_eq!(claims["sub"], f.user_id.as_str());
    assert_eq!(claims["sub"], seen.one("x-user-id"));
    assert_eq!(claims["tid"], me["tenant_id"]);
    assert_eq!(claims["sid"], me["session_id"]);
    let roles: HashSet<&str> = claims["roles"].as_array().expect("roles").iter().filter_map(Value::as_str).collect();
    assert_eq!(roles, HashSet::from(["ops", "admin"]));
    assert_eq!(claims["scope"], "orders:read");
    let (iat, exp) = (claims["iat"].as_i64().expect("iat"), claims["exp"].as_i64().expect("exp"));
    assert!(exp > iat && exp - iat <= 60, "valid {} s", exp - iat);
    assert!(exp <= jwt_part(token, 1)["exp"].as_i64().expect("token exp"), "outlives the token");

    let again = echo(f.app.get_authed("/orders/2", token).await).await;
    assert_eq!(again.one(HEADER), assertion, "signed again for the next request");

    let shared = echo(f.app.get_authed("/shared/1", token).await).await;
    let claims = verify(&f.app, shared.one(HEADER), "orders-service").await;
    assert_eq!(claims["sub"], f.user_id.as_str());

    assert!(!echo(f.app.get_authed("/plain/1", token).await).await.has(HEADER));
    assert!(!echo(f.app.get("/open/1").await).await.has(HEADER));
    f.app.stop().await;
}

/// A client's own assertion, in any spelling, never reaches an upstream:
/// not on a public route, not on a required route without assertions, and
/// on one with them only the gateway's goes through.
#[tokio::test]
async fn a_client_cannot_send_an_assertion_through() {
    let f = fixture("", "").await;
    let token = f.tokens.access_token.as_str();
    let forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0.";
    for path in ["/open/1", "/plain/1", "/orders/1"] {
        for name in ["X-Jwt-Assertion", "x_jwt_assertion", "X.Jwt.Assertion"] {
            let resp =
                f.app.client.get(f.app.url(path)).bearer_auth(token).header(name, forged).send().await.expect("GET");
            let seen = echo(resp).await;
            let values: Vec<&str> = seen
                .pairs()
                .into_iter()
                .filter(|(n, _)| n.replace(['_', '.'], "-") == HEADER)
                .map(|(_, v)| v)
                .collect();
            let expected = usize::from(path == "/orders/1");
            assert_eq!(values.len(), expected, "{path} {name}: {values:?}");
            assert!(!values.contains(&forged), "{path} {name}: the client's assertion went through");
        }
    }
    f.app.stop().await;
}

/// An assertion is not an access token: the gateway refuses it as a bearer
/// token on its routes and its API (its audience is a route's, never
/// `auth.audience`; and it is typed `JWT`, not `at+jwt`, which the unit
/// tests of `auth::token` check on their own).
#[tokio::test]
async fn an_assertion_is_never_taken_for_an_access_token() {
    let f = fixture("", "").await;
    let assertion = echo(f.app.get_authed("/orders/1", &f.tokens.access_token).await).await.one(HEADER).to_owned();
    assert_invalid_token(f.app.get_authed("/orders/2", &assertion).await).await;
    assert_invalid_token(f.app.get_authed("/auth/me", &assertion).await).await;
    assert_eq!(f.svc.hits(), 1);
    f.app.stop().await;
}

/// Forward auth hands the assertion back with the identity fields, for the
/// proxy in front to pass on.
#[tokio::test]
async fn forward_auth_hands_back_the_assertion() {
    let f = fixture("\n[forward_auth]\nenabled = true\n", "trusted_proxies = [\"127.0.0.1/32\"]").await;
    let ask = |uri: &'static str| {
        f.app
            .client
            .get(f.app.url("/auth/forward-auth"))
            .bearer_auth(&f.tokens.access_token)
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-host", "app.example")
            .header("x-forwarded-uri", uri)
            .send()
    };
    let resp = ask("/orders/1").await.expect("ask");
    assert_eq!(resp.status(), StatusCode::OK);
    let assertion = resp.headers().get(HEADER).expect("an assertion").to_str().expect("ASCII").to_owned();
    let claims = verify(&f.app, &assertion, "orders").await;
    assert_eq!(claims["sub"], f.user_id.as_str());
    let resp = ask("/plain/1").await.expect("ask");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key(HEADER));
    let resp = ask("/nowhere").await.expect("ask");
    assert!(!resp.headers().contains_key(HEADER));
    assert_error_in("no route", resp, StatusCode::NOT_FOUND, "not_found").await;
    f.app.stop().await;
}

/// A logout stops new assertions at once; a new signing key (after a key
/// reload) signs the next one, for the same token.
#[tokio::test]
async fn a_new_key_signs_the_next_assertion_and_a_logout_stops_them() {
    let f = fixture("", "").await;
    let token = f.tokens.access_token.as_str();
    let first = echo(f.app.get_authed("/orders/1", token).await).await.one(HEADER).to_owned();
    let old_kid = decode_header(&first).expect("header").kid.expect("kid");
    f.app.cli(&["keys", "generate"], "").await.expect("keys generate");
    f.app.reloader.reload_keys();
    let next = echo(f.app.get_authed("/orders/2", token).await).await.one(HEADER).to_owned();
    let new_kid = decode_header(&next).expect("header").kid.expect("kid");
    assert_ne!(new_kid, old_kid, "still signed with the old key");
    verify(&f.app, &next, "orders").await;

    let hits = f.svc.hits();
    let resp = f.app.post_authed("/auth/logout", token, &serde_json::json!({})).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_invalid_token(f.app.get_authed("/orders/3", token).await).await;
    assert_eq!(f.svc.hits(), hits, "a request after logout reached the upstream");
    f.app.stop().await;
}
