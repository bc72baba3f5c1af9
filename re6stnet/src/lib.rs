//! The re6st-rs node. For now: enrolment with a registry ([`enrol`], the
//! `re6st-conf` tool). The node daemon and `re6stctl` come with issue 6.

pub mod enrol;
