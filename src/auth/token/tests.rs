use super::*;

/// Claims for a fresh access token issued at `now` (shared with other tests).
pub(crate) fn claims(now: i64) -> AccessClaims {
    AccessClaims {
        iss: "gateway".into(),
        aud: "gateway".into(),
        sub: Uuid::new_v4(),
        tid: Uuid::new_v4(),
        sid: Uuid::new_v4(),
        jti: Uuid::new_v4(),
        iat: now,
        exp: now + 900,
        nbf: None,
        roles: vec!["admin".into()],
        scope: "orders:read".into(),
        amr: vec!["pwd".into()],
    }
}

/// A token minted before `amr` existed reads as a password alone.
#[test]
fn claims_without_amr_read_as_a_password_alone() {
    let mut json = serde_json::to_value(claims(0)).expect("serialise");
    json.as_object_mut().expect("an object").remove("amr");
    let read: AccessClaims = serde_json::from_value(json).expect("old claims decode");
    assert!(read.amr.is_empty());
    assert_eq!(Amr::read(&read.amr), Amr::default());
    assert_eq!(Amr::default().values(), ["pwd"]);
    assert_eq!(Amr { link: false, mfa: true }.values(), ["pwd", "otp", "mfa"]);
    assert_eq!(Amr { link: true, mfa: false }.values(), ["email"]);
    assert_eq!(Amr { link: true, mfa: true }.values(), ["email", "otp", "mfa"]);
    for amr in
        [Amr::default(), Amr { link: true, mfa: false }, Amr { link: false, mfa: true }, Amr { link: true, mfa: true }]
    {
        let claim: Vec<String> = amr.values().iter().map(|m| (*m).to_owned()).collect();
        assert_eq!(Amr::read(&claim), amr, "{claim:?}");
    }
}

fn ring() -> (tempfile::TempDir, KeyRing) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ring, _) = KeyRing::load_or_generate(dir.path()).expect("keys");
    (dir, ring)
}

#[test]
fn round_trip_and_claim_checks() {
    let (_dir, keys) = ring();
    let rules = TokenRules::new("gateway", "gateway", 5);
    let now = crate::db::unix_now();
    let c = claims(now);
    let token = sign(&keys, &c).expect("sign");
    assert_eq!(rules.verify(&keys, &token, now), Ok(c.clone()));

    let expired = AccessClaims { exp: now - 10, iat: now - 100, ..c.clone() };
    assert_eq!(rules.verify(&keys, &sign(&keys, &expired).expect("sign"), now), Err(TokenError::Expired));
    let future = AccessClaims { iat: now + 3600, exp: now + 7200, ..c.clone() };
    assert_eq!(rules.verify(&keys, &sign(&keys, &future).expect("sign"), now), Err(TokenError::Immature));
    let other_aud = AccessClaims { aud: "someone-else".into(), ..c.clone() };
    assert_eq!(rules.verify(&keys, &sign(&keys, &other_aud).expect("sign"), now), Err(TokenError::Audience));
    let other_iss = AccessClaims { iss: "evil".into(), ..c };
    assert_eq!(rules.verify(&keys, &sign(&keys, &other_iss).expect("sign"), now), Err(TokenError::Audience));
}

#[test]
fn a_key_from_another_ring_with_our_kid_is_refused() {
    let (_d1, ours) = ring();
    let (_d2, theirs) = ring();
    let rules = TokenRules::new("gateway", "gateway", 5);
    let now = crate::db::unix_now();
    let forged = sign(&theirs, &claims(now)).expect("sign");
    // Swap in our kid: the header now names our key but the signature is theirs.
    let (header, rest) = forged.split_once('.').expect("jwt");
    let mut h: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).expect("b64"),
    )
    .expect("json");
    h["kid"] = ours.signer().0.into();
    let h = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, h.to_string());
    assert_eq!(rules.verify(&ours, &format!("{h}.{rest}"), now), Err(TokenError::Signature));
    assert_eq!(rules.verify(&ours, "not.a.jwt", now), Err(TokenError::Malformed));
}

#[test]
fn an_expired_token_is_refused_before_its_signature_is_checked() {
    let (_dir, keys) = ring();
    let rules = TokenRules::new("gateway", "gateway", 5);
    let now = crate::db::unix_now();
    let expired = sign(&keys, &AccessClaims { exp: now - 10, iat: now - 100, ..claims(now) }).expect("sign");
    // Break the signature: a dead token is refused as expired all the same,
    // which shows no verification was spent on it.
    let (signed, _signature) = expired.rsplit_once('.').expect("jwt");
    let broken = format!("{signed}.AAAA");
    assert_eq!(rules.verify(&keys, &broken, now), Err(TokenError::Expired));
    // Within the leeway it is still verified, and a broken signature shows.
    let (live, _) = sign(&keys, &AccessClaims { exp: now - 2, iat: now - 100, ..claims(now) })
        .expect("sign")
        .rsplit_once('.')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .expect("jwt");
    assert_eq!(rules.verify(&keys, &format!("{live}.AAAA"), now), Err(TokenError::Signature));
}

#[test]
fn a_huge_exp_neither_panics_nor_skips_the_signature_check() {
    let (_dir, keys) = ring();
    let rules = TokenRules::new("gateway", "gateway", 5);
    let now = crate::db::unix_now();
    let token = sign(&keys, &claims(now)).expect("sign");
    let (header, _) = token.split_once('.').expect("jwt");
    let payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        format!("{{\"exp\":{},\"sub\":\"x\"}}", i64::MAX),
    );
    assert_eq!(rules.verify(&keys, &format!("{header}.{payload}.AAAA"), now), Err(TokenError::Signature));
}

/// An identity assertion is typed `JWT`: never taken for an access token,
/// even one made for the access tokens' own issuer and audience.
#[test]
fn an_assertion_is_refused_as_an_access_token_by_its_type() {
    let (_dir, keys) = ring();
    let rules = TokenRules::new("gateway", "gateway", 5);
    let now = crate::db::unix_now();
    let c = claims(now);
    let assertion = AssertionClaims {
        iss: "gateway",
        aud: "gateway",
        sub: c.sub,
        tid: c.tid,
        sid: c.sid,
        jti: c.jti,
        iat: now,
        exp: now + 60,
        roles: &c.roles,
        scope: c.scope.clone(),
        amr: Amr::default().values(),
    };
    let token = sign_assertion(&keys, &assertion).expect("sign");
    assert_eq!(rules.verify(&keys, &token, now), Err(TokenError::Type));
}
