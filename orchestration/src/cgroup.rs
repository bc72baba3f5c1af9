//! Resource limits of a partition: a control group per instance, under the
//! agent's own (`re6st-orch/partition-UID`), with the CPU, memory and
//! process limits of its descriptor.
//!
//! - cgroup v1 (separate `cpu`, `memory` and `pids` hierarchies, as on this
//!   project's build machines): one group per controller.
//! - cgroup v2 (the unified hierarchy, Debian 12's default): the agent's
//!   group must be delegated to it (systemd `Delegate=yes`). A group with
//!   controllers enabled for its children may hold no process, so at start
//!   the agent moves itself into a leaf, `agent`, then enables `cpu`,
//!   `memory` and `pids` for its group's children and for `re6st-orch`'s.
//!
//! Without either, the agent says once that limits are not applied.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What one instance may use (the descriptor's `[limits]`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Percent of one core (200: two cores); none: unlimited.
    pub cpu_percent: Option<u32>,
    /// Memory in MiB; none: unlimited.
    pub memory_mb: Option<u64>,
    /// Most processes and threads (default 512: no fork bomb takes the node).
    #[serde(default = "default_pids")]
    pub pids: u32,
}

fn default_pids() -> u32 {
    512
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_percent: None,
            memory_mb: None,
            pids: default_pids(),
        }
    }
}

impl Limits {
    /// The rules a descriptor's limits must follow.
    pub fn check(&self) -> Result<(), String> {
        if self.cpu_percent == Some(0) {
            return Err("limits.cpu_percent: must be 1 or more".into());
        }
        if self.memory_mb.is_some_and(|m| m < 4) {
            return Err("limits.memory_mb: must be 4 or more".into());
        }
        if self.memory_mb.is_some_and(|m| m > u64::MAX >> 20) {
            return Err("limits.memory_mb: too large".into());
        }
        if self.pids == 0 {
            return Err("limits.pids: must be 1 or more".into());
        }
        Ok(())
    }

    /// The cgroup v1 files and values: (controller, file, value).
    fn v1_files(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut out = vec![("pids", "pids.max", self.pids.to_string())];
        if let Some(m) = self.memory_mb {
            out.push(("memory", "memory.limit_in_bytes", (m << 20).to_string()));
        }
        if let Some(c) = self.cpu_percent {
            out.push(("cpu", "cpu.cfs_period_us", "100000".into()));
            out.push(("cpu", "cpu.cfs_quota_us", (u64::from(c) * 1000).to_string()));
        }
        out
    }

    /// The cgroup v2 files and values: (file, value).
    fn v2_files(&self) -> Vec<(&'static str, String)> {
        vec![
            ("pids.max", self.pids.to_string()),
            (
                "memory.max",
                self.memory_mb
                    .map_or_else(|| "max".into(), |m| (m << 20).to_string()),
            ),
            (
                "cpu.max",
                self.cpu_percent.map_or_else(
                    || "max 100000".into(),
                    |c| format!("{} 100000", u64::from(c) * 1000),
                ),
            ),
        ]
    }
}

/// The path of this process's group in the v1 hierarchy holding
/// `controller`, from the text of `/proc/self/cgroup`: the mount directory
/// name (e.g. `cpu,cpuacct`) and the path inside it.
fn own_group(proc_cgroup: &str, controller: &str) -> Option<(String, String)> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| (controllers.to_string(), path.to_string()))
    })
}

/// This process's group in the unified (v2) hierarchy: the `0::PATH` line.
fn own_unified_group(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// What the agent enables for its children under cgroup v2.
const ENABLE: &str = "+cpu +memory +pids";

/// One instance's groups (one per controller under v1, one under v2).
#[derive(Debug)]
pub struct Cgroup {
    procs: Vec<CString>,
}

impl Cgroup {
    /// The `cgroup.procs` files a new process writes itself into (before it
    /// drops root: see `partition`).
    pub fn procs_files(&self) -> &[CString] {
        &self.procs
    }
}

/// Where the agent makes partition groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v1: the agent's own group in each controller's hierarchy.
    V1(Vec<(&'static str, PathBuf)>),
    /// cgroup v2: the agent's own (delegated) group, its process moved into
    /// the `agent` leaf.
    V2(PathBuf),
}

impl Cgroups {
    /// Finds the host's hierarchies and, under v2, prepares the agent's
    /// group (see the module documentation). The error says why instances
    /// will run without limits.
    pub fn setup() -> anyhow::Result<Self> {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let v1: Option<Vec<(&'static str, PathBuf)>> = CONTROLLERS
            .iter()
            .map(|c| {
                let (mount, path) = own_group(&own, c)?;
                let dir = Path::new(ROOT).join(mount);
                dir.is_dir()
                    .then(|| (*c, dir.join(path.trim_start_matches('/'))))
            })
            .collect();
        if let Some(v1) = v1 {
            return Ok(Self::V1(v1));
        }
        let unified = Path::new(ROOT);
        match own_unified_group(&own) {
            Some(path) if unified.join("cgroup.controllers").exists() => {
                let base = unified.join(path.trim_start_matches('/'));
                prepare_v2(&base, std::process::id())?;
                Ok(Self::V2(base))
            }
            _ => {
                anyhow::bail!("no cgroup v1 hierarchies for cpu, memory and pids, and no cgroup v2")
            }
        }
    }

    /// The groups of partition `uid`.
    fn dirs(&self, uid: u32) -> Vec<PathBuf> {
        let leaf = |d: &Path| d.join("re6st-orch").join(format!("partition-{uid}"));
        match self {
            Self::V1(own) => own.iter().map(|(_, d)| leaf(d)).collect(),
            Self::V2(base) => vec![leaf(base)],
        }
    }

    /// Creates (or reuses) the groups of partition `uid` and sets `limits`.
    pub fn create(&self, uid: u32, limits: &Limits) -> anyhow::Result<Cgroup> {
        let dirs = self.dirs(uid);
        let mut procs = Vec::new();
        for dir in &dirs {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let p = dir.join("cgroup.procs");
            procs.push(
                CString::new(p.to_string_lossy().into_owned())
                    .with_context(|| format!("{} is not a C string", p.display()))?,
            );
        }
        let files: Vec<(PathBuf, String)> = match self {
            Self::V1(own) => limits
                .v1_files()
                .into_iter()
                .filter_map(|(controller, file, value)| {
                    let at = own
                        .iter()
                        .zip(&dirs)
                        .find_map(|((c, _), d)| (*c == controller).then_some(d))?;
                    Some((at.join(file), value))
                })
                .collect(),
            Self::V2(_) => limits
                .v2_files()
                .into_iter()
                .map(|(file, value)| (dirs[0].join(file), value))
                .collect(),
        };
        for (path, value) in files {
            std::fs::write(&path, &value)
                .with_context(|| format!("writing {value} to {}", path.display()))?;
        }
        Ok(Cgroup { procs })
    }

    /// Removes the groups of partition `uid` if they exist (their processes
    /// must be gone).
    pub fn remove(&self, uid: u32) {
        for d in self.dirs(uid) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot remove the partition's cgroup");
                }
            }
        }
    }
}

/// Under cgroup v2, makes the agent's group `base` able to hold partition
/// groups: the agent (`pid`) moves into `base/agent`, and `cpu`, `memory`
/// and `pids` are enabled for the children of `base` and of
/// `base/re6st-orch`.
fn prepare_v2(base: &Path, pid: u32) -> anyhow::Result<()> {
    let available = std::fs::read_to_string(base.join("cgroup.controllers"))
        .with_context(|| format!("reading {}/cgroup.controllers", base.display()))?;
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "cgroup v2: {} not delegated to the agent's group {} (run it with systemd's Delegate=yes)",
            missing.join(", "),
            base.display()
        );
    }
    let leaf = base.join("agent");
    std::fs::create_dir_all(&leaf).with_context(|| format!("creating {}", leaf.display()))?;
    std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("moving the agent into {}", leaf.display()))?;
    let partitions = base.join("re6st-orch");
    for (dir, create) in [(base, false), (partitions.as_path(), true)] {
        if create {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(dir.join("cgroup.subtree_control"), ENABLE).with_context(|| {
            format!(
                "enabling {ENABLE} in {} (another process may share the agent's group: give it one of its own, systemd Delegate=yes)",
                dir.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_group_is_found_per_controller() {
        let text =
            "12:pids:/\n4:memory:/process_api/b88b\n2:cpu,cpuacct:/system.slice/x.service\n0::/\n";
        assert_eq!(
            own_group(text, "memory"),
            Some(("memory".into(), "/process_api/b88b".into()))
        );
        assert_eq!(
            own_group(text, "cpu"),
            Some(("cpu,cpuacct".into(), "/system.slice/x.service".into()))
        );
        assert_eq!(own_group(text, "pids"), Some(("pids".into(), "/".into())));
        assert_eq!(own_group(text, "io"), None);
        assert_eq!(own_group("garbage", "cpu"), None);
    }

    #[test]
    fn limits_become_v1_files() {
        let l = Limits {
            cpu_percent: Some(50),
            memory_mb: Some(64),
            pids: 100,
        };
        assert_eq!(
            l.v1_files(),
            vec![
                ("pids", "pids.max", "100".to_string()),
                ("memory", "memory.limit_in_bytes", "67108864".to_string()),
                ("cpu", "cpu.cfs_period_us", "100000".to_string()),
                ("cpu", "cpu.cfs_quota_us", "50000".to_string()),
            ]
        );
        assert_eq!(
            Limits::default().v1_files(),
            vec![("pids", "pids.max", "512".to_string())]
        );
        assert!(Limits { pids: 0, ..l }.check().is_err());
        assert!(Limits {
            memory_mb: Some(1),
            ..l
        }
        .check()
        .is_err());
        assert!(Limits {
            cpu_percent: Some(0),
            ..l
        }
        .check()
        .is_err());
        assert!(l.check().is_ok());
    }

    #[test]
    fn limits_become_v2_files() {
        let l = Limits {
            cpu_percent: Some(150),
            memory_mb: Some(64),
            pids: 100,
        };
        assert_eq!(
            l.v2_files(),
            vec![
                ("pids.max", "100".to_string()),
                ("memory.max", "67108864".to_string()),
                ("cpu.max", "150000 100000".to_string()),
            ]
        );
        assert_eq!(
            Limits::default().v2_files(),
            vec![
                ("pids.max", "512".to_string()),
                ("memory.max", "max".to_string()),
                ("cpu.max", "max 100000".to_string()),
            ]
        );
        assert_eq!(
            own_unified_group("1:name=systemd:/x\n0::/system.slice/a.service\n"),
            Some("/system.slice/a.service".into())
        );
        assert_eq!(own_unified_group("4:memory:/x\n"), None);
    }

    /// A directory laid out as a delegated v2 group (a real cgroupfs makes
    /// the interface files itself).
    struct FakeGroup(PathBuf);
    impl Drop for FakeGroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake_group(tag: &str, controllers: &str) -> FakeGroup {
        let base = std::env::temp_dir().join(format!("orch-cg2-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(base.join("cgroup.controllers"), controllers)
            .unwrap_or_else(|e| panic!("{e}"));
        FakeGroup(base)
    }

    #[test]
    fn under_v2_the_agent_moves_to_a_leaf_and_partitions_get_limits() {
        let g = fake_group("ok", "cpuset cpu io memory pids\n");
        prepare_v2(&g.0, 4242).unwrap_or_else(|e| panic!("{e:#}"));
        let read = |p: &str| std::fs::read_to_string(g.0.join(p)).unwrap_or_default();
        assert_eq!(read("agent/cgroup.procs"), "4242");
        assert_eq!(read("cgroup.subtree_control"), ENABLE);
        assert_eq!(read("re6st-orch/cgroup.subtree_control"), ENABLE);
        let cg = Cgroups::V2(g.0.clone());
        let made = cg
            .create(
                7,
                &Limits {
                    cpu_percent: Some(50),
                    memory_mb: Some(32),
                    pids: 64,
                },
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
        let procs: Vec<String> = made
            .procs_files()
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let dir = "re6st-orch/partition-7";
        assert_eq!(
            procs,
            [g.0.join(dir)
                .join("cgroup.procs")
                .to_string_lossy()
                .into_owned()]
        );
        assert_eq!(read(&format!("{dir}/cpu.max")), "50000 100000");
        assert_eq!(read(&format!("{dir}/memory.max")), "33554432");
        assert_eq!(read(&format!("{dir}/pids.max")), "64");
        for f in ["cpu.max", "memory.max", "pids.max"] {
            let _ = std::fs::remove_file(g.0.join(dir).join(f));
        }
        cg.remove(7);
        assert!(!g.0.join(dir).exists());
    }

    #[test]
    fn under_v2_undelegated_controllers_are_named() {
        let g = fake_group("missing", "cpuset io memory\n");
        let e = prepare_v2(&g.0, 1).map_or_else(|e| format!("{e:#}"), |()| String::new());
        assert!(
            e.contains("cpu, pids not delegated") && e.contains("Delegate=yes"),
            "{e}"
        );
        assert!(!g.0.join("agent").exists(), "nothing moved");
    }
}
