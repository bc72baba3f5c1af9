//! The route table: one [`Entry`] per destination holding every route
//! learned for it and what we do with it (selected, installed, advertised,
//! held as retracted, exported), plus an index of destinations by
//! neighbour so that a link event touches only the routes through it.
//!
//! Ordered maps throughout: iteration order, and so the router's output,
//! depends only on its inputs (simulations are reproducible).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use crate::neighbour::{IfaceId, NeighbourId};

/// A route's destination: prefix and optional source prefix (RFC 9079).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    /// Destination prefix.
    pub prefix: IpNet,
    /// Source prefix (None: any source).
    pub src: Option<IpNet>,
}

impl RouteKey {
    /// A key with both prefixes truncated to their length.
    pub fn new(prefix: IpNet, src: Option<IpNet>) -> Self {
        Self {
            prefix: prefix.trunc(),
            src: src.map(|s| s.trunc()),
        }
    }
}

/// A route learned from a neighbour.
#[derive(Clone, Debug)]
pub(super) struct Route {
    pub from: NeighbourId,
    pub router_id: [u8; 8],
    pub seqno: u16,
    pub refmetric: u16,
    pub next_hop: IpAddr,
    pub expires: Instant,
}

/// What the kernel has for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstalledRoute {
    /// Forwarded out of `iface` via `next_hop`.
    Via {
        /// Interface.
        iface: IfaceId,
        /// Next hop.
        next_hop: IpAddr,
        /// Metric of the selected route.
        metric: u16,
    },
    /// An `unreachable` route held while the retraction is advertised
    /// (RFC 8966 §3.5.4: never fall through to a shorter prefix).
    Unreachable,
}

/// What we last advertised for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Advertised {
    pub router_id: [u8; 8],
    pub seqno: u16,
    pub metric: u16,
}

/// Everything about one destination.
#[derive(Clone, Debug, Default)]
pub(super) struct Entry {
    pub routes: Vec<Route>,
    pub selected: Option<NeighbourId>,
    pub installed: Option<InstalledRoute>,
    pub advertised: Option<Advertised>,
    /// While set, the destination is advertised as retracted and held
    /// unreachable in the kernel.
    pub retract_until: Option<Instant>,
    pub exported: bool,
}

impl Entry {
    pub fn route(&self, from: NeighbourId) -> Option<&Route> {
        self.routes.iter().find(|r| r.from == from)
    }

    pub fn selected_route(&self) -> Option<&Route> {
        self.selected.and_then(|n| self.route(n))
    }

    /// Whether we say anything about it in a dump.
    pub fn advertisable(&self) -> bool {
        self.exported || self.selected.is_some() || self.retract_until.is_some()
    }

    fn is_empty(&self) -> bool {
        self.routes.is_empty() && !self.advertisable() && self.installed.is_none()
    }
}

/// Destinations, and which of them each neighbour has routes for.
#[derive(Clone, Debug, Default)]
pub(super) struct Table {
    entries: BTreeMap<RouteKey, Entry>,
    by_neighbour: BTreeMap<NeighbourId, BTreeSet<RouteKey>>,
}

impl Table {
    pub fn get(&self, key: &RouteKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The entry of `key`, created if missing. Route lists must be changed
    /// through [`Table::upsert_route`] and [`Table::remove_route`] only.
    pub fn entry(&mut self, key: RouteKey) -> &mut Entry {
        self.entries.entry(key).or_default()
    }

    pub fn get_mut(&mut self, key: &RouteKey) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RouteKey, &Entry)> {
        self.entries.iter()
    }

    /// Every destination we say something about in a dump.
    pub fn advertised_keys(&self) -> Vec<RouteKey> {
        self.entries
            .iter()
            .filter(|(_, e)| e.advertisable())
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keys after `after` (or from the start), in order.
    pub fn keys_from(&self, after: Option<RouteKey>) -> impl Iterator<Item = &RouteKey> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.entries
            .range((lower, Bound::Unbounded))
            .map(|(k, _)| k)
    }

    /// The route of `key` from `from`, to change in place.
    pub fn route_mut(&mut self, key: &RouteKey, from: NeighbourId) -> Option<&mut Route> {
        self.entries
            .get_mut(key)?
            .routes
            .iter_mut()
            .find(|r| r.from == from)
    }

    /// Adds a route (or replaces the one from the same neighbour).
    pub fn upsert_route(&mut self, key: RouteKey, route: Route) {
        self.by_neighbour.entry(route.from).or_default().insert(key);
        let e = self.entry(key);
        match e.routes.iter_mut().find(|r| r.from == route.from) {
            Some(r) => *r = route,
            None => e.routes.push(route),
        }
    }

    /// Removes the route of `key` from `from`.
    pub fn remove_route(&mut self, key: &RouteKey, from: NeighbourId) {
        if let Some(e) = self.entries.get_mut(key) {
            e.routes.retain(|r| r.from != from);
        }
        if let Some(keys) = self.by_neighbour.get_mut(&from) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_neighbour.remove(&from);
            }
        }
    }

    /// Destinations `n` has a route for.
    pub fn keys_via(&self, n: NeighbourId) -> Vec<RouteKey> {
        self.by_neighbour
            .get(&n)
            .map(|k| k.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Drops entries with nothing left in them.
    pub fn prune(&mut self, key: &RouteKey) {
        if self.entries.get(key).is_some_and(Entry::is_empty) {
            self.entries.remove(key);
        }
    }
}
