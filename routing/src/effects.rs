//! What a router's loop must not wait for, on a tokio task of its own:
//! kernel route changes (coalesced per destination: changes queued
//! meanwhile for the same destination replace each other) and the
//! persisted seqno (reserved in blocks, so that a crashed node restarts
//! with a seqno newer than any it used). Both the tokio driver and the
//! embedded router (on the node's data-plane thread) hand their effects
//! here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use crate::driver::DriverConfig;
use crate::kernel::Kernel;
use crate::router::{RouteChange, RouteKey, Router};

/// Seqnos reserved ahead in the seqno file: it is rewritten only after
/// half of them are used, and always names one newer than any used.
const SEQNO_RESERVE: u16 = 64;

/// Longest wait for the kernel to answer a netlink request.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

/// The persisted seqno: one newer than any used before.
pub fn load_seqno(path: &Path) -> Option<u16> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn store_seqno(path: &Path, seqno: u16) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{seqno}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Keeps the seqno file ahead of the router's seqno.
struct SeqnoStore {
    path: PathBuf,
    base: u16,
}

impl SeqnoStore {
    fn new(path: PathBuf, seqno: u16) -> anyhow::Result<Self> {
        store_seqno(&path, seqno.wrapping_add(SEQNO_RESERVE))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path, base: seqno })
    }

    fn update(&mut self, seqno: u16) {
        if seqno.wrapping_sub(self.base) < SEQNO_RESERVE / 2 {
            return;
        }
        match store_seqno(&self.path, seqno.wrapping_add(SEQNO_RESERVE)) {
            Ok(()) => self.base = seqno,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot persist the seqno")
            }
        }
    }
}

/// Work for the effects task.
enum Effect {
    Route(RouteChange),
    Seqno(u16),
    /// Remove all our routes, then answer.
    Flush(oneshot::Sender<()>),
}

fn change_key(c: &RouteChange) -> RouteKey {
    match c {
        RouteChange::Install { key, .. }
        | RouteChange::Unreachable { key }
        | RouteChange::Remove { key } => *key,
    }
}

async fn run(
    kernel: Option<Kernel>,
    mut seqno: Option<SeqnoStore>,
    mut ops: mpsc::UnboundedReceiver<Effect>,
) {
    while let Some(op) = ops.recv().await {
        let mut batch: BTreeMap<RouteKey, RouteChange> = BTreeMap::new();
        let mut flush = None;
        let mut next = Some(op);
        while let Some(op) = next {
            match op {
                Effect::Route(c) => {
                    batch.insert(change_key(&c), c);
                }
                Effect::Seqno(n) => {
                    if let Some(s) = seqno.as_mut() {
                        s.update(n);
                    }
                }
                Effect::Flush(done) => flush = Some(done),
            }
            next = ops.try_recv().ok();
        }
        if let Some(kernel) = &kernel {
            for change in batch.values() {
                match tokio::time::timeout(NETLINK_TIMEOUT, kernel.apply(change, Some)).await {
                    Ok(Ok(())) => tracing::debug!(?change, "route change"),
                    Ok(Err(e)) => tracing::warn!(?change, error = %e, "kernel route"),
                    Err(_) => tracing::warn!(?change, "netlink did not answer: kernel route"),
                }
            }
        }
        if let Some(done) = flush {
            if let Some(kernel) = &kernel {
                if let Err(e) = kernel.flush().await {
                    tracing::warn!(error = %e, "removing our routes");
                }
            }
            let _ = done.send(());
            return;
        }
    }
}

/// The handle of the effects task.
#[derive(Debug)]
pub struct Effects {
    tx: mpsc::UnboundedSender<Effect>,
    seqno: u16,
}

impl Effects {
    /// Persists `seqno` (when `cfg` names a file), removes stale routes of
    /// a previous run and installs the covering routes (when `cfg`
    /// installs routes), then starts the task on the current runtime.
    pub async fn start(cfg: &DriverConfig, seqno: u16) -> anyhow::Result<Self> {
        let store = cfg
            .seqno_file
            .clone()
            .map(|p| SeqnoStore::new(p, seqno))
            .transpose()?;
        let kernel = if cfg.install {
            let k = Kernel::new(cfg.table, cfg.proto, cfg.pref_src)?;
            // A netlink answer that never comes must not freeze routing.
            match tokio::time::timeout(NETLINK_TIMEOUT, k.flush()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(stale)) => tracing::info!(stale, "removed stale routes of a previous run"),
                Ok(Err(e)) => return Err(e.context("removing stale routes")),
                Err(_) => tracing::warn!("netlink did not answer while removing stale routes"),
            }
            for prefix in &cfg.cover {
                match tokio::time::timeout(NETLINK_TIMEOUT, k.cover(*prefix)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.context(format!("installing unreachable {prefix}"))),
                    Err(_) => tracing::warn!(%prefix, "netlink did not answer: covering route"),
                }
            }
            Some(k)
        } else {
            None
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(kernel, store, rx));
        Ok(Self { tx, seqno })
    }

    /// Hands over the router's pending route changes and its seqno
    /// (never blocks).
    pub fn drain(&mut self, router: &mut Router) {
        while let Some(change) = router.poll_route_change() {
            let _ = self.tx.send(Effect::Route(change));
        }
        if router.seqno() != self.seqno {
            self.seqno = router.seqno();
            let _ = self.tx.send(Effect::Seqno(self.seqno));
        }
    }

    /// A receiver answered once every queued change is applied and all
    /// our routes are removed (the task then stops).
    pub fn flush_later(&self) -> oneshot::Receiver<()> {
        let (done, flushed) = oneshot::channel();
        let _ = self.tx.send(Effect::Flush(done));
        flushed
    }

    /// Waits (at most a few seconds) for [`Effects::flush_later`].
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(NETLINK_TIMEOUT * 2, self.flush_later()).await;
    }
}
