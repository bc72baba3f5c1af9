//! Any datagram into the peer-protocol checker.
#![no_main]
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use re6st_registry::cert::Ca;
use re6st_tunnel::setup::Identity;
use re6stnet::peer::PeerProtocol;

const NOW: i64 = 1_790_000_000;

fn state() -> &'static Mutex<PeerProtocol> {
    static S: OnceLock<Mutex<PeerProtocol>> = OnceLock::new();
    S.get_or_init(|| {
        let ca = Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW - 100, 10).unwrap_or_else(|e| panic!("{e}"));
        let me = Identity::issued(&ca, "fd5e:0:0:2::/64".parse().unwrap_or_default(), 2, [2; 32], NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        Mutex::new(PeerProtocol::new(ca.cert().clone(), me))
    })
}

/// A virtual clock one second further at each input, so that the rate
/// limit never hides the checks behind it.
fn now() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    static TICKS: AtomicU64 = AtomicU64::new(0);
    *BASE.get_or_init(Instant::now) + Duration::from_secs(TICKS.fetch_add(1, Ordering::Relaxed))
}

fuzz_target!(|data: &[u8]| {
    let mut p = state().lock().unwrap_or_else(|e| e.into_inner());
    let src: IpAddr = "fd5e:0:0:1::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
    let _ = p.open(now(), src, data, NOW);
});
