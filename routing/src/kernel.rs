//! Kernel routes over rtnetlink: only routes with our own `proto` number
//! are touched; replaced atomically (`NLM_F_REPLACE`); all of ours are
//! removed at exit and stale ones at start. Besides forwarding routes:
//! `unreachable` routes for retractions still held (RFC 8966 §3.5.4), and
//! a covering `unreachable` route for the whole overlay network. IPv4
//! routes get their IPv6 next hop as `via inet6` (RFC 9229).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::router::RouteChange;

/// Our routing protocol number (`ip route ... proto 113`); babeld uses 42.
pub const PROTO: u8 = 113;

/// Kernel priority of the covering `unreachable` route of the network.
pub const COVER_PRIORITY: u32 = 0xffff_0000;

/// Programs routes into one table.
#[derive(Clone, Debug)]
pub struct Kernel {
    handle: Handle,
    table: u32,
    proto: u8,
    pref_src: PrefSrc,
}

/// Preferred source addresses of the routes we install, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefSrc {
    /// For IPv6 routes.
    pub v6: Option<Ipv6Addr>,
    /// For IPv4 routes.
    pub v4: Option<Ipv4Addr>,
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

impl Kernel {
    /// Opens a netlink connection (its task runs on the current runtime).
    pub fn new(table: u32, proto: u8, pref_src: PrefSrc) -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            table,
            proto,
            pref_src,
        })
    }

    fn message(
        &self,
        prefix: IpNet,
        src: Option<IpNet>,
        ifindex: Option<u32>,
        via: Option<IpAddr>,
    ) -> Option<RouteMessage> {
        match prefix {
            IpNet::V6(p) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len())
                    .table_id(self.table)
                    .protocol(RouteProtocol::from(self.proto));
                if let Some(IpNet::V6(s)) = src {
                    b = b.source_prefix(s.network(), s.prefix_len());
                }
                if let Some(i) = ifindex {
                    b = b.output_interface(i);
                }
                if let Some(IpAddr::V6(g)) = via {
                    b = b.gateway(g);
                }
                if let (Some(ps), true) = (self.pref_src.v6, ifindex.is_some()) {
                    b = b.pref_source(ps);
                }
                Some(b.build())
            }
            IpNet::V4(p) => {
                if src.is_some() {
                    return None;
                }
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len())
                    .table_id(self.table)
                    .protocol(RouteProtocol::from(self.proto));
                if let Some(i) = ifindex {
                    b = b.output_interface(i);
                }
                // Babel's IPv4 routes have IPv6 next hops (RFC 9229).
                match via {
                    Some(IpAddr::V6(g)) => b = b.via(g),
                    Some(IpAddr::V4(g)) => b = b.gateway(g),
                    None => {}
                }
                if let (Some(ps), true) = (self.pref_src.v4, ifindex.is_some()) {
                    b = b.pref_source(ps);
                }
                Some(b.build())
            }
        }
    }

    /// An `unreachable` route for `prefix` (optionally from `src`), with
    /// this priority (kernel metric; larger is less preferred).
    fn unreachable(
        &self,
        prefix: IpNet,
        src: Option<IpNet>,
        priority: u32,
    ) -> Option<RouteMessage> {
        match prefix {
            IpNet::V6(p) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len())
                    .table_id(self.table)
                    .protocol(RouteProtocol::from(self.proto))
                    .kind(RouteType::Unreachable)
                    .priority(priority);
                if let Some(IpNet::V6(s)) = src {
                    b = b.source_prefix(s.network(), s.prefix_len());
                }
                Some(b.build())
            }
            IpNet::V4(p) => src.is_none().then(|| {
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len())
                    .table_id(self.table)
                    .protocol(RouteProtocol::from(self.proto))
                    .kind(RouteType::Unreachable)
                    .priority(priority)
                    .build()
            }),
        }
    }

    /// Applies a change; `ifindex` maps the router's interface to the kernel's.
    pub async fn apply(
        &self,
        change: &RouteChange,
        ifindex: impl Fn(u32) -> Option<u32>,
    ) -> anyhow::Result<()> {
        match change {
            RouteChange::Install {
                key,
                iface,
                next_hop,
                ..
            } => {
                let Some(idx) = ifindex(iface.0) else {
                    return Ok(());
                };
                let Some(msg) = self.message(key.prefix, key.src, Some(idx), Some(*next_hop))
                else {
                    return Ok(());
                };
                // Also replaces a held unreachable route (same priority).
                self.handle.route().add(msg).replace().execute().await?;
            }
            RouteChange::Unreachable { key } => {
                let Some(msg) = self.unreachable(key.prefix, key.src, 0) else {
                    return Ok(());
                };
                self.handle.route().add(msg).replace().execute().await?;
            }
            RouteChange::Remove { key } => {
                // Matches either type.
                let Some(msg) = self.message(key.prefix, key.src, None, None) else {
                    return Ok(());
                };
                if let Err(e) = self.handle.route().del(msg).execute().await {
                    // Already gone is fine.
                    tracing::debug!(prefix = %key.prefix, error = %e, "route delete");
                }
            }
        }
        Ok(())
    }

    /// Installs `unreachable <prefix>` with a low preference: overlay
    /// traffic without a Babel route is refused instead of leaving by the
    /// host's default route (removed with our other routes by [`Kernel::flush`]).
    pub async fn cover(&self, prefix: IpNet) -> anyhow::Result<()> {
        let Some(msg) = self.unreachable(prefix, None, COVER_PRIORITY) else {
            return Ok(());
        };
        self.handle.route().add(msg).replace().execute().await?;
        Ok(())
    }

    /// Removes every route (IPv6 and IPv4) with our proto in our table;
    /// returns how many.
    pub async fn flush(&self) -> anyhow::Result<usize> {
        let mut ours = Vec::new();
        for filter in [
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(filter).execute();
            while let Some(m) = routes.try_next().await? {
                if u8::from(m.header.protocol) == self.proto && table_of(&m) == self.table {
                    ours.push(m);
                }
            }
        }
        let n = ours.len();
        for m in ours {
            if let Err(e) = self.handle.route().del(m).execute().await {
                tracing::debug!(error = %e, "stale route delete");
            }
        }
        Ok(n)
    }
}
