//! Policy-only simulation of 200 nodes: tunnels open at once when the
//! target accepts, routing is approximated by the tunnel graph (every node
//! in a node's component is routed; routes per tunnel = destinations whose
//! BFS first hop is that tunnel). Over many rotation periods the tunnel
//! graph must stay connected and degree-bounded.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use re6st_tunnel::policy::{Action, Admission, Peer, Policy, PolicyConfig, View};

const N: usize = 200;

fn peer(i: usize) -> Peer {
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0, 0, i as u16, 0, 0, 0, 0), 64).unwrap_or_default()
}

fn index(p: &Peer) -> usize {
    p.network().segments()[3] as usize
}

struct World {
    policies: Vec<Policy>,
    /// Directed tunnels client -> server (undirected for routing).
    tunnels: BTreeSet<(usize, usize)>,
    cost: HashMap<(usize, usize), u16>,
    caches: Vec<Vec<Peer>>,
    bootstraps: usize,
}

impl World {
    fn adjacency(&self) -> Vec<Vec<usize>> {
        let mut adj = vec![Vec::new(); N];
        for &(a, b) in &self.tunnels {
            adj[a].push(b);
            adj[b].push(a);
        }
        adj
    }

    fn view(&self, i: usize, adj: &[Vec<usize>]) -> View {
        // BFS from i; first hop of each destination.
        let mut first = vec![usize::MAX; N];
        let mut seen = [false; N];
        let mut q = VecDeque::new();
        seen[i] = true;
        // Draining tunnels (high cost) are used last: visit them after the others.
        let mut starts: Vec<usize> = adj[i].clone();
        starts.sort_by_key(|&n| self.cost.get(&(i, n)).copied().unwrap_or(1));
        for n in starts {
            if !seen[n] {
                seen[n] = true;
                first[n] = n;
                q.push_back(n);
            }
        }
        while let Some(u) = q.pop_front() {
            for &v in &adj[u] {
                if !seen[v] {
                    seen[v] = true;
                    first[v] = first[u];
                    q.push_back(v);
                }
            }
        }
        let mut routes_via: HashMap<Peer, usize> = HashMap::new();
        for (d, f) in first.iter().enumerate() {
            if *f != usize::MAX && d != i {
                *routes_via.entry(peer(*f)).or_default() += 1;
            }
        }
        View {
            routed: (0..N).filter(|&d| seen[d]).map(peer).collect(),
            routes_via,
            cache: self.caches[i].clone(),
            anchor: Some(peer(0)),
            lan: Default::default(),
        }
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>, now: Instant, adj: &[Vec<usize>]) {
        for a in actions {
            match a {
                Action::Open(p) => {
                    let j = index(&p);
                    let v = self.view(j, adj);
                    let (adm, more) = self.policies[j].on_incoming(peer(i), now, &v);
                    match adm {
                        Admission::Accept => {
                            self.tunnels.insert((i, j));
                            self.policies[i].on_up(p, now);
                            // The server's duplicate resolution may close things.
                            for m in more {
                                if let Action::Close(q) = m {
                                    let k = index(&q);
                                    self.tunnels.remove(&(j, k));
                                    self.policies[k].on_incoming_closed(peer(j));
                                }
                            }
                        }
                        Admission::Busy => {
                            let vi = self.view(i, adj);
                            let more = self.policies[i].on_failed(p, now, &vi);
                            self.apply(i, more, now, adj);
                        }
                    }
                }
                Action::Close(p) => {
                    let j = index(&p);
                    if self.tunnels.remove(&(i, j)) {
                        self.policies[j].on_incoming_closed(peer(i));
                    }
                    self.cost.remove(&(i, j));
                    self.cost.remove(&(j, i));
                }
                Action::SetCost(p, m) => {
                    let j = index(&p);
                    self.cost.insert((i, j), m);
                    self.cost.insert((j, i), m);
                }
                Action::Bootstrap => {
                    // The registry hands out a few pseudo-random peers.
                    self.bootstraps += 1;
                    let k = (i * 7919 + self.bootstraps * 104_729) % N;
                    self.caches[i] = vec![peer(k), peer((k + 61) % N), peer((k + 127) % N)];
                }
            }
        }
    }
}

fn components(adj: &[Vec<usize>]) -> usize {
    let mut seen = [false; N];
    let mut count = 0;
    for s in 0..N {
        if seen[s] {
            continue;
        }
        count += 1;
        let mut q = vec![s];
        seen[s] = true;
        while let Some(u) = q.pop() {
            for &v in &adj[u] {
                if !seen[v] {
                    seen[v] = true;
                    q.push(v);
                }
            }
        }
    }
    count
}

#[test]
fn two_hundred_nodes_stay_connected_and_bounded_while_rotating() {
    let t0 = Instant::now();
    let cfg = PolicyConfig {
        client_count: 10,
        max_clients: 20,
        tunnel_refresh: Duration::from_secs(300),
        drain_timeout: Duration::from_secs(120),
        ..PolicyConfig::default()
    };
    let mut w = World {
        policies: (0..N)
            .map(|i| {
                // Spread the rotation deadlines as real nodes would.
                let start = t0 - Duration::from_secs((i as u64 * 37) % 300);
                Policy::new(peer(i), cfg.clone(), start, i as u64 * 2654435761 + 1)
            })
            .collect(),
        tunnels: BTreeSet::new(),
        cost: HashMap::new(),
        // Every node starts knowing three others (the registry's bootstrap).
        caches: (0..N)
            .map(|i| vec![peer((i + 1) % N), peer((i + 17) % N), peer((i + 101) % N)])
            .collect(),
        bootstraps: 0,
    };
    let step = Duration::from_secs(15);
    let mut rotations = 0usize;
    let mut worst_components = 0;
    for s in 0..(3600 / 15) {
        let now = t0 + step * s;
        for i in 0..N {
            let adj = w.adjacency();
            let v = w.view(i, &adj);
            let actions = w.policies[i].tick(now, &v);
            rotations += actions
                .iter()
                .filter(|a| matches!(a, Action::SetCost(..)))
                .count();
            w.apply(i, actions, now, &adj);
        }
        let adj = w.adjacency();
        // Degree bounds at every step.
        for i in 0..N {
            let out = w.tunnels.iter().filter(|(a, _)| *a == i).count();
            let inc = w.tunnels.iter().filter(|(_, b)| *b == i).count();
            assert!(
                out <= cfg.client_count + 1,
                "node {i}: {out} outgoing (one may be draining)"
            );
            assert!(inc <= cfg.max_clients, "node {i}: {inc} incoming");
        }
        if s >= 8 {
            // After the first two minutes the mesh must be one piece, always.
            let c = components(&adj);
            worst_components = worst_components.max(c);
            assert_eq!(c, 1, "step {s}: tunnel graph split in {c} parts");
        }
    }
    let degrees: Vec<usize> = w.adjacency().iter().map(Vec::len).collect();
    let min = degrees.iter().min().copied().unwrap_or(0);
    let max = degrees.iter().max().copied().unwrap_or(0);
    eprintln!(
        "200 nodes, 1 h: {rotations} rotations, {} tunnels, degree {min}..{max}, components {worst_components}, {} registry bootstraps",
        w.tunnels.len(),
        w.bootstraps
    );
    assert!(
        rotations >= N * 10,
        "every node should rotate about every 5 min: {rotations}"
    );
    assert!(min >= 2, "a node with fewer than 2 tunnels: {min}");
}
