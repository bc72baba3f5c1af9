//! A node's identity as re6st-conf left it: its certificate (checked against
//! the CA next to it) and its key. Agents sign their requests with it, the
//! master signs assignments with it.

use std::path::Path;

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
