//! Babel (RFC 8966 + RTT extension + HMAC): wire codec, sans-IO core, simulator, driver, kernel routes. Filled by issue 4; empty until then.
