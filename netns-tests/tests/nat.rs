//! Edge nodes behind NAT routers (issue 15): nodes learn their public
//! endpoint from what their peers see, two nodes behind cone NATs punch a
//! direct tunnel, nodes behind symmetric NATs stay clients the mesh
//! routes for, and a node whose network drops UDP joins over TCP.
//!
//! Every site is an Internet host `rK` (nftables masquerade, nothing let in
//! unasked) with one node `a` or `b` on an IPv4-only LAN behind it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netns_tests::mesh::Mesh;
use netns_tests::net::NatKind;
use netns_tests::probe::{iperf3, ping, wait_until};
use netns_tests::testing::{check, run_suite};
use netns_tests::{LinkParams, Result, Topology};
use serde_json::Value;

/// Three public nodes, the registry, and two NAT sites: `a` behind `r1`
/// (its LAN is `lan0`), `b` behind `r2` (`lan1`).
fn topology(tag: &str) -> Topology {
    let mut t = Topology::new(tag);
    for h in ["reg", "n1", "n2", "n3", "r1", "r2"] {
        t.host(h);
    }
    t.host_offline("a").host_offline("b");
    t.lan("home1", &["r1", "a"]).lan("home2", &["r2", "b"]);
    t.default_wan(LinkParams::delay_ms(10));
    t
}

/// The public nodes running, both NAT routers set up.
fn start(tag: &str, kind: NatKind) -> Result<Mesh> {
    let m = Mesh::start(&topology(tag), "reg", &["n1", "n2", "n3"], &[], &[])?;
    for (router, node, lan) in [("r1", "a", "lan0"), ("r2", "b", "lan1")] {
        let r = m.net.host(router)?;
        r.nat_router(lan, "eth0", kind)?;
        m.net.host(node)?.behind(lan, r.iface(lan)?.v4.addr())?;
    }
    Ok(m)
}

/// The public endpoint of the tunnel socket of a node behind `router`.
fn mapped(m: &Mesh, router: &str) -> Result<SocketAddr> {
    Ok(SocketAddr::new(m.net.host(router)?.addr(false)?, 326))
}

/// Enrols and starts `name` with `flags`; returns its index.
fn join(m: &mut Mesh, name: &str, flags: &[&str]) -> Result<usize> {
    m.enrol(name, flags)?;
    let i = m.index(name)?;
    m.start_node(i)?;
    Ok(i)
}

/// What node `i` says peers see of it over IPv4, once it says `want`.
fn wait_seen(m: &Mesh, i: usize, want: &str) -> Result<Value> {
    let (status, took) = wait_until(
        &format!("{} to say peers see it as {want}", m.nodes[i].name),
        Duration::from_secs(40),
        Duration::from_millis(200),
        || {
            let s = m.ctl(i, "/status").ok()?;
            (s["node"]["seen"][0] == want).then_some(s)
        },
    )?;
    eprintln!("nat: {} seen as {want} after {took:?}", m.nodes[i].name);
    Ok(status)
}

/// Node `i`'s up tunnel to node `j`, if any.
fn tunnel(m: &Mesh, i: usize, j: usize) -> Option<Value> {
    let tunnels = m.ctl(i, "/tunnels").ok()?;
    tunnels
        .as_array()?
        .iter()
        .find(|t| t["peer"] == m.nodes[j].prefix.as_str() && t["up"] == true)
        .cloned()
}

/// `a` learns its mapping from two peers and announces it instead of its
/// LAN address; `b`, told to keep a tunnel to `a`, gets a direct tunnel
/// through both NATs: whichever dials first asks the other, over the
/// overlay, to punch; again after `a` is killed with SIGKILL and
/// restarted.
fn two_nodes_behind_nats_punch_a_direct_tunnel() -> Result<()> {
    let mut m = start("natcone", NatKind::Cone)?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let a = join(&mut m, "a", &[])?;
    let (at_a, at_b) = (mapped(&m, "r1")?, mapped(&m, "r2")?);
    let status = wait_seen(&m, a, &format!("nat {at_a}"))?;
    check(
        status["node"]["endpoints"] == serde_json::json!([at_a.to_string()]),
        format!("a announces {}", status["node"]["endpoints"]),
    )?;
    let neighbour = m.nodes[a].prefix.clone();
    let started = Instant::now();
    let b = join(&mut m, "b", &["--neighbour", &neighbour])?;
    let (t, took) = wait_until(
        "b's direct tunnel to a",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || tunnel(&m, b, a),
    )?;
    eprintln!(
        "nat: b has a direct tunnel to a {:?} after b's start ({took:?} of waiting)",
        started.elapsed()
    );
    check(
        t["endpoint"] == at_a.to_string() && t["transport"] == "udp",
        format!("b reaches a at {} over {}", t["endpoint"], t["transport"]),
    )?;
    let (back, _) = wait_until(
        "a's end of the tunnel",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || tunnel(&m, a, b),
    )?;
    check(
        back["endpoint"] == at_b.to_string(),
        format!("a reaches b at {}", back["endpoint"]),
    )?;
    check(m.ping(b, a, 5), "b pings a over the overlay")?;
    check(m.ping(a, b, 5), "a pings b over the overlay")?;
    // SIGKILL: the restarted `a` learns its mapping again and the two
    // punch a new direct tunnel.
    m.kill_node(a)?;
    let restarted = Instant::now();
    m.start_node(a)?;
    let (back, took) = wait_until(
        "a's direct tunnel to b after a's restart",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || tunnel(&m, a, b),
    )?;
    eprintln!(
        "nat: a killed and restarted: direct tunnel to b {:?} after the restart ({took:?} of waiting)",
        restarted.elapsed()
    );
    check(
        back["endpoint"] == at_b.to_string(),
        format!("after the restart a reaches b at {}", back["endpoint"]),
    )?;
    check(m.ping(b, a, 5), "b pings the restarted a")
}

/// Behind NATs that give every flow another port, peers disagree on
/// where they see `a` and `b`: both stop announcing an endpoint (clients,
/// as re6st's NATed nodes) and reach each other through the mesh.
fn nodes_behind_symmetric_nats_reach_each_other_through_the_mesh() -> Result<()> {
    let mut m = start("natsym", NatKind::Symmetric)?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let a = join(&mut m, "a", &[])?;
    let status = wait_seen(&m, a, "unreachable")?;
    check(
        status["node"]["endpoints"] == serde_json::json!([]),
        format!("a announces {}", status["node"]["endpoints"]),
    )?;
    let neighbour = m.nodes[a].prefix.clone();
    let b = join(&mut m, "b", &["--neighbour", &neighbour])?;
    wait_seen(&m, b, "unreachable")?;
    let took = m.wait_full_reachability(Duration::from_secs(30))?;
    eprintln!("nat: symmetric NATs, full reachability {took:?} later");
    check(m.ping(b, a, 5), "b pings a through the mesh")?;
    check(
        tunnel(&m, b, a).is_none(),
        "no direct tunnel can cross two symmetric NATs",
    )
}

/// `r1` lets only TCP out: `a` gets no answer over UDP, opens its
/// tunnels over TCP to the same ports, and the mesh routes for it. The
/// TCP transport's cost shows in the RTT, measured here against a node
/// over UDP with the same WAN delays, without and with loss. Then `a`,
/// and `n1` at the other end of one of its TCP tunnels, are killed with
/// SIGKILL and restarted: the mesh reaches them again, `a` over TCP.
fn a_node_whose_udp_is_blocked_joins_over_tcp() -> Result<()> {
    let mut m = start("natudp", NatKind::Cone)?;
    m.net.host("r1")?.block_forwarded_udp("lan0")?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let started = Instant::now();
    let a = join(&mut m, "a", &[])?;
    let took = m.wait_full_reachability(Duration::from_secs(60))?;
    eprintln!(
        "tcp: a reaches everyone {:?} after its start ({took:?} of waiting)",
        started.elapsed()
    );
    all_up_over_tcp(&m, a)?;
    let n1 = m.index("n1")?;
    let n2 = m.index("n2")?;
    let to_n1 = m.address(n1);
    let (over_tcp, over_udp) = (
        ping(m.host(a)?, to_n1, 20, Duration::from_millis(50))?,
        ping(m.host(n2)?, to_n1, 20, Duration::from_millis(50))?,
    );
    eprintln!(
        "tcp: ping to n1 over the overlay, a (TCP, via r1) {:?} avg, {} of 20; n2 (UDP) {:?} avg, {} of 20",
        over_tcp.avg, over_tcp.received, over_udp.avg, over_udp.received
    );
    check(over_tcp.received >= 18, "a's pings over TCP came back")?;
    let (tcp_mbps, udp_mbps) = (throughput(&m, a, n1)?, throughput(&m, n2, n1)?);
    eprintln!(
        "tcp: iperf3 to n1 over the overlay, 3 s: a (TCP transport) {tcp_mbps:.0} Mbit/s, n2 (UDP) {udp_mbps:.0} Mbit/s"
    );
    // The same with 1% loss each way on every Internet path of r1 (a's
    // site) and of n2: TCP retransmits what UDP loses.
    let wan = m.net.wan()?;
    let lossy = LinkParams {
        loss: 0.01,
        ..LinkParams::delay_ms(10)
    };
    set_site_paths(wan, lossy)?;
    let (over_tcp, over_udp) = (
        ping(m.host(a)?, to_n1, 100, Duration::from_millis(20))?,
        ping(m.host(n2)?, to_n1, 100, Duration::from_millis(20))?,
    );
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    eprintln!(
        "tcp: 1% loss: ping to n1, a (TCP) avg {:.1} max {:.1} ms, {} of 100; n2 (UDP) avg {:.1} max {:.1} ms, {} of 100",
        ms(over_tcp.avg),
        ms(over_tcp.max),
        over_tcp.received,
        ms(over_udp.avg),
        ms(over_udp.max),
        over_udp.received
    );
    let (tcp_mbps, udp_mbps) = (throughput(&m, a, n1)?, throughput(&m, n2, n1)?);
    eprintln!(
        "tcp: 1% loss: iperf3 to n1, 3 s: a (TCP transport) {tcp_mbps:.0} Mbit/s, n2 (UDP) {udp_mbps:.0} Mbit/s"
    );
    check(
        over_tcp.received >= 90,
        format!(
            "a's pings over TCP with 1% loss: {} of 100",
            over_tcp.received
        ),
    )?;
    set_site_paths(wan, LinkParams::delay_ms(10))?;
    // SIGKILL at either end of TCP tunnels: the dead streams are noticed
    // and the restarted node is reached over TCP again.
    for (i, name) in [(a, "a"), (n1, "n1")] {
        m.kill_node(i)?;
        let restarted = Instant::now();
        m.start_node(i)?;
        m.wait_full_reachability(Duration::from_secs(60))?;
        eprintln!(
            "tcp: {name} killed and restarted: full reachability {:?} after the restart",
            restarted.elapsed()
        );
    }
    all_up_over_tcp(&m, a)
}

/// Node `i` has tunnels up, all over TCP.
fn all_up_over_tcp(m: &Mesh, i: usize) -> Result<()> {
    let tunnels = m.ctl(i, "/tunnels")?;
    let up: Vec<&Value> = tunnels
        .as_array()
        .map(|t| t.iter().filter(|t| t["up"] == true).collect())
        .unwrap_or_default();
    check(
        !up.is_empty() && up.iter().all(|t| t["transport"] == "tcp"),
        format!("{}'s tunnels: {tunnels}", m.nodes[i].name),
    )
}

/// Sets every Internet path of `r1` (a's site) and of `n2`, both ways.
fn set_site_paths(wan: &netns_tests::wan::WanHandle, params: LinkParams) -> Result<()> {
    for from in ["r1", "n2"] {
        for to in ["reg", "n1", "n2", "n3", "r1", "r2"]
            .into_iter()
            .filter(|h| *h != from)
        {
            wan.set_both(from, to, params)?;
        }
    }
    Ok(())
}

/// Mbit/s of one iperf3 TCP stream from node `i` to node `j` over the
/// overlay for 3 s (a figure for the log: the WAN emulator shapes it).
fn throughput(m: &Mesh, i: usize, j: usize) -> Result<f64> {
    let report = iperf3(m.host(i)?, m.host(j)?, m.address(j), 3)?;
    Ok(report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6)
}

fn main() -> ExitCode {
    run_suite(&[
        (
            "two_nodes_behind_nats_punch_a_direct_tunnel",
            two_nodes_behind_nats_punch_a_direct_tunnel,
        ),
        (
            "nodes_behind_symmetric_nats_reach_each_other_through_the_mesh",
            nodes_behind_symmetric_nats_reach_each_other_through_the_mesh,
        ),
        (
            "a_node_whose_udp_is_blocked_joins_over_tcp",
            a_node_whose_udp_is_blocked_joins_over_tcp,
        ),
    ])
}
