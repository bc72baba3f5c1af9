//! A node's identity as re6st-conf left it: its certificate (checked against
//! the CA next to it) and its key. Agents sign their requests with it, the
//! master signs assignments with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use anyhow::Context;
use re6st_registry::cert::{load_key, CaCert, NodeCert};

/// The CA, the node's certificate (PEM and parsed) and its key.
pub struct NodeIdentity {
    /// The network's CA (`ca.crt`).
    pub ca: CaCert,
    /// The certificate's PEM text (`node.crt`).
    pub cert_pem: String,
    /// What the certificate says.
    pub cert: NodeCert,
    /// The node key (`node.key`).
    pub key: rcgen::KeyPair,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NodeIdentity({}, serial {})",
            self.cert.prefix, self.cert.serial
        )
    }
}

impl NodeIdentity {
    /// Reads `ca.crt`, `node.crt` and `node.key` from a re6st-conf directory;
    /// the certificate must be this CA's (its validity is checked where it is
    /// used, at each use).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("reading {}", dir.join(f).display()))
        };
        let ca = CaCert::from_pem(&read("ca.crt")?)?;
        let cert_pem = read("node.crt")?;
        let cert = ca.verify_node(&cert_pem, None)?;
        let key = load_key(&read("node.key")?)?;
        if key.public_key_raw() != cert.public_key {
            anyhow::bail!(
                "{} does not hold the key of {}",
                dir.join("node.key").display(),
                dir.join("node.crt").display()
            );
        }
        Ok(Self {
            ca,
            cert_pem,
            cert,
            key,
        })
    }
}

/// A node's identity that follows its renewals. `re6stnet` rewrites
/// `node.crt` when the registry renews it, and the registry revokes the
/// superseded certificate an hour after the node first uses the new one:
/// a master or agent holding the old one would then be refused. Each use
/// looks at `node.crt` again (only its mtime, unless it changed) and takes
/// a new certificate of the same CA, prefix and key with a higher serial.
pub struct LiveIdentity {
    dir: Option<PathBuf>,
    state: Mutex<(Arc<NodeIdentity>, Option<SystemTime>)>,
}

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveIdentity({:?})", self.current())
    }
}

impl LiveIdentity {
    /// The identity in a re6st-conf directory, following its renewals.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let id = NodeIdentity::from_dir(dir)?;
        Ok(Self {
            state: Mutex::new((Arc::new(id), mtime(dir))),
            dir: Some(dir.to_path_buf()),
        })
    }

    /// An identity that never changes (tests, tools).
    pub fn fixed(id: NodeIdentity) -> Self {
        Self {
            dir: None,
            state: Mutex::new((Arc::new(id), None)),
        }
    }

    /// The identity now.
    pub fn current(&self) -> Arc<NodeIdentity> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(dir) = &self.dir else {
            return Arc::clone(&st.0);
        };
        let m = mtime(dir);
        if m != st.1 {
            st.1 = m;
            match NodeIdentity::from_dir(dir) {
                Ok(new) if new.cert.serial == st.0.cert.serial => {}
                Ok(new) if renews(&st.0, &new) => {
                    tracing::info!(serial = new.cert.serial, "renewed node certificate");
                    st.0 = Arc::new(new);
                }
                Ok(new) => tracing::warn!(
                    serial = new.cert.serial,
                    "node.crt changed to another identity: kept the one this process started with"
                ),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "node.crt changed and does not load")
                }
            }
        }
        Arc::clone(&st.0)
    }
}

/// `new` is a renewal of `old`: same CA, prefix and key, newer serial.
fn renews(old: &NodeIdentity, new: &NodeIdentity) -> bool {
    new.ca.pem() == old.ca.pem()
        && new.cert.prefix == old.cert.prefix
        && new.cert.public_key == old.cert.public_key
        && new.cert.serial > old.cert.serial
}

fn mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir.join("node.crt"))
        .and_then(|m| m.modified())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use re6st_registry::cert::Ca;

    const NOW: i64 = 1_790_000_000;

    /// A renewal written by re6stnet is taken; another identity is not.
    #[test]
    fn a_live_identity_follows_renewals_only() {
        let dir = std::env::temp_dir().join(format!("re6st-live-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::generate("fd5e::/48".parse().unwrap(), NOW - 100, 10).unwrap();
        let prefix = "fd5e:0:0:1::/64".parse().unwrap();
        let (key, pem) = ca
            .issue_with_new_key(prefix, [1; 32], 5, NOW - 10, NOW + 86_400)
            .unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert().pem()).unwrap();
        std::fs::write(dir.join("node.crt"), &pem).unwrap();
        std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
        let live = LiveIdentity::from_dir(&dir).unwrap();
        assert_eq!(live.current().cert.serial, 5);
        let renewed = ca
            .issue(&re6st_registry::cert::IssueRequest {
                public_key: key.public_key_raw().to_vec(),
                prefix,
                wg_key: [1; 32],
                serial: 9,
                not_before: NOW - 10,
                not_after: NOW + 2 * 86_400,
            })
            .unwrap();
        std::fs::write(dir.join("node.crt"), &renewed).unwrap();
        assert_eq!(live.current().cert.serial, 9, "renewal taken");
        let (_, other) = ca
            .issue_with_new_key(prefix, [2; 32], 12, NOW - 10, NOW + 86_400)
            .unwrap();
        std::fs::write(dir.join("node.crt"), &other).unwrap();
        assert_eq!(live.current().cert.serial, 9, "another key: not ours");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
