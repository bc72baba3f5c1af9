//! The re6st-rs trust model and registry.
//!
//! - [`cert`]: the CA, node certificates (prefix in CN, overlay address in
//!   SAN, WireGuard key extension), CSR checks.
//! - [`prefix`]: buddy allocation of node prefixes.
//! - [`config`]: the signed network configuration, HMAC keys, sealing to a
//!   node's WireGuard key.
//! - [`auth`]: node-signed requests and signed peer records.
//! - [`topology`]: nodes' topology reports and the network map.
//! - [`metrics`]: the registry's Prometheus metrics; [`prometheus`]: the
//!   text exposition every component writes.

pub mod admin_access;
pub mod api;
pub mod auth;
pub mod cert;
pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod prefix;
pub mod prometheus;
pub mod server;
pub mod store;
pub mod topology;

pub use error::{Error, Result};
