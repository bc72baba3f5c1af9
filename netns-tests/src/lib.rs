//! The network-namespace harness of re6st-rs.
//!
//! Builds whole networks on one Linux machine: one namespace per host, an
//! `inet` namespace that plays the Internet through a userspace WAN emulator
//! (per-pair one-way delay, jitter, loss and blackholes, changeable live),
//! optional LAN segments and direct links; runs programs inside hosts with
//! their output logged; measures RTT, waits for conditions, probes loss
//! windows and summarises samples. Everything is torn down on drop, also on
//! panic; the `cleanup` subcommand of `re6st-demo` removes leftovers of a
//! crashed run.
//!
//! ```no_run
//! use netns_tests::{LinkParams, Net, Topology};
//! # fn main() -> netns_tests::Result<()> {
//! let mut t = Topology::new("example");
//! t.host("a").host("b").wan_both("a", "b", LinkParams::delay_ms(25));
//! let net = Net::build(&t)?;
//! let b = net.host("b")?.addr(false)?;
//! let rtt = netns_tests::probe::ping(net.host("a")?, b, 5, std::time::Duration::from_millis(200))?;
//! println!("{rtt:?}");
//! net.wan()?.blackhole("a", "b")?;
//! # Ok(()) }
//! ```

pub mod babel;
pub mod cleanup;
pub mod error;
pub mod mesh;
pub mod net;
pub mod netns;
pub mod orch;
pub mod probe;
pub mod process;
pub mod stats;
pub mod testing;
pub mod topology;
pub mod wan;

pub use error::{Error, Result, TopologyError};

/// Where [`binary`] looks instead of next to the running executable, once
/// [`set_binary_dir`] was called.
static BINARY_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Makes [`binary`] take every workspace binary from `dir` (another build,
/// to compare builds with the same harness). Only the first call counts;
/// false when a directory was already set.
pub fn set_binary_dir(dir: std::path::PathBuf) -> bool {
    BINARY_DIR.set(dir).is_ok()
}

/// Path of a binary of this workspace, built next to the running test
/// (`target/<profile>/NAME`), or in the directory given to
/// [`set_binary_dir`]. Errors with a hint when it was not built.
pub fn binary(name: &str) -> Result<std::path::PathBuf> {
    let dir = match BINARY_DIR.get() {
        Some(dir) => dir.clone(),
        None => build_dir()?,
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Measure(format!(
            "{} not found: build it first (cargo build --workspace --bins)",
            path.display()
        )))
    }
}
/// The build directory of the running executable (`target/<profile>`).
fn build_dir() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the test executable", e))?;
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Where a test keeps a file it made for people to look at (a
/// screenshot): `target/<profile>/netns-artifacts/NAME`, which outlives
/// the test's logs.
pub fn artifact(name: &str) -> Result<std::path::PathBuf> {
    let dir = build_dir()?.join("netns-artifacts");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    Ok(dir.join(name))
}

pub use net::{Host, Net};
pub use process::Process;
pub use topology::{LinkParams, Topology};
pub use wan::WanHandle;
