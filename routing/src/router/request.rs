//! Seqno requests (RFC 8966 §3.8; babeld's `resend.c` and the request
//! half of `message.c`).
//!
//! We ask:
//! - when a destination loses its last feasible route (§3.8.2.1), the
//!   neighbour of the best unfeasible route;
//! - when an unfeasible Update comes from the selected neighbour, or would
//!   be selected were it feasible (§3.8.2.2), that neighbour;
//! - while starved, again with back-off (0.5, 1, 2 … 60 s), retargeted to
//!   the current best unfeasible route, until a feasible route appears or
//!   nobody is left to ask.
//!
//! We answer a request with our update on the requester's interface when
//! we can satisfy it, and forward it otherwise to the selected neighbour or,
//! without one, to the best route's neighbour other than the requester,
//! feasible or not (babeld). The requester is recorded; the newer seqno,
//! when it arrives, goes urgently to the recorded requesters only.
//! For our own prefixes a newer seqno is one more than ours (§3.8.1.2),
//! never what the request names, and requests more than 100 ahead or with
//! no hops left are refused (babeld `message.c`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::interface::Urgency;
use super::timer::Timer;
use super::{Destination, RouteKey, Router};
use crate::drop_reason::DropReason;
use crate::metric::seqno_newer;
use crate::neighbour::NeighbourId;
use crate::source::SourceKey;
use crate::wire::{Tlv, INFINITY};

/// Hop count of the seqno requests we originate.
const REQUEST_HOPS: u8 = 64;
/// First resend of a pending request; then doubling.
const REQUEST_RESEND: Duration = Duration::from_millis(500);
/// Longest gap between two asks while starved.
const REQUEST_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a forwarded request is remembered (for its answer and for
/// duplicates).
const FORWARD_HOLD: Duration = Duration::from_secs(4);
/// A request further ahead of our seqno than this is absurd.
const SEQNO_AHEAD_MAX: u16 = 100;
/// An unfeasible update this far behind our feasibility distance comes
/// from a source that lost its seqno: asking would be refused as absurd.
const SEQNO_BEHIND_MAX: u16 = 100;

/// A request of ours waiting for its answer.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    pub router_id: [u8; 8],
    pub seqno: u16,
    pub to: NeighbourId,
    pub tries: u32,
    /// The seqno of the route that prompted the request: when a newer but
    /// still unfeasible one arrives (an origin climbing back one seqno per
    /// request), we ask again at once instead of waiting for the resend.
    pub heard: u16,
}

/// A request we forwarded.
#[derive(Clone, Debug)]
pub(super) struct Forwarded {
    pub router_id: [u8; 8],
    pub seqno: u16,
    pub requesters: BTreeSet<NeighbourId>,
    /// Where and when it was last sent on.
    pub next: NeighbourId,
    pub sent: Instant,
    pub until: Instant,
}

impl Router {
    fn send_seqno_request(
        &mut self,
        to: NeighbourId,
        key: RouteKey,
        router_id: [u8; 8],
        seqno: u16,
        hops: u8,
    ) {
        let tlv = Tlv::SeqnoRequest {
            ae: 0,
            seqno,
            hop_count: hops,
            router_id,
            prefix: key.prefix,
            src_prefix: key.src,
        };
        self.stats.seqno_requests += 1;
        self.emit_tlvs(to.iface, Destination::Unicast(to.addr), &[tlv]);
    }

    /// Asks `to` for a seqno of (`router_id`, `key`) newer than our
    /// feasibility distance (or than `seqno` if we have none), unless the
    /// same request is already pending.
    pub(super) fn request_seqno(
        &mut self,
        key: RouteKey,
        router_id: [u8; 8],
        seqno: u16,
        to: NeighbourId,
        now: Instant,
    ) {
        let source = SourceKey { router_id, key };
        let fd = self.sources.get(&source).map_or(seqno, |(s, _)| s);
        let wanted = fd.wrapping_add(1);
        let mut tries = 1;
        if let Some(p) = self.pending.get(&key) {
            if p.router_id == router_id && p.to == to && !seqno_newer(wanted, p.seqno) {
                if !seqno_newer(seqno, p.heard) {
                    return;
                }
                tries = p.tries;
            }
        }
        let p = Pending {
            router_id,
            seqno: wanted,
            to,
            tries,
            heard: seqno,
        };
        self.ask(key, p, now + REQUEST_RESEND);
    }

    /// Sends our request `p` for `key` and keeps it, to resend at `resend`.
    fn ask(&mut self, key: RouteKey, p: Pending, resend: Instant) {
        self.send_seqno_request(p.to, key, p.router_id, p.seqno, REQUEST_HOPS);
        self.pending.insert(key, p);
        self.timers.set(Timer::Request(key), resend);
    }

    /// §3.8.2.2: an unfeasible update worth a request.
    pub(super) fn unfeasible_request(
        &mut self,
        key: RouteKey,
        router_id: [u8; 8],
        seqno: u16,
        from: NeighbourId,
        now: Instant,
    ) {
        let source = SourceKey { router_id, key };
        if let Some((fd, _)) = self.sources.get(&source) {
            if fd.wrapping_sub(seqno) > SEQNO_BEHIND_MAX && seqno_newer(fd, seqno) {
                return;
            }
        }
        self.request_seqno(key, router_id, seqno, from, now);
    }

    /// The best route of `key` to ask for a newer seqno: finite, alive,
    /// not from `except`.
    fn best_to_ask(
        &self,
        key: &RouteKey,
        except: Option<NeighbourId>,
        now: Instant,
    ) -> Option<(NeighbourId, [u8; 8], u16)> {
        let e = self.table.get(key)?;
        e.routes
            .iter()
            .filter(|r| Some(r.from) != except && r.refmetric != INFINITY)
            .map(|r| (r, self.route_metric(r, now)))
            .filter(|(_, m)| *m != INFINITY)
            .min_by_key(|(_, m)| *m)
            .map(|(r, _)| (r.from, r.router_id, r.seqno))
    }

    /// No feasible route left for `key` (§3.8.2.1).
    pub(super) fn starving(&mut self, key: RouteKey, now: Instant) {
        if let Some((to, rid, seqno)) = self.best_to_ask(&key, None, now) {
            self.request_seqno(key, rid, seqno, to, now);
        }
    }

    /// A pending request's resend is due: ask again (retargeted) with
    /// back-off while the destination is starved.
    pub(super) fn on_request_timer(&mut self, key: RouteKey, now: Instant) {
        let Some(p) = self.pending.get(&key).cloned() else {
            return;
        };
        let entry = self.table.get(&key);
        let satisfied = entry
            .and_then(|e| e.selected_route())
            .is_some_and(|r| r.router_id != p.router_id || !seqno_newer(p.seqno, r.seqno));
        let starved = entry.is_some_and(|e| e.selected.is_none());
        let target = if starved {
            self.best_to_ask(&key, None, now)
        } else {
            // On behalf of the selected route: its successor, while it lasts.
            entry
                .and_then(|e| e.route(p.to))
                .filter(|r| self.route_metric(r, now) != INFINITY)
                .map(|r| (r.from, r.router_id, r.seqno))
        };
        let Some((to, rid, heard)) = target.filter(|_| !satisfied) else {
            self.pending.remove(&key);
            return;
        };
        let tries = p.tries + 1;
        let backoff = REQUEST_RESEND
            .saturating_mul(1 << (tries - 1).min(10))
            .min(REQUEST_BACKOFF_MAX);
        let source = SourceKey {
            router_id: rid,
            key,
        };
        let wanted = self
            .sources
            .get(&source)
            .map_or(p.seqno, |(s, _)| s.wrapping_add(1));
        let p = Pending {
            router_id: rid,
            seqno: wanted,
            to,
            tries,
            heard,
        };
        self.ask(key, p, now + backoff);
    }

    /// A feasible update (`router_id`, `seqno`) for `key` arrived: pending
    /// and forwarded requests it satisfies are done, and the requesters we
    /// forwarded for hear of it at once.
    pub(super) fn request_answered(
        &mut self,
        key: RouteKey,
        router_id: [u8; 8],
        seqno: u16,
        now: Instant,
    ) {
        if self
            .pending
            .get(&key)
            .is_some_and(|p| p.router_id == router_id && !seqno_newer(p.seqno, seqno))
        {
            self.pending.remove(&key);
            self.timers.cancel(Timer::Request(key));
        }
        let satisfied = self
            .forwarded
            .get(&key)
            .is_some_and(|f| f.router_id == router_id && !seqno_newer(f.seqno, seqno));
        if satisfied {
            if let Some(f) = self.forwarded.remove(&key) {
                let ifaces: BTreeSet<_> = f.requesters.iter().map(|n| n.iface).collect();
                for iface in ifaces {
                    self.schedule_update(Some(iface), key, Urgency::Urgent, now);
                }
            }
        }
    }

    pub(super) fn on_seqno_request(
        &mut self,
        now: Instant,
        from: NeighbourId,
        key: RouteKey,
        router_id: [u8; 8],
        seqno: u16,
        hops: u8,
    ) {
        if hops == 0 {
            return self.count(DropReason::SeqnoRequestNoHops);
        }
        let Some(e) = self.table.get(&key) else {
            return;
        };
        if e.exported {
            if router_id == self.cfg.router_id && seqno_newer(seqno, self.seqno) {
                if seqno.wrapping_sub(self.seqno) > SEQNO_AHEAD_MAX {
                    return self.count(DropReason::SeqnoRequestTooFar);
                }
                self.seqno = self.seqno.wrapping_add(1);
            }
            return self.schedule_update(Some(from.iface), key, Urgency::Urgent, now);
        }
        let selected = e
            .selected_route()
            .map(|r| (r.from, r.router_id, r.seqno, self.route_metric(r, now)));
        if let Some((_, rid, s, m)) = selected {
            if m != INFINITY && (rid != router_id || !seqno_newer(seqno, s)) {
                return self.schedule_update(Some(from.iface), key, Urgency::Urgent, now);
            }
        }
        if hops <= 1 {
            return;
        }
        let next = match selected {
            Some((n, _, _, m)) if n != from && m != INFINITY => Some(n),
            _ => self.best_to_ask(&key, Some(from), now).map(|(n, _, _)| n),
        };
        let Some(next) = next else {
            return;
        };
        let mut requesters = BTreeSet::from([from]);
        if let Some(f) = self.forwarded.get_mut(&key) {
            let same = f.router_id == router_id && !seqno_newer(seqno, f.seqno) && now < f.until;
            if same && f.next == next && now.duration_since(f.sent) < REQUEST_RESEND {
                // Just sent on: remember who else wants the answer.
                f.requesters.insert(from);
                return;
            }
            if same {
                // Sent on a while ago (perhaps into a link that has died
                // since): again, keeping who asked.
                requesters.extend(f.requesters.iter().copied());
            }
        }
        self.forwarded.insert(
            key,
            Forwarded {
                router_id,
                seqno,
                requesters,
                next,
                sent: now,
                until: now + FORWARD_HOLD,
            },
        );
        self.send_seqno_request(next, key, router_id, seqno, hops - 1);
    }
}
