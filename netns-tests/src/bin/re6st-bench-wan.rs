//! `re6st-bench-wan`: the WAN emulator's own ceiling, in two modes.
//!
//! Default: TCP throughput through the emulator (zero delay) side by side
//! with the same over a direct veth, so the emulator's ceiling is known
//! before control-plane tests rely on it. Two hosts `a` and `b`, joined both
//! through `inet` (the emulator) and by a direct veth; iperf3 runs
//! alternately over each path, REPS times, and the table gives median, min
//! and max with the ratio between the two.
//!
//! `--rate-mode`: packet rate. PAIRS directed host pairs with one-way delays
//! drawn in 5–60 ms; 200-byte UDP packets offered at each of RATES packets
//! per second, round-robin over the pairs, from one sender thread; per
//! rate, the emulator's release lateness (write time − due time) p50/p99,
//! drops (delay queue, tun queue, sender), the queue's high-water mark and
//! the CPU of the emulator thread. `--hog N` runs N busy threads at normal
//! priority meanwhile, to show whether node load reaches the emulator.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use netns_tests::probe::{ping, wait_until};
use netns_tests::{cleanup, wan, Host, LinkParams, Net, Topology};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Throughput and packet rate of the netns WAN emulator (as root)"
)]
struct Cli {
    /// Runs per path.
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// One-way delay of the emulated path, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Packet-rate mode instead of iperf3 throughput.
    #[arg(long)]
    rate_mode: bool,
    /// Offered packet rates (packets per second), comma-separated.
    #[arg(long, default_value = "5000,20000,50000", value_delimiter = ',')]
    rates: Vec<u32>,
    /// Seconds of traffic per rate.
    #[arg(long, default_value_t = 5)]
    rate_secs: u64,
    /// Directed host pairs carrying traffic.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Hosts the pairs are drawn from.
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    /// Busy threads (normal priority) running during each rate.
    #[arg(long, default_value_t = 0)]
    hog: usize,
    /// Seed of the pairs and their delays.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.rate_mode {
        run_rates(&cli)
    } else {
        run(&cli)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("re6st-bench-wan: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Receiver-side bits per second from `iperf3 -J` output.
fn receiver_bps(json: &str) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing iperf3 JSON")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))
}

fn iperf(client: &Host, server_addr: &str, secs: u32) -> anyhow::Result<f64> {
    let secs = secs.to_string();
    // The server may still be closing the previous test (longer with delay).
    for _ in 0..10 {
        let out = client.output("iperf3", &["-c", server_addr, "-t", &secs, "-J"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("the server is busy") {
            return receiver_bps(&text);
        }
        cleanup::sleep(Duration::from_millis(500))?;
    }
    bail!("the iperf3 server stayed busy")
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    };
    (
        median,
        v.first().copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    cleanup::install_interrupt_handler()?;
    let mut t = Topology::new("benchwan");
    t.host("a")
        .host("b")
        .link("a", "b")
        .wan_both("a", "b", LinkParams::delay_ms(cli.delay_ms));
    let net = Net::build(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let _server = b.spawn("iperf3", "iperf3", &["-s"])?;
    let wan_addr = b.addr(false)?.to_string();
    let direct_addr = b.iface("to-a")?.v4.addr().to_string();
    wait_until(
        "the iperf3 server",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let out = b.output("ss", &["-Hltn", "sport = :5201"]).ok()?;
            (!out.stdout.is_empty()).then_some(())
        },
    )?;
    let rtt_wan = ping(a, b.addr(false)?, 20, Duration::from_millis(10))?;
    let rtt_direct = ping(
        a,
        b.iface("to-a")?.v4.addr().into(),
        20,
        Duration::from_millis(10),
    )?;

    let (mut wan, mut direct) = (Vec::new(), Vec::new());
    for rep in 0..cli.reps {
        cleanup::check_interrupt()?;
        let w = iperf(a, &wan_addr, cli.duration)?;
        let d = iperf(a, &direct_addr, cli.duration)?;
        eprintln!(
            "run {}/{}: emulator {:.0} Mbit/s, direct veth {:.0} Mbit/s",
            rep + 1,
            cli.reps,
            w / 1e6,
            d / 1e6
        );
        wan.push(w / 1e6);
        direct.push(d / 1e6);
    }
    let c = net.wan()?.counters("a", "b")?;
    let (wm, wlo, whi) = stats(&mut wan);
    let (dm, dlo, dhi) = stats(&mut direct);
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    println!(
        "iperf3 TCP a -> b, {} x {} s per path, emulator delay {} ms one-way",
        cli.reps, cli.duration, cli.delay_ms
    );
    println!("| path | Mbit/s median (min-max) | ping RTT ms avg | ratio to direct |");
    println!("|---|---|---|---|");
    println!(
        "| WAN emulator (inet, tun) | {wm:.0} ({wlo:.0}-{whi:.0}) | {:.3} | {:.3} |",
        ms(rtt_wan.avg),
        wm / dm
    );
    println!(
        "| direct veth | {dm:.0} ({dlo:.0}-{dhi:.0}) | {:.3} | 1 |",
        ms(rtt_direct.avg)
    );
    println!(
        "emulator a->b: {} packets delivered, {} dropped for a full queue",
        c.delivered, c.overflow
    );
    Ok(())
}

/// IP size of the packets of the rate mode (IPv4 and UDP headers included).
const PACKET_BYTES: usize = 200;
/// UDP port of the (never read) receiving sockets.
const SINK_PORT: u16 = 9000;

/// A UDP socket made inside `host`'s namespace.
fn socket_in(host: &Host, bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    let sock = host
        .in_ns(move || UdpSocket::bind(bind))?
        .with_context(|| format!("binding {bind} in {}", host.name()))?;
    Ok(sock)
}

/// tx_dropped of the emulator's tun device (packets the kernel could not
/// queue for the emulator: its 1000-packet queue was full).
fn tun_tx_dropped(net: &Net) -> anyhow::Result<u64> {
    let ns = net.inet_ns().context("no inet namespace")?;
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "wan0"])
        .output()
        .context("running ip -s link show wan0")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing ip -j link output")?;
    v.pointer("/0/stats64/tx/dropped")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow!("no tx dropped counter for wan0"))
}

/// What one rate step measured.
struct Step {
    offered: f64,
    sent: u64,
    send_errors: u64,
    delivered: u64,
    queue_drops: u64,
    tun_drops: u64,
    high_water: usize,
    lateness: wan::Lateness,
    emulator_cores: f64,
    secs: f64,
}

/// Sends `rate` packets per second for `secs`, round-robin over `socks`
/// (connected); returns (sent, send errors).
fn send_paced(socks: &[UdpSocket], rate: u32, secs: u64) -> (u64, u64) {
    let payload = [0x5au8; PACKET_BYTES - 28];
    let start = Instant::now();
    let total = u64::from(rate) * secs;
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut next = 0usize;
    while sent + errors < total {
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent + errors < due.min(total) {
            match socks[next].send(&payload) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
            next = (next + 1) % socks.len();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    (sent, errors)
}

fn run_rates(cli: &Cli) -> anyhow::Result<()> {
    cleanup::install_interrupt_handler()?;
    let n = cli.hosts;
    if !(2..=200).contains(&n) || cli.pairs == 0 || cli.pairs > n * (n - 1) {
        bail!("--pairs {} does not fit {n} hosts", cli.pairs);
    }
    let mut rng = fastrand::Rng::with_seed(cli.seed);
    let names: Vec<String> = (1..=n).map(|i| format!("h{i}")).collect();
    let mut all: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect();
    rng.shuffle(&mut all);
    all.truncate(cli.pairs);
    let mut t = Topology::new("benchrate");
    for name in &names {
        t.host(name);
    }
    for &(i, j) in &all {
        t.wan(&names[i], &names[j], LinkParams::delay_ms(rng.u64(5..=60)));
    }
    let net = Net::build(&t)?;
    let mut sinks = Vec::new();
    for name in &names {
        let h = net.host(name)?;
        sinks.push(socket_in(h, SocketAddr::new(h.addr(false)?, SINK_PORT))?);
    }
    let mut socks = Vec::new();
    for &(i, j) in &all {
        let src = net.host(&names[i])?;
        let dst: IpAddr = net.host(&names[j])?.addr(false)?;
        let sock = socket_in(src, SocketAddr::new(src.addr(false)?, 0))?;
        sock.connect(SocketAddr::new(dst, SINK_PORT))
            .context("connecting a sender socket")?;
        socks.push(sock);
    }
    let wan = net.wan()?;
    println!(
        "WAN emulator packet rate: {} pairs of {n} hosts, one-way delays 5-60 ms, {PACKET_BYTES}-byte UDP, {} s per rate, {} busy threads; emulator in SCHED_FIFO: {}",
        cli.pairs,
        cli.rate_secs,
        cli.hog,
        if wan.realtime() { "yes" } else { "no (refused)" }
    );
    println!("| offered pkt/s | sent pkt/s | delivered | lateness p50 / p99 / max µs | queue drops | tun drops | send errors | queue high-water | emulator CPU (cores) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let pair_counters = || -> anyhow::Result<(u64, u64)> {
        let mut delivered = 0;
        let mut dropped = 0;
        for &(i, j) in &all {
            let c = wan.counters(&names[i], &names[j])?;
            delivered += c.delivered;
            dropped += c.overflow + c.lost + c.blackholed;
        }
        Ok((delivered, dropped))
    };
    for &rate in &cli.rates {
        cleanup::check_interrupt()?;
        let stop = Arc::new(AtomicBool::new(false));
        let hogs: Vec<_> = (0..cli.hog)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let (d0, x0) = pair_counters()?;
        let tun0 = tun_tx_dropped(&net)?;
        let lat0 = wan.lateness();
        wan.reset_high_water();
        let cpu0 = wan::cpu_time()?;
        let t0 = Instant::now();
        let (sent, send_errors) = send_paced(&socks, rate, cli.rate_secs);
        let secs = t0.elapsed().as_secs_f64();
        // Let the longest delay run out before reading the counters.
        cleanup::sleep(Duration::from_millis(200))?;
        let cpu = wan::cpu_time()?.saturating_sub(cpu0);
        let wall = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for h in hogs {
            let _ = h.join();
        }
        let (d1, x1) = pair_counters()?;
        let step = Step {
            offered: f64::from(rate),
            sent,
            send_errors,
            delivered: d1 - d0,
            queue_drops: x1 - x0,
            tun_drops: tun_tx_dropped(&net)?.saturating_sub(tun0),
            high_water: wan.queue().high_water,
            lateness: wan.lateness().since(&lat0),
            emulator_cores: cpu.as_secs_f64() / wall,
            secs,
        };
        print_step(&step);
    }
    Ok(())
}

fn print_step(s: &Step) {
    let q = |x: f64| {
        s.lateness
            .quantile_us(x)
            .map_or_else(|| "-".to_string(), |v| v.to_string())
    };
    println!(
        "| {:.0} | {:.0} | {} | {} / {} / {} | {} | {} | {} | {} | {:.3} |",
        s.offered,
        s.sent as f64 / s.secs,
        s.delivered,
        q(0.5),
        q(0.99),
        q(1.0),
        s.queue_drops,
        s.tun_drops,
        s.send_errors,
        s.high_water,
        s.emulator_cores
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf3_json() -> anyhow::Result<()> {
        let j = r#"{"end":{"sum_received":{"bits_per_second":1.5e9}}}"#;
        assert_eq!(receiver_bps(j)?, 1.5e9);
        assert!(receiver_bps(r#"{"error":"unable to connect"}"#).is_err());
        assert!(receiver_bps("not json").is_err());
        assert!(receiver_bps("{}").is_err());
        Ok(())
    }
}
