//! The router driven by another event loop: the node's data-plane reactor
//! runs it on its own thread, feeding it the Babel datagrams it decrypts
//! and encrypting what it sends, so Babel on the node's links never
//! crosses the kernel. Kernel routes and the seqno file are written by
//! the [`Effects`] task on the control thread's runtime; nothing here
//! blocks.

use std::net::IpAddr;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::driver::DriverConfig;
use crate::effects::{self, Effects};
use crate::neighbour::IfaceId;
use crate::router::{Router, RoutingState, Transmit};

/// A router and its effects.
#[derive(Debug)]
pub struct Embedded {
    router: Router,
    effects: Effects,
}

impl Embedded {
    /// Prepares the kernel and the seqno file (as the tokio driver does)
    /// and makes the router; call it on the runtime that will run the
    /// effects task.
    pub async fn start(cfg: &DriverConfig, now: Instant) -> anyhow::Result<Self> {
        let mut rcfg = cfg.router.clone();
        if let Some(s) = cfg.seqno_file.as_deref().and_then(effects::load_seqno) {
            rcfg.seqno = s;
        }
        let effects = Effects::start(cfg, rcfg.seqno).await?;
        Ok(Self {
            router: Router::new(rcfg, now),
            effects,
        })
    }

    /// Changes the router (interfaces, exports, keys, costs); its effects
    /// are handed over after.
    pub fn with_router<R>(&mut self, f: impl FnOnce(&mut Router) -> R) -> R {
        let r = f(&mut self.router);
        self.effects.drain(&mut self.router);
        r
    }

    /// See [`Router::handle_packet`].
    pub fn handle_packet(
        &mut self,
        now: Instant,
        rx_time: Instant,
        iface: IfaceId,
        src: IpAddr,
        bytes: &[u8],
    ) {
        self.with_router(|r| r.handle_packet(now, rx_time, iface, src, bytes));
    }

    /// See [`Router::handle_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.with_router(|r| r.handle_timeout(now));
    }

    /// See [`Router::poll_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.router.poll_timeout()
    }

    /// See [`Router::poll_transmit`].
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.router.poll_transmit()
    }

    /// Whether the router runs on this interface.
    pub fn has_interface(&self, iface: IfaceId) -> bool {
        self.router.has_interface(iface)
    }

    /// The router's state.
    pub fn state(&self, now: Instant) -> RoutingState {
        self.router.state(now)
    }

    /// Retracts everything (the final packets are in the outbox), and
    /// queues the removal of every route we installed; the receiver is
    /// answered once the kernel is clean.
    pub fn shutdown(&mut self, now: Instant) -> oneshot::Receiver<()> {
        self.with_router(|r| r.shutdown(now));
        self.effects.flush_later()
    }
}
