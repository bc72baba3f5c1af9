//! The tokio driver: owns the sockets, the clock and the kernel, and feeds
//! the sans-IO [`Router`].
//!
//! One UDP socket per interface, bound to `[::]:6696` and to the device
//! (`SO_BINDTODEVICE`), joined to `ff02::1:6` there. Packets whose source is
//! not link-local are dropped by the router. Interfaces can be added and
//! removed at runtime through [`Command`]s.
//!
//! Each packet carries the kernel's receive timestamp (`SO_TIMESTAMPNS`),
//! so RTT samples do not count time spent in our own queues. Kernel routes
//! are written by a task of their own, which coalesces changes per
//! destination: the routing loop never waits for netlink. The router's
//! seqno is persisted (`seqno_file`) in reserved blocks, so that a crashed
//! node restarts with a seqno newer than any it used.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use ipnet::IpNet;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::auth::AuthConfig;
use crate::effects::{self, Effects};
use crate::neighbour::IfaceId;
use crate::router::{Destination, InterfaceConfig, Router, RouterConfig, RoutingState};
use crate::wire::{MULTICAST, PORT};

/// Requests to a running driver.
#[derive(Debug)]
pub enum Command {
    /// Run Babel on this interface (by name).
    AddInterface(String, InterfaceConfig),
    /// Stop running Babel on it.
    RemoveInterface(String),
    /// Announce a prefix (optionally source-specific).
    Export(IpNet, Option<IpNet>),
    /// Stop announcing it.
    Unexport(IpNet, Option<IpNet>),
    /// Change an interface's cost multiplier (drain).
    SetCostMultiplier(String, u16),
    /// Change an interface's Hello interval.
    SetHelloInterval(String, Duration),
    /// Change the MAC keys (or turn authentication on or off).
    SetAuth(Option<AuthConfig>),
    /// Report neighbours and routes.
    Status(oneshot::Sender<Status>),
    /// Retract everything, remove our routes, stop.
    Shutdown,
}

/// A neighbour as reported.
#[derive(Clone, Debug, Serialize)]
pub struct NeighbourStatus {
    /// Interface name.
    pub interface: String,
    /// Link-local address.
    pub address: Ipv6Addr,
    /// Hello history as a bit string (most recent first).
    pub reach: String,
    /// Our rxcost for it.
    pub rxcost: u16,
    /// Its rxcost for us.
    pub txcost: u16,
    /// Smoothed RTT in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Link cost.
    pub cost: u16,
}

/// A route as reported.
#[derive(Clone, Debug, Serialize)]
pub struct RouteStatus {
    /// Destination.
    pub prefix: String,
    /// Source prefix.
    pub src_prefix: Option<String>,
    /// Originator.
    pub router_id: String,
    /// Seqno.
    pub seqno: u16,
    /// Metric.
    pub metric: u16,
    /// Neighbour's metric.
    pub refmetric: u16,
    /// Interface name.
    pub interface: String,
    /// Next hop.
    pub next_hop: IpAddr,
    /// Selected and installed.
    pub selected: bool,
    /// Feasible now.
    pub feasible: bool,
}

/// The state of the router.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Our router-id.
    pub router_id: String,
    /// Exported prefixes.
    pub exports: Vec<String>,
    /// Neighbours.
    pub neighbours: Vec<NeighbourStatus>,
    /// Routes.
    pub routes: Vec<RouteStatus>,
    /// Our current seqno.
    pub seqno: u16,
    /// Counters.
    pub packets_in: u64,
    /// Packets refused.
    pub packets_rejected: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Selected-route changes.
    pub route_switches: u64,
    /// Packets and TLVs refused, by reason label.
    pub drops: BTreeMap<String, u64>,
}

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The router's settings.
    pub router: RouterConfig,
    /// Kernel routing table (254 = main).
    pub table: u32,
    /// Our route protocol number.
    pub proto: u8,
    /// Preferred source addresses of installed routes.
    pub pref_src: crate::kernel::PrefSrc,
    /// Whether to program the kernel at all.
    pub install: bool,
    /// Prefixes held `unreachable` (low preference) while we run, so that
    /// overlay traffic without a route never leaves by the default route.
    pub cover: Vec<IpNet>,
    /// Where the seqno is persisted across restarts (None: not persisted).
    pub seqno_file: Option<PathBuf>,
}

/// 32 bytes from the operating system, to seed a router.
pub fn os_seed() -> anyhow::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(seed)
}

/// Formats a router-id as babeld does (colon-separated hex).
pub fn format_router_id(id: &[u8; 8]) -> String {
    id.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The link-local address of an interface, from /proc/net/if_inet6.
pub fn link_local_of(name: &str) -> Option<Ipv6Addr> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[5] == name && f[3] == "20" {
            let v = u128::from_str_radix(f[0], 16).ok()?;
            return Some(Ipv6Addr::from(v));
        }
    }
    None
}

/// The kernel index of an interface.
pub fn ifindex_of(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        anyhow::bail!("no interface named {name:?}");
    }
    Ok(idx)
}

/// A Babel socket on the interface `name`: bound to `[::]:6696` and to the
/// device, joined to `ff02::1:6`, stamping receive times
/// (`SO_TIMESTAMPNS`), non-blocking.
pub fn babel_socket(name: &str, ifindex: u32) -> anyhow::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).context("socket")?;
    s.set_only_v6(true)?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(name.as_bytes()))
        .with_context(|| format!("binding to device {name}"))?;
    s.bind(&SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PORT, 0, 0)).into())
        .with_context(|| format!("binding [::]:{PORT} on {name}"))?;
    s.join_multicast_v6(&MULTICAST, ifindex)
        .with_context(|| format!("joining ff02::1:6 on {name}"))?;
    s.set_multicast_loop_v6(false)?;
    s.set_multicast_hops_v6(1)?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_TIMESTAMPNS");
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

fn open_socket(name: &str, ifindex: u32) -> anyhow::Result<UdpSocket> {
    UdpSocket::from_std(babel_socket(name, ifindex)?.into()).context("registering the socket")
}

struct IfaceState {
    name: String,
    socket: Arc<UdpSocket>,
    reader: tokio::task::JoinHandle<()>,
}

struct Received {
    ifindex: u32,
    src: IpAddr,
    at: Instant,
    bytes: Vec<u8>,
}

fn to_std(now: tokio::time::Instant) -> Instant {
    now.into_std()
}

/// Runs the router until [`Command::Shutdown`] or the command channel closes.
pub async fn run(cfg: DriverConfig, mut commands: mpsc::Receiver<Command>) -> anyhow::Result<()> {
    let start = to_std(tokio::time::Instant::now());
    let mut rcfg = cfg.router.clone();
    if let Some(s) = cfg.seqno_file.as_deref().and_then(effects::load_seqno) {
        rcfg.seqno = s;
    }
    let mut effects = Effects::start(&cfg, rcfg.seqno).await?;
    let mut router = Router::new(rcfg, start);
    let (rx_tx, mut rx) = mpsc::channel::<Received>(1024);
    let mut ifaces: HashMap<u32, IfaceState> = HashMap::new();
    let mut link_local_retry = tokio::time::interval(Duration::from_secs(1));
    loop {
        let deadline = router
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
        let mut shutdown = false;
        tokio::select! {
            Some(p) = rx.recv() => {
                let now = to_std(tokio::time::Instant::now());
                router.handle_packet(now, p.at, IfaceId(p.ifindex), p.src, &p.bytes);
            }
            () = tokio::time::sleep_until(deadline) => {
                router.handle_timeout(to_std(tokio::time::Instant::now()));
            }
            _ = link_local_retry.tick() => {
                for (&idx, state) in &ifaces {
                    if router.lacks_link_local(IfaceId(idx)) {
                        if let Some(ll) = link_local_of(&state.name) {
                            router.set_link_local(IfaceId(idx), ll);
                        }
                    }
                }
            }
            cmd = commands.recv() => {
                let now = to_std(tokio::time::Instant::now());
                match cmd {
                    None | Some(Command::Shutdown) => {
                        router.shutdown(now);
                        shutdown = true;
                    }
                    Some(Command::AddInterface(name, mut icfg)) => {
                        match add_interface(&name, &rx_tx) {
                            Ok((idx, state)) => {
                                icfg.link_local = link_local_of(&name);
                                router.add_interface(IfaceId(idx), icfg, now);
                                if let Some(old) = ifaces.insert(idx, state) {
                                    old.reader.abort();
                                }
                                tracing::info!(interface = %name, "interface added");
                            }
                            Err(e) => tracing::warn!(interface = %name, error = %format!("{e:#}"), "cannot run Babel here"),
                        }
                    }
                    Some(Command::RemoveInterface(name)) => {
                        if let Some((&idx, _)) = ifaces.iter().find(|(_, s)| s.name == name) {
                            router.remove_interface(IfaceId(idx), now);
                            if let Some(s) = ifaces.remove(&idx) {
                                s.reader.abort();
                            }
                        }
                    }
                    Some(Command::Export(p, s)) => router.export(p, s, now),
                    Some(Command::Unexport(p, s)) => router.unexport(p, s, now),
                    Some(Command::SetCostMultiplier(name, m)) => {
                        if let Some((&idx, _)) = ifaces.iter().find(|(_, s)| s.name == name) {
                            router.set_cost_multiplier(IfaceId(idx), m, now);
                        }
                    }
                    Some(Command::SetHelloInterval(name, d)) => {
                        if let Some((&idx, _)) = ifaces.iter().find(|(_, s)| s.name == name) {
                            router.set_hello_interval(IfaceId(idx), d, now);
                        }
                    }
                    Some(Command::SetAuth(auth)) => router.set_auth(auth),
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(status(&router, &ifaces, now));
                    }
                }
            }
        }
        while let Some(t) = router.poll_transmit() {
            let Some(state) = ifaces.get(&t.iface.0) else {
                continue;
            };
            let dst = match t.dst {
                Destination::Multicast => SocketAddrV6::new(MULTICAST, PORT, 0, t.iface.0),
                Destination::Unicast(a) => SocketAddrV6::new(a, PORT, 0, t.iface.0),
            };
            send(state, &t.bytes, SocketAddr::V6(dst)).await;
        }
        effects.drain(&mut router);
        if shutdown {
            // Give the final packets a moment to leave, then clean the kernel.
            tokio::time::sleep(Duration::from_millis(50)).await;
            effects.flush().await;
            for (_, s) in ifaces.drain() {
                s.reader.abort();
            }
            return Ok(());
        }
    }
}

/// Sends one packet; a full socket buffer is waited for briefly (a full
/// dump is a burst) rather than dropping the packet at once.
async fn send(state: &IfaceState, bytes: &[u8], dst: SocketAddr) {
    const SEND_WAIT: Duration = Duration::from_millis(50);
    let result = match state.socket.try_send_to(bytes, dst) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            match tokio::time::timeout(SEND_WAIT, state.socket.send_to(bytes, dst)).await {
                Ok(r) => r,
                Err(_) => Err(e),
            }
        }
        r => r,
    };
    if let Err(e) = result {
        tracing::debug!(interface = %state.name, error = %e, "send failed");
    }
}

/// Receives one datagram with the kernel's receive time (`SO_TIMESTAMPNS`,
/// mapped to the monotonic clock; now if the kernel gave none).
async fn recv_timestamped(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Instant)> {
    use std::os::fd::AsRawFd;
    sock.async_io(tokio::io::Interest::READABLE, || {
        let mut name: libc::sockaddr_in6 =
            // SAFETY: sockaddr_in6 is plain old data; all zeroes is valid.
            unsafe { std::mem::zeroed() };
        let mut cmsg = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; all zeroes is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_in6).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: every pointer in `msg` points into live buffers of the
        // lengths given, for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let now = Instant::now();
        let mut at = now;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled,
        // within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    let stamp = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                    let wall = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    at = now.checked_sub(wall.saturating_sub(stamp)).unwrap_or(now);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let ip = Ipv6Addr::from(name.sin6_addr.s6_addr);
        let from = SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(name.sin6_port),
            0,
            name.sin6_scope_id,
        ));
        Ok((n as usize, from, at))
    })
    .await
}

fn add_interface(name: &str, tx: &mpsc::Sender<Received>) -> anyhow::Result<(u32, IfaceState)> {
    let idx = ifindex_of(name)?;
    let socket = Arc::new(open_socket(name, idx)?);
    let (sock, tx) = (Arc::clone(&socket), tx.clone());
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            match recv_timestamped(&sock, &mut buf).await {
                Ok((len, from, at)) => {
                    let msg = Received {
                        ifindex: idx,
                        src: from.ip(),
                        at,
                        bytes: buf[..len].to_vec(),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((
        idx,
        IfaceState {
            name: name.to_string(),
            socket,
            reader,
        },
    ))
}

fn status(router: &Router, ifaces: &HashMap<u32, IfaceState>, now: Instant) -> Status {
    Status::from_state(&router.state(now), |i| {
        ifaces
            .get(&i.0)
            .map_or_else(|| i.0.to_string(), |s| s.name.clone())
    })
}

impl Status {
    /// The text form of a router's state, with interface names from `name`.
    pub fn from_state(state: &RoutingState, name: impl Fn(IfaceId) -> String) -> Self {
        Self {
            router_id: format_router_id(&state.router_id),
            exports: state
                .exports
                .iter()
                .map(|(p, s)| match s {
                    Some(s) => format!("{p} from {s}"),
                    None => p.to_string(),
                })
                .collect(),
            neighbours: state
                .neighbours
                .iter()
                .map(|n| NeighbourStatus {
                    interface: name(n.iface),
                    address: n.addr,
                    reach: format!("{:016b}", n.history),
                    rxcost: n.rxcost,
                    txcost: n.txcost,
                    rtt_ms: n.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    cost: n.cost,
                })
                .collect(),
            routes: state
                .routes
                .iter()
                .map(|r| RouteStatus {
                    prefix: r.prefix.to_string(),
                    src_prefix: r.src_prefix.map(|s| s.to_string()),
                    router_id: format_router_id(&r.router_id),
                    seqno: r.seqno,
                    metric: r.metric,
                    refmetric: r.refmetric,
                    interface: name(r.iface),
                    next_hop: r.next_hop,
                    selected: r.selected,
                    feasible: r.feasible,
                })
                .collect(),
            seqno: state.seqno,
            packets_in: state.stats.packets_in,
            packets_rejected: state.stats.packets_rejected,
            packets_out: state.stats.packets_out,
            route_switches: state.stats.route_switches,
            drops: state
                .stats
                .drops
                .iter()
                .map(|(r, n)| (r.label().to_string(), *n))
                .collect(),
        }
    }
}
