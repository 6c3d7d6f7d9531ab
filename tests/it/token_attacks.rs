//! Forged and manipulated access tokens. Every attack must get 401 `invalid_token` on
//! GET /auth/me; the positive control proves that a token forged with the real key and
//! correct claims IS accepted, so each rejection is due to the manipulation under test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rand_core::OsRng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::helpers::{
    assert_invalid_token, b64url_json, both_backends, jwt_part, spawn_app, TestApp, Tokens, PASSWORD,
};

const EMAIL: &str = "me@example.com";

struct Fixture {
    app: TestApp,
    /// A genuine token pair of EMAIL.
    tokens: Tokens,
    /// kid of the gateway's signing key.
    kid: String,
    /// The gateway's signing key, read from disk.
    key: SigningKey,
    /// The claims of `tokens.access_token`.
    claims: Value,
}

impl Fixture {
    async fn assert_rejected(&self, case: &str, token: &str) {
        let resp = self.app.get_authed("/auth/me", token).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{case}: token was not rejected: {token}");
        assert_invalid_token(resp).await;
    }

    async fn assert_accepted(&self, case: &str, token: &str) -> Value {
        let resp = self.app.get_authed("/auth/me", token).await;
        let status = resp.status();
        let text = resp.text().await.expect("read /auth/me body");
        assert_eq!(status, StatusCode::OK, "{case}: {text}; token: {token}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: /auth/me body is not JSON ({e}): {text}"))
    }
}

async fn fixture() -> Fixture {
    let app = spawn_app().await;
    app.create_user("default", EMAIL, PASSWORD, &["user"], &["read"]).await;
    let tokens = app.login_ok(EMAIL, PASSWORD, None).await;
    let (kid, key) = app.gateway_signing_key();
    assert_eq!(jwt_part(&tokens.access_token, 0)["kid"], kid.as_str(), "the key on disk signed the token");
    let claims = jwt_part(&tokens.access_token, 1);
    app.me_ok(&tokens.access_token).await;
    Fixture { app, tokens, kid, key, claims }
}

fn now_secs() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock is after 1970").as_secs();
    i64::try_from(secs).expect("time fits in i64")
}

/// A copy of `claims` with the given claims replaced (or added).
fn edited(claims: &Value, edits: &[(&str, Value)]) -> Value {
    let mut out = claims.clone();
    for (name, value) in edits {
        out[*name] = value.clone();
    }
    out
}

/// A copy of `claims` without the claim `name`.
fn without(claims: &Value, name: &str) -> Value {
    let mut out = claims.clone();
    out.as_object_mut().expect("claims are a JSON object").remove(name);
    out
}

fn header(alg: Algorithm, kid: Option<&str>, typ: Option<&str>) -> Header {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    header.typ = typ.map(str::to_owned);
    header
}

/// Signs with jsonwebtoken, EdDSA.
fn sign_eddsa(header: &Header, claims: &Value, key: &SigningKey) -> String {
    let der = key.to_pkcs8_der().expect("encode signing key as PKCS#8");
    encode(header, claims, &EncodingKey::from_ed_der(der.as_bytes())).expect("sign token")
}

/// Builds and signs a JWS by hand (Ed25519 over `b64(header).b64(claims)`), for headers
/// and claims jsonwebtoken would not produce.
fn sign_raw(header: &Value, claims: &Value, key: &SigningKey) -> String {
    let signing_input = format!("{}.{}", b64url_json(header), b64url_json(claims));
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

fn foreign_key() -> SigningKey {
    SigningKey::generate(&mut OsRng)
}

both_backends! {
    #[tokio::test]
    async fn positive_control_token_forged_with_the_real_key_is_accepted() {
        let f = fixture().await;

        // The genuine claims, re-signed by us.
        let token = sign_eddsa(&header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt")), &f.claims, &f.key);
        let me = f.assert_accepted("re-signed genuine claims", &token).await;
        assert_eq!(me["user_id"], f.claims["sub"], "{me}");
        assert_eq!(me["session_id"], f.claims["sid"], "{me}");

        // Fresh timestamps and jti: still accepted (baseline for the time-based attacks).
        let now = now_secs();
        let fresh = edited(
            &f.claims,
            &[("iat", json!(now - 10)), ("exp", json!(now + 600)), ("jti", json!(Uuid::new_v4().to_string()))],
        );
        let token = sign_eddsa(&header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt")), &fresh, &f.key);
        f.assert_accepted("fresh timestamps", &token).await;

        // The hand-built path (used for alg none and string exp) produces accepted tokens too.
        let raw_header = json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": f.kid });
        let token = sign_raw(&raw_header, &f.claims, &f.key);
        f.assert_accepted("hand-built token", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn alg_none_is_rejected() {
        let f = fixture().await;
        let payload = f.tokens.access_token.split('.').nth(1).expect("token has a payload");
        let signature = f.tokens.access_token.rsplit('.').next().expect("token has a signature");
        for alg in ["none", "None", "NONE", "nOnE"] {
            let none_header = b64url_json(&json!({ "alg": alg, "typ": "at+jwt", "kid": f.kid }));
            f.assert_rejected(&format!("alg {alg}, empty signature"), &format!("{none_header}.{payload}.")).await;
            f.assert_rejected(
                &format!("alg {alg}, original signature"),
                &format!("{none_header}.{payload}.{signature}"),
            )
            .await;
        }
        f.app.stop().await;
    }

    #[tokio::test]
    async fn tampered_payload_is_rejected() {
        let f = fixture().await;
        let victim_id = f.app.create_user("default", "victim@example.com", PASSWORD, &["admin"], &[]).await;
        let parts: Vec<&str> = f.tokens.access_token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let (head, body, signature) = (parts[0], parts[1], parts[2]);
        let exp = f.claims["exp"].as_i64().expect("exp is an integer");

        let tampered = [
            ("roles elevated", edited(&f.claims, &[("roles", json!(["admin", "superuser"]))])),
            ("sub changed", edited(&f.claims, &[("sub", json!(victim_id))])),
            ("exp extended", edited(&f.claims, &[("exp", json!(exp + 86_400))])),
            ("scope widened", edited(&f.claims, &[("scope", json!("read write admin"))])),
        ];
        for (case, claims) in tampered {
            let token = format!("{head}.{}.{signature}", b64url_json(&claims));
            f.assert_rejected(case, &token).await;
        }

        // Signature stripped, or one bit of it flipped.
        f.assert_rejected("signature stripped", &format!("{head}.{body}.")).await;
        let mut sig_bytes = URL_SAFE_NO_PAD.decode(signature).expect("signature is base64url");
        let first = sig_bytes.first_mut().expect("signature is not empty");
        *first ^= 0x01;
        let flipped = URL_SAFE_NO_PAD.encode(sig_bytes);
        f.assert_rejected("signature bit flipped", &format!("{head}.{body}.{flipped}")).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn foreign_key_with_the_real_kid_is_rejected() {
        let f = fixture().await;
        let token =
            sign_eddsa(&header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt")), &f.claims, &foreign_key());
        f.assert_rejected("foreign key, real kid", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn hs256_with_the_public_key_as_secret_is_rejected() {
        let f = fixture().await;
        let jwks = f.app.jwks().await;
        let x = jwks["keys"]
            .as_array()
            .expect("keys is an array")
            .iter()
            .find(|k| k["kid"] == f.kid.as_str())
            .and_then(|k| k["x"].as_str())
            .expect("the signing key is published")
            .to_owned();
        let raw = URL_SAFE_NO_PAD.decode(x.as_str()).expect("x is base64url");
        let hs_header = header(Algorithm::HS256, Some(f.kid.as_str()), Some("at+jwt"));
        for (case, secret) in
            [("HS256, secret = raw public key", raw.as_slice()), ("HS256, secret = JWKS x string", x.as_bytes())]
        {
            let token = encode(&hs_header, &f.claims, &EncodingKey::from_secret(secret)).expect("sign HS256 token");
            f.assert_rejected(case, &token).await;
        }
        f.app.stop().await;
    }

    #[tokio::test]
    async fn wrong_audience_is_rejected() {
        let f = fixture().await;
        let h = header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt"));
        for (case, aud) in [
            ("aud other", json!("someone-else")),
            ("aud other in array", json!(["someone-else"])),
            ("aud empty", json!("")),
        ] {
            let token = sign_eddsa(&h, &edited(&f.claims, &[("aud", aud)]), &f.key);
            f.assert_rejected(case, &token).await;
        }
        let token = sign_eddsa(&h, &without(&f.claims, "aud"), &f.key);
        f.assert_rejected("aud missing", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn wrong_issuer_is_rejected() {
        let f = fixture().await;
        let h = header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt"));
        let token = sign_eddsa(&h, &edited(&f.claims, &[("iss", json!("evil"))]), &f.key);
        f.assert_rejected("iss evil", &token).await;
        let token = sign_eddsa(&h, &without(&f.claims, "iss"), &f.key);
        f.assert_rejected("iss missing", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn wrong_typ_is_rejected() {
        let f = fixture().await;
        let token = sign_eddsa(&header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("JWT")), &f.claims, &f.key);
        f.assert_rejected("typ JWT", &token).await;
        let token = sign_eddsa(&header(Algorithm::EdDSA, Some(f.kid.as_str()), None), &f.claims, &f.key);
        f.assert_rejected("typ missing", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn missing_or_unknown_kid_is_rejected() {
        let f = fixture().await;
        let token = sign_eddsa(&header(Algorithm::EdDSA, None, Some("at+jwt")), &f.claims, &f.key);
        f.assert_rejected("kid missing", &token).await;
        let unknown = Uuid::new_v4().to_string();
        let token = sign_eddsa(&header(Algorithm::EdDSA, Some(unknown.as_str()), Some("at+jwt")), &f.claims, &f.key);
        f.assert_rejected("kid unknown", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn exp_must_be_a_number() {
        let f = fixture().await;
        let raw_header = json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": f.kid });
        let token = sign_raw(&raw_header, &edited(&f.claims, &[("exp", json!("9999999999"))]), &f.key);
        f.assert_rejected("exp as a string", &token).await;
        let token = sign_raw(&raw_header, &without(&f.claims, "exp"), &f.key);
        f.assert_rejected("exp missing", &token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn expired_token_is_rejected() {
        let f = fixture().await;
        let h = header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt"));
        let now = now_secs();
        for (case, iat, exp) in
            [("expired an hour ago", now - 7200, now - 3600), ("expired beyond the leeway", now - 960, now - 60)]
        {
            let claims = edited(&f.claims, &[("iat", json!(iat)), ("exp", json!(exp))]);
            f.assert_rejected(case, &sign_eddsa(&h, &claims, &f.key)).await;
        }
        f.app.stop().await;
    }

    #[tokio::test]
    async fn iat_in_the_future_is_rejected() {
        let f = fixture().await;
        let h = header(Algorithm::EdDSA, Some(f.kid.as_str()), Some("at+jwt"));
        let now = now_secs();
        let claims = edited(&f.claims, &[("iat", json!(now + 3600)), ("exp", json!(now + 3600 + 900))]);
        f.assert_rejected("iat an hour ahead", &sign_eddsa(&h, &claims, &f.key)).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn refresh_token_is_not_a_bearer_token() {
        let f = fixture().await;
        f.assert_rejected("refresh token as bearer", &f.tokens.refresh_token).await;
        f.app.stop().await;
    }

    #[tokio::test]
    async fn malformed_bearer_tokens_are_rejected() {
        let f = fixture().await;
        for token in ["not-a-jwt", "a.b.c", "a.b", "...", "e30.e30.", "e30.e30.e30"] {
            f.assert_rejected(token, token).await;
        }
        f.app.stop().await;
    }

    #[tokio::test]
    async fn jku_header_is_not_followed() {
        let f = fixture().await;

        // A decoy JWKS server that publishes the attacker's key and counts connections.
        let attacker = foreign_key();
        let attacker_x = URL_SAFE_NO_PAD.encode(attacker.verifying_key().as_bytes());
        let body = json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
            "kid": "attacker", "x": attacker_x
        }] })
        .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind decoy JWKS server");
        let decoy = listener.local_addr().expect("decoy address");
        let hits = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn({
            let hits = Arc::clone(&hits);
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mut buf = vec![0_u8; 8192];
                    let read = stream.read(&mut buf).await.unwrap_or(0);
                    if read == 0 {
                        continue;
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        });
        let jku = format!("http://{decoy}/jwks.json");

        for (case, kid) in [("jku + attacker kid", "attacker"), ("jku + real kid", f.kid.as_str())] {
            let mut h = header(Algorithm::EdDSA, Some(kid), Some("at+jwt"));
            h.jku = Some(jku.clone());
            let token = sign_eddsa(&h, &f.claims, &attacker);
            f.assert_rejected(case, &token).await;
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the gateway fetched the attacker's jku URL");
        server.abort();
        f.app.stop().await;
    }

    #[tokio::test]
    async fn embedded_jwk_header_is_ignored() {
        let f = fixture().await;
        let attacker = foreign_key();
        let attacker_x = URL_SAFE_NO_PAD.encode(attacker.verifying_key().as_bytes());
        for kid in [f.kid.as_str(), "attacker"] {
            let raw_header = json!({
                "alg": "EdDSA",
                "typ": "at+jwt",
                "kid": kid,
                "jwk": { "kty": "OKP", "crv": "Ed25519", "x": attacker_x, "kid": kid }
            });
            let token = sign_raw(&raw_header, &f.claims, &attacker);
            f.assert_rejected(&format!("embedded jwk, kid {kid}"), &token).await;
        }
        f.app.stop().await;
    }
}
