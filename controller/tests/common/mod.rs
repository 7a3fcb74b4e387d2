//! Shared harness for controller tests: one pair of real control planes (east, west)
//! per test binary, one namespace per test, and a controller scoped to that namespace
//! so tests running in parallel never touch each other's objects.
#![allow(dead_code)]
use anyhow::{Context as _, Result, bail};
use ferry_controller::Settings;
use ferry_controller::agent::scripted::ScriptedAgent;
use ferry_crds::{Migration, Phase};
use ferry_testkit::{kubelet, testenv::TestEnv};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

static ENV: OnceLock<TestEnv> = OnceLock::new();
static SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The shared clusters, started on first use with ferry's CRDs installed.
pub fn env() -> &'static TestEnv {
    let _guard = SETUP.lock().unwrap();
    ENV.get_or_init(|| {
        let env = TestEnv::start(&["east", "west"]).expect("start control planes");
        // As installed with ferry: the CRDs and the policy guarding the restore markers.
        let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/yaml/crds.yaml");
        let admission = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/yaml/admission.yaml");
        for cluster in ["east", "west"] {
            let out = env
                .kubectl(cluster)
                .args(["apply", "-f", crds, "-f", admission])
                .output()
                .expect("kubectl");
            assert!(
                out.status.success(),
                "installing CRDs and admission policy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = env
                .kubectl(cluster)
                .args([
                    "wait",
                    "--for=condition=Established",
                    "crd/migrations.ferry.dev",
                    "--timeout=60s",
                ])
                .output()
                .expect("kubectl");
            assert!(
                out.status.success(),
                "CRD not established: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        env
    })
}

/// One test's world: a fresh namespace in both clusters, nodes, a test kubelet.
pub struct World {
    pub ns: String,
    pub east: kube::Client,
    pub west: kube::Client,
    kubelets: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for k in &self.kubelets {
            k.abort();
        }
    }
}

impl World {
    /// `name` prefixes the namespace and the node names, so each test owns its nodes.
    pub async fn new(name: &str) -> Result<World> {
        let env = env();
        let east = env.client("east").await?;
        let west = env.client("west").await?;
        for client in [&east, &west] {
            // As installed with ferry: target Pods of containers name RuntimeClass ferry.
            ferry_testkit::kube_node::create_ferry_runtime_class(client).await?;
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await?;
        }
        let mut east_nodes = vec![];
        let mut west_nodes = vec![];
        for i in 1..=2 {
            let n = format!("{name}-east-{i}");
            kubelet::register_node(&east, &n, &[("ferry.dev/test", name)]).await?;
            east_nodes.push(n);
            let n = format!("{name}-west-{i}");
            kubelet::register_node(&west, &n, &[("ferry.dev/test", name)]).await?;
            west_nodes.push(n);
        }
        let kubelets = vec![
            kubelet::spawn(east.clone(), east_nodes),
            kubelet::spawn(west.clone(), west_nodes),
        ];
        Ok(World {
            ns: name.into(),
            east,
            west,
            kubelets,
        })
    }

    pub fn node(&self, cluster: &str, i: u32) -> String {
        format!("{}-{cluster}-{i}", self.ns)
    }

    /// `target:` naming this world's second east node. Nodes are cluster-scoped, so a
    /// target left to the controller's choice could land on another test's node.
    pub fn same_cluster_target(&self) -> String {
        format!("{{node: {}}}", self.node("east", 2))
    }

    /// A running Pod on east node 1.
    pub async fn pod(&self, name: &str) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": self.node("east", 1),
                     "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "infinity"]}]}
        }))?;
        let pods: Api<Pod> = Api::namespaced(self.east.clone(), &self.ns);
        let pod = pods.create(&PostParams::default(), &pod).await?;
        let ns = self.ns.clone();
        wait_for(Duration::from_secs(30), "pod Running", || {
            let pods = pods.clone();
            let name = name.to_string();
            async move {
                let p = pods.get(&name).await?;
                Ok(p.status.and_then(|s| s.phase).as_deref() == Some("Running"))
            }
        })
        .await
        .with_context(|| format!("pod {ns}/{name}"))?;
        Ok(pod)
    }

    /// Links cluster west to east with a kubeconfig Secret, as a user would.
    pub async fn link_west(&self) -> Result<()> {
        let kubeconfig = std::fs::read_to_string(&env().cluster("west").kubeconfig)?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "cluster-west", "labels": {"ferry.dev/cluster": "west"}},
            "stringData": {"kubeconfig": kubeconfig}
        }))?;
        Api::<Secret>::namespaced(self.east.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    pub async fn migration(&self, yaml: &str) -> Result<Migration> {
        let m: Migration = serde_yaml::from_str(yaml)?;
        Ok(self.migrations().create(&PostParams::default(), &m).await?)
    }

    pub fn migrations(&self) -> Api<Migration> {
        Api::namespaced(self.east.clone(), &self.ns)
    }

    pub fn settings(&self, identity: &str) -> Settings {
        let mut s = Settings::new(&self.ns, "east", identity);
        s.poll_interval = Duration::from_millis(150);
        s.lease_duration = Duration::from_secs(3);
        s.watch_namespace = Some(self.ns.clone());
        s
    }

    /// Starts a controller replica (with leader election) on east.
    pub fn controller(&self, identity: &str, agent: Arc<ScriptedAgent>) -> Controller {
        self.controller_with(self.settings(identity), agent)
    }

    /// Starts a controller replica with these settings.
    pub fn controller_with(&self, settings: Settings, agent: Arc<ScriptedAgent>) -> Controller {
        let ctx = ferry_controller::context(self.east.clone(), agent, &settings);
        let metrics = ctx.metrics.clone();
        let task = tokio::spawn(async move {
            ferry_controller::run_with_leader_election(ctx, &settings).await;
        });
        Controller { task, metrics }
    }

    /// Waits until the Migration reaches `phase`; fails early on another terminal phase.
    pub async fn wait_phase(&self, name: &str, phase: Phase) -> Result<Migration> {
        let api = self.migrations();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let m = api.get(name).await?;
            let current = m.status.as_ref().and_then(|s| s.phase);
            if current == Some(phase) {
                return Ok(m);
            }
            if let Some(p) = current.filter(|p| p.is_terminal()) {
                bail!(
                    "migration {name} ended {p}, expected {phase}: {:?}",
                    m.status
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("migration {name} not {phase} within 60 s: {:?}", m.status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub struct Controller {
    pub task: tokio::task::JoinHandle<()>,
    pub metrics: ferry_controller::metrics::Metrics,
}

impl Controller {
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
