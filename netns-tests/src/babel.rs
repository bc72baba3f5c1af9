//! Running Babel daemons in test hosts: ours (`re6st-babeld`) and babeld,
//! stub addresses, reachability and route checks. Used by the Babel tests
//! and the square benchmark.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::Result;
use crate::net::{Host, Net};
use crate::probe::ping;
use crate::process::Process;

/// Puts a /128 stub address on the host's loopback.
pub fn stub(h: &Host, addr: &str) -> Result<()> {
    h.run(
        "ip",
        &["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo"],
    )
    .map(|_| ())
}

/// Starts `re6st-babeld` on `ifaces`, exporting `export`/128 and using it as
/// the preferred source of its routes; `extra` are more flags.
pub fn ours(h: &Host, ifaces: &[&str], export: &str, extra: &[&str]) -> Result<Process> {
    let bin = crate::binary("re6st-babeld")?;
    let bin = bin.to_string_lossy().into_owned();
    let mut args: Vec<String> = Vec::new();
    for i in ifaces {
        args.extend(["--interface".into(), i.to_string()]);
    }
    args.extend([
        "--export".into(),
        format!("{export}/128"),
        "--pref-src".into(),
        export.into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.spawn("re6st-babeld", &bin, &args)
}

/// Starts babeld on `ifaces` as `type tunnel` with this Hello interval
/// (seconds, babeld syntax) plus `extra` config statements.
pub fn babeld(
    h: &Host,
    net: &Net,
    ifaces: &[&str],
    hello_s: &str,
    extra: &[&str],
) -> Result<Process> {
    let dir = net.log_dir();
    let pid = dir
        .join(format!("{}-babeld.pid", h.name()))
        .to_string_lossy()
        .into_owned();
    let state = dir
        .join(format!("{}-babeld.state", h.name()))
        .to_string_lossy()
        .into_owned();
    let conf = format!("default type tunnel hello-interval {hello_s}");
    let mut args = vec!["-I", &pid, "-S", &state, "-C", &conf];
    for e in extra {
        args.push("-C");
        args.push(e);
    }
    args.extend_from_slice(ifaces);
    h.spawn("babeld", "babeld", &args)
}

/// Whether one ping from `from` to `dst` is answered.
pub fn reaches(from: &Host, dst: &str) -> bool {
    let Ok(addr) = dst.parse::<IpAddr>() else {
        return false;
    };
    ping(from, addr, 1, Duration::from_millis(100))
        .map(|s| s.received == 1)
        .unwrap_or(false)
}

/// The interface the kernel uses from `src` to `dst`.
pub fn route_dev(h: &Host, dst: &str, src: &str) -> Option<String> {
    let out = h
        .output("ip", &["-6", "route", "get", dst, "from", src])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words.next().map(str::to_string);
        }
    }
    None
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
