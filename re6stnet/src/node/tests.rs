//! The core's rules on a virtual clock, with real certificates: a small
//! network of cores whose datagrams are delivered in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use re6st_registry::auth::{PeerRecord, SignedPeerRecord};
use re6st_registry::cert::{overlay_address, Ca, IssueRequest};
use re6st_registry::config::{NetworkConfig, SignedConfig};
use re6st_tunnel::cache::StoredPeer;

use super::*;

const NOW: i64 = 1_790_000_000;
const PORT: u16 = 326;

struct Node {
    key_pem: String,
    cert_pem: String,
    prefix: Peer,
    serial: u64,
}

fn ca() -> Ca {
    Ca::generate("fd5e::/48".parse().unwrap(), NOW - 100, 10).unwrap()
}

fn node(ca: &Ca, i: u16, valid_days: i64) -> Node {
    let prefix: Peer = format!("fd5e:0:0:{i:x}::/64").parse().unwrap();
    let (key, cert_pem) = ca
        .issue_with_new_key(
            prefix,
            [i as u8; 32],
            u64::from(i),
            NOW - 10,
            NOW + valid_days * 86_400,
        )
        .unwrap();
    Node {
        key_pem: key.serialize_pem(),
        cert_pem,
        prefix,
        serial: u64::from(i),
    }
}

fn underlay(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i as u8 + 1)), PORT)
}

fn netconf(version: u64, f: impl FnOnce(&mut NetworkConfig)) -> NetworkConfig {
    let mut c = NetworkConfig::new("fd5e::/48", 64, NOW);
    c.version = version;
    c.client_count = 1;
    f(&mut c);
    c
}

fn signed(ca: &Ca, c: &NetworkConfig) -> SignedConfig {
    SignedConfig::sign(c, |m| ca.sign(m)).unwrap()
}

fn stored(n: &Node, i: usize) -> StoredPeer {
    let key = re6st_registry::cert::load_key(&n.key_pem).unwrap();
    let rec = PeerRecord {
        cert: n.cert_pem.clone(),
        endpoints: vec![underlay(i)],
        nat: false,
        timestamp: NOW - 50,
    };
    StoredPeer {
        prefix: n.prefix,
        endpoints: vec![underlay(i)],
        record: SignedPeerRecord::sign(&rec, &key).unwrap(),
        timestamp: NOW - 50,
        failures: 0,
        failing_until: 0,
        last_ok: None,
    }
}

/// Cores on a virtual clock; every datagram is delivered at once.
struct Sim {
    ca: Ca,
    nodes: Vec<Node>,
    cores: Vec<NodeCore>,
    t0: Instant,
    now: Instant,
    /// Nodes that neither answer nor run.
    dead: BTreeSet<usize>,
    /// Links never complete their handshake.
    no_handshake: bool,
    /// Every registry request fails.
    registry_down: bool,
    /// Every action, by node, with its time.
    log: Vec<(usize, Duration, Action)>,
    /// Each node's flags (used when its core is made).
    roles: Vec<Roles>,
    /// The NAT in front of each node, if any.
    nat: Vec<Option<Nat>>,
    /// Nodes whose network drops UDP on the underlay.
    udp_blocked: BTreeSet<usize>,
    next_routing: Instant,
}

/// A NAT router in front of a node: it lets in only datagrams from
/// where the node has sent to.
#[derive(Default)]
struct Nat {
    /// A new external port per destination (symmetric), else the node's own.
    symmetric: bool,
    /// External port by destination.
    ports: BTreeMap<SocketAddr, u16>,
}

/// The external address of node `i`'s NAT.
fn nat_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 100, i as u8 + 1))
}

/// Node `i`'s address on the LAN behind its NAT.
fn lan_address(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, i as u8 + 1)), PORT)
}

impl Sim {
    /// `n` nodes that know each other from their caches.
    fn new(n: usize, c: &NetworkConfig) -> Self {
        Self::with_nodes(n, c, 365)
    }

    fn with_nodes(n: usize, c: &NetworkConfig, valid_days: i64) -> Self {
        let ca = ca();
        let nodes: Vec<Node> = (0..n)
            .map(|i| node(&ca, i as u16 + 1, valid_days))
            .collect();
        let t0 = Instant::now();
        let mut sim = Self {
            cores: Vec::new(),
            t0,
            now: t0,
            dead: BTreeSet::new(),
            no_handshake: false,
            registry_down: false,
            log: Vec::new(),
            roles: vec![Roles::default(); n],
            nat: (0..n).map(|_| None).collect(),
            udp_blocked: BTreeSet::new(),
            next_routing: t0 + Duration::from_secs(1),
            nodes,
            ca,
        };
        let s = signed(&sim.ca, c);
        for i in 0..n {
            let core = sim.core(i, &s);
            sim.cores.push(core);
        }
        sim
    }

    fn core(&self, i: usize, s: &SignedConfig) -> NodeCore {
        let n = &self.nodes[i];
        let peers = (0..self.nodes.len())
            .filter(|j| *j != i && self.nat[*j].is_none())
            .map(|j| stored(&self.nodes[j], j))
            .collect();
        NodeCore::new(
            CoreConfig {
                ca: self.ca.cert().clone(),
                cert_pem: n.cert_pem.clone(),
                key_pem: n.key_pem.clone(),
                signed: s.clone(),
                hmac: None,
                peers,
                port: PORT,
                interfaces: vec!["lan0".into()],
                roles: self.roles[i].clone(),
                config_refresh: Duration::from_secs(60),
                registry: true,
                seed: i as u64 + 1,
            },
            self.now,
            self.unix(),
        )
        .unwrap()
    }

    fn unix(&self) -> i64 {
        NOW + self.now.duration_since(self.t0).as_secs() as i64
    }

    /// Restarts node `i` with no memory but its cache.
    fn restart(&mut self, i: usize, c: &NetworkConfig) {
        let s = signed(&self.ca, c);
        self.cores[i] = self.core(i, &s);
    }

    fn index_of(&self, ip: IpAddr) -> Option<usize> {
        (0..self.nodes.len()).find(|j| {
            let underlay = match self.nat[*j] {
                Some(_) => nat_address(*j),
                None => underlay(*j).ip(),
            };
            underlay == ip || IpAddr::V6(overlay_address(self.nodes[*j].prefix)) == ip
        })
    }

    /// Where `i`'s datagram to `dst` comes from once through its NAT.
    fn source(&mut self, i: usize, dst: SocketAddr) -> SocketAddr {
        if dst.ip().is_ipv6() {
            return SocketAddr::new(IpAddr::V6(overlay_address(self.nodes[i].prefix)), PORT);
        }
        let Some(nat) = self.nat[i].as_mut() else {
            return underlay(i);
        };
        let next = 40_000 + nat.ports.len() as u16;
        let port = match nat.symmetric {
            true => *nat.ports.entry(dst).or_insert(next),
            false => *nat.ports.entry(dst).or_insert(PORT),
        };
        SocketAddr::new(nat_address(i), port)
    }

    /// Whether `j`'s NAT lets in a datagram from `src` to `dst`.
    fn admits(&self, j: usize, src: SocketAddr, dst: SocketAddr) -> bool {
        match &self.nat[j] {
            None => true,
            Some(_) if dst.ip().is_ipv6() => true,
            Some(nat) => nat.ports.get(&src) == Some(&dst.port()),
        }
    }

    /// What node `i` finds on its interfaces.
    fn detected(&self, i: usize) -> SocketAddr {
        match self.nat[i] {
            Some(_) => lan_address(i),
            None => underlay(i),
        }
    }

    /// Delivers every queued action until none is left.
    fn deliver(&mut self) {
        loop {
            let mut sent = Vec::new();
            for i in 0..self.cores.len() {
                while let Some(a) = self.cores[i].poll_action() {
                    let at = self.now.duration_since(self.t0);
                    self.log.push((i, at, a.clone()));
                    sent.push((i, a));
                }
            }
            if sent.is_empty() {
                break;
            }
            let (now, unix) = (self.now, self.unix());
            for (i, a) in sent {
                match a {
                    Action::Send { dst, bytes } => {
                        let Some(j) = self.index_of(dst.addr.ip()) else {
                            continue;
                        };
                        if self.dead.contains(&j) || self.dead.contains(&i) {
                            continue;
                        }
                        let underlay_udp = dst.transport == Transport::Udp && dst.addr.is_ipv4();
                        if underlay_udp
                            && (self.udp_blocked.contains(&i) || self.udp_blocked.contains(&j))
                        {
                            continue;
                        }
                        let src = self.source(i, dst.addr);
                        if self.admits(j, src, dst.addr) {
                            let src = Endpoint {
                                addr: src,
                                transport: dst.transport,
                            };
                            self.cores[j].handle_datagram(now, unix, src, &bytes);
                        }
                    }
                    Action::Registry(r) if self.registry_down => {
                        let e = "registry down".to_string();
                        let res = match r {
                            RegistryRequest::Config => RegistryResult::Config(Err(e)),
                            RegistryRequest::Hmac => RegistryResult::Hmac(Err(e)),
                            RegistryRequest::Bootstrap => RegistryResult::Bootstrap(Err(e)),
                            RegistryRequest::Publish(_) => RegistryResult::Published(Err(e)),
                            RegistryRequest::Renew => RegistryResult::Renewed(Err(e)),
                            RegistryRequest::Report => RegistryResult::Reported(Err(e)),
                        };
                        self.cores[i].handle_registry(now, unix, res);
                    }
                    Action::DetectEndpoints => {
                        let found = vec![self.detected(i)];
                        self.cores[i].handle_endpoints(now, unix, EndpointSource::Detected, found);
                    }
                    _ => {}
                }
            }
            self.handshakes();
        }
    }

    /// Links whose both ends exist come up (unless `no_handshake`).
    fn handshakes(&mut self) {
        if self.no_handshake {
            return;
        }
        let (now, unix) = (self.now, self.unix());
        for i in 0..self.cores.len() {
            for t in self.cores[i].tunnels() {
                let Some(j) = (0..self.nodes.len()).find(|j| self.nodes[*j].prefix == t.peer)
                else {
                    continue;
                };
                let mutual = self.cores[j]
                    .tunnels()
                    .iter()
                    .any(|u| u.peer == self.nodes[i].prefix);
                if !t.up && mutual && !self.dead.contains(&j) && !self.dead.contains(&i) {
                    self.cores[i].handle_link_up(now, unix, t.peer, Some(underlay(j)));
                }
            }
        }
    }

    /// Routing: a neighbour is heard on every tunnel whose other end is
    /// alive and up.
    fn routing(&mut self) {
        let (now, unix) = (self.now, self.unix());
        for i in 0..self.cores.len() {
            if self.dead.contains(&i) {
                continue;
            }
            let mut view = RoutingView::default();
            for t in self.cores[i].tunnels() {
                let j = (0..self.nodes.len()).find(|j| self.nodes[*j].prefix == t.peer);
                let alive = j.is_some_and(|j| {
                    !self.dead.contains(&j)
                        && self.cores[j]
                            .tunnels()
                            .iter()
                            .any(|u| u.peer == self.nodes[i].prefix && u.up)
                });
                if t.up && alive {
                    view.heard.insert(t.name.clone());
                }
            }
            self.cores[i].handle_routing(now, unix, &view);
        }
    }

    /// Runs until `d` after the start, firing timers and routing views.
    fn run_until(&mut self, d: Duration) {
        let end = self.t0 + d;
        self.deliver();
        for _ in 0..1_000_000 {
            let next = (0..self.cores.len())
                .filter(|i| !self.dead.contains(i))
                .filter_map(|i| self.cores[i].poll_timeout())
                .chain(std::iter::once(self.next_routing))
                .min()
                .unwrap();
            if next > end {
                self.now = end;
                return;
            }
            assert!(next >= self.now, "a deadline in the past");
            self.now = next;
            let unix = self.unix();
            for i in 0..self.cores.len() {
                if self.dead.contains(&i) {
                    continue;
                }
                if self.cores[i].poll_timeout().is_some_and(|t| t <= next) {
                    self.cores[i].handle_timeout(next, unix);
                    assert!(
                        self.cores[i].poll_timeout().is_none_or(|t| t > next),
                        "handle_timeout made no progress"
                    );
                }
            }
            if next >= self.next_routing {
                self.next_routing = next + Duration::from_secs(1);
                self.routing();
            }
            self.deliver();
        }
        panic!("the cores never stop waking up");
    }

    /// A registry answer for node `i`, now.
    fn answer(&mut self, i: usize, r: RegistryResult) {
        let (now, unix) = (self.now, self.unix());
        self.cores[i].handle_registry(now, unix, r);
    }

    fn tunnels(&self, i: usize) -> Vec<TunnelStatus> {
        self.cores[i].tunnels()
    }

    fn actions(&self, i: usize) -> impl Iterator<Item = &Action> {
        self.log
            .iter()
            .filter(move |(n, _, _)| *n == i)
            .map(|(_, _, a)| a)
    }

    fn count(&self, i: usize, f: impl Fn(&Action) -> bool) -> usize {
        self.actions(i).filter(|a| f(a)).count()
    }
}

fn lost(core: &NodeCore, why: LossReason) -> u64 {
    core.metrics()
        .tunnels_lost
        .get(why.label())
        .copied()
        .unwrap_or(0)
}

fn failed(core: &NodeCore, why: FailReason) -> u64 {
    core.metrics()
        .setup_failed
        .get(why.label())
        .copied()
        .unwrap_or(0)
}

/// Both nodes open to each other at the same moment (their caches know
/// each other): one tunnel survives, the larger prefix's outgoing one.
#[test]
fn simultaneous_open_keeps_one_tunnel_the_larger_prefix_s() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(5));
    let (a, b) = (sim.tunnels(0), sim.tunnels(1));
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(!a[0].outgoing, "the smaller prefix accepted");
    assert!(b[0].outgoing, "the larger prefix keeps its own");
    assert!(a[0].up && b[0].up);
    sim.run_until(Duration::from_secs(60));
    assert_eq!(sim.tunnels(0).len(), 1);
    assert_eq!(sim.tunnels(0)[0].name, a[0].name, "and it stays");
}

/// A client-only node (`--client-count 0 --max-clients 0`) with a pinned
/// neighbour keeps exactly that tunnel: it opens it, refuses everyone
/// else, and accepts the neighbour.
#[test]
fn a_client_only_node_keeps_its_pinned_neighbour_only() {
    let mut sim = Sim::new(4, &netconf(1, |_| {}));
    sim.roles[0] = Roles {
        client_count: Some(0),
        max_clients: Some(0),
        neighbours: vec![sim.nodes[3].prefix],
        mtu: None,
        transport: None,
    };
    sim.restart(0, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(30));
    let peers: Vec<Peer> = sim.tunnels(0).iter().map(|t| t.peer).collect();
    assert_eq!(peers, vec![sim.nodes[3].prefix]);
    assert!(sim.tunnels(0)[0].up);
    assert!(
        sim.tunnels(1).iter().all(|t| t.peer != sim.nodes[0].prefix),
        "others were refused"
    );
    assert!(sim.cores[0].record.is_none(), "it publishes no record");
    assert_eq!(
        sim.count(0, |a| matches!(
            a,
            Action::Registry(RegistryRequest::Publish(_))
        )),
        0
    );
}

/// Nodes 2 and 3 behind NATs (`symmetric`: a new port per destination);
/// 3 keeps a tunnel to 2 (`--neighbour`); the others are public.
fn behind_nats(symmetric: bool, run: Duration) -> Sim {
    let c = netconf(1, |c| c.client_count = 2);
    let mut sim = Sim::new(4, &c);
    for i in [2, 3] {
        sim.nat[i] = Some(Nat {
            symmetric,
            ..Nat::default()
        });
    }
    sim.roles[3].neighbours = vec![sim.nodes[2].prefix];
    for i in 0..4 {
        sim.restart(i, &c);
    }
    sim.run_until(run);
    sim
}

#[test]
fn two_nodes_behind_nats_meet_through_a_punch() {
    let sim = behind_nats(false, Duration::from_secs(120));
    for i in [2, 3] {
        let mapped = SocketAddr::new(nat_address(i), PORT);
        assert_eq!(sim.cores[i].seen(sim.now)[0], Seen::Mapped(mapped));
        assert_eq!(
            sim.cores[i].reach,
            Reachability {
                endpoints: vec![mapped],
                nat: true
            },
            "the mapping, not the LAN address, is announced"
        );
    }
    let t = sim.tunnels(3);
    let to_2 = t.iter().find(|t| t.peer == sim.nodes[2].prefix);
    assert!(
        to_2.is_some_and(|t| t.up && t.outgoing),
        "3 has a direct tunnel to 2: {t:?}"
    );
    assert!(sim.cores[2].metrics.punches > 0, "2 punched for 3");
    assert!(
        sim.cores[0].metrics.punches == 0,
        "public nodes never punch"
    );
}

#[test]
fn nodes_behind_symmetric_nats_stay_clients_and_stop_dialling_each_other() {
    let sim = behind_nats(true, Duration::from_secs(900));
    for i in [2, 3] {
        assert_eq!(sim.cores[i].seen(sim.now)[0], Seen::Unreachable);
        assert!(sim.cores[i].endpoints().is_empty());
        assert!(sim.cores[i].record.is_none(), "nobody is told to dial it");
    }
    assert!(sim.tunnels(3).iter().all(|t| t.peer != sim.nodes[2].prefix));
    // Each still has its tunnels to the public nodes: the mesh carries
    // what they say to each other.
    assert!(sim.tunnels(2).iter().filter(|t| t.up).count() >= 2);
    let p2 = sim.nodes[2].prefix;
    let asked = sim.count(
        3,
        |a| matches!(a, Action::Send { dst, .. } if dst.addr.ip() == IpAddr::V6(overlay_address(p2))),
    );
    assert!(asked <= 12, "3 asked 2 {asked} times in 15 minutes");
}

/// A member asking for punches gets at most four, to usable addresses
/// only, once per message: no reflection of floods through us.
#[test]
fn punch_requests_are_bounded_and_not_replayed() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    while sim.cores[0].poll_action().is_some() {}
    let mut endpoints: Vec<SocketAddr> = ["127.0.0.1:326", "0.0.0.0:326", "[ff02::1]:326"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    endpoints
        .extend((1..=8).map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 9, i)), PORT)));
    let body = crate::peer::Body::Punch { endpoints };
    let (to, unix, now) = (sim.nodes[0].prefix, sim.unix(), sim.now);
    let bytes = sim.cores[1].peers.seal(to, &body, unix).unwrap();
    let src = SocketAddr::new(IpAddr::V6(overlay_address(sim.nodes[1].prefix)), PORT);
    let mut punches = Vec::new();
    for _ in 0..2 {
        sim.cores[0].handle_datagram(now, unix, Endpoint::udp(src), &bytes);
        while let Some(a) = sim.cores[0].poll_action() {
            if let Action::Send { dst, bytes } = a {
                if re6st_tunnel::setup::is_punch(&bytes) {
                    punches.push(dst);
                }
            }
        }
    }
    assert!(punches.len() <= setup::MAX_PUNCH_ENDPOINTS, "{punches:?}");
    assert!(punches
        .iter()
        .all(|d| re6st_tunnel::link::usable_endpoint(d.addr.ip())));
    let m = sim.cores[0].metrics();
    assert_eq!(m.rejected.get("punch_endpoint"), Some(&1));
    assert_eq!(m.rejected.get("peer_replay"), Some(&1), "{:?}", m.rejected);
}

/// A node on a network that drops UDP gets no answer over UDP, and
/// opens its tunnels over TCP to the same ports.
#[test]
fn a_node_whose_udp_is_blocked_opens_its_tunnels_over_tcp() {
    let c = netconf(1, |c| c.client_count = 2);
    let mut sim = Sim::new(4, &c);
    sim.udp_blocked.insert(0);
    // It serves nobody, so every tunnel it has is one it opened.
    sim.roles[0].max_clients = Some(0);
    sim.restart(0, &c);
    sim.run_until(Duration::from_secs(60));
    let up: Vec<TunnelStatus> = sim.tunnels(0).into_iter().filter(|t| t.up).collect();
    assert!(up.len() >= 2, "{up:?}");
    assert!(sim.cores[0].metrics.tcp_fallbacks >= 2);
    let over_tcp = sim.count(0, |a| {
        matches!(a, Action::OpenTunnel { endpoint: Some(e), .. } if e.transport == Transport::Tcp)
    });
    assert!(over_tcp >= 2, "{over_tcp} tunnels opened over TCP");
    assert_eq!(
        sim.count(0, |a| matches!(a, Action::OpenTunnel { endpoint: Some(e), .. } if e.transport == Transport::Udp)),
        0
    );
}

/// `--transport tcp`: every set-up goes over TCP at once, none over UDP.
#[test]
fn a_tcp_only_node_never_dials_over_udp() {
    let c = netconf(1, |c| c.client_count = 2);
    let mut sim = Sim::new(4, &c);
    sim.roles[0].transport = Some(Transport::Tcp);
    sim.roles[0].max_clients = Some(0);
    sim.restart(0, &c);
    sim.run_until(Duration::from_secs(10));
    assert!(sim.tunnels(0).iter().filter(|t| t.up).count() >= 2);
    let over_udp = sim.count(0, |a| {
        matches!(a, Action::Send { dst, bytes }
            if dst.transport == Transport::Udp && re6st_tunnel::setup::is_request(bytes))
    });
    assert_eq!(over_udp, 0, "set-up requests over UDP");
    assert_eq!(sim.cores[0].metrics.tcp_fallbacks, 0);
}

/// The smaller node restarts (SIGKILL: no Close) and asks the larger one
/// for a new tunnel while the larger one still has its old, established
/// one: the request is accepted and replaces the old tunnel at once.
#[test]
fn a_restarted_peer_replaces_its_old_tunnel() {
    let c = netconf(1, |_| {});
    let mut sim = Sim::new(2, &c);
    sim.run_until(Duration::from_secs(5));
    let old = sim.tunnels(1)[0].clone();
    assert!(old.outgoing && old.up);
    sim.restart(0, &c);
    sim.run_until(Duration::from_secs(7));
    let b = sim.tunnels(1);
    assert_eq!(b.len(), 1, "{b:?}");
    assert_ne!(b[0].name, old.name, "a new tunnel");
    assert!(!b[0].outgoing, "the restarted peer's");
    assert!(b[0].up);
    assert_eq!(lost(&sim.cores[1], LossReason::PeerRestarted), 1);
    assert!(
        sim.count(
            1,
            |a| matches!(a, Action::CloseTunnel { name, .. } if *name == old.name)
        ) == 1
    );
    assert_eq!(sim.tunnels(0).len(), 1);
    assert!(sim.tunnels(0)[0].up);
}

/// Rotation drains the tunnel first: SetCost and a DrainRequest to the
/// peer, which drains its end and answers DrainAck.
#[test]
fn retirement_drains_both_ends() {
    let mut sim = Sim::new(2, &netconf(1, |c| c.tunnel_refresh_s = 30));
    sim.run_until(Duration::from_secs(29));
    assert!(sim.count(1, |a| matches!(a, Action::SetCost { .. })) == 0);
    sim.run_until(Duration::from_secs(32));
    let drain = |a: &Action| matches!(a, Action::SetCost { multiplier, .. } if *multiplier == re6st_tunnel::policy::DRAIN_MULTIPLIER);
    assert_eq!(sim.count(1, drain), 1, "the initiator drains its tunnel");
    assert_eq!(sim.count(0, drain), 1, "and so does the peer");
    assert_eq!(
        sim.cores[0].metrics().peer_in.get("drain_request"),
        Some(&1)
    );
    assert_eq!(sim.cores[0].metrics().peer_out.get("drain_ack"), Some(&1));
    assert_eq!(sim.cores[1].metrics().peer_in.get("drain_ack"), Some(&1));
}

/// An accepted tunnel whose handshake never completes fails after
/// HANDSHAKE_TIMEOUT on the initiator (the peer is backed off in the
/// cache) and is forgotten after INCOMING_TIMEOUT on the responder.
#[test]
fn handshake_timeout_fails_the_attempt_and_backs_off() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.no_handshake = true;
    sim.run_until(HANDSHAKE_TIMEOUT - Duration::from_millis(1));
    assert_eq!(failed(&sim.cores[1], FailReason::NoHandshake), 0);
    sim.run_until(HANDSHAKE_TIMEOUT + Duration::from_millis(1));
    assert_eq!(failed(&sim.cores[1], FailReason::NoHandshake), 1);
    sim.run_until(HANDSHAKE_TIMEOUT + Duration::from_millis(1500));
    assert!(
        sim.cores[1].cached_peers().is_empty(),
        "the peer is in back-off"
    );
    assert_eq!(sim.tunnels(0).len(), 1, "the responder's incoming tunnel");
    sim.dead.insert(1);
    let t = sim.now.duration_since(sim.t0);
    sim.run_until(t + INCOMING_TIMEOUT + Duration::from_secs(1));
    assert_eq!(lost(&sim.cores[0], LossReason::NoHandshake), 1);
    assert!(sim.tunnels(0).is_empty());
}

/// A tunnel whose neighbour falls silent is lost after DEAD_AFTER, and
/// the peer backs off in the cache.
#[test]
fn a_silent_tunnel_is_lost_after_dead_after() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(5));
    assert_eq!(sim.tunnels(1).len(), 1);
    sim.dead.insert(0);
    let t = sim.now.duration_since(sim.t0);
    sim.run_until(t + DEAD_AFTER - Duration::from_secs(2));
    assert_eq!(lost(&sim.cores[1], LossReason::Silent), 0);
    sim.run_until(t + DEAD_AFTER + Duration::from_secs(1));
    assert_eq!(lost(&sim.cores[1], LossReason::Silent), 1);
    assert!(sim.tunnels(1).is_empty());
    assert!(
        sim.cores[1].cached_peers().is_empty(),
        "the lost peer is in back-off"
    );
    assert!(
        sim.count(1, |a| matches!(
            a,
            Action::Persist(CacheChange::MarkFailed { .. })
        )) >= 1
    );
}

/// A configuration whose CRL has a peer's serial closes that tunnel; one
/// with our own serial closes everything and opens nothing.
#[test]
fn revocation_of_a_peer_and_of_ourselves() {
    let mut sim = Sim::new(3, &netconf(1, |c| c.client_count = 2));
    sim.run_until(Duration::from_secs(5));
    let (now, unix) = (sim.now, sim.unix());
    let victim = sim.nodes[2].prefix;
    assert!(sim.tunnels(0).iter().any(|t| t.peer == victim));
    let c2 = netconf(2, |c| {
        c.client_count = 2;
        c.crl = vec![sim.nodes[2].serial];
    });
    let s2 = signed(&sim.ca, &c2);
    sim.cores[0].handle_registry(now, unix, RegistryResult::Config(Ok(s2.clone())));
    sim.deliver();
    assert!(sim.tunnels(0).iter().all(|t| t.peer != victim));
    assert_eq!(lost(&sim.cores[0], LossReason::Revoked), 1);
    assert!(sim.count(0, |a| *a == Action::Persist(CacheChange::Remove(victim))) == 1);
    // Our own serial.
    let c3 = netconf(3, |c| {
        c.client_count = 2;
        c.crl = vec![sim.nodes[1].serial, sim.nodes[2].serial];
    });
    let s3 = signed(&sim.ca, &c3);
    let me = 1;
    sim.answer(me, RegistryResult::Config(Ok(s3)));
    sim.deliver();
    assert!(sim.cores[me].revoked());
    assert!(sim.tunnels(me).is_empty());
    assert_eq!(sim.count(me, |a| *a == Action::Revoked), 1);
    let opened = sim.count(me, |a| matches!(a, Action::OpenTunnel { .. }));
    let sent = sim.count(me, |a| matches!(a, Action::Send { .. }));
    sim.dead.insert(0);
    sim.dead.insert(2);
    sim.run_until(Duration::from_secs(300));
    assert_eq!(
        sim.count(me, |a| matches!(a, Action::OpenTunnel { .. })),
        opened
    );
    assert_eq!(sim.count(me, |a| matches!(a, Action::Send { .. })), sent);
}

/// A peer whose CRL names us refuses our requests with a signed
/// "revoked": we ask the registry for the configuration and stay up (the
/// CA-signed CRL decides, not a peer).
#[test]
fn a_peer_saying_we_are_revoked_is_not_believed() {
    let mut sim = Sim::new(2, &netconf(1, |c| c.client_count = 1));
    let c2 = netconf(2, |c| {
        c.client_count = 1;
        c.crl = vec![sim.nodes[0].serial];
    });
    // Node 1 starts from a configuration that revokes node 0 (its cached
    // record of node 0 is dropped: it never asks node 0 for a tunnel).
    sim.restart(1, &c2);
    sim.run_until(Duration::from_secs(10));
    let victim = sim.nodes[0].prefix;
    assert_eq!(
        sim.count(1, |a| *a == Action::Persist(CacheChange::Remove(victim))),
        1
    );
    assert!(!sim.cores[0].revoked());
    assert!(
        sim.tunnels(0).is_empty(),
        "{:?} {:?}",
        sim.tunnels(0),
        sim.tunnels(1)
    );
    // Node 0 asks for the configuration on its own schedule too (1 s after
    // start): the refusal must make it ask at once, before that.
    let first_config = |sim: &Sim| {
        sim.log
            .iter()
            .find(|(i, _, a)| *i == 0 && *a == Action::Registry(RegistryRequest::Config))
            .map(|(_, at, _)| *at)
    };
    let mut calm = Sim::new(2, &netconf(1, |c| c.client_count = 1));
    calm.run_until(Duration::from_secs(10));
    let (refused, scheduled) = (first_config(&sim), first_config(&calm));
    assert!(
        refused.is_some_and(|r| scheduled.is_some_and(|s| r < s)),
        "the refusal makes us check the configuration: {refused:?} vs {scheduled:?}"
    );
}

/// Babel key sets older than the configuration's or the node's own are
/// refused (a replayed sealed set must not roll the keys back).
#[test]
fn older_babel_key_sets_are_refused() {
    let mut sim = Sim::new(1, &netconf(1, |c| c.hmac_version = 5));
    let keys = |v| re6st_registry::config::HmacKeys::generate(v).unwrap();
    let set = |sim: &Sim| sim.count(0, |a| matches!(a, Action::SetBabelKeys(_)));
    let (k5, k4, k6) = (keys(5), keys(4), keys(6));
    sim.answer(0, RegistryResult::Hmac(Ok(k5)));
    sim.deliver();
    assert_eq!(set(&sim), 1);
    sim.answer(0, RegistryResult::Hmac(Ok(k4)));
    sim.deliver();
    assert_eq!(set(&sim), 1, "older than the configuration's");
    sim.answer(0, RegistryResult::Hmac(Ok(k6.clone())));
    sim.deliver();
    assert_eq!(set(&sim), 2);
    sim.answer(0, RegistryResult::Hmac(Ok(keys(5))));
    sim.deliver();
    assert_eq!(set(&sim), 2, "older than ours");
    assert!(sim.count(0, |a| *a == Action::SetBabelKeys(k6.clone())) == 1);
}

/// A node restarted from a cached configuration that revokes it stays
/// revoked: it opens nothing.
#[test]
fn a_cached_revocation_holds_across_a_restart() {
    let mut sim = Sim::new(3, &netconf(1, |c| c.client_count = 2));
    let c2 = netconf(2, |c| {
        c.client_count = 2;
        c.crl = vec![sim.nodes[0].serial];
    });
    sim.restart(0, &c2);
    sim.run_until(Duration::from_secs(30));
    assert!(sim.cores[0].revoked());
    assert_eq!(sim.count(0, |a| *a == Action::Revoked), 1);
    assert_eq!(sim.count(0, |a| matches!(a, Action::OpenTunnel { .. })), 0);
}

/// A newer configuration is applied (saved, forwarded as ConfigVersion,
/// Hello interval changed on every tunnel and LAN interface); an older
/// one is ignored.
/// A new network MTU reaches the devices of existing tunnels, and new
/// ones; a node with its own `--mtu` keeps it.
#[test]
fn an_mtu_change_is_applied_to_existing_tunnels() {
    let mut sim = Sim::new(3, &netconf(1, |_| {}));
    sim.roles[2].mtu = Some(1300);
    sim.restart(2, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(5));
    let c2 = netconf(2, |c| c.mtu = 1380);
    for i in 0..3 {
        sim.answer(i, RegistryResult::Config(Ok(signed(&sim.ca, &c2))));
    }
    sim.deliver();
    let set: BTreeSet<String> = sim
        .actions(1)
        .filter_map(|a| match a {
            Action::SetMtu { name, mtu: 1380 } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let want: BTreeSet<String> = sim.tunnels(1).into_iter().map(|t| t.name).collect();
    assert!(!want.is_empty());
    assert_eq!(set, want);
    assert_eq!(sim.cores[1].mtu(), 1380);
    assert_eq!(sim.cores[2].mtu(), 1300);
    assert_eq!(
        sim.count(2, |a| matches!(a, Action::SetMtu { .. })),
        0,
        "its own MTU did not change"
    );
    assert!(sim
        .actions(2)
        .all(|a| !matches!(a, Action::OpenTunnel { mtu, .. } if *mtu != 1300)));
}

#[test]
fn config_change_is_applied_live_and_flooded() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(5));
    let before = sim.cores[1]
        .metrics()
        .peer_out
        .get("config_version")
        .copied()
        .unwrap_or(0);
    let c2 = netconf(2, |c| c.hello_interval_ms = 800);
    let s2 = signed(&sim.ca, &c2);
    sim.answer(1, RegistryResult::Config(Ok(s2.clone())));
    sim.deliver();
    assert_eq!(sim.cores[1].config().version, 2);
    assert_eq!(sim.count(1, |a| *a == Action::SaveNetwork(s2.clone())), 1);
    let after = sim.cores[1]
        .metrics()
        .peer_out
        .get("config_version")
        .copied()
        .unwrap_or(0);
    assert_eq!(after, before + 1, "forwarded to the peer");
    let names: BTreeSet<String> = sim
        .actions(1)
        .filter_map(|a| match a {
            Action::SetHelloInterval { name, interval }
                if *interval == Duration::from_millis(800) =>
            {
                Some(name.clone())
            }
            _ => None,
        })
        .collect();
    let want: BTreeSet<String> = sim
        .tunnels(1)
        .into_iter()
        .map(|t| t.name)
        .chain(["lan0".to_string()])
        .collect();
    assert_eq!(names, want);
    assert_eq!(
        sim.cores[0].config().version,
        2,
        "the peer fetched it over the peer protocol"
    );
    let old = signed(&sim.ca, &netconf(1, |c| c.hello_interval_ms = 100));
    sim.answer(1, RegistryResult::Config(Ok(old.clone())));
    sim.deliver();
    assert_eq!(sim.cores[1].config().version, 2);
    assert_eq!(sim.count(1, |a| *a == Action::SaveNetwork(old.clone())), 0);
}

/// A configuration too large to flood (a long CRL): the peer that has it
/// counts what it cannot send, and the node it announced it to asks the
/// registry at once instead of at its next check.
#[test]
fn a_configuration_too_large_to_flood_is_fetched_from_the_registry() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(5));
    // Both nodes' first checks answered: nothing outstanding.
    let s1 = signed(&sim.ca, &netconf(1, |_| {}));
    for i in 0..2 {
        sim.answer(i, RegistryResult::Config(Ok(s1.clone())));
    }
    let c2 = netconf(2, |c| c.crl = (100_000..102_000).collect());
    let s2 = signed(&sim.ca, &c2);
    assert!(!s2.floods());
    sim.answer(1, RegistryResult::Config(Ok(s2)));
    sim.deliver();
    assert_eq!(sim.cores[0].config().version, 1, "it could not flood");
    assert_eq!(sim.cores[1].metrics().peer_unsent.get("config"), Some(&1));
    let asked = |sim: &Sim| sim.count(0, |a| *a == Action::Registry(RegistryRequest::Config));
    let before = asked(&sim);
    sim.run_until(Duration::from_secs(5) + ASK_TIMEOUT + Duration::from_millis(100));
    assert_eq!(
        asked(&sim),
        before + 1,
        "asked the registry after the peer's silence"
    );
}

/// A member announcing ever newer versions every 2 s cannot postpone the
/// registry check the first announcement armed.
#[test]
fn announcements_cannot_postpone_the_registry() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.run_until(Duration::from_secs(5));
    let s1 = signed(&sim.ca, &netconf(1, |_| {}));
    for i in 0..2 {
        sim.answer(i, RegistryResult::Config(Ok(s1.clone())));
    }
    let asked = |sim: &Sim| sim.count(0, |a| *a == Action::Registry(RegistryRequest::Config));
    let before = asked(&sim);
    let src = SocketAddr::new(IpAddr::V6(overlay_address(sim.nodes[1].prefix)), PORT);
    for k in 0..4u64 {
        sim.run_until(Duration::from_secs(5 + 2 * k));
        let (now, unix) = (sim.now, sim.unix());
        let lie = Body::ConfigVersion { version: 1000 + k };
        let bytes = sim.cores[1]
            .peers
            .seal(sim.nodes[0].prefix, &lie, unix)
            .unwrap();
        sim.cores[0].handle_datagram(now, unix, Endpoint::udp(src), &bytes);
        sim.deliver();
    }
    assert_eq!(asked(&sim), before + 1, "asked 3 s after the first lie");
}

/// A certificate inside the renewal window is renewed at start; a failed
/// renewal is retried; a renewed certificate is saved and used.
#[test]
fn renewal_before_expiry_retried_after_failure() {
    let mut sim = Sim::with_nodes(1, &netconf(1, |_| {}), 20);
    sim.registry_down = true;
    let renew = |a: &Action| *a == Action::Registry(RegistryRequest::Renew);
    sim.run_until(Duration::from_secs(1));
    assert_eq!(sim.count(0, renew), 1, "asked at start");
    sim.run_until(RENEW_RETRY - Duration::from_secs(1));
    assert_eq!(sim.count(0, renew), 1);
    sim.run_until(RENEW_RETRY + Duration::from_secs(1));
    assert_eq!(sim.count(0, renew), 2, "retried");
    let key = re6st_registry::cert::load_key(&sim.nodes[0].key_pem).unwrap();
    let pem = sim
        .ca
        .issue(&IssueRequest {
            public_key: key.public_key_raw().to_vec(),
            prefix: sim.nodes[0].prefix,
            wg_key: [1; 32],
            serial: 99,
            not_before: NOW - 10,
            not_after: NOW + 365 * 86_400,
        })
        .unwrap();
    sim.answer(0, RegistryResult::Renewed(Ok(pem.clone())));
    sim.registry_down = false;
    sim.deliver();
    assert_eq!(
        sim.count(0, |a| *a == Action::SaveCertificate(pem.clone())),
        1
    );
    assert_eq!(sim.cores[0].certificate().serial, 99);
    sim.run_until(RENEW_RETRY + RENEW_CHECK + Duration::from_secs(2));
    assert_eq!(sim.count(0, renew), 2, "no renewal needed any more");
}

/// A renewed node tells its tunnel peers its new certificate: when the
/// registry later revokes the superseded serial, the tunnel stays. A
/// certificate with another WireGuard key does not move the tunnel.
#[test]
fn a_renewal_keeps_the_tunnels_when_the_old_serial_is_revoked() {
    let mut sim = Sim::new(3, &netconf(1, |c| c.client_count = 2));
    sim.run_until(Duration::from_secs(5));
    let renew = |sim: &mut Sim, i: usize, wg_key: [u8; 32], serial: u64| {
        let key = re6st_registry::cert::load_key(&sim.nodes[i].key_pem).unwrap();
        let pem = sim
            .ca
            .issue(&IssueRequest {
                public_key: key.public_key_raw().to_vec(),
                prefix: sim.nodes[i].prefix,
                wg_key,
                serial,
                not_before: NOW - 10,
                not_after: NOW + 365 * 86_400,
            })
            .unwrap();
        sim.answer(i, RegistryResult::Renewed(Ok(pem)));
        sim.deliver();
    };
    // Node 0 keeps its WireGuard key ([1; 32]); node 1 changes it.
    renew(&mut sim, 0, [1; 32], 90);
    renew(&mut sim, 1, [9; 32], 91);
    let (a, b) = (sim.nodes[0].prefix, sim.nodes[1].prefix);
    assert!(sim.tunnels(2).iter().any(|t| t.peer == a));
    assert!(sim.tunnels(2).iter().any(|t| t.peer == b));
    let c2 = netconf(2, |c| {
        c.client_count = 2;
        c.crl = vec![sim.nodes[0].serial, sim.nodes[1].serial];
    });
    let (now, unix) = (sim.now, sim.unix());
    sim.cores[2].handle_registry(now, unix, RegistryResult::Config(Ok(signed(&sim.ca, &c2))));
    sim.deliver();
    assert!(sim.tunnels(2).iter().any(|t| t.peer == a), "renewed: kept");
    assert!(
        sim.tunnels(2).iter().all(|t| t.peer != b),
        "another key: closed"
    );
    assert_eq!(lost(&sim.cores[2], LossReason::Revoked), 1);
    assert!(!sim.cores[0].revoked());
}

/// With the registry down, nodes still open tunnels from their caches and
/// keep them; the configuration and the Babel keys are asked again with
/// growing delays; the node says the registry is unreachable, and
/// reachable again once it answers.
#[test]
fn registry_down_the_mesh_runs_from_the_cache() {
    let mut sim = Sim::new(2, &netconf(1, |c| c.tunnel_refresh_s = 86_400));
    sim.registry_down = true;
    sim.run_until(Duration::from_secs(600));
    assert_eq!(sim.tunnels(1).len(), 1);
    assert!(sim.tunnels(1)[0].up);
    let name = sim.tunnels(1)[0].name.clone();
    assert_eq!(
        sim.count(1, |a| matches!(a, Action::OpenTunnel { .. })),
        1,
        "kept: {name}"
    );
    let times = |what: RegistryRequest| -> Vec<Duration> {
        sim.log
            .iter()
            .filter(|(n, _, a)| *n == 1 && *a == Action::Registry(what.clone()))
            .map(|(_, t, _)| *t)
            .collect()
    };
    for t in [times(RegistryRequest::Config), times(RegistryRequest::Hmac)] {
        assert!(t.len() >= 4, "{t:?}");
        let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0]),
            "growing delays {gaps:?}"
        );
        assert!(gaps[gaps.len() - 1] > gaps[0]);
    }
    assert_eq!(sim.cores[1].registry_reachable(), Some(false));
    let (now, unix) = (sim.now, sim.unix());
    sim.cores[1].handle_registry(now, unix, RegistryResult::Bootstrap(Ok(Vec::new())));
    assert_eq!(sim.cores[1].registry_reachable(), Some(true), "back");
}

/// The topology report goes 15 s after start and then every minute,
/// failed or not, and stops once we are revoked.
#[test]
fn topology_reports_go_every_minute_until_revoked() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.registry_down = true;
    sim.run_until(Duration::from_secs(200));
    let times = |sim: &Sim| -> Vec<u64> {
        sim.log
            .iter()
            .filter(|(n, _, a)| *n == 0 && *a == Action::Registry(RegistryRequest::Report))
            .map(|(_, t, _)| t.as_secs())
            .collect()
    };
    assert_eq!(times(&sim), vec![15, 75, 135, 195]);
    let c2 = netconf(2, |c| c.crl = vec![sim.nodes[0].serial]);
    let s2 = signed(&sim.ca, &c2);
    sim.answer(0, RegistryResult::Config(Ok(s2)));
    sim.run_until(Duration::from_secs(600));
    assert!(sim.cores[0].revoked());
    assert_eq!(times(&sim).len(), 4, "a revoked node reports nothing");
}

/// poll_timeout is None or in the future after every input, and a lone
/// node sleeps: few wake-ups per hour.
#[test]
fn a_lone_node_does_not_busy_loop() {
    let mut sim = Sim::new(1, &netconf(1, |_| {}));
    sim.registry_down = true;
    let t = sim.cores[0].poll_timeout();
    assert!(t.is_none_or(|t| t > sim.now));
    let start = sim.log.len();
    sim.run_until(Duration::from_secs(3600));
    let wakeups = sim.log.len() - start;
    assert!(wakeups < 1000, "{wakeups} actions in an hour");
}

/// A DrainRequest from a peer without a tunnel to us changes nothing.
#[test]
fn drain_request_without_tunnel_is_ignored() {
    let mut sim = Sim::new(2, &netconf(1, |_| {}));
    sim.dead.insert(0);
    sim.run_until(Duration::from_secs(1));
    assert!(sim.count(1, |a| matches!(a, Action::SetCost { .. })) == 0);
}
