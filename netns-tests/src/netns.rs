//! Low-level namespace operations: `ip` commands, entering a namespace from a
//! thread, sysctls, listing and removing namespaces.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::thread;

use crate::error::{Error, Result};

/// Whether this process runs as root (namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with [`Error::NotRoot`] unless running as root.
pub fn require_root() -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        // SAFETY: as above.
        Err(Error::NotRoot(unsafe { libc::geteuid() }))
    }
}

/// Fails with [`Error::MissingTool`] unless `program` is on `PATH`, so
/// that a missing tool is not mistaken for a network that does not work.
pub fn require_tool(program: &str) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join(program).is_file()) {
        Ok(())
    } else {
        Err(Error::MissingTool(program.to_string()))
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    run_with_input(cmd, None)
}

/// Like [`run`], feeding `input` on stdin.
pub fn run_with_input(cmd: &mut Command, input: Option<&str>) -> Result<Output> {
    let line = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting `{line}`"), e))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(format!("writing to `{line}`"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for `{line}`"), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Runs `ip ARGS...`.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Runs many `ip` commands in one process (`ip [-n NS] [-6] -batch -`);
/// `v6` selects IPv6 for `route` and `rule` lines.
pub fn ip_batch(ns: Option<&str>, v6: bool, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    if v6 {
        cmd.arg("-6");
    }
    cmd.args(["-batch", "-"]);
    let mut text = lines.join("\n");
    text.push('\n');
    run_with_input(&mut cmd, Some(&text)).map(|_| ())
}

/// Names of all network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// PIDs of the processes inside a namespace (`ip netns pids`).
pub fn netns_pids(ns: &str) -> Result<Vec<i32>> {
    let out = run(Command::new("ip").args(["netns", "pids", ns]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Kills every process in the namespace (SIGKILL), then deletes it.
/// A namespace that does not exist is not an error.
pub fn remove_netns(ns: &str) -> Result<()> {
    if !list_netns()?.iter().any(|n| n == ns) {
        return Ok(());
    }
    for pid in netns_pids(ns)? {
        // SAFETY: kill has no memory-safety preconditions; the PID comes from
        // the namespace we are about to delete.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    ip(&["netns", "del", ns])
}

/// Runs `f` on a new thread that has entered network namespace `ns`.
/// Sockets and tun devices created by `f` stay in that namespace.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {path}"), e))?;
    let ns_name = ns.to_string();
    thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a valid namespace fd only changes this thread's
            // network namespace; the thread is ours and ends after `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(Error::io(
                    format!("entering namespace {ns_name}"),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| Error::Measure(format!("thread in namespace {ns} panicked")))?
    })
}

/// Sets sysctls (`net.ipv4.ip_forward` style keys) inside namespace `ns`.
pub fn sysctl(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ns_name = ns.to_string();
    in_netns(ns, move || -> Result<()> {
        for (key, value) in settings {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, &value)
                .map_err(|e| Error::io(format!("setting {key}={value} in {ns_name}"), e))?;
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_tool_finds_programs_on_path_only() {
        assert!(require_tool("sh").is_ok());
        assert!(matches!(
            require_tool("re6st-no-such-tool"),
            Err(Error::MissingTool(t)) if t == "re6st-no-such-tool"
        ));
    }
}
