//! Signed deliveries to the operator's mailer: how a mailed link (a
//! password reset, an email verification or change, a sign-in link) or a
//! security notice leaves the gateway.
//!
//! The gateway sends no mail itself (templates, SMTP, bounces and sender
//! reputation are a mailer's job); it POSTs the link's token to
//! `auth.mailer.webhook`, and the service there writes the mail.
//! The format is Standard Webhooks (<https://www.standardwebhooks.com/>, as
//! Supabase's auth hooks and Svix send), so a receiver verifies it with any
//! of that specification's libraries:
//!
//! - body: `{"type": "...", "timestamp": "<RFC 3339>", "data": {...}}`;
//! - `webhook-id` (the same on every attempt of one delivery, so that the
//!   receiver can drop a repeat), `webhook-timestamp` (unix seconds), and
//!   `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`
//!   with the key of `webhook_secret_file` (`whsec_` + base64).
//!
//! An answer other than 2xx, or no answer, is tried again twice, one and
//! four seconds later; each attempt is bounded by [`ATTEMPT_TIMEOUT`] and
//! signed with its own timestamp (a receiver refuses old ones). What still
//! fails is kept and tried later by [`crate::auth::outbox`]. The
//! body carries a live credential: it is never logged, and errors name the
//! URL's origin only (its path or query may hold the mailer's own key).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac as _};
use http_body_util::{BodyExt as _, Full};
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use sha2::Sha256;

use crate::config::{WebhookConfig, WebhookUrl};
use crate::proxy::upstream::tls::UpstreamTls;

/// The longest one attempt (connect, TLS, request, answer head) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pauses before the second and third attempts.
const RETRY_DELAYS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(4)];

/// How many attempts [`Webhook::deliver`] makes.
pub const ATTEMPTS: usize = RETRY_DELAYS.len() + 1;

/// Where and how deliveries are sent.
pub struct Webhook {
    url: WebhookUrl,
    key: Vec<u8>,
    /// The upstream client's roots, CA file and client certificate: the
    /// mailer is a backend service like the upstreams.
    tls: Arc<UpstreamTls>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url.to_string()).finish_non_exhaustive()
    }
}

impl Webhook {
    /// Reads the secret file; an error names the setting.
    pub fn load(config: &WebhookConfig, tls: Arc<UpstreamTls>, connect_timeout: Duration) -> anyhow::Result<Self> {
        let path = &config.secret_file;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("auth.mailer.webhook_secret_file: reading {}", path.display()))?;
        let key = parse_secret(text.trim())
            .map_err(|e| anyhow::anyhow!("auth.mailer.webhook_secret_file ({}): {e}", path.display()))?;
        Ok(Self { url: config.url.clone(), key, tls, connect_timeout })
    }

    /// Delivers one event, `body` (see [`event`]), as `id` (attempts and
    /// pauses as the module docs say); returns how many attempts it took,
    /// or the last failure.
    pub async fn deliver(&self, id: &str, body: &Bytes) -> anyhow::Result<usize> {
        let mut last = None;
        for attempt in 0..=RETRY_DELAYS.len() {
            if attempt > 0 {
                tokio::time::sleep(RETRY_DELAYS[attempt - 1]).await;
            }
            match self.attempt(id, body).await {
                Ok(()) => return Ok(attempt + 1),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt was made")))
    }

    /// One attempt at delivering `body` as `id`, signed now, within
    /// [`ATTEMPT_TIMEOUT`]; a failure is logged (the origin only).
    pub async fn attempt(&self, id: &str, body: &Bytes) -> anyhow::Result<()> {
        let now = crate::db::unix_now();
        let signature = sign(&self.key, id, now, body);
        let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, self.post(id, now, &signature, body.clone())).await;
        let sent = sent.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {ATTEMPT_TIMEOUT:?}")));
        if let Err(e) = &sent {
            tracing::warn!(webhook = %self.url, webhook_id = id, error = format!("{e:#}"), "webhook delivery failed");
        }
        sent
    }

    /// One attempt: a new connection, one request, the answer's status.
    async fn post(&self, id: &str, timestamp: i64, signature: &str, body: Bytes) -> anyhow::Result<()> {
        let host = self.url.authority.host();
        let port = self.url.authority.port_u16().unwrap_or(if self.url.https { 443 } else { 80 });
        let tcp = crate::proxy::upstream::connect_tcp(host, port, self.connect_timeout)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        tcp.set_nodelay(true)?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.path_and_query.as_str())
            .header(HOST, self.url.host.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("gateway/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(body))?;
        let status = if self.url.https {
            let name = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(name.to_owned()).context("the webhook's host is not a TLS server name")?;
            let (connector, _) = self.tls.connector(false);
            let tls = connector.connect(name, tcp).await.with_context(|| format!("TLS with {}", self.url))?;
            send(TokioIo::new(tls), request).await?
        } else {
            send(TokioIo::new(tcp), request).await?
        };
        if !status.is_success() {
            bail!("{} answered {status}", self.url);
        }
        Ok(())
    }
}

/// Sends `request` over a new HTTP/1.1 connection and reads the answer
/// whole (a mailer's answer is short; reading it lets the connection end
/// cleanly).
async fn send<T>(io: T, request: Request<Full<Bytes>>) -> anyhow::Result<hyper::StatusCode>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(connection);
    let answer = sender.send_request(request).await;
    let result = match answer {
        Ok(response) => {
            let status = response.status();
            let _ = http_body_util::Limited::new(response.into_body(), 64 << 10).collect().await;
            Ok(status)
        }
        Err(e) => Err(anyhow::Error::new(e).context("sending the request")),
    };
    drop(sender);
    driver.abort();
    result
}

/// The body of an event of type `kind` made at `now`.
pub fn event(kind: &str, data: &serde_json::Value, now: i64) -> anyhow::Result<Bytes> {
    let event = serde_json::json!({
        "type": kind,
        "timestamp": crate::auth::service::rfc3339(now),
        "data": data,
    });
    Ok(Bytes::from(serde_json::to_vec(&event)?))
}

/// The key of a Standard Webhooks secret: `whsec_` and the base64 of 24
/// to 64 random bytes (`echo "whsec_$(openssl rand -base64 32)"`).
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    let encoded = text.strip_prefix("whsec_").ok_or("the secret must start with whsec_ (then base64)")?;
    let key = STANDARD.decode(encoded).map_err(|_| "the text after whsec_ is not base64".to_owned())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("the key is {} bytes; 24 to 64 are expected (32 random bytes, base64)", key.len()));
    }
    Ok(key)
}

/// `v1,` and the base64 of HMAC-SHA256(`key`, `"<id>.<timestamp>.<body>"`).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::{parse_secret, sign};

    /// The test vector the Standard Webhooks specification publishes.
    #[test]
    fn signs_as_the_standard_webhooks_vector() {
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("the vector's secret");
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_without_the_prefix_or_of_a_wrong_size_are_refused() {
        assert!(parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect_err("refused").contains("whsec_"));
        assert!(parse_secret("whsec_not base64!").expect_err("refused").contains("base64"));
        assert!(parse_secret("whsec_c2hvcnQ=").expect_err("refused").contains("5 bytes"));
    }
}
