//! `re6st-conf`'s logic against a registry served in-process: join, keep,
//! pinning, and refusing to replace another identity.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use re6st_registry::admin_access::AdminAccess;
use re6st_registry::config::random_bytes;
use re6st_registry::server::{now, router, AppState};
use re6st_registry::store::{InitParams, Store};
use re6stnet::enrol::{enrol, EnrolOptions};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn registry(
    dir: &std::path::Path,
    network: &str,
) -> anyhow::Result<(String, PathBuf, String)> {
    std::fs::create_dir_all(dir)?;
    let db = dir.join("registry.db");
    let store = Store::init(
        &db,
        &InitParams {
            network: network.parse()?,
            prefix_len: 64,
            validity_days: 365,
            grace_days: 100,
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
        },
        now(),
    )?;
    let fp = store.ca().cert().fingerprint();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = router(AppState::new(store, AdminAccess::Loopback(None)))
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), db, fp))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_keep_pin_and_refuse_other_identities() -> anyhow::Result<()> {
    let id: String = random_bytes::<6>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let root = Dir(std::env::temp_dir().join(format!("re6st-enrol-{id}")));
    let (url, db, fp) = registry(&root.0.join("reg1"), "fd5e:2a1:77::/48").await?;
    let node_dir = root.0.join("node");
    let token = Store::open(&db)?.add_token(None, None, None, now())?;
    let opts = EnrolOptions {
        registry: url.clone(),
        token: Some(token),
        dir: node_dir.clone(),
        ca_fingerprint: Some(fp.to_uppercase()),
        force: false,
        insecure_first_use: false,
        tls_root: None,
    };
    let first = enrol(&opts).await?;
    assert!(first.joined && first.warnings.is_empty());
    assert_eq!(first.cert.prefix.to_string(), "fd5e:2a1:77:1::/64");
    for (f, mode) in [
        ("node.key", 0o600),
        ("wg.key", 0o600),
        ("node.crt", 0o644),
        ("ca.crt", 0o644),
    ] {
        let m = std::fs::metadata(node_dir.join(f))?.permissions().mode() & 0o777;
        assert_eq!(m, mode, "{f}");
    }
    let toml = std::fs::read_to_string(node_dir.join("re6stnet.toml"))?;
    assert!(toml.contains(&url));

    // Running it again keeps the identity (renewal not yet due).
    let again = enrol(&EnrolOptions {
        token: None,
        ..opts.clone()
    })
    .await?;
    assert!(!again.joined && !again.renewed);
    assert_eq!(again.cert.serial, first.cert.serial);

    // A wrong fingerprint is refused.
    let wrong = EnrolOptions {
        ca_fingerprint: Some("00".repeat(32)),
        ..opts.clone()
    };
    assert!(enrol(&wrong).await.is_err());

    // Another network: the pinned CA and the identity are not replaced...
    let (url2, db2, _) = registry(&root.0.join("reg2"), "fd5e:2a1:88::/48").await?;
    let token2 = Store::open(&db2)?.add_token(None, None, None, now())?;
    let other = EnrolOptions {
        registry: url2.clone(),
        token: Some(token2),
        ca_fingerprint: None,
        ..opts.clone()
    };
    let err = enrol(&other)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("--force"), "{err}");
    let kept = std::fs::read_to_string(node_dir.join("node.crt"))?;
    assert!(kept.contains("BEGIN CERTIFICATE"));
    // A forced enrolment the registry refuses (a used token) changes
    // no file: the node keeps its identity.
    let files = |d: &std::path::Path| -> anyhow::Result<Vec<String>> {
        ["node.key", "wg.key", "node.crt", "ca.crt"]
            .iter()
            .map(|f| Ok(std::fs::read_to_string(d.join(f))?))
            .collect()
    };
    let before = files(&node_dir)?;
    let refused = EnrolOptions {
        force: true,
        token: opts.token.clone(),
        ..other.clone()
    };
    assert!(enrol(&refused).await.is_err());
    assert_eq!(files(&node_dir)?, before, "nothing written before the join");
    // ... unless forced.
    let forced = enrol(&EnrolOptions {
        force: true,
        ..other
    })
    .await?;
    assert!(forced.joined);
    assert_eq!(forced.cert.prefix.to_string(), "fd5e:2a1:88:1::/64");
    assert_ne!(forced.cert.public_key, first.cert.public_key);

    // A first enrolment with nothing to pin the CA to is refused, unless
    // trust on first use is asked for.
    let token3 = Store::open(&db2)?.add_token(None, None, None, now())?;
    let fresh = EnrolOptions {
        registry: url2,
        token: Some(token3),
        dir: root.0.join("fresh"),
        ca_fingerprint: None,
        force: false,
        insecure_first_use: false,
        tls_root: None,
    };
    let err = enrol(&fresh)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("--ca-fingerprint"), "{err}");
    assert!(!root.0.join("fresh").join("node.key").exists());
    let tofu = enrol(&EnrolOptions {
        insecure_first_use: true,
        ..fresh
    })
    .await?;
    assert!(tofu.joined && !tofu.warnings.is_empty());
    Ok(())
}
