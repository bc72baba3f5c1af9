//! `re6st-bench-mesh`: whole-mesh figures of re6stnet (issue 6): time to
//! full reachability, RSS per node, loss window after a silent failure of a
//! path in use, and path stretch (RTT of the chosen path over the best RTT
//! possible through any relays of the emulator's matrix).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use netns_tests::babel::rss_kib;
use netns_tests::cleanup;
use netns_tests::mesh::{random_topology, Matrix, Mesh};
use netns_tests::probe::ping;
use netns_tests::stats::{max, median, p95};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Mesh benchmark of re6stnet in network namespaces (as root)"
)]
struct Cli {
    /// Mesh sizes to measure, comma-separated.
    #[arg(long, default_value = "8,20,50", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Seed of the latency matrix and broken paths.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of broken direct paths.
    #[arg(long, default_value_t = 0.10)]
    broken: f64,
    /// Silent failures to measure per size.
    #[arg(long, default_value_t = 5)]
    failures: usize,
    /// Pairs sampled for the path stretch (and the ping check) per size.
    #[arg(long, default_value_t = 40)]
    pairs: usize,
    /// Network parameter for the registry (`KEY=VALUE`, repeatable), e.g.
    /// `hello_interval_ms=1000`.
    #[arg(long = "param")]
    params: Vec<String>,
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Best RTT (ms) between every pair through any relays (Floyd-Warshall on
/// the emulator's matrix; broken pairs are no edge).
fn best_rtt(delay: &[Vec<u64>], broken: &[Vec<bool>]) -> Vec<Vec<f64>> {
    let n = delay.len();
    let mut d = vec![vec![f64::INFINITY; n]; n];
    for i in 0..n {
        d[i][i] = 0.0;
        for j in 0..n {
            if i != j && !broken[i][j] {
                d[i][j] = 2.0 * delay[i][j] as f64;
            }
        }
    }
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                if d[i][k] + d[k][j] < d[i][j] {
                    d[i][j] = d[i][k] + d[k][j];
                }
            }
        }
    }
    d
}

fn run(cli: &Cli, n: usize) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(cli.seed ^ n as u64);
    let (
        t,
        Matrix {
            names,
            delay,
            broken,
        },
    ) = random_topology("bmesh", n, rng.u64(..), 5..=60, cli.broken);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let params: Vec<(&str, &str)> = cli
        .params
        .iter()
        .map(|p| p.split_once('=').context("--param takes KEY=VALUE"))
        .collect::<anyhow::Result<_>>()?;
    let m = Mesh::start(&t, "reg", &refs, &params, &[])?;
    let setup = t0.elapsed();
    let routes = m
        .wait_routes(Duration::from_secs(180))
        .with_context(|| format!("{n} nodes did not converge"))?;
    // Pings: every pair up to 20 nodes, else a sample.
    let ping_start = Instant::now();
    let mut check: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect();
    if n > 20 {
        rng.shuffle(&mut check);
        check.truncate(cli.pairs.max(1));
    }
    let mut failing = check.clone();
    while !failing.is_empty() {
        cleanup::check_interrupt()?;
        if ping_start.elapsed() > Duration::from_secs(60) {
            bail!(
                "{n} nodes: {} of {} pairs still do not ping",
                failing.len(),
                check.len()
            );
        }
        failing.retain(|&(i, j)| !m.ping(i, j, 1));
    }
    println!(
        "{n} nodes: routes between every pair {:.1} s after the daemons started; {} pairs pinging {:.1} s later (namespaces + enrolment took {:.1} s)",
        routes.as_secs_f64(),
        check.len(),
        ping_start.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
    // Let RTT estimates and the tunnel set settle.
    cleanup::sleep(Duration::from_secs(15))?;

    let mut rss = Vec::new();
    let mut anon = Vec::new();
    let mut tunnels = Vec::new();
    for (i, node) in m.nodes.iter().enumerate() {
        if let Some(p) = &node.process {
            if let Some(kib) = rss_kib(p.pid()) {
                rss.push(kib as f64 / 1024.0);
            }
            if let Some(kib) = status_kib(p.pid(), "RssAnon:") {
                anon.push(kib as f64 / 1024.0);
            }
        }
        let tn = m
            .ctl(i, "/status")
            .ok()
            .and_then(|v| v["tunnels"].as_u64())
            .unwrap_or(0);
        tunnels.push(tn as f64);
    }
    let max_rss = max(&rss);
    println!(
        "  RSS per node: median {:.1} MiB, max {max_rss:.1} MiB (private/anonymous: median {:.1} MiB; the rest is the binary's shared pages); tunnels per node: median {:.0}, max {:.0}",
        median(&mut rss.clone()),
        median(&mut anon.clone()),
        median(&mut tunnels.clone()),
        max(&tunnels)
    );

    let best = best_rtt(&delay, &broken);
    let mut stretch = Vec::new();
    let mut worst = Vec::new();
    let mut sampled = 0;
    while sampled < cli.pairs.min(n * (n - 1)) {
        cleanup::check_interrupt()?;
        let (a, b) = (rng.usize(0..n), rng.usize(0..n));
        if a == b {
            continue;
        }
        sampled += 1;
        let st = ping(m.host(a)?, m.address(b), 5, Duration::from_millis(20))?;
        if let Some(min) = st.min {
            let ms = min.as_secs_f64() * 1000.0;
            stretch.push(ms / best[a][b]);
            worst.push((ms / best[a][b], a, b, ms));
        }
    }
    worst.sort_by(|x, y| y.0.total_cmp(&x.0));
    for &(s, a, b, ms) in worst.iter().take(3) {
        let path = m.path(a, b).unwrap_or_default();
        let back = m.path(b, a).unwrap_or_default();
        let hops = |p: &[usize]| {
            p.iter()
                .map(|i| names[*i].clone())
                .collect::<Vec<_>>()
                .join(">")
        };
        let cost = |p: &[usize]| p.windows(2).map(|w| delay[w[0]][w[1]]).sum::<u64>();
        println!(
            "    worst: {}->{} stretch {s:.2}: {ms:.1} ms vs best {:.0} ms; path {} ({} ms one way), back {} ({} ms)",
            names[a], names[b], best[a][b], hops(&path), cost(&path), hops(&back), cost(&back)
        );
    }
    println!(
        "  path stretch over {} pairs (min RTT of 5 pings / best RTT through any relays): median {:.3}, p95 {:.3}",
        stretch.len(),
        median(&mut stretch.clone()),
        p95(&mut stretch)
    );

    let mut windows = Vec::new();
    let mut tries = 0;
    while windows.len() < cli.failures && tries < cli.failures * 4 {
        tries += 1;
        let (a, b) = (rng.usize(0..n), rng.usize(0..n));
        if a == b {
            continue;
        }
        let Some(path) = m.path(a, b) else { continue };
        if path.len() < 2 {
            continue;
        }
        let (x, y) = (path[0], path[1]);
        let probe = m.loss_probe(a, b, Duration::from_millis(10))?;
        cleanup::sleep(Duration::from_secs(1))?;
        m.net.wan()?.blackhole(&names[x], &names[y])?;
        cleanup::sleep(Duration::from_secs(5))?;
        let r = probe.stop(Duration::from_millis(300));
        m.net.wan()?.heal(&names[x], &names[y])?;
        if r.received == 0 {
            continue;
        }
        windows.push(r.longest_gap.as_secs_f64() * 1000.0);
        // Let the healed path come back before the next one.
        cleanup::sleep(Duration::from_secs(5))?;
    }
    if windows.is_empty() {
        bail!("no silent failure could be measured");
    }
    println!(
        "  loss window after a silent failure of the first hop in use ({} runs, 10 ms probes): median {:.0} ms, max {:.0} ms",
        windows.len(),
        median(&mut windows.clone()),
        max(&windows)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cleanup::install_interrupt_handler()?;
    for &n in &cli.nodes {
        if !(2..=200).contains(&n) {
            bail!("--nodes: {n} is not 2..=200");
        }
        run(&cli, n)?;
    }
    Ok(())
}
