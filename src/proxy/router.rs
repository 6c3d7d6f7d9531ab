//! The route table: host + longest segment-aware prefix, then method.
//!
//! Built once per config (re)load and swapped atomically; matching is a
//! linear scan over routes pre-sorted so that the first hit is the answer:
//! host-specific routes before host-less ones, longer prefixes first. For the
//! tens of routes a gateway has this beats any index, and allocates nothing.
//!
//! Routes may share a host and prefix when their `methods` do not overlap
//! (config check refuses overlaps). They sort next to each other, those
//! listing methods before the one (at most) listing none, and the request's
//! method picks among them; a method none of them takes is a 405 rather than
//! a fall-through to a shorter prefix, whose policy may be weaker.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hyper::Method;

use crate::config::{HeaderNames, ProxyConfig, RouteConfig, UpstreamTarget};
use crate::proxy::cors::CorsOrigins;
use crate::proxy::health::UpstreamHealth;
use crate::proxy::ratelimit::RateLimiter;

/// The statuses whose request counters a route keeps at hand.
const COMMON_STATUSES: [u16; 17] =
    [200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 413, 429, 500, 502, 503, 504];

/// Why no route takes a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No route's host and prefix match.
    NoRoute,
    /// Routes match the host and prefix, but none takes the method; the
    /// methods they do take, for `Allow`.
    Method(String),
}

/// A configured route plus its run-time state (round-robin position and the
/// cool-down of upstreams that refused connections).
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    /// The route name as a metrics label: cloning it is a reference count,
    /// not an allocation.
    pub label: metrics::SharedString,
    /// Pre-registered per-route histograms (no registry lookup per request).
    pub request_duration: metrics::Histogram,
    pub upstream_duration: metrics::Histogram,
    /// `X-Forwarded-Prefix` for a route that strips its prefix, so that a
    /// backend can write links the client can follow.
    pub forwarded_prefix: Option<hyper::header::HeaderValue>,
    /// `gateway_requests_total{route, status}` for the usual statuses,
    /// registered on first use (index: position in [`COMMON_STATUSES`]): a
    /// labelled `counter!` costs a key allocation and a registry lookup.
    requests: [OnceLock<metrics::Counter>; COMMON_STATUSES.len()],
    next: AtomicUsize,
    /// Per upstream: milliseconds since `epoch` until which it is skipped.
    cooldown_until: Vec<AtomicU64>,
    epoch: Instant,
    /// The route's `rate_limit`, kept across reloads that do not change it
    /// (see [`RouteTable::new`]).
    pub limiter: Option<Arc<RateLimiter>>,
    /// Per upstream, with a `health_check`: what its probes found (empty
    /// without one).
    health: Vec<Arc<UpstreamHealth>>,
    /// The fields taken out of an HTTP/2 upstream's trailers (only such
    /// answers have any): the route's `remove_response_headers`, and every
    /// field the gateway sets on its answers (the route's and the
    /// listener's `response_headers`), whose value a trailer must not
    /// contradict after the head.
    pub trailer_strip: Arc<[hyper::header::HeaderName]>,
}

impl Route {
    /// `kept`: the limiter of the route of the same name in the table being
    /// replaced, used if it enforces this route's `rate_limit`; `previous`:
    /// that table, whose health states this route takes over where they
    /// probe the same upstream the same way.
    fn new(
        config: RouteConfig,
        kept: Option<Arc<RateLimiter>>,
        previous: Option<&RouteTable>,
        listener_fields: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
    ) -> Self {
        let mut trailer_strip = config.remove_response_headers.clone();
        for (name, _) in config.response_headers.iter().chain(listener_fields) {
            if !trailer_strip.contains(name) {
                trailer_strip.push(name.clone());
            }
        }
        let cooldown_until = config.upstreams.iter().map(|_| AtomicU64::new(0)).collect();
        let mut health: Vec<Arc<UpstreamHealth>> = Vec::new();
        if let Some(check) = &config.health_check {
            for target in &config.upstreams {
                // An upstream listed twice (for twice the share) has one state.
                let twin = health.iter().find(|h| h.serves(&config.name, target, check));
                let old = || previous.and_then(|t| t.health_states().find(|h| h.serves(&config.name, target, check)));
                let state = twin.or_else(old).cloned();
                health.push(state.unwrap_or_else(|| Arc::new(UpstreamHealth::new(&config.name, target, check))));
            }
        }
        let label = metrics::SharedString::from_shared(Arc::<str>::from(config.name.as_str()));
        let request_duration = metrics::histogram!("gateway_request_duration_seconds", "route" => label.clone());
        let upstream_duration = metrics::histogram!("gateway_upstream_duration_seconds", "route" => label.clone());
        let forwarded_prefix = (config.strip_prefix && config.prefix != "/")
            .then(|| hyper::header::HeaderValue::from_str(&config.prefix).ok())
            .flatten();
        let limiter = config.rate_limit.map(|limit| match kept {
            Some(kept) if *kept.settings() == limit => kept,
            _ => Arc::new(RateLimiter::new(limit, label.clone())),
        });
        Self {
            label,
            request_duration,
            upstream_duration,
            forwarded_prefix,
            requests: Default::default(),
            next: AtomicUsize::new(0),
            cooldown_until,
            epoch: Instant::now(),
            limiter,
            health,
            trailer_strip: trailer_strip.into(),
            config,
        }
    }

    /// Whether this route serves `method` (a route without `methods`
    /// serves every one).
    pub fn takes(&self, method: &Method) -> bool {
        self.config.methods.is_empty() || self.config.methods.contains(method)
    }

    /// Counts one request answered with `status` (label: `status_label`).
    pub fn count_request(&self, status: u16, status_label: metrics::SharedString) {
        match COMMON_STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.requests[i]
                .get_or_init(|| {
                    metrics::counter!("gateway_requests_total", "route" => self.label.clone(), "status" => status_label)
                })
                .increment(1),
            None => {
                metrics::counter!("gateway_requests_total", "route" => self.label.clone(), "status" => status_label)
                    .increment(1);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next upstream in round-robin order, skipping those cooling down
    /// or taken out by their health checks; when none is left, those not
    /// cooling down, else the next in turn. Returns its index.
    pub fn pick(&self) -> usize {
        let n = self.config.upstreams.len();
        if n == 1 {
            // Its only upstream, cooling down or not: no shared counter to
            // bump on every request.
            return 0;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let start = turn % n;
        // The common case, nothing cooling down, needs no clock read.
        if self.cooldown_until[start].load(Ordering::Relaxed) == 0 && self.healthy(start) {
            return start;
        }
        // The turn among those that qualify, so that the share of one left
        // out is spread over all the others rather than given to the next.
        let now = self.now_ms();
        let nth = |fits: &dyn Fn(usize) -> bool| {
            let m = (0..n).filter(|&i| fits(i)).count();
            (m > 0).then(|| (0..n).filter(|&i| fits(i)).nth(turn % m)).flatten()
        };
        nth(&|i| self.healthy(i) && self.available(i, now))
            .or_else(|| nth(&|i| self.available(i, now)))
            .unwrap_or(start)
    }

    /// The upstream after `i` that is neither cooling down nor taken out;
    /// when none is, one that is not cooling down (as [`Route::pick`]).
    pub fn next_after(&self, i: usize) -> Option<usize> {
        let n = self.config.upstreams.len();
        let now = self.now_ms();
        let after = || (1..n).map(|k| (i + k) % n);
        after()
            .find(|&j| self.healthy(j) && self.available(j, now))
            .or_else(|| after().find(|&j| self.available(j, now)))
    }

    /// Whether upstream `i` passes its health checks (always, without).
    fn healthy(&self, i: usize) -> bool {
        self.health.get(i).is_none_or(|h| h.is_healthy())
    }

    /// Whether upstream `i` is out of its cool-down at `now`; an expired
    /// cool-down is cleared (unless a new one was set meanwhile), so that
    /// [`Route::pick`] takes its fast path again.
    fn available(&self, i: usize, now: u64) -> bool {
        let until = self.cooldown_until[i].load(Ordering::Relaxed);
        if until > now {
            return false;
        }
        if until != 0 {
            let _ = self.cooldown_until[i].compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        true
    }

    /// Skips upstream `i` for `cooldown`.
    pub fn cool_down(&self, i: usize, cooldown: Duration) {
        // Never 0, which means "not cooling down".
        let until = self.now_ms().saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX)).max(1);
        self.cooldown_until[i].store(until, Ordering::Relaxed);
    }

    pub fn upstream(&self, i: usize) -> &UpstreamTarget {
        &self.config.upstreams[i]
    }

    /// The path to send upstream for the normalised request `path`, in two
    /// parts (the upstream's base path, then the rest), which the upstream
    /// client writes one after the other.
    pub fn upstream_path<'a>(&'a self, i: usize, path: &'a str) -> [&'a str; 2] {
        let rest = if self.config.strip_prefix && self.config.prefix != "/" {
            let r = &path[self.config.prefix.len()..];
            if r.is_empty() {
                "/"
            } else {
                r
            }
        } else {
            path
        };
        [&self.config.upstreams[i].base_path, rest]
    }
}

/// Routes and header names of one configuration generation.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    pub headers: HeaderNames,
    /// `auth.cors_origins`, for the answers the gateway makes itself:
    /// reloaded with the routes.
    pub cors: CorsOrigins,
    /// `forward_auth.enabled`, reloaded with the routes.
    pub forward_auth: bool,
    /// `server.trusted_proxies`, reloaded with the routes.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl RouteTable {
    /// The table for `config`. `previous`, the table it replaces on a
    /// reload, hands over the limiters of routes that keep their name and
    /// `rate_limit`: a reload (of anything) must not give every client a
    /// new allowance.
    pub fn new(config: ProxyConfig, cors: CorsOrigins, previous: Option<&RouteTable>) -> Self {
        let kept = |route: &RouteConfig| {
            let old = previous?.routes.iter().find(|o| o.config.name == route.name)?;
            old.limiter.as_ref()
        };
        let mut routes: Vec<Arc<Route>> = config
            .routes
            .into_iter()
            .map(|r| {
                let kept = kept(&r).cloned();
                Arc::new(Route::new(r, kept, previous, &config.headers.response_headers))
            })
            .collect();
        // Host-specific first, then longer prefixes; routes sharing a host
        // and prefix next to each other, the one taking every method last.
        routes.sort_by(|a, b| {
            let (a, b) = (&a.config, &b.config);
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.prefix.len().cmp(&a.prefix.len()))
                .then_with(|| a.host.cmp(&b.host))
                .then_with(|| a.prefix.cmp(&b.prefix))
                .then(a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        Self {
            routes,
            headers: config.headers,
            cors,
            forward_auth: config.forward_auth,
            trusted_proxies: config.trusted_proxies,
        }
    }

    /// Every upstream's health state, of the routes with a `health_check`.
    pub fn health_states(&self) -> impl Iterator<Item = &Arc<UpstreamHealth>> {
        self.routes.iter().flat_map(|r| r.health.iter())
    }

    /// The route for `host` (without port; any case), a normalised path and
    /// `method`. `announced` is the method a CORS preflight announces
    /// (`Access-Control-Request-Method`): an `OPTIONS` no route there lists
    /// goes to the route that will serve the request it announces, whose
    /// `cors_preflight` then decides.
    pub fn find(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        announced: Option<&Method>,
    ) -> Result<&Arc<Route>, Miss> {
        let start = self
            .routes
            .iter()
            .position(|r| {
                let host_ok = match (&r.config.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
                host_ok && prefix_matches(&r.config.prefix, path)
            })
            .ok_or(Miss::NoRoute)?;
        let first = &self.routes[start];
        // The usual case: the only route at this host and prefix takes
        // every method.
        if first.config.methods.is_empty() {
            return Ok(first);
        }
        let group = self.routes[start..]
            .iter()
            .take_while(|r| r.config.host == first.config.host && r.config.prefix == first.config.prefix);
        let listing = |m: &Method| group.clone().find(|r| r.config.methods.contains(m));
        listing(method)
            .or_else(|| announced.filter(|_| *method == Method::OPTIONS).and_then(listing))
            .or_else(|| group.clone().find(|r| r.config.methods.is_empty()))
            .ok_or_else(|| {
                let allow: Vec<&str> = group.flat_map(|r| &r.config.methods).map(Method::as_str).collect();
                Miss::Method(allow.join(", "))
            })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Segment-aware: `/api/orders` matches `/api/orders` and `/api/orders/7`,
/// not `/api/ordersx`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The request's host, lower-case, without port or trailing dot.
pub fn normalize_host(raw: &str) -> &str {
    let without_port = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets, drop ":port" after them.
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    without_port.trim_end_matches('.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(routes: &str) -> Config {
        Config::parse(routes, std::path::Path::new("/tmp/gateway.toml")).expect("valid config")
    }

    fn table(routes: &str) -> RouteTable {
        RouteTable::new(parse(routes).proxy, CorsOrigins::default(), None)
    }

    const ROUTES: &str = r#"
        [[routes]]
        name = "root"
        prefix = "/"
        upstreams = ["http://127.0.0.1:1"]
        auth = "public"
        [[routes]]
        name = "api"
        prefix = "/api"
        upstreams = ["http://127.0.0.1:2"]
        [[routes]]
        name = "orders"
        prefix = "/api/orders"
        upstreams = ["http://127.0.0.1:3/base"]
        strip_prefix = true
        [[routes]]
        name = "orders-host"
        prefix = "/api"
        host = "API.example.com."
        upstreams = ["http://127.0.0.1:4"]
    "#;

    #[test]
    fn longest_segment_prefix_and_host_first() {
        let t = table(ROUTES);
        let name =
            |host: Option<&str>, path: &str| t.find(host, path, &Method::GET, None).ok().map(|r| r.config.name.clone());
        assert_eq!(name(None, "/api/orders/7").as_deref(), Some("orders"));
        assert_eq!(name(None, "/api/orders").as_deref(), Some("orders"));
        assert_eq!(name(None, "/api/ordersx").as_deref(), Some("api"));
        assert_eq!(name(None, "/apix").as_deref(), Some("root"));
        assert_eq!(name(Some("api.example.com"), "/api/orders/7").as_deref(), Some("orders-host"));
        assert_eq!(name(Some("other.example.com"), "/api/orders/7").as_deref(), Some("orders"));
    }

    #[test]
    fn methods_choose_among_routes_sharing_a_prefix() {
        let t = table(
            r#"
            [[routes]]
            name = "shorter"
            prefix = "/api"
            upstreams = ["http://127.0.0.1:1"]
            auth = "public"
            [[routes]]
            name = "write"
            prefix = "/api/orders"
            methods = ["POST", "DELETE"]
            upstreams = ["http://127.0.0.1:2"]
            [[routes]]
            name = "read"
            prefix = "/api/orders"
            methods = ["GET", "HEAD"]
            cors_preflight = true
            upstreams = ["http://127.0.0.1:3"]
            [[routes]]
            name = "same-length"
            prefix = "/api/ordera"
            upstreams = ["http://127.0.0.1:4"]
            [[routes]]
            name = "host-read"
            host = "a.example"
            prefix = "/api/orders"
            methods = ["GET", "HEAD"]
            upstreams = ["http://127.0.0.1:5"]
            [[routes]]
            name = "host-rest"
            host = "a.example"
            prefix = "/api/orders"
            upstreams = ["http://127.0.0.1:6"]
            "#,
        );
        let find = |host: Option<&str>, method: &str, announced: Option<&str>| {
            let method = Method::from_bytes(method.as_bytes()).expect("method");
            let announced = announced.map(|m| Method::from_bytes(m.as_bytes()).expect("method"));
            t.find(host, "/api/orders/7", &method, announced.as_ref()).map(|r| r.config.name.clone())
        };
        assert_eq!(find(None, "GET", None).as_deref(), Ok("read"));
        assert_eq!(find(None, "DELETE", None).as_deref(), Ok("write"));
        // Not a fall-through to "/api", whose policy is weaker.
        assert_eq!(find(None, "PUT", None), Err(Miss::Method("POST, DELETE, GET, HEAD".into())));
        assert_eq!(find(None, "OPTIONS", None), Err(Miss::Method("POST, DELETE, GET, HEAD".into())));
        // A preflight goes where the request it announces will.
        assert_eq!(find(None, "OPTIONS", Some("DELETE")).as_deref(), Ok("write"));
        assert_eq!(find(None, "OPTIONS", Some("GET")).as_deref(), Ok("read"));
        assert!(find(None, "OPTIONS", Some("PUT")).is_err());
        // Only an OPTIONS announces anything.
        assert!(find(None, "PUT", Some("GET")).is_err());
        // The route without methods takes what the others do not list.
        assert_eq!(find(Some("a.example"), "GET", None).as_deref(), Ok("host-read"));
        assert_eq!(find(Some("a.example"), "PUT", None).as_deref(), Ok("host-rest"));
        assert_eq!(find(Some("a.example"), "OPTIONS", Some("GET")).as_deref(), Ok("host-read"));
        assert_eq!(find(Some("a.example"), "OPTIONS", Some("PUT")).as_deref(), Ok("host-rest"));
        assert_eq!(
            t.find(None, "/api/ordera", &Method::PUT, None).map(|r| r.config.name.clone()).as_deref(),
            Ok("same-length")
        );
        assert_eq!(t.find(None, "/x", &Method::GET, None).map(|r| r.config.name.clone()), Err(Miss::NoRoute));
        // A host's routes at a prefix stop there: no fall-through to the
        // host-less routes at the same prefix either.
        let t = table(
            r#"
            [[routes]]
            name = "any-host"
            prefix = "/p"
            upstreams = ["http://127.0.0.1:1"]
            [[routes]]
            name = "host-get"
            host = "a.example"
            prefix = "/p"
            methods = ["GET", "HEAD"]
            upstreams = ["http://127.0.0.1:2"]
            "#,
        );
        let find =
            |host: Option<&str>, method: Method| t.find(host, "/p", &method, None).map(|r| r.config.name.clone());
        assert_eq!(find(Some("a.example"), Method::POST), Err(Miss::Method("GET, HEAD".into())));
        assert_eq!(find(Some("b.example"), Method::POST).as_deref(), Ok("any-host"));
    }

    #[test]
    fn strip_prefix_and_base_path() {
        let t = table(ROUTES);
        let r = t.find(None, "/api/orders/7", &Method::GET, None).expect("route");
        assert_eq!(r.upstream_path(0, "/api/orders/7").concat(), "/base/7");
        assert_eq!(r.upstream_path(0, "/api/orders").concat(), "/base/");
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(normalize_host("example.com:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }

    #[test]
    fn round_robin_skips_upstreams_out_by_health_checks_unless_all_are() {
        let routes = r#"
            [[routes]]
            name = "hc"
            prefix = "/"
            upstreams = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
            health_check = { path = "/healthz" }
            "#;
        let t = table(routes);
        let r = t.find(None, "/", &Method::GET, None).expect("route");
        assert_eq!(t.health_states().count(), 3);
        assert_eq!((r.pick(), r.pick(), r.pick()), (0, 1, 2), "every upstream starts in");
        r.health[1].set(false);
        let picks: Vec<usize> = (0..60).map(|_| r.pick()).collect();
        let share = |i| picks.iter().filter(|&&p| p == i).count();
        assert_eq!((share(0), share(1), share(2)), (30, 0, 30), "its share goes to both others: {picks:?}");
        assert_eq!(r.next_after(0), Some(2), "a retry skips it too");
        // Out and cooling down: the next one in turn.
        r.cool_down(2, Duration::from_secs(60));
        assert!((0..6).all(|_| r.pick() == 0));
        // Every one out: all of them in turn, as if none were.
        r.health[0].set(false);
        r.health[2].set(false);
        let picks: Vec<usize> = (0..6).map(|_| r.pick()).collect();
        assert!(picks.contains(&0) && picks.contains(&1) && !picks.contains(&2), "cooling still counts: {picks:?}");
        assert_eq!(r.next_after(0), Some(1), "and a retry goes on, as if none were out");

        // A reload that keeps the route, its check and an upstream keeps
        // that upstream's state; a changed check starts afresh.
        let same = RouteTable::new(parse(routes).proxy, CorsOrigins::default(), Some(&t));
        let kept = same.find(None, "/", &Method::GET, None).expect("route");
        assert!(Arc::ptr_eq(&kept.health[1], &r.health[1]) && !kept.health[1].is_healthy());
        let changed = routes.replace("/healthz", "/ready");
        let fresh = RouteTable::new(parse(&changed).proxy, CorsOrigins::default(), Some(&t));
        assert!(fresh.health_states().all(|h| h.is_healthy()), "a new check starts with every upstream in");
    }

    #[test]
    fn round_robin_skips_cooling_upstreams() {
        let t = table(
            r#"
            [[routes]]
            name = "rr"
            prefix = "/"
            upstreams = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
            "#,
        );
        let r = t.find(None, "/", &Method::GET, None).expect("route");
        assert_eq!((r.pick(), r.pick(), r.pick(), r.pick()), (0, 1, 2, 0));
        r.cool_down(2, Duration::from_secs(60));
        let picks: Vec<usize> = (0..6).map(|_| r.pick()).collect();
        assert!(!picks.contains(&2), "{picks:?}");
        assert_eq!(r.next_after(1), Some(0));

        // A cool-down that has passed is over: the upstream is picked again.
        r.cool_down(0, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        r.cool_down(2, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        let picks: Vec<usize> = (0..6).map(|_| r.pick()).collect();
        assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
        assert!(r.cooldown_until.iter().all(|u| u.load(Ordering::Relaxed) == 0), "expired cool-downs are cleared");
    }
}
