//! The signed network configuration, and the Babel HMAC keys.
//!
//! The configuration is one JSON document signed by the CA key. The exact
//! signed bytes travel with the signature (`payload` is the JSON text), so a
//! verifier checks the bytes first and parses them second: no canonical
//! form is needed.
//!
//! The HMAC keys are never in that public document: a member fetches them
//! with a node-signed request, and they are sealed to its WireGuard key
//! (X25519 + HKDF-SHA256 + ChaCha20-Poly1305) so that only that node can
//! read them, even over plain HTTP.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};

use crate::cert::CaCert;
use crate::error::{Error, Result};

/// Version of the registry protocol spoken by this code.
pub const PROTOCOL: u32 = 1;

/// A configuration (and its CRL) is valid this long after it is signed;
/// the registry signs it again at half of it, so that a node cut off from
/// the registry and from every up-to-date peer notices it.
pub const CONFIG_VALIDITY_S: i64 = 7 * 86_400;

/// How long past its validity a configuration is still used: a node
/// refuses one older than that, from a peer or its own cache (it then
/// waits for the registry). A running node keeps the one it has.
pub const STALE_BOUND_S: i64 = 30 * 86_400;

/// Largest signed configuration (its JSON) that floods between peers:
/// re6stnet's peer messages are 8 KiB at most, with the sender's
/// certificate and signature around it (re6stnet's peer tests check that
/// this size still fits). Beyond it (about 930 revoked six-digit serials), nodes get
/// new configurations from the registry only.
pub const FLOOD_BYTES: usize = 7_000;

/// How current a configuration is (see [`NetworkConfig::freshness`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Within its validity, or signed before configurations had one.
    Fresh,
    /// Past its validity, within [`STALE_BOUND_S`]: used, and a newer one asked for.
    Stale,
    /// Past [`STALE_BOUND_S`] beyond its validity: refused.
    Expired,
}

/// The network configuration every node caches and applies live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Increases with every change.
    pub version: u64,
    /// Unix seconds when this version was made.
    pub issued_at: i64,
    /// The network prefix (e.g. `fd5e:2a1:77::/48`).
    pub network: String,
    /// Default node prefix length.
    pub prefix_len: u8,
    /// Babel hello interval on tunnels, milliseconds.
    pub hello_interval_ms: u32,
    /// RTT below which no penalty applies, milliseconds.
    pub rtt_min_ms: u32,
    /// RTT at which the penalty is maximal, milliseconds.
    pub rtt_max_ms: u32,
    /// Maximal RTT penalty added to a link's cost.
    pub max_rtt_penalty: u32,
    /// Outgoing tunnels per node.
    pub client_count: u32,
    /// Incoming tunnels a node accepts.
    pub max_clients: u32,
    /// Seconds between two tunnel rotations.
    pub tunnel_refresh_s: u32,
    /// Tunnel MTU.
    pub mtu: u32,
    /// Protocol version of the registry.
    pub protocol: u32,
    /// Nodes below this protocol version must not run.
    pub min_protocol: u32,
    /// Registry URLs.
    pub registry_urls: Vec<String>,
    /// Revoked serials whose certificates have not expired yet, sorted.
    pub crl: Vec<u64>,
    /// Version of the HMAC key set (a rotation floods like any change).
    pub hmac_version: u64,
    /// Unix seconds after which this configuration is stale (see
    /// [`Freshness`]); 0 in configurations signed before it existed.
    #[serde(default)]
    pub valid_until: i64,
    /// A node every connected part of the mesh routes (re6st: the
    /// registry's own node; here the first node to join, or the
    /// operator's choice): a node that does not route it is on an island
    /// and spends one tunnel slot outside it, so a split mesh heals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// IPv4 inside the overlay (re6st `--ipv4`): every node gets a subnet
    /// of this network, derived from its IPv6 prefix (routing's
    /// `ipv4_map`). None: IPv6 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Overlay>,
}

/// The overlay's IPv4 network and how many bits a node subnet adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipv4Overlay {
    /// The IPv4 network (e.g. `198.19.0.0/16`).
    pub network: ipnet::Ipv4Net,
    /// Bits after the network's in a node's subnet (16 in a /16: /32 each).
    pub sublen: u8,
}

impl Ipv4Overlay {
    /// Parses `NETWORK SUBLEN` and checks it against the IPv6 network and
    /// node prefix length: every node of the default length must get a
    /// subnet of its own.
    pub fn parse(value: &str, network: ipnet::Ipv6Net, prefix_len: u8) -> Result<Self> {
        let bad = |why: String| Error::Invalid(format!("ipv4: {why}"));
        let mut words = value.split_whitespace();
        let (Some(net), Some(sub), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad(format!(
                "{value:?} is not `NETWORK SUBLEN` (e.g. `198.19.0.0/16 16`)"
            )));
        };
        let net: ipnet::Ipv4Net = net
            .parse()
            .map_err(|_| bad(format!("{net:?} is not an IPv4 network")))?;
        let sublen: u8 = sub
            .parse()
            .map_err(|_| bad(format!("{sub:?} is not a number of bits")))?;
        if sublen == 0 || u32::from(net.prefix_len()) + u32::from(sublen) > 32 {
            return Err(bad(format!(
                "{net} plus {sublen} bits is not a subnet length of 1 to 32"
            )));
        }
        let node_bits = prefix_len.saturating_sub(network.prefix_len());
        if sublen < node_bits {
            return Err(bad(format!(
                "{sublen} bits cannot number /{prefix_len} node prefixes of {network} \
                 ({node_bits} bits needed)"
            )));
        }
        if u32::from(network.prefix_len()) + u32::from(sublen) > 128 {
            return Err(bad(format!("{sublen} bits do not fit after {network}")));
        }
        Ok(Self {
            network: net.trunc(),
            sublen,
        })
    }
}

/// A settable parameter: its name, and how to check and apply a value.
struct Param {
    name: &'static str,
    min: u32,
    max: u32,
    field: fn(&mut NetworkConfig) -> &mut u32,
}

const PARAMS: &[Param] = &[
    Param {
        name: "hello_interval_ms",
        min: 50,
        max: 60_000,
        field: |c| &mut c.hello_interval_ms,
    },
    Param {
        name: "rtt_min_ms",
        min: 0,
        max: 10_000,
        field: |c| &mut c.rtt_min_ms,
    },
    Param {
        name: "rtt_max_ms",
        min: 1,
        max: 60_000,
        field: |c| &mut c.rtt_max_ms,
    },
    Param {
        name: "max_rtt_penalty",
        min: 0,
        max: 65_535,
        field: |c| &mut c.max_rtt_penalty,
    },
    Param {
        name: "client_count",
        min: 0,
        max: 1000,
        field: |c| &mut c.client_count,
    },
    Param {
        name: "max_clients",
        min: 0,
        max: 10_000,
        field: |c| &mut c.max_clients,
    },
    Param {
        name: "tunnel_refresh_s",
        min: 10,
        max: 86_400,
        field: |c| &mut c.tunnel_refresh_s,
    },
    Param {
        name: "mtu",
        min: 1280,
        max: 65_535,
        field: |c| &mut c.mtu,
    },
    Param {
        name: "min_protocol",
        min: 1,
        max: PROTOCOL,
        field: |c| &mut c.min_protocol,
    },
];

impl NetworkConfig {
    /// Defaults for a new network.
    pub fn new(network: &str, prefix_len: u8, now: i64) -> Self {
        Self {
            version: 1,
            issued_at: now,
            network: network.to_string(),
            prefix_len,
            hello_interval_ms: 300,
            rtt_min_ms: 10,
            rtt_max_ms: 500,
            max_rtt_penalty: 5000,
            client_count: 10,
            max_clients: 20,
            tunnel_refresh_s: 300,
            mtu: 1420,
            protocol: PROTOCOL,
            min_protocol: 1,
            registry_urls: Vec::new(),
            crl: Vec::new(),
            hmac_version: 1,
            valid_until: now + CONFIG_VALIDITY_S,
            anchor: None,
            ipv4: None,
        }
    }

    /// How current this configuration is at `unix`.
    pub fn freshness(&self, unix: i64) -> Freshness {
        if self.valid_until == 0 || unix <= self.valid_until {
            Freshness::Fresh
        } else if unix <= self.valid_until.saturating_add(STALE_BOUND_S) {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Names of the parameters `set` accepts.
    pub fn settable() -> Vec<&'static str> {
        let mut v: Vec<&str> = PARAMS.iter().map(|p| p.name).collect();
        v.push("registry_urls");
        v.push("anchor");
        v.push("ipv4");
        v
    }

    /// The network prefix, parsed.
    fn network_prefix(&self) -> Result<ipnet::Ipv6Net> {
        self.network
            .parse()
            .map_err(|_| Error::Corrupt("the configuration's network".into()))
    }

    /// Sets one parameter from text, checking its range. Does not bump the version.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        if key == "anchor" {
            let value = value.trim();
            if value.is_empty() {
                self.anchor = None;
                return Ok(());
            }
            let network = self.network_prefix()?;
            let p: ipnet::Ipv6Net = value
                .parse()
                .map_err(|_| Error::Invalid(format!("anchor: {value:?} is not an IPv6 prefix")))?;
            if !network.contains(&p) || p.prefix_len() <= network.prefix_len() {
                return Err(Error::Invalid(format!(
                    "anchor: {p} is not a node prefix inside {network}"
                )));
            }
            self.anchor = Some(p.to_string());
            return Ok(());
        }
        if key == "ipv4" {
            let value = value.trim();
            if value.is_empty() {
                self.ipv4 = None;
                return Ok(());
            }
            let network = self.network_prefix()?;
            self.ipv4 = Some(Ipv4Overlay::parse(value, network, self.prefix_len)?);
            return Ok(());
        }
        if key == "registry_urls" {
            let urls: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
            for u in &urls {
                if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 512 {
                    return Err(Error::Invalid(format!(
                        "registry URL {u:?} must be http(s)://..."
                    )));
                }
            }
            self.registry_urls = urls;
            return Ok(());
        }
        let p = PARAMS.iter().find(|p| p.name == key).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown parameter {key:?}; settable: {}",
                Self::settable().join(", ")
            ))
        })?;
        let v: u32 = value
            .trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("{key} takes a whole number, not {value:?}")))?;
        if v < p.min || v > p.max {
            return Err(Error::Invalid(format!(
                "{key} must be in {}..={}",
                p.min, p.max
            )));
        }
        let mut next = self.clone();
        *(p.field)(&mut next) = v;
        if next.rtt_min_ms >= next.rtt_max_ms {
            return Err(Error::Invalid(
                "rtt_min_ms must stay below rtt_max_ms".into(),
            ));
        }
        *self = next;
        Ok(())
    }
}

/// The configuration as served: the signed JSON text and the CA's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedConfig {
    /// The JSON text of a [`NetworkConfig`], exactly as signed.
    pub payload: String,
    /// Ed25519 signature by the CA key over `payload`, base64.
    pub signature: String,
}

const CONFIG_CONTEXT: &[u8] = b"re6st-rs network config v1\n";

impl SignedConfig {
    /// Signs a configuration with `sign` (the CA key).
    pub fn sign(
        config: &NetworkConfig,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        let payload = serde_json::to_string(config)
            .map_err(|e| Error::Corrupt(format!("serialising config: {e}")))?;
        let mut msg = CONFIG_CONTEXT.to_vec();
        msg.extend_from_slice(payload.as_bytes());
        Ok(Self {
            payload,
            signature: B64.encode(sign(&msg)?),
        })
    }

    /// Whether it is small enough to flood between peers ([`FLOOD_BYTES`]).
    pub fn floods(&self) -> bool {
        serde_json::to_string(self).is_ok_and(|t| t.len() <= FLOOD_BYTES)
    }

    /// Checks the signature with the CA and parses the configuration.
    pub fn verify(&self, ca: &CaCert) -> Result<NetworkConfig> {
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| Error::Invalid("config signature is not base64".into()))?;
        let mut msg = CONFIG_CONTEXT.to_vec();
        msg.extend_from_slice(self.payload.as_bytes());
        ca.verify(&msg, &sig)
            .map_err(|_| Error::Unauthenticated("network config not signed by the CA".into()))?;
        let config: NetworkConfig = serde_json::from_str(&self.payload)
            .map_err(|e| Error::Invalid(format!("network config: {e}")))?;
        if config.network != ca.network().to_string() {
            return Err(Error::Invalid(format!(
                "config is for network {}, CA for {}",
                config.network,
                ca.network()
            )));
        }
        Ok(config)
    }
}

/// A Babel key set as the registry sends it (sealed to one node): signed
/// by the CA for that node's WireGuard key, so that nobody who knows the
/// node's public key (anyone) can seal it another set, and a set for one
/// node is no set for another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHmacKeys {
    /// The JSON text of the [`HmacKeys`], exactly as signed.
    pub payload: String,
    /// Ed25519 signature by the CA key, base64.
    pub signature: String,
}

fn hmac_keys_message(recipient: &[u8; 32], payload: &str) -> Vec<u8> {
    let mut msg = b"re6st-rs hmac keys v1\n".to_vec();
    msg.extend_from_slice(B64.encode(recipient).as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(payload.as_bytes());
    msg
}

impl SignedHmacKeys {
    /// Signs `keys` for the node whose WireGuard key is `recipient`.
    pub fn sign(
        keys: &HmacKeys,
        recipient: &[u8; 32],
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        let payload = serde_json::to_string(keys)
            .map_err(|e| Error::Corrupt(format!("serialising keys: {e}")))?;
        let signature = B64.encode(sign(&hmac_keys_message(recipient, &payload))?);
        Ok(Self { payload, signature })
    }

    /// Checks the CA's signature for us (`recipient`) and parses the keys.
    pub fn verify(&self, ca: &CaCert, recipient: &[u8; 32]) -> Result<HmacKeys> {
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| Error::Invalid("key set signature is not base64".into()))?;
        ca.verify(&hmac_keys_message(recipient, &self.payload), &sig)
            .map_err(|_| {
                Error::Unauthenticated("Babel key set not signed by the CA for us".into())
            })?;
        serde_json::from_str(&self.payload).map_err(|e| Error::Invalid(format!("key set: {e}")))
    }
}

/// One Babel HMAC key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKey {
    /// Key identifier (increasing).
    pub id: u32,
    /// 32 key bytes, base64.
    pub key: String,
}

/// The key set a member uses: sign with one, accept several (rotation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKeys {
    /// Matches `NetworkConfig::hmac_version`.
    pub version: u64,
    /// The key to sign with.
    pub sign: HmacKey,
    /// Keys accepted on reception (includes `sign`).
    pub accept: Vec<HmacKey>,
    /// During a rotation, when the next phase is expected (unix seconds).
    pub valid_until: Option<i64>,
}

impl HmacKeys {
    /// A fresh key set with one random key.
    pub fn generate(version: u64) -> Result<Self> {
        let k = HmacKey {
            id: 1,
            key: B64.encode(random_bytes::<32>()?),
        };
        Ok(Self {
            version,
            sign: k.clone(),
            accept: vec![k],
            valid_until: None,
        })
    }

    /// One rotation step (each bumps `version`):
    /// stable `{K}` → announce (sign K, accept K and new N, `valid_until` set)
    /// → switch (sign N, accept N and K) → stable `{N}`.
    pub fn rotate(&self, now: i64) -> Result<Self> {
        let version = self.version + 1;
        Ok(match self.accept.len() {
            1 => {
                let next = HmacKey {
                    id: self.sign.id + 1,
                    key: B64.encode(random_bytes::<32>()?),
                };
                Self {
                    version,
                    sign: self.sign.clone(),
                    accept: vec![self.sign.clone(), next],
                    valid_until: Some(now + 3600),
                }
            }
            _ => {
                let newest = self
                    .accept
                    .iter()
                    .max_by_key(|k| k.id)
                    .cloned()
                    .ok_or_else(|| Error::Corrupt("empty HMAC key set".into()))?;
                if self.sign.id != newest.id {
                    // Announce -> switch: sign the new key, still accept the old.
                    Self {
                        version,
                        sign: newest.clone(),
                        accept: vec![newest, self.sign.clone()],
                        valid_until: Some(now + 3600),
                    }
                } else {
                    // Switch -> stable.
                    Self {
                        version,
                        sign: newest.clone(),
                        accept: vec![newest],
                        valid_until: None,
                    }
                }
            }
        })
    }
}

/// `N` random bytes from the system CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| Error::Corrupt("system random generator failed".into()))?;
    Ok(b)
}

/// Data sealed to one X25519 public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The sender's ephemeral X25519 public key, base64.
    pub ephemeral: String,
    /// ChaCha20-Poly1305 ciphertext with tag, base64.
    pub ciphertext: String,
}

const SEAL_INFO: &[u8] = b"re6st-rs seal v1";

struct OkmLen;
impl ring::hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        32
    }
}

fn seal_key(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> Result<LessSafeKey> {
    let mut salt_input = ephemeral.to_vec();
    salt_input.extend_from_slice(recipient);
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &salt_input);
    let prk = salt.extract(shared);
    let okm = prk
        .expand(&[SEAL_INFO], OkmLen)
        .map_err(|_| Error::Corrupt("HKDF failed".into()))?;
    let mut key = [0u8; 32];
    okm.fill(&mut key)
        .map_err(|_| Error::Corrupt("HKDF failed".into()))?;
    let unbound =
        UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| Error::Corrupt("AEAD key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

/// Seals `plaintext` so that only the holder of the X25519 secret matching
/// `recipient` can open it.
pub fn seal(recipient: &[u8; 32], plaintext: &[u8]) -> Result<Sealed> {
    let secret = x25519_dalek::StaticSecret::from(random_bytes::<32>()?);
    let ephemeral = x25519_dalek::PublicKey::from(&secret);
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*recipient));
    let key = seal_key(shared.as_bytes(), ephemeral.as_bytes(), recipient)?;
    let mut buf = plaintext.to_vec();
    // A fresh ephemeral key per message: a zero nonce is never reused.
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::empty(),
        &mut buf,
    )
    .map_err(|_| Error::Corrupt("sealing failed".into()))?;
    Ok(Sealed {
        ephemeral: B64.encode(ephemeral.as_bytes()),
        ciphertext: B64.encode(buf),
    })
}

/// Opens what [`seal`] sealed to our X25519 `secret`.
pub fn open(secret: &[u8; 32], sealed: &Sealed) -> Result<Vec<u8>> {
    let eph: [u8; 32] = B64
        .decode(&sealed.ephemeral)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Invalid("sealed: bad ephemeral key".into()))?;
    let mut buf = B64
        .decode(&sealed.ciphertext)
        .map_err(|_| Error::Invalid("sealed: ciphertext is not base64".into()))?;
    let secret = x25519_dalek::StaticSecret::from(*secret);
    let recipient = x25519_dalek::PublicKey::from(&secret);
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(eph));
    let key = seal_key(shared.as_bytes(), &eph, recipient.as_bytes())?;
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::empty(),
            &mut buf,
        )
        .map_err(|_| Error::Unauthenticated("sealed data does not open with our key".into()))?;
    Ok(plain.to_vec())
}

/// The X25519 public key of a secret.
pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::Ca;

    #[test]
    fn signed_config_round_trips_and_detects_tampering() -> Result<()> {
        let ca = Ca::generate(
            "fd5e::/48"
                .parse()
                .map_err(|_| Error::Invalid("n".into()))?,
            1_790_000_000,
            10,
        )?;
        let cfg = NetworkConfig::new("fd5e::/48", 64, 1_790_000_000);
        let signed = SignedConfig::sign(&cfg, |m| ca.sign(m))?;
        assert_eq!(signed.verify(ca.cert())?, cfg);
        let mut bad = signed.clone();
        bad.payload = bad
            .payload
            .replace("\"client_count\":10", "\"client_count\":99");
        assert!(matches!(
            bad.verify(ca.cert()),
            Err(Error::Unauthenticated(_))
        ));
        let other = Ca::generate(
            "fd5e::/48"
                .parse()
                .map_err(|_| Error::Invalid("n".into()))?,
            1_790_000_000,
            10,
        )?;
        assert!(signed.verify(other.cert()).is_err());
        Ok(())
    }

    #[test]
    fn set_checks_names_and_ranges() -> Result<()> {
        let mut c = NetworkConfig::new("fd5e::/48", 64, 0);
        c.set("client_count", "12")?;
        assert_eq!(c.client_count, 12);
        assert!(c.set("client_count", "-1").is_err());
        assert!(c.set("client_count", "x").is_err());
        assert!(c.set("mtu", "100").is_err());
        assert!(c.set("nope", "1").is_err());
        assert!(c.set("rtt_min_ms", "600").is_err());
        assert_eq!(c.rtt_min_ms, 10);
        c.set("registry_urls", "http://a.example, https://b.example")?;
        assert_eq!(c.registry_urls.len(), 2);
        assert!(c.set("registry_urls", "ftp://x").is_err());
        c.set("anchor", "fd5e:0:0:7::/64")?;
        assert_eq!(c.anchor.as_deref(), Some("fd5e:0:0:7::/64"));
        for bad in ["fd99::/64", "fd5e::/48", "x"] {
            assert!(c.set("anchor", bad).is_err(), "{bad}");
        }
        c.set("anchor", "")?;
        assert_eq!(c.anchor, None);
        c.set("ipv4", "198.19.0.0/16 16")?;
        assert_eq!(
            c.ipv4.map(|v| (v.network.to_string(), v.sublen)),
            Some(("198.19.0.0/16".into(), 16))
        );
        for bad in [
            "198.19.0.0/16",
            "198.19.0.0/16 17",
            "198.19.0.0/24 8",
            "198.19.0.0/16 0",
            "fd00::/64 8",
            "198.19.0.0/16 x",
        ] {
            assert!(c.set("ipv4", bad).is_err(), "{bad}");
        }
        c.set("ipv4", "")?;
        assert_eq!(c.ipv4, None);
        Ok(())
    }

    #[test]
    fn hmac_rotation_walks_the_three_phases() -> Result<()> {
        let k0 = HmacKeys::generate(1)?;
        let a = k0.rotate(100)?; // announce
        assert_eq!(
            (a.sign.id, a.accept.len(), a.valid_until),
            (1, 2, Some(3700))
        );
        let s = a.rotate(200)?; // switch
        assert_eq!((s.sign.id, s.accept.len()), (2, 2));
        assert!(s.accept.iter().any(|k| k.id == 1));
        let d = s.rotate(300)?; // stable again
        assert_eq!((d.sign.id, d.accept.len(), d.valid_until), (2, 1, None));
        assert_eq!(d.version, 4);
        assert_eq!(d.sign.key, a.accept[1].key);
        Ok(())
    }

    #[test]
    fn key_sets_verify_only_from_the_ca_for_their_node() -> Result<()> {
        let new_ca = || -> Result<crate::cert::Ca> {
            let network = "fd5e::/48"
                .parse()
                .map_err(|_| Error::Invalid("n".into()))?;
            crate::cert::Ca::generate(network, 1_790_000_000, 10)
        };
        let (ca, other) = (new_ca()?, new_ca()?);
        let keys = HmacKeys::generate(3)?;
        let me = [7u8; 32];
        let signed = SignedHmacKeys::sign(&keys, &me, |m| ca.sign(m))?;
        assert_eq!(signed.verify(ca.cert(), &me)?, keys);
        assert!(
            signed.verify(ca.cert(), &[8u8; 32]).is_err(),
            "another node's"
        );
        assert!(signed.verify(other.cert(), &me).is_err(), "another CA");
        let forged = SignedHmacKeys::sign(&keys, &me, |m| other.sign(m))?;
        assert!(forged.verify(ca.cert(), &me).is_err());
        let mut altered = signed.clone();
        altered.payload = altered.payload.replace("\"version\":3", "\"version\":9");
        assert!(altered.verify(ca.cert(), &me).is_err());
        Ok(())
    }

    #[test]
    fn sealed_data_opens_only_with_the_right_key() -> Result<()> {
        let secret = random_bytes::<32>()?;
        let public = x25519_public(&secret);
        let sealed = seal(&public, b"hmac keys")?;
        assert_eq!(open(&secret, &sealed)?, b"hmac keys");
        assert!(open(&random_bytes::<32>()?, &sealed).is_err());
        let mut bad = sealed.clone();
        bad.ciphertext = B64.encode([0u8; 40]);
        assert!(open(&secret, &bad).is_err());
        Ok(())
    }
}
