//! The tunnel-manager policy (re6st's algorithm), sans-IO with time passed in.
//!
//! - Keep `client_count` outgoing tunnels to random *distant* peers (known
//!   to routing, not already direct neighbours); accept up to `max_clients`
//!   incoming ones.
//! - Every `tunnel_refresh`, retire the outgoing tunnel that carries the
//!   fewest routes, gracefully: raise its cost ([`DRAIN_MULTIPLIER`]), wait
//!   until no route uses it (or [`PolicyConfig::drain_timeout`]), then close
//!   it; a replacement is opened at once.
//! - A dead tunnel is replaced at once; a failing peer is retried with
//!   exponential back-off.
//! - A node that has never been served an incoming tunnel is probably behind
//!   NAT: it keeps at most 2 outgoing tunnels.
//! - Two tunnels between the same pair: the side with the smaller prefix
//!   drops its outgoing one.
//! - No peer known: bootstrap from the cache, then from the registry.
//!
//! The driver feeds events and a [`View`] of routing, and carries out the
//! returned [`Action`]s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;

/// A peer is known by its node prefix.
pub type Peer = Ipv6Net;

/// Cost multiplier that drains a tunnel (routes move away from it).
pub const DRAIN_MULTIPLIER: u16 = 4096;

/// Settings (from the network configuration).
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// Outgoing tunnels to keep.
    pub client_count: usize,
    /// Incoming tunnels to accept at most.
    pub max_clients: usize,
    /// Period of the rotation.
    pub tunnel_refresh: Duration,
    /// Longest wait for a draining tunnel to carry no route.
    pub drain_timeout: Duration,
    /// First retry delay of a failing peer (doubles, up to `backoff_max`).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Outgoing tunnels of a node never served (NAT heuristic).
    pub nat_cap: usize,
    /// Peers we always keep a tunnel with (re6st `--neighbour`): opened
    /// first, on top of `client_count`, never rotated away, and accepted
    /// beyond `max_clients`.
    pub pinned: BTreeSet<Peer>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            client_count: 10,
            max_clients: 20,
            tunnel_refresh: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(120),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            nat_cap: 2,
            pinned: BTreeSet::new(),
        }
    }
}

/// What routing currently knows, as the policy needs it.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Every node prefix routing has a route to.
    pub routed: BTreeSet<Peer>,
    /// Number of destination prefixes routed through each tunnel peer.
    pub routes_via: HashMap<Peer, usize>,
    /// Peers of the cache usable now (not failing), in preference order.
    pub cache: Vec<Peer>,
    /// Nodes that are direct Babel neighbours on a LAN (`--interface`):
    /// never tunnel candidates, their traffic stays on the LAN (re6st's
    /// rule), and routing to them alone is still being alone.
    pub lan: BTreeSet<Peer>,
    /// A node every connected mesh routes (re6st: the registry's node).
    /// When it is not routed we are on an island: one slot goes to a peer
    /// outside it (cache, else the registry's bootstrap).
    pub anchor: Option<Peer>,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open an outgoing tunnel to this peer (set-up request, then handshake).
    Open(Peer),
    /// Set the routing cost multiplier of the tunnel to this peer.
    SetCost(Peer, u16),
    /// Close the tunnel to this peer (both ends).
    Close(Peer),
    /// Ask the registry for bootstrap peers.
    Bootstrap,
}

/// Answer to an incoming set-up request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Accept it.
    Accept,
    /// Full: try another peer.
    Busy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Connecting { since: Instant },
    Up,
    Draining { since: Instant },
}

/// The policy's state.
#[derive(Clone, Debug)]
pub struct Policy {
    me: Peer,
    cfg: PolicyConfig,
    outgoing: BTreeMap<Peer, Out>,
    incoming: BTreeSet<Peer>,
    ever_served: bool,
    next_refresh: Instant,
    failures: HashMap<Peer, (u32, Instant)>,
    next_bootstrap: Instant,
    bootstrap_failures: u32,
    rng: u64,
}

impl Policy {
    /// A policy for node `me`.
    pub fn new(me: Peer, cfg: PolicyConfig, now: Instant, seed: u64) -> Self {
        Self {
            me,
            next_refresh: now + cfg.tunnel_refresh,
            cfg,
            outgoing: BTreeMap::new(),
            incoming: BTreeSet::new(),
            ever_served: false,
            failures: HashMap::new(),
            next_bootstrap: now,
            bootstrap_failures: 0,
            rng: seed | 1,
        }
    }

    /// Applies new settings (live: nothing is torn down).
    pub fn set_config(&mut self, cfg: PolicyConfig, now: Instant) {
        if cfg.tunnel_refresh != self.cfg.tunnel_refresh {
            self.next_refresh = now + cfg.tunnel_refresh;
        }
        self.cfg = cfg;
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn shuffle(&mut self, v: &mut [Peer]) {
        for i in (1..v.len()).rev() {
            let j = (self.random() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }

    /// Outgoing tunnels that count towards `client_count` (draining ones
    /// do not: their replacement opens at once; pinned ones neither).
    pub fn active_outgoing(&self) -> usize {
        self.outgoing
            .iter()
            .filter(|(p, o)| !matches!(o, Out::Draining { .. }) && !self.cfg.pinned.contains(p))
            .count()
    }

    /// Peers with an outgoing tunnel (any state).
    pub fn outgoing(&self) -> impl Iterator<Item = &Peer> {
        self.outgoing.keys()
    }

    /// Peers with an incoming tunnel.
    pub fn incoming(&self) -> impl Iterator<Item = &Peer> {
        self.incoming.iter()
    }

    fn target(&self) -> usize {
        if self.ever_served {
            self.cfg.client_count
        } else {
            self.cfg.client_count.min(self.cfg.nat_cap)
        }
    }

    fn connected(&self, p: &Peer) -> bool {
        self.outgoing.contains_key(p) || self.incoming.contains(p)
    }

    fn usable(&self, p: &Peer, now: Instant) -> bool {
        *p != self.me && !self.connected(p) && self.failures.get(p).is_none_or(|(_, at)| now >= *at)
    }

    /// The periodic step: rotation, drains, refills. Call it every few
    /// seconds and after each routing change.
    pub fn tick(&mut self, now: Instant, view: &View) -> Vec<Action> {
        let mut actions = Vec::new();
        // Drains that are done (no route through the tunnel) or timed out.
        let draining: Vec<(Peer, Instant)> = self
            .outgoing
            .iter()
            .filter_map(|(p, o)| match o {
                Out::Draining { since } => Some((*p, *since)),
                _ => None,
            })
            .collect();
        for (p, since) in draining {
            let idle = view.routes_via.get(&p).copied().unwrap_or(0) == 0;
            if idle || now.duration_since(since) >= self.cfg.drain_timeout {
                self.outgoing.remove(&p);
                actions.push(Action::Close(p));
            }
        }
        // Rotation.
        if now >= self.next_refresh {
            self.next_refresh = now + self.cfg.tunnel_refresh;
            let up: Vec<Peer> = self
                .outgoing
                .iter()
                .filter(|(p, o)| matches!(o, Out::Up) && !self.cfg.pinned.contains(p))
                .map(|(p, _)| *p)
                .collect();
            // Rotate only with a full set, so a small mesh is not starved.
            if up.len() >= self.target() && !up.is_empty() {
                if let Some(worst) = up
                    .iter()
                    .min_by_key(|p| (view.routes_via.get(p).copied().unwrap_or(0), **p))
                {
                    self.outgoing.insert(*worst, Out::Draining { since: now });
                    actions.push(Action::SetCost(*worst, DRAIN_MULTIPLIER));
                }
            }
        }
        // Connections that never came up.
        let stuck: Vec<Peer> = self
            .outgoing
            .iter()
            .filter(|(_, o)| matches!(o, Out::Connecting { since } if now.duration_since(*since) >= self.cfg.drain_timeout / 4))
            .map(|(p, _)| *p)
            .collect();
        for p in stuck {
            self.outgoing.remove(&p);
            self.fail(p, now);
            actions.push(Action::Close(p));
        }
        self.fill(now, view, &mut actions);
        actions
    }

    /// The earliest moment after `now` at which [`Policy::tick`] has
    /// something to do on its own (rotation, a drain or a connection that
    /// times out, a back-off that ends); None when only a change of the
    /// [`View`] can make it act.
    pub fn next_timeout(&self, now: Instant) -> Option<Instant> {
        let tunnels = self.outgoing.values().filter_map(|o| match o {
            Out::Connecting { since } => Some(*since + self.cfg.drain_timeout / 4),
            Out::Draining { since } => Some(*since + self.cfg.drain_timeout),
            Out::Up => None,
        });
        let backoffs = self.failures.values().map(|(_, at)| *at);
        std::iter::once(self.next_refresh)
            .chain(std::iter::once(self.next_bootstrap))
            .chain(tunnels)
            .chain(backoffs)
            .filter(|t| *t > now)
            .min()
    }

    fn fill(&mut self, now: Instant, view: &View, actions: &mut Vec<Action>) {
        let pinned: Vec<Peer> = self
            .cfg
            .pinned
            .iter()
            .filter(|p| self.usable(p, now))
            .copied()
            .collect();
        for p in pinned {
            self.outgoing.insert(p, Out::Connecting { since: now });
            actions.push(Action::Open(p));
        }
        let want = self.target().saturating_sub(self.active_outgoing());
        if want == 0 {
            return;
        }
        let mut opened = 0;
        let island = view
            .anchor
            .is_some_and(|a| a != self.me && !view.routed.contains(&a))
            && view.routed.iter().any(|p| *p != self.me);
        if island {
            let outside = view
                .cache
                .iter()
                .find(|p| !view.routed.contains(p) && self.usable(p, now))
                .copied();
            match outside {
                Some(p) => {
                    self.outgoing.insert(p, Out::Connecting { since: now });
                    actions.push(Action::Open(p));
                    opened += 1;
                }
                None => self.bootstrap(now, actions),
            }
        }
        let neighbours: BTreeSet<Peer> = self
            .outgoing
            .keys()
            .chain(self.incoming.iter())
            .copied()
            .collect();
        let mut distant: Vec<Peer> = view
            .routed
            .iter()
            .filter(|p| !neighbours.contains(p) && !view.lan.contains(p) && self.usable(p, now))
            .copied()
            .collect();
        self.shuffle(&mut distant);
        for p in distant.into_iter().take(want - opened) {
            self.outgoing.insert(p, Out::Connecting { since: now });
            actions.push(Action::Open(p));
            opened += 1;
        }
        let alone = view
            .routed
            .iter()
            .all(|p| *p == self.me || view.lan.contains(p));
        if opened < want && alone {
            // Nothing routed but our LAN: we are alone (start, or cut
            // off). The cache first...
            let cached: Vec<Peer> = view
                .cache
                .iter()
                .filter(|p| !view.lan.contains(p) && self.usable(p, now))
                .copied()
                .collect();
            for p in cached.into_iter().take(want - opened) {
                self.outgoing.insert(p, Out::Connecting { since: now });
                actions.push(Action::Open(p));
                opened += 1;
            }
            // ... then the registry, with back-off.
            if opened == 0 {
                self.bootstrap(now, actions);
            }
        }
    }

    fn bootstrap(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if now >= self.next_bootstrap {
            let backoff = self.backoff(self.bootstrap_failures);
            self.bootstrap_failures = self.bootstrap_failures.saturating_add(1);
            self.next_bootstrap = now + backoff;
            actions.push(Action::Bootstrap);
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.min(16);
        (self.cfg.backoff_base * factor).min(self.cfg.backoff_max)
    }

    fn fail(&mut self, p: Peer, now: Instant) {
        let n = self.failures.get(&p).map_or(0, |(n, _)| *n);
        let at = now + self.backoff(n);
        self.failures.insert(p, (n + 1, at));
    }

    /// An outgoing tunnel completed its handshake.
    pub fn on_up(&mut self, p: Peer, _now: Instant) {
        if let Some(o) = self.outgoing.get_mut(&p) {
            if matches!(o, Out::Connecting { .. }) {
                *o = Out::Up;
            }
            self.failures.remove(&p);
            self.bootstrap_failures = 0;
        }
    }

    /// An outgoing attempt failed (refused, busy, no handshake): back off
    /// from that peer and try another.
    pub fn on_failed(&mut self, p: Peer, now: Instant, view: &View) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.outgoing.remove(&p).is_some() {
            self.fail(p, now);
        }
        self.fill(now, view, &mut actions);
        actions
    }

    /// A tunnel died (no handshake, peer gone): replace it at once.
    pub fn on_down(&mut self, p: Peer, now: Instant, view: &View) -> Vec<Action> {
        let mut actions = Vec::new();
        let was_out = self.outgoing.remove(&p).is_some();
        self.incoming.remove(&p);
        if was_out {
            self.fail(p, now);
        }
        self.fill(now, view, &mut actions);
        actions
    }

    /// Someone asks to open a tunnel to us.
    pub fn on_incoming(&mut self, p: Peer, now: Instant, view: &View) -> (Admission, Vec<Action>) {
        let mut actions = Vec::new();
        if p == self.me {
            return (Admission::Busy, actions);
        }
        let unpinned = self
            .incoming
            .iter()
            .filter(|q| !self.cfg.pinned.contains(q))
            .count();
        if !self.incoming.contains(&p)
            && unpinned >= self.cfg.max_clients
            && !self.cfg.pinned.contains(&p)
        {
            return (Admission::Busy, actions);
        }
        self.incoming.insert(p);
        self.ever_served = true;
        // Duplicate: the smaller prefix drops its outgoing tunnel.
        if self.me < p && self.outgoing.remove(&p).is_some() {
            actions.push(Action::Close(p));
        }
        self.fill(now, view, &mut actions);
        (Admission::Accept, actions)
    }

    /// An incoming tunnel closed.
    pub fn on_incoming_closed(&mut self, p: Peer) {
        self.incoming.remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u16) -> Peer {
        Ipv6Net::new(std::net::Ipv6Addr::new(0xfd00, 0, 0, i, 0, 0, 0, 0), 64).unwrap_or_default()
    }

    fn view(routed: impl IntoIterator<Item = u16>) -> View {
        View {
            routed: routed.into_iter().map(peer).collect(),
            ..View::default()
        }
    }

    /// Nodes on our LAN are reached over it: no tunnel to them, neither
    /// among routed peers nor from the cache when the LAN is all we route.
    #[test]
    fn lan_neighbours_are_never_tunnel_candidates() {
        let t0 = Instant::now();
        let cfg = PolicyConfig {
            client_count: 3,
            ..PolicyConfig::default()
        };
        let mut p = Policy::new(peer(1), cfg.clone(), t0, 7);
        let mut v = view([2, 3, 4, 5]);
        v.lan = [peer(2), peer(3)].into_iter().collect();
        let opened: Vec<Action> = p.tick(t0, &v);
        assert!(opened
            .iter()
            .all(|a| *a != Action::Open(peer(2)) && *a != Action::Open(peer(3))));
        assert_eq!(
            opened
                .iter()
                .filter(|a| matches!(a, Action::Open(_)))
                .count(),
            2,
            "{opened:?}"
        );
        let mut p = Policy::new(peer(1), cfg, t0, 7);
        let mut only_lan = view([2]);
        only_lan.lan = [peer(2)].into_iter().collect();
        only_lan.cache = vec![peer(2), peer(7)];
        let a = p.tick(t0, &only_lan);
        assert!(
            a.contains(&Action::Open(peer(7))),
            "alone but for the LAN: {a:?}"
        );
        assert!(!a.contains(&Action::Open(peer(2))));
    }

    #[test]
    fn next_timeout_is_in_the_future_and_tick_then_acts_or_moves_it() {
        let t0 = Instant::now();
        let mut p = Policy::new(peer(1), PolicyConfig::default(), t0, 7);
        let v = view([2, 3]);
        let _ = p.tick(t0, &v);
        let mut now = t0;
        for _ in 0..50 {
            let Some(next) = p.next_timeout(now) else {
                break;
            };
            assert!(next > now);
            now = next;
            let _ = p.tick(now, &v);
        }
        assert!(now > t0);
    }

    fn opened(actions: &[Action]) -> Vec<Peer> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Open(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn cfg(client_count: usize, max_clients: usize) -> PolicyConfig {
        PolicyConfig {
            client_count,
            max_clients,
            ..PolicyConfig::default()
        }
    }

    /// A policy that has been served once (no NAT cap).
    fn served(me: u16, c: PolicyConfig, now: Instant) -> Policy {
        let mut p = Policy::new(peer(me), c, now, 7);
        let (adm, _) = p.on_incoming(peer(999), now, &view([me, 999]));
        assert_eq!(adm, Admission::Accept);
        p.on_incoming_closed(peer(999));
        p
    }

    #[test]
    fn opens_client_count_tunnels_to_distant_peers_only() {
        let t = Instant::now();
        let mut p = served(0, cfg(3, 5), t);
        let a = p.tick(t, &view(0..20));
        let o = opened(&a);
        assert_eq!(o.len(), 3);
        assert!(!o.contains(&peer(0)), "never to ourselves");
        for x in &o {
            p.on_up(*x, t);
        }
        assert!(opened(&p.tick(t, &view(0..20))).is_empty(), "full");
        // Incoming peers are neighbours, not distant: never a second tunnel.
        let mut q = served(0, cfg(3, 5), t);
        for i in 1..=5 {
            let _ = q.on_incoming(peer(i), t, &View::default());
        }
        let o = opened(&q.tick(t, &view(0..6)));
        assert!(o.is_empty(), "{o:?}");
    }

    #[test]
    fn incoming_is_capped_by_max_clients() {
        let t = Instant::now();
        let mut p = Policy::new(peer(0), cfg(2, 2), t, 1);
        assert_eq!(
            p.on_incoming(peer(1), t, &View::default()).0,
            Admission::Accept
        );
        assert_eq!(
            p.on_incoming(peer(2), t, &View::default()).0,
            Admission::Accept
        );
        assert_eq!(
            p.on_incoming(peer(3), t, &View::default()).0,
            Admission::Busy
        );
        assert_eq!(
            p.on_incoming(peer(1), t, &View::default()).0,
            Admission::Accept,
            "a known client again"
        );
        p.on_incoming_closed(peer(2));
        assert_eq!(
            p.on_incoming(peer(3), t, &View::default()).0,
            Admission::Accept
        );
    }

    #[test]
    fn never_served_nodes_keep_two_outgoing() {
        let t = Instant::now();
        let mut p = Policy::new(peer(0), cfg(10, 20), t, 3);
        assert_eq!(opened(&p.tick(t, &view(0..50))).len(), 2);
        let (_, a) = p.on_incoming(peer(77), t, &view(0..50));
        assert_eq!(opened(&a).len(), 8, "served once: the cap lifts");
    }

    #[test]
    fn rotation_drains_the_least_useful_tunnel_then_closes_it() {
        let t = Instant::now();
        let c = PolicyConfig {
            tunnel_refresh: Duration::from_secs(300),
            ..cfg(3, 5)
        };
        let mut p = served(0, c, t);
        let mut v = view(0..20);
        let first = opened(&p.tick(t, &v));
        for x in &first {
            p.on_up(*x, t);
        }
        v.routes_via = first
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, 10 - i))
            .collect();
        let worst = first[2];
        assert!(p.tick(t + Duration::from_secs(299), &v).is_empty());
        let a = p.tick(t + Duration::from_secs(300), &v);
        assert!(
            a.contains(&Action::SetCost(worst, DRAIN_MULTIPLIER)),
            "{a:?}"
        );
        assert_eq!(opened(&a).len(), 1, "the replacement opens at once");
        assert!(!a.contains(&Action::Close(worst)), "still carries routes");
        v.routes_via.insert(worst, 0);
        let a = p.tick(t + Duration::from_secs(301), &v);
        assert!(a.contains(&Action::Close(worst)), "{a:?}");
    }

    #[test]
    fn a_drain_that_never_empties_ends_at_the_timeout() {
        let t = Instant::now();
        let c = PolicyConfig {
            tunnel_refresh: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(60),
            ..cfg(1, 5)
        };
        let mut p = served(0, c, t);
        let mut v = view(0..5);
        let x = opened(&p.tick(t, &v))[0];
        p.on_up(x, t);
        v.routes_via.insert(x, 4);
        let a = p.tick(t + Duration::from_secs(10), &v);
        assert!(a.contains(&Action::SetCost(x, DRAIN_MULTIPLIER)));
        assert!(!p
            .tick(t + Duration::from_secs(69), &v)
            .contains(&Action::Close(x)));
        assert!(p
            .tick(t + Duration::from_secs(70), &v)
            .contains(&Action::Close(x)));
    }

    #[test]
    fn dead_tunnels_are_replaced_and_failing_peers_back_off() {
        let t = Instant::now();
        let mut p = served(0, cfg(1, 5), t);
        let v = view([0, 1]);
        assert_eq!(opened(&p.tick(t, &v)), vec![peer(1)]);
        // Fails: no retry before the back-off (5 s, then 10 s).
        assert!(opened(&p.on_failed(peer(1), t, &v)).is_empty());
        assert!(opened(&p.tick(t + Duration::from_secs(4), &v)).is_empty());
        assert_eq!(
            opened(&p.tick(t + Duration::from_secs(5), &v)),
            vec![peer(1)]
        );
        assert!(opened(&p.on_failed(peer(1), t + Duration::from_secs(5), &v)).is_empty());
        assert!(opened(&p.tick(t + Duration::from_secs(14), &v)).is_empty());
        assert_eq!(
            opened(&p.tick(t + Duration::from_secs(15), &v)),
            vec![peer(1)]
        );
        p.on_up(peer(1), t + Duration::from_secs(15));
        // It dies: replaced at once by another peer when there is one.
        let v2 = view([0, 1, 2]);
        let a = p.on_down(peer(1), t + Duration::from_secs(20), &v2);
        assert_eq!(opened(&a), vec![peer(2)]);
    }

    #[test]
    fn duplicate_tunnels_are_resolved_by_prefix_order() {
        let t = Instant::now();
        // Smaller prefix: drops its outgoing tunnel when the peer connects in.
        let mut small = served(1, cfg(1, 5), t);
        assert_eq!(opened(&small.tick(t, &view([1, 9]))), vec![peer(9)]);
        let (adm, a) = small.on_incoming(peer(9), t, &view([1, 9]));
        assert_eq!(adm, Admission::Accept);
        assert!(a.contains(&Action::Close(peer(9))));
        // Larger prefix: keeps its outgoing one.
        let mut large = served(9, cfg(1, 5), t);
        assert_eq!(opened(&large.tick(t, &view([1, 9]))), vec![peer(1)]);
        let (_, a) = large.on_incoming(peer(1), t, &view([1, 9]));
        assert!(!a.contains(&Action::Close(peer(1))));
    }

    #[test]
    fn an_island_reaches_out_through_the_cache_or_the_registry() {
        let t = Instant::now();
        let mut p = served(0, cfg(3, 5), t);
        let mut v = view(0..5);
        v.anchor = Some(peer(100));
        v.cache = vec![peer(2), peer(50)];
        let o = opened(&p.tick(t, &v));
        assert!(
            o.contains(&peer(50)),
            "a cached peer outside the island first: {o:?}"
        );
        assert_eq!(o.len(), 3);
        let mut q = served(0, cfg(3, 5), t);
        let mut v = view(0..5);
        v.anchor = Some(peer(100));
        let a = q.tick(t, &v);
        assert!(a.contains(&Action::Bootstrap), "{a:?}");
        // Not an island when the anchor is routed.
        let mut r = served(0, cfg(3, 5), t);
        let mut v = view([0, 1, 2, 100]);
        v.anchor = Some(peer(100));
        v.cache = vec![peer(50)];
        assert!(!opened(&r.tick(t, &v)).contains(&peer(50)));
    }

    #[test]
    fn pinned_neighbours_are_kept_on_top_of_client_count() {
        let now = Instant::now();
        let mut p = served(1, cfg(2, 1), now);
        let mut c = cfg(2, 1);
        c.pinned = [peer(9)].into_iter().collect();
        p.set_config(c, now);
        // Not routed yet, and opened at once; then the usual two.
        let a = p.tick(now, &view([2, 3, 4, 5]));
        assert!(opened(&a).contains(&peer(9)), "{a:?}");
        assert_eq!(opened(&a).len(), 3, "{a:?}");
        for q in opened(&a) {
            p.on_up(q, now);
        }
        // Rotation never drains it, however useless.
        let mut routed = view([2, 3, 4, 5, 9]);
        routed.routes_via.insert(peer(2), 3);
        routed.routes_via.insert(peer(3), 3);
        routed.routes_via.insert(peer(4), 3);
        routed.routes_via.insert(peer(5), 3);
        let mut t = now;
        for _ in 0..5 {
            t += Duration::from_secs(301);
            let a = p.tick(t, &routed);
            assert!(
                !a.contains(&Action::SetCost(peer(9), DRAIN_MULTIPLIER)),
                "{a:?}"
            );
            assert!(!a.contains(&Action::Close(peer(9))), "{a:?}");
        }
        // Lost: reopened once its back-off ends.
        let a = p.on_down(peer(9), t, &routed);
        assert!(!opened(&a).contains(&peer(9)), "backs off first: {a:?}");
        let a = p.tick(t + Duration::from_secs(10), &routed);
        assert!(opened(&a).contains(&peer(9)), "{a:?}");
        // A pinned peer is accepted beyond max_clients.
        assert_eq!(p.on_incoming(peer(7), t, &routed).0, Admission::Accept);
        assert_eq!(p.on_incoming(peer(8), t, &routed).0, Admission::Busy);
        let mut c = cfg(2, 1);
        c.pinned = [peer(8)].into_iter().collect();
        p.set_config(c, t);
        assert_eq!(p.on_incoming(peer(8), t, &routed).0, Admission::Accept);
        // And it takes no one's slot.
        p.on_incoming_closed(peer(7));
        assert_eq!(p.on_incoming(peer(6), t, &routed).0, Admission::Accept);
    }

    #[test]
    fn alone_bootstraps_from_cache_then_registry() {
        let t = Instant::now();
        let mut p = Policy::new(peer(0), cfg(2, 5), t, 5);
        let mut v = view([0]);
        v.cache = vec![peer(4), peer(5), peer(6)];
        let a = p.tick(t, &v);
        assert_eq!(opened(&a).len(), 2);
        assert!(!a.contains(&Action::Bootstrap));
        let mut after = Vec::new();
        for x in opened(&a) {
            after.extend(p.on_failed(x, t, &view([0])));
        }
        assert_eq!(
            after,
            vec![Action::Bootstrap],
            "cache exhausted: ask the registry"
        );
        assert!(
            p.tick(t + Duration::from_secs(1), &view([0])).is_empty(),
            "with back-off"
        );
        assert_eq!(
            p.tick(t + Duration::from_secs(5), &view([0])),
            vec![Action::Bootstrap]
        );
    }
}
