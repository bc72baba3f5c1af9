//! The simulator: many routers in one process on a virtual clock, joined by
//! point-to-point links with per-direction delay, jitter and loss. Each
//! router exports its own /64; [`Sim::path`] follows the installed next hops
//! hop by hop to check reachability and loops.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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
    pub fib: HashMap<IpNet, (IfaceId, IpAddr)>,
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
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut id = [0u8; 8];
            id[0] = 2;
            id[4..].copy_from_slice(&(i as u32 + 1).to_be_bytes());
            let mut cfg = RouterConfig::new(id);
            cfg.seed = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            cfg.auth = auth(i);
            let mut router = Router::new(cfg, now);
            router.export(node_prefix(i), None, now);
            nodes.push(SimNode {
                router,
                fib: HashMap::new(),
                fib_changes: 0,
            });
        }
        let mut sim = Self {
            now,
            nodes,
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
        };
        for i in 0..n {
            sim.after_call(i);
        }
        sim
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
        let node = &mut self.nodes[i];
        while let Some(c) = node.router.poll_route_change() {
            node.fib_changes += 1;
            match c {
                RouteChange::Install {
                    prefix,
                    iface,
                    next_hop,
                    ..
                }
                | RouteChange::Replace {
                    prefix,
                    iface,
                    next_hop,
                    ..
                } => {
                    node.fib.insert(prefix, (iface, next_hop));
                }
                RouteChange::Remove { prefix, .. } => {
                    node.fib.remove(&prefix);
                }
            }
        }
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
            .handle_packet(now, iface, IpAddr::V6(src), bytes);
        self.after_call(node);
    }

    /// Follows installed next hops from `from` towards node `to`'s prefix.
    /// Returns the nodes visited, or an error naming a missing route or a loop.
    pub fn path(&self, from: usize, to: usize) -> Result<Vec<usize>, String> {
        let dest = node_prefix(to);
        let mut path = vec![from];
        let mut at = from;
        while at != to {
            let Some((iface, _)) = self.nodes[at].fib.get(&dest) else {
                return Err(format!("node {at} has no route to node {to}"));
            };
            let link = &self.links[iface.0 as usize];
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
