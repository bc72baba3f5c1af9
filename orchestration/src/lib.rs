//! SlapOS-like orchestration over the overlay (issue 7, in progress): so
//! far the service descriptors; the master, the agent and `re6st-orch` come
//! next.

pub mod descriptor;
