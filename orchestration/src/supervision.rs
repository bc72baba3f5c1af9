//! What the agent decides for one running instance, sans IO: when to
//! (re)start its process (back-off after crashes), when each promise is
//! checked, what status that makes, and when to report it. The agent's
//! driver starts processes, runs the checks and sends the reports, and
//! tells this machine what happened; time is passed in.

use std::time::{Duration, Instant};

/// Longest wait before restarting a crashed instance.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait before restarting; doubles with each crash in a row.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// A process up this long resets the back-off.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The first check of a promise after a start.
pub const FIRST_CHECK: Duration = Duration::from_millis(500);
/// The longest a status goes unreported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// What an instance is, as reported to the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not up yet, or up without every promise kept once.
    Starting,
    /// Up, every promise kept at least once, none failing.
    Ready,
    /// Crashed (waiting to restart), or a promise failed too often.
    Failing,
}

impl Status {
    /// The word the master stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Failing => "failing",
        }
    }
}

/// A promise's schedule and record.
#[derive(Clone, Debug)]
struct PromiseClock {
    period: Duration,
    failures_allowed: u32,
    next: Instant,
    failures: u32,
    ever_ok: bool,
}

/// One instance's supervision.
#[derive(Clone, Debug)]
pub struct Supervision {
    /// Since when the process is up.
    up_since: Option<Instant>,
    restarts: u32,
    next_start: Instant,
    promises: Vec<PromiseClock>,
    reported: Option<(Status, Instant)>,
}

impl Supervision {
    /// A new instance to start now, with its promises as (period, failures
    /// in a row before it is failing).
    pub fn new(now: Instant, promises: &[(Duration, u32)]) -> Self {
        Self {
            up_since: None,
            restarts: 0,
            next_start: now,
            promises: promises
                .iter()
                .map(|&(period, failures_allowed)| PromiseClock {
                    period,
                    failures_allowed,
                    next: now,
                    failures: 0,
                    ever_ok: false,
                })
                .collect(),
            reported: None,
        }
    }

    /// Whether the process should be started now.
    pub fn poll_start(&self, now: Instant) -> bool {
        self.up_since.is_none() && now >= self.next_start
    }

    /// The process was started.
    pub fn handle_started(&mut self, now: Instant) {
        self.up_since = Some(now);
        for p in &mut self.promises {
            p.next = now + FIRST_CHECK;
            p.failures = 0;
        }
    }

    /// Starting failed: try again after the longest back-off.
    pub fn handle_start_failed(&mut self, now: Instant) {
        self.next_start = now + MAX_BACKOFF;
    }

    /// The process exited: restart after a back-off that doubles with each
    /// crash in a row (1 s, 2 s, … up to 30 s), reset by a stable run.
    pub fn handle_exited(&mut self, now: Instant) {
        if self
            .up_since
            .take()
            .is_some_and(|since| now.duration_since(since) > STABLE_AFTER)
        {
            self.restarts = 0;
        }
        let backoff = FIRST_BACKOFF * (1u32 << self.restarts.min(5));
        self.next_start = now + backoff.min(MAX_BACKOFF);
        self.restarts += 1;
    }

    /// Whether the process is up.
    pub fn is_up(&self) -> bool {
        self.up_since.is_some()
    }

    /// The promises to check now (their next check is then scheduled);
    /// none while the process is down.
    pub fn poll_checks(&mut self, now: Instant) -> Vec<usize> {
        if self.up_since.is_none() {
            return Vec::new();
        }
        let mut due = Vec::new();
        for (k, p) in self.promises.iter_mut().enumerate() {
            if now >= p.next {
                p.next = now + p.period;
                due.push(k);
            }
        }
        due
    }

    /// The result of checking promise `k`.
    pub fn handle_check(&mut self, k: usize, ok: bool) {
        if let Some(p) = self.promises.get_mut(k) {
            if ok {
                p.failures = 0;
                p.ever_ok = true;
            } else {
                p.failures += 1;
            }
        }
    }

    /// The promises failing now: (index, failures in a row).
    pub fn failing_promises(&self) -> Vec<(usize, u32)> {
        self.promises
            .iter()
            .enumerate()
            .filter(|(_, p)| p.failures > 0)
            .map(|(k, p)| (k, p.failures))
            .collect()
    }

    /// The status now.
    pub fn status(&self, now: Instant) -> Status {
        let Some(since) = self.up_since else {
            return if self.restarts > 0 {
                Status::Failing
            } else {
                Status::Starting
            };
        };
        if self
            .promises
            .iter()
            .any(|p| p.failures >= p.failures_allowed)
        {
            Status::Failing
        } else if self.promises.iter().all(|p| p.ever_ok)
            && now.duration_since(since) >= FIRST_CHECK
        {
            Status::Ready
        } else {
            Status::Starting
        }
    }

    /// The status to report now, if it changed since the last report or
    /// that one is older than [`REPORT_EVERY`].
    pub fn poll_report(&self, now: Instant) -> Option<Status> {
        let status = self.status(now);
        let due = self
            .reported
            .is_none_or(|(s, at)| s != status || now.duration_since(at) > REPORT_EVERY);
        due.then_some(status)
    }

    /// The master took the report of `status`.
    pub fn handle_reported(&mut self, status: Status, now: Instant) {
        self.reported = Some((status, now));
    }

    /// When something is next due (a start or a check), for the driver's
    /// timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.up_since {
            None => Some(self.next_start),
            Some(_) => self.promises.iter().map(|p| p.next).min(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn crashes_back_off_doubling_up_to_the_cap_and_a_stable_run_resets() {
        let t0 = Instant::now();
        let mut sv = Supervision::new(t0, &[]);
        assert!(sv.poll_start(t0));
        let mut t = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            sv.handle_started(t);
            assert!(!sv.poll_start(t), "up: no start");
            t += s(2);
            sv.handle_exited(t);
            assert_eq!(sv.status(t), Status::Failing);
            let wait = sv.poll_timeout().map(|at| at - t);
            waits.push(wait.map_or(0, |w| w.as_secs()));
            let at = sv.poll_timeout().unwrap_or(t);
            assert!(!sv.poll_start(at - Duration::from_millis(1)));
            assert!(sv.poll_start(at));
            t = at;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        // A run longer than a minute, then a crash: back to 1 s.
        sv.handle_started(t);
        t += s(61);
        sv.handle_exited(t);
        assert_eq!(sv.poll_timeout().map(|at| at - t), Some(s(1)));
        // A start that fails waits the longest.
        sv.handle_start_failed(t);
        assert_eq!(sv.poll_timeout().map(|at| at - t), Some(MAX_BACKOFF));
    }

    #[test]
    fn promises_make_the_status_and_are_checked_on_schedule() {
        let t0 = Instant::now();
        let mut sv = Supervision::new(t0, &[(s(10), 2), (s(5), 1)]);
        assert_eq!(sv.status(t0), Status::Starting);
        assert!(sv.poll_checks(t0).is_empty(), "no check while down");
        sv.handle_started(t0);
        assert!(sv.poll_checks(t0).is_empty(), "first check after 500 ms");
        let t1 = t0 + FIRST_CHECK;
        assert_eq!(sv.poll_checks(t1), [0, 1]);
        assert!(sv.poll_checks(t1).is_empty(), "scheduled again");
        sv.handle_check(0, true);
        assert_eq!(sv.status(t1), Status::Starting, "one promise kept only");
        sv.handle_check(1, true);
        assert_eq!(sv.status(t1), Status::Ready);
        assert_eq!(sv.poll_checks(t1 + s(5)), [1]);
        sv.handle_check(1, false);
        assert_eq!(sv.status(t1 + s(5)), Status::Failing, "1 failure allowed");
        assert_eq!(sv.failing_promises(), [(1, 1)]);
        sv.handle_check(1, true);
        sv.handle_check(0, false);
        assert_eq!(sv.status(t1 + s(10)), Status::Ready, "2 in a row needed");
        sv.handle_check(0, false);
        assert_eq!(sv.status(t1 + s(10)), Status::Failing);
        // A restart forgets failures.
        sv.handle_exited(t1 + s(11));
        sv.handle_started(t1 + s(12));
        assert!(sv.failing_promises().is_empty());
        assert_eq!(sv.poll_timeout(), Some(t1 + s(12) + FIRST_CHECK));
    }

    #[test]
    fn reports_go_on_change_and_every_ten_seconds() {
        let t0 = Instant::now();
        let mut sv = Supervision::new(t0, &[]);
        assert_eq!(sv.poll_report(t0), Some(Status::Starting));
        sv.handle_reported(Status::Starting, t0);
        assert_eq!(sv.poll_report(t0 + s(1)), None);
        sv.handle_started(t0 + s(1));
        let ready = t0 + s(1) + FIRST_CHECK;
        assert_eq!(sv.poll_report(ready), Some(Status::Ready), "changed");
        sv.handle_reported(Status::Ready, ready);
        assert_eq!(sv.poll_report(ready + s(10)), None);
        assert_eq!(sv.poll_report(ready + s(11)), Some(Status::Ready), "again");
        // An unsent report stays due.
        assert_eq!(sv.poll_report(ready + s(12)), Some(Status::Ready));
    }
}
