//! Linux tun offloads (`IFF_VNET_HDR`), pure and I/O-free, after
//! wireguard-go's `tun/offload_linux.go`.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD`, every tun read and write starts
//! with a [`VnetHdr`] (`struct virtio_net_hdr`) and may carry one large TCP
//! or UDP "super-packet" instead of many MTU-sized ones:
//!
//! - **TX** (tun read → encrypt): [`split`] turns what one read returned
//!   into ordinary IP packets, each small enough for the tunnel, with every
//!   length, sequence number, IPv4 identifier and checksum rewritten, as the
//!   kernel's own segmentation would (TSO, USO, and checksum completion for
//!   `NEEDS_CSUM` packets).
//! - **RX** (decrypt → tun write): [`Gro`] coalesces consecutive segments of
//!   a TCP (or UDP) flow into one super-packet with a vnet header, so the
//!   kernel gets one write per burst instead of one per packet.
//!
//! The inner checksums of packets handed to [`Gro`] are **not** verified
//! before coalescing: the packets come out of WireGuard, whose AEAD already
//! authenticated every byte, so a corrupted segment cannot get here. Kernel
//! WireGuard marks its decrypted packets `CHECKSUM_UNNECESSARY` for the same
//! reason. (wireguard-go verifies them; this module does not.)
//!
//! [`Gro`] keeps the arrival order of every flow: a packet only ever joins
//! the newest item of its flow, and a packet of a flow that cannot join (a
//! FIN, a pure ACK, a reordered segment) starts a new item that later
//! packets of that flow must follow. Items come out in the order they were
//! started.
//!
//! The vnet header fields are encoded little-endian, the byte order of the
//! kernel's virtio header on every architecture this project runs on.

use std::collections::HashMap;

/// Length of a `struct virtio_net_hdr` in bytes.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum at
/// `csum_start + csum_offset` holds only the pseudo-header sum and must be
/// completed over `csum_start..`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`: one ordinary packet.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`: a TCP over IPv4 super-packet (TSO).
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`: IP fragmentation offload (UFO), unsupported.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`: a TCP over IPv6 super-packet (TSO).
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: a UDP super-packet cut into datagrams (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: or-ed into a TCP gso type when the first
/// segment carries CWR.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
const TCP_FLAGS_AT: usize = 13;
const TCP_CSUM_AT: usize = 16;
const UDP_HDR_LEN: usize = 8;
const UDP_CSUM_AT: usize = 6;
const IPV4_MF: u8 = 0x20;
/// Most datagrams in one UDP super-packet: Linux rejects a `GSO_UDP_L4`
/// write of more than `gso_size * UDP_MAX_SEGMENTS` payload bytes.
const UDP_MAX_SEGMENTS: usize = 64;
const MAX_IP_LEN: usize = 65_535;
/// Longest input [`split`] takes: an IPv6 header plus the largest payload.
pub const MAX_PACKET_LEN: usize = 40 + MAX_IP_LEN;

/// Why a tun read could not be turned into packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Fewer than [`VNET_HDR_LEN`] bytes.
    #[error("virtio-net header truncated: {0} bytes")]
    ShortVnetHdr(usize),
    /// A gso type (or ECN bit combination) this module does not split.
    #[error("unsupported virtio-net GSO type {0:#x}")]
    UnsupportedGsoType(u8),
    /// The packet ends before a header it must contain.
    #[error("packet truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes the headers need.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// More than [`MAX_PACKET_LEN`] bytes.
    #[error("packet of {0} bytes is too long")]
    TooLong(usize),
    /// The IP version nibble is neither 4 nor 6.
    #[error("bad IP version {0}")]
    BadIpVersion(u8),
    /// The IP version does not match the gso type (IPv6 in TCPV4 and so on).
    #[error("IP version {version} does not match GSO type {gso_type:#x}")]
    VersionMismatch {
        /// IP version of the packet.
        version: u8,
        /// gso type of the header.
        gso_type: u8,
    },
    /// An IPv4 header length below 20 bytes.
    #[error("bad IPv4 header length {0}")]
    BadIpv4HeaderLen(usize),
    /// An IPv4 fragment marked for segmentation.
    #[error("IPv4 fragment cannot be segmented")]
    Fragment,
    /// The IPv4 protocol or IPv6 next header is not the transport the gso
    /// type implies; IPv6 extension headers are not supported.
    #[error("IP protocol / IPv6 next header {0} does not match the GSO type")]
    UnexpectedProtocol(u8),
    /// A TCP data offset below 5 words.
    #[error("bad TCP header length {0}")]
    BadTcpHeaderLen(usize),
    /// `csum_start`/`csum_offset` point outside the packet or not at the
    /// transport checksum.
    #[error("checksum start {start} / offset {offset} invalid for a {len}-byte packet")]
    BadCsum {
        /// `csum_start` of the header.
        start: u16,
        /// `csum_offset` of the header.
        offset: u16,
        /// Length of the packet.
        len: usize,
    },
    /// `gso_size` is zero.
    #[error("gso_size is zero")]
    ZeroGsoSize,
    /// A super-packet with no payload after its headers.
    #[error("GSO packet has no payload")]
    NoPayload,
    /// A segment would not fit the 16-bit IP length field.
    #[error("segment of {0} bytes does not fit an IP length field")]
    SegmentTooLong(usize),
}

/// `struct virtio_net_hdr`, the header in front of every packet read from or
/// written to a tun device opened with `IFF_VNET_HDR`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*` bits.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly or-ed with [`VIRTIO_NET_HDR_GSO_ECN`].
    pub gso_type: u8,
    /// Length of the IP plus transport headers (a hint; [`split`] re-derives it).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Decodes the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<VnetHdr, OffloadError> {
        let Some(&[flags, gso_type, a, b2, c, d, e, f, g, h]) = b.get(..VNET_HDR_LEN) else {
            return Err(OffloadError::ShortVnetHdr(b.len()));
        };
        Ok(VnetHdr {
            flags,
            gso_type,
            hdr_len: u16::from_le_bytes([a, b2]),
            gso_size: u16::from_le_bytes([c, d]),
            csum_start: u16::from_le_bytes([e, f]),
            csum_offset: u16::from_le_bytes([g, h]),
        })
    }

    /// Encodes the header as the kernel expects it.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let [a, b] = self.hdr_len.to_le_bytes();
        let [c, d] = self.gso_size.to_le_bytes();
        let [e, f] = self.csum_start.to_le_bytes();
        let [g, h] = self.csum_offset.to_le_bytes();
        [self.flags, self.gso_type, a, b, c, d, e, f, g, h]
    }
}

/// One's-complement sum of `data` read as big-endian 16-bit words (an odd
/// last byte padded with zero), plus `initial`, not folded. Sums 64-bit
/// words with end-around carry, which is the same modulo `0xffff`.
pub fn checksum_no_fold(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut add = |w: u64| {
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        add(u64::from_be_bytes([
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
        ]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        for (d, s) in last.iter_mut().zip(rest) {
            *d = *s;
        }
        add(u64::from_be_bytes(last));
    }
    acc
}

/// Folds a sum from [`checksum_no_fold`] to 16 bits (not complemented).
pub fn fold(sum: u64) -> u16 {
    let mut s = sum;
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Folded one's-complement sum of `data` plus `initial` (complement it to
/// get an Internet checksum).
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    fold(checksum_no_fold(data, initial))
}

/// Unfolded sum of the TCP/UDP pseudo-header for IPv4 (4-byte addresses)
/// or IPv6 (16-byte addresses) with transport length `len`.
pub fn pseudo_header_sum(proto: u8, src: &[u8], dst: &[u8], len: u16) -> u64 {
    checksum_no_fold(
        dst,
        checksum_no_fold(src, u64::from(proto) + u64::from(len)),
    )
}

/// A checksum as sent: a computed zero goes out as `0xffff`, which the
/// kernel does too (`CSUM_MANGLED_0`) because UDP reserves zero.
pub(crate) fn finish(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

fn rd16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

fn rd32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.saturating_add(4)) {
        Some(&[w, x, y, z]) => u32::from_be_bytes([w, x, y, z]),
        _ => 0,
    }
}

fn wr16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at.saturating_add(2)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn wr32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at.saturating_add(4)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Rewrites the IPv4 header checksum of the header `b[..iph_len]`.
fn ipv4_fix_csum(b: &mut [u8], iph_len: usize) {
    wr16(b, 10, 0);
    let c = !checksum(b.get(..iph_len).unwrap_or_default(), 0);
    wr16(b, 10, c);
}

/// Offset and length of the source address; the destination follows.
fn addr_span(v6: bool) -> (usize, usize) {
    if v6 {
        (8, 16)
    } else {
        (12, 4)
    }
}

/// Pseudo-header sum of `pkt` without its length, folded to 16 bits so
/// that callers can add the length (an unfolded sum may use all 64 bits).
fn addr_sum(pkt: &[u8], v6: bool, proto: u8) -> u64 {
    let (at, n) = addr_span(v6);
    u64::from(fold(checksum_no_fold(
        pkt.get(at..at + 2 * n).unwrap_or_default(),
        u64::from(proto),
    )))
}

/// Reusable output of [`split`]: one contiguous buffer and the span of
/// every packet in it. Once warmed up, refilling it does not allocate.
#[derive(Debug, Default, Clone)]
pub struct Segments {
    buf: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl Segments {
    /// An empty container.
    pub fn new() -> Segments {
        Segments::default()
    }

    /// Forgets the packets, keeping the storage.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are no packets.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The packets, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.spans
            .iter()
            .map(|&(at, n)| self.buf.get(at..at + n).unwrap_or_default())
    }

    /// Lets `f` edit every packet in place (not its length).
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut [u8])) {
        for &(at, n) in &self.spans {
            if let Some(p) = self.buf.get_mut(at..at + n) {
                f(p);
            }
        }
    }

    /// Appends a packet made of `head` then `tail`; returns it for editing.
    fn push(&mut self, head: &[u8], tail: &[u8]) -> &mut [u8] {
        let at = self.buf.len();
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(tail);
        self.spans.push((at, head.len() + tail.len()));
        &mut self.buf[at..]
    }
}

/// What the IP header of a packet to split says.
struct IpInfo {
    v6: bool,
    iph_len: usize,
    proto: u8,
}

fn truncated(need: usize, have: usize) -> OffloadError {
    OffloadError::Truncated { need, have }
}

fn parse_ip(p: &[u8]) -> Result<IpInfo, OffloadError> {
    let first = *p.first().ok_or(truncated(1, 0))?;
    match first >> 4 {
        4 => {
            if p.len() < 20 {
                return Err(truncated(20, p.len()));
            }
            let iph_len = usize::from(first & 0x0f) * 4;
            if iph_len < 20 {
                return Err(OffloadError::BadIpv4HeaderLen(iph_len));
            }
            if p.len() < iph_len {
                return Err(truncated(iph_len, p.len()));
            }
            if byte(p, 6) & IPV4_MF != 0 || rd16(p, 6) & 0x1fff != 0 {
                return Err(OffloadError::Fragment);
            }
            Ok(IpInfo {
                v6: false,
                iph_len,
                proto: byte(p, 9),
            })
        }
        6 => {
            if p.len() < 40 {
                return Err(truncated(40, p.len()));
            }
            Ok(IpInfo {
                v6: true,
                iph_len: 40,
                proto: byte(p, 6),
            })
        }
        v => Err(OffloadError::BadIpVersion(v)),
    }
}

/// Turns what follows `hdr` in one tun read into ordinary IP packets in
/// `out` (cleared first; left empty on error).
///
/// `GSO_NONE` packets come out as they are, their checksum completed when
/// `NEEDS_CSUM` is set. TCP super-packets are cut into `gso_size`-byte
/// segments (FIN and PSH on the last one only, CWR on the first only), UDP
/// ones (`GSO_UDP_L4`) into `gso_size`-byte datagrams; every segment gets
/// its IP length, IPv4 identifier and header checksum, TCP sequence number
/// or UDP length, and transport checksum rewritten. The header length is
/// taken from the packet, never from `hdr.hdr_len`.
pub fn split(hdr: &VnetHdr, packet: &[u8], out: &mut Segments) -> Result<(), OffloadError> {
    out.clear();
    let r = split_into(hdr, packet, out);
    if r.is_err() {
        out.clear();
    }
    r
}

fn split_into(hdr: &VnetHdr, packet: &[u8], out: &mut Segments) -> Result<(), OffloadError> {
    if packet.len() > MAX_PACKET_LEN {
        return Err(OffloadError::TooLong(packet.len()));
    }
    let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
    match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE if !ecn => split_none(hdr, packet, out),
        VIRTIO_NET_HDR_GSO_TCPV4 => split_gso(hdr, packet, out, Some(false), true),
        VIRTIO_NET_HDR_GSO_TCPV6 => split_gso(hdr, packet, out, Some(true), true),
        VIRTIO_NET_HDR_GSO_UDP_L4 if !ecn => split_gso(hdr, packet, out, None, false),
        _ => Err(OffloadError::UnsupportedGsoType(hdr.gso_type)),
    }
}

fn split_none(hdr: &VnetHdr, packet: &[u8], out: &mut Segments) -> Result<(), OffloadError> {
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        out.push(packet, &[]);
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(OffloadError::BadCsum {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len: packet.len(),
        });
    }
    let seg = out.push(packet, &[]);
    // The field holds the pseudo-header sum; it is the initial value.
    let initial = rd16(seg, at);
    wr16(seg, at, 0);
    let c = finish(checksum_no_fold(
        seg.get(start..).unwrap_or_default(),
        u64::from(initial),
    ));
    wr16(seg, at, c);
    Ok(())
}

/// Splits a TCP (`tcp`) or UDP super-packet; `want_v6` is the IP version
/// the gso type requires, if it requires one.
fn split_gso(
    hdr: &VnetHdr,
    packet: &[u8],
    out: &mut Segments,
    want_v6: Option<bool>,
    tcp: bool,
) -> Result<(), OffloadError> {
    let ip = parse_ip(packet)?;
    if want_v6.is_some_and(|v6| v6 != ip.v6) {
        return Err(OffloadError::VersionMismatch {
            version: if ip.v6 { 6 } else { 4 },
            gso_type: hdr.gso_type,
        });
    }
    let (proto, csum_at) = if tcp {
        (IPPROTO_TCP, TCP_CSUM_AT)
    } else {
        (IPPROTO_UDP, UDP_CSUM_AT)
    };
    if ip.proto != proto {
        return Err(OffloadError::UnexpectedProtocol(ip.proto));
    }
    let iph = ip.iph_len;
    let len = packet.len();
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
        && (usize::from(hdr.csum_start) != iph || usize::from(hdr.csum_offset) != csum_at)
    {
        return Err(OffloadError::BadCsum {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len,
        });
    }
    let th_len = if tcp {
        if len < iph + 20 {
            return Err(truncated(iph + 20, len));
        }
        let th_len = usize::from(byte(packet, iph + 12) >> 4) * 4;
        if th_len < 20 {
            return Err(OffloadError::BadTcpHeaderLen(th_len));
        }
        th_len
    } else {
        UDP_HDR_LEN
    };
    let hl = iph + th_len;
    if len < hl {
        return Err(truncated(hl, len));
    }
    if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    if len == hl {
        return Err(OffloadError::NoPayload);
    }
    let mss = usize::from(hdr.gso_size);
    let biggest = hl + mss.min(len - hl);
    let ip_len_field = if ip.v6 { biggest - iph } else { biggest };
    if ip_len_field > MAX_IP_LEN {
        return Err(OffloadError::SegmentTooLong(biggest));
    }

    let headers = packet.get(..hl).unwrap_or_default();
    let base = addr_sum(packet, ip.v6, proto);
    let id = rd16(packet, 4);
    let mut seq = rd32(packet, iph + 4);
    let mut off = hl;
    let mut i: u16 = 0;
    while off < len {
        let end = (off + mss).min(len);
        let data = packet.get(off..end).unwrap_or_default();
        let total = hl + data.len();
        let seg = out.push(headers, data);
        if ip.v6 {
            wr16(seg, 4, (total - iph) as u16);
        } else {
            wr16(seg, 2, total as u16);
            wr16(seg, 4, id.wrapping_add(i));
            ipv4_fix_csum(seg, iph);
        }
        let l4_len = (total - iph) as u16;
        if tcp {
            wr32(seg, iph + 4, seq);
            let mut flags = byte(seg, iph + TCP_FLAGS_AT);
            if end != len {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                flags &= !TCP_CWR;
            }
            if let Some(f) = seg.get_mut(iph + TCP_FLAGS_AT) {
                *f = flags;
            }
        } else {
            wr16(seg, iph + 4, l4_len);
        }
        wr16(seg, iph + csum_at, 0);
        let sum = checksum_no_fold(seg.get(iph..).unwrap_or_default(), base + u64::from(l4_len));
        let c = if tcp { !fold(sum) } else { finish(sum) };
        wr16(seg, iph + csum_at, c);
        seq = seq.wrapping_add(data.len() as u32);
        off = end;
        i = i.wrapping_add(1);
    }
    Ok(())
}

/// Identity of a flow for coalescing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    v6: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
}

/// A packet that may coalesce.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    kind: Kind,
    v6: bool,
    iph_len: usize,
    th_len: usize,
    payload: usize,
    seq: u32,
    ack: u32,
    psh: bool,
}

/// The flow of `p` if it is TCP or UDP with its ports present, and whether
/// (and how) it may coalesce.
fn classify(p: &[u8], udp: bool) -> (Option<FlowKey>, Option<Candidate>) {
    let Some(&first) = p.first() else {
        return (None, None);
    };
    let (v6, iph_len, proto) = match first >> 4 {
        4 if p.len() >= 20 && first & 0x0f >= 5 => {
            let iph = usize::from(first & 0x0f) * 4;
            if rd16(p, 6) & 0x1fff != 0 {
                // Not the first fragment: no ports.
                return (None, None);
            }
            (false, iph, byte(p, 9))
        }
        6 if p.len() >= 40 => (true, 40, byte(p, 6)),
        _ => return (None, None),
    };
    let kind = match proto {
        IPPROTO_TCP => Kind::Tcp,
        IPPROTO_UDP => Kind::Udp,
        _ => return (None, None),
    };
    if p.len() < iph_len + 4 {
        return (None, None);
    }
    let (at, n) = addr_span(v6);
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: rd16(p, iph_len),
        dport: rd16(p, iph_len + 2),
        proto,
        v6,
    };
    for (d, s) in key
        .src
        .iter_mut()
        .zip(p.get(at..at + n).unwrap_or_default())
    {
        *d = *s;
    }
    for (d, s) in key
        .dst
        .iter_mut()
        .zip(p.get(at + n..at + 2 * n).unwrap_or_default())
    {
        *d = *s;
    }
    (Some(key), candidate(p, kind, v6, iph_len, udp))
}

fn candidate(p: &[u8], kind: Kind, v6: bool, iph_len: usize, udp: bool) -> Option<Candidate> {
    let len = p.len();
    if len > MAX_IP_LEN {
        return None;
    }
    if v6 {
        if usize::from(rd16(p, 4)) != len - 40 {
            return None;
        }
    } else if iph_len != 20 || usize::from(rd16(p, 2)) != len || byte(p, 6) & IPV4_MF != 0 {
        // IPv4 options do not coalesce, nor do fragments.
        return None;
    }
    match kind {
        Kind::Tcp => {
            if len < iph_len + 20 {
                return None;
            }
            let th_len = usize::from(byte(p, iph_len + 12) >> 4) * 4;
            if th_len < 20 || len <= iph_len + th_len {
                return None;
            }
            let flags = byte(p, iph_len + TCP_FLAGS_AT);
            if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
                return None;
            }
            Some(Candidate {
                kind,
                v6,
                iph_len,
                th_len,
                payload: len - iph_len - th_len,
                seq: rd32(p, iph_len + 4),
                ack: rd32(p, iph_len + 8),
                psh: flags & TCP_PSH != 0,
            })
        }
        Kind::Udp => {
            if !udp
                || len <= iph_len + UDP_HDR_LEN
                || usize::from(rd16(p, iph_len + 4)) != len - iph_len
            {
                return None;
            }
            Some(Candidate {
                kind,
                v6,
                iph_len,
                th_len: UDP_HDR_LEN,
                payload: len - iph_len - UDP_HDR_LEN,
                seq: 0,
                ack: 0,
                psh: false,
            })
        }
    }
}

/// Whether the IP headers of `a` and `b` agree on everything that must not
/// change inside a super-packet.
fn ip_headers_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version, traffic class, flow label; hop limit.
        a.get(..4) == b.get(..4) && byte(a, 7) == byte(b, 7)
    } else {
        // TOS; reserved and DF bits; TTL.
        byte(a, 1) == byte(b, 1) && byte(a, 6) >> 5 == byte(b, 6) >> 5 && byte(a, 8) == byte(b, 8)
    }
}

/// One output of [`Gro`]: a vnet header slot and a packet, possibly grown
/// by coalescing.
#[derive(Debug)]
struct Item {
    /// [`VNET_HDR_LEN`] bytes of header, then the packet.
    buf: Vec<u8>,
    /// The first packet, if it may take more segments.
    head: Option<Candidate>,
    /// Packets merged in after the first.
    merged: usize,
    next_seq: u32,
    /// No more segments: PSH seen, or a segment shorter than the first.
    closed: bool,
}

impl Item {
    fn packet(&self) -> &[u8] {
        self.buf.get(VNET_HDR_LEN..).unwrap_or_default()
    }

    /// Appends `p` (described by `c`) if it continues this item.
    fn try_append(&mut self, p: &[u8], c: &Candidate) -> bool {
        let Some(h) = self.head else {
            return false;
        };
        let own = self.packet();
        if self.closed
            || h.kind != c.kind
            || h.v6 != c.v6
            || h.iph_len != c.iph_len
            || h.th_len != c.th_len
            || c.payload > h.payload
            || own.len() + c.payload > MAX_IP_LEN
            || (h.kind == Kind::Udp && self.merged + 1 >= UDP_MAX_SEGMENTS)
            || !ip_headers_match(own, p, h.v6)
        {
            return false;
        }
        let hl = h.iph_len + h.th_len;
        if h.kind == Kind::Tcp
            && (c.ack != h.ack
                || c.seq != self.next_seq
                || own.get(h.iph_len + 20..hl) != p.get(c.iph_len + 20..hl))
        {
            return false;
        }
        self.buf.extend_from_slice(p.get(hl..).unwrap_or_default());
        self.merged += 1;
        self.next_seq = self.next_seq.wrapping_add(c.payload as u32);
        if c.psh {
            if let Some(f) = self.buf.get_mut(VNET_HDR_LEN + h.iph_len + TCP_FLAGS_AT) {
                *f |= TCP_PSH;
            }
            self.closed = true;
        }
        if c.payload < h.payload {
            self.closed = true;
        }
        true
    }

    /// Writes the vnet header and fixes the IP and transport headers of a
    /// coalesced item (applyTCPCoalesceAccounting in wireguard-go).
    fn finish(&mut self) {
        let Some(h) = self.head.filter(|_| self.merged > 0) else {
            return;
        };
        let Some((slot, pkt)) = self.buf.split_at_mut_checked(VNET_HDR_LEN) else {
            return;
        };
        let iph = h.iph_len;
        let len = pkt.len();
        if h.v6 {
            wr16(pkt, 4, (len - iph) as u16);
        } else {
            wr16(pkt, 2, len as u16);
            ipv4_fix_csum(pkt, iph);
        }
        let (proto, csum_at, gso_type) = match h.kind {
            Kind::Tcp if h.v6 => (IPPROTO_TCP, TCP_CSUM_AT, VIRTIO_NET_HDR_GSO_TCPV6),
            Kind::Tcp => (IPPROTO_TCP, TCP_CSUM_AT, VIRTIO_NET_HDR_GSO_TCPV4),
            Kind::Udp => (IPPROTO_UDP, UDP_CSUM_AT, VIRTIO_NET_HDR_GSO_UDP_L4),
        };
        let l4_len = (len - iph) as u16;
        if h.kind == Kind::Udp {
            wr16(pkt, iph + 4, l4_len);
        }
        // The pseudo-header sum, which the kernel completes (CHECKSUM_PARTIAL).
        let partial = fold(addr_sum(pkt, h.v6, proto) + u64::from(l4_len));
        wr16(pkt, iph + csum_at, partial);
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: (iph + h.th_len) as u16,
            gso_size: h.payload as u16,
            csum_start: iph as u16,
            csum_offset: csum_at as u16,
        };
        slot.copy_from_slice(&hdr.encode());
    }
}

/// Coalesces decrypted packets bound for a tun device opened with
/// `IFF_VNET_HDR` (generic receive offload, after wireguard-go's tcpGRO and
/// udpGRO).
///
/// TCP segments coalesce when they belong to the same flow (addresses,
/// ports), carry the same acknowledgment number, IP header fields (TOS, TTL,
/// DF; IPv6 traffic class, flow label, hop limit) and TCP options, have only
/// ACK or ACK|PSH set (PSH ends the item), follow each other in sequence,
/// and have the payload size of the first but for a shorter last one, up to
/// 65535 bytes of IP packet. UDP datagrams of a flow coalesce under the same
/// size rules, at most 64 to an item, when UDP GRO is on
/// ([`Gro::new_with_udp`]; USO needs Linux 6.2). Packets are copied into storage that is reused across flushes.
#[derive(Debug, Default)]
pub struct Gro {
    udp: bool,
    items: Vec<Item>,
    pool: Vec<Vec<u8>>,
    flows: HashMap<FlowKey, usize>,
}

impl Gro {
    /// A coalescer for TCP only.
    pub fn new() -> Gro {
        Gro::new_with_udp(false)
    }

    /// A coalescer for TCP, and for UDP too if `udp` (the tun must accept
    /// `VIRTIO_NET_HDR_GSO_UDP_L4`, `TUN_F_USO4|TUN_F_USO6`).
    pub fn new_with_udp(udp: bool) -> Gro {
        Gro {
            udp,
            ..Gro::default()
        }
    }

    /// Number of items the next [`Gro::flush`] will write.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Takes a copy of one IP packet.
    pub fn push(&mut self, packet: &[u8]) {
        let (key, cand) = classify(packet, self.udp);
        if let (Some(k), Some(c)) = (&key, &cand) {
            if let Some(item) = self.flows.get(k).and_then(|&i| self.items.get_mut(i)) {
                if item.try_append(packet, c) {
                    return;
                }
            }
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(&[0; VNET_HDR_LEN]);
        buf.extend_from_slice(packet);
        if let Some(k) = key {
            // Later packets of this flow must come after this one, even
            // when this one cannot take them.
            self.flows.insert(k, self.items.len());
        }
        self.items.push(Item {
            buf,
            next_seq: cand.map_or(0, |c| c.seq.wrapping_add(c.payload as u32)),
            closed: cand.is_some_and(|c| c.psh),
            head: cand,
            merged: 0,
        });
    }

    /// Calls `write` once per item, in order, with the vnet header followed
    /// by the packet in one slice: coalesced items with a GSO header
    /// (`NEEDS_CSUM`, the transport checksum field holding the pseudo-header
    /// sum), single packets with an all-zero header. Then forgets them.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8])) {
        for mut item in self.items.drain(..) {
            item.finish();
            write(&item.buf);
            self.pool.push(item.buf);
        }
        self.flows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC4: [u8; 4] = [10, 0, 0, 1];
    const DST4: [u8; 4] = [10, 0, 0, 2];
    const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    const SEQ: u32 = 0xffff_f000; // wraps within the larger tests
    const ACK: u32 = 0x1122_3344;

    /// Plain 16-bit one's-complement sum, independent of the fast one.
    fn simple_sum(bytes: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = u32::from(*pair.get(1).unwrap_or(&0));
            s += hi | lo;
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn iph_len(p: &[u8]) -> usize {
        if p[0] >> 4 == 6 {
            40
        } else {
            usize::from(p[0] & 0xf) * 4
        }
    }

    /// Pseudo-header bytes followed by the transport part of `p`.
    fn with_pseudo(p: &[u8], proto: u8) -> Vec<u8> {
        let iph = iph_len(p);
        let l4 = &p[iph..];
        let mut v = Vec::new();
        if p[0] >> 4 == 6 {
            v.extend_from_slice(&p[8..40]);
            v.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            v.extend_from_slice(&p[12..20]);
            v.extend_from_slice(&[0, proto]);
            v.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(l4);
        v
    }

    fn l4_valid(p: &[u8], proto: u8) -> bool {
        simple_sum(&with_pseudo(p, proto)) == 0xffff
    }

    fn ipv4_valid(p: &[u8]) -> bool {
        simple_sum(&p[..iph_len(p)]) == 0xffff
    }

    /// The pseudo-header sum a CHECKSUM_PARTIAL packet carries.
    fn partial(p: &[u8], proto: u8) -> u16 {
        let iph = iph_len(p);
        let v = with_pseudo(p, proto);
        simple_sum(&v[..v.len() - (p.len() - iph)])
    }

    fn ip_header(v6: bool, proto: u8, l4_len: usize) -> Vec<u8> {
        if v6 {
            let mut h = vec![0x60, 0x01, 0x23, 0x45];
            h.extend_from_slice(&(l4_len as u16).to_be_bytes());
            h.extend_from_slice(&[proto, 64]);
            h.extend_from_slice(&SRC6);
            h.extend_from_slice(&DST6);
            h
        } else {
            let mut h = vec![0x45, 0x10];
            h.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            h.extend_from_slice(&[0xab, 0xcd, 0x40, 0, 64, proto, 0, 0]);
            h.extend_from_slice(&SRC4);
            h.extend_from_slice(&DST4);
            let c = !simple_sum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
    }

    /// A TCP packet with valid checksums.
    fn tcp(v6: bool, sport: u16, flags: u8, seq: u32, opts: &[u8], payload: &[u8]) -> Vec<u8> {
        let th = 20 + opts.len();
        let mut p = ip_header(v6, IPPROTO_TCP, th + payload.len());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&443u16.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ACK.to_be_bytes());
        p.extend_from_slice(&[((th / 4) as u8) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(opts);
        p.extend_from_slice(payload);
        let iph = iph_len(&p);
        let c = !simple_sum(&with_pseudo(&p, IPPROTO_TCP));
        p[iph + 16..iph + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn udp(v6: bool, sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = ip_header(v6, IPPROTO_UDP, 8 + payload.len());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let iph = iph_len(&p);
        let c = !simple_sum(&with_pseudo(&p, IPPROTO_UDP));
        p[iph + 6..iph + 8].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// What a tun read with TSO returns: the header and a super-packet
    /// whose TCP checksum holds the pseudo-header sum.
    fn tso(v6: bool, flags: u8, opts: &[u8], payload: &[u8], mss: u16) -> (VnetHdr, Vec<u8>) {
        let mut p = tcp(v6, 1000, flags, SEQ, opts, payload);
        let iph = iph_len(&p);
        let ps = partial(&p, IPPROTO_TCP);
        p[iph + 16..iph + 18].copy_from_slice(&ps.to_be_bytes());
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            },
            hdr_len: (iph + 20 + opts.len()) as u16,
            gso_size: mss,
            csum_start: iph as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    fn uso(v6: bool, payload: &[u8], size: u16) -> (VnetHdr, Vec<u8>) {
        let mut p = udp(v6, 4000, payload);
        let iph = iph_len(&p);
        let ps = partial(&p, IPPROTO_UDP);
        p[iph + 6..iph + 8].copy_from_slice(&ps.to_be_bytes());
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
            hdr_len: (iph + 8) as u16,
            gso_size: size,
            csum_start: iph as u16,
            csum_offset: 6,
        };
        (hdr, p)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn collect(gro: &mut Gro) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        gro.flush(|b| out.push(b.to_vec()));
        out
    }

    fn split_vec(hdr: &VnetHdr, p: &[u8]) -> Vec<Vec<u8>> {
        let mut s = Segments::new();
        split(hdr, p, &mut s).unwrap_or_else(|e| panic!("{e}"));
        s.iter().map(<[u8]>::to_vec).collect()
    }

    /// Checks every segment of a TCP split, then coalesces them back.
    fn tcp_round_trip(v6: bool, flags: u8, opts: &[u8], n: usize, mss: u16) {
        let payload = data(n);
        let (hdr, orig) = tso(v6, flags, opts, &payload, mss);
        let segs = split_vec(&hdr, &orig);
        let mss = usize::from(mss);
        assert_eq!(segs.len(), n.div_ceil(mss));
        let hl = iph_len(&orig) + 20 + opts.len();
        let mut stream = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let iph = iph_len(s);
            let last = i + 1 == segs.len();
            assert!(l4_valid(s, IPPROTO_TCP), "segment {i} TCP checksum");
            if v6 {
                assert_eq!(usize::from(rd16(s, 4)), s.len() - 40);
            } else {
                assert!(ipv4_valid(s), "segment {i} IPv4 checksum");
                assert_eq!(usize::from(rd16(s, 2)), s.len());
                assert_eq!(rd16(s, 4), 0xabcd_u16.wrapping_add(i as u16));
            }
            assert_eq!(rd32(s, iph + 4), SEQ.wrapping_add((i * mss) as u32));
            let f = s[iph + TCP_FLAGS_AT];
            let want = if last {
                flags
            } else {
                flags & !(TCP_FIN | TCP_PSH)
            };
            assert_eq!(f, want, "segment {i} flags");
            assert_eq!(&s[iph + 20..hl], opts);
            assert_eq!(s.len() - hl, if last { n - i * mss } else { mss });
            stream.extend_from_slice(&s[hl..]);
        }
        assert_eq!(stream, payload);

        let mut gro = Gro::new();
        for s in &segs {
            gro.push(s);
        }
        let out = collect(&mut gro);
        if segs.len() == 1 {
            assert_eq!(out, vec![[&[0u8; 10][..], &segs[0]].concat()]);
        } else {
            assert_eq!(out.len(), 1);
            assert_eq!(
                VnetHdr::parse(&out[0]).unwrap_or_else(|e| panic!("{e}")),
                hdr
            );
            assert_eq!(&out[0][VNET_HDR_LEN..], &orig[..]);
        }
    }

    #[test]
    fn checksum_matches_simple_sum() {
        for n in 0..300 {
            let d = data(n);
            assert_eq!(checksum(&d, 0), simple_sum(&d), "length {n}");
            assert_eq!(
                checksum(&d, 0x1_2345),
                fold(u64::from(simple_sum(&d)) + 0x1_2345)
            );
        }
        assert_eq!(checksum(&[0xff; 4096], 0xffff_ffff_ffff_ffff), 0xffff);
    }

    #[test]
    fn vnet_hdr_round_trip_and_short() {
        let h = VnetHdr {
            flags: 1,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let b = h.encode();
        assert_eq!(b, [1, 0x84, 2, 1, 4, 3, 6, 5, 8, 7]);
        assert_eq!(VnetHdr::parse(&b).unwrap_or_else(|e| panic!("{e}")), h);
        assert_eq!(VnetHdr::parse(&b[..9]), Err(OffloadError::ShortVnetHdr(9)));
    }

    #[test]
    fn tcp4_round_trip() {
        tcp_round_trip(false, TCP_ACK, &TS_OPTS, 20_000, 1448);
        tcp_round_trip(false, TCP_ACK, &[], 65_535 - 40, 1460);
    }

    #[test]
    fn tcp6_round_trip() {
        tcp_round_trip(true, TCP_ACK, &TS_OPTS, 20_000, 1428);
        tcp_round_trip(true, TCP_ACK, &[], 65_535 - 60, 1440);
    }

    #[test]
    fn odd_mss_and_short_payloads() {
        tcp_round_trip(false, TCP_ACK, &TS_OPTS, 10_007, 1001);
        tcp_round_trip(true, TCP_ACK, &[], 4_999, 7);
        tcp_round_trip(false, TCP_ACK, &[], 100, 1448); // one segment
        tcp_round_trip(true, TCP_ACK, &TS_OPTS, 3_000, 1);
    }

    #[test]
    fn psh_only_on_last_segment() {
        tcp_round_trip(false, TCP_ACK | TCP_PSH, &TS_OPTS, 9_000, 1448);
        tcp_round_trip(true, TCP_ACK | TCP_PSH, &[], 9_000, 1000);
    }

    #[test]
    fn fin_only_on_last_segment_and_not_coalesced() {
        let (hdr, orig) = tso(false, TCP_ACK | TCP_PSH | TCP_FIN, &[], &data(5_000), 1000);
        let segs = split_vec(&hdr, &orig);
        assert_eq!(segs.len(), 5);
        for (i, s) in segs.iter().enumerate() {
            let f = s[20 + TCP_FLAGS_AT];
            assert_eq!(f & (TCP_FIN | TCP_PSH) != 0, i == 4);
            assert!(l4_valid(s, IPPROTO_TCP));
        }
        let mut gro = Gro::new();
        for s in &segs {
            gro.push(s);
        }
        let out = collect(&mut gro);
        assert_eq!(out.len(), 2);
        let h = VnetHdr::parse(&out[0]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(out[0].len(), VNET_HDR_LEN + 40 + 4_000);
        assert_eq!(out[1], [&[0u8; 10][..], &segs[4]].concat());
    }

    #[test]
    fn cwr_only_on_first_segment() {
        let (mut hdr, orig) = tso(false, TCP_ACK | TCP_CWR, &[], &data(3_000), 1000);
        hdr.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        let segs = split_vec(&hdr, &orig);
        let cwr: Vec<bool> = segs.iter().map(|s| s[33] & TCP_CWR != 0).collect();
        assert_eq!(cwr, [true, false, false]);
    }

    #[test]
    fn reordered_segment_not_coalesced() {
        let (hdr, orig) = tso(false, TCP_ACK, &[], &data(5_000), 1000);
        let segs = split_vec(&hdr, &orig);
        let mut gro = Gro::new();
        for i in [0, 1, 3, 2, 4] {
            gro.push(&segs[i]);
        }
        let out = collect(&mut gro);
        assert_eq!(out.len(), 4);
        assert_eq!(
            VnetHdr::parse(&out[0])
                .unwrap_or_else(|e| panic!("{e}"))
                .gso_type,
            VIRTIO_NET_HDR_GSO_TCPV4
        );
        assert_eq!(&out[0][VNET_HDR_LEN + 40..], &data(2_000)[..]);
        for (o, i) in out[1..].iter().zip([3, 2, 4]) {
            assert_eq!(o, &[&[0u8; 10][..], &segs[i]].concat());
        }
    }

    #[test]
    fn mixed_flows_keep_their_order() {
        let (ha, a) = tso(false, TCP_ACK, &TS_OPTS, &data(6_000), 1200);
        let (hb, mut b) = tso(true, TCP_ACK, &[], &data(3_500), 700);
        let sa = split_vec(&ha, &a);
        // Another IPv6 flow: a different source port, same everything else.
        b[40..42].copy_from_slice(&2000u16.to_be_bytes());
        let ps = partial(&b, IPPROTO_TCP);
        b[56..58].copy_from_slice(&ps.to_be_bytes());
        let sb = split_vec(&hb, &b);
        let icmp = [
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let mut gro = Gro::new_with_udp(true);
        for i in 0..5 {
            gro.push(&sb[i]);
            gro.push(&sa[i]);
            if i == 2 {
                gro.push(&icmp);
            }
        }
        assert_eq!(gro.len(), 3);
        let out = collect(&mut gro);
        assert!(gro.is_empty());
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], [&hb.encode()[..], &b].concat());
        assert_eq!(out[1], [&ha.encode()[..], &a].concat());
        assert_eq!(out[2], [&[0u8; 10][..], &icmp[..]].concat());
    }

    #[test]
    fn differing_headers_do_not_coalesce() {
        let p0 = tcp(false, 1, TCP_ACK, 100, &[], &[1; 100]);
        let mut ttl = tcp(false, 1, TCP_ACK, 200, &[], &[1; 100]);
        ttl[8] = 63;
        let ack_only = tcp(false, 1, TCP_ACK, 300, &[], &[]);
        let p3 = tcp(false, 1, TCP_ACK, 300, &[], &[1; 100]);
        let bigger = tcp(false, 1, TCP_ACK, 400, &[], &[1; 200]);
        let mut gro = Gro::new();
        for p in [&p0, &ttl, &ack_only, &p3, &bigger] {
            gro.push(p);
        }
        let out = collect(&mut gro);
        assert_eq!(out.len(), 5);
        assert!(out.iter().all(|o| o[..VNET_HDR_LEN] == [0; 10]));
    }

    #[test]
    fn pure_ack_between_segments_keeps_order() {
        let p0 = tcp(false, 1, TCP_ACK, 100, &[], &[1; 100]);
        let ack = tcp(false, 1, TCP_ACK, 200, &[], &[]);
        let p1 = tcp(false, 1, TCP_ACK, 200, &[], &[1; 100]);
        let p2 = tcp(false, 1, TCP_ACK, 300, &[], &[1; 100]);
        let mut gro = Gro::new();
        for p in [&p0, &ack, &p1, &p2] {
            gro.push(p);
        }
        let out = collect(&mut gro);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1][VNET_HDR_LEN..], ack[..]);
        assert_eq!(
            VnetHdr::parse(&out[2])
                .unwrap_or_else(|e| panic!("{e}"))
                .gso_size,
            100
        );
    }

    #[test]
    fn udp_split_and_coalesce() {
        for v6 in [false, true] {
            let payload = data(10_000);
            let (hdr, orig) = uso(v6, &payload, 1_300);
            let segs = split_vec(&hdr, &orig);
            assert_eq!(segs.len(), 8);
            let mut stream = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let iph = iph_len(s);
                assert!(l4_valid(s, IPPROTO_UDP), "datagram {i} checksum");
                assert_eq!(usize::from(rd16(s, iph + 4)), s.len() - iph);
                if !v6 {
                    assert!(ipv4_valid(s));
                }
                stream.extend_from_slice(&s[iph + 8..]);
            }
            assert_eq!(stream, payload);

            let mut gro = Gro::new_with_udp(true);
            for s in &segs {
                gro.push(s);
            }
            let out = collect(&mut gro);
            assert_eq!(out, vec![[&hdr.encode()[..], &orig].concat()]);

            let mut gro = Gro::new();
            for s in &segs {
                gro.push(s);
            }
            let out = collect(&mut gro);
            let alone: Vec<Vec<u8>> = segs.iter().map(|s| [&[0u8; 10][..], s].concat()).collect();
            assert_eq!(out, alone);
        }
    }

    #[test]
    fn udp_items_stop_at_64_datagrams() {
        let mut gro = Gro::new_with_udp(true);
        for _ in 0..70 {
            gro.push(&udp(false, 4000, &[9; 100]));
        }
        let out = collect(&mut gro);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), VNET_HDR_LEN + 28 + 64 * 100);
        assert_eq!(
            VnetHdr::parse(&out[1])
                .unwrap_or_else(|e| panic!("{e}"))
                .gso_size,
            100
        );
        assert_eq!(out[1].len(), VNET_HDR_LEN + 28 + 6 * 100);
    }

    #[test]
    fn gso_none_completes_checksum() {
        for v6 in [false, true] {
            let good = tcp(v6, 7, TCP_ACK | TCP_PSH, 1, &TS_OPTS, &data(333));
            let iph = iph_len(&good);
            let mut p = good.clone();
            let ps = partial(&p, IPPROTO_TCP);
            p[iph + 16..iph + 18].copy_from_slice(&ps.to_be_bytes());
            let hdr = VnetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                csum_start: iph as u16,
                csum_offset: 16,
                ..VnetHdr::default()
            };
            assert_eq!(split_vec(&hdr, &p), vec![good.clone()]);
            assert_eq!(split_vec(&VnetHdr::default(), &p), vec![p.clone()]);
            let bad = VnetHdr {
                csum_offset: (p.len() - iph - 1) as u16,
                ..hdr
            };
            assert!(matches!(
                split(&bad, &p, &mut Segments::new()),
                Err(OffloadError::BadCsum { .. })
            ));
        }
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let (hdr, p) = tso(false, TCP_ACK, &[], &data(3_000), 1000);
        let (hdr6, p6) = tso(true, TCP_ACK, &[], &data(3_000), 1000);
        let mut s = Segments::new();
        let mut e = |h: &VnetHdr, p: &[u8]| {
            split(h, p, &mut s)
                .err()
                .unwrap_or_else(|| panic!("accepted"))
        };

        assert_eq!(
            e(&VnetHdr { gso_size: 0, ..hdr }, &p),
            OffloadError::ZeroGsoSize
        );
        assert!(matches!(e(&hdr, &p[..30]), OffloadError::Truncated { .. }));
        assert!(matches!(e(&hdr, &[]), OffloadError::Truncated { .. }));
        assert!(matches!(
            e(&hdr, &p6),
            OffloadError::VersionMismatch { version: 6, .. }
        ));
        assert!(matches!(
            e(&hdr6, &p),
            OffloadError::VersionMismatch { version: 4, .. }
        ));
        assert_eq!(e(&hdr, &p[..40]), OffloadError::NoPayload);
        let gso_udp = VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_UDP,
            ..hdr
        };
        assert_eq!(e(&gso_udp, &p), OffloadError::UnsupportedGsoType(3));
        let moved = VnetHdr {
            csum_start: 24,
            ..hdr
        };
        assert!(matches!(e(&moved, &p), OffloadError::BadCsum { .. }));

        // IPv6 with a hop-by-hop extension header in front of TCP.
        let mut ext = p6.clone();
        ext[6] = 0;
        assert_eq!(e(&hdr6, &ext), OffloadError::UnexpectedProtocol(0));
        // A TCP data offset of 4 words.
        let mut doff = p.clone();
        doff[32] = 0x40;
        assert_eq!(e(&hdr, &doff), OffloadError::BadTcpHeaderLen(16));
        // An IPv4 header length of 16 bytes.
        let mut ihl = p.clone();
        ihl[0] = 0x44;
        assert_eq!(e(&hdr, &ihl), OffloadError::BadIpv4HeaderLen(16));
        let mut frag = p.clone();
        frag[6] |= IPV4_MF;
        assert_eq!(e(&hdr, &frag), OffloadError::Fragment);
        let mut v5 = p.clone();
        v5[0] = 0x55;
        assert_eq!(e(&hdr, &v5), OffloadError::BadIpVersion(5));
        let huge = VnetHdr {
            gso_size: u16::MAX,
            ..hdr
        };
        let (_, big) = tso(false, TCP_ACK, &[], &data(65_510), 1000);
        assert!(matches!(e(&huge, &big), OffloadError::SegmentTooLong(_)));
        assert_eq!(
            e(&hdr, &vec![0x45; MAX_PACKET_LEN + 1]),
            OffloadError::TooLong(MAX_PACKET_LEN + 1)
        );
        assert!(s.is_empty());
    }

    #[test]
    fn segments_reuse_storage() {
        let (hdr, p) = tso(false, TCP_ACK, &[], &data(20_000), 1448);
        let mut s = Segments::new();
        split(&hdr, &p, &mut s).unwrap_or_else(|e| panic!("{e}"));
        let n = s.len();
        let cap = (s.buf.capacity(), s.spans.capacity());
        split(&hdr, &p, &mut s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.len(), n);
        assert_eq!((s.buf.capacity(), s.spans.capacity()), cap);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.iter().count(), 0);
    }

    fn gso_type() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(VIRTIO_NET_HDR_GSO_NONE),
            Just(VIRTIO_NET_HDR_GSO_TCPV4),
            Just(VIRTIO_NET_HDR_GSO_TCPV6),
            Just(VIRTIO_NET_HDR_GSO_UDP_L4),
            Just(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN),
            any::<u8>(),
        ]
    }

    /// A valid super-packet (TCPv4, TCPv6 or UDP) with a few bytes changed.
    fn mutated() -> impl Strategy<Value = (VnetHdr, Vec<u8>)> {
        (
            0..4u8,
            1..5_000usize,
            1..2_000u16,
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            proptest::option::of(0..200usize),
        )
            .prop_map(|(kind, n, mss, edits, cut)| {
                let (hdr, mut p) = match kind {
                    0 => tso(false, TCP_ACK, &TS_OPTS, &data(n), mss),
                    1 => tso(true, TCP_ACK | TCP_PSH, &[], &data(n), mss),
                    2 => uso(false, &data(n), mss),
                    _ => uso(true, &data(n), mss),
                };
                for (at, v) in edits {
                    let at = at % 80.min(p.len());
                    p[at] = v;
                }
                if let Some(c) = cut {
                    p.truncate(c);
                }
                (hdr, p)
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..20)) {
            let r = VnetHdr::parse(&b);
            prop_assert_eq!(r.is_ok(), b.len() >= VNET_HDR_LEN);
            if let Ok(h) = r {
                prop_assert_eq!(&h.encode()[..], &b[..VNET_HDR_LEN]);
            }
        }

        #[test]
        fn split_never_panics_on_random_bytes(
            hdr in (any::<u8>(), gso_type(), any::<u16>(), any::<u16>(), 0..100u16, 0..40u16),
            mut b in proptest::collection::vec(any::<u8>(), 0..2_000),
            version in prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()],
        ) {
            if let Some(f) = b.first_mut() {
                *f = version;
            }
            let h = VnetHdr { flags: hdr.0, gso_type: hdr.1, hdr_len: hdr.2, gso_size: hdr.3, csum_start: hdr.4, csum_offset: hdr.5 };
            let mut s = Segments::new();
            if split(&h, &b, &mut s).is_err() {
                prop_assert!(s.is_empty());
            }
        }

        #[test]
        fn split_and_gro_never_panic_on_mutated_packets((hdr, p) in mutated(), gso in gso_type(), flags in any::<u8>()) {
            let mut s = Segments::new();
            let _ = split(&hdr, &p, &mut s);
            let odd = VnetHdr { gso_type: gso, flags, ..hdr };
            let _ = split(&odd, &p, &mut s);
            let mut gro = Gro::new_with_udp(true);
            let segs: Vec<Vec<u8>> = s.iter().map(<[u8]>::to_vec).collect();
            for seg in &segs {
                gro.push(seg);
            }
            gro.push(&p);
            let mut n = 0;
            gro.flush(|b| {
                assert!(b.len() >= VNET_HDR_LEN);
                n += 1;
            });
            prop_assert!(n >= 1);
        }

        #[test]
        fn gro_never_panics_on_random_packets(
            pkts in proptest::collection::vec(
                (prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()],
                 proptest::collection::vec(any::<u8>(), 0..200)),
                0..20),
            udp in any::<bool>(),
        ) {
            let mut gro = Gro::new_with_udp(udp);
            for (v, mut p) in pkts.clone() {
                if let Some(f) = p.first_mut() {
                    *f = v;
                }
                gro.push(&p);
            }
            let mut n = 0;
            gro.flush(|b| {
                assert!(b.len() >= VNET_HDR_LEN);
                n += 1;
            });
            prop_assert!(n <= pkts.len());
        }

        #[test]
        fn tcp_split_then_gro_reproduces_the_super_packet(
            v6 in any::<bool>(),
            n in 1..30_000usize,
            mss in 64..3_000u16,
            psh in any::<bool>(),
            opts in any::<bool>(),
        ) {
            let flags = if psh { TCP_ACK | TCP_PSH } else { TCP_ACK };
            let opts: &[u8] = if opts { &TS_OPTS } else { &[] };
            tcp_round_trip(v6, flags, opts, n, mss);
        }
    }

    /// What the `tun_offload` fuzz target does with one input.
    fn replay_fuzz_input(data: &[u8]) {
        let mut segs = Segments::new();
        if let Ok(hdr) = VnetHdr::parse(data) {
            let _ = split(&hdr, &data[VNET_HDR_LEN..], &mut segs);
        }
        for mut gro in [Gro::new(), Gro::new_with_udp(true)] {
            for seg in segs.iter() {
                gro.push(seg);
            }
            let mut rest = data;
            while let Some((&n, tail)) = rest.split_first() {
                let (pkt, next) = tail.split_at(usize::from(n).min(tail.len()));
                gro.push(pkt);
                rest = next;
            }
            gro.flush(|b| assert!(b.len() >= VNET_HDR_LEN));
        }
    }

    /// Fuzzer finds: an unfolded 64-bit address sum plus the length
    /// overflowed, first while finishing a coalesced item, then while
    /// checksumming a segment of a UDP super-packet.
    #[test]
    fn fuzz_finds_checksums_do_not_overflow() {
        for find in [
            "0005310001000000000045010000000000000911ffffffffffffffffffbfffffffffffffff0000ffffff0100000000000009000000000005310001000000017a4c010000000000000911a60000015a18181818181818181818181818ed181818181818181818181818181818000000000000000000181818188e180045010000000000000911a6f3000400f3f3f3f3f3f3f3f3f3f3f3f332f3f3f3f3f3f3f3002c6d06ffff404040",
            "0005306464000024646464646400ea0011ffffffffffffffffcdffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff5b5b5b5b5b5b5b5b5b5b5b5b5b5bdb5b5b5b5b5b5b5b5b000000000ba3686c025b06065555555706ff890089898989898989890000006464646464646489",
        ] {
            replay_fuzz_input(&hex::decode(find).unwrap());
        }
    }
}
