//! Who requested an instance, and what a caller may therefore manage.
//!
//! As in SlapOS, people and machines are apart: the operator requests
//! instances, and an instance may request child instances (SlapOS's slave
//! or shared instances), which it then owns. Ownership is transitive: an
//! instance manages its children, their children and so on; the operator
//! manages everything. A caller may request (or update) what it owns,
//! read what it owns and itself, and destroy what it owns but not itself
//! (its lifetime is its requester's business).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Most instances (each copy counts) one instance may have requested.
pub const MAX_CHILDREN: usize = 16;
/// Deepest chain of instance requesters below the operator (a child of the
/// operator's instance is at depth 1).
pub const MAX_DEPTH: usize = 4;

/// Who requested an instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Requester {
    /// The operator (token).
    #[default]
    Operator,
    /// Another instance, by name.
    Instance(String),
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Operator => write!(f, "operator"),
            Self::Instance(n) => write!(f, "instance:{n}"),
        }
    }
}

impl From<Requester> for String {
    fn from(r: Requester) -> Self {
        r.to_string()
    }
}

impl TryFrom<String> for Requester {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.strip_prefix("instance:") {
            Some(n) if crate::store::valid_name(n) => Ok(Self::Instance(n.to_string())),
            None if s == "operator" => Ok(Self::Operator),
            _ => Err(format!(
                "bad requester {s:?}: \"operator\" or \"instance:NAME\""
            )),
        }
    }
}

/// The requester of every instance, by instance name.
pub type Requesters = BTreeMap<String, Requester>;

/// The requesters above `name`, nearest first, ending with the operator
/// (cut after `MAX_DEPTH + 1` steps, so a cycle in corrupt data ends).
pub fn ancestry(name: &str, by: &Requesters) -> Vec<Requester> {
    let mut chain = Vec::new();
    let mut cur = name;
    while chain.len() <= MAX_DEPTH {
        match by.get(cur) {
            Some(Requester::Instance(parent)) => {
                chain.push(Requester::Instance(parent.clone()));
                cur = parent;
            }
            Some(Requester::Operator) => {
                chain.push(Requester::Operator);
                break;
            }
            None => break,
        }
    }
    chain
}

/// Whether `caller` owns the instance `name` (requested it, or owns its
/// requester).
pub fn owns(caller: &Requester, name: &str, by: &Requesters) -> bool {
    *caller == Requester::Operator || ancestry(name, by).contains(caller)
}

/// Why a caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The instance belongs to someone else.
    #[error("{name} was requested by {owner}, which {caller} does not own")]
    NotOwner {
        /// The instance.
        name: String,
        /// Its requester.
        owner: Requester,
        /// Who asked.
        caller: Requester,
    },
    /// An instance may not destroy itself.
    #[error("{0} cannot destroy itself: its requester can")]
    Itself(String),
    /// The caller owns too many children.
    #[error("{0} already owns {MAX_CHILDREN} instances")]
    TooManyChildren(String),
    /// The chain of requesters would be too deep.
    #[error("{0} is {MAX_DEPTH} requests below the operator: its children could not be more")]
    TooDeep(String),
    /// The requesting instance is being destroyed.
    #[error("{0} is being destroyed: it cannot request instances")]
    Destroyed(String),
}

/// Checks that `caller` may read `name` (its own record, or one it owns).
pub fn may_read(caller: &Requester, name: &str, by: &Requesters) -> Result<(), Refusal> {
    if *caller == Requester::Instance(name.to_string()) || owns(caller, name, by) {
        return Ok(());
    }
    Err(not_owner(caller, name, by))
}

/// Checks that `caller` may destroy `name`.
pub fn may_destroy(caller: &Requester, name: &str, by: &Requesters) -> Result<(), Refusal> {
    if *caller == Requester::Instance(name.to_string()) {
        return Err(Refusal::Itself(name.to_string()));
    }
    if owns(caller, name, by) {
        return Ok(());
    }
    Err(not_owner(caller, name, by))
}

/// Checks that `caller` may request `name`: update it if it exists and
/// the caller owns it, or create it within the caller's quota.
/// `destroyed` tells whether the calling instance is being destroyed.
pub fn may_request(
    caller: &Requester,
    name: &str,
    by: &Requesters,
    destroyed: bool,
) -> Result<(), Refusal> {
    if by.contains_key(name) {
        return if owns(caller, name, by) {
            Ok(())
        } else {
            Err(not_owner(caller, name, by))
        };
    }
    let Requester::Instance(me) = caller else {
        return Ok(());
    };
    if destroyed {
        return Err(Refusal::Destroyed(me.clone()));
    }
    if ancestry(me, by).len() >= MAX_DEPTH {
        return Err(Refusal::TooDeep(me.clone()));
    }
    if by.values().filter(|r| *r == caller).count() >= MAX_CHILDREN {
        return Err(Refusal::TooManyChildren(me.clone()));
    }
    Ok(())
}

fn not_owner(caller: &Requester, name: &str, by: &Requesters) -> Refusal {
    Refusal::NotOwner {
        name: name.to_string(),
        owner: by.get(name).cloned().unwrap_or_default(),
        caller: caller.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(n: &str) -> Requester {
        Requester::Instance(n.into())
    }

    fn tree() -> Requesters {
        // op -> web -> db -> backup ; op -> other
        [
            ("web", Requester::Operator),
            ("db", inst("web")),
            ("backup", inst("db")),
            ("other", Requester::Operator),
        ]
        .into_iter()
        .map(|(n, r)| (n.to_string(), r))
        .collect()
    }

    #[test]
    fn requesters_round_trip_and_bad_ones_are_refused() {
        for r in [Requester::Operator, inst("web.1")] {
            assert_eq!(Requester::try_from(r.to_string()), Ok(r));
        }
        for bad in ["", "admin", "instance:", "instance:../x", "instance:a/b"] {
            assert!(Requester::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn ownership_is_transitive_and_goes_down_only() {
        let by = tree();
        assert!(owns(&Requester::Operator, "backup", &by));
        assert!(owns(&inst("web"), "db", &by));
        assert!(owns(&inst("web"), "backup", &by));
        assert!(
            !owns(&inst("db"), "web", &by),
            "a child does not own its parent"
        );
        assert!(!owns(&inst("web"), "other", &by));
        assert!(!owns(&inst("web"), "web", &by), "nothing owns itself");
        assert_eq!(
            ancestry("backup", &by),
            vec![inst("db"), inst("web"), Requester::Operator]
        );
    }

    #[test]
    fn read_destroy_and_request_follow_ownership() {
        let by = tree();
        let web = inst("web");
        assert!(may_read(&web, "web", &by).is_ok());
        assert!(may_read(&web, "backup", &by).is_ok());
        assert!(matches!(
            may_read(&web, "other", &by),
            Err(Refusal::NotOwner { ref owner, .. }) if *owner == Requester::Operator
        ));
        assert_eq!(
            may_destroy(&web, "web", &by),
            Err(Refusal::Itself("web".into()))
        );
        assert!(may_destroy(&web, "db", &by).is_ok());
        assert!(may_destroy(&inst("db"), "web", &by).is_err());
        assert!(may_destroy(&Requester::Operator, "web", &by).is_ok());
        assert!(
            may_request(&web, "db", &by, false).is_ok(),
            "update a child"
        );
        assert!(
            may_request(&web, "other", &by, false).is_err(),
            "take a name"
        );
        assert!(may_request(&web, "new", &by, false).is_ok());
        assert_eq!(
            may_request(&web, "new", &by, true),
            Err(Refusal::Destroyed("web".into()))
        );
        assert!(may_request(&Requester::Operator, "new", &by, false).is_ok());
    }

    #[test]
    fn quotas_bound_children_and_depth() {
        let mut by = tree();
        // backup is at depth 3 (web 1, db 2, backup 3): its child would be 4.
        assert!(may_request(&inst("backup"), "deeper", &by, false).is_ok());
        by.insert("deeper".into(), inst("backup"));
        assert_eq!(
            may_request(&inst("deeper"), "deepest", &by, false),
            Err(Refusal::TooDeep("deeper".into()))
        );
        for k in 1..MAX_CHILDREN {
            by.insert(format!("c{k}"), inst("web"));
        }
        assert_eq!(
            may_request(&inst("web"), "one-more", &by, false),
            Err(Refusal::TooManyChildren("web".into()))
        );
        // A cycle in corrupt data ends.
        let cyclic: Requesters = [("a", inst("b")), ("b", inst("a"))]
            .into_iter()
            .map(|(n, r)| (n.to_string(), r))
            .collect();
        assert!(!owns(&inst("c"), "a", &cyclic));
        assert!(ancestry("a", &cyclic).len() <= MAX_DEPTH + 1);
    }
}
