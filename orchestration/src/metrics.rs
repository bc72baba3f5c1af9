//! The master's Prometheus metrics (`GET /metrics`, operator token):
//! instances by wanted state and reported status, agents by liveness, each
//! agent's silence, and the copies re-placed since the master started.

use std::collections::BTreeMap;

use re6st_registry::prometheus::{labels, Exposition, Kind};

use crate::store::{Instance, Node};

/// What the metrics are made of, at one moment.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// Every instance.
    pub instances: &'a [Instance],
    /// Every node (with `revoked` filled in).
    pub nodes: &'a [Node],
    /// Now (unix seconds).
    pub now: i64,
    /// Silence after which an agent counts as lost.
    pub agent_timeout_s: i64,
    /// Copies re-placed since the master started.
    pub replacements: u64,
}

/// The text exposition format.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for i in s.instances {
        *by_state.entry((&i.state, &i.status)).or_default() += 1;
    }
    let mut e = Exposition::new();
    e.family(
        "re6st_orch_instances",
        Kind::Gauge,
        "Instances by wanted state and reported status.",
        by_state.iter().map(|((state, status), n)| {
            (labels(&[("state", state), ("status", status)]), *n as f64)
        }),
    );
    let mut agents: BTreeMap<&str, u64> = [("live", 0), ("silent", 0), ("revoked", 0)].into();
    let mut silences = Vec::new();
    for n in s.nodes {
        let silence = (s.now - n.last_seen).max(0);
        let kind = if n.revoked {
            "revoked"
        } else if silence > s.agent_timeout_s {
            "silent"
        } else {
            "live"
        };
        *agents.entry(kind).or_default() += 1;
        silences.push((
            labels(&[("node", &n.name), ("site", &n.site)]),
            silence as f64,
        ));
    }
    e.family(
        "re6st_orch_agent_silence_seconds",
        Kind::Gauge,
        "Seconds since each agent last called.",
        silences,
    );
    e.family(
        "re6st_orch_agents",
        Kind::Gauge,
        "Agents by liveness (silent: longer than the agent timeout).",
        agents
            .iter()
            .map(|(kind, n)| (labels(&[("state", kind)]), *n as f64)),
    );
    e.single(
        "re6st_orch_replacements_total",
        Kind::Counter,
        "Copies re-placed since the master started.",
        s.replacements as f64,
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, last_seen: i64, revoked: bool) -> Node {
        Node {
            name: name.into(),
            prefix: String::new(),
            last_seen,
            serial: 1,
            site: format!("site-{name}"),
            revoked,
            instances: 0,
        }
    }

    #[test]
    fn metrics_count_instances_and_agents() {
        let i = |status: &str| Instance {
            name: "x".into(),
            software: "kv".into(),
            params: BTreeMap::new(),
            node: "a".into(),
            state: "started".into(),
            status: status.into(),
            connection: BTreeMap::new(),
            generation: 1,
            updated_at: 0,
            copy_of: String::new(),
            copies: 1,
            requester: Default::default(),
        };
        let instances = [i("ready"), i("ready"), i("failing")];
        let nodes = [
            node("a", 95, false),
            node("b", 10, false),
            node("c\"", 99, true),
        ];
        let text = render(&Snapshot {
            instances: &instances,
            nodes: &nodes,
            now: 100,
            agent_timeout_s: 60,
            replacements: 2,
        });
        for line in [
            "re6st_orch_instances{state=\"started\",status=\"ready\"} 2",
            "re6st_orch_instances{state=\"started\",status=\"failing\"} 1",
            "re6st_orch_agents{state=\"live\"} 1",
            "re6st_orch_agents{state=\"silent\"} 1",
            "re6st_orch_agents{state=\"revoked\"} 1",
            "re6st_orch_agent_silence_seconds{node=\"b\",site=\"site-b\"} 90",
            "re6st_orch_agent_silence_seconds{node=\"c\\\"\",site=\"site-c\\\"\"} 1",
            "re6st_orch_replacements_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
