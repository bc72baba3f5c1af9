//! What the core needs to know of routing, typed, and how it becomes the
//! policy's [`View`].

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv6Net;
use re6st_tunnel::policy::{Peer, View};

use super::tunnels::Tunnel;

/// Where a selected route goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// Ours (exported) or otherwise not through an interface.
    Local,
    /// Through this interface.
    Interface(String),
}

/// A selected route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedRoute {
    /// Destination.
    pub prefix: Ipv6Net,
    /// Where it goes.
    pub via: Via,
}

/// The routing state the core reacts to, about once a second.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingView {
    /// Interfaces on which a Babel neighbour was heard (reach ≠ 0).
    pub heard: BTreeSet<String>,
    /// Selected routes.
    pub selected: Vec<SelectedRoute>,
}

/// The policy's view of `routing`: node prefixes inside `network` other
/// than `me`, and how many routes go through each tunnel.
pub fn policy_view(
    routing: &RoutingView,
    me: Ipv6Net,
    network: Ipv6Net,
    tunnels: &BTreeMap<Peer, Tunnel>,
) -> View {
    let by_name: BTreeMap<&str, Peer> =
        tunnels.iter().map(|(p, t)| (t.name.as_str(), *p)).collect();
    let mut view = View::default();
    for r in &routing.selected {
        let p = r.prefix;
        if p != me && network.contains(&p) && p.prefix_len() > network.prefix_len() {
            view.routed.insert(p);
        }
        if let Via::Interface(name) = &r.via {
            if let Some(peer) = by_name.get(name.as_str()) {
                *view.routes_via.entry(*peer).or_default() += 1;
            }
        }
    }
    view
}
