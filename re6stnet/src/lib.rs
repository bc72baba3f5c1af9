//! The node daemon (re6stnet), enrolment (re6st-conf) and status tool (re6stctl). Filled by issue 6; empty until then.
