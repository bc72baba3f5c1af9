//! `re6stctl`: what a running re6stnet knows (peers, tunnels, neighbours,
//! routes, configuration), as tables for people or JSON for machines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

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

#[derive(Subcommand, Debug, Clone, Copy)]
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

fn render(what: What, v: &Value) -> String {
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
        What::Config | What::Metrics => serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match cli.what {
        What::Status => "/status",
        What::Peers => "/peers",
        What::Tunnels => "/tunnels",
        What::Neighbours => "/neighbours",
        What::Routes => "/routes",
        What::Config => "/config",
        What::Metrics => "/metrics",
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
        out(&format!("{}\n", render(cli.what, &v)))
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
