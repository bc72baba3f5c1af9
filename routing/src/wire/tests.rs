//! Tests of the codec: every packet of the babeld capture decodes to the
//! annotated values (rendered in the annotator's own format and compared
//! line by line, MACs included), and property tests for robustness and
//! round trips.

use super::*;
use proptest::prelude::*;

const VECTORS: &str = include_str!("../../tests/data/babel-vectors.txt");
const HMAC_KEY: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];

fn hx(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn name(t: u8) -> String {
    match t {
        0 => "Pad1".into(),
        1 => "PadN".into(),
        2 => "AckReq".into(),
        3 => "Ack".into(),
        4 => "Hello".into(),
        5 => "IHU".into(),
        6 => "Router-Id".into(),
        7 => "Next-Hop".into(),
        8 => "Update".into(),
        9 => "Route-Request".into(),
        10 => "Seqno-Request".into(),
        16 => "MAC".into(),
        17 => "PC".into(),
        18 => "Challenge-Request".into(),
        19 => "Challenge-Reply".into(),
        t => format!("type{t}"),
    }
}

/// Raw framing of a section: (type, raw TLV bytes).
fn frames(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0 {
            out.push((0, vec![0]));
            i += 1;
            continue;
        }
        let l = usize::from(b[i + 1]);
        out.push((b[i], b[i..i + 2 + l].to_vec()));
        i += 2 + l;
    }
    out
}

/// Renders a section the way anchors/babel-annotate.py does.
fn render(raw: &[u8], parsed: &[Tlv], out: &mut Vec<String>) {
    let raws = frames(raw);
    assert_eq!(raws.len(), parsed.len(), "TLV count");
    for ((t, bytes), tlv) in raws.iter().zip(parsed) {
        if *t == 0 {
            out.push(format!("   {:<16} 00", "Pad1"));
            continue;
        }
        out.push(format!(
            "   {} (type {t}, len {}): {}",
            name(*t),
            bytes.len() - 2,
            hx(bytes)
        ));
        match tlv {
            Tlv::Hello {
                flags,
                seqno,
                interval,
                timestamp,
            } => {
                out.push(format!(
                    "      flags=0x{flags:04x} seqno=0x{seqno:04x} interval={interval} cs"
                ));
                if let Some(ts) = timestamp {
                    out.push(format!(
                        "      sub-TLV {} : Timestamp origin(send time, us)=0x{ts:08x} ({ts})",
                        hx(&[&[3u8, 4][..], &ts.to_be_bytes()].concat())
                    ));
                }
            }
            Tlv::Ihu {
                ae,
                rxcost,
                interval,
                address,
                timestamp,
            } => {
                let a = match (ae, address) {
                    (3, Some(a)) => a.to_string(),
                    (_, Some(IpAddr::V6(a))) => hex_compact(&a.octets()),
                    (_, Some(IpAddr::V4(a))) => hex_compact(&a.octets()),
                    (_, None) => String::new(),
                };
                out.push(format!(
                    "      AE={ae} rxcost=0x{rxcost:04x} interval={interval} cs address={a}"
                ));
                if let Some((o, r)) = timestamp {
                    out.push(format!(
                        "      sub-TLV {} : Timestamp origin=0x{o:08x} receive=0x{r:08x}",
                        hx(&[&[3u8, 8][..], &o.to_be_bytes(), &r.to_be_bytes()].concat())
                    ));
                }
            }
            Tlv::RouterId(id) => out.push(format!(
                "      router-id={}",
                id.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            )),
            Tlv::Update {
                ae,
                flags,
                omitted,
                interval,
                seqno,
                metric,
                prefix,
                ..
            } => {
                let (p, plen) = match prefix {
                    Some(p) => (p.addr().to_string(), p.prefix_len()),
                    None => ("(wildcard)".to_string(), 0),
                };
                out.push(format!(
                    "      AE={ae} flags=0x{flags:02x} plen={plen} omitted={omitted} interval={interval} cs seqno=0x{seqno:04x} metric={metric} prefix={p}/{plen}"
                ));
            }
            Tlv::RouteRequest { ae, prefix, .. } => {
                out.push(format!(
                    "      AE={ae} plen={}",
                    prefix.map_or(0, |p| p.prefix_len())
                ));
            }
            Tlv::Pc { pc, index } => {
                out.push(format!("      PC={pc} index={}", hex_compact(index)))
            }
            Tlv::ChallengeRequest(n) | Tlv::ChallengeReply(n) => {
                out.push(format!("      nonce={}", hex_compact(n)))
            }
            Tlv::Mac(m) => out.push(format!("      MAC ({} bytes)", m.len())),
            _ => {}
        }
    }
}

fn hex_compact(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Frame {
    title: String,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    bytes: Vec<u8>,
    annotation: Vec<String>,
}

fn vector_frames() -> Vec<Frame> {
    let mut out: Vec<Frame> = Vec::new();
    for line in VECTORS.lines() {
        if let Some(rest) = line.strip_prefix("== frame ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let src = words[2].parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
            let dst = words[4].parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
            out.push(Frame {
                title: line.to_string(),
                src,
                dst,
                bytes: Vec::new(),
                annotation: Vec::new(),
            });
            continue;
        }
        let Some(f) = out.last_mut() else { continue };
        if line.starts_with("===") {
            // A new capture section ends the frame.
            continue;
        }
        let is_hex = line.len() > 9
            && line.starts_with("   ")
            && line[3..7].chars().all(|c| c.is_ascii_hexdigit())
            && &line[7..9] == "  ";
        if is_hex {
            for byte in line[9..].split_whitespace() {
                f.bytes.push(u8::from_str_radix(byte, 16).unwrap_or(0));
            }
        } else if line.starts_with("   ") {
            f.annotation.push(line.trim_end().to_string());
        }
    }
    out
}

#[test]
fn every_captured_babeld_packet_decodes_to_the_annotated_values() {
    let frames = vector_frames();
    assert_eq!(frames.len(), 13, "frames in the capture file");
    let mut macs = 0;
    for f in &frames {
        let p = match parse(&f.bytes) {
            Ok(p) => p,
            Err(e) => panic!("{}: {e}", f.title),
        };
        let mut got = vec![format!(
            "   header: magic={} version={} body_length={}",
            f.bytes[0],
            f.bytes[1],
            p.body_end - 4
        )];
        render(&f.bytes[4..p.body_end], &p.body, &mut got);
        if f.bytes.len() > p.body_end {
            got.push(format!(
                "   -- packet trailer ({} bytes, after body_length) --",
                f.bytes.len() - p.body_end
            ));
            render(&f.bytes[p.body_end..], &p.trailer, &mut got);
            if let Some(Tlv::Mac(mac)) = p.trailer.first() {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &HMAC_KEY);
                let input = mac_input(f.src, PORT, f.dst, PORT, &f.bytes, p.body_end);
                let ok = ring::hmac::verify(&key, &input, mac).is_ok();
                got.push(format!(
                    "   HMAC-SHA256 check over src|port|dst|port|header|body: {}",
                    if ok { "OK" } else { "MISMATCH" }
                ));
                macs += 1;
            }
        }
        assert_eq!(got, f.annotation, "{}", f.title);
    }
    assert!(macs >= 5, "MAC-checked {macs} frames");
}

#[test]
fn updates_carry_router_id_and_expanded_prefixes() -> Result<(), WireError> {
    // Frame 7 of capture 1: the second Update omits 3 bytes of fd00:5d::1.
    let f = vector_frames()
        .into_iter()
        .find(|f| f.title.contains("frame 7  t=0.139546s"))
        .unwrap_or_else(|| panic!("frame 7"));
    let p = parse(&f.bytes)?;
    let ups: Vec<_> = p
        .body
        .iter()
        .filter_map(|t| match t {
            Tlv::Update {
                prefix,
                router_id,
                metric,
                ..
            } => Some((*prefix, *router_id, *metric)),
            _ => None,
        })
        .collect();
    assert_eq!(ups.len(), 2);
    assert_eq!(
        ups[0].0.map(|p| p.to_string()),
        Some("fd00:5a::1/128".into())
    );
    assert_eq!(ups[0].1, Some([2, 0, 0, 0xff, 0xfe, 0, 0, 0x0a]));
    assert_eq!(
        ups[1].0.map(|p| p.to_string()),
        Some("fd00:5d::1/128".into())
    );
    assert_eq!(ups[1].1, Some([2, 0, 0, 0xff, 0xfe, 0, 0, 0x0b]));
    assert_eq!(ups[1].2, INFINITY);
    Ok(())
}

#[test]
fn ipv4_updates_are_sent_v4_via_v6() -> Result<(), WireError> {
    let prefix: IpNet = "198.19.0.5/32".parse().unwrap();
    let mut w = PacketWriter::new(1024);
    assert!(w.push(
        &Tlv::Update {
            ae: ae::IPV4,
            flags: 0,
            omitted: 0,
            interval: 400,
            seqno: 7,
            metric: 96,
            prefix: Some(prefix),
            src_prefix: None,
            router_id: Some([1, 2, 3, 4, 5, 6, 7, 8]),
            next_hop: None,
        },
        0
    ));
    let p = parse(&w.finish(&[]))?;
    let got = p.body.iter().find_map(|t| match t {
        Tlv::Update { ae, prefix, .. } => Some((*ae, *prefix)),
        _ => None,
    });
    assert_eq!(got, Some((ae::V4_VIA_V6, Some(prefix))));
    Ok(())
}

#[test]
fn structural_errors_and_semantic_errors() {
    assert_eq!(parse(&[]), Err(WireError::TooShort));
    assert_eq!(parse(&[43, 2, 0, 0]), Err(WireError::BadMagic(43)));
    assert_eq!(parse(&[42, 1, 0, 0]), Err(WireError::BadVersion(1)));
    assert_eq!(parse(&[42, 2, 0, 5, 1]), Err(WireError::BodyTooLong(5)));
    assert_eq!(
        parse(&[42, 2, 0, 3, 4, 10, 0]),
        Err(WireError::Truncated(4))
    );
    // A compressed prefix with no default is malformed, not fatal.
    let p = parse(&[
        42, 2, 0, 13, 8, 11, 2, 0, 64, 2, 0, 100, 0, 1, 0, 0, 0xaa, 0,
    ])
    .unwrap_or_default();
    assert!(
        matches!(p.body.first(), Some(Tlv::Malformed { kind: 8, .. })),
        "{p:?}"
    );
    // An unknown mandatory sub-TLV drops the TLV but keeps the parser state.
    let mut pkt = vec![42, 2, 0, 0];
    pkt.extend_from_slice(&[8, 20, 2, 0x80, 64, 0, 0, 100, 0, 1, 0, 0]);
    pkt.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 1]);
    pkt.extend_from_slice(&[200, 0]);
    pkt.extend_from_slice(&[8, 11, 2, 0, 64, 7, 0, 100, 0, 1, 0, 0, 2]);
    let len = (pkt.len() - 4) as u16;
    pkt[2..4].copy_from_slice(&len.to_be_bytes());
    let p = parse(&pkt).unwrap_or_default();
    assert_eq!(p.ignored, 1);
    match p.body.first() {
        Some(Tlv::Update {
            prefix: Some(pr), ..
        }) => assert_eq!(pr.to_string(), "fd00:0:0:2::/64"),
        other => panic!("{other:?}"),
    }
}

fn arb_v6_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
        IpNet::V6(
            Ipv6Net::new(Ipv6Addr::from(a), l)
                .map(|n| n.trunc())
                .unwrap_or_default(),
        )
    })
}

fn arb_v4_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
        IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(a), l)
                .map(|n| n.trunc())
                .unwrap_or_default(),
        )
    })
}

fn arb_prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![arb_v6_prefix(), arb_v4_prefix()]
}

fn arb_rid() -> impl Strategy<Value = [u8; 8]> {
    any::<[u8; 8]>().prop_filter("valid router-id", |r| *r != [0; 8] && *r != [0xff; 8])
}

fn arb_src(p: IpNet) -> impl Strategy<Value = Option<IpNet>> {
    let s = match p {
        IpNet::V4(_) => arb_v4_prefix().boxed(),
        IpNet::V6(_) => arb_v6_prefix().boxed(),
    };
    proptest::option::of(s.prop_filter("non-empty", |s| s.prefix_len() > 0))
}

fn arb_tlv() -> impl Strategy<Value = Tlv> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(flags, seqno, interval, timestamp)| Tlv::Hello {
                flags,
                seqno,
                interval,
                timestamp
            }),
        (
            any::<u16>(),
            any::<u16>(),
            proptest::option::of(any::<[u8; 16]>()),
            proptest::option::of(any::<(u32, u32)>())
        )
            .prop_map(|(rxcost, interval, a, timestamp)| {
                let address = a.map(|a| IpAddr::V6(Ipv6Addr::from(a)));
                let ae = match address.as_ref().map(address_bytes) {
                    Some((ae, _)) => ae,
                    None => 0,
                };
                Tlv::Ihu {
                    ae,
                    rxcost,
                    interval,
                    address,
                    timestamp,
                }
            }),
        arb_prefix()
            .prop_flat_map(|p| (
                Just(p),
                arb_src(p),
                any::<u16>(),
                any::<u16>(),
                any::<u16>(),
                arb_rid()
            ))
            .prop_map(|(p, src, interval, seqno, metric, rid)| Tlv::Update {
                ae: ae_of(&p),
                flags: 0,
                omitted: 0,
                interval,
                seqno,
                metric,
                prefix: Some(p),
                src_prefix: src,
                router_id: Some(rid),
                next_hop: None,
            }),
        (any::<u16>(), any::<u16>()).prop_map(|(interval, seqno)| Tlv::Update {
            ae: 0,
            flags: 0,
            omitted: 0,
            interval,
            seqno,
            metric: INFINITY,
            prefix: None,
            src_prefix: None,
            router_id: None,
            next_hop: None,
        }),
        arb_prefix()
            .prop_flat_map(|p| (Just(p), arb_src(p)))
            .prop_map(|(p, src)| Tlv::RouteRequest {
                ae: ae_of(&p),
                prefix: Some(p),
                src_prefix: src
            }),
        arb_prefix()
            .prop_flat_map(|p| (Just(p), arb_src(p), any::<u16>(), any::<u8>(), arb_rid()))
            .prop_map(|(p, src, seqno, hop_count, router_id)| Tlv::SeqnoRequest {
                ae: ae_of(&p),
                seqno,
                hop_count,
                router_id,
                prefix: p,
                src_prefix: src,
            }),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(pc, index)| Tlv::Pc { pc, index }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Tlv::ChallengeRequest),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Tlv::ChallengeReply),
        (any::<u16>(), any::<u16>())
            .prop_map(|(opaque, interval)| Tlv::AckReq { opaque, interval }),
        any::<u16>().prop_map(|opaque| Tlv::Ack { opaque }),
    ]
}

/// What a TLV means, without the encoding choices the writer makes.
fn meaning(t: &Tlv) -> Option<Tlv> {
    match t {
        Tlv::RouterId(_) | Tlv::Pad1 | Tlv::PadN(_) => None,
        Tlv::Update {
            interval,
            seqno,
            metric,
            prefix,
            src_prefix,
            router_id,
            ..
        } => Some(Tlv::Update {
            ae: prefix.as_ref().map_or(0, ae_of),
            flags: 0,
            omitted: 0,
            interval: *interval,
            seqno: *seqno,
            metric: *metric,
            prefix: *prefix,
            src_prefix: *src_prefix,
            router_id: if prefix.is_some() { *router_id } else { None },
            next_hop: None,
        }),
        other => Some(other.clone()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn never_panics_on_arbitrary_bytes(mut data in proptest::collection::vec(any::<u8>(), 0..600), fix_header in any::<bool>()) {
        if fix_header && data.len() >= 4 {
            data[0] = MAGIC;
            data[1] = VERSION;
            let len = (data.len() - 4) as u16;
            data[2..4].copy_from_slice(&len.to_be_bytes());
        }
        let _ = parse(&data);
    }

    #[test]
    fn round_trips(tlvs in proptest::collection::vec(arb_tlv(), 0..24)) {
        let mut w = PacketWriter::new(65_535);
        let mut written = Vec::new();
        for t in &tlvs {
            if w.push(t, 0) {
                written.push(t.clone());
            }
        }
        let bytes = w.finish(&[]);
        let p = parse(&bytes);
        prop_assert!(p.is_ok(), "{:?}", p);
        let p = p.unwrap_or_default();
        let got: Vec<Tlv> = p.body.iter().filter_map(meaning).collect();
        let want: Vec<Tlv> = written.iter().filter_map(meaning).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn writer_respects_the_size_limit(tlvs in proptest::collection::vec(arb_tlv(), 0..40), max in 64usize..600) {
        let mut w = PacketWriter::new(max);
        for t in &tlvs {
            let _ = w.push(t, 34);
        }
        let bytes = w.finish(&[Tlv::Mac(vec![0; 32])]);
        prop_assert!(bytes.len() <= max, "{} > {}", bytes.len(), max);
        prop_assert!(parse(&bytes).is_ok());
    }
}
