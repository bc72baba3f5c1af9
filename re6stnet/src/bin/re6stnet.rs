//! `re6stnet`: the node daemon. Keeps WireGuard tunnels to a changing set of
//! peers, runs Babel over them, installs the lowest-latency routes, and
//! serves its status to `re6stctl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use clap::Parser;
use re6stnet::config::{self, FileConfig, DEFAULT_CONFIG};
use re6stnet::ctl::{self, Snapshot};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The re6st-rs node daemon: tunnels, Babel routing and the peer protocol",
    long_about = "The re6st-rs node daemon. Reads its settings from --config \
(default /etc/re6stnet/re6stnet.toml when it exists); every setting of the file \
is also a flag, and flags win. Enrol the node first with re6st-conf.\n\n\
Keeps `client_count` outgoing WireGuard tunnels (network configuration) to \
random peers, accepts incoming ones up to `max_clients`, runs Babel on each \
(Hello every hello_interval_ms, 300 ms by default, so a silent path failure \
moves traffic within about a second), and installs routes in the kernel with \
protocol 113. Keeps running from its cache when the registry is down. SIGINT or \
SIGTERM: clean shutdown (peers told, routes, interfaces and the node address \
removed)."
)]
struct Cli {
    /// TOML file with the settings below (keys as the flag names, with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory with ca.crt, node.crt, node.key and wg.key [default: /etc/re6stnet].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Registry URL (needed to join, bootstrap and renew; not to keep running).
    #[arg(long)]
    registry: Option<String>,
    /// PEM file of a private CA for the registry's HTTPS certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// UDP port of the tunnels and the peer protocol [default: 326].
    #[arg(long)]
    port: Option<u16>,
    /// LAN interface on which to find other nodes directly (repeatable).
    #[arg(long)]
    interface: Vec<String>,
    /// Underlay endpoint (IP:PORT) to announce (repeatable) [default: the
    /// host's global addresses with --port].
    #[arg(long)]
    endpoint: Vec<SocketAddr>,
    /// Control socket for re6stctl [default: /run/re6stnet/ctl.sock].
    #[arg(long)]
    ctl_socket: Option<PathBuf>,
    /// Also serve Prometheus /metrics on this TCP address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Peer cache and cached network configuration [default: /var/lib/re6stnet].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Kernel routing table for overlay routes, looked up through an `ip
    /// rule` for the network prefix only [default: 326]; 254 (main): no
    /// rule, routes in the main table.
    #[arg(long)]
    table: Option<u32>,
    /// Seconds between network-configuration checks with the registry [default: 60].
    #[arg(long)]
    config_refresh: Option<u64>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Be a gateway: announce `::/0 from <network>`, so that other nodes
    /// send their traffic from overlay addresses to outside the network
    /// through the nearest gateway (by Babel metric), which forwards it
    /// with its own routing table (the network prefix must be routed back
    /// to it, or NAT66 set up on it).
    #[arg(long)]
    gateway: bool,
    /// Outgoing tunnels to keep, instead of the network's `client_count`.
    #[arg(long)]
    client_count: Option<u32>,
    /// Incoming tunnels to accept at most, instead of the network's
    /// `max_clients`; 0: a client-only node, which opens tunnels and
    /// accepts none.
    #[arg(long)]
    max_clients: Option<u32>,
    /// A node prefix to always keep a tunnel with (repeatable): opened at
    /// start, on top of `client_count`, never rotated away, and accepted
    /// beyond `max_clients`.
    #[arg(long)]
    neighbour: Vec<ipnet::Ipv6Net>,
    /// Shell command run (`sh -c`) once the node is up, with RE6ST_PREFIX,
    /// RE6ST_ADDRESS, RE6ST_NETWORK, RE6ST_TABLE and RE6ST_STATE_DIR in its
    /// environment; the daemon does not wait for it and logs how it ended.
    #[arg(long)]
    up: Option<String>,
    /// Interface that carries the node address `prefix::1/len`
    /// [default: lo]. A LAN interface puts the node's prefix on that LAN:
    /// its hosts take addresses in it (prefix::1 as their route to the
    /// network) and the node routes them to and from the overlay.
    #[arg(long)]
    main_interface: Option<String>,
    /// MTU of this node's tunnel devices, instead of the network's `mtu`
    /// (1280..=65535; a smaller underlay MTU here, say). TCP SYNs through
    /// a tunnel are clamped to its MTU either way.
    #[arg(long)]
    mtu: Option<u32>,
    /// Dial new tunnels over this transport only: `tcp` on a site known to
    /// block UDP (skips the 3 s UDP attempt), `udp` to never fall back.
    /// Default: UDP, then TCP to the same port when UDP gets no answer.
    #[arg(long, value_parser = ["udp", "tcp"])]
    transport: Option<String>,
}

fn settings(cli: Cli) -> anyhow::Result<config::NodeConfig> {
    let file = match &cli.config {
        Some(p) => config::read_file(p)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            config::read_file(std::path::Path::new(DEFAULT_CONFIG))?
        }
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        dir: cli.dir,
        registry: cli.registry,
        tls_ca: cli.tls_ca,
        port: cli.port,
        interface: Some(cli.interface),
        endpoint: Some(cli.endpoint),
        ctl_socket: cli.ctl_socket,
        metrics: cli.metrics,
        state_dir: cli.state_dir,
        table: cli.table,
        config_refresh: cli.config_refresh,
        log_json: cli.log_json.then_some(true),
        gateway: cli.gateway.then_some(true),
        client_count: cli.client_count,
        max_clients: cli.max_clients,
        neighbour: Some(cli.neighbour),
        up: cli.up,
        main_interface: cli.main_interface,
        mtu: cli.mtu,
        transport: cli.transport,
    };
    config::merge(flags, file)
}

fn main() -> ExitCode {
    // One thread per tunnel: without a cap, glibc gives each its own malloc
    // arena and the node's memory grows by hundreds of KiB per tunnel.
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    let cfg = match settings(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("re6stnet: configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = match re6stnet::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("re6stnet: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let snapshot = Arc::new(RwLock::new(Snapshot::default()));
        ctl::serve(&cfg.ctl_socket, cfg.metrics, Arc::clone(&snapshot)).await?;
        let socket = cfg.ctl_socket.clone();
        let out = re6stnet::daemon::run(cfg, snapshot, re6stnet::shutdown_signal()).await;
        let _ = std::fs::remove_file(socket);
        out
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("re6stnet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
