//! The control API: JSON over HTTP on a unix socket (and `/metrics` in
//! Prometheus text, also on an optional TCP address), and the client side
//! `re6stctl` uses.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::babel::RoutingSnapshot;
use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use re6st_registry::config::NetworkConfig;
use re6st_registry::prometheus::{labels, Exposition, Kind};
use serde::{Deserialize, Serialize};

/// Counters of the node daemon.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// Tunnels added.
    pub tunnels_opened: u64,
    /// Tunnels removed.
    pub tunnels_closed: u64,
    /// Tunnels lost, by reason.
    pub tunnels_lost: BTreeMap<String, u64>,
    /// Failed outgoing attempts, by reason.
    pub setup_failed: BTreeMap<String, u64>,
    /// Completed WireGuard handshakes (first of each tunnel).
    pub handshakes: u64,
    /// Network configurations applied.
    pub config_changes: u64,
    /// Peer-protocol messages received, by kind.
    pub peer_in: BTreeMap<String, u64>,
    /// Peer-protocol messages sent, by kind.
    pub peer_out: BTreeMap<String, u64>,
    /// Peer-protocol messages that could not be sent (too large), by kind.
    #[serde(default)]
    pub peer_unsent: BTreeMap<String, u64>,
    /// Packets refused, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Peers' claims of where they see us, by what they did.
    #[serde(default)]
    pub observed: BTreeMap<String, u64>,
    /// Punches sent for peers dialling us through our NAT.
    #[serde(default)]
    pub punches: u64,
    /// Set-up attempts retried over TCP after no answer over UDP.
    #[serde(default)]
    pub tcp_fallbacks: u64,
}

/// One tunnel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// The peer's prefix.
    pub peer: String,
    /// Our tun device.
    pub interface: String,
    /// "out" (we opened it) or "in".
    pub direction: String,
    /// Handshake completed.
    pub up: bool,
    /// The peer's underlay endpoint.
    pub endpoint: Option<String>,
    /// How it is reached: `udp`, or `tcp` where UDP got no answer (its
    /// cost shows in the neighbour's RTT).
    #[serde(default)]
    pub transport: Option<String>,
    /// Seconds since the last handshake.
    pub since_handshake_s: Option<u64>,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Selected routes through it.
    pub routes: usize,
    /// Babel cost multiplier (4096: draining).
    pub cost_multiplier: u16,
}

/// The node in one line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Our prefix.
    pub prefix: String,
    /// Our overlay address.
    pub address: String,
    /// Our overlay IPv4 address and subnet length (None: IPv6 only).
    #[serde(default)]
    pub ipv4: Option<String>,
    /// The network.
    pub network: String,
    /// Babel router-id.
    pub router_id: String,
    /// Network configuration version in force.
    pub config_version: u64,
    /// Babel key version (None: none yet).
    pub hmac_version: Option<u64>,
    /// Announced underlay endpoints.
    pub endpoints: Vec<String>,
    /// What peers see of us: IPv4, then IPv6 (`unknown`, `direct`,
    /// `nat ADDR`, `unreachable`).
    #[serde(default)]
    pub seen: Vec<String>,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Our certificate is revoked.
    pub revoked: bool,
    /// Certificate expiry (unix seconds).
    pub cert_not_after: i64,
    /// Seconds until then (negative: expired), at the snapshot.
    #[serde(default)]
    pub cert_expires_in_s: i64,
    /// Whether the registry answered the last read (None: not asked yet).
    #[serde(default)]
    pub registry_reachable: Option<bool>,
    /// Registry URL.
    pub registry: Option<String>,
}

/// What the API serves, refreshed by the daemon every tick.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    node: NodeSummary,
    tunnels: Vec<TunnelInfo>,
    routing: Option<Arc<RoutingSnapshot>>,
    config: Option<NetworkConfig>,
    metrics: Metrics,
    peers: Vec<(String, Vec<String>)>,
}

impl Snapshot {
    /// A snapshot.
    pub fn new(
        node: NodeSummary,
        tunnels: Vec<TunnelInfo>,
        routing: Option<Arc<RoutingSnapshot>>,
        config: NetworkConfig,
        metrics: Metrics,
        peers: Vec<(String, Vec<String>)>,
    ) -> Self {
        Self {
            node,
            tunnels,
            routing,
            config: Some(config),
            metrics,
            peers,
        }
    }
}

type Shared = Arc<RwLock<Snapshot>>;

fn read(s: &Shared) -> Snapshot {
    s.read()
        .map(|g| g.clone())
        .unwrap_or_else(|e| e.into_inner().clone())
}

async fn status(State(s): State<Shared>) -> Json<serde_json::Value> {
    let s = read(&s);
    let (neighbours, routes) = s
        .routing
        .as_ref()
        .map_or((0, 0), |r| (r.state.neighbours.len(), r.selected()));
    Json(serde_json::json!({
        "node": s.node,
        "tunnels": s.tunnels.len(),
        "tunnels_up": s.tunnels.iter().filter(|t| t.up).count(),
        "neighbours": neighbours,
        "routes": routes,
    }))
}

async fn tunnels(State(s): State<Shared>) -> Json<Vec<TunnelInfo>> {
    Json(read(&s).tunnels)
}

async fn peers(State(s): State<Shared>) -> Json<serde_json::Value> {
    let s = read(&s);
    Json(serde_json::json!(s
        .peers
        .iter()
        .map(|(p, e)| serde_json::json!({"prefix": p, "endpoints": e}))
        .collect::<Vec<_>>()))
}

async fn neighbours(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!(read(&s)
        .routing
        .map(|r| r.status().neighbours)
        .unwrap_or_default()))
}

async fn routes(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!(read(&s)
        .routing
        .map(|r| r.status().routes)
        .unwrap_or_default()))
}

async fn config(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!(read(&s).config))
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&read(&s)),
    )
        .into_response()
}

/// Prometheus text exposition of a snapshot.
pub fn render_metrics(s: &Snapshot) -> String {
    let mut e = Exposition::new();
    let mut one = |name: &str, kind: Kind, help: &str, samples: Vec<(String, f64)>| {
        e.family(&format!("re6st_{name}"), kind, help, samples);
    };
    let plain = |v: f64| vec![(String::new(), v)];
    let labelled = |label: &str, m: &BTreeMap<String, u64>| -> Vec<(String, f64)> {
        m.iter()
            .map(|(k, v)| (labels(&[(label, k)]), *v as f64))
            .collect()
    };
    let m = &s.metrics;
    one(
        "tunnels",
        Kind::Gauge,
        "Tunnels by direction.",
        ["out", "in"]
            .iter()
            .map(|d| {
                (
                    format!("{{direction=\"{d}\"}}"),
                    s.tunnels.iter().filter(|t| t.direction == *d).count() as f64,
                )
            })
            .collect(),
    );
    one(
        "tunnels_opened_total",
        Kind::Counter,
        "Tunnels added.",
        plain(m.tunnels_opened as f64),
    );
    one(
        "tunnels_closed_total",
        Kind::Counter,
        "Tunnels removed.",
        plain(m.tunnels_closed as f64),
    );
    one(
        "tunnels_lost_total",
        Kind::Counter,
        "Tunnels lost, by reason.",
        labelled("reason", &m.tunnels_lost),
    );
    one(
        "tunnel_attempts_failed_total",
        Kind::Counter,
        "Failed outgoing tunnel attempts, by reason.",
        labelled("reason", &m.setup_failed),
    );
    one(
        "observed_endpoint_claims_total",
        Kind::Counter,
        "Peers' claims of the address they see us at, by what they did (agreed: a quorum saw it).",
        labelled("result", &m.observed),
    );
    one(
        "punches_total",
        Kind::Counter,
        "Punches sent through our NAT for peers dialling us.",
        plain(m.punches as f64),
    );
    one(
        "tcp_fallbacks_total",
        Kind::Counter,
        "Tunnel set-ups retried over TCP after no answer over UDP.",
        plain(m.tcp_fallbacks as f64),
    );
    one(
        "handshakes_total",
        Kind::Counter,
        "Tunnels whose WireGuard handshake completed.",
        plain(m.handshakes as f64),
    );
    let bytes = |dir: &str, f: fn(&TunnelInfo) -> u64| -> Vec<(String, f64)> {
        s.tunnels
            .iter()
            .map(|t| {
                (
                    labels(&[("peer", &t.peer), ("direction", dir)]),
                    f(t) as f64,
                )
            })
            .collect()
    };
    let mut b = bytes("tx", |t| t.tx_bytes);
    b.extend(bytes("rx", |t| t.rx_bytes));
    one(
        "tunnel_bytes_total",
        Kind::Counter,
        "Bytes through each tunnel.",
        b,
    );
    let (routes, switches, babel_rejected) = s.routing.as_ref().map_or((0, 0, 0), |r| {
        (
            r.selected(),
            r.state.stats.route_switches,
            r.state.stats.packets_rejected,
        )
    });
    one(
        "routes",
        Kind::Gauge,
        "Selected routes.",
        plain(routes as f64),
    );
    one(
        "route_changes_total",
        Kind::Counter,
        "Selected-route changes.",
        plain(switches as f64),
    );
    let (babel_in, babel_out) = s.routing.as_ref().map_or((0, 0), |r| {
        (r.state.stats.packets_in, r.state.stats.packets_out)
    });
    one(
        "babel_packets_total",
        Kind::Counter,
        "Babel packets by direction.",
        vec![
            ("{direction=\"in\"}".into(), babel_in as f64),
            ("{direction=\"out\"}".into(), babel_out as f64),
        ],
    );
    let mut rejected = labelled("reason", &m.rejected);
    rejected.push(("{reason=\"babel\"}".into(), babel_rejected as f64));
    one(
        "rejected_packets_total",
        Kind::Counter,
        "Packets refused, by reason.",
        rejected,
    );
    let babel_drops = s
        .routing
        .as_ref()
        .map(|r| {
            let drops: BTreeMap<String, u64> = r
                .state
                .stats
                .drops
                .iter()
                .map(|(reason, n)| (reason.label().to_string(), *n))
                .collect();
            labelled("reason", &drops)
        })
        .unwrap_or_default();
    one(
        "babel_dropped_total",
        Kind::Counter,
        "Babel packets and TLVs refused (bad MAC, replay, martian or foreign prefix, absurd seqno request...), by reason.",
        babel_drops,
    );
    one(
        "peer_messages_received_total",
        Kind::Counter,
        "Peer-protocol messages accepted, by kind.",
        labelled("kind", &m.peer_in),
    );
    one(
        "peer_messages_unsent_total",
        Kind::Counter,
        "Peer-protocol messages that could not be sent (a configuration too large to flood), by kind.",
        labelled("kind", &m.peer_unsent),
    );
    one(
        "peer_messages_sent_total",
        Kind::Counter,
        "Peer-protocol messages sent, by kind.",
        labelled("kind", &m.peer_out),
    );
    let neighbours = s
        .routing
        .as_ref()
        .map(|r| r.status().neighbours)
        .unwrap_or_default();
    let per_neighbour = |f: &dyn Fn(&re6st_routing::driver::NeighbourStatus) -> Option<f64>| {
        neighbours
            .iter()
            .filter_map(|n| {
                let l = labels(&[
                    ("interface", &n.interface),
                    ("address", &n.address.to_string()),
                ]);
                Some((l, f(n)?))
            })
            .collect::<Vec<_>>()
    };
    one(
        "neighbour_rtt_seconds",
        Kind::Gauge,
        "Smoothed RTT to each Babel neighbour.",
        per_neighbour(&|n| n.rtt_ms.map(|r| r / 1e3)),
    );
    one(
        "neighbour_cost",
        Kind::Gauge,
        "Babel link cost to each neighbour (65535: unreachable).",
        per_neighbour(&|n| Some(f64::from(n.cost))),
    );
    one(
        "tunnel_handshake_age_seconds",
        Kind::Gauge,
        "Seconds since each tunnel's last WireGuard handshake.",
        s.tunnels
            .iter()
            .filter_map(|t| Some((labels(&[("peer", &t.peer)]), t.since_handshake_s? as f64)))
            .collect(),
    );
    one(
        "certificate_expiry_seconds",
        Kind::Gauge,
        "Seconds until our certificate expires (negative: expired).",
        plain(s.node.cert_expires_in_s as f64),
    );
    one(
        "can_reach_registry",
        Kind::Gauge,
        "1 when the registry answered our last read, 0 when it did not (absent before the first).",
        s.node
            .registry_reachable
            .map(|r| plain(if r { 1.0 } else { 0.0 }))
            .unwrap_or_default(),
    );
    one(
        "config_version",
        Kind::Gauge,
        "Network configuration version in force.",
        plain(s.node.config_version as f64),
    );
    one(
        "config_changes_total",
        Kind::Counter,
        "Network configurations applied live.",
        plain(m.config_changes as f64),
    );
    e.finish()
}

fn router(s: Shared) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/tunnels", get(tunnels))
        .route("/neighbours", get(neighbours))
        .route("/routes", get(routes))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such resource\n") })
        .with_state(s)
}

/// Serves the API on `socket` (replacing a stale socket file, mode 0660)
/// and `/metrics` on `metrics` if given.
pub async fn serve(
    socket: &Path,
    metrics_addr: Option<SocketAddr>,
    snapshot: Shared,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660));
    }
    if let Some(addr) = metrics_addr {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(&snapshot));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).await {
                tracing::warn!(error = %e, "metrics server");
            }
        });
    }
    let app = router(snapshot);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "control server");
        }
    });
    Ok(())
}

/// GET `path` on the control socket; returns the body (error on non-200).
pub fn fetch(socket: &Path, path: &str) -> anyhow::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {} (is re6stnet running?)", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: re6stnet\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the answer")?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed answer from the daemon");
    };
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path}: HTTP {status}");
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok(if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    })
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunk")?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        body = rest.get(n + 2..).context("short chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_as_prometheus_text() {
        let mut m = Metrics::default();
        m.rejected.insert("peer_replay".into(), 3);
        m.peer_in.insert("config".into(), 2);
        let s = Snapshot {
            metrics: m,
            tunnels: vec![TunnelInfo {
                peer: "fd5e:0:0:2::/64".into(),
                interface: "re6st-0001".into(),
                direction: "out".into(),
                up: true,
                endpoint: None,
                transport: Some("udp".into()),
                since_handshake_s: Some(3),
                tx_bytes: 10,
                rx_bytes: 20,
                routes: 1,
                cost_multiplier: 1,
            }],
            node: NodeSummary {
                cert_expires_in_s: 86_400,
                registry_reachable: Some(false),
                ..NodeSummary::default()
            },
            ..Snapshot::default()
        };
        let text = render_metrics(&s);
        for want in [
            "re6st_tunnels{direction=\"out\"} 1",
            "re6st_rejected_packets_total{reason=\"peer_replay\"} 3",
            "re6st_peer_messages_received_total{kind=\"config\"} 2",
            "re6st_tunnel_bytes_total{peer=\"fd5e:0:0:2::/64\",direction=\"rx\"} 20",
            "# TYPE re6st_routes gauge",
            "re6st_tunnel_handshake_age_seconds{peer=\"fd5e:0:0:2::/64\"} 3",
            "re6st_certificate_expiry_seconds 86400",
            "re6st_can_reach_registry 0",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }

    /// The metric names the dashboard's queries use (`re6st_...`).
    pub(crate) fn dashboard_metrics() -> Vec<String> {
        let d: serde_json::Value =
            serde_json::from_str(include_str!("../../dist/grafana/re6st-rs.json")).unwrap();
        let mut names = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let e = t["expr"].as_str().unwrap();
                for (at, _) in e.match_indices("re6st_") {
                    let name: String = e[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    names.push(name);
                }
            }
        }
        names
    }

    #[test]
    fn the_dashboard_asks_only_for_metrics_the_node_serves() {
        let text = render_metrics(&Snapshot::default());
        let names = dashboard_metrics();
        assert!(names.len() > 10, "{names:?}");
        for n in names.iter().filter(|n| !n.starts_with("re6st_registry_")) {
            assert!(text.contains(&format!("# TYPE {n} ")), "{n} is not served");
        }
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap_or_default(),
            "abcde"
        );
        assert!(dechunk("zz\r\n").is_err());
    }
}
