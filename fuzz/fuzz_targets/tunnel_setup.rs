//! Any datagram into the tunnel set-up responder and reply checker.
#![no_main]
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use re6st_registry::cert::{Ca, CaCert};
use re6st_tunnel::setup::{check_reply, Decision, Identity, Responder};

const NOW: i64 = 1_790_000_000;

fn state() -> &'static Mutex<(Responder, CaCert)> {
    static S: OnceLock<Mutex<(Responder, CaCert)>> = OnceLock::new();
    S.get_or_init(|| {
        let ca = Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW - 100, 10).unwrap_or_else(|e| panic!("{e}"));
        let me = Identity::issued(&ca, "fd5e:0:0:2::/64".parse().unwrap_or_default(), 2, [2; 32], NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        Mutex::new((Responder::new(ca.cert().clone(), me), ca.cert().clone()))
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
    let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
    let src = SocketAddr::from(([198, 18, data.first().copied().unwrap_or(0), 2], 326));
    let _ = s.0.handle(now(), NOW, src, data, |_| Decision::Accept);
    let ca = s.1.clone();
    let _ = check_reply(&ca, &[], "fd5e:0:0:2::/64".parse().unwrap_or_default(), "nonce", NOW, data);
});
