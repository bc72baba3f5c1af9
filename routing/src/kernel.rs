//! Kernel routes over rtnetlink: only routes with our own `proto` number
//! are touched; replaced atomically (`NLM_F_REPLACE`); all of ours are
//! removed at exit and stale ones at start.

use std::net::{IpAddr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::router::RouteChange;

/// Our routing protocol number (`ip route ... proto 113`); babeld uses 42.
pub const PROTO: u8 = 113;

/// Programs routes into one table.
#[derive(Clone, Debug)]
pub struct Kernel {
    handle: Handle,
    table: u32,
    proto: u8,
    pref_src: Option<Ipv6Addr>,
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
    pub fn new(table: u32, proto: u8, pref_src: Option<Ipv6Addr>) -> anyhow::Result<Self> {
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
        let IpNet::V6(p) = prefix else { return None };
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
        if let (Some(ps), true) = (self.pref_src, ifindex.is_some()) {
            b = b.pref_source(ps);
        }
        Some(b.build())
    }

    /// Applies a change; `ifindex` maps the router's interface to the kernel's.
    pub async fn apply(
        &self,
        change: &RouteChange,
        ifindex: impl Fn(u32) -> Option<u32>,
    ) -> anyhow::Result<()> {
        match change {
            RouteChange::Install {
                prefix,
                src_prefix,
                iface,
                next_hop,
                ..
            }
            | RouteChange::Replace {
                prefix,
                src_prefix,
                iface,
                next_hop,
                ..
            } => {
                let Some(idx) = ifindex(iface.0) else {
                    return Ok(());
                };
                let Some(msg) = self.message(*prefix, *src_prefix, Some(idx), Some(*next_hop))
                else {
                    return Ok(());
                };
                self.handle.route().add(msg).replace().execute().await?;
            }
            RouteChange::Remove { prefix, src_prefix } => {
                let Some(msg) = self.message(*prefix, *src_prefix, None, None) else {
                    return Ok(());
                };
                if let Err(e) = self.handle.route().del(msg).execute().await {
                    // Already gone is fine.
                    tracing::debug!(%prefix, error = %e, "route delete");
                }
            }
        }
        Ok(())
    }

    /// Removes every IPv6 route with our proto in our table; returns how many.
    pub async fn flush(&self) -> anyhow::Result<usize> {
        let filter = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let mut routes = self.handle.route().get(filter).execute();
        let mut ours = Vec::new();
        while let Some(m) = routes.try_next().await? {
            if u8::from(m.header.protocol) == self.proto && table_of(&m) == self.table {
                ours.push(m);
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
