//! `re6st-orch`: orchestration over the overlay. `master` keeps who asked
//! for what; `agent` runs it on each node; `request`, `list`, `show`,
//! `destroy` and `node add` are for operators; `serve-static` and `kv` are
//! two small services the shipped descriptors run.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use re6st_orchestration::catalog::Catalog;
use re6st_orchestration::client::{Credentials, MasterClient};
use re6st_orchestration::crl_source::LastVerifiedCrl;
use re6st_orchestration::identity::LiveIdentity;
use re6st_orchestration::master::{self, Master, RequestBody};
use re6st_orchestration::store::Store;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "re6st-rs orchestration: a master that records requests, agents that deploy them, all over the overlay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct Who {
    /// The master's URL (http://[overlay address]:port).
    #[arg(long, env = "RE6ST_ORCH_MASTER", default_value = "http://[::1]:7080")]
    master: String,
    /// The operator token (the master's --admin-token-file). A node's own
    /// identity is not enough: members are not operators.
    #[arg(long, default_value = "/etc/re6st-orch/admin.token")]
    admin_token_file: PathBuf,
    /// Act as this instance (inside a partition, the agent sets it): it
    /// may request child instances, and read and destroy what it requested.
    #[arg(long, env = "RE6ST_ORCH_INSTANCE", requires = "instance_key")]
    instance: Option<String>,
    /// The instance's key (the agent writes it into the partition).
    #[arg(long, env = "RE6ST_ORCH_KEY", requires = "instance")]
    instance_key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the master (state in SQLite; listens only on an overlay address).
    Master {
        /// Address and port, e.g. [fd5e:5e:0:1::1]:7080 (must be an overlay address).
        #[arg(long)]
        listen: SocketAddr,
        /// SQLite database.
        #[arg(long, default_value = "/var/lib/re6st-orch/master.db")]
        db: PathBuf,
        /// Directory of service descriptors (*.toml), loaded at start.
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// This node's re6st-conf directory: the CA that signs callers, and
        /// the node key that signs assignments.
        #[arg(long, default_value = "/etc/re6stnet")]
        dir: PathBuf,
        /// The network configuration re6stnet keeps (its CRL is enforced).
        #[arg(long, default_value = "/var/lib/re6stnet/network.json")]
        network_config: PathBuf,
        /// File with a bearer token for operators.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Accept a --listen address outside the overlay.
        #[arg(long)]
        allow_underlay: bool,
        /// Seconds an agent may stay silent before its copies are re-placed
        /// on another site.
        #[arg(long, default_value_t = 60)]
        agent_timeout: u32,
    },
    /// Run the agent of this node (as root: each instance runs in its own
    /// partition: user, directory, address and cgroup).
    Agent {
        /// The master's URL (http://[overlay address]:port).
        #[arg(long)]
        master: String,
        /// This node's name at the master.
        #[arg(long)]
        name: String,
        /// This node's site: `request --copies N` puts each copy on another
        /// site. Default: the node is a site of its own.
        #[arg(long, default_value = "")]
        site: String,
        /// This node's re6st-conf directory.
        #[arg(long, default_value = "/etc/re6stnet")]
        dir: PathBuf,
        /// The software this node runs: a directory of descriptors (*.toml).
        /// Assignments name software from it; nothing else runs.
        #[arg(long, default_value = "/usr/local/share/re6st-orch/catalog")]
        catalog: PathBuf,
        /// The network configuration re6stnet keeps (its CRL is checked
        /// against the master's certificate).
        #[arg(long, default_value = "/var/lib/re6stnet/network.json")]
        network_config: PathBuf,
        /// Where instance directories go.
        #[arg(long, default_value = "/var/lib/re6st-orch/instances")]
        state: PathBuf,
        /// re6stnet's control socket (routing for --near placement).
        #[arg(long, default_value = "/run/re6stnet/ctl.sock")]
        ctl_socket: PathBuf,
        /// Loop period in milliseconds.
        #[arg(long, default_value_t = 1000)]
        period_ms: u64,
        /// First uid of the partition users (one per instance, no login
        /// entry; the default lies above systemd's container range).
        #[arg(long, default_value_t = re6st_orchestration::partition::DEFAULT_UID_BASE)]
        uid_base: u32,
        /// Number of partitions (instances this node can run at once).
        #[arg(long, default_value_t = re6st_orchestration::partition::DEFAULT_COUNT)]
        partitions: u32,
    },
    /// Request an instance (idempotent): prints its state and connection parameters.
    Request {
        /// Software (descriptor name).
        software: String,
        /// Instance name.
        name: String,
        /// Parameter KEY=VALUE (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        /// Place it on this node.
        #[arg(long, conflicts_with = "near")]
        node: Option<String>,
        /// Place it on the node closest (route metric) to this prefix.
        #[arg(long)]
        near: Option<String>,
        /// Run N copies, each on another site (agents' --site); a copy whose
        /// agent goes silent is re-placed on a site without one. Given for an
        /// existing group, it grows or shrinks to N (none: unchanged).
        #[arg(long, conflicts_with_all = ["node", "near"])]
        copies: Option<u32>,
        /// Wait until it is ready.
        #[arg(long)]
        wait: bool,
        /// Longest wait, seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[command(flatten)]
        who: Who,
    },
    /// List instances.
    List {
        #[command(flatten)]
        who: Who,
    },
    /// List the nodes whose agents registered.
    Nodes {
        #[command(flatten)]
        who: Who,
    },
    /// Show an instance and its status history.
    Show {
        /// Instance name.
        name: String,
        #[command(flatten)]
        who: Who,
    },
    /// Destroy an instance.
    Destroy {
        /// Instance name.
        name: String,
        #[command(flatten)]
        who: Who,
    },
    /// Nodes: `node add NAME` gets a join token and prints how to enrol the node.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Serve a directory over HTTP (a shipped service).
    ServeStatic {
        /// Address and port.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory to serve.
        #[arg(long)]
        root: PathBuf,
    },
    /// A small key-value store over HTTP: GET/PUT /KEY (a shipped service).
    Kv {
        /// Address and port.
        #[arg(long)]
        listen: SocketAddr,
        /// JSON file holding the data.
        #[arg(long)]
        data: PathBuf,
        /// The other copies' connection parameters (JSON, kept by the
        /// agent): pull their entries every second.
        #[arg(long)]
        peers: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Get a join token for NAME from the registry and print the enrolment commands.
    Add {
        /// The new node's name.
        name: String,
        /// Registry URL.
        #[arg(long)]
        registry: String,
        /// The registry's admin token file (`serve --admin-token-file`); not
        /// needed on the registry's host if it runs with --admin-loopback.
        #[arg(long)]
        registry_token_file: Option<PathBuf>,
        /// The master URL to put in the printed agent command.
        #[arg(long, default_value = "http://[MASTER]:7080")]
        master: String,
    },
}

fn client(who: &Who) -> anyhow::Result<MasterClient> {
    if let (Some(name), Some(key)) = (&who.instance, &who.instance_key) {
        let key = re6st_orchestration::instance_key::load(key)?;
        return MasterClient::new(
            &who.master,
            Credentials::Instance(name.clone(), Box::new(key)),
        );
    }
    let f = &who.admin_token_file;
    let token = std::fs::read_to_string(f)
        .with_context(|| format!("reading the operator token {}", f.display()))?;
    MasterClient::new(&who.master, Credentials::Admin(token.trim().to_string()))
}

/// The IPv6 address in a master URL (`http://[ADDRESS]:PORT`): the agent
/// accepts assignments only from the node whose prefix holds it.
fn master_address(url: &str) -> anyhow::Result<std::net::Ipv6Addr> {
    let host = url
        .split_once("://")
        .and_then(|(_, rest)| rest.strip_prefix('['))
        .and_then(|rest| rest.split_once(']'))
        .map(|(host, _)| host);
    host.and_then(|h| h.parse().ok()).with_context(|| {
        format!("--master {url:?}: expected http://[OVERLAY ADDRESS]:PORT (the master is named by its overlay address)")
    })
}

fn print_instance(i: &re6st_orchestration::store::Instance) {
    use re6st_orchestration::owner::Requester;
    let by = match &i.requester {
        Requester::Operator => String::new(),
        r => format!(" requested by {r}"),
    };
    println!(
        "{} ({} on {}): {} [{}]{by}",
        i.name, i.software, i.node, i.status, i.state
    );
    for (k, v) in &i.connection {
        println!("  {k} = {v}");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Master {
            listen,
            db,
            catalog,
            dir,
            network_config,
            admin_token_file,
            allow_underlay,
            agent_timeout,
        } => {
            let live = LiveIdentity::from_dir(&dir)?;
            let identity = live.current();
            let ca = identity.ca.clone();
            let own = match listen.ip() {
                IpAddr::V6(a) => identity.cert.prefix.contains(&a),
                IpAddr::V4(_) => false,
            };
            if !own && !allow_underlay {
                bail!(
                    "--listen {listen} is not an overlay address of this node (inside {}); the master must only be reachable over the overlay, and agents accept assignments only from the node holding the master's address (--allow-underlay to override)",
                    identity.cert.prefix
                );
            }
            if let Some(parent) = db.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let mut store = Store::open(&db)?;
            if let Some(c) = &catalog {
                for (name, text) in Catalog::load(c)?.texts() {
                    store.add_software(text)?;
                    tracing::info!(software = %name, "catalogue");
                }
            }
            let admin = admin_token_file
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))
                        .map(|t| t.trim().to_string())
                })
                .transpose()?;
            let source = LastVerifiedCrl::new(network_config, ca);
            let crl = Box::new(move || source.current());
            let m = Master::new(store, live, crl, admin, i64::from(agent_timeout));
            let watcher = m.clone();
            tokio::spawn(async move {
                let period =
                    Duration::from_secs((watcher.agent_timeout_s() as u64 / 4).clamp(1, 15));
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    for (copy, from, to) in watcher.replace_lost_copies() {
                        tracing::warn!(%copy, %from, %to, "copy re-placed: its agent was silent");
                    }
                }
            });
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(%listen, "master listening");
            axum::serve(
                listener,
                master::router(m).into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(re6stnet::shutdown_signal())
            .await
            .context("serving")?;
            Ok(())
        }
        Cmd::Agent {
            master,
            name,
            site,
            dir,
            catalog,
            network_config,
            state,
            ctl_socket,
            period_ms,
            uid_base,
            partitions,
        } => {
            let master_address = master_address(&master)?;
            let catalog = Catalog::load(&catalog)?;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the agent must run as root: it runs each instance as its own user, in its own directory, address and cgroup");
            }
            let live = Arc::new(LiveIdentity::from_dir(&dir)?);
            let identity = live.current();
            let parts = re6st_orchestration::partition::Partitions::new(
                &state,
                uid_base,
                partitions,
                identity.cert.prefix,
            )?;
            let source = LastVerifiedCrl::new(network_config, identity.ca.clone());
            let cfg = re6st_orchestration::agent::AgentConfig {
                master_url: master.clone(),
                name,
                site,
                serial: {
                    let live = Arc::clone(&live);
                    Arc::new(move || live.current().cert.serial)
                },
                base_dir: state,
                address: identity.cert.address,
                node: identity.cert.prefix,
                master: master_address,
                ca: identity.ca.clone(),
                crl: Arc::new(move || source.current()),
                catalog,
                partitions: Some(parts),
                cgroups: match re6st_orchestration::cgroup::Cgroups::setup() {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "instance limits (cpu, memory, pids) are not applied");
                        None
                    }
                },
                ctl_socket: Some(ctl_socket),
                period: Duration::from_millis(period_ms.max(100)),
            };
            let client = MasterClient::new(&master, Credentials::Node(live))?;
            re6st_orchestration::agent::run(cfg, client, re6stnet::shutdown_signal()).await
        }
        Cmd::Request {
            software,
            name,
            params,
            node,
            near,
            copies,
            wait,
            timeout,
            who,
        } => {
            let c = client(&who)?;
            let mut map = BTreeMap::new();
            for p in params {
                let (k, v) = p
                    .split_once('=')
                    .with_context(|| format!("--param {p:?}: expected KEY=VALUE"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let body = RequestBody {
                name: name.clone(),
                software,
                params: map,
                node,
                near,
                copies,
            };
            let mut i = c.request(&body).await?;
            let start = Instant::now();
            while wait && i.status != "ready" {
                if start.elapsed() > Duration::from_secs(timeout) {
                    print_instance(&i);
                    bail!("{name} is not ready after {timeout} s");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                i = c.request(&body).await?;
            }
            print_instance(&i);
            Ok(())
        }
        Cmd::List { who } => {
            for i in client(&who)?.list().await? {
                print_instance(&i);
            }
            Ok(())
        }
        Cmd::Nodes { who } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for n in client(&who)?.nodes().await? {
                println!(
                    "{} {} site={} instances={} seen {} s ago{}",
                    n.name,
                    n.prefix,
                    n.site,
                    n.instances,
                    now - n.last_seen,
                    if n.revoked { " REVOKED" } else { "" }
                );
            }
            Ok(())
        }
        Cmd::Show { name, who } => {
            let v = client(&who)?.show(&name).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Destroy { name, who } => {
            let i = client(&who)?.destroy(&name).await?;
            println!("{}: destroy requested on {}", i.name, i.node);
            Ok(())
        }
        Cmd::Node {
            cmd:
                NodeCmd::Add {
                    name,
                    registry,
                    registry_token_file,
                    master,
                },
        } => node_add(&name, &registry, registry_token_file.as_deref(), &master).await,
        Cmd::ServeStatic { listen, root } => serve_static(listen, root).await,
        Cmd::Kv {
            listen,
            data,
            peers,
        } => re6st_orchestration::kv::serve(listen, data, peers, re6stnet::shutdown_signal()).await,
    }
}

async fn node_add(
    name: &str,
    registry: &str,
    token_file: Option<&Path>,
    master: &str,
) -> anyhow::Result<()> {
    re6st_orchestration::client::install_crypto();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = registry.trim_end_matches('/');
    let ca: serde_json::Value = http
        .get(format!("{base}/v1/ca"))
        .send()
        .await
        .with_context(|| format!("reaching the registry at {base}"))?
        .json()
        .await?;
    let mut req = http
        .post(format!("{base}/v1/admin/tokens"))
        .json(&serde_json::json!({"comment": name}));
    if let Some(f) = token_file {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        req = req.header("authorization", format!("Bearer {}", t.trim()));
    }
    let resp = req.send().await.context("asking for a token")?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "the registry refused: {} ({status})",
            v["detail"].as_str().unwrap_or("?")
        );
    }
    let token = v["token"].as_str().context("no token in the answer")?;
    let fp = ca["fingerprint"].as_str().unwrap_or("");
    println!("# on the new node {name}, as root:");
    println!(
        "re6st-conf --registry {base} --token {token} --ca-fingerprint {fp} --dir /etc/re6stnet"
    );
    println!("re6stnet --config /etc/re6stnet/re6stnet.toml &");
    println!("re6st-orch agent --master {master} --name {name}");
    Ok(())
}

/// Serves a shipped service until SIGINT or SIGTERM.
async fn serve(listen: SocketAddr, app: axum::Router) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    axum::serve(l, app)
        .with_graceful_shutdown(re6stnet::shutdown_signal())
        .await
        .context("serving")
}

async fn serve_static(listen: SocketAddr, root: PathBuf) -> anyhow::Result<()> {
    use axum::extract::Path as UrlPath;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use re6st_orchestration::static_files::resolve;
    let root = Arc::new(
        std::fs::canonicalize(&root).with_context(|| format!("--root {}", root.display()))?,
    );
    let get_file = move |path: Option<UrlPath<String>>| {
        let root = Arc::clone(&root);
        async move {
            let rel = path.map(|UrlPath(p)| p).unwrap_or_default();
            let Some(p) = resolve(&root, &rel) else {
                return (StatusCode::NOT_FOUND, Vec::new()).into_response();
            };
            if p.is_dir() {
                let mut names: Vec<String> = std::fs::read_dir(&p)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| !n.starts_with('.'))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                return (StatusCode::OK, names.join("\n").into_bytes()).into_response();
            }
            match std::fs::read(&p) {
                Ok(b) => (StatusCode::OK, b).into_response(),
                Err(_) => (StatusCode::NOT_FOUND, Vec::new()).into_response(),
            }
        }
    };
    let g2 = get_file.clone();
    let app = axum::Router::new()
        .route("/", axum::routing::get(move || g2(None)))
        .route(
            "/{*path}",
            axum::routing::get(move |p: UrlPath<String>| get_file(Some(p))),
        );
    serve(listen, app).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match re6stnet::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("re6st-orch: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("re6st-orch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
