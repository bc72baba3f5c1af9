//! The `re6st-registry` binary: init, admin commands, and serving HTTPS.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use re6st_registry::api::JoinRequest;
use re6st_registry::cert::{generate_key, make_csr, CaCert};
use re6st_registry::client::RegistryClient;
use re6st_registry::config::random_bytes;

const EXE: &str = env!("CARGO_BIN_EXE_re6st-registry");

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reg(db: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(EXE).arg("--db").arg(db).args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_and_https() -> anyhow::Result<()> {
    let dir =
        Dir(std::env::temp_dir().join(format!("re6st-cli-{}", hex::encode(random_bytes::<6>()?))));
    std::fs::create_dir_all(&dir.0)?;
    let db = dir.0.join("r.db").to_string_lossy().into_owned();

    let (ok, _, err) = reg(&db, &["init", "--network", "10.0.0.0/8"])?;
    assert!(!ok && err.starts_with("re6st-registry: "), "{err}");
    let (ok, _, err) = reg(
        &db,
        &["init", "--network", "fd5e::/48", "--prefix-len", "40"],
    )?;
    assert!(!ok && err.contains("prefix length"), "{err}");
    let (ok, out, err) = reg(&db, &["init", "--network", "fd5e::/48"])?;
    assert!(ok, "{err}");
    let fp = reg(&db, &["fingerprint"])?.1.trim().to_string();
    assert!(out.contains(&fp));
    let (ok, _, _) = reg(&db, &["init", "--network", "fd5e::/48"])?;
    assert!(!ok, "init refuses to overwrite");
    let status = Command::new(EXE)
        .args(["--db", &db, "token", "add", "--expires-in", "5y"])
        .status()?;
    assert_eq!(status.code(), Some(1));
    let status = Command::new(EXE)
        .args(["--db", &db, "token", "frobnicate"])
        .stderr(Stdio::null())
        .status()?;
    assert_eq!(status.code(), Some(2), "bad usage exits 2");
    let token = reg(
        &db,
        &["token", "add", "--comment", "n1", "--expires-in", "1h"],
    )?
    .1
    .trim()
    .to_string();
    assert_eq!(token.len(), 32);
    assert!(reg(&db, &["token", "list"])?.1.contains(&token));
    let (ok, out, _) = reg(&db, &["config", "set", "client_count", "7"])?;
    assert!(ok && out.contains("version 2"), "{out}");
    let (ok, _, err) = reg(&db, &["config", "set", "bogus", "7"])?;
    assert!(!ok && err.contains("unknown parameter"), "{err}");
    let (ok, out, _) = reg(&db, &["config", "show", "--json"])?;
    let cfg: serde_json::Value = serde_json::from_str(&out)?;
    assert!(ok && cfg["client_count"] == 7);
    assert!(reg(&db, &["hmac", "rotate"])?.1.contains("announced"));

    // HTTPS with a TLS certificate from a private CA.
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    let tls_key = rcgen::KeyPair::generate()?;
    let tls_cert = params.self_signed(&tls_key)?;
    let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    std::fs::write(&cert_path, tls_cert.pem())?;
    std::fs::write(&key_path, tls_key.serialize_pem())?;
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut server = Command::new(EXE)
        .args(["--db", &db, "serve", "--listen", &addr.to_string()])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "no listener");
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = async {
        let url = format!("https://{addr}");
        // Without the private root the TLS certificate is refused.
        assert!(RegistryClient::new(&url)?.ca().await.is_err());
        let client = RegistryClient::with_tls_root(&url, Some(&tls_cert.pem()))?;
        let ca = CaCert::from_pem(&client.ca().await?.cert)?;
        assert_eq!(ca.fingerprint(), fp);
        let issued = client
            .join(&JoinRequest {
                token: token.clone(),
                csr: make_csr(&generate_key()?)?,
                wg_key: B64.encode([9u8; 32]),
            })
            .await?;
        assert_eq!(issued.prefix, "fd5e:0:0:1::/64");
        // Without --admin-token-file the admin API is closed, to loopback
        // clients too (a TLS proxy on this host would make everyone one).
        let http = reqwest::Client::builder()
            .tls_certs_merge([reqwest::Certificate::from_pem(tls_cert.pem().as_bytes())?])
            .build()?;
        let status = http
            .get(format!("{url}/v1/admin/nodes"))
            .send()
            .await?
            .status();
        assert_eq!(status, reqwest::StatusCode::FORBIDDEN);
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let (ok, out, _) = reg(&db, &["node", "list"])?;
    assert!(ok && out.contains("fd5e:0:0:1::/64"), "{out}");
    let (ok, out, _) = reg(&db, &["revoke", "fd5e:0:0:1::/64"])?;
    assert!(ok && out.contains("revoked serials: [2]"), "{out}");
    assert!(!reg(&db, &["node", "list"])?.1.contains("fd5e:0:0:1::/64"));
    Ok(())
}
