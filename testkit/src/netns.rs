//! Simulated nodes: one network namespace per node, joined by a bridge in the root
//! namespace. Addresses are 10.213.<subnet>.<host>/24 inside namespaces this process
//! created; nothing is routed off the machine.
//!
//! ```no_run
//! let lan = ferry_testkit::netns::Lan::create()?;
//! let a = lan.add_node("a")?; // a.ip() == 10.213.N.2
//! let mut cmd = a.command("ferry-node"); // runs inside node a's namespace
//! a.set_link(false)?; // cut node a off
//! # anyhow::Ok(())
//! ```
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

/// Runs `ip ARGS`; a failure carries ip's stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A bridge in the root namespace; nodes attach to it. Removed with everything on it
/// when dropped.
pub struct Lan {
    subnet: u8,
    bridge: String,
    nodes: Mutex<Vec<String>>,
}

impl Lan {
    /// Claims a free subnet: creating the bridge is the atomic claim, so parallel test
    /// processes never share one.
    pub fn create() -> Result<Lan> {
        for subnet in 1..=250u8 {
            let bridge = format!("fbr{subnet}");
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_ok() {
                ip(&[
                    "addr",
                    "add",
                    &format!("10.213.{subnet}.1/24"),
                    "dev",
                    &bridge,
                ])?;
                ip(&["link", "set", &bridge, "up"])?;
                return Ok(Lan {
                    subnet,
                    bridge,
                    nodes: Mutex::new(Vec::new()),
                });
            }
        }
        bail!("no free test subnet (bridges fbr1..fbr250 all exist)")
    }

    /// Address of the root namespace (the test process) on this LAN.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// Adds a node: a namespace with loopback up and a veth on the bridge.
    pub fn add_node(&self, label: &str) -> Result<Node> {
        let mut nodes = self.nodes.lock().unwrap();
        let host = nodes.len() as u8 + 2;
        let ns = format!("ferry-{}-{label}", self.subnet);
        let outer = format!("fv{}h{host}", self.subnet);
        ip(&["netns", "add", &ns])?;
        nodes.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let veth = [
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ];
        if ip(&veth).is_err() {
            // We own this subnet (its bridge was our atomic claim), so an existing
            // `fv<subnet>h<host>` is left from an earlier owner whose namespace the
            // kernel has not finished tearing down. Remove it and try once more.
            let _ = ip(&["link", "del", &outer]);
            ip(&veth)?;
        }
        ip(&["link", "set", &outer, "master", &self.bridge, "up"])?;
        let addr = Ipv4Addr::new(10, 213, self.subnet, host);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(Node { ns, outer, addr })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.nodes.lock().unwrap().drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// One simulated node. The namespace itself is owned by its [`Lan`].
#[derive(Clone, Debug)]
pub struct Node {
    ns: String,
    outer: String,
    addr: Ipv4Addr,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.addr
    }

    /// A command that runs inside this node's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Limits traffic into the node to `mbit` Mbit/s (a token bucket on the bridge
    /// side of its veth), so a stream is bound by the link, as between real hosts.
    pub fn shape_ingress(&self, mbit: u32) -> Result<()> {
        // The bucket must hold at least one kernel tick of traffic (HZ can be 100).
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 100).max(1 << 20);
        let out = Command::new("tc")
            .args(["qdisc", "replace", "dev", &self.outer, "root", "tbf"])
            .args(["rate", &format!("{mbit}mbit")])
            .args(["burst", &burst.to_string(), "latency", "50ms"])
            .output()
            .context("running tc")?;
        if !out.status.success() {
            bail!(
                "tc qdisc replace dev {} tbf rate {mbit}mbit: {}",
                self.outer,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Drops every packet between this node and `peer`, both ways (iptables in this
    /// node's namespace): the two have no route to each other, the rest of the LAN
    /// still answers.
    pub fn block(&self, peer: Ipv4Addr) -> Result<()> {
        for (chain, flag) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
            let out = self
                .command("iptables")
                .args(["-A", chain, flag, &peer.to_string(), "-j", "DROP"])
                .output()
                .context("running iptables")?;
            if !out.status.success() {
                bail!(
                    "iptables -A {chain} {flag} {peer} -j DROP in {}: {}",
                    self.ns,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// Brings the node's link up or down (a cable pull, not a process kill).
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&["link", "set", &self.outer, if up { "up" } else { "down" }])
    }
}
