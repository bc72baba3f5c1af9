//! `re6st-babeld`: the re6st-rs Babel router as a standalone daemon, for
//! interop with babeld, benchmarks, and users who want only the router.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use re6st_routing::auth::{Algorithm, AuthConfig, Key};
use re6st_routing::driver::{os_seed, run, Command, DriverConfig};
use re6st_routing::kernel::PROTO;
use re6st_routing::metric::RttParams;
use re6st_routing::neighbour::LinkQuality;
use re6st_routing::router::{Filter, InterfaceConfig, RouterConfig};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "re6st-rs Babel router (RFC 8966 with RTT-based costs), wire-compatible with babeld"
)]
struct Cli {
    /// Interface to run Babel on (repeat for several). Treated as a tunnel:
    /// RTT timestamps on, 2-out-of-3 link cost.
    #[arg(long = "interface", short = 'i')]
    interfaces: Vec<String>,
    /// Prefix to announce (repeat), e.g. fd00:5a::1/128; `PREFIX from SRC`
    /// for a source-specific route (RFC 9079).
    #[arg(long = "export", short = 'e')]
    exports: Vec<String>,
    /// Hello interval in milliseconds (a link is declared dead 2.5 intervals
    /// after its last Hello).
    #[arg(long, default_value_t = 300)]
    hello_interval: u64,
    /// Full route dump period in milliseconds.
    #[arg(long, default_value_t = 4000)]
    update_interval: u64,
    /// RTT at or below which no penalty is added, milliseconds.
    #[arg(long, default_value_t = 10)]
    rtt_min: u64,
    /// RTT at which the full penalty is added, milliseconds.
    #[arg(long, default_value_t = 500)]
    rtt_max: u64,
    /// The full RTT penalty (metric units; a hop costs 96).
    #[arg(long, default_value_t = 5000)]
    max_rtt_penalty: u16,
    /// Interface to run Babel on with ETX link quality (lossy links, e.g.
    /// wireless; nominal cost 256) instead of 2-out-of-3 (repeat).
    #[arg(long = "lossy-interface")]
    lossy_interfaces: Vec<String>,
    /// Do not send timestamps nor add RTT penalties.
    #[arg(long)]
    no_timestamps: bool,
    /// RFC 8967 keys, one per line: `hmac-sha256 HEX` or `blake2s128 HEX`
    /// (`#` comments). The first key signs; all are accepted. Packets
    /// without a valid MAC are then dropped.
    #[arg(long)]
    hmac_key_file: Option<PathBuf>,
    /// Kernel routing table (254 = main).
    #[arg(long, default_value_t = 254)]
    table: u32,
    /// Do not touch the kernel routing table (learn and announce only).
    #[arg(long)]
    no_install: bool,
    /// Preferred source address of installed routes.
    #[arg(long)]
    pref_src: Option<std::net::Ipv6Addr>,
    /// Router-id, 16 hex digits (default: from the first exported prefix, else random).
    #[arg(long)]
    router_id: Option<String>,
    /// Unix socket that answers each connection with the JSON status.
    #[arg(long)]
    status_socket: Option<PathBuf>,
    /// File keeping our seqno across restarts (babeld's -S), so that a
    /// restarted router's routes are feasible at once everywhere.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Accept routes only inside this prefix (repeat; default: any prefix
    /// that is not a martian).
    #[arg(long = "accept")]
    accept: Vec<IpNet>,
    /// Refuse routes longer than this prefix length.
    #[arg(long)]
    max_plen: Option<u8>,
    /// Accept a default route when its source prefix is this prefix (an
    /// RFC 9079 gateway route; repeat).
    #[arg(long = "default-from")]
    default_from: Vec<IpNet>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Print the JSON status of a running daemon.
    Status {
        /// Its --status-socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn parse_export(s: &str) -> anyhow::Result<(IpNet, Option<IpNet>)> {
    let (dst, src) = match s.split_once(" from ") {
        Some((d, s)) => (d, Some(s)),
        None => (s, None),
    };
    let dst: IpNet = dst
        .trim()
        .parse()
        .with_context(|| format!("--export {s:?}: not a prefix"))?;
    let src = src
        .map(|x| x.trim().parse::<IpNet>())
        .transpose()
        .with_context(|| format!("--export {s:?}: bad source prefix"))?;
    if !matches!(dst, IpNet::V6(_)) {
        bail!("--export {s:?}: only IPv6 prefixes are supported");
    }
    Ok((dst.trunc(), src.map(|p| p.trunc())))
}

fn load_keys(path: &std::path::Path) -> anyhow::Result<AuthConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let (algo, hex) = line
            .split_once(char::is_whitespace)
            .with_context(|| format!("{}:{}: expected `ALGORITHM HEX`", path.display(), n + 1))?;
        let algorithm = match algo {
            "hmac-sha256" => Algorithm::HmacSha256,
            "blake2s128" => Algorithm::Blake2s128,
            other => bail!("{}:{}: unknown algorithm {other:?}", path.display(), n + 1),
        };
        let hex = hex.trim();
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{}:{}: bad hex", path.display(), n + 1);
        }
        if hex.len() % 2 != 0 {
            bail!("{}:{}: odd number of hex digits", path.display(), n + 1);
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .with_context(|| format!("{}:{}: bad hex", path.display(), n + 1))?;
        keys.push(
            Key::new(algorithm, bytes)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?,
        );
    }
    let sign = keys
        .first()
        .cloned()
        .with_context(|| format!("{}: no key", path.display()))?;
    Ok(AuthConfig { sign, accept: keys })
}

fn router_id(cli: &Cli, exports: &[(IpNet, Option<IpNet>)]) -> anyhow::Result<[u8; 8]> {
    let id: [u8; 8] = if let Some(h) = &cli.router_id {
        let h: String = h.chars().filter(|c| *c != ':').collect();
        let v = u64::from_str_radix(&h, 16)
            .with_context(|| format!("--router-id {h:?}: 16 hex digits"))?;
        v.to_be_bytes()
    } else if let Some((IpNet::V6(p), _)) = exports.first() {
        // Both halves of the first exported prefix, folded: distinct
        // prefixes (host routes or /64s) give distinct router-ids.
        let o = p.network().octets();
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = o[i] ^ o[i + 8];
        }
        id
    } else {
        let mut id = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut id))
            .context("reading /dev/urandom")?;
        id
    };
    if id == [0; 8] || id == [0xff; 8] {
        bail!("router-id must not be all zeros or all ones");
    }
    Ok(id)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("re6st-babeld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    if let Some(Sub::Status { socket }) = &cli.command {
        let mut s = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut out = String::new();
        s.read_to_string(&mut out).context("reading the status")?;
        println!("{out}");
        return Ok(());
    }
    if cli.interfaces.is_empty() && cli.lossy_interfaces.is_empty() {
        bail!("give at least one --interface");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    let exports: Vec<(IpNet, Option<IpNet>)> = cli
        .exports
        .iter()
        .map(|e| parse_export(e))
        .collect::<anyhow::Result<_>>()?;
    let mut rcfg = RouterConfig::new(router_id(&cli, &exports)?, os_seed()?);
    rcfg.update_interval = Duration::from_millis(cli.update_interval.max(100));
    rcfg.auth = cli.hmac_key_file.as_deref().map(load_keys).transpose()?;
    rcfg.filter = Filter {
        networks: cli.accept.iter().map(|p| p.trunc()).collect(),
        max_plen: cli.max_plen,
        default_from: cli.default_from.iter().map(|p| p.trunc()).collect(),
        ..Filter::default()
    };
    let cfg = DriverConfig {
        router: rcfg,
        table: cli.table,
        proto: PROTO,
        pref_src: re6st_routing::kernel::PrefSrc {
            v6: cli.pref_src,
            v4: None,
        },
        install: !cli.no_install,
        cover: Vec::new(),
        seqno_file: cli.state_file.clone(),
    };
    let hello = Duration::from_millis(cli.hello_interval.clamp(20, 600_000));
    let rtt = (!cli.no_timestamps).then_some(RttParams {
        min: Duration::from_millis(cli.rtt_min),
        max: Duration::from_millis(cli.rtt_max.max(cli.rtt_min + 1)),
        max_penalty: cli.max_rtt_penalty,
        decay: 42,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let (tx, rx) = mpsc::channel(64);
        for name in &cli.interfaces {
            let mut icfg = InterfaceConfig::tunnel(hello);
            icfg.rtt = rtt;
            tx.send(Command::AddInterface(name.clone(), icfg)).await?;
        }
        for name in &cli.lossy_interfaces {
            let mut icfg = InterfaceConfig::tunnel(hello);
            icfg.rtt = rtt;
            icfg.rxcost = 256;
            icfg.link_quality = LinkQuality::Etx;
            tx.send(Command::AddInterface(name.clone(), icfg)).await?;
        }
        for (p, s) in &exports {
            tx.send(Command::Export(*p, *s)).await?;
        }
        if let Some(path) = cli.status_socket.clone() {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding {}", path.display()))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (reply, answer) = oneshot::channel();
                    if tx.send(Command::Status(reply)).await.is_err() {
                        return;
                    }
                    if let Ok(status) = answer.await {
                        let text = serde_json::to_string_pretty(&status).unwrap_or_default();
                        // A client that does not read never stalls routing.
                        tokio::spawn(async move {
                            let mut stream = stream;
                            let write = stream.write_all(text.as_bytes());
                            let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
                        });
                    }
                }
            });
        }
        let stopper = tx.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stopper.send(Command::Shutdown).await;
        });
        let result = run(cfg, rx).await;
        if let Some(path) = &cli.status_socket {
            let _ = std::fs::remove_file(path);
        }
        result
    })
}
