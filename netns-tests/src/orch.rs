//! Orchestration in a mesh: the master on node 0 and agents on the others
//! (partitions in disjoint uid ranges, the host's cgroups mounted again in
//! the namespace), the operator token and a catalogue; helpers to talk to
//! them. Used by `tests/orch.rs` and the demo.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::mesh::Mesh;
use crate::{Error, LinkParams, Process, Result, Topology};

/// The master's port.
pub const PORT: u16 = 7080;

/// A command's stdout and stderr.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub struct Orch {
    /// The mesh (node 0 runs the master).
    pub m: Mesh,
    /// The `re6st-orch` binary.
    pub orch: String,
    /// The master's URL.
    pub url: String,
    /// The operator token file.
    pub token: String,
    /// The catalogue directory (master and agents).
    pub catalog: String,
    /// This run's number (for its partition uids).
    pub test: u32,
}

/// First partition uid of the agent on node `i` in test number `test`
/// (disjoint per node and per test: the nodes of both tests share one host,
/// its /proc and its cgroups; a real host has one agent).
pub fn uid_base(test: u32, i: usize) -> u32 {
    1_900_000_000 + 100_000 * test + 1000 * i as u32
}

/// The address of partition `slot` of the node with `prefix` (as
/// `re6st_orchestration::partition::address`).
pub fn partition_address(prefix: &str, slot: u32) -> String {
    let p: ipnet::Ipv6Net = prefix.parse().unwrap_or_default();
    std::net::Ipv6Addr::from(u128::from(p.network()) + 0x1_0000 + u128::from(slot)).to_string()
}

/// The cgroup v1 directories of partition `uid` (as the agents, children
/// of this process, make them), for the checks and the clean-up.
pub fn cgroup_dirs(uid: u32) -> Vec<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    ["cpu", "memory", "pids"]
        .iter()
        .filter_map(|c| {
            own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctl, path) = (parts.next()?, parts.next()?, parts.next()?);
                ctl.split(',').any(|x| x == *c).then(|| {
                    std::path::Path::new("/sys/fs/cgroup")
                        .join(ctl)
                        .join(path.trim_start_matches('/'))
                        .join("re6st-orch")
                        .join(format!("partition-{uid}"))
                })
            })
        })
        .collect()
}

/// Removes the partition cgroups the agents may leave when the test fails
/// (they live on the host, not in the namespaces).
pub struct CgroupCleanup(pub u32);
impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        let test = self.0;
        let dirs: Vec<_> = (0..64)
            .flat_map(|i| (0..10).map(move |slot| uid_base(test, i) + slot))
            .flat_map(cgroup_dirs)
            .collect();
        // The instances die with their agents' process groups; a group can
        // only go once its last process has.
        let start = Instant::now();
        while dirs.iter().any(|d| d.exists()) && start.elapsed() < Duration::from_secs(5) {
            for d in &dirs {
                let _ = std::fs::remove_dir(d);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let parents: std::collections::BTreeSet<_> =
            dirs.iter().filter_map(|d| d.parent()).collect();
        for p in parents {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// Shell commands that mount the host's cgroup v1 hierarchies for cpu,
/// memory and pids again under /sys/fs/cgroup: `ip netns exec` gives the
/// namespace a fresh /sys without them, where the agent would find no
/// cgroups (a real node has them).
pub fn cgroup_mounts() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut script = String::from("mount -t tmpfs r6t-cgroup /sys/fs/cgroup || exit 1;");
    for l in info.lines() {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(point), Some("cgroup"), Some(opts)) = (
            fields.get(4),
            fields.get(dash + 1).copied(),
            fields.get(dash + 3),
        ) else {
            continue;
        };
        let wanted = opts
            .split(',')
            .any(|o| ["cpu", "memory", "pids"].contains(&o));
        if wanted {
            script.push_str(&format!(
                " mkdir -p {point} && mount -t cgroup -o {opts} cgroup {point} || exit 1;"
            ));
        }
    }
    script
}

/// Whether the host has the cgroup v1 hierarchies the agent uses.
pub fn cgroup_v1() -> bool {
    ["cpu", "memory", "pids"].iter().all(|c| {
        std::path::Path::new("/sys/fs/cgroup")
            .join(c)
            .join("cgroup.procs")
            .exists()
    })
}

/// The real and effective uid of process `pid`.
pub fn uid_of(pid: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Orch {
    /// `re6st-orch ARGS` in node `i` (admin token when `admin`).
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--master", &self.url, "--admin-token-file", &self.token]);
        self.m.host(i)?.output(&self.orch, &all)
    }

    /// `re6st-orch ARGS` in node `i` as the user `uid` of a partition,
    /// signing as instance `name` with the key at `key`.
    pub fn cli_as(
        &self,
        i: usize,
        uid: u32,
        name: &str,
        key: &str,
        args: &[&str],
    ) -> Result<std::process::Output> {
        let uid = uid.to_string();
        let mut all: Vec<&str> = vec!["--reuid", &uid, "--regid", &uid, "--clear-groups"];
        all.push(&self.orch);
        all.extend(args);
        all.extend([
            "--master",
            &self.url,
            "--instance",
            name,
            "--instance-key",
            key,
        ]);
        self.m.host(i)?.output("setpriv", &all)
    }

    pub fn master(&self) -> Result<Process> {
        self.master_with(&[])
    }

    /// The master on node 0, with `extra` arguments.
    pub fn master_with(&self, extra: &[&str]) -> Result<Process> {
        let n = &self.m.nodes[0];
        let dir = n.dir.to_string_lossy().into_owned();
        let catalog = self.catalog.as_str();
        self.m.host(0)?.spawn(
            "master",
            &self.orch,
            &[
                "master",
                "--listen",
                &format!("[{}]:{PORT}", n.address),
                "--db",
                &format!("{dir}/master.db"),
                "--catalog",
                catalog,
                "--dir",
                &dir,
                "--network-config",
                &format!("{dir}/state/network.json"),
                "--admin-token-file",
                &self.token,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        )
    }

    /// The agent of node `i` (partitions from `uid_base`), at `site`.
    pub fn agent(&self, i: usize, site: &str) -> Result<Process> {
        let n = &self.m.nodes[i];
        let dir = n.dir.to_string_lossy().into_owned();
        self.m.host(i)?.spawn(
            "agent",
            "sh",
            &[
                "-c",
                &format!("{} exec \"$0\" \"$@\"", cgroup_mounts()),
                &self.orch,
                "agent",
                "--master",
                &self.url,
                "--name",
                &n.name,
                "--site",
                site,
                "--dir",
                &dir,
                "--catalog",
                &self.catalog,
                "--uid-base",
                &uid_base(self.test, i).to_string(),
                "--partitions",
                "10",
                "--network-config",
                &format!("{dir}/state/network.json"),
                "--state",
                &format!("{dir}/instances"),
                "--ctl-socket",
                &n.ctl.to_string_lossy(),
                "--period-ms",
                "500",
            ],
        )
    }

    /// A mesh of `reg`, `m` and `n1`..`n4` over a 10 ms WAN (with
    /// `broken` pairs blackholed), the operator token and a catalogue with
    /// the shipped descriptors and a probe that prints a file.
    pub fn start(tag: &str, test: u32, broken: &[(&str, &str)]) -> Result<Self> {
        let names = ["m", "n1", "n2", "n3", "n4"];
        let mut t = Topology::new(tag);
        t.host("reg");
        for n in names {
            t.host(n);
        }
        t.default_wan(LinkParams::delay_ms(10));
        for (a, b) in broken {
            t.wan_both(a, b, LinkParams::delay_ms(10).with_blackhole(true));
        }
        let m = Mesh::start(&t, "reg", &names, &[], &["--config-refresh", "5"])?;
        m.wait_full_reachability(Duration::from_secs(30))?;
        Self::new(m, test)
    }

    /// Orchestration over mesh `m`: the operator token and the catalogue in
    /// its log directory; partitions numbered for run `test`.
    pub fn new(m: Mesh, test: u32) -> Result<Self> {
        let token = m.net.log_dir().join("admin.token");
        std::fs::write(&token, "s3cret-operator-token\n")
            .map_err(|e| Error::io("writing the admin token", e))?;
        let orch = crate::binary("re6st-orch")?.to_string_lossy().into_owned();
        let url = format!("http://[{}]:{PORT}", m.nodes[0].address);
        let catalog = m.net.log_dir().join("catalog");
        std::fs::create_dir_all(&catalog).map_err(|e| Error::io("creating the catalogue", e))?;
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../orchestration/catalog");
        for f in ["http-static.toml", "kv.toml", "re6st-registry.toml"] {
            std::fs::copy(format!("{shipped}/{f}"), catalog.join(f))
                .map_err(|e| Error::io(format!("copying {f}"), e))?;
        }
        std::fs::write(
            catalog.join("probe.toml"),
            "name = \"probe\"\ncommand = [\"sh\", \"-c\", \"id -u; cat \\\"$RE6ST_FILE\\\"; exec sleep 600\"]\n[parameters.file]\ntype = \"string\"\n",
        )
        .map_err(|e| Error::io("writing the probe", e))?;
        Ok(Orch {
            m,
            orch,
            url,
            token: token.to_string_lossy().into_owned(),
            catalog: catalog.to_string_lossy().into_owned(),
            test,
        })
    }

    /// An HTTP GET of `/` from node `i`; the status line.
    pub fn get(&self, i: usize, url_host: &str, port: &str) -> String {
        self.get_path(i, url_host, port, "/")
    }

    /// An HTTP/1.0 exchange with `[host]:port` from node `i`: `request`
    /// sent as is, the whole answer (up to 4 KiB) returned.
    pub fn http(&self, i: usize, host: &str, port: &str, request: &str) -> String {
        let script =
            format!("exec 3<>/dev/tcp/{host}/{port} && printf '{request}' >&3 && head -c 4096 <&3");
        self.m
            .host(i)
            .and_then(|h| h.output("timeout", &["3", "bash", "-c", &script]))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// An HTTP GET of `path` from node `i`; the status line.
    pub fn get_path(&self, i: usize, url_host: &str, port: &str, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/{url_host}/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 15 <&3"
        );
        self.m
            .host(i)
            .and_then(|h| h.output("timeout", &["3", "bash", "-c", &script]))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// The address in each copy's `url@NODE` that `request` printed, by node.
pub fn copy_hosts(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("url@"))
        .filter_map(|r| {
            let (node, url) = r.split_once(" = ")?;
            let host = url.split_once('[')?.1.split_once(']')?.0;
            Some((node.to_string(), host.to_string()))
        })
        .collect()
}

/// The nodes of the `KEY@NODE` connection parameters `request` printed.
pub fn copy_nodes(out: &str) -> Vec<String> {
    let mut nodes: Vec<String> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("url@"))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect();
    nodes.sort();
    nodes
}
