//! The router's randomness, injected as a seed (quinn-proto's way): Hello
//! and dump jitter, RFC 8967 indexes and challenge nonces. BLAKE2s in
//! counter mode over a 32-byte seed: unpredictable when the driver seeds
//! it from the operating system, reproducible when a simulation seeds it.

use std::time::Duration;

use blake2::{Blake2s256, Digest};

/// A seeded generator.
#[derive(Clone, Debug)]
pub(super) struct Rng {
    seed: [u8; 32],
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl Rng {
    pub fn new(seed: [u8; 32]) -> Self {
        Self {
            seed,
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == self.block.len() {
                let mut h = Blake2s256::new();
                h.update(self.seed);
                h.update(self.counter.to_le_bytes());
                self.block = h.finalize().into();
                self.counter += 1;
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
    }

    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0; N];
        self.fill(&mut b);
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    /// `d` moved by up to ±`spread_percent` %.
    pub fn jitter(&mut self, d: Duration, spread_percent: u64) -> Duration {
        let spread = spread_percent.min(100);
        let pct = 100 - spread + self.u64() % (2 * spread + 1);
        d * pct as u32 / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_jitter_stays_in_range() {
        let (mut a, mut b) = (Rng::new([7; 32]), Rng::new([7; 32]));
        assert_eq!(a.bytes::<40>(), b.bytes::<40>());
        assert_ne!(Rng::new([8; 32]).bytes::<8>(), a.bytes::<8>());
        let d = Duration::from_millis(1000);
        for _ in 0..1000 {
            let j = a.jitter(d, 25);
            assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250));
        }
    }
}
