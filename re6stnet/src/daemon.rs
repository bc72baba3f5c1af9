//! The node daemon's driver: starts the data plane (whose reactor thread
//! also runs the Babel router, see [`crate::babel`]) and the node core
//! ([`crate::node::NodeCore`], where every decision is made), then feeds
//! the core data-plane events, registry answers, routing views (once a
//! second) and its timeouts, and carries out its actions.
//! Registry requests run as separate tasks, so a registry that is down
//! never stalls the node. The control API reads a snapshot refreshed with
//! every routing view.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ipnet::{IpNet, Ipv6Net};
use re6st_registry::api::RenewRequest;
use re6st_registry::cert::overlay_address;
use re6st_registry::client::{Identity as ClientId, RegistryClient};
use re6st_registry::config::{Freshness, HmacKeys, NetworkConfig, SignedConfig, STALE_BOUND_S};
use re6st_routing::driver::{self, Command, DriverConfig};
use re6st_routing::embedded::Embedded;
use re6st_routing::kernel::PrefSrc;
use re6st_routing::metric::RttParams;
use re6st_routing::router::{
    node_router_id, Filter, InterfaceConfig, Origin, RouterConfig, RoutingState,
};
use re6st_tunnel::cache::PeerCache;
use re6st_tunnel::ingress::{Admit, Ingress};
use re6st_tunnel::plane::{Event, PlaneError};
use re6st_tunnel::policy::Peer;
use re6st_tunnel::tun::{self, Tun};
use tokio::sync::mpsc;

use crate::babel::{BabelHost, Plane, Routing};
use crate::config::NodeConfig;
use crate::ctl::{Snapshot, TunnelInfo};
use crate::ipv4::{self, Ipv4Side};
use crate::node::{
    hello_interval, Action, CacheChange, CoreConfig, EndpointSource, NodeCore, RegistryRequest,
    RegistryResult,
};
use crate::overlay_table::OverlayTable;
use crate::state::{self, Files};
use crate::system::{self, NodeAddress};

/// How often routing is read (and the control API's snapshot refreshed).
const ROUTING_EVERY: Duration = Duration::from_secs(1);

fn unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Our link-local address on every tunnel (derived from the router-id).
fn link_local(prefix: Ipv6Net) -> Ipv6Addr {
    let id = u64::from_be_bytes(node_router_id(prefix));
    Ipv6Addr::from((0xfe80u128 << 112) | u128::from(id))
}

/// Routes a node accepts from Babel: inside the network, no longer than a
/// node prefix (a member cannot take over part of another node's prefix),
/// originated under the router-id of the prefix (a member cannot
/// originate another node's prefix), and no default route but a
/// gateway's `::/0 from <network>`; IPv4 only as node subnets, from
/// their owners' router-ids.
fn routing_filter(network: Ipv6Net, c: &NetworkConfig, ipv4: Option<&Ipv4Side>) -> Filter {
    Filter {
        networks: vec![IpNet::V6(network)],
        max_plen: Some(c.prefix_len),
        default_from: vec![IpNet::V6(network)],
        origin: Origin::NodePrefix,
        ipv4: ipv4.map(|s| s.map),
    }
}

fn tunnel_iface(c: &NetworkConfig) -> InterfaceConfig {
    let mut i = InterfaceConfig::tunnel(hello_interval(c));
    // Any member can reach our tunnels: no Babel there without keys.
    i.requires_auth = true;
    i.rtt = Some(RttParams {
        min: Duration::from_millis(u64::from(c.rtt_min_ms)),
        max: Duration::from_millis(u64::from(c.rtt_max_ms)),
        max_penalty: c.max_rtt_penalty.min(u32::from(u16::MAX)) as u16,
        ..RttParams::default()
    });
    i
}

/// Starts the `--up` command with the node's addresses in its environment
/// and logs how it ends (the node does not wait for it).
fn run_up_hook(
    cmd: &str,
    prefix: Ipv6Net,
    address: Ipv6Addr,
    network: Ipv6Net,
    ipv4: Option<&Ipv4Side>,
    cfg: &NodeConfig,
) {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("RE6ST_PREFIX", prefix.to_string())
        .env("RE6ST_ADDRESS", address.to_string())
        .env("RE6ST_NETWORK", network.to_string())
        .env("RE6ST_TABLE", cfg.table.to_string())
        .env("RE6ST_STATE_DIR", &cfg.state_dir)
        .kill_on_drop(false);
    if let Some(s) = ipv4 {
        c.env("RE6ST_IPV4", s.address.to_string())
            .env("RE6ST_IPV4_NETWORK", s.network().to_string());
    }
    match c.spawn() {
        Ok(mut child) => {
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(s) if s.success() => tracing::info!("the up command succeeded"),
                    Ok(s) => tracing::warn!(status = %s, "the up command failed"),
                    Err(e) => tracing::warn!(error = %e, "waiting for the up command"),
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot start the up command"),
    }
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
            match c.1.freshness(unix()) {
                Freshness::Fresh => {
                    tracing::info!(version = c.1.version, "using the cached network configuration");
                    return Ok(c);
                }
                Freshness::Stale => {
                    tracing::warn!(
                        version = c.1.version,
                        valid_until = c.1.valid_until,
                        "using the cached network configuration past its validity: its CRL may miss revocations"
                    );
                    return Ok(c);
                }
                Freshness::Expired => tracing::error!(
                    version = c.1.version,
                    valid_until = c.1.valid_until,
                    bound_s = STALE_BOUND_S,
                    "the cached network configuration is too old to trust its CRL: waiting for the registry"
                ),
            }
        }
        if registry.is_none() {
            anyhow::bail!("no registry configured and no cached network configuration still valid");
        }
        tracing::info!(retry_in_s = delay.as_secs(), "waiting for the registry");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}

/// The driver's state: the core and what carries out its actions.
struct Driver {
    core: NodeCore,
    cfg: NodeConfig,
    files: Files,
    plane: Plane,
    routing: Routing,
    /// Link index of each tunnel device.
    links: HashMap<String, u32>,
    /// Tunnels whose device is being created (off the loop: creating a
    /// device waits for the kernel's RTNL lock, which a busy host holds
    /// for long), and where the finished ones come back.
    creating: HashMap<String, Created>,
    created: mpsc::Sender<(String, Result<Tun, PlaneError>)>,
    cache: PeerCache,
    registry: Option<Arc<RegistryClient>>,
    tasks: mpsc::Sender<RegistryResult>,
    routing_state: Option<RoutingState>,
    started: Instant,
    /// IPv4 inside the overlay (forwarded on every tunnel).
    ipv4: Option<Ipv4Side>,
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

    // Read at start only: a change of the network's IPv4 setting takes
    // effect when the node restarts.
    let ipv4 = Ipv4Side::of(&netconf, network, prefix).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no IPv4 inside the overlay");
        None
    });
    let forwarding = system::Forwarding::enable()?;
    if ipv4.is_some() && cfg.main_interface != "lo" {
        ipv4::forward_on(&cfg.main_interface)?;
    }
    let address = NodeAddress::install(
        prefix,
        network,
        &cfg.main_interface,
        ipv4.map(|s| (s.network(), s.address)),
    )
    .await?;
    tracing::info!(address = %address.addr(), ipv4 = ?ipv4.map(|s| s.address), "node address");
    let overlay_table = OverlayTable::install(
        network,
        prefix,
        ipv4.map(|s| (s.network(), s.subnet)),
        cfg.table,
    )
    .await?;

    let hmac = state::load_hmac(&cfg.state_dir).filter(|k| k.version == netconf.hmac_version);
    let mut rcfg = RouterConfig::new(node_router_id(prefix), driver::os_seed()?);
    rcfg.auth = hmac.as_ref().map(state::auth_config).transpose()?;
    rcfg.filter = routing_filter(network, &netconf, ipv4.as_ref());
    let driver_cfg = DriverConfig {
        router: rcfg,
        table: cfg.table,
        proto: re6st_routing::kernel::PROTO,
        pref_src: PrefSrc {
            v6: Some(address.addr()),
            v4: ipv4.map(|s| s.address.addr()),
        },
        install: true,
        cover: std::iter::once(IpNet::V6(network))
            .chain(ipv4.map(|s| IpNet::V4(s.network())))
            .collect(),
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
    plane.set_ingress(Ingress {
        v6: if cfg.gateway {
            Admit::Any
        } else {
            Admit::Within(network)
        },
        v4: ipv4.map_or(Admit::Nothing, |s| Admit::Within(s.network())),
    })?;
    let mut routing = Routing::default();
    routing.send(&plane, Command::Export(IpNet::V6(prefix), None));
    if let Some(s) = ipv4 {
        routing.send(&plane, Command::Export(IpNet::V4(s.subnet), None));
    }
    let gateway = cfg
        .gateway
        .then_some((IpNet::V6(Ipv6Net::default()), Some(IpNet::V6(network))));
    for &(dst, src) in cfg.exports.iter().chain(gateway.iter()) {
        routing.send(&plane, Command::Export(dst, src));
    }
    for i in &cfg.interfaces {
        if let Err(e) = routing.add_lan(&plane, i, tunnel_iface(&netconf)) {
            tracing::warn!(interface = %i, error = %format!("{e:#}"), "cannot run Babel here");
        }
    }
    if let Some(cmd) = &cfg.up {
        run_up_hook(cmd, prefix, address.addr(), network, ipv4.as_ref(), &cfg);
    }

    let cache_file = cfg.state_dir.join(state::CACHE_FILE);
    let cache = PeerCache::open(&cache_file, re6st_tunnel::cache::CACHE_SIZE)
        .context("opening the peer cache")?;
    let stored = cache
        .load()
        .with_context(|| format!("reading {}", cache_file.display()))?;
    let (now, t) = (Instant::now(), unix());
    let core = NodeCore::new(
        CoreConfig {
            ca: files.ca.clone(),
            cert_pem: files.cert_pem.clone(),
            key_pem: files.key_pem.clone(),
            signed,
            hmac,
            peers: stored,
            port: cfg.port,
            interfaces: cfg.interfaces.clone(),
            roles: cfg.roles.clone(),
            config_refresh: cfg.config_refresh,
            registry: registry.is_some(),
            seed: u64::from_be_bytes(node_router_id(prefix)) ^ t as u64,
        },
        now,
        t,
    )?;
    let (tasks, mut tasks_rx) = mpsc::channel(64);
    let (created, mut created_rx) = mpsc::channel(64);
    let mut node = Driver {
        core,
        cfg,
        files,
        plane,
        routing,
        links: HashMap::new(),
        creating: HashMap::new(),
        created,
        cache,
        registry,
        tasks,
        routing_state: None,
        started: now,
        ipv4,
    };
    node.apply().await;

    let mut read_routing = tokio::time::interval(ROUTING_EVERY);
    read_routing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let due = node.core.poll_timeout();
        let timer = async move {
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(e) = events_rx.recv() => node.on_event(e),
            Some(r) = tasks_rx.recv() => node.core.handle_registry(Instant::now(), unix(), r),
            Some((name, tun)) = created_rx.recv() => node.on_created(name, tun),
            _ = read_routing.tick() => {
                node.read_routing().await;
                if let Ok(mut s) = snapshot.write() {
                    *s = node.snapshot();
                }
            }
            () = timer => node.core.handle_timeout(Instant::now(), unix()),
            () = &mut shutdown => break,
        }
        node.apply().await;
    }

    tracing::info!("shutting down");
    node.core.shutdown(unix());
    let mut closing = Vec::new();
    while let Some(a) = node.core.poll_action() {
        match a {
            Action::CloseTunnel { name, .. } => closing.push(name),
            other => node.carry_out(other).await,
        }
    }
    node.routing.shutdown(&node.plane).await;
    for name in closing {
        if let Some(index) = node.links.remove(&name) {
            node.plane.remove_link(index);
        }
    }
    drop(node.plane);
    if let Some(t) = overlay_table {
        t.remove().await.context("removing the overlay rule")?;
    }
    address
        .remove()
        .await
        .context("removing the node address")?;
    forwarding.restore();
    Ok(())
}

/// A tunnel whose device is being created.
struct Created {
    peer: Peer,
    wg_key: [u8; 32],
    endpoint: Option<re6st_tunnel::endpoint::Endpoint>,
}

impl Driver {
    /// A device is ready (or could not be made): the link and Babel start
    /// on it, unless the core closed the tunnel meanwhile.
    fn on_created(&mut self, name: String, tun: Result<Tun, PlaneError>) {
        let Some(c) = self.creating.remove(&name) else {
            // Closed meanwhile: the device goes (off the loop too).
            tokio::task::spawn_blocking(move || drop(tun));
            return;
        };
        let ll = link_local(self.core.prefix());
        let attached = tun.and_then(|t| {
            let ifindex = t.ifindex;
            Ok((
                self.plane.attach(c.peer, c.wg_key, c.endpoint, t, ll)?,
                ifindex,
            ))
        });
        match attached {
            Ok((index, ifindex)) => {
                self.links.insert(name.clone(), index);
                let iface = tunnel_iface(self.core.config());
                self.routing
                    .add_link(&self.plane, &name, ifindex, iface, ll);
            }
            Err(e) => {
                tracing::warn!(peer = %c.peer, error = %e, "cannot add a tunnel");
                self.core
                    .handle_tunnel_failed(Instant::now(), unix(), c.peer, &name);
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        let (now, t) = (Instant::now(), unix());
        match e {
            Event::Control { src, bytes } => self.core.handle_datagram(now, t, src, &bytes),
            Event::Up(p) => {
                let endpoint = self
                    .plane
                    .links()
                    .into_iter()
                    .find(|l| l.peer == p)
                    .and_then(|l| l.endpoint.map(|e| e.addr));
                self.core.handle_link_up(now, t, p, endpoint);
            }
            Event::Down(p) => self.core.handle_link_down(now, t, p),
        }
    }

    /// Reads routing and gives the core its view (the last one again when
    /// routing does not answer); links that completed a handshake the
    /// core has not heard of are reported up first.
    async fn read_routing(&mut self) {
        match self.routing.state(&self.plane).await {
            Some(state) => self.routing_state = Some(state),
            None => tracing::warn!("routing did not report its state within 2 s"),
        }
        self.routing
            .retry_link_local(&self.plane, &self.cfg.interfaces);
        let (now, t) = (Instant::now(), unix());
        let down: Vec<Ipv6Net> = self
            .core
            .tunnels()
            .into_iter()
            .filter(|s| !s.up)
            .map(|s| s.peer)
            .collect();
        for l in self.plane.links() {
            if l.since_handshake.is_some() && down.contains(&l.peer) {
                self.core
                    .handle_link_up(now, t, l.peer, l.endpoint.map(|e| e.addr));
            }
        }
        let view = self
            .routing_state
            .as_ref()
            .map(|s| self.routing.view(s))
            .unwrap_or_default();
        self.core.handle_routing(now, t, &view);
    }

    /// Carries out every action the core has queued.
    async fn apply(&mut self) {
        while let Some(a) = self.core.poll_action() {
            self.carry_out(a).await;
        }
    }

    async fn carry_out(&mut self, a: Action) {
        match a {
            Action::Send { dst, bytes } => {
                if let Err(e) = self.plane.send(dst, bytes) {
                    tracing::debug!(%dst, error = %e, "datagram not sent");
                }
            }
            Action::OpenTunnel {
                peer,
                name,
                wg_key,
                endpoint,
                mtu,
            } => {
                let ll = link_local(self.core.prefix());
                let done = self.created.clone();
                self.creating.insert(
                    name.clone(),
                    Created {
                        peer,
                        wg_key,
                        endpoint,
                    },
                );
                let parked = self.plane.take_parked();
                let v4 = self.ipv4.is_some();
                tokio::task::spawn_blocking(move || {
                    let tun = match parked {
                        Some(t) => tun::reuse(t, &name, mtu, ll)
                            .or_else(|_| tun::create(&name, mtu, ll, true)),
                        None => tun::create(&name, mtu, ll, true),
                    };
                    if let (true, Ok(_)) = (v4, &tun) {
                        if let Err(e) = ipv4::forward_on(&name) {
                            tracing::warn!(%name, error = %format!("{e:#}"), "no IPv4 through this tunnel");
                        }
                    }
                    let _ = done.blocking_send((name, tun));
                });
            }
            Action::CloseTunnel { name, .. } => {
                self.creating.remove(&name);
                if let Some(index) = self.links.remove(&name) {
                    self.routing
                        .send(&self.plane, Command::RemoveInterface(name));
                    self.plane.remove_link(index);
                }
            }
            Action::SetCost { name, multiplier } => {
                self.routing
                    .send(&self.plane, Command::SetCostMultiplier(name, multiplier));
            }
            Action::SetMtu { name, mtu } => {
                if let Some(index) = self.links.get(&name) {
                    if let Err(e) = self.plane.set_mtu(*index, mtu) {
                        tracing::debug!(%name, error = %e, "MTU not given to the data plane");
                    }
                    // Takes the kernel's RTNL lock: off the control loop.
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = re6st_tunnel::tun::set_mtu(&name, mtu) {
                            tracing::warn!(%name, mtu, error = %e, "setting a tunnel's MTU");
                        }
                    });
                }
            }
            Action::SetHelloInterval { name, interval } => {
                self.routing
                    .send(&self.plane, Command::SetHelloInterval(name, interval));
            }
            Action::SetBabelKeys(keys) => match state::auth_config(&keys) {
                Ok(auth) => {
                    self.routing.send(&self.plane, Command::SetAuth(Some(auth)));
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "Babel keys"),
            },
            Action::Registry(r) => self.spawn_registry(r),
            Action::DetectEndpoints => {
                let (source, endpoints) = if self.cfg.endpoints.is_empty() {
                    (
                        EndpointSource::Detected,
                        system::detect_endpoints(self.cfg.port, self.files.ca.network())
                            .unwrap_or_default(),
                    )
                } else {
                    (EndpointSource::Configured, self.cfg.endpoints.clone())
                };
                self.core
                    .handle_endpoints(Instant::now(), unix(), source, endpoints);
            }
            Action::SaveNetwork(signed) => {
                if let Err(e) = state::save_network(&self.cfg.state_dir, &signed) {
                    tracing::warn!(error = %format!("{e:#}"), "caching the configuration");
                }
            }
            Action::SaveHmac(keys) => {
                if let Err(e) = state::save_hmac(&self.cfg.state_dir, &keys) {
                    tracing::warn!(error = %format!("{e:#}"), "saving the Babel keys");
                }
            }
            Action::SaveCertificate(pem) => {
                let path = self.cfg.dir.join(crate::enrol::CERT_FILE);
                if let Err(e) = crate::enrol::write_atomic(&path, pem.as_bytes(), 0o644) {
                    tracing::warn!(error = %format!("{e:#}"), path = %path.display(), "saving the certificate");
                }
            }
            Action::Persist(change) => self.persist(change),
            Action::Revoked => {
                tracing::error!(
                    "this node is revoked: closing its tunnels; it will not open new ones"
                );
            }
        }
    }

    /// Writes a change of the core's peer cache through to SQLite.
    fn persist(&mut self, change: CacheChange) {
        let r = match change {
            CacheChange::Insert { record, unix } => {
                let crl = &self.core.config().crl;
                self.cache.insert(&record, &self.files.ca, crl, unix)
            }
            CacheChange::MarkOk {
                peer,
                endpoint,
                unix,
            } => self.cache.mark_ok(peer, endpoint, unix),
            CacheChange::MarkFailed {
                peer,
                unix,
                backoff_s,
            } => self.cache.mark_failed(peer, unix, backoff_s),
            CacheChange::Remove(peer) => self.cache.remove(peer),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "peer cache");
        }
    }

    /// Runs a registry request in its own task.
    fn spawn_registry(&mut self, request: RegistryRequest) {
        let Some(r) = self.registry.clone() else {
            return;
        };
        let kind = request.kind();
        let key = match re6st_registry::cert::load_key(&self.files.key_pem) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "node key");
                self.core.handle_registry(
                    Instant::now(),
                    unix(),
                    failure(kind, format!("node key: {e}")),
                );
                return;
            }
        };
        // What a report says is taken now, not when the request runs.
        let report = matches!(request, RegistryRequest::Report).then(|| self.report());
        let serial = self.core.certificate().serial;
        let secret = self.files.wg_secret;
        let ca = self.files.ca.clone();
        let tx = self.tasks.clone();
        tokio::spawn(async move {
            let id = ClientId { key: &key, serial };
            let text = |e: re6st_registry::Error| format!("{e:#}");
            let out = match request {
                RegistryRequest::Config => RegistryResult::Config(r.config().await.map_err(text)),
                RegistryRequest::Hmac => RegistryResult::Hmac(
                    r.hmac_keys(&id)
                        .await
                        .map_err(text)
                        .and_then(|s| open_hmac(&ca, &secret, &s)),
                ),
                RegistryRequest::Bootstrap => {
                    RegistryResult::Bootstrap(r.bootstrap(&id).await.map_err(text))
                }
                RegistryRequest::Publish(record) => {
                    RegistryResult::Published(r.publish_peer(&id, &record).await.map_err(text))
                }
                RegistryRequest::Renew => RegistryResult::Renewed(
                    r.renew(&id, &RenewRequest { wg_key: None })
                        .await
                        .map(|i| i.cert)
                        .map_err(text),
                ),
                RegistryRequest::Report => RegistryResult::Reported(match &report {
                    Some(rep) => r.report(&id, rep).await.map_err(text),
                    None => Ok(()),
                }),
            };
            let _ = tx.send(out).await;
        });
    }

    /// Our topology report, as of now.
    fn report(&self) -> re6st_registry::topology::Report {
        let neighbours = self
            .routing_state
            .clone()
            .map(|s| self.routing.snapshot(s).status().neighbours)
            .unwrap_or_default();
        crate::report::build(
            &self.tunnel_infos(),
            &neighbours,
            &self.core.failing_peers(unix()),
        )
    }

    /// Our tunnels as the control API shows them.
    fn tunnel_infos(&self) -> Vec<TunnelInfo> {
        let links = self.plane.links();
        self.core
            .tunnels()
            .into_iter()
            .map(|t| {
                let l = self
                    .links
                    .get(&t.name)
                    .and_then(|i| links.iter().find(|l| l.index == *i));
                TunnelInfo {
                    peer: t.peer.to_string(),
                    interface: t.name,
                    direction: if t.outgoing { "out" } else { "in" }.to_string(),
                    up: t.up,
                    endpoint: l.and_then(|l| l.endpoint).map(|e| e.addr.to_string()),
                    transport: l
                        .and_then(|l| l.endpoint)
                        .map(|e| e.transport.label().to_string()),
                    since_handshake_s: l.and_then(|l| l.since_handshake).map(|d| d.as_secs()),
                    tx_bytes: l.map_or(0, |l| l.tx_bytes),
                    rx_bytes: l.map_or(0, |l| l.rx_bytes),
                    routes: t.routes,
                    cost_multiplier: t.cost,
                }
            })
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        let tunnels = self.tunnel_infos();
        let mut metrics = self.core.metrics();
        for (reason, n) in self.plane.published().dropped {
            metrics.rejected.insert(format!("wireguard_{reason}"), n);
        }
        let prefix = self.core.prefix();
        Snapshot::new(
            crate::ctl::NodeSummary {
                prefix: prefix.to_string(),
                address: overlay_address(prefix).to_string(),
                ipv4: self.ipv4.map(|s| s.address.to_string()),
                network: self.files.ca.network().to_string(),
                router_id: driver::format_router_id(&node_router_id(prefix)),
                config_version: self.core.config().version,
                hmac_version: self.core.hmac_version(),
                endpoints: self
                    .core
                    .endpoints()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                seen: self
                    .core
                    .seen(Instant::now())
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                uptime_s: self.started.elapsed().as_secs(),
                revoked: self.core.revoked(),
                cert_not_after: self.core.certificate().not_after,
                cert_expires_in_s: self.core.certificate().not_after - unix(),
                registry_reachable: self.core.registry_reachable(),
                registry: self.cfg.registry.clone(),
            },
            tunnels,
            self.routing_state
                .clone()
                .map(|s| std::sync::Arc::new(self.routing.snapshot(s))),
            self.core.config().clone(),
            metrics,
            self.core
                .cached_peers()
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

/// Opens the registry's sealed Babel keys.
/// Opens a key set sealed to us and checks the CA's signature for us.
fn open_hmac(
    ca: &re6st_registry::cert::CaCert,
    secret: &[u8; 32],
    sealed: &re6st_registry::config::Sealed,
) -> Result<HmacKeys, String> {
    let plain = re6st_registry::config::open(secret, sealed).map_err(|e| e.to_string())?;
    let signed: re6st_registry::config::SignedHmacKeys =
        serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
    signed
        .verify(ca, &re6st_registry::config::x25519_public(secret))
        .map_err(|e| e.to_string())
}

/// A failed registry request of `kind`.
fn failure(kind: crate::node::RegistryKind, e: String) -> RegistryResult {
    use crate::node::RegistryKind as K;
    match kind {
        K::Config => RegistryResult::Config(Err(e)),
        K::Hmac => RegistryResult::Hmac(Err(e)),
        K::Bootstrap => RegistryResult::Bootstrap(Err(e)),
        K::Publish => RegistryResult::Published(Err(e)),
        K::Renew => RegistryResult::Renewed(Err(e)),
        K::Report => RegistryResult::Reported(Err(e)),
    }
}
