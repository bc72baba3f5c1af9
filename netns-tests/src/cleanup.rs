//! Names of everything the harness creates, Ctrl-C handling, and removal of
//! leftovers from crashed runs.
//!
//! Every namespace is named `r6t-TAG-PID-N-ROLE`: `PID` is the process that
//! built it, so a namespace whose builder is gone is a leftover.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns;

/// The start of every namespace name the harness creates.
pub const NAME_PREFIX: &str = "r6t-";

static COUNTER: AtomicU64 = AtomicU64::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static ACTIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A fresh per-network prefix: `r6t-TAG-PID-N`.
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    let tag = if tag.is_empty() { "net".into() } else { tag };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{tag}-{}-{n}", std::process::id())
}

/// The PID encoded in a harness namespace name.
pub fn owner_pid(ns: &str) -> Option<i32> {
    let rest = ns.strip_prefix(NAME_PREFIX)?;
    rest.split('-').nth(1)?.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Records a prefix as in use by this process (for the Ctrl-C fallback).
pub(crate) fn register(prefix: &str) {
    ACTIVE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(prefix.to_string());
}

/// Forgets a prefix once its network is torn down.
pub(crate) fn unregister(prefix: &str) {
    ACTIVE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|p| p != prefix);
}

/// Removes every namespace of the network with this prefix (`PREFIX-ROLE`),
/// killing the processes inside first. Returns the names removed.
pub fn remove_prefix(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let start = format!("{prefix}-");
    for ns in netns::list_netns()? {
        if ns.starts_with(&start) {
            netns::remove_netns(&ns)?;
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// Removes leftover harness namespaces: those whose building process is
/// gone, or all of them with `all`, and the log directories of such runs
/// (kept after a failure for reading). Returns the names removed.
pub fn remove_leftovers(all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let logs = std::env::temp_dir().join("re6st-netns");
    if let Ok(entries) = std::fs::read_dir(&logs) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = all || owner_pid(&name).is_none_or(|pid| !pid_alive(pid));
            if name.starts_with(NAME_PREFIX) && stale && std::fs::remove_dir_all(e.path()).is_ok() {
                removed.push(format!("logs {name}"));
            }
        }
    }
    for ns in netns::list_netns()? {
        if !ns.starts_with(NAME_PREFIX) {
            continue;
        }
        let stale = all || owner_pid(&ns).is_none_or(|pid| !pid_alive(pid));
        if stale {
            netns::remove_netns(&ns)?;
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// Installs a Ctrl-C / SIGTERM handler: it sets the flag that every harness
/// wait checks, so the run unwinds and tears its networks down. If the run
/// has not exited 10 s later, the handler removes this process's networks
/// itself and exits with 130.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            return;
        }
        eprintln!("interrupted: tearing down");
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(10));
            let prefixes = ACTIVE
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            for p in prefixes {
                let _ = remove_prefix(&p);
            }
            std::process::exit(130);
        });
    })
    .map_err(|e| Error::Measure(format!("installing the Ctrl-C handler: {e}")))
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once Ctrl-C was pressed.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps, waking early with `Err(Interrupted)` on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_carry_the_pid() {
        let a = unique_prefix("Some test!");
        let b = unique_prefix("Some test!");
        assert_ne!(a, b);
        assert!(a.starts_with("r6t-sometest-"));
        assert_eq!(
            owner_pid(&format!("{a}-inet")),
            Some(std::process::id() as i32)
        );
        assert_eq!(owner_pid("r6t-x"), None);
        assert_eq!(owner_pid("other-x-1-2"), None);
    }
}
