//! `re6st-bench-sim`: the Babel router at scale in the simulator (virtual
//! clock, no network): convergence of N nodes on a random graph, then
//! rerouting after silent link failures, with loops checked at every FIB
//! change. Prints virtual times, messages per node per second, memory per
//! node and wall time.

use std::time::{Duration, Instant};

use clap::Parser;
use re6st_routing::sim::Sim;

#[derive(Parser, Debug)]
#[command(about = "Babel convergence and rerouting of N simulated nodes")]
struct Cli {
    /// Nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Average degree (links per node, counting both ends).
    #[arg(long, default_value_t = 4.0)]
    degree: f64,
    /// Hello interval, milliseconds.
    #[arg(long, default_value_t = 300)]
    hello_ms: u64,
    /// Links failed silently after convergence (non-tree links, so the
    /// graph stays connected).
    #[arg(long, default_value_t = 20)]
    failures: usize,
    /// Nodes whose reachability to every other node is checked while
    /// waiting (all pairs are checked at the end of each phase).
    #[arg(long, default_value_t = 40)]
    sample: usize,
    /// Graph and router seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up on a phase after this much virtual time, seconds.
    #[arg(long, default_value_t = 120)]
    limit_s: u64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether the sampled nodes reach everyone and everyone reaches them.
fn sampled_reachable(sim: &Sim, sample: &[usize]) -> bool {
    let n = sim.nodes.len();
    sample.iter().all(|&a| {
        (0..n)
            .filter(|&b| b != a)
            .all(|b| sim.path(a, b).is_ok() && sim.path(b, a).is_ok())
    })
}

/// Runs until the sample is reachable (checked every 500 ms of virtual
/// time), then until all pairs are (checked every second); returns both
/// virtual times.
fn until_reachable(
    sim: &mut Sim,
    sample: &[usize],
    limit: Duration,
) -> (Option<Duration>, Option<Duration>) {
    let start = sim.now;
    let mut sampled = None;
    while sim.now.duration_since(start) <= limit {
        if sampled.is_none() && sampled_reachable(sim, sample) {
            sampled = Some(sim.now.duration_since(start));
        }
        if sampled.is_some() && sim.all_reachable().is_ok() {
            return (sampled, Some(sim.now.duration_since(start)));
        }
        let step = if sampled.is_some() { 1000 } else { 500 };
        sim.run_for(Duration::from_millis(step));
    }
    (sampled, None)
}

fn show(t: Option<Duration>, limit: Duration) -> String {
    t.map_or_else(|| format!("> {limit:?}"), |t| format!("{t:?}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let n = cli.nodes.max(2);
    let extra = ((cli.degree * n as f64 / 2.0) as usize).saturating_sub(n - 1);
    let wall = Instant::now();
    let rss0 = rss_kib();
    let (mut sim, edges) = Sim::random(n, extra, Duration::from_millis(cli.hello_ms), cli.seed);
    let sample: Vec<usize> = (0..cli.sample.min(n))
        .map(|i| i * n / cli.sample.min(n))
        .collect();
    let limit = Duration::from_secs(cli.limit_s);
    println!(
        "{n} nodes, {} links (average degree {:.1}), hello {} ms, seed {}",
        edges.len(),
        2.0 * edges.len() as f64 / n as f64,
        cli.hello_ms,
        cli.seed
    );

    let (sampled, converged) = until_reachable(&mut sim, &sample, limit);
    println!(
        "convergence (virtual): sampled nodes {}, all pairs {}{}; wall {:.1} s",
        show(sampled, limit),
        show(converged, limit),
        sim.all_reachable()
            .err()
            .map_or(String::new(), |e| format!(" ({e})")),
        wall.elapsed().as_secs_f64()
    );

    // Steady state: messages and memory.
    let steady = Duration::from_secs(10);
    let (p0, w0) = (sim.packets, Instant::now());
    sim.run_for(steady);
    let per_node = (sim.packets - p0) as f64 / n as f64 / steady.as_secs_f64();
    let rss = rss_kib().saturating_sub(rss0);
    println!(
        "steady state: {per_node:.1} packets per node per second, {:.1} KiB per node ({:.0} MiB in all), {:.2} s of wall time per virtual second",
        rss as f64 / n as f64,
        rss as f64 / 1024.0,
        w0.elapsed().as_secs_f64() / steady.as_secs_f64()
    );

    // Silent failures of non-tree links that carry traffic or not.
    let mut failed = Vec::new();
    let mut i = n - 1;
    while failed.len() < cli.failures && i < edges.len() {
        failed.push(i);
        i += (edges.len() - n + 1) / cli.failures.max(1) + 1;
    }
    for &l in &failed {
        sim.set_up(l, false);
    }
    let (sampled, rerouted) = until_reachable(&mut sim, &sample, limit);
    println!(
        "after {} silent link failures (virtual): sampled nodes reachable again in {}, all pairs in {}{}",
        failed.len(),
        show(sampled, limit),
        show(rerouted, limit),
        sim.all_reachable().err().map_or(String::new(), |e| format!(" ({e})")),
    );
    println!(
        "loops seen at any FIB change: {}{}; total wall time {:.1} s",
        sim.loops,
        sim.first_loop
            .as_ref()
            .map_or(String::new(), |l| format!(" (first: {l})")),
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}
