//! WireGuard links over boringtun, tun devices, the shared UDP socket, the tunnel-manager policy and the peer cache. Filled by issue 5; empty until then.
