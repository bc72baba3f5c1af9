//! TCP MSS clamping on a link, sans-IO: the maximum segment size a SYN
//! announces is lowered to what the link's MTU carries (as `iptables -j
//! TCPMSS --clamp-mss-to-pmtu` does), in both directions, so that TCP
//! between hosts whose own MTU is larger (a LAN behind `--main-interface`
//! at 1500) never sends segments the tunnel must refuse, even where ICMP
//! "packet too big" is filtered. The checksum is updated incrementally
//! (RFC 1624); the packet must carry a complete one.

/// Fixed IPv4, IPv6 and TCP header lengths.
const IPV4_MIN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_MIN: usize = 20;
const TCP: u8 = 6;
const SYN: u8 = 0x02;
const MSS_KIND: u8 = 2;

/// The largest MSS a link of `mtu` bytes carries for IPv4 or IPv6.
pub fn max_mss(mtu: u32, v6: bool) -> u16 {
    let headers = if v6 { IPV6_LEN } else { IPV4_MIN } + TCP_MIN;
    u16::try_from(mtu.saturating_sub(headers as u32)).unwrap_or(u16::MAX)
}

/// Lowers the MSS option of a TCP SYN in `packet` to what `mtu`
/// carries; returns whether the packet changed. Anything else (not TCP,
/// not a SYN, a fragment, IPv6 extension headers, truncated) is left as
/// it is.
pub fn clamp(packet: &mut [u8], mtu: u32) -> bool {
    let Some(first) = packet.first() else {
        return false;
    };
    let (tcp_at, v6) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            let fragment = packet
                .get(6..8)
                .is_none_or(|f| u16::from_be_bytes([f[0], f[1]]) & 0x1fff != 0);
            if ihl < IPV4_MIN || packet.get(9) != Some(&TCP) || fragment {
                return false;
            }
            (ihl, false)
        }
        6 if packet.get(6) == Some(&TCP) => (IPV6_LEN, true),
        _ => return false,
    };
    let Some(tcp) = packet.get_mut(tcp_at..) else {
        return false;
    };
    if tcp.len() < TCP_MIN || tcp[13] & SYN == 0 {
        return false;
    }
    let data_at = usize::from(tcp[12] >> 4) * 4;
    if data_at < TCP_MIN || data_at > tcp.len() {
        return false;
    }
    let limit = max_mss(mtu, v6);
    let mut i = TCP_MIN;
    while i < data_at {
        match tcp[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let len = tcp.get(i + 1).map_or(0, |l| usize::from(*l));
                if len < 2 || i + len > data_at {
                    return false;
                }
                if kind == MSS_KIND && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= limit {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&limit.to_be_bytes());
                    let sum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    tcp[16..18].copy_from_slice(&adjust(sum, old, limit).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// RFC 1624: the checksum `sum` after a 16-bit word went from `old` to
/// `new`.
fn adjust(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{checksum, pseudo_header_sum};
    use proptest::prelude::*;

    /// A TCP segment with `flags` and an MSS option of `mss`, in IPv6 or
    /// IPv4, with a correct checksum.
    fn syn(v6: bool, flags: u8, mss: u16) -> Vec<u8> {
        let mut tcp = vec![0u8; 24];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 6 << 4;
        tcp[13] = flags;
        tcp[20..24].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
        let mut p = if v6 {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
            h[6] = TCP;
            h[7] = 64;
            h[8] = 0xfd;
            h[23] = 1;
            h[24] = 0xfd;
            h[39] = 2;
            h
        } else {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            h[8] = 64;
            h[9] = TCP;
            h[12..16].copy_from_slice(&[198, 18, 0, 1]);
            h[16..20].copy_from_slice(&[198, 18, 0, 2]);
            h
        };
        let at = p.len();
        p.extend(tcp);
        let sum = tcp_sum(&p, at);
        p[at + 16..at + 18].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// The checksum the TCP segment at `at` should carry.
    fn tcp_sum(p: &[u8], at: usize) -> u16 {
        let (src, dst) = if p[0] >> 4 == 6 {
            (&p[8..24], &p[24..40])
        } else {
            (&p[12..16], &p[16..20])
        };
        let mut seg = p[at..].to_vec();
        seg[16] = 0;
        seg[17] = 0;
        let pseudo = pseudo_header_sum(TCP, src, dst, seg.len() as u16);
        !checksum(&seg, pseudo)
    }

    #[test]
    fn a_syn_announcing_too_much_is_clamped_with_a_valid_checksum() {
        for (v6, at) in [(true, 40), (false, 20)] {
            let mut p = syn(v6, SYN, 1460);
            assert!(clamp(&mut p, 1420), "v6 {v6}");
            let mss = u16::from_be_bytes([p[at + 22], p[at + 23]]);
            assert_eq!(mss, if v6 { 1360 } else { 1380 });
            let stored = u16::from_be_bytes([p[at + 16], p[at + 17]]);
            assert_eq!(stored, tcp_sum(&p, at), "checksum after clamping, v6 {v6}");
        }
    }

    #[test]
    fn small_enough_or_not_a_syn_is_left_alone() {
        let mut p = syn(true, SYN, 1200);
        assert!(!clamp(&mut p, 1420));
        let mut ack = syn(true, 0x10, 1460);
        let before = ack.clone();
        assert!(!clamp(&mut ack, 1420));
        assert_eq!(ack, before);
        let mut udp = syn(true, SYN, 1460);
        udp[6] = 17;
        assert!(!clamp(&mut udp, 1420));
        assert_eq!(max_mss(1280, true), 1220);
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(
            mut data in proptest::collection::vec(any::<u8>(), 0..200),
            v6 in any::<bool>(),
            mtu in 0u32..70_000,
        ) {
            if let Some(b) = data.first_mut() {
                *b = (*b & 0x0f) | if v6 { 0x60 } else { 0x40 };
            }
            if data.len() > 9 {
                data[if v6 { 6 } else { 9 }] = TCP;
            }
            let _ = clamp(&mut data, mtu);
        }
    }
}
