//! Replay protection for signed, timestamped messages: the nonces seen
//! within their lifetime, per sender, in bounded memory.
//!
//! Each sender (the certificate that signed the message, checked before
//! this) has a quota of nonces. When a sender's set is full, its nonce
//! closest to expiry is forgotten and its floor rises to that expiry:
//! from then on a message of that sender that would expire at or before
//! the floor is refused as too old, since its nonce may be among the
//! forgotten ones. When all senders together reach the total, expired
//! nonces are swept and, if that is not enough, the sender holding the
//! most loses its oldest the same way. A flood of fresh, validly signed
//! messages from one member therefore narrows that member's window only
//! (several colluding members could make a busy honest sender the one
//! that holds the most), and never reopens a replay.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// Why a message is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Replayed {
    /// This nonce was seen within its lifetime.
    #[error("nonce already seen")]
    Seen,
    /// Older than what this sender's window still remembers.
    #[error("older than the replay window")]
    BelowFloor,
}

/// One sender's nonces, each until its expiry.
#[derive(Debug)]
struct Nonces {
    expiry: HashMap<String, i64>,
    by_expiry: BTreeSet<(i64, String)>,
    floor: i64,
}

impl Nonces {
    fn new() -> Self {
        Self {
            expiry: HashMap::new(),
            by_expiry: BTreeSet::new(),
            floor: i64::MIN,
        }
    }

    /// Forgets what expired by `unix`; returns how many.
    fn expire(&mut self, unix: i64) -> usize {
        let mut n = 0;
        while self.by_expiry.first().is_some_and(|(e, _)| *e <= unix) {
            if let Some((_, nonce)) = self.by_expiry.pop_first() {
                self.expiry.remove(&nonce);
                n += 1;
            }
        }
        n
    }

    /// Forgets the nonce closest to expiry and raises the floor to it.
    fn evict_oldest(&mut self) {
        if let Some((e, nonce)) = self.by_expiry.pop_first() {
            self.expiry.remove(&nonce);
            self.floor = self.floor.max(e);
        }
    }

    /// Whether nothing here matters any more at `unix`: no nonce, and a
    /// floor below every message still fresh.
    fn idle(&self, unix: i64) -> bool {
        self.expiry.is_empty() && self.floor <= unix
    }
}

/// Nonces seen, per sender, each until its expiry.
#[derive(Debug)]
pub struct ReplayWindow<K> {
    per_sender: usize,
    total: usize,
    len: usize,
    senders: HashMap<K, Nonces>,
}

impl<K: Hash + Eq + Clone> ReplayWindow<K> {
    /// A window of at most `per_sender` nonces for one sender and `total`
    /// for all of them.
    pub fn new(per_sender: usize, total: usize) -> Self {
        let per_sender = per_sender.max(1);
        Self {
            per_sender,
            total: total.max(per_sender),
            len: 0,
            senders: HashMap::new(),
        }
    }

    /// Accepts `nonce` from `sender`, valid until `expires` (unix
    /// seconds), once: a second time, or below the sender's floor, it is
    /// refused.
    pub fn check(
        &mut self,
        sender: &K,
        nonce: &str,
        expires: i64,
        unix: i64,
    ) -> Result<(), Replayed> {
        let mut mine = self.senders.remove(sender).unwrap_or_else(Nonces::new);
        self.len -= mine.expire(unix);
        let verdict = self.admit(&mut mine, nonce, expires, unix);
        if !mine.idle(unix) {
            self.senders.insert(sender.clone(), mine);
        }
        verdict
    }

    fn admit(
        &mut self,
        mine: &mut Nonces,
        nonce: &str,
        expires: i64,
        unix: i64,
    ) -> Result<(), Replayed> {
        if mine.expiry.contains_key(nonce) {
            return Err(Replayed::Seen);
        }
        if expires <= mine.floor {
            return Err(Replayed::BelowFloor);
        }
        if mine.expiry.len() >= self.per_sender {
            mine.evict_oldest();
            self.len -= 1;
        } else if self.len >= self.total {
            self.make_room(mine, unix);
        }
        if expires <= mine.floor {
            return Err(Replayed::BelowFloor);
        }
        mine.expiry.insert(nonce.to_string(), expires);
        mine.by_expiry.insert((expires, nonce.to_string()));
        self.len += 1;
        Ok(())
    }

    /// Frees one slot of the total: expired nonces first, else the oldest
    /// of whoever holds the most (`mine` included).
    fn make_room(&mut self, mine: &mut Nonces, unix: i64) {
        for other in self.senders.values_mut() {
            self.len -= other.expire(unix);
        }
        self.senders.retain(|_, n| !n.idle(unix));
        if self.len < self.total {
            return;
        }
        let biggest = self
            .senders
            .values_mut()
            .max_by_key(|n| n.expiry.len())
            .filter(|n| n.expiry.len() > mine.expiry.len());
        match biggest {
            Some(other) => other.evict_oldest(),
            None => mine.evict_oldest(),
        }
        self.len -= 1;
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        let mut w = ReplayWindow::new(100, 100);
        let unix = 1000;
        let mut accepted = Vec::new();
        for i in 0..1000i64 {
            let nonce = format!("n{i}");
            // Timestamps spread over the window, some out of order.
            let expires = unix + 600 - (i * 7919) % 500;
            if w.check(&1, &nonce, expires, unix).is_ok() {
                accepted.push((nonce, expires));
            }
            assert!(w.len() <= 100);
        }
        assert!(accepted.len() >= 100, "{}", accepted.len());
        for (nonce, expires) in &accepted {
            assert!(
                w.check(&1, nonce, *expires, unix).is_err(),
                "{nonce} replayed"
            );
        }
        assert_eq!(w.check(&1, "fresh", unix + 600, unix), Ok(()));
    }

    /// One member flooding fills its own quota only: another sender's
    /// messages, even old ones, still pass, and none of the flooder's
    /// accepted nonces passes again.
    #[test]
    fn a_flooding_sender_narrows_its_own_window_only() {
        let mut w = ReplayWindow::new(50, 120);
        let unix = 1000;
        assert_eq!(w.check(&"honest", "h0", unix + 10, unix), Ok(()));
        let mut accepted = Vec::new();
        for i in 0..5000i64 {
            let nonce = format!("f{i}");
            if w.check(&"flooder", &nonce, unix + 100 + i % 20, unix)
                .is_ok()
            {
                accepted.push((nonce, unix + 100 + i % 20));
            }
            assert!(w.len() <= 120);
        }
        for (nonce, expires) in &accepted {
            assert!(
                w.check(&"flooder", nonce, *expires, unix).is_err(),
                "{nonce} replayed"
            );
        }
        // An honest message that expires long before the flooder's floor.
        assert_eq!(w.check(&"honest", "h1", unix + 5, unix), Ok(()));
        assert_eq!(
            w.check(&"honest", "h0", unix + 10, unix),
            Err(Replayed::Seen)
        );
    }

    /// Many senders at the total: the one holding the most gives way, the
    /// others keep their nonces.
    #[test]
    fn at_the_total_the_biggest_sender_gives_way() {
        let mut w = ReplayWindow::new(40, 60);
        let unix = 1000;
        for i in 0..40i64 {
            assert_eq!(w.check(&0u32, &format!("a{i}"), unix + 50, unix), Ok(()));
        }
        for s in 1..=3u32 {
            for i in 0..10i64 {
                assert_eq!(w.check(&s, &format!("x{i}"), unix + 60, unix), Ok(()));
            }
        }
        assert_eq!(w.len(), 60);
        for s in 1..=3u32 {
            for i in 0..10i64 {
                assert_eq!(
                    w.check(&s, &format!("x{i}"), unix + 60, unix),
                    Err(Replayed::Seen)
                );
            }
        }
        assert_eq!(
            w.check(&0u32, "a0", unix + 50, unix),
            Err(Replayed::BelowFloor),
            "the biggest forgot its oldest and refuses what it may have forgotten"
        );
    }

    /// Expired nonces are forgotten (a message that old is refused by its
    /// timestamp before it gets here); the floor stays put without a flood.
    #[test]
    fn expired_nonces_are_forgotten() {
        let mut w = ReplayWindow::new(10, 10);
        assert_eq!(w.check(&1, "a", 100, 50), Ok(()));
        assert_eq!(w.check(&1, "a", 100, 60), Err(Replayed::Seen));
        assert_eq!(w.check(&1, "b", 200, 100), Ok(()));
        assert_eq!(w.len(), 1);
        assert_eq!(w.check(&1, "a", 150, 100), Ok(()));
    }
}
