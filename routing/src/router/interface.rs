//! Interfaces: settings, the Hello schedule (with a quick burst at start
//! and for new neighbours), and the packet counter of RFC 8967.
//!
//! The first packet on a new interface carries a wildcard retraction and
//! a wildcard Route Request (as babeld): after a crash, neighbours drop
//! whatever they still route through us at once, then learn our table.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::timer::Timer;
use super::{centis, Destination, RouteKey, Router, URGENT_DELAY};
use crate::metric::RttParams;
use crate::neighbour::{IfaceId, LinkQuality};
use crate::wire::{Tlv, INFINITY};

/// Gap between the quick Hellos of a burst.
const BURST_GAP: Duration = Duration::from_millis(30);

/// Per-interface settings.
#[derive(Clone, Debug)]
pub struct InterfaceConfig {
    /// Hello interval.
    pub hello_interval: Duration,
    /// Nominal link cost (babeld: 96 on wired and tunnels).
    pub rxcost: u16,
    /// RTT extension: timestamps sent and the penalty applied (None: off).
    pub rtt: Option<RttParams>,
    /// Largest packet (UDP payload) we send.
    pub max_packet: usize,
    /// Our link-local address here, to recognise IHUs addressed to us and
    /// to sign packets (None: accept every IHU, fine on point-to-point
    /// links; with MACs on, nothing is sent until it is known).
    pub link_local: Option<Ipv6Addr>,
    /// Multiplies the link cost (1: normal; raise it to drain a tunnel).
    pub cost_multiplier: u16,
    /// How Hello history becomes a cost (2-out-of-3 or ETX).
    pub link_quality: LinkQuality,
    /// Hellos on the router's shared beat: every aligned interface with
    /// the same interval sends in the same wake-up (one jittered phase per
    /// router, so nodes stay apart as RFC 8966's jitter wants), instead of
    /// each at its own phase. Dump slices keep their own phases.
    pub aligned: bool,
    /// Babel runs here only with MACs: until keys are set, nothing is
    /// accepted or sent (re6st's tunnels: any member could talk to us).
    pub requires_auth: bool,
}

impl InterfaceConfig {
    /// A tunnel interface: RTT on, re6st's penalty, this Hello interval.
    pub fn tunnel(hello_interval: Duration) -> Self {
        Self {
            hello_interval,
            rxcost: 96,
            rtt: Some(RttParams::default()),
            max_packet: 1200,
            link_local: None,
            cost_multiplier: 1,
            link_quality: LinkQuality::TwoOutOfThree,
            aligned: true,
            requires_auth: false,
        }
    }
}

/// How soon buffered updates must leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Urgency {
    /// Within about half a Hello interval (babeld's non-urgent flush).
    Normal,
    /// Within [`URGENT_DELAY`].
    Urgent,
}

#[derive(Clone, Debug)]
pub(super) struct Iface {
    pub cfg: InterfaceConfig,
    pub hello_seqno: u16,
    /// Our first packet here has not gone out yet.
    pub fresh: bool,
    /// Extra quick Hellos still to send (start-up and new neighbours), so
    /// that 2-out-of-3 is met in tens of milliseconds, not two intervals.
    pub burst: u8,
    pub last_full_dump: Option<Instant>,
    /// Where the periodic dump goes on from.
    pub dump_cursor: Option<RouteKey>,
    /// Updates waiting for the interface's flush.
    pub pending: BTreeMap<RouteKey, Urgency>,
    /// Packet counter and index for RFC 8967.
    pub pc: u32,
    pub index: [u8; 8],
}

impl Router {
    /// Adds an interface; Hellos, a wildcard retraction and a wildcard
    /// Route Request go out at once, and our table soon after.
    pub fn add_interface(&mut self, id: IfaceId, cfg: InterfaceConfig, now: Instant) {
        let hello_seqno = self.rng.u16();
        let index = self.rng.bytes::<8>();
        let slice = self.dump_slice_interval();
        self.ifaces.insert(
            id,
            Iface {
                cfg,
                hello_seqno,
                fresh: true,
                burst: 2,
                last_full_dump: None,
                dump_cursor: None,
                pending: BTreeMap::new(),
                pc: 0,
                index,
            },
        );
        self.timers.set(Timer::Hello(id), now);
        self.timers.set(Timer::FullDump(id), now + URGENT_DELAY);
        let first_slice = now + self.rng.jitter(slice, 50);
        self.timers.set(Timer::DumpSlice(id), first_slice);
    }

    /// Removes an interface with its neighbours and their routes.
    pub fn remove_interface(&mut self, id: IfaceId, now: Instant) {
        self.ifaces.remove(&id);
        for t in [
            Timer::Hello(id),
            Timer::DumpSlice(id),
            Timer::FullDump(id),
            Timer::Flush(id),
        ] {
            self.timers.cancel(t);
        }
        for n in self.neighbours_on(id) {
            self.drop_neighbour(n, now);
        }
    }

    /// Sets an interface's cost multiplier (drain: raise it so traffic moves away).
    pub fn set_cost_multiplier(&mut self, id: IfaceId, multiplier: u16, now: Instant) {
        if let Some(i) = self.ifaces.get_mut(&id) {
            i.cfg.cost_multiplier = multiplier.max(1);
        }
        for n in self.neighbours_on(id) {
            self.cost_changed(n, now);
        }
    }

    /// Changes an interface's Hello interval (live: the next Hello comes
    /// no later than one new interval from now).
    pub fn set_hello_interval(&mut self, id: IfaceId, interval: Duration, now: Instant) {
        if let Some(i) = self.ifaces.get_mut(&id) {
            i.cfg.hello_interval = interval.max(Duration::from_millis(10));
            self.timers
                .set_earlier(Timer::Hello(id), now + i.cfg.hello_interval);
        }
    }

    /// Sets our link-local address on an interface (learned late, e.g.
    /// after duplicate address detection).
    pub fn set_link_local(&mut self, id: IfaceId, addr: Ipv6Addr) {
        if let Some(i) = self.ifaces.get_mut(&id) {
            i.cfg.link_local = Some(addr);
        }
    }

    /// Whether Babel runs on `id`.
    pub fn has_interface(&self, id: IfaceId) -> bool {
        self.ifaces.contains_key(&id)
    }

    /// Whether the interface runs Babel without a link-local address yet.
    pub fn lacks_link_local(&self, id: IfaceId) -> bool {
        self.ifaces
            .get(&id)
            .is_some_and(|i| i.cfg.link_local.is_none())
    }

    /// A Hello (with IHUs for every neighbour there) on `iface`; the first
    /// packet on an interface also retracts everything and asks for
    /// everything.
    pub(super) fn send_hello(&mut self, iface: IfaceId, now: Instant) {
        let ts = self.micros(now);
        let Some(i) = self.ifaces.get(&iface) else {
            return;
        };
        let interval = centis(i.cfg.hello_interval * 3).max(1);
        let timestamps = i.cfg.rtt.is_some();
        let (nominal, quality) = (i.cfg.rxcost, i.cfg.link_quality);
        let ihus: Vec<Tlv> = self
            .neighbours
            .iter()
            .filter(|(id, _)| id.iface == iface)
            .map(|(id, n)| Tlv::Ihu {
                ae: 0,
                rxcost: n.rxcost(nominal, quality),
                interval,
                address: Some(IpAddr::V6(id.addr)),
                timestamp: if timestamps { n.last_hello_ts } else { None },
            })
            .collect();
        let my_id = self.cfg.router_id;
        let seqno = self.seqno;
        let Some(i) = self.ifaces.get_mut(&iface) else {
            return;
        };
        i.hello_seqno = i.hello_seqno.wrapping_add(1);
        // The Hello comes first: IHUs with timestamps must share its packet.
        let mut tlvs = vec![Tlv::Hello {
            flags: 0,
            seqno: i.hello_seqno,
            interval: centis(i.cfg.hello_interval).max(1),
            timestamp: timestamps.then_some(ts),
        }];
        tlvs.extend(ihus);
        if std::mem::take(&mut i.fresh) {
            tlvs.push(Tlv::Update {
                ae: 0,
                flags: 0,
                omitted: 0,
                interval: 0,
                seqno,
                metric: INFINITY,
                prefix: None,
                src_prefix: None,
                router_id: Some(my_id),
                next_hop: None,
            });
            tlvs.push(Tlv::RouteRequest {
                ae: 0,
                prefix: None,
                src_prefix: None,
            });
        }
        let burst = i.burst;
        i.burst = burst.saturating_sub(1);
        let (iv, aligned) = (i.cfg.hello_interval, i.cfg.aligned);
        self.emit_tlvs(iface, Destination::Multicast, &tlvs);
        let next = if burst > 0 {
            now + BURST_GAP.min(iv)
        } else {
            self.next_hello(iv, aligned, now)
        };
        self.timers.set(Timer::Hello(iface), next);
    }

    /// A new neighbour on `iface`: two quick Hellos (with an IHU for it) so
    /// the link is usable at once on both sides, and our table soon.
    pub(super) fn greet(&mut self, iface: IfaceId, now: Instant) {
        if let Some(i) = self.ifaces.get_mut(&iface) {
            i.burst = i.burst.max(2);
            self.timers
                .set_earlier(Timer::Hello(iface), now + URGENT_DELAY);
            self.timers
                .set_earlier(Timer::FullDump(iface), now + URGENT_DELAY);
        }
    }
}
