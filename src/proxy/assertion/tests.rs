//! When an assertion is signed afresh and when the last one is handed out
//! again: given the clock, not measured.

use std::time::Duration;

use super::*;
use crate::auth::keys::KeyRing;
use crate::auth::revocation::RevocationState;
use crate::auth::token::{Amr, TokenRules};

fn authenticator() -> (tempfile::TempDir, Authenticator) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ring, _) = KeyRing::load_or_generate(dir.path()).expect("keys");
    let revocations = RevocationState::new(Duration::from_secs(905), Duration::from_secs(30), Duration::from_secs(5));
    (dir, Authenticator::new(ring, TokenRules::new("gateway", "gateway", 5), revocations))
}

fn principal(expires_at: i64) -> Principal {
    Principal {
        user_id: Uuid::new_v4(),
        tenant_id: Uuid::new_v4(),
        session_id: Uuid::new_v4(),
        token_id: Uuid::new_v4(),
        roles: vec!["ops".to_owned()],
        scopes: vec!["a:read".to_owned(), "b:write".to_owned()],
        issued_at: expires_at - 900,
        expires_at,
        amr: Amr::default(),
    }
}

/// `(iat, exp, aud)` of an assertion, read without checking it.
fn times(value: &HeaderValue) -> (i64, i64, String) {
    let text = value.to_str().expect("ASCII");
    let payload = text.split('.').nth(1).expect("a payload");
    let json = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    (
        claims["iat"].as_i64().expect("iat"),
        claims["exp"].as_i64().expect("exp"),
        claims["aud"].as_str().expect("aud").into(),
    )
}

/// The `amr` an assertion carries.
fn amr_of(value: &HeaderValue) -> serde_json::Value {
    let payload = value.to_str().expect("ASCII").split('.').nth(1).expect("a payload").to_owned();
    let json = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).expect("base64url");
    serde_json::from_slice::<serde_json::Value>(&json).expect("JSON")["amr"].clone()
}

#[test]
fn says_whether_the_login_passed_a_second_factor() {
    let (_dir, auth) = authenticator();
    let plain = principal(10_000);
    let stepped = Principal { amr: Amr { link: false, mfa: true }, ..principal(10_000) };
    let signed = |p: &Principal| Assertions::default().get(p, "orders", &auth, 1_000).expect("signed");
    assert_eq!(amr_of(&signed(&plain)), serde_json::json!(["pwd"]));
    assert_eq!(amr_of(&signed(&stepped)), serde_json::json!(["pwd", "otp", "mfa"]));
    let linked = Principal { amr: Amr { link: true, mfa: false }, ..principal(10_000) };
    assert_eq!(amr_of(&signed(&linked)), serde_json::json!(["email"]));
}

#[test]
fn reused_for_half_its_life_then_signed_afresh() {
    let (_dir, auth) = authenticator();
    let p = principal(10_000);
    let a = Assertions::default();
    let first = a.get(&p, "orders", &auth, 1_000).expect("signed");
    assert_eq!(times(&first), (1_000, 1_000 + LIFETIME, "orders".to_owned()));
    let half = 1_000 + LIFETIME / 2;
    assert_eq!(a.get(&p, "orders", &auth, half - 1).expect("reused"), first);
    let next = a.get(&p, "orders", &auth, half).expect("signed again");
    assert_ne!(next, first);
    assert_eq!(times(&next).0, half);
    // Another audience has an assertion of its own.
    let other = a.get(&p, "reports", &auth, half).expect("signed");
    assert_eq!(times(&other).2, "reports");
    assert_eq!(a.get(&p, "orders", &auth, half + 1).expect("reused"), next);
}

#[test]
fn never_outlives_the_token_and_is_kept_once_capped() {
    let (_dir, auth) = authenticator();
    let p = principal(1_020);
    let a = Assertions::default();
    let first = a.get(&p, "orders", &auth, 1_000).expect("signed");
    assert_eq!(times(&first).1, 1_020, "past the token's exp");
    // Signing again could not make it last longer: kept to the end, and
    // within the leeway after it.
    assert_eq!(a.get(&p, "orders", &auth, 1_019).expect("reused"), first);
    assert_eq!(a.get(&p, "orders", &auth, 1_023).expect("reused"), first);
    // Asked first inside the leeway: `iat` is no later than `exp`.
    let late = Assertions::default().get(&p, "orders", &auth, 1_023).expect("signed");
    assert_eq!((times(&late).0, times(&late).1), (1_020, 1_020));
}

#[test]
fn a_bounded_number_of_audiences_is_kept() {
    let (_dir, auth) = authenticator();
    let p = principal(10_000);
    let a = Assertions::default();
    let first = a.get(&p, "aud-0", &auth, 1_000).expect("signed");
    for i in 1..=MAX_AUDIENCES {
        a.get(&p, &format!("aud-{i}"), &auth, 1_000).expect("signed");
    }
    assert_eq!(a.0.lock().expect("lock").len(), MAX_AUDIENCES);
    assert_ne!(a.get(&p, "aud-0", &auth, 1_001).expect("signed again"), first, "the oldest audience was kept");
}

#[test]
fn a_clock_set_back_signs_afresh() {
    let (_dir, auth) = authenticator();
    let p = principal(10_000);
    let a = Assertions::default();
    let first = a.get(&p, "orders", &auth, 1_000).expect("signed");
    let earlier = a.get(&p, "orders", &auth, 990).expect("signed");
    assert_ne!(earlier, first, "reused an assertion issued after the clock's time");
    assert_eq!(times(&earlier).0, 990);
}
