//! What the agent does with a verified assignment list, sans IO. The
//! signed list is the truth: what it marks destroyed is removed and
//! reported stopped; a deployment whose generation changed is stopped and
//! deployed again; what it no longer names is stopped, and partitions it
//! does not name are wiped. Refusals (software this node cannot run) are
//! reported once per generation and reason.

use std::collections::BTreeMap;

use crate::assignment::Assigned;

/// One thing to do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Stop it, remove its partition and report it stopped.
    Remove(&'a Assigned),
    /// Stop this deployment (another generation is assigned, or none).
    Stop(String),
    /// Deploy it (new, or again at its new generation).
    Deploy(&'a Assigned),
    /// Already running at this generation: hand it the latest peers.
    Keep(&'a Assigned),
    /// Wipe every partition the list does not name (last).
    WipeUnassigned,
}

/// The steps for `list`, given the generation of each running deployment.
pub fn plan<'a>(list: &'a [Assigned], running: &BTreeMap<String, i64>) -> Vec<Step<'a>> {
    let mut steps = Vec::new();
    for a in list {
        let i = &a.instance;
        if i.state == "destroyed" {
            steps.push(Step::Remove(a));
            continue;
        }
        match running.get(&i.name) {
            Some(g) if *g == i.generation => steps.push(Step::Keep(a)),
            Some(_) => {
                steps.push(Step::Stop(i.name.clone()));
                steps.push(Step::Deploy(a));
            }
            None => steps.push(Step::Deploy(a)),
        }
    }
    for name in running.keys() {
        if !list.iter().any(|a| a.instance.name == *name) {
            steps.push(Step::Stop(name.clone()));
        }
    }
    steps.push(Step::WipeUnassigned);
    steps
}

/// Instances this node cannot run, with the generation and reason already
/// reported.
#[derive(Debug, Default)]
pub struct Refusals(BTreeMap<String, (i64, String)>);

impl Refusals {
    /// Whether the refusal of `name` at `generation` for `why` is news to
    /// report (it is not once [`Refusals::reported`] recorded it).
    pub fn is_new(&self, name: &str, generation: i64, why: &str) -> bool {
        self.0
            .get(name)
            .is_none_or(|(g, w)| *g != generation || w != why)
    }

    /// The master took the report of this refusal.
    pub fn reported(&mut self, name: &str, generation: i64, why: String) {
        self.0.insert(name.to_string(), (generation, why));
    }

    /// `name` deploys after all.
    pub fn clear(&mut self, name: &str) {
        self.0.remove(name);
    }

    /// Forgets refusals of instances `list` no longer names.
    pub fn retain_assigned(&mut self, list: &[Assigned]) {
        self.0
            .retain(|n, _| list.iter().any(|a| a.instance.name == *n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Instance;

    fn assigned(name: &str, generation: i64, state: &str) -> Assigned {
        Assigned {
            instance: Instance {
                name: name.into(),
                software: "kv".into(),
                params: BTreeMap::new(),
                node: "n1".into(),
                state: state.into(),
                status: "pending".into(),
                connection: BTreeMap::new(),
                generation,
                updated_at: 0,
                copy_of: String::new(),
                copies: 1,
                requester: Default::default(),
            },
            version: 1,
            peers: Vec::new(),
        }
    }

    #[test]
    fn the_signed_list_is_the_truth() {
        let list = [
            assigned("new", 1, "started"),
            assigned("same", 2, "started"),
            assigned("changed", 3, "started"),
            assigned("doomed", 1, "destroyed"),
        ];
        let running: BTreeMap<String, i64> = [("same", 2), ("changed", 2), ("dropped", 1)]
            .into_iter()
            .map(|(n, g)| (n.to_string(), g))
            .collect();
        assert_eq!(
            plan(&list, &running),
            [
                Step::Deploy(&list[0]),
                Step::Keep(&list[1]),
                Step::Stop("changed".into()),
                Step::Deploy(&list[2]),
                Step::Remove(&list[3]),
                Step::Stop("dropped".into()),
                Step::WipeUnassigned,
            ]
        );
        assert_eq!(
            plan(&[], &BTreeMap::new()),
            [Step::WipeUnassigned],
            "an empty list wipes everything"
        );
    }

    #[test]
    fn a_refusal_is_reported_once_per_generation_and_reason() {
        let mut r = Refusals::default();
        assert!(r.is_new("a", 1, "no such software"));
        r.reported("a", 1, "no such software".into());
        assert!(!r.is_new("a", 1, "no such software"));
        assert!(r.is_new("a", 2, "no such software"));
        assert!(r.is_new("a", 1, "version 2 is assigned"));
        r.retain_assigned(&[assigned("b", 1, "started")]);
        assert!(r.is_new("a", 1, "no such software"), "forgotten");
        r.reported("b", 1, "x".into());
        r.clear("b");
        assert!(r.is_new("b", 1, "x"));
    }
}
