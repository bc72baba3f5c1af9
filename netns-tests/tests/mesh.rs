//! End-to-end: a registry and re6stnet nodes in namespaces over the
//! emulated Internet (issue 6's tests).

use std::process::ExitCode;
use std::time::Duration;

use netns_tests::mesh::{random_topology, Mesh};
use netns_tests::probe::{iperf3, wait_until, LossProbe};
use netns_tests::testing::{check, run_suite};
use netns_tests::{cleanup, LinkParams, Result, Topology};

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}")).collect()
}

fn topology(tag: &str, n: usize, delay_ms: u64) -> Topology {
    let mut t = Topology::new(tag);
    t.host("reg");
    for name in names(n) {
        t.host(&name);
    }
    t.default_wan(LinkParams::delay_ms(delay_ms));
    t
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// What `ip ARGS` prints in node 0.
fn ip_show(m: &Mesh, args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&m.host(0)?.run("ip", args)?.stdout).into_owned())
}

/// Four nodes over a uniform WAN: everyone routes to and pings everyone;
/// the `--up` command ran with the node's addresses; re6stctl answers; a
/// clean stop leaves no route or address behind.
fn four_nodes_reach_each_other() -> Result<()> {
    let n = names(4);
    let t = topology("mesh4", 4, 5);
    let up = [
        "--up",
        "echo \"$RE6ST_ADDRESS $RE6ST_PREFIX\" > \"$RE6ST_STATE_DIR/up.txt\"",
    ];
    let mut m = Mesh::start(&t, "reg", &refs(&n), &[], &up)?;
    let took = m.wait_full_reachability(Duration::from_secs(30))?;
    eprintln!("4 nodes: full reachability after {took:?}");
    let hook = std::fs::read_to_string(m.nodes[0].dir.join("state/up.txt")).unwrap_or_default();
    check(
        hook.trim() == format!("{} {}", m.nodes[0].address, m.nodes[0].prefix),
        format!("the up command wrote {hook:?}"),
    )?;
    let status = m.ctl(0, "/status")?;
    check(
        status["node"]["prefix"] == m.nodes[0].prefix.as_str(),
        format!("status: {status}"),
    )?;
    // Garbage and unsigned peer-protocol messages are dropped and counted.
    let to = format!("/dev/udp/{}/326", m.nodes[0].address);
    for payload in ["R6P1{\\\"bad", "R6P1{}", "R6T1xx"] {
        m.host(1)?.run(
            "bash",
            &["-c", &format!("printf '%s' \"{payload}\" > {to}")],
        )?;
    }
    let (_, _) = wait_until(
        "the garbage counted",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let text = re6stnet::ctl::fetch(&m.nodes[0].ctl, "/metrics").ok()?;
            text.contains("re6st_rejected_packets_total{reason=\"peer_malformed\"} 2")
                .then_some(())
        },
    )?;
    check(m.ping(1, 0, 2), "still reachable after garbage")?;
    // Overlay routes live in their own table, selected for the network
    // only: nothing in main a member could steer.
    let ours = ip_show(&m, &["-6", "route", "show", "table", "326", "proto", "113"])?;
    check(
        ours.contains(&m.nodes[1].prefix),
        format!("overlay table: {ours}"),
    )?;
    let main = ip_show(
        &m,
        &["-6", "route", "show", "table", "main", "proto", "113"],
    )?;
    check(main.is_empty(), format!("overlay routes in main: {main}"))?;
    let rules = ip_show(&m, &["-6", "rule"])?;
    check(
        rules.contains("to fd5e:5e::/48 lookup 326"),
        format!("rules: {rules}"),
    )?;
    check(m.stop_node(0)?, "clean stop exits 0")?;
    let host = m.host(0)?;
    let routes = ip_show(&m, &["-6", "route", "show", "table", "all", "proto", "113"])?;
    check(routes.is_empty(), format!("routes left: {routes}"))?;
    let rules = ip_show(&m, &["-6", "rule"])?;
    check(!rules.contains("lookup 326"), format!("rule left: {rules}"))?;
    let addrs = host.run("ip", &["-6", "addr", "show", "dev", "lo"])?;
    check(
        !String::from_utf8_lossy(&addrs.stdout).contains("fd5e:5e"),
        "node address removed",
    )?;
    let links = host.run("ip", &["link"])?;
    check(
        !String::from_utf8_lossy(&links.stdout).contains("re6st-"),
        "tunnel devices removed",
    )?;
    Ok(())
}

/// Twelve nodes, a random latency matrix (5..60 ms one way), 10% of the
/// direct paths blackholed: every pair reachable within 20 s of start.
fn twelve_nodes_around_broken_paths() -> Result<()> {
    let (t, matrix) = random_topology("mesh12", 12, 12, 5..=60, 0.10);
    let n = matrix.names.clone();
    let broken: Vec<(&str, &str)> = (0..12)
        .flat_map(|i| (i + 1..12).map(move |j| (i, j)))
        .filter(|&(i, j)| matrix.broken[i][j])
        .map(|(i, j)| (n[i].as_str(), n[j].as_str()))
        .collect();
    eprintln!("blackholed direct paths: {broken:?}");
    let m = Mesh::start(&t, "reg", &refs(&n), &[], &[])?;
    let took = m.wait_full_reachability(Duration::from_secs(20))?;
    eprintln!(
        "12 nodes, {} broken paths: full reachability after {took:?}",
        broken.len()
    );
    Ok(())
}

/// Two halves, n1-n3 and n4-n6, whose direct paths to each other are all
/// broken from the start: each half builds its own mesh. When the paths
/// heal, nothing in a half's routes points to the other; the anchor (n1,
/// the first node to join) is what the second half misses, so it spends a
/// slot on a cached node outside, and the halves become one mesh.
fn a_split_mesh_heals_through_its_anchor() -> Result<()> {
    let n = names(6);
    let mut t = topology("split", 6, 10);
    let (a, b) = (&n[..3], &n[3..]);
    for x in a {
        for y in b {
            t.wan_both(x, y, LinkParams::delay_ms(10).with_blackhole(true));
        }
    }
    let m = Mesh::start(&t, "reg", &refs(&n), &[], &[])?;
    let halves = || {
        (0..6).all(|i| {
            let mine = if i < 3 { 0..3 } else { 3..6 };
            mine.clone().all(|j| i == j || m.ping(i, j, 1))
        })
    };
    let (_, took) = wait_until(
        "each half routing within itself",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || halves().then_some(()),
    )?;
    eprintln!("split: both halves meshed after {took:?}");
    check(!m.ping(0, 5, 1), "the halves are apart")?;
    let wan = m.net.wan()?;
    for x in a {
        for y in b {
            wan.heal(x, y)?;
        }
    }
    let took = m.wait_full_reachability(Duration::from_secs(120))?;
    eprintln!("split: the paths healed, one mesh again after {took:?}");
    Ok(())
}

/// Three nodes, the direct path n1-n2 in use; it breaks silently (the WAN
/// drops everything between them): traffic moves through n3.
fn silent_failure_of_a_path_in_use() -> Result<()> {
    let n = names(3);
    let mut t = topology("silent", 3, 15);
    t.wan_both("n1", "n2", LinkParams::delay_ms(5));
    let m = Mesh::start(&t, "reg", &refs(&n), &[], &[])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    // Wait for the direct tunnel to carry the route.
    wait_until(
        "n1 routing to n2 over their direct tunnel",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let v = m.ctl(0, "/tunnels").ok()?;
            v.as_array()?
                .iter()
                .any(|t| t["peer"] == m.nodes[1].prefix.as_str() && t["routes"].as_u64() >= Some(1))
                .then_some(())
        },
    )?;
    let probe = LossProbe::start(
        m.host(0)?,
        m.host(1)?,
        m.address(1),
        Duration::from_millis(10),
    )?;
    cleanup::sleep(Duration::from_secs(2))?;
    m.net.wan()?.blackhole("n1", "n2")?;
    cleanup::sleep(Duration::from_secs(8))?;
    let r = probe.stop(Duration::from_millis(500));
    eprintln!(
        "silent failure: loss window {:?} ({} of {} probes lost)",
        r.longest_gap, r.lost, r.sent
    );
    check(
        r.longest_gap < Duration::from_secs(5),
        format!("loss window {:?} over 5 s", r.longest_gap),
    )?;
    check(m.ping(0, 1, 2), "n1 reaches n2 after the failure")
}

/// The registry stops: the mesh keeps routing; a node restarted meanwhile
/// rejoins from its peer cache.
fn registry_down_mesh_keeps_routing() -> Result<()> {
    let n = names(4);
    let t = topology("regdown", 4, 10);
    let mut m = Mesh::start(&t, "reg", &refs(&n), &[], &[])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    m.stop_registry()?;
    cleanup::sleep(Duration::from_secs(3))?;
    let bad = m.unreachable_pairs();
    check(
        bad.is_empty(),
        format!("unreachable with the registry down: {bad:?}"),
    )?;
    check(m.stop_node(3)?, "clean stop")?;
    m.start_node(3)?;
    let took = m.wait_full_reachability(Duration::from_secs(30))?;
    eprintln!("restart with the registry down: full reachability after {took:?}");
    Ok(())
}

/// A revoked node loses all its tunnels within one configuration refresh
/// and cannot build new ones.
fn revoked_node_is_cut_off() -> Result<()> {
    let n = names(4);
    let t = topology("revoke", 4, 10);
    let m = Mesh::start(&t, "reg", &refs(&n), &[], &["--config-refresh", "5"])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let victim = m.nodes[3].prefix.clone();
    m.registry_cmd(&["revoke", &victim])?;
    let (_, took) = wait_until(
        "no tunnel to the revoked node",
        Duration::from_secs(12),
        Duration::from_millis(200),
        || {
            (0..3)
                .all(|i| !m.tunnel_peers(i).contains(&victim))
                .then_some(())
        },
    )?;
    eprintln!("revoked node cut off after {took:?}");
    cleanup::sleep(Duration::from_secs(10))?;
    for i in 0..3 {
        check(
            !m.tunnel_peers(i).contains(&victim),
            format!("{} rebuilt a tunnel to the revoked node", m.nodes[i].name),
        )?;
        check(!m.ping(i, 3, 1), "the revoked node is unreachable")?;
    }
    let up = m
        .ctl(3, "/tunnels")?
        .as_array()
        .map_or(0, |a| a.iter().filter(|t| t["up"] == true).count());
    check(
        up == 0,
        format!("the revoked node still has {up} tunnels up"),
    )
}

/// Three HMAC rotation steps while traffic flows: no loss window over 1 s.
fn hmac_rotation_keeps_reachability() -> Result<()> {
    let n = names(4);
    let t = topology("hmac", 4, 10);
    let m = Mesh::start(&t, "reg", &refs(&n), &[], &["--config-refresh", "5"])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let probe = LossProbe::start(
        m.host(0)?,
        m.host(2)?,
        m.address(2),
        Duration::from_millis(10),
    )?;
    let mut version = 0;
    for _ in 0..3 {
        m.registry_cmd(&["hmac", "rotate"])?;
        let (v, _) = wait_until(
            "every node on the new Babel keys",
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let vs: Vec<u64> = (0..4)
                    .filter_map(|i| m.ctl(i, "/status").ok()?["node"]["hmac_version"].as_u64())
                    .collect();
                (vs.len() == 4 && vs.iter().all(|v| *v == vs[0] && *v > version)).then(|| vs[0])
            },
        )?;
        version = v;
        cleanup::sleep(Duration::from_secs(2))?;
    }
    let r = probe.stop(Duration::from_millis(500));
    eprintln!(
        "HMAC rotation x3: longest gap {:?}, lost {}/{}",
        r.longest_gap, r.lost, r.sent
    );
    check(
        r.longest_gap < Duration::from_secs(1),
        format!("loss window {:?}", r.longest_gap),
    )?;
    let bad = m.unreachable_pairs();
    check(
        bad.is_empty(),
        format!("unreachable after rotation: {bad:?}"),
    )
}

/// Tunnels rotate every 10 s (graceful drain): traffic never stops for 1 s.
fn tunnel_rotation_without_loss() -> Result<()> {
    let n = names(5);
    let t = topology("rotate", 5, 10);
    let m = Mesh::start(
        &t,
        "reg",
        &refs(&n),
        &[("tunnel_refresh_s", "10"), ("client_count", "2")],
        &[],
    )?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let probe = LossProbe::start(
        m.host(0)?,
        m.host(4)?,
        m.address(4),
        Duration::from_millis(10),
    )?;
    cleanup::sleep(Duration::from_secs(35))?;
    let r = probe.stop(Duration::from_millis(500));
    let drains: u64 = (0..5)
        .filter_map(|i| {
            let text = re6stnet::ctl::fetch(&m.nodes[i].ctl, "/metrics").ok()?;
            text.lines()
                .find(|l| l.starts_with("re6st_peer_messages_sent_total{kind=\"drain_request\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| v as u64)
        })
        .sum();
    eprintln!(
        "rotation: {drains} drains in 35 s, longest gap {:?}, lost {}/{}",
        r.longest_gap, r.lost, r.sent
    );
    check(drains >= 2, format!("only {drains} tunnel rotations"))?;
    check(
        r.longest_gap < Duration::from_secs(1),
        format!("loss window {:?}", r.longest_gap),
    )
}

/// Three nodes on one LAN segment (Babel on it too): they ping each other;
/// one restarted, all recover.
fn lan_nodes_recover_from_a_restart() -> Result<()> {
    let n = names(3);
    let mut t = topology("lan3", 3, 10);
    t.lan("office", &refs(&n));
    let mut m = Mesh::start(&t, "reg", &refs(&n), &[], &["--interface", "lan0"])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    m.stop_node(1)?;
    m.start_node(1)?;
    let took = m.wait_full_reachability(Duration::from_secs(30))?;
    eprintln!("LAN restart: full reachability again after {took:?}");
    // Killed (a crash): the restarted daemon removes what was left.
    m.kill_node(2)?;
    m.start_node(2)?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    Ok(())
}

/// Certificates valid 20 days are inside the 30-day renewal window: each
/// node renews its certificate at start, keeps its prefix and stays
/// reachable.
fn certificates_are_renewed_before_expiry() -> Result<()> {
    let n = names(2);
    let t = topology("renew", 2, 10);
    let serve = ["--supersede-after", "3", "--housekeeping", "1"];
    let m = Mesh::start_with_init(
        &t,
        "reg",
        &refs(&n),
        &["--validity-days", "20"],
        &serve,
        &[],
        &["--config-refresh", "5"],
    )?;
    let enrolled = [m.serial(0)?, m.serial(1)?];
    wait_until(
        "both nodes renewed",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            (0..2)
                .all(|i| m.serial(i).is_ok_and(|s| s != enrolled[i]))
                .then_some(())
        },
    )?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    // The superseded certificates reach the CRL a few seconds later; the
    // peers followed the renewals, so no tunnel is closed for it.
    let (_, took) = wait_until(
        "the superseded serials in both nodes' CRL",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            (0..2)
                .all(|i| {
                    m.ctl(i, "/config").is_ok_and(|c| {
                        c["crl"]
                            .as_array()
                            .is_some_and(|crl| enrolled.iter().all(|s| crl.iter().any(|v| v == s)))
                    })
                })
                .then_some(())
        },
    )?;
    eprintln!("renewal: superseded serials revoked {took:?} after reachability");
    cleanup::sleep(Duration::from_secs(3))?;
    for i in 0..2 {
        let text = re6stnet::ctl::fetch(&m.nodes[i].ctl, "/metrics")
            .map_err(|e| netns_tests::Error::Measure(format!("/metrics: {e:#}")))?;
        check(
            !text.contains("re6st_tunnels_lost_total{reason=\"revoked\"}"),
            format!(
                "{} closed a tunnel for a superseded serial",
                m.nodes[i].name
            ),
        )?;
    }
    check(
        m.ping(0, 1, 2) && m.ping(1, 0, 2),
        "reachable after the old serials' revocation",
    )
}

/// One garbage datagram of `kind` (WireGuard data for no link, a forged
/// handshake initiation, junk after the control magic, random bytes).
fn garbage(kind: u64, x: &mut u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..160)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x as u8
        })
        .collect();
    match kind % 4 {
        0 => bytes[..4].copy_from_slice(&[4, 0, 0, 0]),
        1 => {
            bytes.truncate(148);
            bytes[..4].copy_from_slice(&[1, 0, 0, 0]);
        }
        2 => bytes[..4].copy_from_slice(b"R6P1"),
        _ => {}
    }
    bytes
}

/// A member's host floods a node's UDP port with garbage (20 datagrams a
/// millisecond at most, about 9 000 a second here, for 5 s): the node's
/// tunnels keep carrying traffic, the garbage is counted by reason, and
/// memory does not grow with it (control datagrams wait in a bounded
/// queue; a full queue drops and counts).
fn flood_of_garbage_leaves_tunnels_working() -> Result<()> {
    let n = names(3);
    let t = topology("flood", 3, 5);
    let m = Mesh::start(&t, "reg", &refs(&n), &[], &[])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let target = std::net::SocketAddr::new(m.host(0)?.addr(true)?, 326);
    let sock = m
        .host(2)?
        .in_ns(|| std::net::UdpSocket::bind("[::]:0"))?
        .map_err(|e| netns_tests::Error::io("flooder socket", e))?;
    let pid = m
        .pid(0)
        .ok_or_else(|| netns_tests::Error::Measure("n1 pid".into()))?;
    let rss_before = netns_tests::babel::rss_kib(pid).unwrap_or(0);
    let probe = LossProbe::start(
        m.host(1)?,
        m.host(0)?,
        m.address(0),
        Duration::from_millis(10),
    )?;
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let (mut sent, mut x) = (0u64, 0x9e37_79b9_7f4a_7c15u64);
    while std::time::Instant::now() < end {
        for _ in 0..20 {
            if sock.send_to(&garbage(sent, &mut x), target).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = probe.stop(Duration::from_millis(500));
    let rss_after = netns_tests::babel::rss_kib(pid).unwrap_or(0);
    eprintln!(
        "flood: {sent} garbage datagrams; probes lost {} of {}, longest gap {:?}; RSS {rss_before} -> {rss_after} KiB",
        r.lost, r.sent, r.longest_gap
    );
    check(
        r.lost * 100 <= r.sent * 2,
        format!("{} of {} probes lost during the flood", r.lost, r.sent),
    )?;
    check(
        rss_after < rss_before + 16 * 1024,
        format!("RSS grew from {rss_before} to {rss_after} KiB"),
    )?;
    let (_, _) = wait_until(
        "the garbage counted by reason",
        Duration::from_secs(5),
        Duration::from_millis(200),
        || {
            let text = re6stnet::ctl::fetch(&m.nodes[0].ctl, "/metrics").ok()?;
            let count = |reason: &str| {
                text.lines()
                    .find(|l| l.contains(&format!("reason=\"{reason}\"")))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (count("wireguard_unknownlink") + count("wireguard_refused") > 0
                && count("peer_malformed") + count("wireguard_event_queue_full") > 0)
                .then_some(())
        },
    )?;
    check(m.ping(1, 0, 2), "still reachable after the flood")
}

/// Two gateways (`--gateway`) and a far node: the far node's traffic from
/// its overlay address to a host outside the overlay goes through the
/// nearest gateway (a source-specific default route in the overlay
/// table); when that gateway dies, through the other one.
fn gateways_carry_traffic_out_and_fail_over() -> Result<()> {
    let mut t = topology("gateway", 1, 20);
    for h in ["g1", "g2", "outside"] {
        t.host(h);
    }
    t.wan_both("n1", "g1", LinkParams::delay_ms(5));
    let mut m = Mesh::start(&t, "reg", &["n1"], &[], &[])?;
    for g in ["g1", "g2"] {
        m.enrol(g, &["--gateway"])?;
        let i = m.index(g)?;
        m.start_node(i)?;
        // NAT66 on the uplink, so that the "Internet" host answers it.
        m.host(i)?.masquerade("fd5e:5e::/48", "eth0")?;
    }
    m.wait_full_reachability(Duration::from_secs(30))?;
    let g1 = m.index("g1")?;
    let via_g1 = || -> Option<()> {
        let tunnels = m.ctl(0, "/tunnels").ok()?;
        let dev = tunnels
            .as_array()?
            .iter()
            .find(|t| t["peer"] == m.nodes[g1].prefix.as_str())?["interface"]
            .as_str()?
            .to_string();
        let routes = ip_show(&m, &["-6", "route", "show", "table", "326"]).ok()?;
        routes
            .lines()
            .any(|l| l.starts_with("default from fd5e:5e::/48") && l.contains(&dev))
            .then_some(())
    };
    let (_, took) = wait_until(
        "n1's default route from the network via g1",
        Duration::from_secs(20),
        Duration::from_millis(200),
        via_g1,
    )?;
    eprintln!("gateway: n1 routes out through g1 after {took:?} more");
    let inet = m.net.host("outside")?;
    let out = inet.addr(true)?;
    let probe = LossProbe::start_from(
        m.host(0)?,
        Some(m.address(0)),
        inet,
        out,
        Duration::from_millis(10),
    )?;
    cleanup::sleep(Duration::from_secs(2))?;
    let before = probe.snapshot();
    check(
        before.sent > 0 && before.lost * 10 < before.sent,
        format!("through g1: {} of {} probes lost", before.lost, before.sent),
    )?;
    m.kill_node(g1)?;
    cleanup::sleep(Duration::from_secs(8))?;
    let r = probe.stop(Duration::from_millis(500));
    eprintln!(
        "gateway: g1 killed, loss window {:?} ({} of {} probes lost)",
        r.longest_gap, r.lost, r.sent
    );
    check(
        r.longest_gap < Duration::from_secs(5),
        format!("loss window {:?} over 5 s", r.longest_gap),
    )?;
    check(
        r.lost * 2 < r.sent,
        format!(
            "{} of {} probes lost: g2 does not carry the traffic",
            r.lost, r.sent
        ),
    )
}

/// `--main-interface lan0`: n1's prefix lives on its LAN, where a plain
/// host takes an address in it; n2 reaches that host over the overlay,
/// through n1. n1's tunnels have `--mtu 1300` while the LAN has 1500:
/// TCP between the LAN host and n2 gets an MSS that n1's tunnels carry
/// (clamped in n1's data plane), not the 1360 n2 announces.
fn a_lan_behind_its_main_interface_is_routed() -> Result<()> {
    let mut t = topology("mainif", 1, 10);
    t.host("n2").host("pc");
    t.lan("home", &["n1", "pc"]);
    let mut m = Mesh::start(&t, "reg", &["n2"], &[], &[])?;
    m.enrol("n1", &["--main-interface", "lan0", "--mtu", "1300"])?;
    let n1 = m.index("n1")?;
    m.start_node(n1)?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let prefix: ipnet::Ipv6Net = m.nodes[n1]
        .prefix
        .parse()
        .map_err(|e| netns_tests::Error::Measure(format!("n1's prefix: {e}")))?;
    let pc_addr = std::net::Ipv6Addr::from(u128::from(prefix.network()) | 0x100);
    let on_lan = m
        .host(n1)?
        .run("ip", &["-6", "addr", "show", "dev", "lan0"])?;
    check(
        String::from_utf8_lossy(&on_lan.stdout).contains(&m.nodes[n1].address.to_string()),
        "n1's address is on lan0",
    )?;
    let pc = m.net.host("pc")?;
    netns_tests::netns::ip_batch(
        Some(pc.ns()),
        true,
        &[
            format!("addr add {pc_addr}/{} dev lan0 nodad", prefix.prefix_len()),
            format!(
                "route add fd5e:5e::/48 via {} dev lan0",
                m.nodes[n1].address
            ),
        ],
    )?;
    let (_, took) = wait_until(
        "n2 reaching the host on n1's LAN",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || m.ping_addr(0, pc_addr, 1).then_some(()),
    )?;
    eprintln!("main interface: n2 pings the LAN host {pc_addr} after {took:?}");
    let json = iperf3(pc, m.host(0)?, m.address(0), 1)?;
    let mss = json["start"]["tcp_mss_default"].as_u64().unwrap_or(0);
    eprintln!(
        "main interface: TCP from the LAN host (MTU 1500) through n1 (tunnel MTU 1300): MSS {mss}"
    );
    check(
        (536..=1240).contains(&mss),
        format!("MSS {mss}: not clamped to n1's tunnel MTU 1300 (1240 at most)"),
    )
}

/// IPv4 inside the overlay (the network's `ipv4`): every node takes the
/// first address of its prefix's subnet, Babel carries the subnets with
/// IPv6 next hops (RFC 9229), and `ping -4` works between every pair,
/// also between the two whose direct path is broken (relayed by the
/// third). The nodes are killed (SIGKILL) and restarted on hosts that do
/// not forward IPv4 (the harness's namespaces do): they forward it on
/// their tunnels only, and leave no duplicate rule or address. Packets
/// for outside the overlay sent into a tunnel are refused at its other
/// end. A clean stop takes the IPv4 address and rule away.
fn ipv4_inside_the_overlay() -> Result<()> {
    let n = names(3);
    let mut t = topology("ipv4", 3, 10);
    let broken = LinkParams {
        blackhole: true,
        ..LinkParams::delay_ms(10)
    };
    t.wan_both("n1", "n3", broken);
    let network4 = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(198, 19, 240, 0), 20)
        .map_err(|e| netns_tests::Error::Measure(e.to_string()))?;
    let mut m = Mesh::start_with_init(
        &t,
        "reg",
        &refs(&n),
        &["--prefix-len", "56"],
        &[],
        &[("ipv4", "198.19.240.0/20 8")],
        &[],
    )?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    for i in 0..3 {
        m.kill_node(i)?;
        m.host(i)?
            .run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=0"])?;
        m.start_node(i)?;
    }
    m.wait_full_reachability(Duration::from_secs(30))?;
    let mut addrs = Vec::new();
    for i in 0..3 {
        let status = m.ctl(i, "/status")?;
        let a: ipnet::Ipv4Net = status["node"]["ipv4"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|_| netns_tests::Error::Measure(format!("no IPv4 in {status}")))?;
        check(
            network4.contains(&a) && a.prefix_len() == 28 && u32::from(a.addr()) % 16 == 1,
            format!("n{}: IPv4 {a}", i + 1),
        )?;
        addrs.push(a.addr());
    }
    let ping4 = |i: usize, j: usize| {
        m.host(i).ok().and_then(|h| {
            let (src, dst) = (addrs[i].to_string(), addrs[j].to_string());
            let args = ["-4", "-n", "-c", "1", "-W", "1", "-I", &src, &dst];
            h.output("ping", &args).ok().filter(|o| o.status.success())
        })
    };
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            let (_, took) = wait_until(
                &format!("n{} pinging n{} over IPv4", i + 1, j + 1),
                Duration::from_secs(20),
                Duration::from_millis(200),
                || ping4(i, j),
            )?;
            eprintln!("ipv4: n{} reaches n{} after {took:?} more", i + 1, j + 1);
        }
    }
    let routes = ip_show(&m, &["-4", "route", "show", "table", "326", "proto", "113"])?;
    check(
        routes.contains("via inet6 fe80::"),
        format!("IPv4 routes with IPv6 next hops: {routes}"),
    )?;
    // `re6stctl path` from n1 to n3 shows the relay, n2; `ping` works,
    // and fails for an overlay address nobody holds.
    let ctl = netns_tests::binary("re6stctl")?;
    let ctl = ctl.to_string_lossy();
    let sock = m.nodes[0].ctl.to_string_lossy().into_owned();
    let run_ctl = |args: &[&str]| -> Result<(bool, String)> {
        let mut all = vec!["--socket", sock.as_str()];
        all.extend_from_slice(args);
        let o = m.host(0)?.output(&ctl, &all)?;
        Ok((
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ))
    };
    let (_, table) = run_ctl(&["path", &m.nodes[2].prefix])?;
    eprintln!("ipv4: re6stctl path n3 from n1:\n{table}");
    let (ok, text) = run_ctl(&["--json", "path", &m.nodes[2].prefix])?;
    let hops: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| netns_tests::Error::Measure(format!("re6stctl path: {e}: {text}")))?;
    let node = |k: usize| hops[k]["node"].as_str().unwrap_or_default().to_string();
    check(
        ok && hops.as_array().map(Vec::len) == Some(2)
            && node(0) == m.nodes[1].prefix
            && node(1) == m.nodes[2].prefix
            && hops[1]["reached"] == true,
        format!("path n1 -> n3 through n2: {text}"),
    )?;
    let (ok, text) = run_ctl(&["ping", &m.nodes[2].address.to_string()])?;
    check(ok, format!("re6stctl ping n3: {text}"))?;
    let nobody = "fd5e:5e:0:ff00::1";
    let (ok, _) = run_ctl(&["ping", "--count", "1", nobody])?;
    check(!ok, "re6stctl ping to an address nobody holds fails")?;
    // n1 points destinations outside the overlay at its tunnel to n2:
    // n2 does not let them into its host (it would forward them).
    let v6 = ip_show(&m, &["-6", "route", "show", "table", "326", "proto", "113"])?;
    let hop = v6
        .lines()
        .find(|l| l.starts_with(m.nodes[1].prefix.as_str()))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1));
            Some((at("via")?.to_string(), at("dev")?.to_string()))
        })
        .ok_or_else(|| netns_tests::Error::Measure(format!("no route to n2 in {v6}")))?;
    let h = m.host(0)?;
    h.run(
        "ip",
        &[
            "-4",
            "route",
            "add",
            "198.18.250.1/32",
            "via",
            "inet6",
            &hop.0,
            "dev",
            &hop.1,
        ],
    )?;
    h.run(
        "ip",
        &[
            "-6",
            "route",
            "add",
            "2001:db8::1/128",
            "via",
            &hop.0,
            "dev",
            &hop.1,
        ],
    )?;
    for dst in ["198.18.250.1", "2001:db8::1"] {
        let _ = h.output("ping", &["-n", "-c", "3", "-i", "0.2", "-W", "1", dst]);
    }
    let metrics = re6stnet::ctl::fetch(&m.nodes[1].ctl, "/metrics")
        .map_err(|e| netns_tests::Error::Measure(format!("n2's metrics: {e:#}")))?;
    let refused = metrics
        .lines()
        .find(|l| l.contains("reason=\"wireguard_outside_overlay\""))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!("ipv4: n2 refused {refused} packets for outside the overlay");
    check(
        refused >= 6,
        format!("n2 let in packets for outside the overlay ({refused} refused)"),
    )?;
    let rules = ip_show(&m, &["-4", "rule"])?;
    check(
        rules.matches("to 198.19.240.0/20 lookup 326").count() == 1,
        format!("rules after a restart: {rules}"),
    )?;
    let lo = ip_show(&m, &["-4", "addr", "show", "dev", "lo"])?;
    check(
        lo.matches("inet 198.19.240.").count() == 1,
        format!("addresses after a restart: {lo}"),
    )?;
    let all = m
        .host(0)?
        .run("sysctl", &["-n", "net.ipv4.conf.all.forwarding"])?;
    let all = String::from_utf8_lossy(&all.stdout).trim().to_string();
    check(all == "0", format!("host-wide IPv4 forwarding {all}"))?;
    check(m.stop_node(0)?, "clean stop exits 0")?;
    let rules = ip_show(&m, &["-4", "rule"])?;
    check(!rules.contains("lookup 326"), format!("rule left: {rules}"))?;
    let lo = ip_show(&m, &["-4", "addr", "show", "dev", "lo"])?;
    check(!lo.contains("198.19.240."), format!("address left: {lo}"))
}

/// Every node reports its tunnels to the registry; `re6st-registry
/// topology` and the live page in headless Chromium show all five nodes,
/// their RTTs and the broken direct path n1–n3 (n1 keeps trying it: n3 is
/// its pinned neighbour) that the mesh routes around. The screenshot is
/// kept with the logs.
fn the_topology_page_shows_every_node() -> Result<()> {
    netns_tests::netns::require_tool("chromium")?;
    let n = names(5);
    let mut t = topology("topo", 5, 10);
    let broken = LinkParams {
        blackhole: true,
        ..LinkParams::delay_ms(10)
    };
    t.wan_both("n1", "n3", broken);
    let mut m = Mesh::start(&t, "reg", &refs(&n[1..]), &[], &[])?;
    let n3 = m.nodes[m.index("n3")?].prefix.clone();
    m.enrol("n1", &["--neighbour", &n3])?;
    let n1 = m.index("n1")?;
    m.start_node(n1)?;
    m.wait_full_reachability(Duration::from_secs(40))?;
    let n1_prefix = m.nodes[n1].prefix.clone();
    let prefixes: Vec<String> = m.nodes.iter().map(|x| x.prefix.clone()).collect();
    let (map, took) = wait_until(
        "every node's report, with RTTs, and n1's broken path to n3",
        Duration::from_secs(100),
        Duration::from_secs(1),
        || {
            let map: serde_json::Value =
                serde_json::from_str(&m.registry_cmd(&["topology", "--json"]).ok()?).ok()?;
            let nodes = map["nodes"].as_array()?;
            let complete = nodes.len() == prefixes.len()
                && nodes.iter().all(|x| {
                    !x["stale"].as_bool().unwrap_or(true)
                        && x["tunnels"]
                            .as_array()
                            .is_some_and(|t| t.iter().any(|t| t["rtt_ms"].is_number()))
                })
                && nodes.iter().any(|x| {
                    x["prefix"] == n1_prefix.as_str()
                        && x["unreachable"]
                            .as_array()
                            .is_some_and(|u| u.iter().any(|p| *p == n3.as_str()))
                });
            complete.then_some(map)
        },
    )?;
    eprintln!("topology: every node reported within {took:?} of full reachability");
    let text = m.registry_cmd(&["topology"])?;
    eprintln!("{text}");
    check(
        text.contains(&format!("no direct path to {n3}")),
        format!("re6st-registry topology: {text}"),
    )?;
    check(
        map["nodes"].as_array().is_some_and(|a| {
            a.iter().all(|x| {
                x["version"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("re6st-rs "))
            })
        }),
        format!("versions: {map}"),
    )?;

    let reg = m.net.host("reg")?;
    let dir = m.net.log_dir().to_path_buf();
    let page = format!("{}/topology#token=registry-admin-secret", m.url);
    let chromium = |extra: &[&str]| -> Result<String> {
        let profile = dir.join("chromium-profile");
        let profile = format!("--user-data-dir={}", profile.display());
        let mut args = vec![
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--window-size=1000,1200",
            "--virtual-time-budget=8000",
            profile.as_str(),
        ];
        args.extend_from_slice(extra);
        args.push(&page);
        let o = reg.output("chromium", &args)?;
        check(
            o.status.success(),
            format!("chromium: {}", String::from_utf8_lossy(&o.stderr)),
        )?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let dom = chromium(&["--dump-dom"])?;
    for p in &m.nodes {
        check(
            dom.contains(&format!("class=\"node\" data-prefix=\"{}\"", p.prefix)),
            format!("the page draws {} ({}): {dom}", p.name, p.prefix),
        )?;
    }
    let mut pair = [n1_prefix.clone(), n3.clone()];
    pair.sort();
    check(
        dom.contains("class=\"broken\"") && dom.contains(&pair.join(" ")),
        format!("the page draws the broken path n1–n3: {dom}"),
    )?;
    check(
        dom.contains("<div id=\"status\" class=\"\">5 nodes, "),
        format!("the page's status line: {dom}"),
    )?;
    let shot = dir.join("topology.png");
    chromium(&[&format!("--screenshot={}", shot.display())])?;
    let kept = netns_tests::artifact("topology.png")?;
    std::fs::copy(&shot, &kept).map_err(|e| netns_tests::Error::io("keeping the screenshot", e))?;
    eprintln!("topology page screenshot: {}", kept.display());
    Ok(())
}

fn main() -> ExitCode {
    run_suite(&[
        ("four_nodes_reach_each_other", four_nodes_reach_each_other),
        (
            "a_split_mesh_heals_through_its_anchor",
            a_split_mesh_heals_through_its_anchor,
        ),
        (
            "twelve_nodes_around_broken_paths",
            twelve_nodes_around_broken_paths,
        ),
        (
            "silent_failure_of_a_path_in_use",
            silent_failure_of_a_path_in_use,
        ),
        (
            "registry_down_mesh_keeps_routing",
            registry_down_mesh_keeps_routing,
        ),
        ("revoked_node_is_cut_off", revoked_node_is_cut_off),
        (
            "hmac_rotation_keeps_reachability",
            hmac_rotation_keeps_reachability,
        ),
        ("tunnel_rotation_without_loss", tunnel_rotation_without_loss),
        (
            "lan_nodes_recover_from_a_restart",
            lan_nodes_recover_from_a_restart,
        ),
        (
            "certificates_are_renewed_before_expiry",
            certificates_are_renewed_before_expiry,
        ),
        (
            "flood_of_garbage_leaves_tunnels_working",
            flood_of_garbage_leaves_tunnels_working,
        ),
        (
            "gateways_carry_traffic_out_and_fail_over",
            gateways_carry_traffic_out_and_fail_over,
        ),
        (
            "a_lan_behind_its_main_interface_is_routed",
            a_lan_behind_its_main_interface_is_routed,
        ),
        ("ipv4_inside_the_overlay", ipv4_inside_the_overlay),
        (
            "the_topology_page_shows_every_node",
            the_topology_page_shows_every_node,
        ),
    ])
}
