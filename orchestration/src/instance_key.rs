//! An instance's own identity: an Ed25519 key its agent makes for it at
//! each deployment, writes into the partition (readable by the instance's
//! user only) and reports the public half of. The instance signs its
//! requests to the master with it (header `X-Re6st-Instance: NAME` and the
//! node-request signature of `re6st_registry::auth`, serial 0), so the
//! master knows which instance asks, and what that instance owns.

use std::path::Path;

use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rcgen::KeyPair;

/// Header naming the calling instance.
pub const INSTANCE_HEADER: &str = "x-re6st-instance";
/// Length of a raw Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The key's file in the instance directory.
pub const FILE: &str = "instance.key";

/// A fresh key: (PKCS#8 PEM, base64 of the raw public key).
pub fn generate() -> anyhow::Result<(String, String)> {
    let key = re6st_registry::cert::generate_key().context("making an instance key")?;
    Ok((key.serialize_pem(), B64.encode(key.public_key_raw())))
}

/// Loads an instance key (PKCS#8 PEM, Ed25519).
pub fn load(path: &Path) -> anyhow::Result<KeyPair> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the instance key {}", path.display()))?;
    re6st_registry::cert::load_key(&pem).with_context(|| format!("{}", path.display()))
}

/// The raw public key of a reported base64 text, if it is one.
pub fn public_key(b64: &str) -> Option<Vec<u8>> {
    B64.decode(b64).ok().filter(|k| k.len() == PUBLIC_KEY_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_loads_and_matches_its_public_half() {
        let (pem, public) = generate().unwrap_or_else(|e| panic!("{e:#}"));
        let path = std::env::temp_dir().join(format!("instance-key-{}", std::process::id()));
        std::fs::write(&path, &pem).unwrap_or_else(|e| panic!("{e}"));
        let key = load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let _ = std::fs::remove_file(&path);
        assert_eq!(public_key(&public), Some(key.public_key_raw().to_vec()));
        assert_eq!(public_key("AAAA"), None);
        assert_eq!(public_key("not base64!"), None);
    }
}
