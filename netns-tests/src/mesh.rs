//! A whole re6st-rs network in namespaces: a registry host and nodes, each
//! enrolled with `re6st-conf` and running `re6stnet`, with helpers to read
//! their control API and to check overlay reachability. Used by the
//! end-to-end tests, the demo and the mesh benchmarks.

use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::net::{Host, Net};
use crate::probe::{wait_until, LossProbe};
use crate::process::Process;
use crate::topology::Topology;

/// A random Internet between nodes `n1..nN` (and a registry host `reg`
/// 10 ms from everyone): what the demo, the mesh benchmark and the tests
/// build.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// Node names, `n1..nN`.
    pub names: Vec<String>,
    /// One-way delay between two nodes, ms.
    pub delay: Vec<Vec<u64>>,
    /// Whether the direct path between two nodes is blackholed.
    pub broken: Vec<Vec<bool>>,
}

/// A topology of `n` nodes and `reg` with one-way delays drawn in `delay_ms`
/// and a share `broken` of the node-to-node paths blackholed (seeded); a
/// share above 0 breaks at least one path, so the mesh always has a broken
/// path to route around.
pub fn random_topology(
    tag: &str,
    n: usize,
    seed: u64,
    delay_ms: std::ops::RangeInclusive<u64>,
    broken: f64,
) -> (Topology, Matrix) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let mut m = Matrix {
        delay: vec![vec![0; n]; n],
        broken: vec![vec![false; n]; n],
        names,
    };
    for i in 0..n {
        for j in i + 1..n {
            let d = rng.u64(delay_ms.clone());
            let b = rng.f64() < broken;
            (m.delay[i][j], m.delay[j][i]) = (d, d);
            (m.broken[i][j], m.broken[j][i]) = (b, b);
        }
    }
    let none = m.broken.iter().all(|row| row.iter().all(|b| !b));
    if broken > 0.0 && n >= 2 && none {
        let i = rng.usize(..n);
        let j = (i + 1 + rng.usize(..n - 1)) % n;
        (m.broken[i][j], m.broken[j][i]) = (true, true);
    }
    let mut t = Topology::new(tag);
    t.host("reg");
    for name in &m.names {
        t.host(name);
    }
    t.default_wan(crate::LinkParams::delay_ms(10));
    for i in 0..n {
        for j in i + 1..n {
            t.wan_both(
                &m.names[i],
                &m.names[j],
                crate::LinkParams::delay_ms(m.delay[i][j]).with_blackhole(m.broken[i][j]),
            );
        }
    }
    (t, m)
}

/// Registry port in tests.
pub const REGISTRY_PORT: u16 = 8080;

/// One node of the mesh.
#[derive(Debug)]
pub struct Node {
    /// Host name.
    pub name: String,
    /// Its configuration directory (keys, certificate, re6stnet.toml).
    pub dir: PathBuf,
    /// Its control socket (reachable from the test: unix sockets are files).
    pub ctl: PathBuf,
    /// Its prefix.
    pub prefix: String,
    /// Its overlay address.
    pub address: Ipv6Addr,
    /// The running daemon.
    pub process: Option<Process>,
    /// Extra flags of its daemon.
    pub flags: Vec<String>,
    /// The daemon's binary (`re6stnet`) and the arguments before the
    /// settings (a misbehaving member runs `r6t-rogue node`).
    pub command: Vec<String>,
}

/// A registry and nodes in a built network.
#[derive(Debug)]
pub struct Mesh {
    /// Nodes, in the order given.
    pub nodes: Vec<Node>,
    /// The registry's database (for admin commands from the test).
    pub db: PathBuf,
    /// The registry URL as nodes use it.
    pub url: String,
    /// File with the registry's admin bearer token.
    pub admin_token: PathBuf,
    /// The CA's fingerprint, which nodes pin when they enrol.
    ca_fingerprint: String,
    registry: Option<Process>,
    registry_host: String,
    // Last: the network goes after the processes.
    /// The network.
    pub net: Net,
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_bin(bin: &str, args: &[&str]) -> Result<String> {
    let path = crate::binary(bin)?;
    let o = std::process::Command::new(&path)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("running {bin}"), e))?;
    if !o.status.success() {
        return Err(Error::Measure(format!(
            "{bin} {}: {}",
            args.join(" "),
            out_text(&o).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

impl Mesh {
    /// Builds `topology`, starts a registry for `network` on
    /// `registry_host`, sets the given network parameters, enrols `nodes`
    /// and starts them (all at once) with `flags`.
    pub fn start(
        topology: &Topology,
        registry_host: &str,
        nodes: &[&str],
        params: &[(&str, &str)],
        flags: &[&str],
    ) -> Result<Self> {
        Self::start_with_init(topology, registry_host, nodes, &[], &[], params, flags)
    }

    /// [`Mesh::start`] with more `re6st-registry init` and `serve` flags.
    pub fn start_with_init(
        topology: &Topology,
        registry_host: &str,
        nodes: &[&str],
        init: &[&str],
        serve: &[&str],
        params: &[(&str, &str)],
        flags: &[&str],
    ) -> Result<Self> {
        crate::netns::require_tool("ping")?;
        let net = Net::build(topology)?;
        let base = net.log_dir().to_path_buf();
        let db = base.join("registry.db");
        let dbs = db.to_string_lossy().into_owned();
        let mut args = vec!["--db", &dbs, "init", "--network", "fd5e:5e::/48"];
        args.extend_from_slice(init);
        run_bin("re6st-registry", &args)?;
        for (k, v) in params {
            run_bin("re6st-registry", &["--db", &dbs, "config", "set", k, v])?;
        }
        let reg = net.host(registry_host)?;
        let reg_addr = reg.addr(false)?;
        let url = format!("http://{reg_addr}:{REGISTRY_PORT}");
        let bin = crate::binary("re6st-registry")?;
        let listen = format!("{reg_addr}:{REGISTRY_PORT}");
        let admin_token = base.join("registry-admin.token");
        std::fs::write(&admin_token, "registry-admin-secret\n")
            .map_err(|e| Error::io("writing the registry's admin token", e))?;
        let token_file = admin_token.to_string_lossy().into_owned();
        let mut serve_args = vec![
            "--db",
            &dbs,
            "serve",
            "--listen",
            &listen,
            "--admin-token-file",
            &token_file,
        ];
        serve_args.extend_from_slice(serve);
        let registry = reg.spawn("registry", &bin.to_string_lossy(), &serve_args)?;
        let ca = std::fs::read_to_string(base.join("ca.crt"))
            .map_err(|e| Error::io("reading the registry's CA", e))?;
        let ca_fingerprint = re6st_registry::cert::CaCert::from_pem(&ca)
            .map_err(|e| Error::Measure(format!("the registry's CA: {e}")))?
            .fingerprint();
        let mut mesh = Self {
            nodes: Vec::new(),
            admin_token,
            ca_fingerprint,
            db,
            url,
            registry: Some(registry),
            registry_host: registry_host.to_string(),
            net,
        };
        mesh.wait_registry()?;
        for name in nodes {
            mesh.enrol(name, flags)?;
        }
        for i in 0..mesh.nodes.len() {
            mesh.start_node(i)?;
        }
        Ok(mesh)
    }

    fn wait_registry(&self) -> Result<()> {
        let reg = self.net.host(&self.registry_host)?;
        let url = format!("{}/v1/ca", self.url);
        let probe = format!(
            "exec 3<>/dev/tcp/{}/{REGISTRY_PORT} && printf 'GET /v1/ca HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 12 <&3",
            reg.addr(false)?
        );
        wait_until(
            &format!("the registry at {url}"),
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                reg.output("bash", &["-c", &probe])
                    .ok()
                    .filter(|o| String::from_utf8_lossy(&o.stdout).contains("200"))
            },
        )
        .map(|_| ())
    }

    /// Admin command on the registry's database.
    pub fn registry_cmd(&self, args: &[&str]) -> Result<String> {
        let db = self.db.to_string_lossy().into_owned();
        let mut all = vec!["--db", db.as_str()];
        all.extend_from_slice(args);
        run_bin("re6st-registry", &all)
    }

    /// Stops the registry (the mesh must keep working).
    pub fn stop_registry(&mut self) -> Result<()> {
        if let Some(mut p) = self.registry.take() {
            p.stop()?;
        }
        Ok(())
    }

    /// Enrols one more node `name` with a fresh token (not started: see
    /// [`Mesh::start_node`]); its daemon gets `flags`.
    pub fn enrol(&mut self, name: &str, flags: &[&str]) -> Result<()> {
        let token = self
            .registry_cmd(&["token", "add", "--comment", name])?
            .trim()
            .to_string();
        let dir = self.net.log_dir().join(name);
        let token_file = self.net.log_dir().join(format!("{name}.token"));
        std::fs::write(&token_file, &token)
            .map_err(|e| Error::io(format!("writing {name}'s token"), e))?;
        let host = self.net.host(name)?;
        let conf = crate::binary("re6st-conf")?;
        let o = host.output(
            &conf.to_string_lossy(),
            &[
                "--registry",
                &self.url,
                "--token-file",
                &token_file.to_string_lossy(),
                "--ca-fingerprint",
                &self.ca_fingerprint,
                "--dir",
                &dir.to_string_lossy(),
            ],
        )?;
        if !o.status.success() {
            return Err(Error::Measure(format!(
                "re6st-conf in {name}: {}",
                out_text(&o).trim()
            )));
        }
        let cert = std::fs::read_to_string(dir.join("node.crt"))
            .map_err(|e| Error::io(format!("{name}'s certificate"), e))?;
        let ca = std::fs::read_to_string(dir.join("ca.crt"))
            .map_err(|e| Error::io(format!("{name}'s CA"), e))?;
        let c = re6st_registry::cert::CaCert::from_pem(&ca)
            .and_then(|ca| ca.verify_node(&cert, None))
            .map_err(|e| Error::Measure(format!("{name}'s certificate: {e}")))?;
        self.nodes.push(Node {
            name: name.to_string(),
            ctl: dir.join("ctl.sock"),
            dir,
            prefix: c.prefix.to_string(),
            address: c.address,
            process: None,
            flags: flags.iter().map(ToString::to_string).collect(),
            command: vec!["re6stnet".into()],
        });
        Ok(())
    }

    /// Index of a node by name.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| Error::NoSuch {
                kind: "node",
                name: name.to_string(),
            })
    }

    /// The host of node `i`.
    pub fn host(&self, i: usize) -> Result<&Host> {
        self.net.host(&self.nodes[i].name)
    }

    /// Starts (or restarts) node `i`'s daemon.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let program = n.command.first().map_or("re6stnet", String::as_str);
        let bin = crate::binary(program)?;
        let dir = n.dir.to_string_lossy().into_owned();
        let mut args: Vec<String> = n.command.iter().skip(1).cloned().collect();
        args.extend([
            "--config".into(),
            format!("{dir}/re6stnet.toml"),
            "--state-dir".into(),
            format!("{dir}/state"),
            "--ctl-socket".into(),
            n.ctl.to_string_lossy().into_owned(),
        ]);
        args.extend(n.flags.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self
            .net
            .host(&n.name)?
            .spawn("re6stnet", &bin.to_string_lossy(), &args)?;
        self.nodes[i].process = Some(p);
        Ok(())
    }

    /// Stops node `i` cleanly (SIGTERM); returns whether it exited with 0.
    pub fn stop_node(&mut self, i: usize) -> Result<bool> {
        match self.nodes[i].process.take() {
            Some(mut p) => Ok(p.stop()?.success()),
            None => Ok(true),
        }
    }

    /// Kills node `i` (SIGKILL: a crash).
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// The PID of node `i`'s daemon, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].process.as_ref().map(Process::pid)
    }

    /// Starts a loss-window probe from node `i` to node `j`'s overlay
    /// address (the routes' preferred source makes it leave from `i`'s
    /// overlay address).
    pub fn loss_probe(&self, i: usize, j: usize, interval: Duration) -> Result<LossProbe> {
        LossProbe::start(self.host(i)?, self.host(j)?, self.address(j), interval)
    }

    /// GET `path` of node `i`'s control API, as JSON.
    pub fn ctl(&self, i: usize, path: &str) -> Result<Value> {
        let body = re6stnet::ctl::fetch(&self.nodes[i].ctl, path)
            .map_err(|e| Error::Measure(format!("{}: {e:#}", self.nodes[i].name)))?;
        serde_json::from_str(&body)
            .map_err(|e| Error::Measure(format!("{}{path}: {e}", self.nodes[i].name)))
    }

    /// Selected routes of node `i` (destination prefixes).
    pub fn routes(&self, i: usize) -> Vec<String> {
        self.ctl(i, "/routes")
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter(|r| r["selected"] == Value::Bool(true))
                        .filter_map(|r| r["prefix"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Node `i`'s route entries (selected or not) to node `j`'s prefix, as
    /// its control API gives them.
    pub fn routes_to(&self, i: usize, j: usize) -> Vec<Value> {
        let prefix = self.nodes[j].prefix.as_str();
        self.ctl(i, "/routes")
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter(|r| r["prefix"] == prefix)
                        .cloned()
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Whether node `i` has a selected route to every other running node.
    pub fn routes_all(&self, i: usize) -> bool {
        let others = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .count()
            .saturating_sub(1);
        // The status is small: read the full route table only when the count is there.
        let count = self
            .ctl(i, "/status")
            .ok()
            .and_then(|v| v["routes"].as_u64())
            .unwrap_or(0);
        if (count as usize) < others {
            return false;
        }
        let have = self.routes(i);
        self.nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.process.is_some())
            .all(|(_, n)| have.contains(&n.prefix))
    }

    /// One ping from node `i` to node `j`'s overlay address, sourced from
    /// `i`'s overlay address.
    pub fn ping(&self, i: usize, j: usize, wait_s: u32) -> bool {
        self.ping_addr(i, self.nodes[j].address, wait_s)
    }

    /// One ping from node `i`'s overlay address to `dst`.
    pub fn ping_addr(&self, i: usize, dst: Ipv6Addr, wait_s: u32) -> bool {
        let Ok(h) = self.host(i) else { return false };
        let src = self.nodes[i].address.to_string();
        let dst = dst.to_string();
        h.output(
            "ping",
            &[
                "-6",
                "-n",
                "-c",
                "1",
                "-W",
                &wait_s.to_string(),
                "-I",
                &src,
                &dst,
            ],
        )
        .is_ok_and(|o| o.status.success())
    }

    /// The peers node `i` has a tunnel with (any state), as `/tunnels`
    /// lists them.
    pub fn tunnel_peers(&self, i: usize) -> Vec<String> {
        self.ctl(i, "/tunnels")
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|t| t["peer"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Pairs (i, j) of running nodes where i cannot ping j (eight pings
    /// at a time).
    pub fn unreachable_pairs(&self) -> Vec<(usize, usize)> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].process.is_some())
            .collect();
        let pairs: Vec<(usize, usize)> = running
            .iter()
            .flat_map(|&i| {
                running
                    .iter()
                    .filter(move |&&j| j != i)
                    .map(move |&j| (i, j))
            })
            .collect();
        let mut bad = Vec::new();
        for chunk in pairs.chunks(8) {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&(i, j)| s.spawn(move || (i, j, self.ping(i, j, 2))))
                    .collect();
                for h in handles {
                    if let Ok((i, j, false)) = h.join() {
                        bad.push((i, j));
                    }
                }
            });
        }
        bad
    }

    /// Waits until every running node has a selected route to every other
    /// one; returns how long it took.
    pub fn wait_routes(&self, timeout: Duration) -> Result<Duration> {
        wait_until(
            "routes between every pair of nodes",
            timeout,
            Duration::from_millis(200),
            || {
                (0..self.nodes.len())
                    .filter(|i| self.nodes[*i].process.is_some())
                    .all(|i| self.routes_all(i))
                    .then_some(())
            },
        )
        .map(|(_, d)| d)
        .map_err(|e| Error::Measure(format!("{e}\n{}", self.diagnose())))
    }

    /// Which running node lacks which routes, with the end of its log.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.process.is_none() {
                continue;
            }
            let have = self.routes(i);
            let missing: Vec<&str> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, o)| *j != i && o.process.is_some() && !have.contains(&o.prefix))
                .map(|(_, o)| o.name.as_str())
                .collect();
            if missing.is_empty() {
                continue;
            }
            let tunnels = self
                .ctl(i, "/tunnels")
                .map(|v| v.to_string())
                .unwrap_or_default();
            out += &format!(
                "{} has no route to {missing:?}; tunnels: {tunnels}\n",
                n.name
            );
            let log = self.log(i);
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            for l in tail.into_iter().rev() {
                out += &format!("  | {l}\n");
            }
        }
        out
    }

    /// Waits until every running node routes to every other one, then
    /// until every pair pings; returns how long it took.
    pub fn wait_full_reachability(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        self.wait_routes(timeout)?;
        let left = timeout.saturating_sub(start.elapsed());
        wait_until(
            "pings between every pair of nodes",
            left.max(Duration::from_secs(5)),
            Duration::from_millis(200),
            || self.unreachable_pairs().is_empty().then_some(()),
        )?;
        Ok(start.elapsed())
    }

    /// The chain of nodes traffic from `i` to `j` takes now, read hop by
    /// hop from each node's selected route and the tunnel it goes through
    /// (None: no route somewhere, or a loop).
    pub fn path(&self, i: usize, j: usize) -> Option<Vec<usize>> {
        let mut path = vec![i];
        let mut at = i;
        while at != j {
            if path.len() > self.nodes.len() {
                return None;
            }
            let routes = self.ctl(at, "/routes").ok()?;
            let iface = routes.as_array()?.iter().find(|r| {
                r["selected"] == Value::Bool(true) && r["prefix"] == self.nodes[j].prefix.as_str()
            })?["interface"]
                .as_str()?
                .to_string();
            let tunnels = self.ctl(at, "/tunnels").ok()?;
            let peer = tunnels
                .as_array()?
                .iter()
                .find(|t| t["interface"] == iface.as_str())?["peer"]
                .as_str()?
                .to_string();
            at = self.nodes.iter().position(|n| n.prefix == peer)?;
            path.push(at);
        }
        Some(path)
    }

    /// The overlay address of node `i`.
    pub fn address(&self, i: usize) -> IpAddr {
        IpAddr::V6(self.nodes[i].address)
    }

    /// The serial of node `i`'s certificate on disk.
    pub fn serial(&self, i: usize) -> Result<u64> {
        let dir = &self.nodes[i].dir;
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| Error::io(format!("reading {}", dir.join(f).display()), e))
        };
        let (ca, cert) = (read("ca.crt")?, read("node.crt")?);
        re6st_registry::cert::CaCert::from_pem(&ca)
            .and_then(|ca| ca.verify_node(&cert, None))
            .map(|c| c.serial)
            .map_err(|e| Error::Measure(format!("{}'s certificate: {e}", self.nodes[i].name)))
    }

    /// The log of node `i`'s daemon.
    pub fn log(&self, i: usize) -> String {
        let path: &Path = &self
            .net
            .log_dir()
            .join(format!("{}-re6stnet.log", self.nodes[i].name));
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_broken_paths_breaks_at_least_one() {
        for seed in 0..200 {
            let (_, m) = random_topology("t", 4, seed, 5..=60, 0.05);
            let n = m.broken.iter().flatten().filter(|b| **b).count();
            assert!(n >= 2 && n % 2 == 0, "seed {seed}: {n}");
        }
        let (_, m) = random_topology("t", 4, 1, 5..=60, 0.0);
        assert!(m.broken.iter().flatten().all(|b| !b));
    }
}
