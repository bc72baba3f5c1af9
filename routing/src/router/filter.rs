//! The input filter: which destinations a received Update may install
//! (babeld's martian check plus re6st's network policy).
//!
//! Always refused: martians (babeld `util.c` `martian_prefix`: multicast,
//! link-local, loopback, unspecified, IPv4-mapped loopback/zero/class E),
//! and the default route unless it is source-specific with a source
//! prefix equal to one of [`Filter::default_from`] (an RFC 9079 gateway
//! route). With [`Filter::networks`] set, destinations must lie inside one
//! of them, and with [`Filter::max_plen`] none may be longer than it (a
//! member cannot announce a more specific part of another node's prefix).
//! With [`Filter::origin`] set, a prefix is accepted only under the
//! router-id it is bound to (re6st: the one derived from a node prefix),
//! so a member cannot originate another node's prefix, or a prefix
//! covering it, under its own id. The Router-Id TLV is not signed: a
//! modified router can still write the owner's id (docs/security.md).
//! With [`Filter::ipv4`] set, IPv4 destinations must be node subnets of
//! its IPv4 network (exactly as long as one, no source prefix), and under
//! [`Origin::NodePrefix`] come only from the router-id of a node prefix
//! that maps to that subnet; without it they follow the rules above (with
//! re6st's IPv6 networks: none is inside).

use std::net::Ipv6Addr;

use ipnet::{IpNet, Ipv6Net};

use super::RouteKey;
use crate::drop_reason::DropReason;
use crate::ipv4_map::Ipv4Map;

/// What received routes may be installed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Destinations must be inside one of these (empty: anywhere not martian).
    pub networks: Vec<IpNet>,
    /// Longest destination prefix accepted (None: any).
    pub max_plen: Option<u8>,
    /// A default route is accepted only from a source prefix equal to one of
    /// these (a gateway's `::/0 from <network>`).
    pub default_from: Vec<IpNet>,
    /// Which router-id may originate a (non-default) destination.
    pub origin: Origin,
    /// The IPv4 node subnets accepted (None: no IPv4 destination).
    pub ipv4: Option<Ipv4Map>,
}

/// Which router-id may originate a destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// Any (plain Babel).
    #[default]
    Any,
    /// re6st's node prefixes: only the router-id [`node_router_id`] of
    /// the destination.
    NodePrefix,
}

/// The router-id of the node holding `prefix`: the prefix with a marker
/// bit just after it (so that its length counts: a covering prefix is
/// another destination with another id), folded to 8 bytes. One to one
/// for the prefixes of one network up to /64: below /64 it is the
/// prefix's first 64 bits with the marker, at /64 those bits with the
/// network's first bit flipped.
pub fn node_router_id(prefix: Ipv6Net) -> [u8; 8] {
    let len = u32::from(prefix.prefix_len());
    let marker = 1u128.checked_shl(127 - len.min(127)).filter(|_| len < 128);
    let enc = u128::from(prefix.network()) | marker.unwrap_or(0);
    ((enc >> 64) as u64 ^ enc as u64).to_be_bytes()
}

fn martian(p: &IpNet) -> bool {
    match p {
        IpNet::V4(n) => {
            let o = n.network().octets();
            let plen = n.prefix_len();
            (plen >= 8 && (o[0] == 127 || o[0] == 0)) || (plen >= 4 && o[0] & 0xE0 == 0xE0)
        }
        IpNet::V6(n) => {
            let a = n.network();
            let o = a.octets();
            let plen = n.prefix_len();
            if plen >= 8 && o[0] == 0xFF {
                return true;
            }
            if plen >= 10 && o[0] == 0xFE && o[1] & 0xC0 == 0x80 {
                return true;
            }
            if plen >= 128 && (a == Ipv6Addr::UNSPECIFIED || a == Ipv6Addr::LOCALHOST) {
                return true;
            }
            match a.to_ipv4_mapped() {
                Some(v4) if plen >= 96 => {
                    let b = v4.octets()[0];
                    (plen >= 104 && (b == 127 || b == 0)) || (plen >= 100 && b & 0xE0 == 0xE0)
                }
                _ => false,
            }
        }
    }
}

fn inside(p: &IpNet, net: &IpNet) -> bool {
    net.contains(p)
}

impl Filter {
    /// Whether a received route for `key` may be accepted.
    pub fn check(&self, key: &RouteKey) -> Result<(), DropReason> {
        if martian(&key.prefix) || key.src.as_ref().is_some_and(martian) {
            return Err(DropReason::Martian);
        }
        if let (IpNet::V4(p), Some(m)) = (key.prefix, self.ipv4) {
            return if key.src.is_some() || !m.network4.contains(&p) {
                Err(DropReason::OutsideNetwork)
            } else if m.owners(p).is_empty() {
                Err(DropReason::NotNodeSubnet)
            } else {
                Ok(())
            };
        }
        if key.prefix.prefix_len() == 0 {
            // Exactly a configured source: `::/0 from <one node's prefix>`
            // would take that node's outbound traffic.
            let gateway = key
                .src
                .is_some_and(|s| s.prefix_len() > 0 && self.default_from.contains(&s));
            return if gateway {
                Ok(())
            } else {
                Err(DropReason::DefaultRoute)
            };
        }
        if !self.networks.is_empty() && !self.networks.iter().any(|n| inside(&key.prefix, n)) {
            return Err(DropReason::OutsideNetwork);
        }
        if self.max_plen.is_some_and(|m| key.prefix.prefix_len() > m) {
            return Err(DropReason::TooSpecific);
        }
        Ok(())
    }

    /// Whether `router_id` may originate `key` (checked on finite
    /// Updates: a relay keeps the originator's router-id, RFC 8966 §3.7).
    pub fn check_origin(&self, key: &RouteKey, router_id: [u8; 8]) -> Result<(), DropReason> {
        match (self.origin, key.prefix) {
            (Origin::NodePrefix, IpNet::V6(p))
                if p.prefix_len() > 0 && node_router_id(p) != router_id =>
            {
                Err(DropReason::WrongOrigin)
            }
            (Origin::NodePrefix, IpNet::V4(p)) => {
                let owners = self.ipv4.map(|m| m.owners(p)).unwrap_or_default();
                if owners.into_iter().any(|o| node_router_id(o) == router_id) {
                    Ok(())
                } else {
                    Err(DropReason::WrongOrigin)
                }
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str, s: Option<&str>) -> RouteKey {
        let parse = |t: &str| t.parse::<IpNet>().unwrap_or_else(|e| panic!("{t}: {e}"));
        RouteKey::new(parse(p), s.map(parse))
    }

    fn re6st() -> Filter {
        Filter {
            networks: vec![key("fd00:1::/48", None).prefix],
            max_plen: Some(64),
            default_from: vec![key("fd00:1::/48", None).prefix],
            origin: Origin::NodePrefix,
            ipv4: Some(
                Ipv4Map::new(
                    "fd00:1::/48".parse().unwrap(),
                    "198.19.0.0/16".parse().unwrap(),
                    16,
                )
                .unwrap(),
            ),
        }
    }

    #[test]
    fn ipv4_node_subnets_pass_only_from_their_owner() {
        let f = re6st();
        let subnet = key("198.19.0.5/32", None);
        assert_eq!(f.check(&subnet), Ok(()));
        let owner = node_router_id("fd00:1:0:5::/64".parse().unwrap());
        let other = node_router_id("fd00:1:0:6::/64".parse().unwrap());
        assert_eq!(f.check_origin(&subnet, owner), Ok(()));
        assert_eq!(f.check_origin(&subnet, other), Err(DropReason::WrongOrigin));
        assert_eq!(
            f.check(&key("198.19.0.0/24", None)),
            Err(DropReason::NotNodeSubnet),
            "a prefix covering other nodes' subnets"
        );
        assert_eq!(
            f.check(&key("198.18.0.5/32", None)),
            Err(DropReason::OutsideNetwork)
        );
        assert_eq!(
            f.check(&key("0.0.0.0/0", None)),
            Err(DropReason::OutsideNetwork)
        );
        assert_eq!(
            f.check(&key("198.19.0.5/32", Some("198.19.0.0/16"))),
            Err(DropReason::OutsideNetwork)
        );
        let no_ipv4 = Filter {
            ipv4: None,
            ..re6st()
        };
        assert_eq!(no_ipv4.check(&subnet), Err(DropReason::OutsideNetwork));
        assert_eq!(Filter::default().check(&subnet), Ok(()), "plain Babel");
    }

    #[test]
    fn martians_are_refused_whatever_the_policy() {
        let open = Filter::default();
        for p in [
            "ff02::/16",
            "fe80::/64",
            "::1/128",
            "::/128",
            "::ffff:127.0.0.0/104",
        ] {
            assert_eq!(open.check(&key(p, None)), Err(DropReason::Martian), "{p}");
        }
        assert_eq!(
            open.check(&key("fd00::/64", Some("fe80::/10"))),
            Err(DropReason::Martian)
        );
        assert_eq!(open.check(&key("2001:db8::/32", None)), Ok(()));
    }

    #[test]
    fn the_network_policy_keeps_routes_inside_and_as_long_as_a_node_prefix() {
        let f = re6st();
        assert_eq!(f.check(&key("fd00:1:0:5::/64", None)), Ok(()));
        assert_eq!(f.check(&key("fd00:1:0:4::/62", None)), Ok(()));
        assert_eq!(
            f.check(&key("fd00:2::/64", None)),
            Err(DropReason::OutsideNetwork)
        );
        assert_eq!(
            f.check(&key("2001:db8::/32", None)),
            Err(DropReason::OutsideNetwork)
        );
        assert_eq!(
            f.check(&key("fd00:1:0:5:8000::/65", None)),
            Err(DropReason::TooSpecific)
        );
    }

    #[test]
    fn only_gateway_default_routes_pass() {
        let f = re6st();
        assert_eq!(f.check(&key("::/0", None)), Err(DropReason::DefaultRoute));
        assert_eq!(f.check(&key("::/0", Some("fd00:1::/48"))), Ok(()));
        assert_eq!(
            f.check(&key("::/0", Some("fd00:9::/48"))),
            Err(DropReason::DefaultRoute)
        );
        assert_eq!(
            f.check(&key("::/0", Some("fd00:1:0:5::/64"))),
            Err(DropReason::DefaultRoute),
            "a gateway for one node's traffic only"
        );
        assert_eq!(
            Filter::default().check(&key("::/0", None)),
            Err(DropReason::DefaultRoute)
        );
    }

    #[test]
    fn a_prefix_is_originated_only_under_its_own_router_id() {
        let f = re6st();
        let p = key("fd00:1:0:5::/64", None);
        // fd00:1:0:5::/64 with its marker (the top bit) folded.
        let bound = [0x7d, 0, 0, 1, 0, 0, 0, 5];
        assert_eq!(f.check_origin(&p, bound), Ok(()));
        assert_eq!(
            f.check_origin(&p, [0xfd, 0, 0, 1, 0, 0, 0, 6]),
            Err(DropReason::WrongOrigin)
        );
        let gateway = key("::/0", Some("fd00:1::/48"));
        assert_eq!(f.check_origin(&gateway, [9; 8]), Ok(()));
        assert_eq!(Filter::default().check_origin(&p, [9; 8]), Ok(()));
        // The node at the start of a /56 cannot originate the /56 (it
        // would draw the traffic of the other 255 /64s when they are down).
        let first: Ipv6Net = "fd00:1:0:100::/64".parse().unwrap_or_default();
        let cover = key("fd00:1:0:100::/56", None);
        assert_eq!(
            f.check_origin(&cover, node_router_id(first)),
            Err(DropReason::WrongOrigin)
        );
    }

    #[test]
    fn node_router_ids_are_one_to_one_up_to_64() {
        let mut seen = std::collections::HashMap::new();
        for len in 49..=64u8 {
            for i in 0..64u128 {
                let net = (0xfd00_0001u128 << 96) | (i << (128 - u32::from(len)));
                let p = Ipv6Net::new(Ipv6Addr::from(net), len)
                    .unwrap_or_default()
                    .trunc();
                if let Some(other) = seen.insert(node_router_id(p), p) {
                    assert_eq!(other, p, "{other} and {p} share a router-id");
                }
            }
        }
    }
}
