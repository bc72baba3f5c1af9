//! A node's IPv4 subnet inside the overlay, derived from its IPv6 prefix.
//!
//! re6st numbers IPv4 subnets by a serial in the certificate; here the
//! subnet is the node prefix's bits after the network prefix, zero padded
//! to `sublen` bits, placed after the IPv4 network's bits. Node prefixes
//! are disjoint, so their subnets are too (a shorter prefix's padded bits
//! would start a longer one's only if it covered it). Every router can
//! therefore tell, from an IPv4 subnet alone, which node prefixes may own
//! it ([`Ipv4Map::owners`]), and the input filter binds an IPv4 Update to
//! their router-ids as it binds an IPv6 one. A node whose prefix has more
//! than `sublen` bits after the network's gets no IPv4 subnet (two such
//! nodes could share one).

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};

/// How the network's IPv6 node prefixes map to IPv4 subnets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Map {
    /// The overlay's IPv6 network.
    pub network6: Ipv6Net,
    /// The overlay's IPv4 network.
    pub network4: Ipv4Net,
    /// Bits of a node's IPv4 subnet after the IPv4 network's.
    pub sublen: u8,
}

/// Why a map cannot exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ipv4MapError {
    /// No bits left for the subnets, or more than fit.
    #[error("the IPv4 network's length plus the subnet bits must be 1 to 32")]
    BadLength,
    /// More subnet bits than a node prefix has after the network's.
    #[error("more subnet bits than the IPv6 network leaves to node prefixes")]
    TooManyBits,
}

impl Ipv4Map {
    /// A map, checked.
    pub fn new(network6: Ipv6Net, network4: Ipv4Net, sublen: u8) -> Result<Self, Ipv4MapError> {
        if sublen == 0 || u32::from(network4.prefix_len()) + u32::from(sublen) > 32 {
            return Err(Ipv4MapError::BadLength);
        }
        if u32::from(network6.prefix_len()) + u32::from(sublen) > 128 {
            return Err(Ipv4MapError::TooManyBits);
        }
        Ok(Self {
            network6: network6.trunc(),
            network4: network4.trunc(),
            sublen,
        })
    }

    /// Length of every node's IPv4 subnet.
    pub fn subnet_len(&self) -> u8 {
        self.network4.prefix_len() + self.sublen
    }

    /// The IPv4 subnet of the node holding `prefix` (None: not a node
    /// prefix of the network, or too long for the map).
    pub fn subnet_of(&self, prefix: Ipv6Net) -> Option<Ipv4Net> {
        let n6 = self.network6.prefix_len();
        if !self.network6.contains(&prefix) || prefix.prefix_len() <= n6 {
            return None;
        }
        let bits = prefix.prefix_len() - n6;
        if bits > self.sublen {
            return None;
        }
        let after = u128::from(prefix.network()) << n6;
        let index = (after >> (128 - u32::from(bits))) << (self.sublen - bits);
        Some(self.subnet_at(index as u32))
    }

    fn subnet_at(&self, index: u32) -> Ipv4Net {
        let shift = 32 - u32::from(self.subnet_len());
        let base = u32::from(self.network4.network());
        let addr = base | index.checked_shl(shift).unwrap_or(0);
        Ipv4Net::new(Ipv4Addr::from(addr), self.subnet_len()).unwrap_or(self.network4)
    }

    /// The node's own address in its subnet: the first host address, or
    /// the subnet itself when it is a /31 or /32.
    pub fn address(subnet: Ipv4Net) -> Ipv4Addr {
        if subnet.prefix_len() < 31 {
            Ipv4Addr::from(u32::from(subnet.network()) + 1)
        } else {
            subnet.network()
        }
    }

    /// The node prefixes that would own `subnet` (empty when it is not one
    /// of the map's subnets): the subnet's index read as `sublen` bits,
    /// then each shorter prefix whose dropped bits are all zero.
    pub fn owners(&self, subnet: Ipv4Net) -> Vec<Ipv6Net> {
        if subnet.prefix_len() != self.subnet_len() || !self.network4.contains(&subnet) {
            return Vec::new();
        }
        let shift = 32 - u32::from(self.subnet_len());
        let index = (u32::from(subnet.network()) & !u32::from(self.network4.netmask()))
            .checked_shr(shift)
            .unwrap_or(0);
        let n6 = self.network6.prefix_len();
        (1..=self.sublen)
            .rev()
            .filter(|bits| {
                let dropped = u32::from(self.sublen - bits);
                index & (1u32.checked_shl(dropped).unwrap_or(0).wrapping_sub(1)) == 0
            })
            .filter_map(|bits| {
                let value = u128::from(index >> (self.sublen - bits));
                let at = 128 - u32::from(n6) - u32::from(bits);
                let addr = u128::from(self.network6.network()) | value.checked_shl(at).unwrap_or(0);
                Ipv6Net::new(addr.into(), n6 + bits).ok()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(sublen: u8) -> Ipv4Map {
        Ipv4Map::new(
            "fd00:1::/48".parse().unwrap(),
            "198.19.0.0/16".parse().unwrap(),
            sublen,
        )
        .unwrap()
    }

    fn p6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_node_prefix_gets_its_bits_as_the_subnet() {
        let m = map(16);
        assert_eq!(
            m.subnet_of(p6("fd00:1:0:5::/64")),
            Some("198.19.0.5/32".parse().unwrap())
        );
        let m = map(8);
        assert_eq!(
            m.subnet_of(p6("fd00:1:0:700::/56")),
            Some("198.19.7.0/24".parse().unwrap())
        );
        assert_eq!(
            Ipv4Map::address("198.19.7.0/24".parse().unwrap()),
            "198.19.7.1".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            Ipv4Map::address("198.19.0.5/32".parse().unwrap()),
            "198.19.0.5".parse::<Ipv4Addr>().unwrap()
        );
        // Shorter prefixes are padded with zeros.
        assert_eq!(
            m.subnet_of(p6("fd00:1:0:8000::/49")),
            Some("198.19.128.0/24".parse().unwrap())
        );
    }

    #[test]
    fn prefixes_outside_or_too_long_get_none() {
        let m = map(8);
        assert_eq!(m.subnet_of(p6("fd00:2:0:100::/56")), None);
        assert_eq!(m.subnet_of(p6("fd00:1::/48")), None);
        assert_eq!(m.subnet_of(p6("fd00:1:0:100::/64")), None);
    }

    #[test]
    fn bad_maps_are_refused() {
        let (n6, n4) = (p6("fd00:1::/48"), "198.19.0.0/16".parse().unwrap());
        assert_eq!(Ipv4Map::new(n6, n4, 0), Err(Ipv4MapError::BadLength));
        assert_eq!(Ipv4Map::new(n6, n4, 17), Err(Ipv4MapError::BadLength));
        assert_eq!(
            Ipv4Map::new(p6("fd00::1/127"), "198.19.0.0/24".parse().unwrap(), 2),
            Err(Ipv4MapError::TooManyBits)
        );
    }

    #[test]
    fn owners_are_the_prefixes_that_map_there() {
        let m = map(8);
        assert_eq!(
            m.owners("198.19.7.0/24".parse().unwrap()),
            vec![p6("fd00:1:0:700::/56")]
        );
        assert_eq!(
            m.owners("198.19.128.0/24".parse().unwrap()),
            vec![
                p6("fd00:1:0:8000::/56"),
                p6("fd00:1:0:8000::/55"),
                p6("fd00:1:0:8000::/54"),
                p6("fd00:1:0:8000::/53"),
                p6("fd00:1:0:8000::/52"),
                p6("fd00:1:0:8000::/51"),
                p6("fd00:1:0:8000::/50"),
                p6("fd00:1:0:8000::/49"),
            ]
        );
        assert!(m.owners("198.19.7.0/25".parse().unwrap()).is_empty());
        assert!(m.owners("198.18.7.0/24".parse().unwrap()).is_empty());
    }

    proptest! {
        #[test]
        fn disjoint_prefixes_get_disjoint_subnets_and_own_them(
            a in any::<u16>(), la in 1u8..=12, b in any::<u16>(), lb in 1u8..=12,
        ) {
            let m = map(12);
            let prefix = |v: u16, l: u8| {
                let addr = u128::from(m.network6.network()) | (u128::from(v) << 64);
                Ipv6Net::new(addr.into(), 48 + l).unwrap().trunc()
            };
            let (pa, pb) = (prefix(a, la), prefix(b, lb));
            let (sa, sb) = (m.subnet_of(pa).unwrap(), m.subnet_of(pb).unwrap());
            prop_assert!(m.owners(sa).contains(&pa));
            if !pa.contains(&pb) && !pb.contains(&pa) {
                prop_assert_ne!(sa, sb);
            }
        }
    }
}
