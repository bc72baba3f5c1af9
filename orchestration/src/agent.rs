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
use crate::cgroup::{Cgroup, Cgroups};
use crate::client::MasterClient;
use crate::descriptor::{render, Descriptor};
use crate::instance_key;
use crate::partition::{confine, kill_all, Partition, Partitions};
use crate::plan::{plan, Refusals, Step};
use crate::store::Report;
use crate::supervision::Supervision;

/// The revoked serials now, `None` while no network configuration verified.
pub type CrlSource = Arc<dyn Fn() -> Option<Vec<u64>> + Send + Sync>;

/// Agent settings.
#[derive(Clone)]
pub struct AgentConfig {
    /// The master's URL, for instances that request child instances.
    pub master_url: String,
    /// This node's name at the master.
    pub name: String,
    /// Its site (empty: a site of its own).
    pub site: String,
    /// The serial of its certificate now (it follows renewals): once the
    /// CRL names it, the agent stops its instances and stops asking for more.
    pub serial: Arc<dyn Fn() -> u64 + Send + Sync>,
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
    /// Where instances run: partitions (own user, directory, address and
    /// cgroup each; the agent must be root), or `None` to run them as the
    /// agent's own user in `base_dir/NAME` on the node address, which only
    /// tests and development without root may do: instances can then read
    /// everything the agent can, the node key included.
    pub partitions: Option<Partitions>,
    /// Where partitions get their control groups (`None`: no limits).
    pub cgroups: Option<Cgroups>,
    /// re6stnet's control socket, to report routing for `--near` placement.
    pub ctl_socket: Option<PathBuf>,
    /// Period of the loop.
    pub period: Duration,
}

/// Where and as whom an instance runs.
struct Place {
    dir: PathBuf,
    address: Ipv6Addr,
    partition: Option<Partition>,
    cgroup: Option<Cgroup>,
}

impl Place {
    /// A command for `argv0`, started inside the partition.
    fn command(&self, argv0: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(program(argv0));
        match &self.partition {
            Some(p) => confine(
                &mut cmd,
                p,
                self.cgroup.as_ref().map_or(&[], Cgroup::procs_files),
            ),
            None => {
                cmd.current_dir(&self.dir);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Opens a file of the instance directory for appending, as root: never
    /// through a symbolic link, never blocking on a FIFO, and only a regular
    /// file with one link owned by root or the partition (not a hard link
    /// the instance made to a file of the host).
    fn append(&self, name: &str) -> anyhow::Result<std::fs::File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = self.dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let meta = f
            .metadata()
            .with_context(|| format!("checking {}", path.display()))?;
        let owner_ok =
            meta.uid() == 0 || self.partition.as_ref().is_some_and(|p| p.uid == meta.uid());
        if !meta.file_type().is_file() || meta.nlink() != 1 || !owner_ok {
            anyhow::bail!(
                "{} is not a plain file of this partition (type, links or owner): refusing to write to it",
                path.display()
            );
        }
        Ok(f)
    }

    /// Replaces a file of the instance directory, as root: written beside
    /// it (never through a symbolic link), then renamed over it. A private
    /// file is readable by the partition's user only.
    fn replace(&self, name: &str, bytes: &[u8], private: bool) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.dir.join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        if let (true, Some(p)) = (private, &self.partition) {
            std::os::unix::fs::fchown(&f, Some(p.uid), Some(p.uid))
                .with_context(|| format!("giving {} to uid {}", tmp.display(), p.uid))?;
        }
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join(name))
            .with_context(|| format!("replacing {name} in {}", self.dir.display()))
    }

    /// Kills every process of the partition.
    fn kill(&self) {
        if let Some(p) = &self.partition {
            let n = kill_all(p.uid);
            if n > 0 {
                tracing::info!(uid = p.uid, processes = n, "partition processes killed");
            }
        }
    }
}

struct Running {
    /// The instance's name.
    name: String,
    /// The master's URL (for the instance's own requests).
    master_url: String,
    place: Place,
    /// The other copies' connection parameters, as last written to
    /// `peers.json`.
    peers: Option<Vec<BTreeMap<String, String>>>,
    generation: i64,
    descriptor: Descriptor,
    values: BTreeMap<String, String>,
    /// The public half of the key made for this deployment (base64).
    public_key: String,
    child: Option<tokio::process::Child>,
    /// When to start, check and report (the decisions).
    sv: Supervision,
}

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
    fn prepare(&self) -> anyhow::Result<()> {
        let marker = self.place.dir.join(".prepared");
        if self.descriptor.prepare.is_empty() || marker.symlink_metadata().is_ok() {
            return Ok(());
        }
        let argv: Vec<String> = self
            .descriptor
            .prepare
            .iter()
            .map(|a| render(a, &self.values))
            .collect::<Result<_, _>>()?;
        let status = self
            .place
            .command(&argv[0])
            .args(&argv[1..])
            .status()
            .with_context(|| format!("running {}", argv[0]))?;
        if !status.success() {
            anyhow::bail!("prepare command {} failed ({status})", argv[0]);
        }
        self.place.append(".prepared").map(drop)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        self.prepare()?;
        let argv: Vec<String> = self
            .descriptor
            .command
            .iter()
            .map(|a| render(a, &self.values))
            .collect::<Result<_, _>>()?;
        let log = self.place.append("instance.log")?;
        let mut cmd = tokio::process::Command::from(self.place.command(&argv[0]));
        cmd.args(&argv[1..])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in &self.descriptor.env {
            cmd.env(k, render(v, &self.values)?);
        }
        for (k, v) in &self.values {
            cmd.env(format!("RE6ST_{}", k.to_ascii_uppercase()), v);
        }
        cmd.env("RE6ST_ORCH_MASTER", &self.master_url)
            .env("RE6ST_ORCH_INSTANCE", &self.name)
            .env("RE6ST_ORCH_KEY", self.place.dir.join(instance_key::FILE));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        tracing::info!(pid = ?child.id(), program = %argv[0], "instance process started");
        self.child = Some(child);
        Ok(())
    }

    /// Stops the instance's process and whatever else runs in its partition.
    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        self.place.kill();
    }

    /// Notices an exit, and starts the process when its supervision says.
    fn supervise(&mut self, now: Instant) {
        if let Some(c) = &mut self.child {
            match c.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(%status, "instance process exited");
                    self.child = None;
                    self.sv.handle_exited(now);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "checking the instance process"),
            }
        }
        if self.sv.poll_start(now) {
            match self.start() {
                Ok(()) => self.sv.handle_started(now),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot start the instance");
                    self.sv.handle_start_failed(now);
                }
            }
        }
    }

    /// Runs the promises that are due.
    async fn run_promises(&mut self, http: &reqwest::Client, now: Instant) {
        for k in self.sv.poll_checks(now) {
            let Some(p) = self.descriptor.promises.get(k) else {
                continue;
            };
            let ok = match (&p.http, &p.command) {
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
                            let run = tokio::process::Command::from(self.place.command(&argv[0]))
                                .args(&argv[1..])
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
            self.sv.handle_check(k, ok);
        }
    }

    fn write_peers(&mut self, peers: &[BTreeMap<String, String>]) {
        if self.peers.as_deref() == Some(peers) {
            return;
        }
        let written = serde_json::to_vec(peers)
            .map_err(anyhow::Error::from)
            .and_then(|b| self.place.replace("peers.json", &b, false));
        match written {
            Ok(()) => self.peers = Some(peers.to_vec()),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot write peers.json"),
        }
    }

    /// Reports the status when its supervision says.
    async fn report(&mut self, client: &MasterClient, now: Instant) {
        let Some(status) = self.sv.poll_report(now) else {
            return;
        };
        let connection = self
            .descriptor
            .connection
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), render(v, &self.values).ok()?)))
            .collect();
        let detail = self
            .sv
            .failing_promises()
            .into_iter()
            .filter_map(|(k, failures)| {
                let p = self.descriptor.promises.get(k)?;
                let what = match (&p.http, &p.command) {
                    (Some(url), _) => render(url, &self.values).unwrap_or_else(|_| url.clone()),
                    (None, Some(cmd)) => cmd.join(" "),
                    (None, None) => String::new(),
                };
                Some(format!("promise {what} failed {failures} time(s) in a row"))
            })
            .collect::<Vec<_>>()
            .join("; ");
        let report = Report {
            name: self.name.clone(),
            generation: self.generation,
            status: status.as_str().to_string(),
            connection,
            detail,
            key: self.public_key.clone(),
        };
        if client.report(&report).await.is_ok() {
            self.sv.handle_reported(status, now);
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
async fn prepare_run(cfg: &AgentConfig, a: &Assigned, now: Instant) -> Result<Running, String> {
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
    let place = place(cfg, &i.name, d).await.map_err(|e| format!("{e:#}"))?;
    let (pem, public_key) = instance_key::generate().map_err(|e| format!("{e:#}"))?;
    place
        .replace(instance_key::FILE, pem.as_bytes(), true)
        .map_err(|e| format!("{e:#}"))?;
    values.insert("address".into(), place.address.to_string());
    values.insert("instance".into(), i.name.clone());
    values.insert("dir".into(), place.dir.to_string_lossy().into_owned());
    let promises: Vec<(Duration, u32)> = d
        .promises
        .iter()
        .map(|p| (Duration::from_secs(p.period_s), p.failures))
        .collect();
    Ok(Running {
        place,
        peers: None,
        generation: i.generation,
        sv: Supervision::new(now, &promises),
        descriptor: d.clone(),
        values,
        public_key,
        name: i.name.clone(),
        master_url: cfg.master_url.clone(),
        child: None,
    })
}

/// The instance's partition: its directory, user, address on `lo` and
/// cgroup with the descriptor's limits (or, without partitions, a directory
/// under the base directory and the node address).
async fn place(cfg: &AgentConfig, name: &str, d: &Descriptor) -> anyhow::Result<Place> {
    let Some(parts) = &cfg.partitions else {
        let dir = cfg.base_dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        return Ok(Place {
            dir,
            address: cfg.address,
            partition: None,
            cgroup: None,
        });
    };
    let p = parts.open(name)?;
    re6stnet::system::add_instance_address(p.address).await?;
    let cgroup = cfg
        .cgroups
        .as_ref()
        .map(|c| c.create(p.uid, &d.limits))
        .transpose()?;
    Ok(Place {
        dir: p.dir.clone(),
        address: p.address,
        partition: Some(p),
        cgroup,
    })
}

/// Removes a destroyed instance's partition: processes, directory, cgroup
/// and address.
async fn wipe(cfg: &AgentConfig, parts: &Partitions, p: &Partition, name: &str) {
    if let Err(e) = parts.wipe(p) {
        tracing::warn!(instance = %name, error = %format!("{e:#}"), "cannot remove the partition");
    }
    if let Err(e) = re6stnet::system::remove_instance_address(p.address).await {
        tracing::warn!(instance = %name, error = %format!("{e:#}"), "cannot remove its address");
    }
    if let Some(c) = &cfg.cgroups {
        c.remove(p.uid);
    }
    tracing::info!(instance = %name, uid = p.uid, "partition removed");
}

/// Carries out the plan for a verified assignment list (`plan`).
async fn apply(
    cfg: &AgentConfig,
    client: &MasterClient,
    list: &[Assigned],
    running: &mut BTreeMap<String, Running>,
    refused: &mut Refusals,
    now: Instant,
) {
    refused.retain_assigned(list);
    let generations: BTreeMap<String, i64> = running
        .iter()
        .map(|(n, r)| (n.clone(), r.generation))
        .collect();
    for step in plan(list, &generations) {
        match step {
            Step::Remove(a) => {
                let i = &a.instance;
                if let Some(mut r) = running.remove(&i.name) {
                    r.stop().await;
                }
                remove_partition(cfg, &i.name).await;
                let report = Report {
                    name: i.name.clone(),
                    generation: i.generation,
                    status: "stopped".into(),
                    connection: BTreeMap::new(),
                    detail: String::new(),
                    key: String::new(),
                };
                if client.report(&report).await.is_ok() {
                    tracing::info!(instance = %i.name, "destroyed");
                }
            }
            Step::Stop(name) => {
                if let Some(mut r) = running.remove(&name) {
                    r.stop().await;
                }
            }
            Step::Keep(a) => {
                if let Some(r) = running.get_mut(&a.instance.name) {
                    r.write_peers(&a.peers);
                }
            }
            Step::Deploy(a) => {
                let i = &a.instance;
                match prepare_run(cfg, a, now).await {
                    Ok(mut r) => {
                        tracing::info!(instance = %i.name, software = %i.software, generation = i.generation, "deploying");
                        refused.clear(&i.name);
                        r.write_peers(&a.peers);
                        running.insert(i.name.clone(), r);
                    }
                    Err(why) if refused.is_new(&i.name, i.generation, &why) => {
                        tracing::warn!(instance = %i.name, reason = %why, "cannot run this instance");
                        let report = Report {
                            name: i.name.clone(),
                            generation: i.generation,
                            status: "failing".into(),
                            connection: BTreeMap::new(),
                            detail: why.clone(),
                            key: String::new(),
                        };
                        if client.report(&report).await.is_ok() {
                            refused.reported(&i.name, i.generation, why);
                        }
                    }
                    Err(_) => {}
                }
            }
            Step::WipeUnassigned => {
                let Some(parts) = &cfg.partitions else {
                    continue;
                };
                let leftover: Vec<(String, Partition)> = parts
                    .existing()
                    .into_iter()
                    .flatten()
                    .filter(|(n, _)| !list.iter().any(|a| a.instance.name == *n))
                    .collect();
                for (n, p) in leftover {
                    wipe(cfg, parts, &p, &n).await;
                }
            }
        }
    }
}

/// Removes the partition of `name` if there is one.
async fn remove_partition(cfg: &AgentConfig, name: &str) {
    let Some(parts) = &cfg.partitions else {
        return;
    };
    if let Some(p) = parts.existing().ok().and_then(|mut e| e.remove(name)) {
        wipe(cfg, parts, &p, name).await;
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
    if let Some(parts) = &cfg.partitions {
        // Processes left by an agent that was killed: start afresh.
        for (name, p) in parts.existing()? {
            let n = kill_all(p.uid);
            if n > 0 {
                tracing::info!(instance = %name, processes = n, "killed what an earlier agent left running");
            }
        }
    }
    crate::client::install_crypto();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("HTTP client for promises")?;
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut refused = Refusals::default();
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
        let serial = (cfg.serial)();
        if (cfg.crl)().is_some_and(|crl| crl.contains(&serial)) {
            if !running.is_empty() {
                tracing::error!(
                    serial,
                    "this node's certificate is revoked: stopping its instances"
                );
            }
            for (_, mut r) in std::mem::take(&mut running) {
                r.stop().await;
            }
            continue;
        }
        if now >= next_hello {
            let r = cfg.ctl_socket.as_deref().map(routes).unwrap_or_default();
            match client.hello(&cfg.name, &cfg.site, r).await {
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
        for r in running.values_mut() {
            r.supervise(now);
            r.run_promises(&http, now).await;
            r.report(&client, now).await;
        }
    }
    for (_, mut r) in running {
        r.stop().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_writes_only_plain_files_in_a_partition() {
        let dir = std::env::temp_dir().join(format!("orch-place-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let place = Place {
            dir: dir.clone(),
            address: Ipv6Addr::LOCALHOST,
            partition: None,
            cgroup: None,
        };
        assert!(place.append("instance.log").is_ok(), "a new file");
        // A FIFO would block the agent's loop; a hard link would make root
        // write (and hand the instance) a file of the host.
        let fifo = std::ffi::CString::new(dir.join("fifo").to_string_lossy().into_owned())
            .unwrap_or_default();
        // SAFETY: mkfifo on a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(place.append("fifo").is_err());
        std::fs::write(dir.join("host-file"), "x").unwrap_or_else(|e| panic!("{e}"));
        std::fs::hard_link(dir.join("host-file"), dir.join("linked"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(place.append("linked").is_err());
        std::os::unix::fs::symlink(dir.join("host-file"), dir.join("sym"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(place.append("sym").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
