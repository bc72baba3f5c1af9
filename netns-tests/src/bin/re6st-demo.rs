//! `re6st-demo`: a live re6st-rs mesh on this machine.
//!
//! A registry and N nodes (default 8) in network namespaces over an
//! emulated Internet with a random latency matrix and some direct paths
//! blackholed. Each node is enrolled with `re6st-conf` and runs `re6stnet`.
//! The demo shows the mesh forming, the reachability matrix over the
//! overlay, the path chosen for a sample pair against the broken or slower
//! direct path, then silently breaks a path in use and prints the loss
//! window. `--keep` leaves it running for `re6stctl`; Ctrl-C at any time
//! tears everything down.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use netns_tests::mesh::{random_topology, Matrix, Mesh};
use netns_tests::orch::{copy_hosts, copy_nodes, text, CgroupCleanup, Orch};
use netns_tests::probe::{ping, LossProbe};
use netns_tests::{cleanup, Error};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "re6st-rs demo: a registry and re6stnet nodes in network namespaces over an emulated, faulty Internet",
    long_about = None
)]
struct Cli {
    /// Number of nodes (2 to 60).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(2..=60))]
    nodes: u8,
    /// Leave the mesh running after the demo, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Seed of the random latency matrix and broken paths (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Shortest one-way delay between two hosts, in milliseconds.
    #[arg(long, default_value_t = 5)]
    min_delay_ms: u64,
    /// Longest one-way delay between two hosts, in milliseconds.
    #[arg(long, default_value_t = 60)]
    max_delay_ms: u64,
    /// Share of direct node-to-node paths that are broken (blackholed), 0 to 0.5.
    #[arg(long, default_value_t = 0.15)]
    broken: f64,
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

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

fn run_demo(cli: &Cli) -> anyhow::Result<()> {
    if cli.min_delay_ms > cli.max_delay_ms {
        bail!(
            "--min-delay-ms {} is above --max-delay-ms {}",
            cli.min_delay_ms,
            cli.max_delay_ms
        );
    }
    if !(0.0..=0.5).contains(&cli.broken) {
        bail!("--broken must be between 0 and 0.5");
    }
    cleanup::install_interrupt_handler()?;
    let n = usize::from(cli.nodes);
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let (
        topo,
        Matrix {
            names,
            delay,
            broken,
        },
    ) = random_topology(
        "demo",
        n,
        seed,
        cli.min_delay_ms..=cli.max_delay_ms,
        cli.broken,
    );
    let nbroken = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .filter(|&(i, j)| broken[i][j])
        .count();
    println!(
        "re6st-demo: a registry and {n} re6stnet nodes over an emulated Internet (seed {seed})"
    );
    println!(
        "  one-way delays {}..{} ms between nodes; {nbroken} of {} direct paths broken (blackholed)",
        cli.min_delay_ms,
        cli.max_delay_ms,
        n * (n - 1) / 2
    );
    println!("building namespaces, starting the registry, enrolling the nodes (re6st-conf)...");
    let t0 = Instant::now();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let m = Mesh::start(&topo, "reg", &names_ref, &[], &[])?;
    println!("  registry {}  (database {})", m.url, m.db.display());
    for (i, node) in m.nodes.iter().enumerate() {
        let h = m.host(i)?;
        println!(
            "  {:<4} netns {:<26} underlay {:<14} prefix {:<22} joined",
            node.name,
            h.ns(),
            h.addr(false)?.to_string(),
            node.prefix
        );
    }

    println!("\nre6stnet started on every node; the mesh forms (tunnels, Babel routes):");
    let started = Instant::now();
    let want = n * (n - 1);
    let mut last = usize::MAX;
    loop {
        cleanup::check_interrupt()?;
        let routes: usize = (0..n)
            .map(|i| {
                let have = m.routes(i);
                m.nodes
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| *j != i && have.contains(&o.prefix))
                    .count()
            })
            .sum();
        let tunnels: usize = (0..n)
            .map(|i| {
                m.ctl(i, "/status")
                    .ok()
                    .and_then(|v| v["tunnels_up"].as_u64())
                    .unwrap_or(0) as usize
            })
            .sum::<usize>()
            / 2;
        if routes != last {
            println!(
                "  {:>5.1} s  tunnels up {tunnels:>3}   routes learned {routes:>4}/{want}",
                started.elapsed().as_secs_f64()
            );
            last = routes;
        }
        if routes == want {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the mesh did not converge in 120 s (logs in {})",
                m.net.log_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "  every node routes to every other one {:.1} s after start ({:.1} s including set-up)",
        started.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // RTT estimates need a few Hellos to settle before the matrix is fair.
    cleanup::sleep(Duration::from_secs(3))?;
    println!("\nreachability over the overlay (ping RTT in ms between node addresses; x = broken direct path underneath):");
    let rtt = overlay_matrix(&m, n)?;
    let width = 7;
    let header: String = names.iter().map(|h| format!("{h:>width$}")).collect();
    println!("{:<5}{header}", "");
    let mut unreachable = 0;
    for i in 0..n {
        let row: String = (0..n)
            .map(|j| {
                if i == j {
                    return format!("{:>width$}", "-");
                }
                let mark = if broken[i][j] { "x" } else { "" };
                match rtt[i][j] {
                    Some(v) => format!("{:>width$}", format!("{v:.0}{mark}")),
                    None => {
                        unreachable += 1;
                        format!("{:>width$}", "LOST")
                    }
                }
            })
            .collect();
        println!("{:<5}{row}", names[i]);
    }
    println!(
        "  {} of {} pairs reachable",
        n * (n - 1) - unreachable,
        n * (n - 1)
    );

    // The sample pair: a broken direct path if any, else the pair whose
    // overlay path is the best improvement over the direct one.
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect();
    let (a, b) = pairs
        .iter()
        .copied()
        .find(|&(i, j)| broken[i][j] && rtt[i][j].is_some())
        .or_else(|| {
            pairs.iter().copied().max_by(|&(i, j), &(k, l)| {
                let gain =
                    |i: usize, j: usize| 2.0 * delay[i][j] as f64 - rtt[i][j].unwrap_or(f64::MAX);
                gain(i, j).total_cmp(&gain(k, l))
            })
        })
        .context("no pair")?;
    let show_path = |p: &Option<Vec<usize>>| {
        p.as_ref().map_or("(no route)".to_string(), |p| {
            p.iter()
                .map(|i| names[*i].as_str())
                .collect::<Vec<_>>()
                .join(" -> ")
        })
    };
    let path = m.path(a, b);
    let (ha, hb) = (m.host(a)?, m.host(b)?);
    let over = ping(ha, m.address(b), 5, Duration::from_millis(100))?;
    let direct = ping(ha, hb.addr(false)?, 3, Duration::from_millis(100))?;
    println!("\nsample pair {} -> {}:", names[a], names[b]);
    println!(
        "  direct Internet path: {}",
        if direct.received == 0 {
            "BROKEN (no reply)".to_string()
        } else {
            format!("RTT {}", ms(direct.avg))
        }
    );
    println!(
        "  overlay path chosen:  {}   RTT {}",
        show_path(&path),
        ms(over.avg)
    );

    // Break a path in use, silently: the first hop of the sample path
    // whose loss still leaves a way through the Internet.
    let Some(p) = path.filter(|p| p.len() >= 2) else {
        bail!("no path to break");
    };
    let connected_without = |x: usize, y: usize| {
        let mut seen = vec![false; n];
        let mut todo = vec![a];
        seen[a] = true;
        while let Some(i) = todo.pop() {
            for j in 0..n {
                let cut = (i, j) == (x, y) || (i, j) == (y, x);
                if !seen[j] && i != j && !broken[i][j] && !cut {
                    seen[j] = true;
                    todo.push(j);
                }
            }
        }
        seen[b]
    };
    match p
        .windows(2)
        .map(|w| (w[0], w[1]))
        .find(|&(x, y)| connected_without(x, y))
    {
        None => println!(
            "\nno silent break shown: every Internet path under {} is the only way left",
            show_path(&Some(p.clone()))
        ),
        Some((x, y)) => {
            println!(
                "\nbreaking the Internet path {} <-> {} silently (the emulator drops everything; no link goes down)...",
                names[x], names[y]
            );
            let probe = LossProbe::start(ha, hb, m.address(b), Duration::from_millis(10))?;
            cleanup::sleep(Duration::from_secs(1))?;
            m.net.wan()?.blackhole(&names[x], &names[y])?;
            cleanup::sleep(Duration::from_secs(6))?;
            let r = probe.stop(Duration::from_millis(500));
            let after = ping(ha, m.address(b), 5, Duration::from_millis(100))?;
            println!(
                "  10 ms probe {} -> {}: {} sent, {} lost; loss window {:.0} ms",
                names[a],
                names[b],
                r.sent,
                r.lost,
                r.longest_gap.as_secs_f64() * 1000.0
            );
            println!(
                "  new path: {}   RTT {}",
                show_path(&m.path(a, b)),
                ms(after.avg)
            );
        }
    }

    let m = orchestration_part(m)?;

    if cli.keep {
        println!("\nthe mesh stays up; explore it, e.g.:");
        let re6stctl = netns_tests::binary("re6stctl")?;
        for what in ["status", "tunnels", "neighbours", "routes"] {
            println!(
                "  {} --socket {} {what}",
                re6stctl.display(),
                m.nodes[a].ctl.display()
            );
        }
        println!("  ip netns exec {} ping {}", m.host(a)?.ns(), m.address(b));
        println!("  logs: {}", m.net.log_dir().display());
        println!("press Ctrl-C to tear it down.");
        loop {
            cleanup::sleep(Duration::from_secs(3600))?;
        }
    }
    println!("\ndone; tearing down.");
    Ok(())
}

/// The site of node `i` in the demo: four sites, the nodes dealt round.
fn site(i: usize) -> String {
    format!("site-{}", char::from(b'a' + (i % 4) as u8))
}

/// Orchestration over the mesh: a master on the first node, an agent on
/// every node (sites dealt round), `kv` with 3 copies on 3 sites and a value
/// written to one; then a whole site cut off from the Internet: the value
/// is still read through the master's node, and the lost copy is re-placed
/// on the fourth site with the data. Returns the mesh.
fn orchestration_part(m: Mesh) -> anyhow::Result<Mesh> {
    const TIMEOUT_S: u64 = 10;
    let n = m.nodes.len();
    if n < 5 {
        println!("\n(orchestration part skipped: it needs 5 nodes or more for 4 sites)");
        return Ok(m);
    }
    let _cleanup = CgroupCleanup(0);
    let o = Orch::new(m, 0)?;
    let names: Vec<String> = o.m.nodes.iter().map(|x| x.name.clone()).collect();
    println!(
        "\norchestration: a master on {} (agent timeout {TIMEOUT_S} s), an agent on every node; sites:",
        names[0]
    );
    for s in 0..4 {
        let members: Vec<&str> = (0..n)
            .filter(|i| i % 4 == s)
            .map(|i| names[i].as_str())
            .collect();
        println!("  {}: {}", site(s), members.join(" "));
    }
    let _master = o.master_with(&["--agent-timeout", &TIMEOUT_S.to_string()])?;
    let mut agents = Vec::new();
    for i in 0..n {
        agents.push(o.agent(i, &site(i))?);
    }
    netns_tests::probe::wait_until(
        "every agent registered",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let out = o.cli(0, &["nodes"]).ok()?;
            (text(&out).lines().count() == n).then_some(())
        },
    )?;
    let started = Instant::now();
    let out = o.cli(
        0,
        &[
            "request",
            "kv",
            "demo",
            "--copies",
            "3",
            "--wait",
            "--timeout",
            "60",
        ],
    )?;
    if !out.status.success() {
        bail!("request kv --copies 3: {}", text(&out));
    }
    let placed = copy_nodes(&text(&out));
    let hosts = copy_hosts(&text(&out));
    println!(
        "  re6st-orch request kv demo --copies 3: ready after {:.1} s on {}",
        started.elapsed().as_secs_f64(),
        placed
            .iter()
            .map(|p| format!("{p} ({})", site(o.m.index(p).unwrap_or(0))))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let first = placed.first().context("no copy placed")?;
    let put = o.http(
        0,
        &hosts[first],
        "8090",
        "PUT /greeting HTTP/1.0\\r\\nContent-Length: 5\\r\\n\\r\\nhello",
    );
    if !put.contains(" 204") {
        bail!("PUT on {first}: {put:?}");
    }
    let get = "GET /greeting HTTP/1.0\\r\\n\\r\\n";
    let (_, took) = netns_tests::probe::wait_until(
        "the value on every copy",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            placed
                .iter()
                .all(|p| o.http(0, &hosts[p], "8090", get).ends_with("hello"))
                .then_some(())
        },
    )?;
    println!(
        "  PUT /greeting = hello on the copy on {first}: on every copy after {:.1} s",
        took.as_secs_f64()
    );

    // Cut off the site of a copy (not the master's) from the Internet.
    let victim = placed
        .iter()
        .map(|p| o.m.index(p))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|i| i % 4 != 0)
        .context("every copy is on the master's site")?;
    let lost_site = victim % 4;
    let cut: Vec<usize> = (0..n).filter(|i| i % 4 == lost_site).collect();
    println!(
        "  cutting {} ({}) off the Internet...",
        site(lost_site),
        cut.iter()
            .map(|i| names[*i].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let wan = o.m.net.wan()?;
    for i in &cut {
        for other in names.iter().map(String::as_str).chain(["reg"]) {
            if other != names[*i] {
                wan.blackhole(&names[*i], other)?;
            }
        }
    }
    let survivors: Vec<&String> = placed.iter().filter(|p| **p != names[victim]).collect();
    for p in &survivors {
        let answer = netns_tests::probe::wait_until(
            "an answer",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                o.http(0, &hosts[*p], "8090", get)
                    .ends_with("hello")
                    .then_some(())
            },
        );
        println!(
            "  GET /greeting from {} on the copy on {p}: {}",
            names[0],
            match answer {
                Ok((_, t)) => format!("hello ({:.1} s after the cut)", t.as_secs_f64()),
                Err(_) => "NO ANSWER within 10 s".to_string(),
            }
        );
    }
    let (now_on, took) = netns_tests::probe::wait_until(
        "the lost copy re-placed and ready",
        Duration::from_secs(TIMEOUT_S + 40),
        Duration::from_millis(300),
        || {
            let out = o.cli(0, &["request", "kv", "demo", "--copies", "3"]).ok()?;
            let t = text(&out);
            let nodes = copy_nodes(&t);
            (t.contains(": ready") && nodes.len() == 3 && !nodes.contains(&names[victim]))
                .then_some(copy_hosts(&t))
        },
    )?;
    let new = now_on
        .keys()
        .find(|k| !placed.contains(k))
        .cloned()
        .unwrap_or_default();
    let served = netns_tests::probe::wait_until(
        "the new copy serving the value",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            o.http(0, &now_on[&new], "8090", get)
                .ends_with("hello")
                .then_some(())
        },
    )
    .is_ok();
    println!(
        "  the copy on {} re-placed on {new} ({}) and ready {:.1} s after the cut; it serves greeting = {}",
        names[victim],
        site(o.m.index(&new).unwrap_or(0)),
        took.as_secs_f64(),
        if served { "hello" } else { "NOTHING within 10 s" }
    );
    drop(agents);
    Ok(o.m)
}

/// RTT between every pair of nodes over the overlay (3 pings each, a few
/// pairs at a time).
fn overlay_matrix(m: &Mesh, n: usize) -> anyhow::Result<Vec<Vec<Option<f64>>>> {
    let mut out = vec![vec![None; n]; n];
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect();
    for chunk in pairs.chunks(8) {
        cleanup::check_interrupt()?;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(i, j)| {
                    s.spawn(move || -> anyhow::Result<Option<f64>> {
                        let st = ping(m.host(i)?, m.address(j), 3, Duration::from_millis(50))?;
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
        for (&(i, j), v) in chunk.iter().zip(results) {
            out[i][j] = v;
        }
    }
    Ok(out)
}
