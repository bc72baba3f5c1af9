//! The Babel wire format (RFC 8966 §4, RFC 8967 MAC/PC/challenge TLVs,
//! RFC 9616 timestamp sub-TLVs, RFC 9079 source-prefix sub-TLV).
//!
//! [`parse`] turns a UDP payload into a [`Packet`] of [`Tlv`]s with the
//! packet-scoped parser state (default prefixes, router-id, next hop)
//! already applied, so every Update carries its full prefix and router-id.
//! It never panics: a packet whose structure is broken (bad header, a TLV
//! running past the end) is an error; a TLV that is well framed but makes no
//! sense (bad AE, impossible prefix) becomes [`Tlv::Malformed`] and the rest
//! of the packet is still read. TLVs with an unknown mandatory sub-TLV are
//! dropped (counted in [`Packet::ignored`]) after updating the parser state,
//! as RFC 8966 §4.4 says. Unknown TLV types are skipped.
//!
//! [`PacketWriter`] builds packets: it emits Router-Id TLVs as needed and
//! compresses Update prefixes against the packet's default prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// First byte of every packet.
pub const MAGIC: u8 = 42;
/// Protocol version.
pub const VERSION: u8 = 2;
/// The infinite metric (a retraction).
pub const INFINITY: u16 = 0xFFFF;
/// Babel's UDP port.
pub const PORT: u16 = 6696;
/// Link-local multicast group of Babel.
pub const MULTICAST: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 6);
/// The U (unicast) flag of a Hello.
pub const HELLO_UNICAST: u16 = 0x8000;
/// Update flag: this prefix becomes the default prefix for its AE.
pub const FLAG_DEFAULT_PREFIX: u8 = 0x80;
/// Update flag: the router-id is the low 8 bytes of the prefix.
pub const FLAG_ROUTER_ID: u8 = 0x40;

/// TLV type numbers.
pub mod kind {
    /// Pad1.
    pub const PAD1: u8 = 0;
    /// PadN.
    pub const PADN: u8 = 1;
    /// Acknowledgment Request.
    pub const ACK_REQ: u8 = 2;
    /// Acknowledgment.
    pub const ACK: u8 = 3;
    /// Hello.
    pub const HELLO: u8 = 4;
    /// IHU.
    pub const IHU: u8 = 5;
    /// Router-Id.
    pub const ROUTER_ID: u8 = 6;
    /// Next Hop.
    pub const NEXT_HOP: u8 = 7;
    /// Update.
    pub const UPDATE: u8 = 8;
    /// Route Request.
    pub const ROUTE_REQUEST: u8 = 9;
    /// Seqno Request.
    pub const SEQNO_REQUEST: u8 = 10;
    /// MAC (RFC 8967).
    pub const MAC: u8 = 16;
    /// PC (RFC 8967).
    pub const PC: u8 = 17;
    /// Challenge Request (RFC 8967).
    pub const CHALLENGE_REQUEST: u8 = 18;
    /// Challenge Reply (RFC 8967).
    pub const CHALLENGE_REPLY: u8 = 19;
    /// Sub-TLV: timestamp (RFC 9616).
    pub const SUB_TIMESTAMP: u8 = 3;
    /// Sub-TLV: source prefix (RFC 9079, mandatory).
    pub const SUB_SOURCE_PREFIX: u8 = 128;
}

/// Address encodings.
pub mod ae {
    /// Wildcard: no address.
    pub const WILDCARD: u8 = 0;
    /// IPv4.
    pub const IPV4: u8 = 1;
    /// IPv6.
    pub const IPV6: u8 = 2;
    /// Link-local IPv6: the 8-byte interface id, fe80::/64 implied.
    pub const LINK_LOCAL: u8 = 3;
    /// IPv4 prefix with an IPv6 next hop (RFC 9229).
    pub const V4_VIA_V6: u8 = 4;
}

/// A packet that cannot be read at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the 4-byte header.
    #[error("packet shorter than its header")]
    TooShort,
    /// Not 42.
    #[error("bad magic {0}")]
    BadMagic(u8),
    /// Not version 2.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Body length beyond the datagram.
    #[error("body length {0} exceeds the datagram")]
    BodyTooLong(usize),
    /// A TLV runs past the end of its section.
    #[error("TLV at offset {0} is truncated")]
    Truncated(usize),
}

/// One TLV, parsed, with the packet's parser state applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tlv {
    /// Pad1.
    Pad1,
    /// PadN of this many bytes.
    PadN(u8),
    /// Acknowledgment Request.
    AckReq {
        /// Echoed in the Ack.
        opaque: u16,
        /// Centiseconds.
        interval: u16,
    },
    /// Acknowledgment.
    Ack {
        /// From the request.
        opaque: u16,
    },
    /// Hello.
    Hello {
        /// All flags (U = 0x8000).
        flags: u16,
        /// Hello seqno.
        seqno: u16,
        /// Centiseconds; 0 for an unscheduled Hello.
        interval: u16,
        /// RFC 9616 transmit timestamp, microseconds.
        timestamp: Option<u32>,
    },
    /// I Heard You.
    Ihu {
        /// The AE it was sent with.
        ae: u8,
        /// Cost of receiving from the addressee.
        rxcost: u16,
        /// Centiseconds.
        interval: u16,
        /// The addressee (None: AE 0, anyone).
        address: Option<IpAddr>,
        /// RFC 9616: (origin, receive), microseconds.
        timestamp: Option<(u32, u32)>,
    },
    /// Router-Id (sets the parser state; Updates carry it too).
    RouterId([u8; 8]),
    /// Next Hop (sets the parser state; Updates carry it too).
    NextHop {
        /// The AE it was sent with.
        ae: u8,
        /// The next hop.
        address: IpAddr,
    },
    /// Update, with its full prefix and the router-id in force.
    Update {
        /// AE as sent.
        ae: u8,
        /// Flags as sent.
        flags: u8,
        /// Bytes omitted as sent.
        omitted: u8,
        /// Centiseconds.
        interval: u16,
        /// Source seqno.
        seqno: u16,
        /// Metric; [`INFINITY`] retracts.
        metric: u16,
        /// The prefix (None: AE 0 wildcard retraction).
        prefix: Option<IpNet>,
        /// RFC 9079 source prefix.
        src_prefix: Option<IpNet>,
        /// The originator, if known at this point of the packet.
        router_id: Option<[u8; 8]>,
        /// A Next Hop TLV in force (else the packet's source).
        next_hop: Option<IpAddr>,
    },
    /// Route Request.
    RouteRequest {
        /// AE as sent.
        ae: u8,
        /// The prefix (None: wildcard, the whole table).
        prefix: Option<IpNet>,
        /// RFC 9079 source prefix.
        src_prefix: Option<IpNet>,
    },
    /// Seqno Request.
    SeqnoRequest {
        /// AE as sent.
        ae: u8,
        /// Requested seqno.
        seqno: u16,
        /// Remaining hops.
        hop_count: u8,
        /// The source's router-id.
        router_id: [u8; 8],
        /// The prefix.
        prefix: IpNet,
        /// RFC 9079 source prefix.
        src_prefix: Option<IpNet>,
    },
    /// MAC (RFC 8967), normally in the trailer.
    Mac(Vec<u8>),
    /// Packet counter and index (RFC 8967).
    Pc {
        /// The counter.
        pc: u32,
        /// The index.
        index: Vec<u8>,
    },
    /// Challenge Request (RFC 8967).
    ChallengeRequest(Vec<u8>),
    /// Challenge Reply (RFC 8967).
    ChallengeReply(Vec<u8>),
    /// A known TLV whose contents make no sense; skipped.
    Malformed {
        /// Its type.
        kind: u8,
        /// Why.
        reason: &'static str,
    },
    /// An unknown TLV type; skipped.
    Unknown {
        /// Its type.
        kind: u8,
        /// Its length.
        len: u8,
    },
}

/// A parsed packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// TLVs of the body, in order.
    pub body: Vec<Tlv>,
    /// TLVs after the body length (RFC 8967 MACs).
    pub trailer: Vec<Tlv>,
    /// Length of header + body: the bytes a MAC covers.
    pub body_end: usize,
    /// TLVs dropped for an unknown mandatory sub-TLV.
    pub ignored: usize,
}

#[derive(Default)]
struct State {
    default_v4: Option<[u8; 4]>,
    default_v6: Option<[u8; 16]>,
    router_id: Option<[u8; 8]>,
    next_hop_v4: Option<IpAddr>,
    next_hop_v6: Option<IpAddr>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parsed sub-TLVs of interest.
#[derive(Default)]
struct Subs {
    timestamp: Option<Vec<u8>>,
    src_prefix: Option<(u8, Vec<u8>)>,
    unknown_mandatory: bool,
    malformed: Option<&'static str>,
}

fn parse_subs(b: &[u8]) -> Subs {
    let mut s = Subs::default();
    let mut i = 0;
    while i < b.len() {
        let t = b[i];
        if t == 0 {
            i += 1;
            continue;
        }
        if i + 2 > b.len() || i + 2 + usize::from(b[i + 1]) > b.len() {
            s.malformed = Some("truncated sub-TLV");
            return s;
        }
        let v = &b[i + 2..i + 2 + usize::from(b[i + 1])];
        match t {
            1 => {}
            kind::SUB_TIMESTAMP => s.timestamp = Some(v.to_vec()),
            kind::SUB_SOURCE_PREFIX => {
                if s.src_prefix.is_some() {
                    s.malformed = Some("more than one source prefix");
                } else if let Some((&plen, rest)) = v.split_first() {
                    s.src_prefix = Some((plen, rest.to_vec()));
                } else {
                    s.malformed = Some("empty source prefix");
                }
            }
            t if t >= 128 => s.unknown_mandatory = true,
            _ => {}
        }
        i += 2 + v.len();
    }
    s
}

/// A prefix of `plen` bits from `bytes` (no compression), for `ae`.
fn plain_prefix(ae: u8, plen: u8, bytes: &[u8]) -> Result<IpNet, &'static str> {
    let need = usize::from(plen).div_ceil(8);
    if bytes.len() < need {
        return Err("prefix shorter than its length");
    }
    match ae {
        ae::IPV4 | ae::V4_VIA_V6 => {
            if plen > 32 {
                return Err("IPv4 prefix longer than 32");
            }
            let mut a = [0u8; 4];
            a[..need].copy_from_slice(&bytes[..need]);
            Ipv4Net::new(Ipv4Addr::from(a), plen)
                .map(|n| IpNet::V4(n.trunc()))
                .map_err(|_| "bad IPv4 prefix")
        }
        ae::IPV6 => {
            if plen > 128 {
                return Err("IPv6 prefix longer than 128");
            }
            let mut a = [0u8; 16];
            a[..need].copy_from_slice(&bytes[..need]);
            Ipv6Net::new(Ipv6Addr::from(a), plen)
                .map(|n| IpNet::V6(n.trunc()))
                .map_err(|_| "bad IPv6 prefix")
        }
        _ => Err("AE not allowed here"),
    }
}

fn src_prefix_of(ae: u8, subs: &Subs) -> Result<Option<IpNet>, &'static str> {
    match &subs.src_prefix {
        None => Ok(None),
        Some((0, _)) => Err("source prefix of length 0"),
        Some((plen, bytes)) => plain_prefix(ae, *plen, bytes).map(Some),
    }
}

fn link_local(id: &[u8]) -> IpAddr {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8..16].copy_from_slice(&id[..8]);
    IpAddr::V6(Ipv6Addr::from(a))
}

/// An address (not a prefix) for `ae`, and its length in bytes.
fn address(ae: u8, b: &[u8]) -> Result<(Option<IpAddr>, usize), &'static str> {
    let need = match ae {
        ae::WILDCARD => 0,
        ae::IPV4 => 4,
        ae::IPV6 => 16,
        ae::LINK_LOCAL => 8,
        _ => return Err("unknown AE"),
    };
    if b.len() < need {
        return Err("address truncated");
    }
    let addr = match ae {
        ae::IPV4 => Some(IpAddr::from(
            <[u8; 4]>::try_from(&b[..4]).map_err(|_| "address")?,
        )),
        ae::IPV6 => Some(IpAddr::from(
            <[u8; 16]>::try_from(&b[..16]).map_err(|_| "address")?,
        )),
        ae::LINK_LOCAL => Some(link_local(b)),
        _ => None,
    };
    Ok((addr, need))
}

fn parse_tlv(t: u8, v: &[u8], st: &mut State, ignored: &mut usize) -> Option<Tlv> {
    let bad = |reason| Some(Tlv::Malformed { kind: t, reason });
    match t {
        kind::PADN => Some(Tlv::PadN(v.len() as u8)),
        kind::ACK_REQ => {
            if v.len() < 6 {
                return bad("short");
            }
            Some(Tlv::AckReq {
                opaque: be16(v, 2),
                interval: be16(v, 4),
            })
        }
        kind::ACK => {
            if v.len() < 2 {
                return bad("short");
            }
            Some(Tlv::Ack { opaque: be16(v, 0) })
        }
        kind::HELLO => {
            if v.len() < 6 {
                return bad("short");
            }
            let subs = parse_subs(&v[6..]);
            if let Some(r) = subs.malformed {
                return bad(r);
            }
            if subs.unknown_mandatory {
                *ignored += 1;
                return None;
            }
            let timestamp = match subs.timestamp.as_deref() {
                Some(ts) if ts.len() >= 4 => Some(be32(ts, 0)),
                _ => None,
            };
            Some(Tlv::Hello {
                flags: be16(v, 0),
                seqno: be16(v, 2),
                interval: be16(v, 4),
                timestamp,
            })
        }
        kind::IHU => {
            if v.len() < 6 {
                return bad("short");
            }
            let ae = v[0];
            let (address, alen) = match address(ae, &v[6..]) {
                Ok(x) => x,
                Err(r) => return bad(r),
            };
            let subs = parse_subs(&v[6 + alen..]);
            if let Some(r) = subs.malformed {
                return bad(r);
            }
            if subs.unknown_mandatory {
                *ignored += 1;
                return None;
            }
            let timestamp = match subs.timestamp.as_deref() {
                Some(ts) if ts.len() >= 8 => Some((be32(ts, 0), be32(ts, 4))),
                _ => None,
            };
            Some(Tlv::Ihu {
                ae,
                rxcost: be16(v, 2),
                interval: be16(v, 4),
                address,
                timestamp,
            })
        }
        kind::ROUTER_ID => {
            if v.len() < 10 {
                return bad("short");
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&v[2..10]);
            if id == [0; 8] || id == [0xff; 8] {
                st.router_id = None;
                return bad("invalid router-id");
            }
            st.router_id = Some(id);
            Some(Tlv::RouterId(id))
        }
        kind::NEXT_HOP => {
            if v.len() < 2 {
                return bad("short");
            }
            let ae = v[0];
            match address(ae, &v[2..]) {
                Ok((Some(a), _)) => {
                    match a {
                        IpAddr::V4(_) => st.next_hop_v4 = Some(a),
                        IpAddr::V6(_) => st.next_hop_v6 = Some(a),
                    }
                    Some(Tlv::NextHop { ae, address: a })
                }
                Ok((None, _)) => bad("wildcard next hop"),
                Err(r) => bad(r),
            }
        }
        kind::UPDATE => parse_update(v, st, ignored),
        kind::ROUTE_REQUEST => {
            if v.len() < 2 {
                return bad("short");
            }
            let (ae, plen) = (v[0], v[1]);
            let n = usize::from(plen).div_ceil(8);
            if v.len() < 2 + n {
                return bad("prefix truncated");
            }
            let subs = parse_subs(&v[2 + n..]);
            if let Some(r) = subs.malformed {
                return bad(r);
            }
            if subs.unknown_mandatory {
                *ignored += 1;
                return None;
            }
            let prefix = if ae == ae::WILDCARD {
                if plen != 0 {
                    return bad("wildcard with a prefix length");
                }
                if subs.src_prefix.is_some() {
                    return bad("wildcard request with a source prefix");
                }
                None
            } else {
                match plain_prefix(ae, plen, &v[2..2 + n]) {
                    Ok(p) => Some(p),
                    Err(r) => return bad(r),
                }
            };
            let src_prefix = match src_prefix_of(ae, &subs) {
                Ok(s) => s,
                Err(r) => return bad(r),
            };
            Some(Tlv::RouteRequest {
                ae,
                prefix,
                src_prefix,
            })
        }
        kind::SEQNO_REQUEST => {
            if v.len() < 14 {
                return bad("short");
            }
            let (ae, plen) = (v[0], v[1]);
            let n = usize::from(plen).div_ceil(8);
            if v.len() < 14 + n {
                return bad("prefix truncated");
            }
            let subs = parse_subs(&v[14 + n..]);
            if let Some(r) = subs.malformed {
                return bad(r);
            }
            if subs.unknown_mandatory {
                *ignored += 1;
                return None;
            }
            let prefix = match plain_prefix(ae, plen, &v[14..14 + n]) {
                Ok(p) => p,
                Err(r) => return bad(r),
            };
            let src_prefix = match src_prefix_of(ae, &subs) {
                Ok(s) => s,
                Err(r) => return bad(r),
            };
            let mut router_id = [0u8; 8];
            router_id.copy_from_slice(&v[6..14]);
            Some(Tlv::SeqnoRequest {
                ae,
                seqno: be16(v, 2),
                hop_count: v[4],
                router_id,
                prefix,
                src_prefix,
            })
        }
        kind::MAC => Some(Tlv::Mac(v.to_vec())),
        kind::PC => {
            if v.len() < 4 {
                return bad("short");
            }
            Some(Tlv::Pc {
                pc: be32(v, 0),
                index: v[4..].to_vec(),
            })
        }
        kind::CHALLENGE_REQUEST => Some(Tlv::ChallengeRequest(v.to_vec())),
        kind::CHALLENGE_REPLY => Some(Tlv::ChallengeReply(v.to_vec())),
        _ => Some(Tlv::Unknown {
            kind: t,
            len: v.len() as u8,
        }),
    }
}

fn parse_update(v: &[u8], st: &mut State, ignored: &mut usize) -> Option<Tlv> {
    let bad = |reason| {
        Some(Tlv::Malformed {
            kind: kind::UPDATE,
            reason,
        })
    };
    if v.len() < 10 {
        return bad("short");
    }
    let (ae, flags, plen, omitted) = (v[0], v[1], v[2], v[3]);
    let (interval, seqno, metric) = (be16(v, 4), be16(v, 6), be16(v, 8));
    let total = usize::from(plen).div_ceil(8);
    let om = usize::from(omitted);
    if om > total {
        return bad("more bytes omitted than the prefix has");
    }
    let carried = total - om;
    if v.len() < 10 + carried {
        return bad("prefix truncated");
    }
    let raw = &v[10..10 + carried];
    let prefix = match ae {
        ae::WILDCARD => {
            if plen != 0 || metric != INFINITY {
                return bad("wildcard update that is not a retraction");
            }
            None
        }
        ae::IPV4 | ae::V4_VIA_V6 => {
            if plen > 32 {
                return bad("IPv4 prefix longer than 32");
            }
            let mut a = [0u8; 4];
            if om > 0 {
                match st.default_v4 {
                    Some(d) => a[..om].copy_from_slice(&d[..om]),
                    None => return bad("compressed prefix without a default"),
                }
            }
            a[om..total].copy_from_slice(raw);
            if flags & FLAG_DEFAULT_PREFIX != 0 {
                st.default_v4 = Some(a);
            }
            if flags & FLAG_ROUTER_ID != 0 {
                return bad("router-id flag on an IPv4 prefix");
            }
            Ipv4Net::new(Ipv4Addr::from(a), plen)
                .ok()
                .map(|n| IpNet::V4(n.trunc()))
        }
        ae::IPV6 => {
            if plen > 128 {
                return bad("IPv6 prefix longer than 128");
            }
            let mut a = [0u8; 16];
            if om > 0 {
                match st.default_v6 {
                    Some(d) => a[..om].copy_from_slice(&d[..om]),
                    None => return bad("compressed prefix without a default"),
                }
            }
            a[om..total].copy_from_slice(raw);
            if flags & FLAG_DEFAULT_PREFIX != 0 {
                st.default_v6 = Some(a);
            }
            if flags & FLAG_ROUTER_ID != 0 {
                let mut id = [0u8; 8];
                id.copy_from_slice(&a[8..16]);
                if id == [0; 8] || id == [0xff; 8] {
                    return bad("invalid router-id from prefix");
                }
                st.router_id = Some(id);
            }
            Ipv6Net::new(Ipv6Addr::from(a), plen)
                .ok()
                .map(|n| IpNet::V6(n.trunc()))
        }
        _ => return bad("AE not allowed in an Update"),
    };
    let subs = parse_subs(&v[10 + carried..]);
    if let Some(r) = subs.malformed {
        return bad(r);
    }
    if subs.unknown_mandatory {
        *ignored += 1;
        return None;
    }
    let src_prefix = match src_prefix_of(if ae == ae::V4_VIA_V6 { ae::IPV4 } else { ae }, &subs) {
        Ok(s) => s,
        Err(r) => return bad(r),
    };
    if ae != ae::WILDCARD && prefix.is_none() {
        return bad("bad prefix");
    }
    let next_hop = match ae {
        ae::IPV4 => st.next_hop_v4,
        ae::IPV6 | ae::V4_VIA_V6 => st.next_hop_v6,
        _ => None,
    };
    Some(Tlv::Update {
        ae,
        flags,
        omitted,
        interval,
        seqno,
        metric,
        prefix,
        src_prefix,
        router_id: st.router_id,
        next_hop,
    })
}

fn parse_section(
    b: &[u8],
    base: usize,
    st: &mut State,
    out: &mut Vec<Tlv>,
    ignored: &mut usize,
) -> Result<(), WireError> {
    let mut i = 0;
    while i < b.len() {
        let t = b[i];
        if t == kind::PAD1 {
            out.push(Tlv::Pad1);
            i += 1;
            continue;
        }
        if i + 2 > b.len() {
            return Err(WireError::Truncated(base + i));
        }
        let len = usize::from(b[i + 1]);
        if i + 2 + len > b.len() {
            return Err(WireError::Truncated(base + i));
        }
        if let Some(tlv) = parse_tlv(t, &b[i + 2..i + 2 + len], st, ignored) {
            out.push(tlv);
        }
        i += 2 + len;
    }
    Ok(())
}

/// Parses a UDP payload.
pub fn parse(buf: &[u8]) -> Result<Packet, WireError> {
    if buf.len() < 4 {
        return Err(WireError::TooShort);
    }
    if buf[0] != MAGIC {
        return Err(WireError::BadMagic(buf[0]));
    }
    if buf[1] != VERSION {
        return Err(WireError::BadVersion(buf[1]));
    }
    let body_len = usize::from(be16(buf, 2));
    let body_end = 4 + body_len;
    if body_end > buf.len() {
        return Err(WireError::BodyTooLong(body_len));
    }
    let mut p = Packet {
        body_end,
        ..Packet::default()
    };
    let mut st = State::default();
    parse_section(&buf[4..body_end], 4, &mut st, &mut p.body, &mut p.ignored)?;
    let mut trailer_state = State::default();
    parse_section(
        &buf[body_end..],
        body_end,
        &mut trailer_state,
        &mut p.trailer,
        &mut p.ignored,
    )?;
    Ok(p)
}

/// Builds packets: header, TLVs, then trailer TLVs. Emits Router-Id TLVs
/// when an Update's originator differs from the one in force, and
/// compresses IPv6/IPv4 Update prefixes against the default prefix.
#[derive(Clone, Debug)]
pub struct PacketWriter {
    buf: Vec<u8>,
    max: usize,
    router_id: Option<[u8; 8]>,
    default_v4: Option<[u8; 4]>,
    default_v6: Option<[u8; 16]>,
}

fn prefix_bytes(p: &IpNet) -> Vec<u8> {
    let n = usize::from(p.prefix_len()).div_ceil(8);
    match p {
        IpNet::V4(n4) => n4.network().octets()[..n].to_vec(),
        IpNet::V6(n6) => n6.network().octets()[..n].to_vec(),
    }
}

fn ae_of(p: &IpNet) -> u8 {
    match p {
        IpNet::V4(_) => ae::IPV4,
        IpNet::V6(_) => ae::IPV6,
    }
}

fn src_sub(src: &Option<IpNet>, out: &mut Vec<u8>) {
    if let Some(s) = src {
        let b = prefix_bytes(s);
        out.push(kind::SUB_SOURCE_PREFIX);
        out.push((1 + b.len()) as u8);
        out.push(s.prefix_len());
        out.extend_from_slice(&b);
    }
}

fn address_bytes(a: &IpAddr) -> (u8, Vec<u8>) {
    match a {
        IpAddr::V4(v4) => (ae::IPV4, v4.octets().to_vec()),
        IpAddr::V6(v6) if v6.segments()[..4] == [0xfe80, 0, 0, 0] => {
            (ae::LINK_LOCAL, v6.octets()[8..].to_vec())
        }
        IpAddr::V6(v6) => (ae::IPV6, v6.octets().to_vec()),
    }
}

impl PacketWriter {
    /// A writer for packets of at most `max` bytes (UDP payload).
    pub fn new(max: usize) -> Self {
        let mut buf = Vec::with_capacity(max.min(65_535));
        buf.extend_from_slice(&[MAGIC, VERSION, 0, 0]);
        Self {
            buf,
            max: max.clamp(64, 65_535),
            router_id: None,
            default_v4: None,
            default_v6: None,
        }
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 4
    }

    /// Bytes left for TLVs (keeping `reserve` for the trailer).
    pub fn room(&self, reserve: usize) -> usize {
        self.max.saturating_sub(self.buf.len() + reserve)
    }

    fn raw(&mut self, t: u8, value: &[u8], reserve: usize) -> bool {
        if value.len() > 255 || 2 + value.len() > self.room(reserve) {
            return false;
        }
        self.buf.push(t);
        self.buf.push(value.len() as u8);
        self.buf.extend_from_slice(value);
        true
    }

    /// Appends a TLV; returns false (and writes nothing) when it does not
    /// fit in the packet with `reserve` bytes kept for the trailer.
    /// Updates may be preceded by a Router-Id TLV and are compressed; their
    /// `ae`/`flags`/`omitted` fields are recomputed. Malformed/unknown TLVs
    /// are not written.
    pub fn push(&mut self, tlv: &Tlv, reserve: usize) -> bool {
        match tlv {
            Tlv::Pad1 => {
                if self.room(reserve) < 1 {
                    return false;
                }
                self.buf.push(0);
                true
            }
            Tlv::PadN(n) => self.raw(kind::PADN, &vec![0; usize::from(*n)], reserve),
            Tlv::AckReq { opaque, interval } => {
                let mut v = vec![0, 0];
                v.extend_from_slice(&opaque.to_be_bytes());
                v.extend_from_slice(&interval.to_be_bytes());
                self.raw(kind::ACK_REQ, &v, reserve)
            }
            Tlv::Ack { opaque } => self.raw(kind::ACK, &opaque.to_be_bytes(), reserve),
            Tlv::Hello {
                flags,
                seqno,
                interval,
                timestamp,
            } => {
                let mut v = Vec::with_capacity(12);
                v.extend_from_slice(&flags.to_be_bytes());
                v.extend_from_slice(&seqno.to_be_bytes());
                v.extend_from_slice(&interval.to_be_bytes());
                if let Some(ts) = timestamp {
                    v.extend_from_slice(&[kind::SUB_TIMESTAMP, 4]);
                    v.extend_from_slice(&ts.to_be_bytes());
                }
                self.raw(kind::HELLO, &v, reserve)
            }
            Tlv::Ihu {
                rxcost,
                interval,
                address,
                timestamp,
                ..
            } => {
                let (ae, bytes) = address
                    .as_ref()
                    .map_or((ae::WILDCARD, Vec::new()), address_bytes);
                let mut v = vec![ae, 0];
                v.extend_from_slice(&rxcost.to_be_bytes());
                v.extend_from_slice(&interval.to_be_bytes());
                v.extend_from_slice(&bytes);
                if let Some((origin, receive)) = timestamp {
                    v.extend_from_slice(&[kind::SUB_TIMESTAMP, 8]);
                    v.extend_from_slice(&origin.to_be_bytes());
                    v.extend_from_slice(&receive.to_be_bytes());
                }
                self.raw(kind::IHU, &v, reserve)
            }
            Tlv::RouterId(id) => {
                let mut v = vec![0, 0];
                v.extend_from_slice(id);
                let ok = self.raw(kind::ROUTER_ID, &v, reserve);
                if ok {
                    self.router_id = Some(*id);
                }
                ok
            }
            Tlv::NextHop { address, .. } => {
                let (ae, bytes) = address_bytes(address);
                let mut v = vec![ae, 0];
                v.extend_from_slice(&bytes);
                self.raw(kind::NEXT_HOP, &v, reserve)
            }
            Tlv::Update {
                interval,
                seqno,
                metric,
                prefix,
                src_prefix,
                router_id,
                ..
            } => self.push_update(
                *interval, *seqno, *metric, prefix, src_prefix, *router_id, reserve,
            ),
            Tlv::RouteRequest {
                prefix, src_prefix, ..
            } => {
                let mut v = match prefix {
                    None => vec![ae::WILDCARD, 0],
                    Some(p) => {
                        let mut v = vec![ae_of(p), p.prefix_len()];
                        v.extend_from_slice(&prefix_bytes(p));
                        v
                    }
                };
                src_sub(src_prefix, &mut v);
                self.raw(kind::ROUTE_REQUEST, &v, reserve)
            }
            Tlv::SeqnoRequest {
                seqno,
                hop_count,
                router_id,
                prefix,
                src_prefix,
                ..
            } => {
                let mut v = vec![ae_of(prefix), prefix.prefix_len()];
                v.extend_from_slice(&seqno.to_be_bytes());
                v.push(*hop_count);
                v.push(0);
                v.extend_from_slice(router_id);
                v.extend_from_slice(&prefix_bytes(prefix));
                src_sub(src_prefix, &mut v);
                self.raw(kind::SEQNO_REQUEST, &v, reserve)
            }
            Tlv::Mac(m) => self.raw(kind::MAC, m, reserve),
            Tlv::Pc { pc, index } => {
                let mut v = pc.to_be_bytes().to_vec();
                v.extend_from_slice(index);
                self.raw(kind::PC, &v, reserve)
            }
            Tlv::ChallengeRequest(n) => self.raw(kind::CHALLENGE_REQUEST, n, reserve),
            Tlv::ChallengeReply(n) => self.raw(kind::CHALLENGE_REPLY, n, reserve),
            Tlv::Malformed { .. } | Tlv::Unknown { .. } => false,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_update(
        &mut self,
        interval: u16,
        seqno: u16,
        metric: u16,
        prefix: &Option<IpNet>,
        src_prefix: &Option<IpNet>,
        router_id: Option<[u8; 8]>,
        reserve: usize,
    ) -> bool {
        let Some(p) = prefix else {
            let mut v = vec![ae::WILDCARD, 0, 0, 0];
            v.extend_from_slice(&interval.to_be_bytes());
            v.extend_from_slice(&seqno.to_be_bytes());
            v.extend_from_slice(&INFINITY.to_be_bytes());
            return self.raw(kind::UPDATE, &v, reserve);
        };
        let bytes = prefix_bytes(p);
        let omitted = match p {
            IpNet::V4(_) => common(self.default_v4.as_ref().map(|d| &d[..]), &bytes),
            IpNet::V6(_) => common(self.default_v6.as_ref().map(|d| &d[..]), &bytes),
        };
        let set_default = bytes.len() > omitted;
        let flags = if set_default { FLAG_DEFAULT_PREFIX } else { 0 };
        // Our packets go over IPv6 links: an IPv4 prefix is sent with the
        // packet's IPv6 source as its next hop (v4-via-v6, RFC 9229).
        let update_ae = match p {
            IpNet::V4(_) => ae::V4_VIA_V6,
            IpNet::V6(_) => ae::IPV6,
        };
        let mut v = vec![update_ae, flags, p.prefix_len(), omitted as u8];
        v.extend_from_slice(&interval.to_be_bytes());
        v.extend_from_slice(&seqno.to_be_bytes());
        v.extend_from_slice(&metric.to_be_bytes());
        v.extend_from_slice(&bytes[omitted..]);
        src_sub(src_prefix, &mut v);
        let need_rid = router_id.is_some() && router_id != self.router_id;
        let rid_len = if need_rid { 12 } else { 0 };
        if 2 + v.len() + rid_len > self.room(reserve) {
            return false;
        }
        if let (true, Some(id)) = (need_rid, router_id) {
            self.push(&Tlv::RouterId(id), reserve);
        }
        let ok = self.raw(kind::UPDATE, &v, reserve);
        if ok && set_default {
            match p {
                IpNet::V4(n) => self.default_v4 = Some(n.network().octets()),
                IpNet::V6(n) => self.default_v6 = Some(n.network().octets()),
            }
        }
        ok
    }

    /// The packet so far with its body length set (no trailer).
    pub fn body(&self) -> Vec<u8> {
        let mut out = self.buf.clone();
        let len = (out.len() - 4) as u16;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Finishes the packet: body length set, `trailer` TLVs appended after it.
    pub fn finish(mut self, trailer: &[Tlv]) -> Vec<u8> {
        let len = (self.buf.len() - 4) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        for t in trailer {
            if let Tlv::Mac(m) = t {
                self.buf.push(kind::MAC);
                self.buf.push(m.len() as u8);
                self.buf.extend_from_slice(m);
            }
        }
        self.buf
    }
}

/// How many leading bytes of `prefix` equal the default prefix.
fn common(default: Option<&[u8]>, prefix: &[u8]) -> usize {
    default.map_or(0, |d| {
        d.iter().zip(prefix).take_while(|(a, b)| a == b).count()
    })
}

/// What an RFC 8967 MAC covers: source address and port, destination
/// address and port, then the packet header and body (not the trailer).
pub fn mac_input(
    src: Ipv6Addr,
    src_port: u16,
    dst: Ipv6Addr,
    dst_port: u16,
    packet: &[u8],
    body_end: usize,
) -> Vec<u8> {
    let end = body_end.min(packet.len());
    let mut m = Vec::with_capacity(36 + end);
    m.extend_from_slice(&src.octets());
    m.extend_from_slice(&src_port.to_be_bytes());
    m.extend_from_slice(&dst.octets());
    m.extend_from_slice(&dst_port.to_be_bytes());
    m.extend_from_slice(&packet[..end]);
    m
}

#[cfg(test)]
mod tests;
