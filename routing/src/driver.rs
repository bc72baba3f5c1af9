//! The tokio driver: owns the sockets, the clock and the kernel, and feeds
//! the sans-IO [`Router`].
//!
//! One UDP socket per interface, bound to `[::]:6696` and to the device
//! (`SO_BINDTODEVICE`), joined to `ff02::1:6` there. Packets whose source is
//! not link-local are dropped by the router. Interfaces can be added and
//! removed at runtime through [`Command`]s.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::auth::AuthConfig;
use crate::kernel::Kernel;
use crate::neighbour::IfaceId;
use crate::router::{Destination, InterfaceConfig, Router, RouterConfig};
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
    /// Counters.
    pub packets_in: u64,
    /// Packets refused.
    pub packets_rejected: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Selected-route changes.
    pub route_switches: u64,
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
    /// Preferred source address of installed routes.
    pub pref_src: Option<Ipv6Addr>,
    /// Whether to program the kernel at all.
    pub install: bool,
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

fn open_socket(name: &str, ifindex: u32) -> anyhow::Result<UdpSocket> {
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
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into()).context("registering the socket")
}

struct IfaceState {
    name: String,
    socket: Arc<UdpSocket>,
    reader: tokio::task::JoinHandle<()>,
}

struct Received {
    ifindex: u32,
    src: IpAddr,
    bytes: Vec<u8>,
}

fn to_std(now: tokio::time::Instant) -> Instant {
    now.into_std()
}

/// Longest wait for the kernel to answer a netlink request.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the router until [`Command::Shutdown`] or the command channel closes.
pub async fn run(cfg: DriverConfig, mut commands: mpsc::Receiver<Command>) -> anyhow::Result<()> {
    let start = to_std(tokio::time::Instant::now());
    let mut router = Router::new(cfg.router.clone(), start);
    let kernel = if cfg.install {
        let k = Kernel::new(cfg.table, cfg.proto, cfg.pref_src)?;
        // A netlink answer that never comes must not freeze routing.
        match tokio::time::timeout(NETLINK_TIMEOUT, k.flush()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(stale)) => tracing::info!(stale, "removed stale routes of a previous run"),
            Ok(Err(e)) => return Err(e.context("removing stale routes")),
            Err(_) => tracing::warn!("netlink did not answer while removing stale routes"),
        }
        Some(k)
    } else {
        None
    };
    let (rx_tx, mut rx) = mpsc::channel::<Received>(1024);
    let mut ifaces: HashMap<u32, IfaceState> = HashMap::new();
    let mut exports: Vec<(IpNet, Option<IpNet>)> = Vec::new();
    loop {
        let deadline = router
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
        let mut shutdown = false;
        tokio::select! {
            Some(p) = rx.recv() => {
                let now = to_std(tokio::time::Instant::now());
                router.handle_packet(now, IfaceId(p.ifindex), p.src, &p.bytes);
            }
            () = tokio::time::sleep_until(deadline) => {
                router.handle_timeout(to_std(tokio::time::Instant::now()));
            }
            cmd = commands.recv() => {
                let now = to_std(tokio::time::Instant::now());
                match cmd {
                    None | Some(Command::Shutdown) => {
                        router.shutdown();
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
                    Some(Command::Export(p, s)) => {
                        router.export(p, s, now);
                        exports.push((p, s));
                    }
                    Some(Command::Unexport(p, s)) => {
                        router.unexport(p, s, now);
                        exports.retain(|e| *e != (p, s));
                    }
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
                        let _ = reply.send(status(&router, &ifaces, &exports, now));
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
            if let Err(e) = state.socket.try_send_to(&t.bytes, SocketAddr::V6(dst)) {
                tracing::debug!(interface = %state.name, error = %e, "send failed");
            }
        }
        while let Some(change) = router.poll_route_change() {
            tracing::debug!(?change, "route change");
            if let Some(k) = &kernel {
                let known: Vec<u32> = ifaces.keys().copied().collect();
                let applied = tokio::time::timeout(
                    NETLINK_TIMEOUT,
                    k.apply(&change, |i| known.contains(&i).then_some(i)),
                )
                .await;
                match applied {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(?change, error = %e, "kernel route"),
                    Err(_) => tracing::warn!(?change, "netlink did not answer: kernel route"),
                }
            }
        }
        if shutdown {
            // Give the final packets a moment to leave, then clean the kernel.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(k) = &kernel {
                let _ = k.flush().await;
            }
            for (_, s) in ifaces.drain() {
                s.reader.abort();
            }
            return Ok(());
        }
    }
}

fn add_interface(name: &str, tx: &mpsc::Sender<Received>) -> anyhow::Result<(u32, IfaceState)> {
    let idx = ifindex_of(name)?;
    let socket = Arc::new(open_socket(name, idx)?);
    let (sock, tx) = (Arc::clone(&socket), tx.clone());
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            match sock.recv_from(&mut buf).await {
                Ok((len, from)) => {
                    let msg = Received {
                        ifindex: idx,
                        src: from.ip(),
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

fn status(
    router: &Router,
    ifaces: &HashMap<u32, IfaceState>,
    exports: &[(IpNet, Option<IpNet>)],
    now: Instant,
) -> Status {
    let name = |i: IfaceId| {
        ifaces
            .get(&i.0)
            .map_or_else(|| i.0.to_string(), |s| s.name.clone())
    };
    let stats = router.stats();
    Status {
        router_id: format_router_id(&router.router_id()),
        exports: exports
            .iter()
            .map(|(p, s)| match s {
                Some(s) => format!("{p} from {s}"),
                None => p.to_string(),
            })
            .collect(),
        neighbours: router
            .neighbours(now)
            .into_iter()
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
        routes: router
            .routes(now)
            .into_iter()
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
        packets_in: stats.packets_in,
        packets_rejected: stats.packets_rejected,
        packets_out: stats.packets_out,
        route_switches: stats.route_switches,
    }
}
