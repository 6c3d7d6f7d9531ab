//! The cache may skip the revocation lookups only while nothing was revoked
//! since its last check: every revocation must stop a cached token on the
//! next request, in every thread.

use super::*;
use crate::auth::keys::KeyRing;
use crate::auth::revocation::RevocationState;
use crate::auth::token::{sign, AccessClaims, TokenRules};
use uuid::Uuid;

struct Fixture {
    _dir: tempfile::TempDir,
    keys: KeyRing,
    auth: Authenticator,
    cache: IdentityCache,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keys, _) = KeyRing::load_or_generate(dir.path()).expect("keys");
    let (ring, _) = KeyRing::load_or_generate(dir.path()).expect("keys again");
    let revocations = RevocationState::new(Duration::from_secs(905), Duration::from_secs(30), Duration::from_secs(5));
    let auth = Authenticator::new(ring, TokenRules::new("gateway", "gateway", 5), revocations);
    Fixture { _dir: dir, keys, auth, cache: IdentityCache::new(1000, Duration::from_secs(5)) }
}

/// A fresh token (issued now, so the never-polled state's staleness rule
/// does not refuse it) and its claims.
fn token(keys: &KeyRing) -> (String, AccessClaims) {
    let claims = crate::auth::token::tests::claims(crate::db::unix_now());
    (sign(keys, &claims).expect("sign"), claims)
}

#[test]
fn a_session_revoked_after_cached_checks_is_refused_at_once() {
    let f = fixture();
    let (t, c) = token(&f.keys);
    // Verified, then found unrevoked from the thread's map, twice over.
    for _ in 0..3 {
        assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).expect("valid").principal.session_id, c.sid);
    }
    f.auth.revocations().revoke_session(c.sid);
    assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).err(), Some(TokenError::Revoked));
    assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).err(), Some(TokenError::Revoked));
}

#[test]
fn a_user_disabled_after_cached_checks_is_refused_at_once() {
    let f = fixture();
    let (t, c) = token(&f.keys);
    f.cache.verify(&f.auth, t.as_bytes()).expect("valid");
    f.cache.verify(&f.auth, t.as_bytes()).expect("valid");
    f.auth.revocations().revoke_user(c.sub, c.iat);
    assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).err(), Some(TokenError::Revoked));
}

#[test]
fn a_token_issued_after_the_users_disable_is_honoured() {
    let f = fixture();
    let (t, c) = token(&f.keys);
    f.auth.revocations().revoke_user(c.sub, c.iat - 6);
    f.cache.verify(&f.auth, t.as_bytes()).expect("issued past the disable and the 5 s skew (then an enable)");
    f.auth.revocations().revoke_user(c.sub, c.iat - 5);
    assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).err(), Some(TokenError::Revoked), "disabled again");
}

#[test]
fn other_revocations_leave_a_token_valid() {
    let f = fixture();
    let (t, _) = token(&f.keys);
    f.cache.verify(&f.auth, t.as_bytes()).expect("valid");
    f.auth.revocations().revoke_session(Uuid::new_v4());
    f.auth.revocations().revoke_user(Uuid::new_v4(), i64::MAX);
    f.cache.verify(&f.auth, t.as_bytes()).expect("still valid after others' revocations");
    f.cache.verify(&f.auth, t.as_bytes()).expect("and after the recheck");
}

/// Each worker thread has its own map: a revocation made on one thread
/// (as a logout on the API's runtime) stops the token on the others.
#[test]
fn a_revocation_reaches_every_threads_map() {
    let f = fixture();
    let (t, c) = token(&f.keys);
    let (f, t) = (&f, &t);
    let warm = move || {
        for _ in 0..2 {
            f.cache.verify(&f.auth, t.as_bytes()).expect("valid");
        }
    };
    let (warmed_tx, warmed_rx) = std::sync::mpsc::channel();
    let (revoked_tx, revoked_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            warm();
            warmed_tx.send(()).expect("send");
            revoked_rx.recv().expect("recv");
            f.cache.verify(&f.auth, t.as_bytes()).err()
        });
        warm();
        warmed_rx.recv().expect("the worker warmed its map");
        s.spawn(|| f.auth.revocations().revoke_session(c.sid)).join().expect("revoking thread");
        revoked_tx.send(()).expect("send");
        assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).err(), Some(TokenError::Revoked));
        assert_eq!(worker.join().expect("worker"), Some(TokenError::Revoked));
    });
}

/// The lookups may be skipped; the staleness rule may not: a state that
/// goes stale without any new revocation still refuses old tokens.
#[test]
fn a_state_gone_stale_refuses_old_tokens_without_new_revocations() {
    let f = fixture();
    let now = crate::db::unix_now();
    let old = AccessClaims { iat: now - 100, ..token(&f.keys).1 };
    let t = sign(&f.keys, &old).expect("sign");
    f.auth.revocations().set_last_poll(now);
    f.cache.verify(&f.auth, t.as_bytes()).expect("fresh state: valid");
    f.cache.verify(&f.auth, t.as_bytes()).expect("fresh state, from the thread's map: valid");
    // Last refreshed 31 s ago, past the 30 s allowed; nothing revoked since.
    f.auth.revocations().set_last_poll(now - 31);
    assert_eq!(f.cache.verify(&f.auth, t.as_bytes()).err(), Some(TokenError::Stale));
}

/// A thread's note that a token was unrevoked belongs to one
/// authenticator's state: another's, with its own revocations, checks for
/// itself even where the change counts happen to match.
#[test]
fn one_authenticators_checks_do_not_vouch_for_another() {
    let f = fixture();
    let (t, c) = token(&f.keys);
    let (ring, _) = KeyRing::load_or_generate(f._dir.path()).expect("keys");
    let revoked = RevocationState::new(Duration::from_secs(905), Duration::from_secs(30), Duration::from_secs(5));
    let other = Authenticator::new(ring, TokenRules::new("gateway", "gateway", 5), revoked);
    f.auth.revocations().revoke_session(Uuid::new_v4());
    f.cache.verify(&f.auth, t.as_bytes()).expect("valid");
    f.cache.verify(&f.auth, t.as_bytes()).expect("valid again");
    // One insertion each: the same change count.
    other.revocations().revoke_session(c.sid);
    assert_eq!(f.cache.verify(&other, t.as_bytes()).err(), Some(TokenError::Revoked));
}

/// Bytes that are not UTF-8 are refused as malformed, not verified.
#[test]
fn a_token_that_is_not_text_is_malformed() {
    let f = fixture();
    assert_eq!(f.cache.verify(&f.auth, b"abc\xff.def.ghi").err(), Some(TokenError::Malformed));
}
