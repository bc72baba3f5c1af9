//! re6st-babeld in real network namespaces: the square (routes, RTT
//! preference, silent-failure reroute with its loss window) and interop
//! with babeld 1.12 (a chain ours–babeld–ours, and a mixed triangle).

use std::process::ExitCode;
use std::time::Duration;

use netns_tests::babel::{babeld, ours, reaches, route_dev, stub};
use netns_tests::net::Host;
use netns_tests::probe::{ping, wait_until, LossProbe};
use netns_tests::testing::{check, run_suite};
use netns_tests::{Error, LinkParams, Net, Result, Topology};

/// A topology of hosts with no Internet uplink (links are added by the caller).
fn offline(tag: &str, hosts: &[&str]) -> Topology {
    let mut t = Topology::new(tag);
    for h in hosts {
        t.host_offline(h);
    }
    t
}

/// Builds `t` and gives each host the stub `fd00:5H::1/128` on lo, H its
/// one-letter (hexadecimal) name.
fn build_with_stubs(t: &Topology) -> Result<Net> {
    let net = Net::build(t)?;
    for h in net.hosts() {
        stub(h, &format!("fd00:5{}::1", h.name()))?;
    }
    Ok(net)
}

/// Waits until each `(host, stub)` pair pings, reporting how long each took.
fn wait_reach(tag: &str, pairs: &[(&Host, &str)], timeout: Duration) -> Result<()> {
    for (h, s) in pairs {
        let (_, took) = wait_until(
            &format!("{} to reach {s}", h.name()),
            timeout,
            Duration::from_millis(50),
            || reaches(h, s).then_some(()),
        )?;
        eprintln!("{tag}: {} reached {s} after {took:?}", h.name());
    }
    Ok(())
}

/// a-b-d fast (2 ms per hop, direct veths with nothing added), a-c-d with
/// 0 extra delay too but c's links cost more: we check reachability, that
/// every node learns every stub, and the reroute after a silent failure.
fn square_learns_everything_and_reroutes() -> Result<()> {
    let mut t = offline("bsquare", &["a", "b", "c", "d"]);
    t.link("a", "b")
        .link("b", "d")
        .link("a", "c")
        .link("c", "d");
    let net = build_with_stubs(&t)?;
    let (a, b, c, d) = (
        net.host("a")?,
        net.host("b")?,
        net.host("c")?,
        net.host("d")?,
    );
    let stubs = [
        (a, "fd00:5a::1"),
        (b, "fd00:5b::1"),
        (c, "fd00:5c::1"),
        (d, "fd00:5d::1"),
    ];
    let _pa = ours(a, &["to-b", "to-c"], "fd00:5a::1", &[])?;
    let _pb = ours(b, &["to-a", "to-d"], "fd00:5b::1", &[])?;
    let _pc = ours(c, &["to-a", "to-d"], "fd00:5c::1", &[])?;
    let _pd = ours(d, &["to-b", "to-c"], "fd00:5d::1", &[])?;
    let (_, took) = wait_until(
        "a to reach d",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || reaches(a, "fd00:5d::1").then_some(()),
    )?;
    eprintln!("square: a reached d {took:?} after start");
    let all: Vec<_> = stubs
        .iter()
        .flat_map(|(h, _)| stubs.iter().map(move |(_, s)| (*h, *s)))
        .collect();
    wait_reach("square", &all, Duration::from_secs(10))?;
    let dev = route_dev(a, "fd00:5d::1", "fd00:5a::1")
        .ok_or_else(|| Error::Measure("no route a->d".into()))?;
    let (peer, peer_iface) = if dev == "to-b" {
        (b, "to-a")
    } else {
        (c, "to-a")
    };
    let probe = LossProbe::start(
        a,
        d,
        "fd00:5d::1"
            .parse()
            .map_err(|_| Error::Measure("addr".into()))?,
        Duration::from_millis(10),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    a.block_ingress(&dev)?;
    peer.block_ingress(peer_iface)?;
    std::thread::sleep(Duration::from_secs(4));
    let r = probe.stop(Duration::from_millis(300));
    let gap = r.longest_gap.as_secs_f64() * 1000.0;
    eprintln!(
        "square: silent failure of a's {dev}: longest gap {gap:.0} ms, {} of {} probes lost",
        r.lost, r.sent
    );
    check(
        gap < 5000.0,
        format!("traffic did not recover within 5 s: {r:?}"),
    )?;
    let now_dev = route_dev(a, "fd00:5d::1", "fd00:5a::1");
    check(
        now_dev.as_deref() != Some(dev.as_str()),
        format!("still routed via {dev}"),
    )?;
    check(reaches(a, "fd00:5d::1"), "a reaches d after the reroute")
}

/// A chain ours (a) – babeld (b) – ours (c): every stub learned in both
/// directions, ping over two hops through babeld.
fn interop_chain_with_babeld() -> Result<()> {
    let mut t = offline("bchain", &["a", "b", "c"]);
    t.link("a", "b").link("b", "c");
    let net = build_with_stubs(&t)?;
    let (a, b, c) = (net.host("a")?, net.host("b")?, net.host("c")?);
    let _pa = ours(a, &["to-b"], "fd00:5a::1", &[])?;
    let _pb = babeld(b, &net, &["to-a", "to-c"], "0.3", &[])?;
    let _pc = ours(c, &["to-b"], "fd00:5c::1", &[])?;
    wait_reach(
        "chain",
        &[
            (a, "fd00:5c::1"),
            (c, "fd00:5a::1"),
            (a, "fd00:5b::1"),
            (c, "fd00:5b::1"),
            (b, "fd00:5a::1"),
            (b, "fd00:5c::1"),
        ],
        Duration::from_secs(30),
    )?;
    let babel_routes = String::from_utf8_lossy(
        &b.run("ip", &["-6", "route", "show", "proto", "babel"])?
            .stdout,
    )
    .into_owned();
    check(
        babel_routes.contains("fd00:5a::1") && babel_routes.contains("fd00:5c::1"),
        format!("babeld's routes: {babel_routes}"),
    )?;
    let our_routes = String::from_utf8_lossy(
        &a.run("ip", &["-6", "route", "show", "proto", "113"])?
            .stdout,
    )
    .into_owned();
    check(
        our_routes.contains("fd00:5b::1") && our_routes.contains("fd00:5c::1"),
        format!("our routes on a: {our_routes}"),
    )
}

/// A mixed triangle: ours (a, c) and babeld (b), all linked.
fn interop_mixed_triangle() -> Result<()> {
    let mut t = offline("btri", &["a", "b", "c"]);
    t.link("a", "b").link("b", "c").link("a", "c");
    let net = build_with_stubs(&t)?;
    let (a, b, c) = (net.host("a")?, net.host("b")?, net.host("c")?);
    let _pa = ours(a, &["to-b", "to-c"], "fd00:5a::1", &[])?;
    let _pb = babeld(b, &net, &["to-a", "to-c"], "0.3", &[])?;
    let _pc = ours(c, &["to-a", "to-b"], "fd00:5c::1", &[])?;
    wait_reach(
        "triangle",
        &[
            (a, "fd00:5b::1"),
            (a, "fd00:5c::1"),
            (b, "fd00:5a::1"),
            (b, "fd00:5c::1"),
            (c, "fd00:5a::1"),
            (c, "fd00:5b::1"),
        ],
        Duration::from_secs(30),
    )?;
    Ok(())
}

/// The chain with RFC 8967 HMAC-SHA256 on every node: babeld accepts our
/// MACs (and answers our challenges) and we accept its.
fn interop_chain_with_hmac() -> Result<()> {
    let mut t = offline("bhmac", &["a", "b", "c", "e"]);
    t.link("a", "b").link("b", "c").link("e", "b");
    let net = build_with_stubs(&t)?;
    let (a, b, c, e) = (
        net.host("a")?,
        net.host("b")?,
        net.host("c")?,
        net.host("e")?,
    );
    let hex: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
    let keyfile = net.log_dir().join("hmac.keys");
    std::fs::write(&keyfile, format!("# test key\nhmac-sha256 {hex}\n"))
        .map_err(|e| Error::io("writing keys", e))?;
    let kf = keyfile.to_string_lossy().into_owned();
    let _pa = ours(a, &["to-b"], "fd00:5a::1", &["--hmac-key-file", &kf])?;
    let key_stmt = format!("key id k1 type hmac-sha256 value {hex}");
    let _pb = babeld(
        b,
        &net,
        &["to-a", "to-c", "to-e"],
        "0.3",
        &[&key_stmt, "default key k1"],
    )?;
    // e has another key: it must learn nothing, and inject nothing.
    let wrong = net.log_dir().join("wrong.keys");
    std::fs::write(&wrong, format!("hmac-sha256 {}\n", "ab".repeat(32)))
        .map_err(|e| Error::io("writing keys", e))?;
    let _pe = ours(
        e,
        &["to-b"],
        "fd00:5e::1",
        &["--hmac-key-file", &wrong.to_string_lossy()],
    )?;
    let _pc = ours(c, &["to-b"], "fd00:5c::1", &["--hmac-key-file", &kf])?;
    wait_reach(
        "hmac chain",
        &[
            (a, "fd00:5c::1"),
            (c, "fd00:5a::1"),
            (a, "fd00:5b::1"),
            (b, "fd00:5a::1"),
        ],
        Duration::from_secs(30),
    )?;
    check(
        !reaches(e, "fd00:5a::1") && !reaches(a, "fd00:5e::1"),
        "a node with another key got routes",
    )?;
    let routes = String::from_utf8_lossy(
        &b.run("ip", &["-6", "route", "show", "proto", "babel"])?
            .stdout,
    )
    .into_owned();
    check(
        !routes.contains("fd00:5e::1"),
        format!("babeld accepted routes signed with another key: {routes}"),
    )
}

/// RTT preference through babeld: a(ours)–b(babeld)–c(ours) with 5 ms
/// links, and a direct a–c link of 60 ms. By hop count the direct link
/// wins; by RTT the two hops through babeld do. Then the fast path breaks
/// and traffic takes the slow direct link.
fn interop_rtt_preference_through_babeld() -> Result<()> {
    let mut t = offline("brtt", &["a", "b", "c"]);
    t.link_emulated("a", "b", LinkParams::delay_ms(5))
        .link_emulated("b", "c", LinkParams::delay_ms(5))
        .link_emulated("a", "c", LinkParams::delay_ms(60));
    let net = build_with_stubs(&t)?;
    let (a, b, c) = (net.host("a")?, net.host("b")?, net.host("c")?);
    let _pa = ours(a, &["to-b", "to-c"], "fd00:5a::1", &[])?;
    let _pb = babeld(b, &net, &["to-a", "to-c"], "0.3", &[])?;
    let _pc = ours(c, &["to-a", "to-b"], "fd00:5c::1", &[])?;
    let (_, took) = wait_until(
        "a to route c via b (lower RTT)",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            (route_dev(a, "fd00:5c::1", "fd00:5a::1").as_deref() == Some("to-b")
                && route_dev(c, "fd00:5a::1", "fd00:5c::1").as_deref() == Some("to-b"))
            .then_some(())
        },
    )?;
    eprintln!("rtt: a and c route via babeld (2 x 5 ms) rather than direct (60 ms) after {took:?}");
    let rtt = ping(
        a,
        "fd00:5c::1"
            .parse()
            .map_err(|_| Error::Measure("addr".into()))?,
        5,
        Duration::from_millis(50),
    )?;
    check(
        rtt.received == 5 && rtt.avg.is_some_and(|d| d < Duration::from_millis(40)),
        format!("RTT a->c {rtt:?}"),
    )?;
    net.link("a", "b")?.blackhole("a", "b")?;
    let (_, took) = wait_until(
        "a to fall back to the direct link",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || (route_dev(a, "fd00:5c::1", "fd00:5a::1").as_deref() == Some("to-c")).then_some(()),
    )?;
    eprintln!("rtt: after breaking a-b, a uses the 60 ms direct link after {took:?}");
    // The way back depends on babeld noticing the break too.
    let (_, took) = wait_until(
        "a to reach c over the slow link",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || reaches(a, "fd00:5c::1").then_some(()),
    )?;
    eprintln!("rtt: a reaches c again {took:?} later");
    Ok(())
}

fn our_routes(h: &netns_tests::Host) -> Result<String> {
    Ok(String::from_utf8_lossy(
        &h.run("ip", &["-6", "route", "show", "proto", "113"])?
            .stdout,
    )
    .into_owned())
}

/// SIGTERM: our routes leave the kernel and the neighbour stops forwarding
/// to the retracted prefix at once (holding it unreachable). SIGKILL leaves
/// stale routes, which the next start removes.
fn kernel_routes_cleaned_at_exit_and_start() -> Result<()> {
    let mut t = offline("bclean", &["a", "b"]);
    t.link("a", "b");
    let net = build_with_stubs(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let mut pa = ours(a, &["to-b"], "fd00:5a::1", &[])?;
    let mut pb = ours(b, &["to-a"], "fd00:5b::1", &[])?;
    wait_until(
        "a to route b",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            our_routes(a)
                .ok()
                .filter(|r| r.contains("fd00:5b::1"))
                .map(|_| ())
        },
    )?;
    wait_until(
        "b to route a",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            our_routes(b)
                .ok()
                .filter(|r| r.contains("fd00:5a::1"))
                .map(|_| ())
        },
    )?;
    // Crash of a: its routes stay in the kernel; the next start removes them.
    pa.kill()?;
    check(
        our_routes(a)?.contains("fd00:5b::1"),
        "a's routes survive a SIGKILL",
    )?;
    let pa2 = ours(a, &["to-b"], "fd00:5a::1", &[])?;
    wait_until(
        "a's restart to flush its stale routes",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || pa2.log().contains("removed stale routes").then_some(()),
    )?;
    wait_until(
        "a to route b again",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            our_routes(a)
                .ok()
                .filter(|r| r.contains("fd00:5b::1"))
                .map(|_| ())
        },
    )?;
    // Clean exit of b: no route of b's left, and a drops b's prefix at once.
    pb.signal(libc::SIGTERM)?;
    pb.wait_timeout(Duration::from_secs(5))?;
    check(
        our_routes(b)?.trim().is_empty(),
        format!("b left routes: {}", our_routes(b)?),
    )?;
    // a stops forwarding to b at once, and holds b's prefix unreachable
    // while the retraction is advertised (RFC 8966 §3.5.4): packets for it
    // must not fall through to a shorter route.
    let (_, took) = wait_until(
        "a to hold b's prefix unreachable",
        Duration::from_secs(3),
        Duration::from_millis(10),
        || {
            our_routes(a)
                .ok()
                .filter(|r| {
                    r.lines()
                        .filter(|l| l.contains("fd00:5b::1"))
                        .all(|l| l.starts_with("unreachable"))
                })
                .map(|_| ())
        },
    )?;
    eprintln!("clean exit: a holds b's route unreachable {took:?} after b's SIGTERM");
    Ok(())
}

fn main() -> ExitCode {
    run_suite(&[
        (
            "square_learns_everything_and_reroutes",
            square_learns_everything_and_reroutes,
        ),
        ("interop_chain_with_babeld", interop_chain_with_babeld),
        ("interop_mixed_triangle", interop_mixed_triangle),
        ("interop_chain_with_hmac", interop_chain_with_hmac),
        (
            "kernel_routes_cleaned_at_exit_and_start",
            kernel_routes_cleaned_at_exit_and_start,
        ),
        (
            "interop_rtt_preference_through_babeld",
            interop_rtt_preference_through_babeld,
        ),
    ])
}
