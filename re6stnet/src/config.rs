//! The node's own settings: `re6stnet.toml`, every key also a flag.
//!
//! Flags win over the file, the file over the defaults. Unknown keys and
//! bad values are errors that name the key; nothing starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv6Net};

use crate::node::Roles;
use re6st_tunnel::endpoint::Transport;
use serde::Deserialize;

/// Default configuration file (used when it exists and `--config` is not given).
pub const DEFAULT_CONFIG: &str = "/etc/re6stnet/re6stnet.toml";

/// The settings as they may appear in the file (all optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory with ca.crt, node.crt, node.key, wg.key.
    pub dir: Option<PathBuf>,
    /// Registry URL.
    pub registry: Option<String>,
    /// PEM file of a private TLS root for an https registry.
    pub tls_ca: Option<PathBuf>,
    /// UDP port of the tunnels and the peer protocol.
    pub port: Option<u16>,
    /// LAN interfaces to run Babel on.
    pub interface: Option<Vec<String>>,
    /// Underlay endpoints to announce (default: the host's global addresses).
    pub endpoint: Option<Vec<SocketAddr>>,
    /// Control socket path.
    pub ctl_socket: Option<PathBuf>,
    /// TCP address for Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// Directory for the peer cache and the cached network configuration.
    pub state_dir: Option<PathBuf>,
    /// Kernel routing table.
    pub table: Option<u32>,
    /// Seconds between network-configuration checks with the registry.
    pub config_refresh: Option<u64>,
    /// Logs as JSON lines.
    pub log_json: Option<bool>,
    /// Route the overlay's traffic to outside the network (a gateway).
    pub gateway: Option<bool>,
    /// Outgoing tunnels to keep (instead of the network's setting).
    pub client_count: Option<u32>,
    /// Incoming tunnels to accept at most (instead of the network's; 0:
    /// client only).
    pub max_clients: Option<u32>,
    /// Node prefixes to always keep a tunnel with.
    pub neighbour: Option<Vec<Ipv6Net>>,
    /// Shell command run once the node is up.
    pub up: Option<String>,
    /// Interface that carries the node address (and so its prefix).
    pub main_interface: Option<String>,
    /// MTU of our tunnel devices (instead of the network's).
    pub mtu: Option<u32>,
    /// Dial over `udp` or `tcp` only (default: UDP, then TCP when UDP
    /// gets no answer).
    pub transport: Option<String>,
}

/// The settings in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Directory with ca.crt, node.crt, node.key, wg.key.
    pub dir: PathBuf,
    /// Registry URL (None: run from the cache only).
    pub registry: Option<String>,
    /// Private TLS root for the registry.
    pub tls_ca: Option<PathBuf>,
    /// UDP port.
    pub port: u16,
    /// LAN interfaces.
    pub interfaces: Vec<String>,
    /// Announced endpoints (empty: detect).
    pub endpoints: Vec<SocketAddr>,
    /// Control socket.
    pub ctl_socket: PathBuf,
    /// Prometheus address.
    pub metrics: Option<SocketAddr>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Kernel table.
    pub table: u32,
    /// Network-configuration refresh period.
    pub config_refresh: Duration,
    /// JSON logs.
    pub log_json: bool,
    /// Announce `::/0 from <network>`: this node carries the overlay's
    /// traffic to outside the network (RFC 9079 source-specific default).
    pub gateway: bool,
    /// What this node changes of the network's tunnel policy.
    pub roles: Roles,
    /// Shell command run once the node is up (address, routing and data
    /// plane ready), with the node's addresses in its environment.
    pub up: Option<String>,
    /// Interface that carries the node address `prefix::1/len`: `lo`, or a
    /// LAN whose hosts take addresses in our prefix and are routed by us.
    pub main_interface: String,
    /// Destinations (with a source prefix for a source-specific route)
    /// announced besides the node's own prefix. No flag sets it yet (a
    /// gateway will, issue 15); the misbehaving-member netns test sets it
    /// to announce what peers must refuse. `gateway` adds its route.
    pub exports: Vec<(IpNet, Option<IpNet>)>,
}

/// Whether `name` can be a Linux interface name.
fn is_interface_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace))
}

/// Reads and checks a configuration file.
pub fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

/// Parses a configuration text.
pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
    toml::from_str(text).map_err(|e| {
        // One line that names the key: the offending line and the reason.
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let line_no = text[..at].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
        anyhow::anyhow!("line {line_no} `{line}`: {}", e.message().trim())
    })
}

/// Merges flags over the file over the defaults, and checks the result.
pub fn merge(flags: FileConfig, file: FileConfig) -> anyhow::Result<NodeConfig> {
    let dir = flags
        .dir
        .or(file.dir)
        .unwrap_or_else(|| PathBuf::from("/etc/re6stnet"));
    let cfg = NodeConfig {
        state_dir: flags
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/re6stnet")),
        registry: flags.registry.or(file.registry),
        tls_ca: flags.tls_ca.or(file.tls_ca),
        port: flags.port.or(file.port).unwrap_or(326),
        interfaces: flags
            .interface
            .filter(|v| !v.is_empty())
            .or(file.interface)
            .unwrap_or_default(),
        endpoints: flags
            .endpoint
            .filter(|v| !v.is_empty())
            .or(file.endpoint)
            .unwrap_or_default(),
        ctl_socket: flags
            .ctl_socket
            .or(file.ctl_socket)
            .unwrap_or_else(|| PathBuf::from("/run/re6stnet/ctl.sock")),
        metrics: flags.metrics.or(file.metrics),
        table: flags
            .table
            .or(file.table)
            .unwrap_or(crate::overlay_table::DEFAULT_TABLE),
        config_refresh: Duration::from_secs(
            flags.config_refresh.or(file.config_refresh).unwrap_or(60),
        ),
        log_json: flags.log_json.or(file.log_json).unwrap_or(false),
        gateway: flags.gateway.or(file.gateway).unwrap_or(false),
        roles: Roles {
            client_count: flags.client_count.or(file.client_count),
            max_clients: flags.max_clients.or(file.max_clients),
            neighbours: flags
                .neighbour
                .filter(|v| !v.is_empty())
                .or(file.neighbour)
                .unwrap_or_default(),
            mtu: flags.mtu.or(file.mtu),
            transport: match flags.transport.or(file.transport).as_deref() {
                None => None,
                Some("udp") => Some(Transport::Udp),
                Some("tcp") => Some(Transport::Tcp),
                Some(other) => bail!("transport: {other:?} is neither \"udp\" nor \"tcp\""),
            },
        },
        up: flags.up.or(file.up),
        main_interface: flags
            .main_interface
            .or(file.main_interface)
            .unwrap_or_else(|| "lo".to_string()),
        exports: Vec::new(),
        dir,
    };
    if cfg.port == 0 {
        bail!("port: must be 1..=65535");
    }
    if let Some(r) = &cfg.registry {
        if !(r.starts_with("http://") || r.starts_with("https://")) {
            bail!("registry: {r:?} is not an http(s):// URL");
        }
    }
    if !is_interface_name(&cfg.main_interface) {
        bail!(
            "main_interface: {:?} is not an interface name",
            cfg.main_interface
        );
    }
    for i in &cfg.interfaces {
        if !is_interface_name(i) {
            bail!("interface: {i:?} is not an interface name");
        }
    }
    for e in &cfg.endpoints {
        if e.port() == 0 {
            bail!("endpoint: {e} has port 0");
        }
    }
    if !(5..=86_400).contains(&cfg.config_refresh.as_secs()) {
        bail!("config_refresh: must be 5..=86400 seconds");
    }
    if cfg.roles.client_count.is_some_and(|n| n > 100) {
        bail!("client_count: at most 100 outgoing tunnels");
    }
    if cfg.roles.max_clients.is_some_and(|n| n > 1000) {
        bail!("max_clients: at most 1000 incoming tunnels");
    }
    if cfg.roles.mtu.is_some_and(|m| !(1280..=65_535).contains(&m)) {
        bail!("mtu: must be 1280..=65535 (IPv6 needs 1280)");
    }
    if cfg.table == 0 || cfg.table == 255 {
        bail!("table: {} is reserved", cfg.table);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match parse(text).and_then(|f| merge(FileConfig::default(), f)) {
            Ok(c) => format!("accepted: {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_file_re6st_conf_writes_parses() {
        let f = parse("registry = \"http://[fd00::1]:8080\"\ndir = \"/tmp/x\"\n# port = 326\n")
            .unwrap_or_default();
        let c = merge(FileConfig::default(), f);
        assert!(
            matches!(&c, Ok(c) if c.dir == Path::new("/tmp/x") && c.port == 326),
            "{c:?}"
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let f = parse(include_str!("../../dist/re6stnet.toml"));
        assert!(
            matches!(&f, Ok(f) if f.port == Some(326) && f.table == Some(326) && f.gateway == Some(false)),
            "{f:?}"
        );
        let c = f.and_then(|f| merge(FileConfig::default(), f));
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse("port = 1000\ninterface = [\"eth1\"]\n").unwrap_or_default();
        let flags = FileConfig {
            port: Some(2000),
            ..FileConfig::default()
        };
        let c = merge(flags, file);
        assert!(
            matches!(&c, Ok(c) if c.port == 2000 && c.interfaces == vec!["eth1".to_string()]),
            "{c:?}"
        );
    }

    #[test]
    fn roles_come_from_the_file_or_the_flags() {
        let file = parse(
            "client_count = 3\nmax_clients = 0\nneighbour = [\"fd5e:0:0:7::/64\"]\nmtu = 1380\ntransport = \"tcp\"\n",
        )
        .unwrap_or_default();
        let c = merge(FileConfig::default(), file.clone());
        assert!(
            matches!(&c, Ok(c) if c.roles == Roles {
                client_count: Some(3),
                max_clients: Some(0),
                neighbours: vec!["fd5e:0:0:7::/64".parse().unwrap_or_default()],
                mtu: Some(1380),
                transport: Some(Transport::Tcp),
            }),
            "{c:?}"
        );
        let flags = FileConfig {
            max_clients: Some(5),
            ..FileConfig::default()
        };
        let c = merge(flags, file);
        assert!(
            matches!(&c, Ok(c) if c.roles.max_clients == Some(5)),
            "{c:?}"
        );
    }

    #[test]
    fn bad_input_names_the_key() {
        assert!(err("prot = 1").contains("prot"), "{}", err("prot = 1"));
        assert!(
            err("port = 70000").contains("port"),
            "{}",
            err("port = 70000")
        );
        assert!(err("port = 0").contains("port"));
        assert!(err("port = \"x\"").contains("port"));
        assert!(err("registry = \"ftp://x\"").contains("registry"));
        assert!(err("interface = [\"a b\"]").contains("interface"));
        assert!(err("main_interface = \"a/b\"").contains("main_interface"));
        assert!(err("config_refresh = 1").contains("config_refresh"));
        assert!(err("table = 0").contains("table"));
        assert!(err("endpoint = [\"nonsense\"]").contains("endpoint"));
        assert!(err("client_count = 1000").contains("client_count"));
        assert!(err("max_clients = -1").contains("max_clients"));
        assert!(err("neighbour = [\"fd5e::1\"]").contains("neighbour"));
        assert!(err("[x").contains("invalid") || err("[x").contains("expected"));
    }
}
