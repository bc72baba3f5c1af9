//! Node-signed requests and signed peer records.
//!
//! A member authenticates an HTTP request with its node key: header
//! `Authorization: Re6st serial=S,ts=T,nonce=N,sig=B64` where the signature
//! covers the method, the path with query, the timestamp, the nonce and the
//! SHA-256 of the body. The registry finds the certificate by serial, checks
//! the signature, a ±5 min clock window, and that the nonce is new.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};

use crate::cert::{sign, verify_ed25519, CaCert, NodeCert};
use crate::config::random_bytes;
use crate::error::{Error, Result};

/// Largest accepted clock difference for signed requests and records.
pub const MAX_SKEW_S: i64 = 300;
/// Most endpoints in one peer record.
pub const MAX_ENDPOINTS: usize = 8;

/// The parts of a request signature header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAuth {
    /// Serial of the signing node's certificate.
    pub serial: u64,
    /// Unix seconds when signed.
    pub ts: i64,
    /// Random hex nonce (32 characters).
    pub nonce: String,
    /// The Ed25519 signature.
    pub sig: Vec<u8>,
}

/// What a request signature covers.
pub fn request_message(method: &str, path: &str, ts: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, body));
    format!("re6st-rs request v1\n{method}\n{path}\n{ts}\n{nonce}\n{digest}").into_bytes()
}

/// Builds the `Authorization` header value for a request.
pub fn sign_request(
    key: &KeyPair,
    serial: u64,
    method: &str,
    path: &str,
    body: &[u8],
    now: i64,
) -> Result<String> {
    let nonce = hex::encode(random_bytes::<16>()?);
    let sig = sign(key, &request_message(method, path, now, &nonce, body))?;
    Ok(format!(
        "Re6st serial={serial},ts={now},nonce={nonce},sig={}",
        B64.encode(sig)
    ))
}

impl RequestAuth {
    /// Parses an `Authorization` header value.
    pub fn parse(value: &str) -> Result<Self> {
        let bad = |why: &str| Error::Unauthenticated(format!("bad Authorization header: {why}"));
        let rest = value
            .strip_prefix("Re6st ")
            .ok_or_else(|| bad("not a Re6st signature"))?;
        if rest.len() > 512 {
            return Err(bad("too long"));
        }
        let (mut serial, mut ts, mut nonce, mut sig) = (None, None, None, None);
        for part in rest.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match k.trim() {
                "serial" => serial = v.parse().ok(),
                "ts" => ts = v.parse().ok(),
                "nonce" => {
                    if v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        nonce = Some(v.to_string());
                    }
                }
                "sig" => sig = B64.decode(v).ok(),
                _ => return Err(bad("unknown field")),
            }
        }
        Ok(Self {
            serial: serial.ok_or_else(|| bad("serial"))?,
            ts: ts.ok_or_else(|| bad("ts"))?,
            nonce: nonce.ok_or_else(|| bad("nonce"))?,
            sig: sig.ok_or_else(|| bad("sig"))?,
        })
    }

    /// Checks the clock window and the signature by `public_key`.
    pub fn verify(
        &self,
        public_key: &[u8],
        method: &str,
        path: &str,
        body: &[u8],
        now: i64,
    ) -> Result<()> {
        if (now - self.ts).abs() > MAX_SKEW_S {
            return Err(Error::Unauthenticated(format!(
                "request signed at {} but now is {now}: clocks differ by more than {MAX_SKEW_S} s",
                self.ts
            )));
        }
        verify_ed25519(
            public_key,
            &request_message(method, path, self.ts, &self.nonce, body),
            &self.sig,
        )
    }
}

/// A node's announcement of where it can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRecord {
    /// The node's certificate (PEM).
    pub cert: String,
    /// Underlay endpoints (IP, UDP port) of its tunnel socket.
    pub endpoints: Vec<SocketAddr>,
    /// The endpoints are a NAT's mapping, which lets in only peers the
    /// node has sent to: ask the node to punch (peer protocol) before
    /// dialling.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nat: bool,
    /// Unix seconds when made.
    pub timestamp: i64,
}

/// A peer record with the node's signature over its exact JSON text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPeerRecord {
    /// JSON text of a [`PeerRecord`].
    pub payload: String,
    /// Ed25519 signature by the node key over `payload`, base64.
    pub signature: String,
}

const PEER_CONTEXT: &[u8] = b"re6st-rs peer record v1\n";

impl SignedPeerRecord {
    /// Signs a record with the node key.
    pub fn sign(record: &PeerRecord, key: &KeyPair) -> Result<Self> {
        let payload = serde_json::to_string(record)
            .map_err(|e| Error::Corrupt(format!("serialising peer record: {e}")))?;
        let mut msg = PEER_CONTEXT.to_vec();
        msg.extend_from_slice(payload.as_bytes());
        Ok(Self {
            payload,
            signature: B64.encode(sign(key, &msg)?),
        })
    }

    /// Checks that the record is well formed, carries a certificate of this
    /// CA valid at `now` and not in `crl`, and is signed by that
    /// certificate's key. Freshness is the caller's decision.
    pub fn verify(&self, ca: &CaCert, now: i64, crl: &[u64]) -> Result<(PeerRecord, NodeCert)> {
        if self.payload.len() > 16 * 1024 {
            return Err(Error::Invalid("peer record too large".into()));
        }
        let record: PeerRecord = serde_json::from_str(&self.payload)
            .map_err(|e| Error::Invalid(format!("peer record: {e}")))?;
        if record.endpoints.is_empty() || record.endpoints.len() > MAX_ENDPOINTS {
            return Err(Error::Invalid(format!(
                "a peer record has 1 to {MAX_ENDPOINTS} endpoints"
            )));
        }
        let cert = ca.verify_node(&record.cert, Some(now))?;
        if crl.contains(&cert.serial) {
            return Err(Error::Forbidden(format!(
                "certificate {} is revoked",
                cert.serial
            )));
        }
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| Error::Invalid("peer record signature is not base64".into()))?;
        let mut msg = PEER_CONTEXT.to_vec();
        msg.extend_from_slice(self.payload.as_bytes());
        verify_ed25519(&cert.public_key, &msg, &sig)?;
        Ok((record, cert))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{generate_key, Ca};

    const NOW: i64 = 1_790_000_000;

    #[test]
    fn request_signatures_verify_and_bind_everything() -> Result<()> {
        let key = generate_key()?;
        let h = sign_request(&key, 42, "POST", "/v1/renew", b"{}", NOW)?;
        let auth = RequestAuth::parse(&h)?;
        assert_eq!(auth.serial, 42);
        let pk = key.public_key_raw();
        auth.verify(pk, "POST", "/v1/renew", b"{}", NOW + 10)?;
        assert!(auth.verify(pk, "GET", "/v1/renew", b"{}", NOW).is_err());
        assert!(auth.verify(pk, "POST", "/v1/other", b"{}", NOW).is_err());
        assert!(auth.verify(pk, "POST", "/v1/renew", b"{ }", NOW).is_err());
        assert!(auth
            .verify(pk, "POST", "/v1/renew", b"{}", NOW + 400)
            .is_err());
        assert!(auth
            .verify(
                generate_key()?.public_key_raw(),
                "POST",
                "/v1/renew",
                b"{}",
                NOW
            )
            .is_err());
        for bad in [
            "",
            "Basic x",
            "Re6st serial=1",
            "Re6st serial=1,ts=2,nonce=zz,sig=AA==",
            "Re6st a=b",
        ] {
            assert!(RequestAuth::parse(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn peer_records_are_checked() -> Result<()> {
        let ca = Ca::generate(
            "fd5e::/48"
                .parse()
                .map_err(|_| Error::Invalid("n".into()))?,
            NOW,
            10,
        )?;
        let prefix = "fd5e:0:0:1::/64"
            .parse()
            .map_err(|_| Error::Invalid("p".into()))?;
        let (key, cert) = ca.issue_with_new_key(prefix, [1; 32], 9, NOW, NOW + 86_400)?;
        let rec = PeerRecord {
            cert,
            endpoints: vec!["198.18.1.2:326"
                .parse()
                .map_err(|_| Error::Invalid("e".into()))?],
            nat: false,
            timestamp: NOW,
        };
        let signed = SignedPeerRecord::sign(&rec, &key)?;
        let (back, c) = signed.verify(ca.cert(), NOW, &[])?;
        assert_eq!((back, c.serial), (rec.clone(), 9));
        assert!(matches!(
            signed.verify(ca.cert(), NOW, &[9]),
            Err(Error::Forbidden(_))
        ));
        let forged = SignedPeerRecord::sign(&rec, &generate_key()?)?;
        assert!(forged.verify(ca.cert(), NOW, &[]).is_err());
        let mut empty = rec;
        empty.endpoints.clear();
        assert!(SignedPeerRecord::sign(&empty, &key)?
            .verify(ca.cert(), NOW, &[])
            .is_err());
        Ok(())
    }
}
