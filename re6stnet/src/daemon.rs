//! The node daemon: joins the data plane, the tunnel-manager policy, the
//! set-up responder, the peer cache, the peer protocol and the Babel driver.
//!
//! One task owns all state ([`Node`]); it reacts to data-plane events, to
//! the results of registry requests (run as separate tasks, so a registry
//! that is down never stalls the node), and to a 250 ms tick that reads
//! routing, checks tunnels and runs the policy. The control API reads a
//! snapshot the tick publishes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ipnet::{IpNet, Ipv6Net};
use re6st_registry::api::RenewRequest;
use re6st_registry::auth::{PeerRecord, SignedPeerRecord};
use re6st_registry::cert::overlay_address;
use re6st_registry::client::{Identity as ClientId, RegistryClient};
use re6st_registry::config::{HmacKeys, NetworkConfig, SignedConfig};
use re6st_routing::driver::{self, Command, DriverConfig, Status};
use re6st_routing::embedded::Embedded;
use re6st_routing::metric::RttParams;
use re6st_routing::router::{Filter, InterfaceConfig, RouterConfig};
use re6st_tunnel::cache::{CachedPeer, PeerCache};
use re6st_tunnel::plane::Event;
use re6st_tunnel::policy::{Action, Admission, Peer, Policy, PolicyConfig, View};
use re6st_tunnel::setup::{self, Decision, Outcome, Reply, Responder};
use tokio::sync::mpsc;

use crate::babel::{BabelHost, Plane, Routing};
use crate::config::NodeConfig;
use crate::ctl::{Metrics, Snapshot, TunnelInfo};
use crate::peer::{Body, PeerProtocol};
use crate::state::{self, Files};
use crate::system::{self, NodeAddress};

/// How often the node looks at routing and its tunnels.
const TICK: Duration = Duration::from_millis(250);
/// Routing is read every this many ticks.
const STATUS_EVERY: u32 = 4;
/// An outgoing tunnel whose handshake has not completed by then failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An incoming tunnel the initiator never completed is forgotten.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(30);
/// A tunnel with no Babel neighbour for this long is dead.
const DEAD_AFTER: Duration = Duration::from_secs(20);
/// Waiting for endpoints or a set-up answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Peer record refresh (and registry publication).
const RECORD_REFRESH: Duration = Duration::from_secs(300);
/// Renew the certificate this long before it expires.
const RENEW_BEFORE_S: i64 = 30 * 86_400;

fn unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The router-id of a node: its prefix folded to 8 bytes.
pub fn router_id(prefix: Ipv6Net) -> [u8; 8] {
    let a = overlay_address(prefix).octets();
    let mut id = [0u8; 8];
    for i in 0..8 {
        id[i] = a[i] ^ a[i + 8];
    }
    id
}

/// Our link-local address on every tunnel (derived from the router-id).
fn link_local(prefix: Ipv6Net) -> Ipv6Addr {
    let id = u64::from_be_bytes(router_id(prefix));
    Ipv6Addr::from((0xfe80u128 << 112) | u128::from(id))
}

/// Results of the tasks that talk to the registry.
enum TaskResult {
    Config(anyhow::Result<SignedConfig>),
    Hmac(anyhow::Result<HmacKeys>),
    Bootstrap(anyhow::Result<Vec<SignedPeerRecord>>),
    Published(anyhow::Result<()>),
    Renewed(anyhow::Result<String>),
}

struct Tunnel {
    index: u32,
    name: String,
    outgoing: bool,
    serial: u64,
    created: Instant,
    up: bool,
    last_neighbour: Instant,
    cost: u16,
}

struct PendingSetup {
    nonce: String,
    deadline: Instant,
}

/// The daemon's state.
struct Node {
    cfg: NodeConfig,
    files: Files,
    prefix: Ipv6Net,
    network: Ipv6Net,
    netconf: NetworkConfig,
    signed: SignedConfig,
    hmac: Option<HmacKeys>,
    plane: Plane,
    routing: Routing,
    policy: Policy,
    responder: Responder,
    peers: PeerProtocol,
    cache: PeerCache,
    tunnels: BTreeMap<Peer, Tunnel>,
    asking: HashMap<Peer, Instant>,
    pending: HashMap<Peer, PendingSetup>,
    view: View,
    /// Cached peers not in back-off, as of the last read of routing.
    cached: Vec<CachedPeer>,
    status: Option<Status>,
    endpoints: Vec<SocketAddr>,
    record: Option<SignedPeerRecord>,
    next_record: Instant,
    next_config: Instant,
    next_renew: Instant,
    next_name: u32,
    registry: Option<Arc<RegistryClient>>,
    tasks: mpsc::Sender<TaskResult>,
    busy: BTreeSet<&'static str>,
    metrics: Metrics,
    revoked: bool,
    started: Instant,
    ticks: u32,
}

fn policy_config(c: &NetworkConfig) -> PolicyConfig {
    PolicyConfig {
        client_count: c.client_count as usize,
        max_clients: c.max_clients as usize,
        tunnel_refresh: Duration::from_secs(u64::from(c.tunnel_refresh_s.max(1))),
        // Nodes of a new network start together: ask the registry again soon.
        backoff_base: Duration::from_secs(2),
        ..PolicyConfig::default()
    }
}

/// Routes a node accepts from Babel: inside the network, no longer than a
/// node prefix (a member cannot take over part of another node's prefix),
/// and no default route (gateways are not supported yet).
fn routing_filter(network: Ipv6Net, c: &NetworkConfig) -> Filter {
    Filter {
        networks: vec![IpNet::V6(network)],
        max_plen: Some(c.prefix_len),
        default_from: Vec::new(),
    }
}

fn tunnel_iface(c: &NetworkConfig) -> InterfaceConfig {
    let mut i = InterfaceConfig::tunnel(Duration::from_millis(u64::from(
        c.hello_interval_ms.max(10),
    )));
    i.rtt = Some(RttParams {
        min: Duration::from_millis(u64::from(c.rtt_min_ms)),
        max: Duration::from_millis(u64::from(c.rtt_max_ms)),
        max_penalty: c.max_rtt_penalty.min(u32::from(u16::MAX)) as u16,
        ..RttParams::default()
    });
    i
}

/// Fetches and checks the network configuration, or uses the cached one
/// while the registry is unreachable; waits (with back-off) only when
/// neither exists.
async fn initial_config(
    cfg: &NodeConfig,
    files: &Files,
    registry: Option<&RegistryClient>,
) -> anyhow::Result<(SignedConfig, NetworkConfig)> {
    let cached = state::load_network(&cfg.state_dir, &files.ca);
    let mut delay = Duration::from_secs(1);
    loop {
        if let Some(r) = registry {
            match r.config().await {
                Ok(signed) => match signed.verify(&files.ca) {
                    Ok(c)
                        if cached
                            .as_ref()
                            .is_none_or(|(_, old)| c.version >= old.version) =>
                    {
                        state::save_network(&cfg.state_dir, &signed)?;
                        return Ok((signed, c));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the registry's configuration does not verify")
                    }
                },
                Err(e) => tracing::warn!(error = %e, "registry unreachable"),
            }
        }
        if let Some(c) = cached.clone() {
            tracing::info!(
                version = c.1.version,
                "using the cached network configuration"
            );
            return Ok(c);
        }
        if registry.is_none() {
            anyhow::bail!("no registry configured and no cached network configuration");
        }
        tracing::info!(retry_in_s = delay.as_secs(), "waiting for the registry");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}

/// Runs the node until `shutdown` resolves; cleans up on the way out.
pub async fn run(
    cfg: NodeConfig,
    snapshot: Arc<RwLock<Snapshot>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let files = Files::load(&cfg.dir)?;
    state::state_dir(&cfg.state_dir)?;
    let prefix = files.cert.prefix;
    let network = files.ca.network();
    if files.cert.not_after < unix() {
        tracing::warn!("our certificate has expired: peers will refuse it until it is renewed");
    }
    let registry = match &cfg.registry {
        Some(url) => {
            let tls = match &cfg.tls_ca {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            Some(Arc::new(RegistryClient::with_tls_root(
                url,
                tls.as_deref(),
            )?))
        }
        None => None,
    };
    let (signed, netconf) = initial_config(&cfg, &files, registry.as_deref()).await?;
    tracing::info!(%prefix, version = netconf.version, "network configuration");

    system::enable_forwarding()?;
    let address = NodeAddress::install(prefix, network).await?;
    tracing::info!(address = %address.addr(), "node address");

    let hmac = state::load_hmac(&cfg.state_dir).filter(|k| k.version == netconf.hmac_version);
    let mut rcfg = RouterConfig::new(router_id(prefix), driver::os_seed()?);
    rcfg.auth = hmac.as_ref().map(state::auth_config).transpose()?;
    rcfg.filter = routing_filter(network, &netconf);
    let driver_cfg = DriverConfig {
        router: rcfg,
        table: cfg.table,
        proto: re6st_routing::kernel::PROTO,
        pref_src: Some(address.addr()),
        install: true,
        cover: vec![IpNet::V6(network)],
        seqno_file: Some(cfg.state_dir.join(state::SEQNO_FILE)),
    };
    let embedded = Embedded::start(&driver_cfg, Instant::now()).await?;
    // Events from the data plane: a bounded queue, overflow counted there.
    let (events, mut events_rx) = mpsc::channel::<Event>(1024);
    let plane = Plane::start(
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), cfg.port),
        files.wg_secret,
        Box::new(move |e| events.try_send(e).is_ok()),
        BabelHost(embedded),
    )
    .with_context(|| format!("starting the data plane on UDP port {}", cfg.port))?;
    let mut routing = Routing::default();
    routing.send(&plane, Command::Export(IpNet::V6(prefix), None));
    for i in &cfg.interfaces {
        if let Err(e) = routing.add_lan(&plane, i, tunnel_iface(&netconf)) {
            tracing::warn!(interface = %i, error = %format!("{e:#}"), "cannot run Babel here");
        }
    }

    let now = Instant::now();
    let (tasks, mut tasks_rx) = mpsc::channel(64);
    let mut responder = Responder::new(files.ca.clone(), files.identity()?);
    responder.set_crl(netconf.crl.clone());
    let mut peers = PeerProtocol::new(files.ca.clone(), files.identity()?);
    peers.set_crl(netconf.crl.clone());
    let cache = PeerCache::open(&cfg.state_dir.join(state::CACHE_FILE), 200)
        .context("opening the peer cache")?;
    let seed = u64::from_be_bytes(router_id(prefix)) ^ unix() as u64;
    let mut node = Node {
        policy: Policy::new(prefix, policy_config(&netconf), now, seed),
        cfg,
        prefix,
        network,
        signed,
        hmac,
        plane,
        routing,
        responder,
        peers,
        cache,
        tunnels: BTreeMap::new(),
        asking: HashMap::new(),
        pending: HashMap::new(),
        view: View::default(),
        cached: Vec::new(),
        status: None,
        endpoints: Vec::new(),
        record: None,
        next_record: now,
        next_config: now + Duration::from_secs(1),
        next_renew: now,
        next_name: 0,
        registry,
        tasks,
        busy: BTreeSet::new(),
        metrics: Metrics::default(),
        revoked: false,
        started: now,
        ticks: 0,
        netconf,
        files,
    };
    if node.hmac.is_none() {
        node.fetch_hmac();
    }

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(e) = events_rx.recv() => node.on_event(e).await,
            Some(r) = tasks_rx.recv() => node.on_task(r).await,
            _ = tick.tick() => {
                if node.on_tick().await {
                    if let Ok(mut s) = snapshot.write() {
                        *s = node.snapshot();
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down");
    let peers: Vec<Peer> = node.tunnels.keys().copied().collect();
    for p in &peers {
        node.send_peer(*p, &Body::Close);
    }
    node.routing.shutdown(&node.plane).await;
    for p in peers {
        node.remove_tunnel(p).await;
    }
    drop(node.plane);
    address
        .remove()
        .await
        .context("removing the node address")?;
    Ok(())
}

impl Node {
    fn client_id(&self) -> anyhow::Result<(rcgen::KeyPair, u64)> {
        Ok((
            re6st_registry::cert::load_key(&self.files.key_pem)?,
            self.files.cert.serial,
        ))
    }

    /// Runs a registry request in its own task, one of each kind at a time.
    fn spawn_registry<F, Fut>(&mut self, kind: &'static str, f: F)
    where
        F: FnOnce(Arc<RegistryClient>, rcgen::KeyPair, u64) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = TaskResult> + Send + 'static,
    {
        let Some(r) = self.registry.clone() else {
            return;
        };
        if !self.busy.insert(kind) {
            return;
        }
        let (key, serial) = match self.client_id() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "node key");
                self.busy.remove(kind);
                return;
            }
        };
        let tx = self.tasks.clone();
        tokio::spawn(async move {
            let out = f(r, key, serial).await;
            let _ = tx.send(out).await;
        });
    }

    fn fetch_config(&mut self) {
        self.spawn_registry("config", |r, _, _| async move {
            TaskResult::Config(r.config().await.map_err(anyhow::Error::from))
        });
    }

    fn fetch_hmac(&mut self) {
        let secret = self.files.wg_secret;
        self.spawn_registry("hmac", move |r, key, serial| async move {
            let sealed = r.hmac_keys(&ClientId { key: &key, serial }).await;
            TaskResult::Hmac(sealed.map_err(anyhow::Error::from).and_then(|s| {
                let plain = re6st_registry::config::open(&secret, &s)?;
                Ok(serde_json::from_slice(&plain)?)
            }))
        });
    }

    fn publish(&mut self, record: SignedPeerRecord) {
        self.spawn_registry("publish", move |r, key, serial| async move {
            let out = r
                .publish_peer(&ClientId { key: &key, serial }, &record)
                .await;
            TaskResult::Published(out.map_err(anyhow::Error::from))
        });
    }

    fn bootstrap(&mut self) {
        self.spawn_registry("bootstrap", |r, key, serial| async move {
            let out = r.bootstrap(Some(&ClientId { key: &key, serial })).await;
            TaskResult::Bootstrap(out.map_err(anyhow::Error::from))
        });
    }

    fn renew(&mut self) {
        self.spawn_registry("renew", |r, key, serial| async move {
            let out = r
                .renew(
                    &ClientId { key: &key, serial },
                    &RenewRequest { wg_key: None },
                )
                .await;
            TaskResult::Renewed(out.map(|i| i.cert).map_err(anyhow::Error::from))
        });
    }

    fn send_peer(&mut self, to: Peer, body: &Body) {
        match self.peers.seal(to, body, unix()) {
            Ok(bytes) => {
                let dst = SocketAddr::new(IpAddr::V6(overlay_address(to)), self.cfg.port);
                if let Err(e) = self.plane.send(dst, bytes) {
                    tracing::debug!(%to, error = %e, "peer message not sent");
                } else {
                    *self
                        .metrics
                        .peer_out
                        .entry(body_kind(body).to_string())
                        .or_default() += 1;
                }
            }
            Err(e) => tracing::warn!(error = %e, "sealing a peer message"),
        }
    }

    fn tunnel_peers(&self) -> Vec<Peer> {
        self.tunnels.keys().copied().collect()
    }

    /// Carries out the policy's decisions.
    async fn act(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Open(p) => self.open(p),
                Action::SetCost(p, m) => {
                    if let Some(t) = self.tunnels.get_mut(&p) {
                        t.cost = m;
                        let name = t.name.clone();
                        self.routing
                            .send(&self.plane, Command::SetCostMultiplier(name, m));
                        if m > 1 {
                            self.send_peer(p, &Body::DrainRequest);
                        }
                    }
                }
                Action::Close(p) => {
                    tracing::info!(peer = %p, "closing tunnel");
                    self.send_peer(p, &Body::Close);
                    self.remove_tunnel(p).await;
                }
                Action::Bootstrap => self.bootstrap(),
            }
        }
    }

    /// Starts opening an outgoing tunnel: endpoints from the cache, else
    /// asked to the node itself over the overlay.
    fn open(&mut self, p: Peer) {
        if self.revoked || self.tunnels.contains_key(&p) || self.pending.contains_key(&p) {
            return;
        }
        // The policy chose the peer; the cache is only its address book here
        // (back-off included).
        let cached = self
            .cache
            .candidates(i64::MAX)
            .ok()
            .and_then(|c| c.into_iter().find(|c| c.prefix == p));
        match cached {
            Some(c) if !c.endpoints.is_empty() => self.request_setup(p, &c.endpoints),
            _ => {
                tracing::debug!(peer = %p, "asking for its endpoints");
                self.asking.insert(p, Instant::now() + ASK_TIMEOUT);
                self.send_peer(p, &Body::EndpointsRequest);
            }
        }
    }

    fn request_setup(&mut self, p: Peer, endpoints: &[SocketAddr]) {
        let me = match self.files.identity() {
            Ok(me) => me,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "identity");
                return;
            }
        };
        match setup::request(&me, p, unix()) {
            Ok((bytes, nonce)) => {
                for ep in endpoints
                    .iter()
                    .filter(|e| re6st_tunnel::link::usable_endpoint(e.ip()))
                {
                    let _ = self.plane.send(*ep, bytes.clone());
                }
                self.pending.insert(
                    p,
                    PendingSetup {
                        nonce,
                        deadline: Instant::now() + ASK_TIMEOUT,
                    },
                );
            }
            Err(e) => tracing::warn!(error = %e, "set-up request"),
        }
    }

    /// An outgoing attempt failed: the policy backs off from the peer and
    /// tries another.
    async fn failed(&mut self, p: Peer, why: &'static str) {
        tracing::info!(peer = %p, why, "tunnel attempt failed");
        *self
            .metrics
            .setup_failed
            .entry(why.to_string())
            .or_default() += 1;
        let actions = self.policy.on_failed(p, Instant::now(), &self.view);
        Box::pin(self.act(actions)).await;
    }

    /// The peer did not answer or refused us: the cache remembers it as
    /// failing too (a busy peer works, so busy answers only call `failed`).
    async fn unreachable(&mut self, p: Peer, why: &'static str) {
        let _ = self.cache.mark_failed(p, unix(), 30);
        self.failed(p, why).await;
    }

    /// Adds a link and its tun device, and runs Babel on it.
    async fn add_tunnel(
        &mut self,
        p: Peer,
        cert: &re6st_registry::cert::NodeCert,
        endpoint: Option<SocketAddr>,
        outgoing: bool,
    ) {
        if self.tunnels.contains_key(&p) {
            self.remove_tunnel(p).await;
        }
        self.next_name = self.next_name.wrapping_add(1) & 0xffff;
        let name = format!("re6st-{:04x}", self.next_name);
        let mtu = self.netconf.mtu;
        match self.plane.add_link(
            p,
            cert.wg_key,
            endpoint,
            &name,
            mtu,
            link_local(self.prefix),
        ) {
            Ok((index, ifindex)) => {
                let now = Instant::now();
                self.tunnels.insert(
                    p,
                    Tunnel {
                        index,
                        name: name.clone(),
                        outgoing,
                        serial: cert.serial,
                        created: now,
                        up: false,
                        last_neighbour: now,
                        cost: 1,
                    },
                );
                self.metrics.tunnels_opened += 1;
                tracing::info!(peer = %p, interface = %name, outgoing, "tunnel");
                self.routing.add_link(
                    &self.plane,
                    &name,
                    ifindex,
                    tunnel_iface(&self.netconf),
                    link_local(self.prefix),
                );
            }
            Err(e) => tracing::warn!(peer = %p, error = %e, "cannot add a tunnel"),
        }
    }

    async fn remove_tunnel(&mut self, p: Peer) {
        if let Some(t) = self.tunnels.remove(&p) {
            self.routing
                .send(&self.plane, Command::RemoveInterface(t.name));
            self.plane.remove_link(t.index);
            self.metrics.tunnels_closed += 1;
        }
    }

    /// A tunnel is gone (dead, closed by the peer): tell the policy.
    async fn lost(&mut self, p: Peer, why: &'static str) {
        let Some(outgoing) = self.tunnels.get(&p).map(|t| t.outgoing) else {
            return;
        };
        tracing::info!(peer = %p, why, "tunnel lost");
        *self
            .metrics
            .tunnels_lost
            .entry(why.to_string())
            .or_default() += 1;
        self.remove_tunnel(p).await;
        let now = Instant::now();
        if outgoing {
            let _ = self.cache.mark_failed(p, unix(), 10);
            let actions = self.policy.on_down(p, now, &self.view);
            self.act(actions).await;
        } else {
            self.policy.on_incoming_closed(p);
        }
    }

    async fn on_event(&mut self, e: Event) {
        match e {
            Event::Control { src, bytes } if bytes.starts_with(crate::peer::MAGIC) => {
                self.on_peer_message(src, &bytes).await;
            }
            Event::Control { src, bytes } if setup::is_request(&bytes) => {
                self.on_setup_request(src, &bytes).await;
            }
            Event::Control { src, bytes } => self.on_setup_reply(src, &bytes).await,
            Event::Up(p) => {
                let outgoing = match self.tunnels.get_mut(&p) {
                    Some(t) => {
                        t.up = true;
                        t.last_neighbour = Instant::now();
                        t.outgoing
                    }
                    None => return,
                };
                self.metrics.handshakes += 1;
                if outgoing {
                    self.policy.on_up(p, Instant::now());
                    if let Some(ep) = self
                        .plane
                        .links()
                        .into_iter()
                        .find(|l| l.peer == p)
                        .and_then(|l| l.endpoint)
                    {
                        let _ = self.cache.mark_ok(p, ep, unix());
                    }
                }
                let version = self.netconf.version;
                self.send_peer(p, &Body::ConfigVersion { version });
            }
            Event::Down(p) => self.lost(p, "expired").await,
        }
    }

    async fn on_setup_request(&mut self, src: SocketAddr, bytes: &[u8]) {
        let now = Instant::now();
        let me = self.prefix;
        let outgoing_to = |p: &Peer| {
            self.pending.contains_key(p) || self.tunnels.get(p).is_some_and(|t| t.outgoing)
        };
        let mut actions = Vec::new();
        let (policy, view, revoked) = (&mut self.policy, &self.view, self.revoked);
        let suggestions: Vec<Peer> = self.tunnels.keys().copied().take(8).collect();
        let outcome = self.responder.handle(now, unix(), src.ip(), bytes, |cert| {
            // Both ends opening at once: the larger prefix keeps its own.
            if revoked || (me > cert.prefix && outgoing_to(&cert.prefix)) {
                return Decision::Busy(suggestions.clone());
            }
            let (adm, acts) = policy.on_incoming(cert.prefix, now, view);
            actions = acts;
            match adm {
                Admission::Accept => Decision::Accept,
                Admission::Busy => Decision::Busy(suggestions.clone()),
            }
        });
        match outcome {
            Outcome::Accepted { peer, reply } => {
                // Both ends were opening: the policy drops our attempt
                // (Close), which must not close the tunnel being accepted.
                actions.retain(|a| *a != Action::Close(peer.prefix));
                self.pending.remove(&peer.prefix);
                self.asking.remove(&peer.prefix);
                self.add_tunnel(peer.prefix, &peer, None, false).await;
                let _ = self.plane.send(src, reply);
            }
            Outcome::Reply(reply) => {
                let _ = self.plane.send(src, reply);
            }
            Outcome::Dropped(e) => {
                tracing::debug!(%src, error = %e, "set-up request dropped");
            }
        }
        self.act(actions).await;
    }

    async fn on_setup_reply(&mut self, src: SocketAddr, bytes: &[u8]) {
        let t = unix();
        let found = self.pending.iter().find_map(|(p, s)| {
            setup::check_reply(&self.files.ca, &self.netconf.crl, *p, &s.nonce, t, bytes)
                .ok()
                .map(|r| (*p, r))
        });
        let Some((p, reply)) = found else {
            *self
                .metrics
                .rejected
                .entry("setup_reply".to_string())
                .or_default() += 1;
            return;
        };
        self.pending.remove(&p);
        match reply {
            Reply::Accepted(cert) => self.add_tunnel(p, &cert, Some(src), true).await,
            Reply::Busy(_) => self.failed(p, "busy").await,
            Reply::Refused(reason) => {
                tracing::warn!(peer = %p, %reason, "tunnel refused");
                if reason.contains("revoked") {
                    self.revoked = true;
                }
                self.unreachable(p, "refused").await;
            }
        }
    }

    async fn on_peer_message(&mut self, src: SocketAddr, bytes: &[u8]) {
        let (cert, body) = match self.peers.open(src.ip(), bytes, unix()) {
            Ok(x) => x,
            Err(e) => {
                *self
                    .metrics
                    .rejected
                    .entry(peer_error_kind(&e).to_string())
                    .or_default() += 1;
                tracing::debug!(%src, error = %e, "peer message dropped");
                return;
            }
        };
        *self
            .metrics
            .peer_in
            .entry(body_kind(&body).to_string())
            .or_default() += 1;
        let from = cert.prefix;
        match body {
            Body::EndpointsRequest => {
                if let Some(record) = self.record.clone() {
                    self.send_peer(from, &Body::Endpoints { record });
                }
            }
            Body::Endpoints { record } => {
                let t = unix();
                let eps = match record.verify(&self.files.ca, t, &self.netconf.crl) {
                    Ok((rec, c)) if c.prefix == from => {
                        let _ = self
                            .cache
                            .insert(&record, &self.files.ca, &self.netconf.crl, t);
                        rec.endpoints
                    }
                    Ok(_) => Vec::new(),
                    Err(e) => {
                        tracing::debug!(peer = %from, error = %e, "peer record refused");
                        Vec::new()
                    }
                };
                if self.asking.remove(&from).is_some() {
                    if eps.is_empty() {
                        self.unreachable(from, "no_endpoint").await;
                    } else {
                        self.request_setup(from, &eps);
                    }
                }
            }
            Body::ConfigVersion { version } => {
                if version > self.netconf.version {
                    self.send_peer(from, &Body::ConfigRequest);
                }
            }
            Body::ConfigRequest => {
                let signed = self.signed.clone();
                self.send_peer(from, &Body::Config { signed });
            }
            Body::Config { signed } => self.on_config(signed, "peer").await,
            Body::DrainRequest => {
                if let Some(t) = self.tunnels.get_mut(&from) {
                    t.cost = re6st_tunnel::policy::DRAIN_MULTIPLIER;
                    let name = t.name.clone();
                    self.routing
                        .send(&self.plane, Command::SetCostMultiplier(name, t.cost));
                    self.send_peer(from, &Body::DrainAck);
                }
            }
            Body::DrainAck | Body::NodeInfo { .. } => {}
            Body::Close => self.lost(from, "closed_by_peer").await,
            Body::NodeInfoRequest => {
                let info = Body::NodeInfo {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    outgoing: self.policy.outgoing().map(ToString::to_string).collect(),
                    incoming: self.policy.incoming().map(ToString::to_string).collect(),
                };
                self.send_peer(from, &info);
            }
        }
    }

    /// A signed configuration from the registry or a peer: applied live
    /// when newer, and passed on to our tunnel peers.
    async fn on_config(&mut self, signed: SignedConfig, from: &'static str) {
        let c = match signed.verify(&self.files.ca) {
            Ok(c) => c,
            Err(e) => {
                *self
                    .metrics
                    .rejected
                    .entry("bad_config".to_string())
                    .or_default() += 1;
                tracing::warn!(from, error = %e, "network configuration refused");
                return;
            }
        };
        if c.version <= self.netconf.version || c.network != self.netconf.network {
            return;
        }
        tracing::info!(from, version = c.version, "new network configuration");
        if let Err(e) = state::save_network(&self.cfg.state_dir, &signed) {
            tracing::warn!(error = %format!("{e:#}"), "caching the configuration");
        }
        let old = std::mem::replace(&mut self.netconf, c);
        self.signed = signed;
        self.metrics.config_changes += 1;
        let now = Instant::now();
        self.policy.set_config(policy_config(&self.netconf), now);
        self.responder.set_crl(self.netconf.crl.clone());
        self.peers.set_crl(self.netconf.crl.clone());
        if self.netconf.crl.contains(&self.files.cert.serial) && !self.revoked {
            tracing::error!("this node is revoked: closing its tunnels; it will not open new ones");
            self.revoked = true;
            for p in self.tunnel_peers() {
                self.send_peer(p, &Body::Close);
                self.lost(p, "we_are_revoked").await;
            }
        }
        let revoked: Vec<Peer> = self
            .tunnels
            .iter()
            .filter(|(_, t)| self.netconf.crl.contains(&t.serial))
            .map(|(p, _)| *p)
            .collect();
        for p in revoked {
            tracing::warn!(peer = %p, "closing the tunnel of a revoked node");
            let _ = self.cache.remove(p);
            self.lost(p, "revoked").await;
        }
        if old.hello_interval_ms != self.netconf.hello_interval_ms {
            let d = Duration::from_millis(u64::from(self.netconf.hello_interval_ms.max(10)));
            let names: Vec<String> = self.tunnels.values().map(|t| t.name.clone()).collect();
            for n in names.into_iter().chain(self.cfg.interfaces.clone()) {
                self.routing
                    .send(&self.plane, Command::SetHelloInterval(n, d));
            }
        }
        if self
            .hmac
            .as_ref()
            .is_none_or(|k| k.version != self.netconf.hmac_version)
        {
            self.fetch_hmac();
        }
        let version = self.netconf.version;
        for p in self.tunnel_peers() {
            self.send_peer(p, &Body::ConfigVersion { version });
        }
    }

    async fn on_task(&mut self, r: TaskResult) {
        match r {
            TaskResult::Config(r) => {
                self.busy.remove("config");
                match r {
                    Ok(signed) => self.on_config(signed, "registry").await,
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "registry unreachable"),
                }
            }
            TaskResult::Hmac(r) => {
                self.busy.remove("hmac");
                match r.and_then(|k| state::auth_config(&k).map(|a| (k, a))) {
                    Ok((keys, auth)) => {
                        if self.hmac.as_ref() != Some(&keys) {
                            tracing::info!(version = keys.version, "Babel keys");
                            if let Err(e) = state::save_hmac(&self.cfg.state_dir, &keys) {
                                tracing::warn!(error = %format!("{e:#}"), "saving the Babel keys");
                            }
                            self.routing.send(&self.plane, Command::SetAuth(Some(auth)));
                            self.hmac = Some(keys);
                        }
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "Babel keys"),
                }
            }
            TaskResult::Bootstrap(r) => {
                self.busy.remove("bootstrap");
                match r {
                    Ok(records) => {
                        let t = unix();
                        for rec in records {
                            let _ = self
                                .cache
                                .insert(&rec, &self.files.ca, &self.netconf.crl, t);
                        }
                    }
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "bootstrap"),
                }
            }
            TaskResult::Published(r) => {
                self.busy.remove("publish");
                if let Err(e) = r {
                    tracing::debug!(error = %format!("{e:#}"), "publishing our peer record");
                    self.next_record = Instant::now() + Duration::from_secs(10);
                }
            }
            TaskResult::Renewed(r) => {
                self.busy.remove("renew");
                match r.and_then(|pem| self.install_certificate(&pem)) {
                    Ok(()) => {
                        tracing::info!(not_after = self.files.cert.not_after, "certificate renewed")
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "renewal");
                        self.next_renew = Instant::now() + Duration::from_secs(600);
                    }
                }
            }
        }
    }

    fn install_certificate(&mut self, pem: &str) -> anyhow::Result<()> {
        let cert = self.files.ca.verify_node(pem, Some(unix()))?;
        if cert.public_key != self.files.cert.public_key || cert.prefix != self.prefix {
            anyhow::bail!("the registry renewed another identity");
        }
        crate::enrol::write_atomic(
            &self.cfg.dir.join(crate::enrol::CERT_FILE),
            pem.as_bytes(),
            0o644,
        )?;
        self.files.cert = cert;
        self.files.cert_pem = pem.to_string();
        let mut responder = Responder::new(self.files.ca.clone(), self.files.identity()?);
        responder.set_crl(self.netconf.crl.clone());
        self.responder = responder;
        let mut peers = PeerProtocol::new(self.files.ca.clone(), self.files.identity()?);
        peers.set_crl(self.netconf.crl.clone());
        self.peers = peers;
        self.next_record = Instant::now();
        Ok(())
    }

    fn refresh_record(&mut self) {
        let endpoints = if self.cfg.endpoints.is_empty() {
            system::detect_endpoints(self.cfg.port, self.network).unwrap_or_default()
        } else {
            self.cfg.endpoints.clone()
        };
        let record = PeerRecord {
            cert: self.files.cert_pem.clone(),
            endpoints: endpoints.clone(),
            timestamp: unix(),
        };
        let signed = re6st_registry::cert::load_key(&self.files.key_pem)
            .and_then(|k| SignedPeerRecord::sign(&record, &k));
        match signed {
            Ok(s) => {
                self.endpoints = endpoints;
                self.record = Some(s.clone());
                self.publish(s);
            }
            Err(e) => tracing::warn!(error = %e, "signing our peer record"),
        }
    }

    /// The periodic step; returns whether routing was read (then the
    /// control API's snapshot is refreshed too).
    async fn on_tick(&mut self) -> bool {
        let now = Instant::now();
        self.ticks = self.ticks.wrapping_add(1);
        // Timeouts every tick; routing (a copy of every route) once a second.
        let full = self.ticks % STATUS_EVERY == 1;
        if full {
            match self.routing.state(&self.plane).await {
                Some(state) => self.status = Some(self.routing.status(&state)),
                None => tracing::warn!("routing did not report its state within 2 s"),
            }
            self.routing
                .retry_link_local(&self.plane, &self.cfg.interfaces);
            self.update_view();
        }
        if now >= self.next_record {
            self.next_record = now + RECORD_REFRESH;
            self.refresh_record();
        }
        if now >= self.next_config {
            self.next_config = now + self.cfg.config_refresh;
            self.fetch_config();
        }
        if now >= self.next_renew {
            self.next_renew = now + Duration::from_secs(3600);
            if self.files.cert.not_after - unix() < RENEW_BEFORE_S {
                self.renew();
            }
        }
        if full {
            self.check_tunnels(now).await;
        }
        let expired: Vec<Peer> = self
            .asking
            .iter()
            .filter(|(_, d)| now >= **d)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.asking.remove(&p);
            self.unreachable(p, "no_endpoints_answer").await;
        }
        let expired: Vec<Peer> = self
            .pending
            .iter()
            .filter(|(_, s)| now >= s.deadline)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.pending.remove(&p);
            self.unreachable(p, "no_setup_answer").await;
        }
        if !self.revoked {
            let actions = self.policy.tick(now, &self.view);
            self.act(actions).await;
        }
        full
    }

    /// Tunnels whose handshake never completed, or whose Babel neighbour
    /// has been silent too long, are failed or lost.
    async fn check_tunnels(&mut self, now: Instant) {
        // Tunnels: handshake done, Babel neighbour heard.
        let heard: BTreeSet<String> = self
            .status
            .iter()
            .flat_map(|s| s.neighbours.iter())
            .filter(|n| n.reach.contains('1'))
            .map(|n| n.interface.clone())
            .collect();
        let links: HashMap<u32, bool> = self
            .plane
            .links()
            .into_iter()
            .map(|l| (l.index, l.since_handshake.is_some()))
            .collect();
        let mut dead = Vec::new();
        let mut failed = Vec::new();
        for (p, t) in &mut self.tunnels {
            t.up |= links.get(&t.index).copied().unwrap_or(false);
            if heard.contains(&t.name) {
                t.last_neighbour = now;
            }
            let age = now.duration_since(t.created);
            if !t.up && t.outgoing && age > HANDSHAKE_TIMEOUT {
                failed.push(*p);
            } else if !t.up && !t.outgoing && age > INCOMING_TIMEOUT {
                dead.push((*p, "no_handshake"));
            } else if t.up && now.duration_since(t.last_neighbour) > DEAD_AFTER {
                dead.push((*p, "silent"));
            }
        }
        for p in failed {
            self.remove_tunnel(p).await;
            self.unreachable(p, "no_handshake").await;
        }
        for (p, why) in dead {
            self.lost(p, why).await;
        }
    }

    /// What routing knows, as the policy needs it.
    fn update_view(&mut self) {
        let mut view = View::default();
        let by_name: HashMap<&str, Peer> = self
            .tunnels
            .iter()
            .map(|(p, t)| (t.name.as_str(), *p))
            .collect();
        if let Some(s) = &self.status {
            for r in s.routes.iter().filter(|r| r.selected) {
                let Ok(IpNet::V6(p)) = r.prefix.parse::<IpNet>() else {
                    continue;
                };
                if p != self.prefix
                    && self.network.contains(&p)
                    && p.prefix_len() > self.network.prefix_len()
                {
                    view.routed.insert(p);
                }
                if let Some(peer) = by_name.get(r.interface.as_str()) {
                    *view.routes_via.entry(*peer).or_default() += 1;
                }
            }
        }
        self.cached = self.cache.candidates(unix()).unwrap_or_default();
        view.cache = if self.cached.is_empty() {
            // Every cached peer is in back-off (perhaps from before a
            // restart, or the registry is down): better to retry them than
            // to stay alone; the policy still spaces its own retries.
            self.cache
                .candidates(i64::MAX)
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.prefix)
                .collect()
        } else {
            self.cached.iter().map(|c| c.prefix).collect()
        };
        self.view = view;
    }

    fn snapshot(&self) -> Snapshot {
        let links = self.plane.links();
        let tunnels = self
            .tunnels
            .iter()
            .map(|(p, t)| {
                let l = links.iter().find(|l| l.index == t.index);
                TunnelInfo {
                    peer: p.to_string(),
                    interface: t.name.clone(),
                    direction: if t.outgoing { "out" } else { "in" }.to_string(),
                    up: t.up,
                    endpoint: l.and_then(|l| l.endpoint).map(|e| e.to_string()),
                    since_handshake_s: l.and_then(|l| l.since_handshake).map(|d| d.as_secs()),
                    tx_bytes: l.map_or(0, |l| l.tx_bytes),
                    rx_bytes: l.map_or(0, |l| l.rx_bytes),
                    routes: self.view.routes_via.get(p).copied().unwrap_or(0),
                    cost_multiplier: t.cost,
                }
            })
            .collect();
        let mut metrics = self.metrics.clone();
        for (reason, n) in self.plane.published().dropped {
            metrics.rejected.insert(format!("wireguard_{reason}"), n);
        }
        for (reason, n) in &self.responder.stats().dropped {
            metrics.rejected.insert(format!("setup_{reason}"), *n);
        }
        Snapshot::new(
            crate::ctl::NodeSummary {
                prefix: self.prefix.to_string(),
                address: overlay_address(self.prefix).to_string(),
                network: self.network.to_string(),
                router_id: driver::format_router_id(&router_id(self.prefix)),
                config_version: self.netconf.version,
                hmac_version: self.hmac.as_ref().map(|k| k.version),
                endpoints: self.endpoints.iter().map(ToString::to_string).collect(),
                uptime_s: self.started.elapsed().as_secs(),
                revoked: self.revoked,
                cert_not_after: self.files.cert.not_after,
                registry: self.cfg.registry.clone(),
            },
            tunnels,
            self.status.clone(),
            self.netconf.clone(),
            metrics,
            self.cached
                .iter()
                .map(|c| {
                    (
                        c.prefix.to_string(),
                        c.endpoints.iter().map(ToString::to_string).collect(),
                    )
                })
                .collect(),
        )
    }
}

fn body_kind(b: &Body) -> &'static str {
    match b {
        Body::EndpointsRequest => "endpoints_request",
        Body::Endpoints { .. } => "endpoints",
        Body::ConfigVersion { .. } => "config_version",
        Body::ConfigRequest => "config_request",
        Body::Config { .. } => "config",
        Body::DrainRequest => "drain_request",
        Body::DrainAck => "drain_ack",
        Body::Close => "close",
        Body::NodeInfoRequest => "node_info_request",
        Body::NodeInfo { .. } => "node_info",
    }
}

fn peer_error_kind(e: &crate::peer::PeerError) -> &'static str {
    use crate::peer::PeerError as E;
    match e {
        E::Malformed(_) => "peer_malformed",
        E::Stale => "peer_stale",
        E::NotForUs => "peer_not_for_us",
        E::BadCertificate(_) => "peer_bad_certificate",
        E::Revoked(_) => "peer_revoked",
        E::Spoofed(_) => "peer_spoofed",
        E::BadSignature => "peer_bad_signature",
        E::Replay => "peer_replay",
    }
}
