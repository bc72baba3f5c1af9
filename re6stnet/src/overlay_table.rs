//! The kernel table of overlay routes and the `ip rule` that selects it.
//!
//! Babel's routes go to a table of our own ([`DEFAULT_TABLE`] unless
//! `--table` says otherwise), looked up only for destinations inside the
//! network prefix (`ip -6 rule add to NETWORK lookup TABLE`): whatever a
//! member announces, the host's own Internet traffic never reaches that
//! table. The table also holds the covering `unreachable NETWORK` route
//! (from the routing side), so overlay traffic without a route is refused
//! rather than sent to the underlay, and a `throw` route for our own
//! prefix, so the lookup of our own addresses goes on to `main`, where the
//! kernel and the operator put them. A second rule looks the table up for
//! traffic *from* the network (`ip -6 rule add from NETWORK lookup
//! TABLE`): there only a gateway's `default from NETWORK` matches, so
//! overlay-sourced traffic to outside the network goes to the nearest
//! gateway, and without one the lookup goes on to `main`. With `--table
//! 254` (main) nothing of this is installed and routes go to `main` as
//! before. With IPv4 in the overlay the same holds for the IPv4 network:
//! `ip -4 rule add to NETWORK4 lookup TABLE`, `throw` for our subnet (no
//! IPv4 gateways, so no `from` rule).

use anyhow::Context;
use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::route::{RouteProtocol, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// The default table of overlay routes (re6st's port number; unused by
/// the usual tables 253–255).
pub const DEFAULT_TABLE: u32 = 326;
/// The kernel's main table.
pub const MAIN_TABLE: u32 = 254;
/// Priority of our rule: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 326;
/// Priority of the rule for traffic from the network (gateway routes).
pub const FROM_RULE_PRIORITY: u32 = 327;

/// Our rules and throw route while the node runs.
#[derive(Debug)]
pub struct OverlayTable {
    handle: Handle,
    network: Ipv6Net,
    prefix: Ipv6Net,
    /// The IPv4 network and our subnet in it.
    ipv4: Option<(Ipv4Net, Ipv4Net)>,
    table: u32,
}

fn is_ours(m: &RuleMessage, network: IpNet, table: u32) -> bool {
    let table_of = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    let to_network = m.header.dst_len == network.prefix_len()
        && m.attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Destination(d) if *d == network.network()));
    let from_network = m.header.src_len == network.prefix_len()
        && m.attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Source(d) if *d == network.network()));
    table_of == table && (to_network || from_network)
}

impl OverlayTable {
    /// Installs the rules for `network` and the throw route for our
    /// `prefix` in `table`, and those of the IPv4 network and our subnet
    /// in it (rules left by a crashed run are removed first); None for
    /// the main table.
    pub async fn install(
        network: Ipv6Net,
        prefix: Ipv6Net,
        ipv4: Option<(Ipv4Net, Ipv4Net)>,
        table: u32,
    ) -> anyhow::Result<Option<Self>> {
        if table == MAIN_TABLE {
            return Ok(None);
        }
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
        tokio::spawn(conn);
        let me = Self {
            handle,
            network,
            prefix,
            ipv4,
            table,
        };
        me.remove_rules().await?;
        for (from, priority) in [(false, RULE_PRIORITY), (true, FROM_RULE_PRIORITY)] {
            let rule = me.handle.rule().add().v6();
            let (rule, which) = if from {
                (
                    rule.source_prefix(network.network(), network.prefix_len()),
                    "from",
                )
            } else {
                (
                    rule.destination_prefix(network.network(), network.prefix_len()),
                    "to",
                )
            };
            rule.table_id(table)
                .priority(priority)
                .action(RuleAction::ToTable)
                .execute()
                .await
                .with_context(|| format!("adding the rule `{which} {network} lookup {table}`"))?;
        }
        if let Some((network4, _)) = ipv4 {
            me.handle
                .rule()
                .add()
                .v4()
                .destination_prefix(network4.network(), network4.prefix_len())
                .table_id(table)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable)
                .execute()
                .await
                .with_context(|| format!("adding the rule `to {network4} lookup {table}`"))?;
        }
        for (route, what) in me.throw_routes() {
            me.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding `throw {what}` to table {table}"))?;
        }
        Ok(Some(me))
    }

    fn throw_routes(&self) -> Vec<(rtnetlink::packet_route::route::RouteMessage, IpNet)> {
        let v6 = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(self.prefix.network(), self.prefix.prefix_len())
            .table_id(self.table)
            .protocol(RouteProtocol::Static)
            .kind(RouteType::Throw)
            .build();
        let v4 = self.ipv4.map(|(_, subnet)| {
            let m = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(subnet.network(), subnet.prefix_len())
                .table_id(self.table)
                .protocol(RouteProtocol::Static)
                .kind(RouteType::Throw)
                .build();
            (m, IpNet::V4(subnet))
        });
        std::iter::once((v6, IpNet::V6(self.prefix)))
            .chain(v4)
            .collect()
    }

    async fn remove_rules(&self) -> anyhow::Result<()> {
        let mut ours = Vec::new();
        let networks = std::iter::once((IpVersion::V6, IpNet::V6(self.network)))
            .chain(self.ipv4.map(|(n, _)| (IpVersion::V4, IpNet::V4(n))));
        for (version, network) in networks {
            let mut rules = self.handle.rule().get(version).execute();
            while let Some(m) = rules.try_next().await.context("listing rules")? {
                if is_ours(&m, network, self.table) {
                    ours.push(m);
                }
            }
        }
        for m in ours {
            self.handle
                .rule()
                .del(m)
                .execute()
                .await
                .context("removing a rule")?;
        }
        Ok(())
    }

    /// Removes the rules and the throw route (clean shutdown).
    pub async fn remove(self) -> anyhow::Result<()> {
        self.remove_rules().await?;
        for (route, _) in self.throw_routes() {
            let _ = self.handle.route().del(route).execute().await;
        }
        Ok(())
    }
}
