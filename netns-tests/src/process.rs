//! Programs running inside a host's namespace, with their output in a log
//! file, killed (with their whole process group) when the handle drops.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a process gets to exit after SIGTERM before it is killed.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// A program started in a namespace. Dropping it stops it.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `program args...` inside namespace `ns`, in its own session
    /// and so its own process group (Ctrl-C on the terminal reaches only
    /// us, and we stop the whole group), with stdout and stderr appended to
    /// `log`. A new session also means a new scheduler autogroup (with
    /// `CONFIG_SCHED_AUTOGROUP`): the daemons do not share the harness's,
    /// where they would compete per thread with the WAN emulator.
    pub fn spawn(ns: &str, name: &str, program: &str, args: &[&str], log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("opening log {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("opening log {}", log.display()), e))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the hook runs in the child between fork and exec and only
        // calls setsid, which is async-signal-safe. The child is not a group
        // leader yet (no `process_group` here), so setsid cannot fail for that.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {program} in {ns}"), e))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
        })
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID (`ip netns exec` execs the program, so this is the program's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time it has used so far (user + system), if it still runs.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(self.pid())
    }

    /// Path of the log file holding stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Its exit status if it has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("checking {}", self.name), e))?;
        }
        Ok(self.status)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} to exit", self.name),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal to the whole process group.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        let pgid = i32::try_from(self.child.id())
            .map_err(|_| Error::Measure(format!("pid {} out of range", self.child.id())))?;
        // SAFETY: kill has no memory-safety preconditions; the group is the
        // one this child leads (setsid at spawn).
        if unsafe { libc::kill(-pgid, signal) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(Error::io(format!("signalling {}", self.name), err));
            }
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after [`TERM_GRACE`]; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match self.wait_timeout(TERM_GRACE) {
            Ok(status) => {
                // The leader is gone; take any stragglers of its group with it.
                let _ = self.signal_group_after_exit();
                Ok(status)
            }
            Err(_) => self.kill(),
        }
    }

    /// SIGKILL to the whole group; returns the exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("waiting for {}", self.name), e))?;
        self.status = Some(status);
        Ok(status)
    }

    fn signal_group_after_exit(&self) -> Result<()> {
        let pgid = i32::try_from(self.child.id())
            .map_err(|_| Error::Measure(format!("pid {} out of range", self.child.id())))?;
        // SAFETY: as in `signal`; ESRCH (no such group) is the normal case.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        Ok(())
    }
}

/// CPU time (user + system) used so far by process `pid`, from
/// `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    stat_cpu_time(Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU time (user + system) from a `stat` file of procfs: a process's
/// (`/proc/PID/stat`, all its threads) or one thread's
/// (`/proc/PID/task/TID/stat`).
pub fn stat_cpu_time(path: &Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
