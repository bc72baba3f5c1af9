//! Replay protection for signed, timestamped messages: the nonces seen
//! within their lifetime, in bounded memory.
//!
//! When the set is full the nonce closest to expiry is forgotten and the
//! window's floor rises to its expiry: from then on a message that would
//! expire at or before the floor is refused as too old, since its nonce
//! may be among the forgotten ones. A flood of fresh, validly signed
//! messages therefore narrows the window (old messages are refused
//! sooner) but never reopens a replay, and expiring entries cost
//! O(log n) each instead of a scan per message.

use std::collections::{BTreeSet, HashMap};

/// Why a message is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Replayed {
    /// This nonce was seen within its lifetime.
    #[error("nonce already seen")]
    Seen,
    /// Older than what a full window still remembers.
    #[error("older than the replay window")]
    BelowFloor,
}

/// Nonces seen, each until its expiry.
#[derive(Debug)]
pub struct ReplayWindow {
    slots: usize,
    expiry: HashMap<String, i64>,
    by_expiry: BTreeSet<(i64, String)>,
    floor: i64,
}

impl ReplayWindow {
    /// A window of at most `slots` nonces.
    pub fn new(slots: usize) -> Self {
        Self {
            slots: slots.max(1),
            expiry: HashMap::new(),
            by_expiry: BTreeSet::new(),
            floor: i64::MIN,
        }
    }

    /// Accepts `nonce`, valid until `expires` (unix seconds), once: a
    /// second time, or below the floor, it is refused.
    pub fn check(&mut self, nonce: &str, expires: i64, unix: i64) -> Result<(), Replayed> {
        while let Some((e, _)) = self.by_expiry.first() {
            if *e > unix {
                break;
            }
            if let Some((_, n)) = self.by_expiry.pop_first() {
                self.expiry.remove(&n);
            }
        }
        if self.expiry.contains_key(nonce) {
            return Err(Replayed::Seen);
        }
        if expires <= self.floor {
            return Err(Replayed::BelowFloor);
        }
        if self.expiry.len() >= self.slots {
            if let Some((e, n)) = self.by_expiry.pop_first() {
                self.expiry.remove(&n);
                self.floor = self.floor.max(e);
            }
            if expires <= self.floor {
                return Err(Replayed::BelowFloor);
            }
        }
        self.expiry.insert(nonce.to_string(), expires);
        self.by_expiry.insert((expires, nonce.to_string()));
        Ok(())
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of fresh nonces beyond the slots never lets an accepted
    /// message through again, keeps memory bounded, and fresh messages
    /// still pass.
    #[test]
    fn a_flood_narrows_the_window_but_never_reopens_a_replay() {
        let mut w = ReplayWindow::new(100);
        let unix = 1000;
        let mut accepted = Vec::new();
        for i in 0..1000i64 {
            let nonce = format!("n{i}");
            // Timestamps spread over the window, some out of order.
            let expires = unix + 600 - (i * 7919) % 500;
            if w.check(&nonce, expires, unix).is_ok() {
                accepted.push((nonce, expires));
            }
            assert!(w.len() <= 100);
        }
        assert!(accepted.len() >= 100, "{}", accepted.len());
        for (nonce, expires) in &accepted {
            assert!(w.check(nonce, *expires, unix).is_err(), "{nonce} replayed");
        }
        assert_eq!(w.check("fresh", unix + 600, unix), Ok(()));
    }

    /// Expired nonces are forgotten (a message that old is refused by its
    /// timestamp before it gets here); the floor stays put without a flood.
    #[test]
    fn expired_nonces_are_forgotten() {
        let mut w = ReplayWindow::new(10);
        assert_eq!(w.check("a", 100, 50), Ok(()));
        assert_eq!(w.check("a", 100, 60), Err(Replayed::Seen));
        assert_eq!(w.check("b", 200, 100), Ok(()));
        assert_eq!(w.len(), 1);
        assert_eq!(w.check("a", 150, 100), Ok(()));
    }
}
