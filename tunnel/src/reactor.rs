//! The data-plane reactor: one thread, one epoll (`mio`), owning the shared
//! UDP socket, every link's tun device and boringtun state, and the
//! protocol served in process (Babel) — no locks on the packet path, no
//! thread per link, no fixed tick when idle.
//!
//! - The UDP socket: control messages (set-up and peer protocol, starting
//!   with `R6`) go to the event sink; WireGuard datagrams are
//!   demultiplexed and decapsulated. A decrypted link-local datagram for the
//!   in-process port goes straight to the protocol; any other packet to the
//!   link's tun device.
//! - A tun device: packets are encrypted and sent, runs of equal-sized
//!   datagrams with one GSO `sendmsg`.
//! - The protocol's output is framed (IPv6 + UDP, as the kernel would) and
//!   encrypted for links, or sent through a handed-over kernel socket.
//! - TCP on the same port (`tcp`): frames from a connection are handled
//!   as datagrams from that connection, and links whose endpoint is a TCP
//!   one send their datagrams as frames on it.
//! - boringtun's timers run every 250 ms for all links in one pass (as
//!   boringtun's own device does), which also publishes statistics.
//!
//! Fairness: each ready descriptor gets a budget per round (UDP: 32
//! `recvmsg`, tun: 32 reads), so a bulk transfer cannot starve the Hellos
//! of other links; descriptors with more to read stay in the ready set
//! and the next `epoll_wait` does not sleep. Deadlines are rounded up to a
//! 1 ms grid and the thread's timer slack is 1 ms, so nearby deadlines
//! share a wake-up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{IoSlice, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{SockAddr, Socket};

use crate::endpoint::{Endpoint, Transport};
use crate::frame;
use crate::ingress::Ingress;
use crate::inprocess::InProcess;
use crate::link::{Links, Output, BUF};
use crate::offload::{split, Gro, Segments, VnetHdr, VNET_HDR_LEN};
use crate::plane::{
    io, lock, Command, Event, EventSink, LinkStats, NewLink, PlaneError, Published,
};
use crate::tcp::{Streams, LISTENER, STREAM};
use crate::tun::{Offload, Tun};
use crate::udp::{
    enable_gro, enable_timestamps, recv_segments, send_segments, MAX_GSO_BYTES, MAX_SEGMENTS,
};

const WAKER: Token = Token(0);
const UDP: Token = Token(1);
/// Tokens of tun devices: this bit plus the link index.
const TUN: usize = 1 << 32;
/// Tokens of handed-over sockets: this bit plus the interface index.
const SOCKET: usize = 1 << 33;
/// boringtun's timers (handshake retries, rekeys, keepalives, expiry).
const WG_TICK: Duration = Duration::from_millis(250);
/// Deadlines are rounded up to this grid.
const GRID: Duration = Duration::from_millis(1);
/// `recvmsg` calls on the UDP socket per round.
const UDP_BUDGET: usize = 32;
/// Reads per tun device per round.
const TUN_BUDGET: usize = 32;
/// Room for WireGuard's header, tag and padding around a packet.
const OVERHEAD: usize = 96;
/// Largest packet read from a tun device (a super-packet with offloads).
const MAX_PACKET: usize = 65_535;

/// A link's device.
struct LinkIo {
    tun: Tun,
    link_local: Ipv6Addr,
    up: bool,
    /// Decrypted packets waiting to be coalesced (None: written one by
    /// one; also after the kernel refused a coalesced write).
    gro: Option<Gro>,
}

/// The virtio-net header of a packet that is neither coalesced nor in
/// need of a checksum.
const PLAIN_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
/// Devices of closed links kept for new ones.
const PARKED: usize = 32;
/// Room for encrypted datagrams between two sends.
const OUT_BYTES: usize = 256 * 1024;

/// The reactor's state (see the module documentation).
pub(crate) struct Reactor<P> {
    poll: Poll,
    waker: Arc<Waker>,
    socket: Socket,
    streams: Streams,
    links: Links,
    io: HashMap<u32, LinkIo>,
    by_ifindex: HashMap<u32, u32>,
    sockets: HashMap<u32, Socket>,
    protocol: P,
    ingress: Ingress,
    mailbox: Arc<Mutex<Vec<Command<P>>>>,
    published: Arc<Mutex<Published>>,
    parked: Arc<Mutex<Vec<Tun>>>,
    events: EventSink,
    /// Descriptors that may have more to read.
    ready: BTreeSet<Token>,
    dropped: BTreeMap<&'static str, u64>,
    longest: Duration,
    next_tick: Instant,
    ticks: u32,
    rx: Vec<u8>,
    dec: Vec<u8>,
    packet: Vec<u8>,
    out: Vec<u8>,
    sizes: Vec<usize>,
    framed: Vec<u8>,
    segments: Segments,
    /// Links with packets in their coalescer.
    coalescing: Vec<u32>,
}

fn register(poll: &Poll, fd: &impl AsRawFd, token: Token) -> Result<(), PlaneError> {
    poll.registry()
        .register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)
        .map_err(io("registering a descriptor"))
}

/// Sets this thread's timer slack, so the kernel may merge its wake-ups.
fn set_timer_slack(slack: Duration) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long; no pointers.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            slack.as_nanos() as libc::c_ulong,
            0,
            0,
            0,
        );
    }
}

fn round_up(d: Duration) -> Duration {
    let g = GRID.as_nanos();
    Duration::from_nanos((d.as_nanos().div_ceil(g) * g).min(u128::from(u64::MAX)) as u64)
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

impl<P: InProcess> Reactor<P> {
    pub(crate) fn new(
        bind: SocketAddr,
        secret: [u8; 32],
        events: EventSink,
        protocol: P,
        mailbox: Arc<Mutex<Vec<Command<P>>>>,
        published: Arc<Mutex<Published>>,
        parked: Arc<Mutex<Vec<Tun>>>,
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
        s.set_nonblocking(true).map_err(io("non-blocking socket"))?;
        // Coalesced receive where the kernel supports it; kernel receive
        // times for the in-process protocol's RTT samples.
        let _ = enable_gro(&s);
        let _ = enable_timestamps(&s);
        let poll = Poll::new().map_err(io("epoll"))?;
        // TCP on the port UDP got (none when it is taken: then this node
        // only dials over TCP).
        let udp_at = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(bind);
        let streams = Streams::new(tcp_listener(domain, udp_at), poll.registry());
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io("waker"))?);
        register(&poll, &s, UDP)?;
        Ok(Self {
            poll,
            waker,
            socket: s,
            streams,
            links: Links::new(secret),
            io: HashMap::new(),
            by_ifindex: HashMap::new(),
            sockets: HashMap::new(),
            protocol,
            ingress: Ingress::default(),
            mailbox,
            published,
            parked,
            events,
            ready: BTreeSet::new(),
            dropped: BTreeMap::new(),
            longest: Duration::ZERO,
            next_tick: Instant::now() + WG_TICK,
            ticks: 0,
            rx: vec![0u8; 65_536],
            dec: vec![0u8; BUF],
            packet: vec![0u8; VNET_HDR_LEN + MAX_PACKET],
            out: vec![0u8; OUT_BYTES],
            sizes: Vec::with_capacity(TUN_BUDGET),
            framed: Vec::with_capacity(1500),
            segments: Segments::new(),
            coalescing: Vec::new(),
        })
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr, PlaneError> {
        self.socket
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

    pub(crate) fn public_key(&self) -> [u8; 32] {
        self.links.public_key()
    }

    fn drop_count(&mut self, reason: &'static str) {
        *self.dropped.entry(reason).or_default() += 1;
    }

    fn emit(&mut self, e: Event) {
        if !(self.events)(e) {
            self.drop_count("event_queue_full");
        }
    }

    /// Runs until [`Command::Stop`].
    pub(crate) fn run(mut self) {
        set_timer_slack(GRID);
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            let timeout = if self.ready.is_empty() {
                let deadline = self
                    .protocol
                    .poll_timeout()
                    .map_or(self.next_tick, |t| t.min(self.next_tick));
                round_up(deadline.saturating_duration_since(now))
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.drop_count("epoll_error");
                }
                continue;
            }
            let started = Instant::now();
            for ev in &events {
                if ev.token() != WAKER {
                    self.ready.insert(ev.token());
                }
            }
            if !self.commands(started) {
                return;
            }
            let tokens: Vec<Token> = self.ready.iter().copied().collect();
            for token in tokens {
                let drained = match token {
                    UDP => self.service_udp(),
                    LISTENER => {
                        let refused = self.streams.accept(self.poll.registry(), Instant::now());
                        for _ in 0..refused {
                            self.drop_count("tcp_refused");
                        }
                        true
                    }
                    Token(t) if t & STREAM != 0 => self.service_stream(t & !STREAM),
                    Token(t) if t & TUN != 0 => self.service_tun((t & !TUN) as u32),
                    Token(t) if t & SOCKET != 0 => self.service_socket((t & !SOCKET) as u32),
                    _ => true,
                };
                if drained {
                    self.ready.remove(&token);
                }
            }
            let now = Instant::now();
            if now >= self.next_tick {
                self.wg_tick(now);
            }
            if self.protocol.poll_timeout().is_some_and(|t| t <= now) {
                self.protocol.handle_timeout(now);
            }
            self.transmit();
            self.longest = self.longest.max(started.elapsed());
        }
    }

    /// Applies queued commands; false on [`Command::Stop`].
    fn commands(&mut self, now: Instant) -> bool {
        let queued = std::mem::take(&mut *lock(&self.mailbox));
        for c in queued {
            match c {
                Command::AddLink(l) => self.add_link(*l),
                Command::RemoveLink(index) => self.remove_link(index),
                Command::AddSocket(ifindex, s) => {
                    if s.set_nonblocking(true).is_ok()
                        && register(&self.poll, &s, Token(SOCKET | ifindex as usize)).is_ok()
                    {
                        let _ = enable_timestamps(&s);
                        self.sockets.insert(ifindex, s);
                        // Datagrams may have arrived before registration.
                        self.ready.insert(Token(SOCKET | ifindex as usize));
                    }
                }
                Command::RemoveSocket(ifindex) => {
                    if let Some(s) = self.sockets.remove(&ifindex) {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&s.as_raw_fd()));
                    }
                    self.ready.remove(&Token(SOCKET | ifindex as usize));
                }
                Command::Send(dst, bytes) => self.send_to(dst, &bytes),
                Command::SetMtu(index, mtu) => {
                    if let Some(l) = self.io.get_mut(&index) {
                        l.tun.mtu = mtu;
                    }
                }
                Command::SetIngress(i) => self.ingress = i,
                Command::Call(f) => f(&mut self.protocol, now),
                Command::Stop => return false,
            }
        }
        true
    }

    fn add_link(&mut self, l: NewLink) {
        let NewLink {
            index,
            peer,
            peer_key,
            endpoint,
            tun,
            link_local,
        } = l;
        match self.links.add(index, peer, peer_key, endpoint, Some(25)) {
            Ok(Some(old)) => self.remove_io(old),
            Ok(None) => {}
            Err(_) => {
                self.drop_count("key_in_use");
                return;
            }
        }
        self.remove_io(index);
        let token = Token(TUN | index as usize);
        if register(&self.poll, &tun.file, token).is_err() {
            self.links.remove(index);
            self.drop_count("register_failed");
            return;
        }
        self.by_ifindex.insert(tun.ifindex, index);
        let gro = match tun.offload {
            Offload::None => None,
            Offload::Tcp => Some(Gro::new_with_udp(false)),
            Offload::TcpUdp => Some(Gro::new_with_udp(true)),
        };
        self.io.insert(
            index,
            LinkIo {
                tun,
                link_local,
                up: false,
                gro,
            },
        );
        self.ready.insert(token);
        if let Some(ep) = endpoint {
            let init = self
                .links
                .get_mut(index)
                .and_then(|l| l.initiate(&mut self.dec));
            if let Some(init) = init {
                self.send_to(ep, &init);
            }
        }
    }

    /// Forgets a link's device: parked for a later link (see
    /// [`crate::tun::reuse`]), or closed off this thread, as removing a
    /// network device waits for the kernel (RTNL, RCU).
    fn remove_io(&mut self, index: u32) {
        if let Some(l) = self.io.remove(&index) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&l.tun.file.as_raw_fd()));
            self.by_ifindex.remove(&l.tun.ifindex);
            let tun = l.tun;
            let tun = {
                let mut parked = lock(&self.parked);
                if parked.len() < PARKED {
                    parked.push(tun);
                    None
                } else {
                    Some(tun)
                }
            };
            let Some(tun) = tun else {
                self.ready.remove(&Token(TUN | index as usize));
                return;
            };
            if std::thread::Builder::new()
                .name("tun-close".into())
                .spawn(move || drop(tun))
                .is_err()
            {
                self.drop_count("close_thread");
            }
        }
        self.ready.remove(&Token(TUN | index as usize));
    }

    fn remove_link(&mut self, index: u32) {
        self.links.remove(index);
        self.remove_io(index);
    }

    /// Sends one datagram to `dst`; failures are counted.
    fn send_to(&mut self, dst: Endpoint, bytes: &[u8]) {
        let sent = send_via(
            &self.socket,
            &mut self.streams,
            self.poll.registry(),
            dst,
            bytes,
        );
        if let Err(why) = sent {
            self.drop_count(why);
        }
    }

    /// One datagram from `src`: a control message goes to the event
    /// sink, WireGuard to its link.
    fn on_datagram(&mut self, src: Endpoint, at: Instant, datagram: &[u8]) {
        if crate::plane::is_control(datagram) {
            self.emit(Event::Control {
                src,
                bytes: datagram.to_vec(),
            });
            return;
        }
        let Ok((index, outputs)) = self.links.receive(src, datagram, &mut self.dec) else {
            return;
        };
        for o in outputs {
            match o {
                Output::Network(d) => self.send_to(src, &d),
                Output::Tunnel(mut p) => self.deliver(index, at, &mut p),
            }
        }
    }

    /// Reads the UDP socket up to its budget; true when drained.
    fn service_udp(&mut self) -> bool {
        for _ in 0..UDP_BUDGET {
            let r = match recv_segments(&self.socket, &mut self.rx) {
                Ok(r) => r,
                Err(e) if would_block(&e) => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_count("recv_error");
                    return true;
                }
            };
            let rx = std::mem::take(&mut self.rx);
            for datagram in r.datagrams(&rx) {
                self.on_datagram(Endpoint::udp(r.src), r.at, datagram);
            }
            self.rx = rx;
            self.flush_coalesced();
        }
        false
    }

    /// Writes and reads a TCP connection; true when drained.
    fn service_stream(&mut self, id: usize) -> bool {
        let now = Instant::now();
        let got = self.streams.service(self.poll.registry(), now, id);
        for (remote, d) in &got.datagrams {
            self.on_datagram(Endpoint::tcp(*remote), now, d);
        }
        self.flush_coalesced();
        if let Some(why) = got.closed {
            self.drop_count(why);
        }
        got.drained
    }

    /// Writes what the coalescers of links hold: one write per item.
    fn flush_coalesced(&mut self) {
        for index in std::mem::take(&mut self.coalescing) {
            let Some(l) = self.io.get_mut(&index) else {
                continue;
            };
            let (tun, mut refused) = (&l.tun.file, false);
            let mut full = 0u64;
            if let Some(gro) = l.gro.as_mut() {
                gro.flush(|item| match (&*tun).write(item) {
                    Ok(_) => {}
                    Err(e) if would_block(&e) => full += 1,
                    // Some kernels refuse coalesced writes (EINVAL): the
                    // lost item is retransmitted by TCP, and this device
                    // gets packets one by one from now on.
                    Err(_) => refused |= item.get(1).is_some_and(|t| *t != 0),
                });
            }
            if refused {
                l.gro = None;
                self.drop_count("gro_refused");
            }
            for _ in 0..full {
                self.drop_count("tun_full");
            }
        }
    }

    /// A decrypted packet of link `index`: to the in-process protocol, or
    /// into the tun device if the ingress policy admits it.
    fn deliver(&mut self, index: u32, at: Instant, packet: &mut [u8]) {
        let Some(l) = self.io.get(&index) else {
            return;
        };
        let ifindex = l.tun.ifindex;
        if self.protocol.serves(ifindex) {
            if let Some(d) = frame::link_local_udp(packet, self.protocol.port()) {
                let now = Instant::now();
                self.protocol
                    .handle_datagram(now, at, ifindex, d.src, d.payload);
                return;
            }
        }
        if !self.ingress.admits(packet) {
            self.drop_count("outside_overlay");
            return;
        }
        let Some(l) = self.io.get_mut(&index) else {
            return;
        };
        crate::mss::clamp(packet, l.tun.mtu);
        let written = match (&mut l.gro, l.tun.vnet_hdr) {
            (Some(gro), _) => {
                if gro.is_empty() {
                    self.coalescing.push(index);
                }
                gro.push(packet);
                Ok(0)
            }
            (None, true) => {
                (&l.tun.file).write_vectored(&[IoSlice::new(&PLAIN_HDR), IoSlice::new(packet)])
            }
            (None, false) => (&l.tun.file).write(packet),
        };
        if written.is_err_and(|e| would_block(&e)) {
            self.drop_count("tun_full");
        }
    }

    /// Reads a tun device up to its budget (with offloads, each read may be
    /// a 64 KiB super-packet, cut into segments here), encrypts and sends;
    /// true when drained.
    fn service_tun(&mut self, index: u32) -> bool {
        let Some(l) = self.io.get(&index) else {
            return true;
        };
        let Some(link) = self.links.get_mut(index) else {
            return true;
        };
        let endpoint = link.endpoint;
        let (mut drained, mut off, mut malformed) = (false, 0, 0u64);
        let (registry, streams) = (self.poll.registry(), &mut self.streams);
        let mut unsent = Vec::new();
        let mut send = |out: &[u8], sizes: &[usize]| match endpoint {
            Some(ep) if ep.transport == Transport::Udp => {
                send_batch(&self.socket, out, sizes, &SockAddr::from(ep.addr));
            }
            Some(ep) => {
                let (now, mut o) = (Instant::now(), 0);
                for &n in sizes {
                    if let Err(why) = streams.send(registry, now, ep.addr, &out[o..o + n]) {
                        unsent.push(why);
                    }
                    o += n;
                }
            }
            None => {}
        };
        self.sizes.clear();
        for _ in 0..TUN_BUDGET {
            let n = match (&l.tun.file).read(&mut self.packet) {
                Ok(0) => {
                    drained = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    drained = true;
                    break;
                }
            };
            self.segments.clear();
            let mtu = l.tun.mtu;
            let packets: &mut dyn Iterator<Item = &[u8]> = if l.tun.vnet_hdr {
                let split = VnetHdr::parse(&self.packet[..n])
                    .and_then(|h| split(&h, &self.packet[VNET_HDR_LEN..n], &mut self.segments));
                if split.is_err() {
                    malformed += 1;
                }
                self.segments.for_each_mut(|p| {
                    crate::mss::clamp(p, mtu);
                });
                &mut self.segments.iter()
            } else {
                crate::mss::clamp(&mut self.packet[..n], mtu);
                &mut std::iter::once(&self.packet[..n])
            };
            for p in packets {
                if off + p.len() + OVERHEAD > self.out.len() {
                    send(&self.out[..off], &self.sizes);
                    self.sizes.clear();
                    off = 0;
                }
                // Datagrams are packed back to back for GSO.
                if let Some(len) = link.encapsulate_into(p, &mut self.out[off..]) {
                    self.sizes.push(len);
                    off += len;
                }
            }
        }
        send(&self.out[..off], &self.sizes);
        for why in unsent {
            self.drop_count(why);
        }
        for _ in 0..malformed {
            self.drop_count("offload_malformed");
        }
        drained
    }

    /// Reads a handed-over kernel socket up to its budget; true when drained.
    fn service_socket(&mut self, ifindex: u32) -> bool {
        let Some(s) = self.sockets.get(&ifindex) else {
            return true;
        };
        for _ in 0..UDP_BUDGET {
            let r = match recv_segments(s, &mut self.rx) {
                Ok(r) => r,
                Err(e) if would_block(&e) => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            };
            let SocketAddr::V6(src) = r.src else {
                continue;
            };
            let now = Instant::now();
            let len = r.len.min(self.rx.len());
            self.protocol
                .handle_datagram(now, r.at, ifindex, *src.ip(), &self.rx[..len]);
        }
        false
    }

    /// Sends what the in-process protocol has to say.
    fn transmit(&mut self) {
        while let Some(t) = self.protocol.poll_transmit() {
            if let Some(&index) = self.by_ifindex.get(&t.ifindex) {
                let Some(l) = self.io.get(&index) else {
                    continue;
                };
                if !frame::frame(
                    l.link_local,
                    t.dst,
                    self.protocol.port(),
                    &t.bytes,
                    &mut self.framed,
                ) {
                    continue;
                }
                let Some(link) = self.links.get_mut(index) else {
                    continue;
                };
                let sealed = link
                    .endpoint
                    .map(|ep| (ep, link.encapsulate_into(&self.framed, &mut self.dec)));
                match sealed {
                    Some((ep, Some(n))) => {
                        let registry = self.poll.registry();
                        let sent = send_via(
                            &self.socket,
                            &mut self.streams,
                            registry,
                            ep,
                            &self.dec[..n],
                        );
                        if let Err(why) = sent {
                            self.drop_count(why);
                        }
                    }
                    Some((_, None)) => {}
                    None => self.drop_count("no_endpoint"),
                }
            } else if let Some(s) = self.sockets.get(&t.ifindex) {
                let dst = SocketAddrV6::new(t.dst, self.protocol.port(), 0, t.ifindex);
                if s.send_to(&t.bytes, &SockAddr::from(dst)).is_err() {
                    self.drop_count("send_failed");
                }
            }
        }
    }

    /// boringtun's timers for every link, Up and Down events, statistics.
    fn wg_tick(&mut self, now: Instant) {
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks % 4 == 0 {
            self.links.reset_rate();
        }
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        for i in self.links.indices() {
            let Some(l) = self.links.get_mut(i) else {
                continue;
            };
            let (d, dead) = l.tick(&mut self.dec);
            let now_up = l.is_up();
            let peer = l.peer;
            if let (Some(d), Some(ep)) = (d, l.endpoint) {
                self.send_to(ep, &d);
            }
            if let Some(io) = self.io.get_mut(&i) {
                if now_up && !io.up {
                    ups.push(peer);
                }
                io.up = now_up;
            }
            if dead {
                downs.push(peer);
            }
        }
        for _ in 0..self.streams.expire(self.poll.registry(), now) {
            self.drop_count("tcp_idle");
        }
        self.publish();
        for p in ups {
            self.emit(Event::Up(p));
        }
        for p in downs {
            self.emit(Event::Down(p));
        }
        // Fixed phase: ticks do not drift with the loop's own delays.
        while self.next_tick <= now {
            self.next_tick += WG_TICK;
        }
    }

    fn publish(&mut self) {
        let mut links: Vec<LinkStats> = Vec::new();
        for i in self.links.indices() {
            if let Some(l) = self.links.get_mut(i) {
                let (since, tx, rx) = l.stats();
                links.push(LinkStats {
                    index: i,
                    peer: l.peer,
                    endpoint: l.endpoint,
                    since_handshake: since,
                    tx_bytes: tx,
                    rx_bytes: rx,
                });
            }
        }
        links.sort_by_key(|l| l.index);
        let mut dropped = self.dropped.clone();
        for (d, n) in &self.links.dropped {
            dropped.insert(d.label(), *n);
        }
        // Never wait for a reader: a skipped publication is redone 250 ms later.
        if let Ok(mut p) = self.published.try_lock() {
            *p = Published {
                links,
                dropped,
                longest_iteration: self.longest,
            };
        }
    }
}

/// Sends one datagram to `dst` over its transport (split borrows, so
/// that a caller can send from its own buffers without a copy).
fn send_via(
    socket: &Socket,
    streams: &mut Streams,
    registry: &mio::Registry,
    dst: Endpoint,
    bytes: &[u8],
) -> Result<(), &'static str> {
    match dst.transport {
        Transport::Udp => socket
            .send_to(bytes, &SockAddr::from(dst.addr))
            .map(|_| ())
            .map_err(|_| "send_failed"),
        Transport::Tcp => streams.send(registry, Instant::now(), dst.addr, bytes),
    }
}

/// A listener for the TCP transport on `at` (dual-stack for IPv6).
fn tcp_listener(domain: socket2::Domain, at: SocketAddr) -> Option<std::net::TcpListener> {
    use socket2::{Protocol, Type};
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).ok()?;
    if at.is_ipv6() {
        s.set_only_v6(false).ok()?;
    }
    s.set_reuse_address(true).ok()?;
    s.bind(&at.into()).ok()?;
    s.listen(128).ok()?;
    Some(s.into())
}

/// Sends packed datagrams: runs of equal size (the last of a run may be
/// shorter) go out in one GSO system call each.
fn send_batch(socket: &Socket, out: &[u8], sizes: &[usize], dst: &SockAddr) {
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
        let sent = j - i > 1 && send_segments(socket, chunk, seg, dst).is_ok();
        if !sent {
            // One by one (a lone datagram, or no GSO here).
            let mut o = 0;
            for &n in &sizes[i..j] {
                let _ = socket.send_to(&chunk[o..o + n], dst);
                o += n;
            }
        }
        off += total;
        i = j;
    }
}
