//! The simulator: many routers in one process on a virtual clock, joined by
//! point-to-point links with per-direction delay, jitter and loss. Each
//! router exports its own /64; [`Sim::path`] follows the installed next hops
//! hop by hop to check reachability and loops.
//!
//! Deterministic: one seed gives one run (seeded routers, seeded link
//! randomness, ordered maps). Loops are checked during reconvergence, not
//! only at the end: every time a node installs a next hop, the path from
//! it is followed, and a loop (which must go through the node that just
//! changed) is counted in [`Sim::loops`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv6Net};

use crate::auth::AuthConfig;
use crate::metric::RttParams;
use crate::neighbour::IfaceId;
use crate::router::{Destination, InterfaceConfig, RouteChange, Router, RouterConfig};

/// A simulated link between two routers.
#[derive(Clone, Debug)]
pub struct Link {
    /// (node, interface) of one end.
    pub a: (usize, IfaceId),
    /// (node, interface) of the other end.
    pub b: (usize, IfaceId),
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay varies by up to this fraction (0.2 = ±20%).
    pub jitter: f64,
    /// Loss probability.
    pub loss: f64,
    /// Whether packets pass (false: a silent failure).
    pub up: bool,
}

/// One simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// The router.
    pub router: Router,
    /// What it installed: destination → (interface, next hop).
    pub fib: BTreeMap<IpNet, (IfaceId, IpAddr)>,
    /// Destinations it holds unreachable (a retraction in progress).
    pub unreachable: BTreeSet<IpNet>,
    /// Number of times a FIB entry changed.
    pub fib_changes: u64,
}

#[derive(Debug)]
struct Delivery {
    to: usize,
    iface: IfaceId,
    src: Ipv6Addr,
    bytes: Vec<u8>,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    /// The virtual clock.
    pub now: Instant,
    /// When the run started.
    pub start: Instant,
    /// Nodes.
    pub nodes: Vec<SimNode>,
    /// Links (the interface id on both ends is the link index).
    pub links: Vec<Link>,
    hello: Duration,
    events: BinaryHeap<Reverse<(Instant, u64)>>,
    deliveries: HashMap<u64, Delivery>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    deadline: Vec<Option<Instant>>,
    seq: u64,
    rng: fastrand_lite::Rng,
    /// Packets carried.
    pub packets: u64,
    /// The last packet delivered to each node: (interface, source, bytes).
    pub last_delivered: HashMap<usize, (IfaceId, Ipv6Addr, Vec<u8>)>,
    /// Forwarding loops seen at any moment of the run.
    pub loops: u64,
    /// The first loop seen, described.
    pub first_loop: Option<String>,
    seed: u64,
}

/// A tiny deterministic RNG (no dependency for the library).
mod fastrand_lite {
    #[derive(Debug)]
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn f64(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }
}

/// The node whose prefix this is.
pub fn node_of(prefix: &IpNet) -> Option<usize> {
    let IpNet::V6(p) = prefix else { return None };
    let s = p.network().segments();
    (s[0] == 0xfd00 && s[1] == 0 && p.prefix_len() == 64)
        .then_some((usize::from(s[2]) << 16) | usize::from(s[3]))
}

/// The /64 that node `i` exports.
pub fn node_prefix(i: usize) -> IpNet {
    let addr = Ipv6Addr::new(0xfd00, 0, (i >> 16) as u16, i as u16, 0, 0, 0, 0);
    IpNet::V6(Ipv6Net::new(addr, 64).unwrap_or_default())
}

fn link_local(node: usize, link: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        0,
        (node >> 16) as u16 | 0x100,
        node as u16,
        link as u16,
    )
}

impl Sim {
    /// `n` routers, each exporting [`node_prefix`], with this Hello interval.
    pub fn new(n: usize, hello: Duration, seed: u64) -> Self {
        Self::with_auth(n, hello, seed, |_| None)
    }

    /// Like [`Sim::new`], with RFC 8967 keys per node (None: no MACs).
    pub fn with_auth(
        n: usize,
        hello: Duration,
        seed: u64,
        auth: impl Fn(usize) -> Option<AuthConfig>,
    ) -> Self {
        let now = Instant::now();
        let mut sim = Self {
            now,
            start: now,
            nodes: Vec::with_capacity(n),
            links: Vec::new(),
            hello,
            events: BinaryHeap::new(),
            deliveries: HashMap::new(),
            timers: BinaryHeap::new(),
            deadline: vec![None; n],
            seq: 0,
            rng: fastrand_lite::Rng::new(seed),
            packets: 0,
            last_delivered: HashMap::new(),
            loops: 0,
            first_loop: None,
            seed,
        };
        for i in 0..n {
            let router = sim.new_router(i, 0, None, auth(i));
            sim.nodes.push(SimNode {
                router,
                fib: BTreeMap::new(),
                unreachable: BTreeSet::new(),
                fib_changes: 0,
            });
        }
        for i in 0..n {
            sim.after_call(i);
        }
        sim
    }

    /// The router-id of node `i`.
    pub fn router_id(i: usize) -> [u8; 8] {
        let mut id = [0u8; 8];
        id[0] = 2;
        id[4..].copy_from_slice(&(i as u32 + 1).to_be_bytes());
        id
    }

    /// A router for node `i` in its `life`-th life (0 at start, then one
    /// more per restart), exporting its prefix.
    fn new_router(
        &self,
        i: usize,
        life: u64,
        seqno: Option<u16>,
        auth: Option<AuthConfig>,
    ) -> Router {
        let mut seed = [0u8; 32];
        let mix = self.seed
            ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ life.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        for (k, chunk) in seed.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(mix ^ k as u64).to_le_bytes());
        }
        let mut cfg = RouterConfig::new(Self::router_id(i), seed);
        if let Some(s) = seqno {
            cfg.seqno = s;
        }
        cfg.auth = auth;
        let mut router = Router::new(cfg, self.now);
        router.export(node_prefix(i), None, self.now);
        router
    }

    /// Node `i` crashes and starts again at once with an empty table (its
    /// links stay): `seqno` is what it starts with (None: a fresh random
    /// one, as without a persisted seqno).
    pub fn restart(&mut self, i: usize, life: u64, seqno: Option<u16>) {
        let mut router = self.new_router(i, life, seqno, None);
        for (l, link) in self.links.iter().enumerate() {
            for (node, iface) in [link.a, link.b] {
                if node == i {
                    let mut cfg = InterfaceConfig::tunnel(self.hello);
                    cfg.link_local = Some(link_local(i, l));
                    router.add_interface(iface, cfg, self.now);
                }
            }
        }
        let node = &mut self.nodes[i];
        node.router = router;
        node.fib.clear();
        node.unreachable.clear();
        self.after_call(i);
    }

    /// A connected random graph of `n` nodes: a random spanning tree plus
    /// `extra` edges, with one-way delays from 5 to 80 ms. Returns the sim
    /// and the edge list (tree edges first; link `i` is edge `i`).
    pub fn random(
        n: usize,
        extra: usize,
        hello: Duration,
        seed: u64,
    ) -> (Self, Vec<(usize, usize)>) {
        let mut rng = fastrand_lite::Rng::new(seed);
        let mut below = |m: usize| (rng.next() % m as u64) as usize;
        let mut sim = Self::new(n, hello, seed);
        let mut edges = Vec::new();
        let mut seen = BTreeSet::new();
        for i in 1..n {
            let j = below(i);
            edges.push((i, j));
            seen.insert((i.min(j), i.max(j)));
        }
        let max_edges = n * (n - 1) / 2;
        while edges.len() < (n - 1 + extra).min(max_edges) {
            let (a, b) = (below(n), below(n));
            if a != b && seen.insert((a.min(b), a.max(b))) {
                edges.push((a, b));
            }
        }
        let delays: Vec<u64> = edges.iter().map(|_| 5 + below(76) as u64).collect();
        for (&(a, b), d) in edges.iter().zip(delays) {
            sim.connect(a, b, Duration::from_millis(d));
        }
        (sim, edges)
    }

    /// Joins two nodes with a link of this one-way delay; returns its index.
    pub fn connect(&mut self, a: usize, b: usize, delay: Duration) -> usize {
        let l = self.links.len();
        let iface = IfaceId(l as u32);
        self.links.push(Link {
            a: (a, iface),
            b: (b, iface),
            delay,
            jitter: 0.0,
            loss: 0.0,
            up: true,
        });
        for (me, other) in [(a, b), (b, a)] {
            let _ = other;
            let mut cfg = InterfaceConfig::tunnel(self.hello);
            cfg.link_local = Some(link_local(me, l));
            cfg.rtt = Some(RttParams::default());
            self.nodes[me].router.add_interface(iface, cfg, self.now);
            self.after_call(me);
        }
        l
    }

    /// Takes a link down (silently: packets vanish) or up.
    pub fn set_up(&mut self, link: usize, up: bool) {
        if let Some(l) = self.links.get_mut(link) {
            l.up = up;
        }
    }

    /// Removes a link from both routers (as a tunnel being closed).
    pub fn remove_link(&mut self, link: usize) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        l.up = false;
        let (a, b) = (l.a, l.b);
        for (node, iface) in [a, b] {
            self.nodes[node].router.remove_interface(iface, self.now);
            self.after_call(node);
        }
    }

    fn after_call(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].router.poll_transmit() {
            let Some(link) = self.links.get(t.iface.0 as usize) else {
                continue;
            };
            if !link.up {
                continue;
            }
            let ((from, _), (to, to_iface)) = if link.a.0 == i {
                (link.a, link.b)
            } else {
                (link.b, link.a)
            };
            let _ = from;
            if let Destination::Unicast(addr) = t.dst {
                if addr != link_local(to, t.iface.0 as usize) {
                    continue;
                }
            }
            if link.loss > 0.0 && self.rng.f64() < link.loss {
                continue;
            }
            let factor = 1.0 + link.jitter * (2.0 * self.rng.f64() - 1.0);
            let delay = Duration::from_secs_f64((link.delay.as_secs_f64() * factor).max(0.0));
            self.seq += 1;
            self.packets += 1;
            self.events.push(Reverse((self.now + delay, self.seq)));
            self.deliveries.insert(
                self.seq,
                Delivery {
                    to,
                    iface: to_iface,
                    src: link_local(i, t.iface.0 as usize),
                    bytes: t.bytes,
                },
            );
        }
        let mut changed = Vec::new();
        let node = &mut self.nodes[i];
        while let Some(c) = node.router.poll_route_change() {
            node.fib_changes += 1;
            match c {
                RouteChange::Install {
                    key,
                    iface,
                    next_hop,
                    ..
                } => {
                    node.unreachable.remove(&key.prefix);
                    node.fib.insert(key.prefix, (iface, next_hop));
                    changed.push(key.prefix);
                }
                RouteChange::Unreachable { key } => {
                    node.fib.remove(&key.prefix);
                    node.unreachable.insert(key.prefix);
                }
                RouteChange::Remove { key } => {
                    node.fib.remove(&key.prefix);
                    node.unreachable.remove(&key.prefix);
                }
            }
        }
        for prefix in changed {
            if let Some(to) = node_of(&prefix) {
                if let Err(e) = self.path(i, to) {
                    if e.starts_with("loop") {
                        self.loops += 1;
                        let at = self.now.duration_since(self.start);
                        self.first_loop.get_or_insert(format!("{e} at {at:?}"));
                    }
                }
            }
        }
        let node = &mut self.nodes[i];
        let next = node.router.poll_timeout();
        self.deadline[i] = next;
        if let Some(t) = next {
            self.timers.push(Reverse((t, i)));
        }
    }

    /// Runs the simulation for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            // Drop stale timer entries.
            while let Some(Reverse((t, i))) = self.timers.peek().copied() {
                if self.deadline[i] == Some(t) {
                    break;
                }
                self.timers.pop();
            }
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let next_event = self.events.peek().map(|Reverse((t, _))| *t);
            let next = match (next_timer, next_event) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(end),
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            if next_event == Some(next) {
                if let Some(Reverse((_, seq))) = self.events.pop() {
                    if let Some(d) = self.deliveries.remove(&seq) {
                        let now = self.now;
                        self.nodes[d.to].router.handle_packet(
                            now,
                            now,
                            d.iface,
                            IpAddr::V6(d.src),
                            &d.bytes,
                        );
                        self.after_call(d.to);
                        self.last_delivered.insert(d.to, (d.iface, d.src, d.bytes));
                    }
                }
            } else if let Some(Reverse((_, i))) = self.timers.pop() {
                let now = self.now;
                self.deadline[i] = None;
                self.nodes[i].router.handle_timeout(now);
                self.after_call(i);
            }
        }
    }

    /// Hands `node` a packet again (a replay by an attacker on the link).
    pub fn replay(&mut self, node: usize, iface: IfaceId, src: Ipv6Addr, bytes: &[u8]) {
        let now = self.now;
        self.nodes[node]
            .router
            .handle_packet(now, now, iface, IpAddr::V6(src), bytes);
        self.after_call(node);
    }

    /// Follows installed next hops from `from` towards node `to`'s prefix.
    /// Returns the nodes visited, or an error naming a missing route, a
    /// route into a link that is down, or a loop.
    pub fn path(&self, from: usize, to: usize) -> Result<Vec<usize>, String> {
        let dest = node_prefix(to);
        let mut path = vec![from];
        let mut at = from;
        while at != to {
            let Some((iface, _)) = self.nodes[at].fib.get(&dest) else {
                return Err(format!("node {at} has no route to node {to}"));
            };
            let link = &self.links[iface.0 as usize];
            if !link.up {
                return Err(format!("node {at} routes node {to} into a dead link"));
            }
            let next = if link.a.0 == at { link.b.0 } else { link.a.0 };
            if path.contains(&next) {
                path.push(next);
                return Err(format!("loop towards node {to}: {path:?}"));
            }
            path.push(next);
            at = next;
        }
        Ok(path)
    }

    /// Sum of the link delays along a path.
    pub fn path_delay(&self, path: &[usize]) -> Duration {
        path.windows(2)
            .map(|w| {
                self.links
                    .iter()
                    .filter(|l| {
                        l.up && ((l.a.0 == w[0] && l.b.0 == w[1])
                            || (l.a.0 == w[1] && l.b.0 == w[0]))
                    })
                    .map(|l| l.delay)
                    .min()
                    .unwrap_or(Duration::MAX / 4)
            })
            .sum()
    }

    /// Whether every node reaches every other node's prefix, loop-free.
    pub fn all_reachable(&self) -> Result<(), String> {
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    self.path(a, b)?;
                }
            }
        }
        Ok(())
    }
}
