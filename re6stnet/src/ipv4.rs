//! The node's side of IPv4 inside the overlay (the network config's
//! `ipv4`, re6st's `--ipv4`): its subnet, derived from its IPv6 prefix
//! ([`Ipv4Map`]), the address it takes in it, and IPv4 forwarding on the
//! interfaces where overlay IPv4 enters, never host-wide.

use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};
use re6st_registry::config::NetworkConfig;
use re6st_routing::ipv4_map::Ipv4Map;

/// What the node has of the overlay's IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Side {
    /// How node prefixes map to subnets (the routing filter's rule).
    pub map: Ipv4Map,
    /// Our subnet (exported by Babel).
    pub subnet: Ipv4Net,
    /// Our address in it, with the subnet's length.
    pub address: Ipv4Net,
}

/// Why the node has no IPv4 side although the network has IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoIpv4 {
    /// The registry's setting does not fit the IPv6 network.
    #[error(transparent)]
    Map(#[from] re6st_routing::ipv4_map::Ipv4MapError),
    /// Our prefix has more bits than the subnets have.
    #[error("our prefix {0} is too long for the network's IPv4 subnets")]
    PrefixTooLong(Ipv6Net),
}

impl Ipv4Side {
    /// Our IPv4 side under `c` (None: the network is IPv6 only).
    pub fn of(
        c: &NetworkConfig,
        network: Ipv6Net,
        prefix: Ipv6Net,
    ) -> Result<Option<Self>, NoIpv4> {
        let Some(ov) = &c.ipv4 else { return Ok(None) };
        let map = Ipv4Map::new(network, ov.network, ov.sublen)?;
        let subnet = map.subnet_of(prefix).ok_or(NoIpv4::PrefixTooLong(prefix))?;
        let address = Ipv4Net::new(Ipv4Map::address(subnet), subnet.prefix_len()).unwrap_or(subnet);
        Ok(Some(Self {
            map,
            subnet,
            address,
        }))
    }

    /// The overlay's IPv4 network.
    pub fn network(&self) -> Ipv4Net {
        self.map.network4
    }
}

const CONF: &str = "/proc/sys/net/ipv4/conf";

/// Forwards IPv4 arriving on `iface` (one of our tunnels, or a main
/// interface serving a LAN), with loose reverse-path filtering: routes
/// through the mesh are asymmetric, and strict filtering (rp_filter 1,
/// the kernel uses the larger of `all` and the interface's) would drop
/// replies that come back over another tunnel.
pub fn forward_on(iface: &str) -> anyhow::Result<()> {
    for (key, value) in [("forwarding", "1"), ("rp_filter", "2")] {
        let path = format!("{CONF}/{iface}/{key}");
        std::fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(prefix_len: u8, ipv4: Option<&str>) -> NetworkConfig {
        let mut c = NetworkConfig::new("fd00:1::/48", prefix_len, 0);
        if let Some(v) = ipv4 {
            c.set("ipv4", v).unwrap();
        }
        c
    }

    #[test]
    fn a_node_takes_the_first_address_of_its_prefix_subnet() {
        let network = "fd00:1::/48".parse().unwrap();
        let c = config(64, Some("198.19.0.0/16 16"));
        let s = Ipv4Side::of(&c, network, "fd00:1:0:2a::/64".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(s.subnet, "198.19.0.42/32".parse().unwrap());
        assert_eq!(s.address, "198.19.0.42/32".parse().unwrap());
        let c = config(56, Some("198.19.0.0/16 8"));
        let s = Ipv4Side::of(&c, network, "fd00:1:0:2a00::/56".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(s.subnet, "198.19.42.0/24".parse().unwrap());
        assert_eq!(s.address, "198.19.42.1/24".parse().unwrap());
    }

    #[test]
    fn ipv6_only_networks_and_long_prefixes_give_no_side() {
        let network = "fd00:1::/48".parse().unwrap();
        let prefix = "fd00:1:0:2a::/64".parse().unwrap();
        assert_eq!(Ipv4Side::of(&config(64, None), network, prefix), Ok(None));
        assert_eq!(
            Ipv4Side::of(&config(56, Some("198.19.0.0/16 8")), network, prefix),
            Err(NoIpv4::PrefixTooLong(prefix))
        );
    }
}
