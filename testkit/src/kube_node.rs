//! Real Kubernetes nodes for tests: a real containerd 2.x and kubelet v1.34 (built by
//! `scripts/build-nodestack.sh`) in a `netns::Node` namespace, joined to a testenv
//! cluster started with `testenv::Options { nodes: true, bind_ip: Some(lan.host_ip()) }`.
//! Pods are scheduled and started by the apiserver, scheduler and kubelet; runc
//! (Debian's) runs them. Everything runs in the host mount namespace, entered into the
//! node's network namespace with `nsenter --net` (not `ip netns exec`, which remounts
//! /sys and hides the cgroup mounts). Layout under `NodeOptions::dir`:
//!
//! ```text
//! run/containerd.sock      CRI and containerd API     run/runc, run/ferry-runc  runc roots
//! containerd/{config.toml,root,state,opt}            cni/{net.d,ipam}
//! kubelet/                 --root-dir (config.yaml)   pod-logs/  podLogsDir
//! logs/{containerd,kubelet}.log
//! ```
//!
//! The kubelet uses the cluster's admin kubeconfig (fine for tests, never for real).
//! Dropping a [`KubeNode`] stops the kubelet, removes every pod sandbox, stops
//! containerd and leftover shims and containers, unmounts everything under `dir` and
//! removes the node's cgroups; `dir` itself stays (the caller owns it).
use crate::containers::{CgroupGuard, in_node};
use crate::netns;
use crate::process::ChildGuard;
use crate::testenv::ClusterInfo;
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod config;
mod proxy;
mod teardown;

pub use proxy::KubeProxy;
pub use teardown::route_pod_networks;

/// What a node runs with; see [`KubeNode::start`].
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node name, e.g. "east-1" (also its `kubernetes.io/hostname` label).
    pub name: String,
    /// e.g. "10.244.1.0/24", distinct per node across ALL clusters (and test processes:
    /// [`pod_cidr_for`] derives one from the node's LAN address).
    pub pod_cidr: String,
    /// All node state under here (containerd root/state/sockets, kubelet root-dir, pod
    /// logs, CNI data). At most ~80 bytes long: socket paths must fit in 108.
    pub dir: PathBuf,
    /// OCI archives imported into containerd's k8s.io namespace before the kubelet
    /// starts; the pause image ([`crate::oci::pause_image`]) is always imported.
    pub images: Vec<PathBuf>,
    /// When Some: containerd gets a second runtime handler "ferry": runtime_type
    /// io.containerd.runc.v2, options BinaryName = this path, Root = <dir>/run/ferry-runc,
    /// SystemdCgroup false, and pod_annotations = ["ferry.dev/*"].
    pub ferry_runtime: Option<PathBuf>,
    /// kubelet runtimeRequestTimeout (default 2m).
    pub runtime_request_timeout: Option<Duration>,
    /// Extra node labels (`--node-labels`).
    pub labels: Vec<(String, String)>,
}

impl NodeOptions {
    /// Options with no extra images, labels or runtime handler.
    pub fn new(name: &str, pod_cidr: &str, dir: &Path) -> NodeOptions {
        NodeOptions {
            name: name.to_string(),
            pod_cidr: pod_cidr.to_string(),
            dir: dir.to_path_buf(),
            images: Vec::new(),
            ferry_runtime: None,
            runtime_request_timeout: None,
            labels: Vec::new(),
        }
    }
}

/// A pod CIDR no other node of any test process uses: the LAN address 10.213.S.H maps
/// to a /24 in 100.64.0.0/10 (index S*64 + H), so parallel tests never share a route.
pub fn pod_cidr_for(node: &netns::Node) -> String {
    let [_, _, s, h] = node.ip().octets();
    assert!(h < 64, "pod_cidr_for: LAN host {h} >= 64");
    let idx = u32::from(s) * 64 + u32::from(h);
    format!("100.{}.{}.0/24", 64 + idx / 256, idx % 256)
}

/// Paths of one node (shared with the config writer).
struct Layout {
    bin: PathBuf,
    runc: PathBuf,
    ferry_runtime: Option<PathBuf>,
    socket: PathBuf,
    containerd: PathBuf,
    runc_root: PathBuf,
    ferry_runc_root: PathBuf,
    cni_conf: PathBuf,
    cni_ipam: PathBuf,
    kubelet: PathBuf,
    pod_logs: PathBuf,
    logs: PathBuf,
}

/// A running node; torn down on drop (see the module docs).
pub struct KubeNode {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    pod_cidr: String,
    dir: PathBuf,
    layout: Layout,
    kubectl: Command,
    containerd: Option<ChildGuard>,
    kubelet: Option<ChildGuard>,
    cgroup: Option<CgroupGuard>,
}

/// `FERRY_KUBELET_FEATURE_GATES` (`Name=true,Other=false`): feature gates for every
/// kubelet this process starts, to measure a kubelet feature (docs/testenv.md). Unset:
/// none, the kubelet's defaults. Anything else than `Name=true|false` pairs is refused.
fn feature_gates_from_env() -> Result<std::collections::BTreeMap<String, bool>> {
    let Ok(spec) = std::env::var("FERRY_KUBELET_FEATURE_GATES") else {
        return Ok(Default::default());
    };
    config::parse_feature_gates(&spec)
        .with_context(|| format!("FERRY_KUBELET_FEATURE_GATES={spec:?}"))
}

/// `$FERRY_NODESTACK_BIN` (else the cache), checked for every binary a node needs.
pub fn nodestack_bin() -> Result<PathBuf> {
    let dir = std::env::var_os("FERRY_NODESTACK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/ferry/nodestack/bin".into());
    for b in [
        "kubelet",
        "kube-proxy",
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "crictl",
        "bridge",
        "host-local",
        "loopback",
    ] {
        if !dir.join(b).is_file() {
            bail!(
                "{b} not in {}: run scripts/build-nodestack.sh (or scripts/install-deps.sh; \
                 or set FERRY_NODESTACK_BIN)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Debian's runc: `runc` on PATH, else /usr/sbin/runc.
fn runc_binary() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .context("runc not found: scripts/install-deps.sh installs Debian's runc")
}

impl KubeNode {
    /// Starts containerd, imports the images, starts the kubelet, and returns when the
    /// Node object is Ready and its not-ready taint is gone (pods can schedule).
    pub fn start(
        lan_node: &netns::Node,
        cluster: &ClusterInfo,
        opts: NodeOptions,
    ) -> Result<KubeNode> {
        let bin = nodestack_bin()?;
        let client_ca = cluster.kubelet_client_ca.clone().with_context(|| {
            format!(
                "cluster {} has no kubelet client CA: start it with \
                 testenv::Options {{ nodes: true, .. }} (ferry-testenv --nodes)",
                cluster.name
            )
        })?;
        let dir = std::path::absolute(&opts.dir)?;
        let run = dir.join("run");
        let layout = Layout {
            bin: bin.clone(),
            runc: runc_binary()?,
            ferry_runtime: opts.ferry_runtime.clone(),
            socket: run.join("containerd.sock"),
            containerd: dir.join("containerd"),
            runc_root: run.join("runc"),
            ferry_runc_root: run.join("ferry-runc"),
            cni_conf: dir.join("cni/net.d"),
            cni_ipam: dir.join("cni/ipam"),
            kubelet: dir.join("kubelet"),
            pod_logs: dir.join("pod-logs"),
            logs: dir.join("logs"),
        };
        if layout.socket.as_os_str().len() > 100 {
            bail!(
                "node dir {} is too long for a unix socket path",
                dir.display()
            );
        }
        for d in [
            &run,
            &layout.containerd.join("conf.d"),
            &layout.cni_conf,
            &layout.cni_ipam,
            &layout.kubelet,
        ]
        .into_iter()
        .chain([&layout.pod_logs, &layout.logs])
        {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut kubectl = Command::new(crate::testenv::bin_dir()?.join("kubectl"));
        kubectl.arg("--kubeconfig").arg(&cluster.kubeconfig);
        let cgroup = CgroupGuard::new(&format!("kn-{}", opts.name));
        let mut node = KubeNode {
            name: opts.name.clone(),
            ns: lan_node.name().to_string(),
            ip: lan_node.ip(),
            pod_cidr: opts.pod_cidr.clone(),
            dir: dir.clone(),
            layout,
            kubectl,
            containerd: None,
            kubelet: None,
            cgroup: None,
        };
        // From here on, a failure drops `node`, which cleans up what was started.
        teardown::create_cgroup(&cgroup.0)?;
        node.cgroup = Some(cgroup);
        let l = &node.layout;
        let pause = crate::oci::pause_image()?;
        let short = &crate::oci::sha256_hex(node.ns.as_bytes())[..8];
        write(
            &l.containerd.join("config.toml"),
            &config::containerd_toml(l, crate::oci::PAUSE_IMAGE),
        )?;
        write(
            &l.cni_conf.join("10-ferry.conflist"),
            &config::cni_conflist(l, &format!("cni-{short}"), &opts.pod_cidr),
        )?;
        let timeout = opts
            .runtime_request_timeout
            .unwrap_or(Duration::from_secs(120));
        let cgroup_root = format!(
            "/{}",
            node.cgroup.as_ref().map(|c| c.0.as_str()).unwrap_or("")
        );
        write(
            &l.kubelet.join("config.yaml"),
            &config::kubelet_config(
                l,
                &cgroup_root,
                &client_ca,
                timeout,
                &feature_gates_from_env()?,
            ),
        )?;
        write(
            &dir.join("crictl.yaml"),
            &format!(
                "runtime-endpoint: unix://{0}\nimage-endpoint: unix://{0}\ntimeout: 30\n",
                l.socket.display()
            ),
        )?;

        node.start_containerd()?;
        let path = search_path(&bin)?;
        node.import_image(&pause)?;
        for image in &opts.images {
            node.import_image(image)?;
        }

        let l = &node.layout;
        let mut cmd = in_node(lan_node, bin.join("kubelet"));
        cmd.arg(format!(
            "--config={}",
            l.kubelet.join("config.yaml").display()
        ))
        .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
        .arg(format!("--root-dir={}", l.kubelet.display()))
        .arg(format!("--node-ip={}", node.ip))
        .arg(format!("--hostname-override={}", node.name))
        .arg("--v=2")
        .env("PATH", &path);
        if !opts.labels.is_empty() {
            let labels: Vec<String> = opts
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            cmd.arg(format!("--node-labels={}", labels.join(",")));
        }
        node.kubelet = Some(spawn_logged("kubelet", cmd, &l.logs.join("kubelet.log"))?);
        node.wait(
            "the Node to be Ready without its not-ready taint",
            Duration::from_secs(90),
            |n| n.node_schedulable(),
        )?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts containerd (its log appended to logs/containerd.log) and waits until it
    /// answers.
    fn start_containerd(&mut self) -> Result<()> {
        let l = &self.layout;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(l.bin.join("containerd"))
            .arg("--config")
            .arg(l.containerd.join("config.toml"))
            // Shims are found on PATH.
            .env("PATH", search_path(&l.bin)?);
        self.containerd = Some(spawn_logged(
            "containerd",
            cmd,
            &l.logs.join("containerd.log"),
        )?);
        self.wait("containerd to answer", Duration::from_secs(30), |n| {
            Ok(n.ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success())
        })
    }

    /// Restarts containerd, as `systemctl restart containerd` does on a real node (its
    /// configuration and drop-ins are read again; shims, hence pods, run on).
    pub fn restart_containerd(&mut self) -> Result<()> {
        if let Some(mut c) = self.containerd.take() {
            c.stop(Duration::from_secs(10));
        }
        self.start_containerd()
    }

    /// The directory containerd imports drop-ins from (`imports`, like
    /// /etc/containerd/conf.d on a real node).
    pub fn containerd_dropin_dir(&self) -> PathBuf {
        self.layout.containerd.join("conf.d")
    }

    /// The node's LAN address (its InternalIP, where the kubelet listens on 10250).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// The node's network namespace (`/run/netns/NAME`).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// Where this node's state lives ([`NodeOptions::dir`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.layout.socket.clone()
    }

    /// runc root of the default handler, i.e. `<Root>/k8s.io` as the shim passes it to runc.
    pub fn runc_root(&self) -> PathBuf {
        self.layout.runc_root.join("k8s.io")
    }

    /// Same for the "ferry" handler.
    pub fn ferry_runc_root(&self) -> PathBuf {
        self.layout.ferry_runc_root.join("k8s.io")
    }

    /// `crictl` against this node's containerd, inside the node's network namespace
    /// (exec/attach streams go to containerd's stream server on the node's loopback).
    pub fn crictl(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(self.layout.bin.join("crictl"))
            .arg("--config")
            .arg(self.dir.join("crictl.yaml"));
        c
    }

    /// `ctr` in containerd's k8s.io namespace (the CRI's).
    pub fn ctr(&self) -> Command {
        let mut c = Command::new(self.layout.bin.join("ctr"));
        c.arg("--address")
            .arg(&self.layout.socket)
            .args(["--namespace", "k8s.io"]);
        c
    }

    /// Imports an OCI archive (e.g. from [`crate::oci`]) into the k8s.io namespace.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let out = self
            .ctr()
            .args(["images", "import", "--snapshotter", "overlayfs"])
            .arg(archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr images import {} on {}: {}",
                archive.display(),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stops the kubelet (SIGSTOP) until the guard drops: it neither starts nor stops
    /// containers nor reports to its apiserver meanwhile; containerd and the pods run on.
    pub fn stop_kubelet(&self) -> Result<crate::process::Stopped> {
        self.kubelet
            .as_ref()
            .context("the kubelet is not running")?
            .suspend()
    }

    /// Resident memory of containerd + kubelet, in bytes (shims and pods not counted).
    pub fn rss_bytes(&self) -> u64 {
        [&self.containerd, &self.kubelet]
            .into_iter()
            .flatten()
            .map(|c| teardown::rss_of(c.id()))
            .sum()
    }

    /// Ready=True and no `node.kubernetes.io/not-ready` taint.
    fn node_schedulable(&self) -> Result<bool> {
        let mut cmd = Command::new(self.kubectl.get_program());
        cmd.args(self.kubectl.get_args())
            .args(["get", "node", &self.name, "-o", "json"]);
        let out = cmd.output().context("running kubectl")?;
        if !out.status.success() {
            return Ok(false); // not registered yet
        }
        let node: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let tainted = node["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "node.kubernetes.io/not-ready");
        Ok(ready && !tainted)
    }

    /// Polls `cond` until true; fails early (with the log's tail) if a process died.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&KubeNode) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self)? {
                return Ok(());
            }
            for (name, child) in [
                ("containerd", &mut self.containerd),
                ("kubelet", &mut self.kubelet),
            ] {
                if child.as_mut().is_some_and(|c| c.exited()) {
                    let log = self.layout.logs.join(format!("{name}.log"));
                    bail!(
                        "{name} of node {} exited while waiting for {what}:\n{}",
                        self.name,
                        tail(&log)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {}: no {what} after {timeout:?} (logs in {})",
                    self.name,
                    self.layout.logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        teardown::teardown(self);
    }
}

/// Creates RuntimeClass "ferry" (handler "ferry") in a cluster; an existing one is fine.
pub async fn create_ferry_runtime_class(client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::node::v1::RuntimeClass;
    let rc: RuntimeClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": { "name": "ferry" },
        "handler": "ferry",
    }))?;
    let api: kube::Api<RuntimeClass> = kube::Api::all(client.clone());
    match api.create(&Default::default(), &rc).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("creating RuntimeClass ferry"),
    }
}

fn write(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

/// PATH with the node stack's binaries first.
fn search_path(bin: &Path) -> Result<std::ffi::OsString> {
    Ok(std::env::join_paths(
        [bin.to_path_buf()].into_iter().chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )?)
}

/// Spawns `cmd` with its output appended to `log` (a restarted process's log follows
/// its predecessor's).
fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    ChildGuard::spawn(name, cmd)
}

/// The last lines of a log, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
