//! Babel in the node's data plane: the embedded router served in process
//! on every link (the reactor hands it decrypted Babel datagrams and
//! encrypts its output) and on LAN interfaces through kernel sockets the
//! reactor owns.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

use re6st_routing::driver::{self, Command, Status};
use re6st_routing::embedded::Embedded;
use re6st_routing::neighbour::IfaceId;
use re6st_routing::router::{Destination, InterfaceConfig, RoutingState};
use re6st_routing::wire::{MULTICAST, PORT};
use re6st_tunnel::inprocess::{InProcess, Transmit};
use tokio::sync::oneshot;

use crate::node::{RoutingView, SelectedRoute, Via};
use ipnet::IpNet;

/// The router, as the reactor drives it.
#[derive(Debug)]
pub struct BabelHost(pub Embedded);

impl InProcess for BabelHost {
    fn port(&self) -> u16 {
        PORT
    }

    fn serves(&self, ifindex: u32) -> bool {
        self.0.has_interface(IfaceId(ifindex))
    }

    fn handle_datagram(
        &mut self,
        now: Instant,
        rx_time: Instant,
        ifindex: u32,
        src: Ipv6Addr,
        payload: &[u8],
    ) {
        self.0
            .handle_packet(now, rx_time, IfaceId(ifindex), IpAddr::V6(src), payload);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.0.handle_timeout(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.0.poll_timeout()
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.0.poll_transmit()?;
        Some(Transmit {
            ifindex: t.iface.0,
            dst: match t.dst {
                Destination::Multicast => MULTICAST,
                Destination::Unicast(a) => a,
            },
            bytes: t.bytes,
        })
    }
}

/// The node's view of its router, through the data plane: interfaces by
/// name, commands run on the reactor, state copied back typed.
#[derive(Debug, Default)]
pub struct Routing {
    names: std::collections::BTreeMap<String, u32>,
}

/// How long the node waits for the reactor to answer.
const ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

impl Routing {
    fn call(
        plane: &Plane,
        f: impl FnOnce(&mut re6st_routing::router::Router, Instant) + Send + 'static,
    ) {
        let _ = plane.call(move |b, now| b.0.with_router(|r| f(r, now)));
    }

    /// Runs Babel on a link's tun device (its link-local address known).
    pub fn add_link(
        &mut self,
        plane: &Plane,
        name: &str,
        ifindex: u32,
        mut cfg: InterfaceConfig,
        link_local: Ipv6Addr,
    ) {
        self.names.insert(name.to_string(), ifindex);
        cfg.link_local = Some(link_local);
        Self::call(plane, move |r, now| {
            r.add_interface(IfaceId(ifindex), cfg, now)
        });
    }

    /// Runs Babel on a LAN interface, through a kernel socket the reactor
    /// owns.
    pub fn add_lan(
        &mut self,
        plane: &Plane,
        name: &str,
        mut cfg: InterfaceConfig,
    ) -> anyhow::Result<()> {
        let ifindex = driver::ifindex_of(name)?;
        let socket = driver::babel_socket(name, ifindex)?;
        plane.add_socket(ifindex, socket)?;
        self.names.insert(name.to_string(), ifindex);
        cfg.link_local = driver::link_local_of(name);
        Self::call(plane, move |r, now| {
            r.add_interface(IfaceId(ifindex), cfg, now)
        });
        Ok(())
    }

    /// LAN interfaces still without a link-local address get it when the
    /// kernel has one (after DAD).
    pub fn retry_link_local(&self, plane: &Plane, lans: &[String]) {
        for name in lans {
            let (Some(&ifindex), Some(ll)) = (self.names.get(name), driver::link_local_of(name))
            else {
                continue;
            };
            Self::call(plane, move |r, _| {
                if r.lacks_link_local(IfaceId(ifindex)) {
                    r.set_link_local(IfaceId(ifindex), ll);
                }
            });
        }
    }

    /// Applies a command (interfaces by name).
    pub fn send(&mut self, plane: &Plane, cmd: Command) {
        match cmd {
            Command::RemoveInterface(name) => {
                if let Some(i) = self.names.remove(&name) {
                    Self::call(plane, move |r, now| r.remove_interface(IfaceId(i), now));
                    plane.remove_socket(i);
                }
            }
            Command::SetCostMultiplier(name, m) => {
                if let Some(&i) = self.names.get(&name) {
                    Self::call(plane, move |r, now| {
                        r.set_cost_multiplier(IfaceId(i), m, now)
                    });
                }
            }
            Command::SetHelloInterval(name, d) => {
                if let Some(&i) = self.names.get(&name) {
                    Self::call(plane, move |r, now| {
                        r.set_hello_interval(IfaceId(i), d, now)
                    });
                }
            }
            Command::Export(p, s) => Self::call(plane, move |r, now| r.export(p, s, now)),
            Command::Unexport(p, s) => Self::call(plane, move |r, now| r.unexport(p, s, now)),
            Command::SetAuth(a) => Self::call(plane, move |r, _| r.set_auth(a)),
            Command::AddInterface(..) | Command::Status(_) | Command::Shutdown => {}
        }
    }

    /// The router's state, typed.
    pub async fn state(&self, plane: &Plane) -> Option<RoutingState> {
        let (tx, rx) = oneshot::channel();
        plane
            .call(move |b, now| {
                let _ = tx.send(b.0.state(now));
            })
            .ok()?;
        tokio::time::timeout(ANSWER, rx).await.ok()?.ok()
    }

    /// The core's view of a state: interfaces by name.
    pub fn view(&self, state: &RoutingState) -> RoutingView {
        let by_index: std::collections::BTreeMap<u32, &str> =
            self.names.iter().map(|(n, i)| (*i, n.as_str())).collect();
        let name = |i: IfaceId| by_index.get(&i.0).map(|n| (*n).to_string());
        RoutingView {
            heard: state
                .neighbours
                .iter()
                .filter(|n| n.history != 0)
                .filter_map(|n| name(n.iface))
                .collect(),
            selected: state
                .routes
                .iter()
                .filter(|r| r.selected)
                .filter_map(|r| match r.prefix {
                    IpNet::V6(prefix) => Some(SelectedRoute {
                        prefix,
                        via: name(r.iface).map_or(Via::Local, Via::Interface),
                        direct: r.refmetric == 0,
                    }),
                    IpNet::V4(_) => None,
                })
                .collect(),
        }
    }

    /// A state for the control API, with the interface names of now.
    pub fn snapshot(&self, state: RoutingState) -> RoutingSnapshot {
        RoutingSnapshot {
            state,
            names: self.names.iter().map(|(n, i)| (*i, n.clone())).collect(),
        }
    }

    /// Retracts everything and removes our kernel routes (waits at most a
    /// few seconds).
    pub async fn shutdown(&self, plane: &Plane) {
        let (tx, rx) = oneshot::channel();
        if plane
            .call(move |b, now| {
                let _ = tx.send(b.0.shutdown(now));
            })
            .is_err()
        {
            return;
        }
        if let Ok(Ok(flushed)) = tokio::time::timeout(ANSWER, rx).await {
            let _ = tokio::time::timeout(ANSWER * 2, flushed).await;
        }
    }
}

/// The node's data plane.
pub type Plane = re6st_tunnel::plane::Plane<BabelHost>;

/// The router's state as the control API keeps it: typed; text is made
/// only when someone asks.
#[derive(Clone, Debug, Default)]
pub struct RoutingSnapshot {
    /// The state.
    pub state: RoutingState,
    names: std::collections::BTreeMap<u32, String>,
}

impl RoutingSnapshot {
    /// The text form (interfaces by name).
    pub fn status(&self) -> Status {
        Status::from_state(&self.state, |i| {
            self.names
                .get(&i.0)
                .cloned()
                .unwrap_or_else(|| i.0.to_string())
        })
    }

    /// Selected routes.
    pub fn selected(&self) -> usize {
        self.state.routes.iter().filter(|r| r.selected).count()
    }
}
