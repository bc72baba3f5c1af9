//! SIGKILL the real `re6st-registry serve` process three times during
//! concurrent joins and restart it: no prefix is ever handed to two nodes and
//! every certificate a client received is in the database afterwards.
//! Clients retry a failed join with the same token and key, as `re6st-conf`
//! does when run again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use re6st_registry::api::JoinRequest;
use re6st_registry::cert::{generate_key, make_csr};
use re6st_registry::client::RegistryClient;
use re6st_registry::config::random_bytes;
use re6st_registry::server::now;
use re6st_registry::store::Store;

const EXE: &str = env!("CARGO_BIN_EXE_re6st-registry");
const JOINS: usize = 150;
const CLIENTS: usize = 30;

struct Server {
    child: Child,
}

impl Server {
    fn start(db: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let child = Command::new(EXE)
            .args([
                "--db",
                &db.to_string_lossy(),
                "serve",
                "--listen",
                &addr.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "registry did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child })
    }

    fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?; // SIGKILL
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_joins_loses_nothing_and_never_double_allocates() -> anyhow::Result<()> {
    let dir = Dir(
        std::env::temp_dir().join(format!("re6st-crash-{}", hex::encode(random_bytes::<6>()?)))
    );
    std::fs::create_dir_all(&dir.0)?;
    let db = dir.0.join("registry.db");
    let out = Command::new(EXE)
        .args([
            "--db",
            &db.to_string_lossy(),
            "init",
            "--network",
            "fd5e:2a1:77::/48",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: VecDeque<String> = {
        let mut s = Store::open(&db)?;
        (0..JOINS)
            .map(|_| s.add_token(None, None, None, now()))
            .collect::<Result<_, _>>()?
    };
    let addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let url = format!("http://{addr}");
    let mut server = Some(Server::start(&db, addr)?);

    let queue = Arc::new(Mutex::new(tokens));
    let received: Arc<Mutex<Vec<(String, u64, Ipv6Net)>>> = Arc::new(Mutex::new(Vec::new()));
    let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let replayed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (queue, received, url) = (Arc::clone(&queue), Arc::clone(&received), url.clone());
        let (retries, replayed) = (Arc::clone(&retries), Arc::clone(&replayed));
        tasks.push(tokio::spawn(async move {
            let client = RegistryClient::new(&url)?;
            loop {
                let Some(token) = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .pop_front()
                else {
                    return anyhow::Ok(());
                };
                let key = generate_key()?;
                let req = JoinRequest {
                    token,
                    csr: make_csr(&key)?,
                    wg_key: B64.encode(random_bytes::<32>()?),
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match client.join(&req).await {
                        Ok(issued) => {
                            if !issued.renewed {
                                // Committed before the kill: the retry got the same certificate.
                                replayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            received
                                .lock()
                                .map_err(|_| anyhow::anyhow!("poisoned"))?
                                .push((issued.cert, issued.serial, issued.prefix.parse()?));
                            break;
                        }
                        Err(re6st_registry::Error::Transport(_)) if Instant::now() < deadline => {
                            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }));
    }

    // Kill and restart while joins are under way.
    for round in 0..3 {
        let target = (round + 1) * JOINS / 5;
        let deadline = Instant::now() + Duration::from_secs(60);
        while received
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .len()
            < target
        {
            anyhow::ensure!(Instant::now() < deadline, "joins stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(s) = server.take() {
            s.kill9()?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        server = Some(Server::start(&db, addr)?);
    }
    for t in tasks {
        t.await??;
    }
    drop(server);

    let received = received
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    assert_eq!(received.len(), JOINS);
    eprintln!(
        "{JOINS} joins, 3 SIGKILLs: {} failed attempts retried, {} retries answered with the certificate committed before the kill",
        retries.load(std::sync::atomic::Ordering::Relaxed),
        replayed.load(std::sync::atomic::Ordering::Relaxed)
    );
    let prefixes: HashSet<Ipv6Net> = received.iter().map(|r| r.2).collect();
    assert_eq!(prefixes.len(), JOINS, "a prefix was handed to two nodes");
    let store = Store::open(&db)?;
    let nodes: HashMap<String, u64> = store
        .list_nodes()?
        .into_iter()
        .map(|n| (n.prefix, n.serial))
        .collect();
    for (_, serial, prefix) in &received {
        assert_eq!(
            nodes.get(&prefix.to_string()),
            Some(serial),
            "certificate for {prefix} lost"
        );
    }
    assert_eq!(
        nodes.len(),
        JOINS,
        "the database has nodes no client received"
    );
    for f in store.free_blocks()? {
        assert!(
            prefixes
                .iter()
                .all(|p| !f.net().contains(p) && !p.contains(&f.net())),
            "free block {f} overlaps a node"
        );
    }
    Ok(())
}
