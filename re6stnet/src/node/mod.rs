//! The node core: everything the node decides, sans-IO (quinn-proto style).
//!
//! The core owns the tunnel records and their timeouts, the set-up
//! responder and the tie-break of simultaneous opens, the peer protocol's
//! reactions, the live network configuration and revocation, renewal, the
//! peer cache (in memory) and the tunnel-manager policy. It never reads the
//! clock, touches a file or a socket: the driver passes `now` (monotonic)
//! and `unix` (seconds) into every `handle_*`, carries out what
//! [`NodeCore::poll_action`] returns, and calls [`NodeCore::handle_timeout`]
//! at [`NodeCore::poll_timeout`].

mod action;
mod book;
mod config;
mod observed;
mod peer_messages;
mod routing;
mod setup;
mod timers;
mod tunnels;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use re6st_registry::auth::SignedPeerRecord;
use re6st_registry::cert::{load_key, overlay_address, CaCert, NodeCert};
use re6st_registry::config::{HmacKeys, NetworkConfig, SignedConfig};
use re6st_tunnel::cache::StoredPeer;
use re6st_tunnel::endpoint::{Endpoint, Transport};
use re6st_tunnel::policy::{self, Peer, Policy, View};
use re6st_tunnel::setup::{Identity, Responder};

use crate::ctl::Metrics;
use crate::peer::{Body, PeerProtocol};

pub use action::{
    Action, CacheChange, FailReason, LossReason, RegistryKind, RegistryRequest, RegistryResult,
};
pub use book::{Book, Candidate};
pub use config::{hello_interval, policy_config, ConfigSource, Roles};
pub use observed::{Claim, Observed, Reachability, Seen};
pub use routing::{RoutingView, SelectedRoute, Via};
pub use timers::{Timer, Timers};
pub use tunnels::{Tunnel, DEAD_AFTER, HANDSHAKE_TIMEOUT, INCOMING_TIMEOUT};

/// Waiting for endpoints or a set-up answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Peer record refresh (and registry publication).
pub const RECORD_REFRESH: Duration = Duration::from_secs(300);
/// A failed publication is retried after this.
pub const PUBLISH_RETRY: Duration = Duration::from_secs(10);
/// The first topology report goes this long after start (tunnels up).
pub const REPORT_FIRST: Duration = Duration::from_secs(15);
/// Topology reports follow each other this far apart.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Renew the certificate this long (seconds) before it expires.
pub const RENEW_BEFORE_S: i64 = 30 * 86_400;
/// How often the certificate's expiry is looked at.
pub const RENEW_CHECK: Duration = Duration::from_secs(3600);
/// A failed renewal is retried after this.
pub const RENEW_RETRY: Duration = Duration::from_secs(600);
/// First retry delay of a failed configuration or key request (doubles).
pub const REGISTRY_RETRY: Duration = Duration::from_secs(2);
/// Longest retry delay of the Babel keys.
pub const HMAC_RETRY_MAX: Duration = Duration::from_secs(300);
/// Back-off (seconds, doubling in the cache) of a peer that did not answer.
const UNREACHABLE_BACKOFF_S: i64 = 30;
/// Back-off (seconds, doubling in the cache) of a peer whose tunnel died.
const LOST_BACKOFF_S: i64 = 10;

/// What the core starts from.
pub struct CoreConfig {
    /// The CA.
    pub ca: CaCert,
    /// Our certificate (PEM).
    pub cert_pem: String,
    /// Our node key (PEM).
    pub key_pem: String,
    /// The network configuration in force.
    pub signed: SignedConfig,
    /// The Babel keys we have (None: none yet).
    pub hmac: Option<HmacKeys>,
    /// The persistent peer cache's content.
    pub peers: Vec<StoredPeer>,
    /// Our UDP port (the peer protocol's too).
    pub port: u16,
    /// LAN interfaces Babel runs on.
    pub interfaces: Vec<String>,
    /// Period of the configuration check with the registry.
    pub config_refresh: Duration,
    /// Whether a registry is configured.
    pub registry: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// What this node changes of the network's tunnel policy.
    pub roles: Roles,
}

/// Why the core cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Our certificate or key.
    #[error("identity: {0}")]
    Identity(re6st_registry::Error),
    /// The network configuration does not verify.
    #[error("network configuration: {0}")]
    Config(re6st_registry::Error),
}

/// A tunnel as the control API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelStatus {
    /// The peer.
    pub peer: Peer,
    /// Its tun device.
    pub name: String,
    /// We opened it.
    pub outgoing: bool,
    /// Handshake completed.
    pub up: bool,
    /// Babel cost multiplier.
    pub cost: u16,
    /// Selected routes through it.
    pub routes: usize,
}

/// Where the endpoints given to [`NodeCore::handle_endpoints`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointSource {
    /// The operator's (`--endpoint`): announced as they are.
    Configured,
    /// Found on our interfaces: corrected by what peers see.
    Detected,
}

/// An outgoing set-up waiting for its answer.
#[derive(Clone, Debug)]
struct Attempt {
    nonce: String,
    endpoints: Vec<SocketAddr>,
    transport: Transport,
}

/// A set-up request re-sent while a NATed peer punches.
#[derive(Clone, Debug)]
struct Resend {
    bytes: Vec<u8>,
    to: Vec<SocketAddr>,
    left: u8,
}

/// The node's state machine.
pub struct NodeCore {
    ca: CaCert,
    cert: NodeCert,
    cert_pem: String,
    key_pem: String,
    me: Identity,
    prefix: Peer,
    network: Ipv6Net,
    netconf: NetworkConfig,
    signed: SignedConfig,
    hmac: Option<HmacKeys>,
    port: u16,
    interfaces: Vec<String>,
    config_refresh: Duration,
    registry: bool,
    policy: Policy,
    responder: Responder,
    peers: PeerProtocol,
    book: Book,
    cached: Vec<Candidate>,
    tunnels: BTreeMap<Peer, Tunnel>,
    asking: BTreeSet<Peer>,
    stale: BTreeSet<Peer>,
    pending: BTreeMap<Peer, Attempt>,
    view: View,
    detected: (EndpointSource, Vec<SocketAddr>),
    observed: Observed,
    reach: Reachability,
    resend: BTreeMap<Peer, Resend>,
    record: Option<SignedPeerRecord>,
    timers: Timers,
    busy: BTreeSet<RegistryKind>,
    roles: Roles,
    config_failures: u32,
    /// Whether the registry answered our last read (config, bootstrap);
    /// None before the first.
    registry_reachable: Option<bool>,
    hmac_failures: u32,
    metrics: Metrics,
    revoked: bool,
    next_name: u32,
    actions: VecDeque<Action>,
}

impl std::fmt::Debug for NodeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore")
            .field("prefix", &self.prefix)
            .field("tunnels", &self.tunnels)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

fn identity(cert: &NodeCert, key_pem: &str) -> Result<Identity, CoreError> {
    Ok(Identity {
        cert: cert.clone(),
        key: load_key(key_pem).map_err(CoreError::Identity)?,
    })
}

/// Doubling delay from `base` after `failures` failures, at most `max`.
fn retry_delay(base: Duration, failures: u32, max: Duration) -> Duration {
    (base * (1u32 << failures.min(16))).min(max)
}

impl NodeCore {
    /// A core at `now`; its first actions (record, renewal check, keys,
    /// first tunnels) are queued at once.
    pub fn new(cfg: CoreConfig, now: Instant, unix: i64) -> Result<Self, CoreError> {
        let cert = cfg
            .ca
            .verify_node(&cfg.cert_pem, None)
            .map_err(CoreError::Identity)?;
        let netconf = cfg.signed.verify(&cfg.ca).map_err(CoreError::Config)?;
        let mut responder = Responder::new(cfg.ca.clone(), identity(&cert, &cfg.key_pem)?);
        responder.set_crl(netconf.crl.clone());
        let mut peers = PeerProtocol::new(cfg.ca.clone(), identity(&cert, &cfg.key_pem)?);
        peers.set_crl(netconf.crl.clone());
        let prefix = cert.prefix;
        let mut core = Self {
            me: identity(&cert, &cfg.key_pem)?,
            network: cfg.ca.network(),
            policy: Policy::new(prefix, policy_config(&netconf, &cfg.roles), now, cfg.seed),
            roles: cfg.roles,
            book: Book::new(cfg.peers, re6st_tunnel::cache::CACHE_SIZE, cfg.seed),
            ca: cfg.ca,
            cert,
            cert_pem: cfg.cert_pem,
            key_pem: cfg.key_pem,
            prefix,
            netconf,
            signed: cfg.signed,
            hmac: cfg.hmac,
            port: cfg.port,
            interfaces: cfg.interfaces,
            config_refresh: cfg.config_refresh,
            registry: cfg.registry,
            responder,
            peers,
            cached: Vec::new(),
            tunnels: BTreeMap::new(),
            asking: BTreeSet::new(),
            stale: BTreeSet::new(),
            pending: BTreeMap::new(),
            view: View::default(),
            detected: (EndpointSource::Detected, Vec::new()),
            observed: Observed::default(),
            reach: Reachability::default(),
            resend: BTreeMap::new(),
            record: None,
            timers: Timers::default(),
            busy: BTreeSet::new(),
            config_failures: 0,
            registry_reachable: None,
            hmac_failures: 0,
            metrics: Metrics::default(),
            revoked: false,
            next_name: 0,
            actions: VecDeque::new(),
        };
        // A cached configuration may already revoke us or some peers.
        core.apply_crl(now, unix);
        if core.registry {
            core.timers.set(Timer::Config, now + Duration::from_secs(1));
            core.timers.set(Timer::Report, now + REPORT_FIRST);
        }
        core.refresh_record(now);
        core.check_renewal(now, unix);
        if core.hmac.is_none() {
            core.request(RegistryRequest::Hmac);
        }
        core.refresh_cache(unix);
        core.run_policy(now, unix);
        core.settle(now);
        Ok(core)
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`NodeCore::handle_timeout`] is due (None: only an input can
    /// make the core act).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Time passed: handles every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, unix: i64) {
        for timer in self.timers.expired(now) {
            match timer {
                Timer::Policy => self.run_policy(now, unix),
                Timer::Record => self.refresh_record(now),
                Timer::Config => {
                    self.timers.set(Timer::Config, now + self.config_refresh);
                    self.request(RegistryRequest::Config);
                }
                Timer::Hmac => self.request_hmac(),
                Timer::Renew => self.check_renewal(now, unix),
                Timer::Announced => {
                    // Announced and not received since (too large to
                    // flood, the peer went away, or a member lied): the
                    // registry has the truth.
                    self.request(RegistryRequest::Config);
                }
                Timer::Ask(p) => {
                    if self.asking.remove(&p) {
                        self.unreachable(now, unix, p, FailReason::NoEndpointsAnswer);
                    }
                }
                Timer::Resend(p) => self.resend_setup(now, p),
                Timer::Setup(p) => {
                    self.resend.remove(&p);
                    if let Some(a) = self.pending.remove(&p) {
                        if a.transport == Transport::Udp && self.roles.transport.is_none() {
                            // No answer over UDP: perhaps UDP is blocked
                            // on the way; the same port over TCP.
                            tracing::debug!(peer = %p, "no answer over UDP: trying TCP");
                            self.metrics.tcp_fallbacks += 1;
                            self.request_setup(now, unix, p, &a.endpoints, Transport::Tcp);
                            continue;
                        }
                        // Its record may have changed (a NAT's mapping
                        // learned since): next time, ask the peer itself.
                        self.stale.insert(p);
                        self.unreachable(now, unix, p, FailReason::NoSetupAnswer);
                    }
                }
                Timer::Tunnel(p) => self.check_tunnel(now, unix, p),
                Timer::Report => {
                    self.timers.set(Timer::Report, now + REPORT_EVERY);
                    if !self.revoked {
                        self.request(RegistryRequest::Report);
                    }
                }
            }
        }
        self.settle(now);
    }

    /// A datagram on the shared UDP socket that is not WireGuard: a
    /// set-up request or answer, or a peer-protocol message.
    pub fn handle_datagram(&mut self, now: Instant, unix: i64, src: Endpoint, bytes: &[u8]) {
        if bytes.starts_with(crate::peer::MAGIC) {
            self.on_peer_message(now, unix, src.addr, bytes);
        } else if re6st_tunnel::setup::is_request(bytes) {
            self.on_setup_request(now, unix, src, bytes);
        } else {
            self.on_setup_reply(now, unix, src, bytes);
        }
        self.settle(now);
    }

    /// The handshake of the tunnel to `peer` completed; `endpoint` is
    /// where the data plane sees the peer.
    pub fn handle_link_up(
        &mut self,
        now: Instant,
        unix: i64,
        peer: Peer,
        endpoint: Option<SocketAddr>,
    ) {
        let Some(t) = self.tunnels.get_mut(&peer) else {
            return;
        };
        if t.up {
            return;
        }
        t.up = true;
        t.last_neighbour = now;
        let (outgoing, deadline) = (t.outgoing, t.deadline());
        self.timers.set(Timer::Tunnel(peer), deadline);
        self.metrics.handshakes += 1;
        if outgoing {
            self.policy.on_up(peer, now);
            if let Some(ep) = endpoint {
                if self.book.contains(peer) {
                    self.book.mark_ok(peer, ep, unix);
                    self.persist(CacheChange::MarkOk {
                        peer,
                        endpoint: ep,
                        unix,
                    });
                }
            }
        }
        let version = self.netconf.version;
        self.send_peer(unix, peer, &Body::ConfigVersion { version });
        self.settle(now);
    }

    /// The data plane expired the link to `peer`.
    pub fn handle_link_down(&mut self, now: Instant, unix: i64, peer: Peer) {
        self.lost(now, unix, peer, LossReason::Expired);
        self.settle(now);
    }

    /// The driver could not create the link or tun device `name` of an
    /// [`Action::OpenTunnel`].
    pub fn handle_tunnel_failed(&mut self, now: Instant, unix: i64, peer: Peer, name: &str) {
        if self.tunnels.get(&peer).is_none_or(|t| t.name != name) {
            return;
        }
        let Some(t) = self.tunnels.remove(&peer) else {
            return;
        };
        self.timers.clear(Timer::Tunnel(peer));
        self.metrics.tunnels_opened = self.metrics.tunnels_opened.saturating_sub(1);
        if t.outgoing {
            self.failed(now, unix, peer, FailReason::Link);
        } else {
            self.policy.on_incoming_closed(peer);
        }
        self.settle(now);
    }

    /// What routing knows now (about once a second).
    pub fn handle_routing(&mut self, now: Instant, unix: i64, routing: &RoutingView) {
        for (p, t) in &mut self.tunnels {
            if routing.heard.contains(&t.name) {
                t.last_neighbour = now;
                self.timers.set(Timer::Tunnel(*p), t.deadline());
            }
        }
        let cache = std::mem::take(&mut self.view.cache);
        self.view = routing::policy_view(routing, self.prefix, self.network, &self.tunnels);
        self.view.cache = cache;
        self.view.anchor = self.netconf.anchor.as_deref().and_then(|a| a.parse().ok());
        self.refresh_cache(unix);
        self.run_policy(now, unix);
        self.settle(now);
    }

    /// Our underlay endpoints, as the driver found them (after
    /// [`Action::DetectEndpoints`]): our peer record is signed and
    /// published. Detected ones are corrected by what peers see of us
    /// (`observed`); configured ones are announced as they are.
    pub fn handle_endpoints(
        &mut self,
        now: Instant,
        unix: i64,
        source: EndpointSource,
        endpoints: Vec<SocketAddr>,
    ) {
        self.detected = (source, endpoints);
        self.publish_record(now, unix, true);
        self.settle(now);
    }

    /// Signs and publishes our peer record when what we announce changed
    /// (or `refresh`: a new timestamp).
    fn publish_record(&mut self, now: Instant, unix: i64, refresh: bool) {
        let reach = match &self.detected {
            (EndpointSource::Configured, eps) => Reachability {
                endpoints: eps.clone(),
                nat: false,
            },
            (EndpointSource::Detected, eps) => self.observed.reachability(now, eps),
        };
        if !refresh && reach == self.reach {
            return;
        }
        if reach != self.reach {
            tracing::info!(endpoints = ?reach.endpoints, nat = reach.nat, "announced endpoints");
        }
        self.reach = reach;
        // A client-only node accepts no tunnel, and nobody can dial a node
        // left with no endpoint: neither publishes a record, so nobody
        // dials in vain.
        if self.roles.max_clients.unwrap_or(self.netconf.max_clients) == 0
            || self.reach.endpoints.is_empty()
        {
            self.record = None;
            return;
        }
        let record = re6st_registry::auth::PeerRecord {
            cert: self.cert_pem.clone(),
            endpoints: self.reach.endpoints.clone(),
            nat: self.reach.nat,
            timestamp: unix,
        };
        match SignedPeerRecord::sign(&record, &self.me.key) {
            Ok(s) => {
                self.record = Some(s.clone());
                self.request(RegistryRequest::Publish(s));
            }
            Err(e) => tracing::warn!(error = %e, "signing our peer record"),
        }
    }

    /// `peer` answered a set-up request of ours, saying where it saw it
    /// come from.
    fn on_seen(&mut self, now: Instant, unix: i64, peer: Peer, seen: SocketAddr) {
        let claim = self.observed.claim(now, peer, seen);
        tracing::debug!(%peer, %seen, claim = claim.label(), "observed endpoint");
        *self
            .metrics
            .observed
            .entry(claim.label().to_string())
            .or_default() += 1;
        if claim != Claim::Unusable {
            self.publish_record(now, unix, false);
        }
    }

    /// The node stops: every peer is told and every tunnel closed.
    pub fn shutdown(&mut self, unix: i64) {
        let peers: Vec<Peer> = self.tunnels.keys().copied().collect();
        for p in &peers {
            self.send_peer(unix, *p, &Body::Close);
        }
        for p in peers {
            self.remove_tunnel(p);
        }
        self.timers = Timers::default();
    }

    /// Our prefix.
    pub fn prefix(&self) -> Peer {
        self.prefix
    }

    /// Our certificate.
    pub fn certificate(&self) -> &NodeCert {
        &self.cert
    }

    /// The network configuration in force.
    pub fn config(&self) -> &NetworkConfig {
        &self.netconf
    }

    /// The version of our Babel keys (None: none yet).
    pub fn hmac_version(&self) -> Option<u64> {
        self.hmac.as_ref().map(|k| k.version)
    }

    /// Whether our certificate is revoked.
    pub fn revoked(&self) -> bool {
        self.revoked
    }

    /// Whether the registry answered our last read (None: not asked yet,
    /// or no registry).
    pub fn registry_reachable(&self) -> Option<bool> {
        self.registry_reachable
    }

    /// The peers whose last direct attempt failed (see [`Book::failing`]).
    pub fn failing_peers(&self, unix: i64) -> Vec<Peer> {
        self.book.failing(unix)
    }

    /// The MTU of our tunnel devices.
    pub fn mtu(&self) -> u32 {
        self.roles.mtu.unwrap_or(self.netconf.mtu)
    }

    /// The endpoints of our peer record.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.reach.endpoints
    }

    /// What peers see of us, by family (IPv4, IPv6).
    pub fn seen(&self, now: Instant) -> [Seen; 2] {
        [true, false].map(|v4| {
            let ours: Vec<SocketAddr> = self
                .detected
                .1
                .iter()
                .filter(|a| a.is_ipv4() == v4)
                .copied()
                .collect();
            self.observed.seen(now, v4, &ours)
        })
    }

    /// Cached peers not in back-off, as of the last routing view.
    pub fn cached_peers(&self) -> &[Candidate] {
        &self.cached
    }

    /// Our tunnels.
    pub fn tunnels(&self) -> Vec<TunnelStatus> {
        self.tunnels
            .iter()
            .map(|(p, t)| TunnelStatus {
                peer: *p,
                name: t.name.clone(),
                outgoing: t.outgoing,
                up: t.up,
                cost: t.cost,
                routes: self.view.routes_via.get(p).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Counters (the set-up responder's drops included).
    pub fn metrics(&self) -> Metrics {
        let mut m = self.metrics.clone();
        for (reason, n) in &self.responder.stats().dropped {
            m.rejected.insert(format!("setup_{reason}"), *n);
        }
        m
    }

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn persist(&mut self, c: CacheChange) {
        self.push(Action::Persist(c));
    }

    /// Arms the policy's timer; called after every input.
    fn settle(&mut self, now: Instant) {
        match self.policy.next_timeout(now) {
            Some(at) if !self.revoked => self.timers.set(Timer::Policy, at),
            _ => self.timers.clear(Timer::Policy),
        }
    }

    /// Runs a registry request, one of each kind at a time.
    fn request(&mut self, r: RegistryRequest) {
        if self.registry && self.busy.insert(r.kind()) {
            self.push(Action::Registry(r));
        }
    }

    fn send_peer(&mut self, unix: i64, to: Peer, body: &Body) {
        match self.peers.seal(to, body, unix) {
            Ok(bytes) => {
                let dst =
                    Endpoint::udp(SocketAddr::new(IpAddr::V6(overlay_address(to)), self.port));
                self.push(Action::Send { dst, bytes });
                *self
                    .metrics
                    .peer_out
                    .entry(peer_messages::body_kind(body).to_string())
                    .or_default() += 1;
            }
            Err(e) => {
                let kind = peer_messages::body_kind(body);
                tracing::warn!(error = %e, kind, "a peer message cannot be sealed");
                *self
                    .metrics
                    .peer_unsent
                    .entry(kind.to_string())
                    .or_default() += 1;
            }
        }
    }

    /// The cache's peers for the policy (and the control API): those not
    /// in back-off, else all of them (perhaps from before a restart, or
    /// the registry is down): better to retry them than to stay alone;
    /// the policy still spaces its own retries.
    fn refresh_cache(&mut self, unix: i64) {
        self.cached = self.book.candidates(unix);
        self.view.cache = if self.cached.is_empty() {
            self.book
                .candidates(i64::MAX)
                .into_iter()
                .map(|c| c.prefix)
                .collect()
        } else {
            self.cached.iter().map(|c| c.prefix).collect()
        };
    }

    fn run_policy(&mut self, now: Instant, unix: i64) {
        if !self.revoked {
            let actions = self.policy.tick(now, &self.view);
            self.act(now, unix, actions);
        }
    }

    /// Carries out the policy's decisions.
    fn act(&mut self, now: Instant, unix: i64, actions: Vec<policy::Action>) {
        for a in actions {
            match a {
                policy::Action::Open(p) => self.open(now, unix, p),
                policy::Action::SetCost(p, m) => {
                    if let Some(t) = self.tunnels.get_mut(&p) {
                        t.cost = m;
                        let name = t.name.clone();
                        self.push(Action::SetCost {
                            name,
                            multiplier: m,
                        });
                        if m > 1 {
                            self.send_peer(unix, p, &Body::DrainRequest);
                        }
                    }
                }
                policy::Action::Close(p) => {
                    self.forget_attempt(p);
                    if self.tunnels.contains_key(&p) {
                        tracing::info!(peer = %p, "closing tunnel");
                        self.send_peer(unix, p, &Body::Close);
                        self.remove_tunnel(p);
                    }
                }
                policy::Action::Bootstrap => self.request(RegistryRequest::Bootstrap),
            }
        }
    }

    /// Drops an outgoing attempt that has no tunnel yet.
    fn forget_attempt(&mut self, p: Peer) {
        if self.pending.remove(&p).is_some() {
            self.timers.clear(Timer::Setup(p));
        }
        if self.resend.remove(&p).is_some() {
            self.timers.clear(Timer::Resend(p));
        }
        if self.asking.remove(&p) {
            self.timers.clear(Timer::Ask(p));
        }
    }

    /// Adds a tunnel (replacing one to the same peer).
    fn add_tunnel(
        &mut self,
        now: Instant,
        p: Peer,
        cert: &NodeCert,
        endpoint: Option<Endpoint>,
        outgoing: bool,
    ) {
        self.remove_tunnel(p);
        self.next_name = self.next_name.wrapping_add(1) & 0xffff;
        let name = format!("re6st-{:04x}", self.next_name);
        tracing::info!(peer = %p, interface = %name, outgoing, "tunnel");
        let t = Tunnel::new(name.clone(), outgoing, cert.serial, cert.wg_key, now);
        self.timers.set(Timer::Tunnel(p), t.deadline());
        self.tunnels.insert(p, t);
        self.metrics.tunnels_opened += 1;
        self.push(Action::OpenTunnel {
            peer: p,
            name,
            wg_key: cert.wg_key,
            endpoint,
            mtu: self.mtu(),
        });
    }

    fn remove_tunnel(&mut self, p: Peer) -> Option<Tunnel> {
        let t = self.tunnels.remove(&p)?;
        self.timers.clear(Timer::Tunnel(p));
        self.metrics.tunnels_closed += 1;
        self.push(Action::CloseTunnel {
            peer: p,
            name: t.name.clone(),
        });
        Some(t)
    }

    /// A tunnel is gone (dead, closed by the peer): tell the policy.
    fn lost(&mut self, now: Instant, unix: i64, p: Peer, why: LossReason) {
        let Some(t) = self.remove_tunnel(p) else {
            return;
        };
        tracing::info!(peer = %p, why = why.label(), "tunnel lost");
        *self
            .metrics
            .tunnels_lost
            .entry(why.label().to_string())
            .or_default() += 1;
        if t.outgoing {
            self.mark_failed(p, unix, LOST_BACKOFF_S);
            let actions = self.policy.on_down(p, now, &self.view);
            self.act(now, unix, actions);
        } else {
            self.policy.on_incoming_closed(p);
        }
    }

    fn mark_failed(&mut self, p: Peer, unix: i64, backoff_s: i64) {
        if self.book.contains(p) {
            self.book.mark_failed(p, unix, backoff_s);
            self.persist(CacheChange::MarkFailed {
                peer: p,
                unix,
                backoff_s,
            });
        }
    }

    /// An outgoing attempt failed: the policy backs off from the peer and
    /// tries another.
    fn failed(&mut self, now: Instant, unix: i64, p: Peer, why: FailReason) {
        tracing::info!(peer = %p, why = why.label(), "tunnel attempt failed");
        *self
            .metrics
            .setup_failed
            .entry(why.label().to_string())
            .or_default() += 1;
        let actions = self.policy.on_failed(p, now, &self.view);
        self.act(now, unix, actions);
    }

    /// The peer did not answer or refused us: the cache remembers it as
    /// failing too (a busy peer works, so busy answers only call `failed`).
    fn unreachable(&mut self, now: Instant, unix: i64, p: Peer, why: FailReason) {
        self.mark_failed(p, unix, UNREACHABLE_BACKOFF_S);
        self.failed(now, unix, p, why);
    }

    /// A tunnel's timer fired.
    fn check_tunnel(&mut self, now: Instant, unix: i64, p: Peer) {
        let Some(t) = self.tunnels.get(&p) else {
            return;
        };
        match t.verdict(now) {
            tunnels::Verdict::Alive => {
                let at = t.deadline();
                self.timers.set(Timer::Tunnel(p), at);
            }
            tunnels::Verdict::NoHandshakeOut => {
                self.remove_tunnel(p);
                self.unreachable(now, unix, p, FailReason::NoHandshake);
            }
            tunnels::Verdict::NoHandshakeIn => self.lost(now, unix, p, LossReason::NoHandshake),
            tunnels::Verdict::Silent => self.lost(now, unix, p, LossReason::Silent),
        }
    }
}
