//! Topology reports and the network map built from them.
//!
//! Every node posts, node-signed (so only members report, each for itself,
//! and a replay is refused by its nonce), what it sees: its software
//! version, its tunnels with the Babel RTT and cost of the neighbour on
//! each, and the peers its last direct attempt could not reach (broken
//! direct paths, which the mesh routes around). The registry keeps the
//! latest report of every node and serves the map to its operators:
//! `GET /v1/topology` (JSON) and the page at `/topology`.

use std::collections::BTreeSet;

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::NodeInfo;

/// Where nodes post their reports.
pub const REPORT_PATH: &str = "/v1/report";
/// Most tunnels, and most unreachable peers, in one report.
pub const MAX_LIST: usize = 256;
/// Longest version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Highest RTT a report may claim, in milliseconds.
pub const MAX_RTT_MS: f64 = 60_000.0;
/// A node that has not reported for this long shows as not seen recently
/// (nodes report every minute).
pub const STALE_AFTER_S: i64 = 300;

/// How a tunnel carries its datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelTransport {
    /// UDP, the normal case.
    Udp,
    /// TCP, where UDP got no answer.
    Tcp,
}

/// One tunnel of a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportedTunnel {
    /// The peer's prefix.
    pub peer: String,
    /// Handshake completed.
    pub up: bool,
    /// How it is carried (None: not known yet).
    #[serde(default)]
    pub transport: Option<TunnelTransport>,
    /// Smoothed Babel RTT to the neighbour on it, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Babel cost of the neighbour on it.
    #[serde(default)]
    pub cost: Option<u16>,
}

/// What a node reports of itself (`POST /v1/report`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its software version.
    pub version: String,
    /// Its tunnels.
    pub tunnels: Vec<ReportedTunnel>,
    /// Peers whose last direct attempt failed.
    #[serde(default)]
    pub unreachable: Vec<String>,
}

/// Parses a node prefix of a report: inside `network`, longer than it, not
/// `me`, not seen before in the same list.
fn node_prefix(
    text: &str,
    network: Ipv6Net,
    me: Ipv6Net,
    seen: &mut BTreeSet<Ipv6Net>,
) -> Result<Ipv6Net> {
    let p: Ipv6Net = text
        .parse()
        .map_err(|_| Error::Invalid(format!("report: {text:?} is not a prefix")))?;
    if p.trunc() != p || p.prefix_len() <= network.prefix_len() || !network.contains(&p) {
        return Err(Error::Invalid(format!(
            "report: {p} is not a node prefix of {network}"
        )));
    }
    if p == me {
        return Err(Error::Invalid(format!("report: {p} is the reporter")));
    }
    if !seen.insert(p) {
        return Err(Error::Invalid(format!("report: {p} listed twice")));
    }
    Ok(p)
}

impl Report {
    /// Parses and checks the report `me` posted in `network`: bounded
    /// lists, node prefixes only (each once, never `me`), a printable
    /// version, RTTs that are numbers of this world.
    pub fn parse(bytes: &[u8], network: Ipv6Net, me: Ipv6Net) -> Result<Self> {
        let r: Self =
            serde_json::from_slice(bytes).map_err(|e| Error::Invalid(format!("report: {e}")))?;
        if r.version.is_empty()
            || r.version.len() > MAX_VERSION_LEN
            || !r.version.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        {
            return Err(Error::Invalid(format!(
                "report: the version must be 1 to {MAX_VERSION_LEN} printable ASCII characters"
            )));
        }
        if r.tunnels.len() > MAX_LIST || r.unreachable.len() > MAX_LIST {
            return Err(Error::Invalid(format!(
                "report: more than {MAX_LIST} tunnels or unreachable peers"
            )));
        }
        let mut seen = BTreeSet::new();
        for t in &r.tunnels {
            node_prefix(&t.peer, network, me, &mut seen)?;
            if t.rtt_ms
                .is_some_and(|v| !v.is_finite() || !(0.0..=MAX_RTT_MS).contains(&v))
            {
                return Err(Error::Invalid(format!(
                    "report: RTT to {} is not 0 to {MAX_RTT_MS} ms",
                    t.peer
                )));
            }
        }
        let mut seen = BTreeSet::new();
        for u in &r.unreachable {
            node_prefix(u, network, me, &mut seen)?;
        }
        Ok(r)
    }
}

/// A node on the map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapNode {
    /// Its prefix.
    pub prefix: String,
    /// Serial of its current certificate.
    pub serial: u64,
    /// Last authenticated request (unix seconds).
    pub last_seen: Option<i64>,
    /// When its latest report arrived (unix seconds; None: never).
    pub reported: Option<i64>,
    /// No report for [`STALE_AFTER_S`].
    pub stale: bool,
    /// Its software version, from its report.
    pub version: Option<String>,
    /// Its tunnels, from its report.
    pub tunnels: Vec<ReportedTunnel>,
    /// Peers it could not reach directly, from its report.
    pub unreachable: Vec<String>,
}

/// `GET /v1/topology`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// The network prefix.
    pub network: String,
    /// When the map was made (unix seconds).
    pub now: i64,
    /// Every node with a current certificate.
    pub nodes: Vec<MapNode>,
}

impl Topology {
    /// The map of `nodes` with their latest `reports` (prefix, report,
    /// arrival); reports of nodes no longer listed are left out.
    pub fn build(
        network: Ipv6Net,
        nodes: Vec<NodeInfo>,
        reports: Vec<(String, Report, i64)>,
        now: i64,
    ) -> Self {
        let mut reports: std::collections::BTreeMap<String, (Report, i64)> =
            reports.into_iter().map(|(p, r, at)| (p, (r, at))).collect();
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let report = reports.remove(&n.prefix);
                let reported = report.as_ref().map(|(_, at)| *at);
                let (version, tunnels, unreachable) = match report {
                    Some((r, _)) => (Some(r.version), r.tunnels, r.unreachable),
                    None => (None, Vec::new(), Vec::new()),
                };
                MapNode {
                    prefix: n.prefix,
                    serial: n.serial,
                    last_seen: n.last_seen,
                    reported,
                    stale: reported.is_none_or(|at| now - at > STALE_AFTER_S),
                    version,
                    tunnels,
                    unreachable,
                }
            })
            .collect();
        Self {
            network: network.to_string(),
            now,
            nodes,
        }
    }
}

/// The live page: static HTML and script, embedded in the binary, that
/// draws `/v1/topology` (no data in the page itself).
pub const PAGE: &str = include_str!("topology.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv6Net {
        "fd5e::/48".parse().unwrap()
    }

    fn me() -> Ipv6Net {
        "fd5e:0:0:1::/64".parse().unwrap()
    }

    fn parse(json: &str) -> Result<Report> {
        Report::parse(json.as_bytes(), net(), me())
    }

    #[test]
    fn a_good_report_parses() {
        let r = parse(
            r#"{"version":"0.1.0","tunnels":[{"peer":"fd5e:0:0:2::/64","up":true,
                "transport":"tcp","rtt_ms":21.5,"cost":96}],
                "unreachable":["fd5e:0:0:3::/64"],"future":1}"#,
        )
        .unwrap();
        assert_eq!(r.tunnels[0].transport, Some(TunnelTransport::Tcp));
        assert_eq!(r.unreachable, vec!["fd5e:0:0:3::/64".to_string()]);
    }

    #[test]
    fn bad_reports_are_refused_with_a_reason() {
        let tunnel = |peer: &str, rtt: &str| {
            format!(r#"{{"version":"1","tunnels":[{{"peer":"{peer}","up":true,"rtt_ms":{rtt}}}]}}"#)
        };
        let huge: Vec<String> = (0..=MAX_LIST)
            .map(|i| format!("\"fd5e:0:1:{i:x}::/64\""))
            .collect();
        for (json, why) in [
            ("{".to_string(), "report:"),
            (r#"{"version":"","tunnels":[]}"#.into(), "version"),
            (
                format!(r#"{{"version":"{}","tunnels":[]}}"#, "v".repeat(65)),
                "version",
            ),
            (r#"{"version":"a\nb","tunnels":[]}"#.into(), "version"),
            (tunnel("fd5e:0:0:2::/64", "-1"), "RTT"),
            (tunnel("fd5e:0:0:2::/64", "1e9"), "RTT"),
            (tunnel("fd5f::/64", "1"), "not a node prefix"),
            (tunnel("fd5e::/48", "1"), "not a node prefix"),
            (tunnel("fd5e:0:0:2::1/64", "1"), "not a node prefix"),
            (tunnel("fd5e:0:0:1::/64", "1"), "the reporter"),
            (tunnel("nonsense", "1"), "not a prefix"),
            (
                r#"{"version":"1","tunnels":[],"unreachable":["fd5e:0:0:2::/64","fd5e:0:0:2::/64"]}"#
                    .into(),
                "twice",
            ),
            (
                format!(
                    r#"{{"version":"1","tunnels":[],"unreachable":[{}]}}"#,
                    huge.join(",")
                ),
                "more than",
            ),
        ] {
            let e = parse(&json).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{json}: {e}");
            assert!(e.to_string().contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn the_map_lists_every_node_and_marks_the_silent_ones() {
        let node = |p: &str| NodeInfo {
            prefix: p.into(),
            serial: 1,
            not_after: 0,
            created: 0,
            last_seen: Some(90),
        };
        let report = Report {
            version: "0.1.0".into(),
            tunnels: Vec::new(),
            unreachable: Vec::new(),
        };
        let t = Topology::build(
            net(),
            vec![
                node("fd5e:0:0:1::/64"),
                node("fd5e:0:0:2::/64"),
                node("fd5e:0:0:3::/64"),
            ],
            vec![
                ("fd5e:0:0:1::/64".into(), report.clone(), 1000),
                (
                    "fd5e:0:0:2::/64".into(),
                    report.clone(),
                    1000 - STALE_AFTER_S - 1,
                ),
                ("fd5e:0:0:9::/64".into(), report, 1000),
            ],
            1000,
        );
        let stale: Vec<bool> = t.nodes.iter().map(|n| n.stale).collect();
        assert_eq!(stale, vec![false, true, true]);
        assert_eq!(t.nodes[0].version.as_deref(), Some("0.1.0"));
        assert_eq!(t.nodes[2].reported, None);
        assert_eq!(t.nodes.len(), 3);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Report::parse(&bytes, net(), me());
        }
    }
}
