//! Assembling and running the gateway.
//!
//! [`App::build`] does everything that can fail at startup (database,
//! migrations, keys, binding both listeners) and returns before serving, so a
//! caller (the binary, or a test) knows the bound addresses. [`App::run`]
//! serves until the shutdown future resolves, then stops accepting, lets
//! in-flight requests finish and returns.

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::keys::KeyRing;
use crate::auth::outbox::Outbox;
use crate::auth::password::PasswordHasher;
use crate::auth::revocation::{self, RevocationState};
use crate::auth::seal::SealingKeys;
use crate::auth::service::AuthService;
use crate::auth::token::TokenRules;
use crate::auth::webhook::Webhook;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::db::audit::NewAuditEvent;
use crate::db::retention::{Pruned, Retention};
use crate::db::{secs, unix_now, Store};
use crate::proxy::identity::IdentityCache;
use crate::proxy::router::RouteTable;
use crate::proxy::tenants::TenantDirectory;
use crate::proxy::upstream::UpstreamClient;
use crate::proxy::Proxy;
use crate::server::Reloader;

/// Verified access tokens kept by the proxy (each a few hundred bytes).
const IDENTITY_CACHE_CAPACITY: u64 = 100_000;

pub struct App {
    config: Config,
    service: AuthService,
    proxy: Proxy,
    reloader: Reloader,
    tls: Option<tokio_rustls::TlsAcceptor>,
    public: std::net::TcpListener,
    admin: TcpListener,
    /// The admin API's tokens (`admin.api_token_file`, `admin.tenant_tokens`);
    /// `None`: the API is off.
    admin_token: Option<crate::admin::api::ApiTokens>,
    /// `server.http_redirect_listen`, bound.
    redirect: Option<TcpListener>,
    metrics: PrometheusHandle,
    /// The mailer's webhook with its kept deliveries (`auth.mailer`).
    outbox: Option<Arc<Outbox>>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let metrics = crate::observability::metrics_handle();
        // The certificate files first (`config check` does not read them):
        // a bad one stops the start before the database or the key
        // directory is touched.
        let cert = config.server.tls.as_ref().map(crate::server::tls::ServerCert::load).transpose()?;
        let client = UpstreamClient::new(&config.upstream).context("building the upstream client")?;
        let store = Store::connect(&config.database).await.context("opening the database")?;
        if config.database.auto_migrate {
            store.migrate().await.context("applying migrations")?;
        }
        let (keys, generated) = KeyRing::load_or_generate(&config.auth.keys_dir).context("loading signing keys")?;
        if let Some(kid) = generated {
            tracing::info!(%kid, dir = %config.auth.keys_dir.display(), "generated a new Ed25519 signing key");
            let event = NewAuditEvent {
                event: "key_generated",
                detail: Some(serde_json::json!({ "kid": kid, "by": "startup" })),
                ..Default::default()
            };
            if let Err(e) = store.record_audit(event).await {
                tracing::warn!(error = %e, "could not record the key_generated audit event");
            }
        }
        let hasher = PasswordHasher::new(config.auth.argon2)?;
        let horizon = config.auth.access_token_ttl + config.auth.leeway;
        let revocations = RevocationState::new(horizon, config.auth.revocation_max_staleness, config.auth.leeway);
        // Revocations from before a restart still bind the tokens they target.
        // Without the database the state starts stale (fail closed) and the
        // poll fills it in once the database answers.
        if let Err(e) = revocations.load_since(&store, unix_now() - secs(horizon) - 10).await {
            tracing::warn!(error = %e, "database unavailable at start: revocation state is stale until it answers");
        }
        let rules = TokenRules::new(&config.auth.issuer, &config.auth.audience, config.auth.leeway.as_secs());
        let authenticator = Authenticator::new(keys, rules, revocations);
        let upstream_tls = client.tls();
        let webhook = match &config.auth.mailer {
            Some(webhook) => Some(Webhook::load(webhook, Arc::clone(&upstream_tls), config.upstream.connect_timeout)?),
            None => None,
        };
        let admin_token = crate::admin::api::ApiTokens::load(&config.admin)?;
        for slug in config.admin.tenant_tokens.iter().flat_map(|t| &t.tenants) {
            if matches!(store.tenant_by_slug(slug).await, Ok(None)) {
                tracing::warn!(
                    tenant = slug,
                    "admin.tenant_tokens names a tenant that does not exist: a tenant made with that slug comes \
                     under the token"
                );
            }
        }
        let sealer = Arc::new(seal_stored_secrets(&store, &config.auth.keys_dir, config.auth.seal_totp_secrets).await?);
        let outbox = webhook.map(|webhook| Arc::new(Outbox::new(webhook, store.clone(), Arc::clone(&sealer))));
        let service =
            AuthService::new(store.clone(), hasher, authenticator.clone(), config.auth.clone(), Arc::clone(&sealer))
                .with_mailer(outbox.clone());

        let tenants = TenantDirectory::default();
        if let Err(e) = tenants.refresh(&store).await {
            tracing::warn!(error = %e, "tenant directory unavailable at start; routes naming tenants deny until it loads");
        }
        let cors = crate::proxy::cors::CorsOrigins::new(&config.auth.cors_origins);
        let api = crate::api::Api::new(service.clone(), &cors, &config.proxy.headers.request_id);
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::new(config.proxy.clone(), cors, None)));
        let identities = IdentityCache::new(IDENTITY_CACHE_CAPACITY, config.auth.leeway);
        let tls = cert.clone().map(crate::server::tls::acceptor).transpose()?;
        let client_for_probes = client.with_own_pool();
        let proxy = Proxy {
            routes: Arc::clone(&routes),
            api: api.clone(),
            authenticator: authenticator.clone(),
            identities: identities.clone(),
            tenants,
            client,
            cooldown: config.upstream.cooldown,
            tunnel_idle_timeout: config.server.tunnel_idle_timeout,
            access_log: config.log.access,
            api_runtime: tokio::runtime::Handle::current(),
        };
        let reloader = Reloader {
            path: config.path.clone(),
            stamp: config.stamp,
            keys_dir: config.auth.keys_dir.clone(),
            sealer,
            routes,
            api,
            authenticator,
            identities,
            tls: cert,
            upstream_tls,
            probes: crate::proxy::health::Probes {
                client: client_for_probes,
                runtime: tokio::runtime::Handle::current(),
            },
            reloading: Arc::default(),
            started: Arc::new(config.clone()),
            admin_tokens: admin_token.clone(),
        };
        crate::server::reload::publish_nothing_pending();

        let public = crate::server::bind_reuseport(config.server.listen)
            .with_context(|| format!("binding server.listen {}", config.server.listen))?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
        if admin_token.is_some() && !config.admin.listen.ip().to_canonical().is_loopback() {
            // The admin listener speaks plain HTTP: the token crosses the
            // network as it is, to whoever can reach the port.
            tracing::warn!(
                listen = %config.admin.listen,
                "the admin API is on and admin.listen is not a loopback address: its bearer token travels \
                 unencrypted; keep the port on a private network only the operators' hosts reach"
            );
        }
        let redirect = match config.server.http_redirect {
            Some(r) => Some(
                TcpListener::bind(r.listen)
                    .await
                    .with_context(|| format!("binding server.http_redirect_listen {}", r.listen))?,
            ),
            None => None,
        };
        Ok(App { config, service, proxy, reloader, tls, public, admin, admin_token, redirect, metrics, outbox })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or(self.config.server.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin.listen)
    }

    /// The plain-HTTP redirect listener's address, when there is one.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Reloads routes (and, on demand, keys) of the running app.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns. Draining
    /// is bounded by one deadline, `server.shutdown_grace` after the stop:
    /// requests and WebSocket tunnels still open then are closed, and
    /// whatever else is still running (a stuck admin connection, a query on
    /// a dead database) is abandoned. Closing the database pool gets at
    /// least a second of its own, even when the workers used the whole grace
    /// (and each worker may take a second more for a blocking DNS lookup).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = {
            let stop_rx = stop_rx.clone();
            move || {
                let mut rx = stop_rx.clone();
                async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                }
            }
        };

        // The public listener first: if a worker cannot start, nothing else
        // has been started yet.
        let addr = self.public_addr();
        let admin_addr = self.admin_addr();
        let mut listeners = vec![self.public];
        for _ in 1..self.config.server.workers {
            listeners.push(crate::server::bind_reuseport(addr).context("binding a worker's listener")?);
        }
        // One budget of connections for the process, the redirect
        // listener's included.
        let slots = Arc::new(tokio::sync::Semaphore::new(self.config.server.max_connections));
        let workers = Arc::new(crate::server::Workers {
            slots: Arc::clone(&slots),
            proxy: self.proxy,
            tls: self.tls,
            settings: self.config.server.clone(),
        });
        let threads = match crate::server::spawn_workers(listeners, &workers, &stop_rx) {
            Ok(threads) => threads,
            Err(e) => {
                let _ = stop_tx.send(true);
                return Err(e.context("starting the public listener's workers"));
            }
        };
        let stopped_at = Arc::new(std::sync::OnceLock::new());
        let mark = Arc::clone(&stopped_at);
        tokio::spawn(async move {
            shutdown.await;
            let _ = mark.set(Instant::now());
            let _ = stop_tx.send(true);
        });
        tracing::info!(public = %addr, admin = %admin_addr, workers = threads.len(), "gateway listening");

        self.reloader.probes.start(&self.reloader.routes.load());
        let store = self.service.store.clone();
        let auth = &self.config.auth;
        let revocations = self.service.authenticator.revocations().clone();
        let mut background = vec![
            tokio::spawn(revocation::poll(
                revocations.clone(),
                store.clone(),
                auth.revocation_poll,
                auth.access_token_ttl + auth.leeway,
                stopped(),
            )),
            tokio::spawn(maintain(
                workers.proxy.tenants.clone(),
                store.clone(),
                auth.revocation_poll,
                auth.lockout_duration,
                stopped(),
            )),
            tokio::spawn(prune_hourly(store.clone(), self.config.database.retention, stopped())),
            tokio::spawn(self.reloader.probes.clone().sweep(stopped())),
            tokio::spawn(self.reloader.clone().watch(self.config.server.config_poll, stopped())),
            tokio::spawn(upkeep(self.metrics.clone(), stopped())),
        ];
        if let Some(outbox) = self.outbox.clone() {
            background.push(tokio::spawn(outbox.sweep(stopped())));
        }
        if let crate::config::DatabaseUrl::Postgres(url) = &self.config.database.url {
            background.push(tokio::spawn(revocation::listen(revocations, store.clone(), url.clone(), stopped())));
        }
        if let (Some(listener), Some(r)) = (self.redirect, self.config.server.http_redirect) {
            // To the port the TLS listener was bound to unless told otherwise.
            let https_port = r.https_port.unwrap_or(addr.port());
            let settings = self.config.server.clone();
            let stop = stopped();
            let listen = listener.local_addr().unwrap_or(r.listen);
            tracing::info!(%listen, https_port, "redirecting plain HTTP to the TLS listener");
            background.push(tokio::spawn(async move {
                crate::server::redirect::serve(listener, https_port, &settings, slots, stop).await;
            }));
        }
        let admin_app = crate::admin::router(self.service.clone(), self.metrics.clone(), self.admin_token.clone());
        let admin = tokio::spawn(axum::serve(self.admin, admin_app).with_graceful_shutdown(stopped()).into_future());

        // Workers drain within shutdown_grace on their own.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        let abort: Vec<_> =
            background.iter().map(tokio::task::JoinHandle::abort_handle).chain([admin.abort_handle()]).collect();
        let service = self.service.clone();
        let grace = self.config.server.shutdown_grace;
        let deadline = stopped_at.get().map_or_else(|| Instant::now() + grace, |at| *at + grace);
        let rest = async {
            for task in background {
                let _ = task.await;
            }
            let admin = admin.await;
            // Mailed links still being delivered (with their retries) go
            // out before the database closes, within the deadline less the
            // second the pool's close is given.
            let budget = deadline.saturating_duration_since(Instant::now()).saturating_sub(Duration::from_secs(1));
            if tokio::time::timeout(budget, service.links_delivered()).await.is_err() {
                tracing::warn!("mailed links still being delivered at the end of the grace period are abandoned");
            }
            store.close().await;
            admin
        };
        // The workers drained within their grace; the rest shares the same
        // deadline (background tasks and the admin listener have been
        // stopping since the stop, alongside the workers).
        let left = deadline.saturating_duration_since(Instant::now());
        let admin = match tokio::time::timeout(left.max(Duration::from_secs(1)), rest).await {
            Ok(admin) => admin,
            Err(_) => {
                tracing::warn!("background tasks did not stop within the grace period; abandoning them");
                abort.iter().for_each(tokio::task::AbortHandle::abort);
                Ok(Ok(()))
            }
        };
        tracing::info!("gateway stopped");
        admin.context("admin listener task")?.context("admin listener")?;
        Ok(())
    }
}

/// Keeps the Prometheus histograms drained until `shutdown`.
async fn upkeep(handle: PrometheusHandle, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
        }
    }
}

/// Background upkeep: refreshes the tenant directory every `every`, and once
/// an hour deletes lockout counters idle for a day (or the lockout duration,
/// if longer).
async fn maintain(
    tenants: TenantDirectory,
    store: Store,
    every: Duration,
    lockout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last_purge: Option<Instant> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = tenants.refresh(&store).await {
            tracing::warn!(error = %e, "tenant directory refresh failed");
        }
        if last_purge.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            last_purge = Some(Instant::now());
            match store.purge_idle_login_attempts(lockout).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "purged idle lockout counters"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lockout counter purge failed"),
            }
            match store.purge_email_links(unix_now()).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "purged expired and spent email links"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "email link purge failed"),
            }
            match store.clear_stale_totp_setups(unix_now() - crate::auth::service::MFA_SETUP_TTL).await {
                Ok(n) if n > 0 => tracing::info!(cleared = n, "cleared TOTP setups never confirmed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "clearing stale TOTP setups failed"),
            }
            match store.purge_deliveries(unix_now()).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "purged expired deliveries the mailer never took"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "delivery purge failed"),
            }
        }
    }
}

/// Loads the secrets keys (or makes `secrets.key`, on first start); with
/// `seal` (`auth.seal_totp_secrets`), reseals with the newest key the
/// secrets stored as they are (from before sealing) or sealed with an
/// older key (before a rotation reached this replica). Says so in an error
/// when the keys do not open a stored secret (another replica's keys, or a
/// key removed while it held secrets), and then reseals nothing. Without
/// the database, the rest waits for the next start: secrets stored as they
/// are are read as they are meanwhile.
async fn seal_stored_secrets(store: &Store, keys_dir: &std::path::Path, seal: bool) -> anyhow::Result<SealingKeys> {
    let (sealer, made) = SealingKeys::load_or_generate(keys_dir).context("loading the secrets keys")?;
    // Setups too old to confirm are cleared first: neither checked against
    // the keys nor resealed (one sealed with a key since removed would
    // otherwise stop every reseal).
    if let Err(e) = store.clear_stale_totp_setups(unix_now() - crate::auth::service::MFA_SETUP_TTL).await {
        tracing::warn!(error = %e, "could not clear the TOTP setups never confirmed");
    }
    if made {
        tracing::info!(dir = %keys_dir.display(), "generated the key that seals stored TOTP secrets");
        let event = NewAuditEvent {
            event: "key_generated",
            detail: Some(serde_json::json!({ "key": crate::auth::seal::KEY_FILE, "by": "startup" })),
            ..Default::default()
        };
        if let Err(e) = store.record_audit(event).await {
            tracing::warn!(error = %e, "could not record the key_generated audit event");
        }
    }
    let opens = match crate::auth::seal::check_opens(store, &sealer).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "the secrets keys do not open the stored TOTP secrets: those users cannot log in (are they the \
                 keys the other replicas use? was one removed while it held secrets?); nothing is resealed"
            );
            false
        }
    };
    // A key that does not open what is stored is not the deployment's:
    // sealing with it would lock the other replicas out of those secrets.
    if seal && opens {
        match crate::auth::seal::rewrite_stored(store, &sealer, true).await {
            Ok(0) => {}
            Ok(sealed) => tracing::info!(
                sealed,
                "sealed with the newest secrets key the TOTP secrets stored as they were or sealed with an older one"
            ),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not reseal every stored TOTP secret with the newest secrets key (those that do not open \
                     stay as they are until an operator resets them; the rest, a later start retries)"
                );
            }
        }
    }
    Ok(sealer)
}

/// Deletes what `retention` no longer keeps ([`Store::prune`]) a second
/// after the start and then every hour, until `shutdown`. A task of its own:
/// a first prune of a large database may take a while, and nothing else
/// waits for it.
async fn prune_hourly(store: Store, retention: Retention, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(3600);
        tokio::select! {
            () = &mut shutdown => return,
            result = store.prune(retention) => match result {
                Ok(pruned) => record_pruned(pruned),
                Err(e) => tracing::warn!(error = %e, "pruning ended sessions and old records failed; next try in an hour"),
            },
        }
    }
}

/// Logs and counts (`gateway_pruned_rows_total{table}`) what a prune deleted.
pub fn record_pruned(pruned: Pruned) {
    let Pruned { sessions, refresh_tokens, audit_events } = pruned;
    for (table, n) in [("sessions", sessions), ("refresh_tokens", refresh_tokens), ("audit_events", audit_events)] {
        metrics::counter!("gateway_pruned_rows_total", "table" => table).increment(n);
    }
    if sessions + refresh_tokens + audit_events > 0 {
        tracing::info!(sessions, refresh_tokens, audit_events, "pruned ended sessions and old records");
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}
