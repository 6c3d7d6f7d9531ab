//! A route's request rate limit (`rate_limit` on a route): so many
//! requests per period for each user, tenant or client address, past which
//! the gateway answers 429 `rate_limited` with `Retry-After` and the
//! upstream never sees the request.
//!
//! The algorithm is GCRA (the generic cell rate algorithm, as in nginx's
//! `limit_req` and the `governor` crate): each key holds one number, the
//! time at which its allowance would be whole again. A request moves it on
//! by one emission interval (`per / requests`, rounded up to the
//! nanosecond) and is refused if that would put it more than `requests`
//! intervals ahead of now. So a key may spend its whole
//! allowance at once, then goes on at the steady rate; unlike fixed windows
//! there is no doubled burst at a window's edge. The number is one atomic,
//! updated by compare-and-swap: no lock on the request path.
//!
//! Keys live in a moka cache and are dropped after `per` without a request,
//! when their allowance is whole again anyway, so memory is bounded by the
//! keys seen in the last period and a cap ([`MAX_KEYS`], about 200 bytes
//! each). Past the cap the least recently used key goes (an LRU policy, not
//! moka's default TinyLFU, which would refuse to admit a new key and so
//! hand it a whole allowance on every request). The limit is per process:
//! with N replicas a key may get up to N times the allowance (README).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use uuid::Uuid;

use crate::auth::ratelimit::client_block;
use crate::config::{RateLimit, RateLimitKey};

/// Keys tracked at most per route: past this, the least recently used go
/// (and start again with a whole allowance).
pub const MAX_KEYS: u64 = 1_000_000;

/// What one route's limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    User(Uuid),
    Tenant(Uuid),
    Ip(IpAddr),
}

impl Key {
    /// The key of a client address ([`client_block`]).
    pub fn ip(ip: IpAddr) -> Self {
        Key::Ip(client_block(ip))
    }
}

/// One route's limiter.
pub struct RateLimiter {
    settings: RateLimit,
    /// `gateway_rate_limited_total{route}`, registered once.
    refused: metrics::Counter,
    /// `per / requests` in nanoseconds, rounded up.
    interval: u64,
    /// `requests` intervals (`per`, give or take the rounding): how far
    /// ahead of now a key's time may run.
    tolerance: u64,
    /// Nanoseconds are counted from here.
    epoch: Instant,
    /// Each key's theoretical arrival time, in nanoseconds since `epoch`.
    cells: Cache<Key, Arc<AtomicU64>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// The limiter of the route labelled `route` (for its metric).
    pub fn new(settings: RateLimit, route: metrics::SharedString) -> Self {
        Self::with_capacity(settings, route, MAX_KEYS)
    }

    fn with_capacity(settings: RateLimit, route: metrics::SharedString, keys: u64) -> Self {
        // The interval rounded up and the tolerance made of whole ones: the
        // burst is exactly `requests`, and the rate never above the one
        // asked for (`per` shorter than `requests` nanoseconds gives one a
        // nanosecond).
        let requests = u64::from(settings.requests.get());
        let interval = nanos(settings.per).div_ceil(requests).max(1);
        let tolerance = interval.saturating_mul(requests);
        let cells = Cache::builder()
            .time_to_idle(settings.per)
            .max_capacity(keys)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        let refused = metrics::counter!("gateway_rate_limited_total", "route" => route);
        Self { settings, refused, interval, tolerance, epoch: Instant::now(), cells }
    }

    /// The settings this limiter enforces (a reload with the same keeps it).
    pub fn settings(&self) -> &RateLimit {
        &self.settings
    }

    /// What it counts by.
    pub fn key(&self) -> RateLimitKey {
        self.settings.by
    }

    /// Counts one request of `key`; `Err(retry_after)` when over the limit
    /// (then nothing is counted).
    pub fn check(&self, key: Key) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: Key, at: Instant) -> Result<(), Duration> {
        let now = nanos(at.saturating_duration_since(self.epoch));
        let cell = self.cells.get_with(key, || Arc::new(AtomicU64::new(0)));
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(self.interval);
            let ahead = next - now;
            if ahead > self.tolerance {
                self.refused.increment(1);
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match cell.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn limiter(requests: u32, per: Duration) -> RateLimiter {
        limiter_of(requests, per, MAX_KEYS)
    }

    fn limiter_of(requests: u32, per: Duration, keys: u64) -> RateLimiter {
        let requests = NonZeroU32::new(requests).expect("not zero");
        RateLimiter::with_capacity(RateLimit { requests, per, by: RateLimitKey::Ip }, "test".into(), keys)
    }

    /// A period that is not a whole number of intervals: the burst is still
    /// exactly `requests`, and the steady rate not above it.
    #[test]
    fn an_uneven_interval_rounds_towards_the_limit() {
        let l = limiter(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let a = Key::ip([10, 0, 0, 1].into());
        for i in 0..3 {
            assert_eq!(l.check_at(a, t0), Ok(()), "request {i} of the burst");
        }
        assert!(l.check_at(a, t0).is_err(), "a fourth in the burst");
        // 333,333,334 ns per request: not one nanosecond sooner.
        assert!(l.check_at(a, t0 + Duration::from_nanos(333_333_333)).is_err());
        assert_eq!(l.check_at(a, t0 + Duration::from_nanos(333_333_334)), Ok(()));
        // Ten per millisecond is one per 100 us; a millisecond for a
        // billion is one per nanosecond, a burst of a billion.
        assert_eq!(limiter(10, Duration::from_millis(1)).interval, 100_000);
        let fine = limiter(1_000_000_000, Duration::from_millis(1));
        assert_eq!((fine.interval, fine.tolerance), (1, 1_000_000_000));
    }

    /// With the cache full, a new key is admitted (the least recently used
    /// goes) and held to its allowance, rather than refused a place and so
    /// given a whole allowance on every request.
    #[test]
    fn a_new_key_is_held_to_its_allowance_when_the_cache_is_full() {
        let l = limiter_of(1, Duration::from_secs(3600), 10);
        let t0 = Instant::now();
        for i in 0..50_u8 {
            // The old keys are seen often: an admission policy by frequency
            // would keep them and turn the new one away.
            for _ in 0..5 {
                let _ = l.check_at(Key::ip([10, 0, 0, i % 10].into()), t0);
            }
            l.cells.run_pending_tasks();
        }
        let new = Key::ip([192, 0, 2, 1].into());
        assert_eq!(l.check_at(new, t0), Ok(()));
        l.cells.run_pending_tasks();
        assert!(l.check_at(new, t0).is_err(), "the new key got a second request of an allowance of one");
    }

    #[test]
    fn a_key_spends_its_allowance_then_goes_on_at_the_steady_rate() {
        let l = limiter(3, Duration::from_secs(3));
        let t0 = Instant::now();
        let a = Key::ip([10, 0, 0, 1].into());
        for i in 0..3 {
            assert_eq!(l.check_at(a, t0), Ok(()), "request {i} of the burst");
        }
        let wait = l.check_at(a, t0).expect_err("the fourth at once is over");
        assert_eq!(wait, Duration::from_secs(1), "one interval until the next");
        // Refused requests count nothing: a second later there is room for one.
        assert_eq!(l.check_at(a, t0 + Duration::from_secs(1)), Ok(()));
        assert!(l.check_at(a, t0 + Duration::from_secs(1)).is_err());
        // Other keys have their own allowance.
        assert_eq!(l.check_at(Key::ip([10, 0, 0, 2].into()), t0), Ok(()));
        // After a whole period of silence the allowance is whole again.
        let later = t0 + Duration::from_secs(10);
        for i in 0..3 {
            assert_eq!(l.check_at(a, later), Ok(()), "request {i} after the pause");
        }
        assert!(l.check_at(a, later).is_err());
    }

    #[test]
    fn ipv6_clients_count_per_64_and_mapped_addresses_as_ipv4() {
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("an address");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("an address");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("an address");
        assert_eq!(Key::ip(one), Key::ip(same_64));
        assert_ne!(Key::ip(one), Key::ip(other_64));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("an address");
        assert_eq!(Key::ip(mapped), Key::ip([10, 0, 0, 1].into()));
    }
}
