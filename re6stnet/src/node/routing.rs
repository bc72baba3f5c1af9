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
    /// Originated by the next hop itself (it announced metric 0).
    pub direct: bool,
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
/// than `me`, how many routes go through each tunnel, and the nodes that
/// are direct neighbours on a LAN (routed through an interface that is no
/// tunnel, by the node itself).
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
            match by_name.get(name.as_str()) {
                Some(peer) => *view.routes_via.entry(*peer).or_default() += 1,
                None if r.direct && view.routed.contains(&p) => {
                    view.lan.insert(p);
                }
                None => {}
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, via: &str, direct: bool) -> SelectedRoute {
        SelectedRoute {
            prefix: prefix.parse().unwrap_or_default(),
            via: Via::Interface(via.into()),
            direct,
        }
    }

    /// A node announcing its own prefix on a LAN is a LAN neighbour; one
    /// relayed over the LAN, or heard through a tunnel, is not.
    #[test]
    fn lan_neighbours_are_the_nodes_heard_directly_on_a_lan() {
        let me: Ipv6Net = "fd5e:0:0:1::/64".parse().unwrap_or_default();
        let network: Ipv6Net = "fd5e::/48".parse().unwrap_or_default();
        let tunnel_peer: Peer = "fd5e:0:0:9::/64".parse().unwrap_or_default();
        let tunnels: BTreeMap<Peer, Tunnel> = [(
            tunnel_peer,
            Tunnel::new(
                "re6st-0001".into(),
                true,
                9,
                [9; 32],
                std::time::Instant::now(),
            ),
        )]
        .into_iter()
        .collect();
        let routing = RoutingView {
            heard: BTreeSet::new(),
            selected: vec![
                route("fd5e:0:0:2::/64", "lan0", true),
                route("fd5e:0:0:3::/64", "lan0", false),
                route("fd5e:0:0:9::/64", "re6st-0001", true),
                route("fd5e:0:0:4::/64", "re6st-0001", false),
            ],
        };
        let v = policy_view(&routing, me, network, &tunnels);
        let lan: Vec<String> = v.lan.iter().map(ToString::to_string).collect();
        assert_eq!(lan, vec!["fd5e:0:0:2::/64".to_string()]);
        assert_eq!(v.routed.len(), 4);
        assert_eq!(v.routes_via.get(&tunnel_peer), Some(&2));
    }
}
