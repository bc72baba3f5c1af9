//! Opening tunnels: set-up requests, answers, and who keeps which tunnel
//! when both ends open at once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use re6st_tunnel::policy::{self, Admission, Peer};
use re6st_tunnel::setup::{self, Decision, Outcome, Refusal, Reply};

use re6st_tunnel::endpoint::{Endpoint, Transport};

use super::{
    Action, Attempt, FailReason, LossReason, NodeCore, RegistryRequest, Resend, Timer, ASK_TIMEOUT,
};
use crate::peer::Body;

/// First re-send of a request to a NATed peer (then twice that, three
/// times: within [`ASK_TIMEOUT`]).
pub const RESEND_AFTER: Duration = Duration::from_millis(300);
/// Re-sends of a request to a NATed peer.
const RESENDS: u8 = 3;
/// Endpoints punched for one request, at most.
pub const MAX_PUNCH_ENDPOINTS: usize = 4;

impl NodeCore {
    /// Starts opening an outgoing tunnel: endpoints from the cache, else
    /// (or when they did not answer last time) asked to the node itself
    /// over the overlay.
    pub(super) fn open(&mut self, now: Instant, unix: i64, p: Peer) {
        if self.revoked
            || self.tunnels.contains_key(&p)
            || self.pending.contains_key(&p)
            || self.asking.contains(&p)
        {
            return;
        }
        // The policy chose the peer; the cache is only its address book
        // here (back-off included).
        let stale = self.stale.remove(&p);
        match self.book.endpoints(p).map(<[SocketAddr]>::to_vec) {
            Some(eps) if !eps.is_empty() && !stale => {
                self.request_setup(now, unix, p, &eps, self.dial());
            }
            _ => {
                tracing::debug!(peer = %p, "asking for its endpoints");
                self.asking.insert(p);
                self.timers.set(Timer::Ask(p), now + ASK_TIMEOUT);
                self.send_peer(unix, p, &Body::EndpointsRequest);
            }
        }
    }

    /// Sends a set-up request to every usable endpoint of `p` over
    /// `transport` (UDP first; TCP when UDP got no answer). Over UDP, a
    /// peer behind a NAT (its record says so) is first asked, over the
    /// overlay, to punch towards our endpoints, and the request is sent
    /// again while its punch travels.
    pub(super) fn request_setup(
        &mut self,
        now: Instant,
        unix: i64,
        p: Peer,
        endpoints: &[SocketAddr],
        transport: Transport,
    ) {
        let (usable, unusable): (Vec<SocketAddr>, Vec<SocketAddr>) = endpoints
            .iter()
            .partition(|e| re6st_tunnel::link::usable_endpoint(e.ip()));
        if !unusable.is_empty() {
            tracing::debug!(peer = %p, ?unusable, "loopback, link-local or junk endpoints, not dialled");
            *self
                .metrics
                .rejected
                .entry("endpoint_unusable".to_string())
                .or_default() += unusable.len() as u64;
        }
        match setup::request(&self.me, p, unix) {
            Ok((bytes, nonce)) => {
                for ep in &usable {
                    self.push(Action::Send {
                        dst: Endpoint {
                            addr: *ep,
                            transport,
                        },
                        bytes: bytes.clone(),
                    });
                }
                self.pending.insert(
                    p,
                    Attempt {
                        nonce,
                        endpoints: usable.clone(),
                        transport,
                    },
                );
                self.timers.set(Timer::Setup(p), now + ASK_TIMEOUT);
                if transport == Transport::Udp
                    && self.book.nat(p)
                    && !self.reach.endpoints.is_empty()
                {
                    let endpoints = self.reach.endpoints.clone();
                    tracing::debug!(peer = %p, "behind a NAT: asking it to punch");
                    self.send_peer(unix, p, &Body::Punch { endpoints });
                    self.resend.insert(
                        p,
                        Resend {
                            bytes,
                            to: usable,
                            left: RESENDS,
                        },
                    );
                    self.timers.set(Timer::Resend(p), now + RESEND_AFTER);
                }
            }
            Err(e) => tracing::warn!(error = %e, "set-up request"),
        }
    }

    /// The transport of a new set-up: ours if we have one, else UDP.
    pub(super) fn dial(&self) -> Transport {
        self.roles.transport.unwrap_or(Transport::Udp)
    }

    /// Sends our pending request to a NATed peer again (its punch may
    /// have opened the way since).
    pub(super) fn resend_setup(&mut self, now: Instant, p: Peer) {
        let Some(r) = self.resend.get_mut(&p) else {
            return;
        };
        r.left = r.left.saturating_sub(1);
        let sends: Vec<Action> =
            r.to.iter()
                .map(|dst| Action::Send {
                    dst: Endpoint::udp(*dst),
                    bytes: r.bytes.clone(),
                })
                .collect();
        let again = r.left > 0;
        let wait = RESEND_AFTER * u32::from(RESENDS - r.left + 1);
        for a in sends {
            self.push(a);
        }
        if again {
            self.timers.set(Timer::Resend(p), now + wait);
        } else {
            self.resend.remove(&p);
        }
    }

    /// A peer dialling us asks us to punch: one datagram to each of its
    /// endpoints opens our NAT for its set-up request and handshake.
    pub(super) fn on_punch_request(&mut self, from: Peer, endpoints: &[SocketAddr]) {
        if self.revoked {
            return;
        }
        let (ok, bad): (Vec<&SocketAddr>, Vec<&SocketAddr>) = endpoints
            .iter()
            .take(MAX_PUNCH_ENDPOINTS)
            .partition(|e| re6st_tunnel::link::usable_endpoint(e.ip()) && e.port() != 0);
        if !bad.is_empty() || endpoints.len() > MAX_PUNCH_ENDPOINTS {
            *self
                .metrics
                .rejected
                .entry("punch_endpoint".to_string())
                .or_default() += 1;
        }
        tracing::debug!(peer = %from, endpoints = ?ok, "punching");
        for dst in ok {
            self.metrics.punches += 1;
            self.push(Action::Send {
                dst: Endpoint::udp(*dst),
                bytes: setup::punch(),
            });
        }
    }

    /// A set-up request. When both ends open at once, the larger prefix
    /// keeps its own attempt (one not established yet); a valid request
    /// from a peer we have an established tunnel with means the peer lost
    /// its state (it restarted): that tunnel is dead and the new one
    /// replaces it.
    pub(super) fn on_setup_request(
        &mut self,
        now: Instant,
        unix: i64,
        src: Endpoint,
        bytes: &[u8],
    ) {
        let me = self.prefix;
        let revoked = self.revoked;
        let suggestions: Vec<Peer> = self.tunnels.keys().copied().take(8).collect();
        let (policy, view, tunnels, pending) =
            (&mut self.policy, &self.view, &self.tunnels, &self.pending);
        let mut actions = Vec::new();
        let mut restarted = None;
        let outcome = self.responder.handle(now, unix, src.addr, bytes, |cert| {
            let p = cert.prefix;
            let existing = tunnels.get(&p);
            let attempt = pending.contains_key(&p) || existing.is_some_and(|t| t.outgoing && !t.up);
            if revoked || (me > p && attempt) {
                return Decision::Busy(suggestions.clone());
            }
            if let Some(t) = existing.filter(|t| t.up) {
                restarted = Some(p);
                if t.outgoing {
                    actions.extend(policy.on_down(p, now, view));
                } else {
                    policy.on_incoming_closed(p);
                }
            }
            let (adm, acts) = policy.on_incoming(p, now, view);
            actions.extend(acts);
            match adm {
                Admission::Accept => Decision::Accept,
                Admission::Busy => Decision::Busy(suggestions.clone()),
            }
        });
        match outcome {
            Outcome::Accepted { peer, reply } => {
                let p = peer.prefix;
                // Both ends were opening: the policy drops our attempt
                // (Close), which must not close the tunnel being accepted.
                actions.retain(|a| *a != policy::Action::Close(p));
                self.forget_attempt(p);
                if let Some(p) = restarted {
                    self.restarted(p);
                }
                self.add_tunnel(now, p, &peer, None, false);
                self.push(Action::Send {
                    dst: src,
                    bytes: reply,
                });
            }
            Outcome::Reply(reply) => {
                if let Some(p) = restarted {
                    self.restarted(p);
                }
                self.push(Action::Send {
                    dst: src,
                    bytes: reply,
                });
            }
            Outcome::Dropped(e) => {
                tracing::debug!(%src, error = %e, "set-up request dropped");
            }
        }
        self.act(now, unix, actions);
    }

    /// The established tunnel to `p` is dead: its peer restarted.
    fn restarted(&mut self, p: Peer) {
        if self.remove_tunnel(p).is_some() {
            tracing::info!(peer = %p, "the peer restarted: its new tunnel replaces the old one");
            *self
                .metrics
                .tunnels_lost
                .entry(LossReason::PeerRestarted.label().to_string())
                .or_default() += 1;
        }
    }

    /// An answer to one of our set-up requests.
    pub(super) fn on_setup_reply(&mut self, now: Instant, unix: i64, src: Endpoint, bytes: &[u8]) {
        if setup::is_punch(bytes) {
            // A NATed peer opened its way to us; nothing to answer.
            tracing::debug!(%src, "punch received");
            return;
        }
        let found = self.pending.iter().find_map(|(p, a)| {
            setup::check_reply(&self.ca, &self.netconf.crl, *p, &a.nonce, unix, bytes)
                .ok()
                .map(|r| (*p, r))
        });
        let Some((p, answer)) = found else {
            *self
                .metrics
                .rejected
                .entry("setup_reply".to_string())
                .or_default() += 1;
            return;
        };
        self.forget_attempt(p);
        // Over TCP the responder sees our NAT's TCP mapping, which says
        // nothing of the UDP one.
        if let Some(seen) = answer.seen.filter(|_| src.transport == Transport::Udp) {
            self.on_seen(now, unix, p, seen);
        }
        match answer.reply {
            Reply::Accepted(cert) => self.add_tunnel(now, p, &cert, Some(src), true),
            Reply::Busy(_) => self.failed(now, unix, p, FailReason::Busy),
            Reply::Refused(reason) => {
                tracing::warn!(peer = %p, reason = reason.label(), "tunnel refused");
                // A signed claim of the peer's, no proof that we are
                // revoked: the registry's CA-signed configuration is.
                if reason == Refusal::Revoked {
                    self.request(RegistryRequest::Config);
                }
                self.unreachable(now, unix, p, FailReason::Refused);
            }
        }
    }
}
