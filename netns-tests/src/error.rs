//! Errors of the harness.

use std::time::Duration;

/// A topology that cannot be built, found before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A link, LAN or WAN path names a host that was never declared.
    #[error("unknown host: {0}")]
    UnknownHost(String),
    /// Two subnets of the topology overlap.
    #[error("overlapping addresses: {0}")]
    Overlap(String),
    /// A delay, jitter or loss rate outside what the emulator accepts.
    #[error("parameter out of range: {0}")]
    OutOfRange(String),
    /// Anything else wrong with the description.
    #[error("invalid topology: {0}")]
    Invalid(String),
}

/// Everything that can go wrong while building or using a test network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The topology was refused before anything was created.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Namespaces need root.
    #[error("network namespaces need root (running as uid {0})")]
    NotRoot(u32),
    /// A program the harness runs is not installed.
    #[error("`{0}` is not installed (scripts/deps.sh installs what the tests need)")]
    MissingTool(String),
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// A measurement could not be made or read.
    #[error("measurement failed: {0}")]
    Measure(String),
    /// The run was interrupted (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    /// A name that the network does not have.
    #[error("no such {kind} {name:?} in this network")]
    NoSuch {
        /// "host", "LAN", ...
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result type of the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;
