//! `re6st-bench-wan`: TCP throughput through the WAN emulator (zero delay)
//! side by side with the same over a direct veth, so the emulator's ceiling
//! is known before control-plane tests rely on it.
//!
//! Two hosts `a` and `b`, joined both through `inet` (the emulator) and by a
//! direct veth; iperf3 runs alternately over each path, REPS times, and the
//! table gives median, min and max with the ratio between the two.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use netns_tests::probe::{ping, wait_until};
use netns_tests::{cleanup, Host, LinkParams, Net, Topology};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Throughput of the netns WAN emulator against a direct veth (iperf3)"
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
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
