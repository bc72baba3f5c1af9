//! The TCP transport's connections, owned by the reactor: a listener on
//! the node's port and one connection per peer address, each carrying
//! frames ([`crate::stream`]) both ways. A connection is made on the
//! first datagram for an address that has none; an idle one (nothing
//! read for [`IDLE`]) is closed, as is one that sends an empty frame or
//! fails. Bounded: [`MAX_STREAMS`] connections, [`MAX_PER_SOURCE`]
//! incoming ones per address, [`MAX_QUEUED`] bytes waiting to be written
//! on each.

use std::collections::{HashMap, HashSet, VecDeque};
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
/// Sources of accepted connections remembered, at most.
const ACCEPTED_MEMORY: usize = 4096;

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
    /// Sources of connections we accepted (a peer's ephemeral port):
    /// never dialled when their connection is gone; the peer reconnects.
    accepted: HashSet<SocketAddr>,
    accepted_order: VecDeque<SocketAddr>,
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
            accepted: HashSet::new(),
            accepted_order: VecDeque::new(),
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
                    if self.accepted.insert(remote) {
                        self.accepted_order.push_back(remote);
                        if self.accepted_order.len() > ACCEPTED_MEMORY {
                            if let Some(old) = self.accepted_order.pop_front() {
                                self.accepted.remove(&old);
                            }
                        }
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
                if self.accepted.contains(&remote) {
                    return Err("tcp_gone");
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};

    /// Loopback only, as the registry's API tests: no namespace needed.
    #[test]
    fn an_accepted_source_is_never_dialled_back() {
        let mut poll = Poll::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let mut streams = Streams::new(Some(listener), poll.registry());
        let client = std::net::TcpStream::connect(at).unwrap();
        let remote = client.local_addr().unwrap();
        let now = Instant::now();
        let mut events = Events::with_capacity(8);
        let mut accepted = false;
        for _ in 0..50 {
            poll.poll(&mut events, Some(Duration::from_millis(20)))
                .unwrap();
            streams.accept(poll.registry(), now);
            if streams.by_remote.contains_key(&remote) {
                accepted = true;
                break;
            }
        }
        assert!(accepted, "the connection was accepted");
        drop(client);
        let id = streams.by_remote[&remote];
        let mut closed = None;
        for _ in 0..50 {
            poll.poll(&mut events, Some(Duration::from_millis(20)))
                .unwrap();
            closed = streams.service(poll.registry(), now, id).closed;
            if closed.is_some() {
                break;
            }
        }
        assert_eq!(closed, Some("tcp_closed"));
        assert_eq!(
            streams.send(poll.registry(), now, remote, b"x"),
            Err("tcp_gone")
        );
        assert!(streams.conns.is_empty(), "nothing was dialled");
    }
}
