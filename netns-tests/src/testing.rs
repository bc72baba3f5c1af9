//! The runner of netns test suites (`harness = false` test targets).
//!
//! Without root every test is reported as *ignored*, under a loud banner,
//! never as passed. With root, after the suite, any namespace or child
//! process this run left behind fails the run.

use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::error::{Error, Result};
use crate::{cleanup, netns};

/// One test: its name and its body.
pub type NetTest = (&'static str, fn() -> Result<()>);

/// `Err(Measure(msg))` unless `cond`.
pub fn check(cond: bool, msg: impl Into<String>) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Measure(msg.into()))
    }
}

/// Runs `tests` with libtest's command line (filters, `--list`, threads...).
pub fn run_suite(tests: &[NetTest]) -> ExitCode {
    let args = Arguments::from_args();
    let root = netns::is_root();
    if !root {
        eprintln!(
            "\n**********************************************************************\n\
             * netns tests SKIPPED: they build network namespaces and need root. *\n\
             * They are reported as ignored below. Run the suite as root.        *\n\
             **********************************************************************\n"
        );
    }
    let trials = tests
        .iter()
        .map(|&(name, f)| {
            Trial::test(name, move || f().map_err(|e| Failed::from(e.to_string())))
                .with_ignored_flag(!root)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if root {
        if let Some(problem) = leftovers() {
            eprintln!("netns tests: {problem}");
            return ExitCode::FAILURE;
        }
    }
    conclusion.exit_code()
}

/// What this process left behind: its namespaces or child processes.
fn leftovers() -> Option<String> {
    let me = format!("-{}-", std::process::id());
    let left: Vec<String> = netns::list_netns()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(cleanup::NAME_PREFIX) && n.contains(&me))
        .collect();
    if !left.is_empty() {
        return Some(format!("namespaces left behind after the suite: {left:?}"));
    }
    let mut children = String::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            children += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        }
    }
    if !children.trim().is_empty() {
        return Some(format!(
            "child processes left behind after the suite: {children}"
        ));
    }
    None
}
