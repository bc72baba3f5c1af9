//! Rate limits for unauthenticated work, by source network: a token bucket
//! per IPv6 /64 and per IPv4 /24 (one host holds a whole /64, so limits per
//! address would give it a fresh budget per address), in a bounded table
//! that forgets the source idle longest when full.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

/// The network a source address is limited as: its /64 (IPv6) or /24
/// (IPv4, also when IPv4-mapped).
pub fn source_net(ip: IpAddr) -> IpAddr {
    let v4 = |a: Ipv4Addr| IpAddr::V4(Ipv4Addr::from(u32::from(a) & 0xffff_ff00));
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => v4(m),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(a) & (!0u128 << 64))),
        },
    }
}

/// Token buckets per source network.
#[derive(Debug)]
pub struct SourceLimiter {
    per_s: f64,
    burst: f64,
    slots: usize,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl SourceLimiter {
    /// `per_s` a second per source network, bursts of twice that, at most
    /// `slots` networks remembered.
    pub fn new(per_s: f64, slots: usize) -> Self {
        Self {
            per_s,
            burst: 2.0 * per_s,
            slots,
            buckets: HashMap::new(),
        }
    }

    /// Whether `src` may have one more unit of work at `now`.
    pub fn allow(&mut self, now: Instant, src: IpAddr) -> bool {
        let key = source_net(src);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.slots {
            if let Some(idle) = self
                .buckets
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&idle);
            }
        }
        let (tokens, last) = self.buckets.entry(key).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_s;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Source networks remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_not_addresses() {
        assert_eq!(source_net(ip("fd00:1:2:3:4:5:6:7")), ip("fd00:1:2:3::"));
        assert_eq!(source_net(ip("198.18.7.200")), ip("198.18.7.0"));
        assert_eq!(source_net(ip("::ffff:198.18.7.9")), ip("198.18.7.0"));
    }

    /// One host hopping over the addresses of its /64 shares one budget;
    /// another /64 has its own.
    #[test]
    fn one_budget_per_network() {
        let mut l = SourceLimiter::new(5.0, 16);
        let t = Instant::now();
        let allowed = (0..100u16)
            .filter(|i| l.allow(t, ip(&format!("fd00:1:2:3::{i:x}"))))
            .count();
        assert_eq!(allowed, 10, "a burst of twice the rate");
        assert!(l.allow(t, ip("fd00:1:2:4::1")));
        assert!(!l.allow(t, ip("fd00:1:2:3::1")));
        assert!(
            l.allow(t + Duration::from_millis(200), ip("fd00:1:2:3::1")),
            "refilled"
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut l = SourceLimiter::new(5.0, 64);
        let t = Instant::now();
        for i in 0..500u32 {
            let _ = l.allow(t, IpAddr::V4(Ipv4Addr::from(0xc612_0000 | (i << 8))));
        }
        assert_eq!(l.len(), 64);
    }
}
