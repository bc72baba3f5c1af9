//! RFC 8967 checks of a received packet, with the challenge exchange: the
//! router's glue around [`crate::auth::Auth`].

use std::net::Ipv6Addr;
use std::time::Instant;

use super::{Destination, Router};
use crate::auth::Verdict;
use crate::drop_reason::DropReason;
use crate::neighbour::IfaceId;
use crate::wire::{self, Tlv};

/// Longest Challenge Request nonce we answer.
const NONCE_MAX: usize = 192;

impl Router {
    /// Whether to process a received packet. Answers a Challenge Request
    /// received on unicast (not in a replayed packet), and challenges a
    /// neighbour whose index we do not know.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        iface: IfaceId,
        src: Ipv6Addr,
        bytes: &[u8],
        packet: &wire::Packet,
    ) -> Result<(), DropReason> {
        let (link_local, requires_auth) = match self.ifaces.get(&iface) {
            Some(i) => (i.cfg.link_local, i.cfg.requires_auth),
            None => return Err(DropReason::UnknownInterface),
        };
        let Some(auth) = self.auth.as_mut() else {
            return if requires_auth {
                Err(DropReason::NoKeys)
            } else {
                Ok(())
            };
        };
        let macs: Vec<&[u8]> = packet
            .trailer
            .iter()
            .filter_map(|t| match t {
                Tlv::Mac(m) => Some(m.as_slice()),
                _ => None,
            })
            .collect();
        let mut dsts = vec![wire::MULTICAST];
        dsts.extend(link_local);
        let Some(dst) = auth.check_mac(src, &dsts, bytes, packet.body_end, &macs) else {
            return Err(DropReason::BadMac);
        };
        let unicast = dst != wire::MULTICAST;
        let key = (iface.0, src);
        let pc = packet.body.iter().find_map(|t| match t {
            Tlv::Pc { pc, index } => Some((*pc, index.as_slice())),
            _ => None,
        });
        let reply = packet.body.iter().find_map(|t| match t {
            Tlv::ChallengeReply(n) => Some(n.as_slice()),
            _ => None,
        });
        let request = packet.body.iter().find_map(|t| match t {
            Tlv::ChallengeRequest(n) if unicast && n.len() <= NONCE_MAX => Some(n.clone()),
            _ => None,
        });
        let verdict = auth.check_pc(now, key, unicast, pc, reply);
        // A replayed packet's challenge is not answered (babeld).
        let answer = request
            .filter(|_| verdict != Verdict::Drop(DropReason::OldPc))
            .filter(|_| auth.may_reply(now, key));
        let challenge = match verdict {
            Verdict::Drop(DropReason::UnknownIndex) => {
                let nonce = self.rng.bytes::<8>().to_vec();
                self.auth
                    .as_mut()
                    .and_then(|a| a.challenge(now, key, nonce))
            }
            _ => None,
        };
        let tlvs: Vec<Tlv> = answer
            .map(Tlv::ChallengeReply)
            .into_iter()
            .chain(challenge.map(Tlv::ChallengeRequest))
            .collect();
        self.emit_tlvs(iface, Destination::Unicast(src), &tlvs);
        match verdict {
            Verdict::Accept => Ok(()),
            Verdict::Drop(reason) => Err(reason),
        }
    }
}
