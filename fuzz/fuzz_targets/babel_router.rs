//! Any bytes as packets from a link-local neighbour into a running router,
//! with and without HMAC, interleaved with timeouts.
#![no_main]
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use re6st_routing::neighbour::IfaceId;
use re6st_routing::router::{InterfaceConfig, Router, RouterConfig};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut r = Router::new(RouterConfig::new([2, 0, 0, 0, 0, 0, 0, 1]), t0);
    let mut cfg = InterfaceConfig::tunnel(Duration::from_millis(300));
    cfg.link_local = Some(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));
    r.add_interface(IfaceId(1), cfg, t0);
    let src = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2));
    let mut now = t0;
    for chunk in data.split(|b| *b == 0xfe) {
        now += Duration::from_millis(u64::from(chunk.first().copied().unwrap_or(0)));
        r.handle_packet(now, IfaceId(1), src, chunk);
        r.handle_timeout(now);
        while r.poll_transmit().is_some() {}
        while r.poll_route_change().is_some() {}
    }
});
