//! What the node core asks its driver to do, and the typed reasons that
//! become metrics labels.

use std::net::SocketAddr;

use re6st_tunnel::endpoint::Endpoint;
use std::time::Duration;

use re6st_registry::auth::SignedPeerRecord;
use re6st_registry::config::{HmacKeys, SignedConfig};
use re6st_tunnel::policy::Peer;

/// One thing for the driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a datagram from the shared socket (UDP, or a TCP connection
    /// to the same port).
    Send {
        /// Destination (underlay endpoint, or a peer's overlay address).
        dst: Endpoint,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// Add a WireGuard link and its tun device, and run Babel on it.
    OpenTunnel {
        /// The peer.
        peer: Peer,
        /// The tun device's name.
        name: String,
        /// The peer's WireGuard key.
        wg_key: [u8; 32],
        /// Where to send the first handshake (None: wait for the peer's).
        endpoint: Option<Endpoint>,
        /// MTU of the tun device.
        mtu: u32,
    },
    /// Remove the link and its tun device, and stop Babel on it.
    CloseTunnel {
        /// The peer.
        peer: Peer,
        /// The tun device's name.
        name: String,
    },
    /// Set the Babel cost multiplier of an interface.
    SetCost {
        /// Interface.
        name: String,
        /// Multiplier (1: normal).
        multiplier: u16,
    },
    /// Set the MTU of a tunnel device (the network's changed).
    SetMtu {
        /// Interface.
        name: String,
        /// MTU.
        mtu: u32,
    },
    /// Set the Babel Hello interval of an interface.
    SetHelloInterval {
        /// Interface.
        name: String,
        /// Interval.
        interval: Duration,
    },
    /// Give the router these HMAC keys.
    SetBabelKeys(HmacKeys),
    /// Run a registry request; answer with [`super::NodeCore::handle_registry`].
    Registry(RegistryRequest),
    /// Find our underlay endpoints; answer with
    /// [`super::NodeCore::handle_endpoints`].
    DetectEndpoints,
    /// Keep this network configuration for the next start.
    SaveNetwork(SignedConfig),
    /// Keep these Babel keys for the next start.
    SaveHmac(HmacKeys),
    /// Write our renewed certificate (PEM).
    SaveCertificate(String),
    /// Apply this change to the persistent peer cache.
    Persist(CacheChange),
    /// Our own certificate was revoked: every tunnel is closed, none opens.
    Revoked,
}

/// A request to the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryRequest {
    /// The signed network configuration.
    Config,
    /// Our sealed Babel HMAC keys.
    Hmac,
    /// A few peer records to start from.
    Bootstrap,
    /// Publish our peer record.
    Publish(SignedPeerRecord),
    /// Renew our certificate.
    Renew,
    /// Post our topology report (the driver fills it in from the
    /// tunnels, the routing state and [`super::NodeCore::failing_peers`]).
    Report,
}

/// The kinds of registry requests (at most one of each runs at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RegistryKind {
    /// [`RegistryRequest::Config`].
    Config,
    /// [`RegistryRequest::Hmac`].
    Hmac,
    /// [`RegistryRequest::Bootstrap`].
    Bootstrap,
    /// [`RegistryRequest::Publish`].
    Publish,
    /// [`RegistryRequest::Renew`].
    Renew,
    /// [`RegistryRequest::Report`].
    Report,
}

impl RegistryRequest {
    /// Its kind.
    pub fn kind(&self) -> RegistryKind {
        match self {
            Self::Config => RegistryKind::Config,
            Self::Hmac => RegistryKind::Hmac,
            Self::Bootstrap => RegistryKind::Bootstrap,
            Self::Publish(_) => RegistryKind::Publish,
            Self::Renew => RegistryKind::Renew,
            Self::Report => RegistryKind::Report,
        }
    }
}

/// The answer to a [`RegistryRequest`]; errors are the driver's text.
#[derive(Clone, Debug)]
pub enum RegistryResult {
    /// To [`RegistryRequest::Config`].
    Config(Result<SignedConfig, String>),
    /// To [`RegistryRequest::Hmac`], opened.
    Hmac(Result<HmacKeys, String>),
    /// To [`RegistryRequest::Bootstrap`].
    Bootstrap(Result<Vec<SignedPeerRecord>, String>),
    /// To [`RegistryRequest::Publish`].
    Published(Result<(), String>),
    /// To [`RegistryRequest::Renew`]: the new certificate's PEM.
    Renewed(Result<String, String>),
    /// To [`RegistryRequest::Report`].
    Reported(Result<(), String>),
}

impl RegistryResult {
    /// The kind of request it answers.
    pub fn kind(&self) -> RegistryKind {
        match self {
            Self::Config(_) => RegistryKind::Config,
            Self::Hmac(_) => RegistryKind::Hmac,
            Self::Bootstrap(_) => RegistryKind::Bootstrap,
            Self::Published(_) => RegistryKind::Publish,
            Self::Renewed(_) => RegistryKind::Renew,
            Self::Reported(_) => RegistryKind::Report,
        }
    }
}

/// A change of the in-memory peer cache, to write through to SQLite with
/// the same arguments (so both agree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheChange {
    /// `PeerCache::insert` of a verified record.
    Insert {
        /// The record.
        record: SignedPeerRecord,
        /// The time of the insertion (unix seconds).
        unix: i64,
    },
    /// `PeerCache::mark_ok`.
    MarkOk {
        /// The peer.
        peer: Peer,
        /// The endpoint that worked.
        endpoint: SocketAddr,
        /// Now (unix seconds).
        unix: i64,
    },
    /// `PeerCache::mark_failed`.
    MarkFailed {
        /// The peer.
        peer: Peer,
        /// Now (unix seconds).
        unix: i64,
        /// First back-off, in seconds.
        backoff_s: i64,
    },
    /// `PeerCache::remove`.
    Remove(Peer),
}

/// Why a tunnel was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LossReason {
    /// An incoming tunnel whose initiator never completed the handshake.
    NoHandshake,
    /// No Babel neighbour heard for too long.
    Silent,
    /// The data plane expired the link.
    Expired,
    /// The peer sent Close.
    ClosedByPeer,
    /// The peer's certificate was revoked.
    Revoked,
    /// Our own certificate was revoked.
    WeAreRevoked,
    /// The peer asked for a new tunnel: it lost its state (restarted).
    PeerRestarted,
}

impl LossReason {
    /// Its metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoHandshake => "no_handshake",
            Self::Silent => "silent",
            Self::Expired => "expired",
            Self::ClosedByPeer => "closed_by_peer",
            Self::Revoked => "revoked",
            Self::WeAreRevoked => "we_are_revoked",
            Self::PeerRestarted => "peer_restarted",
        }
    }
}

/// Why an outgoing attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailReason {
    /// Nobody answered our request for the peer's endpoints.
    NoEndpointsAnswer,
    /// The peer's record has no endpoint.
    NoEndpoint,
    /// Nobody answered our set-up request.
    NoSetupAnswer,
    /// The peer is full.
    Busy,
    /// The peer refused us.
    Refused,
    /// The handshake did not complete in time.
    NoHandshake,
    /// The driver could not create the link or its tun device.
    Link,
}

impl FailReason {
    /// Its metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoEndpointsAnswer => "no_endpoints_answer",
            Self::NoEndpoint => "no_endpoint",
            Self::NoSetupAnswer => "no_setup_answer",
            Self::Busy => "busy",
            Self::Refused => "refused",
            Self::NoHandshake => "no_handshake",
            Self::Link => "link",
        }
    }
}
