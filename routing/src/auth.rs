//! RFC 8967 MAC authentication: HMAC-SHA256 or keyed BLAKE2s-128 over
//! (source, port, destination, port, header, body), a packet counter (PC)
//! with an index per sender, and the challenge that admits a new index.
//!
//! The router signs every packet with the signing key (PC TLV in the body,
//! MAC TLV in the trailer) and accepts a packet if any accepted key
//! verifies it and its PC is newer than the last one seen for that
//! (neighbour, multicast/unicast) under its current index. A new index is
//! admitted only after a challenge round trip, and then replaces the old
//! one with both counters set (RFC 8967 §4.3, as babeld): no packet older
//! than the reply is accepted on either channel. Challenge Requests are
//! answered only on unicast.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};

use crate::drop_reason::DropReason;
use crate::wire::{mac_input, PORT};

/// A MAC algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA256 (32-byte MACs).
    HmacSha256,
    /// Keyed BLAKE2s with a 16-byte output (re6st's choice).
    Blake2s128,
}

/// A key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Its bytes (HMAC-SHA256: up to 64; BLAKE2s: 1 to 32).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Checks the length for the algorithm.
    pub fn new(algorithm: Algorithm, key: Vec<u8>) -> Result<Self, String> {
        let ok = match algorithm {
            Algorithm::HmacSha256 => !key.is_empty() && key.len() <= 64,
            Algorithm::Blake2s128 => !key.is_empty() && key.len() <= 32,
        };
        if ok {
            Ok(Self { algorithm, key })
        } else {
            Err(format!(
                "a {algorithm:?} key of {} bytes is not allowed",
                key.len()
            ))
        }
    }

    /// The MAC of `msg`.
    pub fn mac(&self, msg: &[u8]) -> Vec<u8> {
        match self.algorithm {
            Algorithm::HmacSha256 => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
                ring::hmac::sign(&k, msg).as_ref().to_vec()
            }
            Algorithm::Blake2s128 => {
                match <blake2::Blake2sMac<U16> as KeyInit>::new_from_slice(&self.key) {
                    Ok(mut m) => {
                        m.update(msg);
                        m.finalize().into_bytes().to_vec()
                    }
                    // Lengths are checked in `new`; an impossible key MACs to nothing.
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    /// Constant-time check of a MAC.
    pub fn verify(&self, msg: &[u8], mac: &[u8]) -> bool {
        match self.algorithm {
            Algorithm::HmacSha256 => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
                ring::hmac::verify(&k, msg, mac).is_ok()
            }
            Algorithm::Blake2s128 => {
                match <blake2::Blake2sMac<U16> as KeyInit>::new_from_slice(&self.key) {
                    Ok(mut m) => {
                        m.update(msg);
                        m.verify_slice(mac).is_ok()
                    }
                    Err(_) => false,
                }
            }
        }
    }
}

/// Keys: sign with one, accept several (rotation).
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The key we sign with.
    pub sign: Key,
    /// Keys we accept (should include `sign`).
    pub accept: Vec<Key>,
}

/// A challenge is valid this long.
pub const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most one challenge request or reply per neighbour this often.
pub const CHALLENGE_GAP: Duration = Duration::from_millis(300);

/// The admitted index of a neighbour and the last PC seen on each channel.
#[derive(Clone, Debug)]
struct Admitted {
    index: Vec<u8>,
    multicast: u32,
    unicast: u32,
}

#[derive(Clone, Debug, Default)]
struct NeighbourAuth {
    admitted: Option<Admitted>,
    nonce: Option<(Vec<u8>, Instant)>,
    last_request: Option<Instant>,
    last_reply: Option<Instant>,
}

/// What to do with a received packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Process it.
    Accept,
    /// Drop it, for this reason.
    Drop(DropReason),
}

/// Authentication state of a router.
#[derive(Clone, Debug)]
pub struct Auth {
    cfg: AuthConfig,
    neighbours: HashMap<(u32, Ipv6Addr), NeighbourAuth>,
}

impl Auth {
    /// State for these keys.
    pub fn new(cfg: AuthConfig) -> Self {
        Self {
            cfg,
            neighbours: HashMap::new(),
        }
    }

    /// Replaces the keys (rotation), keeping what we know of neighbours.
    pub fn set_config(&mut self, cfg: AuthConfig) {
        self.cfg = cfg;
    }

    /// Bytes a packet needs for PC (with an 8-byte index) and MAC TLVs.
    pub fn overhead(&self) -> usize {
        let mac = match self.cfg.sign.algorithm {
            Algorithm::HmacSha256 => 32,
            Algorithm::Blake2s128 => 16,
        };
        (2 + 4 + 8) + (2 + mac)
    }

    /// The MAC of a packet we send (`packet` = header + body).
    pub fn sign(&self, src: Ipv6Addr, dst: Ipv6Addr, packet: &[u8]) -> Vec<u8> {
        self.cfg
            .sign
            .mac(&mac_input(src, PORT, dst, PORT, packet, packet.len()))
    }

    /// Checks the MACs of a received packet against the candidate
    /// destinations (multicast group, our link-local); returns the
    /// destination that verified.
    pub fn check_mac(
        &self,
        src: Ipv6Addr,
        dsts: &[Ipv6Addr],
        packet: &[u8],
        body_end: usize,
        macs: &[&[u8]],
    ) -> Option<Ipv6Addr> {
        for dst in dsts {
            let input = mac_input(src, PORT, *dst, PORT, packet, body_end);
            for key in &self.cfg.accept {
                if macs.iter().any(|m| key.verify(&input, m)) {
                    return Some(*dst);
                }
            }
        }
        None
    }

    /// The packet-counter check for a packet whose MAC verified. `reply` is
    /// the nonce of a Challenge Reply in it, if any.
    pub fn check_pc(
        &mut self,
        now: Instant,
        neighbour: (u32, Ipv6Addr),
        unicast: bool,
        pc: Option<(u32, &[u8])>,
        reply: Option<&[u8]>,
    ) -> Verdict {
        let Some((pc, index)) = pc else {
            return Verdict::Drop(DropReason::NoPc);
        };
        let n = self.neighbours.entry(neighbour).or_default();
        if let Some(a) = n.admitted.as_mut().filter(|a| a.index == index) {
            let last = if unicast {
                &mut a.unicast
            } else {
                &mut a.multicast
            };
            if pc > *last {
                *last = pc;
                return Verdict::Accept;
            }
            return Verdict::Drop(DropReason::OldPc);
        }
        // A new index: admitted only by a matching Challenge Reply.
        let matches = match (&n.nonce, reply) {
            (Some((nonce, at)), Some(r)) => {
                nonce.as_slice() == r && now.duration_since(*at) < CHALLENGE_TIMEOUT
            }
            _ => false,
        };
        if matches {
            n.nonce = None;
            n.admitted = Some(Admitted {
                index: index.to_vec(),
                multicast: pc,
                unicast: pc,
            });
            return Verdict::Accept;
        }
        Verdict::Drop(DropReason::UnknownIndex)
    }

    /// A nonce to challenge `neighbour` with now, unless one went out less
    /// than [`CHALLENGE_GAP`] ago.
    pub fn challenge(
        &mut self,
        now: Instant,
        neighbour: (u32, Ipv6Addr),
        nonce: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let n = self.neighbours.entry(neighbour).or_default();
        if n.last_request
            .is_some_and(|t| now.duration_since(t) < CHALLENGE_GAP)
        {
            return None;
        }
        n.last_request = Some(now);
        n.nonce = Some((nonce.clone(), now));
        Some(nonce)
    }

    /// Whether we may answer a Challenge Request of `neighbour` now.
    pub fn may_reply(&mut self, now: Instant, neighbour: (u32, Ipv6Addr)) -> bool {
        let n = self.neighbours.entry(neighbour).or_default();
        if n.last_reply
            .is_some_and(|t| now.duration_since(t) < CHALLENGE_GAP)
        {
            return false;
        }
        n.last_reply = Some(now);
        true
    }

    /// Forgets a neighbour.
    pub fn forget(&mut self, neighbour: (u32, Ipv6Addr)) {
        self.neighbours.remove(&neighbour);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let k =
            Key::new(Algorithm::HmacSha256, (0..32).collect()).unwrap_or_else(|e| panic!("{e}"));
        Auth::new(AuthConfig {
            sign: k.clone(),
            accept: vec![k],
        })
    }

    #[test]
    fn macs_verify_only_with_the_key_and_addresses() {
        let a = auth();
        let (src, dst) = (
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
            crate::wire::MULTICAST,
        );
        let pkt = [42u8, 2, 0, 0];
        let mac = a.sign(src, dst, &pkt);
        assert_eq!(a.check_mac(src, &[dst], &pkt, 4, &[&mac]), Some(dst));
        let other = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
        assert_eq!(a.check_mac(other, &[dst], &pkt, 4, &[&mac]), None);
        assert_eq!(a.check_mac(src, &[other, dst], &pkt, 4, &[&mac]), Some(dst));
        let b2 = Key::new(Algorithm::Blake2s128, vec![7; 16]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b2.mac(b"x").len(), 16);
        assert!(b2.verify(b"x", &b2.mac(b"x")));
        assert!(!b2.verify(b"y", &b2.mac(b"x")));
        assert!(Key::new(Algorithm::Blake2s128, vec![0; 33]).is_err());
        assert!(Key::new(Algorithm::HmacSha256, Vec::new()).is_err());
    }

    #[test]
    fn challenge_admits_an_index_and_pcs_must_grow() {
        let mut a = auth();
        let t = Instant::now();
        let n = (1, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9));
        let idx = [1u8; 8];
        assert_eq!(
            a.check_pc(t, n, false, Some((5, &idx)), None),
            Verdict::Drop(DropReason::UnknownIndex)
        );
        let nonce = a.challenge(t, n, vec![9; 8]).unwrap_or_default();
        assert!(a.challenge(t, n, vec![1; 8]).is_none(), "rate limited");
        assert_eq!(
            a.check_pc(t, n, true, Some((6, &idx)), Some(&[0; 8])),
            Verdict::Drop(DropReason::UnknownIndex)
        );
        assert_eq!(
            a.check_pc(t, n, true, Some((6, &idx)), Some(&nonce)),
            Verdict::Accept
        );
        assert_eq!(
            a.check_pc(t, n, true, Some((6, &idx)), None),
            Verdict::Drop(DropReason::OldPc)
        );
        assert_eq!(
            a.check_pc(t, n, true, Some((7, &idx)), None),
            Verdict::Accept
        );
        // Admission set the multicast counter too: an old multicast packet
        // (a replay from before the challenge) is refused.
        assert_eq!(
            a.check_pc(t, n, false, Some((3, &idx)), None),
            Verdict::Drop(DropReason::OldPc)
        );
        assert_eq!(
            a.check_pc(t, n, false, Some((8, &idx)), None),
            Verdict::Accept
        );
        assert_eq!(
            a.check_pc(t, n, false, Some((8, &idx)), None),
            Verdict::Drop(DropReason::OldPc)
        );
        // Unicast and multicast counters then move on their own.
        assert_eq!(
            a.check_pc(t, n, true, Some((8, &idx)), None),
            Verdict::Accept
        );
        // A new index replaces the old one only through a challenge.
        let idx2 = [2u8; 8];
        assert_eq!(
            a.check_pc(t, n, false, Some((1, &idx2)), None),
            Verdict::Drop(DropReason::UnknownIndex)
        );
        assert_eq!(
            a.check_pc(t, n, false, None, None),
            Verdict::Drop(DropReason::NoPc)
        );
        // A stale nonce does not admit anything.
        let n2 = (1, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 10));
        let nonce = a.challenge(t, n2, vec![4; 8]).unwrap_or_default();
        let late = t + CHALLENGE_TIMEOUT;
        assert_eq!(
            a.check_pc(late, n2, true, Some((1, &idx)), Some(&nonce)),
            Verdict::Drop(DropReason::UnknownIndex)
        );
    }
}
