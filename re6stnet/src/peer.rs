//! The peer protocol (UDP 326 over overlay addresses), sans-IO: signed,
//! replay-protected messages between nodes, which may cross several hops.
//!
//! A datagram is `R6P1` then JSON `{cert, to, ts, nonce, body, sig}`: the
//! sender's certificate (so any node can check a message without prior
//! state), the addressee's prefix, a timestamp, a random nonce, the body, and
//! an Ed25519 signature over all of it. The receiver checks, cheapest first:
//! size, rate (per source /64), structure, freshness (±60 s), addressee,
//! the certificate's claims (CRL, that the source address lies in its
//! prefix) before its chain, the signature, and replay (a bounded set of
//! recent nonces).
//!
//! Bodies: ask for endpoints / the signed peer record; announce a network
//! config version / ask for / carry the CA-signed config (so a new config
//! floods node to node even with the registry down); drain request / ack
//! (graceful tunnel retirement); close; punch (hole punching through a
//! NAT); node info for topology.

use std::net::IpAddr;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use re6st_registry::auth::SignedPeerRecord;
use re6st_registry::cert::{sign, verify_ed25519, CaCert, NodeCert};
use re6st_registry::config::{random_bytes, SignedConfig};
use re6st_tunnel::replay::ReplayWindow;
use re6st_tunnel::setup::Identity;
use re6st_tunnel::source_limit::SourceLimiter;
use serde::{Deserialize, Serialize};

/// First bytes of every peer-protocol datagram.
pub const MAGIC: &[u8; 4] = b"R6P1";
/// Largest datagram.
pub const MAX_SIZE: usize = 8192;
/// Largest clock difference accepted.
pub const MAX_SKEW_S: i64 = 60;
/// Messages per second per source network (burst: twice that).
pub const RATE_PER_S: f64 = 20.0;
/// Source networks tracked by the rate limiter, at most.
pub const RATE_SLOTS: usize = 1024;
/// Remembered nonces, at most.
pub const REPLAY_SLOTS: usize = 16_384;
/// Remembered nonces of one sender, at most (its rate limit lets it
/// send up to 2 440 in a message's lifetime).
pub const REPLAY_PER_SENDER: usize = 1024;

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Body {
    /// Where can you be reached?
    EndpointsRequest,
    /// My signed peer record.
    Endpoints {
        /// The record (verifiable on its own).
        record: SignedPeerRecord,
    },
    /// I have this network config version.
    ConfigVersion {
        /// The version.
        version: u64,
    },
    /// Send me your network config.
    ConfigRequest,
    /// The CA-signed network config.
    Config {
        /// As the registry signed it.
        signed: SignedConfig,
    },
    /// Please stop routing through our tunnel: I am retiring it.
    DrainRequest,
    /// Done: my side of our tunnel is draining too.
    DrainAck,
    /// I closed our tunnel: close your end.
    Close,
    /// I am dialling you through your NAT: send a punch to each of these
    /// (my endpoints) so that my request gets in.
    Punch {
        /// Where to punch to.
        endpoints: Vec<std::net::SocketAddr>,
    },
    /// Tell me about yourself (topology).
    NodeInfoRequest,
    /// About me.
    NodeInfo {
        /// Software version.
        version: String,
        /// Peers of my outgoing tunnels.
        outgoing: Vec<String>,
        /// Peers of my incoming tunnels.
        incoming: Vec<String>,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    cert: String,
    to: String,
    ts: i64,
    nonce: String,
    body: Body,
    sig: String,
}

/// Why a datagram was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Too large, not ours, bad JSON.
    #[error("malformed peer message: {0}")]
    Malformed(&'static str),
    /// Timestamp too far from now.
    #[error("stale or future message")]
    Stale,
    /// For another node.
    #[error("not addressed to us")]
    NotForUs,
    /// Not from a valid certificate of our CA.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// From a revoked node.
    #[error("revoked certificate {0}")]
    Revoked(u64),
    /// The source address is not in the sender's prefix.
    #[error("source address {0} outside the sender's prefix")]
    Spoofed(IpAddr),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Seen before.
    #[error("replayed message")]
    Replay,
    /// The source network sends too fast.
    #[error("rate limited")]
    RateLimited,
}

fn signed_bytes(to: &str, ts: i64, nonce: &str, body: &str) -> Vec<u8> {
    format!("re6st-rs peer v1\n{to}\n{ts}\n{nonce}\n{body}").into_bytes()
}

/// Sends and checks peer-protocol messages for one node.
#[derive(Debug)]
pub struct PeerProtocol {
    ca: CaCert,
    me: Identity,
    crl: Vec<u64>,
    seen: ReplayWindow<Ipv6Net>,
    rate: SourceLimiter,
}

impl PeerProtocol {
    /// The protocol for our identity under `ca`.
    pub fn new(ca: CaCert, me: Identity) -> Self {
        Self {
            ca,
            me,
            crl: Vec::new(),
            seen: ReplayWindow::new(REPLAY_PER_SENDER, REPLAY_SLOTS),
            rate: SourceLimiter::new(RATE_PER_S, RATE_SLOTS),
        }
    }

    /// Updates the revocation list (from a new network config).
    pub fn set_crl(&mut self, crl: Vec<u64>) {
        self.crl = crl;
    }

    /// Our prefix.
    pub fn prefix(&self) -> Ipv6Net {
        self.me.cert.prefix
    }

    /// A signed datagram for the node `to`.
    pub fn seal(&self, to: Ipv6Net, body: &Body, unix: i64) -> Result<Vec<u8>, PeerError> {
        let nonce: String = random_bytes::<16>()
            .map_err(|_| PeerError::Malformed("no randomness"))?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let to_s = to.to_string();
        let body_json = serde_json::to_string(body).map_err(|_| PeerError::Malformed("body"))?;
        let sig = sign(&self.me.key, &signed_bytes(&to_s, unix, &nonce, &body_json))
            .map_err(|_| PeerError::Malformed("signing failed"))?;
        let env = Envelope {
            cert: B64.encode(&self.me.cert.der),
            to: to_s,
            ts: unix,
            nonce,
            body: body.clone(),
            sig: B64.encode(sig),
        };
        let mut out = MAGIC.to_vec();
        out.extend(serde_json::to_vec(&env).map_err(|_| PeerError::Malformed("envelope"))?);
        if out.len() > MAX_SIZE {
            return Err(PeerError::Malformed("too large"));
        }
        Ok(out)
    }

    /// Checks a datagram from `src` (an overlay address); returns the
    /// sender's certificate and the body.
    pub fn open(
        &mut self,
        now: Instant,
        src: IpAddr,
        bytes: &[u8],
        unix: i64,
    ) -> Result<(NodeCert, Body), PeerError> {
        if bytes.len() > MAX_SIZE {
            return Err(PeerError::Malformed("too large"));
        }
        if !self.rate.allow(now, src) {
            return Err(PeerError::RateLimited);
        }
        let json = bytes
            .strip_prefix(MAGIC)
            .ok_or(PeerError::Malformed("not a peer message"))?;
        let env: Envelope =
            serde_json::from_slice(json).map_err(|_| PeerError::Malformed("bad JSON"))?;
        if env.nonce.len() != 32 || !env.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PeerError::Malformed("bad nonce"));
        }
        if (env.ts - unix).abs() > MAX_SKEW_S {
            return Err(PeerError::Stale);
        }
        if env.to != self.me.cert.prefix.to_string() {
            return Err(PeerError::NotForUs);
        }
        let der = B64
            .decode(&env.cert)
            .map_err(|_| PeerError::Malformed("certificate is not base64"))?;
        // What the certificate claims, checked before its chain (a
        // signature check) is: a lie there fails the chain anyway.
        let claimed = NodeCert::from_der(der.clone())
            .map_err(|e| PeerError::BadCertificate(e.to_string()))?;
        if self.crl.contains(&claimed.serial) {
            return Err(PeerError::Revoked(claimed.serial));
        }
        let inside = match src {
            IpAddr::V6(a) => claimed.prefix.contains(&a),
            IpAddr::V4(_) => false,
        };
        if !inside {
            return Err(PeerError::Spoofed(src));
        }
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            B64.encode(&der)
        );
        let cert = self
            .ca
            .verify_node(&pem, Some(unix))
            .map_err(|e| PeerError::BadCertificate(e.to_string()))?;
        let sig = B64
            .decode(&env.sig)
            .map_err(|_| PeerError::Malformed("signature is not base64"))?;
        let body_json =
            serde_json::to_string(&env.body).map_err(|_| PeerError::Malformed("body"))?;
        verify_ed25519(
            &cert.public_key,
            &signed_bytes(&env.to, env.ts, &env.nonce, &body_json),
            &sig,
        )
        .map_err(|_| PeerError::BadSignature)?;
        self.seen
            .check(&cert.prefix, &env.nonce, env.ts + 2 * MAX_SKEW_S, unix)
            .map_err(|_| PeerError::Replay)?;
        Ok((cert, env.body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use re6st_registry::cert::Ca;
    use re6st_registry::config::NetworkConfig;

    const NOW: i64 = 1_790_000_000;

    fn ca() -> Ca {
        Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW - 100, 10)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn node(ca: &Ca, i: u16) -> Identity {
        let prefix = format!("fd5e:0:0:{i:x}::/64").parse().unwrap_or_default();
        Identity::issued(ca, prefix, u64::from(i), [i as u8; 32], NOW)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0u8; 16]))
    }

    #[test]
    fn every_body_round_trips() {
        let ca = ca();
        let a = PeerProtocol::new(ca.cert().clone(), node(&ca, 1));
        let mut b = PeerProtocol::new(ca.cert().clone(), node(&ca, 2));
        let signed = SignedConfig::sign(&NetworkConfig::new("fd5e::/48", 64, NOW), |m| ca.sign(m))
            .unwrap_or_else(|e| panic!("{e}"));
        let bodies = vec![
            Body::EndpointsRequest,
            Body::ConfigVersion { version: 7 },
            Body::ConfigRequest,
            Body::Config { signed },
            Body::DrainRequest,
            Body::DrainAck,
            Body::Close,
            Body::NodeInfoRequest,
            Body::NodeInfo {
                version: "0.1.0".into(),
                outgoing: vec!["fd5e:0:0:2::/64".into()],
                incoming: Vec::new(),
            },
        ];
        for body in bodies {
            let d = a
                .seal(b.prefix(), &body, NOW)
                .unwrap_or_else(|e| panic!("{e}"));
            let (from, got) = b
                .open(Instant::now(), addr("fd5e:0:0:1::1"), &d, NOW)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(from.prefix, a.prefix());
            assert_eq!(got, body);
        }
    }

    /// How large a CRL still floods between peers: a configuration is
    /// one peer message, [`MAX_SIZE`] at most. The bound is printed and
    /// guarded (`docs/security.md` gives it).
    #[test]
    fn configurations_flood_with_a_crl_of_hundreds_of_serials() {
        let ca = ca();
        let a = PeerProtocol::new(ca.cert().clone(), node(&ca, 1));
        let b = node(&ca, 2);
        let signed = |n: u64| {
            let mut c = NetworkConfig::new("fd5e::/48", 64, NOW);
            c.registry_urls = vec!["https://registry.example:8443".into()];
            c.crl = (100_000..100_000 + n).collect();
            SignedConfig::sign(&c, |m| ca.sign(m)).unwrap_or_else(|e| panic!("{e}"))
        };
        let fits = |n: u64| {
            a.seal(b.cert.prefix, &Body::Config { signed: signed(n) }, NOW)
                .is_ok()
        };
        let most = (0..10_000u64).take_while(|n| fits(*n)).last().unwrap_or(0);
        let promised = (0..10_000u64)
            .take_while(|n| signed(*n).floods())
            .last()
            .unwrap_or(0);
        println!(
            "a configuration floods with up to {most} six-digit revoked serials; \
             the registry warns beyond {promised}"
        );
        assert!(promised >= 600, "{promised}");
        assert!(
            promised <= most,
            "the registry's FLOOD_BYTES promises {promised} serials, {most} fit"
        );
    }

    /// A member flooding from the addresses of its /64 gets one budget; a
    /// fresh network gets its own (and a source outside the sender's
    /// prefix is still refused).
    #[test]
    fn floods_are_limited_per_network() {
        let ca = ca();
        let a = PeerProtocol::new(ca.cert().clone(), node(&ca, 1));
        let mut b = PeerProtocol::new(ca.cert().clone(), node(&ca, 2));
        let t = Instant::now();
        let mut limited = 0;
        for i in 0..100u16 {
            let d = a
                .seal(b.prefix(), &Body::DrainRequest, NOW)
                .unwrap_or_else(|e| panic!("{e}"));
            let src = addr(&format!("fd5e:0:0:1::{:x}", i + 1));
            if b.open(t, src, &d, NOW) == Err(PeerError::RateLimited) {
                limited += 1;
            }
        }
        assert_eq!(limited, 100 - 2 * RATE_PER_S as usize);
        let d = a
            .seal(b.prefix(), &Body::DrainRequest, NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        let elsewhere = addr("fd5e:0:0:3::1");
        assert_eq!(
            b.open(t, elsewhere, &d, NOW),
            Err(PeerError::Spoofed(elsewhere))
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        let ca = ca();
        let a = PeerProtocol::new(ca.cert().clone(), node(&ca, 1));
        let mut b = PeerProtocol::new(ca.cert().clone(), node(&ca, 2));
        let src = addr("fd5e:0:0:1::1");
        let d = a
            .seal(b.prefix(), &Body::DrainRequest, NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(b.open(Instant::now(), src, &d, NOW).is_ok());
        assert_eq!(b.open(Instant::now(), src, &d, NOW), Err(PeerError::Replay));
        let d = a
            .seal(b.prefix(), &Body::DrainRequest, NOW - 120)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.open(Instant::now(), src, &d, NOW), Err(PeerError::Stale));
        let d = a
            .seal(
                "fd5e:0:0:9::/64".parse().unwrap_or_default(),
                &Body::DrainRequest,
                NOW,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b.open(Instant::now(), src, &d, NOW),
            Err(PeerError::NotForUs)
        );
        let d = a
            .seal(b.prefix(), &Body::DrainRequest, NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b.open(Instant::now(), addr("fd5e:0:0:7::1"), &d, NOW),
            Err(PeerError::Spoofed(addr("fd5e:0:0:7::1")))
        );
        b.set_crl(vec![1]);
        assert_eq!(
            b.open(Instant::now(), src, &d, NOW),
            Err(PeerError::Revoked(1))
        );
        b.set_crl(Vec::new());
        // Tampered body.
        let tampered = String::from_utf8_lossy(&d)
            .replace("drain_request", "drain_ack")
            .into_bytes();
        assert_eq!(
            b.open(Instant::now(), src, &tampered, NOW),
            Err(PeerError::BadSignature)
        );
        // Another CA.
        let other = Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW - 100, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        let stranger = PeerProtocol::new(other.cert().clone(), node(&other, 3));
        let d = stranger
            .seal(b.prefix(), &Body::DrainRequest, NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            b.open(Instant::now(), addr("fd5e:0:0:3::1"), &d, NOW),
            Err(PeerError::BadCertificate(_))
        ));
        for junk in [&b""[..], b"R6P1", b"R6P1{}", b"R6T1{}", &[b'R'; 9000]] {
            assert!(matches!(
                b.open(Instant::now(), src, junk, NOW),
                Err(PeerError::Malformed(_))
            ));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000), magic in any::<bool>()) {
            let ca = ca();
            let mut b = PeerProtocol::new(ca.cert().clone(), node(&ca, 2));
            let mut d = data.clone();
            if magic {
                d.splice(0..0, MAGIC.iter().copied());
            }
            let _ = b.open(Instant::now(), addr("fd5e:0:0:1::1"), &d, NOW);
        }
    }
}
