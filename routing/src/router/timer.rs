//! The router's timer table (quinn-proto's `TimerTable` shape): one
//! deadline per [`Timer`], kept in deadline order, so `poll_timeout` is the
//! first entry and nothing wakes the router when nothing is due.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{RouteKey, Router};
use crate::neighbour::{IfaceId, NeighbourId};

/// Everything the router waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// Route expiry, garbage collection, IHU expiry (once a second).
    Housekeeping,
    /// The next Hello on an interface.
    Hello(IfaceId),
    /// The next slice of the periodic dump on an interface.
    DumpSlice(IfaceId),
    /// A full dump soon (new neighbour, wildcard Route Request).
    FullDump(IfaceId),
    /// Buffered updates of an interface go out.
    Flush(IfaceId),
    /// A neighbour's next Hello counts as missed.
    Miss(NeighbourId),
    /// Resend or retarget a pending seqno request.
    Request(RouteKey),
    /// Resend an urgent update (retraction, source switch).
    Resend(RouteKey),
}

/// Deadlines by timer, and the same in deadline order.
#[derive(Clone, Debug, Default)]
pub(super) struct TimerTable {
    at: BTreeMap<Timer, Instant>,
    queue: BTreeSet<(Instant, Timer)>,
}

impl TimerTable {
    /// Arms `timer` for `at` (replacing its deadline).
    pub fn set(&mut self, timer: Timer, at: Instant) {
        if let Some(old) = self.at.insert(timer, at) {
            self.queue.remove(&(old, timer));
        }
        self.queue.insert((at, timer));
    }

    /// Arms `timer` for `at` unless it is already due earlier.
    pub fn set_earlier(&mut self, timer: Timer, at: Instant) {
        match self.at.get(&timer) {
            Some(&old) if old <= at => {}
            _ => self.set(timer, at),
        }
    }

    /// Disarms `timer`.
    pub fn cancel(&mut self, timer: Timer) {
        if let Some(old) = self.at.remove(&timer) {
            self.queue.remove(&(old, timer));
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.queue.first().map(|(t, _)| *t)
    }

    /// Disarms and returns a timer due at `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let &(at, timer) = self.queue.first()?;
        if at > now {
            return None;
        }
        self.queue.remove(&(at, timer));
        self.at.remove(&timer);
        Some(timer)
    }
}

impl Router {
    /// When an interface's next Hello is due: now plus the jittered
    /// interval, or for an aligned interface the router's current Hello
    /// beat of that interval (the first interface to reach a passed beat
    /// draws the next one, the others at the same instant join it).
    pub(super) fn next_hello(
        &mut self,
        interval: Duration,
        aligned: bool,
        now: Instant,
    ) -> Instant {
        if !aligned {
            return now + self.rng.jitter(interval, 5);
        }
        match self.beats.get(&interval) {
            Some(&at) if at > now => at,
            _ => {
                let at = now + self.rng.jitter(interval, 5);
                self.beats.insert(interval, at);
                at
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timers_fire_in_deadline_order_once() {
        let t0 = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::Hello(IfaceId(1)), t0 + Duration::from_millis(30));
        t.set(Timer::Housekeeping, t0 + Duration::from_millis(10));
        t.set_earlier(Timer::Housekeeping, t0 + Duration::from_millis(20));
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(10)));
        t.set(Timer::Housekeeping, t0 + Duration::from_millis(40));
        assert_eq!(
            t.pop_due(t0 + Duration::from_millis(35)),
            Some(Timer::Hello(IfaceId(1)))
        );
        assert_eq!(t.pop_due(t0 + Duration::from_millis(35)), None);
        t.cancel(Timer::Housekeeping);
        assert_eq!(t.next(), None);
    }
}
