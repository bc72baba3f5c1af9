//! The registry's state in SQLite (WAL), and every operation on it.
//!
//! Each operation that changes state runs in one `IMMEDIATE` transaction:
//! an issuance consumes the token, allocates the prefix, bumps the serial and
//! stores the certificate together, or not at all. A crash before the commit
//! leaves nothing; after it, a client that retries with the same token and
//! key gets the same certificate back.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv6Net;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::auth::{RequestAuth, SignedPeerRecord, MAX_SKEW_S};
use crate::cert::{check_csr, Ca, IssueRequest, NodeCert};
use crate::config::{random_bytes, HmacKeys, NetworkConfig, SignedConfig, CONFIG_VALIDITY_S};
use crate::error::{Error, Result};
use crate::prefix::{Allocator, Block};
use crate::topology::{Report, Topology};

/// How long a join token is valid unless its creator says otherwise (a
/// token that leaks from a shell history or a ticket does not stay a key
/// to the network for ever).
pub const DEFAULT_TOKEN_LIFETIME_S: i64 = 7 * 86_400;

/// Schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 4;
/// A certificate is renewable this long before it expires.
pub const RENEW_BEFORE_S: i64 = 30 * 86_400;
/// Peer records older than this are not handed out.
pub const PEER_FRESH_S: i64 = 3600;
/// Peer records handed out per bootstrap answer.
pub const BOOTSTRAP_COUNT: usize = 4;

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE free_block(addr TEXT NOT NULL, len INTEGER NOT NULL, PRIMARY KEY(addr, len)) STRICT;
CREATE TABLE reserved(prefix TEXT PRIMARY KEY, why TEXT NOT NULL) STRICT;
CREATE TABLE node(
    prefix TEXT PRIMARY KEY,
    serial INTEGER NOT NULL UNIQUE,
    public_key BLOB NOT NULL UNIQUE,
    not_after INTEGER NOT NULL,
    created INTEGER NOT NULL,
    last_seen INTEGER,
    comment TEXT
) STRICT;
CREATE TABLE cert(
    serial INTEGER PRIMARY KEY,
    prefix TEXT NOT NULL,
    pem TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued INTEGER NOT NULL
) STRICT;
CREATE TABLE revoked(serial INTEGER PRIMARY KEY, not_after INTEGER NOT NULL, date INTEGER NOT NULL) STRICT;
CREATE TABLE token(
    token TEXT PRIMARY KEY,
    comment TEXT,
    prefix_len INTEGER NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER,
    used_by BLOB,
    used_serial INTEGER
) STRICT;
CREATE TABLE peer(prefix TEXT PRIMARY KEY, payload TEXT NOT NULL, signature TEXT NOT NULL, timestamp INTEGER NOT NULL) STRICT;
CREATE TABLE nonce(nonce TEXT PRIMARY KEY, expires INTEGER NOT NULL) STRICT;
";

/// Version 2: prefixes held back from reuse until every certificate
/// issued for them has expired.
const SCHEMA_V2: &str = "
CREATE TABLE quarantine(prefix TEXT PRIMARY KEY, until INTEGER NOT NULL) STRICT;
";

/// Version 3: certificates superseded by a renewal, revoked once the node
/// has shown it holds the new one (`due` set then); each certificate's
/// WireGuard key, so that no two live certificates share one.
const SCHEMA_V3: &str = "
CREATE TABLE superseded(serial INTEGER PRIMARY KEY, prefix TEXT NOT NULL, not_after INTEGER NOT NULL, due INTEGER) STRICT;
ALTER TABLE cert ADD COLUMN wg_key BLOB;
";

/// Version 4: the latest topology report of every node (checked, as JSON).
const SCHEMA_V4: &str = "
CREATE TABLE report(prefix TEXT PRIMARY KEY, body TEXT NOT NULL, received INTEGER NOT NULL) STRICT;
";

/// A superseded certificate stays valid this long (by default: see
/// [`Store::set_supersede_after`]) after the node first authenticates with
/// its new one: time for every peer to learn the new serial over the
/// tunnels (see `NodeCore::install_certificate`).
pub const SUPERSEDE_AFTER_S: i64 = 3600;

/// A node gets at most [`CERTS_PER_WINDOW`] certificates (its join
/// included) in this time; a renewal that changes nothing returns the
/// current one and is not counted. Enough to rotate a WireGuard key at
/// once, not to fill the certificate table and the CRL.
pub const CERT_WINDOW_S: i64 = 3600;
/// See [`CERT_WINDOW_S`].
pub const CERTS_PER_WINDOW: i64 = 3;

/// Parameters of `re6st-registry init`.
#[derive(Clone, Debug)]
pub struct InitParams {
    /// The network prefix (e.g. a /48 inside `fd00::/8`).
    pub network: Ipv6Net,
    /// Default node prefix length.
    pub prefix_len: u8,
    /// Node certificate validity, days.
    pub validity_days: u32,
    /// Days after expiry during which a node may still renew, and before its
    /// prefix returns to the pool.
    pub grace_days: u32,
    /// Where the CA certificate goes.
    pub ca_cert: PathBuf,
    /// Where the CA key goes (created 0600).
    pub ca_key: PathBuf,
}

/// A token as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// The token.
    pub token: String,
    /// Free text.
    pub comment: Option<String>,
    /// Prefix length a join with it gets.
    pub prefix_len: u8,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds, if it expires.
    pub expires: Option<i64>,
    /// Serial of the certificate it was used for.
    pub used_serial: Option<u64>,
}

/// A node as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// Its prefix.
    pub prefix: String,
    /// Serial of its current certificate.
    pub serial: u64,
    /// Expiry of its current certificate (unix seconds).
    pub not_after: i64,
    /// When it joined (unix seconds).
    pub created: i64,
    /// Last authenticated request (unix seconds).
    pub last_seen: Option<i64>,
}

/// The answer to a join or renewal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: String,
    /// The node prefix.
    pub prefix: String,
    /// Its serial.
    pub serial: u64,
    /// Whether a new certificate was made (false: the current one, not yet renewable).
    pub renewed: bool,
}

/// What to revoke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// Every unexpired certificate of a prefix; the prefix is freed.
    Prefix(Ipv6Net),
    /// One certificate by serial (its prefix is freed if it is the node's current one).
    Serial(u64),
}

/// The registry's database and CA.
pub struct Store {
    conn: Connection,
    ca: Ca,
    path: PathBuf,
    supersede_after_s: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn block_key(b: &Block) -> String {
    format!("{:032x}", b.addr)
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Corrupt(format!("negative {what}")))
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{what} too large")))
}

fn write_new_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl Store {
    /// Creates the CA and a new database. Refuses to overwrite either.
    pub fn init(db: &Path, p: &InitParams, now: i64) -> Result<Self> {
        if p.network.trunc() != p.network {
            return Err(Error::Invalid(format!(
                "network {} has host bits set",
                p.network
            )));
        }
        let fd00: Ipv6Net = "fd00::/8"
            .parse()
            .map_err(|_| Error::Corrupt("fd00::/8".into()))?;
        if !fd00.contains(&p.network) {
            return Err(Error::Invalid(format!(
                "network {} is not inside fd00::/8 (unique local addresses)",
                p.network
            )));
        }
        if p.prefix_len <= p.network.prefix_len() || p.prefix_len > 127 {
            return Err(Error::Invalid(format!(
                "node prefix length /{} must be longer than the network's /{} and at most /127",
                p.prefix_len,
                p.network.prefix_len()
            )));
        }
        if p.validity_days == 0 || p.validity_days > 3650 {
            return Err(Error::Invalid("validity must be 1 to 3650 days".into()));
        }
        if db.exists() {
            return Err(Error::Conflict(format!("{} already exists", db.display())));
        }
        for f in [&p.ca_cert, &p.ca_key] {
            if f.exists() {
                return Err(Error::Conflict(format!("{} already exists", f.display())));
            }
        }
        let ca = Ca::generate(p.network, now, 10 * 365)?;
        write_new_file(&p.ca_key, &ca.key_pem(), 0o600)?;
        write_new_file(&p.ca_cert, ca.cert().pem(), 0o644)?;
        // The database holds the Babel keys: readable by us only (SQLite
        // gives its -wal and -shm files the database's mode).
        write_new_file(db, "", 0o600)?;
        let mut conn = open_conn(db)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(SCHEMA_V2)?;
        tx.execute_batch(SCHEMA_V3)?;
        tx.execute_batch(SCHEMA_V4)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let abs = |f: &Path| -> Result<String> {
            let a = std::fs::canonicalize(f)
                .map_err(|e| Error::io(format!("resolving {}", f.display()), e))?;
            Ok(a.to_string_lossy().into_owned())
        };
        let config = NetworkConfig::new(&p.network.to_string(), p.prefix_len, now);
        let keys = HmacKeys::generate(config.hmac_version)?;
        for (k, v) in [
            ("network", p.network.to_string()),
            ("prefix_len", p.prefix_len.to_string()),
            ("validity_days", p.validity_days.to_string()),
            ("grace_days", p.grace_days.to_string()),
            ("serial", "1".to_string()),
            ("ca_cert", abs(&p.ca_cert)?),
            ("ca_key", abs(&p.ca_key)?),
            (
                "hmac",
                serde_json::to_string(&keys).map_err(|e| Error::Corrupt(e.to_string()))?,
            ),
        ] {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                params![k, v],
            )?;
        }
        let mut alloc = Allocator::new(Block::from_net(p.network)?);
        let zero = Block::new(u128::from(p.network.network()), p.prefix_len)?;
        alloc.take(zero)?;
        tx.execute(
            "INSERT INTO reserved(prefix, why) VALUES (?1, 'all-zero prefix: registry use')",
            params![zero.net().to_string()],
        )?;
        save_free(&tx, &alloc)?;
        save_config(&tx, &ca, &config)?;
        tx.commit()?;
        Ok(Self {
            conn,
            ca,
            path: db.to_path_buf(),
            supersede_after_s: SUPERSEDE_AFTER_S,
        })
    }

    /// How long a superseded certificate stays valid once its node uses
    /// the new one ([`SUPERSEDE_AFTER_S`] by default; at least 1 s).
    pub fn set_supersede_after(&mut self, secs: i64) {
        self.supersede_after_s = secs.max(1);
    }

    /// Opens an existing database (and the CA it names).
    pub fn open(db: &Path) -> Result<Self> {
        if !db.exists() {
            return Err(Error::NotFound(format!(
                "{} does not exist (run `re6st-registry init` first)",
                db.display()
            )));
        }
        let mut conn = open_conn(db)?;
        let mut version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 1 {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA_V2)?;
            tx.pragma_update(None, "user_version", 2)?;
            tx.commit()?;
            version = 2;
        }
        if version == 2 {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA_V3)?;
            fill_wg_keys(&tx)?;
            tx.pragma_update(None, "user_version", 3)?;
            tx.commit()?;
            version = 3;
        }
        if version == 3 {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA_V4)?;
            tx.pragma_update(None, "user_version", 4)?;
            tx.commit()?;
            version = 4;
        }
        if version != SCHEMA_VERSION {
            return Err(Error::Corrupt(format!(
                "{} has schema version {version}, this registry knows {SCHEMA_VERSION}",
                db.display()
            )));
        }
        let read = |path: &str| -> Result<String> {
            std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {path}"), e))
        };
        let cert = read(&meta(&conn, "ca_cert")?)?;
        let key = read(&meta(&conn, "ca_key")?)?;
        let ca = Ca::load(&cert, &key)?;
        Ok(Self {
            conn,
            ca,
            path: db.to_path_buf(),
            supersede_after_s: SUPERSEDE_AFTER_S,
        })
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The current signed network configuration.
    pub fn signed_config(&self) -> Result<SignedConfig> {
        serde_json::from_str(&meta(&self.conn, "config")?)
            .map_err(|e| Error::Corrupt(format!("stored config: {e}")))
    }

    /// The current network configuration.
    pub fn config(&self) -> Result<NetworkConfig> {
        self.signed_config()?.verify(self.ca.cert())
    }

    /// The current HMAC key set.
    pub fn hmac_keys(&self) -> Result<HmacKeys> {
        serde_json::from_str(&meta(&self.conn, "hmac")?)
            .map_err(|e| Error::Corrupt(format!("stored HMAC keys: {e}")))
    }

    /// Sets a network parameter; bumps the version.
    pub fn set_param(&mut self, key: &str, value: &str, now: i64) -> Result<NetworkConfig> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut config = load_config(&tx, &self.ca)?;
        config.set(key, value)?;
        bump(&mut config, now);
        save_config(&tx, &self.ca, &config)?;
        tx.commit()?;
        Ok(config)
    }

    /// One HMAC rotation step; bumps the config version.
    pub fn rotate_hmac(&mut self, now: i64) -> Result<HmacKeys> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let next = rotate_locked(&tx, &self.ca, now)?;
        tx.commit()?;
        Ok(next)
    }

    /// Creates a join token valid `expires_in_s` seconds (default
    /// [`DEFAULT_TOKEN_LIFETIME_S`]); returns it.
    pub fn add_token(
        &mut self,
        comment: Option<&str>,
        expires_in_s: Option<i64>,
        prefix_len: Option<u8>,
        now: i64,
    ) -> Result<String> {
        let network: Ipv6Net = meta(&self.conn, "network")?
            .parse()
            .map_err(|_| Error::Corrupt("stored network".into()))?;
        let len = match prefix_len {
            Some(l) if l <= network.prefix_len() || l > 127 => {
                return Err(Error::Invalid(format!(
                    "prefix length /{l} must be longer than the network's /{} and at most /127",
                    network.prefix_len()
                )))
            }
            Some(l) => l,
            None => meta(&self.conn, "prefix_len")?
                .parse()
                .map_err(|_| Error::Corrupt("stored prefix_len".into()))?,
        };
        if let Some(c) = comment {
            if c.len() > 1024 {
                return Err(Error::Invalid("comment longer than 1024 bytes".into()));
            }
        }
        if let Some(s) = expires_in_s {
            if s <= 0 {
                return Err(Error::Invalid("expiry must be in the future".into()));
            }
        }
        let token = hex::encode(random_bytes::<16>()?);
        self.conn.execute(
            "INSERT INTO token(token, comment, prefix_len, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                token,
                comment,
                len,
                now,
                now.saturating_add(expires_in_s.unwrap_or(DEFAULT_TOKEN_LIFETIME_S))
            ],
        )?;
        Ok(token)
    }

    /// All tokens.
    pub fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let mut st = self.conn.prepare(
            "SELECT token, comment, prefix_len, created, expires, used_serial FROM token ORDER BY created, token",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (token, comment, len, created, expires, used) = row?;
            out.push(TokenInfo {
                token,
                comment,
                prefix_len: u8::try_from(len)
                    .map_err(|_| Error::Corrupt("token prefix_len".into()))?,
                created,
                expires,
                used_serial: used.map(|s| to_u64(s, "serial")).transpose()?,
            });
        }
        Ok(out)
    }

    /// Deletes a token.
    pub fn delete_token(&mut self, token: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM token WHERE token = ?1", params![token])?;
        if n == 0 {
            return Err(Error::NotFound(format!("token {token:?}")));
        }
        Ok(())
    }

    /// All nodes with a current certificate.
    pub fn list_nodes(&self) -> Result<Vec<NodeInfo>> {
        let mut st = self.conn.prepare(
            "SELECT prefix, serial, not_after, created, last_seen FROM node ORDER BY prefix",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (prefix, serial, not_after, created, last_seen) = row?;
            out.push(NodeInfo {
                prefix,
                serial: to_u64(serial, "serial")?,
                not_after,
                created,
                last_seen,
            });
        }
        Ok(out)
    }

    /// Joins a node: a one-time token and a CSR in, a certificate out.
    /// Retrying with the same token and key returns the same certificate.
    pub fn join(
        &mut self,
        token: &str,
        csr_pem: &str,
        wg_key: [u8; 32],
        now: i64,
    ) -> Result<Issued> {
        if csr_pem.len() > 16 * 1024 {
            return Err(Error::Invalid("CSR too large".into()));
        }
        let public_key = check_csr(csr_pem)?;
        let validity = i64::from(meta_u32(&self.conn, "validity_days")?) * 86_400;
        let ca = &self.ca;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        expire_locked(&tx, ca, now)?;
        let row = tx
            .query_row(
                "SELECT prefix_len, expires, used_by, used_serial FROM token WHERE token = ?1",
                params![token],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((len, expires, used_by, used_serial)) = row else {
            return Err(Error::Forbidden("unknown or used token".into()));
        };
        if let Some(used_by) = used_by {
            // The same key retrying (it may have missed our answer): same certificate.
            if let (true, Some(serial)) = (used_by == public_key, used_serial) {
                let (prefix, pem): (String, String) = tx.query_row(
                    "SELECT prefix, pem FROM cert WHERE serial = ?1",
                    params![serial],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                return Ok(Issued {
                    cert: pem,
                    prefix,
                    serial: to_u64(serial, "serial")?,
                    renewed: false,
                });
            }
            return Err(Error::Forbidden("unknown or used token".into()));
        }
        if expires.is_some_and(|e| e < now) {
            return Err(Error::Forbidden("token expired".into()));
        }
        let existing: Option<String> = tx
            .query_row(
                "SELECT prefix FROM node WHERE public_key = ?1",
                params![public_key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(p) = existing {
            return Err(Error::Conflict(format!(
                "this key already holds {p}: renew instead of joining again"
            )));
        }
        refuse_shared_wg_key(&tx, &wg_key, None, now)?;
        let len = u8::try_from(len).map_err(|_| Error::Corrupt("token prefix_len".into()))?;
        let mut alloc = load_free(&tx)?;
        let block = alloc.allocate(len)?;
        let serial = next_serial(&tx)?;
        let cert = ca.issue(&IssueRequest {
            public_key: public_key.clone(),
            prefix: block.net(),
            wg_key,
            serial,
            not_before: now - 60,
            not_after: now + validity,
        })?;
        let prefix = block.net().to_string();
        let serial_i = to_i64(serial, "serial")?;
        tx.execute(
            "INSERT INTO cert(serial, prefix, pem, not_after, issued, wg_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![serial_i, prefix, cert, now + validity, now, wg_key.as_slice()],
        )?;
        tx.execute(
            "INSERT INTO node(prefix, serial, public_key, not_after, created, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![prefix, serial_i, public_key, now + validity, now],
        )?;
        tx.execute(
            "UPDATE token SET used_by = ?1, used_serial = ?2 WHERE token = ?3",
            params![public_key, serial_i, token],
        )?;
        save_free(&tx, &alloc)?;
        tx.commit()?;
        // The first node is the mesh's anchor unless the operator chose one
        // (a failure here leaves none: `config set anchor` sets it).
        if self.config().is_ok_and(|c| c.anchor.is_none()) {
            if let Err(e) = self.set_param("anchor", &prefix, now) {
                tracing::warn!(error = %e, "setting the anchor");
            }
        }
        Ok(Issued {
            cert,
            prefix,
            serial,
            renewed: true,
        })
    }

    /// Checks a node-signed request: known serial, not revoked, signature,
    /// clock window, fresh nonce. With `grace`, an expired certificate still
    /// authenticates during the grace period (for renewal).
    pub fn authenticate(
        &mut self,
        auth: &RequestAuth,
        method: &str,
        path: &str,
        body: &[u8],
        now: i64,
        grace: bool,
    ) -> Result<NodeCert> {
        let serial = to_i64(auth.serial, "serial")?;
        let pem: Option<String> = self
            .conn
            .query_row(
                "SELECT pem FROM cert WHERE serial = ?1",
                params![serial],
                |r| r.get(0),
            )
            .optional()?;
        let pem =
            pem.ok_or_else(|| Error::Unauthenticated(format!("unknown serial {}", auth.serial)))?;
        let cert = self.ca.cert().verify_node(&pem, None)?;
        let revoked: bool = self
            .conn
            .query_row(
                "SELECT 1 FROM revoked WHERE serial = ?1",
                params![serial],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if revoked {
            return Err(Error::Forbidden(format!(
                "certificate {} is revoked",
                auth.serial
            )));
        }
        let grace_s = if grace {
            i64::from(meta_u32(&self.conn, "grace_days")?) * 86_400
        } else {
            0
        };
        if now < cert.not_before - MAX_SKEW_S || now > cert.not_after + grace_s {
            return Err(Error::Forbidden(format!(
                "certificate {} is not valid now",
                auth.serial
            )));
        }
        auth.verify(&cert.public_key, method, path, body, now)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM nonce WHERE expires < ?1", params![now])?;
        let fresh = tx.execute(
            "INSERT OR IGNORE INTO nonce(nonce, expires) VALUES (?1, ?2)",
            params![auth.nonce, now + 2 * MAX_SKEW_S],
        )?;
        if fresh == 0 {
            return Err(Error::Unauthenticated(
                "replayed request (nonce already seen)".into(),
            ));
        }
        tx.execute(
            "UPDATE node SET last_seen = ?1 WHERE prefix = ?2",
            params![now, cert.prefix.to_string()],
        )?;
        // The node holds its new certificate: the ones it superseded go
        // to the CRL once its peers have had time to learn the new serial.
        tx.execute(
            "UPDATE superseded SET due = ?1 WHERE due IS NULL AND prefix = ?2
             AND ?3 = (SELECT serial FROM node WHERE prefix = ?2)",
            params![
                now + self.supersede_after_s,
                cert.prefix.to_string(),
                serial
            ],
        )?;
        tx.commit()?;
        Ok(cert)
    }

    /// Renews the certificate of an authenticated node (see [`Store::authenticate`]).
    /// Before the renewal window the current certificate is returned as is.
    pub fn renew(&mut self, node: &NodeCert, wg_key: Option<[u8; 32]>, now: i64) -> Result<Issued> {
        let validity = i64::from(meta_u32(&self.conn, "validity_days")?) * 86_400;
        let ca = &self.ca;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let prefix = node.prefix.to_string();
        let row: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT serial, public_key FROM node WHERE prefix = ?1",
                params![prefix],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((current, key)) = row else {
            return Err(Error::Forbidden(format!(
                "{prefix} is no longer registered"
            )));
        };
        if key != node.public_key {
            return Err(Error::Forbidden(format!(
                "{prefix} now belongs to another key"
            )));
        }
        let (pem, not_after): (String, i64) = tx.query_row(
            "SELECT pem, not_after FROM cert WHERE serial = ?1",
            params![current],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let current_cert = NodeCert::from_pem(&pem)?;
        let wg = wg_key.unwrap_or(current_cert.wg_key);
        if now < not_after - RENEW_BEFORE_S && wg == current_cert.wg_key {
            return Ok(Issued {
                cert: pem,
                prefix,
                serial: to_u64(current, "serial")?,
                renewed: false,
            });
        }
        let recent: i64 = tx.query_row(
            "SELECT COUNT(*) FROM cert WHERE prefix = ?1 AND issued > ?2",
            params![prefix, now - CERT_WINDOW_S],
            |r| r.get(0),
        )?;
        if recent >= CERTS_PER_WINDOW {
            return Err(Error::TooSoon(format!(
                "{prefix} got {recent} certificates in the last {CERT_WINDOW_S} s: \
                 {CERTS_PER_WINDOW} at most"
            )));
        }
        refuse_shared_wg_key(&tx, &wg, Some(&prefix), now)?;
        let serial = next_serial(&tx)?;
        let cert = ca.issue(&IssueRequest {
            public_key: key.clone(),
            prefix: node.prefix,
            wg_key: wg,
            serial,
            not_before: now - 60,
            not_after: now + validity,
        })?;
        let serial_i = to_i64(serial, "serial")?;
        tx.execute(
            "INSERT INTO cert(serial, prefix, pem, not_after, issued, wg_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![serial_i, prefix, cert, now + validity, now, wg.as_slice()],
        )?;
        tx.execute(
            "UPDATE node SET serial = ?1, not_after = ?2, last_seen = ?3 WHERE prefix = ?4",
            params![serial_i, now + validity, now, prefix],
        )?;
        // The previous certificate is revoked once the node uses this one.
        tx.execute(
            "INSERT OR IGNORE INTO superseded(serial, prefix, not_after, due) VALUES (?1, ?2, ?3, NULL)",
            params![current, prefix, not_after],
        )?;
        tx.commit()?;
        Ok(Issued {
            cert,
            prefix,
            serial,
            renewed: true,
        })
    }

    /// Revokes every valid certificate of the node (given by prefix, or
    /// by the serial of any of its valid certificates: a renewed node's
    /// older certificate is revoked with it); frees the prefix (held in
    /// quarantine until its certificates expire); bumps the config (the
    /// CRL changes). Returns the serials added to the CRL.
    pub fn revoke(&mut self, target: &RevokeTarget, now: i64) -> Result<Vec<u64>> {
        let ca = &self.ca;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let prefix = match target {
            RevokeTarget::Prefix(p) => p.trunc().to_string(),
            RevokeTarget::Serial(s) => {
                let (prefix, not_after): (String, i64) = tx
                    .query_row(
                        "SELECT prefix, not_after FROM cert WHERE serial = ?1",
                        params![to_i64(*s, "serial")?],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?
                    .ok_or_else(|| Error::NotFound(format!("no certificate with serial {s}")))?;
                // An expired certificate says nothing about who holds the
                // prefix now (it may have been handed on since).
                if not_after < now {
                    return Err(Error::NotFound(format!("certificate {s} has expired")));
                }
                prefix
            }
        };
        let serials: Vec<(i64, i64)> = {
            let mut st = tx.prepare(
                "SELECT serial, not_after FROM cert WHERE prefix = ?1 AND not_after >= ?2
                 AND serial NOT IN (SELECT serial FROM revoked)",
            )?;
            let rows = st.query_map(params![prefix, now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let current: Option<i64> = tx
            .query_row(
                "SELECT serial FROM node WHERE prefix = ?1",
                params![prefix],
                |r| r.get(0),
            )
            .optional()?;
        if serials.is_empty() && current.is_none() {
            return Err(Error::NotFound(format!("nothing to revoke for {prefix}")));
        }
        for (s, not_after) in &serials {
            tx.execute(
                "INSERT OR IGNORE INTO revoked(serial, not_after, date) VALUES (?1, ?2, ?3)",
                params![s, not_after, now],
            )?;
        }
        if current.is_some() {
            free_node(&tx, &prefix, now)?;
        }
        let mut config = load_config(&tx, ca)?;
        config.crl = load_crl(&tx, now)?;
        bump(&mut config, now);
        save_config(&tx, ca, &config)?;
        if !serials.is_empty() {
            rekey_after_revocation(&tx, ca, now)?;
        }
        tx.commit()?;
        serials.iter().map(|(s, _)| to_u64(*s, "serial")).collect()
    }

    /// Frees the prefixes of nodes expired longer than the grace period,
    /// deletes expired tokens, drops expired certificates from the CRL,
    /// and moves a Babel key rotation on once its phase is over.
    pub fn expire(&mut self, now: i64) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        expire_locked(&tx, &self.ca, now)?;
        advance_hmac(&tx, &self.ca, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Stores the peer record of an authenticated node.
    pub fn publish_peer(
        &mut self,
        node: &NodeCert,
        record: &SignedPeerRecord,
        now: i64,
    ) -> Result<()> {
        let crl = load_crl(&self.conn, now)?;
        let (rec, cert) = record.verify(self.ca.cert(), now, &crl)?;
        if cert.prefix != node.prefix {
            return Err(Error::Forbidden(
                "a node may publish only its own record".into(),
            ));
        }
        if (rec.timestamp - now).abs() > MAX_SKEW_S {
            return Err(Error::Invalid(
                "peer record timestamp too far from now".into(),
            ));
        }
        self.conn.execute(
            "INSERT INTO peer(prefix, payload, signature, timestamp) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(prefix) DO UPDATE SET payload = ?2, signature = ?3, timestamp = ?4
             WHERE excluded.timestamp >= peer.timestamp",
            params![
                node.prefix.to_string(),
                record.payload,
                record.signature,
                rec.timestamp
            ],
        )?;
        Ok(())
    }

    /// Keeps `report` as the latest of the authenticated `node` (checked
    /// by [`Report::parse`]).
    pub fn put_report(&mut self, node: &NodeCert, report: &Report, now: i64) -> Result<()> {
        let body = serde_json::to_string(report).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO report(prefix, body, received) VALUES (?1, ?2, ?3)
             ON CONFLICT(prefix) DO UPDATE SET body = ?2, received = ?3",
            params![node.prefix.to_string(), body, now],
        )?;
        Ok(())
    }

    /// The network map: every node with its latest report.
    pub fn topology(&self, now: i64) -> Result<Topology> {
        let mut st = self
            .conn
            .prepare("SELECT prefix, body, received FROM report JOIN node USING (prefix)")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut reports = Vec::new();
        for row in rows {
            let (prefix, body, at) = row?;
            let report: Report = serde_json::from_str(&body)
                .map_err(|e| Error::Corrupt(format!("stored report of {prefix}: {e}")))?;
            reports.push((prefix, report, at));
        }
        Ok(Topology::build(
            self.ca.cert().network(),
            self.list_nodes()?,
            reports,
            now,
        ))
    }

    /// A few random fresh peer records of registered nodes, never `exclude`'s.
    pub fn bootstrap(&self, exclude: Option<Ipv6Net>, now: i64) -> Result<Vec<SignedPeerRecord>> {
        let exclude = exclude.map(|p| p.to_string()).unwrap_or_default();
        let mut st = self.conn.prepare(
            "SELECT payload, signature FROM peer JOIN node USING (prefix)
             WHERE timestamp >= ?1 AND prefix != ?2 ORDER BY random() LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![now - PEER_FRESH_S, exclude, BOOTSTRAP_COUNT as i64],
            |r| {
                Ok(SignedPeerRecord {
                    payload: r.get(0)?,
                    signature: r.get(1)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The free blocks of the prefix space (for checks and tests).
    pub fn free_blocks(&self) -> Result<Vec<Block>> {
        Ok(load_free(&self.conn)?.free_blocks().copied().collect())
    }

    /// Path of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn meta(conn: &Connection, key: &str) -> Result<String> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
        r.get(0)
    })
    .optional()?
    .ok_or_else(|| Error::Corrupt(format!("meta {key} missing")))
}

fn meta_u32(conn: &Connection, key: &str) -> Result<u32> {
    meta(conn, key)?
        .parse()
        .map_err(|_| Error::Corrupt(format!("meta {key} is not a number")))
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
        params![key, value],
    )?;
    Ok(())
}

fn next_serial(conn: &Connection) -> Result<u64> {
    let last: u64 = meta(conn, "serial")?
        .parse()
        .map_err(|_| Error::Corrupt("meta serial".into()))?;
    let next = last + 1;
    set_meta(conn, "serial", &next.to_string())?;
    Ok(next)
}

fn load_free(conn: &Connection) -> Result<Allocator> {
    let network: Ipv6Net = meta(conn, "network")?
        .parse()
        .map_err(|_| Error::Corrupt("stored network".into()))?;
    let mut st = conn.prepare("SELECT addr, len FROM free_block")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut blocks = Vec::new();
    for row in rows {
        let (addr, len) = row?;
        let addr = u128::from_str_radix(&addr, 16)
            .map_err(|_| Error::Corrupt(format!("free block {addr}")))?;
        let len = u8::try_from(len).map_err(|_| Error::Corrupt("free block length".into()))?;
        blocks.push(Block::new(addr, len)?);
    }
    Allocator::from_free(Block::from_net(network)?, blocks)
}

fn save_free(conn: &Connection, alloc: &Allocator) -> Result<()> {
    conn.execute("DELETE FROM free_block", [])?;
    let mut st = conn.prepare("INSERT INTO free_block(addr, len) VALUES (?1, ?2)")?;
    for b in alloc.free_blocks() {
        st.execute(params![block_key(b), b.len])?;
    }
    Ok(())
}

fn load_config(conn: &Connection, ca: &Ca) -> Result<NetworkConfig> {
    let signed: SignedConfig = serde_json::from_str(&meta(conn, "config")?)
        .map_err(|e| Error::Corrupt(format!("stored config: {e}")))?;
    signed.verify(ca.cert())
}

fn save_config(conn: &Connection, ca: &Ca, config: &NetworkConfig) -> Result<()> {
    let signed = SignedConfig::sign(config, |m| ca.sign(m))?;
    let text = serde_json::to_string(&signed).map_err(|e| Error::Corrupt(e.to_string()))?;
    if !signed.floods() {
        tracing::warn!(
            version = config.version,
            bytes = text.len(),
            crl = config.crl.len(),
            "the network configuration no longer floods between peers: nodes get it \
             from the registry only (at their next check, or when a peer announces it)"
        );
    }
    set_meta(conn, "config", &text)
}

fn bump(config: &mut NetworkConfig, now: i64) {
    config.version += 1;
    config.issued_at = now;
    config.valid_until = now + CONFIG_VALIDITY_S;
}

fn load_crl(conn: &Connection, now: i64) -> Result<Vec<u64>> {
    let mut st =
        conn.prepare("SELECT serial FROM revoked WHERE not_after >= ?1 ORDER BY serial")?;
    let rows = st.query_map(params![now], |r| r.get::<_, i64>(0))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(to_u64(r?, "serial")?);
    }
    Ok(out)
}

fn load_hmac(conn: &Connection) -> Result<HmacKeys> {
    serde_json::from_str(&meta(conn, "hmac")?)
        .map_err(|e| Error::Corrupt(format!("stored HMAC keys: {e}")))
}

/// One rotation step of the Babel keys, with the config that announces it.
fn rotate_locked(conn: &Connection, ca: &Ca, now: i64) -> Result<HmacKeys> {
    let next = load_hmac(conn)?.rotate(now)?;
    set_meta(
        conn,
        "hmac",
        &serde_json::to_string(&next).map_err(|e| Error::Corrupt(e.to_string()))?,
    )?;
    let mut config = load_config(conn, ca)?;
    config.hmac_version = next.version;
    bump(&mut config, now);
    save_config(conn, ca, &config)?;
    Ok(next)
}

/// Meta key: a revocation happened during a rotation, whose new key the
/// revoked node may have fetched: another rotation follows it.
const REKEY_PENDING: &str = "hmac_rekey_pending";

/// A revoked node knows the Babel keys: a rotation to a key it never saw
/// starts now, or after the rotation under way (see [`advance_hmac`]).
fn rekey_after_revocation(conn: &Connection, ca: &Ca, now: i64) -> Result<()> {
    if load_hmac(conn)?.accept.len() == 1 {
        rotate_locked(conn, ca, now)?;
    } else {
        set_meta(conn, REKEY_PENDING, "1")?;
    }
    Ok(())
}

/// Moves a rotation on once its phase is over (`valid_until` passed), and
/// starts the one a revocation asked for once the keys are stable.
fn advance_hmac(conn: &Connection, ca: &Ca, now: i64) -> Result<()> {
    let keys = load_hmac(conn)?;
    if keys.valid_until.is_some_and(|t| t <= now) {
        rotate_locked(conn, ca, now)?;
    } else if keys.valid_until.is_none()
        && keys.accept.len() == 1
        && meta(conn, REKEY_PENDING).is_ok_and(|v| v == "1")
    {
        conn.execute("DELETE FROM meta WHERE key = ?1", params![REKEY_PENDING])?;
        rotate_locked(conn, ca, now)?;
    }
    Ok(())
}

/// Forgets the node of `prefix`; the prefix goes back to the pool once
/// no certificate issued for it is valid any more (until then a node
/// with an old CRL could still take a revoked certificate of it for the
/// prefix's next owner).
fn free_node(conn: &Connection, prefix: &str, now: i64) -> Result<()> {
    conn.execute("DELETE FROM node WHERE prefix = ?1", params![prefix])?;
    conn.execute("DELETE FROM peer WHERE prefix = ?1", params![prefix])?;
    conn.execute("DELETE FROM report WHERE prefix = ?1", params![prefix])?;
    conn.execute("DELETE FROM superseded WHERE prefix = ?1", params![prefix])?;
    let until: Option<i64> = conn.query_row(
        "SELECT MAX(not_after) FROM cert WHERE prefix = ?1",
        params![prefix],
        |r| r.get(0),
    )?;
    match until {
        Some(u) if u >= now => {
            conn.execute(
                "INSERT OR REPLACE INTO quarantine(prefix, until) VALUES (?1, ?2)",
                params![prefix, u],
            )?;
            Ok(())
        }
        _ => release_prefix(conn, prefix),
    }
}

fn release_prefix(conn: &Connection, prefix: &str) -> Result<()> {
    let net: Ipv6Net = prefix
        .parse()
        .map_err(|_| Error::Corrupt(format!("stored prefix {prefix}")))?;
    let mut alloc = load_free(conn)?;
    alloc.release(Block::from_net(net)?)?;
    save_free(conn, &alloc)?;
    conn.execute("DELETE FROM quarantine WHERE prefix = ?1", params![prefix])?;
    Ok(())
}

fn expire_locked(conn: &Connection, ca: &Ca, now: i64) -> Result<()> {
    let grace = i64::from(meta_u32(conn, "grace_days")?) * 86_400;
    let gone: Vec<String> = {
        let mut st = conn.prepare("SELECT prefix FROM node WHERE not_after < ?1")?;
        let rows = st.query_map(params![now - grace], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for prefix in &gone {
        free_node(conn, prefix, now)?;
    }
    let released: Vec<String> = {
        let mut st = conn.prepare("SELECT prefix FROM quarantine WHERE until < ?1")?;
        let rows = st.query_map(params![now], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for prefix in &released {
        release_prefix(conn, prefix)?;
    }
    conn.execute(
        "DELETE FROM token WHERE expires IS NOT NULL AND expires < ?1 AND used_by IS NULL",
        params![now],
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO revoked(serial, not_after, date)
         SELECT serial, not_after, ?1 FROM superseded WHERE due <= ?1 AND not_after >= ?1",
        params![now],
    )?;
    conn.execute(
        "DELETE FROM superseded WHERE due <= ?1 OR not_after < ?1",
        params![now],
    )?;
    let mut config = load_config(conn, ca)?;
    let crl = load_crl(conn, now)?;
    // Signed again at half of its validity, changed or not.
    if crl != config.crl || config.valid_until - now < CONFIG_VALIDITY_S / 2 {
        config.crl = crl;
        bump(&mut config, now);
        save_config(conn, ca, &config)?;
    }
    Ok(())
}

/// Refuses a WireGuard key that a live certificate of another node holds
/// (its tunnels would be taken for that node's).
fn refuse_shared_wg_key(
    conn: &Connection,
    wg_key: &[u8; 32],
    mine: Option<&str>,
    now: i64,
) -> Result<()> {
    let holder: Option<String> = conn
        .query_row(
            "SELECT prefix FROM cert WHERE wg_key = ?1 AND not_after >= ?2 AND prefix != ?3
             AND serial NOT IN (SELECT serial FROM revoked) LIMIT 1",
            params![wg_key.as_slice(), now, mine.unwrap_or("")],
            |r| r.get(0),
        )
        .optional()?;
    match holder {
        Some(p) => Err(Error::Conflict(format!(
            "this WireGuard key is {p}'s: every node needs its own"
        ))),
        None => Ok(()),
    }
}

/// Schema 3: the WireGuard key of every stored certificate.
fn fill_wg_keys(conn: &Connection) -> Result<()> {
    let certs: Vec<(i64, String)> = {
        let mut st = conn.prepare("SELECT serial, pem FROM cert")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (serial, pem) in certs {
        let wg = NodeCert::from_pem(&pem)?.wg_key;
        conn.execute(
            "UPDATE cert SET wg_key = ?1 WHERE serial = ?2",
            params![wg.as_slice(), serial],
        )?;
    }
    Ok(())
}

/// Decodes a base64 WireGuard public key.
pub fn parse_wg_key(b64: &str) -> Result<[u8; 32]> {
    B64.decode(b64.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| Error::Invalid("WireGuard key must be 32 bytes in base64".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{sign_request, PeerRecord};
    use crate::cert::{generate_key, make_csr};

    const NOW: i64 = 1_790_000_000;

    struct Fixture {
        _dir: TempDir,
        store: Store,
    }

    /// A directory removed on drop.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture() -> Result<Fixture> {
        let dir = std::env::temp_dir().join(format!(
            "re6st-store-{}-{}",
            std::process::id(),
            hex::encode(random_bytes::<6>()?)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", e))?;
        let store = Store::init(
            &dir.join("registry.db"),
            &InitParams {
                network: "fd5e:2a1:77::/48"
                    .parse()
                    .map_err(|_| Error::Invalid("n".into()))?,
                prefix_len: 64,
                validity_days: 365,
                grace_days: 100,
                ca_cert: dir.join("ca.crt"),
                ca_key: dir.join("ca.key"),
            },
            NOW,
        )?;
        Ok(Fixture {
            _dir: TempDir(dir),
            store,
        })
    }

    fn join(s: &mut Store, now: i64) -> Result<(rcgen::KeyPair, Issued)> {
        let token = s.add_token(None, None, None, now)?;
        let key = generate_key()?;
        let issued = s.join(&token, &make_csr(&key)?, wg_key_of(&key), now)?;
        Ok((key, issued))
    }

    /// A WireGuard key of each node's own (taken from its node key).
    fn wg_key_of(key: &rcgen::KeyPair) -> [u8; 32] {
        let raw = key.public_key_raw();
        let mut wg = [0; 32];
        wg.copy_from_slice(&raw[raw.len() - 32..]);
        wg
    }

    /// The first node to join anchors the mesh; later ones change
    /// nothing, nor does a join after the operator chose another.
    #[test]
    fn the_first_node_to_join_is_the_anchor() -> Result<()> {
        let mut f = fixture()?;
        assert_eq!(f.store.config()?.anchor, None);
        let (_, first) = join(&mut f.store, NOW)?;
        let c = f.store.config()?;
        assert_eq!(c.anchor.as_deref(), Some(first.prefix.as_str()));
        join(&mut f.store, NOW)?;
        assert_eq!(f.store.config()?.version, c.version);
        assert_eq!(f.store.config()?.anchor, c.anchor);
        Ok(())
    }

    #[test]
    fn init_reserves_zero_and_first_join_gets_prefix_one() -> Result<()> {
        let mut f = fixture()?;
        let (_, issued) = join(&mut f.store, NOW)?;
        assert_eq!(issued.prefix, "fd5e:2a1:77:1::/64");
        let cert = f.store.ca().cert().verify_node(&issued.cert, Some(NOW))?;
        assert_eq!(cert.serial, issued.serial);
        let again = Store::open(f.store.path())?;
        assert_eq!(again.list_nodes()?.len(), 1);
        assert!(Store::init(
            f.store.path(),
            &InitParams {
                network: "fd5e::/48"
                    .parse()
                    .map_err(|_| Error::Invalid("n".into()))?,
                prefix_len: 64,
                validity_days: 1,
                grace_days: 1,
                ca_cert: PathBuf::from("/nonexistent/x"),
                ca_key: PathBuf::from("/nonexistent/y"),
            },
            NOW
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn tokens_are_single_use_but_retry_safe() -> Result<()> {
        let mut f = fixture()?;
        let token = f.store.add_token(Some("lab"), Some(3600), None, NOW)?;
        let key = generate_key()?;
        let csr = make_csr(&key)?;
        let first = f.store.join(&token, &csr, [1; 32], NOW)?;
        let retry = f.store.join(&token, &csr, [1; 32], NOW)?;
        assert_eq!(first.cert, retry.cert);
        let other = make_csr(&generate_key()?)?;
        assert!(matches!(
            f.store.join(&token, &other, [1; 32], NOW),
            Err(Error::Forbidden(_))
        ));
        assert!(matches!(
            f.store.join("nope", &other, [1; 32], NOW),
            Err(Error::Forbidden(_))
        ));
        // Without an expiry a token still expires, after a week.
        let default = f.store.add_token(None, None, None, NOW)?;
        assert!(matches!(
            f.store.join(
                &default,
                &other,
                [1; 32],
                NOW + DEFAULT_TOKEN_LIFETIME_S + 1
            ),
            Err(Error::Forbidden(_))
        ));
        let late = f.store.add_token(None, Some(10), None, NOW)?;
        assert!(matches!(
            f.store.join(&late, &other, [1; 32], NOW + 11),
            Err(Error::Forbidden(_))
        ));
        assert_eq!(
            f.store
                .list_tokens()?
                .iter()
                .filter(|t| t.used_serial.is_some())
                .count(),
            1
        );
        Ok(())
    }

    #[test]
    fn revocation_frees_the_prefix_and_fills_the_crl() -> Result<()> {
        let mut f = fixture()?;
        let (key, a) = join(&mut f.store, NOW)?;
        let v0 = f.store.config()?.version;
        let revoked = f.store.revoke(&RevokeTarget::Serial(a.serial), NOW)?;
        assert_eq!(revoked, vec![a.serial]);
        let cfg = f.store.config()?;
        assert_eq!(cfg.crl, vec![a.serial]);
        assert!(cfg.version > v0);
        // The prefix is held back while a certificate of it is valid: a
        // node with an old CRL could take a's for its next owner.
        let (_, b) = join(&mut f.store, NOW)?;
        assert_ne!(b.prefix, a.prefix);
        let not_after = NodeCert::from_pem(&a.cert)?.not_after;
        f.store.expire(not_after)?;
        let (_, c) = join(&mut f.store, not_after)?;
        assert_ne!(c.prefix, a.prefix, "still valid at its last second");
        f.store.expire(not_after + 1)?;
        let (_, d) = join(&mut f.store, not_after + 1)?;
        assert_eq!(d.prefix, a.prefix, "back in the pool once expired");
        // The revoked node can no longer authenticate.
        let h = sign_request(&key, a.serial, "POST", "/v1/renew", b"", NOW)?;
        let auth = RequestAuth::parse(&h)?;
        assert!(matches!(
            f.store
                .authenticate(&auth, "POST", "/v1/renew", b"", NOW, true),
            Err(Error::Forbidden(_))
        ));
        assert!(f.store.revoke(&RevokeTarget::Serial(999), NOW).is_err());
        Ok(())
    }

    /// What `init` writes holds secrets (the CA key, the Babel keys in the
    /// database): readable by the registry's user only.
    #[test]
    fn init_files_are_private() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture()?;
        let dir = f._dir.0.clone();
        for (name, mode) in [("registry.db", 0o600), ("ca.key", 0o600), ("ca.crt", 0o644)] {
            let m = std::fs::metadata(dir.join(name))
                .map_err(|e| Error::io(name, e))?
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(m, mode, "{name}");
        }
        Ok(())
    }

    /// A database of schema version 1 gains the quarantine table on open,
    /// then the superseded table and the certificates' WireGuard keys.
    #[test]
    fn schema_1_is_migrated() -> Result<()> {
        let mut f = fixture()?;
        let db = f.store.path.clone();
        let (old_key, old) = join(&mut f.store, NOW)?;
        f.store.conn.execute_batch(
            "DROP TABLE quarantine; DROP TABLE superseded; DROP TABLE report;
             ALTER TABLE cert DROP COLUMN wg_key; PRAGMA user_version = 1;",
        )?;
        drop(f.store);
        let mut store = Store::open(&db)?;
        let (_, a) = join(&mut store, NOW)?;
        store.revoke(&RevokeTarget::Serial(a.serial), NOW)?;
        let held: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM quarantine", [], |r| r.get(0))?;
        assert_eq!(held, 1);
        let wg: Vec<u8> = store.conn.query_row(
            "SELECT wg_key FROM cert WHERE serial = ?1",
            params![to_i64(old.serial, "serial")?],
            |r| r.get(0),
        )?;
        assert_eq!(wg, wg_key_of(&old_key));
        assert_eq!(
            store.topology(NOW)?.nodes.len(),
            1,
            "the report table is there"
        );
        Ok(())
    }

    /// The latest report of a node is on the map until it is revoked.
    #[test]
    fn reports_are_kept_per_node_and_dropped_with_it() -> Result<()> {
        let mut f = fixture()?;
        let (key, a) = join(&mut f.store, NOW)?;
        let node = authenticated(&mut f.store, &key, a.serial, NOW)?;
        let report = |v: &str| Report {
            version: v.into(),
            tunnels: Vec::new(),
            unreachable: Vec::new(),
        };
        f.store.put_report(&node, &report("1"), NOW)?;
        f.store.put_report(&node, &report("2"), NOW + 60)?;
        let map = f.store.topology(NOW + 60)?;
        assert_eq!(map.nodes.len(), 1);
        assert_eq!(map.nodes[0].version.as_deref(), Some("2"));
        assert_eq!(map.nodes[0].reported, Some(NOW + 60));
        f.store.revoke(&RevokeTarget::Serial(a.serial), NOW + 120)?;
        assert!(f.store.topology(NOW + 120)?.nodes.is_empty());
        let left: i64 = f
            .store
            .conn
            .query_row("SELECT COUNT(*) FROM report", [], |r| r.get(0))?;
        assert_eq!(left, 0);
        Ok(())
    }

    fn authenticated(s: &mut Store, key: &rcgen::KeyPair, serial: u64, t: i64) -> Result<NodeCert> {
        let h = sign_request(key, serial, "POST", "/v1/renew", b"", t)?;
        s.authenticate(&RequestAuth::parse(&h)?, "POST", "/v1/renew", b"", t, true)
    }

    /// The configuration is signed again at half of its validity, so a
    /// fresh one always exists; its freshness moves from fresh to stale to
    /// expired.
    #[test]
    fn the_configuration_is_signed_again_before_it_goes_stale() -> Result<()> {
        use crate::config::{Freshness, STALE_BOUND_S};
        let mut f = fixture()?;
        let c = f.store.config()?;
        assert!(c.valid_until >= NOW + CONFIG_VALIDITY_S);
        f.store.expire(c.valid_until - CONFIG_VALIDITY_S / 2 - 1)?;
        assert_eq!(f.store.config()?.version, c.version, "not yet");
        let t = c.valid_until - CONFIG_VALIDITY_S / 2 + 1;
        f.store.expire(t)?;
        let d = f.store.config()?;
        assert_eq!(
            (d.version, d.valid_until),
            (c.version + 1, t + CONFIG_VALIDITY_S)
        );
        assert_eq!(d.freshness(d.valid_until), Freshness::Fresh);
        assert_eq!(d.freshness(d.valid_until + 1), Freshness::Stale);
        assert_eq!(
            d.freshness(d.valid_until + STALE_BOUND_S + 1),
            Freshness::Expired
        );
        Ok(())
    }

    /// A renewal supersedes the previous certificate: it goes to the CRL
    /// [`SUPERSEDE_AFTER_S`] after the node first shows the new one, not
    /// before (its peers learn the new serial meanwhile), and without a
    /// Babel key rotation (the node is still a member).
    #[test]
    fn renewal_supersedes_the_old_certificate_once_the_new_one_is_used() -> Result<()> {
        let mut f = fixture()?;
        let (key, a) = join(&mut f.store, NOW)?;
        let later = NOW + 340 * 86_400;
        let node = authenticated(&mut f.store, &key, a.serial, later)?;
        let renewed = f.store.renew(&node, None, later)?;
        assert!(renewed.renewed);
        let hmac = f.store.hmac_keys()?;
        // The answer may be lost: the old certificate still authenticates
        // and a retry gets the new one.
        f.store.expire(later + 86_400)?;
        assert!(
            f.store.config()?.crl.is_empty(),
            "not before the node uses it"
        );
        let t = later + 86_400 + 1;
        let node = authenticated(&mut f.store, &key, a.serial, t)?;
        let again = f.store.renew(&node, None, t)?;
        assert_eq!((again.serial, again.renewed), (renewed.serial, false));
        f.store.expire(t + SUPERSEDE_AFTER_S)?;
        assert!(
            f.store.config()?.crl.is_empty(),
            "the old serial proves nothing"
        );
        let used = t + 10;
        authenticated(&mut f.store, &key, renewed.serial, used)?;
        f.store.expire(used + SUPERSEDE_AFTER_S - 1)?;
        assert!(f.store.config()?.crl.is_empty(), "peers get time to learn");
        f.store.expire(used + SUPERSEDE_AFTER_S)?;
        assert_eq!(f.store.config()?.crl, vec![a.serial]);
        assert_eq!(f.store.list_nodes()?.len(), 1, "still a member");
        assert_eq!(f.store.hmac_keys()?, hmac, "no Babel key rotation");
        assert!(matches!(
            authenticated(&mut f.store, &key, a.serial, used + SUPERSEDE_AFTER_S + 1),
            Err(Error::Forbidden(_))
        ));
        Ok(())
    }

    /// A node gets [`CERTS_PER_WINDOW`] certificates per [`CERT_WINDOW_S`];
    /// a renewal that changes nothing is answered with the current one.
    #[test]
    fn renewals_are_rate_limited_per_node() -> Result<()> {
        let mut f = fixture()?;
        let (key, a) = join(&mut f.store, NOW)?;
        let mut serial = a.serial;
        for (i, wg) in [[7; 32], [8; 32]].into_iter().enumerate() {
            let t = NOW + 10 + i as i64;
            let node = authenticated(&mut f.store, &key, serial, t)?;
            let r = f.store.renew(&node, Some(wg), t)?;
            assert!(r.renewed);
            serial = r.serial;
        }
        let node = authenticated(&mut f.store, &key, serial, NOW + 20)?;
        assert!(matches!(
            f.store.renew(&node, Some([9; 32]), NOW + 20),
            Err(Error::TooSoon(_))
        ));
        assert!(!f.store.renew(&node, None, NOW + 21)?.renewed);
        let t = NOW + 11 + CERT_WINDOW_S;
        let node = authenticated(&mut f.store, &key, serial, t)?;
        assert!(f.store.renew(&node, Some([9; 32]), t)?.renewed);
        Ok(())
    }

    /// No two live certificates of different nodes share a WireGuard key:
    /// not at join, not at renewal; a revoked holder frees it.
    #[test]
    fn a_wireguard_key_belongs_to_one_node() -> Result<()> {
        let mut f = fixture()?;
        let (key_a, a) = join(&mut f.store, NOW)?;
        let wg_a = wg_key_of(&key_a);
        let token = f.store.add_token(None, None, None, NOW)?;
        let key_b = generate_key()?;
        let csr_b = make_csr(&key_b)?;
        assert!(matches!(
            f.store.join(&token, &csr_b, wg_a, NOW),
            Err(Error::Conflict(_))
        ));
        let b = f.store.join(&token, &csr_b, wg_key_of(&key_b), NOW)?;
        let t = NOW + CERT_WINDOW_S;
        let node_b = authenticated(&mut f.store, &key_b, b.serial, t)?;
        assert!(matches!(
            f.store.renew(&node_b, Some(wg_a), t),
            Err(Error::Conflict(_))
        ));
        // Its own key again is fine (a renewal keeps it).
        let node_a = authenticated(&mut f.store, &key_a, a.serial, t)?;
        assert!(f.store.renew(&node_a, Some(wg_a), t + 340 * 86_400).is_ok());
        f.store.revoke(&RevokeTarget::Serial(a.serial), t + 1)?;
        let node_b = authenticated(&mut f.store, &key_b, b.serial, t + 2)?;
        assert!(f.store.renew(&node_b, Some(wg_a), t + 2)?.renewed);
        Ok(())
    }

    /// A revocation rotates the Babel keys to one the revoked node never
    /// fetched; housekeeping moves the rotation on phase by phase. During
    /// a rotation (whose new key it may know) another one follows.
    #[test]
    fn revocation_rotates_the_babel_keys() -> Result<()> {
        let mut f = fixture()?;
        let (_, a) = join(&mut f.store, NOW)?;
        let (_, b) = join(&mut f.store, NOW)?;
        let before = f.store.hmac_keys()?;
        f.store.revoke(&RevokeTarget::Serial(a.serial), NOW)?;
        let k = f.store.hmac_keys()?;
        let ids = |k: &HmacKeys| k.accept.iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!((k.sign.id, ids(&k)), (1, vec![1, 2]), "announced");
        assert_eq!(f.store.config()?.hmac_version, k.version);
        let phase = k.valid_until.unwrap_or_default();
        f.store.expire(phase - 1)?;
        assert_eq!(f.store.hmac_keys()?, k, "not before the phase ends");
        f.store.expire(phase)?;
        let k = f.store.hmac_keys()?;
        assert_eq!((k.sign.id, ids(&k)), (2, vec![2, 1]), "switched");
        f.store.expire(k.valid_until.unwrap_or_default())?;
        let k = f.store.hmac_keys()?;
        assert_eq!(
            (ids(&k), k.valid_until),
            (vec![2], None),
            "the old key is gone"
        );
        assert!(!before.accept.iter().any(|o| o.key == k.sign.key));

        // Revoked in the middle of a rotation: one more after it.
        f.store.rotate_hmac(NOW)?;
        f.store.revoke(&RevokeTarget::Serial(b.serial), NOW)?;
        let mid = f.store.hmac_keys()?;
        assert_eq!(ids(&mid), vec![2, 3], "the rotation under way goes on");
        let mut t = NOW;
        for _ in 0..6 {
            t += 3600;
            f.store.expire(t)?;
        }
        let k = f.store.hmac_keys()?;
        assert!(
            k.sign.id >= 4,
            "a key newer than the one b could fetch: {k:?}"
        );
        Ok(())
    }

    /// Revoking any valid serial of a renewed node revokes all of them.
    #[test]
    fn revoking_an_old_serial_revokes_the_renewed_one_too() -> Result<()> {
        let mut f = fixture()?;
        let (key, a) = join(&mut f.store, NOW)?;
        let later = NOW + 340 * 86_400;
        let h = sign_request(&key, a.serial, "POST", "/v1/renew", b"", later)?;
        let node = f.store.authenticate(
            &RequestAuth::parse(&h)?,
            "POST",
            "/v1/renew",
            b"",
            later,
            true,
        )?;
        let renewed = f.store.renew(&node, None, later)?;
        assert!(renewed.renewed);
        let mut revoked = f.store.revoke(&RevokeTarget::Serial(a.serial), later)?;
        revoked.sort_unstable();
        assert_eq!(revoked, vec![a.serial, renewed.serial]);
        assert!(f.store.list_nodes()?.is_empty());
        // An expired serial revokes nothing (its prefix may be another's).
        assert!(matches!(
            f.store
                .revoke(&RevokeTarget::Serial(a.serial), NOW + 2 * 365 * 86_400),
            Err(Error::NotFound(_))
        ));
        Ok(())
    }

    #[test]
    fn renewal_window_and_replay() -> Result<()> {
        let mut f = fixture()?;
        let (key, a) = join(&mut f.store, NOW)?;
        let h = sign_request(&key, a.serial, "POST", "/v1/renew", b"", NOW)?;
        let auth = RequestAuth::parse(&h)?;
        let node = f
            .store
            .authenticate(&auth, "POST", "/v1/renew", b"", NOW, true)?;
        assert!(matches!(
            f.store
                .authenticate(&auth, "POST", "/v1/renew", b"", NOW, true),
            Err(Error::Unauthenticated(_))
        ));
        let early = f.store.renew(&node, None, NOW)?;
        assert!(!early.renewed);
        assert_eq!(early.serial, a.serial);
        let later = NOW + 340 * 86_400;
        let renewed = f.store.renew(&node, None, later)?;
        assert!(renewed.renewed);
        assert!(renewed.serial > a.serial);
        assert_eq!(renewed.prefix, a.prefix);
        let c = f
            .store
            .ca()
            .cert()
            .verify_node(&renewed.cert, Some(later + 300 * 86_400))?;
        assert_eq!(c.wg_key, wg_key_of(&key));
        Ok(())
    }

    #[test]
    fn expired_nodes_free_their_prefix_after_the_grace_period() -> Result<()> {
        let mut f = fixture()?;
        let (_, a) = join(&mut f.store, NOW)?;
        f.store.expire(NOW + 400 * 86_400)?;
        assert_eq!(f.store.list_nodes()?.len(), 1, "still within grace");
        f.store.expire(NOW + 466 * 86_400)?;
        assert!(f.store.list_nodes()?.is_empty());
        let (_, b) = join(&mut f.store, NOW + 467 * 86_400)?;
        assert_eq!(a.prefix, b.prefix);
        Ok(())
    }

    #[test]
    fn peer_records_and_bootstrap() -> Result<()> {
        let mut f = fixture()?;
        let mut nodes = Vec::new();
        for i in 0..6u8 {
            let (key, issued) = join(&mut f.store, NOW)?;
            let cert = f.store.ca().cert().verify_node(&issued.cert, Some(NOW))?;
            let rec = PeerRecord {
                cert: issued.cert.clone(),
                endpoints: vec![format!("198.18.{i}.2:326")
                    .parse()
                    .map_err(|_| Error::Invalid("e".into()))?],
                nat: false,
                timestamp: NOW,
            };
            f.store
                .publish_peer(&cert, &SignedPeerRecord::sign(&rec, &key)?, NOW)?;
            nodes.push((key, cert, issued));
        }
        let me = nodes[0].1.prefix;
        for _ in 0..20 {
            let got = f.store.bootstrap(Some(me), NOW + 10)?;
            assert_eq!(got.len(), BOOTSTRAP_COUNT);
            for r in got {
                let (rec, _) = r.verify(f.store.ca().cert(), NOW + 10, &[])?;
                assert!(!rec.cert.contains(&nodes[0].2.cert));
                assert_ne!(rec.cert, nodes[0].2.cert);
            }
        }
        assert!(
            f.store.bootstrap(None, NOW + PEER_FRESH_S + 1)?.is_empty(),
            "stale records"
        );
        // Someone else's record cannot be published by another node.
        let rec = PeerRecord {
            cert: nodes[1].2.cert.clone(),
            endpoints: vec!["198.18.9.9:326"
                .parse()
                .map_err(|_| Error::Invalid("e".into()))?],
            nat: false,
            timestamp: NOW,
        };
        let signed = SignedPeerRecord::sign(&rec, &nodes[1].0)?;
        assert!(f.store.publish_peer(&nodes[2].1, &signed, NOW).is_err());
        Ok(())
    }

    #[test]
    fn config_changes_bump_the_version_and_hmac_rotates() -> Result<()> {
        let mut f = fixture()?;
        let v = f.store.config()?.version;
        let c = f.store.set_param("hello_interval_ms", "200", NOW)?;
        assert_eq!((c.hello_interval_ms, c.version), (200, v + 1));
        assert!(f.store.set_param("hello_interval_ms", "1", NOW).is_err());
        assert_eq!(f.store.config()?.version, v + 1);
        let k = f.store.rotate_hmac(NOW)?;
        assert_eq!(f.store.config()?.hmac_version, k.version);
        assert_eq!(f.store.hmac_keys()?, k);
        Ok(())
    }
}
