//! Shared harness: one gateway per test, in its own temp dir, on ephemeral ports.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
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
use gateway::server::Reloader;
use reqwest::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Client, Response, StatusCode};
use rustls::pki_types::ServerName;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Connection as _;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// A password that satisfies `password_min_length = 15`.
pub const PASSWORD: &str = "correct horse battery staple";
/// A second valid password, distinct from [`PASSWORD`].
pub const OTHER_PASSWORD: &str = "purple monkey dishwasher sunrise";
/// A long-enough password that is never anybody's password.
pub const WRONG_PASSWORD: &str = "definitely not the password";

/// Knobs of the generated `gateway.toml`.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub registration: bool,
    pub access_token_ttl: &'static str,
    pub refresh_token_ttl: &'static str,
    pub leeway: &'static str,
    pub lockout_threshold: u32,
    pub lockout_duration: &'static str,
    pub rate_limit_per_minute: u32,
    /// `auth.revocation_poll`.
    pub revocation_poll: &'static str,
    /// `auth.keys_dir`, relative to the app's temp dir or absolute (replicas share one).
    pub keys_dir: String,
    /// `database.url`; `None` is a SQLite file in the app's temp dir. Set by the harness
    /// for the PostgreSQL backend (see [`Backend`]).
    pub database_url: Option<String>,
    /// Extra lines inside the `[database]` table, e.g. `acquire_timeout = "1s"`.
    pub database_extra: String,
    /// Extra lines inside the `[auth]` table, e.g. `revocation_max_staleness = "3s"`.
    pub auth_extra: String,
    /// `server.shutdown_grace`.
    pub shutdown_grace: &'static str,
    /// Extra lines inside the `[server]` table, e.g. `trusted_proxies = ["127.0.0.1/32"]`.
    pub server_extra: String,
    /// Lines added to `[admin]`.
    pub admin_extra: String,
    /// Appended at the end of the file: `[[routes]]`, `[headers]`, `[upstream]`, `[server.tls]` tables.
    pub extra: String,
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
            revocation_poll: "100ms",
            keys_dir: "keys".to_owned(),
            database_url: None,
            database_extra: String::new(),
            auth_extra: String::new(),
            shutdown_grace: "5s",
            server_extra: String::new(),
            admin_extra: String::new(),
            extra: String::new(),
        }
    }
}

impl TestOptions {
    /// Default options with `extra` appended to the file (routes and other tables).
    pub fn with_extra(extra: impl Into<String>) -> Self {
        Self { extra: extra.into(), ..Self::default() }
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
pub fn config_toml(opts: &TestOptions) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "{shutdown_grace}"
{server_extra}

[admin]
listen = "127.0.0.1:0"
{admin_extra}

[database]
url = {database_url}
{database_extra}

[auth]
issuer = "gateway"
audience = "gateway"
access_token_ttl = "{access_token_ttl}"
refresh_token_ttl = "{refresh_token_ttl}"
leeway = "{leeway}"
keys_dir = {keys_dir}
registration = {registration}
password_min_length = 15
lockout_threshold = {lockout_threshold}
lockout_duration = "{lockout_duration}"
revocation_poll = "{revocation_poll}"
rate_limit_per_minute = {rate_limit_per_minute}
{auth_extra}

[auth.argon2]
memory_kib = 1024
iterations = 1
parallelism = 1

{extra}
"#,
        server_extra = opts.server_extra,
        admin_extra = opts.admin_extra,
        extra = opts.extra,
        database_url = toml_string(opts.database_url.as_deref().unwrap_or("sqlite://gateway.db")),
        database_extra = opts.database_extra,
        keys_dir = toml_string(&opts.keys_dir),
        revocation_poll = opts.revocation_poll,
        shutdown_grace = opts.shutdown_grace,
        auth_extra = opts.auth_extra,
        access_token_ttl = opts.access_token_ttl,
        refresh_token_ttl = opts.refresh_token_ttl,
        leeway = opts.leeway,
        registration = opts.registration,
        lockout_threshold = opts.lockout_threshold,
        lockout_duration = opts.lockout_duration,
        rate_limit_per_minute = opts.rate_limit_per_minute,
    )
}

/// `s` as a TOML string literal (quoted and escaped).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Writes `<dir>/gateway.toml` and returns its path.
pub fn write_config(dir: &Path, opts: &TestOptions) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_toml(opts)).expect("write gateway.toml");
    path
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

/// Starts a gateway on the backend chosen by [`set_backend`] (a fresh PostgreSQL database per
/// app, dropped by [`TestApp::stop`], or a SQLite file in the app's temp dir).
pub async fn spawn_app_with(opts: TestOptions) -> TestApp {
    let dir = tempfile::tempdir().expect("create temp dir");
    spawn_app_in(dir, opts).await
}

/// Like [`spawn_app_with`], in a temp dir the test prepared (e.g. wrote `cert.pem` and
/// `key.pem` into) before the app is built. Relative paths in `opts` resolve against `dir`.
pub async fn spawn_app_in(dir: TempDir, mut opts: TestOptions) -> TestApp {
    let database = match (backend(), &opts.database_url) {
        (Backend::Postgres, None) => {
            let database = PgDatabase::create().await;
            opts.database_url = Some(database.url.clone());
            Some(Arc::new(database))
        }
        _ => None,
    };
    let config_path = write_config(dir.path(), &opts);
    start(dir, config_path, opts, database, None).await
}

/// The database a test's gateways use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the app's temp dir (the default).
    Sqlite,
    /// A fresh database on the server named by [`POSTGRES_URL_VAR`].
    Postgres,
}

thread_local! {
    /// Read by [`spawn_app_in`]. `#[tokio::test]` polls the test body on the test's own
    /// thread (also with the multi-thread flavor), so the body's setting is seen here.
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Sqlite) };
}

/// Chooses the backend of the apps this test thread spawns from now on.
pub fn set_backend(backend: Backend) {
    BACKEND.with(|b| b.set(backend));
}

pub fn backend() -> Backend {
    BACKEND.with(Cell::get)
}

/// Names the PostgreSQL server of the PostgreSQL variants, e.g.
/// `postgres://postgres@127.0.0.1:5432/test`; each test creates its own database there.
pub const POSTGRES_URL_VAR: &str = "GATEWAY_TEST_POSTGRES_URL";

/// The value of [`POSTGRES_URL_VAR`], if set.
pub fn postgres_url() -> Option<String> {
    std::env::var(POSTGRES_URL_VAR).ok().filter(|url| !url.trim().is_empty())
}

/// For a PostgreSQL-only test: true when [`POSTGRES_URL_VAR`] is set; otherwise prints the
/// skip notice and returns false (the test then returns early and passes).
pub fn postgres_or_skip() -> bool {
    if postgres_url().is_some() {
        return true;
    }
    eprintln!("skipped: {POSTGRES_URL_VAR} is not set");
    false
}

/// For tests that write a config but start no app: the backend's kind of `database.url`
/// (the PostgreSQL server's own URL, never connected to; None, a SQLite file, otherwise).
pub fn config_only_database_url() -> Option<String> {
    match backend() {
        Backend::Sqlite => None,
        Backend::Postgres => postgres_url(),
    }
}

/// `url` with its database name replaced by `database`.
fn url_with_database(url: &str, database: &str) -> String {
    let mut parsed =
        reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR} is not a URL ({e}): {url}"));
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// A database of its own on the PostgreSQL server, dropped (`WITH (FORCE)`) by
/// [`PgDatabase::remove`], or when dropped without it (a failed test).
#[derive(Debug)]
pub struct PgDatabase {
    /// The server's URL as configured (its own database is only used to create and drop ours).
    admin_url: String,
    name: String,
    /// The URL of this database.
    pub url: String,
    removed: bool,
}

impl PgDatabase {
    /// Creates `gw_test_<uuid>`; panics when the server is unreachable.
    pub async fn create() -> PgDatabase {
        let admin_url = postgres_url().unwrap_or_else(|| panic!("{POSTGRES_URL_VAR} is not set"));
        let name = format!("gw_test_{}", Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the PostgreSQL server of {POSTGRES_URL_VAR}: {e}"));
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
        // The database exists either way; a failed goodbye is not the test's concern.
        let _ = conn.close().await;
        let url = url_with_database(&admin_url, &name);
        PgDatabase { admin_url, name, url, removed: false }
    }

    /// The server's address, as the URL names it.
    pub fn server(&self) -> (String, u16) {
        let url = reqwest::Url::parse(&self.url).expect("the database URL parses");
        (url.host_str().expect("the database URL names a host").to_owned(), url.port().unwrap_or(5432))
    }

    /// Drops the database, panicking on failure.
    pub async fn remove(mut self) {
        drop_database(&self.admin_url, &self.name)
            .await
            .unwrap_or_else(|e| panic!("DROP DATABASE {} failed: {e:#}", self.name));
        self.removed = true;
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Not removed by `stop` (the test failed): Drop cannot await, so a thread of its own
        // runs the DROP on a runtime of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(drop_database(&admin_url, &name))
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!("could not drop test database {}: the dropping thread panicked", self.name),
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(admin_url).await.context("connect to the PostgreSQL server")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Gateways sharing one PostgreSQL database and one keys directory, as replicas do. Each
/// [`TestApp`] it spawns holds both; the last one stopped drops the database.
pub struct Cluster {
    database: Arc<PgDatabase>,
    keys: Arc<TempDir>,
}

impl Cluster {
    /// A fresh database; panics when [`POSTGRES_URL_VAR`] is unset or the server unreachable.
    pub async fn new() -> Cluster {
        let database = Arc::new(PgDatabase::create().await);
        let keys = Arc::new(tempfile::tempdir().expect("create the shared keys dir"));
        Cluster { database, keys }
    }

    /// The shared database's URL.
    pub fn database_url(&self) -> String {
        self.database.url.clone()
    }

    /// The shared keys directory every replica of this cluster uses.
    pub fn keys_dir(&self) -> PathBuf {
        self.keys.path().join("keys")
    }

    /// The PostgreSQL server's (host, port).
    pub fn server(&self) -> (String, u16) {
        self.database.server()
    }

    /// The database's URL with the server address replaced by `addr` (a relay in front of it).
    pub fn database_url_via(&self, addr: SocketAddr) -> String {
        let mut url = reqwest::Url::parse(&self.database.url).expect("the database URL parses");
        url.set_ip_host(addr.ip()).expect("the database URL can take an IP host");
        url.set_port(Some(addr.port())).expect("the database URL can take a port");
        url.to_string()
    }

    /// A gateway on the shared database (or on `opts.database_url`, which must lead to it)
    /// and the shared keys directory. The first one migrates and generates the signing key.
    pub async fn spawn(&self, opts: TestOptions) -> TestApp {
        let dir = tempfile::tempdir().expect("create temp dir");
        let keys_dir = self.keys_dir();
        let opts = TestOptions {
            database_url: Some(opts.database_url.unwrap_or_else(|| self.database.url.clone())),
            keys_dir: keys_dir.to_str().expect("temp dir path is UTF-8").to_owned(),
            ..opts
        };
        let config_path = write_config(dir.path(), &opts);
        start(dir, config_path, opts, Some(Arc::clone(&self.database)), Some(Arc::clone(&self.keys))).await
    }
}

/// Two gateways, A then B, on one fresh PostgreSQL database and one keys directory, both
/// configured by `opts`. A is built first, so it migrates and generates the key B loads.
pub async fn spawn_replicas(opts: TestOptions) -> (TestApp, TestApp) {
    let cluster = Cluster::new().await;
    let a = cluster.spawn(opts.clone()).await;
    let b = cluster.spawn(opts).await;
    (a, b)
}

async fn start(
    dir: TempDir,
    config_path: PathBuf,
    opts: TestOptions,
    database: Option<Arc<PgDatabase>>,
    shared_keys: Option<Arc<TempDir>>,
) -> TestApp {
    let config = Config::load(&config_path).unwrap_or_else(|e| panic!("test config must load: {e}"));
    // Boxed: the build future may be large (clippy::large_futures).
    let app = Box::pin(App::build(config)).await.unwrap_or_else(|e| panic!("App::build failed: {e:#}"));
    let addr = app.public_addr();
    let admin_addr = app.admin_addr();
    let redirect_addr = app.redirect_addr();
    // Taken before run() consumes the app.
    let reloader = app.reloader();
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
    TestApp {
        dir,
        config_path,
        addr,
        admin_addr,
        redirect_addr,
        client,
        opts,
        reloader,
        shutdown,
        handle,
        database,
        shared_keys,
    }
}

async fn shut_down(client: Client, shutdown: oneshot::Sender<()>, handle: JoinHandle<anyhow::Result<()>>) {
    // Close our pooled keep-alive connections first so the drain has nothing to wait for.
    drop(client);
    // An Err here means run() already returned; its result is checked below.
    let _ = shutdown.send(());
    join_run(handle, Duration::from_secs(10)).await;
}

/// Waits up to `limit` for `App::run` to return, and asserts it returned Ok.
async fn join_run(handle: JoinHandle<anyhow::Result<()>>, limit: Duration) {
    let joined = tokio::time::timeout(limit, handle)
        .await
        .unwrap_or_else(|_| panic!("graceful shutdown did not finish within {limit:?}"));
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
    /// `server.http_redirect_listen`, when the options set it.
    pub redirect_addr: Option<SocketAddr>,
    pub client: Client,
    /// The options the config file was generated from ([`TestApp::rewrite_config`] reuses them).
    pub opts: TestOptions,
    /// Re-reads the config file and swaps the routes.
    pub reloader: Reloader,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
    /// The PostgreSQL database (shared by the replicas of a [`Cluster`]); None on SQLite.
    database: Option<Arc<PgDatabase>>,
    /// The keys directory shared by the replicas of a [`Cluster`].
    shared_keys: Option<Arc<TempDir>>,
}

/// An app whose shutdown has been sent (see [`TestApp::begin_stop`]).
pub struct Stopping {
    handle: JoinHandle<anyhow::Result<()>>,
    dir: TempDir,
    database: Option<Arc<PgDatabase>>,
    shared_keys: Option<Arc<TempDir>>,
}

impl Stopping {
    /// Whether `App::run` has returned.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits up to `limit` for the drain, asserts `run` returned Ok, and
    /// cleans up as [`TestApp::stop`] does.
    pub async fn finish_within(self, limit: Duration) {
        let Stopping { handle, dir, database, shared_keys } = self;
        join_run(handle, limit).await;
        drop(dir);
        drop(shared_keys);
        if let Some(database) = database.and_then(Arc::into_inner) {
            database.remove().await;
        }
    }
}

impl TestApp {
    /// Sends shutdown, waits for the graceful drain and asserts `run` returned Ok; then drops
    /// the PostgreSQL database unless another replica still uses it.
    pub async fn stop(self) {
        self.begin_stop().finish_within(Duration::from_secs(10)).await;
    }

    /// Sends shutdown without waiting for the drain: the returned [`Stopping`] does.
    pub fn begin_stop(self) -> Stopping {
        let TestApp { dir, client, shutdown, handle, database, shared_keys, .. } = self;
        // Close our pooled keep-alive connections first so the drain has nothing to wait for.
        drop(client);
        // An Err here means run() already returned; Stopping::finish_within checks its result.
        let _ = shutdown.send(());
        Stopping { handle, dir, database, shared_keys }
    }

    /// Stops this app and builds a fresh one from the same config (same db, same keys).
    pub async fn restart(self) -> TestApp {
        let TestApp { dir, config_path, client, opts, shutdown, handle, database, shared_keys, .. } = self;
        shut_down(client, shutdown, handle).await;
        start(dir, config_path, opts, database, shared_keys).await
    }

    /// Rewrites the config file with the same options but `extra` as its trailing tables.
    /// Atomic (write + rename), so the gateway's file watcher never reads a half-written file.
    /// Does not reload: call `self.reloader.reload()` or wait for the watcher.
    pub fn rewrite_config(&self, extra: &str) {
        let opts = TestOptions { extra: extra.to_owned(), ..self.opts.clone() };
        let tmp = self.dir.path().join("gateway.toml.tmp");
        std::fs::write(&tmp, config_toml(&opts)).expect("write gateway.toml.tmp");
        std::fs::rename(&tmp, &self.config_path).expect("rename gateway.toml.tmp over gateway.toml");
    }

    /// Writes `text` as the whole config file (for deliberately broken configs).
    pub fn write_raw_config(&self, text: &str) {
        let tmp = self.dir.path().join("gateway.toml.tmp");
        std::fs::write(&tmp, text).expect("write gateway.toml.tmp");
        std::fs::rename(&tmp, &self.config_path).expect("rename gateway.toml.tmp over gateway.toml");
    }

    /// Plain GET on the public listener.
    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET on the admin listener's `/metrics`, asserting 200; returns the text.
    pub async fn metrics(&self) -> String {
        let resp = self.client.get(self.admin_url("/metrics")).send().await.expect("GET admin /metrics");
        assert_status(resp, StatusCode::OK).await
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

    /// The `*.pem` files in the keys directory (`<dir>/keys` unless shared), sorted.
    pub fn key_pem_paths(&self) -> Vec<PathBuf> {
        let keys_dir = self.dir.path().join(&self.opts.keys_dir);
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

/// One `[[routes]]` table: `name`, `prefix`, `upstreams`, then `lines` (more keys, one a line).
pub fn route(name: &str, prefix: &str, upstreams: &[String], lines: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!("\n[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstreams = [{}]\n{lines}\n", list.join(", "))
}

/// The sum of the samples of metric `name` (a Prometheus exposition in
/// `metrics`) whose labels include every pair of `labels`; 0 when there
/// is none. The registry is the process's, shared by tests running at
/// once: give the labels something of the test's own (a route name).
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let set = match rest.strip_prefix('{') {
                Some(set) => set.strip_suffix('}')?,
                None if rest.is_empty() => "",
                None => return None,
            };
            let has = |k: &str, v: &str| {
                set.split(',')
                    .any(|p| p.strip_prefix(k).and_then(|p| p.strip_prefix("=\"")?.strip_suffix('"')) == Some(v))
            };
            if labels.iter().all(|(k, v)| has(k, v)) {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// Polls `check` every 50 ms until it returns true; panics after `cap`.
pub async fn eventually<F, Fut>(what: &str, cap: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + cap;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still not the case after {cap:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    /// None when the connection closed (or the 5 s timeout passed) before a status line.
    pub status: Option<u16>,
    /// Status line and headers, as received.
    pub head: String,
    /// The body (de-chunked); possibly partial when the connection closed early.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts `status` and a JSON error body with `code`.
    pub fn assert_error(&self, case: &str, status: u16, code: &str) -> Value {
        let text = self.text();
        assert_eq!(self.status, Some(status), "{case}: unexpected status; head: {:?}, body: {text}", self.head);
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: error body is not JSON ({e}): {text:?}"));
        assert_eq!(body["error"], code, "{case}: unexpected error code; body: {text}");
        body
    }

    /// Asserts 200 and parses the body as JSON.
    pub fn json_ok(&self, case: &str) -> Value {
        let text = self.text();
        assert_eq!(self.status, Some(200), "{case}: unexpected status; head: {:?}, body: {text}", self.head);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {text:?}"))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body; None while it is incomplete.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim().to_owned();
        let size = usize::from_str_radix(&size_text, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers (if any) end with an empty line.
            return find(data, b"\r\n").map(|_| out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Parses what was read so far; Some once the response is complete.
fn parse_raw(buf: &[u8], closed: bool) -> Option<RawResponse> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return closed.then(|| RawResponse {
            status: None,
            head: String::from_utf8_lossy(buf).into_owned(),
            body: vec![],
        });
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let rest = &buf[head_end + 4..];
    let mut response = RawResponse { status, head, body: Vec::new() };
    let chunked = response.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length: Option<usize> = response.header("content-length").and_then(|v| v.parse().ok());
    if chunked {
        match dechunk(rest) {
            Some(body) => response.body = body,
            None if closed => response.body = rest.to_vec(),
            None => return None,
        }
    } else if let Some(length) = length {
        if rest.len() < length && !closed {
            return None;
        }
        response.body = rest[..length.min(rest.len())].to_vec();
    } else if status.is_some_and(|s| s == 204 || s == 304 || (100..200).contains(&s)) {
        response.body = Vec::new();
    } else if closed {
        response.body = rest.to_vec();
    } else {
        return None;
    }
    Some(response)
}

/// Writes `request` verbatim on a fresh connection to `addr` and reads one response,
/// giving up after 5 s (what was read by then is returned).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the gateway");
    // The server may answer (and close) before reading everything: a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = vec![0_u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return parse_raw(&buf, true),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(response) = parse_raw(&buf, false) {
                        return Some(response);
                    }
                }
            }
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(5), read).await;
    match result {
        Ok(Some(response)) => response,
        Ok(None) | Err(_) => parse_raw(&buf, true).expect("parse_raw on a closed stream always answers"),
    }
}

/// Writes `request` verbatim on a fresh connection and returns everything the
/// gateway sends until it closes the connection (or 5 s pass): for pipelining.
pub async fn raw_request_all(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the gateway");
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// `GET path` with `Host: host`, `Connection: close` and `extra_headers` (each `Name: value`).
pub async fn raw_get(addr: SocketAddr, path: &str, host: &str, extra_headers: &[&str]) -> RawResponse {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra_headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    raw_request(addr, request.as_bytes()).await
}

/// Runs each test function on both backends: generates `mod sqlite` and `mod postgres`, each
/// with every function (attributes kept as written), whose body first picks the backend with
/// [`set_backend`]. The PostgreSQL variant returns early, passing, with a notice on stderr when
/// [`POSTGRES_URL_VAR`] is unset. Helpers the tests call live outside the macro (`use super::*`).
macro_rules! both_backends {
    ($( $(#[$attr:meta])* async fn $name:ident() $body:block )*) => {
        mod sqlite {
            use super::*;
            $(
                $(#[$attr])*
                async fn $name() {
                    $crate::helpers::set_backend($crate::helpers::Backend::Sqlite);
                    $body
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                $(#[$attr])*
                async fn $name() {
                    if !$crate::helpers::postgres_or_skip() {
                        return;
                    }
                    $crate::helpers::set_backend($crate::helpers::Backend::Postgres);
                    $body
                }
            )*
        }
    };
}
pub(crate) use both_backends;

/// The certificate the listener presents in a fresh handshake (trusting `roots`).
pub async fn served_certificate(addr: SocketAddr, roots: &rustls::RootCertStore) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("handshake");
    let chain = tls.get_ref().1.peer_certificates().expect("the server sent its certificate");
    chain[0].to_vec()
}
