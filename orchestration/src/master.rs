//! The master's HTTP API (axum). Agents authenticate with their node
//! certificate: the `X-Re6st-Cert` header (base64 PEM) and a request
//! signature (`Authorization: Re6st ...`, as for the registry), from a
//! source address inside the certificate's prefix, so they can only talk to
//! the master over the overlay; they may only greet, read their own
//! assignments and report on their own instances. Instances authenticate
//! with the key their agent made and reported for them (`X-Re6st-Instance`
//! and the same signature), from inside their node's prefix; they may
//! request, read and destroy what they own (`owner`). The operator's bearer
//! token may do everything, and alone lists nodes and metrics.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use re6st_registry::auth::RequestAuth;
use re6st_registry::cert::NodeCert;
use serde::{Deserialize, Serialize};

use crate::assignment::{Assigned, Assignments, SignedAssignments};
use crate::identity::LiveIdentity;
use crate::instance_key::INSTANCE_HEADER;
use crate::operator_auth::{self, OperatorAuth};
use crate::owner::{self, Requester};
use crate::store::{Instance, Placement, Report, Store, StoreError};

/// Largest accepted body.
pub const MAX_BODY: usize = 64 * 1024;
/// Header carrying the caller's certificate (base64 of its PEM).
pub const CERT_HEADER: &str = "x-re6st-cert";

/// The master's shared state.
pub struct Master {
    store: Mutex<Store>,
    identity: LiveIdentity,
    crl: Box<dyn Fn() -> Option<Vec<u64>> + Send + Sync>,
    admin_token: Option<String>,
    seen: Mutex<HashMap<String, i64>>,
    agent_timeout_s: i64,
    replacements: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master").finish_non_exhaustive()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An error answer: `{error, detail}` with a status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.0 {
            StatusCode::UNAUTHORIZED => "unauthenticated",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::BAD_REQUEST => "invalid",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        };
        (
            self.0,
            Json(serde_json::json!({"error": kind, "detail": self.1})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Forbidden(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

fn unauth(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, why.into())
}

/// Who is calling.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A node, by its certificate.
    Node(NodeCert),
    /// An instance, by the key its agent reported.
    Instance(String),
    /// The operator (bearer token).
    Admin,
}

impl Master {
    /// A master over `store`, with the node `identity` it runs on (its CA
    /// signs callers, its key signs assignments); `crl` gives the revoked serials
    /// now (from the last verified network configuration the node daemon
    /// keeps), `None` while there is none: agents are then refused, since
    /// revocations cannot be checked.
    pub fn new(
        store: Store,
        identity: LiveIdentity,
        crl: Box<dyn Fn() -> Option<Vec<u64>> + Send + Sync>,
        admin_token: Option<String>,
        agent_timeout_s: i64,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(store),
            identity,
            crl,
            admin_token,
            seen: Mutex::new(HashMap::new()),
            agent_timeout_s: agent_timeout_s.max(1),
            replacements: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How long an agent may be silent before its copies are re-placed.
    pub fn agent_timeout_s(&self) -> i64 {
        self.agent_timeout_s
    }

    /// Re-places copies whose agent has been silent longer than the agent
    /// timeout (or whose node is revoked), and forgets destroyed instances
    /// on such nodes; returns the moves.
    pub fn replace_lost_copies(&self) -> Vec<(String, String, String)> {
        let Some(revoked) = (self.crl)() else {
            return Vec::new();
        };
        let t = now();
        match self
            .store()
            .forget_lost_destroyed(t - self.agent_timeout_s, &revoked, t)
        {
            Ok(gone) => {
                for (instance, node) in gone {
                    tracing::info!(%instance, %node, "destroyed instance forgotten: its agent is silent or revoked");
                }
            }
            Err(e) => tracing::warn!(error = %e, "forgetting destroyed instances"),
        }
        match self
            .store()
            .replace_lost_copies(t - self.agent_timeout_s, &revoked, t)
        {
            Ok(moves) => {
                self.replacements
                    .fetch_add(moves.len() as u64, std::sync::atomic::Ordering::Relaxed);
                moves
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-placing copies");
                Vec::new()
            }
        }
    }

    /// The revoked serials; 503 while no network configuration verified.
    fn revoked(&self) -> Result<Vec<u64>, ApiError> {
        (self.crl)().ok_or_else(|| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "no verified network configuration yet: revocations cannot be checked".into(),
            )
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks the caller: a node certificate with a valid signature from
    /// inside its prefix, or the admin token.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        method: &Method,
        uri: &Uri,
        body: &[u8],
        src: IpAddr,
    ) -> Result<Caller, ApiError> {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauth("no Authorization header"))?;
        let t = now();
        if let Some(token) = auth.strip_prefix("Bearer ") {
            if !self.on_this_node(src) {
                return Err(unauth(
                    "the operator token as a bearer is accepted only from this node: across the overlay relaying nodes would read it (re6st-orch signs with it instead)",
                ));
            }
            return match &self.admin_token {
                Some(t) if constant_eq(t.as_bytes(), token.trim().as_bytes()) => Ok(Caller::Admin),
                _ => Err(unauth("bad admin token")),
            };
        }
        if auth.starts_with(operator_auth::SCHEME) {
            let a = OperatorAuth::parse(auth).map_err(|e| unauth(e.to_string()))?;
            let token = self
                .admin_token
                .as_deref()
                .ok_or_else(|| unauth("this master has no operator token"))?;
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            a.verify(token, method.as_str(), path, body, t)
                .map_err(|e| unauth(e.to_string()))?;
            self.fresh(&a.nonce, t)?;
            return Ok(Caller::Admin);
        }
        let ra = RequestAuth::parse(auth).map_err(|e| unauth(e.to_string()))?;
        if let Some(name) = headers.get(INSTANCE_HEADER) {
            let name = name
                .to_str()
                .map_err(|_| unauth(format!("bad {INSTANCE_HEADER} header")))?;
            let (prefix, key, started) = self
                .store()
                .instance_credentials(name)?
                .ok_or_else(|| unauth(format!("no instance {name:?}")))?;
            let key = crate::instance_key::public_key(&key).ok_or_else(|| {
                unauth(format!(
                    "{name} has no key yet: its agent has not reported one"
                ))
            })?;
            if !started {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!("{name} is being destroyed"),
                ));
            }
            from_inside(src, prefix)?;
            self.verify(&ra, &key, method, uri, body, t)?;
            return Ok(Caller::Instance(name.to_string()));
        }
        let pem = headers
            .get(CERT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| B64.decode(v).ok())
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or_else(|| unauth(format!("no {CERT_HEADER} header")))?;
        let cert = self
            .identity
            .current()
            .ca
            .verify_node(&pem, Some(t))
            .map_err(|e| unauth(format!("certificate: {e}")))?;
        if cert.serial != ra.serial {
            return Err(unauth("signature serial is not the certificate's"));
        }
        if self.revoked()?.contains(&cert.serial) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "revoked certificate".into(),
            ));
        }
        from_inside(src, cert.prefix)?;
        self.verify(&ra, &cert.public_key, method, uri, body, t)?;
        Ok(Caller::Node(cert))
    }

    /// Checks a request signature by `public_key` and that its nonce is new.
    fn verify(
        &self,
        ra: &RequestAuth,
        public_key: &[u8],
        method: &Method,
        uri: &Uri,
        body: &[u8],
        t: i64,
    ) -> Result<(), ApiError> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        ra.verify(public_key, method.as_str(), path, body, t)
            .map_err(|e| unauth(e.to_string()))?;
        self.fresh(&ra.nonce, t)
    }

    /// Refuses a nonce seen within the clock window (a replayed request).
    fn fresh(&self, nonce: &str, t: i64) -> Result<(), ApiError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.retain(|_, at| (t - *at).abs() <= 2 * re6st_registry::auth::MAX_SKEW_S);
        if seen.insert(nonce.to_string(), t).is_some() {
            return Err(unauth("replayed request"));
        }
        Ok(())
    }

    /// Whether `src` is this node: loopback or inside its prefix, where no
    /// other node relays the traffic.
    fn on_this_node(&self, src: IpAddr) -> bool {
        src.is_loopback()
            || matches!(src, IpAddr::V6(a) if self.identity.current().cert.prefix.contains(&a))
    }
}

/// Nodes and their instances talk to the master over the overlay: from an
/// address inside the node's prefix.
fn from_inside(src: IpAddr, prefix: Ipv6Net) -> Result<(), ApiError> {
    match src {
        IpAddr::V6(a) if prefix.contains(&a) => Ok(()),
        _ => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{src} is not inside {prefix}: nodes talk to the master over the overlay"),
        )),
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type Shared = Arc<Master>;

/// An authenticated request: the caller and the body (checked against the
/// signature). As an extractor it must come last.
struct Call {
    caller: Caller,
    body: Bytes,
}

impl axum::extract::FromRequest<Shared> for Call {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, m: &Shared) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let src = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no peer address".into()))?;
        let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "body too large or unreadable".into(),
            )
        })?;
        call(m, &parts.headers, &parts.method, &parts.uri, body, src)
    }
}

fn call(
    m: &Master,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: Bytes,
    src: SocketAddr,
) -> Result<Call, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError(StatusCode::BAD_REQUEST, "body too large".into()));
    }
    let ip = match src.ip() {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        v4 => v4,
    };
    let caller = m.authenticate(headers, method, uri, &body, ip)?;
    Ok(Call { caller, body })
}

/// The certificate of a caller acting as an agent: only node certificates
/// may greet, read their own assignments and report.
pub fn agent_cert(caller: &Caller) -> Result<&NodeCert, ApiError> {
    match caller {
        Caller::Node(cert) => Ok(cert),
        Caller::Admin | Caller::Instance(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            "agents only: neither the operator token nor an instance acts as a node".into(),
        )),
    }
}

/// Checks that the caller is an operator. A member node is not one: it can
/// neither place instances (which would run code on any node) nor read or
/// destroy anyone's.
pub fn operator(caller: &Caller) -> Result<(), ApiError> {
    match requester(caller)? {
        Requester::Operator => Ok(()),
        Requester::Instance(name) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("operators only: instance {name} only sees what it requested"),
        )),
    }
}

/// The caller as a requester: the operator or an instance. A member node
/// is neither.
pub fn requester(caller: &Caller) -> Result<Requester, ApiError> {
    match caller {
        Caller::Admin => Ok(Requester::Operator),
        Caller::Instance(name) => Ok(Requester::Instance(name.clone())),
        Caller::Node(cert) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "operators only: node {} is a member, not an operator (use --admin-token-file)",
                cert.prefix
            ),
        )),
    }
}

fn parse<T: for<'a> Deserialize<'a>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

fn node_of(m: &Master, c: &Caller) -> Result<(String, Ipv6Net), ApiError> {
    let cert = agent_cert(c)?;
    let name = m.store().node_by_prefix(cert.prefix)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no node registered for {}", cert.prefix),
        )
    })?;
    Ok((name, cert.prefix))
}

/// An agent's greeting: its name and its routing (metric per prefix).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The node's name.
    pub name: String,
    /// Route metric per destination prefix.
    #[serde(default)]
    pub routes: BTreeMap<String, u16>,
    /// The node's site (copies go to distinct sites); empty: the node is
    /// a site of its own.
    #[serde(default)]
    pub site: String,
}

/// An agent's poll: the nonce the signed answer must carry.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    /// 32 hexadecimal digits, fresh for each poll.
    pub nonce: String,
}

/// A request for an instance.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestBody {
    /// Instance name.
    pub name: String,
    /// Software.
    pub software: String,
    /// Parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// On this node.
    pub node: Option<String>,
    /// Near this prefix.
    pub near: Option<String>,
    /// Copies on distinct sites: a new group, or the new size of an
    /// existing one (none: 1 for a new instance, unchanged for one that
    /// exists).
    #[serde(default)]
    pub copies: Option<u32>,
}

/// Most copies of one instance.
pub const MAX_COPIES: u32 = 16;

/// What `request` answers for a group of copies: the first copy, with the
/// group's status (ready when every copy is) and every copy's connection
/// parameters as `KEY@NODE`, plus the plain keys of the first ready copy.
pub fn group_view(group: &[Instance]) -> Option<Instance> {
    let mut first = group.first()?.clone();
    if group.len() < 2 {
        return Some(first);
    }
    first.status = group
        .iter()
        .find(|i| i.status != "ready")
        .map_or_else(|| "ready".to_string(), |i| i.status.clone());
    let mut connection = group
        .iter()
        .find(|i| i.status == "ready")
        .map(|i| i.connection.clone())
        .unwrap_or_default();
    for i in group {
        for (k, v) in &i.connection {
            connection.insert(format!("{k}@{}", i.node), v.clone());
        }
    }
    first.connection = connection;
    Some(first)
}

async fn hello(State(m): State<Shared>, c: Call) -> Result<Response, ApiError> {
    let cert = agent_cert(&c.caller)?;
    let h: Hello = parse(&c.body)?;
    let t = now();
    let mut s = m.store();
    let site = if h.site.is_empty() { &h.name } else { &h.site };
    s.register_node(&h.name, cert.prefix, cert.serial, site, t)?;
    s.set_routes(&h.name, &h.routes, t)?;
    Ok(Json(serde_json::json!({"node": h.name})).into_response())
}

async fn assignments(
    State(m): State<Shared>,
    Query(poll): Query<Poll>,
    c: Call,
) -> Result<Response, ApiError> {
    let (node, prefix) = node_of(&m, &c.caller)?;
    m.store().seen(&node, now())?;
    if poll.nonce.len() != 32 || !poll.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "nonce: 32 hexadecimal digits".into(),
        ));
    }
    let instances = {
        let s = m.store();
        s.instances(Some(&node))?
            .into_iter()
            .map(|instance| {
                let version = s.software(&instance.software)?.version;
                let group = match (&instance.copy_of, instance.copies) {
                    (first, _) if !first.is_empty() => first.clone(),
                    (_, n) if n > 1 => instance.name.clone(),
                    _ => String::new(),
                };
                let peers = if group.is_empty() {
                    Vec::new()
                } else {
                    s.group(&group)?
                        .into_iter()
                        .filter(|c| c.name != instance.name && !c.connection.is_empty())
                        .map(|c| c.connection)
                        .collect()
                };
                Ok(Assigned {
                    instance,
                    version,
                    peers,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?
    };
    let a = Assignments {
        node: prefix,
        nonce: poll.nonce,
        issued_at: now(),
        instances,
    };
    let signed = SignedAssignments::sign(&a, &m.identity.current())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("signing: {e:#}")))?;
    Ok(Json(signed).into_response())
}

async fn report(State(m): State<Shared>, c: Call) -> Result<Response, ApiError> {
    let (node, _) = node_of(&m, &c.caller)?;
    let r: Report = parse(&c.body)?;
    m.store().report(&node, &r, now())?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn request(State(m): State<Shared>, c: Call) -> Result<Response, ApiError> {
    let who = requester(&c.caller)?;
    let r: RequestBody = parse(&c.body)?;
    let copies = r.copies.unwrap_or(1);
    if copies == 0 || copies > MAX_COPIES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("--copies: 1 to {MAX_COPIES}"),
        ));
    }
    let placement = match (r.node, r.near) {
        (Some(_), Some(_)) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give --node or --near, not both".into(),
            ))
        }
        (Some(_), None) | (None, Some(_)) if copies > 1 => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "--copies places each copy on another site: not with --node or --near".into(),
            ))
        }
        (None, None) if r.copies.is_some() => Placement::Copies(copies),
        (Some(n), None) => Placement::Node(n),
        (None, Some(p)) => Placement::Near(p.parse().map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("--near {p:?} is not an IPv6 prefix"),
            )
        })?),
        (None, None) => Placement::Auto,
    };
    let revoked = m.revoked()?;
    let mut s = m.store();
    s.request(
        &who,
        &r.name,
        &r.software,
        &r.params,
        &placement,
        &revoked,
        now(),
    )?;
    let view = group_view(&s.group(&r.name)?).ok_or_else(|| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{} vanished", r.name),
        )
    })?;
    Ok(Json(view).into_response())
}

async fn list(State(m): State<Shared>, c: Call) -> Result<Response, ApiError> {
    let who = requester(&c.caller)?;
    let s = m.store();
    let by = s.requesters()?;
    let visible: Vec<Instance> = s
        .instances(None)?
        .into_iter()
        .filter(|i| owner::may_read(&who, &i.name, &by).is_ok())
        .collect();
    Ok(Json(visible).into_response())
}

impl Master {
    /// Every node, `revoked` filled in from the CRL.
    fn nodes(&self) -> Result<Vec<crate::store::Node>, ApiError> {
        let revoked = self.revoked()?;
        let mut nodes = self.store().nodes()?;
        for n in &mut nodes {
            n.revoked = revoked.contains(&n.serial);
        }
        Ok(nodes)
    }
}

async fn nodes(State(m): State<Shared>, c: Call) -> Result<Response, ApiError> {
    operator(&c.caller)?;
    Ok(Json(m.nodes()?).into_response())
}

async fn metrics(State(m): State<Shared>, c: Call) -> Result<Response, ApiError> {
    operator(&c.caller)?;
    let nodes = m.nodes()?;
    let instances = m.store().instances(None)?;
    let text = crate::metrics::render(&crate::metrics::Snapshot {
        instances: &instances,
        nodes: &nodes,
        now: now(),
        agent_timeout_s: m.agent_timeout_s,
        replacements: m.replacements.load(std::sync::atomic::Ordering::Relaxed),
    });
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

async fn show(
    State(m): State<Shared>,
    UrlPath(name): UrlPath<String>,
    c: Call,
) -> Result<Response, ApiError> {
    let who = requester(&c.caller)?;
    let s = m.store();
    let i = s
        .instance(&name)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no instance {name:?}")))?;
    owner::may_read(&who, &name, &s.requesters()?).map_err(StoreError::from)?;
    let history: Vec<serde_json::Value> = s
        .history(&name)?
        .into_iter()
        .map(|(at, status, detail)| serde_json::json!({"at": at, "status": status, "detail": detail}))
        .collect();
    drop(s);
    let agent = m.nodes()?.into_iter().find(|n| n.name == i.node).map(|n| {
        let silence = now() - n.last_seen;
        serde_json::json!({
            "node": n.name,
            "site": n.site,
            "silent_s": silence,
            "live": silence <= m.agent_timeout_s && !n.revoked,
            "revoked": n.revoked,
        })
    });
    Ok(
        Json(serde_json::json!({"instance": i, "agent": agent, "history": history}))
            .into_response(),
    )
}

async fn destroy(
    State(m): State<Shared>,
    UrlPath(name): UrlPath<String>,
    c: Call,
) -> Result<Response, ApiError> {
    let who = requester(&c.caller)?;
    Ok(Json(m.store().destroy(&who, &name, now())?).into_response())
}

/// The API.
pub fn router(m: Shared) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/v1/agent/hello", post(hello))
        .route("/v1/agent/instances", get(assignments))
        .route("/v1/agent/report", post(report))
        .route("/v1/request", post(request))
        .route("/v1/instances", get(list))
        .route("/v1/instances/{name}", get(show).delete(destroy))
        .route("/v1/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use re6st_registry::auth::sign_request;
    use re6st_registry::cert::Ca;

    fn setup(
        revoked: Option<Vec<u64>>,
    ) -> (Arc<Master>, String, rcgen::KeyPair, std::path::PathBuf) {
        let t = now();
        let ca = Ca::generate("fd5e:5e::/48".parse().unwrap_or_default(), t - 10, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        let (key, pem) = ca
            .issue_with_new_key(
                "fd5e:5e:0:2::/64".parse().unwrap_or_default(),
                [7; 32],
                42,
                t - 10,
                t + 86_400,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "orch-auth-{}-{}.db",
            std::process::id(),
            RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let m = Master::new(
            store,
            LiveIdentity::fixed(crate::assignment::tests::identity(&ca, 1, 41)),
            Box::new(move || revoked.clone()),
            Some("tok".into()),
            60,
        );
        (m, pem, key, path)
    }

    fn headers(
        pem: &str,
        key: &rcgen::KeyPair,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> HeaderMap {
        let mut h = HeaderMap::new();
        let auth = sign_request(key, 42, method, path, body, now()).unwrap_or_default();
        h.insert(
            "authorization",
            auth.parse().unwrap_or_else(|e| panic!("{e}")),
        );
        h.insert(
            CERT_HEADER,
            B64.encode(pem).parse().unwrap_or_else(|e| panic!("{e}")),
        );
        h
    }

    #[test]
    fn callers_are_checked() {
        let (m, pem, key, path) = setup(Some(Vec::new()));
        let uri: Uri = "/v1/agent/instances".parse().unwrap_or_default();
        let inside: IpAddr = "fd5e:5e:0:2::1"
            .parse()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        let outside: IpAddr = "fd00:18::2"
            .parse()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        let h = headers(&pem, &key, "GET", "/v1/agent/instances", b"");
        let ok = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(
            matches!(ok, Ok(Caller::Node(ref c)) if c.serial == 42),
            "{ok:?}"
        );
        let replay = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(
            matches!(replay, Err(ApiError(StatusCode::UNAUTHORIZED, ref d)) if d.contains("replayed"))
        );
        let h = headers(&pem, &key, "GET", "/v1/agent/instances", b"");
        let under = m.authenticate(&h, &Method::GET, &uri, b"", outside);
        assert!(
            matches!(under, Err(ApiError(StatusCode::FORBIDDEN, ref d)) if d.contains("overlay"))
        );
        let h = headers(&pem, &key, "GET", "/v1/other", b"");
        let forged = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(
            matches!(forged, Err(ApiError(StatusCode::UNAUTHORIZED, _))),
            "signature over another path"
        );
        // The bearer token only from the master's own node: relays would
        // read it on its way across the overlay.
        let loopback = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            "Bearer tok".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(matches!(
            m.authenticate(&h, &Method::GET, &uri, b"", loopback),
            Ok(Caller::Admin)
        ));
        let remote = m.authenticate(&h, &Method::GET, &uri, b"", outside);
        assert!(
            matches!(remote, Err(ApiError(StatusCode::UNAUTHORIZED, ref d)) if d.contains("only from this node")),
            "{remote:?}"
        );
        h.insert(
            "authorization",
            "Bearer nope".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(m
            .authenticate(&h, &Method::GET, &uri, b"", loopback)
            .is_err());
        // Signed with the token, from anywhere; once.
        let signed = |token: &str, nonce: u8| {
            let mut h = HeaderMap::new();
            let v = crate::operator_auth::sign(
                token,
                "GET",
                "/v1/agent/instances",
                b"",
                [nonce; 16],
                now(),
            );
            h.insert("authorization", v.parse().unwrap_or_else(|e| panic!("{e}")));
            h
        };
        assert!(matches!(
            m.authenticate(&signed("tok", 1), &Method::GET, &uri, b"", outside),
            Ok(Caller::Admin)
        ));
        let replay = m.authenticate(&signed("tok", 1), &Method::GET, &uri, b"", outside);
        assert!(
            matches!(replay, Err(ApiError(StatusCode::UNAUTHORIZED, ref d)) if d.contains("replayed")),
            "{replay:?}"
        );
        let wrong = m.authenticate(&signed("nope", 2), &Method::GET, &uri, b"", outside);
        assert!(
            matches!(wrong, Err(ApiError(StatusCode::UNAUTHORIZED, _))),
            "{wrong:?}"
        );
        let body = m.authenticate(&signed("tok", 3), &Method::GET, &uri, b"{}", outside);
        assert!(
            matches!(body, Err(ApiError(StatusCode::UNAUTHORIZED, _))),
            "{body:?}"
        );
        h.insert(
            "authorization",
            "Re6st garbage".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(m.authenticate(&h, &Method::GET, &uri, b"", inside).is_err());
        let member = m
            .authenticate(
                &headers(&pem, &key, "GET", "/v1/agent/instances", b""),
                &Method::GET,
                &uri,
                b"",
                inside,
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(agent_cert(&member).is_ok());
        assert!(
            matches!(operator(&member), Err(ApiError(StatusCode::FORBIDDEN, ref d)) if d.contains("operators only"))
        );
        assert!(operator(&Caller::Admin).is_ok());
        assert!(agent_cert(&Caller::Admin).is_err());
        let _ = std::fs::remove_file(path);

        let (m, pem, key, path) = setup(Some(vec![42]));
        let h = headers(&pem, &key, "GET", "/v1/agent/instances", b"");
        let revoked = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(
            matches!(revoked, Err(ApiError(StatusCode::FORBIDDEN, ref d)) if d.contains("revoked"))
        );
        let _ = std::fs::remove_file(path);

        // No verified configuration: not "nothing is revoked" but "cannot tell".
        let (m, pem, key, path) = setup(None);
        let h = headers(&pem, &key, "GET", "/v1/agent/instances", b"");
        let unknown = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(
            matches!(unknown, Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, _))),
            "{unknown:?}"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn instances_sign_with_the_key_their_agent_reported() {
        let (m, _, _, path) = setup(Some(Vec::new()));
        let prefix: Ipv6Net = "fd5e:5e:0:2::/64".parse().unwrap_or_default();
        let inside: IpAddr = "fd5e:5e:0:2::1:0"
            .parse()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        let elsewhere: IpAddr = "fd5e:5e:0:3::1"
            .parse()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        {
            let mut s = m.store();
            s.add_software("name = \"svc\"\ncommand = [\"true\"]\n")
                .unwrap_or_else(|e| panic!("{e}"));
            s.register_node("n2", prefix, 42, "site-2", now())
                .unwrap_or_else(|e| panic!("{e}"));
            s.request(
                &Requester::Operator,
                "web",
                "svc",
                &BTreeMap::new(),
                &Placement::Auto,
                &[],
                now(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let key = re6st_registry::cert::generate_key().unwrap_or_else(|e| panic!("{e}"));
        let uri: Uri = "/v1/instances".parse().unwrap_or_default();
        let signed = |key: &rcgen::KeyPair, name: &str| {
            let mut h = HeaderMap::new();
            let auth = sign_request(key, 0, "GET", "/v1/instances", b"", now()).unwrap_or_default();
            h.insert(
                "authorization",
                auth.parse().unwrap_or_else(|e| panic!("{e}")),
            );
            h.insert(
                INSTANCE_HEADER,
                name.parse().unwrap_or_else(|e| panic!("{e}")),
            );
            h
        };
        let before = m.authenticate(&signed(&key, "web"), &Method::GET, &uri, b"", inside);
        assert!(
            matches!(before, Err(ApiError(StatusCode::UNAUTHORIZED, ref d)) if d.contains("no key yet")),
            "{before:?}"
        );
        let report = Report {
            name: "web".into(),
            generation: 1,
            status: "starting".into(),
            connection: BTreeMap::new(),
            detail: String::new(),
            key: B64.encode(key.public_key_raw()),
        };
        m.store()
            .report("n2", &report, now())
            .unwrap_or_else(|e| panic!("{e}"));
        let h = signed(&key, "web");
        let ok = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(
            matches!(ok, Ok(Caller::Instance(ref n)) if n == "web"),
            "{ok:?}"
        );
        assert!(
            matches!(requester(&Caller::Instance("web".into())), Ok(Requester::Instance(ref n)) if n == "web")
        );
        assert!(operator(&Caller::Instance("web".into())).is_err());
        assert!(agent_cert(&Caller::Instance("web".into())).is_err());
        let replay = m.authenticate(&h, &Method::GET, &uri, b"", inside);
        assert!(matches!(replay, Err(ApiError(StatusCode::UNAUTHORIZED, _))));
        // Another key (the node's own, a member's), another node, another
        // instance's name: refused.
        let other = re6st_registry::cert::generate_key().unwrap_or_else(|e| panic!("{e}"));
        let forged = m.authenticate(&signed(&other, "web"), &Method::GET, &uri, b"", inside);
        assert!(
            matches!(forged, Err(ApiError(StatusCode::UNAUTHORIZED, _))),
            "{forged:?}"
        );
        let away = m.authenticate(&signed(&key, "web"), &Method::GET, &uri, b"", elsewhere);
        assert!(
            matches!(away, Err(ApiError(StatusCode::FORBIDDEN, _))),
            "{away:?}"
        );
        let unknown = m.authenticate(&signed(&key, "nope"), &Method::GET, &uri, b"", inside);
        assert!(
            matches!(unknown, Err(ApiError(StatusCode::UNAUTHORIZED, _))),
            "{unknown:?}"
        );
        // Being destroyed, it may no longer act.
        m.store()
            .destroy(&Requester::Operator, "web", now())
            .unwrap_or_else(|e| panic!("{e}"));
        let gone = m.authenticate(&signed(&key, "web"), &Method::GET, &uri, b"", inside);
        assert!(
            matches!(gone, Err(ApiError(StatusCode::FORBIDDEN, _))),
            "{gone:?}"
        );
        let _ = std::fs::remove_file(path);
    }
}
