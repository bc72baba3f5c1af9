//! `re6st-bench-babel`: babeld and re6st-babeld side by side on the
//! 4-namespace square of `shared/anchors/babeld-square.sh` (a-b-d and
//! a-c-d over direct veths, stubs fd00:5X::1 on lo).
//!
//! Per run: convergence (daemons started -> first answered 10 ms probe
//! a->d), the loss window of a silent failure of the link a uses
//! (nftables drop on both ends; longest gap between answered probes and
//! probes lost), and the RSS of each daemon after convergence.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use netns_tests::babel::{babeld, ours, route_dev, rss_kib, stub};
use netns_tests::probe::LossProbe;
use netns_tests::{cleanup, Net, Process, Topology};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "babeld vs re6st-babeld on the square: convergence, silent-failure loss window, RSS"
)]
struct Cli {
    /// Runs per profile.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Profiles: babeld1 (babeld, type tunnel, hello 1 s), ours1 (hello
    /// 1 s), ours300 (hello 300 ms, our default).
    #[arg(long, value_delimiter = ',', default_value = "babeld1,ours1,ours300")]
    profiles: Vec<String>,
}

struct Run {
    conv_ms: f64,
    gap_ms: f64,
    lost: u64,
    rss_kib: u64,
}

fn one(profile: &str) -> anyhow::Result<Run> {
    let mut t = Topology::new("bbench");
    for h in ["a", "b", "c", "d"] {
        t.host_offline(h);
    }
    t.link("a", "b")
        .link("b", "d")
        .link("a", "c")
        .link("c", "d");
    let net = Net::build(&t)?;
    let hosts = [
        ("a", ["to-b", "to-c"], "fd00:5a::1"),
        ("b", ["to-a", "to-d"], "fd00:5b::1"),
        ("c", ["to-a", "to-d"], "fd00:5c::1"),
        ("d", ["to-b", "to-c"], "fd00:5d::1"),
    ];
    for (h, _, s) in &hosts {
        stub(net.host(h)?, s)?;
    }
    let (a, d) = (net.host("a")?, net.host("d")?);
    let dst = "fd00:5d::1".parse().context("address")?;
    let probe = LossProbe::start(a, d, dst, Duration::from_millis(10))?;
    let t0 = Instant::now();
    let mut procs: Vec<Process> = Vec::new();
    for (h, ifs, s) in &hosts {
        let host = net.host(h)?;
        procs.push(match profile {
            "babeld1" => babeld(host, &net, ifs, "1", &[])?,
            "ours1" => ours(host, ifs, s, &["--hello-interval", "1000"])?,
            "ours300" => ours(host, ifs, s, &["--hello-interval", "300"])?,
            other => bail!("unknown profile {other:?}"),
        });
    }
    let deadline = t0 + Duration::from_secs(60);
    let conv = loop {
        cleanup::sleep(Duration::from_millis(20))?;
        if let Some(f) = probe.snapshot().first_answered {
            break f;
        }
        if Instant::now() > deadline {
            bail!("{profile}: no convergence in 60 s");
        }
    };
    drop(probe);
    cleanup::sleep(Duration::from_secs(3))?;
    let rss = procs
        .iter()
        .filter_map(|p| rss_kib(p.pid()))
        .max()
        .unwrap_or(0);
    let dev = route_dev(a, "fd00:5d::1", "fd00:5a::1").context("no route a->d")?;
    let (peer, peer_if) = if dev == "to-b" {
        ("b", "to-a")
    } else {
        ("c", "to-a")
    };
    let probe = LossProbe::start(a, d, dst, Duration::from_millis(10))?;
    cleanup::sleep(Duration::from_millis(500))?;
    a.block_ingress(&dev)?;
    net.host(peer)?.block_ingress(peer_if)?;
    cleanup::sleep(Duration::from_secs(if profile == "babeld1" {
        10
    } else {
        5
    }))?;
    let r = probe.stop(Duration::from_millis(300));
    Ok(Run {
        conv_ms: conv.as_secs_f64() * 1000.0,
        gap_ms: r.longest_gap.as_secs_f64() * 1000.0,
        lost: r.lost,
        rss_kib: rss,
    })
}

fn med(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cleanup::install_interrupt_handler() {
        eprintln!("re6st-bench-babel: {e}");
        return ExitCode::FAILURE;
    }
    let mut rows = Vec::new();
    for p in &cli.profiles {
        let mut runs = Vec::new();
        for i in 0..cli.runs.max(1) {
            match one(p) {
                Ok(r) => {
                    eprintln!(
                        "{p} run {}: conv {:.0} ms, gap {:.0} ms, lost {}, rss {} KiB",
                        i + 1,
                        r.conv_ms,
                        r.gap_ms,
                        r.lost,
                        r.rss_kib
                    );
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!("re6st-bench-babel: {p}: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        rows.push((p.clone(), runs));
    }
    println!("| profile | convergence ms median (min-max) | silent-failure gap ms median (min-max) | probes lost (median) | max RSS KiB |");
    println!("|---|---|---|---|---|");
    for (p, runs) in rows {
        let (cm, clo, chi) = med(runs.iter().map(|r| r.conv_ms).collect());
        let (gm, glo, ghi) = med(runs.iter().map(|r| r.gap_ms).collect());
        let (lm, _, _) = med(runs.iter().map(|r| r.lost as f64).collect());
        let rss = runs.iter().map(|r| r.rss_kib).max().unwrap_or(0);
        println!(
            "| {p} | {cm:.0} ({clo:.0}-{chi:.0}) | {gm:.0} ({glo:.0}-{ghi:.0}) | {lm:.0} | {rss} |"
        );
    }
    ExitCode::SUCCESS
}
