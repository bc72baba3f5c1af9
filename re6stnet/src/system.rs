//! What the node changes in the host: its overlay address, forwarding, and
//! finding the underlay addresses it announces.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use anyhow::Context;
use futures_util::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::Handle;

/// The node address (`prefix::1`) on the loopback device, the node prefix
/// routed locally through it; with IPv4 in the overlay, the node's IPv4
/// address and subnet beside it.
#[derive(Debug)]
pub struct NodeAddress {
    handle: Handle,
    iface: u32,
    addr: Ipv6Addr,
    prefix_len: u8,
    v4: Option<Ipv4Net>,
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(a) => Some(*a),
        _ => None,
    })
}

/// Whether an address found on `lo` at start is a leftover of an earlier
/// run: any address of the network (IPv6 or IPv4), except the single
/// addresses (/128) inside our own prefix, which are the orchestration
/// agent's instance addresses (see [`add_instance_address`]) and outlive
/// a restart of the daemon.
fn is_stale(
    addr: IpAddr,
    len: u8,
    prefix: Ipv6Net,
    network: Ipv6Net,
    network4: Option<Ipv4Net>,
) -> bool {
    match addr {
        IpAddr::V6(a) => network.contains(&a) && !(len == 128 && prefix.contains(&a)),
        IpAddr::V4(a) => network4.is_some_and(|n| n.contains(&a)),
    }
}

impl NodeAddress {
    /// Removes addresses of `network` (and of the IPv4 network) left on
    /// `lo` and on `iface` by a previous run (see [`is_stale`]), then adds
    /// `prefix::1/len` to `iface` (`lo`, or a LAN interface: the main
    /// interface, whose hosts then live in our prefix and are routed by
    /// us), and `v4`'s address with its subnet's length.
    pub async fn install(
        prefix: Ipv6Net,
        network: Ipv6Net,
        iface: &str,
        v4: Option<(Ipv4Net, Ipv4Net)>,
    ) -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
        tokio::spawn(conn);
        let lo = re6st_routing::driver::ifindex_of("lo")?;
        let index = re6st_routing::driver::ifindex_of(iface)
            .with_context(|| format!("the main interface {iface}"))?;
        let network4 = v4.map(|(n, _)| n);
        let mut stale = Vec::new();
        for i in [lo, index] {
            let mut addrs = handle.address().get().set_link_index_filter(i).execute();
            while let Some(m) = addrs.try_next().await.context("listing addresses")? {
                if address_of(&m)
                    .is_some_and(|a| is_stale(a, m.header.prefix_len, prefix, network, network4))
                {
                    stale.push(m);
                }
            }
            if index == lo {
                break;
            }
        }
        for m in stale {
            tracing::info!(address = ?address_of(&m), "removing a stale node address");
            let _ = handle.address().del(m).execute().await;
        }
        let addr = re6st_registry::cert::overlay_address(prefix);
        let v4 = v4.map(|(_, a)| a);
        let wanted = std::iter::once((IpAddr::V6(addr), prefix.prefix_len()))
            .chain(v4.map(|a| (IpAddr::V4(a.addr()), a.prefix_len())));
        for (a, len) in wanted {
            handle
                .address()
                .add(index, a, len)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding {a}/{len} to {iface}"))?;
        }
        Ok(Self {
            handle,
            iface: index,
            addr,
            prefix_len: prefix.prefix_len(),
            v4,
        })
    }

    /// The address.
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// Removes the addresses (clean shutdown).
    pub async fn remove(self) -> anyhow::Result<()> {
        let ours = std::iter::once((IpAddr::V6(self.addr), self.prefix_len))
            .chain(self.v4.map(|a| (IpAddr::V4(a.addr()), a.prefix_len())));
        for (a, len) in ours {
            let mut found = Vec::new();
            let mut addrs = self
                .handle
                .address()
                .get()
                .set_link_index_filter(self.iface)
                .set_address_filter(a)
                .set_prefix_length_filter(len)
                .execute();
            while let Some(m) = addrs.try_next().await? {
                found.push(m);
            }
            for m in found {
                self.handle.address().del(m).execute().await?;
            }
        }
        Ok(())
    }
}

/// Adds `addr/128` to `lo` (an instance's own overlay address, inside the
/// node prefix); adding it again is not an error.
pub async fn add_instance_address(addr: Ipv6Addr) -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
    let task = tokio::spawn(conn);
    let lo = re6st_routing::driver::ifindex_of("lo")?;
    let r = handle
        .address()
        .add(lo, IpAddr::V6(addr), 128)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding {addr}/128 to lo"));
    task.abort();
    r
}

/// Removes `addr/128` from `lo` if it is there.
pub async fn remove_instance_address(addr: Ipv6Addr) -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
    let task = tokio::spawn(conn);
    let lo = re6st_routing::driver::ifindex_of("lo")?;
    let mut found = Vec::new();
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(lo)
        .set_address_filter(IpAddr::V6(addr))
        .set_prefix_length_filter(128)
        .execute();
    while let Some(m) = addrs.try_next().await.context("listing addresses")? {
        found.push(m);
    }
    for m in found {
        handle
            .address()
            .del(m)
            .execute()
            .await
            .with_context(|| format!("removing {addr}/128 from lo"))?;
    }
    task.abort();
    Ok(())
}

const CONF: &str = "/proc/sys/net/ipv6/conf";

/// IPv6 forwarding, turned on for the node's life (it relays for others)
/// and back off at exit if it was off. Linux stops accepting Router
/// Advertisements on every interface once forwarding is on, which would
/// cost the host its autoconfigured underlay: interfaces that accepted
/// them (`accept_ra` 1) get `accept_ra` 2 (accept even when forwarding)
/// meanwhile. Nothing else of the host changes.
#[derive(Debug)]
pub struct Forwarding {
    was_off: bool,
    kept_ra: Vec<String>,
}

impl Forwarding {
    /// Turns forwarding on.
    pub fn enable() -> anyhow::Result<Self> {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
        let all = format!("{CONF}/all/forwarding");
        let was_off = read(&all).with_context(|| format!("reading {all}"))? == "0";
        let mut kept_ra = Vec::new();
        if was_off {
            let mut ifaces = Vec::new();
            for e in std::fs::read_dir(CONF).with_context(|| format!("listing {CONF}"))? {
                let name = e?.file_name().to_string_lossy().into_owned();
                if let Ok(v) = read(&format!("{CONF}/{name}/accept_ra")) {
                    ifaces.push((name, v));
                }
            }
            for name in ras_to_keep(&ifaces) {
                std::fs::write(format!("{CONF}/{name}/accept_ra"), "2")
                    .with_context(|| format!("keeping Router Advertisements on {name}"))?;
                tracing::info!(interface = %name, "accept_ra 2 while forwarding");
                kept_ra.push(name);
            }
            std::fs::write(&all, "1").context("enabling IPv6 forwarding")?;
        }
        Ok(Self { was_off, kept_ra })
    }

    /// Puts forwarding and `accept_ra` back as they were.
    pub fn restore(self) {
        if self.was_off {
            if let Err(e) = std::fs::write(format!("{CONF}/all/forwarding"), "0") {
                tracing::warn!(error = %e, "IPv6 forwarding left on");
            }
        }
        for name in self.kept_ra {
            // The interface may be gone: nothing to put back then.
            let _ = std::fs::write(format!("{CONF}/{name}/accept_ra"), "1");
        }
    }
}

/// Interfaces (not `all`, `default`) that accept Router Advertisements
/// only while not forwarding.
fn ras_to_keep(ifaces: &[(String, String)]) -> Vec<String> {
    ifaces
        .iter()
        .filter(|(n, v)| n != "all" && n != "default" && v == "1")
        .map(|(n, _)| n.clone())
        .collect()
}

/// Whether a detected underlay address is worth announcing: one another
/// site can reach (`public_endpoint`), not of the overlay.
fn announceable(ip: IpAddr, overlay: Ipv6Net) -> bool {
    re6st_tunnel::link::public_endpoint(ip) && !matches!(ip, IpAddr::V6(a) if overlay.contains(&a))
}

/// The host's global addresses (except the overlay's and those of our
/// tunnel devices) with `port`: what the peer record announces.
pub fn detect_endpoints(port: u16, overlay: Ipv6Net) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if name.starts_with("re6st") || name == "lo" {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it declares.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sa.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip.filter(|ip| announceable(*ip, overlay)) {
            let ep = SocketAddr::new(ip, port);
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_interfaces_accepting_ras_without_forwarding_change() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        let got = ras_to_keep(&[
            s("all", "1"),
            s("default", "1"),
            s("eth0", "1"),
            s("eth1", "0"),
            s("wlan0", "2"),
        ]);
        assert_eq!(got, vec!["eth0".to_string()]);
    }

    #[test]
    fn only_global_non_overlay_addresses_are_announced() {
        let overlay: Ipv6Net = "fd5e::/48".parse().unwrap_or_default();
        let yes = ["198.18.0.2", "fd00::2", "2001:db8::1"];
        let no = [
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "fd5e:0:0:1::1",
            "ff02::1",
            "192.168.1.2",
            "100.64.0.1",
        ];
        for a in yes {
            assert!(
                announceable(
                    a.parse().unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                    overlay
                ),
                "{a}"
            );
        }
        for a in no {
            assert!(
                !announceable(
                    a.parse().unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                    overlay
                ),
                "{a}"
            );
        }
    }

    #[test]
    fn instance_addresses_survive_a_restart_old_prefixes_do_not() {
        let network: Ipv6Net = "fd5e:5e::/48".parse().unwrap_or_default();
        let prefix: Ipv6Net = "fd5e:5e:0:2::/64".parse().unwrap_or_default();
        let a = |s: &str| s.parse().unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(
            is_stale(a("fd5e:5e:0:2::1"), 64, prefix, network, None),
            "our node address: re-added"
        );
        assert!(
            !is_stale(a("fd5e:5e:0:2::1:0"), 128, prefix, network, None),
            "an instance's"
        );
        assert!(
            is_stale(a("fd5e:5e:0:7::1:0"), 128, prefix, network, None),
            "another prefix's"
        );
        assert!(
            is_stale(a("fd5e:5e:0:7::1"), 64, prefix, network, None),
            "an old node address"
        );
        assert!(
            !is_stale(a("fd00::1"), 128, prefix, network, None),
            "not the network's"
        );
        let v4 = Some("198.19.0.0/16".parse().unwrap_or_default());
        assert!(
            is_stale(a("198.19.0.42"), 32, prefix, network, v4),
            "an IPv4 address of the network"
        );
        assert!(
            !is_stale(a("198.18.0.2"), 24, prefix, network, v4),
            "not the IPv4 network's"
        );
        assert!(
            !is_stale(a("198.19.0.42"), 32, prefix, network, None),
            "IPv4 not configured"
        );
    }
}
