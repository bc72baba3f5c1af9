//! A protocol served in process on the links' link-local UDP port: the
//! node's Babel router, which the reactor feeds decrypted datagrams and
//! whose output it encrypts, without a kernel socket or a tun round trip
//! on the way. Kernel sockets of other interfaces (LANs) can be handed to
//! the reactor too; their datagrams reach the same protocol.

use std::net::Ipv6Addr;
use std::time::Instant;

/// A datagram the protocol sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Out of the interface with this kernel index (a link's tun device,
    /// or a socket handed to the reactor).
    pub ifindex: u32,
    /// To this link-local or link-scope multicast address.
    pub dst: Ipv6Addr,
    /// The UDP payload.
    pub bytes: Vec<u8>,
}

/// What the reactor drives (sans-IO: time is passed in).
pub trait InProcess: Send + 'static {
    /// The UDP port served (both ends).
    fn port(&self) -> u16;
    /// Whether datagrams on the interface `ifindex` are for us (else they
    /// go to the tun device like any packet).
    fn serves(&self, ifindex: u32) -> bool;
    /// A datagram from `src` on `ifindex`, received by the kernel at
    /// `rx_time`, handled at `now`.
    fn handle_datagram(
        &mut self,
        now: Instant,
        rx_time: Instant,
        ifindex: u32,
        src: Ipv6Addr,
        payload: &[u8],
    );
    /// Time passed.
    fn handle_timeout(&mut self, now: Instant);
    /// When [`InProcess::handle_timeout`] is next due.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next datagram to send.
    fn poll_transmit(&mut self) -> Option<Transmit>;
}

/// No protocol in process: every packet goes to the tun devices.
impl InProcess for () {
    fn port(&self) -> u16 {
        0
    }
    fn serves(&self, _: u32) -> bool {
        false
    }
    fn handle_datagram(&mut self, _: Instant, _: Instant, _: u32, _: Ipv6Addr, _: &[u8]) {}
    fn handle_timeout(&mut self, _: Instant) {}
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        None
    }
}
