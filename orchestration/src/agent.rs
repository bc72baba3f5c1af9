//! The node agent: registers with the master, pulls the instances this node
//! must run, runs each supervised (own working directory, parameters in its
//! environment, restart with back-off, stop on destroy), runs its promises,
//! and reports status and connection parameters. It keeps running its
//! instances when the master is unreachable.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::MasterClient;
use crate::descriptor::{render, Descriptor, Promise};
use crate::master::Report;

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name at the master.
    pub name: String,
    /// Where instance directories go.
    pub base_dir: PathBuf,
    /// The node's overlay address (the `{address}` of descriptors).
    pub address: Ipv6Addr,
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
        match client.assignments().await {
            Ok(list) => {
                let wanted: Vec<String> = list.iter().map(|a| a.instance.name.clone()).collect();
                for a in list {
                    let i = a.instance;
                    let dir = cfg.base_dir.join(&i.name);
                    if i.state == "destroyed" {
                        if let Some(mut r) = running.remove(&i.name) {
                            r.stop().await;
                        }
                        let report = Report {
                            name: i.name.clone(),
                            generation: i.generation,
                            status: "stopped".into(),
                            connection: BTreeMap::new(),
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
                    if !running.contains_key(&i.name) {
                        let d = match Descriptor::parse(&a.descriptor) {
                            Ok(d) => d,
                            Err(e) => {
                                tracing::warn!(instance = %i.name, error = %e, "bad descriptor");
                                continue;
                            }
                        };
                        if let Err(e) = std::fs::create_dir_all(&dir) {
                            tracing::warn!(instance = %i.name, error = %e, "cannot create its directory");
                            continue;
                        }
                        let mut values = i.params.clone();
                        values.insert("address".into(), cfg.address.to_string());
                        values.insert("instance".into(), i.name.clone());
                        values.insert("dir".into(), dir.to_string_lossy().into_owned());
                        tracing::info!(instance = %i.name, software = %i.software, generation = i.generation, "deploying");
                        running.insert(
                            i.name.clone(),
                            Running {
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
                                descriptor: d,
                                values,
                                child: None,
                                started: now,
                                restarts: 0,
                                next_start: now,
                                reported: None,
                            },
                        );
                    }
                }
                // Instances the master no longer has: stop them.
                let gone: Vec<String> = running
                    .keys()
                    .filter(|n| !wanted.contains(n))
                    .cloned()
                    .collect();
                for n in gone {
                    if let Some(mut r) = running.remove(&n) {
                        r.stop().await;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "master unreachable: keeping instances as they are")
            }
        }
        for (name, r) in &mut running {
            let dir = cfg.base_dir.join(name);
            r.supervise(&dir, now);
            r.run_promises(&http, now).await;
            let status = r.status();
            let due = r.reported.as_ref().is_none_or(|(s, at)| {
                s != status || now.duration_since(*at) > Duration::from_secs(10)
            });
            if due {
                let connection = r
                    .descriptor
                    .connection
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), render(v, &r.values).ok()?)))
                    .collect();
                let report = Report {
                    name: name.clone(),
                    generation: r.generation,
                    status: status.to_string(),
                    connection,
                };
                if client.report(&report).await.is_ok() {
                    r.reported = Some((status.to_string(), now));
                }
            }
        }
    }
    for (_, mut r) in running {
        r.stop().await;
    }
    Ok(())
}
