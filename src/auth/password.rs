//! Password hashing: Argon2id with PHC strings.
//!
//! Hashing is deliberately slow (tens of milliseconds, 19 MiB), so it runs on
//! tokio's blocking pool behind a semaphore sized to the cores: a login storm
//! queues here instead of starving the threads that serve other requests.
//! Unknown users are checked against a dummy hash made with the same
//! parameters, so "no such user" costs the same time as "wrong password".

use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::SaltString;
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::config::Argon2Config;

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Wrong,
    /// Right; `rehash` carries a new hash when the stored one used older parameters.
    Right {
        rehash: Option<String>,
    },
}

#[derive(Clone)]
pub struct PasswordHasher {
    inner: Arc<Inner>,
}

struct Inner {
    argon: Argon2<'static>,
    params: Params,
    permits: Semaphore,
    dummy_hash: String,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher").field("params", &self.inner.params).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("invalid argon2 parameters: {0}")]
    Params(String),
    #[error("hashing failed: {0}")]
    Hash(String),
}

impl PasswordHasher {
    pub fn new(config: Argon2Config) -> Result<Self, PasswordError> {
        let params = Params::new(config.memory_kib, config.iterations, config.parallelism, None)
            .map_err(|e| PasswordError::Params(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(2);
        let dummy_hash = hash_with(&argon, "dummy password never matched by anyone")?;
        Ok(Self { inner: Arc::new(Inner { argon, params, permits: Semaphore::new(cores), dummy_hash }) })
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: &SecretString) -> Result<String, PasswordError> {
        let password = password.clone();
        self.blocking(move |inner| hash_with(&inner.argon, password.expose_secret())).await
    }

    /// Checks `password` against `stored` (a PHC string), or against the dummy
    /// hash when `stored` is `None`, which always answers `Wrong`.
    pub async fn verify(&self, password: &SecretString, stored: Option<&str>) -> Result<Verdict, PasswordError> {
        let password = password.clone();
        let stored = stored.map(str::to_owned);
        self.blocking(move |inner| {
            let is_dummy = stored.is_none();
            let phc = stored.as_deref().unwrap_or(&inner.dummy_hash);
            let Ok(parsed) = PasswordHash::new(phc) else {
                return Ok(Verdict::Wrong);
            };
            let ok = inner.argon.verify_password(password.expose_secret().as_bytes(), &parsed).is_ok();
            if !ok || is_dummy {
                return Ok(Verdict::Wrong);
            }
            let current = parsed.algorithm.as_str() == "argon2id"
                && Params::try_from(&parsed).is_ok_and(|p| {
                    (p.m_cost(), p.t_cost(), p.p_cost())
                        == (inner.params.m_cost(), inner.params.t_cost(), inner.params.p_cost())
                });
            let rehash = if current { None } else { Some(hash_with(&inner.argon, password.expose_secret())?) };
            Ok(Verdict::Right { rehash })
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, PasswordError> + Send + 'static,
    ) -> Result<T, PasswordError> {
        let _permit = self.inner.permits.acquire().await.map_err(|e| PasswordError::Hash(e.to_string()))?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner)).await.map_err(|e| PasswordError::Hash(e.to_string()))?
    }
}

fn hash_with(argon: &Argon2<'_>, password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Config {
        Argon2Config { memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    #[tokio::test]
    async fn right_wrong_and_dummy() {
        let h = PasswordHasher::new(cheap()).expect("params");
        let pw = SecretString::from("correct horse battery staple");
        let phc = h.hash(&pw).await.expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert_eq!(h.verify(&pw, Some(&phc)).await.expect("verify"), Verdict::Right { rehash: None });
        let wrong = SecretString::from("incorrect horse battery staple");
        assert_eq!(h.verify(&wrong, Some(&phc)).await.expect("verify"), Verdict::Wrong);
        // The dummy path never matches, whatever is typed.
        assert_eq!(h.verify(&pw, None).await.expect("verify"), Verdict::Wrong);
        assert_eq!(h.verify(&pw, Some("not a phc string")).await.expect("verify"), Verdict::Wrong);
    }

    #[tokio::test]
    async fn changed_parameters_ask_for_a_rehash() {
        let old = PasswordHasher::new(cheap()).expect("params");
        let pw = SecretString::from("correct horse battery staple");
        let phc = old.hash(&pw).await.expect("hash");
        let new = PasswordHasher::new(Argon2Config { memory_kib: 128, iterations: 2, parallelism: 1 }).expect("params");
        match new.verify(&pw, Some(&phc)).await.expect("verify") {
            Verdict::Right { rehash: Some(h) } => assert!(h.contains("m=128,t=2,p=1"), "{h}"),
            other => panic!("expected a rehash, got {other:?}"),
        }
    }
}
