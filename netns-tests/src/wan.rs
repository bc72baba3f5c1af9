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
//! any device); [`Emulator`] runs it on a tun device with one thread, in
//! `SCHED_FIFO` when allowed: it waits for packets or for the next due
//! [`SLOT`], reads everything waiting, classifies it (writing zero-delay
//! packets at once), queues the rest per pair in reused buffers, and writes
//! what is due. No lock or hand-off between threads is on the packet path.
//!
//! Packets are read without tun offloads, so loss applies to real
//! wire-sized packets, as it would on a WAN. The handle exposes the queue's
//! high-water mark and a histogram of release lateness (write time − due
//! time), so that a benchmark can tell emulator delay from node delay.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
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
    /// Packets in the delay queues now (all shards).
    queued: AtomicUsize,
    /// Most packets in the delay queues at once since the last reset.
    high_water: AtomicUsize,
    /// Release lateness of delivered packets, by [`lateness_bucket`].
    lateness: Vec<AtomicU64>,
    /// Whether an emulator thread was refused `SCHED_FIFO`.
    rt_refused: AtomicBool,
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

/// Lateness histogram: 10 µs buckets from −1 ms to +10 ms, then buckets
/// of doubling width up to 41 s (the last one also holds anything later).
const LAT_MIN_US: i64 = -1_000;
const LAT_STEP_US: i64 = 10;
const LAT_LINEAR: usize = 1_100;
const LAT_LINEAR_END_US: i64 = LAT_MIN_US + LAT_STEP_US * LAT_LINEAR as i64;
const LAT_LOG: usize = 12;
const LAT_BUCKETS: usize = LAT_LINEAR + LAT_LOG;

/// The bucket of a lateness of `us` microseconds.
fn lateness_bucket(us: i64) -> usize {
    if us < LAT_LINEAR_END_US {
        // Non-negative and below LAT_LINEAR after the clamp.
        return ((us.max(LAT_MIN_US) - LAT_MIN_US) / LAT_STEP_US) as usize;
    }
    let mut bound = LAT_LINEAR_END_US * 2;
    let mut k = 0;
    while us >= bound && k < LAT_LOG - 1 {
        bound *= 2;
        k += 1;
    }
    LAT_LINEAR + k
}

/// The upper bound (µs, exclusive) of bucket `b`.
fn lateness_bound(b: usize) -> i64 {
    if b < LAT_LINEAR {
        LAT_MIN_US + LAT_STEP_US * (b as i64 + 1)
    } else {
        LAT_LINEAR_END_US << (b - LAT_LINEAR + 1)
    }
}

/// A snapshot of the release lateness (write time − due time) of every
/// packet the emulator delivered: negative when released early (at most
/// half a [`SLOT`] by design), positive when late.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lateness {
    buckets: Vec<u64>,
}

impl Lateness {
    /// Packets counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds, as the upper bound of its
    /// bucket (10 µs wide up to 10 ms); None when nothing was counted.
    pub fn quantile_us(&self, q: f64) -> Option<i64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q.clamp(0.0, 1.0)).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(lateness_bound(b));
            }
        }
        Some(lateness_bound(LAT_BUCKETS - 1))
    }

    /// What was counted after `earlier` (a snapshot of the same emulator).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }
}

/// Occupancy of the emulator's delay queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Packets waiting now.
    pub queued: usize,
    /// Most packets waiting at once since the start or the last
    /// [`WanHandle::reset_high_water`]. The limit is [`QUEUE_LIMIT`].
    pub high_water: usize,
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

    /// The delay queues' occupancy now and its high-water mark.
    pub fn queue(&self) -> QueueStats {
        QueueStats {
            queued: self.shared.queued.load(Ordering::Relaxed),
            high_water: self.shared.high_water.load(Ordering::Relaxed),
        }
    }

    /// Starts a new high-water mark from the current occupancy.
    pub fn reset_high_water(&self) {
        let now = self.shared.queued.load(Ordering::Relaxed);
        self.shared.high_water.store(now, Ordering::Relaxed);
    }

    /// Release lateness of every packet delivered so far (diff two
    /// snapshots with [`Lateness::since`] for a window).
    pub fn lateness(&self) -> Lateness {
        Lateness {
            buckets: self
                .shared
                .lateness
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// Whether every emulator thread runs in `SCHED_FIFO` (false when the
    /// kernel refused it; the emulator then competes with the daemons).
    pub fn realtime(&self) -> bool {
        !self.shared.rt_refused.load(Ordering::Relaxed)
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

/// The emulator's decisions, with time passed in. Owned by the emulator thread.
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
            queued: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            lateness: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            rt_refused: AtomicBool::new(false),
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
}

/// Width of a release slot. A shard wakes when the earliest packet is due,
/// but at least half a slot after its last release, and then writes every
/// packet due within the next half slot: it wakes for timers at most twice
/// per slot whatever the load, and releases a packet at most half a slot
/// early (late only by its own wake-up latency).
pub const SLOT: Duration = Duration::from_millis(1);

/// Most packets read in one go before the due ones are written.
const READ_BATCH: usize = 512;

/// Realtime priority (`SCHED_FIFO`) asked for the emulator threads, so that
/// busy daemons do not starve the emulated Internet.
const RT_PRIORITY: i32 = 10;

/// Whether the refusal of `SCHED_FIFO` was already logged (once per process).
static RT_REFUSAL_LOGGED: AtomicBool = AtomicBool::new(false);

/// The delay queues of one shard: a FIFO per pair (the shaper never gives a
/// packet an earlier due time than the one ahead of it on its pair), a heap
/// of the pairs keyed by the due time of their head, and a pool of packet
/// buffers reused from packet to packet.
#[derive(Debug)]
struct DelayQueue {
    /// Per counter slot: (due time, buffer index), oldest first.
    pairs: Vec<VecDeque<(Instant, usize)>>,
    /// (due time of the head, slot) of every non-empty pair.
    heads: BinaryHeap<Reverse<(Instant, usize)>>,
    bufs: Vec<Vec<u8>>,
    free: Vec<usize>,
    len: usize,
    limit: usize,
}

impl DelayQueue {
    fn new(slots: usize, limit: usize) -> Self {
        Self {
            pairs: (0..slots).map(|_| VecDeque::new()).collect(),
            heads: BinaryHeap::new(),
            bufs: Vec::new(),
            free: Vec::new(),
            len: 0,
            limit,
        }
    }

    /// Whether pair `slot` has nothing waiting (a packet due now may then
    /// be written at once without overtaking one).
    fn pair_is_empty(&self, slot: usize) -> bool {
        self.pairs[slot].is_empty()
    }

    /// Queues a copy of `packet` on pair `slot`, due at `at` (not earlier
    /// than the pair's last one); false when the queue is full.
    fn push(&mut self, slot: usize, at: Instant, packet: &[u8]) -> bool {
        if self.len >= self.limit {
            return false;
        }
        let idx = self.free.pop().unwrap_or_else(|| {
            self.bufs.push(Vec::new());
            self.bufs.len() - 1
        });
        let buf = &mut self.bufs[idx];
        buf.clear();
        buf.extend_from_slice(packet);
        let q = &mut self.pairs[slot];
        if q.is_empty() {
            self.heads.push(Reverse((at, slot)));
        }
        q.push_back((at, idx));
        self.len += 1;
        true
    }

    /// When the earliest packet is due.
    fn next_due(&self) -> Option<Instant> {
        self.heads.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the earliest packet if it is due by `until`, handing its slot,
    /// due time and bytes to `f`; false when none is.
    fn pop_due(&mut self, until: Instant, f: impl FnOnce(usize, Instant, &[u8])) -> bool {
        let Some(&Reverse((at, slot))) = self.heads.peek() else {
            return false;
        };
        if at > until {
            return false;
        }
        self.heads.pop();
        let q = &mut self.pairs[slot];
        // A pair is in `heads` only while it holds packets.
        let Some((due, idx)) = q.pop_front() else {
            return true;
        };
        if let Some(&(next, _)) = q.front() {
            self.heads.push(Reverse((next, slot)));
        }
        f(slot, due, &self.bufs[idx]);
        self.free.push(idx);
        self.len -= 1;
        true
    }
}

/// A running emulator: one thread per tun queue, each reading, delaying and
/// writing back its own packets. Dropping it stops them and closes the
/// device (which removes it).
#[derive(Debug)]
pub struct Emulator {
    stop: Arc<AtomicBool>,
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
        set_nonblocking(&input)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || shard_loop(&input, &output, shaper, &stop))
                .map_err(|e| Error::io("starting the WAN emulator thread", e))?
        };
        Ok(Self {
            stop,
            threads: vec![thread],
        })
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Longest sleep of an idle shard, so that it sees the stop flag.
const IDLE_TICK: Duration = Duration::from_millis(50);

fn set_nonblocking(file: &File) -> Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL take no pointer; the fd is ours.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(Error::io(
            "making the tun descriptor non-blocking",
            std::io::Error::last_os_error(),
        ))
    }
}

/// Puts the calling thread in `SCHED_FIFO`; on refusal, says so once and
/// records it in the handle's state.
fn set_realtime(shared: &Shared) {
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: sched_setscheduler reads one sched_param that outlives the
    // call; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return;
    }
    let err = std::io::Error::last_os_error();
    shared.rt_refused.store(true, Ordering::Relaxed);
    if !RT_REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
        eprintln!("netns-tests: WAN emulator left at normal priority, SCHED_FIFO refused: {err}");
    }
}

/// Signed microseconds from `due` to `at`.
fn micros_after(due: Instant, at: Instant) -> i64 {
    match at.checked_duration_since(due) {
        Some(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        None => -i64::try_from((due - at).as_micros()).unwrap_or(i64::MAX),
    }
}

/// Writes one packet, due at `due`, and counts it.
fn deliver(tun: &File, shared: &Shared, slot: usize, due: Instant, packet: &[u8]) {
    // A tun device takes a packet whole or not at all.
    match (&*tun).write(packet) {
        Ok(n) if n == packet.len() => {
            let counters = &shared.counters[slot];
            counters.delivered.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            let late = micros_after(due, Instant::now());
            shared.lateness[lateness_bucket(late)].fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) | Err(_) => {
            shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One shard: waits for packets or the next due slot, reads everything
/// waiting (up to [`READ_BATCH`]), queues it, and writes what is due.
fn shard_loop(input: &File, output: &File, mut shaper: Shaper, stop: &AtomicBool) {
    let shared = Arc::clone(&shaper.shared);
    set_realtime(&shared);
    let mut queue = DelayQueue::new(shared.counters.len(), QUEUE_LIMIT);
    let mut buf = vec![0u8; 65536];
    let half = SLOT / 2;
    let mut last_release = Instant::now();
    let mut pfd = libc::pollfd {
        fd: input.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = queue.next_due().map_or(IDLE_TICK, |due| {
            let wake = due.max(last_release + half);
            wake.saturating_duration_since(now).min(IDLE_TICK)
        });
        let ts = libc::timespec {
            tv_sec: 0,
            // Below IDLE_TICK, so it fits.
            tv_nsec: wait.subsec_nanos().into(),
        };
        // SAFETY: pfd and ts are valid for the call; the fd is ours for the
        // loop's life; a null signal mask leaves the mask alone.
        let ready = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if ready > 0 && pfd.revents & libc::POLLIN == 0 {
            // POLLERR, POLLHUP or POLLNVAL: the device is gone.
            break;
        }
        if ready > 0 {
            let mut pushed = 0;
            for _ in 0..READ_BATCH {
                let len = match (&*input).read(&mut buf) {
                    Ok(0) => break,
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // The device is gone (namespace removed): nothing more to read.
                    Err(_) => return,
                };
                let packet = &buf[..len];
                let now = Instant::now();
                let Verdict::Deliver { at, slot } = shaper.classify(now, packet) else {
                    continue;
                };
                if at <= now && queue.pair_is_empty(slot) {
                    deliver(output, &shared, slot, at, packet);
                } else if queue.push(slot, at, packet) {
                    pushed += 1;
                } else {
                    shared.counters[slot]
                        .overflow
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if pushed > 0 {
                let total = shared.queued.fetch_add(pushed, Ordering::Relaxed) + pushed;
                shared.high_water.fetch_max(total, Ordering::Relaxed);
            }
        }
        let now = Instant::now();
        let mut released = 0;
        while queue.pop_due(now + half, |slot, due, packet| {
            deliver(output, &shared, slot, due, packet);
        }) {
            released += 1;
        }
        if released > 0 {
            last_release = now;
            shared.queued.fetch_sub(released, Ordering::Relaxed);
        }
    }
}

/// Name of the emulator threads (as `/proc/self/task/*/comm` shows it).
pub const THREAD_NAME: &str = "wan-emu";

/// CPU time used so far by this process's emulator threads (all
/// emulators), from `/proc/self/task/*/stat`.
pub fn cpu_time() -> Result<Duration> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|e| Error::io("listing /proc/self/task", e))?;
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let dir = task.path();
        let is_emulator =
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == THREAD_NAME);
        if is_emulator {
            total += crate::process::stat_cpu_time(&dir.join("stat")).unwrap_or_default();
        }
    }
    Ok(total)
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

    #[test]
    fn delay_queue_keeps_pair_order_and_reuses_buffers() {
        let t = Instant::now();
        let ms = |m| t + Duration::from_millis(m);
        let mut q = DelayQueue::new(3, 4);
        assert!(q.push(0, ms(30), b"a1"));
        assert!(q.push(1, ms(10), b"b1"));
        assert!(q.push(0, ms(30), b"a2"));
        assert!(q.push(1, ms(40), b"b2"));
        assert!(!q.push(2, ms(1), b"full"), "over the limit");
        assert!(!q.pair_is_empty(0) && q.pair_is_empty(2));
        assert_eq!(q.next_due(), Some(ms(10)));
        let mut out = Vec::new();
        while q.pop_due(ms(35), |slot, due, p| out.push((slot, due, p.to_vec()))) {}
        assert_eq!(
            out,
            vec![
                (1, ms(10), b"b1".to_vec()),
                (0, ms(30), b"a1".to_vec()),
                (0, ms(30), b"a2".to_vec()),
            ]
        );
        assert_eq!(q.next_due(), Some(ms(40)));
        assert!(q.push(2, ms(50), b"c1"));
        assert_eq!(q.bufs.len(), 4, "freed buffers are reused");
        assert!(q.pop_due(ms(40), |slot, _, p| assert_eq!((slot, p), (1, &b"b2"[..]))));
        assert!(!q.pop_due(ms(49), |_, _, _| panic!("not due")));
    }

    #[test]
    fn lateness_histogram_quantiles() {
        assert_eq!(lateness_bucket(-5_000), 0);
        assert_eq!(lateness_bound(lateness_bucket(-1)), 0);
        assert_eq!(lateness_bound(lateness_bucket(0)), 10);
        assert_eq!(lateness_bound(lateness_bucket(9_999)), 10_000);
        assert_eq!(lateness_bound(lateness_bucket(10_000)), 20_000);
        assert_eq!(lateness_bound(lateness_bucket(25_000)), 40_000);
        assert_eq!(lateness_bucket(i64::MAX), LAT_BUCKETS - 1);
        let mut buckets = vec![0; LAT_BUCKETS];
        buckets[lateness_bucket(5)] = 98;
        buckets[lateness_bucket(500)] = 2;
        let l = Lateness { buckets };
        assert_eq!(l.count(), 100);
        assert_eq!(l.quantile_us(0.5), Some(10));
        assert_eq!(l.quantile_us(0.99), Some(510));
        assert_eq!(l.since(&l).quantile_us(0.5), None);
        let t = Instant::now();
        assert_eq!(micros_after(t, t + Duration::from_micros(7)), 7);
        assert_eq!(micros_after(t + Duration::from_micros(7), t), -7);
    }
}
