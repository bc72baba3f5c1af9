//! JSON bodies of the registry's `/v1` API, shared by server and client.

use serde::{Deserialize, Serialize};

/// Largest request body the registry reads.
pub const MAX_BODY: usize = 64 * 1024;

/// `GET /v1/ca`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaAnswer {
    /// The CA certificate (PEM).
    pub cert: String,
    /// SHA-256 of its DER, hex.
    pub fingerprint: String,
    /// The network prefix.
    pub network: String,
}

/// `POST /v1/join`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The one-time token.
    pub token: String,
    /// CSR (PEM) for the node's Ed25519 key: empty subject, no extensions.
    pub csr: String,
    /// The node's WireGuard public key, base64.
    pub wg_key: String,
}

/// `POST /v1/renew` (node-signed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A new WireGuard public key (base64), to rotate it; else the current one is kept.
    #[serde(default)]
    pub wg_key: Option<String>,
}

/// `GET /v1/bootstrap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapAnswer {
    /// A few random fresh peer records.
    pub peers: Vec<crate::auth::SignedPeerRecord>,
}

/// `POST /v1/admin/tokens`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Free text.
    #[serde(default)]
    pub comment: Option<String>,
    /// Seconds until the token expires (default: 7 days).
    #[serde(default)]
    pub expires_in_s: Option<i64>,
    /// Prefix length for the node (default: the network's).
    #[serde(default)]
    pub prefix_len: Option<u8>,
}

/// Answer to `POST /v1/admin/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenAnswer {
    /// The new token.
    pub token: String,
}

/// `POST /v1/admin/revoke`: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A node prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// A certificate serial.
    #[serde(default)]
    pub serial: Option<u64>,
}

/// Answer to a revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeAnswer {
    /// Serials added to the CRL.
    pub revoked: Vec<u64>,
}

/// `PUT /v1/admin/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetParam {
    /// Parameter name.
    pub key: String,
    /// New value, as text.
    pub value: String,
}

/// Every error answer: `{error, detail}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// Short code (`invalid`, `unauthenticated`, `forbidden`, ...).
    pub error: String,
    /// What was wrong, for people.
    pub detail: String,
}
