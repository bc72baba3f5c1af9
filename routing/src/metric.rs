//! Metric arithmetic: seqno comparison, the 2-out-of-3 link cost and the
//! RTT penalty (RFC 9616 / babeld's function), and RTT smoothing.

use std::time::Duration;

use crate::wire::INFINITY;

/// `a` is newer than `b` (modulo 2^16, RFC 8966 §3.2.1).
pub fn seqno_newer(a: u16, b: u16) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 0x8000
}

/// Adds two metrics, saturating at infinity.
pub fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    if s >= u32::from(INFINITY) {
        INFINITY
    } else {
        s as u16
    }
}

/// Whether at least 2 of the last 3 Hello slots were received (history bit
/// 15 = most recent), RFC 8966 A.2.1.
pub fn two_out_of_three(history: u16) -> bool {
    (history & 0xE000).count_ones() >= 2
}

/// RTT parameters of an interface (RFC 9616 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttParams {
    /// No penalty at or below this RTT.
    pub min: Duration,
    /// Full penalty at or above this RTT.
    pub max: Duration,
    /// The full penalty.
    pub max_penalty: u16,
    /// EWMA weight of a new sample, out of 256.
    pub decay: u16,
}

impl Default for RttParams {
    /// re6st's values: penalty up to 5000 at 500 ms, so latency dominates.
    fn default() -> Self {
        Self {
            min: Duration::from_millis(10),
            max: Duration::from_millis(500),
            max_penalty: 5000,
            decay: 42,
        }
    }
}

impl RttParams {
    /// The penalty for a smoothed RTT.
    pub fn penalty(&self, rtt: Duration) -> u16 {
        if rtt <= self.min || self.max <= self.min {
            return if rtt >= self.max && self.max > self.min {
                self.max_penalty
            } else {
                0
            };
        }
        if rtt >= self.max {
            return self.max_penalty;
        }
        let num = (rtt - self.min).as_micros() * u128::from(self.max_penalty);
        let den = (self.max - self.min).as_micros().max(1);
        (num / den) as u16
    }

    /// Folds a new sample into the smoothed RTT.
    pub fn smooth(&self, current: Option<Duration>, sample: Duration) -> Duration {
        match current {
            None => sample,
            Some(c) => {
                let c = c.as_micros() as i128;
                let s = sample.as_micros() as i128;
                let next = c + (s - c) * i128::from(self.decay) / 256;
                Duration::from_micros(next.max(0) as u64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqnos_wrap() {
        assert!(seqno_newer(1, 0));
        assert!(seqno_newer(0, 0xffff));
        assert!(!seqno_newer(0, 0));
        assert!(!seqno_newer(0, 1));
        assert!(!seqno_newer(0x8000, 0));
        assert!(seqno_newer(0x7fff, 0));
    }

    #[test]
    fn metrics_saturate() {
        assert_eq!(add(96, 100), 196);
        assert_eq!(add(0xfff0, 96), INFINITY);
        assert_eq!(add(INFINITY, 0), INFINITY);
    }

    #[test]
    fn two_of_three() {
        assert!(two_out_of_three(0xE000));
        assert!(two_out_of_three(0xC000));
        assert!(two_out_of_three(0xA000));
        assert!(two_out_of_three(0x6000));
        assert!(!two_out_of_three(0x8000));
        assert!(!two_out_of_three(0x2000 | 0x1fff));
    }

    #[test]
    fn rtt_penalty_shape() {
        let p = RttParams::default();
        assert_eq!(p.penalty(Duration::from_millis(5)), 0);
        assert_eq!(p.penalty(Duration::from_millis(10)), 0);
        assert_eq!(p.penalty(Duration::from_millis(255)), 2500);
        assert_eq!(p.penalty(Duration::from_millis(500)), 5000);
        assert_eq!(p.penalty(Duration::from_secs(3)), 5000);
        let s = p.smooth(None, Duration::from_millis(100));
        assert_eq!(s, Duration::from_millis(100));
        let s = p.smooth(Some(s), Duration::from_millis(356));
        assert_eq!(s, Duration::from_millis(142));
    }
}
