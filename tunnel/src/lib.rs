//! WireGuard tunnels for re6st-rs.
//!
//! - [`policy`]: the tunnel-manager policy (sans-IO).
//! - [`cache`]: the peer cache (SQLite).
//! - [`setup`]: the authenticated set-up messages before the handshake.
//! - [`link`]: boringtun links and the demultiplexing of the shared socket.
//! - [`offload`]: tun offloads (virtio-net header, segmentation, GRO).
//! - [`plane`]: the data plane (shared UDP socket, tun devices, threads).
//! - [`udp`]: UDP GSO/GRO helpers.

pub mod cache;
pub mod link;
pub mod offload;
pub mod plane;
pub mod policy;
pub mod setup;
pub mod udp;
