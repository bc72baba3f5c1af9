//! Resource limits of a partition: a control group per instance, under the
//! agent's own, with the CPU, memory and process limits of its descriptor.
//!
//! cgroup v1 (separate `cpu`, `memory` and `pids` hierarchies, as on this
//! project's build machines) is handled; on a host with only the unified v2
//! hierarchy the agent says once that limits are not applied (not done yet:
//! v2 needs the agent to move itself into a leaf and enable controllers).

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

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// One instance's groups (one per controller).
#[derive(Debug)]
pub struct Cgroup {
    procs: Vec<CString>,
}

/// Which cgroup layout the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Separate v1 hierarchies for cpu, memory and pids.
    V1,
    /// Only the unified hierarchy (limits not applied yet).
    V2Only,
    /// Neither found.
    None,
}

/// The host's layout.
pub fn layout() -> Layout {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let v1 = CONTROLLERS
        .iter()
        .all(|c| own_group(&own, c).is_some_and(|(mount, _)| Path::new(ROOT).join(mount).is_dir()));
    if v1 {
        Layout::V1
    } else if Path::new(ROOT).join("cgroup.controllers").exists() {
        Layout::V2Only
    } else {
        Layout::None
    }
}

/// The groups of partition `uid` (one per controller), under the agent's
/// own: `re6st-orch/partition-UID`.
fn dirs_for(uid: u32) -> anyhow::Result<Vec<PathBuf>> {
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    CONTROLLERS
        .iter()
        .map(|c| {
            let (mount, path) =
                own_group(&own, c).with_context(|| format!("no cgroup v1 hierarchy for {c}"))?;
            Ok(Path::new(ROOT)
                .join(mount)
                .join(path.trim_start_matches('/'))
                .join("re6st-orch")
                .join(format!("partition-{uid}")))
        })
        .collect()
}

impl Cgroup {
    /// Creates (or reuses) the groups of partition `uid` and sets `limits`
    /// (v1).
    pub fn create(uid: u32, limits: &Limits) -> anyhow::Result<Self> {
        let dirs = dirs_for(uid)?;
        let mut procs = Vec::new();
        for dir in &dirs {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let p = dir.join("cgroup.procs");
            procs.push(
                CString::new(p.to_string_lossy().into_owned())
                    .with_context(|| format!("{} is not a C string", p.display()))?,
            );
        }
        for (controller, file, value) in limits.v1_files() {
            let dir = dirs
                .iter()
                .zip(CONTROLLERS)
                .find_map(|(d, c)| (c == controller).then_some(d))
                .with_context(|| format!("no {controller} group"))?;
            std::fs::write(dir.join(file), &value)
                .with_context(|| format!("writing {value} to {}", dir.join(file).display()))?;
        }
        Ok(Self { procs })
    }

    /// The `cgroup.procs` files a new process writes itself into (before it
    /// drops root: see `partition`).
    pub fn procs_files(&self) -> &[CString] {
        &self.procs
    }

    /// Removes the groups of partition `uid` if they exist (their processes
    /// must be gone).
    pub fn remove(uid: u32) {
        for d in dirs_for(uid).unwrap_or_default() {
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
}
