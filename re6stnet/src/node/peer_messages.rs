//! Reactions to peer-protocol messages.

use std::net::SocketAddr;
use std::time::Instant;

use re6st_tunnel::policy::DRAIN_MULTIPLIER;

use super::{Action, ConfigSource, FailReason, LossReason, NodeCore};
use crate::peer::{Body, PeerError};

/// The metrics label of a message's kind.
pub fn body_kind(b: &Body) -> &'static str {
    match b {
        Body::EndpointsRequest => "endpoints_request",
        Body::Punch { .. } => "punch",
        Body::Endpoints { .. } => "endpoints",
        Body::ConfigVersion { .. } => "config_version",
        Body::ConfigRequest => "config_request",
        Body::Config { .. } => "config",
        Body::DrainRequest => "drain_request",
        Body::DrainAck => "drain_ack",
        Body::Close => "close",
        Body::NodeInfoRequest => "node_info_request",
        Body::NodeInfo { .. } => "node_info",
    }
}

/// The metrics label of a refused message.
fn error_kind(e: &PeerError) -> &'static str {
    match e {
        PeerError::Malformed(_) => "peer_malformed",
        PeerError::Stale => "peer_stale",
        PeerError::NotForUs => "peer_not_for_us",
        PeerError::BadCertificate(_) => "peer_bad_certificate",
        PeerError::Revoked(_) => "peer_revoked",
        PeerError::Spoofed(_) => "peer_spoofed",
        PeerError::BadSignature => "peer_bad_signature",
        PeerError::Replay => "peer_replay",
        PeerError::RateLimited => "peer_rate_limited",
    }
}

impl NodeCore {
    pub(super) fn on_peer_message(
        &mut self,
        now: Instant,
        unix: i64,
        src: SocketAddr,
        bytes: &[u8],
    ) {
        let (cert, body) = match self.peers.open(now, src.ip(), bytes, unix) {
            Ok(x) => x,
            Err(e) => {
                *self
                    .metrics
                    .rejected
                    .entry(error_kind(&e).to_string())
                    .or_default() += 1;
                tracing::debug!(%src, error = %e, "peer message dropped");
                return;
            }
        };
        *self
            .metrics
            .peer_in
            .entry(body_kind(&body).to_string())
            .or_default() += 1;
        let from = cert.prefix;
        if let Some(t) = self.tunnels.get_mut(&from) {
            if t.follow_renewal(cert.serial, &cert.wg_key) {
                tracing::info!(peer = %from, serial = cert.serial, "peer renewed its certificate");
            }
        }
        match body {
            Body::EndpointsRequest => {
                if let Some(record) = self.record.clone() {
                    self.send_peer(unix, from, &Body::Endpoints { record });
                }
            }
            Body::Endpoints { record } => {
                let eps = match record.verify(&self.ca, unix, &self.netconf.crl) {
                    Ok((rec, c)) if c.prefix == from => {
                        self.book_insert(&record, unix);
                        rec.endpoints
                    }
                    Ok(_) => Vec::new(),
                    Err(e) => {
                        tracing::debug!(peer = %from, error = %e, "peer record refused");
                        Vec::new()
                    }
                };
                if self.asking.remove(&from) {
                    self.timers.clear(super::Timer::Ask(from));
                    if eps.is_empty() {
                        self.unreachable(now, unix, from, FailReason::NoEndpoint);
                    } else {
                        self.request_setup(now, unix, from, &eps, self.dial());
                    }
                }
            }
            Body::ConfigVersion { version } => {
                if version > self.netconf.version {
                    self.send_peer(unix, from, &Body::ConfigRequest);
                    // Armed once, never moved: announcements cannot
                    // postpone the registry's answer.
                    if self.timers.get(super::Timer::Announced).is_none() {
                        self.timers
                            .set(super::Timer::Announced, now + super::ASK_TIMEOUT);
                    }
                }
            }
            Body::ConfigRequest => {
                let signed = self.signed.clone();
                self.send_peer(unix, from, &Body::Config { signed });
            }
            Body::Config { signed } => self.on_config(now, unix, signed, ConfigSource::Peer),
            Body::DrainRequest => {
                if let Some(t) = self.tunnels.get_mut(&from) {
                    t.cost = DRAIN_MULTIPLIER;
                    let name = t.name.clone();
                    self.push(Action::SetCost {
                        name,
                        multiplier: DRAIN_MULTIPLIER,
                    });
                    self.send_peer(unix, from, &Body::DrainAck);
                }
            }
            Body::DrainAck | Body::NodeInfo { .. } => {}
            Body::Close => self.lost(now, unix, from, LossReason::ClosedByPeer),
            Body::Punch { endpoints } => self.on_punch_request(from, &endpoints),
            Body::NodeInfoRequest => {
                let info = Body::NodeInfo {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    outgoing: self.policy.outgoing().map(ToString::to_string).collect(),
                    incoming: self.policy.incoming().map(ToString::to_string).collect(),
                };
                self.send_peer(unix, from, &info);
            }
        }
    }
}
