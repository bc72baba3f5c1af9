//! Link-local UDP datagrams inside a link's IPv6 packets, for a protocol
//! served in process (Babel): recognised in decrypted packets, and framed
//! for encryption, with the bytes the kernel would have written (IPv6
//! header, UDP header with a valid checksum), so that a far end reading
//! them from its tun device with a kernel socket (babeld) interoperates.

use std::net::Ipv6Addr;

use crate::offload::{checksum_no_fold, finish, pseudo_header_sum};

const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
/// IPv6 plus UDP headers.
pub const HEADERS: usize = IPV6_HEADER + UDP_HEADER;
const NEXT_HEADER_UDP: u8 = 17;

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

fn is_link_scope_multicast(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xff0f == 0xff02
}

/// A link-local UDP datagram found in an IPv6 packet.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkLocalDatagram<'a> {
    /// Source address (link-local).
    pub src: Ipv6Addr,
    /// Destination (link-local or link-scope multicast).
    pub dst: Ipv6Addr,
    /// The UDP payload.
    pub payload: &'a [u8],
}

/// The UDP payload of `packet` when it is an IPv6 packet without extension
/// headers carrying UDP to `port`, from a link-local source to a link-local
/// or link-scope multicast destination; None for anything else (which
/// then goes to the tun device as any packet). The UDP checksum is not
/// checked: the packet was authenticated by WireGuard.
pub fn link_local_udp(packet: &[u8], port: u16) -> Option<LinkLocalDatagram<'_>> {
    if packet.len() < HEADERS || packet[0] >> 4 != 6 || packet[6] != NEXT_HEADER_UDP {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    let mut a = [0u8; 16];
    a.copy_from_slice(&packet[8..24]);
    let src = Ipv6Addr::from(a);
    a.copy_from_slice(&packet[24..40]);
    let dst = Ipv6Addr::from(a);
    if !is_link_local(&src) || !(is_link_local(&dst) || is_link_scope_multicast(&dst)) {
        return None;
    }
    let udp = &packet[IPV6_HEADER..];
    if u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HEADER || udp_len > payload_len || udp_len > udp.len() {
        return None;
    }
    Some(LinkLocalDatagram {
        src,
        dst,
        payload: &udp[UDP_HEADER..udp_len],
    })
}

/// Writes into `out` (cleared first) the IPv6 packet carrying `payload`
/// from `src` to `dst`, UDP `port` to `port`, hop limit 1; false when the
/// payload does not fit a UDP datagram.
pub fn frame(src: Ipv6Addr, dst: Ipv6Addr, port: u16, payload: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(udp_len) = u16::try_from(UDP_HEADER + payload.len()) else {
        return false;
    };
    out.clear();
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[NEXT_HEADER_UDP, 1]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    // RFC 8200 §8.1: the pseudo-header, then the UDP header and payload.
    let pseudo = pseudo_header_sum(NEXT_HEADER_UDP, &src.octets(), &dst.octets(), udp_len);
    let csum = finish(checksum_no_fold(&out[IPV6_HEADER..], pseudo));
    out[IPV6_HEADER + 6..IPV6_HEADER + 8].copy_from_slice(&csum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LL_A: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa);
    const LL_B: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb);
    const MCAST: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 6);

    #[test]
    fn framed_datagrams_are_found_again() {
        let mut out = Vec::new();
        for dst in [LL_B, MCAST] {
            assert!(frame(LL_A, dst, 6696, b"babel", &mut out));
            let d = link_local_udp(&out, 6696).unwrap();
            assert_eq!((d.src, d.dst, d.payload), (LL_A, dst, &b"babel"[..]));
            assert_eq!(link_local_udp(&out, 6697), None);
        }
    }

    #[test]
    fn the_checksum_is_the_kernels() {
        // Verifying: the sum over pseudo-header and datagram, checksum
        // included, is all ones.
        let mut out = Vec::new();
        assert!(frame(LL_A, MCAST, 6696, b"odd length", &mut out));
        let len = (out.len() - IPV6_HEADER) as u16;
        let pseudo = pseudo_header_sum(NEXT_HEADER_UDP, &out[8..24], &out[24..40], len);
        let sum = crate::offload::fold(checksum_no_fold(&out[IPV6_HEADER..], pseudo));
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn other_packets_are_not_taken() {
        let mut out = Vec::new();
        assert!(frame(LL_A, LL_B, 6696, b"x", &mut out));
        let global: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut p = out.clone();
        p[8..24].copy_from_slice(&global.octets());
        assert_eq!(link_local_udp(&p, 6696), None, "global source");
        let mut p = out.clone();
        p[24..40].copy_from_slice(&global.octets());
        assert_eq!(link_local_udp(&p, 6696), None, "global destination");
        let mut p = out.clone();
        p[6] = 6;
        assert_eq!(link_local_udp(&p, 6696), None, "TCP");
        let mut p = out.clone();
        p[IPV6_HEADER + 5] = 200;
        assert_eq!(link_local_udp(&p, 6696), None, "UDP length past the end");
        assert_eq!(link_local_udp(&out[..30], 6696), None, "truncated");
    }

    proptest! {
        #[test]
        fn any_bytes_are_safe(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(d) = link_local_udp(&bytes, 6696) {
                prop_assert!(d.payload.len() + HEADERS <= bytes.len());
            }
        }
    }
}
