//! Clusters of real nodes (kubelet + containerd) with ferry installed by its chart, from
//! the images `ferry-images` builds out of the workspace's binaries: what a user runs,
//! where [`crate::world`] starts the controller and the daemons itself.
//!
//! Two things differ from a real node, and the values say so: containerd is not run by
//! systemd here (PID 1 is not systemd), so the chart is told
//! `node.containerdRestart=none` and [`Installed::restart_containerd`] does what systemd
//! would; and all nodes share this host's filesystem, so their paths carry
//! `$(NODE_NAME)` (under one directory, bind-mounted onto itself and made shared: the
//! DaemonSet's HostToContainer mounts need a shared host mount, as systemd makes `/`).
use anyhow::{Context, Result, bail, ensure};
use ferry_testkit::kube_node::{self, KubeNode, NodeOptions, pod_cidr_for};
use ferry_testkit::netns::{self, Lan};
use ferry_testkit::oci::ferry::{self as images, NodeTools};
use ferry_testkit::testenv::{Options, TestEnv};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const NS: &str = "ferry-system";

pub fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Polls `done` every 500 ms; on timeout the error carries `diagnose()`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
    diagnose: impl Fn() -> String,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?}\n{}", diagnose());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A directory bind-mounted onto itself and made rshared; unmounted when dropped.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(dir: &Path) -> Result<SharedDir> {
        std::fs::create_dir_all(dir)?;
        ok(
            Command::new("mount")
                .arg("--bind")
                .arg(dir)
                .arg(dir)
                .output()?,
            "mount --bind",
        )?;
        let shared = SharedDir(dir.to_path_buf());
        ok(
            Command::new("mount")
                .arg("--make-rshared")
                .arg(dir)
                .output()?,
            "mount --make-rshared",
        )?;
        Ok(shared)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Running clusters and nodes (dropped in this order: nodes, mount, clusters, LAN).
pub struct Installed {
    nodes: Vec<(String, KubeNode, netns::Node)>,
    _shared: SharedDir,
    pub env: TestEnv,
    _lan: Lan,
    base: PathBuf,
    work: PathBuf,
}

impl Installed {
    /// Starts the clusters (`(cluster, [node, ...])`) with real nodes holding ferry's
    /// images, busybox and `extra_images`; ferry is not installed yet.
    pub fn start(
        work: &Path,
        layout: &[(&str, &[&str])],
        extra_images: &[PathBuf],
    ) -> Result<Installed> {
        let bin_dir = ferry_testkit::workspace_bin("ferry-node")?
            .parent()
            .context("the binaries' directory")?
            .to_path_buf();
        let t = Instant::now();
        let built = images::build_all(
            &bin_dir,
            images::version(),
            &NodeTools::from_host()?,
            &work.join("images"),
        )?;
        eprintln!(
            "[installed] ferry's images built in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let mut node_images: Vec<PathBuf> = built
            .iter()
            .filter(|b| !b.reference.contains("launcher"))
            .map(|b| b.archive.clone())
            .collect();
        node_images.push(ferry_testkit::oci::busybox_image()?);
        node_images.extend(extra_images.iter().cloned());
        let lan = Lan::create()?;
        let names: Vec<&str> = layout.iter().map(|(c, _)| *c).collect();
        let env = TestEnv::start_in_with(
            &work.join("clusters"),
            &names,
            &Options {
                bind_ip: Some(lan.host_ip()),
                nodes: true,
            },
        )?;
        let base = work.join("n");
        let shared = SharedDir::new(&base)?;
        let mut nodes = vec![];
        for (cluster, node_names) in layout {
            for name in *node_names {
                let n = lan.add_node(name)?;
                let mut o = NodeOptions::new(name, &pod_cidr_for(&n), &base.join(name));
                o.images = node_images.clone();
                let k = KubeNode::start(&n, env.cluster(cluster), o)
                    .with_context(|| format!("starting node {name}"))?;
                nodes.push((cluster.to_string(), k, n));
            }
        }
        kube_node::route_pod_networks(&nodes.iter().map(|(_, k, _)| k).collect::<Vec<_>>())?;
        Ok(Installed {
            nodes,
            _shared: shared,
            env,
            _lan: lan,
            base,
            work: work.to_path_buf(),
        })
    }

    pub fn nodes(&self, cluster: &str) -> impl Iterator<Item = &KubeNode> {
        self.nodes
            .iter()
            .filter(move |(c, _, _)| c == cluster)
            .map(|(_, k, _)| k)
    }

    pub fn node(&self, name: &str) -> Result<&KubeNode> {
        self.nodes
            .iter()
            .find(|(_, k, _)| k.name() == name)
            .map(|(_, k, _)| k)
            .with_context(|| format!("no node {name}"))
    }

    /// Restarts containerd on every node of `cluster`, as systemd would after
    /// ferry-install changed its drop-in (`node.containerdRestart=none`).
    pub fn restart_containerd(&mut self, cluster: &str) -> Result<()> {
        for (c, k, _) in &mut self.nodes {
            if c == cluster {
                k.restart_containerd()?;
            }
        }
        Ok(())
    }

    pub fn kubectl(&self, cluster: &str, args: &[&str]) -> Result<String> {
        ok(
            self.env.kubectl(cluster).args(args).output()?,
            &format!("kubectl ({cluster}) {}", args.join(" ")),
        )
    }

    /// `helm --kubeconfig CLUSTER -n ferry-system`.
    pub fn helm(&self, cluster: &str) -> Result<Command> {
        let mut c = Command::new(crate::chart::helm()?);
        c.arg("--kubeconfig")
            .arg(&self.env.cluster(cluster).kubeconfig)
            .args(["-n", NS]);
        Ok(c)
    }

    /// The values this environment needs (see the module docs), as a file.
    pub fn values(&self, cluster: &str) -> Result<PathBuf> {
        let c = self.env.cluster(cluster);
        let ca = std::fs::read_to_string(c.ca.as_ref().context("no cluster CA")?)?;
        let (host, port) = c
            .server
            .trim_start_matches("https://")
            .rsplit_once(':')
            .context("server URL")?;
        let base = self.base.display();
        let node = |p: &str| format!("{base}/$(NODE_NAME)/{p}");
        let tools = NodeTools::from_host()?;
        let v = serde_json::json!({
            "clusterName": cluster,
            // The apiserver's webhook client certificate is signed by the cluster CA.
            "tls": {"webhookClientCA": ca},
            // No kube-proxy here: the `kubernetes` Service does not route.
            "kubernetesAPI": {"host": host, "port": port},
            "controller": {"resources": {"requests": {"cpu": "10m"}}},
            "node": {
                "containerdRestart": "none",
                "terminationGracePeriodSeconds": 30,
                "resources": {"requests": {"cpu": "10m"}},
                "hostMounts": [self.base],
                "paths": {
                    "containerdSocket": node("run/containerd.sock"),
                    "runcRoot": node("run/runc/k8s.io"),
                    "handlerRuncRoot": node("run/ferry-runc"),
                    "stateDir": node("ferry-state"),
                    // One directory for every node: a VM Pod's hostPath is the same
                    // wherever it runs; each daemon claims its own node's VMs.
                    "vmRoot": format!("{base}/vms"),
                    "binDir": node("ferry-bin"),
                    "containerdDropin": node("containerd/conf.d/ferry.toml"),
                    "hostRunc": tools.runc,
                    "hostCriu": tools.criu,
                },
            },
        });
        let f = self.work.join(format!("values-{cluster}.json"));
        // helm reads JSON as YAML.
        std::fs::write(&f, v.to_string())?;
        Ok(f)
    }

    /// `vmRoot` of [`Installed::values`], the hostPath VM Pods mount.
    pub fn vm_root(&self) -> PathBuf {
        self.base.join("vms")
    }

    /// Creates `ferry-system` with a `ferry-ca` Secret holding the test CA: installs of
    /// clusters made so are one cluster set (their daemons trust each other).
    pub fn create_cluster_set_ca(&self, cluster: &str) -> Result<()> {
        let (crt, key) = ferry_testkit::pki::ca_pem();
        let (c, k) = (self.work.join("set-ca.crt"), self.work.join("set-ca.key"));
        std::fs::write(&c, crt)?;
        std::fs::write(&k, key)?;
        self.kubectl(cluster, &["create", "namespace", NS])?;
        self.kubectl(
            cluster,
            &[
                "-n",
                NS,
                "create",
                "secret",
                "tls",
                "ferry-ca",
                &format!("--cert={}", c.display()),
                &format!("--key={}", k.display()),
            ],
        )?;
        Ok(())
    }

    /// `helm install ferry` with [`Installed::values`] and `extra` arguments; returns
    /// once the controller's replicas and a daemon per node are Ready.
    pub fn install(&self, cluster: &str, extra: &[&str]) -> Result<Duration> {
        let t = Instant::now();
        ok(
            self.helm(cluster)?
                .args([
                    "install",
                    "ferry",
                    crate::chart::CHART,
                    "--create-namespace",
                    "-f",
                ])
                .arg(self.values(cluster)?)
                .args(extra)
                .output()?,
            &format!("helm install ({cluster})"),
        )?;
        self.rolled_out(cluster, "controller", 2, &[])?;
        self.rolled_out(cluster, "node", self.nodes(cluster).count(), &[])?;
        Ok(t.elapsed())
    }

    pub fn pods_of(&self, cluster: &str, component: &str) -> Result<Vec<serde_json::Value>> {
        let out = self.kubectl(
            cluster,
            &[
                "get",
                "pods",
                "-n",
                NS,
                "-o",
                "json",
                "-l",
                &format!("app.kubernetes.io/component={component}"),
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `n` pods of the component are Ready, no other exists and none of
    /// them is one of `old` (uids): a finished rollout. Returns their uids.
    pub fn rolled_out(
        &self,
        cluster: &str,
        component: &str,
        n: usize,
        old: &[String],
    ) -> Result<Vec<String>> {
        let mut uids = vec![];
        wait_until(
            Duration::from_secs(180),
            &format!("{n} ready {component} pods in {cluster}"),
            || {
                let pods = self.pods_of(cluster, component)?;
                uids = pods
                    .iter()
                    .map(|p| p["metadata"]["uid"].as_str().unwrap_or("").to_string())
                    .collect();
                Ok(pods.len() == n
                    && pods.iter().all(ready)
                    && !uids.iter().any(|u| old.contains(u)))
            },
            || {
                self.kubectl(cluster, &["describe", "pods", "-n", NS])
                    .unwrap_or_else(|e| e.to_string())
            },
        )?;
        Ok(uids)
    }

    /// The Node's `ferry.dev/node-daemon` annotation ("" when absent).
    pub fn daemon_annotation(&self, cluster: &str, node: &str) -> Result<String> {
        self.kubectl(
            cluster,
            &[
                "get",
                "node",
                node,
                "-o",
                "jsonpath={.metadata.annotations.ferry\\.dev/node-daemon}",
            ],
        )
    }

    /// [`Installed::start`], then ferry installed in every cluster as one cluster set
    /// (the same `ferry-ca`), containerd restarted to load the `ferry` handler, and
    /// every other cluster linked into the first (`kubectl ferry link`), the home
    /// cluster of [`Installed::kubectl_ferry`].
    pub fn start_cluster_set(
        work: &Path,
        layout: &[(&str, &[&str])],
        extra_images: &[PathBuf],
    ) -> Result<Installed> {
        crate::chart::helm()?; // before minutes of setup
        let mut w = Installed::start(work, layout, extra_images)?;
        for (c, _) in layout {
            w.create_cluster_set_ca(c)?;
            let took = w.install(c, &[])?;
            eprintln!(
                "[installed] {c}: helm install → controller and daemons Ready in {:.1}s",
                took.as_secs_f64()
            );
            w.restart_containerd(c)?;
        }
        let home = layout[0].0;
        for (peer, _) in &layout[1..] {
            let kc = w.env.cluster(peer).kubeconfig.display().to_string();
            let linked =
                w.kubectl_ferry(&["link", peer, "--home", home, "--peer-kubeconfig", &kc])?;
            eprintln!("[installed] {}", linked.trim());
        }
        Ok(w)
    }

    /// `kubectl ferry ARGS` against the first cluster of the set.
    pub fn kubectl_ferry(&self, args: &[&str]) -> Result<String> {
        let home = &self.env.clusters[0];
        let out = Command::new(ferry_testkit::workspace_bin("kubectl-ferry")?)
            .arg("--kubeconfig")
            .arg(&home.kubeconfig)
            .args(args)
            .output()?;
        ok(out, &format!("kubectl ferry {}", args.join(" ")))
    }

    /// `kubectl ferry -n NS migrate ARGS --wait`: what it printed. On failure the error
    /// carries the installed ferry's logs (every cluster's controller and daemons).
    pub fn migrate(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", ns, "migrate"];
        all.extend_from_slice(args);
        all.push("--wait");
        self.kubectl_ferry(&all).map_err(|e| {
            let mut logs = String::new();
            for c in &self.env.clusters {
                for component in ["controller", "node"] {
                    logs += &format!(
                        "\n--- {} {component}\n{}",
                        c.name,
                        self.ferry_logs(&c.name, component)
                    );
                }
            }
            e.context(logs)
        })
    }

    /// The serial log of VM Pod `ns/pod` in `cluster` (ferry-launcher writes it under
    /// the VM root, in a directory named by the Pod's uid).
    pub fn vm_serial(&self, cluster: &str, ns: &str, pod: &str) -> Result<PathBuf> {
        let uid = self.kubectl(
            cluster,
            &[
                "get",
                "pod",
                "-n",
                ns,
                pod,
                "-o",
                "jsonpath={.metadata.uid}",
            ],
        )?;
        Ok(self.vm_root().join(uid).join("serial.log"))
    }

    /// Logs of ferry's pods of `component` in `cluster`, for failure messages.
    pub fn ferry_logs(&self, cluster: &str, component: &str) -> String {
        self.kubectl(
            cluster,
            &[
                "logs",
                "-n",
                NS,
                "--all-containers",
                "--prefix",
                "--tail=60",
                "-l",
                &format!("app.kubernetes.io/component={component}"),
            ],
        )
        .unwrap_or_else(|e| e.to_string())
    }
}

fn ready(pod: &serde_json::Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The runtime handlers containerd runs with (its CRI status), as the kubelet sees them.
pub fn handlers(node: &KubeNode) -> Result<Vec<String>> {
    let out = ok(node.crictl().arg("info").output()?, "crictl info")?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["config"]["containerd"]["runtimes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}
