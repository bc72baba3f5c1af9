//! UDP segmentation offloads (Linux): send many equal-sized datagrams in
//! one `sendmsg` (`UDP_SEGMENT`), receive coalesced datagrams in one
//! `recvmsg` (`UDP_GRO`). The peers of the benchmark lose to one system
//! call per packet; this is the way past it.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;

use socket2::{MaybeUninitSlice, MsgHdr, MsgHdrMut, SockAddr, Socket};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most segments the kernel takes in one GSO send.
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send.
pub const MAX_GSO_BYTES: usize = 65_000;

/// Space for one control message with an `int` (or `u16`) payload.
const CMSG_SPACE: usize = 32;

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`).
pub fn enable_gro(s: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which
    // outlives the call; the descriptor is the socket's own.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `data` to `dst` as datagrams of `segment` bytes (the last may be
/// shorter) in one system call.
pub fn send_segments(s: &Socket, data: &[u8], segment: usize, dst: &SockAddr) -> io::Result<usize> {
    let mut control = [0u8; CMSG_SPACE];
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    let cmsg_len = hdr_len + std::mem::size_of::<u16>();
    // cmsghdr { cmsg_len: size_t, cmsg_level: int, cmsg_type: int } then the data.
    control[..std::mem::size_of::<usize>()].copy_from_slice(&cmsg_len.to_ne_bytes());
    let lvl = std::mem::size_of::<usize>();
    control[lvl..lvl + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
    control[lvl + 4..lvl + 8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    let seg = u16::try_from(segment).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    control[hdr_len..hdr_len + 2].copy_from_slice(&seg.to_ne_bytes());
    let space = (cmsg_len + 7) & !7;
    let bufs = [IoSlice::new(data)];
    let msg = MsgHdr::new()
        .with_addr(dst)
        .with_buffers(&bufs)
        .with_control(&control[..space]);
    s.sendmsg(&msg, 0)
}

/// Receives into `buf`; returns the length, the source and the segment
/// size when the kernel coalesced several datagrams (0: one datagram).
pub fn recv_segments(s: &Socket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    let mut control = [MaybeUninit::<u8>::uninit(); 64];
    // SAFETY: MaybeUninit<u8> has the layout of u8; the kernel only writes
    // into the buffer, and we read back only the `n` bytes it reports.
    let uninit: &mut [MaybeUninit<u8>] =
        unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    let mut bufs = [MaybeUninitSlice::new(uninit)];
    // SAFETY: an all-zero sockaddr_storage is a valid (empty) address of
    // full capacity, which recvmsg fills in.
    let mut addr = unsafe {
        SockAddr::new(
            std::mem::zeroed(),
            std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        )
    };
    let (n, clen) = {
        let mut msg = MsgHdrMut::new()
            .with_addr(&mut addr)
            .with_buffers(&mut bufs)
            .with_control(&mut control);
        let n = s.recvmsg(&mut msg, 0)?;
        (n, msg.control_len())
    };
    let src = addr
        .as_socket()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the first `clen` bytes of `control` were written by recvmsg.
    let control: &[u8] = unsafe {
        std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), clen.min(control.len()))
    };
    let mut segment = 0;
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    let lvl = std::mem::size_of::<usize>();
    let mut off = 0;
    while off + hdr_len <= control.len() {
        let mut l = [0u8; 8];
        l[..lvl].copy_from_slice(&control[off..off + lvl]);
        let len = usize::from_ne_bytes(l);
        let level = i32::from_ne_bytes([
            control[off + lvl],
            control[off + lvl + 1],
            control[off + lvl + 2],
            control[off + lvl + 3],
        ]);
        let kind = i32::from_ne_bytes([
            control[off + lvl + 4],
            control[off + lvl + 5],
            control[off + lvl + 6],
            control[off + lvl + 7],
        ]);
        if len < hdr_len {
            break;
        }
        if level == SOL_UDP && kind == UDP_GRO && off + hdr_len + 4 <= control.len() {
            let d = &control[off + hdr_len..off + hdr_len + 4];
            segment = i32::from_ne_bytes([d[0], d[1], d[2], d[3]]).max(0) as usize;
        }
        off += (len + 7) & !7;
    }
    Ok((n, src, segment))
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Type};
    use std::time::Duration;

    #[test]
    fn segments_go_out_and_come_back_coalesced_or_not() -> io::Result<()> {
        let rx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        rx.bind(&SockAddr::from(
            "127.0.0.1:0"
                .parse::<SocketAddr>()
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        ))?;
        rx.set_read_timeout(Some(Duration::from_secs(2)))?;
        let gro = enable_gro(&rx).is_ok();
        let dst = rx.local_addr()?;
        let tx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        assert_eq!(send_segments(&tx, &data, 1000, &dst)?, 3000);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while got.len() < 3000 {
            let (n, _, seg) = recv_segments(&rx, &mut buf)?;
            if seg > 0 {
                assert!(gro);
                for chunk in buf[..n].chunks(seg) {
                    assert!(chunk.len() <= 1000);
                    got.extend_from_slice(chunk);
                }
            } else {
                assert_eq!(n, 1000);
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(got, data);
        Ok(())
    }
}
