//! Active health checks: a route's `health_check` probes each of its
//! upstreams every `interval`, and the round robin skips those that failed.
//!
//! The passive rule (a refused connection cools an upstream down for
//! `upstream.cooldown`) only learns of an upstream that no longer accepts
//! connections, and only by failing a request on it. A probe also finds
//! one that accepts but answers errors (a 503 from an app that lost its
//! database) or hangs, before clients do.
//!
//! The rules, as operators of Envoy, Traefik or HAProxy expect them:
//! - a probe is a `GET` of `path` (as written, not under the upstream's
//!   base path) with the upstream's `Host` and `User-Agent:
//!   gateway-health-check`, and no identity or credential of any kind;
//!   it passes on a 2xx or 3xx answer whose head and body (read up to
//!   64 KiB) arrive within `timeout`;
//! - an upstream is taken out after `unhealthy_after` failed probes in a
//!   row and brought back after `healthy_after` passed ones; it starts
//!   in, so a start or a reload never sends traffic nowhere;
//! - an upstream taken out leaves its share to all the others, not to the
//!   next in turn; when every upstream of a route is out, requests (and
//!   the retry of a refused connection) go to all of them as if none were
//!   (as Envoy's "panic" threshold does): a probe that is wrong (a path the
//!   app does not serve) must not turn into an outage;
//! - a reload that keeps the route's name, its `health_check` and an
//!   upstream's URL keeps that upstream's state and its probe.
//!
//! Probes run on the runtime that serves the API and the background tasks,
//! with a client of their own (its own connection pool, the same TLS
//! settings), one task per upstream and route. A task holds its upstream's
//! state weakly and ends at the first probe after no route table holds it.
//! State changes are logged, and every probe writes the state to
//! `gateway_upstream_healthy{route, upstream}` (1 or 0). The probes' pool
//! is swept like a worker's ([`Probes::sweep`]), so connections to
//! upstreams a reload removed close after `upstream.pool_idle_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use http_body_util::BodyExt as _;
use hyper::header::{HOST, USER_AGENT};
use hyper::{Method, Request};

use super::router::RouteTable;
use super::upstream::{Target, UpstreamClient};
use crate::body::Body;
use crate::config::{HealthCheck, UpstreamTarget};

/// What the probes of one upstream of one route share with its route.
#[derive(Debug)]
pub struct UpstreamHealth {
    healthy: AtomicBool,
    /// Set when its probing task is spawned.
    probed: AtomicBool,
    route: String,
    target: UpstreamTarget,
    check: HealthCheck,
    /// `gateway_upstream_healthy{route, upstream}`, registered once.
    gauge: metrics::Gauge,
}

impl UpstreamHealth {
    pub fn new(route: &str, target: &UpstreamTarget, check: &HealthCheck) -> Self {
        let gauge =
            metrics::gauge!("gateway_upstream_healthy", "route" => route.to_owned(), "upstream" => target.to_string());
        Self {
            healthy: AtomicBool::new(true),
            probed: AtomicBool::new(false),
            route: route.to_owned(),
            target: target.clone(),
            check: check.clone(),
            gauge,
        }
    }

    /// Whether this state serves `route`'s upstream `target` probed as
    /// `check` (a reload keeps it then).
    pub fn serves(&self, route: &str, target: &UpstreamTarget, check: &HealthCheck) -> bool {
        self.route == route && self.target == *target && self.check == *check
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Takes the upstream out (`false`) or brings it back.
    pub(crate) fn set(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }
}

/// Where probes run, and with what.
#[derive(Clone)]
pub struct Probes {
    /// A pool of its own, the workers' TLS settings.
    pub client: UpstreamClient,
    pub runtime: tokio::runtime::Handle,
}

impl Probes {
    /// Closes the probes' idle connections past `upstream.pool_idle_timeout`
    /// until `shutdown`, as each worker does for its own pool.
    pub async fn sweep(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.client.sweep_interval());
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = tick.tick() => self.client.sweep(),
            }
        }
    }

    /// Starts the probes of `table`'s upstreams that have none yet (the
    /// running ones go on with the states a reload kept).
    pub fn start(&self, table: &RouteTable) {
        for health in table.health_states() {
            if !health.probed.swap(true, Ordering::Relaxed) {
                self.runtime.spawn(probe_forever(Arc::downgrade(health), self.client.clone()));
            }
        }
    }
}

/// Probes every `interval` while a route table holds `health`.
async fn probe_forever(health: Weak<UpstreamHealth>, client: UpstreamClient) {
    let (mut passed, mut failed) = (0_u32, 0_u32);
    let interval = match health.upgrade() {
        Some(h) => {
            gauge(&h, true);
            h.check.interval
        }
        None => return,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(h) = health.upgrade() else { return };
        match probe(&client, &h.target, &h.check).await {
            Ok(()) => {
                (passed, failed) = (passed.saturating_add(1), 0);
                if !h.is_healthy() && passed >= h.check.healthy_after {
                    h.set(true);
                    tracing::info!(route = %h.route, upstream = %h.target, "upstream passed its health checks; back in");
                }
            }
            Err(why) => {
                (passed, failed) = (0, failed.saturating_add(1));
                if h.is_healthy() && failed >= h.check.unhealthy_after {
                    h.set(false);
                    tracing::warn!(route = %h.route, upstream = %h.target, reason = %why, "upstream failed its health checks; taken out");
                } else {
                    tracing::debug!(route = %h.route, upstream = %h.target, reason = %why, "health check failed");
                }
            }
        }
        // Every probe, not only a change: a probe of a state a reload just
        // replaced may have written the same series last.
        gauge(&h, h.is_healthy());
    }
}

fn gauge(h: &UpstreamHealth, healthy: bool) {
    h.gauge.set(if healthy { 1.0 } else { 0.0 });
}

/// One probe: a 2xx or 3xx answer, head and body (read up to 64 KiB, so
/// that the connection can be used again) within the timeout.
async fn probe(client: &UpstreamClient, target: &UpstreamTarget, check: &HealthCheck) -> Result<(), String> {
    let (path, query) = check.path.split_once('?').map_or((check.path.as_str(), None), |(p, q)| (p, Some(q)));
    let origin = Target { base: "", path, query };
    let request = Request::builder()
        .method(Method::GET)
        .header(HOST, target.host.clone())
        .header(USER_AGENT, "gateway-health-check")
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = client.send(target, &origin, &[], request, Instant::now()).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let mut body = http_body_util::Limited::new(response.into_body(), 64 * 1024);
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("answered {}", status.as_u16()))
        }
    };
    tokio::time::timeout(check.timeout, exchange).await.unwrap_or_else(|_| Err("timed out".to_owned()))
}
