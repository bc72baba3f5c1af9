//! Babel (RFC 8966 + RTT extension + HMAC) for re6st-rs.
//!
//! So far: [`wire`], the packet codec. The sans-IO router, HMAC, simulator,
//! driver and kernel routes follow (issue 4).

pub mod wire;
