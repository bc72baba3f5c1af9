//! Where a peer is reached: an address and the transport to it.
//!
//! WireGuard and control datagrams go over UDP, or, on networks that
//! block UDP, in length-prefixed frames on a TCP connection to the same
//! port (see [`crate::stream`]).

use std::net::SocketAddr;

/// How datagrams reach a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// One UDP datagram each.
    #[default]
    Udp,
    /// Frames on a TCP connection (the peer's port when we dialled, the
    /// connection's source when the peer did).
    Tcp,
}

impl Transport {
    /// As status and metrics name it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// A peer's address on a transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// The address.
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

impl Endpoint {
    /// `addr` over UDP.
    pub fn udp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Udp,
        }
    }

    /// `addr` over TCP.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Tcp,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.transport {
            Transport::Udp => write!(f, "{}", self.addr),
            Transport::Tcp => write!(f, "tcp:{}", self.addr),
        }
    }
}
