//! The source table: feasibility distances (RFC 8966 §3.5.1, §3.7.3).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::metric::seqno_newer;
use crate::router::RouteKey;
use crate::wire::INFINITY;

/// A source: an originator and the destination it announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceKey {
    /// The originator's router-id.
    pub router_id: [u8; 8],
    /// The destination.
    pub key: RouteKey,
}

/// Sources are forgotten this long after their last use.
pub const SOURCE_GC: Duration = Duration::from_secs(180);

/// Feasibility distances of the sources we have advertised.
#[derive(Clone, Debug, Default)]
pub struct SourceTable {
    fd: HashMap<SourceKey, (u16, u16, Instant)>,
}

impl SourceTable {
    /// Whether an Update (seqno, refmetric) for `key` is feasible:
    /// retractions always are, and so is anything for an unknown source.
    pub fn feasible(&self, key: &SourceKey, seqno: u16, metric: u16) -> bool {
        if metric == INFINITY {
            return true;
        }
        match self.fd.get(key) {
            None => true,
            Some(&(s0, m0, _)) => seqno_newer(seqno, s0) || (seqno == s0 && metric < m0),
        }
    }

    /// Records that we advertise `key` with (seqno, metric).
    pub fn advertised(&mut self, key: SourceKey, seqno: u16, metric: u16, now: Instant) {
        if metric == INFINITY {
            return;
        }
        let e = self.fd.entry(key).or_insert((seqno, metric, now));
        if seqno_newer(seqno, e.0) || (seqno == e.0 && metric < e.1) {
            e.0 = seqno;
            e.1 = metric;
        }
        e.2 = now;
    }

    /// The feasibility distance of a source.
    pub fn get(&self, key: &SourceKey) -> Option<(u16, u16)> {
        self.fd.get(key).map(|&(s, m, _)| (s, m))
    }

    /// Forgets sources unused for [`SOURCE_GC`].
    pub fn gc(&mut self, now: Instant) {
        self.fd
            .retain(|_, (_, _, at)| now.duration_since(*at) < SOURCE_GC);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feasibility_condition() {
        let mut t = SourceTable::default();
        let now = Instant::now();
        let key = SourceKey {
            router_id: [1; 8],
            key: RouteKey::new("fd00::/64".parse().unwrap_or_default(), None),
        };
        assert!(t.feasible(&key, 5, 300));
        t.advertised(key, 5, 200, now);
        assert!(t.feasible(&key, 5, 199));
        assert!(!t.feasible(&key, 5, 200));
        assert!(!t.feasible(&key, 4, 10));
        assert!(t.feasible(&key, 6, 1000));
        assert!(t.feasible(&key, 4, INFINITY));
        t.advertised(key, 5, 300, now);
        assert_eq!(t.get(&key), Some((5, 200)), "FD only improves");
        t.advertised(key, 6, 400, now);
        assert_eq!(t.get(&key), Some((6, 400)));
        t.gc(now + SOURCE_GC);
        assert_eq!(t.get(&key), None);
    }
}
