//! The upstream client's TLS: the roots https upstreams are verified
//! against and the certificate the gateway presents to them, read at start
//! and again on reload.
//!
//! Why reloadable: a client certificate for mutual TLS is typically short
//! lived (issued by cert-manager, Vault or a SPIFFE agent for days, not
//! years), and a backend that moves to a new CA needs `ca_file` to follow.
//! Restarting the gateway for either drops every connection. So
//! `upstream.ca_file`, `client_cert` and `client_key` are watched like the
//! listener's pair ([`crate::server::reload`]), and SIGHUP rebuilds the
//! whole configuration, the platform's trust store included (after
//! `update-ca-certificates`).
//!
//! The rules are the listener's: a set that cannot be read, does not parse,
//! does not match, or whose client certificate has already expired or is
//! not valid yet (an hour of slack) is refused, logged and counted, and the
//! running one stays. Handshakes from then on use the new set, and pooled
//! connections made with an older one are not used again; a request
//! already on a connection finishes on it. A reload that reads what the
//! running set was built from (most SIGHUPs are for something else) keeps
//! it, and its pooled connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use tokio_rustls::TlsConnector;

use crate::config::{FileStamp, UpstreamSettings};
use crate::server::tls::{check_validity, publish_expiry};

/// The `cert` label of the client certificate's expiry gauge.
const CLIENT_CERT: &str = "upstream.client_cert";

/// The upstream client's current TLS configuration, shared by every
/// worker's pool and swapped whole on reload.
pub struct UpstreamTls {
    sources: Sources,
    current: ArcSwap<Current>,
    /// The watched files' stamps taken just before the first read, so that
    /// a change landing between that read and the watcher's start is seen.
    loaded: Vec<Option<FileStamp>>,
}

/// One accepted set.
struct Current {
    config: Arc<rustls::ClientConfig>,
    /// The same, offering ALPN `h2` alone, for upstreams spoken to over
    /// HTTP/2.
    h2: Arc<rustls::ClientConfig>,
    /// The client certificate's leaf, to tell a renewal from a set read
    /// again unchanged.
    leaf: Option<CertificateDer<'static>>,
    /// The platform's roots as last read (empty when not trusted).
    platform: Arc<[CertificateDer<'static>]>,
    /// Counts accepted sets: a pooled connection made with an older one is
    /// not reused ([`UpstreamTls::generation`]).
    generation: u64,
    /// What the set was built from (roots, chain, key), hashed: a reload
    /// that reads the same keeps the running set and its pooled
    /// connections (every SIGHUP reloads, most for other reasons).
    digest: [u8; 32],
}

/// A set read from the files, not yet taken.
struct Read {
    config: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    leaf: Option<CertificateDer<'static>>,
    digest: [u8; 32],
}

impl UpstreamTls {
    /// Reads the roots and the client certificate; an error names the
    /// setting at fault. A client certificate already expired is logged,
    /// not refused: the upstreams that ask for it refuse it themselves, and
    /// the others are still served.
    pub fn load(settings: &UpstreamSettings) -> anyhow::Result<Arc<Self>> {
        let sources = Sources {
            platform_roots: settings.platform_roots,
            ca_file: settings.ca_file.clone(),
            client_cert: settings.client_cert.clone(),
        };
        let loaded = sources.files().iter().map(|p| FileStamp::of(p)).collect();
        // At start, what could be read: it only means fewer roots to trust.
        let platform = if sources.platform_roots { platform_roots().0 } else { Arc::from([]) };
        let Read { config, h2, leaf, digest } = sources.read(&platform)?;
        if let Some(leaf) = &leaf {
            if publish_expiry(CLIENT_CERT, leaf).is_some_and(|t| t < SystemTime::now()) {
                tracing::error!(setting = CLIENT_CERT, "upstream.client_cert has expired: upstreams will refuse it");
            }
        }
        let current = Current { config, h2, leaf, platform, generation: 0, digest };
        Ok(Arc::new(Self { sources, current: ArcSwap::from_pointee(current), loaded }))
    }

    /// Reads the files again (and the platform's store when
    /// `platform_store`: on SIGHUP) and uses the set from the next
    /// handshake on; on any error the running set stays. A store that
    /// reports an error while being read (`update-ca-certificates` may be
    /// rewriting it) is not taken: the roots read before stay, and the
    /// files are reloaded all the same.
    pub fn reload(&self, platform_store: bool) -> anyhow::Result<()> {
        let running = self.current.load_full();
        let platform = match platform_store && self.sources.platform_roots {
            true => match platform_roots() {
                (read, None) => read,
                (_, Some(_)) => {
                    tracing::warn!("the platform's trust store could not be read whole: keeping the roots read before");
                    Arc::clone(&running.platform)
                }
            },
            false => Arc::clone(&running.platform),
        };
        let result = self.sources.read(&platform).and_then(|Read { config, h2, leaf, digest }| {
            if digest == running.digest {
                return Ok(false);
            }
            if let Some(leaf) = &leaf {
                // A running certificate read again unchanged is no renewal:
                // expired, it must not hold back a new CA file.
                if running.leaf.as_ref() != Some(leaf) {
                    check_validity(CLIENT_CERT, leaf)?;
                }
                publish_expiry(CLIENT_CERT, leaf);
            }
            let generation = running.generation + 1;
            self.current.store(Arc::new(Current { config, h2, leaf, platform, generation, digest }));
            Ok(true)
        });
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("gateway_tls_reloads_total", "tls" => "upstream", "result" => label).increment(1);
        match &result {
            Ok(true) => tracing::info!("upstream TLS reloaded"),
            Ok(false) => tracing::info!("upstream TLS files unchanged: the running set and its connections stay"),
            Err(e) => tracing::error!(error = format!("{e:#}"), "upstream TLS reload refused; keeping the running one"),
        }
        result.map(|_| ())
    }

    /// A connector for one handshake with the current set, and the set's
    /// generation.
    pub fn connector(&self, http2: bool) -> (TlsConnector, u64) {
        let current = self.current.load();
        let config = if http2 { &current.h2 } else { &current.config };
        (TlsConnector::from(Arc::clone(config)), current.generation)
    }

    /// The current set's generation: a connection made with another one
    /// presented a certificate, or trusted roots, that are no longer ours.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// The files a change of which triggers a reload: `ca_file`, then the
    /// client certificate and its key (the platform's store is read again
    /// on SIGHUP only).
    pub fn files(&self) -> Vec<PathBuf> {
        self.sources.files()
    }

    /// The stamps of [`Self::files`] taken before the first read.
    pub fn loaded_stamps(&self) -> Vec<Option<FileStamp>> {
        self.loaded.clone()
    }
}

/// Where the configuration comes from (`[upstream]`).
struct Sources {
    platform_roots: bool,
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
}

impl Sources {
    fn files(&self) -> Vec<PathBuf> {
        let pair = self.client_cert.iter().flat_map(|(cert, key)| [cert.clone(), key.clone()]);
        self.ca_file.iter().cloned().chain(pair).collect()
    }

    /// A new configuration from `platform` and the files, and the client
    /// certificate's leaf when there is one.
    fn read(&self, platform: &[CertificateDer<'static>]) -> anyhow::Result<Read> {
        // Each input with its length first, so that no two sets hash alike.
        let mut digest = Sha256::new();
        let mut hash = |der: &[u8]| {
            digest.update((der.len() as u64).to_be_bytes());
            digest.update(der);
        };
        platform.iter().for_each(|c| hash(c.as_ref()));
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let (added, ignored) = roots.add_parsable_certificates(platform.iter().cloned());
        if ignored > 0 {
            tracing::warn!(
                added,
                ignored,
                "certificates in the platform's trust store that do not parse are not trusted"
            );
        }
        if let Some(path) = &self.ca_file {
            let name = || format!("upstream.ca_file: {}", path.display());
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("{}: reading", name()))? {
                let cert = cert.with_context(|| format!("{}: parsing", name()))?;
                hash(cert.as_ref());
                roots.add(cert).with_context(|| format!("{}: adding a CA", name()))?;
            }
        }
        let builder = builder()?.with_root_certificates(roots);
        let (mut config, leaf) = match &self.client_cert {
            Some((cert, key)) => {
                let (certs, key) =
                    crate::server::tls::read_pem_pair(cert, key, ["upstream.client_cert", "upstream.client_key"])?;
                // A marker between the roots and the pair, then the pair.
                hash(b"client certificate");
                certs.iter().for_each(|c| hash(c.as_ref()));
                hash(key.secret_der());
                let leaf = certs[0].clone();
                let config = builder
                    .with_client_auth_cert(certs, key)
                    .context("upstream.client_cert and client_key do not match or are unsupported")?;
                (config, Some(leaf))
            }
            None => (builder.with_no_client_auth(), None),
        };
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Read { config: Arc::new(config), h2: Arc::new(h2), leaf, digest: digest.finalize().into() })
    }
}

fn builder() -> anyhow::Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")
}

/// The platform's trust store (where an operator installs a private CA
/// with `update-ca-certificates`), and the errors met reading it, if any
/// (then the certificates are what could be read). Certificates in it that
/// do not parse are left out when the roots are built: fewer roots to trust.
fn platform_roots() -> (Arc<[CertificateDer<'static>]>, Option<String>) {
    let found = rustls_native_certs::load_native_certs();
    tracing::debug!(certificates = found.certs.len(), "platform trust store read for https upstreams");
    let errors = (!found.errors.is_empty()).then(|| {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        errors.join("; ")
    });
    if let Some(error) = &errors {
        tracing::warn!(error, "reading the platform's trust store for https upstreams");
    }
    (Arc::from(found.certs), errors)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::UpstreamTls;
    use crate::config::Config;

    /// A certificate for "gateway" valid from `from` to `until` years from now.
    fn pair(from: i32, until: i32) -> rcgen::CertifiedKey {
        let year = |delta: i32| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
            rcgen::date_time_ymd(1970 + i32::try_from(now.as_secs() / 31_556_952).expect("a year") + delta, 1, 1)
        };
        let mut params = rcgen::CertificateParams::new(vec!["gateway".to_owned()]).expect("certificate parameters");
        (params.not_before, params.not_after) = (year(from), year(until));
        let key_pair = rcgen::KeyPair::generate().expect("a key pair");
        let cert = params.self_signed(&key_pair).expect("a self-signed certificate");
        rcgen::CertifiedKey { cert, key_pair }
    }

    fn write(dir: &Path, c: &rcgen::CertifiedKey) {
        std::fs::write(dir.join("client.pem"), c.cert.pem()).expect("write client.pem");
        std::fs::write(dir.join("client.key"), c.key_pair.serialize_pem()).expect("write client.key");
    }

    /// Whether the running configuration is still `before`.
    fn kept(tls: &UpstreamTls, before: &Arc<rustls::ClientConfig>) -> bool {
        Arc::ptr_eq(&tls.current.load().config, before)
    }

    /// A reload takes a valid new set and refuses, keeping the running one,
    /// a client certificate that has expired or is not valid yet, a pair
    /// that does not match and a CA file that does not parse; the error
    /// names the setting.
    #[test]
    fn a_reload_takes_a_valid_set_and_keeps_the_running_one_otherwise() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = rcgen::generate_simple_self_signed(vec!["upstream".to_owned()]).expect("a CA");
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca.pem");
        write(dir.path(), &pair(-1, 1));
        let text = "[upstream]\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n\
                    platform_roots = false";
        let settings = Config::parse(text, &dir.path().join("gateway.toml")).expect("valid settings").upstream;
        let tls = UpstreamTls::load(&settings).expect("a valid set");
        let names: Vec<_> = tls.files().iter().map(|p| p.file_name().expect("a name").to_owned()).collect();
        assert_eq!(names, ["ca.pem", "client.pem", "client.key"]);
        assert_eq!(tls.loaded_stamps().iter().filter(|s| s.is_some()).count(), 3);

        // Read again unchanged (as on every SIGHUP): the running set, and
        // so its pooled connections, stay.
        let before = Arc::clone(&tls.current.load().config);
        tls.reload(false).expect("the same files");
        assert!(kept(&tls, &before), "an unchanged set was swapped in");
        assert_eq!(tls.generation(), 0);
        write(dir.path(), &pair(-1, 2));
        tls.reload(false).expect("a renewal");
        assert!(!kept(&tls, &before), "the renewal is not in use");

        let before = Arc::clone(&tls.current.load().config);
        for (case, says, change) in [
            ("expired", "the new certificate expired at", &(|d: &Path| write(d, &pair(-3, -1))) as &dyn Fn(&Path)),
            ("not valid yet", "valid only from", &|d: &Path| write(d, &pair(1, 3))),
            ("mismatched", "do not match", &|d: &Path| {
                std::fs::write(d.join("client.pem"), pair(-1, 1).cert.pem()).expect("write client.pem");
            }),
            ("broken CA file", "upstream.ca_file", &|d: &Path| {
                write(d, &pair(-1, 1));
                std::fs::write(d.join("ca.pem"), "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
                    .expect("write ca.pem");
            }),
        ] {
            change(dir.path());
            let err = tls.reload(false).err().unwrap_or_else(|| panic!("{case}: taken"));
            assert!(format!("{err:#}").contains(says), "{case}: {err:#}");
            assert!(kept(&tls, &before), "{case}: the running set was replaced");
        }
        assert_eq!(tls.generation(), 1, "only the renewal was a new set");
    }

    /// A running client certificate that has expired (upstreams refuse it;
    /// it was logged at start) does not hold back a new CA file: read again
    /// unchanged, it is no renewal. A different expired one still is.
    #[test]
    fn an_expired_running_certificate_does_not_hold_back_other_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = |name: &str| {
            let ca = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("a CA");
            std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca.pem");
        };
        ca("one");
        write(dir.path(), &pair(-3, -1));
        let text = "[upstream]\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n\
                    platform_roots = false";
        let settings = Config::parse(text, &dir.path().join("gateway.toml")).expect("valid settings").upstream;
        let tls = UpstreamTls::load(&settings).expect("an expired certificate is logged at start, not refused");
        let (_, generation) = tls.connector(false);
        assert_eq!(generation, 0);
        ca("two");
        tls.reload(false).expect("a new CA file beside the running certificate");
        assert_eq!(tls.generation(), 1);
        write(dir.path(), &pair(-3, -1));
        let err = tls.reload(false).expect_err("another expired certificate is refused");
        assert!(format!("{err:#}").contains("expired"), "{err:#}");
        assert_eq!(tls.generation(), 1);
    }
}
