//! Any tun read into the virtio-net header parser and the segmenter, and
//! any run of decrypted packets (plus the segments) into the coalescer.
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
