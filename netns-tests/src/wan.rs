//! The userspace WAN emulator (this kernel has no netem).
//!
//! Every packet forwarded between host uplinks in the `inet` namespace is
//! routed into a tun device (policy routing, see [`crate::net`]). The emulator
//! reads it, finds the (source host, destination host) pair from its
//! addresses, drops it for loss or blackhole, or holds it for the pair's
//! one-way delay, then writes it back into the tun device for the kernel to
//! forward to its destination.
//!
//! [`Shaper`] is the decision logic with time passed in (unit-tested without
//! any device); [`Emulator`] runs it on a tun device with two threads: the
//! reader (classifies, writes zero-delay packets at once) and the releaser
//! (writes delayed packets when they are due).
//!
//! Packets are read one at a time without tun offloads, so loss applies to
//! real wire-sized packets, as it would on a WAN.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result, TopologyError};
use crate::topology::LinkParams;

/// Most packets held in the delay queue at once; more are dropped (and counted).
pub const QUEUE_LIMIT: usize = 50_000;

/// Counters of one directed pair (or of traffic between unknown addresses).
#[derive(Debug, Default)]
struct PairCounters {
    delivered: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    blackholed: AtomicU64,
    overflow: AtomicU64,
    in_flight: AtomicUsize,
}

/// A snapshot of the counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets written back for forwarding.
    pub delivered: u64,
    /// Their bytes (IP headers included).
    pub bytes: u64,
    /// Packets dropped by the loss rate.
    pub lost: u64,
    /// Packets dropped by a blackhole.
    pub blackholed: u64,
    /// Packets dropped because the delay queue was full.
    pub overflow: u64,
}

impl PairCounters {
    fn snapshot(&self) -> Counters {
        Counters {
            delivered: self.delivered.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            blackholed: self.blackholed.load(Ordering::Relaxed),
            overflow: self.overflow.load(Ordering::Relaxed),
        }
    }
}

/// State shared by the emulator threads and the test's [`WanHandle`].
#[derive(Debug)]
struct Shared {
    names: Vec<String>,
    by_addr: HashMap<IpAddr, usize>,
    params: RwLock<Vec<LinkParams>>,
    /// `n * n` pairs, then one slot for packets with an unknown end.
    counters: Vec<PairCounters>,
    /// Packets that were not IPv4 or IPv6 (or too short to be).
    malformed: AtomicU64,
    /// Writes back into the tun device that failed.
    write_errors: AtomicU64,
}

impl Shared {
    fn n(&self) -> usize {
        self.names.len()
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::NoSuch {
                kind: "host",
                name: name.to_string(),
            })
    }
}

/// Live control of the emulated WAN: change any path while the network runs.
/// Cheap to clone; all clones control the same emulator.
#[derive(Clone, Debug)]
pub struct WanHandle {
    shared: Arc<Shared>,
}

impl WanHandle {
    /// Current parameters from `from` to `to`.
    pub fn get(&self, from: &str, to: &str) -> Result<LinkParams> {
        let (f, t) = (self.shared.index(from)?, self.shared.index(to)?);
        let params = self
            .shared
            .params
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(params[f * self.shared.n() + t])
    }

    /// Sets the parameters from `from` to `to` (one direction); applies to
    /// the next packet read.
    pub fn set(&self, from: &str, to: &str, params: LinkParams) -> Result<()> {
        params.validate()?;
        let (f, t) = (self.shared.index(from)?, self.shared.index(to)?);
        let n = self.shared.n();
        let mut all = self
            .shared
            .params
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        all[f * n + t] = params;
        Ok(())
    }

    /// Sets the same parameters in both directions.
    pub fn set_both(&self, a: &str, b: &str, params: LinkParams) -> Result<()> {
        self.set(a, b, params)?;
        self.set(b, a, params)
    }

    /// Breaks the path between `a` and `b` in both directions (delay and loss kept).
    pub fn blackhole(&self, a: &str, b: &str) -> Result<()> {
        self.update_both(a, b, |p| p.blackhole = true)
    }

    /// Heals a path broken by [`WanHandle::blackhole`].
    pub fn heal(&self, a: &str, b: &str) -> Result<()> {
        self.update_both(a, b, |p| p.blackhole = false)
    }

    fn update_both(&self, a: &str, b: &str, f: impl Fn(&mut LinkParams)) -> Result<()> {
        let (ia, ib) = (self.shared.index(a)?, self.shared.index(b)?);
        let n = self.shared.n();
        let mut all = self
            .shared
            .params
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut all[ia * n + ib]);
        f(&mut all[ib * n + ia]);
        Ok(())
    }

    /// Counters of the direction `from` → `to`.
    pub fn counters(&self, from: &str, to: &str) -> Result<Counters> {
        let (f, t) = (self.shared.index(from)?, self.shared.index(to)?);
        Ok(self.shared.counters[f * self.shared.n() + t].snapshot())
    }

    /// Counters of packets whose source or destination is not a host uplink
    /// address (forwarded without delay or loss).
    pub fn unknown_counters(&self) -> Counters {
        self.shared.counters[self.shared.n() * self.shared.n()].snapshot()
    }

    /// Packets that were neither IPv4 nor IPv6, and failed writes.
    pub fn errors(&self) -> (u64, u64) {
        (
            self.shared.malformed.load(Ordering::Relaxed),
            self.shared.write_errors.load(Ordering::Relaxed),
        )
    }
}

/// What to do with one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it back at this time. `slot` is its counter slot.
    Deliver {
        /// When it is due.
        at: Instant,
        /// Counter slot (pair index, or the unknown slot).
        slot: usize,
    },
    /// Drop it (already counted).
    Drop,
}

/// The emulator's decisions, with time passed in. Owned by the reader thread.
#[derive(Debug)]
pub struct Shaper {
    shared: Arc<Shared>,
    rng: fastrand::Rng,
    /// Per pair: the due time of the last packet, so none is released before
    /// the one sent ahead of it.
    last_due: Vec<Option<Instant>>,
    /// For one direction of a point-to-point link: every packet is in this
    /// slot, whatever its addresses.
    fixed_slot: Option<usize>,
}

/// Source and destination addresses of an IPv4 or IPv6 packet.
pub fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        6 if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        _ => None,
    }
}

impl Shaper {
    /// A shaper for hosts `names` (in plan order), each with its addresses,
    /// starting from the row-major matrix `params`.
    pub fn new(
        names: Vec<String>,
        addrs: Vec<Vec<IpAddr>>,
        params: Vec<LinkParams>,
        seed: u64,
    ) -> Result<(Self, WanHandle)> {
        let n = names.len();
        if params.len() != n * n || addrs.len() != n {
            return Err(TopologyError::Invalid(format!(
                "WAN matrix has {} entries and {} address lists for {n} hosts",
                params.len(),
                addrs.len()
            ))
            .into());
        }
        for p in &params {
            p.validate()?;
        }
        let mut by_addr = HashMap::new();
        for (i, list) in addrs.into_iter().enumerate() {
            for a in list {
                if by_addr.insert(a, i).is_some() {
                    return Err(TopologyError::Overlap(format!("address {a} given twice")).into());
                }
            }
        }
        let shared = Arc::new(Shared {
            names,
            by_addr,
            params: RwLock::new(params),
            counters: (0..=n * n).map(|_| PairCounters::default()).collect(),
            malformed: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        });
        let shaper = Self {
            shared: Arc::clone(&shared),
            rng: fastrand::Rng::with_seed(seed),
            last_due: vec![None; n * n],
            fixed_slot: None,
        };
        Ok((shaper, WanHandle { shared }))
    }

    /// A shaper for one direction of a point-to-point link between the
    /// shaper's hosts `from` and `to` (by index), sharing parameters and
    /// counters with this one.
    pub fn direction(&self, from: usize, to: usize, seed: u64) -> Self {
        let n = self.shared.n();
        Self {
            shared: Arc::clone(&self.shared),
            rng: fastrand::Rng::with_seed(seed),
            last_due: vec![None; n * n],
            fixed_slot: Some(from * n + to),
        }
    }

    /// Decides the fate of `packet`, read at `now`.
    pub fn classify(&mut self, now: Instant, packet: &[u8]) -> Verdict {
        let slot = match self.fixed_slot {
            Some(slot) => slot,
            None => {
                let n = self.shared.n();
                let Some((src, dst)) = addresses(packet) else {
                    self.shared.malformed.fetch_add(1, Ordering::Relaxed);
                    return Verdict::Drop;
                };
                let (Some(&f), Some(&t)) =
                    (self.shared.by_addr.get(&src), self.shared.by_addr.get(&dst))
                else {
                    return Verdict::Deliver {
                        at: now,
                        slot: n * n,
                    };
                };
                f * n + t
            }
        };
        let params = {
            let all = self
                .shared
                .params
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            all[slot]
        };
        let counters = &self.shared.counters[slot];
        if params.blackhole {
            counters.blackholed.fetch_add(1, Ordering::Relaxed);
            return Verdict::Drop;
        }
        if params.loss > 0.0 && self.rng.f64() < params.loss {
            counters.lost.fetch_add(1, Ordering::Relaxed);
            return Verdict::Drop;
        }
        let mut delay = params.delay;
        if !params.jitter.is_zero() {
            let j = params.jitter.as_secs_f64();
            let offset = (self.rng.f64() * 2.0 - 1.0) * j;
            delay = Duration::from_secs_f64((delay.as_secs_f64() + offset).max(0.0));
        }
        let mut at = now + delay;
        if let Some(last) = self.last_due[slot] {
            at = at.max(last);
        }
        self.last_due[slot] = Some(at);
        Verdict::Deliver { at, slot }
    }

    fn counters(&self, slot: usize) -> &PairCounters {
        &self.shared.counters[slot]
    }
}

/// A packet waiting in the delay queue.
#[derive(Debug)]
struct Held {
    at: Instant,
    seq: u64,
    slot: usize,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Default)]
struct Queue {
    heap: Mutex<BinaryHeap<Held>>,
    wake: Condvar,
}

/// A running emulator: two threads on a tun device. Dropping it stops them
/// and closes the device (which removes it).
#[derive(Debug)]
pub struct Emulator {
    stop: Arc<AtomicBool>,
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

impl Emulator {
    /// Runs `shaper` on the tun device `tun` (opened with [`open_tun`]):
    /// packets read from it are written back into it.
    pub fn start(tun: File, shaper: Shaper) -> Result<Self> {
        let output = tun
            .try_clone()
            .map_err(|e| Error::io("duplicating the tun descriptor", e))?;
        Self::start_pipe(tun, output, shaper)
    }

    /// Runs `shaper` between two tun devices: packets read from `input` are
    /// written to `output` (one direction of an emulated link).
    pub fn start_pipe(input: File, output: File, shaper: Shaper) -> Result<Self> {
        let shared = Arc::clone(&shaper.shared);
        let input = Arc::new(input);
        let tun = Arc::new(output);
        let stop = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(Queue::default());
        let reader = {
            let (input, out, stop, queue) = (
                Arc::clone(&input),
                Arc::clone(&tun),
                Arc::clone(&stop),
                Arc::clone(&queue),
            );
            std::thread::Builder::new()
                .name("wan-reader".into())
                .spawn(move || read_loop(&input, &out, shaper, &stop, &queue))
                .map_err(|e| Error::io("starting the WAN reader thread", e))?
        };
        let mut emulator = Self {
            stop: Arc::clone(&stop),
            queue: Arc::clone(&queue),
            threads: vec![reader],
        };
        let releaser = std::thread::Builder::new()
            .name("wan-releaser".into())
            .spawn(move || release_loop(&tun, &shared, &stop, &queue))
            .map_err(|e| Error::io("starting the WAN releaser thread", e))?;
        emulator.threads.push(releaser);
        Ok(emulator)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How often the threads look at the stop flag when idle.
const IDLE_TICK: Duration = Duration::from_millis(50);

fn write_packet(tun: &File, shared: &Shared, slot: usize, packet: &[u8]) {
    let counters = &shared.counters[slot];
    // A tun device takes a packet whole or not at all.
    match (&*tun).write(packet) {
        Ok(n) if n == packet.len() => {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
        }
        Ok(_) | Err(_) => {
            shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn read_loop(input: &File, tun: &File, mut shaper: Shaper, stop: &AtomicBool, queue: &Queue) {
    let shared = Arc::clone(&shaper.shared);
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    let mut pfd = libc::pollfd {
        fd: input.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: pfd is a valid pollfd for an fd we own for this loop's life.
        let ready = unsafe { libc::poll(&mut pfd, 1, IDLE_TICK.as_millis() as i32) };
        if ready <= 0 {
            continue;
        }
        let len = match (&*input).read(&mut buf) {
            Ok(0) => continue,
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // The device is gone (namespace removed): nothing more to read.
            Err(_) => break,
        };
        let packet = &buf[..len];
        let now = Instant::now();
        let Verdict::Deliver { at, slot } = shaper.classify(now, packet) else {
            continue;
        };
        let counters = shaper.counters(slot);
        if at <= now && counters.in_flight.load(Ordering::Acquire) == 0 {
            write_packet(tun, &shared, slot, packet);
            continue;
        }
        let mut heap = queue.heap.lock().unwrap_or_else(PoisonError::into_inner);
        if heap.len() >= QUEUE_LIMIT {
            counters.overflow.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.in_flight.fetch_add(1, Ordering::AcqRel);
        let wake = heap.peek().is_none_or(|top| at < top.at);
        seq += 1;
        heap.push(Held {
            at,
            seq,
            slot,
            packet: packet.to_vec(),
        });
        drop(heap);
        if wake {
            queue.wake.notify_one();
        }
    }
}

fn release_loop(tun: &File, shared: &Shared, stop: &AtomicBool, queue: &Queue) {
    let mut due = Vec::new();
    let mut heap = queue.heap.lock().unwrap_or_else(PoisonError::into_inner);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while heap.peek().is_some_and(|top| top.at <= now) {
            if let Some(h) = heap.pop() {
                due.push(h);
            }
        }
        if !due.is_empty() {
            drop(heap);
            for h in due.drain(..) {
                write_packet(tun, shared, h.slot, &h.packet);
                shared.counters[h.slot]
                    .in_flight
                    .fetch_sub(1, Ordering::AcqRel);
            }
            heap = queue.heap.lock().unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        let wait = heap.peek().map_or(IDLE_TICK, |top| {
            top.at.saturating_duration_since(now).min(IDLE_TICK)
        });
        heap = queue
            .wake
            .wait_timeout(heap, wait)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Opens a new tun device named `name` (IFF_TUN, no packet information)
/// in the calling thread's network namespace.
pub fn open_tun(name: &str) -> Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::Measure(format!("bad tun name {name:?}")));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| Error::io("opening /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq
    // matches in size and layout; the fd is a tun control fd we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(Error::io(
            format!("creating tun device {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    const A4: [u8; 4] = [198, 18, 1, 2];
    const B4: [u8; 4] = [198, 18, 2, 2];

    fn shaper(ab: LinkParams) -> Result<(Shaper, WanHandle)> {
        let a6 = Ipv6Addr::new(0xfd00, 0x18, 0, 1, 0, 0, 0, 2);
        let b6 = Ipv6Addr::new(0xfd00, 0x18, 0, 2, 0, 0, 0, 2);
        Shaper::new(
            vec!["a".into(), "b".into()],
            vec![
                vec![IpAddr::V4(Ipv4Addr::from(A4)), IpAddr::V6(a6)],
                vec![IpAddr::V4(Ipv4Addr::from(B4)), IpAddr::V6(b6)],
            ],
            vec![
                LinkParams::default(),
                ab,
                LinkParams::default(),
                LinkParams::default(),
            ],
            7,
        )
    }

    #[test]
    fn delays_by_pair_and_direction() -> Result<()> {
        let (mut s, _) = shaper(LinkParams::delay_ms(25))?;
        let now = Instant::now();
        assert_eq!(
            s.classify(now, &v4(A4, B4)),
            Verdict::Deliver {
                at: now + Duration::from_millis(25),
                slot: 1
            }
        );
        assert_eq!(
            s.classify(now, &v4(B4, A4)),
            Verdict::Deliver { at: now, slot: 2 }
        );
        let a6 = Ipv6Addr::new(0xfd00, 0x18, 0, 1, 0, 0, 0, 2);
        let b6 = Ipv6Addr::new(0xfd00, 0x18, 0, 2, 0, 0, 0, 2);
        assert!(matches!(
            s.classify(now, &v6(a6, b6)),
            Verdict::Deliver { slot: 1, .. }
        ));
        Ok(())
    }

    #[test]
    fn unknown_addresses_pass_and_garbage_is_dropped() -> Result<()> {
        let (mut s, h) = shaper(LinkParams::delay_ms(25))?;
        let now = Instant::now();
        assert_eq!(
            s.classify(now, &v4([198, 18, 9, 9], B4)),
            Verdict::Deliver { at: now, slot: 4 }
        );
        for junk in [&[][..], &[0x45, 0, 0][..], &[0x70; 60][..], &[0x60; 39][..]] {
            assert_eq!(s.classify(now, junk), Verdict::Drop);
        }
        assert_eq!(h.errors().0, 4);
        Ok(())
    }

    #[test]
    fn blackhole_drops_all_and_heals() -> Result<()> {
        let (mut s, h) = shaper(LinkParams::default())?;
        h.blackhole("a", "b")?;
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(s.classify(now, &v4(A4, B4)), Verdict::Drop);
            assert_eq!(s.classify(now, &v4(B4, A4)), Verdict::Drop);
        }
        assert_eq!(h.counters("a", "b")?.blackholed, 100);
        h.heal("a", "b")?;
        assert!(matches!(
            s.classify(now, &v4(A4, B4)),
            Verdict::Deliver { .. }
        ));
        Ok(())
    }

    #[test]
    fn loss_rate_is_close_to_the_setting() -> Result<()> {
        let (mut s, h) = shaper(LinkParams::default().with_loss(0.2))?;
        let now = Instant::now();
        let dropped = (0..10_000)
            .filter(|_| s.classify(now, &v4(A4, B4)) == Verdict::Drop)
            .count();
        assert!((1800..=2200).contains(&dropped), "{dropped}");
        assert_eq!(h.counters("a", "b")?.lost, dropped as u64);
        Ok(())
    }

    #[test]
    fn jitter_stays_in_bounds_and_never_reorders() -> Result<()> {
        let params = LinkParams::delay_ms(20).with_jitter(Duration::from_millis(10));
        let (mut s, _) = shaper(params)?;
        let start = Instant::now();
        let mut last = start;
        let mut distinct = std::collections::HashSet::new();
        for i in 0..2000u64 {
            let now = start + Duration::from_micros(i * 100);
            let Verdict::Deliver { at, .. } = s.classify(now, &v4(A4, B4)) else {
                panic!("dropped without loss");
            };
            assert!(at >= last, "reordered");
            assert!(at >= now + Duration::from_millis(10));
            assert!(at <= now + Duration::from_millis(30) || at == last);
            distinct.insert(at - now);
            last = at;
        }
        assert!(distinct.len() > 100, "jitter has no spread");
        Ok(())
    }

    #[test]
    fn live_changes_are_validated_and_seen() -> Result<()> {
        let (mut s, h) = shaper(LinkParams::default())?;
        assert!(h
            .set("a", "b", LinkParams::default().with_loss(3.0))
            .is_err());
        assert!(h.set("a", "zz", LinkParams::default()).is_err());
        h.set("a", "b", LinkParams::delay_ms(7))?;
        let now = Instant::now();
        assert_eq!(
            s.classify(now, &v4(A4, B4)),
            Verdict::Deliver {
                at: now + Duration::from_millis(7),
                slot: 1
            }
        );
        Ok(())
    }
}
