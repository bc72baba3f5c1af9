//! The node's files: its identity (written by re6st-conf) and what it keeps
//! to run with the registry down (the last network configuration and the
//! Babel keys).

use std::path::Path;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use re6st_registry::cert::{load_key, CaCert, NodeCert};
use re6st_registry::config::{HmacKeys, NetworkConfig, SignedConfig};
use re6st_routing::auth::{Algorithm, AuthConfig, Key};
use re6st_tunnel::setup::Identity;

use crate::enrol::{load_wg_key, write_atomic, CA_FILE, CERT_FILE, KEY_FILE, WG_FILE};

/// Cached signed network configuration.
pub const NETWORK_FILE: &str = "network.json";
/// Cached Babel keys (secret: 0600).
pub const HMAC_FILE: &str = "hmac.json";
/// Peer cache.
pub const CACHE_FILE: &str = "peers.sqlite";
/// File name of the persisted Babel seqno (one newer than any used).
pub const SEQNO_FILE: &str = "babel-seqno";

/// Everything read from the configuration directory.
#[derive(Debug)]
pub struct Files {
    /// The CA.
    pub ca: CaCert,
    /// Our certificate's PEM text.
    pub cert_pem: String,
    /// Our certificate.
    pub cert: NodeCert,
    /// Our node key's PEM text.
    pub key_pem: String,
    /// Our WireGuard secret.
    pub wg_secret: [u8; 32],
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (enrol the node first with re6st-conf)",
            path.display()
        )
    })
}

impl Files {
    /// Loads and checks the identity in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let ca = CaCert::from_pem(&read(&dir.join(CA_FILE))?)
            .with_context(|| format!("{}", dir.join(CA_FILE).display()))?;
        let cert_pem = read(&dir.join(CERT_FILE))?;
        // Validity is the daemon's business (it renews); the chain is checked here.
        let cert = ca
            .verify_node(&cert_pem, None)
            .with_context(|| format!("{}", dir.join(CERT_FILE).display()))?;
        let key_pem = read(&dir.join(KEY_FILE))?;
        let key =
            load_key(&key_pem).with_context(|| format!("{}", dir.join(KEY_FILE).display()))?;
        if key.public_key_raw() != cert.public_key.as_slice() {
            bail!("{} does not belong to {}", KEY_FILE, CERT_FILE);
        }
        let wg_secret = load_wg_key(&dir.join(WG_FILE))?;
        if re6st_registry::config::x25519_public(&wg_secret) != cert.wg_key {
            bail!(
                "{} does not match the WireGuard key of {}",
                WG_FILE,
                CERT_FILE
            );
        }
        Ok(Self {
            ca,
            cert_pem,
            cert,
            key_pem,
            wg_secret,
        })
    }

    /// A fresh [`Identity`] (certificate and key) for one user of it.
    pub fn identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity {
            cert: self.cert.clone(),
            key: load_key(&self.key_pem)?,
        })
    }
}

/// The last network configuration we accepted, kept across restarts.
pub fn load_network(state: &Path, ca: &CaCert) -> Option<(SignedConfig, NetworkConfig)> {
    let text = std::fs::read_to_string(state.join(NETWORK_FILE)).ok()?;
    let signed: SignedConfig = serde_json::from_str(&text).ok()?;
    let cfg = signed.verify(ca).ok()?;
    Some((signed, cfg))
}

/// Keeps a network configuration for the next start.
pub fn save_network(state: &Path, signed: &SignedConfig) -> anyhow::Result<()> {
    let text = serde_json::to_vec(signed)?;
    write_atomic(&state.join(NETWORK_FILE), &text, 0o644)
}

/// The Babel keys of the last start (None: none or unreadable).
pub fn load_hmac(state: &Path) -> Option<HmacKeys> {
    let text = std::fs::read_to_string(state.join(HMAC_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Keeps the Babel keys (0600).
pub fn save_hmac(state: &Path, keys: &HmacKeys) -> anyhow::Result<()> {
    write_atomic(&state.join(HMAC_FILE), &serde_json::to_vec(keys)?, 0o600)
}

/// The registry's key set as Babel's: HMAC-SHA256, sign with one, accept all.
pub fn auth_config(keys: &HmacKeys) -> anyhow::Result<AuthConfig> {
    let key = |k: &re6st_registry::config::HmacKey| -> anyhow::Result<Key> {
        let bytes = B64
            .decode(&k.key)
            .with_context(|| format!("HMAC key {} is not base64", k.id))?;
        if bytes.is_empty() || bytes.len() > 64 {
            bail!("HMAC key {} has {} bytes", k.id, bytes.len());
        }
        Ok(Key {
            algorithm: Algorithm::HmacSha256,
            key: bytes,
        })
    };
    Ok(AuthConfig {
        sign: key(&keys.sign)?,
        accept: keys.accept.iter().map(key).collect::<anyhow::Result<_>>()?,
    })
}

/// Creates the state directory.
pub fn state_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}
