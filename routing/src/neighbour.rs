//! Neighbours: Hello history, missed-Hello deadlines, IHU (txcost), RTT.
//!
//! A Hello is counted as missed by a per-neighbour deadline (not a periodic
//! check): the first at 1.5 intervals after the last Hello, then one per
//! interval. With 2-out-of-3 the link becomes unusable at the second miss,
//! 2.5 Hello intervals after the last Hello heard.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use crate::metric::{add, two_out_of_three, RttParams};
use crate::wire::INFINITY;

/// Identifies an interface of the router (chosen by the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfaceId(pub u32);

/// A neighbour's identity: the interface it is heard on and its
/// link-local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighbourId {
    /// The interface.
    pub iface: IfaceId,
    /// Its link-local address.
    pub addr: Ipv6Addr,
}

/// One neighbour: a link-local address on an interface.
#[derive(Clone, Debug)]
pub struct Neighbour {
    /// Its interface.
    pub iface: IfaceId,
    /// Its link-local address.
    pub addr: Ipv6Addr,
    /// Hello history; bit 15 is the most recent Hello slot.
    pub history: u16,
    last_seqno: Option<u16>,
    missed: u16,
    /// Its Hello interval (from its Hellos).
    pub hello_interval: Duration,
    /// When the next Hello counts as missed.
    pub next_miss: Instant,
    /// Its rxcost for us, from its IHU.
    pub txcost: u16,
    /// When the IHU information expires.
    pub ihu_expires: Instant,
    /// Smoothed RTT, and when it was last sampled.
    pub rtt: Option<(Duration, Instant)>,
    /// The RTT the link cost uses: it follows the smoothed RTT only when
    /// that moves by more than 15% (hysteresis against jitter).
    pub rtt_used: Option<Duration>,
    /// The timestamp of its last Hello and our clock when it arrived
    /// (echoed in our IHU for its RTT).
    pub last_hello_ts: Option<(u32, u32)>,
    /// When we last heard anything from it.
    pub last_heard: Instant,
}

/// How link cost is computed from Hello history (RFC 8966 Appendix A).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkQuality {
    /// 2-out-of-3 (wired links and tunnels).
    #[default]
    TwoOutOfThree,
    /// ETX (lossy links such as wireless).
    Etx,
}

/// A silent neighbour with no Hello history is forgotten after this long.
pub const NEIGHBOUR_GC: Duration = Duration::from_secs(3);

/// How long an RTT sample stays valid.
pub const RTT_VALID: Duration = Duration::from_secs(180);

impl Neighbour {
    /// A neighbour first heard now.
    pub fn new(iface: IfaceId, addr: Ipv6Addr, now: Instant) -> Self {
        Self {
            iface,
            addr,
            history: 0,
            last_seqno: None,
            missed: 0,
            hello_interval: Duration::from_secs(4),
            next_miss: now + Duration::from_secs(6),
            txcost: INFINITY,
            ihu_expires: now,
            rtt: None,
            rtt_used: None,
            last_hello_ts: None,
            last_heard: now,
        }
    }

    /// Records a multicast Hello.
    pub fn hello(&mut self, now: Instant, seqno: u16, interval: Duration) {
        self.last_heard = now;
        match self.last_seqno {
            None => self.history = 0x8000,
            Some(prev) => {
                let gap = seqno.wrapping_sub(prev);
                if gap == 0 || prev.wrapping_sub(seqno) <= 16 {
                    // A duplicate, or a reordered older Hello: already counted.
                    return;
                }
                if gap > 16 {
                    // A restart or a long gap: start over.
                    self.history = 0x8000;
                } else if gap > self.missed {
                    // gap - missed is at most 16: a shift by 16 empties the history.
                    let shift = u32::from(gap - self.missed);
                    self.history = self.history.checked_shr(shift).unwrap_or(0) | 0x8000;
                } else {
                    // Our deadline counted it missed but it was only late.
                    self.history |= 0x8000;
                }
            }
        }
        self.last_seqno = Some(seqno);
        self.missed = 0;
        // An unscheduled Hello (interval 0) keeps the known interval and
        // does not move the deadline of the next scheduled one.
        if !interval.is_zero() {
            self.hello_interval = interval;
            self.next_miss = now + self.hello_interval + self.hello_interval / 2;
        }
    }

    /// Counts missed Hellos whose deadline has passed. Returns true if the
    /// history changed.
    pub fn check_missed(&mut self, now: Instant) -> bool {
        let mut changed = false;
        while now >= self.next_miss && self.history != 0 {
            self.history >>= 1;
            self.missed = self.missed.saturating_add(1);
            self.next_miss += self.hello_interval.max(Duration::from_millis(10));
            changed = true;
        }
        changed
    }

    /// Whether it can be forgotten: nothing left of its Hello history and
    /// nothing heard for [`NEIGHBOUR_GC`] (a neighbour heard only through a
    /// challenge exchange has no Hello history yet, and must stay).
    pub fn is_dead(&self, now: Instant) -> bool {
        self.history == 0 && now.duration_since(self.last_heard) >= NEIGHBOUR_GC
    }

    /// Our rxcost for it (sent in our IHU). 2-out-of-3 (RFC 8966 A.2.1):
    /// nominal if 2 of the last 3 Hellos arrived, else infinity. ETX (A.2.2):
    /// nominal / beta, beta the fraction of the last 16 Hellos received.
    pub fn rxcost(&self, nominal: u16, quality: LinkQuality) -> u16 {
        match quality {
            LinkQuality::TwoOutOfThree if two_out_of_three(self.history) => nominal,
            LinkQuality::TwoOutOfThree => INFINITY,
            LinkQuality::Etx => match self.history.count_ones() {
                0 => INFINITY,
                got => (u32::from(nominal) * 16 / got).min(u32::from(INFINITY) - 1) as u16,
            },
        }
    }

    /// The cost of the link to it at `now`, plus the RTT penalty, times the
    /// multiplier. 2-out-of-3: txcost if we hear it; ETX: (tx × rx) / 256
    /// with both at least 256. Infinite when its IHU is stale.
    pub fn cost(
        &self,
        now: Instant,
        rtt: Option<&RttParams>,
        multiplier: u16,
        nominal: u16,
        quality: LinkQuality,
    ) -> u16 {
        let rx = self.rxcost(nominal, quality);
        if rx == INFINITY || now >= self.ihu_expires || self.txcost == INFINITY {
            return INFINITY;
        }
        let link = match quality {
            LinkQuality::TwoOutOfThree => self.txcost,
            LinkQuality::Etx => {
                let c = (u32::from(self.txcost.max(256)) * u32::from(rx.max(256)) + 128) >> 8;
                c.min(u32::from(INFINITY)) as u16
            }
        };
        let penalty = match (rtt, self.rtt, self.rtt_used) {
            (Some(p), Some((_, at)), Some(r)) if now.duration_since(at) < RTT_VALID => p.penalty(r),
            _ => 0,
        };
        let base = add(link, penalty);
        let scaled = u32::from(base) * u32::from(multiplier.max(1));
        if scaled >= u32::from(INFINITY) {
            INFINITY
        } else {
            scaled as u16
        }
    }

    /// Folds an RTT sample in.
    pub fn rtt_sample(&mut self, now: Instant, sample: Duration, params: &RttParams) {
        let current = self.rtt.map(|(r, _)| r);
        let smoothed = params.smooth(current, sample);
        self.rtt = Some((smoothed, now));
        let moved = match self.rtt_used {
            None => true,
            Some(used) => {
                let threshold = (used * 3 / 20).max(Duration::from_millis(1));
                smoothed.abs_diff(used) > threshold
            }
        };
        if moved {
            self.rtt_used = Some(smoothed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(300);

    fn n(now: Instant) -> Neighbour {
        Neighbour::new(IfaceId(1), Ipv6Addr::LOCALHOST, now)
    }

    #[test]
    fn link_dies_at_the_second_missed_hello() {
        let t0 = Instant::now();
        let mut nb = n(t0);
        for i in 0..3u16 {
            nb.hello(t0 + I * u32::from(i), i, I);
        }
        nb.txcost = 96;
        nb.ihu_expires = t0 + Duration::from_secs(60);
        let last = t0 + I * 2;
        assert_eq!(nb.cost(last, None, 1, 96, LinkQuality::TwoOutOfThree), 96);
        assert!(!nb.check_missed(last + I + I / 2 - Duration::from_millis(1)));
        assert!(nb.check_missed(last + I + I / 2));
        assert_eq!(
            nb.cost(last + I + I / 2, None, 1, 96, LinkQuality::TwoOutOfThree),
            96,
            "one miss is tolerated"
        );
        assert!(nb.check_missed(last + I * 5 / 2));
        assert_eq!(
            nb.cost(last + I * 5 / 2, None, 1, 96, LinkQuality::TwoOutOfThree),
            INFINITY
        );
        // It comes back: two Hellos restore it.
        nb.hello(last + I * 3, 3 + 3, I);
        nb.hello(last + I * 4, 3 + 4, I);
        assert_eq!(
            nb.cost(last + I * 4, None, 1, 96, LinkQuality::TwoOutOfThree),
            96
        );
    }

    #[test]
    fn a_late_hello_does_not_count_twice() {
        let t0 = Instant::now();
        let mut nb = n(t0);
        nb.hello(t0, 10, I);
        nb.hello(t0 + I, 11, I);
        nb.check_missed(t0 + I * 5 / 2 + Duration::from_millis(1));
        nb.hello(t0 + I * 5 / 2 + Duration::from_millis(2), 12, I);
        assert_eq!(nb.history & 0xE000, 0xE000);
    }

    #[test]
    fn a_jump_of_sixteen_hellos_empties_the_history_without_panicking() {
        let t0 = Instant::now();
        let mut nb = n(t0);
        nb.hello(t0, 100, I);
        nb.hello(t0 + I, 116, I);
        assert_eq!(nb.history, 0x8000);
    }

    #[test]
    fn reordered_and_unscheduled_hellos_change_nothing() {
        let t0 = Instant::now();
        let mut nb = n(t0);
        nb.hello(t0, 10, I);
        nb.hello(t0 + I, 11, I);
        nb.hello(t0 + I, 12, I);
        let (history, deadline) = (nb.history, nb.next_miss);
        nb.hello(t0 + I + I / 2, 11, I);
        assert_eq!(nb.history, history, "an older Hello is not a restart");
        nb.hello(t0 + I + I / 2, 13, Duration::ZERO);
        assert_eq!(nb.next_miss, deadline, "unscheduled Hello");
    }

    #[test]
    fn etx_cost_grows_with_loss() {
        let t0 = Instant::now();
        let mut nb = n(t0);
        for i in 0..16u16 {
            nb.hello(t0 + I * u32::from(i), i, I);
        }
        nb.txcost = 256;
        nb.ihu_expires = t0 + Duration::from_secs(60);
        let now = t0 + I * 15;
        assert_eq!(nb.rxcost(256, LinkQuality::Etx), 256);
        assert_eq!(nb.cost(now, None, 1, 256, LinkQuality::Etx), 256);
        // Lose every other Hello: beta = 1/2, rxcost 512, cost 512.
        let mut lossy = n(t0);
        for i in 0..16u16 {
            lossy.hello(t0 + I * u32::from(2 * i), 2 * i, I);
        }
        lossy.txcost = 256;
        lossy.ihu_expires = t0 + Duration::from_secs(60);
        assert_eq!(lossy.rxcost(256, LinkQuality::Etx), 512);
        assert_eq!(lossy.cost(t0 + I * 30, None, 1, 256, LinkQuality::Etx), 512);
    }

    #[test]
    fn cost_includes_rtt_and_multiplier() {
        let t0 = Instant::now();
        let mut nb = n(t0);
        nb.hello(t0, 0, I);
        nb.hello(t0 + I, 1, I);
        nb.txcost = 96;
        nb.ihu_expires = t0 + Duration::from_secs(60);
        let p = RttParams::default();
        nb.rtt_sample(t0 + I, Duration::from_millis(255), &p);
        assert_eq!(
            nb.cost(t0 + I, Some(&p), 1, 96, LinkQuality::TwoOutOfThree),
            96 + 2500
        );
        assert_eq!(
            nb.cost(t0 + I, Some(&p), 4, 96, LinkQuality::TwoOutOfThree),
            (96 + 2500) * 4
        );
        assert_eq!(
            nb.cost(t0 + I, Some(&p), 100, 96, LinkQuality::TwoOutOfThree),
            INFINITY
        );
        assert_eq!(
            nb.cost(
                t0 + Duration::from_secs(61),
                Some(&p),
                1,
                96,
                LinkQuality::TwoOutOfThree
            ),
            INFINITY,
            "IHU expired"
        );
    }
}
