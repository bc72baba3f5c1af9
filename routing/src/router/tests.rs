//! Unit tests of the router's rules, from named states, feeding TLVs (as
//! smoltcp's socket tests do) on a virtual clock.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;
use crate::wire::{self, PacketWriter, Tlv, INFINITY};

const HELLO: Duration = Duration::from_millis(300);
const OURS: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 1];
const ORIGIN: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 9];
const A: IfaceId = IfaceId(1);
const B: IfaceId = IfaceId(2);

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ll(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n)
}

/// Our link-local on interface `i`, and the neighbour's there.
fn ours(i: IfaceId) -> Ipv6Addr {
    ll(i.0 as u16)
}
fn theirs(i: IfaceId) -> Ipv6Addr {
    ll(0x100 + i.0 as u16)
}

fn dest() -> IpNet {
    net("fd00:1:0:9::/64")
}

fn key() -> RouteKey {
    RouteKey::new(dest(), None)
}

struct Harness {
    r: Router,
    now: Instant,
    hello_seqno: [u16; 3],
    /// When the neighbours say Hello next (once they have started).
    next_hello: Instant,
}

fn packet(tlvs: &[Tlv]) -> Vec<u8> {
    let mut w = PacketWriter::new(1400);
    for t in tlvs {
        assert!(w.push(t, 0), "{t:?} does not fit");
    }
    w.finish(&[])
}

fn update(router_id: [u8; 8], seqno: u16, metric: u16) -> Tlv {
    Tlv::Update {
        ae: 2,
        flags: 0,
        omitted: 0,
        interval: 400,
        seqno,
        metric,
        prefix: Some(dest()),
        src_prefix: None,
        router_id: Some(router_id),
        next_hop: None,
    }
}

impl Harness {
    /// A router with two tunnel interfaces (no RTT), nothing heard yet.
    fn new() -> Self {
        let now = Instant::now();
        let mut cfg = RouterConfig::new(OURS, [3; 32]);
        cfg.seqno = 100;
        cfg.filter = Filter {
            networks: vec![net("fd00:1::/48")],
            max_plen: Some(64),
            default_from: vec![net("fd00:1::/48")],
            ..Filter::default()
        };
        let mut r = Router::new(cfg, now);
        for i in [A, B] {
            let mut c = InterfaceConfig::tunnel(HELLO);
            c.rtt = None;
            c.link_local = Some(ours(i));
            r.add_interface(i, c, now);
        }
        let mut h = Self {
            r,
            now,
            hello_seqno: [0; 3],
            next_hello: now + HELLO,
        };
        h.run(Duration::from_millis(50));
        h.drain();
        h
    }

    /// Two-way neighbours on both interfaces (Hellos and IHUs, cost 96).
    fn with_neighbours() -> Self {
        let mut h = Self::new();
        for _ in 0..3 {
            for i in [A, B] {
                h.hear_hello(i);
            }
            h.run(Duration::from_millis(100));
        }
        h.drain();
        h
    }

    /// Neighbours, and dest learned from A (metric 200 at A) and selected.
    fn with_route_via_a() -> Self {
        let mut h = Self::with_neighbours();
        h.hear(A, &[update(ORIGIN, 7, 200)]);
        h.run(Duration::from_secs(1));
        assert!(h.installed_via(A), "{:?}", h.r.installed(dest(), None));
        h
    }

    fn hear(&mut self, i: IfaceId, tlvs: &[Tlv]) {
        let bytes = packet(tlvs);
        self.r
            .handle_packet(self.now, self.now, i, IpAddr::V6(theirs(i)), &bytes);
    }

    fn hear_hello(&mut self, i: IfaceId) {
        let s = &mut self.hello_seqno[i.0 as usize];
        *s = s.wrapping_add(1);
        let seqno = *s;
        self.hear(
            i,
            &[
                Tlv::Hello {
                    flags: 0,
                    seqno,
                    interval: 30,
                    timestamp: None,
                },
                Tlv::Ihu {
                    ae: 3,
                    rxcost: 96,
                    interval: 90,
                    address: Some(IpAddr::V6(ours(i))),
                    timestamp: None,
                },
            ],
        );
    }

    /// Advances the clock by `d`, firing timers, with both neighbours
    /// saying Hello every interval.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let t = self.r.poll_timeout().map_or(end, |t| t.min(end));
            let t = t.min(self.next_hello).max(self.now);
            self.now = t;
            if t >= self.next_hello {
                if self.hello_seqno.iter().any(|s| *s != 0) {
                    for i in [A, B] {
                        self.hear_hello(i);
                    }
                }
                self.next_hello = t + HELLO;
            }
            self.r.handle_timeout(t);
            if t >= end {
                return;
            }
        }
    }

    /// Everything sent so far, as (interface, destination, TLV).
    fn sent(&mut self) -> Vec<(IfaceId, Destination, Tlv)> {
        let mut out = Vec::new();
        while let Some(t) = self.r.poll_transmit() {
            let p = wire::parse(&t.bytes).unwrap_or_else(|e| panic!("{e}"));
            out.extend(p.body.into_iter().map(|tlv| (t.iface, t.dst, tlv)));
        }
        out
    }

    fn changes(&mut self) -> Vec<RouteChange> {
        std::iter::from_fn(|| self.r.poll_route_change()).collect()
    }

    fn drain(&mut self) {
        self.sent();
        self.changes();
    }

    fn installed_via(&self, i: IfaceId) -> bool {
        matches!(self.r.installed(dest(), None), Some(InstalledRoute::Via { iface, .. }) if iface == i)
    }
}

/// A Seqno Request for dest under ORIGIN.
fn request_for_dest(seqno: u16, hop_count: u8) -> Tlv {
    Tlv::SeqnoRequest {
        ae: 2,
        seqno,
        hop_count,
        router_id: ORIGIN,
        prefix: dest(),
        src_prefix: None,
    }
}

fn seqno_requests(sent: &[(IfaceId, Destination, Tlv)]) -> Vec<(IfaceId, u16, u8)> {
    sent.iter()
        .filter_map(|(i, _, t)| match t {
            Tlv::SeqnoRequest {
                seqno, hop_count, ..
            } => Some((*i, *seqno, *hop_count)),
            _ => None,
        })
        .collect()
}

fn updates_for_dest(sent: &[(IfaceId, Destination, Tlv)]) -> Vec<(IfaceId, u16, u16)> {
    sent.iter()
        .filter_map(|(i, _, t)| match t {
            Tlv::Update {
                prefix: Some(p),
                seqno,
                metric,
                ..
            } if *p == dest() => Some((*i, *seqno, *metric)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_unfeasible_update_from_the_successor_keeps_the_route_and_asks_for_a_seqno() {
    let mut h = Harness::with_route_via_a();
    h.drain();
    // Upstream RTT rose: same router-id and seqno, metric far higher.
    h.hear(A, &[update(ORIGIN, 7, 2000)]);
    let sent = h.sent();
    assert!(h.installed_via(A), "the route must stay installed");
    assert!(
        !h.changes().iter().any(|c| matches!(
            c,
            RouteChange::Remove { .. } | RouteChange::Unreachable { .. }
        )),
        "no black hole"
    );
    assert_eq!(seqno_requests(&sent), vec![(A, 8, 64)], "{sent:?}");
    // The new seqno makes it feasible: taken at once.
    h.hear(A, &[update(ORIGIN, 8, 2000)]);
    let info = h.r.routes(h.now);
    assert_eq!(info[0].seqno, 8);
    assert_eq!(info[0].metric, 2096);
    assert!(h.installed_via(A));
}

#[test]
fn an_unfeasible_update_that_would_be_selected_is_asked_for() {
    let mut h = Harness::with_route_via_a();
    // B offers a much better route, but with an old seqno: unfeasible.
    h.hear(B, &[update(ORIGIN, 7, 10)]);
    h.run(Duration::from_millis(20));
    h.drain();
    h.hear(B, &[update(ORIGIN, 6, 10)]);
    let sent = h.sent();
    assert_eq!(seqno_requests(&sent), vec![(B, 8, 64)], "{sent:?}");
}

#[test]
fn a_restarted_origin_with_an_old_seqno_is_asked_for_a_newer_one() {
    // Starved of dest, we hear it again from A with a seqno older than
    // our feasibility distance (a restart without a persisted seqno).
    let mut h = Harness::with_route_via_a();
    h.hear(A, &[update(ORIGIN, 7, INFINITY)]);
    h.run(Duration::from_secs(1));
    assert!(matches!(
        h.r.installed(dest(), None),
        Some(InstalledRoute::Unreachable)
    ));
    h.drain();
    h.hear(A, &[update(ORIGIN, 5, 200)]);
    let sent = h.sent();
    assert_eq!(seqno_requests(&sent), vec![(A, 8, 64)]);
    assert!(!h.installed_via(A), "unfeasible, not selected");
}

#[test]
fn a_starved_destination_keeps_asking_with_back_off() {
    let mut h = Harness::with_route_via_a();
    h.hear(A, &[update(ORIGIN, 7, INFINITY)]);
    h.hear(A, &[update(ORIGIN, 5, 200)]);
    h.drain();
    let mut times = Vec::new();
    let start = h.now;
    for _ in 0..200 {
        h.run(Duration::from_millis(100));
        // A keeps announcing the old seqno (periodic updates).
        if times.len() % 2 == 0 {
            h.hear(A, &[update(ORIGIN, 5, 200)]);
        }
        if !seqno_requests(&h.sent()).is_empty() {
            times.push(h.now.duration_since(start));
        }
    }
    assert!(times.len() >= 5, "still asking after 3 tries: {times:?}");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.last() > gaps.first(), "back-off grows: {gaps:?}");
}

#[test]
fn seqno_requests_move_our_seqno_by_one_and_absurd_ones_are_refused() {
    let mut h = Harness::with_neighbours();
    let mine = net("fd00:1:0:1::/64");
    h.r.export(mine, None, h.now);
    h.run(Duration::from_millis(50));
    h.drain();
    let request = |seqno: u16, hop_count: u8| Tlv::SeqnoRequest {
        ae: 2,
        seqno,
        hop_count,
        router_id: OURS,
        prefix: mine,
        src_prefix: None,
    };
    h.hear(A, &[request(150, 10)]);
    assert_eq!(h.r.seqno(), 101, "one more, not what was asked");
    h.hear(A, &[request(101, 10)]);
    assert_eq!(h.r.seqno(), 101, "already satisfied");
    h.hear(A, &[request(300, 10)]);
    assert_eq!(h.r.seqno(), 101, "more than 100 ahead");
    h.hear(A, &[request(102, 0)]);
    assert_eq!(h.r.seqno(), 101, "no hops left");
    let drops = &h.r.stats().drops;
    assert_eq!(drops.get(&DropReason::SeqnoRequestTooFar), Some(&1));
    assert_eq!(drops.get(&DropReason::SeqnoRequestNoHops), Some(&1));
    // The answer goes out on A only.
    h.run(Duration::from_millis(50));
    let sent = h.sent();
    let answers: Vec<IfaceId> = sent
        .iter()
        .filter(|(_, _, t)| matches!(t, Tlv::Update { prefix: Some(p), .. } if *p == mine))
        .map(|(i, _, _)| *i)
        .collect();
    assert!(
        !answers.is_empty() && answers.iter().all(|i| *i == A),
        "{answers:?}"
    );
}

#[test]
fn a_request_we_cannot_satisfy_is_forwarded_and_its_answer_goes_to_the_requester_only() {
    let mut h = Harness::with_route_via_a();
    h.drain();
    h.hear(B, &[request_for_dest(8, 10)]);
    assert_eq!(seqno_requests(&h.sent()), vec![(A, 8, 9)]);
    // The answer from A: urgent, towards B only.
    h.hear(A, &[update(ORIGIN, 8, 200)]);
    h.run(Duration::from_millis(30));
    let ups = updates_for_dest(&h.sent());
    assert!(ups.contains(&(B, 8, 296)), "{ups:?}");
    assert!(!ups.iter().any(|(i, _, _)| *i == A), "{ups:?}");
}

#[test]
fn a_request_is_forwarded_even_without_a_selected_route() {
    let mut h = Harness::with_route_via_a();
    // Retracted by A, then re-announced with an older seqno: unfeasible.
    h.hear(A, &[update(ORIGIN, 7, INFINITY)]);
    h.hear(A, &[update(ORIGIN, 5, 200)]);
    h.drain();
    h.hear(B, &[request_for_dest(8, 10)]);
    assert_eq!(seqno_requests(&h.sent()), vec![(A, 8, 9)]);
}

#[test]
fn a_new_seqno_is_not_flooded_unless_someone_asked() {
    let mut h = Harness::with_route_via_a();
    h.run(Duration::from_millis(300));
    h.drain();
    h.hear(A, &[update(ORIGIN, 8, 200)]);
    h.run(Duration::from_millis(100));
    assert!(updates_for_dest(&h.sent()).is_empty());
}

#[test]
fn a_lost_route_is_held_unreachable_then_removed_and_its_retraction_is_resent() {
    let mut h = Harness::with_route_via_a();
    h.drain();
    h.hear(A, &[update(ORIGIN, 7, INFINITY)]);
    assert_eq!(h.changes(), vec![RouteChange::Unreachable { key: key() }]);
    h.run(Duration::from_secs(2));
    let retractions: Vec<_> = updates_for_dest(&h.sent())
        .into_iter()
        .filter(|(i, _, m)| *i == B && *m == INFINITY)
        .collect();
    assert!(
        retractions.len() >= 3,
        "urgent, then resent twice: {retractions:?}"
    );
    h.run(RETRACT_HOLD);
    assert_eq!(h.changes(), vec![RouteChange::Remove { key: key() }]);
    assert_eq!(h.r.installed(dest(), None), None);
}

#[test]
fn the_input_filter_refuses_and_counts() {
    let mut h = Harness::with_neighbours();
    let bad = |p: &str, s: Option<&str>| Tlv::Update {
        ae: 2,
        flags: 0,
        omitted: 0,
        interval: 400,
        seqno: 1,
        metric: 100,
        prefix: Some(net(p)),
        src_prefix: s.map(net),
        router_id: Some(ORIGIN),
        next_hop: None,
    };
    h.hear(A, &[bad("ff02::/16", None)]);
    h.hear(A, &[bad("2001:db8::/32", None)]);
    h.hear(A, &[bad("fd00:1:0:9:8000::/65", None)]);
    h.hear(A, &[bad("::/0", None)]);
    h.hear(A, &[bad("::/0", Some("fd00:1::/48"))]);
    let drops = &h.r.stats().drops;
    for r in [
        DropReason::Martian,
        DropReason::OutsideNetwork,
        DropReason::TooSpecific,
        DropReason::DefaultRoute,
    ] {
        assert_eq!(drops.get(&r), Some(&1), "{r}");
    }
    let learned: Vec<IpNet> = h.r.routes(h.now).iter().map(|r| r.prefix).collect();
    assert_eq!(learned, vec![net("::/0")], "only the gateway route");
}

#[test]
fn a_prefix_is_learned_only_from_the_router_id_it_is_bound_to() {
    let mut h = Harness::with_neighbours();
    // dest() is bound to the router-id of its first 64 bits.
    h.r.cfg.filter.origin = Origin::NodePrefix;
    let bound = node_router_id("fd00:1:0:9::/64".parse().unwrap_or_default());
    h.hear(A, &[update(ORIGIN, 1, 100)]);
    assert_eq!(h.r.stats().drops.get(&DropReason::WrongOrigin), Some(&1));
    assert_eq!(h.r.installed(dest(), None), None);
    h.hear(B, &[update(bound, 1, 100)]);
    h.run(Duration::from_millis(10));
    assert!(h.r.installed(dest(), None).is_some(), "the owner's route");
    // A retraction carries no claim and is not refused.
    h.hear(A, &[update(ORIGIN, 2, INFINITY)]);
    assert_eq!(h.r.stats().drops.get(&DropReason::WrongOrigin), Some(&1));
}

#[test]
fn a_finite_update_without_router_id_is_refused() {
    let mut h = Harness::with_neighbours();
    let bytes = {
        // An Update with no Router-Id TLV before it.
        let mut b = vec![42, 2, 0, 0];
        let body: Vec<u8> = {
            let mut v = vec![8u8, 0, 2, 0, 64, 0, 0x01, 0x90, 0, 7, 0, 200];
            v[1] = 12 + 8 - 2;
            v.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 9]);
            v
        };
        b[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend(body);
        b
    };
    h.r.handle_packet(h.now, h.now, A, IpAddr::V6(theirs(A)), &bytes);
    assert_eq!(h.r.stats().drops.get(&DropReason::NoRouterId), Some(&1));
    assert!(h.r.routes(h.now).is_empty());
}

#[test]
fn the_first_packet_on_an_interface_retracts_everything_and_asks_for_everything() {
    let now = Instant::now();
    let mut r = Router::new(RouterConfig::new(OURS, [1; 32]), now);
    r.add_interface(A, InterfaceConfig::tunnel(HELLO), now);
    r.handle_timeout(now);
    let t = r.poll_transmit().unwrap_or_else(|| panic!("nothing sent"));
    let p = wire::parse(&t.bytes).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(p.body[0], Tlv::Hello { .. }));
    assert!(p.body.iter().any(|t| matches!(
        t,
        Tlv::Update {
            prefix: None,
            metric: INFINITY,
            ..
        }
    )));
    assert!(p
        .body
        .iter()
        .any(|t| matches!(t, Tlv::RouteRequest { prefix: None, .. })));
}

#[test]
fn with_macs_on_nothing_is_sent_before_the_link_local_is_known() {
    let now = Instant::now();
    let key = crate::auth::Key::new(crate::auth::Algorithm::HmacSha256, vec![7; 32])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = RouterConfig::new(OURS, [1; 32]);
    cfg.auth = Some(crate::auth::AuthConfig {
        sign: key.clone(),
        accept: vec![key],
    });
    let mut r = Router::new(cfg, now);
    r.add_interface(A, InterfaceConfig::tunnel(HELLO), now);
    r.handle_timeout(now);
    assert!(r.poll_transmit().is_none());
    assert!(r.stats().drops.contains_key(&DropReason::NoLinkLocal));
    assert!(r.lacks_link_local(A));
    r.set_link_local(A, ours(A));
    r.handle_timeout(now + HELLO * 2);
    assert!(r.poll_transmit().is_some());
}

/// An interface that requires MACs neither sends nor accepts anything
/// before keys are set (a member on a tunnel cannot feed a keyless node
/// routes); once they are, it runs.
#[test]
fn without_keys_an_interface_that_requires_them_stays_silent() {
    let now = Instant::now();
    let mut open = Router::new(RouterConfig::new(OURS, [2; 32]), now);
    open.add_interface(A, InterfaceConfig::tunnel(HELLO), now);
    open.handle_timeout(now);
    let hello = open
        .poll_transmit()
        .unwrap_or_else(|| panic!("nothing sent"));
    let mut r = Router::new(RouterConfig::new(OURS, [1; 32]), now);
    let mut cfg = InterfaceConfig::tunnel(HELLO);
    cfg.requires_auth = true;
    r.add_interface(A, cfg, now);
    r.set_link_local(A, ours(A));
    r.handle_timeout(now);
    assert!(r.poll_transmit().is_none());
    let peer: IpAddr = "fe80::2".parse().unwrap_or_else(|_| panic!());
    r.handle_packet(now, now, A, peer, &hello.bytes);
    assert!(
        r.neighbours().is_empty(),
        "an unauthenticated Hello is not a neighbour"
    );
    assert!(
        r.stats()
            .drops
            .get(&DropReason::NoKeys)
            .copied()
            .unwrap_or(0)
            >= 2
    );
    let key = crate::auth::Key::new(crate::auth::Algorithm::HmacSha256, vec![7; 32])
        .unwrap_or_else(|e| panic!("{e}"));
    r.set_auth(Some(crate::auth::AuthConfig {
        sign: key.clone(),
        accept: vec![key],
    }));
    r.handle_timeout(now + HELLO * 2);
    assert!(r.poll_transmit().is_some());
}

#[test]
fn the_same_seed_gives_the_same_packets() {
    let run = || {
        let mut h = Harness::with_route_via_a();
        h.run(Duration::from_secs(5));
        h.sent()
            .into_iter()
            .map(|(i, d, t)| format!("{i:?}{d:?}{t:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

/// The instants at which each interface sent a Hello, over `d` from `h`.
fn hello_times(h: &mut Harness, d: Duration) -> BTreeMap<IfaceId, Vec<Instant>> {
    let end = h.now + d;
    let mut out: BTreeMap<IfaceId, Vec<Instant>> = BTreeMap::new();
    while let Some(t) = h.r.poll_timeout().filter(|t| *t <= end) {
        h.now = t.max(h.now);
        h.r.handle_timeout(h.now);
        for (i, _, tlv) in h.sent() {
            if matches!(tlv, Tlv::Hello { .. }) {
                out.entry(i).or_default().push(h.now);
            }
        }
    }
    out
}

#[test]
fn aligned_interfaces_say_hello_in_the_same_wake_up() {
    let mut h = Harness::with_neighbours();
    let times = hello_times(&mut h, Duration::from_secs(3));
    assert!(times[&A].len() >= 5, "{times:?}");
    assert_eq!(times[&A], times[&B]);
    // Not aligned: each interface keeps its own jittered phase.
    let mut h = Harness::with_neighbours();
    for i in [A, B] {
        let mut c = InterfaceConfig::tunnel(HELLO);
        c.aligned = false;
        c.link_local = Some(ours(i));
        h.r.add_interface(i, c, h.now);
    }
    let times = hello_times(&mut h, Duration::from_secs(3));
    assert_ne!(times[&A], times[&B]);
}
