//! Our endpoints as peers see them (NAT), sans-IO.
//!
//! Every set-up answer says, signed, where the responder saw our request
//! come from. Behind a NAT that is the NAT's mapping of our socket, which
//! the node cannot find on its own interfaces. One peer's word is never
//! enough: an address counts once [`QUORUM`] different peers saw it, the
//! most recent claims first (a NAT that changes its address is followed).
//!
//! Per address family:
//! - fewer than [`QUORUM`] peers told us anything: [`Seen::Unknown`], the
//!   detected addresses are announced as they are;
//! - the agreed address is one of ours: [`Seen::Direct`];
//! - the agreed address is not ours: [`Seen::Mapped`], a NAT with an
//!   endpoint-independent mapping; it is announced instead of ours, and
//!   the record says `nat` (dialers ask us to punch first);
//! - peers disagree and none saw one of our addresses:
//!   [`Seen::Unreachable`], a NAT that maps every peer to another port
//!   (symmetric); nothing of that family is announced, and a node left
//!   with nothing publishes no record: it is a client, as re6st's NATed
//!   nodes are, reached through the mesh.
//!
//! A single member lying cannot move us: with one honest peer seeing our
//! own address no quorum forms against it, and an address needs a second
//! peer to agree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use re6st_tunnel::policy::Peer;

/// Peers that must agree on an address.
pub const QUORUM: usize = 2;
/// How long a peer's claim counts.
pub const CLAIM_TTL: Duration = Duration::from_secs(3600);
/// Claims kept, at most (one per peer, the oldest forgotten first).
pub const MAX_CLAIMS: usize = 32;

/// What one claim did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A private, reserved or junk address: ignored.
    Unusable,
    /// Counted, but no other peer saw the same yet.
    Unconfirmed,
    /// Counted, and at least [`QUORUM`] peers saw that address.
    Agreed,
}

impl Claim {
    /// As metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unusable => "unusable",
            Self::Unconfirmed => "unconfirmed",
            Self::Agreed => "agreed",
        }
    }
}

/// What peers tell us about one address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Fewer than [`QUORUM`] peers, or no agreement while one saw our own
    /// address.
    Unknown,
    /// Peers see one of our own addresses.
    Direct,
    /// Peers agree on an address that is not ours: a NAT's mapping.
    Mapped(SocketAddr),
    /// Peers each see another address, none ours: nobody can dial us.
    Unreachable,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown"),
            Self::Direct => f.write_str("direct"),
            Self::Mapped(a) => write!(f, "nat {a}"),
            Self::Unreachable => f.write_str("unreachable"),
        }
    }
}

/// What to announce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reachability {
    /// The endpoints of our peer record (none: publish no record).
    pub endpoints: Vec<SocketAddr>,
    /// Some of them are a NAT's mapping.
    pub nat: bool,
}

/// The claims of our peers.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    claims: BTreeMap<Peer, (SocketAddr, Instant)>,
}

impl Observed {
    /// `peer` saw us at `addr`.
    pub fn claim(&mut self, now: Instant, peer: Peer, addr: SocketAddr) -> Claim {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if !re6st_tunnel::link::public_endpoint(addr.ip()) || addr.port() == 0 {
            return Claim::Unusable;
        }
        self.claims.insert(peer, (addr, now));
        while self.claims.len() > MAX_CLAIMS {
            let oldest = self
                .claims
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.claims.remove(&p);
            }
        }
        let agreeing = self
            .live(now, addr.is_ipv4())
            .iter()
            .filter(|a| **a == addr)
            .count();
        if agreeing >= QUORUM {
            Claim::Agreed
        } else {
            Claim::Unconfirmed
        }
    }

    /// Live claims of one family, most recent first.
    fn live(&self, now: Instant, v4: bool) -> Vec<SocketAddr> {
        let mut live: Vec<(Instant, SocketAddr)> = self
            .claims
            .values()
            .filter(|(a, at)| a.is_ipv4() == v4 && now.saturating_duration_since(*at) < CLAIM_TTL)
            .map(|(a, at)| (*at, *a))
            .collect();
        live.sort_by_key(|b| std::cmp::Reverse(b.0));
        live.into_iter().map(|(_, a)| a).collect()
    }

    /// What peers tell us about one family, given our own addresses.
    pub fn seen(&self, now: Instant, v4: bool, ours: &[SocketAddr]) -> Seen {
        let live = self.live(now, v4);
        if live.len() < QUORUM {
            return Seen::Unknown;
        }
        let mut counts: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        let agreed = live.iter().find(|a| {
            let c = counts.entry(**a).or_default();
            *c += 1;
            *c >= QUORUM
        });
        match agreed {
            Some(a) if ours.contains(a) => Seen::Direct,
            Some(a) => Seen::Mapped(*a),
            None if live.iter().any(|a| ours.contains(a)) => Seen::Unknown,
            None => Seen::Unreachable,
        }
    }

    /// What to announce, from the addresses found on our interfaces.
    pub fn reachability(&self, now: Instant, detected: &[SocketAddr]) -> Reachability {
        let mut out = Reachability::default();
        for v4 in [true, false] {
            let ours: Vec<SocketAddr> = detected
                .iter()
                .filter(|a| a.is_ipv4() == v4)
                .copied()
                .collect();
            match self.seen(now, v4, &ours) {
                Seen::Unknown | Seen::Direct => out.endpoints.extend(ours),
                Seen::Mapped(a) => {
                    out.endpoints.push(a);
                    out.nat = true;
                }
                Seen::Unreachable => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u16) -> Peer {
        format!("fd5e:0:0:{i:x}::/64").parse().unwrap_or_default()
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or(SocketAddr::from(([0u8; 4], 0)))
    }

    #[test]
    fn a_nat_mapping_counts_once_two_peers_agree() {
        let t = Instant::now();
        let lan = [a("198.19.0.2:326"), a("[fd00:1a::2]:326")];
        let mut o = Observed::default();
        assert_eq!(o.claim(t, peer(1), a("198.18.5.2:326")), Claim::Unconfirmed);
        assert_eq!(
            o.reachability(t, &lan),
            Reachability {
                endpoints: lan.to_vec(),
                nat: false
            },
            "one peer's word changes nothing"
        );
        assert_eq!(
            o.claim(t, peer(2), a("[::ffff:198.18.5.2]:326")),
            Claim::Agreed
        );
        assert_eq!(
            o.seen(t, true, &lan[..1]),
            Seen::Mapped(a("198.18.5.2:326"))
        );
        assert_eq!(
            o.reachability(t, &lan),
            Reachability {
                endpoints: vec![a("198.18.5.2:326"), lan[1]],
                nat: true
            },
            "the mapping replaces the LAN address; IPv6, unseen, stays"
        );
    }

    #[test]
    fn a_symmetric_nat_leaves_nothing_to_announce() {
        let t = Instant::now();
        let lan = [a("198.19.0.2:326")];
        let mut o = Observed::default();
        for (i, port) in [40001, 40002, 40003].into_iter().enumerate() {
            let c = o.claim(
                t,
                peer(i as u16),
                SocketAddr::new(a("198.18.5.2:0").ip(), port),
            );
            assert_eq!(c, Claim::Unconfirmed);
        }
        assert_eq!(o.seen(t, true, &lan), Seen::Unreachable);
        assert_eq!(o.reachability(t, &lan), Reachability::default());
    }

    #[test]
    fn one_liar_cannot_move_a_public_node() {
        let t = Instant::now();
        let ours = [a("198.18.1.2:326")];
        let mut o = Observed::default();
        o.claim(t, peer(1), a("198.18.1.2:326"));
        o.claim(t, peer(2), a("198.18.66.6:326"));
        assert_eq!(o.seen(t, true, &ours), Seen::Unknown);
        // The liar repeating itself is still one peer.
        o.claim(t, peer(2), a("198.18.66.6:326"));
        assert_eq!(o.reachability(t, &ours).endpoints, ours.to_vec());
        o.claim(t, peer(3), a("198.18.1.2:326"));
        assert_eq!(o.seen(t, true, &ours), Seen::Direct);
    }

    #[test]
    fn private_and_reserved_claims_are_ignored() {
        let t = Instant::now();
        let mut o = Observed::default();
        for (i, s) in [
            "10.0.0.1:326",
            "100.64.1.1:326",
            "127.0.0.1:326",
            "198.18.1.1:0",
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(o.claim(t, peer(i as u16), a(s)), Claim::Unusable);
        }
        assert_eq!(o.seen(t, true, &[]), Seen::Unknown);
    }

    #[test]
    fn a_new_nat_address_is_followed_and_old_claims_expire() {
        let t = Instant::now();
        let lan = [a("198.19.0.2:326")];
        let mut o = Observed::default();
        for i in 0..5 {
            o.claim(t, peer(i), a("198.18.5.2:326"));
        }
        let later = t + Duration::from_secs(60);
        o.claim(later, peer(10), a("198.18.6.2:326"));
        o.claim(later, peer(11), a("198.18.6.2:326"));
        assert_eq!(o.seen(later, true, &lan), Seen::Mapped(a("198.18.6.2:326")));
        let much_later = t + CLAIM_TTL + Duration::from_secs(61);
        assert_eq!(o.seen(much_later, true, &lan), Seen::Unknown);
        for i in 0..100 {
            o.claim(much_later, peer(100 + i), a("198.18.7.2:326"));
        }
        assert!(o.claims.len() <= MAX_CLAIMS);
    }
}
