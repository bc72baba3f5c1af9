//! The peer cache: signed peer records of about 200 peers in SQLite, so a
//! node that restarts while the registry is down rejoins from it.
//!
//! Records are verified before they are stored. The endpoint that worked
//! moves first; a failing peer is skipped until its back-off ends and is
//! evicted first when the cache is full.

use std::net::SocketAddr;
use std::path::Path;

use ipnet::Ipv6Net;
use re6st_registry::auth::SignedPeerRecord;
use re6st_registry::cert::CaCert;
use rusqlite::{params, Connection, OptionalExtension};

/// Default size of the cache.
pub const CACHE_SIZE: usize = 200;

/// Cache errors.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// SQLite.
    #[error("peer cache: {0}")]
    Db(#[from] rusqlite::Error),
    /// A record that does not verify or makes no sense.
    #[error("peer record refused: {0}")]
    Record(#[from] re6st_registry::Error),
    /// Stored data that makes no sense.
    #[error("peer cache corrupt: {0}")]
    Corrupt(String),
}

/// Everything the cache holds about a peer, for a copy in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPeer {
    /// Its node prefix.
    pub prefix: Ipv6Net,
    /// Endpoints, preferred first.
    pub endpoints: Vec<SocketAddr>,
    /// Its signed record.
    pub record: SignedPeerRecord,
    /// The record's timestamp (unix seconds).
    pub timestamp: i64,
    /// Failures in a row.
    pub failures: u32,
    /// Skipped until then (unix seconds).
    pub failing_until: i64,
    /// When it last worked (unix seconds).
    pub last_ok: Option<i64>,
}

/// The cache.
#[derive(Debug)]
pub struct PeerCache {
    conn: Connection,
    size: usize,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS peer(
    prefix TEXT PRIMARY KEY,
    payload TEXT NOT NULL,
    signature TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    failing_until INTEGER NOT NULL DEFAULT 0,
    last_ok INTEGER
) STRICT;
";

impl PeerCache {
    /// Opens (or creates) the cache file; `:memory:` for a throw-away one.
    pub fn open(path: &Path, size: usize) -> Result<Self, CacheError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn,
            size: size.max(1),
        })
    }

    /// Verifies and stores a record (a newer one replaces an older one;
    /// known endpoints keep their order, new ones go last).
    pub fn insert(
        &mut self,
        record: &SignedPeerRecord,
        ca: &CaCert,
        crl: &[u64],
        now: i64,
    ) -> Result<(), CacheError> {
        let (rec, cert) = record.verify(ca, now, crl)?;
        let prefix = cert.prefix.to_string();
        let old: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT endpoints, timestamp FROM peer WHERE prefix = ?1",
                params![prefix],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let mut endpoints: Vec<SocketAddr> = Vec::new();
        if let Some((e, ts)) = &old {
            if *ts > rec.timestamp {
                return Ok(());
            }
            let prev: Vec<SocketAddr> =
                serde_json::from_str(e).map_err(|e| CacheError::Corrupt(e.to_string()))?;
            endpoints.extend(prev.into_iter().filter(|a| rec.endpoints.contains(a)));
        }
        for a in &rec.endpoints {
            if !endpoints.contains(a) {
                endpoints.push(*a);
            }
        }
        let json =
            serde_json::to_string(&endpoints).map_err(|e| CacheError::Corrupt(e.to_string()))?;
        if old.is_none() {
            self.trim(self.size.saturating_sub(1), now)?;
        }
        self.conn.execute(
            "INSERT INTO peer(prefix, payload, signature, endpoints, timestamp) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(prefix) DO UPDATE SET payload = ?2, signature = ?3, endpoints = ?4, timestamp = ?5",
            params![prefix, record.payload, record.signature, json, rec.timestamp],
        )?;
        Ok(())
    }

    /// Keeps at most `keep` peers: failing ones go first, then those that
    /// worked longest ago.
    pub fn trim(&mut self, keep: usize, now: i64) -> Result<usize, CacheError> {
        let n = self.conn.execute(
            "DELETE FROM peer WHERE prefix IN (
                SELECT prefix FROM peer
                ORDER BY (failing_until > ?1) ASC, COALESCE(last_ok, 0) DESC, timestamp DESC
                LIMIT -1 OFFSET ?2)",
            params![now, keep as i64],
        )?;
        Ok(n)
    }

    /// The endpoint `addr` of `prefix` worked: it moves first; failures reset.
    pub fn mark_ok(
        &mut self,
        prefix: Ipv6Net,
        addr: SocketAddr,
        now: i64,
    ) -> Result<(), CacheError> {
        let Some(mut endpoints) = self.endpoints(prefix)? else {
            return Ok(());
        };
        endpoints.retain(|a| *a != addr);
        endpoints.insert(0, addr);
        let json =
            serde_json::to_string(&endpoints).map_err(|e| CacheError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "UPDATE peer SET endpoints = ?1, failures = 0, failing_until = 0, last_ok = ?2 WHERE prefix = ?3",
            params![json, now, prefix.to_string()],
        )?;
        Ok(())
    }

    /// Connecting to `prefix` failed: skip it for `backoff_s` × 2^failures (capped at a day).
    pub fn mark_failed(
        &mut self,
        prefix: Ipv6Net,
        now: i64,
        backoff_s: i64,
    ) -> Result<(), CacheError> {
        self.conn.execute(
            "UPDATE peer SET failures = failures + 1,
                failing_until = ?1 + MIN(86400, ?2 * (1 << MIN(failures, 16))) WHERE prefix = ?3",
            params![now, backoff_s, prefix.to_string()],
        )?;
        Ok(())
    }

    /// Forgets peers (revoked, or the registry said so).
    pub fn remove(&mut self, prefix: Ipv6Net) -> Result<(), CacheError> {
        self.conn.execute(
            "DELETE FROM peer WHERE prefix = ?1",
            params![prefix.to_string()],
        )?;
        Ok(())
    }

    fn endpoints(&self, prefix: Ipv6Net) -> Result<Option<Vec<SocketAddr>>, CacheError> {
        let e: Option<String> = self
            .conn
            .query_row(
                "SELECT endpoints FROM peer WHERE prefix = ?1",
                params![prefix.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        e.map(|e| serde_json::from_str(&e).map_err(|e| CacheError::Corrupt(e.to_string())))
            .transpose()
    }

    /// Every peer with its back-off state, in no particular order.
    pub fn load(&self) -> Result<Vec<StoredPeer>, CacheError> {
        let mut st = self.conn.prepare(
            "SELECT prefix, endpoints, payload, signature, timestamp, failures, failing_until, last_ok
             FROM peer",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                prefix,
                endpoints,
                payload,
                signature,
                timestamp,
                failures,
                failing_until,
                last_ok,
            ) = row?;
            out.push(StoredPeer {
                prefix: prefix
                    .parse()
                    .map_err(|_| CacheError::Corrupt(format!("prefix {prefix}")))?,
                endpoints: serde_json::from_str(&endpoints)
                    .map_err(|e| CacheError::Corrupt(e.to_string()))?,
                record: SignedPeerRecord { payload, signature },
                timestamp,
                failures: u32::try_from(failures).unwrap_or(u32::MAX),
                failing_until,
                last_ok,
            });
        }
        Ok(out)
    }

    /// Number of peers.
    pub fn len(&self) -> Result<usize, CacheError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM peer", [], |r| r.get(0))?;
        Ok(n as usize)
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> Result<bool, CacheError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use re6st_registry::auth::PeerRecord;
    use re6st_registry::cert::Ca;

    const NOW: i64 = 1_790_000_000;

    fn record(ca: &Ca, i: u16, endpoints: &[&str], ts: i64) -> SignedPeerRecord {
        let prefix = format!("fd5e:0:0:{i:x}::/64").parse().unwrap_or_default();
        let (key, cert) = ca
            .issue_with_new_key(prefix, [i as u8; 32], u64::from(i), NOW - 10, NOW + 86_400)
            .unwrap_or_else(|e| panic!("{e}"));
        let rec = PeerRecord {
            cert,
            endpoints: endpoints
                .iter()
                .map(|e| e.parse().unwrap_or_else(|_| panic!("{e}")))
                .collect(),
            nat: false,
            timestamp: ts,
        };
        SignedPeerRecord::sign(&rec, &key).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ca() -> Ca {
        Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW, 10)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn stores_verified_records_and_survives_reopening() -> Result<(), CacheError> {
        let ca = ca();
        let path =
            std::env::temp_dir().join(format!("re6st-cache-{}-{}.db", std::process::id(), NOW));
        {
            let mut c = PeerCache::open(&path, 10)?;
            c.insert(
                &record(&ca, 1, &["198.18.1.2:326"], NOW),
                ca.cert(),
                &[],
                NOW,
            )?;
            let forged = SignedPeerRecord {
                signature: "AAAA".into(),
                ..record(&ca, 2, &["198.18.2.2:326"], NOW)
            };
            assert!(c.insert(&forged, ca.cert(), &[], NOW).is_err());
            assert!(
                c.insert(
                    &record(&ca, 3, &["198.18.3.2:326"], NOW),
                    ca.cert(),
                    &[3],
                    NOW
                )
                .is_err(),
                "revoked"
            );
            let other = Ca::generate("fd5e::/48".parse().unwrap_or_default(), NOW, 10)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                c.insert(
                    &record(&other, 4, &["198.18.4.2:326"], NOW),
                    ca.cert(),
                    &[],
                    NOW
                )
                .is_err(),
                "other CA"
            );
        }
        let c = PeerCache::open(&path, 10)?;
        assert_eq!(c.len()?, 1);
        drop(c);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        Ok(())
    }

    #[test]
    fn working_endpoint_moves_first_and_failing_peers_are_skipped() -> Result<(), CacheError> {
        let ca = ca();
        let mut c = PeerCache::open(Path::new(":memory:"), 10)?;
        c.insert(
            &record(&ca, 1, &["198.18.1.2:326", "[fd00:18:0:1::2]:326"], NOW),
            ca.cert(),
            &[],
            NOW,
        )?;
        c.insert(
            &record(&ca, 2, &["198.18.2.2:326"], NOW),
            ca.cert(),
            &[],
            NOW,
        )?;
        let p1: Ipv6Net = "fd5e:0:0:1::/64".parse().unwrap_or_default();
        c.mark_ok(
            p1,
            "[fd00:18:0:1::2]:326"
                .parse()
                .unwrap_or_else(|_| panic!("addr")),
            NOW,
        )?;
        let stored = |c: &PeerCache| -> Result<StoredPeer, CacheError> {
            c.load()?
                .into_iter()
                .find(|p| p.prefix == p1)
                .ok_or_else(|| CacheError::Corrupt("p1 missing".into()))
        };
        let p = stored(&c)?;
        assert_eq!(p.last_ok, Some(NOW), "the one that worked is marked");
        assert_eq!(p.endpoints[0].to_string(), "[fd00:18:0:1::2]:326");
        c.mark_failed(p1, NOW, 60)?;
        assert_eq!(stored(&c)?.failing_until, NOW + 60);
        c.mark_failed(p1, NOW + 60, 60)?;
        assert_eq!(
            stored(&c)?.failing_until,
            NOW + 60 + 120,
            "back-off doubles"
        );
        // A newer record keeps the known order; an older one is ignored.
        c.insert(
            &record(&ca, 1, &["198.18.1.9:326", "[fd00:18:0:1::2]:326"], NOW + 5),
            ca.cert(),
            &[],
            NOW + 5,
        )?;
        let e = c.endpoints(p1)?.unwrap_or_default();
        assert_eq!(e[0].to_string(), "[fd00:18:0:1::2]:326");
        assert_eq!(e.len(), 2);
        Ok(())
    }

    #[test]
    fn load_returns_the_back_off_state() -> Result<(), CacheError> {
        let ca = ca();
        let mut c = PeerCache::open(Path::new(":memory:"), 10)?;
        c.insert(
            &record(&ca, 1, &["198.18.1.2:326"], NOW - 5),
            ca.cert(),
            &[],
            NOW,
        )?;
        let p1: Ipv6Net = "fd5e:0:0:1::/64".parse().unwrap_or_default();
        c.mark_failed(p1, NOW, 30)?;
        let all = c.load()?;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].prefix, p1);
        assert_eq!(all[0].timestamp, NOW - 5);
        assert_eq!(all[0].failures, 1);
        assert_eq!(all[0].failing_until, NOW + 30);
        assert_eq!(all[0].last_ok, None);
        Ok(())
    }

    #[test]
    fn a_full_cache_evicts_failing_peers_first() -> Result<(), CacheError> {
        let ca = ca();
        let mut c = PeerCache::open(Path::new(":memory:"), 3)?;
        for i in 1..=3 {
            c.insert(
                &record(&ca, i, &["198.18.1.2:326"], NOW),
                ca.cert(),
                &[],
                NOW,
            )?;
        }
        let p2: Ipv6Net = "fd5e:0:0:2::/64".parse().unwrap_or_default();
        c.mark_failed(p2, NOW, 600)?;
        c.insert(
            &record(&ca, 4, &["198.18.4.2:326"], NOW),
            ca.cert(),
            &[],
            NOW,
        )?;
        assert_eq!(c.len()?, 3);
        assert!(c.endpoints(p2)?.is_none(), "the failing peer was evicted");
        Ok(())
    }
}
