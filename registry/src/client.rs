//! Client of the registry's `/v1` API (used by `re6st-conf`, `re6stnet` and
//! the orchestration).

use std::time::Duration;

use rcgen::KeyPair;
use serde::de::DeserializeOwned;

use crate::api::{BootstrapAnswer, CaAnswer, ErrorAnswer, JoinRequest, RenewRequest, MAX_BODY};
use crate::auth::{sign_request, SignedPeerRecord};
use crate::config::{Sealed, SignedConfig};
use crate::error::{Error, Result};
use crate::server::now;
use crate::store::Issued;
use crate::topology::{Report, REPORT_PATH};

/// A node's signing identity: its key and the serial of its certificate.
pub struct Identity<'a> {
    /// The node key.
    pub key: &'a KeyPair,
    /// The serial of the certificate that goes with it.
    pub serial: u64,
}

/// A registry at one base URL.
#[derive(Clone, Debug)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

fn install_crypto() {
    // reqwest is built without a bundled provider; ring is ours. A second
    // call finds it installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RegistryClient {
    /// A client for `base` (`http://host:port` or `https://...`), trusting
    /// the system's roots for HTTPS.
    pub fn new(base: &str) -> Result<Self> {
        Self::with_tls_root(base, None)
    }

    /// Like [`RegistryClient::new`], also trusting `tls_root` (PEM) for
    /// HTTPS: for a registry whose TLS certificate comes from a private CA.
    pub fn with_tls_root(base: &str, tls_root: Option<&str>) -> Result<Self> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "registry URL {base:?} must start with http:// or https://"
            )));
        }
        install_crypto();
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = tls_root {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| Error::Invalid(format!("TLS root certificate: {e}")))?;
            builder = builder.tls_certs_merge([cert]);
        }
        let http = builder
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("re6st-rs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Transport(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        who: Option<&Identity<'_>>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let body = body.unwrap_or_default();
        let mut req = self.http.request(method.clone(), &url);
        if let Some(id) = who {
            let h = sign_request(id.key, id.serial, method.as_str(), path, &body, now())?;
            req = req.header("authorization", h);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Transport(format!("{method} {url}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Transport(format!("{method} {url}: reading the answer: {e}")))?;
        if bytes.len() > 4 * MAX_BODY {
            return Err(Error::Transport(format!(
                "{method} {url}: answer too large"
            )));
        }
        if !status.is_success() {
            let detail = serde_json::from_slice::<ErrorAnswer>(&bytes)
                .map(|e| e.detail)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(match status.as_u16() {
                400 | 413 => Error::Invalid(detail),
                401 => Error::Unauthenticated(detail),
                403 => Error::Forbidden(detail),
                404 => Error::NotFound(detail),
                409 => Error::Conflict(detail),
                _ => Error::Transport(format!("{method} {url}: {status}: {detail}")),
            });
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Transport(format!("{method} {url}: unexpected answer: {e}")))
    }

    /// The CA certificate and its fingerprint.
    pub async fn ca(&self) -> Result<CaAnswer> {
        self.send(reqwest::Method::GET, "/v1/ca", None, None).await
    }

    /// The signed network configuration (verify it with the pinned CA).
    pub async fn config(&self) -> Result<SignedConfig> {
        self.send(reqwest::Method::GET, "/v1/config", None, None)
            .await
    }

    /// Joins with a token.
    pub async fn join(&self, req: &JoinRequest) -> Result<Issued> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Invalid(e.to_string()))?;
        self.send(reqwest::Method::POST, "/v1/join", Some(body), None)
            .await
    }

    /// Renews (node-signed).
    pub async fn renew(&self, who: &Identity<'_>, req: &RenewRequest) -> Result<Issued> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Invalid(e.to_string()))?;
        self.send(reqwest::Method::POST, "/v1/renew", Some(body), Some(who))
            .await
    }

    /// The HMAC keys, sealed to our WireGuard key (node-signed).
    pub async fn hmac_keys(&self, who: &Identity<'_>) -> Result<Sealed> {
        self.send(reqwest::Method::GET, "/v1/hmac-keys", None, Some(who))
            .await
    }

    /// Publishes our peer record (node-signed).
    pub async fn publish_peer(&self, who: &Identity<'_>, record: &SignedPeerRecord) -> Result<()> {
        let body = serde_json::to_vec(record).map_err(|e| Error::Invalid(e.to_string()))?;
        self.send::<()>(reqwest::Method::POST, "/v1/peer", Some(body), Some(who))
            .await
    }

    /// Posts our topology report (node-signed).
    pub async fn report(&self, who: &Identity<'_>, report: &Report) -> Result<()> {
        let body = serde_json::to_vec(report).map_err(|e| Error::Invalid(e.to_string()))?;
        self.send::<()>(reqwest::Method::POST, REPORT_PATH, Some(body), Some(who))
            .await
    }

    /// A few peers to start from (members only, never ourselves).
    pub async fn bootstrap(&self, who: &Identity<'_>) -> Result<Vec<SignedPeerRecord>> {
        let a: BootstrapAnswer = self
            .send(reqwest::Method::GET, "/v1/bootstrap", None, Some(who))
            .await?;
        Ok(a.peers)
    }
}
