//! Two clusters (east, west) of real nodes: each node is a network namespace running
//! containerd, a kubelet and `ferry-node`; a linked-cluster Secret; the controller.
//! Every pod is created through the apiserver and run by its node's kubelet. The
//! setting of the e2e tests and the demo.
//!
//! Nodes: east-1, east-2, west-1 carry ferry's node pieces (the `ferry` runtime
//! handler with `ferry-runtime`); west-2 runs a daemon but no ferry runtime, so it
//! cannot receive containers (a bad-input case).
use anyhow::{Context, Result, bail, ensure};
use ferry_controller::{Settings, agent::grpc::GrpcAgent, clusters::Clusters};
use ferry_crds::{Migration, MigrationStatus, Phase};
use ferry_testkit::containers::{criu, in_node};
use ferry_testkit::kube_node::{self, KubeNode, KubeProxy, NodeOptions};
use ferry_testkit::netns::Lan;
use ferry_testkit::process::ChildGuard;
use ferry_testkit::testenv::{self, TestEnv};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The controller's own namespace (Lease, linked-cluster Secrets).
pub const CONTROLLER_NAMESPACE: &str = "ferry-system";
/// The test workload image (testkit's busybox image, imported on every node).
pub const BUSYBOX: &str = "docker.io/library/busybox:ferry";

/// One real node: kubelet + containerd + ferry-node.
pub struct SimNode {
    pub cluster: String,
    pub name: String,
    pub kube: KubeNode,
    /// Its place on the LAN (to shape or cut its link).
    pub lan: ferry_testkit::netns::Node,
    /// ferry-node's state dir (staging).
    pub state_dir: PathBuf,
    pub ferry_runtime: bool,
    daemon: std::sync::Mutex<ChildGuard>,
}

pub struct World {
    pub env: TestEnv,
    pub east: kube::Client,
    pub west: kube::Client,
    /// Dropped before the LAN they live on.
    pub nodes: Vec<SimNode>,
    pub base: PathBuf,
    /// The VM root every node's daemon and VM pods share (a hostPath).
    pub vm_root: PathBuf,
    daemon_bin: PathBuf,
    daemon_args: Vec<String>,
    failed_object_retention: Option<Duration>,
    poll_interval: Duration,
    controllers: Vec<tokio::task::JoinHandle<()>>,
    /// East's eviction webhook, when served (`webhook.rs`).
    pub(crate) webhook: Option<crate::webhook::WebhookServer>,
    /// Client hosts running kube-proxy ([`World::start_client_host`]).
    client_hosts: Vec<KubeProxy>,
    _lan: Lan,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &self.controllers {
            c.abort();
        }
        self.nodes.clear();
    }
}

async fn apply_crds(env: &TestEnv, cluster: &str) -> Result<()> {
    // As installed with ferry: the CRDs and the policy guarding the restore markers.
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/yaml/crds.yaml");
    let admission = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/yaml/admission.yaml");
    let out = env
        .kubectl(cluster)
        .args(["apply", "-f", crds, "-f", admission])
        .output()?;
    if !out.status.success() {
        bail!(
            "installing CRDs and admission policy in {cluster}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = env
        .kubectl(cluster)
        .args([
            "wait",
            "--for=condition=Established",
            "crd/migrations.ferry.dev",
            "--timeout=60s",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "CRD not established in {cluster}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What a node needs of ferry's node pieces: `ferry-runtime` with its config next to
/// it (installed per node, as the node DaemonSet would install it on a host).
fn install_ferry_runtime(node_dir: &Path, state_dir: &Path) -> Result<PathBuf> {
    let dir = node_dir.join("ferry-bin");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("ferry-runtime");
    std::fs::copy(ferry_testkit::workspace_bin("ferry-runtime")?, &bin)
        .context("installing ferry-runtime")?;
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("runc not installed")?;
    let cfg =
        json!({"runc": runc, "criu": criu()?, "stateDir": state_dir, "createWaitSeconds": 90});
    std::fs::write(
        dir.join("ferry-runtime.json"),
        serde_json::to_vec_pretty(&cfg)?,
    )?;
    Ok(bin)
}

/// Extra images a world's nodes import (the VM test adds the launcher image).
#[derive(Default)]
pub struct WorldOptions {
    pub images: Vec<PathBuf>,
    /// kubelet runtimeRequestTimeout of every node (default 2 min).
    pub runtime_request_timeout: Option<Duration>,
    /// Extra `ferry-node` arguments for every node's daemon.
    pub daemon_args: Vec<String>,
    /// The controller's `failed_object_retention` (default: the controller's).
    pub failed_object_retention: Option<Duration>,
    /// How often the controller polls a running daemon operation (default 100 ms; the
    /// daemons also tell it when one ends, `ferry_controller::wake`).
    pub poll_interval: Option<Duration>,
}

impl World {
    /// Starts east and west (state under `dir`) with their nodes, and links west to east.
    pub async fn start(dir: &Path, opts: WorldOptions) -> Result<World> {
        let started = Instant::now();
        let lan = Lan::create()?;
        let env = TestEnv::start_in_with(
            &dir.join("clusters"),
            &["east", "west"],
            &testenv::Options {
                bind_ip: Some(lan.host_ip()),
                nodes: true,
            },
        )?;
        let east = env.client("east").await?;
        let west = env.client("west").await?;
        for (name, client) in [("east", &east), ("west", &west)] {
            apply_crds(&env, name).await?;
            let obj: Namespace =
                serde_json::from_value(json!({"metadata": {"name": CONTROLLER_NAMESPACE}}))?;
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &obj)
                .await?;
            kube_node::create_ferry_runtime_class(client).await?;
        }
        let kubeconfig = std::fs::read_to_string(&env.cluster("west").kubeconfig)?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "cluster-west", "labels": {"ferry.dev/cluster": "west"}},
            "stringData": {"kubeconfig": kubeconfig}
        }))?;
        Api::<Secret>::namespaced(east.clone(), CONTROLLER_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;

        let base = dir.join("nodes");
        let vm_root = dir.join("vms");
        std::fs::create_dir_all(&vm_root)?;
        let daemon_bin = ferry_testkit::workspace_bin("ferry-node")?;
        let mut images = vec![ferry_testkit::oci::busybox_image()?];
        images.extend(opts.images.iter().cloned());
        let mut nodes = vec![];
        for (cluster, name, ferry) in [
            ("east", "east-1", true),
            ("east", "east-2", true),
            ("west", "west-1", true),
            ("west", "west-2", false),
        ] {
            let node_dir = base.join(name);
            let state_dir = node_dir.join("ferry-state");
            std::fs::create_dir_all(&state_dir)?;
            let lan_node = lan.add_node(name)?;
            let mut o = NodeOptions::new(name, &kube_node::pod_cidr_for(&lan_node), &node_dir);
            o.images = images.clone();
            o.runtime_request_timeout = opts.runtime_request_timeout;
            if ferry {
                o.ferry_runtime = Some(install_ferry_runtime(&node_dir, &state_dir)?);
            }
            let kube = KubeNode::start(&lan_node, env.cluster(cluster), o)
                .with_context(|| format!("starting node {name}"))?;
            let daemon = start_daemon(
                &lan_node,
                &kube,
                &state_dir,
                ferry,
                &DaemonFlags {
                    bin: &daemon_bin,
                    vm_root: &vm_root,
                    kubeconfig: &env.cluster(cluster).kubeconfig,
                    extra_args: &opts.daemon_args,
                },
            )?;
            // The daemon announces itself (`--register-node`); the controller finds
            // it only then.
            let client = if cluster == "east" { &east } else { &west };
            let endpoint = format!("https://{}:7070", kube.ip());
            wait_for(
                Duration::from_secs(20),
                &format!("ferry-node to announce itself on {name}"),
                || async {
                    let node = Api::<Node>::all(client.clone()).get_metadata(name).await?;
                    let a = node.metadata.annotations.unwrap_or_default();
                    Ok(a.get(ferry_controller::agent::grpc::DAEMON_ANNOTATION) == Some(&endpoint))
                },
            )
            .await?;
            nodes.push(SimNode {
                cluster: cluster.into(),
                name: name.into(),
                kube,
                lan: lan_node,
                state_dir,
                ferry_runtime: ferry,
                daemon: std::sync::Mutex::new(daemon),
            });
        }
        kube_node::route_pod_networks(&nodes.iter().map(|n| &n.kube).collect::<Vec<_>>())?;
        eprintln!(
            "[world] 2 clusters × 2 real nodes ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(World {
            env,
            east,
            west,
            nodes,
            base,
            vm_root,
            daemon_bin,
            daemon_args: opts.daemon_args,
            failed_object_retention: opts.failed_object_retention,
            poll_interval: opts.poll_interval.unwrap_or(Duration::from_millis(100)),
            controllers: Vec::new(),
            webhook: None,
            client_hosts: Vec::new(),
            _lan: lan,
        })
    }

    /// A client host of `cluster` named `label`: a namespace on the LAN running
    /// kube-proxy for that cluster, where its Services' ClusterIPs answer and every
    /// pod IP routes. Returns its namespace, to run clients in.
    pub fn start_client_host(
        &mut self,
        cluster: &str,
        label: &str,
    ) -> Result<ferry_testkit::netns::Node> {
        let node = self._lan.add_node(label)?;
        let pods: Vec<&KubeNode> = self.nodes.iter().map(|n| &n.kube).collect();
        let as_node = self
            .nodes
            .iter()
            .find(|n| n.cluster == cluster)
            .with_context(|| format!("no node in cluster {cluster}"))?
            .name
            .clone();
        let dir = self.base.join(label);
        let info = self.env.cluster(cluster);
        let proxy = KubeProxy::start(node.clone(), info, &as_node, &pods, &dir)
            .with_context(|| format!("starting kube-proxy for {cluster} in {label}"))?;
        self.client_hosts.push(proxy);
        Ok(node)
    }

    /// The LAN's host address: what every node reaches (the apiservers, a MinIO).
    pub fn host_ip(&self) -> std::net::Ipv4Addr {
        self._lan.host_ip()
    }

    pub fn node(&self, name: &str) -> &SimNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("known node")
    }

    /// Kills a node's daemon with SIGKILL (its child processes too, as when its
    /// container dies) and starts it again with the same flags and state dir.
    pub fn restart_daemon(&self, name: &str) -> Result<()> {
        let n = self.node(name);
        let mut d = n.daemon.lock().unwrap();
        d.kill();
        *d = start_daemon(
            &n.lan,
            &n.kube,
            &n.state_dir,
            n.ferry_runtime,
            &DaemonFlags {
                bin: &self.daemon_bin,
                vm_root: &self.vm_root,
                kubeconfig: &self.env.cluster(&n.cluster).kubeconfig,
                extra_args: &self.daemon_args,
            },
        )?;
        Ok(())
    }

    pub fn client(&self, cluster: &str) -> &kube::Client {
        if cluster == "east" {
            &self.east
        } else {
            &self.west
        }
    }

    /// Runs east's controller (all namespaces) in this process, with the gRPC agent.
    pub fn start_controller(&mut self) {
        let mut settings = Settings::new(CONTROLLER_NAMESPACE, "east", "e2e-controller");
        settings.poll_interval = self.poll_interval;
        if let Some(r) = self.failed_object_retention {
            settings.failed_object_retention = r;
        }
        let clusters = Arc::new(Clusters::new(self.east.clone(), CONTROLLER_NAMESPACE));
        let tls_dir = ferry_testkit::pki::controller_tls_dir(&self.base.join("controller-tls"))
            .expect("controller certificate");
        let tls = ferry_controller::agent::grpc::client_tls(&tls_dir).expect("controller TLS");
        let ctx = ferry_controller::context(
            self.east.clone(),
            Arc::new(GrpcAgent::new(clusters, tls)),
            &settings,
        );
        self.controllers.push(tokio::spawn(async move {
            ferry_controller::run_with_leader_election(ctx, &settings).await;
        }));
    }

    /// Kills the controller (its tasks end where they are, as a killed process would)
    /// and starts a new one: it must pick every Migration up from its status.
    pub async fn restart_controller(&mut self) {
        for c in self.controllers.drain(..) {
            c.abort();
            let _ = c.await;
        }
        self.start_controller();
    }

    /// A fresh namespace in both clusters.
    pub async fn namespace(&self, ns: &str) -> Result<()> {
        for client in [&self.east, &self.west] {
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &obj)
                .await?;
            // Pods need the default ServiceAccount, which its controller adds shortly.
            let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                Api::namespaced(client.clone(), ns);
            wait_for(
                Duration::from_secs(30),
                "the default ServiceAccount",
                || async { Ok(sa.get_opt("default").await?.is_some()) },
            )
            .await?;
        }
        Ok(())
    }

    /// Creates a Pod from a manifest in `ns` of east and waits until its kubelet runs it.
    pub async fn create_pod(&self, ns: &str, manifest: serde_json::Value) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(manifest)?;
        let name = pod.name_any();
        let pods: Api<Pod> = Api::namespaced(self.east.clone(), ns);
        pods.create(&PostParams::default(), &pod).await?;
        wait_pod_running(&pods, &name, Duration::from_secs(120)).await
    }

    /// A Secret `name` in `ns` of the home cluster with bucket credentials as
    /// `transfer.objectStore.credentialsSecret` expects them.
    pub async fn create_s3_secret(
        &self,
        ns: &str,
        name: &str,
        access_key: &str,
        secret_key: &str,
    ) -> Result<()> {
        use k8s_openapi::api::core::v1::Secret;
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "stringData": {"accessKeyId": access_key, "secretAccessKey": secret_key}
        }))?;
        Api::<Secret>::namespaced(self.east.clone(), ns)
            .create(&Default::default(), &s)
            .await?;
        Ok(())
    }

    pub async fn apply_migration(&self, ns: &str, yaml: &str) -> Result<Migration> {
        let m: Migration = serde_yaml::from_str(yaml)?;
        Api::<Migration>::namespaced(self.east.clone(), ns)
            .create(&PostParams::default(), &m)
            .await
            .context("creating Migration")
    }

    /// Follows a Migration until it is terminal, calling `on_change` at each new phase.
    pub async fn follow(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        mut on_change: impl FnMut(&Migration),
    ) -> Result<Migration> {
        let mut last = None;
        self.follow_each(ns, name, timeout, |m| {
            let phase = m.status.as_ref().and_then(|s| s.phase);
            if phase != last {
                on_change(m);
                last = phase;
            }
        })
        .await
    }

    /// Like [`World::follow`], calling `on_read` with every read (every 50 ms).
    pub async fn follow_each(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        mut on_read: impl FnMut(&Migration),
    ) -> Result<Migration> {
        let api: Api<Migration> = Api::namespaced(self.east.clone(), ns);
        let deadline = Instant::now() + timeout;
        loop {
            let m = api.get(name).await?;
            let phase = m.status.as_ref().and_then(|s| s.phase);
            on_read(&m);
            if phase.is_some_and(Phase::is_terminal) {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!(
                    "migration {name} not finished after {timeout:?}: {:?}",
                    m.status
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A node daemon's `/metrics` (its `--health-addr`, port 7071 on the node's IP).
    pub async fn daemon_metrics(&self, node: &str) -> Result<String> {
        let addr = std::net::SocketAddr::new(self.node(node).kube.ip().into(), 7071);
        let (status, body) = tokio::task::spawn_blocking(move || {
            crate::http::get(addr, "/metrics", Duration::from_secs(10))
        })
        .await??;
        ensure_ok(status == 200, || {
            format!("{addr}/metrics answered {status}: {body}")
        })?;
        Ok(body)
    }

    /// `kubectl` against a cluster.
    pub fn kubectl(&self, cluster: &str) -> std::process::Command {
        self.env.kubectl(cluster)
    }

    /// `kubectl logs` of a container.
    pub fn logs(&self, cluster: &str, ns: &str, pod: &str, container: &str) -> Result<String> {
        let out = self
            .kubectl(cluster)
            .args(["-n", ns, "logs", pod, "-c", container])
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl logs {pod} -c {container}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl exec` in a container.
    pub fn exec(
        &self,
        cluster: &str,
        ns: &str,
        pod: &str,
        container: &str,
        cmd: &[&str],
    ) -> Result<String> {
        let out = self
            .kubectl(cluster)
            .args(["-n", ns, "exec", pod, "-c", container, "--"])
            .args(cmd)
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl exec {pod} -c {container} {cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// After a move: the running containers of the Pods named `pods` (the source's and
    /// the target's names; one name across clusters) are exactly `containers`, all on
    /// `node`. The source's frozen containers stay in crictl's running list until its
    /// kubelet has stopped them, which may be after Succeeded: this waits for that
    /// (30 s), then checks that nothing else runs.
    pub async fn runs_only_on(
        &self,
        ns: &str,
        pods: &[&str],
        node: &str,
        containers: &[&str],
    ) -> Result<()> {
        let mut names: Vec<&str> = pods.to_vec();
        names.sort();
        names.dedup();
        let copies = || -> Result<Vec<(String, String)>> {
            let mut all = Vec::new();
            for p in &names {
                all.extend(self.running_copies(ns, p)?);
            }
            Ok(all)
        };
        wait_for(
            Duration::from_secs(30),
            &format!("only {node} to run {ns}/{pods:?}"),
            || async { Ok(copies()?.iter().all(|(n, _)| n == node)) },
        )
        .await
        .with_context(|| format!("running copies: {:?}", copies().ok()))?;
        let mut running: Vec<String> = copies()?.into_iter().map(|(_, c)| c).collect();
        running.sort();
        let mut want: Vec<String> = containers.iter().map(|c| c.to_string()).collect();
        want.sort();
        ensure!(
            running == want,
            "running on {node} of {ns}/{pods:?}: {running:?}, not {want:?}"
        );
        Ok(())
    }

    /// Running containers of pod `ns/pod` on every node's containerd (`crictl ps`),
    /// as (node, container name).
    pub fn running_copies(&self, ns: &str, pod: &str) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let o = n
                .kube
                .crictl()
                .args(["ps", "-o", "json", "--state", "running"])
                .output()?;
            if !o.status.success() {
                bail!(
                    "crictl ps on {}: {}",
                    n.name,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            for c in v["containers"].as_array().into_iter().flatten() {
                let l = &c["labels"];
                if l["io.kubernetes.pod.namespace"] == ns && l["io.kubernetes.pod.name"] == pod {
                    out.push((
                        n.name.clone(),
                        l["io.kubernetes.container.name"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Every TCP socket in a node's network namespace (`ss -Htnap`), listening or
    /// connected, with the processes that hold it.
    pub fn tcp_sockets(&self, node: &str) -> Result<Vec<TcpSocket>> {
        let o = self
            .node(node)
            .lan
            .command("ss")
            .args(["-Htnap"])
            .output()?;
        ensure_ok(o.status.success(), || {
            format!("ss on {node}: {}", String::from_utf8_lossy(&o.stderr))
        })?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(TcpSocket::parse)
            .collect())
    }

    /// The host pid of a running container (from its node's CRI).
    pub fn container_pid(&self, node: &str, ns: &str, pod: &str, container: &str) -> Result<u32> {
        let n = self.node(node);
        let o = n
            .kube
            .crictl()
            .args(["ps", "-q", "--state", "running", "--name", container])
            .args(["--label", &format!("io.kubernetes.pod.namespace={ns}")])
            .args(["--label", &format!("io.kubernetes.pod.name={pod}")])
            .output()?;
        let id = String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        ensure_ok(!id.is_empty(), || {
            format!("no running container {container} of {ns}/{pod} on {node}")
        })?;
        let o = n.kube.crictl().args(["inspect", &id]).output()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        v["info"]["pid"]
            .as_u64()
            .map(|p| p as u32)
            .context("crictl inspect: no info.pid")
    }

    /// The container statuses of Pod `ns/pod` in `cluster`, as its kubelet reported them.
    pub async fn container_statuses(
        &self,
        cluster: &str,
        ns: &str,
        pod: &str,
    ) -> Result<Vec<k8s_openapi::api::core::v1::ContainerStatus>> {
        let pods: Api<Pod> = Api::namespaced(self.client(cluster).clone(), ns);
        Ok(pods
            .get(pod)
            .await?
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default())
    }

    /// The last count in a counter container's log (0 when none yet).
    pub fn last_count(&self, cluster: &str, ns: &str, pod: &str, container: &str) -> Result<u64> {
        Ok(numbers(&self.logs(cluster, ns, pod, container)?)
            .last()
            .copied()
            .unwrap_or(0))
    }

    /// Waits until every one of `containers` of counter pod `ns/pod` in east has
    /// printed a count. A migration test starts only then: a container whose first line
    /// is still to come when it is frozen prints 1 first at its target, which a test
    /// cannot tell from a restart. Running is not enough: the memory counters fill their
    /// memory before they count, which took over 500 ms on a busy machine.
    pub async fn counting(&self, ns: &str, pod: &str, containers: &[&str]) -> Result<()> {
        for c in containers {
            wait_for(
                Duration::from_secs(60),
                &format!("{ns}/{pod}/{c} to count"),
                || async { Ok(self.last_count("east", ns, pod, c).unwrap_or(0) >= 1) },
            )
            .await?;
        }
        Ok(())
    }

    /// After a move of counter pod `ns/pod` (container `app`) from east-1 to west was
    /// rolled back: the target Pod is gone, the pod runs once, on east-1, and counts on
    /// (thawed, not merely listed as running).
    pub async fn check_runs_once_at_source(&self, ns: &str, pod: &str) -> Result<()> {
        self.check_runs_once_on(ns, pod, "east-1").await
    }

    /// As [`World::check_runs_once_at_source`], for a pod whose source is east `node`.
    pub async fn check_runs_once_on(&self, ns: &str, pod: &str, node: &str) -> Result<()> {
        let west: Api<Pod> = Api::namespaced(self.west.clone(), ns);
        ensure_ok(west.get_opt(pod).await?.is_none(), || {
            "the target Pod remains".to_string()
        })?;
        let copies = self.running_copies(ns, pod)?;
        ensure_ok(copies == [(node.to_string(), "app".to_string())], || {
            format!("running copies: {copies:?}")
        })?;
        let before = self.last_count("east", ns, pod, "app")?;
        wait_for(
            Duration::from_secs(10),
            "the resumed source to count on",
            || async { Ok(self.last_count("east", ns, pod, "app")? > before) },
        )
        .await
    }

    /// Deletes every pod of a namespace in both clusters (end of a scenario).
    pub async fn clean_namespace(&self, ns: &str) {
        for c in [&self.east, &self.west] {
            let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
            let _ = pods
                .delete_collection(
                    &DeleteParams::default().grace_period(0),
                    &Default::default(),
                )
                .await;
        }
    }
}

/// What every node's daemon of one cluster is started with.
struct DaemonFlags<'a> {
    bin: &'a Path,
    vm_root: &'a Path,
    kubeconfig: &'a Path,
    /// `WorldOptions::daemon_args`, after the World's own flags.
    extra_args: &'a [String],
}

fn start_daemon(
    lan_node: &ferry_testkit::netns::Node,
    kube: &KubeNode,
    state_dir: &Path,
    ferry_runtime: bool,
    flags: &DaemonFlags,
) -> Result<ChildGuard> {
    let DaemonFlags {
        bin,
        vm_root,
        kubeconfig,
        extra_args,
    } = *flags;
    let tls = ferry_testkit::pki::node_tls_dir(
        &kube.dir().join("ferry-tls"),
        kube.name(),
        &kube.ip().to_string(),
    )?;
    let crictl = kube_node::nodestack_bin()?.join("crictl");
    let mut cmd = in_node(lan_node, bin);
    cmd.arg("--listen")
        .arg(format!("{}:7070", kube.ip()))
        .arg("--advertise-ip")
        .arg(kube.ip().to_string())
        .arg("--runc-root")
        .arg(kube.runc_root())
        .arg("--criu")
        .arg(criu()?)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--tls-dir")
        .arg(tls)
        .arg("--vm-root")
        .arg(vm_root)
        .arg("--node-name")
        .arg(kube.name())
        .arg("--cri-endpoint")
        .arg(format!("unix://{}", kube.containerd_socket().display()))
        .arg("--crictl")
        .arg(crictl)
        .arg("--register-node")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--health-addr")
        .arg(format!("{}:7071", kube.ip()))
        .args(extra_args)
        // Appended: a restarted daemon's log follows its predecessor's.
        .stdout(append(&kube.dir().join("ferry-node.log"))?)
        .stderr(append(&kube.dir().join("ferry-node.err"))?);
    if ferry_runtime {
        cmd.arg("--restore-runc-root").arg(kube.ferry_runc_root());
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let child = ChildGuard::spawn(&format!("ferry-node-{}", kube.name()), cmd)?;
    let addr = format!("{}:7070", kube.ip());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(200)).is_err()
    {
        if Instant::now() > deadline {
            bail!(
                "ferry-node on {} not listening on {addr} after 20 s",
                kube.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn ensure_ok(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { bail!(msg()) }
}

pub async fn wait_pod_running(pods: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = pods.get(name).await?;
        if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("pod {name} not Running after {timeout:?}: {:?}", p.status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One line of `ss -Htnap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    /// `LISTEN`, `ESTAB`, ...
    pub state: String,
    pub local: String,
    pub peer: String,
    /// The `users:((...))` column: the processes holding it (empty when none).
    pub users: String,
}

impl TcpSocket {
    fn parse(line: &str) -> Option<TcpSocket> {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 5).then(|| TcpSocket {
            state: f[0].to_string(),
            local: f[3].to_string(),
            peer: f[4].to_string(),
            users: f.get(5..).map(|r| r.join(" ")).unwrap_or_default(),
        })
    }

    /// Whether `program` holds it.
    pub fn held_by(&self, program: &str) -> bool {
        self.users.contains(&format!("(\"{program}\","))
    }

    /// Whether it lives on loopback only (its local address, and its peer unless it
    /// listens).
    pub fn on_loopback(&self) -> bool {
        let lo = |a: &str| a.starts_with("127.") || a.starts_with("[::1]");
        lo(&self.local) && (self.state == "LISTEN" || lo(&self.peer))
    }
}

/// The counts in a text: each line's first number (other lines skipped; a line may
/// carry more fields after it, see [`stamped`]).
pub fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The (count, unix ms) pairs of a stamped counter's lines.
pub fn stamped(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// A counter Pod on `node`: prints 1, 2, 3… every 50 ms to its log and appends the same
/// to /data/count.log in its writable layer (a file it keeps open).
pub fn counter_pod(name: &str, node: &str, containers: &[&str]) -> serde_json::Value {
    let script = "exec 3>>/data/count.log; i=0; while true; do i=$((i+1)); echo $i; echo $i >&3; usleep 50000; done";
    pod_running(name, node, containers, script)
}

/// A counter Pod (as [`counter_pod`]) whose shell also holds `mib` MiB of one repeated
/// byte in memory: state worth moving, and as compressible as memory gets.
/// The `transfer:` lines of a Migration spec that moves through `bucket` at `endpoint`
/// under `prefix`, with the credentials of Secret `secret` ([`World::create_s3_secret`]).
pub fn object_store_transfer(endpoint: &str, bucket: &str, prefix: &str, secret: &str) -> String {
    format!(
        "  transfer: {{mode: ObjectStore, objectStore: {{endpoint: '{endpoint}', bucket: {bucket}, \
         prefix: {prefix}, credentialsSecret: {secret}}}}}\n"
    )
}

pub fn memory_counter_pod(name: &str, node: &str, mib: u32) -> serde_json::Value {
    let script = format!(
        "blob=$(busybox head -c {} /dev/zero | busybox tr '\\0' x); \
         exec 3>>/data/count.log; i=0; while true; do i=$((i+1)); echo $i; echo $i >&3; usleep 50000; done",
        u64::from(mib) << 20
    );
    pod_running(name, node, &["app"], &script)
}

/// A counter Pod whose lines (log and /data/count.log) are `count unix-ms`, the time
/// read by the container itself just before it writes the line: which lines the source
/// wrote before its freeze shows the cut. busybox's `date` has no sub-second format, so
/// the time comes from adjtimex(2), whose `tv_usec` holds nanoseconds when the kernel's
/// STA_NANO status bit (8192) is set (an NTP daemon sets it on some machines): reading
/// it as microseconds put stamps up to 1000 s late on a fresh CI machine.
pub fn stamped_counter_pod(name: &str, node: &str, containers: &[&str]) -> serde_json::Value {
    let script = "exec 3>>/data/count.log; i=0; while true; do i=$((i+1)); \
        ms=$(busybox adjtimex | busybox awk '/status:/{n=and($2,8192)} /tv_sec/{s=$2} \
        /tv_usec/{u=$2} END{printf \"%.0f\", s*1000 + (n ? int(u/1000000) : int(u/1000))}'); \
        echo $i $ms; echo $i $ms >&3; usleep 50000; done";
    pod_running(name, node, containers, script)
}

/// The status of a Migration that must have Succeeded; otherwise an error with its
/// failure.
pub fn succeeded(m: &Migration) -> Result<MigrationStatus> {
    let status = m.status.clone().context("no status")?;
    if status.phase != Some(Phase::Succeeded) {
        bail!("not Succeeded: {:?}", status.failure);
    }
    Ok(status)
}

/// The status of a Migration that must have been RolledBack; otherwise an error with
/// its phase and failure.
pub fn rolled_back(m: &Migration) -> Result<MigrationStatus> {
    let status = m.status.clone().context("no status")?;
    if status.phase != Some(Phase::RolledBack) {
        bail!("not RolledBack: {:?} ({:?})", status.phase, status.failure);
    }
    Ok(status)
}

/// A Pod on `node` whose containers each run `script` in busybox's sh.
pub fn pod_running(name: &str, node: &str, containers: &[&str], script: &str) -> serde_json::Value {
    let cs: Vec<_> = containers
        .iter()
        .map(|c| {
            json!({"name": c, "image": BUSYBOX, "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", script]})
        })
        .collect();
    json!({
        "metadata": {"name": name, "labels": {"app": name}},
        // Scheduled like any Pod, onto the node the scenario wants.
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 2,
                 "containers": cs}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ss_lines_parse() {
        let s = super::TcpSocket::parse(
            r#"ESTAB 0 0 127.0.0.1:5000 127.0.0.1:40000 users:(("criu",pid=12,fd=5))"#,
        )
        .unwrap();
        assert!(s.held_by("criu") && !s.held_by("ferry-node") && s.on_loopback());
        let s = super::TcpSocket::parse(
            r#"LISTEN 0 128 10.213.0.2:7443 0.0.0.0:* users:(("ferry-node",pid=7,fd=9))"#,
        )
        .unwrap();
        assert!(s.held_by("ferry-node") && !s.on_loopback());
        let s = super::TcpSocket::parse("ESTAB 0 0 127.0.0.1:5000 10.0.0.3:1").unwrap();
        assert!(s.users.is_empty() && !s.on_loopback());
    }
}
