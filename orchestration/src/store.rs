//! The master's state in SQLite: nodes, the catalogue of descriptors,
//! instances (what was requested, where it runs, its status and connection
//! parameters) and the status history. Time is passed in.
//!
//! A request is idempotent: the same name and software again returns the
//! instance as it is; new parameters update it (its generation goes up, and
//! the agent redeploys it). Everything is checked before anything is
//! written, in one transaction: an unknown software, a bad parameter or an
//! unknown node leaves no trace.

use std::collections::BTreeMap;
use std::path::Path;

use ipnet::Ipv6Net;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::descriptor::{Descriptor, DescriptorError};
use crate::owner::{self, Refusal, Requester, Requesters};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request is wrong (4xx).
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this (403).
    #[error("{0}")]
    Forbidden(#[from] Refusal),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// Stored data does not parse.
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

impl From<DescriptorError> for StoreError {
    fn from(e: DescriptorError) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// Where to place a new instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The least-loaded node (fewest instances; then by name).
    Auto,
    /// This node.
    Node(String),
    /// The node with the lowest route metric to this prefix (as the nodes
    /// reported their routing).
    Near(Ipv6Net),
    /// N copies (2 or more), each on another site, least-loaded nodes
    /// first: `NAME` and `NAME.1` .. `NAME.{N-1}`.
    Copies(u32),
}

/// An instance as the master knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its name (unique).
    pub name: String,
    /// The software (descriptor name).
    pub software: String,
    /// Resolved parameters.
    pub params: BTreeMap<String, String>,
    /// The node it runs on.
    pub node: String,
    /// "started" or "destroyed" (what is wanted).
    pub state: String,
    /// What the agent reported: "pending", "starting", "ready", "failing", "stopped".
    pub status: String,
    /// Connection parameters the agent published.
    pub connection: BTreeMap<String, String>,
    /// Bumped at every change of parameters.
    pub generation: i64,
    /// Last change (unix seconds).
    pub updated_at: i64,
    /// The first copy's name when this is a further copy, else empty.
    #[serde(default)]
    pub copy_of: String,
    /// How many copies its group has (1: not copied).
    #[serde(default = "one")]
    pub copies: u32,
    /// Who requested it (and owns it).
    #[serde(default)]
    pub requester: Requester,
}

fn one() -> u32 {
    1
}

/// An agent's report on an instance.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Instance name.
    pub name: String,
    /// The generation the report is about.
    pub generation: i64,
    /// starting, ready, failing, stopped.
    pub status: String,
    /// Connection parameters.
    #[serde(default)]
    pub connection: BTreeMap<String, String>,
    /// Why, for people (e.g. what is missing on the node); kept in the
    /// instance's history.
    #[serde(default)]
    pub detail: String,
    /// The instance's public key (raw Ed25519, base64), which the agent
    /// made for it: the instance signs its own requests with it.
    #[serde(default)]
    pub key: String,
}

/// A node as the master knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Name.
    pub name: String,
    /// Its overlay prefix.
    pub prefix: String,
    /// Last time its agent called (unix seconds).
    pub last_seen: i64,
    /// The serial of the certificate its agent last greeted with.
    pub serial: u64,
    /// Its site (the agent's `--site`).
    pub site: String,
    /// Whether that certificate is revoked (the master fills this in).
    #[serde(default)]
    pub revoked: bool,
    /// Instances placed on it (not destroyed).
    pub instances: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS node(
    name TEXT PRIMARY KEY,
    prefix TEXT NOT NULL UNIQUE,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    routes TEXT NOT NULL DEFAULT '{}',
    serial INTEGER NOT NULL DEFAULT 0,
    site TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE TABLE IF NOT EXISTS catalog(
    software TEXT PRIMARY KEY,
    descriptor TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS instance(
    name TEXT PRIMARY KEY,
    software TEXT NOT NULL,
    params TEXT NOT NULL,
    node TEXT NOT NULL REFERENCES node(name),
    state TEXT NOT NULL,
    status TEXT NOT NULL,
    connection TEXT NOT NULL DEFAULT '{}',
    generation INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    copy_of TEXT NOT NULL DEFAULT '',
    copies INTEGER NOT NULL DEFAULT 1,
    requester TEXT NOT NULL DEFAULT 'operator',
    instance_key TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE TABLE IF NOT EXISTS history(
    instance TEXT NOT NULL,
    at INTEGER NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL
) STRICT;
";

fn json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn unjson<T: for<'a> Deserialize<'a>>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The K of a copy named `NAME.K` (0 for the first copy).
fn copy_index(name: &str) -> u32 {
    name.rsplit_once('.')
        .and_then(|(_, k)| k.parse().ok())
        .unwrap_or(0)
}

/// Names of instances and nodes: what a shell and a URL path take safely.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

/// Columns added since the first schema: (table, column, declaration).
const ADDED_COLUMNS: [(&str, &str, &str); 6] = [
    ("node", "serial", "INTEGER NOT NULL DEFAULT 0"),
    ("node", "site", "TEXT NOT NULL DEFAULT ''"),
    ("instance", "copy_of", "TEXT NOT NULL DEFAULT ''"),
    ("instance", "copies", "INTEGER NOT NULL DEFAULT 1"),
    ("instance", "requester", "TEXT NOT NULL DEFAULT 'operator'"),
    ("instance", "instance_key", "TEXT NOT NULL DEFAULT ''"),
];

/// Brings a database made by an earlier version to the current schema.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    for (table, column, decl) in ADDED_COLUMNS {
        let mut st = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let has = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .any(|c| c == column);
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

/// The master's database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    i64,
    String,
);

fn instance_of(r: Row) -> Result<Instance, StoreError> {
    Ok(Instance {
        name: r.0,
        software: r.1,
        params: unjson(&r.2)?,
        node: r.3,
        state: r.4,
        status: r.5,
        connection: unjson(&r.6)?,
        generation: r.7,
        updated_at: r.8,
        copy_of: r.9,
        copies: u32::try_from(r.10).unwrap_or(1),
        requester: Requester::try_from(r.11).map_err(StoreError::Corrupt)?,
    })
}

const INSTANCE_COLUMNS: &str =
    "name, software, params, node, state, status, connection, generation, updated_at, copy_of, copies,
     requester";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

impl Store {
    /// Opens (creating) the database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Self { conn })
    }

    /// Adds or replaces a descriptor in the catalogue (checked first).
    pub fn add_software(&mut self, text: &str) -> Result<String, StoreError> {
        let d = Descriptor::parse(text)?;
        self.conn.execute(
            "INSERT INTO catalog(software, descriptor) VALUES (?1, ?2)
             ON CONFLICT(software) DO UPDATE SET descriptor = ?2",
            params![d.name, text],
        )?;
        Ok(d.name)
    }

    /// A descriptor of the catalogue, as text.
    pub fn software_text(&self, name: &str) -> Result<String, StoreError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT descriptor FROM catalog WHERE software = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        text.ok_or_else(|| {
            StoreError::NotFound(format!(
                "unknown software {name:?}; the catalogue has: {}",
                self.catalog().unwrap_or_default().join(", ")
            ))
        })
    }

    /// A descriptor of the catalogue.
    pub fn software(&self, name: &str) -> Result<Descriptor, StoreError> {
        let text = self.software_text(name)?;
        Descriptor::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Names in the catalogue.
    pub fn catalog(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT software FROM catalog ORDER BY software")?;
        let v = st
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(v)
    }

    /// Registers a node (or refreshes it; a node keeps its name and prefix).
    pub fn register_node(
        &mut self,
        name: &str,
        prefix: Ipv6Net,
        serial: u64,
        site: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Invalid(format!("bad node name {name:?}")));
        }
        if !valid_name(site) {
            return Err(StoreError::Invalid(format!("bad site name {site:?}")));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let owner: Option<String> = tx
            .query_row(
                "SELECT name FROM node WHERE prefix = ?1",
                params![prefix.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        if owner.as_deref().is_some_and(|o| o != name) {
            return Err(StoreError::Invalid(format!(
                "prefix {prefix} belongs to another node"
            )));
        }
        let old: Option<String> = tx
            .query_row(
                "SELECT prefix FROM node WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        if old.as_deref().is_some_and(|o| o != prefix.to_string()) {
            return Err(StoreError::Invalid(format!(
                "node {name} is registered with another prefix"
            )));
        }
        tx.execute(
            "INSERT INTO node(name, prefix, registered_at, last_seen, serial, site)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET last_seen = ?3, serial = ?4, site = ?5",
            params![name, prefix.to_string(), now, serial as i64, site],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The node that owns `prefix` (how an agent's certificate maps to it).
    pub fn node_by_prefix(&self, prefix: Ipv6Net) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name FROM node WHERE prefix = ?1",
                params![prefix.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// An agent called (any authenticated call keeps it live).
    pub fn seen(&mut self, node: &str, now: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE node SET last_seen = ?1 WHERE name = ?2",
            params![now, node],
        )?;
        Ok(())
    }

    /// A node's view of routing: route metric per destination prefix.
    pub fn set_routes(
        &mut self,
        node: &str,
        routes: &BTreeMap<String, u16>,
        now: i64,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE node SET routes = ?1, last_seen = ?2 WHERE name = ?3",
            params![json(routes)?, now, node],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no node {node:?}")));
        }
        Ok(())
    }

    /// Registered nodes.
    pub fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT n.name, n.prefix, n.last_seen,
                    (SELECT COUNT(*) FROM instance i WHERE i.node = n.name AND i.state = 'started'),
                    n.serial, n.site
             FROM node n ORDER BY n.name",
        )?;
        let v = st
            .query_map([], |r| {
                Ok(Node {
                    name: r.get(0)?,
                    prefix: r.get(1)?,
                    last_seen: r.get(2)?,
                    instances: r.get(3)?,
                    serial: r.get::<_, i64>(4)? as u64,
                    site: r.get(5)?,
                    revoked: false,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// Where a new instance goes; nodes whose certificate is in `revoked`
    /// get nothing.
    fn place(&self, placement: &Placement, revoked: &[u64]) -> Result<String, StoreError> {
        let all = self.nodes()?;
        let out = |n: &Node| revoked.contains(&n.serial);
        let nodes: Vec<&Node> = all.iter().filter(|n| !out(n)).collect();
        match placement {
            Placement::Node(n) => match all.iter().find(|x| x.name == *n) {
                Some(x) if out(x) => Err(StoreError::Invalid(format!(
                    "node {n} is revoked (certificate {})",
                    x.serial
                ))),
                Some(x) => Ok(x.name.clone()),
                None => Err(StoreError::NotFound(format!("no node {n:?}"))),
            },
            // The first of the copies' nodes (`request` places them all).
            Placement::Copies(n) => Ok(self
                .copy_nodes(*n, revoked, &[])?
                .into_iter()
                .next()
                .unwrap_or_default()),
            Placement::Auto => nodes
                .iter()
                .min_by_key(|n| (n.instances, n.name.clone()))
                .map(|n| n.name.clone())
                .ok_or_else(|| StoreError::Invalid("no node is registered".into())),
            Placement::Near(prefix) => {
                let mut best: Option<(u32, String)> = None;
                let mut st = self
                    .conn
                    .prepare("SELECT name, prefix, routes, serial FROM node")?;
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)? as u64,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                for (name, own, routes, _) in rows.into_iter().filter(|r| !revoked.contains(&r.3)) {
                    let own: Option<Ipv6Net> = own.parse().ok();
                    // A node inside the prefix is at distance 0.
                    let metric = if own.is_some_and(|o| prefix.contains(&o.network())) {
                        Some(0)
                    } else {
                        let routes: BTreeMap<String, u16> = unjson(&routes)?;
                        routes
                            .iter()
                            .filter(|(p, _)| {
                                p.parse::<Ipv6Net>().is_ok_and(|p| {
                                    p.contains(&prefix.network()) || prefix.contains(&p.network())
                                })
                            })
                            .map(|(_, m)| u32::from(*m))
                            .min()
                    };
                    if let Some(m) = metric.filter(|m| *m < 0xFFFF) {
                        if best.as_ref().is_none_or(|(b, bn)| (m, &name) < (*b, bn)) {
                            best = Some((m, name));
                        }
                    }
                }
                best.map(|(_, n)| n)
                    .ok_or_else(|| StoreError::NotFound(format!("no node has a route to {prefix}")))
            }
        }
    }

    /// Requests an instance for `requester` (idempotent; see the module
    /// documentation): a new one it will own, or an update of one it owns.
    #[allow(clippy::too_many_arguments)] // each is one independent input of a request
    pub fn request(
        &mut self,
        requester: &Requester,
        name: &str,
        software: &str,
        given: &BTreeMap<String, String>,
        placement: &Placement,
        revoked: &[u64],
        now: i64,
    ) -> Result<Instance, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Invalid(format!(
                "bad instance name {name:?}: letters, digits, '-', '_', '.'"
            )));
        }
        let by = self.requesters()?;
        let destroyed = match requester {
            Requester::Instance(me) => self.instance(me)?.is_none_or(|i| i.state != "started"),
            Requester::Operator => false,
        };
        owner::may_request(requester, name, &by, destroyed)?;
        let d = self.software(software)?;
        let resolved = d.resolve(given)?;
        if let Some(cur) = self.instance(name)? {
            if cur.software != software {
                return Err(StoreError::Invalid(format!(
                    "{name} is an instance of {}, not {software}",
                    cur.software
                )));
            }
            if !cur.copy_of.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "{name} is a copy of {}: request {} instead",
                    cur.copy_of, cur.copy_of
                )));
            }
            let group = self.group(name)?;
            let have = u32::try_from(group.len()).unwrap_or(u32::MAX);
            let wanted = match placement {
                Placement::Copies(n) => *n,
                _ => have,
            };
            let same = group
                .iter()
                .all(|i| i.state == "started" && i.params == resolved);
            if same && wanted == have {
                return Ok(cur);
            }
            if let Placement::Node(n) = placement {
                if *n != cur.node {
                    return Err(StoreError::Invalid(format!(
                        "{name} runs on {}; moving instances is not supported",
                        cur.node
                    )));
                }
            }
            // Everything is decided before anything is written: a group
            // that cannot grow is left as it is.
            let added = if wanted > have {
                self.new_copies(name, &group, wanted - have, revoked)?
            } else {
                Vec::new()
            };
            let mut removed: Vec<&Instance> =
                group.iter().filter(|i| !i.copy_of.is_empty()).collect();
            removed.sort_by_key(|i| (i.status == "ready", std::cmp::Reverse(copy_index(&i.name))));
            removed.truncate(have.saturating_sub(wanted) as usize);
            let tx = self.conn.transaction()?;
            let log = |tx: &rusqlite::Transaction<'_>, n: &str, status: &str, detail: &str| {
                tx.execute(
                    "INSERT INTO history(instance, at, status, detail) VALUES (?1, ?2, ?3, ?4)",
                    params![n, now, status, detail],
                )
            };
            if !same {
                for i in &group {
                    tx.execute(
                        "UPDATE instance SET params = ?1, state = 'started', status = 'pending',
                            generation = generation + 1, updated_at = ?2 WHERE name = ?3",
                        params![json(&resolved)?, now, i.name],
                    )?;
                    log(&tx, &i.name, "pending", "parameters changed")?;
                }
            }
            // A removed copy leaves the group at once (its peers, the
            // group's view and re-placement no longer see it) and goes
            // like any destroyed instance.
            for i in &removed {
                tx.execute(
                    "UPDATE instance SET state = 'destroyed', copy_of = '', copies = 1,
                        updated_at = ?1 WHERE name = ?2",
                    params![now, i.name],
                )?;
                log(
                    &tx,
                    &i.name,
                    "destroying",
                    &format!("{name} down to {wanted} copies"),
                )?;
            }
            for (n, node) in &added {
                tx.execute(
                    "INSERT INTO instance(name, software, params, node, state, status, generation,
                        updated_at, copy_of, copies, requester)
                     VALUES (?1, ?2, ?3, ?4, 'started', 'pending', 1, ?5, ?6, ?7, ?8)",
                    params![
                        n,
                        software,
                        json(&resolved)?,
                        node,
                        now,
                        name,
                        wanted,
                        cur.requester.to_string()
                    ],
                )?;
                log(
                    &tx,
                    n,
                    "pending",
                    &format!("{name} up to {wanted} copies: on {node}"),
                )?;
            }
            tx.execute(
                "UPDATE instance SET copies = ?1 WHERE name = ?2 OR copy_of = ?2",
                params![wanted, name],
            )?;
            tx.commit()?;
        } else {
            let (nodes, copies) = match placement {
                Placement::Copies(n) => (self.copy_nodes(*n, revoked, &[])?, *n),
                other => (vec![self.place(other, revoked)?], 1),
            };
            let names: Vec<String> = (0..copies)
                .map(|k| match k {
                    0 => name.to_string(),
                    k => format!("{name}.{k}"),
                })
                .collect();
            for n in &names[1..] {
                if !valid_name(n) || self.instance(n)?.is_some() {
                    return Err(StoreError::Invalid(format!(
                        "copy name {n:?} is not free: choose a shorter or another name"
                    )));
                }
            }
            let tx = self.conn.transaction()?;
            for (k, (n, node)) in names.iter().zip(&nodes).enumerate() {
                let copy_of = if k == 0 { "" } else { name };
                tx.execute(
                    "INSERT INTO instance(name, software, params, node, state, status, generation,
                        updated_at, copy_of, copies, requester)
                     VALUES (?1, ?2, ?3, ?4, 'started', 'pending', 1, ?5, ?6, ?7, ?8)",
                    params![
                        n,
                        software,
                        json(&resolved)?,
                        node,
                        now,
                        copy_of,
                        copies,
                        requester.to_string()
                    ],
                )?;
                tx.execute(
                    "INSERT INTO history(instance, at, status, detail) VALUES (?1, ?2, 'pending', ?3)",
                    params![n, now, format!("requested on {node}")],
                )?;
            }
            tx.commit()?;
        }
        self.instance(name)?
            .ok_or_else(|| StoreError::Corrupt(format!("{name} vanished")))
    }

    /// `count` more copies for the group of `name`: (name, node) each, on
    /// sites none of the group is on, with the lowest free `NAME.K` names.
    fn new_copies(
        &self,
        name: &str,
        group: &[Instance],
        count: u32,
        revoked: &[u64],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let nodes = self.nodes()?;
        let avoid: Vec<String> = group
            .iter()
            .filter_map(|i| nodes.iter().find(|n| n.name == i.node))
            .map(|n| n.site.clone())
            .collect();
        let placed = self.copy_nodes(count, revoked, &avoid)?;
        let mut names = Vec::new();
        let mut k = 1;
        while names.len() < placed.len() {
            let n = format!("{name}.{k}");
            if !valid_name(&n) {
                return Err(StoreError::Invalid(format!(
                    "copy name {n:?} is not valid: choose a shorter name"
                )));
            }
            if self.instance(&n)?.is_none() {
                names.push(n);
            }
            k += 1;
        }
        Ok(names.into_iter().zip(placed).collect())
    }

    /// An instance and its further copies, first copy first.
    pub fn group(&self, name: &str) -> Result<Vec<Instance>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instance WHERE name = ?1 OR copy_of = ?1
             ORDER BY copy_of != '', length(name), name"
        ))?;
        let rows = st
            .query_map(params![name], read_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(instance_of).collect()
    }

    /// `n` nodes on `n` distinct sites, none revoked and none on a site of
    /// `avoid`: the least-loaded node of each site, least-loaded sites first.
    fn copy_nodes(
        &self,
        n: u32,
        revoked: &[u64],
        avoid: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.copy_nodes_among(n, revoked, avoid, i64::MIN)
    }

    fn copy_nodes_among(
        &self,
        n: u32,
        revoked: &[u64],
        avoid: &[String],
        live_since: i64,
    ) -> Result<Vec<String>, StoreError> {
        let nodes = self.nodes()?;
        let mut best: BTreeMap<&str, &Node> = BTreeMap::new();
        for node in nodes.iter().filter(|x| {
            !revoked.contains(&x.serial) && x.last_seen >= live_since && !avoid.contains(&x.site)
        }) {
            let site = node.site.as_str();
            if best
                .get(site)
                .is_none_or(|b| (node.instances, &node.name) < (b.instances, &b.name))
            {
                best.insert(site, node);
            }
        }
        let mut sites: Vec<&Node> = best.into_values().collect();
        sites.sort_by(|a, b| (a.instances, &a.name).cmp(&(b.instances, &b.name)));
        if sites.len() < n as usize {
            let have: Vec<&str> = sites.iter().map(|x| x.site.as_str()).collect();
            return Err(StoreError::Invalid(format!(
                "{n} copies need {n} sites; {} {} available ({})",
                have.len(),
                if have.len() == 1 { "is" } else { "are" },
                have.join(", ")
            )));
        }
        Ok(sites
            .into_iter()
            .take(n as usize)
            .map(|x| x.name.clone())
            .collect())
    }

    /// Moves each copy whose node is revoked or silent since before
    /// `live_since` to a live node of a site no other copy of its group is
    /// on (live or not). Returns (copy, from, to) for each move.
    pub fn replace_lost_copies(
        &mut self,
        live_since: i64,
        revoked: &[u64],
        now: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let nodes = self.nodes()?;
        let node = |name: &str| nodes.iter().find(|n| n.name == name);
        let alive = |name: &str| {
            node(name).is_some_and(|n| n.last_seen >= live_since && !revoked.contains(&n.serial))
        };
        let firsts: Vec<Instance> = self
            .instances(None)?
            .into_iter()
            .filter(|i| i.copies > 1 && i.copy_of.is_empty() && i.state == "started")
            .collect();
        let mut moves = Vec::new();
        for first in firsts {
            let group = self.group(&first.name)?;
            for lost in group.iter().filter(|i| !alive(&i.node)) {
                // Every other copy's site, live or not: a lost copy that
                // comes back must not find a second copy on its site.
                let mut avoid: Vec<String> = self
                    .group(&first.name)?
                    .iter()
                    .filter(|i| i.name != lost.name)
                    .filter_map(|i| node(&i.node).map(|n| n.site.clone()))
                    .collect();
                if let Some(n) = node(&lost.node) {
                    avoid.push(n.site.clone());
                }
                let Ok(to) = self.copy_nodes_among(1, revoked, &avoid, live_since) else {
                    continue;
                };
                let to = to.into_iter().next().unwrap_or_default();
                self.conn.execute(
                    "UPDATE instance SET node = ?1, status = 'pending', connection = '{}',
                        instance_key = '', generation = generation + 1, updated_at = ?2
                     WHERE name = ?3",
                    params![to, now, lost.name],
                )?;
                let silent = node(&lost.node).map_or(0, |n| now - n.last_seen);
                self.log(
                    &lost.name,
                    now,
                    "pending",
                    &format!(
                        "re-placed from {} (silent for {silent} s or revoked) to {to}",
                        lost.node
                    ),
                )?;
                moves.push((lost.name.clone(), lost.node.clone(), to));
            }
        }
        Ok(moves)
    }

    /// Forgets destroyed instances whose node is revoked or silent since
    /// before `live_since`: their agent cannot report them stopped, and
    /// their names would stay taken. An agent that comes back stops and
    /// wipes what its signed list no longer names. Returns (instance, node).
    pub fn forget_lost_destroyed(
        &mut self,
        live_since: i64,
        revoked: &[u64],
        now: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let nodes = self.nodes()?;
        let lost: Vec<(String, String)> = self
            .instances(None)?
            .into_iter()
            .filter(|i| i.state == "destroyed")
            .filter(|i| {
                nodes
                    .iter()
                    .find(|n| n.name == i.node)
                    .is_none_or(|n| n.last_seen < live_since || revoked.contains(&n.serial))
            })
            .map(|i| (i.name, i.node))
            .collect();
        for (name, node) in &lost {
            self.conn
                .execute("DELETE FROM instance WHERE name = ?1", params![name])?;
            self.log(
                name,
                now,
                "destroyed",
                &format!("forgotten: its node {node} is silent or revoked"),
            )?;
        }
        Ok(lost)
    }

    fn log(&self, instance: &str, at: i64, status: &str, detail: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO history(instance, at, status, detail) VALUES (?1, ?2, ?3, ?4)",
            params![instance, at, status, detail],
        )?;
        Ok(())
    }

    /// An instance by name.
    pub fn instance(&self, name: &str) -> Result<Option<Instance>, StoreError> {
        let r = self
            .conn
            .query_row(
                &format!("SELECT {INSTANCE_COLUMNS} FROM instance WHERE name = ?1"),
                params![name],
                read_row,
            )
            .optional()?;
        r.map(instance_of).transpose()
    }

    /// Every instance (or those of one node), by name.
    pub fn instances(&self, node: Option<&str>) -> Result<Vec<Instance>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instance WHERE ?1 IS NULL OR node = ?1 ORDER BY name"
        ))?;
        let rows = st
            .query_map(params![node], read_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(instance_of).collect()
    }

    /// The requester of every instance.
    pub fn requesters(&self) -> Result<Requesters, StoreError> {
        let mut st = self.conn.prepare("SELECT name, requester FROM instance")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(n, r)| Ok((n, Requester::try_from(r).map_err(StoreError::Corrupt)?)))
            .collect()
    }

    /// Asks, for `requester`, that an instance be destroyed with every
    /// instance it owns (each agent stops its own, then reports "stopped"
    /// and the instance is forgotten).
    pub fn destroy(
        &mut self,
        requester: &Requester,
        name: &str,
        now: i64,
    ) -> Result<Instance, StoreError> {
        let cur = self
            .instance(name)?
            .ok_or_else(|| StoreError::NotFound(format!("no instance {name:?}")))?;
        let by = self.requesters()?;
        owner::may_destroy(requester, name, &by)?;
        if !cur.copy_of.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{name} is a copy of {}: destroy {} instead",
                cur.copy_of, cur.copy_of
            )));
        }
        let group: Vec<Requester> = self
            .group(name)?
            .into_iter()
            .map(|i| Requester::Instance(i.name))
            .collect();
        let doomed: Vec<&String> = by
            .keys()
            .filter(|n| {
                group
                    .iter()
                    .any(|g| *g == Requester::Instance(n.to_string()) || owner::owns(g, n, &by))
            })
            .collect();
        let tx = self.conn.transaction()?;
        for n in doomed {
            let changed = tx.execute(
                "UPDATE instance SET state = 'destroyed', updated_at = ?1
                 WHERE name = ?2 AND state != 'destroyed'",
                params![now, n],
            )?;
            if changed > 0 {
                let why = match by.get(n.as_str()) {
                    Some(Requester::Instance(r))
                        if !group.contains(&Requester::Instance(n.clone())) =>
                    {
                        format!("destroy requested: its requester {r} is destroyed")
                    }
                    _ => format!("destroy requested by {requester}"),
                };
                tx.execute(
                    "INSERT INTO history(instance, at, status, detail) VALUES (?1, ?2, 'destroying', ?3)",
                    params![n, now, why],
                )?;
            }
        }
        tx.commit()?;
        self.instance(name)?
            .ok_or_else(|| StoreError::Corrupt(format!("{name} vanished")))
    }

    /// What authenticates an instance's own requests: the prefix of the
    /// node it runs on, the public key its agent reported (empty until
    /// then) and whether it is started.
    pub fn instance_credentials(
        &self,
        name: &str,
    ) -> Result<Option<(Ipv6Net, String, bool)>, StoreError> {
        let r = self
            .conn
            .query_row(
                "SELECT node.prefix, instance.instance_key, instance.state FROM instance
                 JOIN node ON node.name = instance.node WHERE instance.name = ?1",
                params![name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()?;
        r.map(|(prefix, key, state)| {
            let prefix = prefix
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("node prefix {prefix:?}")))?;
            Ok((prefix, key, state == "started"))
        })
        .transpose()
    }

    /// An agent's report on one of its instances. Reports from another node
    /// are refused; "stopped" for a destroyed instance removes it.
    pub fn report(&mut self, node: &str, r: &Report, now: i64) -> Result<(), StoreError> {
        let (name, generation, status, connection, detail) = (
            &r.name,
            r.generation,
            r.status.as_str(),
            &r.connection,
            &r.detail,
        );
        if !["starting", "ready", "failing", "stopped"].contains(&status) {
            return Err(StoreError::Invalid(format!("unknown status {status:?}")));
        }
        if !r.key.is_empty() && crate::instance_key::public_key(&r.key).is_none() {
            return Err(StoreError::Invalid(
                "key: base64 of a raw Ed25519 public key".into(),
            ));
        }
        let cur = self
            .instance(name)?
            .ok_or_else(|| StoreError::NotFound(format!("no instance {name:?}")))?;
        if cur.node != node {
            return Err(StoreError::Invalid(format!("{name} is not on {node}")));
        }
        if generation != cur.generation {
            // A report about parameters that were since changed: ignore it.
            return Ok(());
        }
        if !r.key.is_empty() {
            self.conn.execute(
                "UPDATE instance SET instance_key = ?1 WHERE name = ?2",
                params![r.key, name],
            )?;
        }
        if cur.state == "destroyed" && status == "stopped" {
            self.conn
                .execute("DELETE FROM instance WHERE name = ?1", params![name])?;
            self.log(name, now, "destroyed", "stopped by its agent")?;
            return Ok(());
        }
        if cur.status != status || cur.connection != *connection {
            self.conn.execute(
                "UPDATE instance SET status = ?1, connection = ?2, updated_at = ?3 WHERE name = ?4",
                params![status, json(connection)?, now, name],
            )?;
            let detail = if detail.is_empty() {
                "reported by the agent"
            } else {
                detail
            };
            self.log(name, now, status, detail)?;
        }
        Ok(())
    }

    /// The status history of an instance, oldest first: (at, status, detail).
    pub fn history(&self, name: &str) -> Result<Vec<(i64, String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT at, status, detail FROM history WHERE instance = ?1 ORDER BY rowid")?;
        let v = st
            .query_map(params![name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: Requester = Requester::Operator;

    const HTTP: &str = r#"
name = "http-static"
command = ["re6st-orch", "serve-static", "--listen", "[{address}]:{port}"]
[parameters.port]
type = "port"
default = 8080
[connection]
url = "http://[{address}]:{port}/"
"#;

    struct Db(std::path::PathBuf, Store);

    impl Drop for Db {
        fn drop(&mut self) {
            for ext in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{ext}", self.0.display()));
            }
        }
    }

    fn db(tag: &str) -> Db {
        let path = std::env::temp_dir().join(format!("orch-{}-{tag}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut s = Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
        s.add_software(HTTP).unwrap_or_else(|e| panic!("{e}"));
        for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
            let p: Ipv6Net = format!("fd5e:5e:0:{}::/64", i + 1)
                .parse()
                .unwrap_or_default();
            s.register_node(n, p, i as u64 + 1, &format!("site-{i}"), 100)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Db(path, s)
    }

    fn rep(
        name: &str,
        generation: i64,
        status: &str,
        connection: &BTreeMap<String, String>,
    ) -> Report {
        Report {
            name: name.into(),
            generation,
            status: status.into(),
            connection: connection.clone(),
            detail: String::new(),
            key: String::new(),
        }
    }

    fn kv(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn requests_are_idempotent_and_parameters_update() {
        let mut d = db("idem");
        let s = &mut d.1;
        let a = s.request(
            &OP,
            "web",
            "http-static",
            &kv(&[]),
            &Placement::Auto,
            &[],
            1,
        );
        let Ok(a) = a else { panic!("{a:?}") };
        assert_eq!(
            (a.node.as_str(), a.generation, a.params["port"].as_str()),
            ("n1", 1, "8080")
        );
        let again = s.request(
            &OP,
            "web",
            "http-static",
            &kv(&[]),
            &Placement::Auto,
            &[],
            2,
        );
        assert_eq!(again.as_ref().ok(), Some(&a), "same request, same answer");
        let b = s.request(
            &OP,
            "web",
            "http-static",
            &kv(&[("port", "81")]),
            &Placement::Auto,
            &[],
            3,
        );
        assert!(
            matches!(&b, Ok(b) if b.generation == 2 && b.node == "n1" && b.status == "pending")
        );
        // Least loaded next.
        let c = s.request(
            &OP,
            "web2",
            "http-static",
            &kv(&[]),
            &Placement::Auto,
            &[],
            4,
        );
        assert!(matches!(&c, Ok(c) if c.node == "n2"), "{c:?}");
    }

    #[test]
    fn bad_requests_leave_nothing() {
        let mut d = db("bad");
        let s = &mut d.1;
        let cases = [
            s.request(&OP, "x", "mariadb", &kv(&[]), &Placement::Auto, &[], 1)
                .err(),
            s.request(
                &OP,
                "x",
                "http-static",
                &kv(&[("port", "http")]),
                &Placement::Auto,
                &[],
                1,
            )
            .err(),
            s.request(
                &OP,
                "x",
                "http-static",
                &kv(&[("colour", "red")]),
                &Placement::Auto,
                &[],
                1,
            )
            .err(),
            s.request(
                &OP,
                "x",
                "http-static",
                &kv(&[]),
                &Placement::Node("n9".into()),
                &[],
                1,
            )
            .err(),
            s.request(
                &OP,
                "../x",
                "http-static",
                &kv(&[]),
                &Placement::Auto,
                &[],
                1,
            )
            .err(),
        ];
        let texts: Vec<String> = cases.iter().map(|e| format!("{e:?}")).collect();
        for (e, want) in texts.iter().zip([
            "unknown software",
            "not a port",
            "unknown",
            "no node",
            "bad instance name",
        ]) {
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(s.instances(None).map(|v| v.len()).ok(), Some(0));
    }

    #[test]
    fn revoked_nodes_get_no_new_instance() {
        let mut d = db("revoked");
        let s = &mut d.1;
        // n1 has serial 1: revoked.
        let placed = |s: &mut Store, name: &str, placement: &Placement| {
            s.request(&OP, name, "http-static", &kv(&[]), placement, &[1], 1)
                .map(|i| i.node)
        };
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let node = placed(s, name, &Placement::Auto);
            assert!(matches!(node.as_deref(), Ok("n2" | "n3")), "{i}: {node:?}");
        }
        let refused = placed(s, "e", &Placement::Node("n1".into()));
        assert!(
            matches!(&refused, Err(StoreError::Invalid(m)) if m.contains("n1 is revoked")),
            "{refused:?}"
        );
        let near = placed(
            s,
            "f",
            &Placement::Near("fd5e:5e:0:1::/64".parse().unwrap_or_default()),
        );
        assert!(near.is_err(), "only n1 is near its own prefix: {near:?}");
        assert_eq!(s.instance("e").ok().flatten(), None, "nothing written");
    }

    #[test]
    fn copies_go_to_distinct_sites_and_move_when_a_site_is_lost() {
        let mut d = db("copies");
        let s = &mut d.1;
        let cache = s
            .request(
                &OP,
                "cache",
                "http-static",
                &kv(&[]),
                &Placement::Copies(3),
                &[],
                100,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cache.copies, 3);
        let group = s.group("cache").unwrap_or_default();
        let names: Vec<&str> = group.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["cache", "cache.1", "cache.2"]);
        let mut nodes: Vec<&str> = group.iter().map(|i| i.node.as_str()).collect();
        nodes.sort_unstable();
        assert_eq!(nodes, ["n1", "n2", "n3"], "one copy per site");
        let again = s.request(
            &OP,
            "cache",
            "http-static",
            &kv(&[]),
            &Placement::Copies(3),
            &[],
            101,
        );
        assert_eq!(again.map(|i| i.generation).ok(), Some(1), "idempotent");
        let more = s.request(
            &OP,
            "big",
            "http-static",
            &kv(&[]),
            &Placement::Copies(4),
            &[],
            101,
        );
        assert!(
            matches!(&more, Err(StoreError::Invalid(m)) if m.contains("4 copies need 4 sites; 3 are available")),
            "{more:?}"
        );
        assert_eq!(s.instance("big").ok().flatten(), None, "nothing written");
        assert!(
            s.destroy(&OP, "cache.1", 101).is_err(),
            "copies go with their group"
        );

        // n3's site goes silent; a fourth site appears.
        let p4: Ipv6Net = "fd5e:5e:0:4::/64".parse().unwrap_or_default();
        s.register_node("n4", p4, 4, "site-3", 200)
            .unwrap_or_else(|e| panic!("{e}"));
        for (n, i) in [("n1", 1), ("n2", 2)] {
            let p: Ipv6Net = format!("fd5e:5e:0:{i}::/64").parse().unwrap_or_default();
            s.register_node(n, p, i, &format!("site-{}", i - 1), 200)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let moves = s.replace_lost_copies(150, &[], 200).unwrap_or_default();
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].1.as_str(), moves[0].2.as_str()), ("n3", "n4"));
        let moved = s.instance(&moves[0].0).ok().flatten();
        assert!(
            matches!(&moved, Some(i) if i.node == "n4" && i.generation == 2 && i.status == "pending"),
            "{moved:?}"
        );
        assert!(
            s.replace_lost_copies(150, &[], 201)
                .unwrap_or_default()
                .is_empty(),
            "settled"
        );
        // Nowhere to go: the copy stays where it is.
        let moves = s.replace_lost_copies(250, &[], 300).unwrap_or_default();
        assert!(moves.is_empty(), "no live site: {moves:?}");

        let _ = s.destroy(&OP, "cache", 301);
        assert!(s
            .group("cache")
            .unwrap_or_default()
            .iter()
            .all(|i| i.state == "destroyed"));
    }

    #[test]
    fn a_copy_never_moves_to_the_site_of_another_even_lost_copy() {
        let mut d = db("two-lost");
        let s = &mut d.1;
        let _ = s.request(
            &OP,
            "cache",
            "http-static",
            &kv(&[]),
            &Placement::Copies(3),
            &[],
            100,
        );
        // Another node on n2's site; then n2 and n3 (sites 1 and 2) go silent.
        let p: Ipv6Net = "fd5e:5e:0:9::/64".parse().unwrap_or_default();
        s.register_node("n2b", p, 9, "site-1", 200)
            .unwrap_or_else(|e| panic!("{e}"));
        let p1: Ipv6Net = "fd5e:5e:0:1::/64".parse().unwrap_or_default();
        s.register_node("n1", p1, 1, "site-0", 200)
            .unwrap_or_else(|e| panic!("{e}"));
        let moves = s.replace_lost_copies(150, &[], 200).unwrap_or_default();
        assert!(
            moves.is_empty(),
            "n3's copy must not join n2's site, where n2's copy will come back: {moves:?}"
        );
    }

    #[test]
    fn a_database_of_the_first_schema_is_migrated() {
        let path = std::env::temp_dir().join(format!("orch-{}-migrate.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let c = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            c.execute_batch(
                "CREATE TABLE node(name TEXT PRIMARY KEY, prefix TEXT NOT NULL UNIQUE,
                    registered_at INTEGER NOT NULL, last_seen INTEGER NOT NULL,
                    routes TEXT NOT NULL DEFAULT '{}') STRICT;
                 INSERT INTO node(name, prefix, registered_at, last_seen)
                    VALUES ('old', 'fd5e:5e:0:9::/64', 1, 1);",
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let s = Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let nodes = s.nodes().unwrap_or_default();
        assert_eq!(nodes.len(), 1);
        assert_eq!((nodes[0].serial, nodes[0].site.as_str()), (0, ""));
        drop(s);
        assert!(Store::open(&path).is_ok(), "migrating twice is harmless");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn near_places_by_reported_route_metric() {
        let mut d = db("near");
        let s = &mut d.1;
        let target: Ipv6Net = "fd5e:5e:0:9::/64".parse().unwrap_or_default();
        let r =
            |m: u16| -> BTreeMap<String, u16> { [(target.to_string(), m)].into_iter().collect() };
        let _ = s.set_routes("n1", &r(900), 5);
        let _ = s.set_routes("n2", &r(200), 5);
        let _ = s.set_routes("n3", &r(0xFFFF), 5);
        let i = s.request(
            &OP,
            "db",
            "http-static",
            &kv(&[]),
            &Placement::Near(target),
            &[],
            6,
        );
        assert!(matches!(&i, Ok(i) if i.node == "n2"), "{i:?}");
        let own: Ipv6Net = "fd5e:5e:0:3::/64".parse().unwrap_or_default();
        let j = s.request(
            &OP,
            "db2",
            "http-static",
            &kv(&[]),
            &Placement::Near(own),
            &[],
            6,
        );
        assert!(
            matches!(&j, Ok(j) if j.node == "n3"),
            "a node inside the prefix: {j:?}"
        );
        let none: Ipv6Net = "fd5e:5e:0:77::/64".parse().unwrap_or_default();
        assert!(s
            .request(
                &OP,
                "db3",
                "http-static",
                &kv(&[]),
                &Placement::Near(none),
                &[],
                6
            )
            .is_err());
    }

    #[test]
    fn reports_destroy_and_persistence() {
        let mut d = db("report");
        let path = d.0.clone();
        let s = &mut d.1;
        let _ = s.request(
            &OP,
            "web",
            "http-static",
            &kv(&[]),
            &Placement::Node("n2".into()),
            &[],
            1,
        );
        let url = kv(&[("url", "http://[fd5e:5e:0:2::1]:8080/")]);
        assert!(
            s.report("n1", &rep("web", 1, "ready", &url), 2).is_err(),
            "wrong node"
        );
        assert!(s.report("n2", &rep("web", 1, "bogus", &url), 2).is_err());
        let mut why = rep("web", 1, "failing", &url);
        why.detail = "software \"x\" is not in this node's catalogue".into();
        assert!(s.report("n2", &why, 2).is_ok());
        let h = s.history("web").unwrap_or_default();
        assert_eq!(h.last().map(|x| x.2.as_str()), Some(why.detail.as_str()));
        assert!(s.report("n2", &rep("web", 1, "ready", &url), 2).is_ok());
        let reopened = Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let w = reopened.instance("web").ok().flatten();
        assert!(
            matches!(&w, Some(w) if w.status == "ready" && w.connection == url),
            "{w:?}"
        );
        // A stale generation's report is ignored.
        let _ = s.request(
            &OP,
            "web",
            "http-static",
            &kv(&[("port", "81")]),
            &Placement::Auto,
            &[],
            3,
        );
        let _ = s.report("n2", &rep("web", 1, "failing", &url), 4);
        assert_eq!(
            s.instance("web").ok().flatten().map(|w| w.status),
            Some("pending".into())
        );
        let _ = s.destroy(&OP, "web", 5);
        let _ = s.report("n2", &rep("web", 2, "stopped", &BTreeMap::new()), 6);
        assert_eq!(s.instance("web").ok().flatten(), None);
        let h = s.history("web").unwrap_or_default();
        assert_eq!(h.last().map(|x| x.1.as_str()), Some("destroyed"), "{h:?}");
    }

    #[test]
    fn instances_own_their_children_and_take_them_down() {
        let mut d = db("owner");
        let s = &mut d.1;
        let on = |n: &str| Placement::Node(n.into());
        let web = Requester::Instance("web".into());
        let other = Requester::Instance("other".into());
        for name in ["web", "other"] {
            s.request(&OP, name, "http-static", &kv(&[]), &on("n1"), &[], 1)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let db = s
            .request(&web, "db", "http-static", &kv(&[]), &on("n2"), &[], 2)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(db.requester, web);
        let child = Requester::Instance("db".into());
        s.request(&child, "backup", "http-static", &kv(&[]), &on("n3"), &[], 2)
            .unwrap_or_else(|e| panic!("{e}"));
        // Nobody else may update, take or destroy them.
        let update = kv(&[("port", "81")]);
        for (who, name) in [(&other, "db"), (&web, "other"), (&child, "web")] {
            let r = s.request(who, name, "http-static", &update, &Placement::Auto, &[], 3);
            assert!(
                matches!(r, Err(StoreError::Forbidden(_))),
                "{who} {name}: {r:?}"
            );
            let r = s.destroy(who, name, 3);
            assert!(
                matches!(r, Err(StoreError::Forbidden(_))),
                "{who} {name}: {r:?}"
            );
        }
        assert!(matches!(
            s.destroy(&web, "web", 3),
            Err(StoreError::Forbidden(Refusal::Itself(_)))
        ));
        assert_eq!(
            s.instance("db").ok().flatten().map(|i| i.generation),
            Some(1)
        );
        // The owner may update its grandchild.
        let b = s
            .request(
                &web,
                "backup",
                "http-static",
                &update,
                &Placement::Auto,
                &[],
                3,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((b.generation, b.requester), (2, child.clone()));
        // A destroyed instance requests nothing more; destroying web takes
        // db and backup with it, and leaves other alone.
        s.destroy(&OP, "web", 4).unwrap_or_else(|e| panic!("{e}"));
        let states: Vec<(String, String)> = s
            .instances(None)
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i.name, i.state))
            .collect();
        assert_eq!(
            states,
            [
                ("backup".into(), "destroyed".into()),
                ("db".into(), "destroyed".into()),
                ("other".into(), "started".into()),
                ("web".into(), "destroyed".into()),
            ]
        );
        let h = s.history("backup").unwrap_or_default();
        assert!(
            h.last()
                .is_some_and(|x| x.2.contains("its requester db is destroyed")),
            "{h:?}"
        );
        let r = s.request(
            &web,
            "late",
            "http-static",
            &kv(&[]),
            &Placement::Auto,
            &[],
            5,
        );
        assert!(
            matches!(r, Err(StoreError::Forbidden(Refusal::Destroyed(_)))),
            "{r:?}"
        );
        assert_eq!(s.instance("late").ok().flatten(), None);
        // Children count against a quota.
        for k in 0..crate::owner::MAX_CHILDREN {
            s.request(
                &other,
                &format!("c{k}"),
                "http-static",
                &kv(&[]),
                &Placement::Auto,
                &[],
                6,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let r = s.request(
            &other,
            "c99",
            "http-static",
            &kv(&[]),
            &Placement::Auto,
            &[],
            6,
        );
        assert!(
            matches!(r, Err(StoreError::Forbidden(Refusal::TooManyChildren(_)))),
            "{r:?}"
        );
    }

    #[test]
    fn the_reported_key_authenticates_the_instance_until_it_moves() {
        let mut d = db("key");
        let s = &mut d.1;
        let _ = s.request(
            &OP,
            "kv",
            "http-static",
            &kv(&[]),
            &Placement::Copies(2),
            &[],
            1,
        );
        let group = s.group("kv").unwrap_or_default();
        let first = group.first().map(|i| i.node.clone()).unwrap_or_default();
        let (key, _) = crate::instance_key::generate()
            .map_or_else(|e| panic!("{e:#}"), |(_, public)| (public, ()));
        let mut r = rep("kv", 1, "starting", &BTreeMap::new());
        r.key = "AAAA".into();
        assert!(s.report(&first, &r, 2).is_err(), "not a public key");
        r.key = key.clone();
        let other = if first == "n1" { "n2" } else { "n1" };
        assert!(s.report(other, &r, 2).is_err(), "another node's report");
        assert_eq!(
            s.instance_credentials("kv").ok().flatten().map(|c| c.1),
            Some(String::new())
        );
        s.report(&first, &r, 2).unwrap_or_else(|e| panic!("{e}"));
        let (prefix, k, started) = s
            .instance_credentials("kv")
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no credentials"));
        assert_eq!((k, started), (key, true));
        let node = s.nodes().unwrap_or_default();
        assert!(node
            .iter()
            .any(|n| n.name == first && n.prefix == prefix.to_string()));
        assert_eq!(s.instance_credentials("nope").ok().flatten(), None);
        // Its node goes silent: the copy moves, and the old key is void.
        for n in ["n1", "n2", "n3"].into_iter().filter(|n| *n != first) {
            s.seen(n, 200).unwrap_or_else(|e| panic!("{e}"));
        }
        let moves = s.replace_lost_copies(150, &[], 200).unwrap_or_default();
        assert!(moves.iter().any(|m| m.0 == "kv"), "{moves:?}");
        assert_eq!(
            s.instance_credentials("kv").ok().flatten().map(|c| c.1),
            Some(String::new())
        );
    }

    #[test]
    fn destroyed_instances_of_lost_nodes_are_forgotten() {
        let mut d = db("forget");
        let s = &mut d.1;
        let on = |n: &str| Placement::Node(n.into());
        for (name, node) in [("a", "n1"), ("b", "n2"), ("c", "n3")] {
            s.request(&OP, name, "http-static", &kv(&[]), &on(node), &[], 100)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        for name in ["a", "b"] {
            s.destroy(&OP, name, 110).unwrap_or_else(|e| panic!("{e}"));
        }
        // n1 stays live, n2 goes silent, n3 is revoked (serial 3) but c is
        // not destroyed: only b is forgotten.
        s.seen("n1", 200).unwrap_or_else(|e| panic!("{e}"));
        let gone = s.forget_lost_destroyed(150, &[3], 200).unwrap_or_default();
        assert_eq!(gone, [("b".to_string(), "n2".to_string())]);
        let names: Vec<String> = s
            .instances(None)
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["a", "c"]);
        let h = s.history("b").unwrap_or_default();
        assert!(h.last().is_some_and(|x| x.2.contains("forgotten")), "{h:?}");
        // Its name is free again.
        assert!(s
            .request(&OP, "b", "http-static", &kv(&[]), &on("n1"), &[], 201)
            .is_ok());
    }

    #[test]
    fn a_group_grows_and_shrinks_to_the_requested_copies() {
        let mut d = db("resize");
        let s = &mut d.1;
        let ask = |s: &mut Store, n: u32, t: i64| {
            s.request(
                &OP,
                "kv",
                "http-static",
                &kv(&[]),
                &Placement::Copies(n),
                &[],
                t,
            )
        };
        let sizes = |s: &Store| {
            s.group("kv")
                .unwrap_or_default()
                .iter()
                .map(|i| (i.name.clone(), i.copies))
                .collect::<Vec<_>>()
        };
        ask(s, 2, 1).unwrap_or_else(|e| panic!("{e}"));
        let two = s.group("kv").unwrap_or_default();
        // Growing puts the new copy on the one site without a copy.
        ask(s, 3, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sizes(s),
            [("kv".into(), 3), ("kv.1".into(), 3), ("kv.2".into(), 3)]
        );
        let mut nodes: Vec<String> = s
            .group("kv")
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.node)
            .collect();
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2", "n3"]);
        assert_eq!(
            s.group("kv").unwrap_or_default()[..2]
                .iter()
                .map(|i| i.generation)
                .collect::<Vec<_>>(),
            two.iter().map(|i| i.generation).collect::<Vec<_>>(),
            "the existing copies are not redeployed"
        );
        // More copies than sites: refused, nothing written.
        assert!(matches!(ask(s, 4, 3), Err(StoreError::Invalid(_))));
        assert_eq!(sizes(s).len(), 3);
        // Shrinking removes a copy that is not ready first.
        for (name, node) in s
            .group("kv")
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i.name, i.node))
            .collect::<Vec<_>>()
        {
            if name != "kv.1" {
                s.report(&node, &rep(&name, 1, "ready", &kv(&[("url", "u")])), 4)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        ask(s, 2, 5).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sizes(s), [("kv".into(), 2), ("kv.2".into(), 2)]);
        let gone = s.instance("kv.1").ok().flatten();
        assert!(
            matches!(&gone, Some(g) if g.state == "destroyed" && g.copy_of.is_empty()),
            "{gone:?}"
        );
        // Growing again while kv.1 is still going takes the next free name.
        ask(s, 3, 6).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sizes(s),
            [("kv".into(), 3), ("kv.2".into(), 3), ("kv.3".into(), 3)]
        );
        // Down to one: a single instance, never re-placed.
        ask(s, 1, 7).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sizes(s), [("kv".into(), 1)]);
        let on = s
            .instance("kv")
            .ok()
            .flatten()
            .map(|i| i.node)
            .unwrap_or_default();
        for n in ["n1", "n2", "n3"].into_iter().filter(|n| *n != on) {
            s.seen(n, 500).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(s
            .replace_lost_copies(400, &[], 500)
            .unwrap_or_default()
            .is_empty());
        // Without --copies an existing group keeps its size.
        s.request(&OP, "kv", "http-static", &kv(&[]), &Placement::Auto, &[], 8)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sizes(s).len(), 1);
    }
}
