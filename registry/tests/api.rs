//! The registry's HTTP API, served in-process on loopback: concurrent joins,
//! bad input, authentication, renewal, revocation, HMAC keys, bootstrap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use re6st_registry::admin_access::AdminAccess;
use re6st_registry::api::{JoinRequest, RenewRequest};
use re6st_registry::auth::{PeerRecord, SignedPeerRecord};
use re6st_registry::cert::{generate_key, make_csr, CaCert};
use re6st_registry::client::{Identity, RegistryClient};
use re6st_registry::config::{open, random_bytes, x25519_public, HmacKeys, SignedHmacKeys};
use re6st_registry::server::{now, router, AppState};
use re6st_registry::store::{InitParams, Store};
use re6st_registry::Error;

struct Registry {
    dir: PathBuf,
    url: String,
    db: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start() -> anyhow::Result<Registry> {
    let dir = std::env::temp_dir().join(format!(
        "re6st-api-{}-{}",
        std::process::id(),
        hex::encode(random_bytes::<6>()?)
    ));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("registry.db");
    let store = Store::init(
        &db,
        &InitParams {
            network: "fd5e:2a1:77::/48".parse()?,
            prefix_len: 64,
            validity_days: 365,
            grace_days: 100,
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
        },
        now(),
    )?;
    let state = AppState::new(store, AdminAccess::Loopback(None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Registry {
        dir,
        url: format!("http://{addr}"),
        db,
        task,
    })
}

fn token(reg: &Registry) -> anyhow::Result<String> {
    Ok(Store::open(&reg.db)?.add_token(None, None, None, now())?)
}

struct Node {
    key: rcgen::KeyPair,
    wg_secret: [u8; 32],
    serial: u64,
    cert: String,
    prefix: Ipv6Net,
}

async fn join(client: &RegistryClient, token: &str) -> anyhow::Result<Node> {
    let key = generate_key()?;
    let wg_secret = random_bytes::<32>()?;
    let issued = client
        .join(&JoinRequest {
            token: token.to_string(),
            csr: make_csr(&key)?,
            wg_key: B64.encode(x25519_public(&wg_secret)),
        })
        .await?;
    Ok(Node {
        key,
        wg_secret,
        serial: issued.serial,
        prefix: issued.prefix.parse()?,
        cert: issued.cert,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_joins_from_fifty_clients_get_distinct_prefixes() -> anyhow::Result<()> {
    let reg = start().await?;
    let tokens: Vec<String> = (0..200)
        .map(|_| token(&reg))
        .collect::<anyhow::Result<_>>()?;
    let tokens = Arc::new(tokens);
    let mut tasks = Vec::new();
    for c in 0..50 {
        let (url, tokens) = (reg.url.clone(), Arc::clone(&tokens));
        tasks.push(tokio::spawn(async move {
            let client = RegistryClient::new(&url)?;
            let mut out = Vec::new();
            for i in (c..200).step_by(50) {
                let n = join(&client, &tokens[i]).await?;
                out.push((n.prefix, n.cert));
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    assert_eq!(all.len(), 200);
    let ca = CaCert::from_pem(&RegistryClient::new(&reg.url)?.ca().await?.cert)?;
    for (i, (p, cert)) in all.iter().enumerate() {
        let c = ca.verify_node(cert, Some(now()))?;
        assert_eq!(&c.prefix, p);
        for (q, _) in &all[i + 1..] {
            assert!(!p.contains(q) && !q.contains(p), "{p} overlaps {q}");
        }
    }
    let zero: Ipv6Net = "fd5e:2a1:77::/64".parse()?;
    assert!(
        all.iter().all(|(p, _)| *p != zero),
        "the all-zero prefix is reserved"
    );
    Ok(())
}

async fn raw(
    url: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
    auth: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let http = reqwest::Client::new();
    let mut req = http
        .request(method.parse()?, format!("{url}{path}"))
        .body(body);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok((status, json))
}

/// Method, path, body, Authorization header, expected status.
type Case<'a> = (&'a str, &'a str, Vec<u8>, Option<&'a str>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_4xx_and_changes_nothing() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reg = start().await?;
    let t = token(&reg)?;
    let version = Store::open(&reg.db)?.config()?.version;
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let good_wg = B64.encode([1u8; 32]);
    let mut cn = rcgen::CertificateParams::default();
    cn.distinguished_name = rcgen::DistinguishedName::new();
    cn.distinguished_name
        .push(rcgen::DnType::CommonName, "fd5e:2a1:77:5::/64");
    let key = generate_key()?;
    let cases: Vec<Case> = vec![
        ("POST", "/v1/join", b"not json".to_vec(), None, 400),
        ("POST", "/v1/join", vec![b'{'; 70_000], None, 413),
        (
            "POST",
            "/v1/join",
            serde_json::to_vec(
                &serde_json::json!({"token": t, "csr": "garbage", "wg_key": good_wg}),
            )?,
            None,
            400,
        ),
        (
            "POST",
            "/v1/join",
            serde_json::to_vec(
                &serde_json::json!({"token": t, "csr": make_csr(&ec)?, "wg_key": good_wg}),
            )?,
            None,
            400,
        ),
        (
            "POST",
            "/v1/join",
            serde_json::to_vec(
                &serde_json::json!({"token": t, "csr": cn.serialize_request(&key)?.pem()?, "wg_key": good_wg}),
            )?,
            None,
            400,
        ),
        (
            "POST",
            "/v1/join",
            serde_json::to_vec(
                &serde_json::json!({"token": t, "csr": make_csr(&key)?, "wg_key": "short"}),
            )?,
            None,
            400,
        ),
        (
            "POST",
            "/v1/join",
            serde_json::to_vec(
                &serde_json::json!({"token": "unknown", "csr": make_csr(&key)?, "wg_key": good_wg}),
            )?,
            None,
            403,
        ),
        ("POST", "/v1/renew", Vec::new(), None, 401),
        (
            "POST",
            "/v1/renew",
            Vec::new(),
            Some("Re6st serial=1,ts=1,nonce=00000000000000000000000000000000,sig=AAAA"),
            401,
        ),
        ("POST", "/v1/renew", Vec::new(), Some("Basic abc"), 401),
        ("GET", "/v1/hmac-keys", Vec::new(), None, 401),
        ("POST", "/v1/peer", b"{}".to_vec(), None, 401),
        ("POST", "/v1/admin/revoke", b"{}".to_vec(), None, 400),
        (
            "POST",
            "/v1/admin/revoke",
            b"{\"serial\": 424242}".to_vec(),
            None,
            404,
        ),
        (
            "PUT",
            "/v1/admin/config",
            b"{\"key\": \"mtu\", \"value\": \"1\"}".to_vec(),
            None,
            400,
        ),
        ("GET", "/v1/nothing", Vec::new(), None, 404),
        ("DELETE", "/v1/config", Vec::new(), None, 405),
    ];
    for (method, path, body, auth, want) in cases {
        let (status, json) = raw(&reg.url, method, path, body, auth).await?;
        assert_eq!(status, want, "{method} {path}: {json}");
        assert!(
            json["error"].is_string() && json["detail"].is_string(),
            "{method} {path}: {json}"
        );
    }
    let store = Store::open(&reg.db)?;
    assert!(store.list_nodes()?.is_empty());
    assert_eq!(store.config()?.version, version);
    assert!(store.list_tokens()?.iter().all(|t| t.used_serial.is_none()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_renew_get_sealed_hmac_keys_publish_and_bootstrap() -> anyhow::Result<()> {
    let reg = start().await?;
    let client = RegistryClient::new(&reg.url)?;
    let mut nodes = Vec::new();
    for _ in 0..6 {
        nodes.push(join(&client, &token(&reg)?).await?);
    }
    let ca = CaCert::from_pem(&client.ca().await?.cert)?;
    let config = client.config().await?.verify(&ca)?;

    let a = &nodes[0];
    let id = Identity {
        key: &a.key,
        serial: a.serial,
    };
    let sealed = client.hmac_keys(&id).await?;
    let signed: SignedHmacKeys = serde_json::from_slice(&open(&a.wg_secret, &sealed)?)?;
    let keys: HmacKeys = signed.verify(&ca, &x25519_public(&a.wg_secret))?;
    assert_eq!(keys.version, config.hmac_version);
    assert!(
        open(&nodes[1].wg_secret, &sealed).is_err(),
        "sealed to a's key only"
    );

    let same = client.renew(&id, &RenewRequest::default()).await?;
    assert!(!same.renewed);
    assert_eq!(same.serial, a.serial);
    // Rotating the WireGuard key is a renewal.
    let new_wg = B64.encode(x25519_public(&random_bytes::<32>()?));
    let rotated = client
        .renew(
            &id,
            &RenewRequest {
                wg_key: Some(new_wg),
            },
        )
        .await?;
    assert!(rotated.renewed && rotated.serial > a.serial);

    for (i, n) in nodes.iter().enumerate() {
        let rec = PeerRecord {
            cert: n.cert.clone(),
            endpoints: vec![format!("198.18.{}.2:326", i + 1).parse()?],
            nat: false,
            timestamp: now(),
        };
        let who = Identity {
            key: &n.key,
            serial: n.serial,
        };
        client
            .publish_peer(&who, &SignedPeerRecord::sign(&rec, &n.key)?)
            .await?;
    }
    let b = &nodes[1];
    let who = Identity {
        key: &b.key,
        serial: b.serial,
    };
    for _ in 0..5 {
        let peers = client.bootstrap(&who).await?;
        assert_eq!(peers.len(), 4);
        for p in peers {
            let (_, cert) = p.verify(&ca, now(), &[])?;
            assert_ne!(
                cert.prefix, b.prefix,
                "bootstrap never returns the requester"
            );
        }
    }

    // Revoke c: its requests are refused, its record is gone, the CRL says so.
    let c = &nodes[2];
    Store::open(&reg.db)?.revoke(
        &re6st_registry::store::RevokeTarget::Prefix(c.prefix),
        now(),
    )?;
    let cid = Identity {
        key: &c.key,
        serial: c.serial,
    };
    assert!(matches!(
        client.renew(&cid, &RenewRequest::default()).await,
        Err(Error::Forbidden(_))
    ));
    assert!(client.config().await?.verify(&ca)?.crl.contains(&c.serial));
    assert!(
        matches!(client.bootstrap(&cid).await, Err(Error::Forbidden(_))),
        "a revoked node learns no addresses"
    );
    for _ in 0..5 {
        for p in client.bootstrap(&who).await? {
            assert_ne!(p.verify(&ca, now(), &[])?.1.prefix, c.prefix);
        }
    }
    // Anonymous: the membership's underlay addresses are not public.
    let anonymous = reqwest::get(format!("{}/v1/bootstrap", reg.url)).await?;
    assert_eq!(anonymous.status(), 401);
    Ok(())
}

/// `/metrics` counts joins and refusals by endpoint and reason, and says
/// how many nodes there are and which configuration is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_joins_refusals_and_nodes() -> anyhow::Result<()> {
    let reg = start().await?;
    let client = RegistryClient::new(&reg.url)?;
    for _ in 0..2 {
        join(&client, &token(&reg)?).await?;
    }
    let (status, _) = raw(&reg.url, "POST", "/v1/join", b"{\"token\":".to_vec(), None).await?;
    assert_eq!(status, 400);
    let text = reqwest::get(format!("{}/metrics", reg.url))
        .await?
        .text()
        .await?;
    let version = Store::open(&reg.db)?.config()?.version;
    for line in [
        "re6st_registry_requests_total{endpoint=\"/v1/join\",status=\"200\"} 2".to_string(),
        "re6st_registry_refused_total{endpoint=\"/v1/join\",reason=\"invalid\"} 1".to_string(),
        "re6st_registry_joins_total 2".to_string(),
        "re6st_registry_nodes 2".to_string(),
        format!("re6st_registry_config_version {version}"),
    ] {
        assert!(text.contains(&line), "{line} not in\n{text}");
    }
    assert!(text.contains("re6st_registry_db_operations_total"));
    Ok(())
}

/// Topology reports: members only, each for itself, never replayed,
/// checked; the map lists every node with its latest report and is for
/// admins; the page is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_reports_make_the_map() -> anyhow::Result<()> {
    use re6st_registry::auth::sign_request;
    use re6st_registry::topology::{Report, ReportedTunnel, Topology, TunnelTransport};
    let reg = start().await?;
    let client = RegistryClient::new(&reg.url)?;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(join(&client, &token(&reg)?).await?);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    fn id(n: &Node) -> Identity<'_> {
        Identity {
            key: &n.key,
            serial: n.serial,
        }
    }
    let report = Report {
        version: "re6st-rs 0.1.0".into(),
        tunnels: vec![ReportedTunnel {
            peer: b.prefix.to_string(),
            up: true,
            transport: Some(TunnelTransport::Udp),
            rtt_ms: Some(12.5),
            cost: Some(96),
        }],
        unreachable: vec![c.prefix.to_string()],
    };
    client.report(&id(a), &report).await?;
    client
        .report(
            &id(b),
            &Report {
                version: "re6st-rs 0.0.9".into(),
                tunnels: Vec::new(),
                unreachable: Vec::new(),
            },
        )
        .await?;

    let body = serde_json::to_vec(&report)?;
    let (status, _) = raw(&reg.url, "POST", "/v1/report", body.clone(), None).await?;
    assert_eq!(status, 401, "anonymous reports are refused");
    let signed = sign_request(&a.key, a.serial, "POST", "/v1/report", &body, now())?;
    let (status, _) = raw(&reg.url, "POST", "/v1/report", body.clone(), Some(&signed)).await?;
    assert_eq!(status, 204);
    let (status, e) = raw(&reg.url, "POST", "/v1/report", body.clone(), Some(&signed)).await?;
    assert_eq!(status, 401, "a replay is refused: {e}");
    let mut own = report.clone();
    own.tunnels[0].peer = a.prefix.to_string();
    let own = serde_json::to_vec(&own)?;
    let signed = sign_request(&a.key, a.serial, "POST", "/v1/report", &own, now())?;
    let (status, e) = raw(&reg.url, "POST", "/v1/report", own, Some(&signed)).await?;
    assert_eq!(status, 400, "{e}");
    let huge = vec![b' '; 65 * 1024];
    let signed = sign_request(&a.key, a.serial, "POST", "/v1/report", &huge, now())?;
    let (status, _) = raw(&reg.url, "POST", "/v1/report", huge, Some(&signed)).await?;
    assert!((400..500).contains(&status), "{status}");

    Store::open(&reg.db)?.revoke(
        &re6st_registry::store::RevokeTarget::Prefix(c.prefix),
        now(),
    )?;
    assert!(matches!(
        client.report(&id(c), &report).await,
        Err(Error::Forbidden(_))
    ));

    let map: Topology = reqwest::get(format!("{}/v1/topology", reg.url))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let prefixes: Vec<String> = map.nodes.iter().map(|n| n.prefix.clone()).collect();
    let mut want = vec![a.prefix.to_string(), b.prefix.to_string()];
    want.sort();
    assert_eq!(prefixes, want, "every current node, the revoked one gone");
    let on_map = |p: Ipv6Net| map.nodes.iter().find(|n| n.prefix == p.to_string());
    let ma = on_map(a.prefix).ok_or_else(|| anyhow::anyhow!("a"))?;
    assert_eq!(ma.tunnels, report.tunnels);
    assert_eq!(ma.unreachable, report.unreachable);
    assert!(!ma.stale);
    assert_eq!(
        on_map(b.prefix).and_then(|n| n.version.clone()).as_deref(),
        Some("re6st-rs 0.0.9")
    );
    let page = reqwest::get(format!("{}/topology", reg.url)).await?;
    assert_eq!(page.status(), 200);
    assert!(page.text().await?.contains("/v1/topology"));
    Ok(())
}
