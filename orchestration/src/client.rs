//! Talking to the master: node-signed requests (agents), instance-signed
//! requests (an instance asking for children) or requests signed with the
//! operator's token (never sent itself).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use re6st_registry::auth::sign_request;
use serde::de::DeserializeOwned;

use crate::assignment::{SignedAssignments, MAX_PAYLOAD};
use crate::identity::LiveIdentity;
use crate::instance_key::INSTANCE_HEADER;
use crate::master::{Hello, RequestBody, CERT_HEADER};
use crate::store::{Instance, Node, Report};

/// Makes ring rustls's crypto provider (reqwest is built without one);
/// call before building any HTTP client.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How the client proves who it is.
pub enum Credentials {
    /// The node's identity (agents).
    Node(Arc<LiveIdentity>),
    /// An instance's name and the key its agent made for it.
    Instance(String, Box<rcgen::KeyPair>),
    /// The operator's token.
    Admin(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(id) => write!(f, "Node({id:?})"),
            Self::Instance(name, _) => write!(f, "Instance({name})"),
            Self::Admin(_) => write!(f, "Admin"),
        }
    }
}

/// A client of one master.
#[derive(Debug)]
pub struct MasterClient {
    base: String,
    http: reqwest::Client,
    creds: Credentials,
}

impl MasterClient {
    /// A client of the master at `base` (http://[overlay address]:port).
    pub fn new(base: &str, creds: Credentials) -> anyhow::Result<Self> {
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("master URL {base:?} must start with http:// or https://");
        }
        install_crypto();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            creds,
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let body = body.unwrap_or_default();
        let mut req = self.http.request(method.clone(), &url);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        match &self.creds {
            Credentials::Node(live) => {
                let id = live.current();
                let h = sign_request(&id.key, id.cert.serial, method.as_str(), path, &body, now)?;
                req = req
                    .header("authorization", h)
                    .header(CERT_HEADER, B64.encode(&id.cert_pem));
            }
            Credentials::Instance(name, key) => {
                let h = sign_request(key, 0, method.as_str(), path, &body, now)?;
                req = req
                    .header("authorization", h)
                    .header(INSTANCE_HEADER, name.as_str());
            }
            Credentials::Admin(t) => {
                let nonce = re6st_registry::config::random_bytes::<16>()?;
                let h = crate::operator_auth::sign(t, method.as_str(), path, &body, nonce, now);
                req = req.header("authorization", h);
            }
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_PAYLOAD as u64)
        {
            bail!("{method} {url}: answer larger than {MAX_PAYLOAD} bytes");
        }
        let bytes = resp.bytes().await.context("reading the answer")?;
        if bytes.len() > MAX_PAYLOAD {
            bail!("{method} {url}: answer larger than {MAX_PAYLOAD} bytes");
        }
        if !status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            bail!("{detail} ({status})");
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).with_context(|| format!("{method} {url}: unexpected answer"))
    }

    /// Agent: register (name, site) and report routing.
    pub async fn hello(
        &self,
        name: &str,
        site: &str,
        routes: BTreeMap<String, u16>,
    ) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&Hello {
            name: name.to_string(),
            routes,
            site: site.to_string(),
        })?;
        self.send::<serde_json::Value>(reqwest::Method::POST, "/v1/agent/hello", Some(body))
            .await
            .map(|_| ())
    }

    /// Agent: what to run, signed by the master for this poll's `nonce`
    /// (32 hexadecimal digits); the caller verifies it.
    pub async fn assignments(&self, nonce: &str) -> anyhow::Result<SignedAssignments> {
        self.send(
            reqwest::Method::GET,
            &format!("/v1/agent/instances?nonce={nonce}"),
            None,
        )
        .await
    }

    /// Agent: report on an instance.
    pub async fn report(&self, r: &Report) -> anyhow::Result<()> {
        let body = serde_json::to_vec(r)?;
        self.send::<()>(reqwest::Method::POST, "/v1/agent/report", Some(body))
            .await
    }

    /// Request an instance.
    pub async fn request(&self, r: &RequestBody) -> anyhow::Result<Instance> {
        let body = serde_json::to_vec(r)?;
        self.send(reqwest::Method::POST, "/v1/request", Some(body))
            .await
    }

    /// Every instance.
    pub async fn list(&self) -> anyhow::Result<Vec<Instance>> {
        self.send(reqwest::Method::GET, "/v1/instances", None).await
    }

    /// One instance with its history.
    pub async fn show(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.send(reqwest::Method::GET, &format!("/v1/instances/{name}"), None)
            .await
    }

    /// Destroy an instance.
    pub async fn destroy(&self, name: &str) -> anyhow::Result<Instance> {
        self.send(
            reqwest::Method::DELETE,
            &format!("/v1/instances/{name}"),
            None,
        )
        .await
    }

    /// Registered nodes.
    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        self.send(reqwest::Method::GET, "/v1/nodes", None).await
    }
}
