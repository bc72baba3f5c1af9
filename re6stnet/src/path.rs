//! `re6stctl path` and `re6stctl ping`: the overlay path to a destination
//! hop by hop, as `mtr` finds it: ICMPv6 Echo Requests from the node's
//! overlay address with growing hop limits; each relay answers Time
//! Exceeded from its own overlay address (the preferred source of its
//! overlay routes), the destination an Echo Reply. Needs a raw ICMPv6
//! socket (root or `CAP_NET_RAW`).
//!
//! [`parse`] reads what comes back (untrusted: any ICMPv6 message the host
//! receives) and never panics; [`Tracer`] only moves packets and time.

use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
const DEST_UNREACHABLE: u8 = 1;
const TIME_EXCEEDED: u8 = 3;
const IPV6_HEADER: usize = 40;
const NEXT_HEADER_ICMPV6: u8 = 58;
/// Bytes after the Echo header: enough to tell our probes apart.
const PAYLOAD: &[u8; 8] = b"re6stctl";

/// What an ICMPv6 message says about one of our probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A router on the way: the probe's hop limit ran out there.
    Hop(u16),
    /// The destination answered.
    Reached(u16),
    /// A router says the destination cannot be reached (ICMPv6 code).
    Unreachable(u16, u8),
}

/// An Echo Request of ours (the kernel fills in the checksum).
pub fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![ECHO_REQUEST, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    p
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Our probe's sequence number in `message` (an ICMPv6 message as a raw
/// socket returns it), if it answers one of ours (`ident`).
pub fn parse(message: &[u8], ident: u16) -> Option<Answer> {
    let kind = *message.first()?;
    if kind == ECHO_REPLY {
        return (u16_at(message, 4)? == ident).then_some(Answer::Reached(u16_at(message, 6)?));
    }
    if kind != TIME_EXCEEDED && kind != DEST_UNREACHABLE {
        return None;
    }
    // The invoking packet: our IPv6 header, then our Echo Request.
    let inner = message.get(8..)?;
    let header = inner.get(..IPV6_HEADER)?;
    if header[0] >> 4 != 6 || header[6] != NEXT_HEADER_ICMPV6 {
        return None;
    }
    let echo = inner.get(IPV6_HEADER..)?;
    if *echo.first()? != ECHO_REQUEST || u16_at(echo, 4)? != ident {
        return None;
    }
    let seq = u16_at(echo, 6)?;
    Some(if kind == TIME_EXCEEDED {
        Answer::Hop(seq)
    } else {
        Answer::Unreachable(seq, *message.get(1)?)
    })
}

/// One probe's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Who answered.
    pub from: Ipv6Addr,
    /// After how long.
    pub rtt: Duration,
    /// What it said.
    pub answer: Answer,
}

/// Sends probes from one address and waits for their answers.
pub struct Tracer {
    socket: Socket,
    dst: SockAddr,
    ident: u16,
    seq: u16,
}

impl Tracer {
    /// A raw ICMPv6 socket bound to `src`, probing `dst`.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> std::io::Result<Self> {
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        socket.bind(&SockAddr::from(SocketAddrV6::new(src, 0, 0, 0)))?;
        Ok(Self {
            socket,
            dst: SockAddr::from(SocketAddrV6::new(dst, 0, 0, 0)),
            ident: (std::process::id() & 0xffff) as u16,
            seq: 0,
        })
    }

    /// One probe with hop limit `hops`; None when nothing answered it
    /// within `timeout`.
    pub fn probe(&mut self, hops: u32, timeout: Duration) -> std::io::Result<Option<Reply>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.set_unicast_hops_v6(hops)?;
        let sent = Instant::now();
        self.socket
            .send_to(&echo_request(self.ident, seq), &self.dst)?;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1280];
        loop {
            let left = timeout.saturating_sub(sent.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: recv_from initialised the first `n` bytes.
            let bytes: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let Some(answer) = parse(&bytes, self.ident) else {
                continue;
            };
            let this = match answer {
                Answer::Hop(s) | Answer::Reached(s) | Answer::Unreachable(s, _) => s,
            };
            if this != seq {
                continue;
            }
            let Some(from) = from.as_socket_ipv6().map(|a| *a.ip()) else {
                continue;
            };
            return Ok(Some(Reply {
                from,
                rtt: sent.elapsed(),
                answer,
            }));
        }
    }
}

/// Statistics of the probes of one hop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HopStats {
    /// Who answered (the first one; None: nobody).
    pub from: Option<Ipv6Addr>,
    /// Probes sent.
    pub sent: u32,
    /// Round-trip times of the answered ones.
    pub rtts: Vec<Duration>,
    /// The destination answered at this hop.
    pub reached: bool,
    /// A router said the destination is unreachable.
    pub unreachable: bool,
}

impl HopStats {
    /// Adds one probe's outcome.
    pub fn add(&mut self, r: Option<Reply>) {
        self.sent += 1;
        let Some(r) = r else { return };
        self.from.get_or_insert(r.from);
        self.rtts.push(r.rtt);
        match r.answer {
            Answer::Reached(_) => self.reached = true,
            Answer::Unreachable(..) => self.unreachable = true,
            Answer::Hop(_) => {}
        }
    }

    /// Share of probes without answer.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - self.rtts.len() as f64 / f64::from(self.sent)
    }

    /// Average, best and worst RTT.
    pub fn rtt(&self) -> Option<(Duration, Duration, Duration)> {
        let (min, max) = (self.rtts.iter().min()?, self.rtts.iter().max()?);
        let avg = self.rtts.iter().sum::<Duration>() / self.rtts.len() as u32;
        Some((avg, *min, *max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn invoking(ident: u16, seq: u16) -> Vec<u8> {
        let mut ip = vec![0u8; IPV6_HEADER];
        ip[0] = 0x60;
        ip[6] = NEXT_HEADER_ICMPV6;
        ip.extend(echo_request(ident, seq));
        ip
    }

    #[test]
    fn answers_to_our_probes_are_recognised() {
        let mut reply = echo_request(7, 3);
        reply[0] = ECHO_REPLY;
        assert_eq!(parse(&reply, 7), Some(Answer::Reached(3)));
        assert_eq!(parse(&reply, 8), None, "another process's");
        let mut exceeded = vec![TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0];
        exceeded.extend(invoking(7, 4));
        assert_eq!(parse(&exceeded, 7), Some(Answer::Hop(4)));
        assert_eq!(parse(&exceeded, 9), None);
        let mut unreachable = vec![DEST_UNREACHABLE, 0, 0, 0, 0, 0, 0, 0];
        unreachable.extend(invoking(7, 5));
        assert_eq!(parse(&unreachable, 7), Some(Answer::Unreachable(5, 0)));
    }

    #[test]
    fn other_messages_and_truncated_ones_are_not() {
        assert_eq!(parse(&echo_request(7, 3), 7), None, "a request");
        let mut exceeded = vec![TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0];
        exceeded.extend(invoking(7, 4));
        for n in 0..exceeded.len() - PAYLOAD.len() {
            assert_eq!(parse(&exceeded[..n], 7), None, "cut at {n}");
        }
        let mut udp = exceeded.clone();
        udp[8 + 6] = 17;
        assert_eq!(parse(&udp, 7), None, "not an ICMPv6 probe");
    }

    #[test]
    fn hop_statistics() {
        let mut h = HopStats::default();
        let at = |ms| Reply {
            from: Ipv6Addr::LOCALHOST,
            rtt: Duration::from_millis(ms),
            answer: Answer::Hop(1),
        };
        h.add(Some(at(10)));
        h.add(None);
        h.add(Some(at(30)));
        assert_eq!(h.sent, 3);
        assert!((h.loss() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(
            h.rtt(),
            Some((
                Duration::from_millis(20),
                Duration::from_millis(10),
                Duration::from_millis(30)
            ))
        );
        assert!(!h.reached && h.from == Some(Ipv6Addr::LOCALHOST));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), ident: u16) {
            let _ = parse(&bytes, ident);
        }
    }
}
