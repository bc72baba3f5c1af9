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
    /// The serial of the peer's certificate.
    pub serial: u64,
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
    pub fn new(name: String, outgoing: bool, serial: u64, now: Instant) -> Self {
        Self {
            name,
            outgoing,
            serial,
            created: now,
            up: false,
            last_neighbour: now,
            cost: 1,
        }
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
