//! The topology report a node posts to the registry, made of what its
//! control API shows: its tunnels, the Babel neighbour on each, and the
//! peers its last direct attempt could not reach.

use re6st_registry::topology::{Report, ReportedTunnel, TunnelTransport, MAX_LIST};
use re6st_routing::driver::NeighbourStatus;
use re6st_tunnel::policy::Peer;

use crate::ctl::TunnelInfo;

/// Our software version, as reports and `--version` say it.
pub const VERSION: &str = concat!("re6st-rs ", env!("CARGO_PKG_VERSION"));

/// The report of `tunnels` (with the RTT and cost of the best-heard
/// neighbour on each) and of the `failing` peers we have no tunnel with;
/// lists are cut to what the registry takes.
pub fn build(tunnels: &[TunnelInfo], neighbours: &[NeighbourStatus], failing: &[Peer]) -> Report {
    let reported = tunnels
        .iter()
        .take(MAX_LIST)
        .map(|t| {
            let n = neighbours
                .iter()
                .filter(|n| n.interface == t.interface)
                .min_by_key(|n| n.cost);
            ReportedTunnel {
                peer: t.peer.clone(),
                up: t.up,
                transport: match t.transport.as_deref() {
                    Some("udp") => Some(TunnelTransport::Udp),
                    Some("tcp") => Some(TunnelTransport::Tcp),
                    _ => None,
                },
                rtt_ms: n.and_then(|n| n.rtt_ms),
                cost: n.map(|n| n.cost),
            }
        })
        .collect();
    let unreachable = failing
        .iter()
        .map(ToString::to_string)
        .filter(|p| tunnels.iter().all(|t| &t.peer != p))
        .take(MAX_LIST)
        .collect();
    Report {
        version: VERSION.to_string(),
        tunnels: reported,
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(peer: &str, interface: &str, transport: Option<&str>) -> TunnelInfo {
        TunnelInfo {
            peer: peer.into(),
            interface: interface.into(),
            direction: "out".into(),
            up: true,
            endpoint: None,
            transport: transport.map(Into::into),
            since_handshake_s: None,
            tx_bytes: 0,
            rx_bytes: 0,
            routes: 0,
            cost_multiplier: 1,
        }
    }

    fn neighbour(interface: &str, rtt_ms: Option<f64>, cost: u16) -> NeighbourStatus {
        NeighbourStatus {
            interface: interface.into(),
            address: "fe80::1".parse().unwrap(),
            reach: String::new(),
            rxcost: 96,
            txcost: 96,
            rtt_ms,
            cost,
        }
    }

    #[test]
    fn tunnels_carry_their_neighbours_rtt_and_the_report_checks() {
        let network = "fd5e::/48".parse().unwrap();
        let me = "fd5e:0:0:1::/64".parse().unwrap();
        let failing: Vec<Peer> = ["fd5e:0:0:3::/64", "fd5e:0:0:2::/64"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let r = build(
            &[
                tunnel("fd5e:0:0:2::/64", "re6st-0001", Some("tcp")),
                tunnel("fd5e:0:0:4::/64", "re6st-0002", None),
            ],
            &[
                neighbour("re6st-0001", Some(80.0), 400),
                neighbour("re6st-0001", Some(20.5), 150),
                neighbour("lan0", Some(1.0), 96),
            ],
            &failing,
        );
        assert_eq!(r.tunnels[0].rtt_ms, Some(20.5));
        assert_eq!(r.tunnels[0].cost, Some(150));
        assert_eq!(r.tunnels[0].transport, Some(TunnelTransport::Tcp));
        assert_eq!((r.tunnels[1].rtt_ms, r.tunnels[1].transport), (None, None));
        assert_eq!(
            r.unreachable,
            vec!["fd5e:0:0:3::/64".to_string()],
            "a peer we have a tunnel with is not unreachable"
        );
        let bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(Report::parse(&bytes, network, me).unwrap(), r);
    }

    #[test]
    fn long_lists_are_cut_to_what_the_registry_takes() {
        let failing: Vec<Peer> = (0..MAX_LIST as u32 + 10)
            .map(|i| format!("fd5e:0:1:{i:x}::/64").parse().unwrap())
            .collect();
        let r = build(&[], &[], &failing);
        assert_eq!(r.unreachable.len(), MAX_LIST);
    }
}
