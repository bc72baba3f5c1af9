//! Any tun read into the virtio-net header parser and the segmenter, the
//! segments into MSS clamping, and any run of decrypted packets (plus the
//! segments) into the coalescer.
#![no_main]
use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use re6st_tunnel::offload::{split, Gro, Segments, VnetHdr, VNET_HDR_LEN};

thread_local! {
    static STATE: RefCell<(Segments, Gro, Gro)> =
        RefCell::new((Segments::new(), Gro::new(), Gro::new_with_udp(true)));
}

fuzz_target!(|data: &[u8]| {
    STATE.with(|s| {
        let (segs, tcp_only, with_udp) = &mut *s.borrow_mut();
        if let Ok(hdr) = VnetHdr::parse(data) {
            if split(&hdr, &data[VNET_HDR_LEN..], segs).is_err() {
                assert!(segs.is_empty());
            }
        }
        segs.for_each_mut(|p| {
            let len = p.len();
            let _ = re6st_tunnel::mss::clamp(p, 1280 + u32::from(data.first().copied().unwrap_or(0)));
            assert_eq!(p.len(), len);
        });
        for gro in [&mut *tcp_only, &mut *with_udp] {
            for seg in segs.iter() {
                gro.push(seg);
            }
            // The input again as packets, each after a one-byte length.
            let mut rest = data;
            while let Some((&n, tail)) = rest.split_first() {
                let (pkt, next) = tail.split_at(usize::from(n).min(tail.len()));
                gro.push(pkt);
                rest = next;
            }
            gro.flush(|b| assert!(b.len() >= VNET_HDR_LEN));
        }
    });
});
