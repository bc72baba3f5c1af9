//! `--scenario sigkill`: a daemon killed with SIGKILL (a crash) and started
//! again with the same state directory and configuration; how long until
//! every other node reaches it, and it reaches every other node.
//!
//! Reachability is read from UDP probes over the overlay (every
//! `--probe-ms`, from every other node to the restarted one and back),
//! started while it is down: a direction is *reached* at the first answered
//! probe sent after the restart, and *stable* after the last lost one.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use netns_tests::cleanup;
use netns_tests::mesh::Mesh;
use netns_tests::probe::{LossProbe, LossReport};
use netns_tests::stats::{loadavg, max, median};

use crate::logs::{day_secs, lines};
use crate::{Bench, Cli};

/// After every direction has been reached, probes keep running this long
/// to see whether the answers hold.
const HOLD: Duration = Duration::from_secs(3);
/// Wait for late replies when the probes stop.
const LINGER: Duration = Duration::from_secs(1);
/// Directions slower than this (seconds) get the logs of both ends about
/// each other printed.
const SLOW: f64 = 2.0;
/// How long the mesh gets to come back to full reachability after a trial
/// before the run gives up.
const RECOVER: Duration = Duration::from_secs(300);

/// What one direction's probes (one per other node) saw, in seconds after
/// the restart.
struct Side {
    /// Per other node: first answered probe (None: never within the bound).
    reached: Vec<Option<f64>>,
    /// Per other node: the probe after the last lost one.
    stable: Vec<Option<f64>>,
}

impl Side {
    fn read(
        reports: &[LossReport],
        probes_started: &[Instant],
        restart: Instant,
        every: Duration,
    ) -> Self {
        let at = |start: Instant, d: Duration| {
            (start + d).saturating_duration_since(restart).as_secs_f64()
        };
        let mut side = Self {
            reached: Vec::new(),
            stable: Vec::new(),
        };
        for (r, &s) in reports.iter().zip(probes_started) {
            let reached = r.first_answered.map(|d| at(s, d));
            side.reached.push(reached);
            side.stable
                .push(reached.map(|f| r.last_lost.map_or(f, |l| at(s, l + every).max(f))));
        }
        side
    }

    /// Time until every node was reached (None if one never was).
    fn all(&self) -> Option<f64> {
        self.reached
            .iter()
            .copied()
            .collect::<Option<Vec<f64>>>()
            .map(|v| max(&v))
    }

    fn all_stable(&self) -> Option<f64> {
        self.stable
            .iter()
            .copied()
            .collect::<Option<Vec<f64>>>()
            .map(|v| max(&v))
    }

    /// "n3 2.41, n9 2.30, n1 2.20": the slowest nodes.
    fn slowest(&self, names: &[String], count: usize) -> String {
        let mut v: Vec<(f64, &str)> = self
            .reached
            .iter()
            .zip(names)
            .filter_map(|(t, n)| t.map(|t| (t, n.as_str())))
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        v.iter()
            .take(count)
            .map(|(t, n)| format!("{n} {t:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn missing(&self, names: &[String]) -> Vec<String> {
        self.reached
            .iter()
            .zip(names)
            .filter(|(t, _)| t.is_none())
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// "all 19 after 2.52 s (slowest: ...), no loss after 2.61 s", or
    /// "only 2 of 19 within 90 s (...); never: n1, n3".
    fn describe(&self, names: &[String], bound: u64) -> String {
        match self.all() {
            Some(t) => format!(
                "all {} after {t:.2} s (slowest: {}), no loss after {}",
                names.len(),
                self.slowest(names, 3),
                secs(self.all_stable(), bound)
            ),
            None => format!(
                "only {} of {} within {bound} s ({}); never: {}",
                self.reached.iter().flatten().count(),
                names.len(),
                self.slowest(names, 3),
                self.missing(names).join(", ")
            ),
        }
    }
}

/// For the pairs that never answered: what the route entries of each end
/// towards the other look like, one line per direction (read before the
/// probes stop), then the first node's entries in full.
fn unreached_routes(
    m: &Mesh,
    r: usize,
    others: &[usize],
    to: &[LossProbe],
    from: &[LossProbe],
) -> Vec<String> {
    let name = |i: usize| m.nodes[i].name.as_str();
    let mut out = Vec::new();
    let mut example = None;
    let mut show = |i: usize, j: usize| {
        let v = m.routes_to(i, j);
        let count = |field: &str| v.iter().filter(|e| e[field] == true).count();
        let seqnos: Vec<String> = v.iter().map(|e| e["seqno"].to_string()).collect();
        out.push(format!(
            "{} -> {}: {} routes, {} feasible, {} selected, seqnos [{}]",
            name(i),
            name(j),
            v.len(),
            count("feasible"),
            count("selected"),
            seqnos.join(", ")
        ));
        example.get_or_insert_with(|| {
            let text = serde_json::Value::Array(v).to_string();
            format!(
                "{}'s route entries to {}: {}",
                name(i),
                name(j),
                text.chars().take(700).collect::<String>()
            )
        });
    };
    for (k, &j) in others.iter().enumerate() {
        if to[k].snapshot().first_answered.is_none() {
            show(j, r);
        }
        if from[k].snapshot().first_answered.is_none() {
            show(r, j);
        }
    }
    out.extend(example);
    out
}

fn secs(v: Option<f64>, bound: u64) -> String {
    v.map_or(format!("> {bound} s"), |t| format!("{t:.2} s"))
}

pub(crate) fn run(cli: &Cli, mut b: Bench) -> anyhow::Result<()> {
    let m = &mut b.mesh;
    let n = m.nodes.len();
    let names = &b.matrix.names;
    let every = Duration::from_millis(cli.probe_ms.max(1));
    let bound = Duration::from_secs(cli.bound);
    let down = Duration::from_secs_f64(cli.down.max(0.0));
    let mut order: Vec<usize> = (0..n).collect();
    b.rng.shuffle(&mut order);
    println!(
        "sigkill: {} trials, {:.1} s down, probes every {} ms both ways between the restarted node and each other one, bound {} s",
        cli.trials,
        down.as_secs_f64(),
        every.as_millis(),
        cli.bound
    );
    let (mut to_all, mut from_all) = (Vec::new(), Vec::new());
    for trial in 0..cli.trials {
        let r = order[trial % n];
        let others: Vec<usize> = (0..n).filter(|&j| j != r).collect();
        let other_names: Vec<String> = others.iter().map(|&j| names[j].clone()).collect();
        let pid = m.pid(r).context("the node to kill is not running")?;
        // The seqno the mesh knows for its prefix: a restarted Babel node
        // starts again from its own idea of it.
        let seqno_before = m
            .routes_to(others[0], r)
            .iter()
            .find(|e| e["selected"] == true)
            .map_or("?".to_string(), |e| e["seqno"].to_string());
        let log_from: Vec<usize> = (0..n).map(|i| m.log(i).len()).collect();
        let killed = Instant::now();
        m.kill_node(r)?;
        // Probes from the start of the down time: nothing can answer them
        // before the restart.
        let to: Vec<LossProbe> = others
            .iter()
            .map(|&j| m.loss_probe(j, r, every))
            .collect::<netns_tests::Result<_>>()?;
        let from: Vec<LossProbe> = others
            .iter()
            .map(|&j| m.loss_probe(r, j, every))
            .collect::<netns_tests::Result<_>>()?;
        cleanup::sleep(down.saturating_sub(killed.elapsed()))?;
        let restart = Instant::now();
        let restart_wall = day_secs(SystemTime::now());
        m.start_node(r)?;
        let mut all_since = None;
        while restart.elapsed() < bound {
            cleanup::check_interrupt()?;
            let done = to
                .iter()
                .chain(&from)
                .all(|p| p.snapshot().first_answered.is_some());
            if done {
                let since = *all_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= HOLD {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let window = restart.elapsed();
        let diagnosis = unreached_routes(m, r, &others, &to, &from);
        let to_started: Vec<Instant> = to.iter().map(LossProbe::started).collect();
        let from_started: Vec<Instant> = from.iter().map(LossProbe::started).collect();
        let to = Side::read(
            &LossProbe::stop_all(to, LINGER),
            &to_started,
            restart,
            every,
        );
        let from = Side::read(
            &LossProbe::stop_all(from, LINGER),
            &from_started,
            restart,
            every,
        );
        let (t_all, f_all) = (to.all(), from.all());
        println!(
            "trial {}: {} (pid {pid}, seqno {seqno_before} at {}) killed, restarted {:.1} s later ({:.1} s probed after the restart)",
            trial + 1,
            names[r],
            names[others[0]],
            restart.duration_since(killed).as_secs_f64(),
            window.as_secs_f64()
        );
        println!(
            "  others reach it: {}",
            to.describe(&other_names, cli.bound)
        );
        println!(
            "  it reaches others: {}",
            from.describe(&other_names, cli.bound)
        );
        for l in diagnosis {
            println!("    {l}");
        }
        let mine = lines(m, r, log_from[r], None, restart_wall, 10_000);
        let up: Vec<String> = mine
            .iter()
            .filter_map(|l| {
                let (at, rest) = l.split_once(" s tunnel peer=")?;
                let peer = rest.split_whitespace().next()?;
                Some(format!("{peer} {at}"))
            })
            .collect();
        let warnings = mine
            .iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count();
        println!(
            "  {}'s log: tunnels up at (s after the restart) {}; {warnings} warnings/errors",
            names[r],
            up.join(", ")
        );
        for (k, &j) in others.iter().enumerate() {
            let slow = |t: Option<f64>| t.is_none_or(|t| t > SLOW);
            if !slow(to.reached[k]) && !slow(from.reached[k]) {
                continue;
            }
            for (a, b) in [(j, r), (r, j)] {
                for l in lines(m, a, log_from[a], Some(b), restart_wall, 8) {
                    println!("    {}: {l}", names[a]);
                }
            }
        }
        to_all.push(t_all.unwrap_or(f64::INFINITY));
        from_all.push(f_all.unwrap_or(f64::INFINITY));
        // Back to full reachability (every pair pings) before the next one.
        let back = m.wait_full_reachability(RECOVER);
        if t_all.is_none() || f_all.is_none() || back.is_err() {
            println!(
                "  full reachability again {:.1} s after the restart{}",
                restart.elapsed().as_secs_f64(),
                if back.is_err() { ": NO, giving up" } else { "" }
            );
        }
        back.context("the mesh did not come back after a restart")?;
        cleanup::sleep(Duration::from_secs(cli.settle))?;
    }
    let show = |v: f64| {
        if v.is_finite() {
            format!("{v:.2} s")
        } else {
            format!("> {} s", cli.bound)
        }
    };
    println!(
        "sigkill summary over {} trials ({} nodes): others reach the restarted node: median {}, max {}; it reaches all others: median {}, max {}; load average {}",
        cli.trials,
        n,
        show(median(&mut to_all.clone())),
        show(max(&to_all)),
        show(median(&mut from_all.clone())),
        show(max(&from_all)),
        loadavg()
    );
    Ok(())
}
