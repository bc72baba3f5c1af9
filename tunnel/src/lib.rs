//! WireGuard tunnels for re6st-rs.
//!
//! So far: [`policy`], the tunnel-manager policy (sans-IO). The links over
//! boringtun, tun devices, the shared UDP socket, tunnel set-up and the peer
//! cache are still to come (issue 5).

pub mod policy;
