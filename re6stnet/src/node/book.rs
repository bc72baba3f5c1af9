//! The peer cache in memory: loaded once from the SQLite cache, which the
//! driver keeps in step with [`super::CacheChange`]s. Same rules as
//! `re6st_tunnel::cache::PeerCache`: verified records only, the endpoint
//! that worked moves first, a failing peer is skipped until its back-off
//! ends and is evicted first when the book is full.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use re6st_registry::auth::SignedPeerRecord;
use re6st_registry::cert::CaCert;
use re6st_tunnel::cache::StoredPeer;
use re6st_tunnel::policy::Peer;

/// Longest back-off of a failing peer.
const MAX_BACKOFF_S: i64 = 86_400;

#[derive(Clone, Debug)]
struct Entry {
    endpoints: Vec<SocketAddr>,
    record: SignedPeerRecord,
    timestamp: i64,
    failures: u32,
    failing_until: i64,
    last_ok: Option<i64>,
}

/// A cached peer, as candidates list them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its prefix.
    pub prefix: Peer,
    /// Its endpoints, preferred first.
    pub endpoints: Vec<SocketAddr>,
}

/// The in-memory peer cache.
#[derive(Clone, Debug)]
pub struct Book {
    peers: BTreeMap<Peer, Entry>,
    size: usize,
    rng: u64,
}

impl Book {
    /// A book of at most `size` peers holding `stored`; `seed` orders
    /// peers that are otherwise equal.
    pub fn new(stored: Vec<StoredPeer>, size: usize, seed: u64) -> Self {
        let peers = stored
            .into_iter()
            .map(|s| {
                (
                    s.prefix,
                    Entry {
                        endpoints: s.endpoints,
                        record: s.record,
                        timestamp: s.timestamp,
                        failures: s.failures,
                        failing_until: s.failing_until,
                        last_ok: s.last_ok,
                    },
                )
            })
            .collect();
        Self {
            peers,
            size: size.max(1),
            rng: seed | 1,
        }
    }

    /// Drops the peers whose record no longer verifies (revoked by `crl`,
    /// or expired); returns them.
    pub fn prune(&mut self, ca: &CaCert, crl: &[u64], unix: i64) -> Vec<Peer> {
        let gone: Vec<Peer> = self
            .peers
            .iter()
            .filter(|(_, e)| e.record.verify(ca, unix, crl).is_err())
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.peers.remove(p);
        }
        gone
    }

    /// Verifies and stores a record; returns the peers evicted to make
    /// room, or None when the record was refused or older than ours.
    pub fn insert(
        &mut self,
        record: &SignedPeerRecord,
        ca: &CaCert,
        crl: &[u64],
        unix: i64,
    ) -> Option<Vec<Peer>> {
        let (rec, cert) = record.verify(ca, unix, crl).ok()?;
        let mut evicted = Vec::new();
        let mut endpoints = Vec::new();
        if let Some(old) = self.peers.get(&cert.prefix) {
            if old.timestamp > rec.timestamp {
                return None;
            }
            endpoints.extend(
                old.endpoints
                    .iter()
                    .filter(|a| rec.endpoints.contains(a))
                    .copied(),
            );
        } else {
            evicted = self.trim(self.size.saturating_sub(1), unix);
        }
        for a in &rec.endpoints {
            if !endpoints.contains(a) {
                endpoints.push(*a);
            }
        }
        let e = self.peers.entry(cert.prefix).or_insert_with(|| Entry {
            endpoints: Vec::new(),
            record: record.clone(),
            timestamp: rec.timestamp,
            failures: 0,
            failing_until: 0,
            last_ok: None,
        });
        e.endpoints = endpoints;
        e.record = record.clone();
        e.timestamp = rec.timestamp;
        Some(evicted)
    }

    /// The peers whose last attempt failed and whose back-off runs: the
    /// direct paths that did not work (the mesh routes around them).
    pub fn failing(&self, unix: i64) -> Vec<Peer> {
        self.peers
            .iter()
            .filter(|(_, e)| e.failing_until > unix)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Keeps at most `keep` peers: failing ones go first, then those that
    /// worked longest ago; returns those removed.
    fn trim(&mut self, keep: usize, unix: i64) -> Vec<Peer> {
        let mut order: Vec<(Peer, bool, i64, i64)> = self
            .peers
            .iter()
            .map(|(p, e)| {
                (
                    *p,
                    e.failing_until > unix,
                    e.last_ok.unwrap_or(0),
                    e.timestamp,
                )
            })
            .collect();
        order.sort_by(|a, b| {
            a.1.cmp(&b.1)
                .then(b.2.cmp(&a.2))
                .then(b.3.cmp(&a.3))
                .then(a.0.cmp(&b.0))
        });
        let gone: Vec<Peer> = order.into_iter().skip(keep).map(|o| o.0).collect();
        for p in &gone {
            self.peers.remove(p);
        }
        gone
    }

    /// The endpoint `addr` of `peer` worked: it moves first; failures reset.
    pub fn mark_ok(&mut self, peer: Peer, addr: SocketAddr, unix: i64) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.endpoints.retain(|a| *a != addr);
            e.endpoints.insert(0, addr);
            e.failures = 0;
            e.failing_until = 0;
            e.last_ok = Some(unix);
        }
    }

    /// Connecting to `peer` failed: skip it for `backoff_s` × 2^failures
    /// (capped at a day).
    pub fn mark_failed(&mut self, peer: Peer, unix: i64, backoff_s: i64) {
        if let Some(e) = self.peers.get_mut(&peer) {
            let factor = 1i64 << e.failures.min(16);
            e.failing_until = unix + MAX_BACKOFF_S.min(backoff_s.saturating_mul(factor));
            e.failures = e.failures.saturating_add(1);
        }
    }

    /// Forgets a peer; returns whether it was known.
    pub fn remove(&mut self, peer: Peer) -> bool {
        self.peers.remove(&peer).is_some()
    }

    /// Whether `peer` is known.
    pub fn contains(&self, peer: Peer) -> bool {
        self.peers.contains_key(&peer)
    }

    /// The endpoints of `peer`, preferred first (back-off ignored).
    pub fn endpoints(&self, peer: Peer) -> Option<&[SocketAddr]> {
        self.peers.get(&peer).map(|e| e.endpoints.as_slice())
    }

    /// Whether `peer`'s record says its endpoints are a NAT's mapping.
    pub fn nat(&self, peer: Peer) -> bool {
        self.peers.get(&peer).is_some_and(|e| {
            serde_json::from_str::<re6st_registry::auth::PeerRecord>(&e.record.payload)
                .is_ok_and(|r| r.nat)
        })
    }

    /// Peers not failing at `unix`: those that worked most recently first,
    /// the others in random order.
    pub fn candidates(&mut self, unix: i64) -> Vec<Candidate> {
        let mut out: Vec<(i64, u64, Candidate)> = Vec::new();
        for (p, e) in &self.peers {
            if e.failing_until <= unix {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                out.push((
                    e.last_ok.unwrap_or(0),
                    self.rng,
                    Candidate {
                        prefix: *p,
                        endpoints: e.endpoints.clone(),
                    },
                ));
            }
        }
        out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        out.into_iter().map(|(_, _, c)| c).collect()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}
