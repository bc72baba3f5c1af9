//! Datagrams over a TCP byte stream, sans-IO: each datagram is a frame,
//! a 2-byte big-endian length then the bytes (RFC 4571 framing, as
//! OpenVPN and udp2raw-style tunnels use).

/// Largest datagram a frame carries.
pub const MAX_FRAME: usize = 65_535;

/// Appends `datagram` as one frame to `out`; false (nothing appended)
/// when it is empty or larger than [`MAX_FRAME`].
pub fn encode(datagram: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(len) = u16::try_from(datagram.len()) else {
        return false;
    };
    if len == 0 {
        return false;
    }
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    true
}

/// Reassembles frames from what a connection reads.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
    start: usize,
}

/// A frame of length 0: nothing sends it, the connection is garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("empty frame")]
pub struct EmptyFrame;

impl Frames {
    /// Bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's datagram, if any.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, EmptyFrame> {
        let rest = &self.buf[self.start..];
        let [a, b, ..] = *rest else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([a, b]));
        if len == 0 {
            return Err(EmptyFrame);
        }
        if rest.len() < 2 + len {
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            return Ok(None);
        }
        let at = self.start + 2;
        self.start = at + len;
        Ok(Some(&self.buf[at..at + len]))
    }

    /// Bytes held (an incomplete frame is at most 65 537).
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(f: &mut Frames) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Ok(Some(d)) = f.next_frame() {
            out.push(d.to_vec());
        }
        out
    }

    #[test]
    fn frames_survive_any_split() {
        let datagrams: Vec<Vec<u8>> = vec![vec![1; 148], vec![2; 1], vec![3; 65_535], vec![4; 32]];
        let mut wire = Vec::new();
        for d in &datagrams {
            assert!(encode(d, &mut wire));
        }
        assert!(!encode(&[], &mut wire) && !encode(&vec![0; 65_536], &mut wire));
        for chunk in [1, 2, 3, 1000, wire.len()] {
            let mut f = Frames::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                f.push(piece);
                got.extend(all(&mut f));
            }
            assert_eq!(got, datagrams, "chunks of {chunk}");
            assert!(f.is_empty());
        }
    }

    #[test]
    fn an_empty_frame_is_an_error() {
        let mut f = Frames::default();
        f.push(&[0, 0, 9]);
        assert_eq!(f.next_frame(), Err(EmptyFrame));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..40)
        ) {
            let mut f = Frames::default();
            for p in &pieces {
                f.push(p);
                while let Ok(Some(_)) = f.next_frame() {}
                prop_assert!(f.len() <= 2 + MAX_FRAME + 3000);
            }
        }
    }
}
