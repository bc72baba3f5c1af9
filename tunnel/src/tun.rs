//! Tun devices: one per link, created in the calling thread's network
//! namespace, set to `addr_gen_mode none`, given the MTU, brought up, and
//! given our link-local address (for diagnostics: `ping fe80::…%dev`;
//! Babel on links runs in process). The descriptor is non-blocking; closing
//! it removes the device. With offloads, every read and write carries a
//! virtio-net header (see [`crate::offload`]); a device whose kernel
//! refuses `TUNSETOFFLOAD` still gets the header, with plain packets.

use std::fs::File;
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use crate::plane::{io, PlaneError};

/// A tun device.
#[derive(Debug)]
pub struct Tun {
    /// Its descriptor.
    pub file: File,
    /// Its kernel index.
    pub ifindex: u32,
    /// Its name.
    pub name: String,
    /// Whether every read and write starts with a virtio-net header.
    pub vnet_hdr: bool,
    /// The offloads the kernel accepted.
    pub offload: Offload,
    /// Its MTU (TCP SYNs through it are clamped to it: [`crate::mss`]).
    pub mtu: u32,
}

/// Tun offloads in use on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// Plain packets, one per read and write.
    None,
    /// A virtio-net header before every packet; reads may return TCP
    /// super-packets (TSO) and writes may carry coalesced TCP (GRO).
    Tcp,
    /// Also UDP segmentation both ways (USO, Linux 6.2 and later).
    TcpUdp,
}

const IFF_VNET_HDR: libc::c_int = 0x4000;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_USO4: libc::c_ulong = 0x20;
const TUN_F_USO6: libc::c_ulong = 0x40;

/// Asks for checksum, TSO and (when the kernel has it) USO offloads.
fn set_offload(file: &File) -> Offload {
    let tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    for (flags, what) in [
        (tcp | TUN_F_USO4 | TUN_F_USO6, Offload::TcpUdp),
        (tcp, Offload::Tcp),
    ] {
        // SAFETY: TUNSETOFFLOAD takes its flags by value; the descriptor is
        // an open tun device.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, flags) } == 0 {
            return what;
        }
    }
    Offload::None
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

#[repr(C)]
struct IfReqName {
    name: [u8; libc::IFNAMSIZ],
    newname: [u8; libc::IFNAMSIZ],
    _pad: [u8; 8],
}

#[repr(C)]
struct In6IfReq {
    addr: [u8; 16],
    prefixlen: u32,
    ifindex: libc::c_int,
}

fn ioctl_ifreq(
    fd: libc::c_int,
    req: libc::c_ulong,
    name: &str,
    value: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut r = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        value,
        _pad: [0; 20],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `r` matches `struct ifreq` (name + an int in the union) in
    // size and layout; `fd` is an open socket.
    let rc = unsafe { libc::ioctl(fd, req, &mut r) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r.value)
    }
}

fn invalid(what: String) -> PlaneError {
    PlaneError::Io(what, std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

fn check_name(name: &str) -> Result<(), PlaneError> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(format!("interface name {name:?}")));
    }
    Ok(())
}

/// Creates a device in the current network namespace; with `offload`,
/// asks for a virtio-net header and offloads (falling back to plain
/// packets when the kernel refuses).
pub fn create(
    name: &str,
    mtu: u32,
    link_local: Ipv6Addr,
    offload: bool,
) -> Result<Tun, PlaneError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    check_name(name)?;
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io("opening /dev/net/tun"))?;
    let flags = libc::IFF_TUN | libc::IFF_NO_PI;
    ioctl_ifreq(
        file.as_raw_fd(),
        TUNSETIFF,
        name,
        if offload { flags | IFF_VNET_HDR } else { flags },
    )
    .map_err(io(format!("creating {name}")))?;
    let vnet_hdr = offload;
    let offload = if offload {
        set_offload(&file)
    } else {
        Offload::None
    };
    // Non-blocking: the reactor drains what is there after each wake.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let ifindex = configure(name, mtu, link_local)?;
    Ok(Tun {
        file,
        ifindex,
        name: name.to_string(),
        vnet_hdr,
        offload,
        mtu,
    })
}

/// A parked device of a closed link, renamed and configured for a new one:
/// removing a device and creating another both hold the kernel's RTNL
/// lock, removal for RCU grace periods (~25 ms each here), which a host
/// of many nodes pays machine-wide.
pub fn reuse(mut tun: Tun, name: &str, mtu: u32, link_local: Ipv6Addr) -> Result<Tun, PlaneError> {
    check_name(name)?;
    if tun.name != name {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(io("control socket"))?;
        let fd = sock.as_raw_fd();
        // Only a device that is down can be renamed; down also drops its
        // addresses and routes.
        let flags = ioctl_ifreq(fd, libc::SIOCGIFFLAGS, &tun.name, 0)
            .map_err(io(format!("flags of {}", tun.name)))?;
        ioctl_ifreq(fd, libc::SIOCSIFFLAGS, &tun.name, flags & !libc::IFF_UP)
            .map_err(io(format!("bringing {} down", tun.name)))?;
        let mut r = IfReqName {
            name: [0; libc::IFNAMSIZ],
            newname: [0; libc::IFNAMSIZ],
            _pad: [0; 8],
        };
        r.name[..tun.name.len()].copy_from_slice(tun.name.as_bytes());
        r.newname[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `r` matches `struct ifreq` with `ifr_newname` in the
        // union, in size and layout; `fd` is an open socket.
        if unsafe { libc::ioctl(fd, libc::SIOCSIFNAME, &mut r) } < 0 {
            return Err(PlaneError::Io(
                format!("renaming {} to {name}", tun.name),
                std::io::Error::last_os_error(),
            ));
        }
        tun.name = name.to_string();
    }
    tun.ifindex = configure(name, mtu, link_local)?;
    tun.mtu = mtu;
    Ok(tun)
}

/// Sets the MTU of device `name` (takes the kernel's RTNL lock: not on
/// the reactor).
pub fn set_mtu(name: &str, mtu: u32) -> Result<(), PlaneError> {
    check_name(name)?;
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(io("control socket"))?;
    ioctl_ifreq(sock.as_raw_fd(), libc::SIOCSIFMTU, name, mtu as libc::c_int)
        .map(|_| ())
        .map_err(io(format!("MTU of {name}")))
}

/// MTU, up, our link-local address (and no kernel-made one); returns the
/// device's kernel index.
fn configure(name: &str, mtu: u32, link_local: Ipv6Addr) -> Result<u32, PlaneError> {
    // No kernel-made link-local address: ours is set below.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/addr_gen_mode"), "1");
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(io("control socket"))?;
    let fd = sock.as_raw_fd();
    ioctl_ifreq(fd, libc::SIOCSIFMTU, name, mtu as libc::c_int)
        .map_err(io(format!("MTU of {name}")))?;
    let flags =
        ioctl_ifreq(fd, libc::SIOCGIFFLAGS, name, 0).map_err(io(format!("flags of {name}")))?;
    ioctl_ifreq(
        fd,
        libc::SIOCSIFFLAGS,
        name,
        flags | libc::IFF_UP | libc::IFF_MULTICAST,
    )
    .map_err(io(format!("bringing {name} up")))?;
    let c = std::ffi::CString::new(name).map_err(|_| invalid(name.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    let sock6 = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0))
        .map_err(io("IPv6 control socket"))?;
    let mut req = In6IfReq {
        addr: link_local.octets(),
        prefixlen: 64,
        ifindex: ifindex as libc::c_int,
    };
    // SAFETY: `req` matches `struct in6_ifreq`; the socket is open.
    let rc = unsafe { libc::ioctl(sock6.as_raw_fd(), libc::SIOCSIFADDR, &mut req) };
    // A reused device that kept its address (not renamed) already has it.
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(PlaneError::Io(format!("address of {name}"), e));
        }
    }
    Ok(ifindex)
}
