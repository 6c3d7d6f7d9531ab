//! TLS termination with rustls: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`.
//!
//! The certificate and key are read at start and again on reload
//! ([`ServerCert::reload`]: SIGHUP, or a change of either file, see
//! [`super::reload`]), so that a renewed certificate is served without a
//! restart: handshakes take whatever pair is current, connections already
//! open keep theirs. A pair that cannot be read, does not parse or does not
//! match is refused and the running one stays, so a renewal caught halfway
//! (a new certificate, the old key) is retried once the key is written too.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The listener's certificate chain and key, swapped whole on reload.
#[derive(Debug)]
pub struct ServerCert {
    files: TlsConfig,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
}

impl ServerCert {
    /// Reads the pair named by `server.tls`; an error names the file at fault.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = read_pair(files, &provider)?;
        Ok(Arc::new(Self { files: files.clone(), provider, current: ArcSwap::from_pointee(pair) }))
    }

    /// Reads the pair again and serves it from the next handshake on; on
    /// any error the running pair stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let result = read_pair(&self.files, &self.provider).map(|pair| self.current.store(Arc::new(pair)));
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("gateway_tls_reloads_total", "result" => label).increment(1);
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

    /// The end-entity certificate being served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
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

fn read_pair(files: &TlsConfig, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let certs = load_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("server.tls.key: reading a private key from {}", files.key.display()))?;
    CertifiedKey::from_der(certs, key, provider)
        .context("server.tls: the certificate and key do not match or are unsupported")
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("server.tls.cert: reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert: parsing {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "server.tls.cert: no certificate in {}", path.display());
    Ok(certs)
}
