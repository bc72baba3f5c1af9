//! Measurements: RTT by ping, waiting for a condition, and the loss-window
//! probe (UDP echo every 10 ms, reporting the longest gap and what was lost).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cleanup;
use crate::error::{Error, Result};
use crate::net::Host;

/// What `ping` measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RttStats {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Minimum RTT (None when nothing came back).
    pub min: Option<Duration>,
    /// Average RTT.
    pub avg: Option<Duration>,
    /// Maximum RTT.
    pub max: Option<Duration>,
}

impl RttStats {
    /// Fraction of requests without reply.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        1.0 - f64::from(self.received) / f64::from(self.sent)
    }
}

/// Parses iputils `ping -q` output.
pub fn parse_ping(text: &str) -> Result<RttStats> {
    let mut stats = None;
    for line in text.lines() {
        if let Some((sent, rest)) = line.split_once(" packets transmitted, ") {
            let sent = sent.trim().parse().map_err(|_| bad_ping(line))?;
            let received = rest
                .split_whitespace()
                .next()
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| bad_ping(line))?;
            stats = Some(RttStats {
                sent,
                received,
                min: None,
                avg: None,
                max: None,
            });
        } else if let Some(values) = line
            .strip_prefix("rtt min/avg/max/mdev = ")
            .or_else(|| line.strip_prefix("round-trip min/avg/max/stddev = "))
        {
            let s = stats.as_mut().ok_or_else(|| bad_ping(line))?;
            // "50.1/50.4/51.0/0.2 ms" possibly followed by ", pipe 2".
            let values = values.split(" ms").next().unwrap_or_default();
            let nums: Vec<f64> = values
                .split('/')
                .map(|v| v.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad_ping(line))?;
            if nums.len() < 3 || nums.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(bad_ping(line));
            }
            let ms = |v: f64| Some(Duration::from_secs_f64(v / 1000.0));
            (s.min, s.avg, s.max) = (ms(nums[0]), ms(nums[1]), ms(nums[2]));
        }
    }
    stats.ok_or_else(|| Error::Measure(format!("no summary in ping output: {text:?}")))
}

fn bad_ping(line: &str) -> Error {
    Error::Measure(format!("unexpected ping line {line:?}"))
}

/// Pings `dst` from `from`: `count` requests `interval` apart, each waiting
/// at most 1 s for its reply.
pub fn ping(from: &Host, dst: IpAddr, count: u32, interval: Duration) -> Result<RttStats> {
    cleanup::check_interrupt()?;
    let count_s = count.to_string();
    let interval_s = format!("{:.3}", interval.as_secs_f64());
    let dst_s = dst.to_string();
    let out = from.output(
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            &count_s,
            "-i",
            &interval_s,
            "-W",
            "1",
            &dst_s,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !text.contains("packets transmitted") && stderr.contains("connect: ") {
        // No route (an `unreachable` route held by re6stnet, or none at
        // all): nothing can answer, which is a measurement, not an error.
        return Ok(RttStats {
            sent: count,
            received: 0,
            min: None,
            avg: None,
            max: None,
        });
    }
    parse_ping(&text).map_err(|e| {
        Error::Measure(format!(
            "ping {dst} from {}: {e}; stderr: {}",
            from.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// One iperf3 TCP stream from `client` to a server started on `server`,
/// bound to `to`, for `secs` seconds; iperf3's JSON report (`-J`).
pub fn iperf3(client: &Host, server: &Host, to: IpAddr, secs: u32) -> Result<serde_json::Value> {
    let to = to.to_string();
    let mut s = server.spawn("iperf3", "iperf3", &["-s", "-1", "-B", &to])?;
    let secs = secs.to_string();
    let (out, _) = wait_until(
        &format!("iperf3 from {} to {to}", client.name()),
        Duration::from_secs(10),
        Duration::from_millis(300),
        || {
            client
                .output("iperf3", &["-c", &to, "-t", &secs, "-J"])
                .ok()
                .filter(|o| o.status.success())
        },
    )?;
    s.stop()?;
    serde_json::from_slice(&out.stdout).map_err(|e| Error::Measure(format!("iperf3 output: {e}")))
}

/// Polls `f` every `every` until it returns `Some`, for at most `timeout`.
/// Returns the value and how long it took.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        cleanup::check_interrupt()?;
        if let Some(v) = f() {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(every);
    }
}

/// What the loss-window probe saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossReport {
    /// Probes sent.
    pub sent: u64,
    /// Probes answered.
    pub received: u64,
    /// Probes never answered.
    pub lost: u64,
    /// Longest time between the sending of two consecutive answered probes
    /// (at the edges: from the first probe, or to the last one). With no
    /// loss this is the probe interval.
    pub longest_gap: Duration,
    /// When, after the probe started, that gap began.
    pub gap_start: Duration,
    /// When, after the probe started, the first answered probe was sent.
    pub first_answered: Option<Duration>,
    /// When, after the probe started, the last probe never answered was
    /// sent (None: every probe was answered). Answers are stable from the
    /// next probe on.
    pub last_lost: Option<Duration>,
}

impl LossReport {
    /// Fraction of probes lost.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.lost as f64 / self.sent as f64
    }
}

const MAGIC: &[u8; 8] = b"r6tprobe";
/// The probe stops sending by itself after this long.
pub const PROBE_MAX_RUN: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct ProbeLog {
    sent: Vec<Instant>,
    answered: Vec<bool>,
}

impl ProbeLog {
    fn report(&self, start: Instant) -> LossReport {
        let sent = self.sent.len() as u64;
        let received = self.answered.iter().filter(|a| **a).count() as u64;
        let mut longest = Duration::ZERO;
        let mut gap_start = Duration::ZERO;
        // Edges: the first send and the last send count as answered anchors.
        let mut prev: Option<Instant> = self.sent.first().copied();
        for (i, t) in self.sent.iter().enumerate() {
            let last = i + 1 == self.sent.len();
            if self.answered.get(i).copied().unwrap_or(false) || last {
                if let Some(p) = prev {
                    let gap = t.saturating_duration_since(p);
                    if gap > longest {
                        longest = gap;
                        gap_start = p.saturating_duration_since(start);
                    }
                }
                prev = Some(*t);
            }
        }
        let first_answered = self
            .sent
            .iter()
            .zip(&self.answered)
            .find(|(_, a)| **a)
            .map(|(t, _)| t.saturating_duration_since(start));
        let last_lost = self
            .sent
            .iter()
            .zip(&self.answered)
            .rev()
            .find(|(_, a)| !**a)
            .map(|(t, _)| t.saturating_duration_since(start));
        LossReport {
            sent,
            received,
            lost: sent - received,
            longest_gap: longest,
            gap_start,
            first_answered,
            last_lost,
        }
    }
}

/// A running loss-window probe: UDP probes every `interval` from one host to
/// an echo responder on another. Stops on drop.
#[derive(Debug)]
pub struct LossProbe {
    start: Instant,
    stop_send: Arc<AtomicBool>,
    stop_all: Arc<AtomicBool>,
    log: Arc<Mutex<ProbeLog>>,
    threads: Vec<JoinHandle<()>>,
}

fn bind_in(host: &Host, any: SocketAddr) -> Result<UdpSocket> {
    let name = host.name().to_string();
    host.in_ns(move || UdpSocket::bind(any))?
        .map_err(|e| Error::io(format!("binding a UDP socket in {name}"), e))
}

impl LossProbe {
    /// Probes `dst` (an address of `to`) from `from` every `interval`.
    pub fn start(from: &Host, to: &Host, dst: IpAddr, interval: Duration) -> Result<Self> {
        Self::start_from(from, None, to, dst, interval)
    }

    /// [`LossProbe::start`] from the source address `src` of `from` (else
    /// the kernel's choice).
    pub fn start_from(
        from: &Host,
        src: Option<IpAddr>,
        to: &Host,
        dst: IpAddr,
        interval: Duration,
    ) -> Result<Self> {
        let any = |port| match dst {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        };
        let responder = bind_in(to, any(0))?;
        let port = responder
            .local_addr()
            .map_err(|e| Error::io("reading the responder's port", e))?
            .port();
        // Not connected: sending must work (and count as lost) while there
        // is no route yet.
        let sender = bind_in(from, src.map_or(any(0), |a| SocketAddr::new(a, 0)))?;
        let target = SocketAddr::new(dst, port);
        let receiver = sender
            .try_clone()
            .map_err(|e| Error::io("cloning the probe socket", e))?;
        for s in [&responder, &receiver] {
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| Error::io("setting a socket timeout", e))?;
        }

        let start = Instant::now();
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_all = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(ProbeLog::default()));
        let mut threads = Vec::new();

        let stop = Arc::clone(&stop_all);
        threads.push(spawn("probe-echo", move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((len, peer)) = responder.recv_from(&mut buf) {
                    if buf[..len].starts_with(MAGIC) {
                        let _ = responder.send_to(&buf[..len], peer);
                    }
                }
            }
        })?);

        let (stop, plog) = (Arc::clone(&stop_all), Arc::clone(&log));
        threads.push(spawn("probe-recv", move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let Ok(len) = receiver.recv(&mut buf) else {
                    continue;
                };
                if len != 16 || !buf.starts_with(MAGIC) {
                    continue;
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&buf[8..16]);
                let seq = u64::from_be_bytes(seq) as usize;
                let mut l = plog.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(a) = l.answered.get_mut(seq) {
                    *a = true;
                }
            }
        })?);

        let (stop, plog) = (Arc::clone(&stop_send), Arc::clone(&log));
        threads.push(spawn("probe-send", move || {
            let mut seq: u64 = 0;
            loop {
                let due = start + interval * (seq as u32);
                let now = Instant::now();
                if stop.load(Ordering::Relaxed) || now - start > PROBE_MAX_RUN {
                    break;
                }
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut pkt = [0u8; 16];
                pkt[..8].copy_from_slice(MAGIC);
                pkt[8..].copy_from_slice(&seq.to_be_bytes());
                {
                    let mut l = plog.lock().unwrap_or_else(PoisonError::into_inner);
                    l.sent.push(Instant::now());
                    l.answered.push(false);
                }
                // A send error (no route while a path is broken) is a lost probe.
                let _ = sender.send_to(&pkt, target);
                seq += 1;
            }
        })?);

        Ok(Self {
            start,
            stop_send,
            stop_all,
            log,
            threads,
        })
    }

    /// When it started: the times in its reports count from here.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// The report so far (probes still in flight count as lost).
    pub fn snapshot(&self) -> LossReport {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report(self.start)
    }

    /// Stops sending, waits `linger` for late replies, and reports.
    pub fn stop(mut self, linger: Duration) -> LossReport {
        self.stop_send.store(true, Ordering::Relaxed);
        std::thread::sleep(linger);
        self.shutdown();
        self.snapshot()
    }

    /// Stops every probe at once, waits `linger` for late replies (once for
    /// all), and reports each, in order.
    pub fn stop_all(probes: Vec<Self>, linger: Duration) -> Vec<LossReport> {
        for p in &probes {
            p.stop_send.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(linger);
        probes
            .into_iter()
            .map(|mut p| {
                p.shutdown();
                p.snapshot()
            })
            .collect()
    }

    fn shutdown(&mut self) {
        self.stop_send.store(true, Ordering::Relaxed);
        self.stop_all.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LossProbe {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io(format!("starting thread {name}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() -> Result<()> {
        let text = "PING 198.18.2.2 (198.18.2.2) 56(84) bytes of data.\n\n--- 198.18.2.2 ping statistics ---\n10 packets transmitted, 9 received, 10% packet loss, time 1810ms\nrtt min/avg/max/mdev = 50.123/50.456/51.000/0.234 ms, pipe 2\n";
        let s = parse_ping(text)?;
        assert_eq!((s.sent, s.received), (10, 9));
        assert_eq!(s.min, Some(Duration::from_micros(50_123)));
        assert_eq!(s.max, Some(Duration::from_millis(51)));
        assert!((s.loss() - 0.1).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn parses_ping_with_no_reply() -> Result<()> {
        let text = "--- x ping statistics ---\n5 packets transmitted, 0 received, 100% packet loss, time 4000ms\n";
        let s = parse_ping(text)?;
        assert_eq!((s.sent, s.received, s.avg), (5, 0, None));
        Ok(())
    }

    #[test]
    fn refuses_garbage_ping_output() {
        assert!(parse_ping("").is_err());
        assert!(parse_ping("x packets transmitted, y received").is_err());
        assert!(
            parse_ping("1 packets transmitted, 1 received\nrtt min/avg/max/mdev = a/b/c/d ms")
                .is_err()
        );
    }

    fn log(pattern: &[bool], step_ms: u64) -> (Instant, ProbeLog) {
        let start = Instant::now();
        let sent = (0..pattern.len())
            .map(|i| start + Duration::from_millis(step_ms * i as u64))
            .collect();
        (
            start,
            ProbeLog {
                sent,
                answered: pattern.to_vec(),
            },
        )
    }

    #[test]
    fn gap_is_the_interval_without_loss() {
        let (start, l) = log(&[true; 20], 10);
        let r = l.report(start);
        assert_eq!((r.sent, r.received, r.lost), (20, 20, 0));
        assert_eq!(r.longest_gap, Duration::from_millis(10));
        assert_eq!(r.last_lost, None);
    }

    #[test]
    fn gap_spans_a_run_of_losses() {
        let mut p = vec![true; 30];
        for a in &mut p[10..15] {
            *a = false;
        }
        p[20] = false;
        let (start, l) = log(&p, 10);
        let r = l.report(start);
        assert_eq!(r.lost, 6);
        assert_eq!(r.longest_gap, Duration::from_millis(60));
        assert_eq!(r.gap_start, Duration::from_millis(90));
        assert_eq!(r.first_answered, Some(Duration::ZERO));
        assert_eq!(r.last_lost, Some(Duration::from_millis(200)));
    }

    #[test]
    fn gap_counts_losses_at_the_edges() {
        let mut p = vec![true; 10];
        p[7..].fill(false);
        let (start, l) = log(&p, 10);
        assert_eq!(l.report(start).longest_gap, Duration::from_millis(30));
        let mut p = vec![true; 10];
        p[..4].fill(false);
        let (start, l) = log(&p, 10);
        assert_eq!(l.report(start).longest_gap, Duration::from_millis(40));
    }
}
