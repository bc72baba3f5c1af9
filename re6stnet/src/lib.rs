//! The re6st-rs node: enrolment with a registry ([`enrol`], the
//! `re6st-conf` tool), the peer protocol ([`peer`]), the node's decisions
//! ([`node`]) and the daemon that drives them ([`daemon`]), and
//! `re6stctl`'s control API ([`ctl`]).

pub mod babel;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod enrol;
pub mod ipv4;
pub mod node;
pub mod overlay_table;
pub mod path;
pub mod peer;
pub mod report;
pub mod state;
pub mod system;

/// Resolves at SIGINT or SIGTERM (never, if the handlers cannot be set).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// The runtime of our daemons' control side: one thread (the work is
/// I/O-bound, nodes may be small machines, and the node's packets are
/// moved by the data plane's own thread), so no work-stealing and no
/// wake-ups between workers.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
