//! Sending updates (the send half of babeld's `message.c`, with
//! `send_triggered_update`'s classes and `resend.c`'s resends).
//!
//! Updates are buffered per interface and flushed after about half a Hello
//! interval, or after [`URGENT_DELAY`] when urgent. What changed decides
//! the class, comparing with what we last advertised (babeld's thresholds;
//! with re6st's RTT penalty of about 10 per millisecond, 384 is about 38 ms):
//! - a retraction or a switch of router-id: urgent, and resent twice
//!   (these are what make black holes and transient loops);
//! - a new route, or one worse by 512 or more: urgent;
//! - better by less than 1024, or any change under 384: not sent (the
//!   periodic dump carries it; advertising small improvements would lower
//!   feasibility distances and make routes unfeasible at the next wobble);
//! - anything else: normal.
//!
//! A new seqno is passed on urgently only towards neighbours whose seqno
//! request we forwarded (see `request`), not flooded. A periodic dump that
//! needs several packets goes out in slices (up to a quarter of the table
//! every quarter of the update interval), so a large table never leaves as
//! one burst; a small one still leaves whole, in one packet.

use std::time::{Duration, Instant};

use super::interface::Urgency;
use super::table::Advertised;
use super::timer::Timer;
use super::{centis, Destination, RouteKey, Router, URGENT_DELAY};
use crate::neighbour::IfaceId;
use crate::wire::{Tlv, INFINITY};

/// A large periodic dump is sent in up to this many slices.
const DUMP_SLICES: usize = 4;
/// About as many Updates as fit in one packet (each with its Router-Id):
/// a table this small goes out whole, in one packet.
const UPDATES_PER_PACKET: usize = 40;
/// Urgent updates of the worst kind are sent again this often, twice.
const RESEND_DELAY: Duration = Duration::from_millis(500);
const RESENDS: u8 = 2;

/// How a destination's advertisement changed, by babeld's rules.
fn classify(old: Option<Advertised>, new: Option<Advertised>) -> Option<(Urgency, bool)> {
    let old = old.filter(|o| o.metric != INFINITY);
    match (old, new) {
        (None, None) => None,
        (Some(_), None) => Some((Urgency::Urgent, true)),
        (None, Some(_)) => Some((Urgency::Urgent, false)),
        (Some(o), Some(n)) if o.router_id != n.router_id => Some((Urgency::Urgent, true)),
        (Some(o), Some(n)) => {
            let diff = o.metric.abs_diff(n.metric);
            if n.metric > o.metric && diff >= 512 {
                Some((Urgency::Urgent, false))
            } else if (n.metric < o.metric && diff < 1024) || diff < 384 {
                None
            } else {
                Some((Urgency::Normal, false))
            }
        }
    }
}

impl Router {
    /// How many slices the periodic dump is cut into: one per packet's
    /// worth of destinations, at most [`DUMP_SLICES`].
    fn dump_slices(&self) -> usize {
        self.table
            .len()
            .div_ceil(UPDATES_PER_PACKET)
            .clamp(1, DUMP_SLICES)
    }

    /// The interval between dump slices on an interface.
    pub(super) fn dump_slice_interval(&self) -> Duration {
        self.cfg.update_interval / self.dump_slices() as u32
    }

    /// What we would advertise for `key` now (None: nothing, or a
    /// retraction).
    fn current_advert(&self, key: RouteKey, now: Instant) -> Option<Advertised> {
        let e = self.table.get(&key)?;
        if e.exported {
            return Some(Advertised {
                router_id: self.cfg.router_id,
                seqno: self.seqno,
                metric: 0,
            });
        }
        let r = e.selected_route()?;
        let metric = self.route_metric(r, now);
        (metric != INFINITY).then_some(Advertised {
            router_id: r.router_id,
            seqno: r.seqno,
            metric,
        })
    }

    /// After a change of `key`: tell the neighbours if it matters.
    pub(super) fn announce(&mut self, key: RouteKey, now: Instant) {
        let old = self.table.get(&key).and_then(|e| e.advertised);
        let new = self.current_advert(key, now);
        let Some((urgency, resend)) = classify(old, new) else {
            return;
        };
        self.schedule_update(None, key, urgency, now);
        if resend {
            self.resends.insert(key, RESENDS);
            self.timers.set(Timer::Resend(key), now + RESEND_DELAY);
        }
    }

    /// Queues an update for `key` on `iface` (None: every interface).
    pub(super) fn schedule_update(
        &mut self,
        iface: Option<IfaceId>,
        key: RouteKey,
        urgency: Urgency,
        now: Instant,
    ) {
        let ids: Vec<IfaceId> = match iface {
            Some(i) => vec![i],
            None => self.ifaces.keys().copied().collect(),
        };
        for id in ids {
            let Some(i) = self.ifaces.get_mut(&id) else {
                continue;
            };
            let u = i.pending.entry(key).or_insert(urgency);
            *u = (*u).max(urgency);
            let delay = match urgency {
                Urgency::Urgent => URGENT_DELAY,
                Urgency::Normal => i.cfg.hello_interval / 2,
            };
            let delay = self.rng.jitter(delay, 25);
            self.timers.set_earlier(Timer::Flush(id), now + delay);
        }
    }

    pub(super) fn on_resend_timer(&mut self, key: RouteKey, now: Instant) {
        let Some(left) = self.resends.get_mut(&key) else {
            return;
        };
        *left -= 1;
        if *left == 0 {
            self.resends.remove(&key);
        } else {
            self.timers
                .set(Timer::Resend(key), now + RESEND_DELAY * u32::from(RESENDS));
        }
        self.schedule_update(None, key, Urgency::Urgent, now);
    }

    /// Sends what is buffered for `iface`.
    pub(super) fn flush(&mut self, iface: IfaceId, now: Instant) {
        let Some(i) = self.ifaces.get_mut(&iface) else {
            return;
        };
        let keys: Vec<RouteKey> = std::mem::take(&mut i.pending).into_keys().collect();
        self.send_updates(iface, &keys, now);
    }

    /// The next slice of the periodic dump on `iface`.
    pub(super) fn dump_slice(&mut self, iface: IfaceId, now: Instant) {
        let Some(i) = self.ifaces.get(&iface) else {
            return;
        };
        let per_slice = self.table.len().div_ceil(self.dump_slices()).max(1);
        let cursor = i.dump_cursor;
        let keys: Vec<RouteKey> = self
            .table
            .keys_from(cursor)
            .take(per_slice)
            .copied()
            .collect();
        // At the end of the table the next slice starts again from the top.
        let last = if keys.len() < per_slice {
            None
        } else {
            keys.last().copied()
        };
        let keys: Vec<RouteKey> = keys
            .into_iter()
            .filter(|k| self.table.get(k).is_some_and(|e| e.advertisable()))
            .collect();
        self.send_updates(iface, &keys, now);
        let next = now + self.rng.jitter(self.dump_slice_interval(), 10);
        if let Some(i) = self.ifaces.get_mut(&iface) {
            i.dump_cursor = last;
        }
        self.timers.set(Timer::DumpSlice(iface), next);
    }

    /// Everything we advertise, on `iface`, now.
    pub(super) fn full_dump(&mut self, iface: IfaceId, now: Instant) {
        let keys = self.table.advertised_keys();
        if let Some(i) = self.ifaces.get_mut(&iface) {
            i.last_full_dump = Some(now);
        }
        self.send_updates(iface, &keys, now);
    }

    fn send_updates(&mut self, iface: IfaceId, keys: &[RouteKey], now: Instant) {
        let interval = centis(self.cfg.update_interval);
        let tlvs: Vec<Tlv> = keys
            .iter()
            .filter_map(|key| self.update_for(*key, now, interval))
            .collect();
        self.emit_tlvs(iface, Destination::Multicast, &tlvs);
    }

    /// A retraction of `key`, under our router-id (a retraction must not
    /// inherit the router-id of the Update before it in the packet).
    pub(super) fn retraction(&self, key: RouteKey, interval: u16) -> Tlv {
        Tlv::Update {
            ae: 0,
            flags: 0,
            omitted: 0,
            interval,
            seqno: self.seqno,
            metric: INFINITY,
            prefix: Some(key.prefix),
            src_prefix: key.src,
            router_id: Some(self.cfg.router_id),
            next_hop: None,
        }
    }

    /// The Update TLV we send for `key` now; records what we advertised
    /// and our feasibility distance.
    fn update_for(&mut self, key: RouteKey, now: Instant, interval: u16) -> Option<Tlv> {
        let advert = self.current_advert(key, now);
        let e = self.table.get(&key)?;
        let Some(a) = advert else {
            e.retract_until?;
            let tlv = self.retraction(key, interval);
            if let Some(e) = self.table.get_mut(&key) {
                e.advertised = Some(Advertised {
                    router_id: self.cfg.router_id,
                    seqno: self.seqno,
                    metric: INFINITY,
                });
            }
            return Some(tlv);
        };
        // Advertised-metric hysteresis: follow increases at once, but only
        // lower what we advertise on a clear improvement, so that RTT noise
        // does not keep pulling our feasibility distance down (which would
        // make our own route infeasible at the next upward wobble).
        let metric = match e.advertised {
            Some(old)
                if old.router_id == a.router_id
                    && old.seqno == a.seqno
                    && old.metric != INFINITY =>
            {
                if a.metric > old.metric
                    || u32::from(a.metric) + u32::from((old.metric / 8).max(64))
                        < u32::from(old.metric)
                {
                    a.metric
                } else {
                    old.metric
                }
            }
            _ => a.metric,
        };
        let sent = Advertised { metric, ..a };
        if let Some(e) = self.table.get_mut(&key) {
            e.advertised = Some(sent);
        }
        self.sources.advertised(
            crate::source::SourceKey {
                router_id: a.router_id,
                key,
            },
            a.seqno,
            metric,
            now,
        );
        Some(Tlv::Update {
            ae: 0,
            flags: 0,
            omitted: 0,
            interval,
            seqno: a.seqno,
            metric,
            prefix: Some(key.prefix),
            src_prefix: key.src,
            router_id: Some(a.router_id),
            next_hop: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adv(id: u8, metric: u16) -> Option<Advertised> {
        Some(Advertised {
            router_id: [id; 8],
            seqno: 1,
            metric,
        })
    }

    #[test]
    fn babeld_classes() {
        assert_eq!(classify(adv(1, 500), None), Some((Urgency::Urgent, true)));
        assert_eq!(
            classify(adv(1, 500), adv(2, 500)),
            Some((Urgency::Urgent, true))
        );
        assert_eq!(classify(None, adv(1, 500)), Some((Urgency::Urgent, false)));
        assert_eq!(
            classify(adv(1, INFINITY), adv(1, 500)),
            Some((Urgency::Urgent, false))
        );
        assert_eq!(
            classify(adv(1, 500), adv(1, 1100)),
            Some((Urgency::Urgent, false))
        );
        assert_eq!(
            classify(adv(1, 500), adv(1, 900)),
            Some((Urgency::Normal, false))
        );
        assert_eq!(classify(adv(1, 500), adv(1, 800)), None, "trivial");
        assert_eq!(
            classify(adv(1, 2000), adv(1, 1100)),
            None,
            "small improvement"
        );
        assert_eq!(
            classify(adv(1, 3000), adv(1, 1000)),
            Some((Urgency::Normal, false))
        );
        assert_eq!(classify(None, None), None);
        assert_eq!(classify(adv(1, INFINITY), None), None, "already retracted");
    }
}
