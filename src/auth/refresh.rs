//! Opaque refresh tokens: 256 bits from the OS CSPRNG, base64url.
//!
//! Only the SHA-256 of a token is stored, so a database dump yields nothing
//! usable. Lookups are by that hash: an attacker cannot steer the hash of a
//! guess, so the equality test in the database leaks nothing useful through
//! timing, and a guess of 256 random bits is hopeless anyway.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// A new token and the hash to store.
pub fn generate() -> Result<(String, [u8; 32]), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash(&token);
    Ok((token, hash))
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_43_chars_unique_and_hash_stably() {
        let (a, ha) = super::generate().expect("rng");
        let (b, hb) = super::generate().expect("rng");
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(super::hash(&a), ha);
    }
}
