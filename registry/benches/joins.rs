//! Joins per second and latency percentiles with 50 concurrent clients,
//! against the real `re6st-registry serve` on loopback, side by side with
//! the cheapest endpoint (`GET /v1/ca`) as the HTTP floor.
//!
//! `cargo bench -p re6st-registry --bench joins [-- JOINS]`

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use re6st_registry::api::JoinRequest;
use re6st_registry::cert::{generate_key, make_csr};
use re6st_registry::client::RegistryClient;
use re6st_registry::config::random_bytes;
use re6st_registry::server::now;
use re6st_registry::store::Store;

const CLIENTS: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run_load<F, Fut>(n: usize, f: F) -> anyhow::Result<(f64, Vec<Duration>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let f = Arc::clone(&f);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (c..n).step_by(CLIENTS) {
                let t = Instant::now();
                f(i).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    Ok((n as f64 / secs, all))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let joins: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir =
        std::env::temp_dir().join(format!("re6st-bench-{}", hex::encode(random_bytes::<6>()?)));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("registry.db");
    let exe = env!("CARGO_BIN_EXE_re6st-registry");
    let st = Command::new(exe)
        .args([
            "--db",
            &db.to_string_lossy(),
            "init",
            "--network",
            "fd5e:2a1:77::/48",
        ])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "init failed");
    let tokens: Vec<String> = {
        let mut s = Store::open(&db)?;
        (0..joins)
            .map(|_| s.add_token(None, None, None, now()))
            .collect::<Result<_, _>>()?
    };
    let reqs: Arc<Vec<JoinRequest>> = Arc::new(
        tokens
            .into_iter()
            .map(|token| {
                Ok(JoinRequest {
                    token,
                    csr: make_csr(&generate_key()?)?,
                    wg_key: B64.encode(random_bytes::<32>()?),
                })
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut server = Command::new(exe)
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
        anyhow::ensure!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = RegistryClient::new(&format!("http://{addr}"))?;

    let c = client.clone();
    let (ca_rate, ca_lat) = run_load(joins, move |_| {
        let c = c.clone();
        async move {
            c.ca().await?;
            Ok(())
        }
    })
    .await?;
    let c = client.clone();
    let r = Arc::clone(&reqs);
    let (join_rate, join_lat) = run_load(joins, move |i| {
        let (c, r) = (c.clone(), Arc::clone(&r));
        async move {
            c.join(&r[i]).await?;
            Ok(())
        }
    })
    .await?;
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "re6st-registry, {joins} requests per row, {CLIENTS} concurrent clients, loopback HTTP"
    );
    println!("| request | per second | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (name, rate, lat) in [
        ("GET /v1/ca (floor)", ca_rate, &ca_lat),
        ("POST /v1/join", join_rate, &join_lat),
    ] {
        println!(
            "| {name} | {rate:.0} | {:.1} | {:.1} | {:.1} |",
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(percentile(lat, 1.0))
        );
    }
    println!("join / floor throughput ratio: {:.3}", join_rate / ca_rate);
    Ok(())
}
