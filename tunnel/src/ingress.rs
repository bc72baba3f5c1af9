//! Which decrypted packets a node lets out of its tunnels into the host.
//!
//! A tunnel device forwards what arrives on it (the node relays for the
//! mesh), so a member could otherwise use any node as a relay to wherever
//! the host's own routes lead. A node admits IPv6 to the overlay network
//! (and link-local or multicast, which the kernel never forwards), or to
//! anywhere when it is a gateway; IPv4 to the overlay's IPv4 network, or
//! none when the network has no IPv4. Checked on the destination only:
//! relayed packets carry other nodes' sources.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Destinations admitted for one IP version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Admit<N> {
    /// Every destination (a gateway; tools without an overlay).
    #[default]
    Any,
    /// Destinations inside this network.
    Within(N),
    /// No packet of this version.
    Nothing,
}

/// The node's policy (the default admits everything).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingress {
    /// For IPv6 packets.
    pub v6: Admit<Ipv6Net>,
    /// For IPv4 packets.
    pub v4: Admit<Ipv4Net>,
}

impl Ingress {
    /// Whether `packet` (an IP packet) may enter the host; a packet too
    /// short for its header or of another version may not.
    pub fn admits(&self, packet: &[u8]) -> bool {
        match packet.first().map(|b| b >> 4) {
            Some(6) => {
                let Some(dst) = packet
                    .get(24..40)
                    .and_then(|d| <[u8; 16]>::try_from(d).ok())
                else {
                    return false;
                };
                let dst = Ipv6Addr::from(dst);
                match self.v6 {
                    Admit::Any => true,
                    Admit::Within(n) => {
                        n.contains(&dst) || dst.is_multicast() || dst.is_unicast_link_local()
                    }
                    Admit::Nothing => false,
                }
            }
            Some(4) => {
                let Some(dst) = packet.get(16..20).and_then(|d| <[u8; 4]>::try_from(d).ok()) else {
                    return false;
                };
                match self.v4 {
                    Admit::Any => true,
                    Admit::Within(n) => n.contains(&Ipv4Addr::from(dst)),
                    Admit::Nothing => false,
                }
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(dst: &str) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    fn v4(dst: &str) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
        p
    }

    #[test]
    fn a_node_admits_only_overlay_destinations() {
        let node = Ingress {
            v6: Admit::Within("fd5e:5e::/48".parse().unwrap()),
            v4: Admit::Within("198.19.240.0/20".parse().unwrap()),
        };
        assert!(node.admits(&v6("fd5e:5e:0:100::1")));
        assert!(node.admits(&v6("fe80::1")));
        assert!(node.admits(&v6("ff02::1:6")));
        assert!(!node.admits(&v6("2001:db8::1")), "the Internet");
        assert!(!node.admits(&v6("fd00::2")), "the underlay");
        assert!(node.admits(&v4("198.19.240.17")));
        assert!(!node.admits(&v4("198.18.1.2")), "the underlay");
        let v6_only = Ingress {
            v4: Admit::Nothing,
            ..node
        };
        assert!(!v6_only.admits(&v4("198.19.240.17")));
        let gateway = Ingress {
            v6: Admit::Any,
            ..node
        };
        assert!(gateway.admits(&v6("2001:db8::1")));
    }

    #[test]
    fn short_or_unknown_packets_are_refused() {
        let all = Ingress::default();
        assert!(all.admits(&v6("2001:db8::1")) && all.admits(&v4("198.18.1.2")));
        for bad in [&[][..], &[0x60; 39][..], &[0x45; 19][..], &[0x20; 60][..]] {
            assert!(!all.admits(bad), "{bad:?}");
        }
    }
}
