//! The registry's HTTP server (axum): the `/v1` JSON API.
//!
//! Every answer that is not a success is `{error, detail}` with a 4xx/5xx
//! status, bodies are read up to [`MAX_BODY`] and parsed by us (so oversized
//! or malformed input also gets a JSON error), and nothing changes unless
//! the whole request is valid. Database work runs on the blocking pool.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::to_bytes;
use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::admin_access::{AdminAccess, AdminRefusal};
use crate::api::{
    BootstrapAnswer, CaAnswer, ErrorAnswer, JoinRequest, RenewRequest, RevokeAnswer, RevokeRequest,
    SetParam, TokenAnswer, TokenRequest, MAX_BODY,
};
use crate::auth::{RequestAuth, SignedPeerRecord};
use crate::cert::NodeCert;
use crate::config::{seal, SignedHmacKeys};
use crate::error::Error;
use crate::metrics::{Event, Metrics, Scrape};
use crate::store::{parse_wg_key, RevokeTarget, Store};
use crate::topology::{Report, PAGE, REPORT_PATH};

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Shared state of the server.
#[derive(Debug)]
pub struct AppState {
    store: Mutex<Store>,
    admin: AdminAccess,
    metrics: Metrics,
}

impl AppState {
    /// State over an open store; `admin` says who may use the admin API.
    pub fn new(store: Store, admin: AdminAccess) -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(store),
            admin,
            metrics: Metrics::default(),
        })
    }

    /// Runs `f` on the store, on the blocking pool.
    pub async fn with_store<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, Error> + Send + 'static,
    {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let mut store = me.store.lock().unwrap_or_else(PoisonError::into_inner);
            let r = f(&mut store);
            me.metrics.db(started.elapsed());
            r
        })
        .await
        .map_err(|e| ApiError(Error::Corrupt(format!("worker failed: {e}"))))?
        .map_err(ApiError)
    }
}

/// An error as an HTTP answer.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) | Error::Exhausted(_) => StatusCode::CONFLICT,
        Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::TooSoon(_) => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        // Internal details stay in our log.
        let detail = if status.is_server_error() {
            "internal error; see the registry log".to_string()
        } else {
            self.0.detail()
        };
        let code = self.0.code().to_string();
        let body = ErrorAnswer {
            error: code.clone(),
            detail,
        };
        let mut r = (status, Json(body)).into_response();
        r.extensions_mut().insert(Refused(code));
        r
    }
}

/// The error code of a refused request, for the metrics.
#[derive(Clone, Debug)]
struct Refused(String);

/// Counts every routed request by its route, status and refusal.
async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_string());
    let r = next.run(req).await;
    let refused = r.extensions().get::<Refused>().map(|c| c.0.as_str());
    st.metrics.request(&route, r.status().as_u16(), refused);
    r
}

fn error_response(status: StatusCode, error: &str, detail: &str) -> Response {
    (
        status,
        Json(ErrorAnswer {
            error: error.to_string(),
            detail: detail.to_string(),
        }),
    )
        .into_response()
}

/// The request body, at most [`MAX_BODY`] bytes (413 beyond).
pub struct RawBody(pub Vec<u8>);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        to_bytes(req.into_body(), MAX_BODY)
            .await
            .map(|b| Self(b.to_vec()))
            .map_err(|_| {
                ApiError(Error::TooLarge(format!(
                    "request bodies are limited to {MAX_BODY} bytes"
                )))
            })
    }
}

/// A JSON request body (empty counts as `{}`), with our error format.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&bytes).map(Self)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.is_empty() { &b"{}"[..] } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ApiError(Error::Invalid(format!("JSON body: {e}"))))
}

/// Admin access, as the registry's [`AdminAccess`] allows.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError(Error::Forbidden("peer address unknown".into())))?;
        check_admin(state, peer, &parts.headers)?;
        Ok(Self)
    }
}

fn path_of(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string())
}

/// Authenticates a node-signed request (see [`crate::auth`]).
async fn node_auth(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    grace: bool,
) -> Result<NodeCert, ApiError> {
    let value = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError(Error::Unauthenticated(
                "this endpoint needs a node-signed request".into(),
            ))
        })?;
    let auth = RequestAuth::parse(value)?;
    let (method, path, body) = (method.to_string(), path_of(uri), body.to_vec());
    state
        .with_store(move |s| s.authenticate(&auth, &method, &path, &body, now(), grace))
        .await
}

fn check_admin(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    state.admin.check(peer.ip(), bearer).map_err(|r| {
        ApiError(match r {
            AdminRefusal::Closed => Error::Forbidden(r.to_string()),
            AdminRefusal::NoToken | AdminRefusal::WrongToken => {
                Error::Unauthenticated(r.to_string())
            }
        })
    })
}

fn json<T: Serialize>(v: T) -> Response {
    Json(v).into_response()
}

async fn get_ca(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    st.with_store(|s| {
        let ca = s.ca().cert();
        Ok(CaAnswer {
            cert: ca.pem().to_string(),
            fingerprint: ca.fingerprint(),
            network: ca.network().to_string(),
        })
    })
    .await
    .map(json)
}

async fn get_config(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    st.with_store(|s| s.signed_config()).await.map(json)
}

async fn post_join(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<JoinRequest>,
) -> Result<Response, ApiError> {
    let wg = parse_wg_key(&req.wg_key)?;
    if req.token.len() > 128 {
        return Err(ApiError(Error::Invalid("token too long".into())));
    }
    let issued = st
        .with_store(move |s| s.join(&req.token, &req.csr, wg, now()))
        .await?;
    tracing::info!(prefix = %issued.prefix, serial = issued.serial, "node joined");
    st.metrics.event(Event::Join);
    Ok(json(issued))
}

async fn post_renew(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawBody(bytes): RawBody,
) -> Result<Response, ApiError> {
    let node = node_auth(&st, &headers, &method, &uri, &bytes, true).await?;
    let req: RenewRequest = parse_json(&bytes)?;
    let wg = req.wg_key.as_deref().map(parse_wg_key).transpose()?;
    let issued = st.with_store(move |s| s.renew(&node, wg, now())).await?;
    if issued.renewed {
        tracing::info!(prefix = %issued.prefix, serial = issued.serial, "certificate renewed");
        st.metrics.event(Event::Renewal);
    }
    Ok(json(issued))
}

async fn get_hmac_keys(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let node = node_auth(&st, &headers, &method, &uri, b"", false).await?;
    let wg = node.wg_key;
    let signed = st
        .with_store(move |s| SignedHmacKeys::sign(&s.hmac_keys()?, &wg, |m| s.ca().sign(m)))
        .await?;
    let plain = serde_json::to_vec(&signed).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(json(seal(&node.wg_key, &plain)?))
}

async fn post_peer(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawBody(bytes): RawBody,
) -> Result<Response, ApiError> {
    let node = node_auth(&st, &headers, &method, &uri, &bytes, false).await?;
    let record: SignedPeerRecord = parse_json(&bytes)?;
    st.with_store(move |s| s.publish_peer(&node, &record, now()))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn post_report(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawBody(bytes): RawBody,
) -> Result<Response, ApiError> {
    let node = node_auth(&st, &headers, &method, &uri, &bytes, false).await?;
    st.with_store(move |s| {
        let report = Report::parse(&bytes, s.ca().cert().network(), node.prefix)?;
        s.put_report(&node, &report, now())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn admin_topology(State(st): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    Ok(json(st.with_store(|s| s.topology(now())).await?))
}

/// The live map; it fetches `/v1/topology`, so it shows nothing to
/// whoever may not read that.
async fn topology_page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'",
            ),
        ],
        PAGE,
    )
        .into_response()
}

async fn get_bootstrap(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Members only (the records are the membership's underlay
    // addresses), and never themselves.
    let me = node_auth(&st, &headers, &method, &uri, b"", false)
        .await?
        .prefix;
    let peers = st.with_store(move |s| s.bootstrap(Some(me), now())).await?;
    Ok(json(BootstrapAnswer { peers }))
}

async fn admin_add_token(
    State(st): State<Arc<AppState>>,
    _: Admin,
    JsonBody(req): JsonBody<TokenRequest>,
) -> Result<Response, ApiError> {
    let token = st
        .with_store(move |s| {
            s.add_token(
                req.comment.as_deref(),
                req.expires_in_s,
                req.prefix_len,
                now(),
            )
        })
        .await?;
    Ok((StatusCode::CREATED, Json(TokenAnswer { token })).into_response())
}

async fn admin_list_tokens(
    State(st): State<Arc<AppState>>,
    _: Admin,
) -> Result<Response, ApiError> {
    st.with_store(|s| s.list_tokens()).await.map(json)
}

async fn admin_delete_token(
    State(st): State<Arc<AppState>>,
    _: Admin,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    st.with_store(move |s| s.delete_token(&token)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn admin_nodes(State(st): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    st.with_store(|s| s.list_nodes()).await.map(json)
}

async fn admin_revoke(
    State(st): State<Arc<AppState>>,
    _: Admin,
    JsonBody(req): JsonBody<RevokeRequest>,
) -> Result<Response, ApiError> {
    let target = match (req.prefix, req.serial) {
        (Some(p), None) => RevokeTarget::Prefix(
            p.parse()
                .map_err(|_| Error::Invalid(format!("{p:?} is not an IPv6 prefix")))?,
        ),
        (None, Some(s)) => RevokeTarget::Serial(s),
        _ => {
            return Err(ApiError(Error::Invalid(
                "give exactly one of prefix and serial".into(),
            )))
        }
    };
    let revoked = st.with_store(move |s| s.revoke(&target, now())).await?;
    tracing::info!(?revoked, "revoked");
    st.metrics.event(Event::Revocation(revoked.len() as u64));
    Ok(json(RevokeAnswer { revoked }))
}

async fn admin_rotate_hmac(
    State(st): State<Arc<AppState>>,
    _: Admin,
) -> Result<Response, ApiError> {
    let keys = st.with_store(|s| s.rotate_hmac(now())).await?;
    Ok(json(serde_json::json!({ "hmac_version": keys.version })))
}

async fn admin_get_config(State(st): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    st.with_store(|s| s.config()).await.map(json)
}

async fn admin_set_config(
    State(st): State<Arc<AppState>>,
    _: Admin,
    JsonBody(req): JsonBody<SetParam>,
) -> Result<Response, ApiError> {
    let cfg = st
        .with_store(move |s| s.set_param(&req.key, &req.value, now()))
        .await?;
    Ok(json(cfg))
}

async fn get_metrics(State(st): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    let (nodes, version) = st
        .with_store(|s| Ok((s.list_nodes()?, s.config()?.version)))
        .await?;
    let text = st.metrics.render(&Scrape {
        nodes: &nodes,
        config_version: version,
        now: now(),
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

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// The `/v1` router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/ca", get(get_ca))
        .route("/v1/config", get(get_config))
        .route("/v1/join", post(post_join))
        .route("/v1/renew", post(post_renew))
        .route("/v1/hmac-keys", get(get_hmac_keys))
        .route("/v1/peer", post(post_peer))
        .route("/v1/bootstrap", get(get_bootstrap))
        .route(REPORT_PATH, post(post_report))
        .route("/v1/topology", get(admin_topology))
        .route("/topology", get(topology_page))
        .route(
            "/v1/admin/tokens",
            post(admin_add_token).get(admin_list_tokens),
        )
        .route("/v1/admin/tokens/{token}", delete(admin_delete_token))
        .route("/v1/admin/nodes", get(admin_nodes))
        .route("/v1/admin/revoke", post(admin_revoke))
        .route("/v1/admin/hmac/rotate", post(admin_rotate_hmac))
        .route(
            "/v1/admin/config",
            get(admin_get_config).put(admin_set_config),
        )
        .route("/metrics", get(get_metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), count))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Periodic housekeeping: frees expired prefixes, prunes the CRL and tokens.
pub async fn housekeeping(state: Arc<AppState>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = state.with_store(|s| s.expire(now())).await {
            tracing::error!(error = %e.0, "housekeeping failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state over a throw-away database; the directory is removed by the caller.
    fn state(token: Option<&str>) -> Result<(Arc<AppState>, std::path::PathBuf), Error> {
        let dir = std::env::temp_dir().join(format!(
            "re6st-admin-{}",
            hex::encode(crate::config::random_bytes::<6>()?)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", e))?;
        let store = Store::init(
            &dir.join("r.db"),
            &crate::store::InitParams {
                network: "fd5e::/48"
                    .parse()
                    .map_err(|_| Error::Invalid("n".into()))?,
                prefix_len: 64,
                validity_days: 1,
                grace_days: 1,
                ca_cert: dir.join("ca.crt"),
                ca_key: dir.join("ca.key"),
            },
            now(),
        )?;
        let admin = token.map_or(AdminAccess::Loopback(None), |t| {
            AdminAccess::Token(t.to_string())
        });
        Ok((AppState::new(store, admin), dir))
    }

    /// The HTTP side of [`AdminAccess`] (its rules are tested there): a
    /// missing or wrong token is 401, a closed API 403.
    #[test]
    fn admin_refusals_map_to_statuses() -> Result<(), Error> {
        let far: SocketAddr = "[fd00::7]:4000"
            .parse()
            .map_err(|_| Error::Invalid("a".into()))?;
        let near: SocketAddr = "[::1]:4000"
            .parse()
            .map_err(|_| Error::Invalid("a".into()))?;
        let none = HeaderMap::new();
        let mut good = HeaderMap::new();
        good.insert(
            "authorization",
            "Bearer 0123456789abcdef"
                .parse()
                .map_err(|_| Error::Invalid("h".into()))?,
        );
        let (open, dir1) = state(None)?;
        assert!(check_admin(&open, near, &none).is_ok());
        assert!(matches!(
            check_admin(&open, far, &none),
            Err(ApiError(Error::Unauthenticated(_)))
        ));
        let (tok, dir2) = state(Some("0123456789abcdef"))?;
        assert!(check_admin(&tok, far, &good).is_ok());
        assert!(matches!(
            check_admin(&tok, near, &none),
            Err(ApiError(Error::Unauthenticated(_)))
        ));
        drop((open, tok));
        for d in [dir1, dir2] {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}
