//! Tunnel records and their timeouts.

use std::time::{Duration, Instant};

/// An outgoing tunnel whose handshake has not completed by then failed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An incoming tunnel the initiator never completed is forgotten.
pub const INCOMING_TIMEOUT: Duration = Duration::from_secs(30);
/// A tunnel with no Babel neighbour for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(20);

/// A tunnel as the core knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// Its tun device.
    pub name: String,
    /// We opened it.
    pub outgoing: bool,
    /// The serial of the peer's certificate (the newest it has shown).
    pub serial: u64,
    /// The peer's WireGuard key: the tunnel's, whatever its certificate.
    pub wg_key: [u8; 32],
    /// When it was added.
    pub created: Instant,
    /// Its WireGuard handshake completed.
    pub up: bool,
    /// When a Babel neighbour was last heard on it (or it came up).
    pub last_neighbour: Instant,
    /// Its Babel cost multiplier.
    pub cost: u16,
}

/// What a tunnel's timer decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Fine until [`Tunnel::deadline`].
    Alive,
    /// Outgoing, no handshake in time: a failed attempt.
    NoHandshakeOut,
    /// Incoming, no handshake in time.
    NoHandshakeIn,
    /// Up, but no Babel neighbour for [`DEAD_AFTER`].
    Silent,
}

impl Tunnel {
    /// A new tunnel, not up yet.
    pub fn new(name: String, outgoing: bool, serial: u64, wg_key: [u8; 32], now: Instant) -> Self {
        Self {
            name,
            outgoing,
            serial,
            wg_key,
            created: now,
            up: false,
            last_neighbour: now,
            cost: 1,
        }
    }

    /// The peer signed with a certificate of another serial: a renewal
    /// that keeps the tunnel's key moves the tunnel onto it (so the
    /// superseded serial in a later CRL does not close it). A
    /// certificate with another key says nothing about this tunnel.
    pub fn follow_renewal(&mut self, serial: u64, wg_key: &[u8; 32]) -> bool {
        let newer = serial > self.serial && *wg_key == self.wg_key;
        if newer {
            self.serial = serial;
        }
        newer
    }

    /// When it must be looked at again.
    pub fn deadline(&self) -> Instant {
        match (self.up, self.outgoing) {
            (false, true) => self.created + HANDSHAKE_TIMEOUT,
            (false, false) => self.created + INCOMING_TIMEOUT,
            (true, _) => self.last_neighbour + DEAD_AFTER,
        }
    }

    /// Its state at `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        if now < self.deadline() {
            Verdict::Alive
        } else if self.up {
            Verdict::Silent
        } else if self.outgoing {
            Verdict::NoHandshakeOut
        } else {
            Verdict::NoHandshakeIn
        }
    }
}
