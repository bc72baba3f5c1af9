//! `re6st-bench-tunnel`: TCP throughput and ping RTT over a direct veth
//! (MTU 1420 tunnel on top), side by side: the raw veth, boringtun-cli 0.7
//! (if installed, configured with `wg`), our data plane alone (`ours`: two
//! `Plane`s in this process) and two full nodes (`nodes`: registry,
//! `re6st-conf` and `re6stnet` on each end, the tunnel over the veth).
//!
//! Same method as `shared/anchors/dataplane.sh`: iperf3 a -> b over the
//! tunnel's inner IPv6 addresses, receiver-side rate, REPS × DUR seconds.

use std::net::{Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use netns_tests::mesh::Mesh;
use netns_tests::probe::{parse_ping, wait_until};
use netns_tests::{cleanup, process, Host, LinkParams, Net, Process, Topology};
use re6st_registry::config::{random_bytes, x25519_public};
use re6st_tunnel::endpoint::Endpoint;
use re6st_tunnel::plane::Plane;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Data-plane throughput: raw veth, boringtun-cli and re6st-tunnel side by side"
)]
struct Cli {
    /// iperf3 runs per system.
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Systems to run: veth, boringtun, ours, nodes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "veth,boringtun,ours,nodes"
    )]
    systems: Vec<String>,
}

fn receiver_bps(json: &str) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second"))
}

/// Resident memory (KiB) of what a system runs: (idle, peak under load).
type Rss = (u64, u64);

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Sum over `pids` of VmRSS now and VmHWM (peak).
fn rss(pids: &[u32]) -> Rss {
    (
        pids.iter().map(|&p| status_kib(p, "VmRSS:")).sum(),
        pids.iter().map(|&p| status_kib(p, "VmHWM:")).sum(),
    )
}

/// What one system gave: Mbit/s per run, ping RTT (ms), cores per Gbit/s
/// (user + system time of its processes over the runs; NaN without any).
struct Measured {
    rates: Vec<f64>,
    rtt: f64,
    cores_per_gbit: f64,
}

/// CPU time (user + system) of `pids` so far.
fn cpu(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| process::cpu_time(p)).sum()
}

fn measure(a: &Host, b: &Host, dst: &str, cli: &Cli, pids: &[u32]) -> anyhow::Result<Measured> {
    let _server = b.spawn("iperf3", "iperf3", &["-s"])?;
    wait_until(
        "the iperf3 server",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let o = b.output("ss", &["-Hltn", "sport = :5201"]).ok()?;
            (!o.stdout.is_empty()).then_some(())
        },
    )?;
    let ping = a.output("ping", &["-6", "-n", "-q", "-c", "20", "-i", "0.02", dst])?;
    let rtt = parse_ping(&String::from_utf8_lossy(&ping.stdout))?
        .avg
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    let mut rates = Vec::new();
    let secs = cli.duration.to_string();
    let (cpu0, t0) = (cpu(pids), std::time::Instant::now());
    for _ in 0..cli.reps {
        cleanup::check_interrupt()?;
        let mut tries = 0;
        let bps = loop {
            let out = a.output("iperf3", &["-6", "-c", dst, "-t", &secs, "-J"])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("server is busy") && tries < 10 {
                tries += 1;
                cleanup::sleep(Duration::from_millis(500))?;
                continue;
            }
            break receiver_bps(&text)?;
        };
        rates.push(bps / 1e6);
    }
    let cores = cpu(pids).saturating_sub(cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let gbit = rates.iter().sum::<f64>() / rates.len().max(1) as f64 / 1000.0;
    let cores_per_gbit = if pids.is_empty() {
        f64::NAN
    } else {
        cores / gbit
    };
    Ok(Measured {
        rates,
        rtt,
        cores_per_gbit,
    })
}

fn pair() -> anyhow::Result<Net> {
    let mut t = Topology::new("dpbench");
    t.host_offline("a").host_offline("b").link("a", "b");
    Ok(Net::build(&t)?)
}

fn boringtun(net: &Net, cli: &Cli) -> anyhow::Result<(Measured, Rss)> {
    let (a, b) = (net.host("a")?, net.host("b")?);
    let tag = std::process::id() % 10_000;
    let (ia, ib) = (format!("bt{tag}a"), format!("bt{tag}b"));
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| -> anyhow::Result<(String, String)> {
            let s = random_bytes::<32>()?;
            use base64::Engine;
            let e = base64::engine::general_purpose::STANDARD;
            Ok((e.encode(s), e.encode(x25519_public(&s))))
        })
        .collect::<anyhow::Result<_>>()?;
    let dir = net.log_dir().to_path_buf();
    let mut procs: Vec<Process> = Vec::new();
    for (h, i) in [(a, &ia), (b, &ib)] {
        let log = dir.join(format!("{i}.log")).to_string_lossy().into_owned();
        procs.push(h.spawn(
            i,
            "boringtun-cli",
            &["-f", "--disable-drop-privileges", "-t", "4", "-l", &log, i],
        )?);
    }
    for i in [&ia, &ib] {
        let sock = format!("/var/run/wireguard/{i}.sock");
        wait_until(
            "the boringtun UAPI socket",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || std::path::Path::new(&sock).exists().then_some(()),
        )?;
    }
    let ua = a.iface("to-b")?.v6.addr();
    let ub = b.iface("to-a")?.v6.addr();
    for (h, i, me, peer, peer_addr, inner, peer_inner) in [
        (
            a,
            &ia,
            &keys[0],
            &keys[1],
            ub,
            "fd00:d9:3::1",
            "fd00:d9:3::2",
        ),
        (
            b,
            &ib,
            &keys[1],
            &keys[0],
            ua,
            "fd00:d9:3::2",
            "fd00:d9:3::1",
        ),
    ] {
        let keyfile = dir.join(format!("{i}.key"));
        std::fs::write(&keyfile, &me.0)?;
        h.run(
            "wg",
            &[
                "set",
                i,
                "private-key",
                &keyfile.to_string_lossy(),
                "listen-port",
                "51820",
                "peer",
                &peer.1,
                "endpoint",
                &format!("[{peer_addr}]:51820"),
                "allowed-ips",
                &format!("{peer_inner}/128"),
            ],
        )?;
        h.run(
            "ip",
            &["addr", "add", &format!("{inner}/64"), "dev", i, "nodad"],
        )?;
        h.run("ip", &["link", "set", i, "mtu", "1420", "up"])?;
    }
    let pids: Vec<u32> = procs.iter().map(Process::pid).collect();
    cleanup::sleep(Duration::from_secs(1))?;
    let idle = rss(&pids).0;
    let got = measure(a, b, "fd00:d9:3::2", cli, &pids)?;
    let peak = rss(&pids).1;
    drop(procs);
    Ok((got, (idle, peak)))
}

fn ours(net: &Net, cli: &Cli) -> anyhow::Result<(Measured, Rss)> {
    let (a, b) = (net.host("a")?, net.host("b")?);
    let (sa, sb) = (random_bytes::<32>()?, random_bytes::<32>()?);
    let (pa, pb): (ipnet::Ipv6Net, ipnet::Ipv6Net) =
        ("fd5e:0:0:1::/64".parse()?, "fd5e:0:0:2::/64".parse()?);
    let ub = SocketAddr::new(b.iface("to-a")?.v6.addr().into(), 326);
    let start = |h: &Host,
                 secret: [u8; 32],
                 peer,
                 key,
                 ep: Option<SocketAddr>,
                 name: &'static str,
                 ll: Ipv6Addr|
     -> anyhow::Result<Plane> {
        let (tx, _rx) = std::sync::mpsc::channel();
        let r = h.in_ns(move || -> Result<Plane, String> {
            let p = Plane::start(
                "[::]:326".parse().map_err(|_| "addr".to_string())?,
                secret,
                re6st_tunnel::plane::channel_sink(tx),
                (),
            )
            .map_err(|e| e.to_string())?;
            p.add_link(peer, key, ep.map(Endpoint::udp), name, 1420, ll)
                .map_err(|e| e.to_string())?;
            Ok(p)
        })?;
        r.map_err(|e| anyhow!(e))
    };
    let _pb = start(
        b,
        sb,
        pa,
        x25519_public(&sa),
        None,
        "wg-a",
        "fe80::b".parse()?,
    )?;
    let _pa = start(
        a,
        sa,
        pb,
        x25519_public(&sb),
        Some(ub),
        "wg-b",
        "fe80::a".parse()?,
    )?;
    a.run(
        "ip",
        &["addr", "add", "fd00:d9:4::1/64", "dev", "wg-b", "nodad"],
    )?;
    b.run(
        "ip",
        &["addr", "add", "fd00:d9:4::2/64", "dev", "wg-a", "nodad"],
    )?;
    wait_until(
        "the tunnel",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            a.output("ping", &["-6", "-c", "1", "-W", "1", "fd00:d9:4::2"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    )?;
    // Both ends run in this process: its memory is theirs (plus the bench's).
    let me = [std::process::id()];
    cleanup::sleep(Duration::from_secs(1))?;
    let idle = rss(&me).0;
    let got = measure(a, b, "fd00:d9:4::2", cli, &me)?;
    Ok((got, (idle, rss(&me).1)))
}

/// Two full nodes: a registry, then `re6st-conf` and `re6stnet` on a and
/// b. The registry is reached over the emulated Internet, where a and b
/// cannot reach each other; each announces only its end of the veth, so
/// their tunnel runs over it. Memory: both daemons.
fn nodes(cli: &Cli) -> anyhow::Result<(Measured, Rss)> {
    let mut t = Topology::new("dpnodes");
    t.host("reg").host("a").host("b").link("a", "b");
    t.default_wan(LinkParams::delay_ms(1));
    t.wan_both("a", "b", LinkParams::delay_ms(1).with_blackhole(true));
    let mut m = Mesh::start(&t, "reg", &[], &[], &[])?;
    for (name, peer) in [("a", "b"), ("b", "a")] {
        let ep = format!(
            "[{}]:326",
            m.net.host(name)?.iface(&format!("to-{peer}"))?.v6.addr()
        );
        m.enrol(name, &["--endpoint", &ep])?;
    }
    for i in 0..2 {
        m.start_node(i)?;
    }
    m.wait_full_reachability(Duration::from_secs(60))?;
    let pids: Vec<u32> = (0..2).filter_map(|i| m.pid(i)).collect();
    cleanup::sleep(Duration::from_secs(1))?;
    let idle = rss(&pids).0;
    let dst = m.nodes[1].address.to_string();
    let got = measure(m.host(0)?, m.host(1)?, &dst, cli, &pids)?;
    Ok((got, (idle, rss(&pids).1)))
}

fn med(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cleanup::install_interrupt_handler() {
        eprintln!("re6st-bench-tunnel: {e}");
        return ExitCode::FAILURE;
    }
    let mut rows = Vec::new();
    for sys in &cli.systems {
        let r = if sys == "nodes" {
            nodes(&cli)
        } else {
            pair().and_then(|net| match sys.as_str() {
                "veth" => {
                    let (a, b) = (net.host("a")?, net.host("b")?);
                    let dst = b.iface("to-a")?.v6.addr().to_string();
                    measure(a, b, &dst, &cli, &[]).map(|got| (got, (0, 0)))
                }
                "boringtun" => boringtun(&net, &cli),
                "ours" => ours(&net, &cli),
                other => bail!("unknown system {other:?}"),
            })
        };
        match r {
            Ok((mut got, mem)) => {
                let (m, lo, hi) = med(&mut got.rates);
                let (rtt, cpu) = (got.rtt, got.cores_per_gbit);
                eprintln!(
                    "{sys}: {m:.0} Mbit/s ({lo:.0}-{hi:.0}), RTT {rtt:.3} ms, {cpu:.2} cores per Gbit/s, RSS {mem:?} KiB"
                );
                rows.push((sys.clone(), m, lo, hi, rtt, cpu, mem));
            }
            Err(e) => {
                eprintln!("re6st-bench-tunnel: {sys}: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let bt = rows.iter().find(|r| r.0 == "boringtun").map(|r| r.1);
    println!(
        "iperf3 TCP a -> b, {} x {} s per system, tunnel MTU 1420",
        cli.reps, cli.duration
    );
    println!("| system | Mbit/s median (min-max) | ping RTT ms avg | ratio to boringtun-cli | cores per Gbit/s (both ends) | RSS KiB idle / peak (both ends) |");
    println!("|---|---|---|---|---|---|");
    for (s, m, lo, hi, rtt, cpu, (idle, peak)) in rows {
        let ratio = bt.map_or("-".to_string(), |b| format!("{:.2}", m / b));
        let mem = if peak == 0 {
            "-".to_string()
        } else {
            format!("{idle} / {peak}")
        };
        let cpu = if cpu.is_nan() {
            "-".to_string()
        } else {
            format!("{cpu:.2}")
        };
        println!("| {s} | {m:.0} ({lo:.0}-{hi:.0}) | {rtt:.3} | {ratio} | {cpu} | {mem} |");
    }
    ExitCode::SUCCESS
}
