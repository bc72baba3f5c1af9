//! The shipped `kv` service: GET/PUT /KEY over HTTP, kept in a JSON file,
//! replicated between the copies of an instance.
//!
//! Replication is last-writer-wins with versions: every value carries the
//! writer's clock (unix nanoseconds, at least one more than the version it
//! replaces) and the writer's address; the higher (version, origin) wins,
//! so copies that have seen the same writes hold the same data whatever the
//! order. Each copy pulls every other copy's entries (`GET /_sync`) once a
//! second; the other copies are listed in the peers file the agent keeps
//! (`peers.json`: the connection parameters of the other copies, signed by
//! the master with the assignment). A PUT on one copy is read from another
//! within about a second; a new copy gets all data on its first pull.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One value with its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The value.
    pub value: String,
    /// The writer's clock (unix nanoseconds) when written.
    pub version: u64,
    /// Who wrote it (the copy's listen address); breaks ties.
    pub origin: String,
}

impl Entry {
    fn newer_than(&self, other: &Entry) -> bool {
        (self.version, &self.origin) > (other.version, &other.origin)
    }
}

/// The data of one copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entries(pub BTreeMap<String, Entry>);

impl Entries {
    /// Writes `value` at `key` at time `now_ns`, from `origin`.
    pub fn put(&mut self, key: &str, value: String, now_ns: u64, origin: &str) {
        let version = self
            .0
            .get(key)
            .map_or(now_ns, |e| now_ns.max(e.version.saturating_add(1)));
        self.0.insert(
            key.to_string(),
            Entry {
                value,
                version,
                origin: origin.to_string(),
            },
        );
    }

    /// Takes every entry of `other` that is newer, except those from the
    /// future (version above `max_version`: a peer's clock far ahead, or a
    /// peer pinning keys); returns how many.
    pub fn merge(&mut self, other: &Entries, max_version: u64) -> usize {
        let mut taken = 0;
        for (k, e) in &other.0 {
            if e.version > max_version {
                continue;
            }
            if self.0.get(k).is_none_or(|mine| e.newer_than(mine)) {
                self.0.insert(k.clone(), e.clone());
                taken += 1;
            }
        }
        taken
    }

    /// Reads a data file: entries, or (an earlier format) plain strings,
    /// taken at version 0.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if let Ok(e) = serde_json::from_str::<Entries>(text) {
            return Ok(e);
        }
        let plain: BTreeMap<String, String> = serde_json::from_str(text)
            .context("neither kv entries nor a JSON object of strings")?;
        Ok(Self(
            plain
                .into_iter()
                .map(|(k, value)| {
                    (
                        k,
                        Entry {
                            value,
                            version: 0,
                            origin: String::new(),
                        },
                    )
                })
                .collect(),
        ))
    }
}

/// The peers file: the connection parameters of the other copies.
fn peer_urls(file: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    serde_json::from_str::<Vec<BTreeMap<String, String>>>(&text)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.get("url").cloned())
        .collect()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

struct Kv {
    entries: Mutex<Entries>,
    data: PathBuf,
    origin: String,
}

impl Kv {
    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self, e: &Entries) -> std::io::Result<()> {
        let tmp = self.data.with_extension("tmp");
        let bytes = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.data)
    }
}

/// Largest value.
const MAX_VALUE: usize = 64 * 1024;
/// Largest answer of a peer's `/_sync`.
const MAX_SYNC: u64 = 16 * 1024 * 1024;
/// How far ahead of our clock a peer's version may be (ns): one hour.
const MAX_AHEAD_NS: u64 = 3_600 * 1_000_000_000;

/// Serves the store on `listen` until the process is asked to stop,
/// pulling from the copies in `peers` (if given) every second.
pub async fn serve(
    listen: SocketAddr,
    data: PathBuf,
    peers: Option<PathBuf>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;

    let entries = match std::fs::read_to_string(&data) {
        Ok(t) => Entries::parse(&t).with_context(|| format!("{}", data.display()))?,
        Err(_) => Entries::default(),
    };
    let kv = Arc::new(Kv {
        entries: Mutex::new(entries),
        data,
        origin: listen.to_string(),
    });
    async fn get_key(
        State(kv): State<Arc<Kv>>,
        UrlPath(k): UrlPath<String>,
    ) -> (StatusCode, String) {
        match kv.entries().0.get(&k) {
            Some(e) => (StatusCode::OK, e.value.clone()),
            None => (StatusCode::NOT_FOUND, String::new()),
        }
    }
    async fn put_key(
        State(kv): State<Arc<Kv>>,
        UrlPath(k): UrlPath<String>,
        v: String,
    ) -> StatusCode {
        if k.starts_with('_') {
            return StatusCode::BAD_REQUEST;
        }
        let mut e = kv.entries();
        e.put(&k, v, now_ns(), &kv.origin);
        match kv.save(&e) {
            Ok(()) => StatusCode::NO_CONTENT,
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    async fn sync(State(kv): State<Arc<Kv>>) -> axum::Json<Entries> {
        axum::Json(kv.entries().clone())
    }
    if let Some(peers) = peers {
        crate::client::install_crypto();
        let kv = kv.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build();
            let Ok(http) = http else { return };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                for url in peer_urls(&peers) {
                    let url = format!("{}/_sync", url.trim_end_matches('/'));
                    let Ok(r) = http.get(&url).send().await else {
                        continue;
                    };
                    if r.content_length().is_none_or(|n| n > MAX_SYNC) {
                        continue;
                    }
                    let Ok(body) = r.bytes().await else {
                        continue;
                    };
                    let Ok(theirs) = serde_json::from_slice::<Entries>(&body) else {
                        continue;
                    };
                    let mut e = kv.entries();
                    if e.merge(&theirs, now_ns().saturating_add(MAX_AHEAD_NS)) > 0 {
                        if let Err(err) = kv.save(&e) {
                            tracing::warn!(error = %err, "saving replicated entries");
                        }
                    }
                }
            }
        });
    }
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "re6st-orch kv\n" }))
        .route("/_sync", axum::routing::get(sync))
        .route("/{key}", axum::routing::get(get_key).put(put_key))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_VALUE))
        .with_state(kv);
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    axum::serve(l, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_converge_whatever_the_order() {
        let mut a = Entries::default();
        let mut b = Entries::default();
        a.put("k", "from a".into(), 100, "a");
        b.put("k", "from b".into(), 200, "b");
        b.put("only-b", "x".into(), 50, "b");
        let (mut ab, mut ba) = (a.clone(), b.clone());
        ab.merge(&b, u64::MAX);
        ba.merge(&a, u64::MAX);
        assert_eq!(ab, ba);
        assert_eq!(ab.0["k"].value, "from b", "the later write wins");
        // A tie on the clock is broken by the origin, the same everywhere.
        let mut c = Entries::default();
        c.put("t", "c".into(), 7, "c");
        let mut d = Entries::default();
        d.put("t", "d".into(), 7, "d");
        let (mut cd, mut dc) = (c.clone(), d.clone());
        cd.merge(&d, u64::MAX);
        dc.merge(&c, u64::MAX);
        assert_eq!(cd, dc);
        assert_eq!(ab.merge(&ba, u64::MAX), 0, "nothing new");
    }

    #[test]
    fn a_write_supersedes_what_it_read_even_with_a_slow_clock() {
        let mut a = Entries::default();
        a.put("k", "new".into(), 1_000, "a");
        let mut b = a.clone();
        b.put("k", "newer".into(), 10, "b");
        assert_eq!(b.0["k"].version, 1_001);
        a.merge(&b, u64::MAX);
        assert_eq!(a.0["k"].value, "newer");
        // A version from the far future is not taken.
        let mut pinned = Entries::default();
        pinned.put("k", "forever".into(), u64::MAX, "evil");
        assert_eq!(a.merge(&pinned, 1_000_000), 0);
        assert_eq!(a.0["k"].value, "newer");
    }

    #[test]
    fn data_files_of_the_first_format_still_load() {
        let e = Entries::parse(r#"{"k": "v"}"#).unwrap_or_default();
        assert_eq!(e.0["k"].value, "v");
        assert_eq!(e.0["k"].version, 0);
        assert!(Entries::parse("[1, 2]").is_err());
    }
}
