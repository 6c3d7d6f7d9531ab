//! Time-based one-time passwords (RFC 6238), the second factor a user may
//! add to the password: HMAC-SHA-1, 6 digits, 30-second steps, which is
//! what every authenticator app reads from an `otpauth://` URI.
//!
//! Written here on the `hmac` and `sha1` crates rather than taken from a
//! TOTP crate: the algorithm is a dozen lines, those crates are already in
//! the tree, and the RFC's own test vectors check it (below). What is ours
//! is the policy around it:
//! - a code is accepted for the step it was made for and the steps either
//!   side (clocks drift, people type slowly), compared in constant time;
//! - a step, once accepted, is spent: the store keeps the last accepted
//!   step per user and takes a code only for a later one, in one
//!   conditional update, so a code seen over a shoulder or replayed to
//!   another replica is refused;
//! - secrets are 160 random bits (RFC 4226's recommended length);
//! - confirming a factor also gives ten single-use recovery codes (50
//!   random bits each, shown once, stored as SHA-256 hashes of the user's
//!   id and the code, so that a copy of the table cannot be guessed at for
//!   every user at once) for a user who loses the device: one stands in for
//!   a code at one login.

use data_encoding::{BASE32_NOPAD, HEXLOWER};
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Seconds per step.
pub const STEP: i64 = 30;
const DIGITS: u32 = 6;

/// A new secret, base32 without padding (as authenticator apps take it).
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 20];
    getrandom::getrandom(&mut bytes)?;
    Ok(BASE32_NOPAD.encode(&bytes))
}

/// The step `unix` seconds fall in.
pub fn step_at(unix: i64) -> i64 {
    unix.div_euclid(STEP)
}

/// The code for `step`, or `None` for a secret that is not base32.
pub fn code(secret: &str, step: i64) -> Option<String> {
    let key = BASE32_NOPAD.decode(secret.as_bytes()).ok()?;
    let mut mac = Hmac::<Sha1>::new_from_slice(&key).ok()?;
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    // Dynamic truncation (RFC 4226 §5.3).
    let offset = usize::from(digest.last()? & 0x0f);
    let window: [u8; 4] = digest.get(offset..offset + 4)?.try_into().ok()?;
    let value = u32::from_be_bytes(window) & 0x7fff_ffff;
    Some(format!("{:0width$}", value % 10_u32.pow(DIGITS), width = DIGITS as usize))
}

/// The step whose code `given` is, among the step of `now` and one either
/// side; `None` when it is none of them (or not six digits). Every
/// candidate is compared, in constant time.
pub fn matching_step(secret: &str, given: &str, now: i64) -> Option<i64> {
    if given.len() != DIGITS as usize || !given.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = step_at(now);
    let mut found = None;
    for step in [current - 1, current, current + 1] {
        let expected = code(secret, step)?;
        if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// How many recovery codes a confirmed factor comes with.
pub const RECOVERY_CODES: usize = 10;

/// New recovery codes (`xxxxx-xxxxx`, lower-case base32) for the user
/// `user` (its id's bytes) and what the store keeps of them: their hashes,
/// space-separated.
pub fn generate_recovery_codes(user: &[u8]) -> Result<(Vec<String>, String), getrandom::Error> {
    let mut codes = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        let mut bytes = [0u8; 7];
        getrandom::getrandom(&mut bytes)?;
        let text = BASE32_NOPAD.encode(&bytes).to_ascii_lowercase();
        codes.push(format!("{}-{}", &text[..5], &text[5..10]));
    }
    let hashes: Vec<String> = codes.iter().map(|c| recovery_hash(user, c)).collect();
    Ok((codes, hashes.join(" ")))
}

/// The stored form of a recovery code as a user may type it (any case,
/// with or without the dash and spaces).
fn recovery_hash(user: &[u8], given: &str) -> String {
    let plain: String = given.chars().filter(|c| !matches!(c, '-' | ' ')).map(|c| c.to_ascii_lowercase()).collect();
    HEXLOWER.encode(&Sha256::new().chain_update(user).chain_update(plain.as_bytes()).finalize())
}

/// Whether `given` looks like a recovery code rather than a six-digit one.
pub fn is_recovery_code(given: &str) -> bool {
    let plain = given.chars().filter(|c| !matches!(c, '-' | ' ')).count();
    plain == 10 && given.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ' '))
}

/// `stored` (space-separated hashes of `user`'s codes) without the
/// recovery code `given`, when it is one of them (each compared in constant
/// time); `None` when it is not.
pub fn without_recovery_code(stored: &str, user: &[u8], given: &str) -> Option<String> {
    let hash = recovery_hash(user, given);
    let mut found = false;
    let mut rest = Vec::new();
    for h in stored.split_whitespace() {
        if bool::from(h.as_bytes().ct_eq(hash.as_bytes())) && !found {
            found = true;
        } else {
            rest.push(h);
        }
    }
    found.then(|| rest.join(" "))
}

/// The `otpauth://` URI an authenticator app scans (as a QR code) or
/// takes pasted: the account labelled `issuer:email`. The issuer is the
/// tokens' `iss` without a scheme, and with no colon (the format splits
/// the label at the first one, encoded or not).
pub fn otpauth_uri(issuer: &str, email: &str, secret: &str) -> String {
    let bare = issuer.split_once("://").map_or(issuer, |(_, rest)| rest).trim_end_matches('/');
    let issuer = bare.replace(':', "-");
    let label = format!("{}:{}", encode(&issuer), encode(email));
    format!(
        "otpauth://totp/{label}?secret={secret}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP}",
        encode(&issuer)
    )
}

/// Everything but RFC 3986's unreserved characters.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1: the secret "12345678901234567890"; the
    /// RFC prints eight digits, of which a six-digit code is the last six.
    #[test]
    fn rfc_6238_test_vectors() {
        let secret = BASE32_NOPAD.encode(b"12345678901234567890");
        for (time, eight) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            assert_eq!(code(&secret, step_at(time)).as_deref(), Some(&eight[2..]), "T = {time}");
        }
    }

    #[test]
    fn a_code_matches_its_step_and_the_neighbours_only() {
        let secret = generate_secret().expect("random bytes");
        assert_eq!(secret.len(), 32, "160 bits in base32");
        let now = 1_700_000_015;
        let step = step_at(now);
        for (offset, matches) in [(-2, false), (-1, true), (0, true), (1, true), (2, false)] {
            let given = code(&secret, step + offset).expect("a code");
            let want = matches.then_some(step + offset);
            assert_eq!(matching_step(&secret, &given, now), want, "offset {offset}");
        }
        for bad in ["", "12345", "1234567", "12345a", " 123456"] {
            assert_eq!(matching_step(&secret, bad, now), None, "{bad:?}");
        }
        assert_eq!(code("not base32!", step), None);
    }

    #[test]
    fn recovery_codes_are_taken_once_in_any_spelling() {
        let (codes, stored) = generate_recovery_codes(b"user one").expect("random bytes");
        assert_eq!(codes.len(), RECOVERY_CODES);
        assert!(codes.iter().all(|c| c.len() == 11 && is_recovery_code(c)), "{codes:?}");
        assert!(!stored.contains(&codes[0]), "stored in the clear");
        let typed = codes[3].to_ascii_uppercase().replace('-', " ");
        let rest = without_recovery_code(&stored, b"user one", &typed).expect("the code, as typed");
        assert_eq!(rest.split_whitespace().count(), RECOVERY_CODES - 1);
        assert_eq!(without_recovery_code(&rest, b"user one", &codes[3]), None, "taken twice");
        assert!(without_recovery_code(&rest, b"user one", &codes[4]).is_some());
        // The hashes are the user's own: the same code names nothing for another.
        assert_eq!(without_recovery_code(&stored, b"user two", &codes[4]), None);
        assert!(!is_recovery_code("123456") && !is_recovery_code("abcde-fghi!"));
    }

    #[test]
    fn the_uri_names_issuer_and_account() {
        let uri = otpauth_uri("gateway", "a+b@example.com", "JBSWY3DPEHPK3PXP");
        assert_eq!(
            uri,
            "otpauth://totp/gateway:a%2Bb%40example.com?secret=JBSWY3DPEHPK3PXP&issuer=gateway\
             &algorithm=SHA1&digits=6&period=30"
        );
        let uri = otpauth_uri("https://auth.example.com:8443/", "a@b.c", "JBSWY3DPEHPK3PXP");
        assert!(uri.starts_with("otpauth://totp/auth.example.com-8443:a%40b.c?"), "{uri}");
        assert!(uri.contains("&issuer=auth.example.com-8443&"), "{uri}");
    }
}
