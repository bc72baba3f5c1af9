//! WireGuard links over boringtun's `noise::Tunn`, and the demultiplexing of
//! the shared UDP socket, without I/O.
//!
//! Each link gets a 24-bit index; boringtun puts `index << 8` in the
//! receiver field of the packets it expects, so data, responses and cookie
//! replies find their link by `receiver >> 8`. A handshake initiation
//! carries no receiver: it is matched by the initiator's static key
//! (`parse_handshake_anon`), which must be the WireGuard key of a link we
//! set up (from the peer's certificate). Anything else is dropped and
//! counted.

use std::collections::HashMap;
use std::net::IpAddr;

use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::endpoint::Endpoint;
use crate::policy::Peer;

/// Room for a WireGuard datagram carrying a packet of up to 65535 bytes.
pub const BUF: usize = 65_535 + 32;

/// What to do with the result of a link operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this datagram to the link's endpoint.
    Network(Vec<u8>),
    /// Write this IP packet into the link's tun device.
    Tunnel(Vec<u8>),
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Drop {
    /// Not a WireGuard message.
    Malformed,
    /// No link for its receiver index or initiator key.
    UnknownLink,
    /// boringtun refused it (bad MAC, replay, ...).
    Refused,
    /// Handshake over the rate limit: answered with a cookie reply.
    UnderLoad,
}

impl Drop {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownLink => "unknownlink",
            Self::Refused => "refused",
            Self::UnderLoad => "underload",
        }
    }
}

/// Handshake messages per second before cookies are required.
pub const HANDSHAKES_PER_S: u64 = 100;

/// One WireGuard link.
pub struct Link {
    /// The peer's node prefix.
    pub peer: Peer,
    /// The peer's WireGuard public key (from its certificate).
    pub peer_key: [u8; 32],
    /// Where to send (updated to the source of authenticated packets).
    pub endpoint: Option<Endpoint>,
    tunn: Tunn,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn collect(r: TunnResult<'_>, out: &mut Vec<Output>) -> Result<bool, Drop> {
    match r {
        TunnResult::Done => Ok(false),
        TunnResult::Err(_) => Err(Drop::Refused),
        TunnResult::WriteToNetwork(b) => {
            out.push(Output::Network(b.to_vec()));
            Ok(true)
        }
        TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
            out.push(Output::Tunnel(b.to_vec()));
            Ok(false)
        }
    }
}

impl Link {
    /// A link to `peer` whose WireGuard key is `peer_key`; `keepalive` in
    /// seconds keeps NAT mappings open.
    pub fn new(
        secret: &[u8; 32],
        peer: Peer,
        peer_key: [u8; 32],
        index: u32,
        endpoint: Option<Endpoint>,
        keepalive: Option<u16>,
        limiter: Arc<RateLimiter>,
    ) -> Self {
        let tunn = Tunn::new(
            StaticSecret::from(*secret),
            PublicKey::from(peer_key),
            None,
            keepalive,
            index & 0x00ff_ffff,
            Some(limiter),
        );
        Self {
            peer,
            peer_key,
            endpoint,
            tunn,
        }
    }

    /// Encrypts an IP packet read from the tun device (or queues it while
    /// the handshake runs, and starts one).
    pub fn encapsulate(&mut self, packet: &[u8], buf: &mut [u8]) -> Option<Vec<u8>> {
        match self.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
            _ => None,
        }
    }

    /// Like [`Link::encapsulate`], writing into `out` (which must have room
    /// for the packet plus 32 bytes, and at least 148); returns the length.
    pub fn encapsulate_into(&mut self, packet: &[u8], out: &mut [u8]) -> Option<usize> {
        match self.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(b) => Some(b.len()),
            _ => None,
        }
    }

    /// Handles a datagram of this link from `src`.
    pub fn decapsulate(
        &mut self,
        src: Endpoint,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> Result<Vec<Output>, Drop> {
        let mut out = Vec::new();
        let more = collect(
            self.tunn.decapsulate(Some(src.addr.ip()), datagram, buf),
            &mut out,
        )?;
        // Authenticated: the peer is (now) there.
        self.endpoint = Some(src);
        if more {
            // Flush what was queued during the handshake.
            while collect(self.tunn.decapsulate(None, &[], buf), &mut out).unwrap_or(false) {}
        }
        Ok(out)
    }

    /// Runs boringtun's timers (handshake retries, rekeys, keepalives).
    /// Returns a datagram to send, and whether the link is dead.
    pub fn tick(&mut self, buf: &mut [u8]) -> (Option<Vec<u8>>, bool) {
        match self.tunn.update_timers(buf) {
            TunnResult::WriteToNetwork(b) => (Some(b.to_vec()), false),
            TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                (None, true)
            }
            _ => (None, false),
        }
    }

    /// Starts a handshake now.
    pub fn initiate(&mut self, buf: &mut [u8]) -> Option<Vec<u8>> {
        match self.tunn.format_handshake_initiation(buf, false) {
            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
            _ => None,
        }
    }

    /// Time since the last handshake, bytes sent and received.
    pub fn stats(&self) -> (Option<Duration>, u64, u64) {
        let (since, tx, rx, _, _) = self.tunn.stats();
        (since, tx as u64, rx as u64)
    }

    /// Whether a session is established (time since the last handshake).
    pub fn is_up(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

/// A link's WireGuard key is another peer's: two nodes cannot share one
/// (the registry refuses it; a link never takes over another's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this WireGuard key is {0}'s link")]
pub struct KeyInUse(pub Peer);

/// All links of a node, by index and by peer key.
pub struct Links {
    secret: [u8; 32],
    public: [u8; 32],
    by_index: HashMap<u32, Link>,
    by_key: HashMap<[u8; 32], u32>,
    limiter: Arc<RateLimiter>,
    /// What every link's `Tunn` checks handshakes with again: MAC1 only,
    /// never under load, as [`Links::receive`] has counted them already
    /// (sharing `limiter` counted each handshake twice and halved the
    /// limit; boringtun's own per-tunnel default is never reset here).
    mac_only: Arc<RateLimiter>,
    /// Dropped datagrams by reason.
    pub dropped: HashMap<Drop, u64>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("links", &self.by_index.len())
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Links of a node with this WireGuard secret.
    pub fn new(secret: [u8; 32]) -> Self {
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        Self {
            secret,
            public,
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            limiter: Arc::new(RateLimiter::new(&PublicKey::from(public), HANDSHAKES_PER_S)),
            mac_only: Arc::new(RateLimiter::new(&PublicKey::from(public), u64::MAX)),
            dropped: HashMap::new(),
        }
    }

    /// Our WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Adds a link with this index (24 bits, chosen by the caller);
    /// returns the index of the link to the same peer and key it
    /// replaces, if any. A key that another peer's link holds is refused:
    /// that link stays.
    pub fn add(
        &mut self,
        index: u32,
        peer: Peer,
        peer_key: [u8; 32],
        endpoint: Option<Endpoint>,
        keepalive: Option<u16>,
    ) -> Result<Option<u32>, KeyInUse> {
        let index = index & 0x00ff_ffff;
        if let Some(other) = self
            .by_key
            .get(&peer_key)
            .and_then(|i| self.by_index.get(i))
            .filter(|l| l.peer != peer)
        {
            return Err(KeyInUse(other.peer));
        }
        let replaced = self.by_key.remove(&peer_key);
        if let Some(old) = replaced {
            self.by_index.remove(&old);
        }
        if let Some(old) = self.by_index.remove(&index) {
            self.by_key.remove(&old.peer_key);
        }
        self.by_index.insert(
            index,
            Link::new(
                &self.secret,
                peer,
                peer_key,
                index,
                endpoint,
                keepalive,
                Arc::clone(&self.mac_only),
            ),
        );
        self.by_key.insert(peer_key, index);
        Ok(replaced.filter(|&old| old != index))
    }

    /// Removes a link.
    pub fn remove(&mut self, index: u32) -> Option<Link> {
        let l = self.by_index.remove(&index)?;
        self.by_key.remove(&l.peer_key);
        Some(l)
    }

    /// A link by index.
    pub fn get_mut(&mut self, index: u32) -> Option<&mut Link> {
        self.by_index.get_mut(&index)
    }

    /// Indices of all links.
    pub fn indices(&self) -> Vec<u32> {
        self.by_index.keys().copied().collect()
    }

    fn drop_count(&mut self, d: Drop) -> Drop {
        *self.dropped.entry(d).or_default() += 1;
        d
    }

    /// Finds the link a datagram from the shared socket belongs to.
    pub fn demux(&mut self, datagram: &[u8]) -> Result<u32, Drop> {
        let packet =
            Tunn::parse_incoming_packet(datagram).map_err(|_| self.drop_count(Drop::Malformed))?;
        let index = match packet {
            Packet::HandshakeInit(init) => {
                let secret = StaticSecret::from(self.secret);
                let public = PublicKey::from(self.public);
                let half = parse_handshake_anon(&secret, &public, &init)
                    .map_err(|_| self.drop_count(Drop::Refused))?;
                match self.by_key.get(&half.peer_static_public) {
                    Some(i) => *i,
                    None => return Err(self.drop_count(Drop::UnknownLink)),
                }
            }
            Packet::HandshakeResponse(p) => p.receiver_idx >> 8,
            Packet::PacketCookieReply(p) => p.receiver_idx >> 8,
            Packet::PacketData(p) => p.receiver_idx >> 8,
        };
        if self.by_index.contains_key(&index) {
            Ok(index)
        } else {
            Err(self.drop_count(Drop::UnknownLink))
        }
    }

    /// Starts a new rate-limiting period (call it every second).
    pub fn reset_rate(&self) {
        self.limiter.reset_count();
    }

    /// Demultiplexes and decapsulates a datagram from `src`. Handshake
    /// messages first pass the shared rate limiter: their MAC1 (keyed by our
    /// public key) is checked before any Diffie-Hellman work, and over
    /// [`HANDSHAKES_PER_S`] the sender must prove its address with a cookie
    /// (then the answer is a cookie reply, with link index 0).
    pub fn receive(
        &mut self,
        src: Endpoint,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> Result<(u32, Vec<Output>), Drop> {
        if matches!(datagram.first(), Some(1 | 2)) {
            match self
                .limiter
                .verify_packet(Some(src.addr.ip()), datagram, buf)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let reply = cookie.to_vec();
                    *self.dropped.entry(Drop::UnderLoad).or_default() += 1;
                    return Ok((0, vec![Output::Network(reply)]));
                }
                Err(_) => return Err(self.drop_count(Drop::Refused)),
            }
        }
        let index = self.demux(datagram)?;
        let link = self.by_index.get_mut(&index).ok_or(Drop::UnknownLink)?;
        match link.decapsulate(src, datagram, buf) {
            Ok(out) => Ok((index, out)),
            Err(d) => Err(self.drop_count(d)),
        }
    }
}

/// Whether a peer's announced endpoint may be dialled: not unspecified,
/// multicast, loopback or link-local (also IPv4-mapped). Private
/// addresses may be dialled: an operator announces them on purpose
/// (`--endpoint`) for a private underlay.
pub fn usable_endpoint(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => usable_v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => usable_v4(v4),
            None => {
                let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
                !(a.is_unspecified() || a.is_multicast() || a.is_loopback() || link_local)
            }
        },
    }
}

fn usable_v4(a: std::net::Ipv4Addr) -> bool {
    !(a.is_unspecified()
        || a.is_multicast()
        || a.is_loopback()
        || a.is_link_local()
        || a.is_broadcast())
}

/// Whether a detected address is worth announcing to other sites: a
/// [`usable_endpoint`], and not an IPv4 private (RFC 1918), shared (CGNAT,
/// RFC 6598) or reserved address, also when IPv4-mapped (behind NAT the
/// node's own address is no use elsewhere). IPv6 unique-local addresses
/// (`fd00::/8`) are kept: private underlays over a VPN or a lab use them,
/// and nothing tells their sites apart.
pub fn public_endpoint(ip: IpAddr) -> bool {
    let v4 = match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    usable_endpoint(ip)
        && v4.is_none_or(|a| {
            let o = a.octets();
            let shared = o[0] == 100 && o[1] & 0xc0 == 64;
            let reserved = o[0] == 0 || o[0] >= 240;
            !(a.is_private() || shared || reserved)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_other_sites_can_reach_are_announced() {
        let yes = [
            "198.18.0.2",
            "203.0.113.7",
            "fd00::2",
            "2001:db8::1",
            "::ffff:198.18.1.2",
        ];
        let no = [
            "0.0.0.0",
            "127.0.0.1",
            "169.254.1.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:100.64.1.1",
        ];
        let ip = |a: &str| a.parse().unwrap_or(IpAddr::from([0u8; 4]));
        for a in yes {
            assert!(public_endpoint(ip(a)), "{a}");
        }
        for a in no {
            assert!(!public_endpoint(ip(a)), "{a}");
        }
        assert!(public_endpoint(ip("100.128.0.1")));
        // Dialled when a peer announces them on purpose; junk never.
        for a in ["10.1.2.3", "100.64.0.1", "192.168.1.1", "::ffff:10.0.0.1"] {
            assert!(usable_endpoint(ip(a)), "{a}");
        }
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "ff02::1",
            "224.0.0.1",
        ] {
            assert!(!usable_endpoint(ip(a)), "{a}");
        }
    }

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn public(secret: [u8; 32]) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(secret)).to_bytes()
    }

    fn peer(i: u16) -> Peer {
        Peer::new(std::net::Ipv6Addr::new(0xfd00, 0, 0, i, 0, 0, 0, 0), 64).unwrap_or_default()
    }

    /// A minimal IPv6 packet (header only).
    fn ip6(payload_tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = 59; // no next header
        p[7] = 64;
        p[8] = 0xfe;
        p[9] = 0x80;
        p[23] = 1;
        p[24] = 0xfe;
        p[25] = 0x80;
        p[39] = payload_tag;
        p
    }

    #[test]
    fn handshake_and_data_through_the_demux() {
        let (sa, sb) = (key(1), key(2));
        let mut a = Links::new(sa);
        let mut b = Links::new(sb);
        let (addr_a, addr_b) = (
            Endpoint::udp("198.18.1.2:326".parse().unwrap_or_else(|_| panic!())),
            Endpoint::udp("198.18.2.2:326".parse().unwrap_or_else(|_| panic!())),
        );
        let ia = 1;
        a.add(ia, peer(2), public(sb), Some(addr_b), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let ib = 1;
        b.add(ib, peer(1), public(sa), None, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; BUF];
        // a sends a packet: queued, a handshake initiation goes out.
        let init = a
            .get_mut(ia)
            .and_then(|l| l.encapsulate(&ip6(7), &mut buf))
            .unwrap_or_default();
        assert!(!init.is_empty());
        // b demuxes the initiation by a's static key and answers.
        let (idx, out) = b
            .receive(addr_a, &init, &mut buf)
            .unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(idx, ib);
        let resp = match &out[..] {
            [Output::Network(r)] => r.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            b.get_mut(ib).and_then(|l| l.endpoint),
            Some(addr_a),
            "endpoint learned"
        );
        // a receives the response: the queued packet goes out encrypted.
        let (idx, out) = a
            .receive(addr_b, &resp, &mut buf)
            .unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(idx, ia);
        let data: Vec<Vec<u8>> = out
            .into_iter()
            .filter_map(|o| match o {
                Output::Network(d) => Some(d),
                Output::Tunnel(_) => None,
            })
            .collect();
        assert!(!data.is_empty());
        let mut got = Vec::new();
        for d in data {
            let (_, out) = b
                .receive(addr_a, &d, &mut buf)
                .unwrap_or_else(|d| panic!("{d:?}"));
            got.extend(out);
        }
        assert!(got.contains(&Output::Tunnel(ip6(7))), "{got:?}");
        assert!(a.get_mut(ia).is_some_and(|l| l.is_up()));
    }

    #[test]
    fn handshake_floods_get_cookie_replies() {
        let (sb, sc) = (key(2), key(3));
        let mut b = Links::new(sb);
        let mut c = Links::new(sc);
        let addr = Endpoint::udp("198.18.9.9:326".parse().unwrap_or_else(|_| panic!()));
        let mut buf = vec![0u8; BUF];
        let mut cookies = 0;
        for _ in 0..(HANDSHAKES_PER_S as usize + 50) {
            // A new link each time: a flood of fresh initiations.
            let ic = 7;
            c.add(ic, peer(2), public(sb), Some(addr), None)
                .unwrap_or_else(|e| panic!("{e}"));
            let init = c
                .get_mut(ic)
                .and_then(|l| l.initiate(&mut buf))
                .unwrap_or_default();
            let mut scratch = vec![0u8; BUF];
            if let Ok((0, out)) = b.receive(addr, &init, &mut scratch) {
                if let [Output::Network(r)] = &out[..] {
                    assert_eq!(r[0], 3, "a cookie reply");
                    cookies += 1;
                }
            }
        }
        assert!(cookies >= 40, "{cookies} cookie replies under a flood");
        assert_eq!(b.dropped.get(&Drop::UnderLoad).copied(), Some(cookies));
        b.reset_rate();
    }

    /// Handshakes for a known link are counted once: up to the limit
    /// per period pass without cookies (they were counted twice, by the
    /// demux and by the link's `Tunn`, so half of them did).
    #[test]
    fn handshakes_of_known_links_count_once() {
        let (sb, sc) = (key(2), key(3));
        let mut b = Links::new(sb);
        let mut c = Links::new(sc);
        let addr = Endpoint::udp("198.18.9.9:326".parse().unwrap_or_else(|_| panic!()));
        b.add(1, peer(3), public(sc), None, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; BUF];
        let mut answered = 0;
        for _ in 0..(HANDSHAKES_PER_S as usize * 9 / 10) {
            c.add(7, peer(2), public(sb), Some(addr), None)
                .unwrap_or_else(|e| panic!("{e}"));
            let init = c
                .get_mut(7)
                .and_then(|l| l.initiate(&mut buf))
                .unwrap_or_default();
            let mut scratch = vec![0u8; BUF];
            if let Ok((1, out)) = b.receive(addr, &init, &mut scratch) {
                if let [Output::Network(r)] = &out[..] {
                    assert_eq!(r[0], 2, "a handshake response");
                    answered += 1;
                }
            }
        }
        assert_eq!(b.dropped.get(&Drop::UnderLoad), None);
        assert_eq!(answered, HANDSHAKES_PER_S as usize * 9 / 10);
    }

    /// A second peer presenting a key another peer's link holds gets no
    /// link, and the first link stays; the same peer replaces its own.
    #[test]
    fn a_link_never_takes_another_peers_key() {
        let (sa, sb) = (key(1), key(2));
        let mut a = Links::new(sa);
        assert_eq!(a.add(1, peer(2), public(sb), None, None), Ok(None));
        assert_eq!(
            a.add(2, peer(3), public(sb), None, None),
            Err(KeyInUse(peer(2)))
        );
        assert_eq!(a.indices(), vec![1]);
        assert_eq!(a.get_mut(1).map(|l| l.peer), Some(peer(2)));
        assert_eq!(a.add(5, peer(2), public(sb), None, None), Ok(Some(1)));
        assert_eq!(a.indices(), vec![5]);
    }

    #[test]
    fn strangers_and_garbage_are_dropped_and_counted() {
        let (sa, sb, sc) = (key(1), key(2), key(3));
        let a = Links::new(sa);
        let mut b = Links::new(sb);
        let mut c = Links::new(sc);
        let addr = Endpoint::udp("198.18.9.9:326".parse().unwrap_or_else(|_| panic!()));
        let mut buf = vec![0u8; BUF];
        // b only knows a; c (another key) tries to talk to b.
        b.add(1, peer(1), public(sa), None, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let ic = 7;
        c.add(ic, peer(2), public(sb), Some(addr), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let init = c
            .get_mut(ic)
            .and_then(|l| l.initiate(&mut buf))
            .unwrap_or_default();
        assert_eq!(b.receive(addr, &init, &mut buf), Err(Drop::UnknownLink));
        for junk in [
            &b""[..],
            b"\x04\x00\x00\x00short",
            &[0xffu8; 200][..],
            b"R6T1\x01{}",
        ] {
            assert!(b.receive(addr, junk, &mut buf).is_err());
        }
        // A data packet for an index we do not have.
        let mut fake = vec![4u8, 0, 0, 0];
        fake.extend_from_slice(&(77u32 << 8).to_le_bytes());
        fake.extend_from_slice(&[0u8; 40]);
        assert_eq!(b.receive(addr, &fake, &mut buf), Err(Drop::UnknownLink));
        assert!(b.dropped.values().sum::<u64>() >= 5);
        let _ = a.public_key();
    }
}
