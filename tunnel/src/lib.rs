//! WireGuard tunnels for re6st-rs.
//!
//! - [`policy`]: the tunnel-manager policy (sans-IO).
//! - [`cache`]: the peer cache (SQLite).
//! - [`setup`]: the authenticated set-up messages before the handshake.
//! - [`link`]: boringtun links and the demultiplexing of the shared socket.
//! - [`endpoint`]: where a peer is reached (address and transport).
//! - [`stream`]: datagrams framed on a TCP connection (sans-IO).
//! - [`plane`]: the data plane's handle (commands, events, statistics).
//! - `reactor`: the data plane's one thread (UDP socket, tun devices,
//!   boringtun, the in-process protocol); `tcp`: its TCP connections.
//! - [`inprocess`]: the protocol served in process on the links (Babel).
//! - [`frame`]: link-local UDP inside IPv6 packets.
//! - [`tun`]: tun devices.
//! - [`offload`]: tun offloads (virtio-net header, segmentation, GRO).
//! - [`mss`]: TCP MSS clamping to a link's MTU.
//! - [`udp`]: UDP GSO/GRO helpers.
//! - [`source_limit`]: rate limits of unauthenticated work per source network.

pub mod cache;
pub mod endpoint;
pub mod frame;
pub mod ingress;
pub mod inprocess;
pub mod link;
pub mod mss;
pub mod offload;
pub mod plane;
pub mod policy;
mod reactor;
pub mod replay;
pub mod setup;
pub mod source_limit;
pub mod stream;
mod tcp;
pub mod tun;
pub mod udp;
