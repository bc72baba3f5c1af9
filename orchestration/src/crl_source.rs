//! The revoked serials the master enforces: from the network configuration
//! re6stnet keeps, as last verified. A missing, unreadable or forged file
//! never empties it; before any file has verified there is none, and the
//! master refuses agents (it cannot tell who is revoked).

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use re6st_registry::cert::CaCert;
use re6st_registry::config::SignedConfig;

/// The last CRL that verified, read again from `path` at each call.
#[derive(Debug)]
pub struct LastVerifiedCrl {
    path: PathBuf,
    ca: CaCert,
    last: Mutex<Option<Vec<u64>>>,
}

impl LastVerifiedCrl {
    /// Reads the configuration at `path`, signed by `ca`.
    pub fn new(path: PathBuf, ca: CaCert) -> Self {
        Self {
            path,
            ca,
            last: Mutex::new(None),
        }
    }

    /// The CRL of the file if it verifies now, else the last one that did.
    pub fn current(&self) -> Option<Vec<u64>> {
        let fresh = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<SignedConfig>(&t).ok())
            .and_then(|s| s.verify(&self.ca).ok())
            .map(|c| c.crl);
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if fresh.is_some() {
            *last = fresh;
        }
        last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use re6st_registry::cert::Ca;
    use re6st_registry::config::NetworkConfig;

    #[test]
    fn only_a_verified_file_changes_the_crl() {
        let t = 1_790_000_000;
        let ca = Ca::generate("fd5e:5e::/48".parse().unwrap_or_default(), t, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        let other = Ca::generate("fd5e:5e::/48".parse().unwrap_or_default(), t, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        let path = std::env::temp_dir().join(format!("orch-crl-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let write = |signer: &Ca, crl: Vec<u64>| {
            let mut c = NetworkConfig::new("fd5e:5e::/48", 64, t);
            c.crl = crl;
            let s = SignedConfig::sign(&c, |m| signer.sign(m)).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(&path, serde_json::to_string(&s).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let crl = LastVerifiedCrl::new(path.clone(), ca.cert().clone());
        assert_eq!(crl.current(), None, "no file yet");
        write(&ca, vec![7]);
        assert_eq!(crl.current(), Some(vec![7]));
        write(&other, Vec::new());
        assert_eq!(crl.current(), Some(vec![7]), "a forged file");
        std::fs::write(&path, "garbage").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crl.current(), Some(vec![7]), "an unreadable file");
        let _ = std::fs::remove_file(&path);
        assert_eq!(crl.current(), Some(vec![7]), "a missing file");
        write(&ca, vec![7, 9]);
        assert_eq!(crl.current(), Some(vec![7, 9]));
        let _ = std::fs::remove_file(&path);
    }
}
