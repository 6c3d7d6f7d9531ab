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
//! [`read_pem_pair`] also reads the upstream client's certificate
//! (`upstream.client_cert`, for mutual TLS).

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
        Ok(Arc::new(Self { files: files.clone(), provider, current: ArcSwap::from_pointee(pair), loaded }))
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
