//! The neighbour table as the router uses it: Hellos and IHUs received,
//! RTT samples (RFC 9616), link costs, missed Hellos and dead neighbours.
//! A cost change reselects only the destinations routed through that
//! neighbour (the table's per-neighbour index).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::timer::Timer;
use super::{RouteKey, Router};
use crate::neighbour::{IfaceId, LinkQuality, NeighbourId};
use crate::wire::INFINITY;

/// At most one round of early seqno requests per neighbour this often
/// (they are a preparation for a link that may be dying, not a reflex on
/// every lost Hello).
pub(super) const PREPARE_GAP: Duration = Duration::from_secs(2);

impl Router {
    /// The neighbours heard on interface `id`.
    pub(super) fn neighbours_on(&self, id: IfaceId) -> Vec<NeighbourId> {
        self.neighbours
            .keys()
            .filter(|n| n.iface == id)
            .copied()
            .collect()
    }

    pub(super) fn on_hello(
        &mut self,
        now: Instant,
        rx_time: Instant,
        nid: NeighbourId,
        seqno: u16,
        interval: u16,
        timestamp: Option<u32>,
    ) {
        let our_rx = self.micros(rx_time);
        let Some(n) = self.neighbours.get_mut(&nid) else {
            return;
        };
        n.hello(now, seqno, Duration::from_millis(u64::from(interval) * 10));
        if let Some(ts) = timestamp {
            n.last_hello_ts = Some((ts, our_rx));
        }
        let next_miss = n.next_miss;
        self.timers.set(Timer::Miss(nid), next_miss);
    }

    /// An IHU; true if it is for us (its timestamps then count).
    pub(super) fn on_ihu(
        &mut self,
        now: Instant,
        nid: NeighbourId,
        rxcost: u16,
        interval: u16,
        address: Option<IpAddr>,
    ) -> bool {
        let link_local = self.ifaces.get(&nid.iface).and_then(|i| i.cfg.link_local);
        let for_us = match (address, link_local) {
            (None, _) | (_, None) => true,
            (Some(a), Some(ll)) => a == IpAddr::V6(ll),
        };
        if !for_us {
            return false;
        }
        if let Some(n) = self.neighbours.get_mut(&nid) {
            n.txcost = rxcost;
            let iv = Duration::from_millis(u64::from(interval) * 10).max(n.hello_interval * 3);
            n.ihu_expires = now + iv * 7 / 2;
        }
        true
    }

    /// RFC 9616 §3.3: (receive - origin) - (hello_ts - their_receive), all
    /// mod 2^32, with our receive time taken when the packet arrived.
    pub(super) fn on_rtt(
        &mut self,
        nid: NeighbourId,
        rx_time: Instant,
        hello_ts: u32,
        (origin, their_receive): (u32, u32),
        now: Instant,
    ) {
        let Some(params) = self.ifaces.get(&nid.iface).and_then(|i| i.cfg.rtt) else {
            return;
        };
        let ours = self.micros(rx_time).wrapping_sub(origin) as i32;
        let theirs = hello_ts.wrapping_sub(their_receive) as i32;
        if ours >= 0 && theirs >= 0 && ours >= theirs && ours < 600_000_000 {
            let sample = Duration::from_micros((ours - theirs) as u64);
            if let Some(n) = self.neighbours.get_mut(&nid) {
                n.rtt_sample(now, sample, &params);
            }
        }
    }

    /// The link cost of `id` now (infinite if unknown).
    fn neighbour_cost(&self, id: &NeighbourId, now: Instant) -> u16 {
        let (Some(n), Some(i)) = (self.neighbours.get(id), self.ifaces.get(&id.iface)) else {
            return INFINITY;
        };
        n.cost(
            now,
            i.cfg.rtt.as_ref(),
            i.cfg.cost_multiplier,
            i.cfg.rxcost,
            i.cfg.link_quality,
        )
    }

    /// The cached link cost of `id` (RFC 8966 §3.5.2: at least 1, so
    /// metrics grow strictly along a path).
    pub(super) fn cost(&self, id: &NeighbourId) -> u16 {
        self.costs.get(id).copied().unwrap_or(INFINITY).max(1)
    }

    /// Recomputes the cost of `id`; routes through it are reselected if it moved.
    pub(super) fn cost_changed(&mut self, id: NeighbourId, now: Instant) {
        let c = self.neighbour_cost(&id, now);
        if self.costs.get(&id) == Some(&c) {
            return;
        }
        self.costs.insert(id, c);
        for k in self.table.keys_via(id) {
            self.reselect(k, now);
        }
    }

    /// A neighbour's Hello deadline passed.
    pub(super) fn on_miss(&mut self, id: NeighbourId, now: Instant) {
        let Some(n) = self.neighbours.get_mut(&id) else {
            return;
        };
        let missed = n.check_missed(now);
        if n.is_dead(now) {
            return self.drop_neighbour(id, now);
        }
        let at_risk = missed && n.history & 0x8000 == 0;
        if n.history != 0 {
            let next = n.next_miss;
            self.timers.set(Timer::Miss(id), next);
        } else {
            // Nothing left to miss: forgotten once silent long enough.
            let forget = n.last_heard + crate::neighbour::NEIGHBOUR_GC;
            self.timers.set(Timer::Miss(id), forget.max(now));
        }
        if at_risk {
            self.prepare_alternatives(id, now);
        }
        self.cost_changed(id, now);
    }

    pub(super) fn drop_neighbour(&mut self, id: NeighbourId, now: Instant) {
        self.neighbours.remove(&id);
        self.timers.cancel(Timer::Miss(id));
        if let Some(a) = self.auth.as_mut() {
            a.forget((id.iface.0, id.addr));
        }
        self.costs.remove(&id);
        self.prepared.remove(&id);
        for k in self.table.keys_via(id) {
            self.table.remove_route(&k, id);
            self.reselect(k, now);
            self.table.prune(&k);
        }
    }

    /// A neighbour just missed a Hello: for every route we select through
    /// it whose alternatives are all infeasible, ask for a newer seqno now,
    /// so that a feasible alternative is ready if the link is declared dead.
    fn prepare_alternatives(&mut self, id: NeighbourId, now: Instant) {
        if self
            .prepared
            .get(&id)
            .is_some_and(|at| now.duration_since(*at) < PREPARE_GAP)
        {
            return;
        }
        self.prepared.insert(id, now);
        let keys: Vec<RouteKey> = self
            .table
            .keys_via(id)
            .into_iter()
            .filter(|k| self.table.get(k).is_some_and(|e| e.selected == Some(id)))
            .collect();
        for key in keys {
            let Some(e) = self.table.get(&key) else {
                continue;
            };
            let alternatives: Vec<_> = e
                .routes
                .iter()
                .filter(|r| r.from != id && self.route_metric(r, now) != INFINITY)
                .collect();
            if alternatives.is_empty() || alternatives.iter().any(|r| self.feasible(&key, r)) {
                continue;
            }
            let Some(best) = alternatives
                .iter()
                .min_by_key(|r| self.route_metric(r, now))
            else {
                continue;
            };
            let (rid, to, seqno) = (best.router_id, best.from, best.seqno);
            if !self.pending.contains_key(&key) {
                self.request_seqno(key, rid, seqno, to, now);
            }
        }
    }

    /// Neighbour info for status.
    pub(super) fn nominal(&self, iface: IfaceId) -> (u16, LinkQuality) {
        self.ifaces
            .get(&iface)
            .map_or((96, LinkQuality::TwoOutOfThree), |i| {
                (i.cfg.rxcost, i.cfg.link_quality)
            })
    }
}
