//! Building a [`Topology`] into namespaces, and tearing it down.
//!
//! Layout:
//! - `PREFIX-inet` plays the Internet. Each Internet host's `eth0` is a veth
//!   whose other end, `hN`, is in `inet`. Policy routing (`iif hN lookup 100`,
//!   table 100: default dev `wan0`) sends every packet that arrives from a
//!   host into the tun device `wan0`, where the [`crate::wan`] emulator holds
//!   or drops it; what it writes back arrives on `wan0` and is forwarded by
//!   the main table to the destination's veth.
//! - `PREFIX-HOST` is one host: `eth0` (uplink, default routes via `inet`),
//!   `lanK` per LAN segment, `to-PEER` per direct link. Forwarding is on and
//!   DAD off, so addresses are usable at once.
//! - `PREFIX-lan-NAME` holds the bridge `br0` of a LAN segment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::cleanup;
use crate::error::{Error, Result};
use crate::netns;
use crate::process::Process;
use crate::topology::{HostPlan, IfacePlan, LinkParams, Plan, Topology};
use crate::wan::{open_tun, Emulator, Shaper, WanHandle};

/// Routing table that sends host traffic into the emulator.
const WAN_TABLE: &str = "100";
/// Name of the emulator's tun device in `inet`.
const WAN_TUN: &str = "wan0";

/// One host of a built network.
#[derive(Debug)]
pub struct Host {
    plan: HostPlan,
    ns: String,
    log_dir: PathBuf,
}

impl Host {
    /// The host's name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// Its network namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Its uplink IPv4 address.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        self.plan.uplink.as_ref().map(|u| u.v4.addr())
    }

    /// Its uplink IPv6 address.
    pub fn v6(&self) -> Option<Ipv6Addr> {
        self.plan.uplink.as_ref().map(|u| u.v6.addr())
    }

    /// Its uplink address of the family asked for.
    pub fn addr(&self, v6: bool) -> Result<IpAddr> {
        let a = if v6 {
            self.v6().map(IpAddr::V6)
        } else {
            self.v4().map(IpAddr::V4)
        };
        a.ok_or_else(|| Error::NoSuch {
            kind: "uplink of host",
            name: self.name().to_string(),
        })
    }

    /// A LAN or direct-link interface (`lan0`, `to-b`).
    pub fn iface(&self, name: &str) -> Result<&IfacePlan> {
        self.plan
            .ifaces
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| Error::NoSuch {
                kind: "interface",
                name: format!("{}:{name}", self.name()),
            })
    }

    /// Every underlay address of the host.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.plan.addresses()
    }

    /// Starts `program args...` in this host. Its output goes to
    /// `LOGDIR/HOST-NAME.log`; dropping the handle stops it.
    pub fn spawn(&self, name: &str, program: &str, args: &[&str]) -> Result<Process> {
        let log = self.log_dir.join(format!("{}-{name}.log", self.name()));
        Process::spawn(&self.ns, name, program, args, &log)
    }

    /// Runs a command in this host to completion and returns its output
    /// whatever its exit status.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .output()
            .map_err(|e| Error::io(format!("running {program} in {}", self.name()), e))
    }

    /// Runs a command in this host; a non-zero exit is an error.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        netns::run(
            Command::new("ip")
                .args(["netns", "exec", &self.ns, program])
                .args(args),
        )
    }

    /// Loads an nftables ruleset (`nft -f -`) in this host.
    pub fn nft(&self, rules: &str) -> Result<()> {
        netns::run_with_input(
            Command::new("ip").args(["netns", "exec", &self.ns, "nft", "-f", "-"]),
            Some(rules),
        )
        .map(|_| ())
    }

    /// Silently breaks an interface: nftables drops everything arriving on
    /// it (the link stays up, as a real path failure would).
    pub fn block_ingress(&self, iface: &str) -> Result<()> {
        let table = format!("r6tblock_{}", iface.replace('-', "_"));
        let rules = format!(
            "table netdev {table} {{\n chain in {{\n  type filter hook ingress device \"{iface}\" priority -500; policy drop;\n }}\n}}\n"
        );
        self.nft(&rules)
    }

    /// NAT (masquerade) for traffic from `source` (a prefix, IPv4 or IPv6)
    /// leaving by `iface`: a NAT router, or a gateway doing NAT66.
    pub fn masquerade(&self, source: &str, iface: &str) -> Result<()> {
        let family = if source.contains(':') { "ip6" } else { "ip" };
        let rules = format!(
            "table {family} r6tnat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  {family} saddr {source} oifname \"{iface}\" masquerade\n }}\n}}\n"
        );
        self.nft(&rules)
    }

    /// Makes this host a home NAT router for the LAN on its interface
    /// `lan`: IPv4 from the LAN leaves `uplink` masqueraded, and nothing
    /// from the uplink gets in but answers to what went out. Unsolicited
    /// packets are dropped before conntrack confirms them, as home
    /// routers do, so they leave no state that would move a later
    /// mapping to another port.
    pub fn nat_router(&self, lan: &str, uplink: &str, kind: NatKind) -> Result<()> {
        let net = self.iface(lan)?.v4.trunc();
        let how = match kind {
            NatKind::Cone => "",
            NatKind::Symmetric => " fully-random",
        };
        let rules = format!(
            "table ip r6tnat {{\n\
             chain post {{\n type nat hook postrouting priority 100;\n ip saddr {net} oifname \"{uplink}\" masquerade{how}\n }}\n\
             chain input {{\n type filter hook input priority 0;\n iifname \"{uplink}\" ct state established,related accept\n iifname \"{uplink}\" drop\n }}\n\
             chain forward {{\n type filter hook forward priority 0;\n iifname \"{uplink}\" ct state established,related accept\n iifname \"{uplink}\" drop\n }}\n\
             }}\n"
        );
        netns::sysctl(&self.ns, &[("net.ipv4.ip_forward", "1")])?;
        self.nft(&rules)
    }

    /// Drops every UDP datagram forwarded from the LAN on interface `lan`
    /// (a network that lets only TCP out).
    pub fn block_forwarded_udp(&self, lan: &str) -> Result<()> {
        let rules = format!(
            "table inet r6tnoudp {{\n chain forward {{\n  type filter hook forward priority -10;\n  iifname \"{lan}\" meta l4proto udp drop\n }}\n}}\n"
        );
        self.nft(&rules)
    }

    /// Puts this host on an IPv4-only LAN behind `router` (its address on
    /// the LAN interface `lan`): the default route goes there and the
    /// LAN's IPv6 addresses are removed.
    pub fn behind(&self, lan: &str, router: Ipv4Addr) -> Result<()> {
        let gw = router.to_string();
        self.run("ip", &["route", "replace", "default", "via", &gw])?;
        self.run(
            "ip",
            &["-6", "addr", "flush", "dev", lan, "scope", "global"],
        )
        .map(|_| ())
    }

    /// Undoes [`Host::block_ingress`].
    pub fn unblock_ingress(&self, iface: &str) -> Result<()> {
        let table = format!("r6tblock_{}", iface.replace('-', "_"));
        self.run("nft", &["delete", "table", "netdev", &table])
            .map(|_| ())
    }

    /// Runs `f` on a thread inside this host's namespace (sockets it creates
    /// stay in the host).
    pub fn in_ns<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        netns::in_netns(&self.ns, f)
    }
}

/// How a NAT router maps its LAN's flows ([`Host::nat_router`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// One mapping per LAN socket, its port kept where free
    /// (endpoint-independent): what hole punching needs.
    Cone,
    /// A random port for every flow (endpoint-dependent, "symmetric").
    Symmetric,
}

/// A built network. Dropping it (also while unwinding from a panic) stops
/// the emulator, kills every process left in its namespaces and deletes them.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    hosts: Vec<Host>,
    inet: Option<String>,
    namespaces: Vec<String>,
    wan: Option<WanHandle>,
    emulator: Option<Emulator>,
    links: Vec<((String, String), WanHandle)>,
    link_emulators: Vec<Emulator>,
    log_dir: PathBuf,
    keep_logs: bool,
}

impl Net {
    /// Checks `topology`, then builds it. A bad topology is refused before
    /// anything is created; a failure half-way removes what was made.
    pub fn build(topology: &Topology) -> Result<Self> {
        let plan = topology.plan()?;
        netns::require_root()?;
        cleanup::check_interrupt()?;
        let prefix = cleanup::unique_prefix(&plan.tag);
        let log_dir = std::env::temp_dir().join("re6st-netns").join(&prefix);
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| Error::io(format!("creating {}", log_dir.display()), e))?;
        cleanup::register(&prefix);
        let mut net = Self {
            prefix,
            hosts: Vec::new(),
            inet: None,
            namespaces: Vec::new(),
            wan: None,
            emulator: None,
            links: Vec::new(),
            link_emulators: Vec::new(),
            log_dir,
            keep_logs: std::env::var_os("RE6ST_KEEP_LOGS").is_some(),
        };
        net.create(&plan)?;
        Ok(net)
    }

    fn add_ns(&mut self, role: &str) -> Result<String> {
        let ns = format!("{}-{role}", self.prefix);
        netns::ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        netns::sysctl(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.default.forwarding", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
        Ok(ns)
    }

    fn create(&mut self, plan: &Plan) -> Result<()> {
        if plan.needs_inet() {
            self.inet = Some(self.add_ns("inet")?);
        }
        for h in &plan.hosts {
            cleanup::check_interrupt()?;
            let ns = self.add_ns(&h.name)?;
            self.hosts.push(Host {
                plan: h.clone(),
                ns,
                log_dir: self.log_dir.clone(),
            });
        }
        let mut lan_ns = Vec::new();
        for lan in &plan.lans {
            lan_ns.push(self.add_ns(&format!("lan-{}", lan.name))?);
        }

        // Veth pairs, created directly in their namespaces (nothing appears
        // in the host's own namespace).
        let mut root = Vec::new();
        for (h, plan_h) in self.hosts.iter().zip(&plan.hosts) {
            if let (Some(u), Some(inet)) = (&plan_h.uplink, &self.inet) {
                root.push(format!(
                    "link add eth0 netns {} type veth peer name {} netns {inet}",
                    h.ns, u.inet_iface
                ));
            }
        }
        for (k, lan) in plan.lans.iter().enumerate() {
            for &m in &lan.members {
                let h = &self.hosts[m];
                root.push(format!(
                    "link add lan{k} netns {} type veth peer name p-{} netns {}",
                    h.ns,
                    h.name(),
                    lan_ns[k]
                ));
            }
        }
        for l in plan.links.iter().filter(|l| l.emulated.is_none()) {
            root.push(format!(
                "link add {} netns {} type veth peer name {} netns {}",
                l.a_iface, self.hosts[l.a].ns, l.b_iface, self.hosts[l.b].ns
            ));
        }
        netns::ip_batch(None, false, &root)?;

        for (k, lan) in plan.lans.iter().enumerate() {
            let mut cmds = vec![
                "link set lo up".to_string(),
                "link add br0 type bridge".to_string(),
                "link set br0 up".to_string(),
            ];
            for &m in &lan.members {
                cmds.push(format!("link set p-{} master br0 up", self.hosts[m].name()));
            }
            netns::ip_batch(Some(&lan_ns[k]), false, &cmds)?;
        }

        for l in &plan.links {
            if let Some(params) = l.emulated {
                self.start_link(plan, l.a, l.b, &l.a_iface, &l.b_iface, params)?;
            }
        }

        for h in &self.hosts {
            let mut v4 = vec!["link set lo up".to_string()];
            let mut v6 = Vec::new();
            if let Some(u) = &h.plan.uplink {
                v4.push("link set eth0 up".into());
                v4.push(format!("addr add {} dev eth0", u.v4));
                v4.push(format!("addr add {} dev eth0 nodad", u.v6));
                v4.push(format!("route add default via {} dev eth0", u.gw4));
                v6.push(format!("route add default via {} dev eth0", u.gw6));
            }
            for i in &h.plan.ifaces {
                if i.link_local.is_some() {
                    v4.push(format!("link set {} multicast on addrgenmode none", i.name));
                }
                v4.push(format!("link set {} up", i.name));
                if let Some(ll) = i.link_local {
                    // After `up`: addresses of a down interface do not survive it.
                    v4.push(format!("addr add {ll}/64 dev {} nodad", i.name));
                }
                v4.push(format!("addr add {} dev {}", i.v4, i.name));
                v4.push(format!("addr add {} dev {} nodad", i.v6, i.name));
            }
            netns::ip_batch(Some(&h.ns), false, &v4)?;
            netns::ip_batch(Some(&h.ns), true, &v6)?;
        }

        if let Some(inet) = self.inet.clone() {
            self.start_wan(plan, &inet)?;
        }
        Ok(())
    }

    /// An emulated link: a tun device in each host, and the emulator
    /// relaying between them in both directions.
    fn start_link(
        &mut self,
        plan: &Plan,
        a: usize,
        b: usize,
        a_iface: &str,
        b_iface: &str,
        params: LinkParams,
    ) -> Result<()> {
        let (ns_a, ns_b) = (self.hosts[a].ns.clone(), self.hosts[b].ns.clone());
        let (ia, ib) = (a_iface.to_string(), b_iface.to_string());
        let tun_a = netns::in_netns(&ns_a, move || open_tun(&ia))??;
        let tun_b = netns::in_netns(&ns_b, move || open_tun(&ib))??;
        let names = vec![plan.hosts[a].name.clone(), plan.hosts[b].name.clone()];
        let matrix = vec![LinkParams::default(), params, params, LinkParams::default()];
        let (shaper, handle) = Shaper::new(
            names,
            vec![Vec::new(), Vec::new()],
            matrix,
            fastrand::u64(..),
        )?;
        let a_to_b = shaper.direction(0, 1, fastrand::u64(..));
        let b_to_a = shaper.direction(1, 0, fastrand::u64(..));
        let dup = |f: &std::fs::File| {
            f.try_clone()
                .map_err(|e| Error::io("duplicating a tun descriptor", e))
        };
        let (a_in, b_out) = (dup(&tun_a)?, dup(&tun_b)?);
        self.link_emulators
            .push(Emulator::start_pipe(a_in, b_out, a_to_b)?);
        self.link_emulators
            .push(Emulator::start_pipe(tun_b, tun_a, b_to_a)?);
        self.links.push((
            (plan.hosts[a].name.clone(), plan.hosts[b].name.clone()),
            handle,
        ));
        Ok(())
    }

    fn start_wan(&mut self, plan: &Plan, inet: &str) -> Result<()> {
        let mut v4 = vec!["link set lo up".to_string()];
        let mut v6 = Vec::new();
        for h in &plan.hosts {
            let Some(u) = &h.uplink else { continue };
            let dev = &u.inet_iface;
            v4.push(format!("link set {dev} up"));
            v4.push(format!(
                "addr add {}/{} dev {dev}",
                u.gw4,
                u.v4.prefix_len()
            ));
            v4.push(format!(
                "addr add {}/{} dev {dev} nodad",
                u.gw6,
                u.v6.prefix_len()
            ));
            v4.push(format!("rule add iif {dev} lookup {WAN_TABLE} pref 100"));
            v6.push(format!("rule add iif {dev} lookup {WAN_TABLE} pref 100"));
        }
        netns::ip_batch(Some(inet), false, &v4)?;
        netns::ip_batch(Some(inet), true, &v6)?;

        let tun = netns::in_netns(inet, || open_tun(WAN_TUN))??;
        let names = plan.hosts.iter().map(|h| h.name.clone()).collect();
        let addrs = plan
            .hosts
            .iter()
            .map(|h| match &h.uplink {
                Some(u) => vec![IpAddr::V4(u.v4.addr()), IpAddr::V6(u.v6.addr())],
                None => Vec::new(),
            })
            .collect();
        let (shaper, handle) = Shaper::new(names, addrs, plan.wan.clone(), fastrand::u64(..))?;
        self.emulator = Some(Emulator::start(tun, shaper)?);
        self.wan = Some(handle);
        netns::ip_batch(
            Some(inet),
            false,
            &[
                format!("link set {WAN_TUN} up txqueuelen 1000"),
                format!("route add default dev {WAN_TUN} table {WAN_TABLE}"),
            ],
        )?;
        netns::ip_batch(
            Some(inet),
            true,
            &[format!("route add default dev {WAN_TUN} table {WAN_TABLE}")],
        )
    }

    /// The per-network name prefix (`r6t-TAG-PID-N`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where process logs go.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Keeps the process logs after teardown (they are also kept when the
    /// network is dropped during a panic, or with `RE6ST_KEEP_LOGS` set).
    pub fn keep_logs(&mut self) {
        self.keep_logs = true;
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| Error::NoSuch {
                kind: "host",
                name: name.to_string(),
            })
    }

    /// All hosts, in declaration order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Live control of the emulated WAN.
    pub fn wan(&self) -> Result<&WanHandle> {
        self.wan.as_ref().ok_or_else(|| Error::NoSuch {
            kind: "WAN",
            name: "(no host has an Internet uplink)".into(),
        })
    }

    /// Live control of an emulated link (`Topology::link_emulated`): its two
    /// directions are `handle.set(a, b, ..)` and `handle.set(b, a, ..)`.
    pub fn link(&self, a: &str, b: &str) -> Result<&WanHandle> {
        self.links
            .iter()
            .find(|((x, y), _)| (x == a && y == b) || (x == b && y == a))
            .map(|(_, h)| h)
            .ok_or_else(|| Error::NoSuch {
                kind: "emulated link",
                name: format!("{a}-{b}"),
            })
    }

    /// The `inet` namespace, if any host has an uplink.
    pub fn inet_ns(&self) -> Option<&str> {
        self.inet.as_deref()
    }

    /// Every namespace of this network.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    fn teardown(&mut self) -> Result<()> {
        self.emulator = None;
        self.link_emulators.clear();
        let mut first_err = None;
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = netns::remove_netns(&ns) {
                first_err.get_or_insert(e);
            }
        }
        cleanup::unregister(&self.prefix);
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if let Err(e) = self.teardown() {
            eprintln!("netns-tests: teardown of {} failed: {e}", self.prefix);
        }
        if failed || self.keep_logs {
            eprintln!(
                "netns-tests: logs of {} kept in {}",
                self.prefix,
                self.log_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}
