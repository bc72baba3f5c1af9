//! `re6stctl`: what a running re6stnet knows (peers, tunnels, neighbours,
//! routes, configuration), as tables for people or JSON for machines; and
//! the overlay path to a destination (`path`, `ping`).

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv6Net;
use re6stnet::path::{HopStats, Tracer};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(version, about = "Show the state of a running re6stnet node")]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/re6stnet/ctl.sock")]
    socket: PathBuf,
    /// Print the daemon's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug, Clone)]
enum What {
    /// The node: prefix, address, configuration version, counts.
    Status,
    /// Known peers (the peer cache) and their endpoints.
    Peers,
    /// Tunnels: peer, device, direction, handshake, bytes, routes through it.
    Tunnels,
    /// Babel neighbours: reachability, costs, RTT.
    Neighbours,
    /// Routes: destination, next hop, metric (selected ones marked *).
    Routes,
    /// The network configuration in force.
    Config,
    /// Prometheus metrics (text).
    Metrics,
    /// The overlay path to DEST hop by hop, like mtr: who answers at each
    /// hop (its node prefix), loss, RTT. Needs root (a raw ICMPv6 socket).
    Path(Probe),
    /// Echo requests to DEST from our overlay address: loss and RTT.
    /// Needs root.
    Ping(Probe),
}

#[derive(Args, Debug, Clone)]
struct Probe {
    /// An overlay address, or a node prefix (its node address).
    dest: String,
    /// Probes per hop (ping: in all).
    #[arg(long, default_value_t = 3)]
    count: u32,
    /// Hops tried at most (path).
    #[arg(long, default_value_t = 16)]
    max_hops: u32,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 1.0)]
    wait: f64,
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn rows(v: &Value, cols: &[&str]) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| cols.iter().map(|c| s(&r[*c])).collect())
                .collect()
        })
        .unwrap_or_default()
}

fn render(what: &What, v: &Value) -> String {
    match what {
        What::Status => {
            let n = &v["node"];
            let mut out = Vec::new();
            for (k, val) in [
                ("prefix", &n["prefix"]),
                ("address", &n["address"]),
                ("ipv4", &n["ipv4"]),
                ("network", &n["network"]),
                ("router-id", &n["router_id"]),
                ("config version", &n["config_version"]),
                ("hmac version", &n["hmac_version"]),
                ("endpoints", &n["endpoints"]),
                ("registry", &n["registry"]),
                ("uptime (s)", &n["uptime_s"]),
                ("revoked", &n["revoked"]),
                ("tunnels", &v["tunnels"]),
                ("tunnels up", &v["tunnels_up"]),
                ("neighbours", &v["neighbours"]),
                ("routes", &v["routes"]),
            ] {
                out.push(format!("{k:<15} {}", s(val)));
            }
            out.join("\n")
        }
        What::Peers => table(&["PREFIX", "ENDPOINTS"], rows(v, &["prefix", "endpoints"])),
        What::Tunnels => table(
            &[
                "PEER",
                "DEVICE",
                "DIR",
                "UP",
                "ENDPOINT",
                "VIA",
                "HANDSHAKE(s)",
                "TX",
                "RX",
                "ROUTES",
                "COST×",
            ],
            rows(
                v,
                &[
                    "peer",
                    "interface",
                    "direction",
                    "up",
                    "endpoint",
                    "transport",
                    "since_handshake_s",
                    "tx_bytes",
                    "rx_bytes",
                    "routes",
                    "cost_multiplier",
                ],
            ),
        ),
        What::Neighbours => table(
            &[
                "DEVICE", "ADDRESS", "REACH", "RXCOST", "TXCOST", "RTT(ms)", "COST",
            ],
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| {
                            vec![
                                s(&n["interface"]),
                                s(&n["address"]),
                                s(&n["reach"]),
                                s(&n["rxcost"]),
                                s(&n["txcost"]),
                                n["rtt_ms"]
                                    .as_f64()
                                    .map_or("-".into(), |r| format!("{r:.2}")),
                                s(&n["cost"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        What::Routes => table(
            &["", "PREFIX", "FROM", "VIA", "DEVICE", "METRIC", "ROUTER-ID"],
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            vec![
                                if r["selected"] == Value::Bool(true) {
                                    "*"
                                } else {
                                    " "
                                }
                                .into(),
                                s(&r["prefix"]),
                                s(&r["src_prefix"]),
                                s(&r["next_hop"]),
                                s(&r["interface"]),
                                s(&r["metric"]),
                                s(&r["router_id"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        What::Config | What::Metrics | What::Path(_) | What::Ping(_) => {
            serde_json::to_string_pretty(v).unwrap_or_default()
        }
    }
}

fn fetch_json(socket: &Path, path: &str) -> Result<Value, String> {
    let body = re6stnet::ctl::fetch(socket, path).map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&body).map_err(|e| format!("the daemon's answer is not JSON: {e}"))
}

/// The destination address: an address, or a node prefix's node address.
fn destination(dest: &str) -> Result<Ipv6Addr, String> {
    if let Ok(a) = dest.parse::<Ipv6Addr>() {
        return Ok(a);
    }
    dest.parse::<Ipv6Net>()
        .map(re6st_registry::cert::overlay_address)
        .map_err(|_| format!("{dest:?} is neither an IPv6 address nor a prefix"))
}

/// The most specific routed prefix holding `addr` (the node it belongs to).
fn node_of(addr: Ipv6Addr, routes: &Value) -> Option<Ipv6Net> {
    routes
        .as_array()?
        .iter()
        .filter(|r| r["src_prefix"].is_null())
        .filter_map(|r| r["prefix"].as_str()?.parse::<Ipv6Net>().ok())
        .filter(|p| p.prefix_len() > 0 && p.contains(&addr))
        .max_by_key(Ipv6Net::prefix_len)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Runs `path` (`trace`) or `ping`: whether the destination answered,
/// and the hops as text or JSON.
fn probe(cli: &Cli, p: &Probe, trace: bool) -> Result<(bool, String), String> {
    let dst = destination(&p.dest)?;
    let status = fetch_json(&cli.socket, "/status")?;
    let src: Ipv6Addr = status["node"]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or("the daemon's status has no overlay address")?;
    let routes = fetch_json(&cli.socket, "/routes")?;
    if !(0.0..=60.0).contains(&p.wait) {
        return Err("--wait must be 0 to 60 seconds".into());
    }
    let wait = Duration::from_secs_f64(p.wait);
    let mut tracer = Tracer::new(src, dst).map_err(|e| format!("raw ICMPv6 socket: {e}"))?;
    let hops: Vec<u32> = if trace {
        (1..=p.max_hops.clamp(1, 64)).collect()
    } else {
        vec![64]
    };
    let mut out = Vec::new();
    let mut reached = false;
    for h in hops {
        let mut stats = HopStats::default();
        for _ in 0..p.count.max(1) {
            stats.add(
                tracer
                    .probe(h, wait)
                    .map_err(|e| format!("probing {dst}: {e}"))?,
            );
        }
        let rtt = stats.rtt();
        out.push(json!({
            "hop": if trace { Some(h) } else { None },
            "address": stats.from.map(|a| a.to_string()),
            "node": stats.from.and_then(|a| node_of(a, &routes)).map(|n| n.to_string()),
            "sent": stats.sent,
            "loss": stats.loss(),
            "rtt_avg_ms": rtt.map(|r| r.0.as_secs_f64() * 1e3),
            "rtt_best_ms": rtt.map(|r| r.1.as_secs_f64() * 1e3),
            "rtt_worst_ms": rtt.map(|r| r.2.as_secs_f64() * 1e3),
            "rtt": rtt.map(|(a, b, w)| format!("{}/{}/{}", ms(a), ms(b), ms(w))),
            "reached": stats.reached,
        }));
        reached = stats.reached;
        if stats.reached || stats.unreachable {
            break;
        }
    }
    let v = Value::Array(out);
    let text = if cli.json {
        serde_json::to_string_pretty(&v).unwrap_or_default()
    } else {
        let cols = ["hop", "address", "node", "loss", "rtt"];
        let mut rows = rows(&v, &cols);
        for (r, hop) in rows.iter_mut().zip(v.as_array().into_iter().flatten()) {
            r[3] = format!("{:.0}%", hop["loss"].as_f64().unwrap_or(0.0) * 100.0);
        }
        let headers = ["HOP", "ADDRESS", "NODE", "LOSS", "RTT avg/best/worst (ms)"];
        if trace {
            table(&headers, rows)
        } else {
            let rows = rows.into_iter().map(|r| r[1..].to_vec()).collect();
            table(&headers[1..], rows)
        }
    };
    Ok((reached, text))
}

/// `path` or `ping`, with its exit code.
fn run_probe(cli: &Cli, p: &Probe, trace: bool) -> ExitCode {
    match probe(cli, p, trace) {
        Ok((true, text)) => out(&format!("{text}\n")),
        Ok((false, text)) => {
            let _ = out(&format!("{text}\n"));
            eprintln!("re6stctl: {} did not answer", p.dest);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("re6stctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match &cli.what {
        What::Status => "/status",
        What::Peers => "/peers",
        What::Tunnels => "/tunnels",
        What::Neighbours => "/neighbours",
        What::Routes => "/routes",
        What::Config => "/config",
        What::Metrics => "/metrics",
        What::Path(p) => return run_probe(&cli, p, true),
        What::Ping(p) => return run_probe(&cli, p, false),
    };
    let body = match re6stnet::ctl::fetch(&cli.socket, path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("re6stctl: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if matches!(cli.what, What::Metrics) {
        return out(&body);
    }
    let v: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("re6stctl: the daemon's answer is not JSON: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.json {
        out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        ))
    } else {
        out(&format!("{}\n", render(&cli.what, &v)))
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("re6stctl: writing the output: {e}");
            ExitCode::FAILURE
        }
    }
}
