//! What the router shows: neighbours, routes, installed routes, counters.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::{InstalledRoute, RouteKey, Router};
use crate::drop_reason::DropReason;
use crate::neighbour::IfaceId;

/// What a neighbour looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourInfo {
    /// Interface.
    pub iface: IfaceId,
    /// Link-local address.
    pub addr: Ipv6Addr,
    /// Hello history (bit 15 most recent).
    pub history: u16,
    /// Our rxcost for it.
    pub rxcost: u16,
    /// Its rxcost for us.
    pub txcost: u16,
    /// Smoothed RTT.
    pub rtt: Option<Duration>,
    /// Current link cost.
    pub cost: u16,
}

/// What a route looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination.
    pub prefix: IpNet,
    /// Source prefix.
    pub src_prefix: Option<IpNet>,
    /// Originator.
    pub router_id: [u8; 8],
    /// Source seqno.
    pub seqno: u16,
    /// Metric through this neighbour.
    pub metric: u16,
    /// The neighbour's advertised metric.
    pub refmetric: u16,
    /// Interface.
    pub iface: IfaceId,
    /// Next hop.
    pub next_hop: IpAddr,
    /// Whether it is the selected one.
    pub selected: bool,
    /// Whether it satisfies the feasibility condition now.
    pub feasible: bool,
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets parsed and accepted.
    pub packets_in: u64,
    /// Packets refused (see `drops` for why).
    pub packets_rejected: u64,
    /// Packets produced.
    pub packets_out: u64,
    /// Changes of the selected route.
    pub route_switches: u64,
    /// Seqno requests sent (originated or forwarded).
    pub seqno_requests: u64,
    /// Packets and TLVs refused, by reason.
    pub drops: BTreeMap<DropReason, u64>,
}

/// Everything the router shows, typed (a node reads it once a second;
/// text is made only for people, by whoever displays it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingState {
    /// Our router-id.
    pub router_id: [u8; 8],
    /// Our current seqno.
    pub seqno: u16,
    /// Exported prefixes (destination, source).
    pub exports: Vec<(IpNet, Option<IpNet>)>,
    /// Neighbours.
    pub neighbours: Vec<NeighbourInfo>,
    /// Routes.
    pub routes: Vec<RouteInfo>,
    /// Counters.
    pub stats: Stats,
}

impl Router {
    /// The whole state.
    pub fn state(&self, now: Instant) -> RoutingState {
        RoutingState {
            router_id: self.router_id(),
            seqno: self.seqno(),
            exports: self.exports(),
            neighbours: self.neighbours(),
            routes: self.routes(now),
            stats: self.stats.clone(),
        }
    }

    /// Neighbours and their link state.
    pub fn neighbours(&self) -> Vec<NeighbourInfo> {
        self.neighbours
            .iter()
            .map(|(id, n)| {
                let (nominal, quality) = self.nominal(id.iface);
                NeighbourInfo {
                    iface: id.iface,
                    addr: id.addr,
                    history: n.history,
                    rxcost: n.rxcost(nominal, quality),
                    txcost: n.txcost,
                    rtt: n.rtt.map(|(r, _)| r),
                    cost: self.cost(id),
                }
            })
            .collect()
    }

    /// Every learned route, in destination order.
    pub fn routes(&self, now: Instant) -> Vec<RouteInfo> {
        let mut out = Vec::new();
        for (key, e) in self.table.iter() {
            for r in &e.routes {
                out.push(RouteInfo {
                    prefix: key.prefix,
                    src_prefix: key.src,
                    router_id: r.router_id,
                    seqno: r.seqno,
                    metric: self.route_metric(r, now),
                    refmetric: r.refmetric,
                    iface: r.from.iface,
                    next_hop: r.next_hop,
                    selected: e.selected == Some(r.from),
                    feasible: self.feasible(key, r),
                });
            }
        }
        out
    }

    /// What the kernel has for a destination.
    pub fn installed(&self, prefix: IpNet, src_prefix: Option<IpNet>) -> Option<InstalledRoute> {
        self.table
            .get(&RouteKey::new(prefix, src_prefix))
            .and_then(|e| e.installed)
    }
}
