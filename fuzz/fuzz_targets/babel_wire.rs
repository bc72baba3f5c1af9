//! Any bytes through the Babel packet parser, and what parses re-encoded.
#![no_main]
use libfuzzer_sys::fuzz_target;
use re6st_routing::wire::{parse, PacketWriter};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse(data) {
        let mut w = PacketWriter::new(65_535);
        for t in &p.body {
            let _ = w.push(t, 0);
        }
        let again = w.finish(&[]);
        assert!(parse(&again).is_ok(), "re-encoded packet does not parse");
    }
});
