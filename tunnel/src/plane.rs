//! The data plane: one shared UDP socket, one tun device per link, and
//! threads moving packets between them through [`Links`].
//!
//! - The receiver thread reads the socket: control messages (tunnel set-up
//!   and the node's peer protocol, both starting with `R6`) go to the
//!   caller as [`Event::Control`]; WireGuard datagrams are demultiplexed and
//!   decapsulated, their packets written to the link's tun device.
//! - One reader thread per link reads its tun device, encrypts, sends.
//! - A timer thread runs boringtun's timers every 100 ms and reports
//!   links that came up or died.
//!
//! Tun devices are created in the calling thread's network namespace, set
//! to `addr_gen_mode none`, given the MTU, brought up, and given our
//! link-local address, so Babel runs on them. Closing a link removes its
//! device. Batching: the tun reader drains up to 44 packets per wake-up and
//! sends runs of equal-sized datagrams with one GSO `sendmsg`; the receiver
//! takes GRO-coalesced datagrams in one `recvmsg`. Tun offloads
//! (`IFF_VNET_HDR`) are not used yet.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::link::{Links, Output, BUF};
use crate::policy::Peer;
use crate::udp::{enable_gro, recv_segments, send_segments, MAX_GSO_BYTES, MAX_SEGMENTS};
use socket2::{SockAddr, Socket};

/// What the data plane reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A control datagram arrived (set-up or peer protocol: see
    /// [`is_control`]).
    Control {
        /// From.
        src: SocketAddr,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// A link completed a handshake.
    Up(Peer),
    /// A link expired (no handshake for a long time).
    Down(Peer),
}

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PlaneError {
    let what = what.into();
    move |e| PlaneError::Io(what, e)
}

/// A link's tun device and the flag that stops its reader.
struct TunEntry {
    file: Arc<File>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    socket: Socket,
    links: Mutex<Links>,
    tuns: Mutex<HashMap<u32, TunEntry>>,
    up: Mutex<HashMap<u32, bool>>,
    stop: AtomicBool,
    events: Mutex<Sender<Event>>,
}

/// Whether a datagram is a control message rather than WireGuard: set-up
/// (`R6T1`) and peer protocol (`R6P1`) messages start with `R6`, WireGuard
/// messages with a type byte 1..=4 followed by three zero bytes.
pub fn is_control(bytes: &[u8]) -> bool {
    bytes.starts_with(b"R6")
}

/// What a link reports (`wg show`-like).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStats {
    /// The link index.
    pub index: u32,
    /// The peer's prefix.
    pub peer: Peer,
    /// Where its datagrams go now.
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake (None: never).
    pub since_handshake: Option<Duration>,
    /// Bytes sent (WireGuard payload).
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
}

/// A running data plane.
pub struct Plane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    link_threads: Mutex<HashMap<u32, JoinHandle<()>>>,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane").finish_non_exhaustive()
    }
}

const TICK: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn report(shared: &Shared, e: Event) {
    let _ = lock(&shared.events).send(e);
}

impl Plane {
    /// Binds the shared socket (dual-stack when `bind` is `[::]:PORT`) and
    /// starts the receiver and timer threads.
    pub fn start(
        bind: SocketAddr,
        secret: [u8; 32],
        events: Sender<Event>,
    ) -> Result<Self, PlaneError> {
        use socket2::{Domain, Protocol, Type};
        let domain = if bind.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(io("socket"))?;
        if bind.is_ipv6() {
            s.set_only_v6(false).map_err(io("dual-stack socket"))?;
        }
        // Large buffers: bursts must not overflow them.
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.bind(&bind.into())
            .map_err(io(format!("binding {bind}")))?;
        s.set_read_timeout(Some(TICK))
            .map_err(io("socket timeout"))?;
        // Coalesced receive where the kernel supports it.
        let _ = enable_gro(&s);
        let shared = Arc::new(Shared {
            socket: s,
            links: Mutex::new(Links::new(secret)),
            tuns: Mutex::new(HashMap::new()),
            up: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            events: Mutex::new(events),
        });
        let mut threads = Vec::new();
        let sh = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("wg-recv".into())
                .spawn(move || receive_loop(&sh))
                .map_err(io("starting the receiver"))?,
        );
        let sh = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("wg-timers".into())
                .spawn(move || timer_loop(&sh))
                .map_err(io("starting the timers"))?,
        );
        Ok(Self {
            shared,
            threads,
            link_threads: Mutex::new(HashMap::new()),
        })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> Result<SocketAddr, PlaneError> {
        self.shared
            .socket
            .local_addr()
            .map_err(io("local address"))?
            .as_socket()
            .ok_or_else(|| {
                PlaneError::Io(
                    "local address".into(),
                    std::io::Error::from(std::io::ErrorKind::InvalidData),
                )
            })
    }

    /// Our WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        lock(&self.shared.links).public_key()
    }

    /// Sends a datagram (tunnel set-up messages).
    pub fn send(&self, dst: SocketAddr, bytes: &[u8]) -> Result<(), PlaneError> {
        self.shared
            .socket
            .send_to(bytes, &SockAddr::from(dst))
            .map(|_| ())
            .map_err(io(format!("sending to {dst}")))
    }

    /// Adds a link to `peer` (WireGuard key from its certificate) with a new
    /// tun device `name`; starts the handshake when `endpoint` is known
    /// (we initiate), else waits for the peer's. Returns the link index.
    pub fn add_link(
        &self,
        peer: Peer,
        peer_key: [u8; 32],
        endpoint: Option<SocketAddr>,
        name: &str,
        mtu: u32,
        link_local: Ipv6Addr,
    ) -> Result<u32, PlaneError> {
        let tun = Arc::new(create_tun(name, mtu, link_local)?);
        let index = lock(&self.shared.links).add(peer, peer_key, endpoint, Some(25));
        let stop = Arc::new(AtomicBool::new(false));
        lock(&self.shared.tuns).insert(
            index,
            TunEntry {
                file: Arc::clone(&tun),
                stop: Arc::clone(&stop),
            },
        );
        let sh = Arc::clone(&self.shared);
        let t = std::thread::Builder::new()
            .name(format!("wg-tun-{index}"))
            .spawn(move || tun_loop(&sh, index, &tun, &stop, mtu as usize))
            .map_err(io("starting a tun reader"))?;
        lock(&self.link_threads).insert(index, t);
        if let Some(ep) = endpoint {
            let mut buf = vec![0u8; 256];
            let init = lock(&self.shared.links)
                .get_mut(index)
                .and_then(|l| l.initiate(&mut buf));
            if let Some(init) = init {
                let _ = self.shared.socket.send_to(&init, &SockAddr::from(ep));
            }
        }
        Ok(index)
    }

    /// Closes a link: its tun device disappears.
    pub fn remove_link(&self, index: u32) {
        lock(&self.shared.links).remove(index);
        lock(&self.shared.up).remove(&index);
        if let Some(entry) = lock(&self.shared.tuns).remove(&index) {
            entry.stop.store(true, Ordering::SeqCst);
        }
        if let Some(t) = lock(&self.link_threads).remove(&index) {
            let _ = t.join();
        }
    }

    /// Datagrams dropped (all reasons).
    pub fn dropped(&self) -> u64 {
        lock(&self.shared.links).dropped.values().sum()
    }

    /// Datagrams dropped, by reason.
    pub fn dropped_by_reason(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = lock(&self.shared.links)
            .dropped
            .iter()
            .map(|(d, n)| (format!("{d:?}").to_lowercase(), *n))
            .collect();
        v.sort();
        v
    }

    /// Statistics of every link.
    pub fn links(&self) -> Vec<LinkStats> {
        let mut links = lock(&self.shared.links);
        let mut v: Vec<LinkStats> = links
            .indices()
            .into_iter()
            .filter_map(|i| {
                let l = links.get_mut(i)?;
                let (since, tx, rx) = l.stats();
                Some(LinkStats {
                    index: i,
                    peer: l.peer,
                    endpoint: l.endpoint,
                    since_handshake: since,
                    tx_bytes: tx,
                    rx_bytes: rx,
                })
            })
            .collect();
        v.sort_by_key(|l| l.index);
        v
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let indices: Vec<u32> = lock(&self.shared.tuns).keys().copied().collect();
        for i in indices {
            self.remove_link(i);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn receive_loop(sh: &Shared) {
    let mut data = vec![0u8; 65_536];
    let mut buf = vec![0u8; BUF];
    let mut outs: Vec<(u32, Output)> = Vec::new();
    while !sh.stop.load(Ordering::Relaxed) {
        let (len, src, segment) = match recv_segments(&sh.socket, &mut data) {
            Ok(x) => x,
            Err(_) => continue,
        };
        let size = if segment == 0 { len.max(1) } else { segment };
        {
            let mut links = lock(&sh.links);
            for datagram in data[..len].chunks(size) {
                if is_control(datagram) {
                    report(
                        sh,
                        Event::Control {
                            src,
                            bytes: datagram.to_vec(),
                        },
                    );
                    continue;
                }
                if let Ok((index, outputs)) = links.receive(src, datagram, &mut buf) {
                    outs.extend(outputs.into_iter().map(|o| (index, o)));
                }
            }
        }
        let tuns = lock(&sh.tuns);
        for (index, o) in outs.drain(..) {
            match o {
                Output::Network(d) => {
                    let _ = sh.socket.send_to(&d, &SockAddr::from(src));
                }
                Output::Tunnel(p) => {
                    if let Some(e) = tuns.get(&index) {
                        let _ = (&*e.file).write(&p);
                    }
                }
            }
        }
    }
}

/// Packets read from a tun device per batch.
const BATCH: usize = 44;
/// Room for WireGuard's header, tag and padding around a packet.
const OVERHEAD: usize = 96;

fn tun_loop(sh: &Shared, index: u32, tun: &File, stop: &AtomicBool, mtu: usize) {
    // Without IFF_VNET_HDR a tun read returns at most one MTU-sized packet:
    // buffers of that size keep the per-tunnel memory small.
    let slot = mtu.clamp(1280, 65_535) + OVERHEAD;
    let mut packets: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; slot]).collect();
    let mut lens = [0usize; BATCH];
    let mut out = vec![0u8; BATCH * slot];
    let mut sizes: Vec<usize> = Vec::with_capacity(BATCH);
    let mut pfd = libc::pollfd {
        fd: tun.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) && !sh.stop.load(Ordering::Relaxed) {
        // SAFETY: pfd is a valid pollfd for a descriptor we hold open.
        let ready = unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as i32) };
        if ready <= 0 {
            continue;
        }
        // Drain what is there (the descriptor is non-blocking), up to a batch.
        let mut count = 0;
        while count < BATCH {
            match (&*tun).read(&mut packets[count]) {
                Ok(0) => break,
                Ok(n) => {
                    lens[count] = n;
                    count += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        if count == 0 {
            continue;
        }
        sizes.clear();
        let endpoint = {
            let mut links = lock(&sh.links);
            let Some(l) = links.get_mut(index) else {
                return;
            };
            let mut off = 0;
            for (packet, &len) in packets.iter().zip(&lens).take(count) {
                // Datagrams are packed back to back for GSO.
                if let Some(n) = l.encapsulate_into(&packet[..len], &mut out[off..]) {
                    sizes.push(n);
                    off += n;
                }
            }
            l.endpoint
        };
        if let Some(ep) = endpoint {
            send_batch(sh, &out, &sizes, &SockAddr::from(ep));
        }
    }
}

/// Sends packed datagrams: runs of equal size (the last of a run may be
/// shorter) go out in one GSO system call each.
fn send_batch(sh: &Shared, out: &[u8], sizes: &[usize], dst: &SockAddr) {
    let mut i = 0;
    let mut off = 0;
    while i < sizes.len() {
        let seg = sizes[i];
        let mut j = i + 1;
        let mut total = seg;
        while j < sizes.len()
            && sizes[j] <= seg
            && j - i < MAX_SEGMENTS
            && total + sizes[j] <= MAX_GSO_BYTES
        {
            total += sizes[j];
            j += 1;
            if sizes[j - 1] < seg {
                break;
            }
        }
        let chunk = &out[off..off + total];
        let sent = j - i > 1 && send_segments(&sh.socket, chunk, seg, dst).is_ok();
        if !sent {
            // One by one (a lone datagram, or no GSO here).
            let mut o = 0;
            for &n in &sizes[i..j] {
                let _ = sh.socket.send_to(&chunk[o..o + n], dst);
                o += n;
            }
        }
        off += total;
        i = j;
    }
}

fn timer_loop(sh: &Shared) {
    let mut buf = vec![0u8; 256];
    let mut ticks = 0u32;
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        ticks = ticks.wrapping_add(1);
        if ticks % 10 == 0 {
            lock(&sh.links).reset_rate();
        }
        let mut sends = Vec::new();
        let mut events = Vec::new();
        {
            let mut links = lock(&sh.links);
            let mut up = lock(&sh.up);
            for i in links.indices() {
                let Some(l) = links.get_mut(i) else { continue };
                let (d, dead) = l.tick(&mut buf);
                if let (Some(d), Some(ep)) = (d, l.endpoint) {
                    sends.push((d, ep));
                }
                let now_up = l.is_up();
                let was_up = up.insert(i, now_up).unwrap_or(false);
                if now_up && !was_up {
                    events.push(Event::Up(l.peer));
                }
                if dead {
                    events.push(Event::Down(l.peer));
                }
            }
        }
        for (d, ep) in sends {
            let _ = sh.socket.send_to(&d, &SockAddr::from(ep));
        }
        for e in events {
            report(sh, e);
        }
    }
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

#[repr(C)]
struct In6IfReq {
    addr: [u8; 16],
    prefixlen: u32,
    ifindex: libc::c_int,
}

fn ioctl_ifreq(
    fd: libc::c_int,
    req: libc::c_ulong,
    name: &str,
    value: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut r = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        value,
        _pad: [0; 20],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `r` matches `struct ifreq` (name + an int in the union) in
    // size and layout; `fd` is an open socket.
    let rc = unsafe { libc::ioctl(fd, req, &mut r) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r.value)
    }
}

/// Creates and configures a tun device in the current network namespace.
fn create_tun(name: &str, mtu: u32, link_local: Ipv6Addr) -> Result<File, PlaneError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(PlaneError::Io(
            format!("interface name {name:?}"),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io("opening /dev/net/tun"))?;
    ioctl_ifreq(
        file.as_raw_fd(),
        TUNSETIFF,
        name,
        (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_int,
    )
    .map_err(io(format!("creating {name}")))?;
    // Non-blocking: the reader drains a batch after each poll.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    // No kernel-made link-local address: ours is set below.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/addr_gen_mode"), "1");
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(io("control socket"))?;
    let fd = sock.as_raw_fd();
    ioctl_ifreq(fd, libc::SIOCSIFMTU, name, mtu as libc::c_int)
        .map_err(io(format!("MTU of {name}")))?;
    let flags =
        ioctl_ifreq(fd, libc::SIOCGIFFLAGS, name, 0).map_err(io(format!("flags of {name}")))?;
    ioctl_ifreq(
        fd,
        libc::SIOCSIFFLAGS,
        name,
        flags | libc::IFF_UP | libc::IFF_MULTICAST,
    )
    .map_err(io(format!("bringing {name} up")))?;
    let c = std::ffi::CString::new(name).map_err(|_| {
        PlaneError::Io(
            name.into(),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    let sock6 = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0))
        .map_err(io("IPv6 control socket"))?;
    let mut req = In6IfReq {
        addr: link_local.octets(),
        prefixlen: 64,
        ifindex: ifindex as libc::c_int,
    };
    // SAFETY: `req` matches `struct in6_ifreq`; the socket is open.
    let rc = unsafe { libc::ioctl(sock6.as_raw_fd(), libc::SIOCSIFADDR, &mut req) };
    if rc < 0 {
        return Err(PlaneError::Io(
            format!("address of {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}
