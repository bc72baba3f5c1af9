//! Any bytes through the Babel packet parser; what parses is re-encoded
//! and must parse again to the same meaning (every TLV with its parser
//! state applied: prefixes, router-ids, next hops, timestamps).
//! Seeded from the babeld capture (`fuzz/seed-corpus.sh`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use re6st_routing::wire::{parse, PacketWriter, Tlv};

/// What a TLV means, without how it was compressed (AE, flags, omitted
/// bytes, padding, parser-state TLVs, which the writer chooses itself).
fn meaning(t: &Tlv) -> Option<Tlv> {
    Some(match t.clone() {
        Tlv::Pad1 | Tlv::PadN(_) | Tlv::RouterId(_) | Tlv::NextHop { .. } => return None,
        Tlv::Unknown { .. } => return None,
        Tlv::Ihu {
            rxcost,
            interval,
            address,
            timestamp,
            ..
        } => Tlv::Ihu {
            ae: 0,
            rxcost,
            interval,
            address,
            timestamp,
        },
        Tlv::Update {
            interval,
            seqno,
            metric,
            prefix,
            src_prefix,
            router_id,
            next_hop,
            ..
        } => Tlv::Update {
            ae: 0,
            flags: 0,
            omitted: 0,
            interval,
            seqno,
            metric,
            prefix,
            src_prefix,
            router_id: prefix.and(router_id),
            next_hop: prefix.and(next_hop),
        },
        Tlv::RouteRequest {
            prefix, src_prefix, ..
        } => Tlv::RouteRequest {
            ae: 0,
            prefix,
            src_prefix,
        },
        Tlv::SeqnoRequest {
            seqno,
            hop_count,
            router_id,
            prefix,
            src_prefix,
            ..
        } => Tlv::SeqnoRequest {
            ae: 0,
            seqno,
            hop_count,
            router_id,
            prefix,
            src_prefix,
        },
        other => other,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(p) = parse(data) else { return };
    let mut w = PacketWriter::new(65_535);
    for t in &p.body {
        let _ = w.push(t, 0);
    }
    let again = w.finish(&[]);
    let q = match parse(&again) {
        Ok(q) => q,
        Err(e) => panic!("re-encoded packet does not parse: {e}"),
    };
    // A malformed TLV can clear parser state that the re-encoding (which
    // drops it) keeps: compare meanings only without them.
    if p.body.iter().any(|t| matches!(t, Tlv::Malformed { .. })) {
        return;
    }
    let before: Vec<Tlv> = p.body.iter().filter_map(meaning).collect();
    let after: Vec<Tlv> = q.body.iter().filter_map(meaning).collect();
    assert_eq!(before, after, "meaning changed by a round trip");
});
