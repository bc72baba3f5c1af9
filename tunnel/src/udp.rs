//! UDP segmentation offloads (Linux): send many equal-sized datagrams in
//! one `sendmsg` (`UDP_SEGMENT`), receive coalesced datagrams in one
//! `recvmsg` (`UDP_GRO`). The peers of the benchmark lose to one system
//! call per packet; this is the way past it.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

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

/// Sets an `int` socket option to 1.
fn enable(s: &Socket, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which
    // outlives the call; the descriptor is the socket's own.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            name,
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

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`).
pub fn enable_gro(s: &Socket) -> io::Result<()> {
    enable(s, SOL_UDP, UDP_GRO)
}

/// Asks the kernel to stamp received datagrams (`SO_TIMESTAMPNS`), so
/// that RTT samples do not count time spent in our own queues.
pub fn enable_timestamps(s: &Socket) -> io::Result<()> {
    enable(s, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS)
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

/// One `recvmsg`: what arrived.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// From.
    pub src: SocketAddr,
    /// Segment size when the kernel coalesced several datagrams (0: one).
    pub segment: usize,
    /// When the kernel received it (`SO_TIMESTAMPNS`, mapped to the
    /// monotonic clock; the time of the call without a stamp).
    pub at: Instant,
}

impl Received {
    /// The datagrams in `buf` (one, or the segments GRO coalesced).
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> std::slice::Chunks<'a, u8> {
        let data = &buf[..self.len.min(buf.len())];
        data.chunks(if self.segment == 0 {
            self.len.max(1)
        } else {
            self.segment
        })
    }
}

/// Reads one native-endian `i32` at `off`, if it is there.
fn ne_i32(b: &[u8], off: usize) -> Option<i32> {
    let s = b.get(off..off + 4)?;
    Some(i32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Maps a `CLOCK_REALTIME` stamp to the monotonic clock.
fn stamp_to_instant(now: Instant, stamp: Duration) -> Instant {
    let wall = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    now.checked_sub(wall.saturating_sub(stamp)).unwrap_or(now)
}

/// Receives into `buf` (without blocking when the socket is non-blocking).
pub fn recv_segments(s: &Socket, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = [MaybeUninit::<u8>::uninit(); 128];
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
    let now = Instant::now();
    // A dual-stack socket sees IPv4 peers as IPv4-mapped: named as IPv4,
    // one peer has one address everywhere (tunnels, cache, NAT claims).
    let src = addr
        .as_socket()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the first `clen` bytes of `control` were written by recvmsg.
    let control: &[u8] = unsafe {
        std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), clen.min(control.len()))
    };
    let mut out = Received {
        len: n,
        src,
        segment: 0,
        at: now,
    };
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    let lvl = std::mem::size_of::<usize>();
    let mut off = 0;
    while off + hdr_len <= control.len() {
        let mut l = [0u8; 8];
        l[..lvl].copy_from_slice(&control[off..off + lvl]);
        let len = usize::from_ne_bytes(l);
        if len < hdr_len {
            break;
        }
        let (Some(level), Some(kind)) =
            (ne_i32(control, off + lvl), ne_i32(control, off + lvl + 4))
        else {
            break;
        };
        let data = &control[off + hdr_len..(off + len).min(control.len())];
        if level == SOL_UDP && kind == UDP_GRO {
            if let Some(seg) = ne_i32(data, 0) {
                out.segment = seg.max(0) as usize;
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS && data.len() >= 16 {
            let mut sec = [0u8; 8];
            let mut nsec = [0u8; 8];
            sec.copy_from_slice(&data[..8]);
            nsec.copy_from_slice(&data[8..16]);
            let (sec, nsec) = (i64::from_ne_bytes(sec), i64::from_ne_bytes(nsec));
            if sec >= 0 && (0..1_000_000_000).contains(&nsec) {
                out.at = stamp_to_instant(now, Duration::new(sec as u64, nsec as u32));
            }
        }
        off += (len + 7) & !7;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Type};

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
            let r = recv_segments(&rx, &mut buf)?;
            let (n, seg) = (r.len, r.segment);
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
