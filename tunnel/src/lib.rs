//! WireGuard tunnels for re6st-rs.
//!
//! So far: [`policy`], the tunnel-manager policy (sans-IO), and [`cache`],
//! the peer cache. The links over boringtun, tun devices, the shared UDP
//! socket and tunnel set-up are still to come (issue 5).

pub mod cache;
pub mod policy;
