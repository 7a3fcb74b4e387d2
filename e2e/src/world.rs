//! Two clusters (east, west) with nodes whose daemons run in network namespaces, a
//! linked-cluster Secret, and the controller: the setting of the e2e tests and the demo.
use anyhow::{Context, Result, bail};
use ferry_controller::{Settings, agent::grpc::GrpcAgent, clusters::Clusters};
use ferry_crds::{Migration, Phase};
use ferry_testkit::containers::{CgroupGuard, Daemon, PodLabels, write_bundle};
use ferry_testkit::guest::{Guest, wait_count_above};
use ferry_testkit::netns::Lan;
use ferry_testkit::{kubelet, testenv::TestEnv};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const NAMESPACE: &str = "demo";
/// The controller's own namespace (Lease, linked-cluster Secrets).
pub const CONTROLLER_NAMESPACE: &str = "ferry-system";

/// The numbers a counter container wrote to its log, one per line (other lines skipped).
pub fn counter_lines(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A simulated node: Node object in its cluster + `ferry-node` in a network namespace.
pub struct SimNode {
    pub cluster: String,
    pub name: String,
    pub daemon: Daemon,
}

pub struct World {
    pub env: TestEnv,
    pub east: kube::Client,
    pub west: kube::Client,
    pub nodes: Vec<SimNode>,
    pub base: PathBuf,
    pub cgroup: CgroupGuard,
    kubelets: Vec<tokio::task::JoinHandle<()>>,
    controller: Option<tokio::task::JoinHandle<()>>,
    // Dropped last: the namespaces the daemons live in.
    _lan: Lan,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
        for k in &self.kubelets {
            k.abort();
        }
        // Daemons and their containers go before the LAN and the cgroup.
        self.nodes.clear();
    }
}

async fn apply_crds(env: &TestEnv, cluster: &str) -> Result<()> {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/yaml/crds.yaml");
    let out = env.kubectl(cluster).args(["apply", "-f", crds]).output()?;
    if !out.status.success() {
        bail!(
            "installing CRDs in {cluster}: {}",
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

impl World {
    /// Starts east and west (state under `dir`), nodes `east-1`, `east-2`, `west-1`
    /// with daemons, and links west to east.
    pub async fn start(dir: &Path) -> Result<World> {
        let env = TestEnv::start_in(&dir.join("clusters"), &["east", "west"])?;
        let east = env.client("east").await?;
        let west = env.client("west").await?;
        for (name, client) in [("east", &east), ("west", &west)] {
            apply_crds(&env, name).await?;
            for ns in [NAMESPACE, CONTROLLER_NAMESPACE] {
                let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
                Api::<Namespace>::all(client.clone())
                    .create(&PostParams::default(), &obj)
                    .await?;
            }
        }
        let kubeconfig = std::fs::read_to_string(&env.cluster("west").kubeconfig)?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "cluster-west", "labels": {"ferry.dev/cluster": "west"}},
            "stringData": {"kubeconfig": kubeconfig}
        }))?;
        Api::<Secret>::namespaced(east.clone(), CONTROLLER_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;

        let lan = Lan::create()?;
        let daemon_bin = ferry_testkit::workspace_bin("ferry-node")?;
        let cgroup = CgroupGuard::new("e2e");
        let base = dir.join("nodes");
        std::fs::create_dir_all(&base)?;
        let mut nodes = vec![];
        for (cluster, name) in [("east", "east-1"), ("east", "east-2"), ("west", "west-1")] {
            let daemon = Daemon::start(
                &lan,
                name,
                &base,
                &daemon_bin,
                &format!("/{}/{name}", cgroup.0),
            )?;
            let client = if cluster == "east" { &east } else { &west };
            kubelet::register_node(client, name, &[]).await?;
            let patch = json!({"metadata": {"annotations": {ferry_controller::agent::grpc::DAEMON_ANNOTATION: daemon.endpoint}}});
            Api::<Node>::all(client.clone())
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            nodes.push(SimNode {
                cluster: cluster.into(),
                name: name.into(),
                daemon,
            });
        }
        let kubelets = vec![
            kubelet::spawn(east.clone(), vec!["east-1".into(), "east-2".into()]),
            kubelet::spawn(west.clone(), vec!["west-1".into()]),
        ];
        Ok(World {
            env,
            east,
            west,
            nodes,
            base,
            cgroup,
            kubelets,
            controller: None,
            _lan: lan,
        })
    }

    pub fn node(&self, name: &str) -> &SimNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("known node")
    }

    /// Runs the controller for east in this process, with the gRPC agent.
    pub fn start_controller(&mut self) {
        let mut settings = Settings::new(CONTROLLER_NAMESPACE, "east", "demo-controller");
        settings.poll_interval = Duration::from_millis(100);
        let clusters = Arc::new(Clusters::new(self.east.clone(), CONTROLLER_NAMESPACE));
        let ctx = ferry_controller::context(
            self.east.clone(),
            Arc::new(GrpcAgent::new(clusters)),
            &settings,
        );
        self.controller = Some(tokio::spawn(async move {
            ferry_controller::run_with_leader_election(ctx, &settings).await;
        }));
    }

    /// A Pod on east-1 whose one container (runc, under east-1's daemon) runs `script`.
    pub async fn container_pod(&self, name: &str, script: &str) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": "east-1", "containers": [{"name": "app", "image": "busybox"}]}
        }))?;
        let pods: Api<Pod> = Api::namespaced(self.east.clone(), NAMESPACE);
        let pod = pods.create(&PostParams::default(), &pod).await?;
        let labels = PodLabels {
            namespace: NAMESPACE.into(),
            name: name.into(),
            uid: pod.uid().unwrap_or_default(),
        };
        let bundle = self.base.join(format!("bundle-{name}"));
        write_bundle(
            &bundle,
            &labels,
            "app",
            script,
            &format!("/{}/east-1-src/{name}", self.cgroup.0),
        )?;
        let node = &self.node("east-1").daemon;
        node.runc.run(&node.node, &bundle, &format!("{name}-app"))?;
        for _ in 0..100 {
            let p = pods.get(name).await?;
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                return Ok(p);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("pod {name} not Running")
    }

    /// A Pod on east-1 hosting a VM: ferry-launcher runs the test guest (`memory_mib`)
    /// and registers it under east-1's daemon, as the launcher container of a VM pod
    /// would. Returns once the guest counts.
    pub async fn vm_pod(&self, name: &str, memory_mib: u32) -> Result<(Pod, Guest)> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": "east-1", "containers": [{"name": "compute", "image": "ferry-launcher"}]}
        }))?;
        let pods: Api<Pod> = Api::namespaced(self.east.clone(), NAMESPACE);
        let pod = pods.create(&PostParams::default(), &pod).await?;
        let node = &self.node("east-1").daemon;
        let launcher = ferry_testkit::workspace_bin("ferry-launcher")?;
        let guest = Guest::launch(
            &node.node,
            &launcher,
            &node.vm_root,
            NAMESPACE,
            name,
            memory_mib,
        )?;
        wait_count_above(&guest.serial(), 1, Duration::from_secs(90)).await?;
        Ok((pod, guest))
    }

    /// The serial log of VM pod `name` on `node` (the guest prints `count N` lines).
    pub fn vm_serial(&self, node: &str, name: &str) -> PathBuf {
        self.node(node)
            .daemon
            .vm_root
            .join(format!("{NAMESPACE}_{name}"))
            .join("serial.log")
    }

    pub fn bundle_dir(&self, name: &str) -> PathBuf {
        self.base.join(format!("bundle-{name}"))
    }

    pub async fn apply_migration(&self, yaml: &str) -> Result<Migration> {
        let m: Migration = serde_yaml::from_str(yaml)?;
        Api::<Migration>::namespaced(self.east.clone(), NAMESPACE)
            .create(&PostParams::default(), &m)
            .await
            .context("creating Migration")
    }

    /// Follows a Migration until it is terminal, calling `on_change` at each new phase.
    pub async fn follow(
        &self,
        name: &str,
        timeout: Duration,
        mut on_change: impl FnMut(&Migration),
    ) -> Result<Migration> {
        let api: Api<Migration> = Api::namespaced(self.east.clone(), NAMESPACE);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        loop {
            let m = api.get(name).await?;
            let phase = m.status.as_ref().and_then(|s| s.phase);
            if phase != last {
                on_change(&m);
                last = phase;
            }
            if phase.is_some_and(Phase::is_terminal) {
                return Ok(m);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "migration {name} not finished after {timeout:?}: {:?}",
                    m.status
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
