//! `re6st-demo`: the harness demo (until the node daemon exists).
//!
//! Builds N hosts joined by the emulated Internet with a random latency
//! matrix, prints the RTT matrix it measures next to the configured one,
//! breaks one path and shows it unreachable, then heals it. `--keep` leaves
//! the network up for exploring until Ctrl-C. Ctrl-C at any time tears
//! everything down.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use netns_tests::probe::{ping, LossProbe};
use netns_tests::{cleanup, Error, LinkParams, Net, Topology};

#[derive(Parser, Debug)]
#[command(version, about = "re6st-rs demo: hosts in network namespaces over an emulated, faulty Internet", long_about = None)]
struct Cli {
    /// Number of hosts (2 to 26).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(2..=26))]
    nodes: u8,
    /// Leave the network running after the demo, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Seed of the random latency matrix (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Shortest one-way delay between two hosts, in milliseconds.
    #[arg(long, default_value_t = 5)]
    min_delay_ms: u64,
    /// Longest one-way delay between two hosts, in milliseconds.
    #[arg(long, default_value_t = 60)]
    max_delay_ms: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Remove namespaces (and the processes inside) left by crashed runs of
    /// the demo or the tests: those whose building process is gone.
    Cleanup {
        /// Remove every harness namespace, even of runs still alive.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Cleanup { all }) => run_cleanup(all),
        None => run_demo(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref::<Error>(), Some(Error::Interrupted)) => {
            eprintln!("re6st-demo: interrupted; everything was removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("re6st-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_cleanup(all: bool) -> anyhow::Result<()> {
    let removed = cleanup::remove_leftovers(all).context("removing leftover namespaces")?;
    if removed.is_empty() {
        println!("nothing to clean up");
    }
    for ns in removed {
        println!("removed {ns}");
    }
    Ok(())
}

fn host_name(i: usize) -> String {
    format!("n{}", i + 1)
}

fn run_demo(cli: &Cli) -> anyhow::Result<()> {
    if cli.min_delay_ms > cli.max_delay_ms {
        bail!(
            "--min-delay-ms {} is above --max-delay-ms {}",
            cli.min_delay_ms,
            cli.max_delay_ms
        );
    }
    cleanup::install_interrupt_handler()?;
    let n = usize::from(cli.nodes);
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let names: Vec<String> = (0..n).map(host_name).collect();

    let mut delay = vec![vec![0u64; n]; n];
    let mut topo = Topology::new("demo");
    for name in &names {
        topo.host(name);
    }
    for i in 0..n {
        for j in i + 1..n {
            let d = rng.u64(cli.min_delay_ms..=cli.max_delay_ms);
            delay[i][j] = d;
            delay[j][i] = d;
            topo.wan_both(&names[i], &names[j], LinkParams::delay_ms(d));
        }
    }

    println!("re6st-demo: {n} hosts over an emulated Internet (seed {seed})");
    println!("building namespaces and the WAN emulator...");
    let net = Net::build(&topo)?;
    for h in net.hosts() {
        println!(
            "  {:<4} netns {:<28} {} {}",
            h.name(),
            h.ns(),
            h.addr(false)?,
            h.addr(true)?
        );
    }

    println!("\nmeasuring the RTT of every pair (ping, 5 x 50 ms)...");
    let measured = measure_matrix(&net, &names)?;
    print_matrices(&names, &delay, &measured);

    let (a, b) = (&names[0], &names[1]);
    let (ha, hb) = (net.host(a)?, net.host(b)?);
    let dst = hb.addr(false)?;
    println!("\nbreaking the direct path {a} <-> {b} (blackhole, both directions)...");
    let probe = LossProbe::start(ha, hb, dst, Duration::from_millis(10))?;
    cleanup::sleep(Duration::from_millis(300))?;
    net.wan()?.blackhole(a, b)?;
    let s = ping(ha, dst, 5, Duration::from_millis(100))?;
    println!(
        "  ping {a} -> {b}: {}/{} replies{}",
        s.received,
        s.sent,
        if s.received == 0 {
            "  => unreachable"
        } else {
            ""
        }
    );
    let c = net.wan()?.counters(a, b)?;
    println!("  emulator {a}->{b}: {} packets blackholed", c.blackholed);
    println!("healing {a} <-> {b}...");
    net.wan()?.heal(a, b)?;
    let s = ping(ha, dst, 5, Duration::from_millis(100))?;
    println!(
        "  ping {a} -> {b}: {}/{} replies, avg RTT {} (configured {} ms)",
        s.received,
        s.sent,
        fmt_ms(s.avg),
        2 * delay[0][1]
    );
    cleanup::sleep(Duration::from_millis(300))?;
    let r = probe.stop(Duration::from_millis(300));
    println!(
        "  10 ms probe over the whole break: {} sent, {} lost, longest gap {:.0} ms",
        r.sent,
        r.lost,
        r.longest_gap.as_secs_f64() * 1000.0
    );
    if s.received == 0 {
        bail!("{a} -> {b} did not recover after heal");
    }

    if cli.keep {
        println!("\nthe network stays up; explore it, e.g.:");
        println!("  ip netns exec {} ping {}", ha.ns(), dst);
        println!("  ip netns exec {} bash", ha.ns());
        println!("press Ctrl-C to tear it down.");
        loop {
            cleanup::sleep(Duration::from_secs(3600))?;
        }
    }
    println!("\ndone; tearing down.");
    Ok(())
}

fn measure_matrix(net: &Net, names: &[String]) -> anyhow::Result<Vec<Vec<Option<f64>>>> {
    let n = names.len();
    let mut out = vec![vec![None; n]; n];
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect();
    // A few pings at a time: enough to be quick, few enough not to load the machine.
    for chunk in pairs.chunks(4) {
        cleanup::check_interrupt()?;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(i, j)| {
                    s.spawn(move || -> anyhow::Result<Option<f64>> {
                        let dst = net.host(&names[j])?.addr(false)?;
                        let st = ping(net.host(&names[i])?, dst, 5, Duration::from_millis(50))?;
                        Ok(st.avg.map(|d| d.as_secs_f64() * 1000.0))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("ping thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        for (&(i, j), rtt) in chunk.iter().zip(results) {
            out[i][j] = rtt;
            out[j][i] = rtt;
        }
    }
    Ok(out)
}

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

fn print_matrices(names: &[String], delay: &[Vec<u64>], measured: &[Vec<Option<f64>>]) {
    let n = names.len();
    let width = 7;
    let header: String = names.iter().map(|h| format!("{h:>width$}")).collect();
    let left = 5 + width * n;
    println!("\n{:<left$}   | measured RTT (ms)", "configured RTT (ms)");
    println!("{:<5}{header}   | {:<5}{header}", "", "");
    let mut worst: f64 = 0.0;
    for i in 0..n {
        let conf: String = (0..n)
            .map(|j| {
                if i == j {
                    format!("{:>width$}", "-")
                } else {
                    format!("{:>width$}", 2 * delay[i][j])
                }
            })
            .collect();
        let meas: String = (0..n)
            .map(|j| match (i == j, measured[i][j]) {
                (true, _) => format!("{:>width$}", "-"),
                (false, Some(v)) => {
                    worst = worst.max((v - 2.0 * delay[i][j] as f64).abs());
                    format!("{v:>width$.1}")
                }
                (false, None) => format!("{:>width$}", "lost"),
            })
            .collect();
        println!("{:<5}{conf}   | {:<5}{meas}", names[i], names[i]);
    }
    println!("largest difference between measured and configured RTT: {worst:.2} ms");
}
