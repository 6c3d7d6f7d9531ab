//! The upstream HTTP client: pooled keep-alive connections, TCP_NODELAY, a
//! connect timeout, and rustls for https upstreams.
//!
//! Pitfalls of hyper-util's legacy client handled here: TCP_NODELAY is off by
//! default on its connector (costly for small request/response pairs); the
//! pool's idle timeout does nothing without a pool timer; and the idle
//! timeout must be shorter than the upstream's own keep-alive, or the
//! gateway will reuse connections the upstream is about to close.

use std::sync::Arc;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use crate::body::Body;
use crate::config::UpstreamSettings;

/// A cheap-to-clone handle on the shared connection pool.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

impl UpstreamClient {
    pub fn new(settings: &UpstreamSettings) -> anyhow::Result<Self> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.enforce_http(false);

        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &settings.ca_file {
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
                roots.add(cert).with_context(|| format!("adding a CA from {}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .build(https);
        Ok(Self { client })
    }

    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(request).await
    }
}
