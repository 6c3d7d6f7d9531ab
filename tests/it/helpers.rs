//! Shared harness: one gateway per test, in its own temp dir, on ephemeral ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::SigningKey;
use gateway::app::App;
use gateway::cli::Cli;
use gateway::config::Config;
use reqwest::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Client, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A password that satisfies `password_min_length = 15`.
pub const PASSWORD: &str = "correct horse battery staple";
/// A second valid password, distinct from [`PASSWORD`].
pub const OTHER_PASSWORD: &str = "purple monkey dishwasher sunrise";
/// A long-enough password that is never anybody's password.
pub const WRONG_PASSWORD: &str = "definitely not the password";

/// Knobs of the generated `gateway.toml`.
#[derive(Debug, Clone, Copy)]
pub struct TestOptions {
    pub registration: bool,
    pub access_token_ttl: &'static str,
    pub refresh_token_ttl: &'static str,
    pub leeway: &'static str,
    pub lockout_threshold: u32,
    pub lockout_duration: &'static str,
    pub rate_limit_per_minute: u32,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            registration: false,
            access_token_ttl: "15m",
            refresh_token_ttl: "30d",
            leeway: "5s",
            lockout_threshold: 5,
            lockout_duration: "15m",
            rate_limit_per_minute: 10_000,
        }
    }
}

/// The token pair returned by `/auth/login`, `/auth/refresh`.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
    pub refresh_expires_in: u64,
}

/// Text of a complete, valid `gateway.toml` for `opts`.
pub fn config_toml(opts: TestOptions) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[database]
url = "sqlite://gateway.db"

[auth]
issuer = "gateway"
audience = "gateway"
access_token_ttl = "{access_token_ttl}"
refresh_token_ttl = "{refresh_token_ttl}"
leeway = "{leeway}"
keys_dir = "keys"
registration = {registration}
password_min_length = 15
lockout_threshold = {lockout_threshold}
lockout_duration = "{lockout_duration}"
revocation_poll = "100ms"
rate_limit_per_minute = {rate_limit_per_minute}

[auth.argon2]
memory_kib = 1024
iterations = 1
parallelism = 1
"#,
        access_token_ttl = opts.access_token_ttl,
        refresh_token_ttl = opts.refresh_token_ttl,
        leeway = opts.leeway,
        registration = opts.registration,
        lockout_threshold = opts.lockout_threshold,
        lockout_duration = opts.lockout_duration,
        rate_limit_per_minute = opts.rate_limit_per_minute,
    )
}

/// Writes `<dir>/gateway.toml` and returns its path.
pub fn write_config(dir: &Path, opts: TestOptions) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_toml(opts)).expect("write gateway.toml");
    path
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

pub async fn spawn_app_with(opts: TestOptions) -> TestApp {
    let dir = tempfile::tempdir().expect("create temp dir");
    let config_path = write_config(dir.path(), opts);
    start(dir, config_path).await
}

async fn start(dir: TempDir, config_path: PathBuf) -> TestApp {
    let config = Config::load(&config_path).unwrap_or_else(|e| panic!("test config must load: {e}"));
    // Boxed: the build future may be large (clippy::large_futures).
    let app = Box::pin(App::build(config)).await.unwrap_or_else(|e| panic!("App::build failed: {e:#}"));
    let addr = app.public_addr();
    let admin_addr = app.admin_addr();
    let (shutdown, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(async move {
        // Either an explicit stop or the sender being dropped ends the app.
        let _ = rx.await;
    }));
    let client = Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client");
    TestApp { dir, config_path, addr, admin_addr, client, shutdown, handle }
}

async fn shut_down(client: Client, shutdown: oneshot::Sender<()>, handle: JoinHandle<anyhow::Result<()>>) {
    // Close our pooled keep-alive connections first so the drain has nothing to wait for.
    drop(client);
    // An Err here means run() already returned; its result is checked below.
    let _ = shutdown.send(());
    let joined =
        tokio::time::timeout(Duration::from_secs(10), handle).await.expect("graceful shutdown finished within 10 s");
    joined.expect("app task did not panic").unwrap_or_else(|e| panic!("App::run returned an error: {e:#}"));
}

/// Runs the CLI in-process against `config_path`; `stdin` is what `--password-stdin` reads.
pub async fn run_cli(config_path: &Path, args: &[&str], stdin: &str) -> anyhow::Result<String> {
    let config = config_path.to_str().context("config path is not UTF-8")?;
    let argv: Vec<&str> = ["gateway", "--config", config].into_iter().chain(args.iter().copied()).collect();
    let cli = Cli::try_parse_from(argv)?;
    let mut input: &[u8] = stdin.as_bytes();
    let mut out: Vec<u8> = Vec::new();
    Box::pin(gateway::cli::execute(cli, &mut input, &mut out)).await?;
    String::from_utf8(out).context("CLI output is not UTF-8")
}

/// Runs the real `gateway` binary with `--config config_path` and `args`.
pub async fn run_binary(config_path: &Path, args: &[&str]) -> Output {
    let mut argv: Vec<String> =
        vec!["--config".to_owned(), config_path.to_str().expect("config path is UTF-8").to_owned()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_gateway")).args(argv).output())
        .await
        .expect("blocking task did not panic")
        .expect("spawn the gateway binary")
}

pub struct TestApp {
    /// Holds the SQLite file, the keys and the config; removed on drop.
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub client: Client,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Sends shutdown, waits for the graceful drain and asserts `run` returned Ok.
    pub async fn stop(self) {
        let TestApp { dir, client, shutdown, handle, .. } = self;
        shut_down(client, shutdown, handle).await;
        drop(dir);
    }

    /// Stops this app and builds a fresh one from the same config (same db, same keys).
    pub async fn restart(self) -> TestApp {
        let TestApp { dir, config_path, client, shutdown, handle, .. } = self;
        shut_down(client, shutdown, handle).await;
        start(dir, config_path).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    pub async fn cli(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        run_cli(&self.config_path, args, stdin).await
    }

    /// `tenant create SLUG`; returns the tenant id.
    pub async fn create_tenant(&self, slug: &str) -> String {
        let out = self
            .cli(&["tenant", "create", slug], "")
            .await
            .unwrap_or_else(|e| panic!("tenant create {slug} failed: {e:#}"));
        parse_uuid(out.trim(), "tenant create output")
    }

    /// `user create` with `--password-stdin`; returns the user id.
    pub async fn create_user(
        &self,
        tenant: &str,
        email: &str,
        password: &str,
        roles: &[&str],
        scopes: &[&str],
    ) -> String {
        let mut args = vec!["user", "create", "--tenant", tenant, "--email", email, "--password-stdin"];
        for role in roles {
            args.extend(["--role", *role]);
        }
        for scope in scopes {
            args.extend(["--scope", *scope]);
        }
        let out = self
            .cli(&args, &format!("{password}\n"))
            .await
            .unwrap_or_else(|e| panic!("user create {email} failed: {e:#}"));
        parse_uuid(out.trim(), "user create output")
    }

    pub async fn login(&self, email: &str, password: &str, tenant: Option<&str>) -> Response {
        let mut body = json!({ "email": email, "password": password });
        if let Some(tenant) = tenant {
            body["tenant"] = json!(tenant);
        }
        self.client.post(self.url("/auth/login")).json(&body).send().await.expect("POST /auth/login")
    }

    pub async fn login_ok(&self, email: &str, password: &str, tenant: Option<&str>) -> Tokens {
        parse_tokens(self.login(email, password, tenant).await, "login").await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Response {
        self.client
            .post(self.url("/auth/refresh"))
            .json(&json!({ "refresh_token": refresh_token }))
            .send()
            .await
            .expect("POST /auth/refresh")
    }

    pub async fn refresh_ok(&self, refresh_token: &str) -> Tokens {
        parse_tokens(self.refresh(refresh_token).await, "refresh").await
    }

    pub async fn get_authed(&self, path: &str, access: &str) -> Response {
        self.client.get(self.url(path)).bearer_auth(access).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post_authed(&self, path: &str, access: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(access)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn delete_authed(&self, path: &str, access: &str) -> Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(access)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
    }

    /// GET /auth/me, asserting 200; returns the body.
    pub async fn me_ok(&self, access: &str) -> Value {
        expect_json(self.get_authed("/auth/me", access).await, StatusCode::OK).await
    }

    pub async fn jwks(&self) -> Value {
        let resp =
            self.client.get(self.url("/.well-known/jwks.json")).send().await.expect("GET /.well-known/jwks.json");
        expect_json(resp, StatusCode::OK).await
    }

    /// The `*.pem` files in `<dir>/keys`, sorted.
    pub fn key_pem_paths(&self) -> Vec<PathBuf> {
        let keys_dir = self.dir.path().join("keys");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&keys_dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", keys_dir.display()))
            .map(|entry| entry.expect("read keys dir entry").path())
            .filter(|p| p.extension().and_then(|ext| ext.to_str()) == Some("pem"))
            .collect();
        paths.sort();
        paths
    }

    /// The gateway's (only) signing key, read from disk, with its kid (the file stem).
    pub fn gateway_signing_key(&self) -> (String, SigningKey) {
        let paths = self.key_pem_paths();
        assert_eq!(paths.len(), 1, "expected exactly one signing key, found {paths:?}");
        let path = paths.first().expect("one key file");
        let kid = path.file_stem().and_then(|stem| stem.to_str()).expect("key file stem is the kid").to_owned();
        let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let key = SigningKey::from_pkcs8_pem(&pem)
            .unwrap_or_else(|e| panic!("{} is not a PKCS#8 Ed25519 key: {e}", path.display()));
        (kid, key)
    }
}

/// Asserts `s` is a UUID; returns it in canonical (lowercase, hyphenated) form.
pub fn parse_uuid(s: &str, what: &str) -> String {
    Uuid::parse_str(s).unwrap_or_else(|e| panic!("{what} is not a UUID ({e}): {s:?}")).to_string()
}

/// Asserts 200 and parses a token pair.
pub async fn parse_tokens(resp: Response, what: &str) -> Tokens {
    let status = resp.status();
    let text = resp.text().await.expect("read token response body");
    assert_eq!(status, StatusCode::OK, "{what} failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what} response is not a token pair ({e}): {text}"))
}

/// Asserts the status; returns the body text.
pub async fn assert_status(resp: Response, status: StatusCode) -> String {
    let got = resp.status();
    let text = resp.text().await.expect("read response body");
    assert_eq!(got, status, "unexpected status; body: {text}");
    text
}

/// Asserts the status; parses the body as JSON.
pub async fn expect_json(resp: Response, status: StatusCode) -> Value {
    let text = assert_status(resp, status).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"))
}

/// Asserts an error response `{"error": code, "message": "..."}` with `status`.
pub async fn assert_error(resp: Response, status: StatusCode, code: &str) -> Value {
    assert_error_in("", resp, status, code).await
}

/// [`assert_error`] with a description of the case, for table-driven tests.
pub async fn assert_error_in(case: &str, resp: Response, status: StatusCode, code: &str) -> Value {
    let got = resp.status();
    let text = resp.text().await.expect("read error body");
    assert_eq!(got, status, "{case}: unexpected status; body: {text}");
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: error body is not JSON ({e}): {text:?}"));
    assert_eq!(body["error"], code, "{case}: unexpected error code; body: {text}");
    assert!(body["message"].is_string(), "{case}: error body has no message: {text}");
    body
}

/// Asserts 401 `invalid_token` with `WWW-Authenticate: Bearer error="invalid_token"`.
pub async fn assert_invalid_token(resp: Response) {
    let www = resp.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().expect("WWW-Authenticate is ASCII").to_owned());
    assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let www = www.expect("401 invalid_token carries WWW-Authenticate");
    assert!(
        www.starts_with("Bearer") && www.contains(r#"error="invalid_token""#),
        "unexpected WWW-Authenticate: {www}"
    );
}

/// The Retry-After header as a positive number of seconds.
pub fn retry_after_secs(resp: &Response) -> u64 {
    let value = resp
        .headers()
        .get(RETRY_AFTER)
        .unwrap_or_else(|| panic!("{} response has no Retry-After header", resp.status()));
    let text = value.to_str().expect("Retry-After is ASCII");
    let secs: u64 = text.trim().parse().unwrap_or_else(|e| panic!("Retry-After {text:?} is not an integer: {e}"));
    assert!(secs > 0, "Retry-After must be positive, got {secs}");
    secs
}

/// Decodes part `index` (0 = header, 1 = claims) of a compact JWS as JSON.
pub fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap_or_else(|| panic!("token has no part {index}: {token}"));
    let bytes =
        URL_SAFE_NO_PAD.decode(part).unwrap_or_else(|e| panic!("JWT part {index} is not base64url ({e}): {part}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part {index} is not JSON ({e}): {part}"))
}

/// base64url (no padding) of the JSON serialization of `value`.
pub fn b64url_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}
