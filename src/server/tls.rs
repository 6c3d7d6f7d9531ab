//! TLS termination with rustls: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`.
//!
//! The certificate and key are read at start and again on reload
//! ([`ServerCert::reload`]: SIGHUP, or a change of either file, see
//! [`super::reload`]), so that a renewed certificate is served without a
//! restart: handshakes take whatever pair is current, connections already
//! open keep theirs. A pair that cannot be read, does not parse or does not
//! match is refused and the running one stays, so a renewal caught halfway
//! (a new certificate, the old key) is retried once the key is written too.
//!
//! [`read_pem_pair`], [`check_validity`] and [`publish_expiry`] also serve
//! the upstream client's certificate (`upstream.client_cert`, for mutual
//! TLS; [`crate::proxy::upstream::tls`]).
//!
//! Expiry: each certificate in use publishes its leaf's `notAfter` as
//! `gateway_tls_certificate_expiry_timestamp_seconds{cert}` (the setting
//! that names it), for an alert well before the date; one already expired
//! is logged at start, and a renewal that has already expired, or is not
//! valid yet (an hour of slack), is refused and the running one stays.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{FileStamp, TlsConfig};

/// The listener's certificate chain and key, swapped whole on reload.
#[derive(Debug)]
pub struct ServerCert {
    files: TlsConfig,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The files' stamps taken just before they were first read, so that a
    /// renewal landing between that read and the watcher's start is seen.
    loaded: (Option<FileStamp>, Option<FileStamp>),
}

impl ServerCert {
    /// Reads the pair named by `server.tls`; an error names the file at fault.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = (FileStamp::of(&files.cert), FileStamp::of(&files.key));
        let pair = read_pair(files, &provider)?;
        let not_after = publish_expiry(LISTENER, &pair.cert[0]);
        if not_after.is_some_and(|t| t < SystemTime::now()) {
            tracing::error!(cert = %files.cert.display(), "server.tls.cert has expired: clients will refuse it");
        }
        Ok(Arc::new(Self { files: files.clone(), provider, current: ArcSwap::from_pointee(pair), loaded }))
    }

    /// Reads the pair again and serves it from the next handshake on; on
    /// any error the running pair stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let result = read_pair(&self.files, &self.provider).and_then(|pair| {
            check_validity(LISTENER, &pair.cert[0])?;
            publish_expiry(LISTENER, &pair.cert[0]);
            self.current.store(Arc::new(pair));
            Ok(())
        });
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("gateway_tls_reloads_total", "tls" => "listener", "result" => label).increment(1);
        match &result {
            Ok(()) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "TLS certificate reload refused; keeping the running one");
            }
        }
        result
    }

    /// The two files, for the reloader to watch.
    pub fn files(&self) -> &TlsConfig {
        &self.files
    }

    /// The stamps of the certificate and key files taken before the first read.
    pub fn loaded_stamps(&self) -> (Option<FileStamp>, Option<FileStamp>) {
        self.loaded
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The acceptor for the public listener, serving `cert`'s current pair.
pub fn acceptor(cert: Arc<ServerCert>) -> anyhow::Result<TlsAcceptor> {
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&cert.provider))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The `cert` label of the listener's certificate.
const LISTENER: &str = "server.tls.cert";

/// How far in the future a renewal's `notBefore` may be (clocks differ):
/// past it, clients would refuse the certificate, so the running one stays.
const NOT_BEFORE_SLACK: std::time::Duration = std::time::Duration::from_secs(3600);

/// When `leaf` starts and stops being valid (`notBefore`, `notAfter`).
fn validity(leaf: &CertificateDer<'_>) -> anyhow::Result<(SystemTime, SystemTime)> {
    use x509_cert::der::Decode as _;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref()).context("not an X.509 certificate")?;
    let v = cert.tbs_certificate.validity;
    Ok((
        SystemTime::UNIX_EPOCH + v.not_before.to_unix_duration(),
        SystemTime::UNIX_EPOCH + v.not_after.to_unix_duration(),
    ))
}

/// Refuses a renewal (`leaf`, for the setting `cert`) that has already
/// expired or is not valid yet: its peers would refuse it, so the running
/// one must stay. A date x509-cert cannot read (it is stricter than rustls)
/// is no reason to refuse what rustls took, as at start.
pub(crate) fn check_validity(cert: &str, leaf: &CertificateDer<'_>) -> anyhow::Result<()> {
    if let Ok((not_before, not_after)) = validity(leaf) {
        let now = SystemTime::now();
        anyhow::ensure!(
            not_after > now,
            "{cert}: the new certificate expired at {}",
            humantime::format_rfc3339_seconds(not_after)
        );
        anyhow::ensure!(
            not_before <= now + NOT_BEFORE_SLACK,
            "{cert}: the new certificate is valid only from {}",
            humantime::format_rfc3339_seconds(not_before)
        );
    }
    Ok(())
}

/// Publishes `leaf`'s expiry under `cert` (the setting naming the file);
/// a date that cannot be read is logged, not fatal: rustls took the
/// certificate, and its peers check the date themselves.
pub(crate) fn publish_expiry(cert: &'static str, leaf: &CertificateDer<'_>) -> Option<SystemTime> {
    match validity(leaf).map(|(_, not_after)| not_after) {
        Ok(t) => {
            let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!("gateway_tls_certificate_expiry_timestamp_seconds", "cert" => cert).set(secs);
            Some(t)
        }
        Err(e) => {
            tracing::warn!(cert, error = format!("{e:#}"), "cannot read the certificate's expiry date");
            None
        }
    }
}

fn read_pair(files: &TlsConfig, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let (certs, key) = read_pem_pair(&files.cert, &files.key, ["server.tls.cert", "server.tls.key"])?;
    CertifiedKey::from_der(certs, key, provider)
        .context("server.tls: the certificate and key do not match or are unsupported")
}

/// A certificate chain and a private key from PEM files; errors name the
/// file and its setting (`names`: the certificate's, then the key's).
pub(crate) fn read_pem_pair(
    cert: &Path,
    key: &Path,
    [cert_name, key_name]: [&str; 2],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{cert_name}: reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{cert_name}: parsing {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{cert_name}: no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{key_name}: reading a private key from {}", key.display()))?;
    Ok((certs, key))
}
