//! SlapOS-like orchestration over the overlay: the master's store and API,
//! the node agent, the client, and service descriptors (see
//! `docs/orchestration.md`).

pub mod agent;
pub mod assignment;
pub mod catalog;
pub mod cgroup;
pub mod client;
pub mod crl_source;
pub mod descriptor;
pub mod identity;
pub mod instance_key;
pub mod kv;
pub mod master;
pub mod metrics;
pub mod operator_auth;
pub mod owner;
pub mod partition;
pub mod plan;
pub mod static_files;
pub mod store;
pub mod supervision;
