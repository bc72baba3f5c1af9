//! Any bytes from a TCP connection into the frame reassembler, in pieces
//! cut where the input says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use re6st_tunnel::stream::{encode, Frames, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let mut frames = Frames::default();
    for piece in rest.chunks(usize::from(cut).max(1)) {
        frames.push(piece);
        while let Ok(Some(d)) = frames.next_frame() {
            assert!(!d.is_empty() && d.len() <= MAX_FRAME);
            let mut again = Vec::new();
            assert!(encode(d, &mut again));
            assert_eq!(&again[2..], d);
        }
        assert!(frames.len() <= 2 + MAX_FRAME + rest.len());
    }
});
