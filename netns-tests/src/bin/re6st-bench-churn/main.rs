//! `re6st-bench-churn`: how a whole re6stnet mesh lives through trouble
//! (figures for the routing issue, never assertions): a daemon killed with
//! SIGKILL and started again (`--scenario sigkill`), and an Internet whose
//! delays and broken paths keep changing (`--scenario churn`).
//!
//! Both build the mesh benchmark's random Internet (same seed, same matrix
//! as `re6st-bench-mesh` for the same size) and wait for full reachability
//! first.

mod churn;
mod logs;
mod sigkill;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use netns_tests::cleanup;
use netns_tests::mesh::{random_topology, Matrix, Mesh};
use netns_tests::stats::loadavg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Kill one daemon (SIGKILL), start it again, time the way back.
    Sigkill,
    /// Move delays and break/heal paths while loss probes run.
    Churn,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Crash-restart and Internet-churn benchmark of a re6stnet mesh in network namespaces (as root)"
)]
struct Cli {
    /// What to measure.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Mesh size.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Seed of the latency matrix, broken paths and every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of broken direct paths.
    #[arg(long, default_value_t = 0.10)]
    broken: f64,
    /// Network parameter for the registry (`KEY=VALUE`, repeatable).
    #[arg(long = "param")]
    params: Vec<String>,
    /// Seconds to wait after convergence before measuring.
    #[arg(long, default_value_t = 10)]
    settle: u64,

    /// sigkill: crash-restarts to measure.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// sigkill: seconds between the kill and the restart.
    #[arg(long, default_value_t = 3.0)]
    down: f64,
    /// sigkill: seconds after the restart before a trial counts as never
    /// recovering.
    #[arg(long, default_value_t = 90)]
    bound: u64,
    /// sigkill: interval of the reachability probes, ms.
    #[arg(long, default_value_t = 100)]
    probe_ms: u64,

    /// churn: seconds of churn.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// churn: seconds between two changes of the Internet.
    #[arg(long, default_value_t = 3.0)]
    every: f64,
    /// churn: node pairs whose delay moves at each change.
    #[arg(long, default_value_t = 20)]
    moves: usize,
    /// churn: direct paths broken, and as many healed, at each change.
    #[arg(long, default_value_t = 2)]
    flips: usize,
    /// churn: pairs probed (10 ms UDP loss-window probes over the overlay).
    #[arg(long, default_value_t = 10)]
    pairs: usize,
    /// churn: seconds of probing without change first (the baseline).
    #[arg(long, default_value_t = 10)]
    control: u64,
}

/// A converged mesh over the mesh benchmark's random Internet.
struct Bench {
    mesh: Mesh,
    matrix: Matrix,
    /// Every later random choice comes from here.
    rng: fastrand::Rng,
}

fn build(cli: &Cli, tag: &str) -> anyhow::Result<Bench> {
    let n = cli.nodes;
    // As re6st-bench-mesh: the same seed gives the same matrix.
    let mut rng = fastrand::Rng::with_seed(cli.seed ^ n as u64);
    let (t, matrix) = random_topology(tag, n, rng.u64(..), 5..=60, cli.broken);
    let refs: Vec<&str> = matrix.names.iter().map(String::as_str).collect();
    let params: Vec<(&str, &str)> = cli
        .params
        .iter()
        .map(|p| p.split_once('=').context("--param takes KEY=VALUE"))
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    let mesh = Mesh::start(&t, "reg", &refs, &params, &[])?;
    let setup = t0.elapsed();
    let took = mesh
        .wait_full_reachability(Duration::from_secs(180))
        .with_context(|| format!("{n} nodes did not converge"))?;
    let broken = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .filter(|&(i, j)| matrix.broken[i][j])
        .count();
    println!(
        "{n} nodes (seed {}, {broken} of {} direct paths broken): every pair pings {:.1} s after the daemons started (namespaces + enrolment {:.1} s); load average {}",
        cli.seed,
        n * (n - 1) / 2,
        took.as_secs_f64(),
        setup.as_secs_f64(),
        loadavg()
    );
    cleanup::sleep(Duration::from_secs(cli.settle))?;
    Ok(Bench { mesh, matrix, rng })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cleanup::install_interrupt_handler()?;
    if !(3..=200).contains(&cli.nodes) {
        bail!("--nodes: {} is not 3..=200", cli.nodes);
    }
    match cli.scenario {
        Scenario::Sigkill => sigkill::run(&cli, build(&cli, "bkill")?),
        Scenario::Churn => churn::run(&cli, build(&cli, "bchurn")?),
    }
}
