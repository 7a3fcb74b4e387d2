//! A client host of a cluster: a namespace on the nodes' LAN that runs kube-proxy
//! (iptables mode) for that cluster, so a Service's ClusterIP answers there as it does
//! on any node of a real cluster, and that routes every node's pod CIDR to its node.
//! What a client calling a workload through its Service sees is measured from here
//! (the container bench's client-gap case).
use super::{KubeNode, nodestack_bin, search_path, spawn_logged, tail};
use crate::containers::in_node;
use crate::netns::{self, ip};
use crate::process::ChildGuard;
use crate::testenv::ClusterInfo;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct KubeProxy {
    node: netns::Node,
    log: PathBuf,
    _proxy: ChildGuard,
}

impl KubeProxy {
    /// Starts kube-proxy for `cluster` in `node` (a namespace of its own, on the same LAN
    /// as `pod_nodes`), its log under `dir`; returns once its first sync has written
    /// the Service rules. It runs as the kube-proxy of `as_node`, a Node of `cluster`:
    /// kube-proxy waits for the Node object of its name, and a Node for the client
    /// host would be one the scheduler and ferry's placement could pick.
    pub fn start(
        node: netns::Node,
        cluster: &ClusterInfo,
        as_node: &str,
        pod_nodes: &[&KubeNode],
        dir: &Path,
    ) -> Result<KubeProxy> {
        for n in pod_nodes {
            ip(&[
                "-n",
                node.name(),
                "route",
                "replace",
                n.pod_cidr(),
                "via",
                &n.ip().to_string(),
            ])?;
        }
        // A default route, as any host has: a ClusterIP is routed before kube-proxy's
        // rules rewrite it, and without a route the call fails as unreachable.
        let [a, b, c, _] = node.ip().octets();
        let gateway = std::net::Ipv4Addr::new(a, b, c, 1).to_string();
        ip(&[
            "-n",
            node.name(),
            "route",
            "replace",
            "default",
            "via",
            &gateway,
        ])?;
        std::fs::create_dir_all(dir)?;
        let bin = nodestack_bin()?;
        let log = dir.join("kube-proxy.log");
        let mut cmd = in_node(&node, bin.join("kube-proxy"));
        cmd.arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
            .arg(format!("--hostname-override={as_node}"))
            // Its own address, not that Node's.
            .arg(format!("--bind-address={}", node.ip()))
            .arg("--proxy-mode=iptables")
            // The conntrack table and its timeouts are the machine's, shared by every
            // namespace: kube-proxy must not resize them.
            .arg("--conntrack-max-per-core=0")
            .arg("--conntrack-tcp-timeout-established=0s")
            .arg("--conntrack-tcp-timeout-close-wait=0s")
            // Write rules as soon as an EndpointSlice changes (the default batches
            // changes for up to 1 s): the measured gap is then the cluster's own
            // propagation, with kube-proxy's batching named apart in the docs.
            .arg("--iptables-min-sync-period=0s")
            .arg("--v=2")
            .env("PATH", search_path(&bin)?);
        let proxy = spawn_logged("kube-proxy", cmd, &log)?;
        let p = KubeProxy {
            node,
            log,
            _proxy: proxy,
        };
        p.wait_for_rules(Duration::from_secs(30))?;
        Ok(p)
    }

    /// The client host's namespace: run clients there to call ClusterIPs.
    pub fn node(&self) -> &netns::Node {
        &self.node
    }

    /// Waits until kube-proxy's first sync has written its Service chain.
    fn wait_for_rules(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let out = in_node(&self.node, "iptables-save")
                .args(["-t", "nat"])
                .output()
                .context("running iptables-save")?;
            let rules = String::from_utf8_lossy(&out.stdout);
            if rules.contains(":KUBE-SERVICES") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-proxy wrote no Service rules in {}: {}",
                    self.node.name(),
                    tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
