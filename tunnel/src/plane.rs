//! The data plane's handle: starts the reactor thread (see [`crate::reactor`])
//! and talks to it through a command queue and a waker; what the reactor
//! reports comes back through the caller's event sink, and link statistics
//! through a snapshot it refreshes with its WireGuard timers.
//!
//! Tun devices are created by the caller's thread (in its network
//! namespace; the reactor never makes a blocking system call but its own
//! reads and writes) and handed over with the link. Removing a link never
//! waits: the reactor drops it, and its device is closed off the reactor.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::endpoint::Endpoint;
use crate::inprocess::InProcess;
use crate::policy::Peer;
use crate::reactor::Reactor;
use crate::tun::{self, Tun};
use socket2::Socket;

/// What the data plane reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A control datagram arrived (set-up or peer protocol: see
    /// [`is_control`]).
    Control {
        /// From.
        src: Endpoint,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// A link completed a handshake.
    Up(Peer),
    /// A link expired (no handshake for a long time).
    Down(Peer),
}

/// Where events go: returns false when the event could not be taken (a
/// full queue), and the reactor counts it as dropped.
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// An event sink over a `std` channel (tests, tools).
pub fn channel_sink(tx: Sender<Event>) -> EventSink {
    Box::new(move |e| tx.send(e).is_ok())
}

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The reactor thread is gone.
    #[error("the data plane stopped")]
    Stopped,
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PlaneError {
    let what = what.into();
    move |e| PlaneError::Io(what, e)
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
    pub endpoint: Option<Endpoint>,
    /// Time since the last completed handshake (None: never).
    pub since_handshake: Option<Duration>,
    /// Bytes sent (WireGuard payload).
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
}

/// What the reactor publishes with its timers (four times a second).
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Every link.
    pub links: Vec<LinkStats>,
    /// Datagrams and events dropped, by reason label.
    pub dropped: BTreeMap<&'static str, u64>,
    /// The longest loop iteration since start (a stall watchdog).
    pub longest_iteration: Duration,
}

/// A link being added.
pub(crate) struct NewLink {
    pub index: u32,
    pub peer: Peer,
    pub peer_key: [u8; 32],
    pub endpoint: Option<Endpoint>,
    pub tun: Tun,
    pub link_local: Ipv6Addr,
}

/// Work run on the reactor with the in-process protocol and the time.
pub(crate) type Call<P> = Box<dyn FnOnce(&mut P, Instant) + Send>;

/// Work for the reactor, in order.
pub(crate) enum Command<P> {
    AddLink(Box<NewLink>),
    RemoveLink(u32),
    /// A kernel socket of another interface whose datagrams go to the
    /// in-process protocol.
    AddSocket(u32, Socket),
    RemoveSocket(u32),
    Send(Endpoint, Vec<u8>),
    /// A link's device has this MTU now (set by the caller).
    SetMtu(u32, u32),
    /// What decrypted packets may enter the host from now on.
    SetIngress(crate::ingress::Ingress),
    Call(Call<P>),
    Stop,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running data plane, serving `P` in process on its links.
pub struct Plane<P: InProcess = ()> {
    mailbox: Arc<Mutex<Vec<Command<P>>>>,
    waker: Arc<mio::Waker>,
    published: Arc<Mutex<Published>>,
    parked: Arc<Mutex<Vec<Tun>>>,
    public_key: [u8; 32],
    local: SocketAddr,
    next_index: AtomicU32,
    thread: Option<JoinHandle<()>>,
}

impl<P: InProcess> std::fmt::Debug for Plane<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<P: InProcess> Plane<P> {
    /// Binds the shared socket (dual-stack when `bind` is `[::]:PORT`) and
    /// starts the reactor thread, which serves `protocol` on the links.
    pub fn start(
        bind: SocketAddr,
        secret: [u8; 32],
        events: EventSink,
        protocol: P,
    ) -> Result<Self, PlaneError> {
        let mailbox = Arc::new(Mutex::new(Vec::new()));
        let published = Arc::new(Mutex::new(Published::default()));
        let parked = Arc::new(Mutex::new(Vec::new()));
        let reactor = Reactor::new(
            bind,
            secret,
            events,
            protocol,
            Arc::clone(&mailbox),
            Arc::clone(&published),
            Arc::clone(&parked),
        )?;
        let waker = reactor.waker();
        let local = reactor.local_addr()?;
        let public_key = reactor.public_key();
        let thread = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || reactor.run())
            .map_err(io("starting the reactor"))?;
        Ok(Self {
            mailbox,
            waker,
            published,
            parked,
            public_key,
            local,
            next_index: AtomicU32::new(1),
            thread: Some(thread),
        })
    }

    fn command(&self, c: Command<P>) -> Result<(), PlaneError> {
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(PlaneError::Stopped);
        }
        lock(&self.mailbox).push(c);
        self.waker.wake().map_err(io("waking the reactor"))
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Our WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Sends a datagram (tunnel set-up and peer-protocol messages); over
    /// TCP, a connection is made when none is there.
    pub fn send(&self, dst: Endpoint, bytes: Vec<u8>) -> Result<(), PlaneError> {
        self.command(Command::Send(dst, bytes))
    }

    /// Adds a link to `peer` (WireGuard key from its certificate) with a new
    /// tun device `name` created here; see [`Plane::attach`]. Returns the
    /// link index and the device's kernel index.
    pub fn add_link(
        &self,
        peer: Peer,
        peer_key: [u8; 32],
        endpoint: Option<Endpoint>,
        name: &str,
        mtu: u32,
        link_local: Ipv6Addr,
    ) -> Result<(u32, u32), PlaneError> {
        let tun = tun::create(name, mtu, link_local, true)?;
        let ifindex = tun.ifindex;
        Ok((
            self.attach(peer, peer_key, endpoint, tun, link_local)?,
            ifindex,
        ))
    }

    /// Adds a link to `peer` over a tun device created by the caller (with
    /// [`tun::create`], which waits for the kernel's RTNL lock: a node
    /// creates its devices off its control loop); starts the handshake when
    /// `endpoint` is known (we initiate), else waits for the peer's.
    /// Returns the link index.
    pub fn attach(
        &self,
        peer: Peer,
        peer_key: [u8; 32],
        endpoint: Option<Endpoint>,
        tun: Tun,
        link_local: Ipv6Addr,
    ) -> Result<u32, PlaneError> {
        // Indexes are 24 bits (boringtun's receiver index is index << 8).
        let index = self
            .next_index
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                Some((i % 0x00ff_ffff) + 1)
            })
            .unwrap_or(1);
        self.command(Command::AddLink(Box::new(NewLink {
            index,
            peer,
            peer_key,
            endpoint,
            tun,
            link_local,
        })))?;
        Ok(index)
    }

    /// Tells the reactor that link `index`'s device now has `mtu` (set
    /// with [`tun::set_mtu`] by the caller): TCP SYNs are clamped to it.
    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), PlaneError> {
        self.command(Command::SetMtu(index, mtu))
    }

    /// Sets which decrypted packets enter the host (the default: all);
    /// the others are counted as `outside_overlay`.
    pub fn set_ingress(&self, ingress: crate::ingress::Ingress) -> Result<(), PlaneError> {
        self.command(Command::SetIngress(ingress))
    }

    /// A device of a closed link, for a new one (see [`tun::reuse`]).
    pub fn take_parked(&self) -> Option<Tun> {
        lock(&self.parked).pop()
    }

    /// Closes a link: its tun device is parked for a later link (up to
    /// 32), or disappears shortly after.
    pub fn remove_link(&self, index: u32) {
        let _ = self.command(Command::RemoveLink(index));
    }

    /// Hands over a kernel socket bound to the interface `ifindex`: what it
    /// receives goes to the in-process protocol, which sends through it.
    pub fn add_socket(&self, ifindex: u32, socket: Socket) -> Result<(), PlaneError> {
        self.command(Command::AddSocket(ifindex, socket))
    }

    /// Closes a socket handed over with [`Plane::add_socket`].
    pub fn remove_socket(&self, ifindex: u32) {
        let _ = self.command(Command::RemoveSocket(ifindex));
    }

    /// Runs `f` on the reactor thread with the in-process protocol and the
    /// time (configuration, status: answer through a channel).
    pub fn call(&self, f: impl FnOnce(&mut P, Instant) + Send + 'static) -> Result<(), PlaneError> {
        self.command(Command::Call(Box::new(f)))
    }

    /// What the reactor last published.
    pub fn published(&self) -> Published {
        lock(&self.published).clone()
    }

    /// Datagrams dropped (all reasons).
    pub fn dropped(&self) -> u64 {
        lock(&self.published).dropped.values().sum()
    }

    /// Statistics of every link (as of the last timer run: at most 250 ms
    /// old).
    pub fn links(&self) -> Vec<LinkStats> {
        lock(&self.published).links.clone()
    }
}

impl<P: InProcess> Drop for Plane<P> {
    fn drop(&mut self) {
        if self.command(Command::Stop).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}
