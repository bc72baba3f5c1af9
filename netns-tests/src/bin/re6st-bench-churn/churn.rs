//! `--scenario churn`: the Internet keeps changing under a converged mesh.
//! Every `--every` seconds, `--moves` random node pairs get a one-way delay
//! of their base delay × (1 + u), u uniform in −30 %…+60 % (both directions
//! alike), and `--flips` working direct paths break while as many broken
//! ones heal (the share broken stays as built). Meanwhile 10 ms UDP
//! loss-window probes run over the overlay between `--pairs` sampled
//! pairs; the same probes first run `--control` seconds with no change, as
//! the baseline of what the machine itself loses.

use std::time::{Duration, Instant};

use netns_tests::cleanup;
use netns_tests::mesh::Mesh;
use netns_tests::probe::{LossProbe, LossReport};
use netns_tests::stats::{loadavg, max, median};
use netns_tests::LinkParams;

use crate::{Bench, Cli};

const INTERVAL: Duration = Duration::from_millis(10);
const LINGER: Duration = Duration::from_secs(1);

/// CPU time of every running daemon and of this process (the WAN emulator
/// and the probes), in seconds.
fn cpu(m: &Mesh) -> (f64, f64) {
    let daemons = m
        .nodes
        .iter()
        .filter_map(|n| n.process.as_ref()?.cpu_time())
        .map(|d| d.as_secs_f64())
        .sum();
    let me = netns_tests::process::cpu_time(std::process::id()).map_or(0.0, |d| d.as_secs_f64());
    (daemons, me)
}

/// Packets the WAN emulator has written back between nodes so far (every
/// tunnel packet crosses it once per overlay hop, so a forwarding loop
/// shows here as a jump).
fn wan_packets(m: &Mesh, names: &[String]) -> anyhow::Result<u64> {
    let wan = m.net.wan()?;
    let mut total = 0;
    for a in names {
        for b in names {
            if a != b {
                total += wan.counters(a, b)?.delivered;
            }
        }
    }
    Ok(total)
}

/// Running totals during a phase: probes unanswered (in flight included),
/// CPU seconds of the daemons, packets through the WAN emulator.
struct Sample {
    at: Instant,
    lost: u64,
    cpu: f64,
    wan: u64,
}

/// What one phase measured.
struct Phase {
    reports: Vec<LossReport>,
    took: Duration,
    /// CPU seconds of the daemons and of this process.
    cpu: (f64, f64),
    /// Packets through the WAN emulator.
    wan: u64,
}

fn probe(
    m: &Mesh,
    names: &[String],
    pairs: &[(usize, usize)],
    f: impl FnOnce(&dyn Fn() -> Sample) -> anyhow::Result<()>,
) -> anyhow::Result<Phase> {
    let probes: Vec<LossProbe> = pairs
        .iter()
        .map(|&(a, b)| m.loss_probe(a, b, INTERVAL))
        .collect::<netns_tests::Result<_>>()?;
    let (start, cpu0, wan0) = (Instant::now(), cpu(m), wan_packets(m, names)?);
    let sample = || Sample {
        at: Instant::now(),
        lost: probes
            .iter()
            .map(|p| {
                let r = p.snapshot();
                r.sent - r.received
            })
            .sum(),
        cpu: cpu(m).0,
        wan: wan_packets(m, names).unwrap_or(0),
    };
    f(&sample)?;
    let took = start.elapsed();
    let (cpu1, wan1) = (cpu(m), wan_packets(m, names)?);
    Ok(Phase {
        reports: LossProbe::stop_all(probes, LINGER),
        took,
        cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
        wan: wan1 - wan0,
    })
}

fn summary(what: &str, m: &Mesh, names: &[String], pairs: &[(usize, usize)], p: &Phase) {
    let reports = &p.reports;
    let (sent, received): (u64, u64) = reports
        .iter()
        .fold((0, 0), |(s, r), x| (s + x.sent, r + x.received));
    let mut gaps: Vec<f64> = reports
        .iter()
        .map(|r| r.longest_gap.as_secs_f64() * 1000.0)
        .collect();
    let worst = reports
        .iter()
        .zip(pairs)
        .max_by_key(|(r, _)| r.longest_gap)
        .map(|(r, &(a, b))| {
            format!(
                "{}->{} at +{:.1} s",
                names[a],
                names[b],
                r.gap_start.as_secs_f64()
            )
        })
        .unwrap_or_default();
    let secs = p.took.as_secs_f64().max(1e-3);
    println!(
        "{what}: {} pairs, {:.1} s: delivered {:.2} % of {sent} probes; longest gap {:.0} ms ({worst}), median of the pairs' longest gaps {:.0} ms",
        pairs.len(),
        secs,
        100.0 * received as f64 / sent.max(1) as f64,
        max(&gaps),
        median(&mut gaps),
    );
    println!(
        "  CPU: daemons {:.1} % of a core per node, this process (WAN emulator + probes) {:.0} % of a core; WAN emulator {:.0} packets/s; load average {}",
        100.0 * p.cpu.0 / secs / m.nodes.len() as f64,
        100.0 * p.cpu.1 / secs,
        p.wan as f64 / secs,
        loadavg()
    );
}

pub(crate) fn run(cli: &Cli, mut b: Bench) -> anyhow::Result<()> {
    let m = &b.mesh;
    let names = &b.matrix.names;
    let n = names.len();
    let rng = &mut b.rng;
    let mut all: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| (0..n).filter(move |&c| c != a).map(move |c| (a, c)))
        .collect();
    rng.shuffle(&mut all);
    all.truncate(cli.pairs.max(1));
    let pairs = all;

    if cli.control > 0 {
        let phase = probe(m, names, &pairs, |_| {
            cleanup::sleep(Duration::from_secs(cli.control))?;
            Ok(())
        })?;
        summary("control (no change)", m, names, &pairs, &phase);
    }

    let base = &b.matrix.delay;
    let mut broken = b.matrix.broken.clone();
    let wan = m.net.wan()?;
    let every = Duration::from_secs_f64(cli.every.max(0.1));
    let duration = Duration::from_secs(cli.duration);
    let (mut moved, mut flipped, mut steps) = (0, 0, 0);
    let mut timeline = Vec::new();
    let phase = probe(m, names, &pairs, |sample| {
        let start = Instant::now();
        let mut last = sample();
        loop {
            let next = every * (steps + 1);
            if next > duration {
                break;
            }
            cleanup::sleep(next.saturating_sub(start.elapsed()))?;
            let now = sample();
            let secs = now.at.duration_since(last.at).as_secs_f64().max(1e-3);
            timeline.push(format!(
                "{}/{:.1}/{:.0}",
                now.lost.saturating_sub(last.lost),
                (now.wan - last.wan) as f64 / secs / 1000.0,
                100.0 * (now.cpu - last.cpu) / secs / n as f64
            ));
            last = now;
            steps += 1;
            for _ in 0..cli.moves {
                let i = rng.usize(0..n);
                let j = (i + 1 + rng.usize(0..n - 1)) % n;
                let factor = 1.0 + rng.f64() * 0.9 - 0.3;
                let d = (base[i][j] as f64 * factor).round() as u64;
                wan.set_both(
                    &names[i],
                    &names[j],
                    LinkParams::delay_ms(d).with_blackhole(broken[i][j]),
                )?;
                moved += 1;
            }
            for _ in 0..cli.flips {
                let list = |want: bool| -> Vec<(usize, usize)> {
                    (0..n)
                        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                        .filter(|&(i, j)| broken[i][j] == want)
                        .collect()
                };
                let (down, up) = (list(true), list(false));
                if down.is_empty() || up.is_empty() {
                    break;
                }
                let (hi, hj) = down[rng.usize(0..down.len())];
                let (bi, bj) = up[rng.usize(0..up.len())];
                wan.heal(&names[hi], &names[hj])?;
                wan.blackhole(&names[bi], &names[bj])?;
                (broken[hi][hj], broken[hj][hi]) = (false, false);
                (broken[bi][bj], broken[bj][bi]) = (true, true);
                flipped += 1;
            }
        }
        cleanup::sleep(duration.saturating_sub(start.elapsed()))?;
        Ok(())
    })?;
    println!(
        "churn: {steps} changes {:.1} s apart: {moved} delay moves, {flipped} paths broken and as many healed",
        every.as_secs_f64()
    );
    println!(
        "  per interval before each change (probes lost / WAN emulator kpackets/s / daemons' CPU % per node): {}",
        timeline.join(" ")
    );
    for (r, &(a, c)) in phase.reports.iter().zip(&pairs) {
        println!(
            "  {:>4} -> {:<4} (direct {:>2} ms{}): delivered {:6.2} % of {}, longest gap {:5.0} ms at +{:.1} s",
            names[a],
            names[c],
            base[a][c],
            if b.matrix.broken[a][c] { ", broken at start" } else { "" },
            100.0 * (1.0 - r.loss()),
            r.sent,
            r.longest_gap.as_secs_f64() * 1000.0,
            r.gap_start.as_secs_f64()
        );
    }
    summary("churn", m, names, &pairs, &phase);
    Ok(())
}
