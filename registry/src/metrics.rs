//! The registry's Prometheus metrics (`GET /metrics`, admin access):
//! requests and refusals by endpoint, joins, renewals and revocations,
//! database time, and from the database at each scrape the nodes, those
//! seen in the last hour and the configuration version.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::prometheus::{labels, Exposition, Kind};
use crate::store::NodeInfo;

/// A node counts as seen when it made an authenticated request within
/// this many seconds.
pub const SEEN_WINDOW_S: i64 = 3600;

#[derive(Debug, Default)]
struct Counts {
    requests: BTreeMap<(String, u16), u64>,
    refused: BTreeMap<(String, String), u64>,
    joins: u64,
    renewals: u64,
    revocations: u64,
    db_ops: u64,
    db_time: Duration,
    db_max: Duration,
}

/// Counters since the registry started.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

/// What counts once per event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node joined.
    Join,
    /// A certificate was renewed.
    Renewal,
    /// This many certificates were revoked.
    Revocation(u64),
}

/// What the database says at scrape time.
#[derive(Debug)]
pub struct Scrape<'a> {
    /// Every node.
    pub nodes: &'a [NodeInfo],
    /// The configuration version in force.
    pub config_version: u64,
    /// Now (unix seconds).
    pub now: i64,
}

impl Metrics {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request to `endpoint` (its route) answered `status`, refused for
    /// `reason` (the error code) when it was refused.
    pub fn request(&self, endpoint: &str, status: u16, reason: Option<&str>) {
        let mut c = self.counts();
        *c.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        if let Some(r) = reason {
            *c.refused
                .entry((endpoint.to_string(), r.to_string()))
                .or_default() += 1;
        }
    }

    /// Something worth counting happened.
    pub fn event(&self, e: Event) {
        let mut c = self.counts();
        match e {
            Event::Join => c.joins += 1,
            Event::Renewal => c.renewals += 1,
            Event::Revocation(n) => c.revocations += n,
        }
    }

    /// A database operation took `d`.
    pub fn db(&self, d: Duration) {
        let mut c = self.counts();
        c.db_ops += 1;
        c.db_time += d;
        c.db_max = c.db_max.max(d);
    }

    /// The text exposition.
    pub fn render(&self, s: &Scrape<'_>) -> String {
        let c = self.counts();
        let mut e = Exposition::new();
        e.family(
            "re6st_registry_requests_total",
            Kind::Counter,
            "Requests by endpoint and HTTP status.",
            c.requests.iter().map(|((ep, st), n)| {
                (
                    labels(&[("endpoint", ep), ("status", &st.to_string())]),
                    *n as f64,
                )
            }),
        );
        e.family(
            "re6st_registry_refused_total",
            Kind::Counter,
            "Requests refused, by endpoint and reason (the error code of the answer).",
            c.refused
                .iter()
                .map(|((ep, r), n)| (labels(&[("endpoint", ep), ("reason", r)]), *n as f64)),
        );
        e.single(
            "re6st_registry_joins_total",
            Kind::Counter,
            "Nodes joined.",
            c.joins as f64,
        );
        e.single(
            "re6st_registry_renewals_total",
            Kind::Counter,
            "Certificates renewed.",
            c.renewals as f64,
        );
        e.single(
            "re6st_registry_revocations_total",
            Kind::Counter,
            "Certificates revoked by the operator.",
            c.revocations as f64,
        );
        e.single(
            "re6st_registry_db_operations_total",
            Kind::Counter,
            "Database operations (one transaction or read each).",
            c.db_ops as f64,
        );
        e.single(
            "re6st_registry_db_seconds_total",
            Kind::Counter,
            "Time spent in the database, waiting for it included.",
            c.db_time.as_secs_f64(),
        );
        e.single(
            "re6st_registry_db_seconds_max",
            Kind::Gauge,
            "Longest database operation since start.",
            c.db_max.as_secs_f64(),
        );
        let live = s.nodes.iter().filter(|n| n.not_after > s.now).count();
        let seen = s
            .nodes
            .iter()
            .filter(|n| n.last_seen.is_some_and(|t| s.now - t <= SEEN_WINDOW_S))
            .count();
        e.single(
            "re6st_registry_nodes",
            Kind::Gauge,
            "Nodes with an unexpired certificate.",
            live as f64,
        );
        e.single(
            "re6st_registry_nodes_seen_last_hour",
            Kind::Gauge,
            "Nodes that made an authenticated request in the last hour.",
            seen as f64,
        );
        e.single(
            "re6st_registry_config_version",
            Kind::Gauge,
            "Version of the network configuration in force.",
            s.config_version as f64,
        );
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_the_database_view_render() {
        let m = Metrics::default();
        m.request("/v1/join", 200, None);
        m.request("/v1/join", 403, Some("forbidden"));
        m.event(Event::Join);
        m.event(Event::Revocation(2));
        m.db(Duration::from_millis(3));
        let node = |not_after, last_seen| NodeInfo {
            prefix: "fd5e:0:0:1::/64".into(),
            serial: 1,
            not_after,
            created: 0,
            last_seen,
        };
        let nodes = [
            node(2000, Some(999)),
            node(2000, None),
            node(10, Some(-3000)),
        ];
        let text = m.render(&Scrape {
            nodes: &nodes,
            config_version: 7,
            now: 1000,
        });
        for line in [
            "re6st_registry_requests_total{endpoint=\"/v1/join\",status=\"403\"} 1",
            "re6st_registry_refused_total{endpoint=\"/v1/join\",reason=\"forbidden\"} 1",
            "re6st_registry_joins_total 1",
            "re6st_registry_revocations_total 2",
            "re6st_registry_db_operations_total 1",
            "re6st_registry_nodes 2",
            "re6st_registry_nodes_seen_last_hour 1",
            "re6st_registry_config_version 7",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // What the dashboard in dist/ asks for exists.
        let d = include_str!("../../dist/grafana/re6st-rs.json");
        let asked: Vec<&str> = d
            .match_indices("re6st_registry_")
            .map(|(at, _)| {
                let end = d[at..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(d.len(), |e| at + e);
                &d[at..end]
            })
            .collect();
        assert!(asked.len() > 5, "{asked:?}");
        for n in asked {
            assert!(text.contains(&format!("# TYPE {n} ")), "{n} is not served");
        }
    }
}
