//! Any bytes as packets from a link-local neighbour into a running router,
//! interleaved with timeouts. The first byte chooses MACs on or off; with
//! MACs on, the harness plays an honest neighbour that holds the key: it
//! signs each fuzzed body with a growing packet counter and answers the
//! router's challenges, so the fuzzed TLVs reach the routing code.
#![no_main]
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use re6st_routing::auth::{Algorithm, Auth, AuthConfig, Key};
use re6st_routing::ipv4_map::Ipv4Map;
use re6st_routing::neighbour::IfaceId;
use re6st_routing::router::{Filter, InterfaceConfig, Origin, Router, RouterConfig};
use re6st_routing::wire::{self, PacketWriter, Tlv};

const OURS: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const PEER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

fn keys() -> AuthConfig {
    let k = Key::new(Algorithm::HmacSha256, vec![7; 32]).unwrap_or_else(|e| panic!("{e}"));
    AuthConfig {
        sign: k.clone(),
        accept: vec![k],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let hmac = mode & 1 == 1;
    let t0 = Instant::now();
    let mut cfg = RouterConfig::new([2, 0, 0, 0, 0, 0, 0, 1], [mode; 32]);
    cfg.filter = Filter {
        networks: if mode & 2 == 2 {
            vec!["fd00::/8".parse().unwrap_or_else(|e| panic!("{e}"))]
        } else {
            Vec::new()
        },
        max_plen: (mode & 4 == 4).then_some(64),
        default_from: Vec::new(),
        origin: if mode & 8 == 8 {
            Origin::NodePrefix
        } else {
            Origin::Any
        },
        ipv4: (mode & 16 == 16).then(|| {
            Ipv4Map::new(
                "fd00::/8".parse().unwrap_or_else(|e| panic!("{e}")),
                "198.19.0.0/16".parse().unwrap_or_else(|e| panic!("{e}")),
                16,
            )
            .unwrap_or_else(|e| panic!("{e}"))
        }),
    };
    cfg.auth = hmac.then(keys);
    let mut r = Router::new(cfg, t0);
    let mut icfg = InterfaceConfig::tunnel(Duration::from_millis(300));
    icfg.link_local = Some(OURS);
    r.add_interface(IfaceId(1), icfg, t0);
    r.export(
        "fd00:1::/64".parse().unwrap_or_else(|e| panic!("{e}")),
        None,
        t0,
    );
    let peer = Auth::new(keys());
    let mut pc = 0u32;
    let mut nonce: Option<Vec<u8>> = None;
    let mut now = t0;
    for chunk in data.split(|b| *b == 0xfe) {
        now += Duration::from_millis(u64::from(chunk.first().copied().unwrap_or(0)) * 4);
        let bytes = if hmac {
            // The fuzzed bytes are the body; header, PC and MAC are ours.
            let mut w = PacketWriter::new(65_535);
            if let Ok(p) =
                wire::parse(&[&[42u8, 2][..], &(chunk.len() as u16).to_be_bytes(), chunk].concat())
            {
                for t in &p.body {
                    let _ = w.push(t, 0);
                }
            }
            if let Some(n) = nonce.take() {
                let _ = w.push(&Tlv::ChallengeReply(n), 0);
            }
            pc += 1;
            let _ = w.push(
                &Tlv::Pc {
                    pc,
                    index: vec![9; 8],
                },
                0,
            );
            let body = w.body();
            let dst = if chunk.len() % 2 == 0 {
                wire::MULTICAST
            } else {
                OURS
            };
            let mac = peer.sign(PEER, dst, &body);
            w.finish(&[Tlv::Mac(mac)])
        } else {
            chunk.to_vec()
        };
        r.handle_packet(now, now, IfaceId(1), IpAddr::V6(PEER), &bytes);
        r.handle_timeout(now);
        while let Some(t) = r.poll_transmit() {
            // Every packet the router sends parses.
            let p = match wire::parse(&t.bytes) {
                Ok(p) => p,
                Err(e) => panic!("the router sent an unparsable packet: {e}"),
            };
            for tlv in p.body {
                if let Tlv::ChallengeRequest(n) = tlv {
                    nonce = Some(n);
                }
            }
        }
        while r.poll_route_change().is_some() {}
    }
    let _ = r.routes(now);
    let _ = r.neighbours();
});
