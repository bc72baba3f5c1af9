//! Topology descriptions and their validation.
//!
//! A [`Topology`] is a pure description: hosts, LAN segments, direct veth links
//! and the WAN parameters between hosts. [`Topology::plan`] checks it and
//! assigns every address, before anything touches the kernel, so a bad
//! description is refused without creating a single namespace.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::error::TopologyError;

/// Longest one-way delay or jitter the emulator accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Most hosts one topology may have (the automatic address plan's limit).
pub const MAX_HOSTS: usize = 250;
/// Longest host name: interface names built from it must fit in 15 bytes.
pub const MAX_NAME_LEN: usize = 11;

/// The IPv4 range every underlay address must come from.
pub fn underlay_v4_range() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 15).unwrap_or_default()
}

/// The IPv6 range every underlay address must come from.
pub fn underlay_v6_range() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0), 8).unwrap_or_default()
}

/// What the WAN does to packets from one host to another (one direction).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkParams {
    /// One-way delay added to every packet.
    pub delay: Duration,
    /// Each packet's delay is drawn uniformly from `delay ± jitter` (never
    /// below zero). Packets of one direction are never reordered: a packet
    /// is never released before the one sent ahead of it.
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a packet is dropped.
    pub loss: f64,
    /// Drop everything: a broken Internet route.
    pub blackhole: bool,
}

impl LinkParams {
    /// A path with this one-way delay and nothing else.
    pub fn delay_ms(ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(ms),
            ..Self::default()
        }
    }

    /// The same path with this jitter.
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// The same path with this loss probability.
    pub fn with_loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// The same path, blackholed or not.
    pub fn with_blackhole(mut self, blackhole: bool) -> Self {
        self.blackhole = blackhole;
        self
    }

    /// Checks ranges: delay and jitter at most [`MAX_DELAY`], loss a number in `[0, 1]`.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.delay > MAX_DELAY {
            return Err(TopologyError::OutOfRange(format!(
                "delay {:?} exceeds the maximum {:?}",
                self.delay, MAX_DELAY
            )));
        }
        if self.jitter > MAX_DELAY {
            return Err(TopologyError::OutOfRange(format!(
                "jitter {:?} exceeds the maximum {:?}",
                self.jitter, MAX_DELAY
            )));
        }
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(TopologyError::OutOfRange(format!(
                "loss {} is not a probability in [0, 1]",
                self.loss
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct HostSpec {
    name: String,
    internet: bool,
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
}

#[derive(Clone, Debug)]
struct LanSpec {
    name: String,
    members: Vec<String>,
}

/// A network to build: hosts joined to the emulated Internet, LAN segments
/// and direct links, and the WAN parameters between hosts.
#[derive(Clone, Debug)]
pub struct Topology {
    tag: String,
    hosts: Vec<HostSpec>,
    lans: Vec<LanSpec>,
    links: Vec<(String, String, Option<LinkParams>)>,
    wan: Vec<(String, String, LinkParams)>,
    default_params: LinkParams,
}

impl Topology {
    /// A new, empty topology. `tag` (e.g. the test name) goes into the names
    /// of everything built, so leftovers can be traced to their test.
    pub fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_string(),
            hosts: Vec::new(),
            lans: Vec::new(),
            links: Vec::new(),
            wan: Vec::new(),
            default_params: LinkParams::default(),
        }
    }

    /// The tag given to [`Topology::new`].
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Adds a host joined to the Internet (the `inet` namespace) with
    /// automatically assigned underlay addresses.
    pub fn host(&mut self, name: &str) -> &mut Self {
        self.hosts.push(HostSpec {
            name: name.to_string(),
            internet: true,
            v4: None,
            v6: None,
        });
        self
    }

    /// Adds a host with no Internet uplink (reachable only over LANs and
    /// direct links).
    pub fn host_offline(&mut self, name: &str) -> &mut Self {
        self.hosts.push(HostSpec {
            name: name.to_string(),
            internet: false,
            v4: None,
            v6: None,
        });
        self
    }

    /// Adds an Internet host with explicit uplink addresses, given as the
    /// host's address with the uplink subnet's length (`198.18.40.2/24`).
    /// The Internet side of the uplink takes the subnet's first address.
    pub fn host_with_addrs(&mut self, name: &str, v4: Ipv4Net, v6: Ipv6Net) -> &mut Self {
        self.hosts.push(HostSpec {
            name: name.to_string(),
            internet: true,
            v4: Some(v4),
            v6: Some(v6),
        });
        self
    }

    /// Adds a LAN segment (a bridge in its own namespace) joining `members`.
    pub fn lan(&mut self, name: &str, members: &[&str]) -> &mut Self {
        self.lans.push(LanSpec {
            name: name.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
        });
        self
    }

    /// Adds a direct veth link between two hosts (not through the WAN emulator).
    pub fn link(&mut self, a: &str, b: &str) -> &mut Self {
        self.links.push((a.to_string(), b.to_string(), None));
        self
    }

    /// Adds a point-to-point link between two hosts made of a tun device at
    /// each end, with the emulator in between applying `params` in both
    /// directions (changeable live with `Net::link`). Its interfaces have a
    /// link-local address and carry link-local multicast, so routing
    /// protocols run over them like over a veth, but with delay and loss.
    pub fn link_emulated(&mut self, a: &str, b: &str, params: LinkParams) -> &mut Self {
        self.links
            .push((a.to_string(), b.to_string(), Some(params)));
        self
    }

    /// Sets the WAN parameters from `from` to `to` (one direction).
    pub fn wan(&mut self, from: &str, to: &str, params: LinkParams) -> &mut Self {
        self.wan.push((from.to_string(), to.to_string(), params));
        self
    }

    /// Sets the same WAN parameters in both directions between `a` and `b`.
    pub fn wan_both(&mut self, a: &str, b: &str, params: LinkParams) -> &mut Self {
        self.wan(a, b, params).wan(b, a, params)
    }

    /// Parameters of every pair not set with [`Topology::wan`].
    pub fn default_wan(&mut self, params: LinkParams) -> &mut Self {
        self.default_params = params;
        self
    }

    /// Checks the description and assigns every address. Nothing is created.
    pub fn plan(&self) -> Result<Plan, TopologyError> {
        if self.hosts.is_empty() {
            return Err(TopologyError::Invalid(
                "a topology needs at least one host".into(),
            ));
        }
        if self.hosts.len() > MAX_HOSTS {
            return Err(TopologyError::Invalid(format!(
                "{} hosts: at most {MAX_HOSTS} are supported",
                self.hosts.len()
            )));
        }
        let mut index = HashMap::new();
        for (i, h) in self.hosts.iter().enumerate() {
            check_name("host", &h.name)?;
            if index.insert(h.name.clone(), i).is_some() {
                return Err(TopologyError::Invalid(format!(
                    "host {:?} is declared twice",
                    h.name
                )));
            }
        }
        let lookup = |what: &str, name: &str| -> Result<usize, TopologyError> {
            index.get(name).copied().ok_or_else(|| {
                TopologyError::UnknownHost(format!("{what} names unknown host {name:?}"))
            })
        };

        let mut subnets = SubnetSet::default();
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for (i, h) in self.hosts.iter().enumerate() {
            let uplink = if h.internet {
                let v4 = match h.v4 {
                    Some(net) => net,
                    None => auto_v4(u32::try_from(i + 1).unwrap_or(u32::MAX) << 8, 24, 2)?,
                };
                let v6 = match h.v6 {
                    Some(net) => net,
                    None => auto_v6(0x0018, i + 1, 2)?,
                };
                let what = format!("uplink of host {:?}", h.name);
                let gw4 = gateway_v4(&what, v4)?;
                let gw6 = gateway_v6(&what, v6)?;
                subnets.add(&what, IpNet::V4(v4))?;
                subnets.add(&what, IpNet::V6(v6))?;
                Some(Uplink {
                    v4,
                    v6,
                    gw4,
                    gw6,
                    inet_iface: format!("h{}", i + 1),
                })
            } else {
                if h.v4.is_some() || h.v6.is_some() {
                    return Err(TopologyError::Invalid(format!(
                        "host {:?} has uplink addresses but no uplink",
                        h.name
                    )));
                }
                None
            };
            hosts.push(HostPlan {
                name: h.name.clone(),
                uplink,
                ifaces: Vec::new(),
            });
        }

        let mut lans = Vec::with_capacity(self.lans.len());
        let mut lan_names = HashSet::new();
        for (k, lan) in self.lans.iter().enumerate() {
            check_name("LAN", &lan.name)?;
            if !lan_names.insert(lan.name.clone()) {
                return Err(TopologyError::Invalid(format!(
                    "LAN {:?} is declared twice",
                    lan.name
                )));
            }
            if k >= 128 {
                return Err(TopologyError::Invalid(
                    "at most 128 LANs are supported".into(),
                ));
            }
            if lan.members.len() > 250 {
                return Err(TopologyError::Invalid(format!(
                    "LAN {:?} has {} members: at most 250",
                    lan.name,
                    lan.members.len()
                )));
            }
            let what = format!("LAN {:?}", lan.name);
            let net4 = auto_v4(0x0001_0000 | ((k as u32) << 8), 24, 0)?;
            let net6 = auto_v6(0x001a, k, 0)?;
            subnets.add(&what, IpNet::V4(net4))?;
            subnets.add(&what, IpNet::V6(net6))?;
            let mut members = Vec::new();
            let mut seen = HashSet::new();
            for (j, m) in lan.members.iter().enumerate() {
                let h = lookup(&what, m)?;
                if !seen.insert(h) {
                    return Err(TopologyError::Invalid(format!(
                        "{what} lists host {m:?} twice"
                    )));
                }
                let host_no = j as u32 + 1;
                let iface = IfacePlan {
                    name: format!("lan{k}"),
                    v4: with_host_v4(net4, host_no)?,
                    v6: with_host_v6(net6, host_no)?,
                    link_local: None,
                };
                hosts[h].ifaces.push(iface);
                members.push(h);
            }
            lans.push(LanPlan {
                name: lan.name.clone(),
                members,
            });
        }

        let mut links = Vec::with_capacity(self.links.len());
        let mut pairs = HashSet::new();
        for (k, (a, b, emulated)) in self.links.iter().enumerate() {
            let what = format!("link {a:?}-{b:?}");
            let ia = lookup(&what, a)?;
            let ib = lookup(&what, b)?;
            if ia == ib {
                return Err(TopologyError::Invalid(format!(
                    "{what} joins a host to itself"
                )));
            }
            if !pairs.insert((ia.min(ib), ia.max(ib))) {
                return Err(TopologyError::Invalid(format!("{what} is declared twice")));
            }
            if k >= 8192 {
                return Err(TopologyError::Invalid("at most 8192 direct links".into()));
            }
            let net4 = auto_v4(0x0001_8000 + 4 * k as u32, 30, 0)?;
            let net6 = auto_v6(0x00d1, k, 0)?;
            subnets.add(&what, IpNet::V4(net4))?;
            subnets.add(&what, IpNet::V6(net6))?;
            if let Some(p) = emulated {
                p.validate()
                    .map_err(|e| TopologyError::OutOfRange(format!("{what}: {e}")))?;
            }
            for (me, peer, no) in [(ia, b, 1), (ib, a, 2)] {
                hosts[me].ifaces.push(IfacePlan {
                    name: format!("to-{peer}"),
                    v4: with_host_v4(net4, no)?,
                    v6: with_host_v6(net6, no)?,
                    link_local: emulated
                        .map(|_| Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xd1, k as u16, no as u16)),
                });
            }
            links.push(LinkPlan {
                a: ia,
                b: ib,
                a_iface: format!("to-{b}"),
                b_iface: format!("to-{a}"),
                emulated: *emulated,
            });
        }

        self.default_params.validate()?;
        let n = hosts.len();
        let mut wan = vec![self.default_params; n * n];
        for (from, to, params) in &self.wan {
            let what = format!("WAN path {from:?}->{to:?}");
            let f = lookup(&what, from)?;
            let t = lookup(&what, to)?;
            params
                .validate()
                .map_err(|e| TopologyError::OutOfRange(format!("{what}: {e}")))?;
            for (end, name) in [(f, from), (t, to)] {
                if hosts[end].uplink.is_none() {
                    return Err(TopologyError::Invalid(format!(
                        "{what}: host {name:?} has no Internet uplink"
                    )));
                }
            }
            wan[f * n + t] = *params;
        }

        Ok(Plan {
            tag: self.tag.clone(),
            hosts,
            lans,
            links,
            wan,
        })
    }
}

fn check_name(what: &str, name: &str) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name != "inet";
    if ok {
        Ok(())
    } else {
        Err(TopologyError::Invalid(format!(
            "{what} name {name:?} must be 1 to {MAX_NAME_LEN} lower-case letters or digits, and not \"inet\""
        )))
    }
}

/// `198.18.0.0 + offset`, with host number `host` (0: the network itself).
fn auto_v4(offset: u32, len: u8, host: u32) -> Result<Ipv4Net, TopologyError> {
    let base = u32::from(underlay_v4_range().network());
    let addr = Ipv4Addr::from(base + offset + host);
    let net = Ipv4Net::new(addr, len)
        .map_err(|e| TopologyError::Invalid(format!("address plan: {e}")))?;
    if !underlay_v4_range().contains(&net) {
        return Err(TopologyError::Invalid(format!(
            "address plan: {net} is outside {}",
            underlay_v4_range()
        )));
    }
    Ok(net)
}

/// `fd00:SPACE:0:INDEX::HOST/64`.
fn auto_v6(space: u16, index: usize, host: u16) -> Result<Ipv6Net, TopologyError> {
    let index = u16::try_from(index)
        .map_err(|_| TopologyError::Invalid(format!("address plan: index {index} too large")))?;
    let addr = Ipv6Addr::new(0xfd00, space, 0, index, 0, 0, 0, host);
    Ipv6Net::new(addr, 64).map_err(|e| TopologyError::Invalid(format!("address plan: {e}")))
}

fn with_host_v4(net: Ipv4Net, host: u32) -> Result<Ipv4Net, TopologyError> {
    let addr = Ipv4Addr::from(u32::from(net.network()) + host);
    Ipv4Net::new(addr, net.prefix_len())
        .map_err(|e| TopologyError::Invalid(format!("address plan: {e}")))
}

fn with_host_v6(net: Ipv6Net, host: u32) -> Result<Ipv6Net, TopologyError> {
    let addr = Ipv6Addr::from(u128::from(net.network()) + u128::from(host));
    Ipv6Net::new(addr, net.prefix_len())
        .map_err(|e| TopologyError::Invalid(format!("address plan: {e}")))
}

fn gateway_v4(what: &str, net: Ipv4Net) -> Result<Ipv4Addr, TopologyError> {
    if !underlay_v4_range().contains(&net) {
        return Err(TopologyError::Invalid(format!(
            "{what}: {net} is outside the test range {}",
            underlay_v4_range()
        )));
    }
    if net.prefix_len() > 30 {
        return Err(TopologyError::Invalid(format!(
            "{what}: {net} is too small (at most /30)"
        )));
    }
    let gw = Ipv4Addr::from(u32::from(net.network()) + 1);
    if net.addr() == gw || net.addr() == net.network() || net.addr() == net.broadcast() {
        return Err(TopologyError::Invalid(format!(
            "{what}: host address {} must not be the subnet's network, broadcast or first address",
            net.addr()
        )));
    }
    Ok(gw)
}

fn gateway_v6(what: &str, net: Ipv6Net) -> Result<Ipv6Addr, TopologyError> {
    if !underlay_v6_range().contains(&net) {
        return Err(TopologyError::Invalid(format!(
            "{what}: {net} is outside the test range {}",
            underlay_v6_range()
        )));
    }
    if net.prefix_len() > 126 {
        return Err(TopologyError::Invalid(format!(
            "{what}: {net} is too small (at most /126)"
        )));
    }
    let gw = Ipv6Addr::from(u128::from(net.network()) + 1);
    if net.addr() == gw || net.addr() == net.network() {
        return Err(TopologyError::Invalid(format!(
            "{what}: host address {} must not be the subnet's first two addresses",
            net.addr()
        )));
    }
    Ok(gw)
}

/// Subnets handed out so far; refuses overlaps.
#[derive(Default)]
struct SubnetSet {
    taken: Vec<(String, IpNet)>,
}

impl SubnetSet {
    fn add(&mut self, what: &str, net: IpNet) -> Result<(), TopologyError> {
        let net = net.trunc();
        for (owner, other) in &self.taken {
            if other.contains(&net) || net.contains(other) {
                return Err(TopologyError::Overlap(format!(
                    "{what} ({net}) overlaps {owner} ({other})"
                )));
            }
        }
        self.taken.push((what.to_string(), net));
        Ok(())
    }
}

/// A host's link to the Internet namespace.
#[derive(Clone, Debug)]
pub struct Uplink {
    /// The host's IPv4 address with the uplink subnet's length.
    pub v4: Ipv4Net,
    /// The host's IPv6 address with the uplink subnet's length.
    pub v6: Ipv6Net,
    /// The Internet side's IPv4 address (the host's default gateway).
    pub gw4: Ipv4Addr,
    /// The Internet side's IPv6 address (the host's default gateway).
    pub gw6: Ipv6Addr,
    /// The name of the veth end inside the Internet namespace.
    pub inet_iface: String,
}

/// A LAN or direct-link interface of a host.
#[derive(Clone, Debug)]
pub struct IfacePlan {
    /// Interface name inside the host.
    pub name: String,
    /// IPv4 address with prefix length.
    pub v4: Ipv4Net,
    /// IPv6 address with prefix length.
    pub v6: Ipv6Net,
    /// A fixed link-local address (emulated links: tun devices get none
    /// from the kernel).
    pub link_local: Option<Ipv6Addr>,
}

/// One host of a checked topology.
#[derive(Clone, Debug)]
pub struct HostPlan {
    /// The host's name.
    pub name: String,
    /// Its Internet uplink (`eth0`), if any.
    pub uplink: Option<Uplink>,
    /// Its LAN and direct-link interfaces.
    pub ifaces: Vec<IfacePlan>,
}

impl HostPlan {
    /// Every underlay address of the host (uplink first).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if let Some(u) = &self.uplink {
            out.push(IpAddr::V4(u.v4.addr()));
            out.push(IpAddr::V6(u.v6.addr()));
        }
        for i in &self.ifaces {
            out.push(IpAddr::V4(i.v4.addr()));
            out.push(IpAddr::V6(i.v6.addr()));
        }
        out
    }
}

/// One LAN segment of a checked topology.
#[derive(Clone, Debug)]
pub struct LanPlan {
    /// The LAN's name.
    pub name: String,
    /// Indices of its member hosts.
    pub members: Vec<usize>,
}

/// One direct link of a checked topology.
#[derive(Clone, Debug)]
pub struct LinkPlan {
    /// Index of one end.
    pub a: usize,
    /// Index of the other end.
    pub b: usize,
    /// Interface name on `a`.
    pub a_iface: String,
    /// Interface name on `b`.
    pub b_iface: String,
    /// Emulated (tun + emulator) instead of a veth, with these parameters.
    pub emulated: Option<LinkParams>,
}

/// A checked topology with every address assigned.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The topology's tag.
    pub tag: String,
    /// Hosts, in declaration order.
    pub hosts: Vec<HostPlan>,
    /// LAN segments.
    pub lans: Vec<LanPlan>,
    /// Direct links.
    pub links: Vec<LinkPlan>,
    /// WAN parameters, row-major: `wan[from * n + to]`.
    pub wan: Vec<LinkParams>,
}

impl Plan {
    /// Whether any host has an Internet uplink (and so an `inet` namespace is needed).
    pub fn needs_inet(&self) -> bool {
        self.hosts.iter().any(|h| h.uplink.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square() -> Topology {
        let mut t = Topology::new("t");
        t.host("a").host("b").host("c");
        t
    }

    #[test]
    fn plans_addresses_inside_the_test_ranges() -> Result<(), TopologyError> {
        let mut t = square();
        t.lan("office", &["a", "b"]).link("b", "c");
        let plan = t.plan()?;
        for h in &plan.hosts {
            for addr in h.addresses() {
                let ok = match addr {
                    IpAddr::V4(a) => underlay_v4_range().contains(&a),
                    IpAddr::V6(a) => underlay_v6_range().contains(&a),
                };
                assert!(ok, "{addr} outside test ranges");
            }
        }
        let a = &plan.hosts[0];
        let up = a
            .uplink
            .as_ref()
            .ok_or(TopologyError::Invalid("no uplink".into()))?;
        assert_eq!(up.v4.to_string(), "198.18.1.2/24");
        assert_eq!(up.gw4, Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(up.v6.to_string(), "fd00:18:0:1::2/64");
        assert_eq!(a.ifaces[0].name, "lan0");
        assert_eq!(plan.hosts[1].ifaces[1].name, "to-c");
        assert_eq!(plan.hosts[2].ifaces[0].name, "to-b");
        Ok(())
    }

    #[test]
    fn refuses_unknown_hosts() {
        let mut t = square();
        t.wan("a", "zz", LinkParams::delay_ms(5));
        assert!(matches!(t.plan(), Err(TopologyError::UnknownHost(_))));
        let mut t = square();
        t.lan("l", &["a", "nope"]);
        assert!(matches!(t.plan(), Err(TopologyError::UnknownHost(_))));
        let mut t = square();
        t.link("nope", "a");
        assert!(matches!(t.plan(), Err(TopologyError::UnknownHost(_))));
    }

    #[test]
    fn refuses_overlapping_addresses() -> Result<(), Box<dyn std::error::Error>> {
        let mut t = Topology::new("t");
        t.host("a")
            .host_with_addrs("b", "198.18.1.7/24".parse()?, "fd00:99::2/64".parse()?);
        assert!(matches!(t.plan(), Err(TopologyError::Overlap(_))));
        let mut t = Topology::new("t");
        t.host_with_addrs("a", "198.18.200.2/24".parse()?, "fd00:99::2/64".parse()?)
            .host_with_addrs("b", "198.18.201.2/24".parse()?, "fd00:99::5/64".parse()?);
        assert!(matches!(t.plan(), Err(TopologyError::Overlap(_))));
        Ok(())
    }

    #[test]
    fn refuses_addresses_outside_the_test_ranges() -> Result<(), Box<dyn std::error::Error>> {
        let mut t = Topology::new("t");
        t.host_with_addrs("a", "10.0.0.2/24".parse()?, "fd00:99::2/64".parse()?);
        assert!(matches!(t.plan(), Err(TopologyError::Invalid(_))));
        let mut t = Topology::new("t");
        t.host_with_addrs("a", "198.18.9.2/24".parse()?, "2001:db8::2/64".parse()?);
        assert!(matches!(t.plan(), Err(TopologyError::Invalid(_))));
        Ok(())
    }

    #[test]
    fn refuses_out_of_range_parameters() {
        for p in [
            LinkParams::delay_ms(10_001),
            LinkParams::delay_ms(1).with_loss(1.5),
            LinkParams::delay_ms(1).with_loss(-0.1),
            LinkParams::delay_ms(1).with_loss(f64::NAN),
            LinkParams::delay_ms(1).with_jitter(Duration::from_secs(11)),
        ] {
            let mut t = square();
            t.wan("a", "b", p);
            assert!(
                matches!(t.plan(), Err(TopologyError::OutOfRange(_))),
                "{p:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_names_and_duplicates() {
        for bad in ["", "A", "has-dash", "inet", "waytoolongname"] {
            let mut t = Topology::new("t");
            t.host(bad);
            assert!(
                matches!(t.plan(), Err(TopologyError::Invalid(_))),
                "{bad:?}"
            );
        }
        let mut t = square();
        t.host("a");
        assert!(matches!(t.plan(), Err(TopologyError::Invalid(_))));
        let mut t = square();
        t.link("a", "b").link("b", "a");
        assert!(matches!(t.plan(), Err(TopologyError::Invalid(_))));
        let mut t = square();
        t.link("a", "a");
        assert!(matches!(t.plan(), Err(TopologyError::Invalid(_))));
        assert!(matches!(
            Topology::new("t").plan(),
            Err(TopologyError::Invalid(_))
        ));
    }

    #[test]
    fn wan_matrix_is_directed() -> Result<(), TopologyError> {
        let mut t = square();
        t.default_wan(LinkParams::delay_ms(1))
            .wan("a", "b", LinkParams::delay_ms(25));
        let plan = t.plan()?;
        assert_eq!(plan.wan[1].delay, Duration::from_millis(25));
        assert_eq!(plan.wan[3].delay, Duration::from_millis(1));
        Ok(())
    }
}
