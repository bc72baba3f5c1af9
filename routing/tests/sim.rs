//! Protocol tests in the simulator: convergence and loop-freedom on random
//! 100-node graphs, rerouting after a silent link failure, RTT preference,
//! and route stability under ±20% RTT jitter.

use std::time::Duration;

use re6st_routing::sim::{node_prefix, Sim};

const HELLO: Duration = Duration::from_millis(300);

/// A deterministic pseudo-random generator for test scenarios.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_graph(n: usize, extra: usize, seed: u64) -> (Sim, Vec<(usize, usize)>) {
    Sim::random(n, extra, HELLO, seed)
}

#[test]
fn square_prefers_the_lower_latency_path_and_reroutes_on_silent_failure() {
    // a=0, b=1, c=2, d=3: a-b-d fast (10+10 ms), a-c-d slow (60+60 ms).
    let mut sim = Sim::new(4, HELLO, 7);
    let ab = sim.connect(0, 1, Duration::from_millis(10));
    sim.connect(1, 3, Duration::from_millis(10));
    sim.connect(0, 2, Duration::from_millis(60));
    sim.connect(2, 3, Duration::from_millis(60));
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.path(0, 3), Ok(vec![0, 1, 3]));
    assert_eq!(sim.path(3, 0), Ok(vec![3, 1, 0]));

    // Silent failure of a-b: measure how long until a's route to d moves.
    sim.set_up(ab, false);
    let mut rerouted = None;
    for step in 1..=100 {
        sim.run_for(Duration::from_millis(10));
        if sim.path(0, 3) == Ok(vec![0, 2, 3]) {
            rerouted = Some(step * 10);
            break;
        }
    }
    let ms = rerouted.unwrap_or_else(|| panic!("no reroute within 1 s: {:?}", sim.path(0, 3)));
    eprintln!("square: a->d rerouted {ms} ms after a silent failure (hello {HELLO:?})");
    assert!(
        ms <= 2 * HELLO.as_millis() as usize + HELLO.as_millis() as usize / 2 + 50,
        "{ms} ms"
    );
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.path(3, 0), Ok(vec![3, 2, 0]));

    // Heal: back to the fast path.
    sim.set_up(ab, true);
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.path(0, 3), Ok(vec![0, 1, 3]));
}

#[test]
fn random_100_node_graphs_converge_loop_free_and_reroute() {
    for seed in [1u64, 2, 3] {
        let (mut sim, edges) = random_graph(100, 150, seed);
        sim.run_for(Duration::from_secs(20));
        if let Err(e) = sim.all_reachable() {
            panic!("seed {seed}: not converged after 20 s: {e}");
        }
        // Remove a link that carries traffic but whose removal keeps the
        // graph connected (it is not a tree edge: tree edges come first).
        let (a, b) = edges[100];
        let used = (0..100).any(|x| {
            sim.path(x, b)
                .map(|p| p.windows(2).any(|w| w == [a, b]))
                .unwrap_or(false)
        });
        let link = sim
            .links
            .iter()
            .position(|l| (l.a.0, l.b.0) == (a, b) || (l.a.0, l.b.0) == (b, a))
            .unwrap_or_else(|| panic!("link {a}-{b}"));
        sim.set_up(link, false);
        sim.run_for(Duration::from_secs(5));
        if let Err(e) = sim.all_reachable() {
            panic!("seed {seed}: after removing {a}-{b} (used: {used}): {e}");
        }
        assert_eq!(sim.loops, 0, "seed {seed}: {:?}", sim.first_loop);
    }
}

/// Time until every other node reaches `k` and `k` reaches them, checked
/// every 50 ms of virtual time (None: not within `limit`).
fn time_to_reach(sim: &mut Sim, k: usize, limit: Duration) -> Option<Duration> {
    let n = sim.nodes.len();
    let step = Duration::from_millis(50);
    let mut t = Duration::ZERO;
    while t <= limit {
        if (0..n)
            .filter(|&x| x != k)
            .all(|x| sim.path(x, k).is_ok() && sim.path(k, x).is_ok())
        {
            return Some(t);
        }
        sim.run_for(step);
        t += step;
    }
    None
}

#[test]
fn a_crashed_node_is_reachable_again_within_seconds() {
    let (mut sim, _) = random_graph(30, 45, 21);
    sim.run_for(Duration::from_secs(20));
    sim.all_reachable().unwrap_or_else(|e| panic!("{e}"));
    // Crash and restart with the persisted seqno (one block ahead).
    let k = 7;
    let seqno = sim.nodes[k].router.seqno();
    sim.restart(k, 1, Some(seqno.wrapping_add(64)));
    let persisted = time_to_reach(&mut sim, k, Duration::from_secs(30));
    // Crash again, this time restarting with a seqno 20 behind (a lost
    // state file): the §3.8.2.2 requests bring it forward.
    sim.run_for(Duration::from_secs(10));
    let seqno = sim.nodes[k].router.seqno();
    sim.restart(k, 2, Some(seqno.wrapping_sub(20)));
    let behind = time_to_reach(&mut sim, k, Duration::from_secs(60));
    eprintln!("restart: reachable again after {persisted:?} (persisted seqno), {behind:?} (seqno 20 behind)");
    assert!(
        persisted.is_some_and(|t| t <= Duration::from_secs(3)),
        "{persisted:?}"
    );
    assert!(
        behind.is_some_and(|t| t <= Duration::from_secs(15)),
        "{behind:?}"
    );
    assert_eq!(sim.loops, 0, "{:?}", sim.first_loop);
}

#[test]
fn an_upstream_rtt_rise_never_black_holes_the_route() {
    // 0-1-2-3 in a line, 10 ms per link; the last link's delay jumps to
    // 60 ms. The rise reaches node 0 as an unfeasible update from its
    // successor (more than its link cost), which used to remove the route.
    let mut sim = Sim::new(4, HELLO, 9);
    for (a, b) in [(0, 1), (1, 2), (2, 3)] {
        sim.connect(a, b, Duration::from_millis(10));
    }
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.path(0, 3), Ok(vec![0, 1, 2, 3]));
    let metric = |sim: &Sim| {
        let now = sim.now;
        sim.nodes[0]
            .router
            .routes(now)
            .iter()
            .find(|r| r.prefix == node_prefix(3))
            .map(|r| r.metric)
    };
    let before = metric(&sim);
    sim.links[2].delay = Duration::from_millis(60);
    let mut holes = 0;
    for _ in 0..2000 {
        sim.run_for(Duration::from_millis(10));
        if sim.path(0, 3).is_err() || sim.path(1, 3).is_err() {
            holes += 1;
        }
    }
    eprintln!(
        "rtt rise: metric at node 0 {before:?} -> {:?}",
        metric(&sim)
    );
    let requests: u64 = sim
        .nodes
        .iter()
        .map(|n| n.router.stats().seqno_requests)
        .sum();
    eprintln!("rtt rise: {holes} of 2000 samples without a route, {requests} seqno requests");
    assert!(requests > 0, "the rise must have been unfeasible somewhere");
    assert_eq!(holes, 0);
    assert_eq!(sim.loops, 0, "{:?}", sim.first_loop);
}

#[test]
fn a_changing_internet_makes_no_loop_and_keeps_routes() {
    // Every 2 s delays move by -30 %..+60 % of their base and a link
    // breaks silently (the one broken before heals); the graph stays
    // connected (only non-tree links break).
    let (mut sim, edges) = random_graph(40, 60, 31);
    sim.run_for(Duration::from_secs(20));
    sim.all_reachable().unwrap_or_else(|e| panic!("{e}"));
    let base: Vec<Duration> = sim.links.iter().map(|l| l.delay).collect();
    let mut rng = Rng(77);
    let (mut ok, mut samples) = (0u64, 0u64);
    for _ in 0..30 {
        for (l, d) in base.iter().enumerate() {
            let pct = 70 + rng.below(91);
            sim.links[l].delay = *d * pct as u32 / 100;
        }
        // One non-tree link breaks silently, the one broken before heals.
        let broken = 39 + rng.below((edges.len() - 39) as u64) as usize;
        for l in 39..edges.len() {
            sim.set_up(l, l != broken);
        }
        for _ in 0..20 {
            sim.run_for(Duration::from_millis(100));
            for a in (0..40).step_by(3) {
                for b in (1..40).step_by(4) {
                    if a != b {
                        samples += 1;
                        ok += u64::from(sim.path(a, b).is_ok());
                    }
                }
            }
        }
    }
    let pct = ok as f64 * 100.0 / samples as f64;
    eprintln!(
        "changing internet: {pct:.3} % of {samples} samples routed, {} loops",
        sim.loops
    );
    assert_eq!(sim.loops, 0, "{:?}", sim.first_loop);
    assert!(pct >= 99.0, "{pct:.3} %");
}

#[test]
fn routes_follow_low_latency_on_random_graphs() {
    let (mut sim, _) = random_graph(40, 60, 11);
    sim.run_for(Duration::from_secs(30));
    sim.all_reachable().unwrap_or_else(|e| panic!("{e}"));
    // Compare each chosen path with the lowest-delay path (Dijkstra on delays).
    let n = sim.nodes.len();
    let mut worse = 0;
    let mut total = 0;
    for a in 0..n {
        let best = dijkstra(&sim, a);
        for (b, fastest) in best.iter().enumerate() {
            if a == b {
                continue;
            }
            let chosen = sim.path_delay(&sim.path(a, b).unwrap_or_default());
            total += 1;
            // Hop costs (96 per hop) and the RTT penalty's clipping below
            // 10 ms RTT allow small differences; flag paths 30% or more slower.
            if chosen.as_secs_f64() > fastest.as_secs_f64() * 1.3 + 0.010 {
                worse += 1;
            }
        }
    }
    eprintln!("latency: {worse} of {total} paths are >30% slower than the fastest");
    assert!(
        worse * 20 <= total,
        "{worse} of {total} paths much slower than the best"
    );
}

fn dijkstra(sim: &Sim, from: usize) -> Vec<Duration> {
    let n = sim.nodes.len();
    let mut dist = vec![Duration::MAX; n];
    let mut done = vec![false; n];
    dist[from] = Duration::ZERO;
    for _ in 0..n {
        let Some(u) = (0..n)
            .filter(|&i| !done[i] && dist[i] != Duration::MAX)
            .min_by_key(|&i| dist[i])
        else {
            break;
        };
        done[u] = true;
        for l in sim.links.iter().filter(|l| l.up) {
            let v = if l.a.0 == u {
                l.b.0
            } else if l.b.0 == u {
                l.a.0
            } else {
                continue;
            };
            if dist[u] + l.delay < dist[v] {
                dist[v] = dist[u] + l.delay;
            }
        }
    }
    dist
}

#[test]
fn jitter_does_not_make_routes_flap() {
    let (mut sim, _) = random_graph(50, 75, 5);
    for l in &mut sim.links {
        l.jitter = 0.2;
    }
    sim.run_for(Duration::from_secs(30));
    sim.all_reachable().unwrap_or_else(|e| panic!("{e}"));
    let before: u64 = sim.nodes.iter().map(|n| n.fib_changes).sum();
    let requests_before: u64 = sim
        .nodes
        .iter()
        .map(|n| n.router.stats().seqno_requests)
        .sum();
    sim.run_for(Duration::from_secs(120));
    let after: u64 = sim.nodes.iter().map(|n| n.fib_changes).sum();
    let requests: u64 = sim
        .nodes
        .iter()
        .map(|n| n.router.stats().seqno_requests)
        .sum::<u64>()
        - requests_before;
    let routes = 50 * 49;
    let changes = after - before;
    eprintln!("jitter ±20%: {changes} next-hop changes over 120 s for {routes} routes ({requests} seqno requests)");
    // Bound: fewer than one change per 10 routes in two minutes. Measured
    // 41 to 78 over 11 runs (the order of hash maps varies per run); several
    // hundred without RTT hysteresis.
    assert!(
        changes * 10 < routes as u64,
        "{changes} changes for {routes} routes"
    );
    sim.all_reachable().unwrap_or_else(|e| panic!("{e}"));
    assert!(sim.nodes[0].fib.contains_key(&node_prefix(1)));
}

fn key(byte: u8) -> re6st_routing::auth::AuthConfig {
    use re6st_routing::auth::{Algorithm, AuthConfig, Key};
    let k = Key::new(Algorithm::HmacSha256, vec![byte; 32]).unwrap_or_else(|e| panic!("{e}"));
    AuthConfig {
        sign: k.clone(),
        accept: vec![k],
    }
}

#[test]
fn hmac_members_route_outsiders_and_replays_are_refused() {
    // Nodes 0-3 in a line share a key; node 4 hangs off node 3 with another key.
    let mut sim = Sim::with_auth(5, HELLO, 3, |i| Some(key(if i == 4 { 2 } else { 1 })));
    for (a, b) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
        sim.connect(a, b, Duration::from_millis(5));
    }
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.path(0, 3), Ok(vec![0, 1, 2, 3]));
    assert!(
        sim.path(0, 4).is_err(),
        "a node with another key must not inject routes"
    );
    assert!(sim.path(4, 0).is_err());
    let rejected = sim.nodes[3].router.stats().packets_rejected;
    assert!(rejected > 10, "node 3 rejects node 4's packets: {rejected}");
    // Replaying a packet node 1 already accepted is refused (old PC).
    let (iface, src, bytes) = sim
        .last_delivered
        .get(&1)
        .cloned()
        .unwrap_or_else(|| panic!("nothing delivered"));
    let before = sim.nodes[1].router.stats().packets_rejected;
    sim.replay(1, iface, src, &bytes);
    assert_eq!(sim.nodes[1].router.stats().packets_rejected, before + 1);
    // Rotation: node 4 accepts both keys and signs with the shared one.
    let mut sim = Sim::with_auth(2, HELLO, 4, |i| {
        let mut k = key(1);
        if i == 1 {
            k.accept.push(key(2).sign);
        }
        Some(k)
    });
    sim.connect(0, 1, Duration::from_millis(5));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.path(0, 1), Ok(vec![0, 1]));
}
