//! `re6st-bench-idle`: what an idle mesh costs per daemon.
//!
//! Starts a registry and N nodes over the emulated Internet (one-way delays
//! 5–60 ms, a share of direct paths blackholed, as `re6st-bench-mesh`),
//! waits until every node routes to every other one (at most `--settle`
//! seconds, and always that long, so the measure starts in steady state),
//! then reads every daemon's `/proc` and control API at the start and end
//! of `--measure` seconds: CPU (utime + stime of all threads), context
//! switches (voluntary + non-voluntary over all threads: the wake-ups),
//! Babel packets (metrics), and at the end thread count, RSS and tunnels.
//! Figures per tunnel end divide a node's rate by its own tunnel count.
//!
//! `--bin-dir DIR` runs the re6stnet, re6st-conf and re6st-registry of
//! another build, so two builds can be compared in one shell line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use netns_tests::babel::rss_kib;
use netns_tests::mesh::{random_topology, Mesh};
use netns_tests::stats::{median, p95};
use netns_tests::{cleanup, process, wan};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Idle cost per re6stnet daemon of a mesh in network namespaces (as root)"
)]
struct Cli {
    /// Nodes in the mesh.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Seconds from the daemons' start to the measure (the wait for routes
    /// between every pair stops there too).
    #[arg(long, default_value_t = 30)]
    settle: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 60)]
    measure: u64,
    /// Directory holding the re6stnet, re6st-conf and re6st-registry to
    /// run (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seed of the latency matrix and broken paths.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of broken direct paths.
    #[arg(long, default_value_t = 0.10)]
    broken: f64,
    /// Network parameter for the registry (`KEY=VALUE`, repeatable).
    #[arg(long = "param")]
    params: Vec<String>,
}

/// Cumulative counters of one daemon at one instant.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    cpu: Duration,
    switches: u64,
    babel: Option<u64>,
}

/// A field of a `/proc/.../status` file, as a number.
fn status_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Voluntary + non-voluntary context switches summed over the threads of
/// `pid` (threads that ended are not counted).
fn switches(pid: u32) -> anyhow::Result<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?;
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status_field(&text, "voluntary_ctxt_switches:").unwrap_or(0)
            + status_field(&text, "nonvoluntary_ctxt_switches:").unwrap_or(0);
    }
    Ok(total)
}

/// Babel packets in + out from a Prometheus text page of the daemon.
fn babel_packets(metrics: &str) -> Option<u64> {
    let values: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("re6st_babel_packets_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn sample(m: &Mesh, i: usize) -> anyhow::Result<Sample> {
    let pid = m
        .pid(i)
        .with_context(|| format!("{} is not running", m.nodes[i].name))?;
    let cpu = process::cpu_time(pid).with_context(|| format!("CPU time of {pid}"))?;
    let babel = re6stnet::ctl::fetch(&m.nodes[i].ctl, "/metrics")
        .ok()
        .and_then(|t| babel_packets(&t));
    Ok(Sample {
        at: Instant::now(),
        cpu,
        switches: switches(pid)?,
        babel,
    })
}

/// One daemon's figures over the window.
#[derive(Debug)]
struct Figures {
    cpu_ms_s: f64,
    switches_s: f64,
    babel_s: Option<f64>,
    threads: f64,
    rss_mib: f64,
    tunnels: f64,
}

fn figures(m: &Mesh, i: usize, a: Sample, b: Sample) -> anyhow::Result<Figures> {
    let pid = m.pid(i).context("daemon gone")?;
    let secs = (b.at - a.at).as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let tunnels = m
        .ctl(i, "/status")
        .ok()
        .and_then(|v| v["tunnels"].as_u64())
        .unwrap_or(0);
    Ok(Figures {
        cpu_ms_s: b.cpu.saturating_sub(a.cpu).as_secs_f64() * 1000.0 / secs,
        switches_s: b.switches.saturating_sub(a.switches) as f64 / secs,
        babel_s: a
            .babel
            .zip(b.babel)
            .map(|(x, y)| y.saturating_sub(x) as f64 / secs),
        threads: status_field(&status, "Threads:").unwrap_or(0) as f64,
        rss_mib: rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
        tunnels: tunnels as f64,
    })
}

fn row(name: &str, mut v: Vec<f64>) {
    if v.is_empty() {
        println!("| {name} | - | - |");
        return;
    }
    let med = median(&mut v);
    println!("| {name} | {med:.2} | {:.2} |", p95(&mut v));
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if !(2..=200).contains(&cli.nodes) {
        bail!("--nodes: {} is not 2..=200", cli.nodes);
    }
    if cli.measure == 0 {
        bail!("--measure must be at least 1 s");
    }
    if let Some(dir) = &cli.bin_dir {
        netns_tests::set_binary_dir(dir.clone());
    }
    let bin = netns_tests::binary("re6stnet")?;
    let n = cli.nodes;
    let (t, matrix) = random_topology("bidle", n, cli.seed, 5..=60, cli.broken);
    let refs: Vec<&str> = matrix.names.iter().map(String::as_str).collect();
    let params: Vec<(&str, &str)> = cli
        .params
        .iter()
        .map(|p| p.split_once('=').context("--param takes KEY=VALUE"))
        .collect::<anyhow::Result<_>>()?;
    let m = Mesh::start(&t, "reg", &refs, &params, &[])?;
    let started = Instant::now();
    let settle = Duration::from_secs(cli.settle);
    let routes = match m.wait_routes(settle) {
        Ok(d) => format!("routes between every pair after {:.1} s", d.as_secs_f64()),
        Err(_) => format!("NOT every pair routed after {} s", cli.settle),
    };
    cleanup::sleep(settle.saturating_sub(started.elapsed()))?;

    let wan = m.net.wan()?;
    let lat0 = wan.lateness();
    let emu0 = wan::cpu_time()?;
    let t0 = Instant::now();
    let first = (0..n)
        .map(|i| sample(&m, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    cleanup::sleep(Duration::from_secs(cli.measure))?;
    let last = (0..n)
        .map(|i| sample(&m, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let emu_cores =
        wan::cpu_time()?.saturating_sub(emu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let routed = m.wait_routes(Duration::from_secs(5)).is_ok();
    let (stale, links) = sessions(&m);
    let lateness = wan.lateness().since(&lat0);
    let figs = (0..n)
        .map(|i| figures(&m, i, first[i], last[i]))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let col = |f: &dyn Fn(&Figures) -> Option<f64>| figs.iter().filter_map(f).collect::<Vec<_>>();
    let per_end = |f: &dyn Fn(&Figures) -> f64| {
        col(&|x: &Figures| (x.tunnels > 0.0).then(|| f(x) / x.tunnels))
    };
    println!(
        "idle mesh: {n} nodes, {} ({}), measured {} s from {} s after start; re6stnet {}",
        routes,
        if cli.broken > 0.0 {
            format!("{:.0}% of direct paths broken", cli.broken * 100.0)
        } else {
            "no broken paths".into()
        },
        cli.measure,
        cli.settle,
        bin.display()
    );
    println!("| per daemon | median | p95 |");
    println!("|---|---|---|");
    row("CPU ms/s", col(&|f: &Figures| Some(f.cpu_ms_s)));
    row("context switches/s", col(&|f: &Figures| Some(f.switches_s)));
    row("Babel packets/s (in + out)", col(&|f: &Figures| f.babel_s));
    row("threads", col(&|f: &Figures| Some(f.threads)));
    row("RSS MiB", col(&|f: &Figures| Some(f.rss_mib)));
    row("tunnels", col(&|f: &Figures| Some(f.tunnels)));
    row(
        "CPU ms/s per tunnel end",
        per_end(&|f: &Figures| f.cpu_ms_s),
    );
    row(
        "context switches/s per tunnel end",
        per_end(&|f: &Figures| f.switches_s),
    );
    let total_cpu: f64 = figs.iter().map(|f| f.cpu_ms_s).sum::<f64>() / 1000.0;
    let q = |x: f64| {
        lateness
            .quantile_us(x)
            .map_or_else(|| "-".into(), |v| v.to_string())
    };
    let mut cpu = col(&|f: &Figures| Some(f.cpu_ms_s));
    let mut sw = col(&|f: &Figures| Some(f.switches_s));
    let mut tn = col(&|f: &Figures| Some(f.tunnels));
    println!(
        "summary: {n} idle nodes take {total_cpu:.3} cores ({:.2} ms/s and {:.0} switches/s per node, median, at {:.0} tunnels); WAN emulator {emu_cores:.3} cores, release lateness p50 {} µs, p99 {} µs",
        median(&mut cpu),
        median(&mut sw),
        median(&mut tn),
        q(0.5),
        q(0.99)
    );
    println!(
        "at the end: {}; {stale} of {links} tunnels without a WireGuard handshake in the last {} s",
        if routed {
            "every pair routed"
        } else {
            "NOT every pair routed"
        },
        STALE_SESSION.as_secs()
    );
    Ok(())
}

/// A session older than this has expired (WireGuard's REJECT_AFTER_TIME):
/// its rekeys failed.
const STALE_SESSION: Duration = Duration::from_secs(180);

/// Tunnels without a recent handshake, and all tunnels, over the mesh.
fn sessions(m: &Mesh) -> (usize, usize) {
    let mut stale = 0;
    let mut all = 0;
    for i in 0..m.nodes.len() {
        let Ok(v) = m.ctl(i, "/tunnels") else {
            continue;
        };
        for t in v.as_array().into_iter().flatten() {
            all += 1;
            let age = t["since_handshake_s"].as_u64();
            if age.is_none_or(|s| s > STALE_SESSION.as_secs()) {
                stale += 1;
            }
        }
    }
    (stale, all)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cleanup::install_interrupt_handler()?;
    run(&cli)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_and_metrics() {
        let status = "Name:\tre6stnet\nThreads:\t7\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(status_field(status, "Threads:"), Some(7));
        assert_eq!(status_field(status, "voluntary_ctxt_switches:"), Some(120));
        assert_eq!(status_field(status, "VmRSS:"), None);
        let metrics = "# TYPE re6st_babel_packets_total counter\nre6st_babel_packets_total{direction=\"in\"} 10\nre6st_babel_packets_total{direction=\"out\"} 5\nre6st_routes 3\n";
        assert_eq!(babel_packets(metrics), Some(15));
        assert_eq!(babel_packets("re6st_routes 3\n"), None);
    }
}
