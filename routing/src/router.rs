//! The sans-IO Babel router: no sockets, no clock; time is passed in.
//!
//! ```text
//! router.handle_packet(now, iface, src, bytes)   router.handle_timeout(now)
//! router.poll_transmit() -> Transmit               router.poll_timeout() -> Instant
//! router.poll_route_change() -> RouteChange
//! router.add_interface / remove_interface / set_cost_multiplier / export / unexport
//! ```
//!
//! Fast failure handling: each neighbour has its own missed-Hello deadline
//! (see [`crate::neighbour`]); when a link's cost changes, every route
//! through it is reselected at once, so traffic moves to the best feasible
//! alternative in the same call. Selection is sticky: a valid selected route
//! is only replaced by one better by a margin (hysteresis against RTT
//! jitter).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::auth::{Auth, AuthConfig, Verdict};
use crate::metric::{add, seqno_newer, RttParams};
use crate::neighbour::{IfaceId, LinkQuality, Neighbour};
use crate::source::{SourceKey, SourceTable};
use crate::wire::{self, PacketWriter, Tlv, INFINITY};

/// A route's destination: prefix and optional source prefix (RFC 9079).
pub type RouteKey = (IpNet, Option<IpNet>);
/// A neighbour: interface and link-local address.
pub type NeighbourId = (IfaceId, Ipv6Addr);

/// Hop count of the seqno requests we originate.
const REQUEST_HOPS: u8 = 64;
/// How long a retraction keeps being advertised.
const RETRACT_HOLD: Duration = Duration::from_secs(20);
/// Gap between the quick Hellos of a burst.
const BURST_GAP: Duration = Duration::from_millis(30);
/// Delay before triggered updates are sent (to batch them).
const URGENT_DELAY: Duration = Duration::from_millis(10);
/// Housekeeping period (route expiry, garbage collection).
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Seqno request resends: first after this, doubling, at most 3 tries.
const REQUEST_RESEND: Duration = Duration::from_millis(500);

/// Router-wide settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Our router-id (not all-zero nor all-ones).
    pub router_id: [u8; 8],
    /// Period of full route dumps on each interface.
    pub update_interval: Duration,
    /// Seed of the jitter generator (simulations are reproducible).
    pub seed: u64,
    /// RFC 8967 MAC authentication (None: off).
    pub auth: Option<AuthConfig>,
}

impl RouterConfig {
    /// Defaults for a router-id.
    pub fn new(router_id: [u8; 8]) -> Self {
        Self {
            router_id,
            update_interval: Duration::from_secs(4),
            seed: u64::from_be_bytes(router_id),
            auth: None,
        }
    }
}

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
    /// Our link-local address here, to recognise IHUs addressed to us
    /// (None: accept every IHU, fine on point-to-point links).
    pub link_local: Option<Ipv6Addr>,
    /// Multiplies the link cost (1: normal; raise it to drain a tunnel).
    pub cost_multiplier: u16,
    /// How Hello history becomes a cost (2-out-of-3 or ETX).
    pub link_quality: LinkQuality,
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// A new route.
    Install {
        /// Destination.
        prefix: IpNet,
        /// Source prefix.
        src_prefix: Option<IpNet>,
        /// Out of this interface.
        iface: IfaceId,
        /// Via this next hop.
        next_hop: IpAddr,
        /// Metric.
        metric: u16,
    },
    /// The route now goes another way.
    Replace {
        /// Destination.
        prefix: IpNet,
        /// Source prefix.
        src_prefix: Option<IpNet>,
        /// Out of this interface.
        iface: IfaceId,
        /// Via this next hop.
        next_hop: IpAddr,
        /// Metric.
        metric: u16,
    },
    /// No route any more.
    Remove {
        /// Destination.
        prefix: IpNet,
        /// Source prefix.
        src_prefix: Option<IpNet>,
    },
}

/// A route learned from a neighbour.
#[derive(Clone, Debug)]
struct Route {
    from: NeighbourId,
    router_id: [u8; 8],
    seqno: u16,
    refmetric: u16,
    next_hop: IpAddr,
    expires: Instant,
}

#[derive(Clone, Debug)]
struct Iface {
    cfg: InterfaceConfig,
    hello_seqno: u16,
    next_hello: Instant,
    next_dump: Instant,
    dump_soon: Option<Instant>,
    last_full_dump: Option<Instant>,
    startup_request: bool,
    /// Packet counter and index for RFC 8967.
    pc: u32,
    index: [u8; 8],
    /// Extra quick Hellos still to send (start-up and new neighbours), so
    /// that 2-out-of-3 is met in tens of milliseconds, not two intervals.
    burst: u8,
}

#[derive(Clone, Debug)]
struct PendingRequest {
    seqno: u16,
    to: NeighbourId,
    resend_at: Instant,
    tries: u8,
}

/// What a neighbour looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourInfo {
    /// Interface.
    pub iface: IfaceId,
    /// Link-local address.
    pub addr: Ipv6Addr,
    /// Hello history (bit 15 most recent).
    pub history: u16,
    /// Our rxcost for it.
    pub rxcost: u16,
    /// Its rxcost for us.
    pub txcost: u16,
    /// Smoothed RTT.
    pub rtt: Option<Duration>,
    /// Current link cost.
    pub cost: u16,
}

/// What a route looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination.
    pub prefix: IpNet,
    /// Source prefix.
    pub src_prefix: Option<IpNet>,
    /// Originator.
    pub router_id: [u8; 8],
    /// Source seqno.
    pub seqno: u16,
    /// Metric through this neighbour.
    pub metric: u16,
    /// The neighbour's advertised metric.
    pub refmetric: u16,
    /// Interface.
    pub iface: IfaceId,
    /// Next hop.
    pub next_hop: IpAddr,
    /// Whether it is the selected one.
    pub selected: bool,
    /// Whether it satisfies the feasibility condition now.
    pub feasible: bool,
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets parsed.
    pub packets_in: u64,
    /// Packets refused (not link-local, unparsable).
    pub packets_rejected: u64,
    /// Packets produced.
    pub packets_out: u64,
    /// Changes of the selected route.
    pub route_switches: u64,
    /// Seqno requests sent (originated or forwarded).
    pub seqno_requests: u64,
}

/// The Babel router.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    epoch: Instant,
    seqno: u16,
    ifaces: BTreeMap<IfaceId, Iface>,
    neighbours: BTreeMap<NeighbourId, Neighbour>,
    costs: HashMap<NeighbourId, u16>,
    routes: HashMap<RouteKey, Vec<Route>>,
    selected: HashMap<RouteKey, NeighbourId>,
    installed: HashMap<RouteKey, (IfaceId, IpAddr, u16)>,
    exports: BTreeSet<RouteKey>,
    sources: SourceTable,
    retracting: HashMap<RouteKey, Instant>,
    triggered: BTreeSet<RouteKey>,
    flush_at: Option<Instant>,
    advertised: HashMap<RouteKey, ([u8; 8], u16, u16)>,
    requests: HashMap<(RouteKey, [u8; 8]), PendingRequest>,
    forwarded: HashMap<(RouteKey, [u8; 8], u16), Instant>,
    outbox: VecDeque<Transmit>,
    changes: VecDeque<RouteChange>,
    next_housekeeping: Instant,
    rng: u64,
    stats: Stats,
    auth: Option<Auth>,
}

fn cs(d: Duration) -> u16 {
    (d.as_millis() / 10).min(0xfffe) as u16
}

/// Unpredictable bytes (packet-counter indexes, challenge nonces).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // If the system generator fails, a zero index/nonce only weakens
    // replay protection for that exchange; it cannot crash the router.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

impl Router {
    /// A router with no interfaces yet.
    pub fn new(cfg: RouterConfig, now: Instant) -> Self {
        let rng = cfg.seed | 1;
        let cfg_auth = cfg.auth.clone();
        let seqno = (cfg.seed >> 16) as u16;
        Self {
            cfg,
            epoch: now,
            seqno,
            ifaces: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            costs: HashMap::new(),
            routes: HashMap::new(),
            selected: HashMap::new(),
            installed: HashMap::new(),
            exports: BTreeSet::new(),
            sources: SourceTable::default(),
            retracting: HashMap::new(),
            triggered: BTreeSet::new(),
            flush_at: None,
            advertised: HashMap::new(),
            requests: HashMap::new(),
            forwarded: HashMap::new(),
            outbox: VecDeque::new(),
            changes: VecDeque::new(),
            next_housekeeping: now + HOUSEKEEPING,
            rng,
            stats: Stats::default(),
            auth: cfg_auth.map(Auth::new),
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

    fn jitter(&mut self, d: Duration, spread_percent: u64) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = 2 * spread_percent;
        let pct = 100 - spread_percent + self.rng % (span + 1);
        d * pct as u32 / 100
    }

    fn micros(&self, now: Instant) -> u32 {
        now.duration_since(self.epoch).as_micros() as u32
    }

    /// Adds an interface; Hellos and a wildcard Route Request go out at once.
    pub fn add_interface(&mut self, id: IfaceId, cfg: InterfaceConfig, now: Instant) {
        let dump = now + URGENT_DELAY;
        self.ifaces.insert(
            id,
            Iface {
                cfg,
                hello_seqno: (self.rng >> 8) as u16,
                next_hello: now,
                next_dump: dump + self.cfg.update_interval,
                dump_soon: Some(dump),
                last_full_dump: None,
                startup_request: true,
                burst: 2,
                pc: 0,
                index: random_bytes::<8>(),
            },
        );
    }

    /// Removes an interface with its neighbours and their routes.
    pub fn remove_interface(&mut self, id: IfaceId, now: Instant) {
        self.ifaces.remove(&id);
        for n in self.neighbours_on(id) {
            self.drop_neighbour(n, now);
        }
    }

    /// The neighbours heard on interface `id`.
    fn neighbours_on(&self, id: IfaceId) -> Vec<NeighbourId> {
        self.neighbours
            .keys()
            .filter(|(i, _)| *i == id)
            .copied()
            .collect()
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
            i.cfg.hello_interval = interval;
            i.next_hello = i.next_hello.min(now + interval);
        }
    }

    /// Changes the MAC keys (rotation) or turns authentication on or off.
    /// Neighbours' packet counters are kept across a key change.
    pub fn set_auth(&mut self, auth: Option<AuthConfig>) {
        match (auth, self.auth.as_mut()) {
            (Some(cfg), Some(a)) => a.set_config(cfg),
            (cfg, _) => self.auth = cfg.map(Auth::new),
        }
    }

    /// Exports a prefix (metric 0, our router-id).
    pub fn export(&mut self, prefix: IpNet, src_prefix: Option<IpNet>, now: Instant) {
        let key = (prefix.trunc(), src_prefix.map(|s| s.trunc()));
        if self.exports.insert(key) {
            self.retracting.remove(&key);
            self.trigger(key, now);
        }
    }

    /// Stops exporting a prefix (a retraction goes out).
    pub fn unexport(&mut self, prefix: IpNet, src_prefix: Option<IpNet>, now: Instant) {
        let key = (prefix.trunc(), src_prefix.map(|s| s.trunc()));
        if self.exports.remove(&key) {
            self.seqno = self.seqno.wrapping_add(1);
            self.reselect(key, now);
            if !self.selected.contains_key(&key) {
                self.retracting.insert(key, now + RETRACT_HOLD);
            }
            self.trigger(key, now);
        }
    }

    fn trigger(&mut self, key: RouteKey, now: Instant) {
        self.triggered.insert(key);
        let at = now + URGENT_DELAY;
        self.flush_at = Some(self.flush_at.map_or(at, |f| f.min(at)));
    }

    fn neighbour_cost(&self, id: &NeighbourId, now: Instant) -> u16 {
        let (Some(n), Some(i)) = (self.neighbours.get(id), self.ifaces.get(&id.0)) else {
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

    fn route_metric(&self, r: &Route, now: Instant) -> u16 {
        if r.refmetric == INFINITY || now >= r.expires {
            return INFINITY;
        }
        add(self.neighbour_cost(&r.from, now), r.refmetric)
    }

    fn route_feasible(&self, key: &RouteKey, r: &Route) -> bool {
        self.sources
            .feasible(&(r.router_id, key.0, key.1), r.seqno, r.refmetric)
    }

    /// Re-evaluates the selected route of `key`.
    fn reselect(&mut self, key: RouteKey, now: Instant) {
        let exported = self.exports.contains(&key);
        let mut best: Option<(NeighbourId, u16)> = None;
        let mut current: Option<(NeighbourId, u16)> = None;
        if let Some(list) = self.routes.get(&key) {
            for r in list {
                let m = self.route_metric(r, now);
                if m == INFINITY || !self.route_feasible(&key, r) {
                    continue;
                }
                if self.selected.get(&key) == Some(&r.from) {
                    current = Some((r.from, m));
                }
                if best.is_none_or(|(_, bm)| m < bm) {
                    best = Some((r.from, m));
                }
            }
        }
        // Hysteresis: keep a valid current route unless clearly beaten.
        let choice = match (current, best) {
            (Some((c, cm)), Some((b, bm))) if b != c => {
                let margin = (cm / 8).max(48);
                if u32::from(bm) + u32::from(margin) < u32::from(cm) {
                    Some((b, bm))
                } else {
                    Some((c, cm))
                }
            }
            (Some(c), _) => Some(c),
            (None, b) => b,
        };
        let choice = if exported { None } else { choice };
        let before = self.selected.get(&key).copied();
        match choice {
            Some((n, _)) => {
                self.selected.insert(key, n);
                self.requests.retain(|(k, _), _| *k != key);
            }
            None => {
                self.selected.remove(&key);
            }
        }
        let after = choice.map(|(n, _)| n);
        if before != after {
            self.stats.route_switches += 1;
            self.trigger(key, now);
            if before.is_some() && after.is_none() && !exported {
                self.retracting.insert(key, now + RETRACT_HOLD);
                self.starving(key, now);
            }
            if after.is_some() {
                self.retracting.remove(&key);
            }
        } else if let (Some((_, m)), Some(&(_, _, old))) = (choice, self.installed.get(&key)) {
            // Same route: tell neighbours when the metric moved a lot.
            let diff = m.abs_diff(old);
            if diff >= (old / 8).max(32) {
                self.trigger(key, now);
            }
        }
        self.sync_kernel(key, choice);
    }

    fn sync_kernel(&mut self, key: RouteKey, choice: Option<(NeighbourId, u16)>) {
        let want = choice.and_then(|(n, m)| {
            let r = self.routes.get(&key)?.iter().find(|r| r.from == n)?;
            Some((n.0, r.next_hop, m))
        });
        let have = self.installed.get(&key).copied();
        match (have, want) {
            (None, Some((iface, next_hop, metric))) => {
                self.changes.push_back(RouteChange::Install {
                    prefix: key.0,
                    src_prefix: key.1,
                    iface,
                    next_hop,
                    metric,
                })
            }
            (Some((hi, hn, _)), Some((iface, next_hop, metric)))
                if (hi, hn) != (iface, next_hop) =>
            {
                self.changes.push_back(RouteChange::Replace {
                    prefix: key.0,
                    src_prefix: key.1,
                    iface,
                    next_hop,
                    metric,
                })
            }
            (Some(_), None) => self.changes.push_back(RouteChange::Remove {
                prefix: key.0,
                src_prefix: key.1,
            }),
            _ => {}
        }
        match want {
            Some(w) => {
                self.installed.insert(key, w);
            }
            None => {
                self.installed.remove(&key);
            }
        }
    }

    /// No feasible route left: ask the neighbour of the best infeasible
    /// route for a newer seqno (RFC 8966 §3.8.2.1).
    fn starving(&mut self, key: RouteKey, now: Instant) {
        let Some(list) = self.routes.get(&key) else {
            return;
        };
        let best = list
            .iter()
            .filter(|r| r.refmetric != INFINITY && now < r.expires)
            .min_by_key(|r| self.route_metric(r, now));
        let Some(r) = best else { return };
        let (rid, to, seqno) = (r.router_id, r.from, r.seqno);
        self.request_newer_seqno(key, rid, to, seqno, now);
    }

    /// Asks `to` for a seqno newer than our feasibility distance of
    /// (`rid`, `key`) (or than `seqno` if we have none), and keeps the
    /// request for resending.
    fn request_newer_seqno(
        &mut self,
        key: RouteKey,
        rid: [u8; 8],
        to: NeighbourId,
        seqno: u16,
        now: Instant,
    ) {
        let fd = self
            .sources
            .get(&(rid, key.0, key.1))
            .map_or(seqno, |(s, _)| s);
        let wanted = fd.wrapping_add(1);
        self.requests.insert(
            (key, rid),
            PendingRequest {
                seqno: wanted,
                to,
                resend_at: now + REQUEST_RESEND,
                tries: 1,
            },
        );
        self.send_seqno_request(to, key, rid, wanted, REQUEST_HOPS);
    }

    /// A neighbour just missed a Hello: for every route we select through
    /// it whose alternatives are all infeasible, ask for a newer seqno now,
    /// so that a feasible alternative is ready if the link is declared dead.
    fn prepare_alternatives(&mut self, id: NeighbourId, now: Instant) {
        let keys: Vec<RouteKey> = self
            .selected
            .iter()
            .filter(|(_, n)| **n == id)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(list) = self.routes.get(&key) else {
                continue;
            };
            let alternatives: Vec<&Route> = list
                .iter()
                .filter(|r| r.from != id && self.route_metric(r, now) != INFINITY)
                .collect();
            if alternatives.is_empty() || alternatives.iter().any(|r| self.route_feasible(&key, r))
            {
                continue;
            }
            let Some(best) = alternatives
                .iter()
                .min_by_key(|r| self.route_metric(r, now))
            else {
                continue;
            };
            let (rid, to, seqno) = (best.router_id, best.from, best.seqno);
            if !self.requests.contains_key(&(key, rid)) {
                self.request_newer_seqno(key, rid, to, seqno, now);
            }
        }
    }

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
            prefix: key.0,
            src_prefix: key.1,
        };
        self.stats.seqno_requests += 1;
        self.emit_tlvs(to.0, Destination::Unicast(to.1), &[tlv]);
    }

    /// RFC 8967 checks of a received packet (true: process it). Answers
    /// Challenge Requests received on unicast, and challenges a neighbour
    /// whose index we do not know.
    fn authenticate(
        &mut self,
        now: Instant,
        iface: IfaceId,
        src: Ipv6Addr,
        bytes: &[u8],
        packet: &wire::Packet,
    ) -> bool {
        let link_local = match self.ifaces.get(&iface) {
            Some(i) => i.cfg.link_local,
            None => return false,
        };
        let Some(auth) = self.auth.as_mut() else {
            return true;
        };
        let macs: Vec<&[u8]> = packet
            .trailer
            .iter()
            .filter_map(|t| match t {
                Tlv::Mac(m) => Some(m.as_slice()),
                _ => None,
            })
            .collect();
        let mut dsts = vec![wire::MULTICAST];
        dsts.extend(link_local);
        let Some(dst) = auth.check_mac(src, &dsts, bytes, packet.body_end, &macs) else {
            return false;
        };
        let unicast = dst != wire::MULTICAST;
        let key = (iface.0, src);
        let pc = packet.body.iter().find_map(|t| match t {
            Tlv::Pc { pc, index } => Some((*pc, index.as_slice())),
            _ => None,
        });
        let reply = packet.body.iter().find_map(|t| match t {
            Tlv::ChallengeReply(n) => Some(n.as_slice()),
            _ => None,
        });
        let request = packet.body.iter().find_map(|t| match t {
            Tlv::ChallengeRequest(n) if unicast && n.len() <= 192 => Some(n.clone()),
            _ => None,
        });
        let answer = request.filter(|_| auth.may_reply(now, key));
        let verdict = auth.check_pc(now, key, unicast, pc, reply);
        let challenge = match verdict {
            Verdict::Drop("unknown index") => {
                auth.challenge(now, key, random_bytes::<8>().to_vec())
            }
            _ => None,
        };
        let tlvs: Vec<Tlv> = answer
            .map(Tlv::ChallengeReply)
            .into_iter()
            .chain(challenge.map(Tlv::ChallengeRequest))
            .collect();
        self.emit_tlvs(iface, Destination::Unicast(src), &tlvs);
        verdict == Verdict::Accept
    }

    /// Bytes kept free in every packet for the PC and MAC TLVs.
    fn reserve(&self) -> usize {
        self.auth.as_ref().map_or(0, Auth::overhead)
    }

    /// Finishes a packet (PC and MAC when authentication is on) and queues it.
    fn emit(&mut self, iface: IfaceId, dst: Destination, mut w: PacketWriter) {
        let bytes = match (&self.auth, self.ifaces.get_mut(&iface)) {
            (Some(auth), Some(i)) => {
                i.pc = i.pc.wrapping_add(1);
                w.push(
                    &Tlv::Pc {
                        pc: i.pc,
                        index: i.index.to_vec(),
                    },
                    0,
                );
                let body = w.body();
                let src = i.cfg.link_local.unwrap_or(Ipv6Addr::UNSPECIFIED);
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

    fn drop_neighbour(&mut self, id: NeighbourId, now: Instant) {
        self.neighbours.remove(&id);
        if let Some(a) = self.auth.as_mut() {
            a.forget((id.0 .0, id.1));
        }
        self.costs.remove(&id);
        let keys: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(_, l)| l.iter().any(|r| r.from == id))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(l) = self.routes.get_mut(&k) {
                l.retain(|r| r.from != id);
            }
            self.reselect(k, now);
        }
    }

    fn cost_changed(&mut self, id: NeighbourId, now: Instant) {
        let c = self.neighbour_cost(&id, now);
        if self.costs.get(&id) == Some(&c) {
            return;
        }
        self.costs.insert(id, c);
        let keys: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(_, l)| l.iter().any(|r| r.from == id))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.reselect(k, now);
        }
    }

    /// Handles a packet received on `iface` from `src` (its source address).
    pub fn handle_packet(&mut self, now: Instant, iface: IfaceId, src: IpAddr, bytes: &[u8]) {
        let IpAddr::V6(src) = src else {
            self.stats.packets_rejected += 1;
            return;
        };
        if !is_link_local(&src) || !self.ifaces.contains_key(&iface) {
            self.stats.packets_rejected += 1;
            return;
        }
        let Ok(packet) = wire::parse(bytes) else {
            self.stats.packets_rejected += 1;
            return;
        };
        if !self.authenticate(now, iface, src, bytes, &packet) {
            self.stats.packets_rejected += 1;
            return;
        }
        self.stats.packets_in += 1;
        let nid = (iface, src);
        let fresh = !self.neighbours.contains_key(&nid);
        let our_now = self.micros(now);
        let (link_local, rtt_params) = match self.ifaces.get(&iface) {
            Some(i) => (i.cfg.link_local, i.cfg.rtt),
            None => return,
        };
        self.neighbours
            .entry(nid)
            .or_insert_with(|| Neighbour::new(iface, src, now))
            .last_heard = now;
        if fresh {
            // Let it learn our routes soon.
            // Also two quick Hellos (with an IHU for it), so the link is
            // usable at once on both sides.
            if let Some(i) = self.ifaces.get_mut(&iface) {
                i.dump_soon = Some(now + URGENT_DELAY);
                i.burst = i.burst.max(2);
                i.next_hello = i.next_hello.min(now + URGENT_DELAY);
            }
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
                } => {
                    if flags & wire::HELLO_UNICAST != 0 {
                        continue;
                    }
                    let iv = Duration::from_millis(u64::from(*interval) * 10);
                    if let Some(n) = self.neighbours.get_mut(&nid) {
                        n.hello(now, *seqno, iv);
                        if let Some(ts) = timestamp {
                            n.last_hello_ts = Some((*ts, our_now));
                            hello_ts = Some(*ts);
                        }
                    }
                }
                Tlv::Ihu {
                    rxcost,
                    interval,
                    address,
                    timestamp,
                    ..
                } => {
                    let for_us = match (address, link_local) {
                        (None, _) | (_, None) => true,
                        (Some(a), Some(ll)) => *a == IpAddr::V6(ll),
                    };
                    if !for_us {
                        continue;
                    }
                    if let Some(n) = self.neighbours.get_mut(&nid) {
                        n.txcost = *rxcost;
                        let iv = Duration::from_millis(u64::from(*interval) * 10)
                            .max(n.hello_interval * 3);
                        n.ihu_expires = now + iv * 7 / 2;
                        if timestamp.is_some() {
                            ihu_ts = *timestamp;
                        }
                    }
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
                } => {
                    self.handle_update(
                        now,
                        nid,
                        *prefix,
                        *src_prefix,
                        *router_id,
                        *seqno,
                        *metric,
                        *interval,
                        *next_hop,
                    );
                }
                Tlv::RouteRequest {
                    prefix, src_prefix, ..
                } => match prefix {
                    Some(p) => self.trigger((*p, *src_prefix), now),
                    None => {
                        if let Some(i) = self.ifaces.get_mut(&iface) {
                            let recent = i
                                .last_full_dump
                                .is_some_and(|t| now.duration_since(t) < i.cfg.hello_interval);
                            if !recent {
                                i.dump_soon = Some(now + URGENT_DELAY);
                            }
                        }
                    }
                },
                Tlv::SeqnoRequest {
                    seqno,
                    hop_count,
                    router_id,
                    prefix,
                    src_prefix,
                    ..
                } => {
                    self.handle_seqno_request(
                        now,
                        nid,
                        (*prefix, *src_prefix),
                        *router_id,
                        *seqno,
                        *hop_count,
                    );
                }
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
        if let (Some(hts), Some((origin, receive)), Some(params)) = (hello_ts, ihu_ts, rtt_params) {
            // RFC 9616 §3.3: (now - origin) - (hello_ts - receive), all mod 2^32.
            let ours = our_now.wrapping_sub(origin) as i32;
            let theirs = hts.wrapping_sub(receive) as i32;
            if ours >= 0 && theirs >= 0 && ours >= theirs && ours < 600_000_000 {
                let sample = Duration::from_micros((ours - theirs) as u64);
                if let Some(n) = self.neighbours.get_mut(&nid) {
                    n.rtt_sample(now, sample, &params);
                }
            }
        }
        self.cost_changed(nid, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_update(
        &mut self,
        now: Instant,
        from: NeighbourId,
        prefix: Option<IpNet>,
        src_prefix: Option<IpNet>,
        router_id: Option<[u8; 8]>,
        seqno: u16,
        metric: u16,
        interval: u16,
        next_hop: Option<IpAddr>,
    ) {
        let Some(prefix) = prefix else {
            // Wildcard retraction: everything from this neighbour.
            let keys: Vec<RouteKey> = self
                .routes
                .iter()
                .filter(|(_, l)| l.iter().any(|r| r.from == from))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(l) = self.routes.get_mut(&k) {
                    for r in l.iter_mut().filter(|r| r.from == from) {
                        r.refmetric = INFINITY;
                    }
                }
                self.reselect(k, now);
            }
            return;
        };
        let key = (prefix, src_prefix);
        if router_id == Some(self.cfg.router_id) || self.exports.contains(&key) {
            return;
        }
        let hold =
            Duration::from_millis(u64::from(interval) * 10 * 7 / 2).max(Duration::from_secs(2));
        let next_hop = next_hop.unwrap_or(IpAddr::V6(from.1));
        let list = self.routes.entry(key).or_default();
        let mut new_seqno = false;
        match list.iter_mut().find(|r| r.from == from) {
            Some(r) => {
                if let Some(rid) = router_id {
                    r.router_id = rid;
                }
                new_seqno = r.seqno != seqno;
                r.seqno = seqno;
                r.refmetric = metric;
                r.next_hop = next_hop;
                r.expires = now + hold;
            }
            None => {
                let Some(rid) = router_id else { return };
                if metric == INFINITY {
                    return;
                }
                list.push(Route {
                    from,
                    router_id: rid,
                    seqno,
                    refmetric: metric,
                    next_hop,
                    expires: now + hold,
                });
            }
        }
        self.reselect(key, now);
        // A new seqno on our selected route answers someone's seqno request
        // (maybe forwarded by us): pass it on at once.
        if new_seqno && self.selected.get(&key) == Some(&from) {
            self.trigger(key, now);
        }
    }

    fn handle_seqno_request(
        &mut self,
        now: Instant,
        from: NeighbourId,
        key: RouteKey,
        router_id: [u8; 8],
        seqno: u16,
        hops: u8,
    ) {
        if self.exports.contains(&key) {
            if router_id == self.cfg.router_id && seqno_newer(seqno, self.seqno) {
                self.seqno = seqno;
            }
            self.trigger(key, now);
            return;
        }
        let Some(sel) = self.selected.get(&key).copied() else {
            return;
        };
        let Some(r) = self
            .routes
            .get(&key)
            .and_then(|l| l.iter().find(|r| r.from == sel))
            .cloned()
        else {
            return;
        };
        if self.route_metric(&r, now) != INFINITY
            && (r.router_id != router_id || !seqno_newer(seqno, r.seqno))
        {
            self.trigger(key, now);
            return;
        }
        if hops <= 1 || r.from == from {
            return;
        }
        let dup = (key, router_id, seqno);
        if self.forwarded.get(&dup).is_some_and(|t| now < *t) {
            return;
        }
        self.forwarded.insert(dup, now + Duration::from_secs(2));
        self.send_seqno_request(r.from, key, router_id, seqno, hops - 1);
    }

    /// The Update TLV we would send for `key` now.
    fn update_for(&mut self, key: RouteKey, now: Instant, interval: u16) -> Option<Tlv> {
        let (rid, seqno, metric) = if self.exports.contains(&key) {
            (self.cfg.router_id, self.seqno, 0)
        } else if let Some(n) = self.selected.get(&key).copied() {
            let r = self.routes.get(&key)?.iter().find(|r| r.from == n)?.clone();
            (r.router_id, r.seqno, self.route_metric(&r, now))
        } else if self.retracting.contains_key(&key) {
            return Some(Tlv::Update {
                ae: 0,
                flags: 0,
                omitted: 0,
                interval,
                seqno: self.seqno,
                metric: INFINITY,
                prefix: Some(key.0),
                src_prefix: key.1,
                router_id: None,
                next_hop: None,
            });
        } else {
            return None;
        };
        // Advertised-metric hysteresis: follow increases at once, but only
        // lower what we advertise on a clear improvement, so that RTT noise
        // does not keep pulling our feasibility distance down (which would
        // make our own route infeasible at the next upward wobble).
        let metric = match self.advertised.get(&key) {
            Some(&(r0, s0, a)) if r0 == rid && s0 == seqno && metric != INFINITY => {
                if metric > a || u32::from(metric) + u32::from((a / 8).max(64)) < u32::from(a) {
                    metric
                } else {
                    a
                }
            }
            _ => metric,
        };
        self.advertised.insert(key, (rid, seqno, metric));
        self.sources
            .advertised((rid, key.0, key.1) as SourceKey, seqno, metric, now);
        Some(Tlv::Update {
            ae: 0,
            flags: 0,
            omitted: 0,
            interval,
            seqno,
            metric,
            prefix: Some(key.0),
            src_prefix: key.1,
            router_id: Some(rid),
            next_hop: None,
        })
    }

    /// Packs `tlvs` into as many packets as needed (each with room for the
    /// PC and MAC TLVs) and queues them for `dst` on `iface`.
    fn emit_tlvs(&mut self, iface: IfaceId, dst: Destination, tlvs: &[Tlv]) {
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

    fn send_updates(&mut self, iface: IfaceId, keys: &[RouteKey], now: Instant) {
        let interval = cs(self.cfg.update_interval);
        let tlvs: Vec<Tlv> = keys
            .iter()
            .filter_map(|key| self.update_for(*key, now, interval))
            .collect();
        self.emit_tlvs(iface, Destination::Multicast, &tlvs);
    }

    fn all_keys(&self) -> Vec<RouteKey> {
        let mut keys: BTreeSet<RouteKey> = self.exports.iter().copied().collect();
        keys.extend(self.selected.keys().copied());
        keys.extend(self.retracting.keys().copied());
        keys.into_iter().collect()
    }

    fn send_hello(&mut self, iface: IfaceId, now: Instant) {
        let ts = self.micros(now);
        let ihus: Vec<Tlv> = {
            let Some(i) = self.ifaces.get(&iface) else {
                return;
            };
            let interval = cs(i.cfg.hello_interval * 3).max(1);
            let timestamps = i.cfg.rtt.is_some();
            self.neighbours
                .values()
                .filter(|n| n.iface == iface)
                .map(|n| Tlv::Ihu {
                    ae: 0,
                    rxcost: n.rxcost(i.cfg.rxcost, i.cfg.link_quality),
                    interval,
                    address: Some(IpAddr::V6(n.addr)),
                    timestamp: if timestamps { n.last_hello_ts } else { None },
                })
                .collect()
        };
        let Some(i) = self.ifaces.get_mut(&iface) else {
            return;
        };
        i.hello_seqno = i.hello_seqno.wrapping_add(1);
        // The Hello comes first: IHUs with timestamps must share its packet.
        let mut tlvs = vec![Tlv::Hello {
            flags: 0,
            seqno: i.hello_seqno,
            interval: cs(i.cfg.hello_interval).max(1),
            timestamp: i.cfg.rtt.is_some().then_some(ts),
        }];
        tlvs.extend(ihus);
        if i.startup_request {
            i.startup_request = false;
            tlvs.push(Tlv::RouteRequest {
                ae: 0,
                prefix: None,
                src_prefix: None,
            });
        }
        self.emit_tlvs(iface, Destination::Multicast, &tlvs);
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Neighbours: missed Hellos, expiring IHUs, death.
        let ids: Vec<NeighbourId> = self.neighbours.keys().copied().collect();
        for id in ids {
            let (dead, at_risk) = match self.neighbours.get_mut(&id) {
                Some(n) => {
                    let missed = n.check_missed(now);
                    (n.is_dead(now), missed && n.history & 0x8000 == 0)
                }
                None => continue,
            };
            if dead {
                self.drop_neighbour(id, now);
                continue;
            }
            if at_risk {
                self.prepare_alternatives(id, now);
            }
            self.cost_changed(id, now);
        }
        // Interfaces: Hellos and dumps.
        let ifaces: Vec<IfaceId> = self.ifaces.keys().copied().collect();
        for id in ifaces {
            let (hello_due, dump_due) = match self.ifaces.get(&id) {
                Some(i) => (
                    now >= i.next_hello,
                    now >= i.next_dump || i.dump_soon.is_some_and(|t| now >= t),
                ),
                None => continue,
            };
            if hello_due {
                self.send_hello(id, now);
                let (iv, burst) = self
                    .ifaces
                    .get(&id)
                    .map(|i| (i.cfg.hello_interval, i.burst))
                    .unwrap_or_default();
                let next = if burst > 0 {
                    now + BURST_GAP.min(iv)
                } else {
                    now + self.jitter(iv, 5)
                };
                if let Some(i) = self.ifaces.get_mut(&id) {
                    i.next_hello = next;
                    i.burst = burst.saturating_sub(1);
                }
            }
            if dump_due {
                let keys = self.all_keys();
                self.send_updates(id, &keys, now);
                let next = now + self.jitter(self.cfg.update_interval, 25);
                if let Some(i) = self.ifaces.get_mut(&id) {
                    i.next_dump = next;
                    i.dump_soon = None;
                    i.last_full_dump = Some(now);
                }
            }
        }
        // Triggered updates.
        if self.flush_at.is_some_and(|t| now >= t) {
            self.flush_at = None;
            let keys: Vec<RouteKey> = std::mem::take(&mut self.triggered).into_iter().collect();
            let ifaces: Vec<IfaceId> = self.ifaces.keys().copied().collect();
            for id in ifaces {
                self.send_updates(id, &keys, now);
            }
        }
        // Seqno request resends.
        let due: Vec<((RouteKey, [u8; 8]), PendingRequest)> = self
            .requests
            .iter()
            .filter(|(_, p)| now >= p.resend_at)
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        for (k, p) in due {
            if p.tries >= 3 {
                self.requests.remove(&k);
                continue;
            }
            let backoff = REQUEST_RESEND * (1u32 << p.tries);
            if let Some(e) = self.requests.get_mut(&k) {
                e.tries += 1;
                e.resend_at = now + backoff;
            }
            self.send_seqno_request(p.to, k.0, k.1, p.seqno, REQUEST_HOPS);
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            self.housekeeping(now);
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let expired: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(_, l)| l.iter().any(|r| now >= r.expires))
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(l) = self.routes.get_mut(&k) {
                // Expired routes stay as retracted for one more hold, then go.
                l.retain(|r| now < r.expires + Duration::from_secs(10));
            }
            self.reselect(k, now);
        }
        self.routes.retain(|_, l| !l.is_empty());
        self.retracting.retain(|_, until| now < *until);
        let (selected, exports) = (&self.selected, &self.exports);
        self.advertised
            .retain(|k, _| selected.contains_key(k) || exports.contains(k));
        self.forwarded.retain(|_, until| now < *until);
        self.sources.gc(now);
    }

    /// When [`Router::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_housekeeping;
        for i in self.ifaces.values() {
            t = t.min(i.next_hello).min(i.next_dump);
            if let Some(d) = i.dump_soon {
                t = t.min(d);
            }
        }
        if let Some(f) = self.flush_at {
            t = t.min(f);
        }
        for n in self.neighbours.values() {
            if n.history != 0 {
                t = t.min(n.next_miss);
            }
        }
        for p in self.requests.values() {
            t = t.min(p.resend_at);
        }
        Some(t)
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// The next change for the kernel's routing table.
    pub fn poll_route_change(&mut self) -> Option<RouteChange> {
        self.changes.pop_front()
    }

    /// Clean shutdown: retract everything we advertise, and send a Hello
    /// with a 10 ms interval so neighbours drop us at once; then remove
    /// every installed route.
    pub fn shutdown(&mut self) {
        let keys = self.all_keys();
        self.seqno = self.seqno.wrapping_add(1);
        let retractions: Vec<Tlv> = keys
            .iter()
            .map(|key| Tlv::Update {
                ae: 0,
                flags: 0,
                omitted: 0,
                interval: 0,
                seqno: self.seqno,
                metric: INFINITY,
                prefix: Some(key.0),
                src_prefix: key.1,
                router_id: None,
                next_hop: None,
            })
            .collect();
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
        let installed: Vec<RouteKey> = self.installed.keys().copied().collect();
        for key in installed {
            self.changes.push_back(RouteChange::Remove {
                prefix: key.0,
                src_prefix: key.1,
            });
        }
        self.installed.clear();
        self.selected.clear();
        self.exports.clear();
    }

    /// Neighbours and their link state.
    pub fn neighbours(&self, now: Instant) -> Vec<NeighbourInfo> {
        self.neighbours
            .iter()
            .map(|(id, n)| {
                let (nominal, quality) = self
                    .ifaces
                    .get(&id.0)
                    .map_or((96, LinkQuality::TwoOutOfThree), |i| {
                        (i.cfg.rxcost, i.cfg.link_quality)
                    });
                NeighbourInfo {
                    iface: id.0,
                    addr: id.1,
                    history: n.history,
                    rxcost: n.rxcost(nominal, quality),
                    txcost: n.txcost,
                    rtt: n.rtt.map(|(r, _)| r),
                    cost: self.neighbour_cost(id, now),
                }
            })
            .collect()
    }

    /// Every learned route.
    pub fn routes(&self, now: Instant) -> Vec<RouteInfo> {
        let mut out = Vec::new();
        for (key, list) in &self.routes {
            for r in list {
                out.push(RouteInfo {
                    prefix: key.0,
                    src_prefix: key.1,
                    router_id: r.router_id,
                    seqno: r.seqno,
                    metric: self.route_metric(r, now),
                    refmetric: r.refmetric,
                    iface: r.from.0,
                    next_hop: r.next_hop,
                    selected: self.selected.get(key) == Some(&r.from),
                    feasible: self.route_feasible(key, r),
                });
            }
        }
        out.sort_by(|a, b| {
            (a.prefix, a.src_prefix, a.iface).cmp(&(b.prefix, b.src_prefix, b.iface))
        });
        out
    }

    /// The selected next hop for a destination (what is installed).
    pub fn installed(
        &self,
        prefix: IpNet,
        src_prefix: Option<IpNet>,
    ) -> Option<(IfaceId, IpAddr, u16)> {
        self.installed.get(&(prefix, src_prefix)).copied()
    }
}
