//! A per-client-IP request limit for the endpoints that guess at secrets
//! (`/auth/login`, `/auth/refresh`).
//!
//! A fixed one-minute window per IP, kept in memory: each IP's counter lives
//! in a moka cache whose entries expire a minute after the window opened, so
//! memory is bounded by the number of IPs seen in the last minute, and a
//! million (past which the least recently used goes: a new address is
//! still held to the limit). It is a
//! per-process limit by design (cheap, no I/O); the per-account lockout in
//! the database is the limit that holds across processes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct IpRateLimiter {
    per_window: u32,
    windows: Cache<IpAddr, Arc<Window>>,
}

struct Window {
    opened: Instant,
    count: AtomicU32,
}

impl IpRateLimiter {
    /// `per_minute == 0` disables the limit.
    pub fn new(per_minute: u32) -> Self {
        Self::with_capacity(per_minute, 1_000_000)
    }

    /// Past `ips` addresses the least recently used goes: moka's default
    /// policy (TinyLFU) would refuse a new address a place instead, and so
    /// open it a new window on every request.
    fn with_capacity(per_minute: u32, ips: u64) -> Self {
        let windows = Cache::builder()
            .time_to_live(WINDOW)
            .max_capacity(ips)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Self { per_window: per_minute, windows }
    }

    /// Counts one request; `Err(retry_after_secs)` when over the limit.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.per_window == 0 {
            return Ok(());
        }
        let ip = client_block(ip);
        let window =
            self.windows.get_with(ip, || Arc::new(Window { opened: Instant::now(), count: AtomicU32::new(0) }));
        let n = window.count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n <= self.per_window {
            Ok(())
        } else {
            let left = WINDOW.saturating_sub(window.opened.elapsed());
            Err(left.as_secs().max(1))
        }
    }
}

/// What a limit by address counts a client as: IPv6 per /64, the smallest
/// block a host is usually given (per /128 one host could rotate through
/// billions); an IPv4-mapped address as its IPv4 one. Route limits
/// by address (`crate::proxy::ratelimit`) count the same way.
pub fn client_block(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_ip() {
        let l = IpRateLimiter::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(l.check(a), Ok(()));
        assert_eq!(l.check(a), Ok(()));
        let retry = l.check(a).expect_err("third is over");
        assert!((1..=60).contains(&retry));
        assert_eq!(l.check(b), Ok(()), "other IPs are unaffected");
        assert_eq!(IpRateLimiter::new(0).check(a), Ok(()));
    }

    #[test]
    fn a_new_address_is_held_to_the_limit_when_the_cache_is_full() {
        let l = IpRateLimiter::with_capacity(1, 10);
        for i in 0..50_u8 {
            for _ in 0..5 {
                let _ = l.check([10, 0, 0, i % 10].into());
            }
            l.windows.run_pending_tasks();
        }
        let new: IpAddr = [192, 0, 2, 1].into();
        assert_eq!(l.check(new), Ok(()));
        l.windows.run_pending_tasks();
        assert!(l.check(new).is_err(), "a new address got a new window");
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = IpRateLimiter::new(1);
        assert_eq!(l.check("2001:db8::1".parse().expect("ip")), Ok(()));
        assert!(l.check("2001:db8::2".parse().expect("ip")).is_err(), "same /64");
        assert_eq!(l.check("2001:db8:0:1::1".parse().expect("ip")), Ok(()));
    }
}
