//! The node core's timer table: one deadline per pending thing.

use std::collections::BTreeMap;
use std::time::Instant;

use re6st_tunnel::policy::Peer;

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The tunnel-manager policy has something to do on its own.
    Policy,
    /// Refresh (and publish) our peer record.
    Record,
    /// Ask the registry for the network configuration.
    Config,
    /// Ask the registry for the Babel keys again (after a failure).
    Hmac,
    /// Check whether the certificate needs renewing.
    Renew,
    /// The answer to our endpoints request is late.
    Ask(Peer),
    /// The answer to our set-up request is late.
    Setup(Peer),
    /// Send our set-up request again: the peer is punching its NAT.
    Resend(Peer),
    /// A tunnel's handshake timeout, incoming timeout or silence limit.
    Tunnel(Peer),
    /// A peer announced a newer configuration and has not sent it yet.
    Announced,
    /// Send the registry our topology report.
    Report,
}

/// Deadlines by timer.
#[derive(Clone, Debug, Default)]
pub struct Timers {
    at: BTreeMap<Timer, Instant>,
}

impl Timers {
    /// Arms (or moves) a timer.
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.at.insert(timer, at);
    }

    /// Disarms a timer.
    pub fn clear(&mut self, timer: Timer) {
        self.at.remove(&timer);
    }

    /// When a timer fires, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.at.get(&timer).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.at.values().min().copied()
    }

    /// Disarms and returns the timers due at `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<Timer> {
        let due: Vec<Timer> = self
            .at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in &due {
            self.at.remove(t);
        }
        due
    }
}
