//! SlapOS-like master, node agent, service descriptors and request CLI. Filled by issue 7; empty until then.
