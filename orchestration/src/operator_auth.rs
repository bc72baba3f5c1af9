//! The operator's requests, signed with the operator token instead of
//! carrying it. Tunnels are hop by hop: a node that relays traffic between
//! the operator and the master sees it in the clear, so a bearer token
//! sent across the overlay could be read by any member on the path. The
//! client sends `Authorization: Re6st-Operator ts=T,nonce=N,mac=B64`, an
//! HMAC-SHA256 keyed by the token over the same message node requests sign
//! (method, path with query, time, nonce, SHA-256 of the body); the master
//! checks it, the clock window and that the nonce is new. A relay learns
//! neither the token nor a request it could replay or alter.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use re6st_registry::auth::{request_message, MAX_SKEW_S};
use ring::hmac;

/// The scheme of a signed operator request.
pub const SCHEME: &str = "Re6st-Operator ";

/// Why a signed operator request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorAuthError {
    /// The header does not parse.
    #[error("bad Re6st-Operator header: {0}")]
    Malformed(&'static str),
    /// The clocks differ too much.
    #[error("operator request signed at {ts} but now is {now}: clocks differ by more than {MAX_SKEW_S} s")]
    Clock {
        /// When it was signed.
        ts: i64,
        /// Now.
        now: i64,
    },
    /// The MAC does not match: another token, or an altered request.
    #[error("bad operator signature (another token, or an altered request)")]
    Mac,
}

/// A parsed `Re6st-Operator` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAuth {
    /// Unix seconds when signed.
    pub ts: i64,
    /// 32 hexadecimal digits.
    pub nonce: String,
    mac: Vec<u8>,
}

fn key(token: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes())
}

/// The `Authorization` value for a request signed with `token`.
pub fn sign(
    token: &str,
    method: &str,
    path: &str,
    body: &[u8],
    nonce: [u8; 16],
    now: i64,
) -> String {
    let nonce = hex::encode(nonce);
    let tag = hmac::sign(
        &key(token),
        &request_message(method, path, now, &nonce, body),
    );
    format!(
        "{SCHEME}ts={now},nonce={nonce},mac={}",
        B64.encode(tag.as_ref())
    )
}

impl OperatorAuth {
    /// Parses a header value that starts with [`SCHEME`].
    pub fn parse(value: &str) -> Result<Self, OperatorAuthError> {
        let rest = value
            .strip_prefix(SCHEME)
            .ok_or(OperatorAuthError::Malformed("not Re6st-Operator"))?;
        if rest.len() > 256 {
            return Err(OperatorAuthError::Malformed("too long"));
        }
        let (mut ts, mut nonce, mut mac) = (None, None, None);
        for part in rest.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or(OperatorAuthError::Malformed("expected key=value"))?;
            match k.trim() {
                "ts" => ts = v.parse().ok(),
                "nonce" if v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    nonce = Some(v.to_ascii_lowercase());
                }
                "mac" => mac = B64.decode(v).ok(),
                _ => return Err(OperatorAuthError::Malformed("unknown or bad field")),
            }
        }
        Ok(Self {
            ts: ts.ok_or(OperatorAuthError::Malformed("ts"))?,
            nonce: nonce.ok_or(OperatorAuthError::Malformed("nonce"))?,
            mac: mac.ok_or(OperatorAuthError::Malformed("mac"))?,
        })
    }

    /// Checks the clock window and the MAC by `token`.
    pub fn verify(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), OperatorAuthError> {
        if (now - self.ts).abs() > MAX_SKEW_S {
            return Err(OperatorAuthError::Clock { ts: self.ts, now });
        }
        hmac::verify(
            &key(token),
            &request_message(method, path, self.ts, &self.nonce, body),
            &self.mac,
        )
        .map_err(|_| OperatorAuthError::Mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_over_the_same_request_verifies() {
        let h = sign("tok", "POST", "/v1/request", b"{}", [7; 16], 1000);
        let a = OperatorAuth::parse(&h).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.verify("tok", "POST", "/v1/request", b"{}", 1010), Ok(()));
        for (token, method, path, body) in [
            ("other", "POST", "/v1/request", &b"{}"[..]),
            ("tok", "DELETE", "/v1/request", b"{}"),
            ("tok", "POST", "/v1/instances", b"{}"),
            ("tok", "POST", "/v1/request", b"{\"x\":1}"),
        ] {
            assert_eq!(
                a.verify(token, method, path, body, 1000),
                Err(OperatorAuthError::Mac),
                "{token} {method} {path}"
            );
        }
        assert!(matches!(
            a.verify("tok", "POST", "/v1/request", b"{}", 1000 + MAX_SKEW_S + 1),
            Err(OperatorAuthError::Clock { .. })
        ));
        assert!(!h.contains("tok,") && !h.contains("=tok"), "{h}");
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            "Bearer tok",
            "Re6st-Operator ",
            "Re6st-Operator ts=1,nonce=00,mac=AA==",
            "Re6st-Operator ts=x,nonce=00000000000000000000000000000000,mac=AA==",
            "Re6st-Operator ts=1,nonce=00000000000000000000000000000000",
            "Re6st-Operator ts=1,nonce=00000000000000000000000000000000,mac=AA==,x=1",
        ] {
            assert!(OperatorAuth::parse(bad).is_err(), "{bad}");
        }
        let long = format!("Re6st-Operator ts=1,{}", "a".repeat(300));
        assert!(OperatorAuth::parse(&long).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_header_parses_or_is_refused(s in "Re6st-Operator .{0,300}") {
            let _ = OperatorAuth::parse(&s);
        }
    }
}
