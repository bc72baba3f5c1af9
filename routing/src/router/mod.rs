//! The sans-IO Babel router: no sockets, no clock, no system randomness;
//! time and a seed are passed in.
//!
//! ```text
//! router.handle_packet(now, rx_time, iface, src, bytes)   router.handle_timeout(now)
//! router.poll_transmit() -> Transmit                      router.poll_timeout() -> Instant
//! router.poll_route_change() -> RouteChange
//! router.add_interface / remove_interface / set_cost_multiplier / export / unexport
//! ```
//!
//! One concept per file, as babeld splits its sources:
//! - [`table`]: destinations, their routes and the per-neighbour index;
//! - `select`: receiving Updates, the feasibility condition, selection with
//!   hysteresis, kernel routes with the retraction hold (route.c);
//! - `update`: buffered, classed and resent updates, dumps in slices;
//! - `request`: seqno requests: starvation, §3.8.2.2, forwarding (resend.c);
//! - `xroute`: our exports and our seqno;
//! - `neighbours`: Hello/IHU handling, link costs, missed Hellos;
//! - [`interface`]: interfaces and the Hello schedule;
//! - [`filter`]: which received routes may be installed;
//! - `authenticate`: RFC 8967 checks of received packets;
//! - `timer`: the timer table behind `poll_timeout`;
//! - [`status`]: what the router shows (neighbours, routes, counters).
//!
//! Loop freedom is the feasibility condition (RFC 8966 §3.5.1); black
//! holes are avoided by keeping the selected route when its successor sends
//! an unfeasible update with the same router-id (§3.5.3) and asking for a
//! new seqno instead (§3.8.2.2), by forwarding seqno requests even without
//! a selected route, by asking again with back-off while starved, and by
//! holding an `unreachable` kernel route while a retraction is advertised
//! (§3.5.4).

mod authenticate;
pub mod filter;
pub mod interface;
mod neighbours;
mod random;
mod request;
mod select;
pub mod status;
pub mod table;
mod timer;
mod update;
mod xroute;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

pub use filter::{node_router_id, Filter, Origin};
pub use interface::InterfaceConfig;
pub use status::{NeighbourInfo, RouteInfo, RoutingState, Stats};
pub use table::{InstalledRoute, RouteKey};

use crate::auth::{Auth, AuthConfig};
use crate::drop_reason::DropReason;
use crate::neighbour::{IfaceId, Neighbour, NeighbourId};
use crate::source::SourceTable;
use crate::wire::{self, PacketWriter, Tlv};
use interface::Iface;
use random::Rng;
use request::{Forwarded, Pending};
use table::Table;
use timer::{Timer, TimerTable};

/// How long a retraction keeps being advertised (and the destination held
/// unreachable in the kernel).
const RETRACT_HOLD: Duration = Duration::from_secs(20);
/// Delay before urgent updates are sent (to batch them).
const URGENT_DELAY: Duration = Duration::from_millis(10);
/// Housekeeping period (route expiry, garbage collection).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Router-wide settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Our router-id (not all-zero nor all-ones).
    pub router_id: [u8; 8],
    /// Period of full route dumps on each interface (sent in slices).
    pub update_interval: Duration,
    /// Seed of the router's randomness (jitter, RFC 8967 indexes and
    /// nonces): from the operating system in production, fixed in
    /// simulations.
    pub seed: [u8; 32],
    /// Our first seqno: one newer than any we used before (the driver
    /// persists it), else random.
    pub seqno: u16,
    /// RFC 8967 MAC authentication (None: off).
    pub auth: Option<AuthConfig>,
    /// Which received routes may be installed.
    pub filter: Filter,
}

impl RouterConfig {
    /// Defaults for a router-id, with this seed (the first seqno is drawn
    /// from it).
    pub fn new(router_id: [u8; 8], seed: [u8; 32]) -> Self {
        Self {
            router_id,
            update_interval: Duration::from_secs(4),
            seed,
            seqno: Rng::new(seed).u16(),
            auth: None,
            filter: Filter::default(),
        }
    }
}

/// Where a packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// ff02::1:6 on the interface.
    Multicast,
    /// A neighbour's link-local address.
    Unicast(Ipv6Addr),
}

/// A packet to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Out of this interface.
    pub iface: IfaceId,
    /// To this destination (UDP port 6696).
    pub dst: Destination,
    /// The UDP payload.
    pub bytes: Vec<u8>,
}

/// A change for the kernel's routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// Forward `key` out of `iface` via `next_hop` (new or replacing
    /// whatever is there, an unreachable route included).
    Install {
        /// Destination.
        key: RouteKey,
        /// Out of this interface.
        iface: IfaceId,
        /// Via this next hop.
        next_hop: IpAddr,
        /// Metric.
        metric: u16,
    },
    /// Hold `key` as `unreachable` (replacing a forwarding route): the
    /// retraction is still advertised, and packets must not fall through
    /// to a shorter prefix (RFC 8966 §3.5.4).
    Unreachable {
        /// Destination.
        key: RouteKey,
    },
    /// Nothing for `key` any more.
    Remove {
        /// Destination.
        key: RouteKey,
    },
}

/// The Babel router.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    epoch: Instant,
    seqno: u16,
    ifaces: BTreeMap<IfaceId, Iface>,
    neighbours: BTreeMap<NeighbourId, Neighbour>,
    /// Link cost per neighbour, recomputed on every event of it.
    costs: BTreeMap<NeighbourId, u16>,
    table: Table,
    sources: SourceTable,
    pending: BTreeMap<RouteKey, Pending>,
    forwarded: BTreeMap<RouteKey, Forwarded>,
    /// Resends still due per urgent update.
    resends: BTreeMap<RouteKey, u8>,
    /// When each neighbour last had seqno requests sent on its behalf
    /// because it missed a Hello.
    prepared: BTreeMap<NeighbourId, Instant>,
    timers: TimerTable,
    /// The next Hello beat of aligned interfaces, by interval.
    beats: BTreeMap<Duration, Instant>,
    outbox: VecDeque<Transmit>,
    changes: VecDeque<RouteChange>,
    rng: Rng,
    stats: Stats,
    auth: Option<Auth>,
}

/// A duration in centiseconds, as the wire carries intervals.
fn centis(d: Duration) -> u16 {
    (d.as_millis() / 10).min(0xfffe) as u16
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

impl Router {
    /// A router with no interfaces yet.
    pub fn new(cfg: RouterConfig, now: Instant) -> Self {
        let auth = cfg.auth.clone().map(Auth::new);
        let mut timers = TimerTable::default();
        timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
        Self {
            seqno: cfg.seqno,
            rng: Rng::new(cfg.seed),
            cfg,
            epoch: now,
            ifaces: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            costs: BTreeMap::new(),
            table: Table::default(),
            sources: SourceTable::default(),
            pending: BTreeMap::new(),
            forwarded: BTreeMap::new(),
            resends: BTreeMap::new(),
            prepared: BTreeMap::new(),
            timers,
            beats: BTreeMap::new(),
            outbox: VecDeque::new(),
            changes: VecDeque::new(),
            stats: Stats::default(),
            auth,
        }
    }

    /// Our router-id.
    pub fn router_id(&self) -> [u8; 8] {
        self.cfg.router_id
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Changes the MAC keys (rotation) or turns authentication on or off.
    /// Neighbours' packet counters are kept across a key change.
    pub fn set_auth(&mut self, auth: Option<AuthConfig>) {
        match (auth, self.auth.as_mut()) {
            (Some(cfg), Some(a)) => a.set_config(cfg),
            (cfg, _) => self.auth = cfg.map(Auth::new),
        }
    }

    fn micros(&self, t: Instant) -> u32 {
        t.saturating_duration_since(self.epoch).as_micros() as u32
    }

    fn count(&mut self, reason: DropReason) {
        *self.stats.drops.entry(reason).or_default() += 1;
        if reason.is_packet() {
            self.stats.packets_rejected += 1;
        }
    }

    /// Handles a packet received on `iface` from `src` (its source
    /// address) at `rx_time` (the socket's receive timestamp: RTT samples
    /// must not include our own queueing), processed at `now`.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        rx_time: Instant,
        iface: IfaceId,
        src: IpAddr,
        bytes: &[u8],
    ) {
        let rx_time = rx_time.min(now);
        let IpAddr::V6(src) = src else {
            return self.count(DropReason::NotLinkLocal);
        };
        if !is_link_local(&src) {
            return self.count(DropReason::NotLinkLocal);
        }
        if !self.ifaces.contains_key(&iface) {
            return self.count(DropReason::UnknownInterface);
        }
        let Ok(packet) = wire::parse(bytes) else {
            return self.count(DropReason::Unparsable);
        };
        if let Err(reason) = self.authenticate(now, iface, src, bytes, &packet) {
            return self.count(reason);
        }
        self.stats.packets_in += 1;
        let nid = NeighbourId { iface, addr: src };
        if let std::collections::btree_map::Entry::Vacant(v) = self.neighbours.entry(nid) {
            v.insert(Neighbour::new(iface, src, now));
            // Forgotten if no Hello ever comes.
            let forget = now + crate::neighbour::NEIGHBOUR_GC;
            self.timers.set(Timer::Miss(nid), forget);
            self.greet(iface, now);
        }
        if let Some(n) = self.neighbours.get_mut(&nid) {
            n.last_heard = now;
        }
        let mut hello_ts = None;
        let mut ihu_ts = None;
        for tlv in &packet.body {
            match tlv {
                Tlv::Hello {
                    flags,
                    seqno,
                    interval,
                    timestamp,
                } if flags & wire::HELLO_UNICAST == 0 => {
                    self.on_hello(now, rx_time, nid, *seqno, *interval, *timestamp);
                    hello_ts = hello_ts.or(*timestamp);
                }
                Tlv::Ihu {
                    rxcost,
                    interval,
                    address,
                    timestamp,
                    ..
                } => {
                    let for_us = self.on_ihu(now, nid, *rxcost, *interval, *address);
                    ihu_ts = ihu_ts.or(timestamp.filter(|_| for_us));
                }
                Tlv::Update {
                    prefix,
                    src_prefix,
                    router_id,
                    seqno,
                    metric,
                    interval,
                    next_hop,
                    ..
                } => match prefix {
                    None => self.on_wildcard_retraction(nid, now),
                    Some(p) => self.on_update(
                        now,
                        nid,
                        select::Received {
                            key: RouteKey::new(*p, *src_prefix),
                            router_id: *router_id,
                            seqno: *seqno,
                            metric: *metric,
                            interval: *interval,
                            next_hop: next_hop.unwrap_or(IpAddr::V6(src)),
                        },
                    ),
                },
                Tlv::RouteRequest {
                    prefix, src_prefix, ..
                } => self.on_route_request(now, nid, prefix.map(|p| RouteKey::new(p, *src_prefix))),
                Tlv::SeqnoRequest {
                    seqno,
                    hop_count,
                    router_id,
                    prefix,
                    src_prefix,
                    ..
                } => self.on_seqno_request(
                    now,
                    nid,
                    RouteKey::new(*prefix, *src_prefix),
                    *router_id,
                    *seqno,
                    *hop_count,
                ),
                Tlv::AckReq { opaque, .. } => {
                    self.emit_tlvs(
                        iface,
                        Destination::Unicast(src),
                        &[Tlv::Ack { opaque: *opaque }],
                    );
                }
                _ => {}
            }
        }
        if let (Some(hts), Some(ts)) = (hello_ts, ihu_ts) {
            self.on_rtt(nid, rx_time, hts, ts, now);
        }
        self.cost_changed(nid, now);
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Housekeeping => {
                    self.housekeeping(now);
                    self.timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
                }
                Timer::Hello(i) => self.send_hello(i, now),
                Timer::DumpSlice(i) => self.dump_slice(i, now),
                Timer::FullDump(i) => self.full_dump(i, now),
                Timer::Flush(i) => self.flush(i, now),
                Timer::Miss(n) => self.on_miss(n, now),
                Timer::Request(k) => self.on_request_timer(k, now),
                Timer::Resend(k) => self.on_resend_timer(k, now),
            }
        }
    }

    /// When [`Router::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// The next change for the kernel's routing table.
    pub fn poll_route_change(&mut self) -> Option<RouteChange> {
        self.changes.pop_front()
    }

    fn housekeeping(&mut self, now: Instant) {
        let ids: Vec<NeighbourId> = self.neighbours.keys().copied().collect();
        for id in ids {
            // IHUs and RTT samples expire without any packet.
            self.cost_changed(id, now);
        }
        self.expire_routes(now);
        self.forwarded.retain(|_, f| now < f.until);
        self.prepared
            .retain(|_, at| now.duration_since(*at) < neighbours::PREPARE_GAP);
        self.sources.gc(now);
    }

    /// Clean shutdown: retract everything we advertise, and send a Hello
    /// with a 10 ms interval so neighbours drop us at once; then remove
    /// every installed route.
    pub fn shutdown(&mut self, now: Instant) {
        let keys = self.table.advertised_keys();
        let retractions: Vec<Tlv> = keys.iter().map(|key| self.retraction(*key, 0)).collect();
        let ifaces: Vec<IfaceId> = self.ifaces.keys().copied().collect();
        for id in ifaces {
            let Some(i) = self.ifaces.get_mut(&id) else {
                continue;
            };
            i.hello_seqno = i.hello_seqno.wrapping_add(1);
            let mut tlvs = vec![Tlv::Hello {
                flags: 0,
                seqno: i.hello_seqno,
                interval: 1,
                timestamp: None,
            }];
            tlvs.extend(retractions.iter().cloned());
            self.emit_tlvs(id, Destination::Multicast, &tlvs);
        }
        let installed: Vec<RouteKey> = self
            .table
            .iter()
            .filter(|(_, e)| e.installed.is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in installed {
            self.changes.push_back(RouteChange::Remove { key });
        }
        self.table = Table::default();
        self.timers = TimerTable::default();
        self.timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
    }

    /// Bytes kept free in every packet for the PC and MAC TLVs.
    fn reserve(&self) -> usize {
        self.auth.as_ref().map_or(0, Auth::overhead)
    }

    /// Finishes a packet (PC and MAC when authentication is on) and queues it.
    fn emit(&mut self, iface: IfaceId, dst: Destination, mut w: PacketWriter) {
        let bytes = match (&self.auth, self.ifaces.get_mut(&iface)) {
            (None, Some(i)) if i.cfg.requires_auth => return self.count(DropReason::NoKeys),
            (Some(auth), Some(i)) => {
                let Some(src) = i.cfg.link_local else {
                    // A MAC over `::` would be refused by every neighbour.
                    return self.count(DropReason::NoLinkLocal);
                };
                i.pc = i.pc.wrapping_add(1);
                if i.pc == 0 {
                    // RFC 8967 §4.1: a new index when the counter wraps.
                    i.index = self.rng.bytes::<8>();
                    i.pc = 1;
                }
                w.push(
                    &Tlv::Pc {
                        pc: i.pc,
                        index: i.index.to_vec(),
                    },
                    0,
                );
                let body = w.body();
                let dst_addr = match dst {
                    Destination::Multicast => wire::MULTICAST,
                    Destination::Unicast(a) => a,
                };
                let mac = auth.sign(src, dst_addr, &body);
                w.finish(&[Tlv::Mac(mac)])
            }
            _ => w.finish(&[]),
        };
        self.stats.packets_out += 1;
        self.outbox.push_back(Transmit { iface, dst, bytes });
    }

    /// Packs `tlvs` into as many packets as needed (each with room for the
    /// PC and MAC TLVs) and queues them for `dst` on `iface`.
    fn emit_tlvs(&mut self, iface: IfaceId, dst: Destination, tlvs: &[Tlv]) {
        if tlvs.is_empty() {
            return;
        }
        let reserve = self.reserve();
        let Some(max) = self.ifaces.get(&iface).map(|i| i.cfg.max_packet) else {
            return;
        };
        let mut w = PacketWriter::new(max);
        for tlv in tlvs {
            if !w.push(tlv, reserve) && !w.is_empty() {
                let full = std::mem::replace(&mut w, PacketWriter::new(max));
                self.emit(iface, dst, full);
                w.push(tlv, reserve);
            }
        }
        if !w.is_empty() {
            self.emit(iface, dst, w);
        }
    }

    /// Exported prefixes.
    pub fn exports(&self) -> Vec<(IpNet, Option<IpNet>)> {
        self.table
            .iter()
            .filter(|(_, e)| e.exported)
            .map(|(k, _)| (k.prefix, k.src))
            .collect()
    }
}
