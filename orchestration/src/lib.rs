//! SlapOS-like orchestration over the overlay (issue 7, in progress): so
//! far the service descriptors and the master's store; the master's API,
//! the agent and `re6st-orch` come next.

pub mod agent;
pub mod client;
pub mod descriptor;
pub mod master;
pub mod store;
