//! Tunnel set-up: the messages exchanged on the tunnel port before the
//! WireGuard handshake (sans-IO).
//!
//! ```text
//! initiator -> responder   Request  {cert, to, ts, nonce, sig}
//! responder -> initiator   Accept   {cert, nonce, ts, seen, sig}  (then the handshake)
//!                          Busy     {cert, nonce, ts, seen, peers, sig} (try these instead)
//!                          Refused  {cert, nonce, ts, reason, sig} (revoked, bad certificate)
//! either way               Punch    (no body: opens a NAT's mapping, dropped on arrival)
//! ```
//!
//! `seen` is the address and port the responder saw the request come
//! from: behind a NAT, the initiator learns its public endpoint from it
//! (one claim among others: see re6stnet's `node::observed`).
//!
//! Datagrams start with `R6T1` and a kind byte (WireGuard messages start
//! with 1..=4 and three zero bytes, so the two never collide), then JSON.
//! Every message is signed with the node key over a context string, the
//! kind, the peer it is for, the timestamp, the nonce and what it carries
//! (a busy's peers, a refusal's reason): a refusal forged by someone on the
//! path is dropped like any other forgery, and even a genuine one only
//! says what the responder thinks (a node decides it is revoked from the
//! CA-signed CRL of the network configuration, never from a peer). The responder
//! checks size, rate (per source, bounded table), structure, chain, CRL,
//! freshness, that it is the addressee, the signature, and replay — in that
//! order, so garbage costs little and only a valid request is remembered.
//! The certificate's WireGuard key is the one the handshake must then use.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use re6st_registry::cert::{sign, verify_ed25519, CaCert, NodeCert};
use re6st_registry::config::random_bytes;
use serde::{Deserialize, Serialize};

use crate::replay::ReplayWindow;
use crate::source_limit::SourceLimiter;

/// First bytes of every set-up datagram.
pub const MAGIC: &[u8; 4] = b"R6T1";
/// Largest set-up datagram.
pub const MAX_SIZE: usize = 1400;
/// Largest clock difference accepted.
pub const MAX_SKEW_S: i64 = 60;
/// Remembered request nonces (replay protection), at most.
pub const REPLAY_SLOTS: usize = 8192;
/// Remembered request nonces of one initiator, at most (at 5 requests a
/// second, about a tenth of a request's lifetime).
pub const REPLAY_PER_SENDER: usize = 64;
/// Source networks tracked by the rate limiter, at most.
pub const RATE_SLOTS: usize = 1024;
/// Requests per second per source network (/64 or /24; burst: twice that).
pub const RATE_PER_S: f64 = 5.0;

const KIND_REQUEST: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_BUSY: u8 = 3;
const KIND_REFUSED: u8 = 4;
const KIND_PUNCH: u8 = 5;

/// Why a set-up datagram was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// Too large, wrong magic, bad JSON or fields.
    #[error("malformed set-up message: {0}")]
    Malformed(&'static str),
    /// The source sends too fast.
    #[error("rate limited")]
    RateLimited,
    /// Not from a certificate of our CA, or expired.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// The certificate is revoked.
    #[error("revoked certificate {0}")]
    Revoked(u64),
    /// Timestamp too far from now.
    #[error("stale or future timestamp")]
    Stale,
    /// For another node.
    #[error("not addressed to us")]
    NotForUs,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A request seen before.
    #[error("replayed request")]
    Replay,
    /// A reply that does not answer our request.
    #[error("unexpected reply")]
    Unexpected,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestMsg {
    cert: String,
    to: String,
    ts: i64,
    nonce: String,
    sig: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptMsg {
    cert: String,
    nonce: String,
    ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seen: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    sig: String,
}

/// Why a responder refused a request (a signed claim of the responder's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The initiator's certificate is on the responder's CRL.
    Revoked,
    /// The initiator's certificate is not from the responder's CA, or expired.
    BadCertificate,
}

impl Refusal {
    /// The reason as it goes on the wire and in counters.
    pub fn label(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::BadCertificate => "bad_certificate",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefusedMsg {
    cert: String,
    nonce: String,
    ts: i64,
    reason: Refusal,
    sig: String,
}

/// What a message's signature covers; `tail` is what it carries (a
/// busy's peers, a refusal's reason).
fn signed_bytes(kind: u8, peer: &str, ts: i64, nonce: &str, tail: &[String]) -> Vec<u8> {
    format!(
        "re6st-rs tunnel setup v1\n{kind}\n{peer}\n{ts}\n{nonce}\n{}",
        tail.join(",")
    )
    .into_bytes()
}

fn frame(kind: u8, body: &impl Serialize) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(kind);
    // Serialising our own plain structs cannot fail.
    out.extend(serde_json::to_vec(body).unwrap_or_default());
    out
}

fn unframe(bytes: &[u8]) -> Result<(u8, &[u8]), SetupError> {
    if bytes.len() > MAX_SIZE {
        return Err(SetupError::Malformed("too large"));
    }
    match bytes {
        [m0, m1, m2, m3, kind, body @ ..] if [*m0, *m1, *m2, *m3] == *MAGIC => Ok((*kind, body)),
        _ => Err(SetupError::Malformed("not a set-up message")),
    }
}

/// Whether a datagram is a set-up request (the responder's business), not
/// a reply to one of ours.
pub fn is_request(bytes: &[u8]) -> bool {
    bytes.len() > MAGIC.len() && bytes.starts_with(MAGIC) && bytes[MAGIC.len()] == KIND_REQUEST
}

/// Whether a datagram is a set-up message (not WireGuard).
pub fn is_setup(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// A punch: sent to a peer's endpoint only so that our NAT lets its
/// datagrams in (hole punching); the receiver drops it.
pub fn punch() -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(KIND_PUNCH);
    out
}

/// Whether a datagram is a [`punch`].
pub fn is_punch(bytes: &[u8]) -> bool {
    bytes.len() == MAGIC.len() + 1 && bytes.starts_with(MAGIC) && bytes[MAGIC.len()] == KIND_PUNCH
}

fn check_cert(ca: &CaCert, crl: &[u64], der_b64: &str, unix: i64) -> Result<NodeCert, SetupError> {
    let der = B64
        .decode(der_b64)
        .map_err(|_| SetupError::Malformed("certificate is not base64"))?;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        B64.encode(&der)
    );
    let cert = ca
        .verify_node(&pem, Some(unix))
        .map_err(|e| SetupError::BadCertificate(e.to_string()))?;
    if crl.contains(&cert.serial) {
        return Err(SetupError::Revoked(cert.serial));
    }
    Ok(cert)
}

/// What identifies us: certificate and key.
pub struct Identity {
    /// Our certificate.
    pub cert: NodeCert,
    /// Our node key.
    pub key: rcgen::KeyPair,
}

impl Identity {
    /// A fresh identity issued by `ca` for `prefix`, valid for a day from
    /// `now`: for tests, simulations and demos.
    pub fn issued(
        ca: &re6st_registry::cert::Ca,
        prefix: Ipv6Net,
        serial: u64,
        wg_key: [u8; 32],
        now: i64,
    ) -> Result<Self, re6st_registry::Error> {
        let (key, pem) = ca.issue_with_new_key(prefix, wg_key, serial, now - 10, now + 86_400)?;
        Ok(Self {
            cert: NodeCert::from_pem(&pem)?,
            key,
        })
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("prefix", &self.cert.prefix)
            .finish_non_exhaustive()
    }
}

/// Starts a set-up towards `to`: the datagram and the nonce to match the reply.
pub fn request(me: &Identity, to: Ipv6Net, unix: i64) -> Result<(Vec<u8>, String), SetupError> {
    let nonce =
        hex_encode(&random_bytes::<16>().map_err(|_| SetupError::Malformed("no randomness"))?);
    let to_s = to.to_string();
    let sig = sign(
        &me.key,
        &signed_bytes(KIND_REQUEST, &to_s, unix, &nonce, &[]),
    )
    .map_err(|_| SetupError::Malformed("signing failed"))?;
    let msg = RequestMsg {
        cert: B64.encode(&me.cert.der),
        to: to_s,
        ts: unix,
        nonce: nonce.clone(),
        sig: B64.encode(sig),
    };
    Ok((frame(KIND_REQUEST, &msg), nonce))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The responder's answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Go ahead: the peer's certificate (its WireGuard key is the one the
    /// handshake must use).
    Accepted(NodeCert),
    /// Full: try these peers.
    Busy(Vec<Ipv6Net>),
    /// Refused, with the responder's reason.
    Refused(Refusal),
}

/// A checked reply and what the responder says it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The answer.
    pub reply: Reply,
    /// Where the responder saw our request come from (Accept and Busy;
    /// signed with the rest).
    pub seen: Option<SocketAddr>,
}

/// The signed tail of an Accept or Busy: what the responder saw, then
/// the peers it suggests.
fn accept_tail(seen: Option<&str>, peers: &[String]) -> Vec<String> {
    seen.map(|s| format!("seen={s}"))
        .into_iter()
        .chain(peers.iter().cloned())
        .collect()
}

/// The parts of a reply its signature is checked on.
struct Signed<'a> {
    kind: u8,
    cert: &'a str,
    nonce: &'a str,
    ts: i64,
    tail: &'a [String],
    sig: &'a str,
}

/// Checks that a reply answers our request `nonce`, is fresh, comes from
/// a valid certificate for `expected` and is signed by it.
fn check_signed(
    ca: &CaCert,
    crl: &[u64],
    expected: Ipv6Net,
    nonce: &str,
    unix: i64,
    m: &Signed<'_>,
) -> Result<NodeCert, SetupError> {
    if m.nonce != nonce {
        return Err(SetupError::Unexpected);
    }
    if (m.ts - unix).abs() > MAX_SKEW_S {
        return Err(SetupError::Stale);
    }
    let cert = check_cert(ca, crl, m.cert, unix)?;
    if cert.prefix != expected {
        return Err(SetupError::Unexpected);
    }
    let sig = B64
        .decode(m.sig)
        .map_err(|_| SetupError::Malformed("signature is not base64"))?;
    verify_ed25519(
        &cert.public_key,
        &signed_bytes(m.kind, &expected.to_string(), m.ts, m.nonce, m.tail),
        &sig,
    )
    .map_err(|_| SetupError::BadSignature)?;
    Ok(cert)
}

/// Checks a reply to our request `nonce` sent to `expected`.
pub fn check_reply(
    ca: &CaCert,
    crl: &[u64],
    expected: Ipv6Net,
    nonce: &str,
    unix: i64,
    bytes: &[u8],
) -> Result<Answer, SetupError> {
    let (kind, body) = unframe(bytes)?;
    match kind {
        KIND_ACCEPT | KIND_BUSY => {
            let m: AcceptMsg =
                serde_json::from_slice(body).map_err(|_| SetupError::Malformed("bad JSON"))?;
            let tail = accept_tail(m.seen.as_deref(), &m.peers);
            let signed = Signed {
                kind,
                cert: &m.cert,
                nonce: &m.nonce,
                ts: m.ts,
                tail: &tail,
                sig: &m.sig,
            };
            let cert = check_signed(ca, crl, expected, nonce, unix, &signed)?;
            let seen = match m.seen.as_deref().map(str::parse) {
                None => None,
                Some(Ok(a)) => Some(a),
                Some(Err(_)) => return Err(SetupError::Malformed("bad seen address")),
            };
            let reply = if kind == KIND_ACCEPT {
                Reply::Accepted(cert)
            } else {
                let peers = m
                    .peers
                    .iter()
                    .filter_map(|p| p.parse().ok())
                    .take(8)
                    .collect();
                Reply::Busy(peers)
            };
            Ok(Answer { reply, seen })
        }
        KIND_REFUSED => {
            let m: RefusedMsg =
                serde_json::from_slice(body).map_err(|_| SetupError::Malformed("bad JSON"))?;
            let tail = [m.reason.label().to_string()];
            let signed = Signed {
                kind,
                cert: &m.cert,
                nonce: &m.nonce,
                ts: m.ts,
                tail: &tail,
                sig: &m.sig,
            };
            check_signed(ca, crl, expected, nonce, unix, &signed)?;
            Ok(Answer {
                reply: Reply::Refused(m.reason),
                seen: None,
            })
        }
        _ => Err(SetupError::Malformed("unknown kind")),
    }
}

/// The responder's decision for a valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Accept the tunnel.
    Accept,
    /// Full: suggest these peers.
    Busy(Vec<Ipv6Net>),
}

/// Counters of the responder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponderStats {
    /// Requests accepted.
    pub accepted: u64,
    /// Answered busy.
    pub busy: u64,
    /// Dropped, by reason.
    pub dropped: HashMap<&'static str, u64>,
}

/// What to do after a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted: send `reply`, then expect a handshake with `peer.wg_key`.
    Accepted {
        /// The initiator.
        peer: NodeCert,
        /// The Accept datagram.
        reply: Vec<u8>,
    },
    /// Send this (Busy or Refused) and forget the request.
    Reply(Vec<u8>),
    /// Drop silently.
    Dropped(SetupError),
}

/// The responder side: checks requests, remembers their nonces.
#[derive(Debug)]
pub struct Responder {
    ca: CaCert,
    me: Identity,
    crl: Vec<u64>,
    replay: ReplayWindow<Ipv6Net>,
    rate: SourceLimiter,
    stats: ResponderStats,
}

fn reason(e: &SetupError) -> &'static str {
    match e {
        SetupError::Malformed(_) => "malformed",
        SetupError::RateLimited => "rate_limited",
        SetupError::BadCertificate(_) => "bad_certificate",
        SetupError::Revoked(_) => "revoked",
        SetupError::Stale => "stale",
        SetupError::NotForUs => "not_for_us",
        SetupError::BadSignature => "bad_signature",
        SetupError::Replay => "replay",
        SetupError::Unexpected => "unexpected",
    }
}

impl Responder {
    /// A responder for our identity under `ca`.
    pub fn new(ca: CaCert, me: Identity) -> Self {
        Self {
            ca,
            me,
            crl: Vec::new(),
            replay: ReplayWindow::new(REPLAY_PER_SENDER, REPLAY_SLOTS),
            rate: SourceLimiter::new(RATE_PER_S, RATE_SLOTS),
            stats: ResponderStats::default(),
        }
    }

    /// Updates the revocation list (from a new network config).
    pub fn set_crl(&mut self, crl: Vec<u64>) {
        self.crl = crl;
    }

    /// Counters.
    pub fn stats(&self) -> &ResponderStats {
        &self.stats
    }

    fn check(
        &mut self,
        now: Instant,
        unix: i64,
        src: IpAddr,
        bytes: &[u8],
    ) -> Result<(NodeCert, String), SetupError> {
        let (kind, body) = unframe(bytes)?;
        if kind != KIND_REQUEST {
            return Err(SetupError::Unexpected);
        }
        if !self.rate.allow(now, src) {
            return Err(SetupError::RateLimited);
        }
        let m: RequestMsg =
            serde_json::from_slice(body).map_err(|_| SetupError::Malformed("bad JSON"))?;
        if m.nonce.len() != 32 || !m.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SetupError::Malformed("bad nonce"));
        }
        if (m.ts - unix).abs() > MAX_SKEW_S {
            return Err(SetupError::Stale);
        }
        if m.to != self.me.cert.prefix.to_string() {
            return Err(SetupError::NotForUs);
        }
        let cert = check_cert(&self.ca, &self.crl, &m.cert, unix)?;
        if cert.prefix == self.me.cert.prefix {
            return Err(SetupError::NotForUs);
        }
        let sig = B64
            .decode(&m.sig)
            .map_err(|_| SetupError::Malformed("signature is not base64"))?;
        verify_ed25519(
            &cert.public_key,
            &signed_bytes(KIND_REQUEST, &m.to, m.ts, &m.nonce, &[]),
            &sig,
        )
        .map_err(|_| SetupError::BadSignature)?;
        self.replay
            .check(&cert.prefix, &m.nonce, m.ts + 2 * MAX_SKEW_S, unix)
            .map_err(|_| SetupError::Replay)?;
        Ok((cert, m.nonce))
    }

    /// Our signature over a reply, made over our own prefix (what the
    /// initiator expects).
    fn sign_reply(&self, kind: u8, nonce: &str, unix: i64, tail: &[String]) -> String {
        let me = self.me.cert.prefix.to_string();
        B64.encode(
            sign(&self.me.key, &signed_bytes(kind, &me, unix, nonce, tail)).unwrap_or_default(),
        )
    }

    /// A signed Accept or Busy, telling the initiator where its request
    /// came from.
    fn signed_reply(
        &self,
        kind: u8,
        nonce: &str,
        unix: i64,
        seen: SocketAddr,
        peers: Vec<String>,
    ) -> Vec<u8> {
        let seen = seen.to_string();
        let sig = self.sign_reply(kind, nonce, unix, &accept_tail(Some(&seen), &peers));
        frame(
            kind,
            &AcceptMsg {
                cert: B64.encode(&self.me.cert.der),
                nonce: nonce.to_string(),
                ts: unix,
                seen: Some(seen),
                peers,
                sig,
            },
        )
    }

    /// A signed Refused.
    fn signed_refusal(&self, nonce: &str, unix: i64, reason: Refusal) -> Vec<u8> {
        let sig = self.sign_reply(KIND_REFUSED, nonce, unix, &[reason.label().to_string()]);
        frame(
            KIND_REFUSED,
            &RefusedMsg {
                cert: B64.encode(&self.me.cert.der),
                nonce: nonce.to_string(),
                ts: unix,
                reason,
                sig,
            },
        )
    }

    /// Handles a datagram from `src`; `decide` is asked (policy: capacity)
    /// only for valid requests.
    pub fn handle(
        &mut self,
        now: Instant,
        unix: i64,
        src: SocketAddr,
        bytes: &[u8],
        decide: impl FnOnce(&NodeCert) -> Decision,
    ) -> Outcome {
        match self.check(now, unix, src.ip(), bytes) {
            Err(e) => {
                *self.stats.dropped.entry(reason(&e)).or_default() += 1;
                // A revoked or foreign node is told, so it stops trying.
                let refusal = match e {
                    SetupError::Revoked(_) => Refusal::Revoked,
                    SetupError::BadCertificate(_) => Refusal::BadCertificate,
                    other => return Outcome::Dropped(other),
                };
                let nonce = request_nonce(bytes).unwrap_or_default();
                Outcome::Reply(self.signed_refusal(&nonce, unix, refusal))
            }
            Ok((peer, nonce)) => match decide(&peer) {
                Decision::Accept => {
                    self.stats.accepted += 1;
                    let reply = self.signed_reply(KIND_ACCEPT, &nonce, unix, src, Vec::new());
                    Outcome::Accepted { peer, reply }
                }
                Decision::Busy(others) => {
                    self.stats.busy += 1;
                    let peers = others.iter().take(8).map(|p| p.to_string()).collect();
                    Outcome::Reply(self.signed_reply(KIND_BUSY, &nonce, unix, src, peers))
                }
            },
        }
    }
}

fn request_nonce(bytes: &[u8]) -> Option<String> {
    let (_, body) = unframe(bytes).ok()?;
    let m: RequestMsg = serde_json::from_slice(body).ok()?;
    Some(m.nonce.chars().take(32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use re6st_registry::cert::{generate_key, Ca};

    const NOW: i64 = 1_790_000_000;

    fn ca() -> Ca {
        Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW - 100, 10)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn node(ca: &Ca, i: u16, serial: u64) -> Identity {
        let prefix = format!("fd5e:0:0:{i:x}::/64").parse().unwrap_or_default();
        Identity::issued(ca, prefix, serial, [i as u8; 32], NOW).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The CA, initiator a, and responder b's prefix and responder.
    fn pair() -> (Ca, Identity, Ipv6Net, Responder) {
        let ca = ca();
        let a = node(&ca, 1, 11);
        let b = node(&ca, 2, 12);
        let b_prefix = b.cert.prefix;
        let resp = Responder::new(ca.cert().clone(), b);
        (ca, a, b_prefix, resp)
    }

    fn src() -> SocketAddr {
        "198.18.1.2:326"
            .parse()
            .unwrap_or(SocketAddr::from(([0u8; 4], 0)))
    }

    #[test]
    fn accept_round_trip_binds_the_wireguard_key() {
        let (ca, a, b_prefix, mut resp) = pair();
        let (req, nonce) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Accepted { peer, reply } =
            resp.handle(Instant::now(), NOW, src(), &req, |_| Decision::Accept)
        else {
            panic!("not accepted");
        };
        assert_eq!(
            peer.wg_key, [1; 32],
            "the handshake must come from this key"
        );
        assert_eq!(peer.prefix, a.cert.prefix);
        match check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &reply).map(|a| a.reply) {
            Ok(Reply::Accepted(c)) => assert_eq!(c.wg_key, [2; 32]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, "00", NOW, &reply),
            Err(SetupError::Unexpected)
        );
        let other: Ipv6Net = "fd5e:0:0:9::/64".parse().unwrap_or_default();
        assert_eq!(
            check_reply(ca.cert(), &[], other, &nonce, NOW, &reply),
            Err(SetupError::Unexpected)
        );
        // The same request again is a replay.
        assert_eq!(
            resp.handle(Instant::now(), NOW, src(), &req, |_| Decision::Accept),
            Outcome::Dropped(SetupError::Replay)
        );
        assert_eq!(resp.stats().accepted, 1);
    }

    /// The initiator learns where the responder saw it: signed, so
    /// nobody on the path can point it elsewhere.
    #[test]
    fn the_answer_says_where_the_request_came_from() {
        let (ca, a, b_prefix, mut resp) = pair();
        let (req, nonce) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let nat: SocketAddr = "198.18.7.1:40123".parse().unwrap_or(src());
        let Outcome::Accepted { reply, .. } =
            resp.handle(Instant::now(), NOW, nat, &req, |_| Decision::Accept)
        else {
            panic!("not accepted");
        };
        let answer = check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &reply)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.seen, Some(nat));
        let mut m: AcceptMsg =
            serde_json::from_slice(&reply[5..]).unwrap_or_else(|e| panic!("{e}"));
        m.seen = Some("198.18.9.9:326".into());
        assert_eq!(
            check_reply(
                ca.cert(),
                &[],
                b_prefix,
                &nonce,
                NOW,
                &frame(KIND_ACCEPT, &m)
            ),
            Err(SetupError::BadSignature)
        );
        assert!(is_punch(&punch()));
        assert!(!is_request(&punch()) && !is_punch(&reply));
    }

    #[test]
    fn busy_carries_signed_suggestions() {
        let (ca, a, b_prefix, mut resp) = pair();
        let (req, nonce) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let try_these: Vec<Ipv6Net> = vec!["fd5e:0:0:7::/64".parse().unwrap_or_default()];
        let Outcome::Reply(reply) = resp.handle(Instant::now(), NOW, src(), &req, |_| {
            Decision::Busy(try_these.clone())
        }) else {
            panic!("expected busy");
        };
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &reply).map(|a| a.reply),
            Ok(Reply::Busy(try_these))
        );
    }

    #[test]
    fn bad_requests_are_dropped_or_refused() {
        let (ca, a, b_prefix, mut resp) = pair();
        let t = Instant::now();
        // Stale and future timestamps.
        let (old, _) = request(&a, b_prefix, NOW - 120).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            resp.handle(t, NOW, src(), &old, |_| Decision::Accept),
            Outcome::Dropped(SetupError::Stale)
        );
        // For someone else.
        let (elsewhere, _) = request(&a, "fd5e:0:0:9::/64".parse().unwrap_or_default(), NOW)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            resp.handle(t, NOW, src(), &elsewhere, |_| Decision::Accept),
            Outcome::Dropped(SetupError::NotForUs)
        );
        // A certificate of another CA: refused, and the initiator learns it.
        let other_ca = Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW - 100, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        let stranger = node(&other_ca, 3, 13);
        let (req, nonce) = request(&stranger, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Reply(r) = resp.handle(t, NOW, src(), &req, |_| Decision::Accept) else {
            panic!("no refusal")
        };
        // Signed under our CA, which the stranger cannot check.
        assert!(matches!(
            check_reply(other_ca.cert(), &[], b_prefix, &nonce, NOW, &r),
            Err(SetupError::BadCertificate(_))
        ));
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &r).map(|a| a.reply),
            Ok(Reply::Refused(Refusal::BadCertificate))
        );
        // Revoked.
        resp.set_crl(vec![11]);
        let (req, nonce) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Reply(r) = resp.handle(t, NOW, src(), &req, |_| Decision::Accept) else {
            panic!("no refusal")
        };
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &r).map(|a| a.reply),
            Ok(Reply::Refused(Refusal::Revoked))
        );
        resp.set_crl(Vec::new());
        // A forged signature: the request re-signed by another key.
        let (req, _) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let mut m: RequestMsg = serde_json::from_slice(&req[5..]).unwrap_or_else(|e| panic!("{e}"));
        m.sig = B64.encode(
            sign(&generate_key().unwrap_or_else(|e| panic!("{e}")), b"x").unwrap_or_default(),
        );
        let forged = frame(KIND_REQUEST, &m);
        assert_eq!(
            resp.handle(t, NOW, src(), &forged, |_| Decision::Accept),
            Outcome::Dropped(SetupError::BadSignature)
        );
        // Garbage.
        for junk in [
            &b""[..],
            b"R6T1",
            b"R6T1\x01{}",
            b"\x01\x00\x00\x00wireguard",
            &[b'R'; 2000],
        ] {
            assert!(matches!(
                resp.handle(t, NOW, src(), junk, |_| Decision::Accept),
                Outcome::Dropped(_)
            ));
        }
        assert!(resp.stats().dropped.values().sum::<u64>() >= 9);
    }

    /// Someone on the path answers our request with a refusal: unsigned
    /// (the old format), signed by another member, or with the reason
    /// changed. None of them is a reply.
    #[test]
    fn forged_refusals_are_not_replies() {
        let ca = ca();
        let a = node(&ca, 1, 11);
        let b = node(&ca, 2, 12);
        let mallory = node(&ca, 3, 13);
        let b_prefix = b.cert.prefix;
        let (_, nonce) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
        let unsigned = frame(
            KIND_REFUSED,
            &serde_json::json!({"nonce": nonce, "reason": "revoked"}),
        );
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &unsigned),
            Err(SetupError::Malformed("bad JSON"))
        );
        let by_mallory = Responder::new(ca.cert().clone(), mallory).signed_refusal(
            &nonce,
            NOW,
            Refusal::Revoked,
        );
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &by_mallory),
            Err(SetupError::Unexpected),
            "not from the node asked"
        );
        let genuine = Responder::new(ca.cert().clone(), b).signed_refusal(
            &nonce,
            NOW,
            Refusal::BadCertificate,
        );
        let mut m: RefusedMsg =
            serde_json::from_slice(&genuine[5..]).unwrap_or_else(|e| panic!("{e}"));
        m.reason = Refusal::Revoked;
        let altered = frame(KIND_REFUSED, &m);
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &altered),
            Err(SetupError::BadSignature)
        );
        assert_eq!(
            check_reply(ca.cert(), &[], b_prefix, &nonce, NOW, &genuine).map(|a| a.reply),
            Ok(Reply::Refused(Refusal::BadCertificate))
        );
    }

    #[test]
    fn floods_are_rate_limited_and_state_stays_bounded() {
        let (_, a, b_prefix, mut resp) = pair();
        let t = Instant::now();
        let mut limited = 0;
        for _ in 0..40 {
            let (req, _) = request(&a, b_prefix, NOW).unwrap_or_else(|e| panic!("{e}"));
            if resp.handle(t, NOW, src(), &req, |_| Decision::Accept)
                == Outcome::Dropped(SetupError::RateLimited)
            {
                limited += 1;
            }
        }
        assert_eq!(limited, 40 - 10, "burst of 10, then limited");
        for i in 0..5000u32 {
            let s = SocketAddr::from((std::net::Ipv4Addr::from(0xc612_0000 | i), 326));
            let _ = resp.handle(t, NOW, s, b"R6T1\x01garbage", |_| Decision::Accept);
        }
        assert!(resp.rate.len() <= RATE_SLOTS);
        assert!(resp.replay.len() <= 10);
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1600), magic in any::<bool>()) {
            let ca = ca();
            let b = node(&ca, 2, 12);
            let mut resp = Responder::new(ca.cert().clone(), b);
            let mut d = data.clone();
            if magic {
                d.splice(0..0, MAGIC.iter().copied().chain([1u8]));
            }
            let _ = resp.handle(Instant::now(), NOW, src(), &d, |_| Decision::Accept);
            let _ = check_reply(ca.cert(), &[], "fd5e::/64".parse().unwrap_or_default(), "n", NOW, &d);
        }
    }
}
