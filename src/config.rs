//! The validated configuration.
//!
//! `gateway.toml` is parsed once into TOML values, then `reader::Fields`
//! turns each table into typed settings (durations, socket addresses, paths),
//! collecting every error so `gateway config check` can name all bad fields
//! in one run. Relative paths resolve against the config file's folder, so
//! the gateway behaves the same whatever directory it is started from.

pub mod proxy;
mod reader;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::db::retention::Retention;
pub use proxy::{
    fold_header_name, AuthMode, HeaderNames, HealthCheck, ProxyConfig, RateLimit, RateLimitKey, RouteConfig,
    UpstreamSettings, UpstreamTarget,
};
use reader::{Errors, Fields};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (reloads read it again).
    pub path: PathBuf,
    /// The file as it was just before it was read (the file watcher's
    /// starting point); `None` when parsed from text.
    pub stamp: Option<FileStamp>,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    /// Routes and header names: the part a reload replaces (with
    /// `auth.cors_origins`).
    pub proxy: ProxyConfig,
    pub upstream: UpstreamSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    /// A client must send its whole request head within this (slowloris):
    /// a new connection's first head from the accept, a later one from its
    /// first byte.
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight is kept open for
    /// the next one (HTTP/1.1 keep-alive; HTTP/2 with no open stream).
    pub idle_timeout: Duration,
    /// A client that takes no byte of an answer for this long (a write
    /// that waits, over HTTP/1.1; a shut flow-control window, over HTTP/2)
    /// is disconnected, freeing its slot and upstream connection.
    pub send_timeout: Duration,
    /// Largest request head accepted (431 past it).
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Threads serving the public listener (one runtime and socket each).
    pub workers: usize,
    /// A WebSocket tunnel with no byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// How often the config file and the TLS files (listener and upstream)
    /// are checked for changes; zero: never (only SIGHUP reloads).
    pub config_poll: Duration,
    /// A plain-HTTP listener that sends every request to the TLS one.
    pub http_redirect: Option<HttpRedirect>,
}

/// `server.http_redirect_listen` and `server.http_redirect_port`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpRedirect {
    pub listen: SocketAddr,
    /// The port clients reach the TLS listener on (443 is left out of the
    /// redirect's URL); `None`: the port `listen` is bound to.
    pub https_port: Option<u16>,
}

/// Certificate chain and private key (PEM) for the public listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `api_token_file`: a file holding the admin API's bearer token; the
    /// API is off without it (and without `tenant_tokens`). Read at start
    /// and on SIGHUP, never by `config check`.
    pub api_token_file: Option<PathBuf>,
    /// `[[admin.tenant_tokens]]`: tokens that reach only some tenants'
    /// users and sessions.
    pub tenant_tokens: Vec<TenantToken>,
}

/// `[[admin.tenant_tokens]]`: a token of the admin API that reaches only
/// the users and sessions of `tenants` (a tenant's own console).
#[derive(Debug, Clone, PartialEq)]
pub struct TenantToken {
    /// Recorded as `"by": "admin_api:<name>"` in what it changes.
    pub name: String,
    /// The file holding the token (read at start and on SIGHUP, like
    /// `api_token_file`).
    pub file: PathBuf,
    pub tenants: Vec<String>,
    /// The roles and scopes it may give (none unless listed): a role it
    /// gives passes every route that asks for it without naming tenants.
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// Reads only (a support desk's view): every call but a `GET` is 403.
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    pub url: DatabaseUrl,
    pub auto_migrate: bool,
    pub max_connections: u32,
    /// How long a request waits for a connection before answering 503.
    pub acquire_timeout: Duration,
    /// PostgreSQL `statement_timeout`: a query running longer is cancelled
    /// and the request answered 503, so a stuck database cannot hold requests.
    pub statement_timeout: Duration,
    /// `session_retention` and `audit_retention` (see [`crate::db::retention`]).
    pub retention: Retention,
}

/// Where the data lives.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file, created on first start.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`sslmode` and other parameters as libpq reads them).
    Postgres(String),
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            // The URL may carry a password.
            DatabaseUrl::Postgres(url) => write!(f, "Postgres({})", redact_url(url)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// The longest a session lives from its login, however often it is
    /// refreshed; `None` (`"0s"`) for no limit. Refresh tokens and access
    /// tokens are cut to end with it.
    pub session_lifetime: Option<Duration>,
    pub keys_dir: PathBuf,
    pub registration: bool,
    pub password_min_length: usize,
    pub lockout_threshold: u32,
    pub lockout_duration: Duration,
    pub leeway: Duration,
    pub revocation_poll: Duration,
    /// Past this without a successful refresh of the revocation state, tokens
    /// issued before the window are refused and `/readyz` turns 503.
    pub revocation_max_staleness: Duration,
    /// Requests per minute per client IP on `/auth/login` and `/auth/refresh`; 0 disables.
    pub rate_limit_per_minute: u32,
    /// Browser origins (`scheme://host[:port]`, lower-case) allowed to call
    /// `/auth/*` and the JWKS from another origin; `*` alone for any; empty
    /// for none (no CORS headers at all).
    pub cors_origins: Vec<String>,
    pub argon2: Argon2Config,
    /// `[auth.mailer]`: where links to mail are delivered (a signed POST to
    /// the operator's mailer); `None`: `POST /auth/password/forgot` and
    /// `/auth/email/resend` answer 404, and links come only from the CLI.
    pub mailer: Option<WebhookConfig>,
    /// `auth.password_reset.token_ttl`: how long a reset link sets the
    /// password.
    pub reset_token_ttl: Duration,
    /// `[auth.email_verification]`.
    pub email_verification: EmailVerification,
    /// `auth.email_change.revert_ttl`: how long the link in an
    /// `email.changed` notice moves the account back; zero: no link.
    pub revert_token_ttl: Duration,
    /// `[auth.login_link]`.
    pub login_link: LoginLink,
    /// Store TOTP secrets sealed (and seal those stored as they are at
    /// start); off only while replicas of a release from before sealing
    /// still serve.
    pub seal_totp_secrets: bool,
}

/// `[auth.email_verification]`: whether a registered user must prove the
/// email before logging in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmailVerification {
    pub required: bool,
    /// How long a verification link works.
    pub token_ttl: Duration,
}

/// `[auth.login_link]`: whether users may sign in with a link mailed to
/// their (proved) address instead of the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLink {
    pub enabled: bool,
    /// How long a sign-in link works.
    pub token_ttl: Duration,
    /// Every request for a link carries a PKCE `code_challenge`.
    pub require_code_challenge: bool,
}

/// `[auth.mailer]`: the mailer's endpoint and the key its deliveries are
/// signed with.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    /// A file holding the Standard Webhooks secret (`whsec_` + base64);
    /// read at start, never by `config check`.
    pub secret_file: PathBuf,
    /// `notices`: whether security notices (a password, email or second
    /// factor changed) are delivered too, not only links.
    pub notices: bool,
}

/// An `http(s)://host[:port][/path][?query]` URL, split as a request needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub https: bool,
    pub authority: hyper::http::uri::Authority,
    /// The `Host` field: the authority without the scheme's default port.
    pub host: String,
    /// `/` at least.
    pub path_and_query: String,
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The path and query may carry a key: only the origin is shown.
        write!(f, "{}://{}", if self.https { "https" } else { "http" }, self.authority)
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookUrl({self})")
    }
}

/// Argon2id cost. Defaults are OWASP's (19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Config {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One line per request the gateway answers: proxied, refused, or its
    /// own API (target `gateway::access`).
    pub access: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// The settings of `self` a reload does not take that differ from
    /// `running`'s (what the process started with), by table: a change
    /// there waits for a restart. Reloads take the routes, `[headers]`,
    /// `[forward_auth]`, `server.trusted_proxies` and `auth.cors_origins`.
    pub fn restart_pending(&self, running: &Config) -> Vec<&'static str> {
        let mut tables = Vec::new();
        if self.server != running.server {
            tables.push("server");
        }
        if self.admin != running.admin {
            tables.push("admin");
        }
        if self.database != running.database {
            tables.push("database");
        }
        let auth = |c: &Config| AuthConfig { cors_origins: Vec::new(), ..c.auth.clone() };
        if auth(self) != auth(running) {
            tables.push("auth");
        }
        if self.log != running.log {
            tables.push("log");
        }
        if self.upstream != running.upstream {
            tables.push("upstream");
        }
        tables
    }
}

/// Everything wrong with a config file, one line per problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n  {}", .problems.len(), .problems.join("\n  "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

/// Longest password accepted, in bytes: longer ones are refused before any
/// hashing so a megabyte "password" cannot buy a megabyte of Argon2 work.
pub const MAX_PASSWORD_BYTES: usize = 1024;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Taken before the read: a write after it is a change still to see.
        let stamp = FileStamp::of(path);
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config = Self::parse(&text, path)?;
        config.stamp = stamp;
        Ok(config)
    }

    /// Validates `text` as if it had been read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut errors = Errors::default();
        let config = build(table, path, &base, &mut errors);
        match config {
            Some(config) if errors.0.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid { path: path.to_owned(), problems: errors.0 }),
        }
    }
}

/// What tells one version of a file from another without reading it:
/// modification time, size, inode and status-change time. A file renamed
/// over the old one has a new inode and ctime even when a copy kept the
/// old modification time and size (`cp -p`, `rsync -t`), and nothing but
/// the kernel sets ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: std::time::SystemTime,
    len: u64,
    inode: u64,
    changed: (i64, i64),
}

impl FileStamp {
    /// The stamp of the file at `path` now; `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: meta.modified().ok()?,
            len: meta.len(),
            inode: meta.ino(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn build(table: toml::Table, path: &Path, base: &Path, errors: &mut Errors) -> Option<Config> {
    let mut root = Fields::new("", table, errors);
    let server_t = root.table("server");
    let admin_t = root.table("admin");
    let database_t = root.table("database");
    let auth_t = root.table("auth");
    let log_t = root.table("log");
    let headers_t = root.table("headers");
    let upstream_t = root.table("upstream");
    let forward_auth_t = root.table("forward_auth");
    let routes_t = root.array_of_tables("routes");
    root.finish();

    let (server, trusted_proxies) = build_server(server_t, base, errors);

    let mut f = Fields::new("admin", admin_t, errors);
    let admin_listen = f.socket_addr_or("listen", "127.0.0.1:9090");
    let api_token_file = f.string("api_token_file").map(|p| resolve(base, &p));
    let token_tables = f.array_of_tables("tenant_tokens");
    f.finish();
    let mut tenant_tokens: Vec<TenantToken> = Vec::new();
    for (i, table) in token_tables.into_iter().enumerate() {
        let mut t = Fields::new(&format!("admin.tenant_tokens[{i}]"), table, errors);
        let name = t.string("name").unwrap_or_default();
        if !crate::auth::service::is_slug(&name) {
            t.error("name", "is required: 1-64 lower-case letters, digits or '-'");
        } else if tenant_tokens.iter().any(|other| other.name == name) {
            t.error("name", format!("{name:?} names another token too"));
        }
        let file = t.string("file").map(|p| resolve(base, &p));
        if file.is_none() {
            t.error("file", "is required: the file holding the token");
        }
        let tenants = t.string_list("tenants");
        if tenants.is_empty() {
            t.error("tenants", "is required: the slugs of the tenants the token reaches");
        }
        for slug in tenants.iter().filter(|s| !crate::auth::service::is_slug(s)) {
            t.error("tenants", format!("{slug:?} is no tenant slug"));
        }
        if let Some(twice) = tenants.iter().enumerate().find(|(i, s)| tenants[..*i].contains(s)).map(|(_, s)| s) {
            t.error("tenants", format!("{twice:?} is listed twice"));
        }
        let roles = t.string_list("roles");
        let scopes = t.string_list("scopes");
        let read_only = t.bool_or("read_only", false);
        for (key, name) in roles.iter().map(|r| ("roles", r)).chain(scopes.iter().map(|s| ("scopes", s))) {
            if let Err(e) = crate::auth::service::validate_name(name) {
                t.error(key, e);
            }
        }
        t.finish();
        tenant_tokens.push(TenantToken { name, file: file.unwrap_or_default(), tenants, roles, scopes, read_only });
    }
    let admin = admin_listen.map(|listen| AdminConfig { listen, api_token_file, tenant_tokens });

    let mut f = Fields::new("database", database_t, errors);
    let url_text = f.string_or("url", "sqlite://gateway.db");
    let url = parse_database_url(&url_text, base).map_err(|e| f.error("url", e)).ok();
    let auto_migrate = f.bool_or("auto_migrate", true);
    let max_connections = f.int_or("max_connections", 8, 1, 1000) as u32;
    let acquire_timeout = f.duration_or("acquire_timeout", "3s", Duration::from_millis(10));
    let statement_timeout = f.duration_or("statement_timeout", "10s", Duration::from_millis(10));
    let keep = |d: Duration| (!d.is_zero()).then_some(d);
    let retention_set = f.has("session_retention");
    let sessions = keep(f.duration_or("session_retention", "30d", Duration::ZERO));
    let audit = keep(f.duration_or("audit_retention", "0s", Duration::ZERO));
    f.finish();

    let auth = build_auth(auth_t, base, errors);
    // A revoked session must stay readable while its access tokens may
    // live: a starting replica loads its revocation state from those rows.
    let floor = auth.access_token_ttl + auth.leeway + Duration::from_secs(3600);
    // The default gives way to a floor above it (access tokens living
    // for weeks); a value written in the file must clear it.
    let sessions = sessions.map(|kept| if retention_set { kept } else { kept.max(floor) });
    let retention = Retention { sessions, audit };
    if sessions.is_some_and(|kept| kept < floor) {
        errors.push(
            "database.session_retention",
            format!(
                "must be \"0s\" (keep for ever) or at least auth.access_token_ttl + auth.leeway + 1h ({}): \
                 revoked sessions feed the revocation state while their tokens may live",
                humantime::format_duration(floor)
            ),
        );
    }
    let database = url.map(|url| DatabaseConfig {
        url,
        auto_migrate,
        max_connections,
        acquire_timeout,
        statement_timeout,
        retention,
    });

    let mut f = Fields::new("log", log_t, errors);
    let format = match f.string_or("format", "text").as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            f.error("format", format!("{other:?} is not \"text\" or \"json\""));
            LogFormat::Text
        }
    };
    let access = f.bool_or("access", true);
    f.finish();

    if let (Some(server), Some(admin)) = (&server, &admin) {
        check_listeners(server, admin, errors);
    }

    let headers = proxy::build_headers(headers_t, errors);
    let forward_auth = proxy::build_forward_auth(forward_auth_t, &trusted_proxies, errors);
    let routes = proxy::build_routes(routes_t, &headers, forward_auth, &auth.audience, errors);
    let upstream = proxy::build_upstream(upstream_t, base, errors);

    Some(Config {
        path: path.to_owned(),
        stamp: None,
        server: server?,
        admin: admin?,
        database: database?,
        auth,
        log: LogConfig { format, access },
        proxy: ProxyConfig { routes, headers, forward_auth, trusted_proxies },
        upstream,
    })
}

/// Refuses listeners that cannot all bind: two on one port, at the same
/// address or where one of them takes every address of the other's family
/// (`0.0.0.0`; `::`, which on Linux takes IPv4 too). Found here, by
/// `config check`, rather than as "address in use" at start.
fn check_listeners(server: &ServerConfig, admin: &AdminConfig, errors: &mut Errors) {
    let mut named = vec![("server.listen", server.listen), ("admin.listen", admin.listen)];
    if let Some(r) = &server.http_redirect {
        named.push(("server.http_redirect_listen", r.listen));
    }
    for (i, &(name, addr)) in named.iter().enumerate() {
        if let Some((other, other_addr)) = named[..i].iter().find(|(_, earlier)| clash(addr, *earlier)) {
            errors.push(name, format!("{addr} takes the port of {other} ({other_addr}): both cannot listen"));
        }
    }
}

/// Whether listeners on `a` and `b` would fight over a port. Port 0 (any
/// free port) never does.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    // `::ffff:127.0.0.1` is 127.0.0.1 to the kernel.
    let canonical = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (a, b) = (canonical(a), canonical(b));
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || wide.is_ipv4() == other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// `[server]`, and apart from it `server.trusted_proxies`, which is
/// reloaded with the routes ([`ProxyConfig::trusted_proxies`]).
fn build_server(table: toml::Table, base: &Path, errors: &mut Errors) -> (Option<ServerConfig>, Vec<IpNet>) {
    let mut f = Fields::new("server", table, errors);
    let listen = f.socket_addr_or("listen", "127.0.0.1:8080");
    let mut trusted_proxies = Vec::new();
    for text in f.string_list("trusted_proxies") {
        match proxy::parse_range(&text) {
            Ok(net) => trusted_proxies.push(net),
            Err(e) => f.error("trusted_proxies", e),
        }
    }
    let tls_t = f.table("tls");
    let header_read_timeout = f.duration_or("header_read_timeout", "10s", Duration::from_millis(10));
    let idle_timeout = f.duration_or("idle_timeout", "75s", Duration::from_millis(10));
    let send_timeout = f.duration_or("send_timeout", "60s", Duration::from_millis(10));
    let max_header_bytes = f.size_or("max_header_size", 16 << 10) as usize;
    if !(8 << 10..=1 << 20).contains(&max_header_bytes) {
        f.error("max_header_size", "must be between 8KiB and 1MiB");
    }
    let max_connections = f.int_or("max_connections", 10_000, 1, 10_000_000) as usize;
    let shutdown_grace = f.duration_or("shutdown_grace", "30s", Duration::ZERO);
    let tunnel_idle_timeout = f.duration_or("tunnel_idle_timeout", "10m", Duration::from_millis(10));
    let config_poll = f.duration_or("config_poll", "1s", Duration::ZERO);
    if !config_poll.is_zero() && config_poll < Duration::from_millis(100) {
        f.error("config_poll", "must be 0 (off) or at least 100ms");
    }
    let workers = match f.int_or("workers", 0, 0, 1024) {
        0 => std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        n => n as usize,
    };
    let redirect_listen = f.string("http_redirect_listen");
    // 0: the port of `listen` (the range refuses a 0 written in the file).
    let https_port = u16::try_from(f.int_or("http_redirect_port", 0, 1, 65_535)).unwrap_or(0);
    let http_redirect = match redirect_listen {
        None => {
            if https_port != 0 {
                f.error("http_redirect_port", "is used only with http_redirect_listen");
            }
            None
        }
        Some(text) => match text.parse::<SocketAddr>() {
            Err(_) => {
                f.error("http_redirect_listen", format!("{text:?} is not an address like \"0.0.0.0:80\""));
                None
            }
            Ok(addr) if tls_t.is_empty() => {
                f.error(
                    "http_redirect_listen",
                    format!("{addr} needs [server.tls]: it sends clients to the TLS listener"),
                );
                None
            }
            Ok(addr) => Some(HttpRedirect { listen: addr, https_port: (https_port != 0).then_some(https_port) }),
        },
    };
    f.finish();
    let tls = if tls_t.is_empty() {
        None
    } else {
        let mut t = Fields::new("server.tls", tls_t, errors);
        let cert = t.string("cert");
        let key = t.string("key");
        if cert.is_none() {
            t.error("cert", "is required when [server.tls] is present");
        }
        if key.is_none() {
            t.error("key", "is required when [server.tls] is present");
        }
        t.finish();
        match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsConfig { cert: resolve(base, &cert), key: resolve(base, &key) }),
            _ => None,
        }
    };
    let Some(listen) = listen else { return (None, trusted_proxies) };
    let server = ServerConfig {
        listen,
        tls,
        header_read_timeout,
        idle_timeout,
        send_timeout,
        max_header_bytes: max_header_bytes.clamp(8 << 10, 1 << 20),
        max_connections,
        shutdown_grace,
        workers,
        tunnel_idle_timeout,
        config_poll,
        http_redirect,
    };
    (Some(server), trusted_proxies)
}

fn build_auth(table: toml::Table, base: &Path, errors: &mut Errors) -> AuthConfig {
    let mut f = Fields::new("auth", table, errors);
    let issuer = f.string_or("issuer", "gateway");
    if issuer.is_empty() {
        f.error("issuer", "must not be empty");
    }
    let audience = f.string_or("audience", "gateway");
    if audience.is_empty() {
        f.error("audience", "must not be empty");
    }
    let access_token_ttl = f.duration_or("access_token_ttl", "15m", Duration::from_secs(1));
    let refresh_token_ttl = f.duration_or("refresh_token_ttl", "30d", Duration::from_secs(1));
    let session_lifetime = Some(f.duration_or("session_lifetime", "0s", Duration::ZERO)).filter(|d| !d.is_zero());
    if session_lifetime.is_some_and(|lifetime| lifetime < access_token_ttl) {
        f.error(
            "session_lifetime",
            "must be \"0s\" (no limit) or at least auth.access_token_ttl: every access token would be cut short",
        );
    }
    let keys_dir = resolve(base, &f.string_or("keys_dir", "keys"));
    let registration = f.bool_or("registration", false);
    let password_min_length = f.int_or("password_min_length", 15, 8, MAX_PASSWORD_BYTES as i64) as usize;
    let lockout_threshold = f.int_or("lockout_threshold", 5, 1, 1000) as u32;
    let lockout_duration = f.duration_or("lockout_duration", "15m", Duration::from_secs(1));
    let leeway = f.duration_or("leeway", "5s", Duration::ZERO);
    if leeway > Duration::from_secs(60) {
        f.error("leeway", "must be at most 60s: clocks of replicas are expected to be NTP-synced");
    }
    let revocation_poll = f.duration_or("revocation_poll", "1s", Duration::from_millis(10));
    let revocation_max_staleness = f.duration_or("revocation_max_staleness", "30s", Duration::from_secs(1));
    if revocation_max_staleness < revocation_poll * 2 {
        f.error(
            "revocation_max_staleness",
            "must be at least twice auth.revocation_poll, or every token would be refused",
        );
    }
    let rate_limit_per_minute = f.int_or("rate_limit_per_minute", 60, 0, 1_000_000) as u32;
    let seal_totp_secrets = f.bool_or("seal_totp_secrets", true);
    let mut cors_origins = Vec::new();
    for origin in f.string_list("cors_origins") {
        match parse_origin(&origin) {
            Ok(o) => cors_origins.push(o),
            Err(e) => f.error("cors_origins", e),
        }
    }
    if cors_origins.len() > 1 && cors_origins.iter().any(|o| o == "*") {
        f.error("cors_origins", "\"*\" allows every origin and cannot be listed with others");
    }
    let argon2_t = f.table("argon2");
    let reset_t = f.table("password_reset");
    let mailer_t = f.table("mailer");
    let verification_t = f.table("email_verification");
    let change_t = f.table("email_change");
    let login_link_t = f.table("login_link");
    let registration_given = registration;
    f.finish();
    let mailer = build_mailer(mailer_t, base, errors);
    let mut r = Fields::new("auth.password_reset", reset_t, errors);
    let reset_token_ttl = r.duration_or("token_ttl", "30m", Duration::from_secs(1));
    if reset_token_ttl > Duration::from_secs(86_400) {
        r.error("token_ttl", "must be at most 24h: a reset link is a password for whoever reads the mail");
    }
    r.finish();
    let mut v = Fields::new("auth.email_verification", verification_t, errors);
    let email_verification = EmailVerification {
        required: v.bool_or("required", false),
        token_ttl: v.duration_or("token_ttl", "24h", Duration::from_secs(1)),
    };
    if email_verification.token_ttl > Duration::from_secs(7 * 86_400) {
        v.error("token_ttl", "must be at most 7d");
    }
    if email_verification.required && registration_given && mailer.is_none() {
        v.error("required", "needs auth.mailer: registered users could not be sent their link");
    }
    v.finish();
    let mut c = Fields::new("auth.email_change", change_t, errors);
    let revert_token_ttl = c.duration_or("revert_ttl", "7d", Duration::ZERO);
    if revert_token_ttl > Duration::from_secs(30 * 86_400) {
        c.error("revert_ttl", "must be at most 30d");
    } else if !revert_token_ttl.is_zero() && revert_token_ttl < Duration::from_secs(60) {
        c.error("revert_ttl", "must be \"0s\" (no link) or at least 1m");
    }
    c.finish();
    let mut l = Fields::new("auth.login_link", login_link_t, errors);
    let login_link = LoginLink {
        enabled: l.bool_or("enabled", false),
        token_ttl: l.duration_or("token_ttl", "15m", Duration::from_secs(1)),
        require_code_challenge: l.bool_or("require_code_challenge", false),
    };
    if login_link.token_ttl > Duration::from_secs(3_600) {
        l.error("token_ttl", "must be at most 1h: a sign-in link is a session for whoever reads the mail");
    }
    if login_link.enabled && mailer.is_none() {
        l.error("enabled", "needs auth.mailer: there would be nowhere to send the links");
    }
    if login_link.enabled && registration_given && !email_verification.required {
        l.error(
            "enabled",
            "needs auth.email_verification.required while auth.registration is on: anyone could register \
             someone else's address, keep its password, and let the owner sign in to that account by link",
        );
    }
    l.finish();

    let mut a = Fields::new("auth.argon2", argon2_t, errors);
    let argon2 = Argon2Config {
        memory_kib: a.int_or("memory_kib", 19_456, 8, 4 * 1024 * 1024) as u32,
        iterations: a.int_or("iterations", 2, 1, 100) as u32,
        parallelism: a.int_or("parallelism", 1, 1, 64) as u32,
    };
    if u64::from(argon2.memory_kib) < 8 * u64::from(argon2.parallelism) {
        a.error("memory_kib", "must be at least 8 x parallelism");
    }
    a.finish();

    AuthConfig {
        issuer,
        audience,
        access_token_ttl,
        refresh_token_ttl,
        session_lifetime,
        keys_dir,
        registration,
        password_min_length,
        lockout_threshold,
        lockout_duration,
        leeway,
        revocation_poll,
        revocation_max_staleness,
        rate_limit_per_minute,
        cors_origins,
        argon2,
        mailer,
        reset_token_ttl,
        email_verification,
        revert_token_ttl,
        login_link,
        seal_totp_secrets,
    }
}

fn build_mailer(table: toml::Table, base: &Path, errors: &mut Errors) -> Option<WebhookConfig> {
    let mut f = Fields::new("auth.mailer", table, errors);
    let webhook_given = f.has("webhook");
    let url = f.string("webhook").and_then(|text| match parse_webhook_url(&text) {
        Ok(url) => Some(url),
        Err(e) => {
            f.error("webhook", e);
            None
        }
    });
    let secret_file = f.string("webhook_secret_file").map(|p| resolve(base, &p));
    let notices = f.bool_or("notices", true);
    let webhook = match (url, secret_file) {
        (Some(url), Some(secret_file)) => Some(WebhookConfig { url, secret_file, notices }),
        (Some(_), None) => {
            // Unsigned, anyone who can reach the mailer could have it mail
            // "reset" links of their own making.
            f.error("webhook_secret_file", "is required with auth.mailer.webhook: deliveries are signed");
            None
        }
        (None, Some(_)) => {
            if !webhook_given {
                f.error("webhook_secret_file", "is only used with auth.mailer.webhook");
            }
            None
        }
        (None, None) => None,
    };
    f.finish();
    webhook
}

/// `http(s)://host[:port][/path][?query]`: no credentials, no fragment;
/// `http://` only to a loopback address (a mailer beside the gateway): a
/// delivery carries a live credential.
fn parse_webhook_url(text: &str) -> Result<WebhookUrl, String> {
    // The text is not quoted back: its path or query may hold a key.
    let bad = |why: &str| format!("not a webhook URL: {why}");
    let uri: hyper::Uri = text.parse().map_err(|e| bad(&format!("{e}")))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("needs http:// or https://")),
    };
    let authority = uri.authority().cloned().ok_or_else(|| bad("needs a host"))?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad("needs a host, without credentials"));
    }
    if text.contains('#') {
        return Err(bad("a fragment is never sent"));
    }
    let loopback = authority.host().eq_ignore_ascii_case("localhost")
        || authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err(bad("use https:// (http:// only to a loopback address): a delivery carries a reset token"));
    }
    let default_port = if https { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => authority.as_str().to_owned(),
        _ => authority.host().to_owned(),
    };
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let path_and_query =
        if path_and_query.starts_with('/') { path_and_query.to_owned() } else { format!("/{path_and_query}") };
    Ok(WebhookUrl { https, authority, host, path_and_query })
}

/// An origin as a browser sends it in `Origin`: `http(s)://host[:port]`,
/// no path, no trailing `/`, lower-cased as browsers serialise it, without
/// the scheme's default port (the header is compared byte for byte, so any
/// other spelling would never match); or `*` alone. No wildcard inside.
fn parse_origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_owned());
    }
    let bad = |why: &str| format!("{text:?} is not an origin: {why}");
    let lower = text.to_ascii_lowercase();
    let (authority, default_port) = if let Some(a) = lower.strip_prefix("https://") {
        (a, "443")
    } else if let Some(a) = lower.strip_prefix("http://") {
        (a, "80")
    } else {
        return Err(bad("needs http:// or https://"));
    };
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', '*']) {
        return Err(bad("http(s)://host[:port], without a path, a trailing / or a wildcard"));
    }
    // The port, if any, follows the last ':' outside an IPv6 literal.
    if let Some((_, port)) = authority.rsplit_once(':').filter(|(_, p)| !p.contains(']')) {
        // As a browser writes it: 1-65535, no leading zero.
        if port.starts_with('0') || !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(bad("the port must be a number from 1 to 65535, without leading zeros"));
        }
        if port == default_port {
            return Err(bad("browsers leave the scheme's default port out; so must this"));
        }
    }
    match authority.parse::<hyper::http::uri::Authority>() {
        Ok(_) => Ok(lower),
        Err(_) => Err(bad("the host is not valid")),
    }
}

/// `sqlite://relative/file.db`, `sqlite:///absolute/file.db` or `sqlite:file.db`.
fn parse_database_url(url: &str, base: &Path) -> Result<DatabaseUrl, String> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let file = rest.split('?').next().unwrap_or_default();
        if file.is_empty() {
            return Err(format!("{url:?} names no database file"));
        }
        return Ok(DatabaseUrl::Sqlite(resolve(base, file)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return match url.parse::<sqlx::postgres::PgConnectOptions>() {
            Ok(_) => Ok(DatabaseUrl::Postgres(url.to_owned())),
            Err(e) => Err(format!("{:?} is not a valid PostgreSQL URL ({e})", redact_url(url))),
        };
    }
    Err(format!("{:?} is neither a sqlite:// nor a postgres:// URL", redact_url(url)))
}

/// Drops any password from a URL before it is shown to anyone.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
