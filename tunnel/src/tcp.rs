//! The TCP transport's connections, owned by the reactor: a listener on
//! the node's port and one connection per peer address, each carrying
//! frames ([`crate::stream`]) both ways. A connection is made on the
//! first datagram for an address that has none; an idle one (nothing
//! read for [`IDLE`]) is closed, as is one that sends an empty frame or
//! fails. Bounded: [`MAX_STREAMS`] connections, [`MAX_PER_SOURCE`]
//! incoming ones per address, [`MAX_QUEUED`] bytes waiting to be written
//! on each.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use crate::stream::{encode, Frames};

/// The listener's token.
pub(crate) const LISTENER: Token = Token(2);
/// Tokens of connections: this bit plus the connection's number.
pub(crate) const STREAM: usize = 1 << 34;
/// Connections at most (incoming and outgoing).
pub const MAX_STREAMS: usize = 256;
/// Incoming connections from one address at most, so that one host
/// cannot take every slot.
pub const MAX_PER_SOURCE: usize = 8;
/// Bytes waiting to be written on one connection, at most; datagrams
/// beyond are dropped (`tcp_queue_full`), as a full UDP buffer would.
pub const MAX_QUEUED: usize = 1 << 20;
/// A connection that reads nothing for this long is closed (a tunnel's
/// Babel Hellos and WireGuard keepalives keep a live one busy).
pub const IDLE: Duration = Duration::from_secs(60);
/// Reads per connection per round.
const READ_BUDGET: usize = 16;

struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    frames: Frames,
    out: Vec<u8>,
    last_rx: Instant,
    connecting: bool,
    outgoing: bool,
}

/// What servicing a connection gave.
#[derive(Default)]
pub(crate) struct Serviced {
    /// Datagrams read, with the connection's remote address.
    pub datagrams: Vec<(SocketAddr, Vec<u8>)>,
    /// Nothing more to read for now (or closed).
    pub drained: bool,
    /// Why it was closed, if it was.
    pub closed: Option<&'static str>,
}

/// The connections.
pub(crate) struct Streams {
    listener: Option<TcpListener>,
    conns: HashMap<usize, Conn>,
    by_remote: HashMap<SocketAddr, usize>,
    next: usize,
    buf: Vec<u8>,
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl Streams {
    /// Over `listener` (None: this node accepts no TCP, and dials only).
    pub(crate) fn new(listener: Option<std::net::TcpListener>, registry: &Registry) -> Self {
        let listener = listener.and_then(|l| {
            l.set_nonblocking(true).ok()?;
            let mut l = TcpListener::from_std(l);
            registry
                .register(&mut l, LISTENER, Interest::READABLE)
                .ok()?;
            Some(l)
        });
        Self {
            listener,
            conns: HashMap::new(),
            by_remote: HashMap::new(),
            next: 1,
            buf: vec![0; 65_536],
        }
    }

    fn insert(
        &mut self,
        registry: &Registry,
        mut stream: TcpStream,
        remote: SocketAddr,
        now: Instant,
        connecting: bool,
    ) -> Option<usize> {
        let id = self.next;
        self.next += 1;
        registry
            .register(
                &mut stream,
                Token(STREAM | id),
                Interest::READABLE | Interest::WRITABLE,
            )
            .ok()?;
        let _ = stream.set_nodelay(true);
        if let Some(old) = self.by_remote.insert(remote, id) {
            self.close(registry, old);
        }
        self.conns.insert(
            id,
            Conn {
                stream,
                remote,
                frames: Frames::default(),
                out: Vec::new(),
                last_rx: now,
                connecting,
                outgoing: connecting,
            },
        );
        Some(id)
    }

    /// Accepts what waits on the listener; returns the refused count.
    pub(crate) fn accept(&mut self, registry: &Registry, now: Instant) -> u64 {
        let mut refused = 0;
        loop {
            let Some(l) = self.listener.as_ref() else {
                return refused;
            };
            match l.accept() {
                Ok((stream, remote)) => {
                    let remote = canonical(remote);
                    let from_there = self
                        .conns
                        .values()
                        .filter(|c| c.remote.ip() == remote.ip() && !c.outgoing)
                        .count();
                    if self.conns.len() >= MAX_STREAMS || from_there >= MAX_PER_SOURCE {
                        refused += 1;
                        continue;
                    }
                    if self.insert(registry, stream, remote, now, false).is_none() {
                        refused += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return refused,
            }
        }
    }

    /// Closes a connection.
    pub(crate) fn close(&mut self, registry: &Registry, id: usize) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = registry.deregister(&mut c.stream);
            if self.by_remote.get(&c.remote) == Some(&id) {
                self.by_remote.remove(&c.remote);
            }
        }
    }

    /// Writes what waits; false when the connection failed.
    fn flush(c: &mut Conn) -> bool {
        if c.connecting {
            match c.stream.peer_addr() {
                Ok(_) => c.connecting = false,
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    return !matches!(c.stream.take_error(), Ok(Some(_)) | Err(_));
                }
                Err(_) => return false,
            }
        }
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => return false,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends `datagram` to `remote` (connecting first when needed).
    pub(crate) fn send(
        &mut self,
        registry: &Registry,
        now: Instant,
        remote: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), &'static str> {
        let id = match self.by_remote.get(&remote) {
            Some(id) => *id,
            None => {
                if self.conns.len() >= MAX_STREAMS {
                    return Err("tcp_too_many");
                }
                let stream = TcpStream::connect(remote).map_err(|_| "tcp_connect")?;
                self.insert(registry, stream, remote, now, true)
                    .ok_or("tcp_connect")?
            }
        };
        let Some(c) = self.conns.get_mut(&id) else {
            return Err("tcp_connect");
        };
        if c.out.len() + datagram.len() + 2 > MAX_QUEUED {
            return Err("tcp_queue_full");
        }
        if !encode(datagram, &mut c.out) {
            return Err("tcp_too_large");
        }
        if Self::flush(c) {
            Ok(())
        } else {
            self.close(registry, id);
            Err("tcp_closed")
        }
    }

    /// Writes what waits and reads up to the budget on connection `id`.
    pub(crate) fn service(&mut self, registry: &Registry, now: Instant, id: usize) -> Serviced {
        let mut out = Serviced::default();
        let Some(c) = self.conns.get_mut(&id) else {
            out.drained = true;
            return out;
        };
        let mut failed = (!Self::flush(c)).then_some("tcp_closed");
        if c.connecting && failed.is_none() {
            out.drained = true;
            return out;
        }
        for _ in 0..READ_BUDGET {
            if failed.is_some() {
                break;
            }
            match c.stream.read(&mut self.buf) {
                Ok(0) => failed = Some("tcp_closed"),
                Ok(n) => {
                    c.last_rx = now;
                    c.frames.push(&self.buf[..n]);
                    loop {
                        match c.frames.next_frame() {
                            Ok(Some(d)) => out.datagrams.push((c.remote, d.to_vec())),
                            Ok(None) => break,
                            Err(_) => {
                                failed = Some("tcp_malformed");
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    out.drained = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => failed = Some("tcp_closed"),
            }
        }
        if let Some(why) = failed {
            self.close(registry, id);
            out.drained = true;
            out.closed = Some(why);
        }
        out
    }

    /// Closes the connections idle since [`IDLE`]; returns how many.
    pub(crate) fn expire(&mut self, registry: &Registry, now: Instant) -> u64 {
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.last_rx) >= IDLE)
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            self.close(registry, *id);
        }
        idle.len() as u64
    }
}
