//! The misbehaving member (issue 13): an enrolled node whose software
//! announces what it must not, floods, replays, forges refusals and keeps
//! its tunnels after its revocation. The other nodes keep routing
//! correctly, grow nothing without bound, and count every refusal.

use std::process::ExitCode;
use std::time::Duration;

use netns_tests::mesh::Mesh;
use netns_tests::probe::{wait_until, LossProbe};
use netns_tests::testing::{check, run_suite};
use netns_tests::{cleanup, Error, LinkParams, Result, Topology};
use re6st_routing::driver::format_router_id;
use re6st_routing::router::node_router_id;

/// The honest nodes; the rogue is enrolled after them.
const HONEST: usize = 4;
const ROGUE: usize = HONEST;

/// One counter of node `i`'s `/metrics` (0 when absent).
fn counter(m: &Mesh, i: usize, name: &str, reason: &str) -> u64 {
    let Ok(text) = re6stnet::ctl::fetch(&m.nodes[i].ctl, "/metrics") else {
        return 0;
    };
    let prefix = format!("re6st_{name}{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `counter` summed over the honest nodes.
fn honest_total(m: &Mesh, name: &str, reason: &str) -> u64 {
    (0..HONEST).map(|i| counter(m, i, name, reason)).sum()
}

/// The overlay routes node `i`'s kernel holds.
fn kernel_routes(m: &Mesh, i: usize) -> Result<String> {
    let o = m.host(i)?.run(
        "ip",
        &["-6", "route", "show", "table", "all", "proto", "113"],
    )?;
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Honest pairs that cannot ping each other.
fn honest_unreachable(m: &Mesh) -> Vec<(usize, usize)> {
    (0..HONEST)
        .flat_map(|i| (0..HONEST).map(move |j| (i, j)))
        .filter(|&(i, j)| i != j && !m.ping(i, j, 2))
        .collect()
}

fn rss(m: &Mesh, i: usize) -> Result<u64> {
    m.pid(i)
        .and_then(netns_tests::babel::rss_kib)
        .ok_or_else(|| Error::Measure(format!("{}'s RSS", m.nodes[i].name)))
}

/// `r6t-rogue setup` against n1 from `from`, with `extra` flags.
fn flood_n1(m: &Mesh, from: &[String], extra: &[&str]) -> Result<String> {
    let dir = m.nodes[ROGUE].dir.to_string_lossy().into_owned();
    let target = format!("[{}]:326", m.host(0)?.addr(true)?);
    let cert = m.nodes[0]
        .dir
        .join("node.crt")
        .to_string_lossy()
        .into_owned();
    let mut args = vec![
        "setup",
        "--dir",
        &dir,
        "--to",
        &target,
        "--target-cert",
        &cert,
    ];
    for s in from {
        args.extend(["--from", s.as_str()]);
    }
    args.extend_from_slice(extra);
    rogue(m, &args)
}

fn rogue(m: &Mesh, args: &[&str]) -> Result<String> {
    let bin = netns_tests::binary("r6t-rogue")?;
    let o = m.host(ROGUE)?.run(&bin.to_string_lossy(), args)?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Four honest nodes and a rogue member. The rogue announces the
/// default route, a prefix outside the network, the network itself, a
/// more specific part of n2's prefix and n2's prefix; floods n1 with
/// set-up requests from 32 addresses of its /64, replays a set-up
/// request and a peer message, sends signed refusals nobody asked for;
/// is revoked, stopped while its peers cut it off and resumed with its
/// stale tunnels. Throughout, every honest node routes n2's prefix to
/// n2 and reaches every other honest node; n1's memory stays flat; each
/// kind of refusal shows in `/metrics`.
fn a_misbehaving_member_changes_nothing_for_the_others() -> Result<()> {
    let mut t = Topology::new("rogue");
    t.host("reg");
    for i in 1..=HONEST {
        t.host(&format!("n{i}"));
    }
    t.host("rogue");
    t.default_wan(LinkParams::delay_ms(5));
    let names: Vec<String> = (1..=HONEST).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let flags = ["--config-refresh", "5"];
    let mut m = Mesh::start(&t, "reg", &names, &[], &flags)?;
    m.enrol("rogue", &flags)?;
    let victim = m.nodes[1].prefix.clone();
    let victim_net: ipnet::Ipv6Net = victim
        .parse()
        .map_err(|e| Error::Measure(format!("{victim}: {e}")))?;
    let part = format!("{}/80", victim_net.network());
    let forged = [
        "::/0",
        "fd99::/32",
        "fd5e:5e::/48",
        part.as_str(),
        victim.as_str(),
    ];
    let mut command = vec!["r6t-rogue".to_string(), "node".into()];
    for p in forged {
        command.extend(["--export".into(), p.to_string()]);
    }
    m.nodes[ROGUE].command = command;
    m.start_node(ROGUE)?;
    // The rogue cannot reach n2, nor answer it (it claims n2's prefix
    // for itself); the others reach each other and the rogue.
    let (_, took) = wait_until(
        "honest nodes reaching each other and the rogue",
        Duration::from_secs(40),
        Duration::from_millis(500),
        || {
            (honest_unreachable(&m).is_empty() && [0, 2, 3].iter().all(|&i| m.ping(i, ROGUE, 2)))
                .then_some(())
        },
    )?;
    eprintln!("rogue: honest nodes reach each other and the rogue after {took:?}");

    // What it announced is refused by every neighbour, by reason.
    let (_, _) = wait_until(
        "the forged announcements refused by reason",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            [
                "default_route",
                "outside_network",
                "too_specific",
                "wrong_origin",
            ]
            .iter()
            .all(|r| honest_total(&m, "babel_dropped_total", r) > 0)
            .then_some(())
        },
    )?;
    let owner = format_router_id(&node_router_id(victim_net));
    for i in (0..HONEST).filter(|&i| i != 1) {
        let routes = kernel_routes(&m, i)?;
        // The network's own unreachable cover route is ours, not forged.
        let forged_here = routes
            .lines()
            .filter(|l| !l.starts_with("unreachable"))
            .any(|l| {
                ["default", "fd99:", "/80", "fd5e:5e::/48"]
                    .iter()
                    .any(|b| l.contains(b))
            });
        check(
            !forged_here,
            format!("{} installed a forged route:\n{routes}", m.nodes[i].name),
        )?;
        let to_victim = m.routes_to(i, 1);
        check(
            !to_victim.is_empty()
                && to_victim
                    .iter()
                    .all(|r| r["router_id"].as_str() == Some(owner.as_str())),
            format!(
                "{}'s routes to n2 are not n2's own: {to_victim:?}",
                m.nodes[i].name
            ),
        )?;
    }
    let lost = honest_unreachable(&m);
    check(
        lost.is_empty(),
        format!("honest pairs unreachable: {lost:?}"),
    )?;

    // Floods, replays and forged refusals at n1.
    let rss_before = rss(&m, 0)?;
    let rejected = |reason: &str| counter(&m, 0, "rejected_packets_total", reason);
    let replays_before = rejected("setup_replay");
    let base = match m.host(ROGUE)?.addr(true)? {
        std::net::IpAddr::V6(a) => u128::from(a) & !0xffff_u128,
        other => return Err(Error::Measure(format!("rogue underlay {other}"))),
    };
    let sources: Vec<String> = (0..32u128)
        .map(|k| std::net::Ipv6Addr::from(base | 0x1000 | k).to_string())
        .collect();
    let add: Vec<String> = sources
        .iter()
        .map(|a| format!("addr add {a}/64 dev eth0 nodad"))
        .collect();
    netns_tests::netns::ip_batch(Some(m.host(ROGUE)?.ns()), true, &add)?;
    let rogue_dir = m.nodes[ROGUE].dir.to_string_lossy().into_owned();
    let probe = LossProbe::start(
        m.host(1)?,
        m.host(0)?,
        m.address(0),
        Duration::from_millis(10),
    )?;
    eprintln!("rogue: {}", flood_n1(&m, &sources, &["--requests", "20"])?);
    let n1_prefix = m.nodes[0].prefix.clone();
    eprintln!(
        "rogue: {}",
        rogue(&m, &["peer", "--dir", &rogue_dir, "--target", &n1_prefix])?
    );
    let r = probe.stop(Duration::from_millis(500));
    let rss_after = rss(&m, 0)?;
    eprintln!(
        "rogue flood: n1 lost {} of {} probes from n2 (longest gap {:?}); RSS {rss_before} -> {rss_after} KiB",
        r.lost, r.sent, r.longest_gap
    );
    check(
        r.lost * 100 <= r.sent * 2,
        format!("{} of {} probes lost during the flood", r.lost, r.sent),
    )?;
    // The 4 replays on top of what was counted before (honest copies of
    // one request to two endpoints count too).
    let counts = [
        ("setup_rate_limited", 600),
        ("setup_replay", replays_before + 4),
        ("setup_reply", 4),
        ("peer_replay", 5),
    ];
    // The control API's snapshot is a second old at most.
    let counted = wait_until(
        "n1 counting each refusal",
        Duration::from_secs(5),
        Duration::from_millis(200),
        || {
            counts
                .iter()
                .all(|&(reason, at_least)| rejected(reason) >= at_least)
                .then_some(())
        },
    );
    let seen: Vec<(&str, u64)> = counts.iter().map(|&(r, _)| (r, rejected(r))).collect();
    eprintln!("rogue: n1 refused {seen:?}");
    counted?;
    let status = m.ctl(0, "/status")?;
    check(
        status["node"]["revoked"] != true,
        format!("a forged refusal revoked n1: {status}"),
    )?;

    // Revoked, the rogue keeps its side of its tunnels (stopped while its
    // peers apply the CRL, then resumed): nothing passes, nothing is rebuilt.
    let rogue_prefix = m.nodes[ROGUE].prefix.clone();
    let pid = m
        .pid(ROGUE)
        .ok_or_else(|| Error::Measure("the rogue's pid".into()))?;
    m.host(ROGUE)?.run("kill", &["-STOP", &pid.to_string()])?;
    m.registry_cmd(&["revoke", &rogue_prefix])?;
    let (_, took) = wait_until(
        "no honest tunnel to the revoked rogue",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            (0..HONEST)
                .all(|i| !m.tunnel_peers(i).contains(&rogue_prefix))
                .then_some(())
        },
    )?;
    eprintln!("rogue: revoked, cut off after {took:?}");
    let stale_before = honest_total(&m, "rejected_packets_total", "wireguard_unknownlink");
    m.host(ROGUE)?.run("kill", &["-CONT", &pid.to_string()])?;
    eprintln!(
        "rogue: {}",
        flood_n1(
            &m,
            &sources[..1],
            &["--requests", "1", "--replays", "0", "--refusals", "0"],
        )?
    );
    cleanup::sleep(Duration::from_secs(10))?;
    for i in 0..HONEST {
        check(
            !m.tunnel_peers(i).contains(&rogue_prefix),
            format!("{} rebuilt a tunnel to the revoked rogue", m.nodes[i].name),
        )?;
        check(!m.ping(i, ROGUE, 1), "the revoked rogue is unreachable")?;
    }
    check(
        rejected("setup_revoked") > 0,
        "n1 did not count the revoked rogue's request",
    )?;
    let stale = honest_total(&m, "rejected_packets_total", "wireguard_unknownlink")
        .saturating_sub(stale_before);
    eprintln!("rogue: {stale} datagrams of its stale tunnels refused");
    check(
        stale > 0,
        "the rogue's stale tunnels sent nothing the others refused",
    )?;
    let lost = honest_unreachable(&m);
    check(
        lost.is_empty(),
        format!("honest pairs unreachable: {lost:?}"),
    )?;
    let rss_end = rss(&m, 0)?;
    eprintln!("rogue: n1 RSS {rss_before} -> {rss_after} -> {rss_end} KiB");
    check(
        rss_end < rss_before + 16 * 1024,
        format!("n1's RSS grew from {rss_before} to {rss_end} KiB"),
    )
}

fn main() -> ExitCode {
    run_suite(&[(
        "a_misbehaving_member_changes_nothing_for_the_others",
        a_misbehaving_member_changes_nothing_for_the_others,
    )])
}
