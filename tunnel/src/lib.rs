//! WireGuard tunnels for re6st-rs.
//!
//! So far: [`policy`], the tunnel-manager policy (sans-IO); [`cache`], the
//! peer cache; [`setup`], the authenticated set-up messages exchanged
//! before the WireGuard handshake. The links over boringtun, tun devices
//! and the shared UDP socket are still to come (issue 5).

pub mod cache;
pub mod link;
pub mod plane;
pub mod policy;
pub mod setup;
pub mod udp;
