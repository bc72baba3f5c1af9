//! The node agent: registers with the master, pulls the instances this node
//! must run, runs each supervised (own working directory, parameters in its
//! environment, restart with back-off, stop on destroy), runs its promises,
//! and reports status and connection parameters. It keeps running its
//! instances when the master is unreachable.
//!
//! It runs only what the master signed for this node in answer to this
//! poll (see [`crate::assignment`]), and only software its own catalogue
//! describes, at the version the master names, with the parameters checked
//! again against its own descriptor.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::Ipv6Net;
use re6st_registry::cert::CaCert;

use crate::assignment::{Assigned, AssignmentError, Expected, SignedAssignments};
use crate::catalog::Catalog;
use crate::client::MasterClient;
use crate::descriptor::{render, Descriptor, Promise};
use crate::store::Report;

/// The revoked serials now, `None` while no network configuration verified.
pub type CrlSource = Arc<dyn Fn() -> Option<Vec<u64>> + Send + Sync>;

/// Agent settings.
#[derive(Clone)]
pub struct AgentConfig {
    /// This node's name at the master.
    pub name: String,
    /// Where instance directories go.
    pub base_dir: PathBuf,
    /// The node's overlay address (the `{address}` of descriptors).
    pub address: Ipv6Addr,
    /// The node's prefix (whose assignments it accepts).
    pub node: Ipv6Net,
    /// Where the master is (the address of `--master`): assignments must be
    /// signed by the node holding it.
    pub master: Ipv6Addr,
    /// The network CA.
    pub ca: CaCert,
    /// Revocations, for the master's certificate.
    pub crl: CrlSource,
    /// What this node can run.
    pub catalog: Catalog,
    /// re6stnet's control socket, to report routing for `--near` placement.
    pub ctl_socket: Option<PathBuf>,
    /// Period of the loop.
    pub period: Duration,
}

struct PromiseState {
    promise: Promise,
    next: Instant,
    failures: u32,
    ever_ok: bool,
}

struct Running {
    generation: i64,
    descriptor: Descriptor,
    values: BTreeMap<String, String>,
    child: Option<tokio::process::Child>,
    started: Instant,
    restarts: u32,
    next_start: Instant,
    promises: Vec<PromiseState>,
    reported: Option<(String, Instant)>,
}

/// Longest wait before restarting a crashed instance.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn program(cmd: &str) -> PathBuf {
    // Our own services run from this very binary.
    if cmd == "re6st-orch" {
        if let Ok(me) = std::env::current_exe() {
            return me;
        }
    }
    PathBuf::from(cmd)
}

impl Running {
    /// Runs the descriptor's `prepare` command once per instance directory.
    fn prepare(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let marker = dir.join(".prepared");
        if self.descriptor.prepare.is_empty() || marker.exists() {
            return Ok(());
        }
        let argv: Vec<String> = self
            .descriptor
            .prepare
            .iter()
            .map(|a| render(a, &self.values))
            .collect::<Result<_, _>>()?;
        let status = std::process::Command::new(program(&argv[0]))
            .args(&argv[1..])
            .current_dir(dir)
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("running {}", argv[0]))?;
        if !status.success() {
            anyhow::bail!("prepare command {} failed ({status})", argv[0]);
        }
        std::fs::write(&marker, b"").context("marking the instance prepared")
    }

    fn start(&mut self, dir: &std::path::Path) -> anyhow::Result<()> {
        self.prepare(dir)?;
        let argv: Vec<String> = self
            .descriptor
            .command
            .iter()
            .map(|a| render(a, &self.values))
            .collect::<Result<_, _>>()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("instance.log"))
            .context("opening the instance log")?;
        let mut cmd = tokio::process::Command::new(program(&argv[0]));
        cmd.args(&argv[1..])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in &self.descriptor.env {
            cmd.env(k, render(v, &self.values)?);
        }
        for (k, v) in &self.values {
            cmd.env(format!("RE6ST_{}", k.to_ascii_uppercase()), v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        tracing::info!(pid = ?child.id(), program = %argv[0], "instance process started");
        self.child = Some(child);
        self.started = Instant::now();
        for p in &mut self.promises {
            p.next = Instant::now() + Duration::from_millis(500);
            p.failures = 0;
        }
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Restart with back-off when the process exited.
    fn supervise(&mut self, dir: &std::path::Path, now: Instant) {
        if let Some(c) = &mut self.child {
            match c.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(%status, "instance process exited");
                    self.child = None;
                    if now.duration_since(self.started) > Duration::from_secs(60) {
                        self.restarts = 0;
                    }
                    let backoff = Duration::from_secs(1) * (1u32 << self.restarts.min(5));
                    self.next_start = now + backoff.min(MAX_BACKOFF);
                    self.restarts += 1;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "checking the instance process"),
            }
        }
        if self.child.is_none() && now >= self.next_start {
            if let Err(e) = self.start(dir) {
                tracing::warn!(error = %format!("{e:#}"), "cannot start the instance");
                self.next_start = now + MAX_BACKOFF;
            }
        }
    }

    async fn run_promises(&mut self, http: &reqwest::Client, now: Instant) {
        for p in &mut self.promises {
            if now < p.next || self.child.is_none() {
                continue;
            }
            p.next = now + Duration::from_secs(p.promise.period_s);
            let ok = match (&p.promise.http, &p.promise.command) {
                (Some(url), _) => match render(url, &self.values) {
                    Ok(url) => http
                        .get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    Err(_) => false,
                },
                (None, Some(cmd)) => {
                    let argv: Result<Vec<String>, _> =
                        cmd.iter().map(|a| render(a, &self.values)).collect();
                    match argv {
                        Ok(argv) if !argv.is_empty() => {
                            let run = tokio::process::Command::new(program(&argv[0]))
                                .args(&argv[1..])
                                .stdin(Stdio::null())
                                .stdout(Stdio::null())
                                .stderr(Stdio::null())
                                .kill_on_drop(true)
                                .status();
                            matches!(
                                tokio::time::timeout(Duration::from_secs(10), run).await,
                                Ok(Ok(s)) if s.success()
                            )
                        }
                        _ => false,
                    }
                }
                (None, None) => false,
            };
            if ok {
                p.failures = 0;
                p.ever_ok = true;
            } else {
                p.failures += 1;
            }
        }
    }

    /// Reports the status when it changed, or every 10 s.
    async fn report(&mut self, name: &str, client: &MasterClient, now: Instant) {
        let status = self.status();
        let due = self
            .reported
            .as_ref()
            .is_none_or(|(s, at)| s != status || now.duration_since(*at) > Duration::from_secs(10));
        if !due {
            return;
        }
        let connection = self
            .descriptor
            .connection
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), render(v, &self.values).ok()?)))
            .collect();
        let report = Report {
            name: name.to_string(),
            generation: self.generation,
            status: status.to_string(),
            connection,
            detail: String::new(),
        };
        if client.report(&report).await.is_ok() {
            self.reported = Some((status.to_string(), now));
        }
    }

    fn status(&self) -> &'static str {
        if self.child.is_none() {
            return if self.restarts > 0 {
                "failing"
            } else {
                "starting"
            };
        }
        if self
            .promises
            .iter()
            .any(|p| p.failures >= p.promise.failures)
        {
            "failing"
        } else if self.promises.iter().all(|p| p.ever_ok)
            && self.started.elapsed() >= Duration::from_millis(500)
        {
            "ready"
        } else {
            "starting"
        }
    }
}

/// Routing as the master needs it for `--near`: metric per prefix.
fn routes(ctl: &std::path::Path) -> BTreeMap<String, u16> {
    let Ok(text) = re6stnet::ctl::fetch(ctl, "/routes") else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return BTreeMap::new();
    };
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["selected"] == serde_json::Value::Bool(true))
        .filter_map(|r| {
            Some((
                r["prefix"].as_str()?.to_string(),
                u16::try_from(r["metric"].as_u64()?).ok()?,
            ))
        })
        .collect()
}

/// Checks the master's answer to the poll with `nonce`.
fn verify(
    cfg: &AgentConfig,
    signed: &SignedAssignments,
    nonce: &str,
) -> anyhow::Result<Vec<Assigned>> {
    let crl = (cfg.crl)().context(
        "no verified network configuration yet: the master's certificate cannot be checked",
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let a = signed.verify(&Expected {
        ca: &cfg.ca,
        crl: &crl,
        now,
        master: cfg.master,
        node: cfg.node,
        nonce,
    })?;
    Ok(a.instances)
}

/// What to run for an assigned instance: its descriptor from this node's
/// catalogue, at the assigned version, and its parameters checked against
/// it. The error says why not, for the master's history.
fn prepare_run(cfg: &AgentConfig, a: &Assigned, now: Instant) -> Result<Running, String> {
    let i = &a.instance;
    let d = cfg.catalog.get(&i.software).ok_or_else(|| {
        format!(
            "software {:?} is not in this node's catalogue (it has: {})",
            i.software,
            cfg.catalog.names().join(", ")
        )
    })?;
    if d.version != a.version {
        return Err(format!(
            "software {} version {} is assigned; this node's catalogue has version {}",
            i.software, a.version, d.version
        ));
    }
    let mut values = d.resolve(&i.params).map_err(|e| e.to_string())?;
    let dir = cfg.base_dir.join(&i.name);
    values.insert("address".into(), cfg.address.to_string());
    values.insert("instance".into(), i.name.clone());
    values.insert("dir".into(), dir.to_string_lossy().into_owned());
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(Running {
        generation: i.generation,
        promises: d
            .promises
            .iter()
            .map(|p| PromiseState {
                promise: p.clone(),
                next: now,
                failures: 0,
                ever_ok: false,
            })
            .collect(),
        descriptor: d.clone(),
        values,
        child: None,
        started: now,
        restarts: 0,
        next_start: now,
        reported: None,
    })
}

/// Follows a verified assignment list: stops what was destroyed, changed
/// or dropped, prepares what is new, and reports what cannot run here.
async fn apply(
    cfg: &AgentConfig,
    client: &MasterClient,
    list: &[Assigned],
    running: &mut BTreeMap<String, Running>,
    refused: &mut BTreeMap<String, (i64, String)>,
    now: Instant,
) {
    let wanted: Vec<&str> = list.iter().map(|a| a.instance.name.as_str()).collect();
    refused.retain(|n, _| wanted.contains(&n.as_str()));
    for a in list {
        let i = &a.instance;
        if i.state == "destroyed" {
            if let Some(mut r) = running.remove(&i.name) {
                r.stop().await;
            }
            let report = Report {
                name: i.name.clone(),
                generation: i.generation,
                status: "stopped".into(),
                connection: BTreeMap::new(),
                detail: String::new(),
            };
            if client.report(&report).await.is_ok() {
                tracing::info!(instance = %i.name, "destroyed");
            }
            continue;
        }
        let stale = running
            .get(&i.name)
            .is_some_and(|r| r.generation != i.generation);
        if stale {
            if let Some(mut r) = running.remove(&i.name) {
                r.stop().await;
            }
        }
        if running.contains_key(&i.name) {
            continue;
        }
        match prepare_run(cfg, a, now) {
            Ok(r) => {
                tracing::info!(instance = %i.name, software = %i.software, generation = i.generation, "deploying");
                refused.remove(&i.name);
                running.insert(i.name.clone(), r);
            }
            Err(why) => {
                let known = refused
                    .get(&i.name)
                    .is_some_and(|(g, w)| *g == i.generation && *w == why);
                if known {
                    continue;
                }
                tracing::warn!(instance = %i.name, reason = %why, "cannot run this instance");
                let report = Report {
                    name: i.name.clone(),
                    generation: i.generation,
                    status: "failing".into(),
                    connection: BTreeMap::new(),
                    detail: why.clone(),
                };
                if client.report(&report).await.is_ok() {
                    refused.insert(i.name.clone(), (i.generation, why));
                }
            }
        }
    }
    // Instances the master no longer has: stop them.
    let gone: Vec<String> = running
        .keys()
        .filter(|n| !wanted.contains(&n.as_str()))
        .cloned()
        .collect();
    for n in gone {
        if let Some(mut r) = running.remove(&n) {
            r.stop().await;
        }
    }
}

/// Runs the agent until `shutdown`; stops every instance on the way out.
pub async fn run(
    cfg: AgentConfig,
    client: MasterClient,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.base_dir)
        .with_context(|| format!("creating {}", cfg.base_dir.display()))?;
    crate::client::install_crypto();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("HTTP client for promises")?;
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    // Assigned instances this node cannot run, with the generation and the
    // reason already reported.
    let mut refused: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let mut tick = tokio::time::interval(cfg.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_hello = Instant::now();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => break,
        }
        let now = Instant::now();
        if now >= next_hello {
            let r = cfg.ctl_socket.as_deref().map(routes).unwrap_or_default();
            match client.hello(&cfg.name, r).await {
                Ok(()) => next_hello = now + Duration::from_secs(10),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "master unreachable"),
            }
        }
        let nonce = hex::encode(re6st_registry::config::random_bytes::<16>()?);
        let verified = match client.assignments(&nonce).await {
            Ok(signed) => verify(&cfg, &signed, &nonce)
                .map_err(|e| {
                    let forged = e.downcast_ref::<AssignmentError>().is_some();
                    tracing::warn!(error = %format!("{e:#}"), forged, "refusing the master's answer: keeping instances as they are");
                })
                .ok(),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "master unreachable: keeping instances as they are");
                None
            }
        };
        if let Some(list) = verified {
            apply(&cfg, &client, &list, &mut running, &mut refused, now).await;
        }
        for (name, r) in &mut running {
            r.supervise(&cfg.base_dir.join(name), now);
            r.run_promises(&http, now).await;
            r.report(name, &client, now).await;
        }
    }
    for (_, mut r) in running {
        r.stop().await;
    }
    Ok(())
}
