//! Self-tests of the netns harness: the WAN emulator's delay, loss,
//! blackholes and live changes; LANs and direct links; process supervision;
//! teardown on drop and on panic; refusal of bad topologies; cleanup of
//! leftovers. They need root; without it they are reported as ignored, with
//! a loud message. After the suite, no namespace or child process of this
//! run may remain, or the run fails.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use netns_tests::probe::{ping, wait_until, LossProbe};
use netns_tests::testing::{check, run_suite};
use netns_tests::{cleanup, netns, Error, LinkParams, Net, Result, Topology, TopologyError};

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

fn pair(tag: &str, params: LinkParams) -> Result<Net> {
    let mut t = Topology::new(tag);
    t.host("a").host("b").wan_both("a", "b", params);
    Net::build(&t)
}

/// 2 × 25 ms one-way gives an RTT between 50 and 60 ms, over IPv4 and IPv6
/// (min and average; one late ping is scheduling noise on a busy 2-core
/// machine, so the maximum only has to stay under 80 ms).
fn rtt_matches_configured_delay() -> Result<()> {
    let net = pair("rtt", LinkParams::delay_ms(25))?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    for v6 in [false, true] {
        let s = ping(a, b.addr(v6)?, 10, Duration::from_millis(100))?;
        check(s.received == 10, format!("v6={v6}: {s:?}"))?;
        let (min, avg, max) = (ms(s.min), ms(s.avg), ms(s.max));
        check(
            (50.0..=60.0).contains(&min) && (50.0..=60.0).contains(&avg) && max <= 80.0,
            format!("v6={v6}: RTT min/avg/max {min:.2}/{avg:.2}/{max:.2} ms, want 50-60 (max 80)"),
        )?;
    }
    let c = net.wan()?.counters("a", "b")?;
    check(c.delivered >= 20, format!("a->b counters {c:?}"))
}

/// Asymmetric delays add up, and a change applies live to the next packets.
fn delay_changes_live() -> Result<()> {
    let mut t = Topology::new("live");
    t.host("a")
        .host("b")
        .wan("a", "b", LinkParams::delay_ms(5))
        .wan("b", "a", LinkParams::delay_ms(15));
    let net = Net::build(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let s = ping(a, b.addr(false)?, 5, Duration::from_millis(50))?;
    check(
        (20.0..=26.0).contains(&ms(s.avg)),
        format!("5+15 ms: {s:?}"),
    )?;
    net.wan()?.set("a", "b", LinkParams::delay_ms(45))?;
    let s = ping(a, b.addr(false)?, 5, Duration::from_millis(50))?;
    check(
        (60.0..=66.0).contains(&ms(s.avg)),
        format!("45+15 ms: {s:?}"),
    )?;
    check(
        net.wan()?.get("a", "b")? == LinkParams::delay_ms(45),
        "get returns what set stored",
    )
}

/// A blackhole drops everything in both directions; heal restores the path.
fn blackhole_and_heal() -> Result<()> {
    let net = pair("hole", LinkParams::delay_ms(2))?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let wan = net.wan()?;
    for v6 in [false, true] {
        check(
            ping(a, b.addr(v6)?, 3, Duration::from_millis(50))?.received == 3,
            "before",
        )?;
    }
    wan.blackhole("a", "b")?;
    for v6 in [false, true] {
        let s = ping(a, b.addr(v6)?, 20, Duration::from_millis(20))?;
        check(s.received == 0, format!("blackholed v6={v6}: {s:?}"))?;
        let s = ping(b, a.addr(v6)?, 5, Duration::from_millis(20))?;
        check(
            s.received == 0,
            format!("blackholed reverse v6={v6}: {s:?}"),
        )?;
    }
    let c = wan.counters("a", "b")?;
    check(c.blackholed >= 40, format!("a->b counters {c:?}"))?;
    wan.heal("a", "b")?;
    for v6 in [false, true] {
        let s = ping(a, b.addr(v6)?, 5, Duration::from_millis(50))?;
        check(s.received == 5, format!("healed v6={v6}: {s:?}"))?;
    }
    Ok(())
}

/// 20% loss one way gives 10-30% loss over 500 probes (10 ms apart).
fn loss_rate_over_500_probes() -> Result<()> {
    let mut t = Topology::new("loss");
    t.host("a")
        .host("b")
        .wan("a", "b", LinkParams::delay_ms(1).with_loss(0.2));
    let net = Net::build(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let probe = LossProbe::start(a, b, b.addr(false)?, Duration::from_millis(10))?;
    wait_until(
        "500 probes",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || (probe.snapshot().sent >= 500).then_some(()),
    )?;
    let mut r = probe.stop(Duration::from_millis(200));
    // The last few may have been sent after the 500th; judge over all of them.
    r.sent = r.sent.max(1);
    let loss = r.loss();
    check(r.sent >= 500, format!("{r:?}"))?;
    check(
        (0.10..=0.30).contains(&loss),
        format!("loss {:.1}% over {} probes", loss * 100.0, r.sent),
    )?;
    let c = net.wan()?.counters("a", "b")?;
    check(
        c.lost > 0 && net.wan()?.counters("b", "a")?.lost == 0,
        format!("counters {c:?}"),
    )
}

/// The loss-window probe reports a blackhole's length as its longest gap.
fn loss_window_of_a_blackhole() -> Result<()> {
    let net = pair("window", LinkParams::delay_ms(1))?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let probe = LossProbe::start(a, b, b.addr(true)?, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_millis(300));
    net.wan()?.blackhole("a", "b")?;
    std::thread::sleep(Duration::from_millis(500));
    net.wan()?.heal("a", "b")?;
    std::thread::sleep(Duration::from_millis(300));
    let r = probe.stop(Duration::from_millis(100));
    let gap = r.longest_gap.as_secs_f64() * 1000.0;
    check(
        (450.0..=800.0).contains(&gap),
        format!("gap {gap:.0} ms for a 500 ms blackhole: {r:?}"),
    )?;
    check(
        (35..=80).contains(&r.lost),
        format!("lost {} probes for 500 ms at 10 ms: {r:?}", r.lost),
    )
}

/// Hosts on a LAN segment reach each other directly (not through the WAN);
/// a direct link works; a host without uplink has none.
fn lan_and_direct_links() -> Result<()> {
    let mut t = Topology::new("lan");
    t.host("a").host("b").host_offline("c");
    t.lan("office", &["a", "b", "c"]).link("a", "c");
    t.wan_both("a", "b", LinkParams::delay_ms(30));
    let net = Net::build(&t)?;
    let (a, b, c) = (net.host("a")?, net.host("b")?, net.host("c")?);
    for (from, to) in [(a, b), (b, c), (c, a)] {
        let lan = to.iface("lan0")?;
        for addr in [IpAddr::V4(lan.v4.addr()), IpAddr::V6(lan.v6.addr())] {
            let s = ping(from, addr, 3, Duration::from_millis(50))?;
            check(
                s.received == 3 && ms(s.max) < 20.0,
                format!("{} -> {addr}: {s:?}", from.name()),
            )?;
        }
    }
    let direct = c.iface("to-a")?;
    let s = ping(
        a,
        IpAddr::V6(direct.v6.addr()),
        3,
        Duration::from_millis(50),
    )?;
    check(s.received == 3, format!("direct link: {s:?}"))?;
    check(
        c.v4().is_none() && c.addr(false).is_err(),
        "offline host has no uplink",
    )?;
    let counted = net.wan()?.counters("a", "b")?.delivered;
    check(
        counted == 0,
        format!("LAN traffic went through the WAN: {counted}"),
    )
}

/// An emulated link has the configured delay, carries link-local
/// multicast, and can be blackholed live.
fn emulated_links() -> Result<()> {
    let mut t = Topology::new("elink");
    t.host_offline("a").host_offline("b");
    t.link_emulated("a", "b", LinkParams::delay_ms(15));
    let net = Net::build(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let s = ping(
        a,
        IpAddr::V6(b.iface("to-a")?.v6.addr()),
        5,
        Duration::from_millis(50),
    )?;
    check(
        s.received == 5 && (30.0..=36.0).contains(&ms(s.avg)),
        format!("RTT over a 15 ms link: {s:?}"),
    )?;
    let out = a.run(
        "ping",
        &["-6", "-c", "2", "-i", "0.2", "-W", "1", "ff02::1%to-b"],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    check(
        text.contains("fe80::d1:0:2"),
        format!("multicast ping did not reach b: {text}"),
    )?;
    net.link("a", "b")?.blackhole("a", "b")?;
    let s = ping(
        a,
        IpAddr::V6(b.iface("to-a")?.v6.addr()),
        5,
        Duration::from_millis(20),
    )?;
    check(s.received == 0, format!("blackholed link: {s:?}"))?;
    net.link("b", "a")?.heal("a", "b")?;
    let s = ping(
        a,
        IpAddr::V6(b.iface("to-a")?.v6.addr()),
        3,
        Duration::from_millis(50),
    )?;
    check(s.received == 3, format!("healed link: {s:?}"))
}

/// Programs run inside the host with their output logged, in their own
/// session, and die with their handle; a whole process group goes.
fn processes_are_logged_and_killed() -> Result<()> {
    let mut t = Topology::new("proc");
    t.host("a");
    let net = Net::build(&t)?;
    let a = net.host("a")?;
    let mut p = a.spawn(
        "shell",
        "sh",
        &["-c", "ip -o addr show dev eth0; sleep 300 & sleep 300"],
    )?;
    let pid = p.pid();
    let (_, _) = wait_until(
        "log output",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || p.log().contains("198.18.1.2").then_some(()),
    )?;
    check(p.is_running(), "running")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| Error::io("reading the child's stat", e))?;
    let session = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(3))
        .and_then(|s| s.parse::<u32>().ok());
    check(
        session == Some(pid),
        format!("own session (autogroup): {session:?} for pid {pid}"),
    )?;
    check(
        p.log_path().starts_with(net.log_dir()),
        "log under the network's log dir",
    )?;
    let in_ns = netns::netns_pids(a.ns())?;
    check(
        in_ns.len() >= 2,
        format!("processes in namespace: {in_ns:?}"),
    )?;
    drop(p);
    check(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process gone",
    )?;
    // SIGKILL to the group is asynchronous for the grandchild: it leaves the
    // namespace a moment after the leader has been reaped.
    wait_until(
        "whole group gone",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || match netns::netns_pids(a.ns()) {
            Ok(pids) if pids.is_empty() => Some(()),
            _ => None,
        },
    )?;
    Ok(())
}

/// A network dropped while a panic unwinds removes all its namespaces and
/// kills what ran inside.
fn teardown_on_panic() -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || -> Result<()> {
        let mut t = Topology::new("panic");
        t.host("a").host("b").lan("l", &["a", "b"]);
        let net = Net::build(&t)?;
        let p = net.host("a")?.spawn("sleeper", "sleep", &["300"])?;
        let _ = tx.send((net.prefix().to_string(), p.pid()));
        let _keep = (net, p);
        panic!("deliberate panic to test teardown");
    })
    .join();
    check(joined.is_err(), "the thread panicked")?;
    let (prefix, pid) = rx
        .recv()
        .map_err(|_| Error::Measure("no prefix sent".into()))?;
    let left: Vec<_> = netns::list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    check(left.is_empty(), format!("left after panic: {left:?}"))?;
    // The logs of a network dropped in a panic are kept on purpose; these are not needed.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join("re6st-netns").join(&prefix));
    check(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sleeper gone",
    )
}

/// Bad topologies are refused before any namespace exists.
fn bad_topologies_create_nothing() -> Result<()> {
    let before = netns::list_netns()?.len();
    let mut t = Topology::new("badtopo");
    t.host("a")
        .host("b")
        .wan("a", "ghost", LinkParams::delay_ms(1));
    check(
        matches!(
            Net::build(&t),
            Err(Error::Topology(TopologyError::UnknownHost(_)))
        ),
        "unknown host",
    )?;
    let mut t = Topology::new("badtopo");
    t.host("a")
        .wan("a", "a", LinkParams::delay_ms(1).with_loss(2.0));
    check(
        matches!(
            Net::build(&t),
            Err(Error::Topology(TopologyError::OutOfRange(_)))
        ),
        "loss 2",
    )?;
    let mut t = Topology::new("badtopo");
    t.host("a").host_with_addrs(
        "b",
        "198.18.1.9/24"
            .parse()
            .map_err(|_| Error::Measure("parse".into()))?,
        "fd00:77::2/64"
            .parse()
            .map_err(|_| Error::Measure("parse".into()))?,
    );
    check(
        matches!(
            Net::build(&t),
            Err(Error::Topology(TopologyError::Overlap(_)))
        ),
        "overlap",
    )?;
    let after = netns::list_netns()?;
    check(
        !after.iter().any(|n| n.contains("-badtopo-")),
        format!("created: {after:?}"),
    )?;
    check(after.len() <= before + 20, "sanity")
}

/// `cleanup` removes namespaces whose builder is dead, and leaves live ones.
fn cleanup_removes_leftovers() -> Result<()> {
    // PIDs above pid_max never belong to a live process.
    let stale = format!("{}leftover-4194305-0-a", cleanup::NAME_PREFIX);
    netns::ip(&["netns", "add", &stale])?;
    let mut t = Topology::new("alive");
    t.host("a");
    let net = Net::build(&t)?;
    let removed = cleanup::remove_leftovers(false)?;
    let names = netns::list_netns()?;
    let ours_alive = names.iter().any(|n| n.starts_with(net.prefix()));
    let _ = netns::remove_netns(&stale);
    check(removed.contains(&stale), format!("removed {removed:?}"))?;
    check(ours_alive, "a live network was removed")
}

/// The demo runs to its end, and Ctrl-C on a `--keep` demo removes
/// everything it built.
fn demo_runs_and_ctrl_c_leaves_nothing() -> Result<()> {
    let exe = env!("CARGO_BIN_EXE_re6st-demo");
    let out = std::process::Command::new(exe)
        .args(["--nodes", "5", "--seed", "1"])
        .output()
        .map_err(|e| Error::io("running re6st-demo", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    check(
        out.status.success(),
        format!(
            "demo failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    check(
        text.contains("20 of 20 pairs reachable")
            && text.contains("overlay path chosen:")
            && text.contains("loss window")
            && text.contains("on every copy after")
            && text.contains("serves greeting = hello"),
        format!("demo output: {text}"),
    )?;

    let log = std::env::temp_dir().join(format!("re6st-demo-keep-{}.out", std::process::id()));
    let file = std::fs::File::create(&log).map_err(|e| Error::io("creating the demo log", e))?;
    let mut child = std::process::Command::new(exe)
        .args(["--nodes", "3", "--seed", "2", "--keep"])
        .stdout(file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::io("running re6st-demo --keep", e))?;
    let mine = format!("-{}-", child.id());
    let waited = wait_until(
        "the demo to be up",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            t.contains("press Ctrl-C").then_some(())
        },
    );
    let built = netns::list_netns()?
        .iter()
        .filter(|n| n.contains(&mine))
        .count();
    // SAFETY: kill has no memory-safety preconditions; the PID is our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child
        .wait()
        .map_err(|e| Error::io("waiting for the demo", e))?;
    let _ = std::fs::remove_file(&log);
    waited?;
    // The Internet, the registry and three nodes.
    check(
        built == 5,
        format!("demo had {built} namespaces, expected 5"),
    )?;
    check(
        status.code() == Some(130),
        format!("demo exited with {status}"),
    )?;
    let left: Vec<String> = netns::list_netns()?
        .into_iter()
        .filter(|n| n.contains(&mine))
        .collect();
    check(left.is_empty(), format!("left after Ctrl-C: {left:?}"))
}

fn main() -> ExitCode {
    run_suite(&[
        ("rtt_matches_configured_delay", rtt_matches_configured_delay),
        ("delay_changes_live", delay_changes_live),
        ("blackhole_and_heal", blackhole_and_heal),
        ("loss_rate_over_500_probes", loss_rate_over_500_probes),
        ("loss_window_of_a_blackhole", loss_window_of_a_blackhole),
        ("lan_and_direct_links", lan_and_direct_links),
        ("emulated_links", emulated_links),
        (
            "processes_are_logged_and_killed",
            processes_are_logged_and_killed,
        ),
        ("teardown_on_panic", teardown_on_panic),
        (
            "bad_topologies_create_nothing",
            bad_topologies_create_nothing,
        ),
        ("cleanup_removes_leftovers", cleanup_removes_leftovers),
        (
            "demo_runs_and_ctrl_c_leaves_nothing",
            demo_runs_and_ctrl_c_leaves_nothing,
        ),
    ])
}
