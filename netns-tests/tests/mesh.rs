//! End-to-end: a registry and re6stnet nodes in namespaces over the
//! emulated Internet (issue 6's tests).

use std::process::ExitCode;
use std::time::Duration;

use netns_tests::mesh::Mesh;
use netns_tests::testing::{check, run_suite};
use netns_tests::{LinkParams, Result, Topology};

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

/// Four nodes over a uniform WAN: everyone routes to and pings everyone;
/// re6stctl answers; a clean stop leaves no route or address behind.
fn four_nodes_reach_each_other() -> Result<()> {
    let n = names(4);
    let t = topology("mesh4", 4, 5);
    let mut m = Mesh::start(&t, "reg", &refs(&n), &[], &[])?;
    let took = m.wait_full_reachability(Duration::from_secs(30))?;
    eprintln!("4 nodes: full reachability after {took:?}");
    let status = m.ctl(0, "/status")?;
    check(
        status["node"]["prefix"] == m.nodes[0].prefix.as_str(),
        format!("status: {status}"),
    )?;
    check(m.stop_node(0)?, "clean stop exits 0")?;
    let host = m.host(0)?;
    let routes = host.run("ip", &["-6", "route", "show", "proto", "113"])?;
    check(
        routes.stdout.is_empty(),
        format!("routes left: {}", String::from_utf8_lossy(&routes.stdout)),
    )?;
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

fn main() -> ExitCode {
    run_suite(&[("four_nodes_reach_each_other", four_nodes_reach_each_other)])
}
