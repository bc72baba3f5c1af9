//! `re6st-registry`: the CA, prefix allocator and configuration server of a
//! re6st-rs network, and its administration commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use re6st_registry::admin_access::AdminAccess;
use re6st_registry::server::{housekeeping, now, router, AppState};
use re6st_registry::store::{InitParams, RevokeTarget, Store};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "re6st-rs registry: CA, prefix allocation, signed network configuration, revocation, bootstrap"
)]
struct Cli {
    /// The registry database (SQLite). The CA certificate and key live next to
    /// it unless `init` was told otherwise.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/re6st-registry/registry.db"
    )]
    db: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the CA and the database of a new network.
    Init(InitArgs),
    /// Serve the /v1 API.
    Serve(ServeArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registered nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Revoke a node by prefix, or one certificate by serial. Frees the
    /// prefix and adds the serials to the CRL of the signed configuration.
    Revoke {
        /// The node prefix (e.g. fd5e:2a1:77:3::/64).
        prefix: Option<String>,
        /// A certificate serial instead.
        #[arg(long, conflicts_with = "prefix")]
        serial: Option<u64>,
    },
    /// Babel HMAC keys.
    #[command(subcommand)]
    Hmac(HmacCmd),
    /// Network parameters (each change bumps the configuration version).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the CA certificate's SHA-256 fingerprint (for `re6st-conf --ca-fingerprint`).
    Fingerprint,
    /// The network map from the nodes' latest reports: each node's version,
    /// its tunnels with their RTT, the peers it could not reach directly.
    /// `serve` shows the same live at /topology.
    Topology {
        /// JSON output (what GET /v1/topology answers).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct InitArgs {
    /// The network prefix, a /8 to /120 inside fd00::/8 (e.g. fd5e:2a1:77::/48).
    #[arg(long)]
    network: String,
    /// Default node prefix length.
    #[arg(long, default_value_t = 64)]
    prefix_len: u8,
    /// Validity of node certificates, in days.
    #[arg(long, default_value_t = 365)]
    validity_days: u32,
    /// Days after expiry during which a node may still renew; then its prefix
    /// returns to the pool.
    #[arg(long, default_value_t = 100)]
    grace_days: u32,
    /// Where to write the CA key (default: ca.key next to the database).
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Where to write the CA certificate (default: ca.crt next to the database).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address and port to listen on (e.g. [::]:8443 or 127.0.0.1:8080).
    #[arg(long)]
    listen: SocketAddr,
    /// TLS certificate chain (PEM); with --tls-key, serve HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding the admin API's bearer token (at least 16 characters):
    /// every admin request must carry `Authorization: Bearer TOKEN`, from
    /// loopback too. Without it (and without --admin-loopback) the admin API
    /// is closed; the subcommands on the database still work.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Seconds a renewed node's previous certificate stays valid after the
    /// node first uses the new one (time for its peers to learn the new
    /// serial); then it goes to the CRL.
    #[arg(long, default_value_t = re6st_registry::store::SUPERSEDE_AFTER_S,
          value_parser = clap::value_parser!(i64).range(1..=30 * 86_400))]
    supersede_after: i64,
    /// Seconds between housekeeping rounds (expired prefixes and tokens,
    /// the CRL, superseded certificates, the configuration signed again).
    #[arg(long, default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    housekeeping: u64,
    /// Loopback clients are admin without a token. UNSAFE behind a reverse
    /// proxy on the same host (a TLS terminator): every client it forwards
    /// comes from loopback and would be admin.
    #[arg(long)]
    admin_loopback: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a one-time join token; prints it alone on stdout.
    Add {
        /// Free text (who it is for).
        #[arg(long)]
        comment: Option<String>,
        /// Validity, e.g. 3600, 90m, 12h, 30d [default: 7d].
        #[arg(long)]
        expires_in: Option<String>,
        /// Prefix length for the node (default: the network's).
        #[arg(long)]
        prefix_len: Option<u8>,
    },
    /// List tokens.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a token.
    Rm {
        /// The token.
        token: String,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes with prefix, serial, expiry and last contact.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum HmacCmd {
    /// One rotation step: announce a new key, switch to it, retire the old.
    Rotate,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Show the current network configuration.
    Show {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Set a parameter (hello_interval_ms, rtt_min_ms, rtt_max_ms,
    /// max_rtt_penalty, client_count, max_clients, tunnel_refresh_s, mtu,
    /// min_protocol, registry_urls).
    Set {
        /// Parameter name.
        key: String,
        /// New value.
        value: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("re6st-registry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses 3600, 90s, 90m, 12h, 7d into seconds.
fn parse_duration(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: i64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("bad duration unit in {s:?} (use s, m, h or d)"),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .with_context(|| format!("duration {s:?} must be positive and not huge"))
}

/// The map as text: a line per node, then its tunnels and broken paths.
fn topology_text(map: &re6st_registry::topology::Topology) -> String {
    let mut out = String::new();
    for n in &map.nodes {
        let age = n.reported.map_or("never reported".into(), |t| {
            format!("reported {} s ago", map.now - t)
        });
        out += &format!(
            "{} {} ({age}{})\n",
            n.prefix,
            n.version.as_deref().unwrap_or("-"),
            if n.stale { ", not seen recently" } else { "" }
        );
        for t in &n.tunnels {
            let rtt = t.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms"));
            let how = match t.transport {
                Some(re6st_registry::topology::TunnelTransport::Tcp) => " tcp",
                _ => "",
            };
            let up = if t.up { "" } else { " (no handshake)" };
            out += &format!("  tunnel {} {rtt}{how}{up}\n", t.peer);
        }
        for u in &n.unreachable {
            out += &format!("  no direct path to {u}\n");
        }
    }
    out
}

fn fmt_time(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

fn beside(db: &Path, name: &str) -> PathBuf {
    db.parent().unwrap_or(Path::new(".")).join(name)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let db = cli.db.as_path();
    match cli.command {
        Command::Init(a) => {
            let network = a
                .network
                .parse()
                .with_context(|| format!("--network {:?} is not an IPv6 prefix", a.network))?;
            if let Some(dir) = db.parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
            }
            let store = Store::init(
                db,
                &InitParams {
                    network,
                    prefix_len: a.prefix_len,
                    validity_days: a.validity_days,
                    grace_days: a.grace_days,
                    ca_cert: a.ca_cert.unwrap_or_else(|| beside(db, "ca.crt")),
                    ca_key: a.ca_key.unwrap_or_else(|| beside(db, "ca.key")),
                },
                now(),
            )?;
            println!(
                "network {} ready in {}",
                store.ca().cert().network(),
                db.display()
            );
            println!(
                "CA fingerprint (sha256): {}",
                store.ca().cert().fingerprint()
            );
        }
        Command::Serve(a) => serve(db, a)?,
        Command::Token(TokenCmd::Add {
            comment,
            expires_in,
            prefix_len,
        }) => {
            let expires = expires_in.as_deref().map(parse_duration).transpose()?;
            let token =
                Store::open(db)?.add_token(comment.as_deref(), expires, prefix_len, now())?;
            println!("{token}");
        }
        Command::Token(TokenCmd::List { json }) => {
            let tokens = Store::open(db)?.list_tokens()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!(
                    "{:<34} {:<6} {:<21} {:<21} {:<8} COMMENT",
                    "TOKEN", "PLEN", "CREATED", "EXPIRES", "USED"
                );
                for t in tokens {
                    println!(
                        "{:<34} /{:<5} {:<21} {:<21} {:<8} {}",
                        t.token,
                        t.prefix_len,
                        fmt_time(t.created),
                        t.expires.map_or("never".into(), fmt_time),
                        t.used_serial.map_or("-".into(), |s| format!("#{s}")),
                        t.comment.unwrap_or_default()
                    );
                }
            }
        }
        Command::Token(TokenCmd::Rm { token }) => Store::open(db)?.delete_token(&token)?,
        Command::Node(NodeCmd::List { json }) => {
            let nodes = Store::open(db)?.list_nodes()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!(
                    "{:<28} {:>8} {:<21} {:<21}",
                    "PREFIX", "SERIAL", "EXPIRES", "LAST SEEN"
                );
                for n in nodes {
                    println!(
                        "{:<28} {:>8} {:<21} {:<21}",
                        n.prefix,
                        n.serial,
                        fmt_time(n.not_after),
                        n.last_seen.map_or("-".into(), fmt_time)
                    );
                }
            }
        }
        Command::Topology { json } => {
            let map = Store::open(db)?.topology(now())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                print!("{}", topology_text(&map));
            }
        }
        Command::Revoke { prefix, serial } => {
            let target = match (prefix, serial) {
                (Some(p), None) => RevokeTarget::Prefix(
                    p.parse()
                        .with_context(|| format!("{p:?} is not an IPv6 prefix"))?,
                ),
                (None, Some(s)) => RevokeTarget::Serial(s),
                _ => bail!("give a prefix or --serial N"),
            };
            let revoked = Store::open(db)?.revoke(&target, now())?;
            println!("revoked serials: {revoked:?}");
        }
        Command::Hmac(HmacCmd::Rotate) => {
            let keys = Store::open(db)?.rotate_hmac(now())?;
            let phase = match (
                keys.accept.len(),
                keys.sign.id == keys.accept.iter().map(|k| k.id).max().unwrap_or(0),
            ) {
                (1, _) => "stable (one key)",
                (_, false) => "announced a new key (signing with the old one)",
                (_, true) => "switched to the new key (still accepting the old one)",
            };
            println!("HMAC key set version {}: {phase}", keys.version);
        }
        Command::Config(ConfigCmd::Show { json }) => {
            let cfg = Store::open(db)?.config()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                let v = serde_json::to_value(&cfg)?;
                if let Some(map) = v.as_object() {
                    for (k, v) in map {
                        println!("{k:<18} {v}");
                    }
                }
            }
        }
        Command::Config(ConfigCmd::Set { key, value }) => {
            let cfg = Store::open(db)?.set_param(&key, &value, now())?;
            println!("{key} set; configuration version {}", cfg.version);
        }
        Command::Fingerprint => println!("{}", Store::open(db)?.ca().cert().fingerprint()),
    }
    Ok(())
}

fn serve(db: &Path, a: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if a.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    let mut store = Store::open(db)?;
    store.set_supersede_after(a.supersede_after);
    let admin_token = match &a.admin_token_file {
        Some(f) => {
            let t =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                bail!(
                    "the admin token in {} is shorter than 16 characters",
                    f.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    let admin = match (admin_token, a.admin_loopback) {
        (token, true) => {
            tracing::warn!(
                "--admin-loopback: loopback clients are admin without a token \
                 (unsafe behind a reverse proxy on this host)"
            );
            AdminAccess::Loopback(token)
        }
        (Some(token), false) => AdminAccess::Token(token),
        (None, false) => AdminAccess::Closed,
    };
    let network = store.ca().cert().network();
    let state = AppState::new(store, admin);
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        tokio::spawn(housekeeping(state, Duration::from_secs(a.housekeeping)));
        match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                    .await
                    .with_context(|| {
                        format!("loading TLS {} / {}", cert.display(), key.display())
                    })?;
                let handle = axum_server::Handle::new();
                let h = handle.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    h.graceful_shutdown(Some(Duration::from_secs(5)));
                });
                tracing::info!(listen = %a.listen, %network, "serving HTTPS");
                axum_server::bind_rustls(a.listen, config)
                    .handle(handle)
                    .serve(app)
                    .await
                    .context("serving")?;
            }
            _ => {
                let listener = tokio::net::TcpListener::bind(a.listen)
                    .await
                    .with_context(|| format!("listening on {}", a.listen))?;
                tracing::info!(listen = %a.listen, %network, "serving HTTP");
                if !a.listen.ip().is_loopback() {
                    tracing::warn!(
                        listen = %a.listen,
                        "plain HTTP on a non-loopback address: join tokens, admin tokens and \
                         signed requests cross the network in clear; serve HTTPS \
                         (--tls-cert/--tls-key) or listen on loopback behind a TLS proxy"
                    );
                }
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown_signal())
                    .await
                    .context("serving")?;
            }
        }
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() -> anyhow::Result<()> {
        assert_eq!(parse_duration("3600")?, 3600);
        assert_eq!(parse_duration("90m")?, 5400);
        assert_eq!(parse_duration("7d")?, 604_800);
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1h").is_err());
        assert!(parse_duration("").is_err());
        Ok(())
    }
}
