//! The real agent loop against a master it must not trust blindly: a fake
//! master on loopback answers its polls with unsigned, forged, replayed,
//! misaddressed and revoked assignments, then with software this node does
//! not have or at another version. Nothing may run; the last answer is
//! genuine and must run (so the test can tell running from not running).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use re6st_orchestration::agent::{self, AgentConfig};
use re6st_orchestration::assignment::{Assigned, Assignments, SignedAssignments};
use re6st_orchestration::catalog::Catalog;
use re6st_orchestration::client::{Credentials, MasterClient};
use re6st_orchestration::identity::{LiveIdentity, NodeIdentity};
use re6st_orchestration::master::Poll;
use re6st_orchestration::store::{Instance, Report};
use re6st_registry::cert::Ca;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn identity(ca: &Ca, n: u16, serial: u64) -> NodeIdentity {
    let t = now();
    let prefix = format!("fd5e:5e:0:{n:x}::/64")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let (key, cert_pem) = ca
        .issue_with_new_key(prefix, [n as u8; 32], serial, t - 10, t + 86_400)
        .unwrap_or_else(|e| panic!("{e}"));
    NodeIdentity {
        ca: ca.cert().clone(),
        cert: ca
            .cert()
            .verify_node(&cert_pem, None)
            .unwrap_or_else(|e| panic!("{e}")),
        cert_pem,
        key,
    }
}

/// How the fake master answers a poll.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    NotSigned,
    SignedByAMember,
    Replayed,
    ForAnotherNode,
    MasterRevoked,
    UnknownSoftware,
    OtherVersion,
    Genuine,
}

struct Fake {
    answer: Mutex<Answer>,
    master: NodeIdentity,
    member: NodeIdentity,
    agent_prefix: ipnet::Ipv6Net,
    reports: Mutex<Vec<Report>>,
}

fn instance(software: &str) -> Instance {
    Instance {
        name: "job".into(),
        software: software.into(),
        params: BTreeMap::new(),
        node: "agent".into(),
        state: "started".into(),
        status: "pending".into(),
        connection: BTreeMap::new(),
        generation: 1,
        updated_at: now(),
        copy_of: String::new(),
        copies: 1,
        requester: Default::default(),
    }
}

async fn instances(
    State(f): State<Arc<Fake>>,
    Query(poll): Query<Poll>,
) -> Json<serde_json::Value> {
    let answer = *f.answer.lock().unwrap_or_else(|e| e.into_inner());
    let mut a = Assignments {
        node: f.agent_prefix,
        nonce: poll.nonce,
        issued_at: now(),
        instances: vec![Assigned {
            instance: instance("marker"),
            version: 1,
            peers: Vec::new(),
        }],
    };
    let mut signer = &f.master;
    match answer {
        Answer::NotSigned => return Json(serde_json::to_value(&a).unwrap_or_default()),
        Answer::SignedByAMember => signer = &f.member,
        Answer::Replayed => a.nonce = "0".repeat(32),
        Answer::ForAnotherNode => a.node = f.member.cert.prefix,
        Answer::UnknownSoftware => a.instances[0].instance = instance("miner"),
        Answer::OtherVersion => a.instances[0].version = 2,
        Answer::MasterRevoked | Answer::Genuine => {}
    }
    let signed = SignedAssignments::sign(&a, signer).unwrap_or_else(|e| panic!("{e}"));
    Json(serde_json::to_value(signed).unwrap_or_default())
}

async fn report(State(f): State<Arc<Fake>>, Json(r): Json<Report>) -> axum::http::StatusCode {
    f.reports.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    axum::http::StatusCode::NO_CONTENT
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ran(base: &Path) -> bool {
    base.join("job/ran").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_only_what_the_master_signed_for_it() {
    let dir = Dir(std::env::temp_dir().join(format!("orch-agent-trust-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("catalog")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.0.join("catalog/marker.toml"),
        "name = \"marker\"\nversion = 1\ncommand = [\"sh\", \"-c\", \"echo $RE6ST_ORCH_INSTANCE $RE6ST_ORCH_MASTER $RE6ST_ORCH_KEY > ran; exec sleep 30\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = Ca::generate("fd5e:5e::/48".parse().unwrap_or_default(), now() - 10, 10)
        .unwrap_or_else(|e| panic!("{e}"));
    let master = identity(&ca, 1, 11);
    let agent_id = identity(&ca, 2, 12);
    let fake = Arc::new(Fake {
        answer: Mutex::new(Answer::NotSigned),
        master,
        member: identity(&ca, 3, 13),
        agent_prefix: agent_id.cert.prefix,
        reports: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route(
            "/v1/agent/hello",
            post(|| async { Json(serde_json::json!({})) }),
        )
        .route("/v1/agent/instances", get(instances))
        .route("/v1/agent/report", post(report))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr: SocketAddr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let revoked = Arc::new(AtomicBool::new(false));
    let crl_flag = revoked.clone();
    let base = dir.0.join("instances");
    let cfg = AgentConfig {
        master_url: format!("http://{addr}"),
        name: "agent".into(),
        site: String::new(),
        serial: {
            let serial = agent_id.cert.serial;
            Arc::new(move || serial)
        },
        base_dir: base.clone(),
        address: agent_id.cert.address,
        node: agent_id.cert.prefix,
        master: fake.master.cert.address,
        ca: ca.cert().clone(),
        crl: Arc::new(move || {
            Some(if crl_flag.load(Ordering::SeqCst) {
                vec![11]
            } else {
                vec![]
            })
        }),
        catalog: Catalog::load(&dir.0.join("catalog")).unwrap_or_else(|e| panic!("{e:#}")),
        // Loopback only, on the host: no partitions (they would add an
        // address to the host's lo); netns-tests/tests/orch.rs has them.
        partitions: None,
        cgroups: None,
        ctl_socket: None,
        period: Duration::from_millis(100),
    };
    let client = MasterClient::new(
        &format!("http://{addr}"),
        Credentials::Node(Arc::new(LiveIdentity::fixed(agent_id))),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(cfg, client, async {
        let _ = stopped.await;
    }));

    for answer in [
        Answer::NotSigned,
        Answer::SignedByAMember,
        Answer::Replayed,
        Answer::ForAnotherNode,
        Answer::MasterRevoked,
        Answer::UnknownSoftware,
        Answer::OtherVersion,
    ] {
        revoked.store(answer == Answer::MasterRevoked, Ordering::SeqCst);
        *fake.answer.lock().unwrap_or_else(|e| e.into_inner()) = answer;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!ran(&base), "{answer:?}: the instance ran");
    }
    revoked.store(false, Ordering::SeqCst);
    let details: Vec<String> = fake
        .reports
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|r| r.status == "failing")
        .map(|r| r.detail.clone())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("\"miner\" is not in this node's catalogue")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("version 2 is assigned")),
        "{details:?}"
    );

    *fake.answer.lock().unwrap_or_else(|e| e.into_inner()) = Answer::Genuine;
    let start = Instant::now();
    while !ran(&base) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ran(&base), "the genuine assignment did not run");
    // It was given its name, the master's URL and its own key, whose
    // public half the agent reports.
    let seen = std::fs::read_to_string(base.join("job/ran")).unwrap_or_default();
    let key_path = base.join("job/instance.key");
    assert_eq!(
        seen.trim(),
        format!("job http://{addr} {}", key_path.display())
    );
    let mode = std::fs::metadata(&key_path).map_or(0, |m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode, 0o600);
    let key =
        re6st_orchestration::instance_key::load(&key_path).unwrap_or_else(|e| panic!("{e:#}"));
    let start = Instant::now();
    let reported = loop {
        let last = fake
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|r| !r.key.is_empty())
            .map(|r| r.key.clone());
        if last.is_some() || start.elapsed() > Duration::from_secs(5) {
            break last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        reported
            .as_deref()
            .and_then(re6st_orchestration::instance_key::public_key),
        Some(key.public_key_raw().to_vec())
    );
    let _ = stop.send(());
    let _ = agent.await;
}
