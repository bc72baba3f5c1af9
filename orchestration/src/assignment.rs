//! What the master tells an agent to run, signed so that the agent runs only
//! what the master decided, for this node, now.
//!
//! The agent sends a fresh nonce with each poll; the master answers with the
//! instances of that node, the node's prefix and the nonce, signed with its
//! own node key, and its certificate. The agent accepts the answer only if
//! the certificate is the network CA's, valid and not revoked, its prefix
//! holds the address the agent was told the master is at, the signature
//! holds, and the prefix and nonce are its own. A forged answer, one meant
//! for another node or an old one replayed is refused whole: the agent keeps
//! running what it runs. Assignments name software and version only; what
//! to run for them comes from the agent's own catalogue.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use re6st_registry::cert::{sign, verify_ed25519, CaCert};
use serde::{Deserialize, Serialize};

use crate::identity::NodeIdentity;
use crate::store::Instance;

/// Largest signed answer an agent reads.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

const CONTEXT: &[u8] = b"re6st-rs assignments v1\n";

/// One instance to run, with the version of its software the master's
/// catalogue has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assigned {
    /// The instance.
    pub instance: Instance,
    /// The software version (the descriptor's `version`).
    pub version: u32,
    /// The connection parameters of the instance's other copies (those
    /// that reported some), for services that replicate between them.
    #[serde(default)]
    pub peers: Vec<BTreeMap<String, String>>,
}

/// Everything one node must run, at the time of one poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignments {
    /// The node these are for (its certificate's prefix).
    pub node: Ipv6Net,
    /// The nonce of the agent's poll.
    pub nonce: String,
    /// When the master signed (unix seconds; informative).
    pub issued_at: i64,
    /// The instances.
    pub instances: Vec<Assigned>,
}

/// [`Assignments`] as JSON text, the master's signature over it and the
/// master's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedAssignments {
    /// JSON text of [`Assignments`].
    pub payload: String,
    /// Ed25519 signature by the master's node key, base64.
    pub signature: String,
    /// The master's node certificate (PEM).
    pub cert: String,
}

/// What the agent expects of an answer.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The network CA.
    pub ca: &'a CaCert,
    /// Revoked serials (from the last verified network configuration).
    pub crl: &'a [u64],
    /// Now (unix seconds), for the certificate's validity.
    pub now: i64,
    /// Where the agent was told the master is (the address of `--master`).
    pub master: Ipv6Addr,
    /// This node's prefix.
    pub node: Ipv6Net,
    /// The nonce of this poll.
    pub nonce: &'a str,
}

/// Why an answer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignmentError {
    /// Not the expected shape.
    #[error("malformed assignments: {0}")]
    Malformed(String),
    /// The certificate is not a valid one of this network.
    #[error("the signer's certificate: {0}")]
    Certificate(String),
    /// The certificate is revoked.
    #[error("the signer's certificate {0} is revoked")]
    Revoked(u64),
    /// Signed by a node that is not at the master's address.
    #[error("signed by node {signer}, which does not hold the master's address {master}")]
    NotTheMaster {
        /// The signer's prefix.
        signer: Ipv6Net,
        /// The master's address.
        master: Ipv6Addr,
    },
    /// The signature does not hold.
    #[error("the signature does not match")]
    Signature,
    /// Meant for another node.
    #[error("assignments for {0}, not for this node")]
    OtherNode(Ipv6Net),
    /// Not the answer to this poll (an old one replayed).
    #[error("not the answer to this poll: nonce {0:?}")]
    Replayed(String),
}

fn message(payload: &str) -> Vec<u8> {
    let mut msg = CONTEXT.to_vec();
    msg.extend_from_slice(payload.as_bytes());
    msg
}

impl SignedAssignments {
    /// Signs assignments with the master's identity.
    pub fn sign(a: &Assignments, master: &NodeIdentity) -> anyhow::Result<Self> {
        let payload = serde_json::to_string(a)?;
        Ok(Self {
            signature: B64.encode(sign(&master.key, &message(&payload))?),
            payload,
            cert: master.cert_pem.clone(),
        })
    }

    /// Checks the answer as described at the top of this file; returns what
    /// it assigns.
    pub fn verify(&self, want: &Expected<'_>) -> Result<Assignments, AssignmentError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(AssignmentError::Malformed("too large".into()));
        }
        let cert = want
            .ca
            .verify_node(&self.cert, Some(want.now))
            .map_err(|e| AssignmentError::Certificate(e.to_string()))?;
        if want.crl.contains(&cert.serial) {
            return Err(AssignmentError::Revoked(cert.serial));
        }
        if !cert.prefix.contains(&want.master) {
            return Err(AssignmentError::NotTheMaster {
                signer: cert.prefix,
                master: want.master,
            });
        }
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| AssignmentError::Malformed("signature is not base64".into()))?;
        verify_ed25519(&cert.public_key, &message(&self.payload), &sig)
            .map_err(|_| AssignmentError::Signature)?;
        let a: Assignments = serde_json::from_str(&self.payload)
            .map_err(|e| AssignmentError::Malformed(e.to_string()))?;
        if a.node != want.node {
            return Err(AssignmentError::OtherNode(a.node));
        }
        if a.nonce != want.nonce {
            return Err(AssignmentError::Replayed(a.nonce));
        }
        if let Some(i) = a.instances.iter().find(|i| i.instance.node.is_empty()) {
            return Err(AssignmentError::Malformed(format!(
                "instance {:?} has no node",
                i.instance.name
            )));
        }
        // Names become directories: even a master's key must not name one
        // outside the agent's base directory.
        if let Some(i) = a
            .instances
            .iter()
            .find(|i| !crate::store::valid_name(&i.instance.name))
        {
            return Err(AssignmentError::Malformed(format!(
                "instance name {:?}",
                i.instance.name
            )));
        }
        Ok(a)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use re6st_registry::cert::Ca;

    pub(crate) const NOW: i64 = 1_790_000_000;

    /// A CA and identities for the prefixes `fd5e:5e:0:N::/64`.
    pub(crate) fn network() -> Ca {
        Ca::generate("fd5e:5e::/48".parse().unwrap_or_default(), NOW - 10, 10)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub(crate) fn identity(ca: &Ca, n: u16, serial: u64) -> NodeIdentity {
        let prefix: Ipv6Net = format!("fd5e:5e:0:{n:x}::/64")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let (key, cert_pem) = ca
            .issue_with_new_key(prefix, [n as u8; 32], serial, NOW - 10, NOW + 86_400)
            .unwrap_or_else(|e| panic!("{e}"));
        NodeIdentity {
            ca: ca.cert().clone(),
            cert: ca
                .cert()
                .verify_node(&cert_pem, None)
                .unwrap_or_else(|e| panic!("{e}")),
            cert_pem,
            key,
        }
    }

    fn assignments(node: &NodeIdentity, nonce: &str) -> Assignments {
        Assignments {
            node: node.cert.prefix,
            nonce: nonce.into(),
            issued_at: NOW,
            instances: vec![Assigned {
                instance: Instance {
                    name: "web".into(),
                    software: "http-static".into(),
                    params: BTreeMap::new(),
                    node: "n2".into(),
                    state: "started".into(),
                    status: "pending".into(),
                    connection: BTreeMap::new(),
                    generation: 1,
                    updated_at: NOW,
                    copy_of: String::new(),
                    copies: 1,
                    requester: Default::default(),
                },
                version: 1,
                peers: Vec::new(),
            }],
        }
    }

    #[test]
    fn only_the_masters_fresh_answer_for_this_node_is_accepted() {
        let ca = network();
        let master = identity(&ca, 1, 11);
        let agent = identity(&ca, 2, 12);
        let member = identity(&ca, 3, 13);
        let want = Expected {
            ca: ca.cert(),
            crl: &[],
            now: NOW,
            master: master.cert.address,
            node: agent.cert.prefix,
            nonce: "n1",
        };
        let good = SignedAssignments::sign(&assignments(&agent, "n1"), &master)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(good.verify(&want), Ok(assignments(&agent, "n1")));

        // Replayed: the master's genuine answer to an earlier poll.
        let old = SignedAssignments::sign(&assignments(&agent, "n0"), &master)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            old.verify(&want),
            Err(AssignmentError::Replayed("n0".into()))
        );

        // The master's genuine answer to another node.
        let theirs = SignedAssignments::sign(&assignments(&member, "n1"), &master)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            theirs.verify(&want),
            Err(AssignmentError::OtherNode(member.cert.prefix))
        );

        // A member signs with its own valid certificate.
        let forged = SignedAssignments::sign(&assignments(&agent, "n1"), &member)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            forged.verify(&want),
            Err(AssignmentError::NotTheMaster { .. })
        ));

        // The master's certificate with a payload changed on the way.
        let mut altered = good.clone();
        altered.payload = altered.payload.replace("http-static", "re6st-registry");
        assert_eq!(altered.verify(&want), Err(AssignmentError::Signature));

        // Another CA's certificate for the master's prefix.
        let rogue_ca = network();
        let rogue =
            SignedAssignments::sign(&assignments(&agent, "n1"), &identity(&rogue_ca, 1, 11))
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            rogue.verify(&want),
            Err(AssignmentError::Certificate(_))
        ));

        // The master revoked, or its certificate expired.
        assert_eq!(
            good.verify(&Expected { crl: &[11], ..want }),
            Err(AssignmentError::Revoked(11))
        );
        assert!(matches!(
            good.verify(&Expected {
                now: NOW + 2 * 86_400,
                ..want
            }),
            Err(AssignmentError::Certificate(_))
        ));

        // Even the master cannot name a directory outside the base.
        let mut escaping = assignments(&agent, "n1");
        escaping.instances[0].instance.name = "/etc/cron.d".into();
        let escaping =
            SignedAssignments::sign(&escaping, &master).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            escaping.verify(&want),
            Err(AssignmentError::Malformed(ref m)) if m.contains("/etc/cron.d")
        ));

        let mut garbage = good.clone();
        garbage.signature = "***".into();
        assert!(matches!(
            garbage.verify(&want),
            Err(AssignmentError::Malformed(_))
        ));
    }
}
