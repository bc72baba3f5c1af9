//! The WireGuard data plane in namespaces: two hosts over the emulated
//! Internet build a tunnel (boringtun, one tun device each), ping over it,
//! run Babel over it, and the device disappears when the link is closed.

use std::net::{Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use netns_tests::babel::{ours, reaches, stub};
use netns_tests::probe::{parse_ping, wait_until};
use netns_tests::testing::{check, run_suite};
use netns_tests::{Error, LinkParams, Net, Result, Topology};
use re6st_registry::config::{random_bytes, x25519_public};
use re6st_tunnel::endpoint::{Endpoint, Transport};
use re6st_tunnel::plane::{Event, Plane};
use re6st_tunnel::policy::Peer;
use re6st_tunnel::setup::{
    check_reply, request, Decision, Identity, Outcome, Reply, Responder, SetupError,
};

fn prefix(s: &str) -> Result<Peer> {
    s.parse().map_err(|_| Error::Measure(format!("prefix {s}")))
}

fn secret() -> Result<[u8; 32]> {
    random_bytes::<32>().map_err(|e| Error::Measure(e.to_string()))
}

/// Starts a data plane in `host` with one link; returns it and its events.
fn plane_in(
    host: &netns_tests::Host,
    secret: [u8; 32],
    peer: Peer,
    peer_key: [u8; 32],
    endpoint: Option<SocketAddr>,
    name: &'static str,
    link_local: Ipv6Addr,
) -> Result<(Plane, mpsc::Receiver<Event>, u32)> {
    let (tx, rx) = mpsc::channel();
    let plane = host.in_ns(move || -> std::result::Result<(Plane, u32), String> {
        let p = Plane::start(
            "[::]:326".parse().map_err(|_| "addr".to_string())?,
            secret,
            re6st_tunnel::plane::channel_sink(tx),
            (),
        )
        .map_err(|e| e.to_string())?;
        let (i, _) = p
            .add_link(
                peer,
                peer_key,
                endpoint.map(Endpoint::udp),
                name,
                1420,
                link_local,
            )
            .map_err(|e| e.to_string())?;
        Ok((p, i))
    })?;
    let (p, i) = plane.map_err(Error::Measure)?;
    Ok((p, rx, i))
}

fn tunnel_over_the_wan() -> Result<()> {
    let mut t = Topology::new("wgpair");
    t.host("a")
        .host("b")
        .wan_both("a", "b", LinkParams::delay_ms(10));
    let net = Net::build(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let (sa, sb) = (secret()?, secret()?);
    let (pa, pb) = (prefix("fd5e:0:0:1::/64")?, prefix("fd5e:0:0:2::/64")?);
    let ll_a = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa);
    let ll_b = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb);
    let b_ep = SocketAddr::new(b.addr(true)?, 326);
    let (plane_b, _rx_b, _) = plane_in(b, sb, pa, x25519_public(&sa), None, "wg-a", ll_b)?;
    let (plane_a, rx_a, ia) = plane_in(a, sa, pb, x25519_public(&sb), Some(b_ep), "wg-b", ll_a)?;
    let dst = "fe80::b%wg-b";
    let (_, took) = wait_until(
        "a ping over the tunnel",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            a.output("ping", &["-6", "-c", "1", "-W", "1", dst])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    )?;
    eprintln!("tunnel: first ping over WireGuard {took:?} after start");
    let up = rx_a
        .recv_timeout(Duration::from_secs(2))
        .map_err(|_| Error::Measure("no Up event".into()))?;
    check(up == Event::Up(pb), format!("event {up:?}"))?;
    let out = a.run("ping", &["-6", "-c", "5", "-i", "0.1", "-q", dst])?;
    let stats = parse_ping(&String::from_utf8_lossy(&out.stdout))?;
    let avg = stats.avg.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    eprintln!("tunnel: RTT over the tunnel {avg:.2} ms (WAN 2 x 10 ms)");
    check(
        stats.received == 5 && (20.0..30.0).contains(&avg),
        format!("{stats:?}"),
    )?;
    // Babel over the tunnel: stubs learned both ways.
    stub(a, "fd00:5a::1")?;
    stub(b, "fd00:5b::1")?;
    let _ra = ours(a, &["wg-b"], "fd00:5a::1", &[])?;
    let _rb = ours(b, &["wg-a"], "fd00:5b::1", &[])?;
    let (_, took) = wait_until(
        "a to reach b's stub through the tunnel",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || reaches(a, "fd00:5b::1").then_some(()),
    )?;
    eprintln!("tunnel: Babel over WireGuard routed b's prefix after {took:?}");
    // Closing the link parks its device for a later link; dropping the
    // parked device removes it.
    plane_a.remove_link(ia);
    let (parked, _) = wait_until(
        "wg-b to be parked",
        Duration::from_secs(2),
        Duration::from_millis(20),
        || plane_a.take_parked(),
    )?;
    check(parked.name == "wg-b", format!("parked {}", parked.name))?;
    // A new link to b reuses it, renamed (as the daemon does).
    let reused = a
        .in_ns(move || re6st_tunnel::tun::reuse(parked, "wg-b2", 1420, ll_a))?
        .map_err(|e| Error::Measure(e.to_string()))?;
    plane_a
        .attach(
            pb,
            x25519_public(&sb),
            Some(Endpoint::udp(b_ep)),
            reused,
            ll_a,
        )
        .map_err(|e| Error::Measure(e.to_string()))?;
    wait_until(
        "a ping over the reused device",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            a.output("ping", &["-6", "-c", "1", "-W", "1", "fe80::b%wg-b2"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    )?;
    check(
        a.output("ip", &["link", "show", "wg-b"])?.status.code() != Some(0),
        "wg-b was renamed",
    )?;
    // Statistics are published with the WireGuard timers.
    std::thread::sleep(Duration::from_millis(300));
    check(
        plane_b.dropped() == 0,
        format!("b dropped {:?}", plane_b.published().dropped),
    )
}

/// A node identity issued by `ca`, with its WireGuard secret.
fn identity(ca: &re6st_registry::cert::Ca, i: u16) -> Result<(Identity, [u8; 32])> {
    let wg = secret()?;
    let prefix = prefix(&format!("fd5e:0:0:{i:x}::/64"))?;
    let id = Identity::issued(
        ca,
        prefix,
        u64::from(i),
        x25519_public(&wg),
        re6st_registry::server::now(),
    )
    .map_err(|e| Error::Measure(e.to_string()))?;
    Ok((id, wg))
}

/// The whole set-up on the tunnel port, over IPv4 underlay: a sends a
/// signed request through its data plane; b's responder checks it and
/// accepts; b adds a link for the key in a's certificate and answers; a
/// checks the answer and adds its link with the key from b's certificate;
/// the handshake follows and packets flow.
fn setup_then_handshake_over_ipv4() -> Result<()> {
    setup_then_handshake(Transport::Udp)
}

/// The same over TCP, with every UDP datagram to b dropped: requests,
/// answers, handshakes and packets all go in frames on one connection;
/// before, host m opened 40 connections to b and sent garbage on them:
/// b kept 8 of them, and a's connection still got in.
fn setup_then_handshake_over_tcp_with_udp_blocked() -> Result<()> {
    setup_then_handshake(Transport::Tcp)
}

/// Connections from `m` to `to`, each sent a junk frame; kept open.
fn tcp_junk(m: &netns_tests::Host, to: SocketAddr, n: usize) -> Result<Vec<std::net::TcpStream>> {
    m.in_ns(move || {
        (0..n)
            .filter_map(|i| {
                let mut c =
                    std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
                let junk = [0u8, 4, 1, 0, 0, i as u8];
                std::io::Write::write_all(&mut c, &junk).ok()?;
                Some(c)
            })
            .collect()
    })
}

fn setup_then_handshake(transport: Transport) -> Result<()> {
    let mut t = Topology::new(match transport {
        Transport::Udp => "wgsetup",
        Transport::Tcp => "wgtcp",
    });
    t.host("a")
        .host("b")
        .host("m")
        .wan_both("a", "b", LinkParams::delay_ms(5));
    let net = Net::build(&t)?;
    let (a, b) = (net.host("a")?, net.host("b")?);
    let now = re6st_registry::server::now();
    let ca = re6st_registry::cert::Ca::generate(prefix("fd5e::/48")?, now - 100, 10)
        .map_err(|e| Error::Measure(e.to_string()))?;
    let (id_a, wg_a) = identity(&ca, 1)?;
    let (id_b, wg_b) = identity(&ca, 2)?;
    let (pa, pb) = (id_a.cert.prefix, id_b.cert.prefix);
    let b_ep = Endpoint {
        addr: SocketAddr::new(b.addr(false)?, 326),
        transport,
    };
    if transport == Transport::Tcp {
        let rules = "table inet r6tnoudp {\n chain in {\n  type filter hook input priority 0;\n  meta l4proto udp drop\n }\n}\n";
        b.nft(rules)?;
    }
    let start = |h: &netns_tests::Host, wg: [u8; 32]| -> Result<(Plane, mpsc::Receiver<Event>)> {
        let (tx, rx) = mpsc::channel();
        let p = h.in_ns(move || {
            Plane::start(
                "0.0.0.0:326"
                    .parse()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 326))),
                wg,
                re6st_tunnel::plane::channel_sink(tx),
                (),
            )
            .map_err(|e| e.to_string())
        })?;
        Ok((p.map_err(Error::Measure)?, rx))
    };
    let (plane_a, rx_a) = start(a, wg_a)?;
    let (plane_b, rx_b) = start(b, wg_b)?;
    let junk = match transport {
        Transport::Tcp => tcp_junk(net.host("m")?, b_ep.addr, 40)?,
        Transport::Udp => Vec::new(),
    };
    let mut responder = Responder::new(ca.cert().clone(), id_b);
    let (req, nonce) = request(&id_a, pb, now).map_err(|e| Error::Measure(e.to_string()))?;
    plane_a
        .send(b_ep, req.clone())
        .map_err(|e| Error::Measure(e.to_string()))?;
    let Ok(Event::Control { src, bytes }) = rx_b.recv_timeout(Duration::from_secs(3)) else {
        return Err(Error::Measure("b got no set-up request".into()));
    };
    let Outcome::Accepted { peer, reply } =
        responder.handle(std::time::Instant::now(), now, src.addr, &bytes, |_| {
            Decision::Accept
        })
    else {
        return Err(Error::Measure("b did not accept".into()));
    };
    check(peer.prefix == pa, "the request names a")?;
    check(
        src.transport == transport,
        format!("the request came over {:?}", src.transport),
    )?;
    let (ll_a, ll_b) = (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa),
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb),
    );
    // b expects a handshake from the key in a's certificate only.
    let (wg_key_a, pb2) = (peer.wg_key, pa);
    let ib = b.in_ns({
        let p = std::sync::Arc::new(plane_b);
        let p2 = std::sync::Arc::clone(&p);
        move || {
            (
                p2.add_link(pb2, wg_key_a, None, "wg-a", 1420, ll_b)
                    .map_err(|e| e.to_string()),
                p,
            )
        }
    })?;
    let (added_b, plane_b) = ib;
    added_b.map_err(Error::Measure)?;
    plane_b
        .send(src, reply)
        .map_err(|e| Error::Measure(e.to_string()))?;
    let Ok(Event::Control { bytes, .. }) = rx_a.recv_timeout(Duration::from_secs(3)) else {
        return Err(Error::Measure("a got no answer".into()));
    };
    let cert_b = match check_reply(ca.cert(), &[], pb, &nonce, now, &bytes).map(|a| a.reply) {
        Ok(Reply::Accepted(c)) => c,
        other => return Err(Error::Measure(format!("answer {other:?}"))),
    };
    let plane_a = std::sync::Arc::new(plane_a);
    let p = std::sync::Arc::clone(&plane_a);
    a.in_ns(move || {
        p.add_link(pb, cert_b.wg_key, Some(b_ep), "wg-b", 1420, ll_a)
            .map_err(|e| e.to_string())
    })?
    .map_err(Error::Measure)?;
    let (_, took) = wait_until(
        "a ping over the set-up tunnel",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            a.output("ping", &["-6", "-c", "1", "-W", "1", "fe80::b%wg-b"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    )?;
    eprintln!(
        "setup: request, accept, handshake and first ping over IPv4 underlay ({}) in {took:?}",
        transport.label()
    );
    // Published with the WireGuard timers, four times a second.
    wait_until(
        "a's link to b's endpoint",
        Duration::from_secs(2),
        Duration::from_millis(50),
        || {
            let via = plane_a.links().into_iter().find_map(|l| l.endpoint);
            (via == Some(b_ep)).then_some(())
        },
    )?;
    if transport == Transport::Tcp {
        let refused = plane_b.published().dropped.get("tcp_refused").copied();
        check(
            junk.len() == 40 && refused == Some(32),
            format!("{} junk connections, b refused {refused:?}", junk.len()),
        )?;
    }
    drop(junk);
    // A replay of the same request is refused.
    check(
        responder.handle(std::time::Instant::now(), now, src.addr, &req, |_| {
            Decision::Accept
        }) == Outcome::Dropped(SetupError::Replay),
        "replay accepted",
    )
}

fn main() -> ExitCode {
    run_suite(&[
        ("tunnel_over_the_wan", tunnel_over_the_wan),
        (
            "setup_then_handshake_over_ipv4",
            setup_then_handshake_over_ipv4,
        ),
        (
            "setup_then_handshake_over_tcp_with_udp_blocked",
            setup_then_handshake_over_tcp_with_udp_blocked,
        ),
    ])
}
