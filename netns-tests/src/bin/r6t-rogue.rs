//! `r6t-rogue`: a misbehaving member, for the netns tests. An enrolled
//! node that runs the real daemon but announces what it must not (other
//! nodes' prefixes, `::/0`, prefixes outside the network), and floods a
//! target with set-up requests from many addresses, replays its own
//! signed messages and sends signed refusals nobody asked for. What it
//! sends is what a modified node could send; what the targets do with it
//! is what the tests check.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipnet::{IpNet, Ipv6Net};
use re6st_registry::cert::NodeCert;
use re6st_tunnel::setup::{self, Decision, Outcome, Responder};
use re6stnet::config::{self, FileConfig};
use re6stnet::ctl::{self, Snapshot};
use re6stnet::peer::{Body, PeerProtocol};
use re6stnet::state::Files;

#[derive(Parser, Debug)]
#[command(version, about = "A misbehaving member node (netns tests only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the node daemon announcing further destinations.
    Node {
        /// The daemon's settings file.
        #[arg(long)]
        config: PathBuf,
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Control socket.
        #[arg(long)]
        ctl_socket: PathBuf,
        /// Seconds between network-configuration checks.
        #[arg(long)]
        config_refresh: Option<u64>,
        /// A destination to announce besides the node's prefix (repeatable).
        #[arg(long)]
        export: Vec<IpNet>,
    },
    /// Flood a target's UDP port with signed set-up messages.
    Setup {
        /// The rogue's re6st-conf directory.
        #[arg(long)]
        dir: PathBuf,
        /// The target's underlay endpoint.
        #[arg(long)]
        to: SocketAddr,
        /// The target's certificate (node.crt): requests go to its prefix,
        /// and forged refusals answer requests "from" it.
        #[arg(long)]
        target_cert: PathBuf,
        /// Source addresses to send from (repeatable; already on the host).
        #[arg(long = "from", required = true)]
        from: Vec<IpAddr>,
        /// Fresh requests per source address.
        #[arg(long, default_value_t = 20)]
        requests: u32,
        /// Copies of one captured request, sent one every 250 ms (within
        /// the rate limit, so that only the replay check stops them).
        #[arg(long, default_value_t = 4)]
        replays: u32,
        /// Signed refusals ("revoked") nobody asked for.
        #[arg(long, default_value_t = 4)]
        refusals: u32,
    },
    /// Replay one signed peer-protocol message to a target over the overlay.
    Peer {
        /// The rogue's re6st-conf directory.
        #[arg(long)]
        dir: PathBuf,
        /// The target's prefix.
        #[arg(long)]
        target: Ipv6Net,
        /// UDP port of the peer protocol.
        #[arg(long, default_value_t = 326)]
        port: u16,
        /// Copies of one ConfigRequest, one every 100 ms.
        #[arg(long, default_value_t = 5)]
        replays: u32,
    },
}

fn unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn bound(src: IpAddr) -> anyhow::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(src, 0)).with_context(|| format!("binding {src}"))
}

/// A refusal signed by us, answering a request that claims to come from
/// the target (our own responder refuses it: the target's serial is on
/// the CRL we give it, which is checked before the signature).
fn forged_refusal(files: &Files, target: &NodeCert, unix: i64) -> anyhow::Result<Vec<u8>> {
    let mut responder = Responder::new(files.ca.clone(), files.identity()?);
    responder.set_crl(vec![target.serial]);
    let claim = re6st_tunnel::setup::Identity {
        cert: target.clone(),
        key: re6st_registry::cert::generate_key()?,
    };
    let (request, _) = setup::request(&claim, files.cert.prefix, unix)?;
    let src = SocketAddr::from(([198, 18, 0, 1], 326));
    match responder.handle(std::time::Instant::now(), unix, src, &request, |_| {
        Decision::Accept
    }) {
        Outcome::Reply(bytes) => Ok(bytes),
        other => anyhow::bail!("our responder did not refuse: {other:?}"),
    }
}

fn flood_setup(
    dir: PathBuf,
    to: SocketAddr,
    target_cert: PathBuf,
    from: Vec<IpAddr>,
    requests: u32,
    replays: u32,
    refusals: u32,
) -> anyhow::Result<String> {
    let files = Files::load(&dir)?;
    let me = files.identity()?;
    let target = NodeCert::from_pem(
        &std::fs::read_to_string(&target_cert)
            .with_context(|| format!("reading {}", target_cert.display()))?,
    )?;
    let sockets: Vec<UdpSocket> = from.iter().map(|a| bound(*a)).collect::<Result<_, _>>()?;
    let mut sent = 0u64;
    for _ in 0..requests {
        for s in &sockets {
            let (bytes, _) = setup::request(&me, target.prefix, unix())?;
            if s.send_to(&bytes, to).is_ok() {
                sent += 1;
            }
        }
    }
    // Past the rate limit's window, so that replays meet the replay check.
    std::thread::sleep(Duration::from_secs(3));
    let (captured, _) = setup::request(&me, target.prefix, unix())?;
    for _ in 0..=replays {
        sockets[0].send_to(&captured, to)?;
        std::thread::sleep(Duration::from_millis(250));
    }
    let refusal = forged_refusal(&files, &target, unix())?;
    for _ in 0..refusals {
        sockets[0].send_to(&refusal, to)?;
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(format!(
        "{sent} requests from {} addresses, {replays} replays, {refusals} refusals",
        sockets.len()
    ))
}

fn replay_peer(dir: PathBuf, target: Ipv6Net, port: u16, replays: u32) -> anyhow::Result<String> {
    let files = Files::load(&dir)?;
    let mut protocol = PeerProtocol::new(files.ca.clone(), files.identity()?);
    protocol.set_crl(Vec::new());
    let captured = protocol.seal(target, &Body::ConfigRequest, unix())?;
    let src = re6st_registry::cert::overlay_address(files.cert.prefix);
    let dst = re6st_registry::cert::overlay_address(target);
    let s = bound(IpAddr::V6(src))?;
    for _ in 0..=replays {
        s.send_to(&captured, SocketAddr::new(IpAddr::V6(dst), port))?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(format!("one ConfigRequest sent {} times", replays + 1))
}

fn node(
    config: PathBuf,
    state_dir: PathBuf,
    ctl_socket: PathBuf,
    config_refresh: Option<u64>,
    export: Vec<IpNet>,
) -> anyhow::Result<String> {
    let flags = FileConfig {
        state_dir: Some(state_dir),
        ctl_socket: Some(ctl_socket),
        config_refresh,
        ..FileConfig::default()
    };
    let mut cfg = config::merge(flags, config::read_file(&config)?)?;
    cfg.exports = export.into_iter().map(|p| (p, None)).collect();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    re6stnet::runtime()?.block_on(async move {
        let snapshot = Arc::new(RwLock::new(Snapshot::default()));
        ctl::serve(&cfg.ctl_socket, cfg.metrics, Arc::clone(&snapshot)).await?;
        re6stnet::daemon::run(cfg, snapshot, re6stnet::shutdown_signal()).await
    })?;
    Ok("stopped".into())
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Node {
            config,
            state_dir,
            ctl_socket,
            config_refresh,
            export,
        } => node(config, state_dir, ctl_socket, config_refresh, export),
        Cmd::Setup {
            dir,
            to,
            target_cert,
            from,
            requests,
            replays,
            refusals,
        } => flood_setup(dir, to, target_cert, from, requests, replays, refusals),
        Cmd::Peer {
            dir,
            target,
            port,
            replays,
        } => replay_peer(dir, target, port, replays),
    };
    match result {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("r6t-rogue: {e:#}");
            ExitCode::FAILURE
        }
    }
}
