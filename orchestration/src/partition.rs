//! Partitions, as SlapOS's computer partitions: each instance runs as its
//! own unprivileged user (a uid of the agent's range, no login entry), in its
//! own directory (0700, owned by that user, under a base directory only root
//! can list), with its own overlay address taken from the node prefix, in
//! its own control group (see [`crate::cgroup`]).
//!
//! The directory's owner is the record of which slot an instance has: a
//! restarted agent finds its partitions again, and a destroyed instance's
//! directory is removed, which frees its slot.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::Ipv6Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::Ipv6Net;

/// Default first uid: above systemd's container range (ends 1879048191),
/// below 2^31, so no login user or container is ever one of ours.
pub const DEFAULT_UID_BASE: u32 = 1_900_000_000;
/// Default number of partitions.
pub const DEFAULT_COUNT: u32 = 100;
/// Instance addresses are `prefix + OFFSET + slot` (the node is `prefix::1`).
const OFFSET: u128 = 0x1_0000;

/// The address of partition `slot` in `prefix`.
pub fn address(prefix: Ipv6Net, slot: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) + OFFSET + u128::from(slot))
}

/// The lowest slot below `count` not in `taken`.
fn first_free(taken: impl Iterator<Item = u32>, count: u32) -> Option<u32> {
    let taken: std::collections::BTreeSet<u32> = taken.collect();
    (0..count).find(|s| !taken.contains(s))
}

/// The agent's partitions.
#[derive(Clone, Debug)]
pub struct Partitions {
    base_dir: PathBuf,
    uid_base: u32,
    count: u32,
    prefix: Ipv6Net,
}

/// One instance's partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its slot (0..count).
    pub slot: u32,
    /// Its user and group id.
    pub uid: u32,
    /// Its directory.
    pub dir: PathBuf,
    /// Its overlay address (on `lo`, inside the node prefix).
    pub address: Ipv6Addr,
}

impl Partitions {
    /// Partitions under `base_dir` (created, root's, 0711), uids
    /// `uid_base..uid_base+count`, addresses in `prefix`.
    pub fn new(
        base_dir: &Path,
        uid_base: u32,
        count: u32,
        prefix: Ipv6Net,
    ) -> anyhow::Result<Self> {
        if uid_base < 1000 || uid_base.checked_add(count).is_none_or(|e| e > 0x7fff_ffff) {
            bail!("partition uids {uid_base}+{count}: must lie in 1000..2^31");
        }
        let host_bits = 128 - u32::from(prefix.prefix_len());
        if count == 0 || host_bits < 64 && (OFFSET + u128::from(count)) >> host_bits != 0 {
            bail!("{count} partitions do not fit in the node prefix {prefix}");
        }
        std::fs::create_dir_all(base_dir)
            .with_context(|| format!("creating {}", base_dir.display()))?;
        std::os::unix::fs::chown(base_dir, Some(0), Some(0))
            .with_context(|| format!("chown {}", base_dir.display()))?;
        std::fs::set_permissions(base_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("chmod {}", base_dir.display()))?;
        Ok(Self {
            base_dir: base_dir.to_path_buf(),
            uid_base,
            count,
            prefix,
        })
    }

    fn slot_of_uid(&self, uid: u32) -> Option<u32> {
        uid.checked_sub(self.uid_base).filter(|s| *s < self.count)
    }

    fn partition(&self, name: &str, slot: u32) -> Partition {
        Partition {
            slot,
            uid: self.uid_base + slot,
            dir: self.base_dir.join(name),
            address: address(self.prefix, slot),
        }
    }

    /// The partitions that exist (instance name → partition), from the
    /// owners of the directories under the base directory.
    pub fn existing(&self) -> anyhow::Result<BTreeMap<String, Partition>> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(&self.base_dir)
            .with_context(|| format!("reading {}", self.base_dir.display()))?
        {
            let e = e.context("reading the partitions")?;
            let (Ok(meta), Some(name)) = (e.metadata(), e.file_name().to_str().map(str::to_string))
            else {
                continue;
            };
            if let Some(slot) = meta
                .is_dir()
                .then(|| self.slot_of_uid(meta.uid()))
                .flatten()
            {
                out.insert(name.clone(), self.partition(&name, slot));
            }
        }
        Ok(out)
    }

    /// The partition of `instance`: the one it has, or a new one on the
    /// lowest free slot (directory created, owned by its user, 0700).
    pub fn open(&self, instance: &str) -> anyhow::Result<Partition> {
        let existing = self.existing()?;
        if let Some(p) = existing.get(instance) {
            return Ok(p.clone());
        }
        let slot = first_free(existing.values().map(|p| p.slot), self.count)
            .with_context(|| format!("all {} partitions of this node are in use", self.count))?;
        let p = self.partition(instance, slot);
        if p.dir.exists() {
            bail!(
                "{} exists but is not a partition (not owned by a partition user)",
                p.dir.display()
            );
        }
        std::fs::create_dir(&p.dir).with_context(|| format!("creating {}", p.dir.display()))?;
        std::os::unix::fs::chown(&p.dir, Some(p.uid), Some(p.uid))
            .with_context(|| format!("chown {}", p.dir.display()))?;
        std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", p.dir.display()))?;
        Ok(p)
    }

    /// Kills the partition's processes and removes its directory (its slot
    /// is free again). While a process of its uid is left, the directory
    /// stays, so the uid is not handed to another instance.
    pub fn wipe(&self, p: &Partition) -> anyhow::Result<()> {
        kill_all(p.uid);
        let left = processes_of(p.uid).len();
        if left > 0 {
            bail!(
                "{left} processes of uid {} survived SIGKILL: partition {} kept",
                p.uid,
                p.dir.display()
            );
        }
        std::fs::remove_dir_all(&p.dir).with_context(|| format!("removing {}", p.dir.display()))
    }
}

/// The pids of processes whose real or effective uid is `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
        let mut ids = uids
            .split_whitespace()
            .filter_map(|u| u.parse::<u32>().ok());
        let (real, effective) = (ids.next()?, ids.next()?);
        (real == uid || effective == uid).then_some(pid)
    })
    .collect()
}

/// Sends SIGKILL to every process of `uid` until none is left (at most
/// 2 s); returns how many it killed.
pub fn kill_all(uid: u32) -> usize {
    let mut killed = 0;
    let start = Instant::now();
    loop {
        let pids = processes_of(uid);
        if pids.is_empty() || start.elapsed() > Duration::from_secs(2) {
            return killed;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes `cmd` start in the partition: its directory, `HOME` there, a clean
/// environment with a standard `PATH`, the control groups in `cgroups`
/// joined while still root, then no new privileges, no supplementary
/// groups, and the partition's gid and uid.
pub fn confine(cmd: &mut std::process::Command, p: &Partition, cgroups: &[CString]) {
    let uid = p.uid;
    let procs: Vec<CString> = cgroups.to_vec();
    cmd.current_dir(&p.dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &p.dir);
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (open, write, close, prctl,
    // setgroups, setgid, setuid) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for path in &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_addresses_and_uids() {
        let prefix: Ipv6Net = "fd5e:5e:0:2::/64".parse().unwrap_or_default();
        assert_eq!(address(prefix, 0).to_string(), "fd5e:5e:0:2::1:0");
        assert_eq!(address(prefix, 7).to_string(), "fd5e:5e:0:2::1:7");
        assert_eq!(first_free([0, 1, 3].into_iter(), 5), Some(2));
        assert_eq!(first_free([0, 1].into_iter(), 2), None);
        assert_eq!(first_free(std::iter::empty(), 2), Some(0));
        let base = std::env::temp_dir().join(format!("orch-part-{}", std::process::id()));
        let tiny: Ipv6Net = "fd5e:5e:0:2::/112".parse().unwrap_or_default();
        assert!(
            Partitions::new(&base, DEFAULT_UID_BASE, 10, tiny).is_err(),
            "/112 too small"
        );
        assert!(Partitions::new(&base, 0, 10, prefix).is_err(), "root's uid");
        assert!(
            Partitions::new(&base, u32::MAX - 5, 10, prefix).is_err(),
            "past 2^31"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_processes_uid_is_read_from_proc() {
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert!(processes_of(me).contains(&(std::process::id() as i32)));
        assert!(processes_of(DEFAULT_UID_BASE + 99_999).is_empty());
    }
}
