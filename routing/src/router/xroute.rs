//! Our own routes (babeld's `xroute.c`): exported prefixes, announced with
//! metric 0 under our router-id and our seqno.
//!
//! The seqno only moves forward by one per satisfied request (see
//! `request`). It must also never go back across a restart, or every
//! node's feasibility distance for us would make our routes unfeasible
//! until it is forgotten (180 s): the driver persists [`Router::seqno`] and
//! passes one newer at start ([`super::RouterConfig::seqno`]).

use std::time::Instant;

use ipnet::IpNet;

use super::interface::Urgency;
use super::{RouteKey, Router, RETRACT_HOLD};

impl Router {
    /// Our current seqno (to persist across restarts).
    pub fn seqno(&self) -> u16 {
        self.seqno
    }

    /// Exports a prefix (metric 0, our router-id).
    pub fn export(&mut self, prefix: IpNet, src_prefix: Option<IpNet>, now: Instant) {
        let key = RouteKey::new(prefix, src_prefix);
        let e = self.table.entry(key);
        if e.exported {
            return;
        }
        e.exported = true;
        e.retract_until = None;
        // A route learned for it before is no longer used.
        self.reselect(key, now);
        self.schedule_update(None, key, Urgency::Urgent, now);
    }

    /// Stops exporting a prefix: a retraction goes out (unless a learned
    /// route takes over).
    pub fn unexport(&mut self, prefix: IpNet, src_prefix: Option<IpNet>, now: Instant) {
        let key = RouteKey::new(prefix, src_prefix);
        let Some(e) = self.table.get_mut(&key) else {
            return;
        };
        if !e.exported {
            return;
        }
        e.exported = false;
        e.retract_until = Some(now + RETRACT_HOLD);
        self.reselect(key, now);
        self.table.prune(&key);
    }
}
