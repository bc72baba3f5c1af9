//! Why the router refused a packet or a TLV: one typed reason per check,
//! counted per reason and exported as labelled counters.

use std::fmt;

/// Why a received packet or TLV was refused (or an outgoing one not sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The source address is not IPv6 link-local.
    NotLinkLocal,
    /// Received on an interface Babel does not run on.
    UnknownInterface,
    /// The packet does not parse.
    Unparsable,
    /// No MAC verified with any accepted key (RFC 8967).
    BadMac,
    /// Authenticated, but without a packet counter.
    NoPc,
    /// The packet counter is not newer than the last one seen (replay).
    OldPc,
    /// An index we have not admitted by a challenge yet.
    UnknownIndex,
    /// A martian destination or source (link-local, multicast, loopback,
    /// unspecified, IPv4-mapped specials).
    Martian,
    /// A destination outside the networks we route.
    OutsideNetwork,
    /// A destination longer than the longest prefix we accept.
    TooSpecific,
    /// A default route that is not a configured gateway route.
    DefaultRoute,
    /// A prefix announced under another router-id than the one it is
    /// bound to (a member originating another node's prefix).
    WrongOrigin,
    /// An IPv4 destination inside the overlay's IPv4 network that is no
    /// node's subnet (covering several, or part of one).
    NotNodeSubnet,
    /// A finite Update with no router-id in force (RFC 8966 §4.6.9).
    NoRouterId,
    /// A Seqno Request more than 100 ahead of our seqno.
    SeqnoRequestTooFar,
    /// A Seqno Request with a hop count of 0.
    SeqnoRequestNoHops,
    /// Not sent: MACs are on and our link-local address there is unknown.
    NoLinkLocal,
    /// The interface requires MACs and no keys are set yet: nothing is
    /// received or sent there.
    NoKeys,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 18] = [
        Self::NotLinkLocal,
        Self::UnknownInterface,
        Self::Unparsable,
        Self::BadMac,
        Self::NoPc,
        Self::OldPc,
        Self::UnknownIndex,
        Self::Martian,
        Self::OutsideNetwork,
        Self::TooSpecific,
        Self::DefaultRoute,
        Self::WrongOrigin,
        Self::NotNodeSubnet,
        Self::NoRouterId,
        Self::SeqnoRequestTooFar,
        Self::SeqnoRequestNoHops,
        Self::NoLinkLocal,
        Self::NoKeys,
    ];

    /// The label used in metrics and status (snake case).
    pub fn label(self) -> &'static str {
        match self {
            Self::NotLinkLocal => "not_link_local",
            Self::UnknownInterface => "unknown_interface",
            Self::Unparsable => "unparsable",
            Self::BadMac => "bad_mac",
            Self::NoPc => "no_pc",
            Self::OldPc => "old_pc",
            Self::UnknownIndex => "unknown_index",
            Self::Martian => "martian",
            Self::OutsideNetwork => "outside_network",
            Self::TooSpecific => "too_specific",
            Self::DefaultRoute => "default_route",
            Self::WrongOrigin => "wrong_origin",
            Self::NotNodeSubnet => "not_node_subnet",
            Self::NoRouterId => "no_router_id",
            Self::SeqnoRequestTooFar => "seqno_request_too_far",
            Self::SeqnoRequestNoHops => "seqno_request_no_hops",
            Self::NoLinkLocal => "no_link_local",
            Self::NoKeys => "no_keys",
        }
    }

    /// Whether it refuses a whole packet (as opposed to one TLV in it).
    pub fn is_packet(self) -> bool {
        matches!(
            self,
            Self::NotLinkLocal
                | Self::UnknownInterface
                | Self::Unparsable
                | Self::BadMac
                | Self::NoPc
                | Self::OldPc
                | Self::UnknownIndex
                | Self::NoKeys
        )
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_all_is_complete() {
        let mut labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
