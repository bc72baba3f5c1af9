//! Babel (RFC 8966 + RTT extension RFC 9616 + source-specific routes
//! RFC 9079) for re6st-rs, sans-IO.
//!
//! - [`wire`]: the packet codec.
//! - [`auth`]: RFC 8967 MACs, packet counters and challenges.
//! - [`metric`]: seqno arithmetic, 2-out-of-3 cost, RTT penalty.
//! - [`neighbour`]: Hello history with per-neighbour deadlines, IHU, RTT.
//! - [`source`]: feasibility distances.
//! - [`router`]: the state machine (`handle_packet`, `handle_timeout`,
//!   `poll_transmit`, `poll_timeout`, `poll_route_change`).
//! - [`sim`]: many routers on a virtual clock with per-link delay and loss.
//! - [`driver`]: the tokio driver (sockets, clock, commands, status).
//! - [`embedded`]: the router driven by another loop (the node's data
//!   plane), Babel on its links without kernel sockets.
//! - [`effects`]: kernel route changes and the persisted seqno, off the
//!   router's loop.
//! - [`kernel`]: kernel routes over rtnetlink with our own `proto`.
//! - [`ipv4_map`]: a node's IPv4 subnet, derived from its IPv6 prefix.

pub mod auth;
pub mod driver;
pub mod drop_reason;
pub mod effects;
pub mod embedded;
pub mod ipv4_map;
pub mod kernel;
pub mod metric;
pub mod neighbour;
pub mod router;
pub mod sim;
pub mod source;
pub mod wire;
