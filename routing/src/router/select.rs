//! Receiving routes and selecting them (babeld's `route.c`): Updates
//! through the input filter and the feasibility condition, selection with
//! hysteresis, and the kernel view with the retraction hold.
//!
//! An unfeasible Update from the selected neighbour with the same
//! router-id is ignored (RFC 8966 §3.5.3): the route stays selected and
//! installed, and a seqno request goes to that neighbour (§3.8.2.2). Before,
//! every upstream metric rise larger than our link cost removed the route
//! and cascaded retractions downstream. A switch of router-id is accepted
//! even when unfeasible (it may be breaking a loop), and then unselects the
//! route.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::table::{InstalledRoute, Route};
use super::timer::Timer;
use super::{Destination, RouteChange, RouteKey, Router, RETRACT_HOLD, URGENT_DELAY};
use crate::drop_reason::DropReason;
use crate::metric::add;
use crate::neighbour::NeighbourId;
use crate::source::SourceKey;
use crate::wire::INFINITY;

/// Expired routes stay (as retracted) this long before they are forgotten.
const EXPIRED_KEEP: Duration = Duration::from_secs(10);

/// An Update as received, with the parser state applied.
#[derive(Clone, Copy, Debug)]
pub(super) struct Received {
    pub key: RouteKey,
    pub router_id: Option<[u8; 8]>,
    pub seqno: u16,
    pub metric: u16,
    pub interval: u16,
    pub next_hop: IpAddr,
}

/// How much better another route must be to replace a valid selected one
/// (against RTT jitter).
pub(super) fn switch_margin(current: u16) -> u16 {
    (current / 8).max(48)
}

impl Router {
    /// The metric of a route through its neighbour now.
    pub(super) fn route_metric(&self, r: &Route, now: Instant) -> u16 {
        if r.refmetric == INFINITY || now >= r.expires {
            return INFINITY;
        }
        add(self.cost(&r.from), r.refmetric)
    }

    /// Whether a route satisfies the feasibility condition now.
    pub(super) fn feasible(&self, key: &RouteKey, r: &Route) -> bool {
        let source = SourceKey {
            router_id: r.router_id,
            key: *key,
        };
        self.sources.feasible(&source, r.seqno, r.refmetric)
    }

    pub(super) fn on_update(&mut self, now: Instant, from: NeighbourId, u: Received) {
        let key = u.key;
        if let Err(reason) = self.cfg.filter.check(&key) {
            return self.count(reason);
        }
        if u.router_id == Some(self.cfg.router_id)
            || self.table.get(&key).is_some_and(|e| e.exported)
        {
            return;
        }
        let entry = self.table.get(&key);
        let existing = entry.and_then(|e| e.route(from)).cloned();
        let selected_here = entry.is_some_and(|e| e.selected == Some(from));
        let router_id = match (u.router_id, &existing) {
            (Some(id), _) => id,
            (None, _) if u.metric != INFINITY => return self.count(DropReason::NoRouterId),
            (None, Some(r)) => r.router_id,
            // A retraction of a route we never had.
            (None, None) => return,
        };
        if u.metric != INFINITY {
            if let Err(reason) = self.cfg.filter.check_origin(&key, router_id) {
                return self.count(reason);
            }
        }
        let source = SourceKey { router_id, key };
        let feasible = self.sources.feasible(&source, u.seqno, u.metric);
        let same_source = existing.as_ref().is_some_and(|r| r.router_id == router_id);
        if !feasible && selected_here && same_source {
            // §3.5.3: keep what we have, ask the successor for a newer seqno.
            return self.unfeasible_request(key, router_id, u.seqno, from, now);
        }
        if existing.is_none() && u.metric == INFINITY {
            return;
        }
        let hold =
            Duration::from_millis(u64::from(u.interval) * 10 * 7 / 2).max(Duration::from_secs(2));
        let expires = match (&existing, u.metric) {
            // §3.5.3: a retraction does not reset the expiry timer.
            (Some(r), INFINITY) => r.expires,
            _ => now + hold,
        };
        self.table.upsert_route(
            key,
            Route {
                from,
                router_id,
                seqno: u.seqno,
                refmetric: u.metric,
                next_hop: u.next_hop,
                expires,
            },
        );
        if !feasible {
            // §3.8.2.2: would it be selected were it feasible?
            let through = add(self.cost(&from), u.metric);
            let current = self
                .table
                .get(&key)
                .and_then(|e| e.selected_route())
                .map(|r| self.route_metric(r, now));
            let better = match current {
                None => true,
                Some(c) => u32::from(through) + u32::from(switch_margin(c)) < u32::from(c),
            };
            if through != INFINITY && better {
                self.unfeasible_request(key, router_id, u.seqno, from, now);
            }
        }
        self.reselect(key, now);
        if feasible && u.metric != INFINITY {
            self.request_answered(key, router_id, u.seqno, now);
        }
    }

    /// A wildcard retraction: everything from this neighbour is retracted.
    pub(super) fn on_wildcard_retraction(&mut self, from: NeighbourId, now: Instant) {
        for k in self.table.keys_via(from) {
            if let Some(r) = self.table.route_mut(&k, from) {
                r.refmetric = INFINITY;
            }
            self.reselect(k, now);
        }
    }

    /// A Route Request: our update for that destination on the requester's
    /// interface, a retraction if we have no route (§3.8.1.1), or our table
    /// (at most once per Hello interval) for a wildcard request.
    pub(super) fn on_route_request(
        &mut self,
        now: Instant,
        from: NeighbourId,
        key: Option<RouteKey>,
    ) {
        let iface = from.iface;
        match key {
            None => {
                let recent = self.ifaces.get(&iface).is_none_or(|i| {
                    i.last_full_dump
                        .is_some_and(|t| now.duration_since(t) < i.cfg.hello_interval)
                });
                if !recent {
                    self.timers
                        .set_earlier(Timer::FullDump(iface), now + URGENT_DELAY);
                }
            }
            Some(key) if self.table.get(&key).is_some_and(|e| e.advertisable()) => {
                self.schedule_update(Some(iface), key, super::interface::Urgency::Urgent, now);
            }
            Some(key) => {
                let tlv = self.retraction(key, 0);
                self.emit_tlvs(iface, Destination::Unicast(from.addr), &[tlv]);
            }
        }
    }

    /// Re-evaluates the selected route of `key`, then tells the kernel and
    /// (when it matters) the neighbours.
    pub(super) fn reselect(&mut self, key: RouteKey, now: Instant) {
        let Some(e) = self.table.get(&key) else {
            return;
        };
        let exported = e.exported;
        let before = e.selected;
        let mut best: Option<(NeighbourId, u16)> = None;
        let mut current: Option<(NeighbourId, u16)> = None;
        if !exported {
            for r in &e.routes {
                let m = self.route_metric(r, now);
                if m == INFINITY || !self.feasible(&key, r) {
                    continue;
                }
                if before == Some(r.from) {
                    current = Some((r.from, m));
                }
                if best.is_none_or(|(_, bm)| m < bm) {
                    best = Some((r.from, m));
                }
            }
        }
        let choice = match (current, best) {
            (Some((c, cm)), Some((b, bm))) if b != c => {
                if u32::from(bm) + u32::from(switch_margin(cm)) < u32::from(cm) {
                    Some(b)
                } else {
                    Some(c)
                }
            }
            (Some((c, _)), _) => Some(c),
            (None, b) => b.map(|(n, _)| n),
        };
        let mut starved = false;
        if let Some(e) = self.table.get_mut(&key) {
            e.selected = choice;
            if before != choice {
                self.stats.route_switches += 1;
                if choice.is_some() {
                    e.retract_until = None;
                } else if before.is_some() && !exported {
                    e.retract_until = Some(now + RETRACT_HOLD);
                    starved = true;
                }
            }
        }
        if before != choice && choice.is_some() {
            self.pending.remove(&key);
            self.timers.cancel(Timer::Request(key));
        }
        if starved {
            self.starving(key, now);
        }
        self.announce(key, now);
        self.sync_kernel(key, now);
    }

    /// Brings the kernel's view of `key` in line with the selection: the
    /// selected next hop, else `unreachable` while the retraction is held
    /// (only where we were forwarding), else nothing.
    pub(super) fn sync_kernel(&mut self, key: RouteKey, now: Instant) {
        let Some(e) = self.table.get(&key) else {
            return;
        };
        let have = e.installed;
        let want = match e.selected_route() {
            Some(r) => Some(InstalledRoute::Via {
                iface: r.from.iface,
                next_hop: r.next_hop,
                metric: self.route_metric(r, now),
            }),
            None if e.retract_until.is_some() && have.is_some() => {
                Some(InstalledRoute::Unreachable)
            }
            None => None,
        };
        let change = match (have, want) {
            (
                Some(InstalledRoute::Via {
                    iface: hi,
                    next_hop: hn,
                    ..
                }),
                Some(InstalledRoute::Via {
                    iface, next_hop, ..
                }),
            ) if (hi, hn) == (iface, next_hop) => None,
            (
                _,
                Some(InstalledRoute::Via {
                    iface,
                    next_hop,
                    metric,
                }),
            ) => Some(RouteChange::Install {
                key,
                iface,
                next_hop,
                metric,
            }),
            (Some(InstalledRoute::Via { .. }), Some(InstalledRoute::Unreachable)) => {
                Some(RouteChange::Unreachable { key })
            }
            (Some(_), None) => Some(RouteChange::Remove { key }),
            _ => None,
        };
        if let Some(c) = change {
            self.changes.push_back(c);
        }
        if let Some(e) = self.table.get_mut(&key) {
            e.installed = want;
        }
    }

    /// Expired routes count as retracted, then go; held retractions end.
    pub(super) fn expire_routes(&mut self, now: Instant) {
        let due: Vec<RouteKey> = self
            .table
            .iter()
            .filter(|(_, e)| {
                e.routes.iter().any(|r| now >= r.expires)
                    || e.retract_until.is_some_and(|t| now >= t)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let gone: Vec<NeighbourId> = self
                .table
                .get(&k)
                .map(|e| {
                    e.routes
                        .iter()
                        .filter(|r| now >= r.expires + EXPIRED_KEEP)
                        .map(|r| r.from)
                        .collect()
                })
                .unwrap_or_default();
            for n in gone {
                self.table.remove_route(&k, n);
            }
            if let Some(e) = self.table.get_mut(&k) {
                if e.retract_until.is_some_and(|t| now >= t) {
                    e.retract_until = None;
                }
            }
            self.reselect(k, now);
            self.table.prune(&k);
        }
    }
}
