//! Who may use the registry's admin API.
//!
//! By default nobody does: `serve` without `--admin-token-file` leaves
//! administration to the database (`re6st-registry token add`, ...). With a
//! token, every admin request must carry `Authorization: Bearer TOKEN`,
//! from loopback too: behind a TLS proxy on the same host every Internet
//! client arrives from loopback. Loopback clients without a token are admin
//! only when the operator says so (`--admin-loopback`), which is unsafe
//! behind such a proxy.

use std::net::IpAddr;

/// The admin API's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAccess {
    /// Closed: no admin request is answered.
    Closed,
    /// Clients presenting this bearer token.
    Token(String),
    /// Loopback clients without a token, and any client with the token if
    /// there is one.
    Loopback(Option<String>),
}

/// Why an admin request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    /// The API is closed on this registry.
    #[error("the admin API is closed (serve has no --admin-token-file)")]
    Closed,
    /// No bearer token where one is needed.
    #[error("the admin API needs `Authorization: Bearer TOKEN`")]
    NoToken,
    /// A bearer token that is not the admin token.
    #[error("wrong admin token")]
    WrongToken,
}

/// Compares digests: the time taken says nothing about the token.
fn same_token(want: &str, got: &str) -> bool {
    let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
    digest(want).as_ref() == digest(got.trim()).as_ref()
}

impl AdminAccess {
    /// Whether a request from `peer` with this bearer token (if any) is an
    /// admin's.
    pub fn check(&self, peer: IpAddr, bearer: Option<&str>) -> Result<(), AdminRefusal> {
        let token = match self {
            Self::Closed => return Err(AdminRefusal::Closed),
            Self::Token(t) => Some(t),
            Self::Loopback(t) => t.as_ref(),
        };
        match (token, bearer) {
            (Some(want), Some(got)) if same_token(want, got) => Ok(()),
            (_, Some(_)) => Err(AdminRefusal::WrongToken),
            (_, None) if matches!(self, Self::Loopback(_)) && peer.is_loopback() => Ok(()),
            (_, None) => Err(AdminRefusal::NoToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn closed_refuses_everyone() {
        for peer in ["::1", "127.0.0.1", "fd00::7"] {
            for bearer in [None, Some(TOKEN)] {
                assert_eq!(
                    AdminAccess::Closed.check(ip(peer), bearer),
                    Err(AdminRefusal::Closed)
                );
            }
        }
    }

    /// Behind a same-host proxy every client is loopback: without the
    /// token, loopback is no one special.
    #[test]
    fn a_token_is_needed_from_loopback_too() {
        let a = AdminAccess::Token(TOKEN.into());
        for peer in ["::1", "127.0.0.1", "fd00::7"] {
            assert_eq!(a.check(ip(peer), Some(TOKEN)), Ok(()));
            assert_eq!(a.check(ip(peer), Some(" 0123456789abcdef ")), Ok(()));
            assert_eq!(a.check(ip(peer), None), Err(AdminRefusal::NoToken));
            assert_eq!(
                a.check(ip(peer), Some("nope")),
                Err(AdminRefusal::WrongToken)
            );
        }
    }

    #[test]
    fn loopback_only_when_asked_for() {
        let a = AdminAccess::Loopback(None);
        assert_eq!(a.check(ip("::1"), None), Ok(()));
        assert_eq!(a.check(ip("127.0.0.1"), None), Ok(()));
        assert_eq!(a.check(ip("fd00::7"), None), Err(AdminRefusal::NoToken));
        assert_eq!(
            a.check(ip("fd00::7"), Some(TOKEN)),
            Err(AdminRefusal::WrongToken),
            "no token configured"
        );
        let both = AdminAccess::Loopback(Some(TOKEN.into()));
        assert_eq!(both.check(ip("fd00::7"), Some(TOKEN)), Ok(()));
        assert_eq!(both.check(ip("::1"), None), Ok(()));
        assert_eq!(
            both.check(ip("::1"), Some("nope")),
            Err(AdminRefusal::WrongToken)
        );
    }
}
