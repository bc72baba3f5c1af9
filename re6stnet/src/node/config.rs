//! The live network configuration, revocation, the Babel keys, renewal,
//! our peer record, and the answers of the registry.

use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use re6st_registry::auth::SignedPeerRecord;
use re6st_registry::config::{HmacKeys, NetworkConfig, SignedConfig};
use re6st_tunnel::policy::{Peer, PolicyConfig};
use re6st_tunnel::setup::Responder;

use super::{
    identity, retry_delay, Action, CacheChange, CoreError, LossReason, NodeCore, RegistryRequest,
    RegistryResult, Timer, HMAC_RETRY_MAX, PUBLISH_RETRY, RECORD_REFRESH, REGISTRY_RETRY,
    RENEW_BEFORE_S, RENEW_CHECK, RENEW_RETRY,
};
use crate::peer::{Body, PeerProtocol};

/// Where a network configuration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// The registry.
    Registry,
    /// A peer (flooded over the peer protocol).
    Peer,
}

impl ConfigSource {
    fn label(self) -> &'static str {
        match self {
            Self::Registry => "registry",
            Self::Peer => "peer",
        }
    }
}

/// What a node changes of the network's tunnel policy (its own flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Outgoing tunnels to keep, instead of the network's `client_count`.
    pub client_count: Option<u32>,
    /// Incoming tunnels to accept at most, instead of the network's
    /// `max_clients` (0: a client-only node).
    pub max_clients: Option<u32>,
    /// Nodes we always keep a tunnel with.
    pub neighbours: Vec<Ipv6Net>,
    /// MTU of our tunnel devices, instead of the network's `mtu`.
    pub mtu: Option<u32>,
    /// How we dial: None, UDP then TCP when UDP gets no answer; or only
    /// this one (TCP on a site known to block UDP).
    pub transport: Option<re6st_tunnel::endpoint::Transport>,
}

/// The policy's settings from the network configuration and our roles.
pub fn policy_config(c: &NetworkConfig, roles: &Roles) -> PolicyConfig {
    PolicyConfig {
        client_count: roles.client_count.unwrap_or(c.client_count) as usize,
        max_clients: roles.max_clients.unwrap_or(c.max_clients) as usize,
        pinned: roles.neighbours.iter().copied().collect(),
        tunnel_refresh: Duration::from_secs(u64::from(c.tunnel_refresh_s.max(1))),
        // Nodes of a new network start together: ask the registry again soon.
        backoff_base: Duration::from_secs(2),
        ..PolicyConfig::default()
    }
}

/// The Hello interval of tunnels.
pub fn hello_interval(c: &NetworkConfig) -> Duration {
    Duration::from_millis(u64::from(c.hello_interval_ms.max(10)))
}

impl NodeCore {
    /// The answer to a [`RegistryRequest`].
    pub fn handle_registry(&mut self, now: Instant, unix: i64, result: RegistryResult) {
        self.busy.remove(&result.kind());
        match &result {
            RegistryResult::Config(r) => self.registry_reachable = Some(r.is_ok()),
            RegistryResult::Bootstrap(r) => self.registry_reachable = Some(r.is_ok()),
            _ => {}
        }
        match result {
            RegistryResult::Config(Ok(signed)) => {
                self.config_failures = 0;
                self.on_config(now, unix, signed, ConfigSource::Registry);
            }
            RegistryResult::Config(Err(e)) => {
                tracing::debug!(error = %e, "registry unreachable");
                let delay = retry_delay(REGISTRY_RETRY, self.config_failures, self.config_refresh);
                self.config_failures = self.config_failures.saturating_add(1);
                let at = now + delay;
                if self.timers.get(Timer::Config).is_none_or(|t| t > at) {
                    self.timers.set(Timer::Config, at);
                }
            }
            RegistryResult::Hmac(r) => self.on_hmac(now, r),
            RegistryResult::Bootstrap(Ok(records)) => {
                for rec in &records {
                    self.book_insert(rec, unix);
                }
            }
            RegistryResult::Bootstrap(Err(e)) => tracing::debug!(error = %e, "bootstrap"),
            RegistryResult::Published(Ok(())) => {}
            RegistryResult::Published(Err(e)) => {
                tracing::debug!(error = %e, "publishing our peer record");
                self.timers.set(Timer::Record, now + PUBLISH_RETRY);
            }
            RegistryResult::Reported(Ok(())) => {}
            // The next report is due in a minute anyway.
            RegistryResult::Reported(Err(e)) => tracing::debug!(error = %e, "topology report"),
            RegistryResult::Renewed(r) => {
                match r.and_then(|pem| self.install_certificate(now, unix, pem)) {
                    Ok(()) => {
                        tracing::info!(not_after = self.cert.not_after, "certificate renewed")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewal");
                        self.timers.set(Timer::Renew, now + RENEW_RETRY);
                    }
                }
            }
        }
        self.settle(now);
    }

    fn on_hmac(&mut self, now: Instant, r: Result<HmacKeys, String>) {
        // A key set older than the configuration's or ours is a replay
        // (rolling keys back would cut us off the mesh).
        let floor = self.hmac.as_ref().map_or(self.netconf.hmac_version, |k| {
            k.version.max(self.netconf.hmac_version)
        });
        let checked = r.and_then(|k| {
            if k.version < floor {
                return Err(format!(
                    "key set version {} is older than {floor}: refused",
                    k.version
                ));
            }
            crate::state::auth_config(&k)
                .map(|_| k)
                .map_err(|e| format!("{e:#}"))
        });
        match checked {
            Ok(keys) => {
                self.hmac_failures = 0;
                self.timers.clear(Timer::Hmac);
                if self.hmac.as_ref() != Some(&keys) {
                    tracing::info!(version = keys.version, "Babel keys");
                    self.push(Action::SaveHmac(keys.clone()));
                    self.push(Action::SetBabelKeys(keys.clone()));
                    self.hmac = Some(keys);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Babel keys");
                let delay = retry_delay(REGISTRY_RETRY, self.hmac_failures, HMAC_RETRY_MAX);
                self.hmac_failures = self.hmac_failures.saturating_add(1);
                self.timers.set(Timer::Hmac, now + delay);
            }
        }
    }

    /// Asks for the Babel keys when ours are missing or of another version.
    pub(super) fn request_hmac(&mut self) {
        if self
            .hmac
            .as_ref()
            .is_none_or(|k| k.version != self.netconf.hmac_version)
        {
            self.request(RegistryRequest::Hmac);
        }
    }

    /// Stores a verified record in the cache (and the persistent one).
    pub(super) fn book_insert(&mut self, record: &SignedPeerRecord, unix: i64) {
        if let Some(evicted) = self.book.insert(record, &self.ca, &self.netconf.crl, unix) {
            for p in evicted {
                self.persist(CacheChange::Remove(p));
            }
            self.persist(CacheChange::Insert {
                record: record.clone(),
                unix,
            });
        }
    }

    /// Time to refresh our peer record: the driver finds our endpoints.
    pub(super) fn refresh_record(&mut self, now: Instant) {
        self.timers.set(Timer::Record, now + RECORD_REFRESH);
        self.push(Action::DetectEndpoints);
    }

    /// Renews the certificate when it expires within [`RENEW_BEFORE_S`].
    pub(super) fn check_renewal(&mut self, now: Instant, unix: i64) {
        self.timers.set(Timer::Renew, now + RENEW_CHECK);
        if self.cert.not_after - unix < RENEW_BEFORE_S {
            self.request(RegistryRequest::Renew);
        }
    }

    fn install_certificate(&mut self, now: Instant, unix: i64, pem: String) -> Result<(), String> {
        let cert = self
            .ca
            .verify_node(&pem, Some(unix))
            .map_err(|e| e.to_string())?;
        if cert.public_key != self.cert.public_key || cert.prefix != self.prefix {
            return Err("the registry renewed another identity".into());
        }
        let fresh = |c: &re6st_registry::cert::NodeCert| {
            identity(c, &self.key_pem).map_err(|e: CoreError| e.to_string())
        };
        let mut responder = Responder::new(self.ca.clone(), fresh(&cert)?);
        responder.set_crl(self.netconf.crl.clone());
        let mut peers = PeerProtocol::new(self.ca.clone(), fresh(&cert)?);
        peers.set_crl(self.netconf.crl.clone());
        self.me = fresh(&cert)?;
        self.responder = responder;
        self.peers = peers;
        self.cert = cert;
        self.cert_pem = pem.clone();
        self.push(Action::SaveCertificate(pem));
        self.refresh_record(now);
        // Every peer message carries our certificate: our tunnel peers
        // learn the new serial before the registry revokes the old one.
        let version = self.netconf.version;
        for p in self.tunnel_peers() {
            self.send_peer(unix, p, &Body::ConfigVersion { version });
        }
        Ok(())
    }

    /// A signed configuration from the registry or a peer: applied live
    /// when newer, and passed on to our tunnel peers.
    pub(super) fn on_config(
        &mut self,
        now: Instant,
        unix: i64,
        signed: SignedConfig,
        from: ConfigSource,
    ) {
        let c = match signed.verify(&self.ca) {
            Ok(c) => c,
            Err(e) => {
                *self
                    .metrics
                    .rejected
                    .entry("bad_config".to_string())
                    .or_default() += 1;
                tracing::warn!(from = from.label(), error = %e, "network configuration refused");
                return;
            }
        };
        if c.version <= self.netconf.version || c.network != self.netconf.network {
            return;
        }
        tracing::info!(
            from = from.label(),
            version = c.version,
            "new network configuration"
        );
        self.push(Action::SaveNetwork(signed.clone()));
        // What a peer announced has arrived (or something newer).
        self.timers.clear(Timer::Announced);
        let old = std::mem::replace(&mut self.netconf, c);
        self.signed = signed;
        self.metrics.config_changes += 1;
        self.policy
            .set_config(policy_config(&self.netconf, &self.roles), now);
        self.apply_crl(now, unix);
        let mtu = self.mtu();
        if self.roles.mtu.unwrap_or(old.mtu) != mtu {
            tracing::info!(mtu, "tunnel MTU changed");
            let names: Vec<String> = self.tunnels.values().map(|t| t.name.clone()).collect();
            for name in names {
                self.push(Action::SetMtu { name, mtu });
            }
        }
        if old.hello_interval_ms != self.netconf.hello_interval_ms {
            let interval = hello_interval(&self.netconf);
            let names: Vec<String> = self
                .tunnels
                .values()
                .map(|t| t.name.clone())
                .chain(self.interfaces.iter().cloned())
                .collect();
            for name in names {
                self.push(Action::SetHelloInterval { name, interval });
            }
        }
        self.request_hmac();
        let version = self.netconf.version;
        for p in self.tunnel_peers() {
            self.send_peer(unix, p, &Body::ConfigVersion { version });
        }
    }

    /// Applies the CRL of the configuration (new, or cached at start): we
    /// stop if it names us; tunnels of revoked peers close; revoked peers
    /// leave the cache and no attempt towards them goes on.
    pub(super) fn apply_crl(&mut self, now: Instant, unix: i64) {
        self.responder.set_crl(self.netconf.crl.clone());
        self.peers.set_crl(self.netconf.crl.clone());
        if self.netconf.crl.contains(&self.cert.serial) && !self.revoked {
            self.revoked = true;
            self.push(Action::Revoked);
            for p in self.tunnel_peers() {
                self.send_peer(unix, p, &Body::Close);
                self.lost(now, unix, p, LossReason::WeAreRevoked);
            }
            for p in std::mem::take(&mut self.pending).into_keys() {
                self.timers.clear(Timer::Setup(p));
            }
            for p in std::mem::take(&mut self.asking) {
                self.timers.clear(Timer::Ask(p));
            }
        }
        let revoked: Vec<Peer> = self
            .tunnels
            .iter()
            .filter(|(_, t)| self.netconf.crl.contains(&t.serial))
            .map(|(p, _)| *p)
            .collect();
        for p in revoked {
            tracing::warn!(peer = %p, "closing the tunnel of a revoked node");
            if self.book.remove(p) {
                self.persist(CacheChange::Remove(p));
            }
            self.lost(now, unix, p, LossReason::Revoked);
        }
        // Revoked peers we have no tunnel with.
        for p in self.book.prune(&self.ca, &self.netconf.crl, unix) {
            self.forget_attempt(p);
            self.persist(CacheChange::Remove(p));
        }
    }

    fn tunnel_peers(&self) -> Vec<Peer> {
        self.tunnels.keys().copied().collect()
    }
}
