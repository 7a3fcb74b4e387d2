//! `helm install` of ferry on a cluster of real nodes (kubelet + containerd), from the
//! images `ferry-images` builds: the controller and every ferry-node DaemonSet pod
//! become Ready; each daemon announces itself on its own Node; the init container puts
//! ferry-runtime and containerd's `ferry` handler on each host, so that a Pod of the
//! `ferry` RuntimeClass runs; `helm upgrade` with a changed value rolls both out and
//! keeps the node pieces; `helm uninstall` leaves no ferry object (but the CRDs, by
//! Helm's policy), no Node annotation, no host file and no containerd handler.
//!
//! Two things differ from a real node, and the values say so: containerd is not run
//! by systemd here (PID 1 is not systemd), so the chart is told
//! `node.containerdRestart=none` and the test restarts containerd where systemd would;
//! and both nodes share this host's filesystem, so their paths carry `$(NODE_NAME)`.
use anyhow::{Context, Result, bail, ensure};
use ferry_e2e::chart::{CHART, helm};
use ferry_testkit::kube_node::{KubeNode, NodeOptions, pod_cidr_for};
use ferry_testkit::netns::Lan;
use ferry_testkit::oci::ferry::{self, NodeTools};
use ferry_testkit::testenv::{Options, TestEnv};
use ferry_testkit::workspace_bin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const NS: &str = "ferry-system";

fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn kubectl(env: &TestEnv, args: &[&str]) -> Result<String> {
    ok(
        env.kubectl("east").args(args).output()?,
        &format!("kubectl {}", args.join(" ")),
    )
}

fn wait_until(
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

/// The nodes' directory, bind-mounted onto itself and made shared: the DaemonSet's
/// HostToContainer mounts need a shared host mount (as systemd makes `/` on a real
/// host; here `/` is private). Unmounted when dropped, after the nodes.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(dir: &Path) -> Result<SharedDir> {
        std::fs::create_dir_all(dir)?;
        for args in [vec!["--bind"], vec!["--make-rshared"]] {
            let out = Command::new("mount")
                .args(&args)
                .args(if args[0] == "--bind" {
                    vec![dir, dir]
                } else {
                    vec![dir]
                })
                .output()?;
            ok(out, "mount")?;
        }
        Ok(SharedDir(dir.to_path_buf()))
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn values(env: &TestEnv, base: &Path) -> Result<String> {
    let c = env.cluster("east");
    let ca = std::fs::read_to_string(c.ca.as_ref().context("no cluster CA")?)?;
    let (host, port) = c
        .server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .context("server URL")?;
    let node = |p: &str| format!("{}/$(NODE_NAME)/{p}", base.display());
    let tools = NodeTools::from_host()?;
    let v = serde_json::json!({
        "clusterName": "east",
        // The apiserver's webhook client certificate is signed by the cluster CA.
        "tls": {"webhookClientCA": ca},
        // No kube-proxy here: the `kubernetes` Service does not route.
        "kubernetesAPI": {"host": host, "port": port},
        "controller": {"resources": {"requests": {"cpu": "10m"}}},
        "node": {
            "containerdRestart": "none",
            "terminationGracePeriodSeconds": 30,
            "resources": {"requests": {"cpu": "10m"}},
            "hostMounts": [base],
            "paths": {
                "containerdSocket": node("run/containerd.sock"),
                "runcRoot": node("run/runc/k8s.io"),
                "handlerRuncRoot": node("run/ferry-runc"),
                "stateDir": node("ferry-state"),
                "vmRoot": node("vms"),
                "binDir": node("ferry-bin"),
                "containerdDropin": node("containerd/conf.d/ferry.toml"),
                "hostRunc": tools.runc,
                "hostCriu": tools.criu,
            },
        },
    });
    // helm reads JSON as YAML.
    Ok(v.to_string())
}

fn helm_cmd(env: &TestEnv) -> Result<Command> {
    let mut c = Command::new(helm()?);
    c.arg("--kubeconfig")
        .arg(&env.cluster("east").kubeconfig)
        .args(["-n", NS]);
    Ok(c)
}

fn pods_of(env: &TestEnv, component: &str) -> Result<Vec<serde_json::Value>> {
    let out = kubectl(
        env,
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

fn ready(pod: &serde_json::Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Waits until `n` pods of the component are Ready, none other exists, and none of
/// them is one of `old` (uids): a finished rollout.
fn rolled_out(env: &TestEnv, component: &str, n: usize, old: &[String]) -> Result<Vec<String>> {
    let mut uids = vec![];
    wait_until(
        Duration::from_secs(180),
        &format!("{n} ready {component} pods"),
        || {
            let pods = pods_of(env, component)?;
            uids = pods
                .iter()
                .map(|p| p["metadata"]["uid"].as_str().unwrap_or("").to_string())
                .collect();
            Ok(pods.len() == n && pods.iter().all(ready) && !uids.iter().any(|u| old.contains(u)))
        },
        || kubectl(env, &["describe", "pods", "-n", NS]).unwrap_or_else(|e| e.to_string()),
    )?;
    Ok(uids)
}

fn daemon_annotation(env: &TestEnv, node: &str) -> Result<String> {
    kubectl(
        env,
        &[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.metadata.annotations.ferry\\.dev/node-daemon}",
        ],
    )
}

/// The handlers containerd runs with (its CRI status), as the kubelet sees them.
fn handlers(node: &KubeNode) -> Result<Vec<String>> {
    let out = ok(node.crictl().arg("info").output()?, "crictl info")?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["config"]["containerd"]["runtimes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}

fn ferry_pod_runs(env: &TestEnv, dir: &Path, node: &str) -> Result<()> {
    let name = format!("under-ferry-{node}");
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "runtimeClassName": "ferry",
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": ferry_testkit::oci::BUSYBOX_IMAGE,
                "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]
        }
    });
    let f = dir.join(format!("{name}.json"));
    std::fs::write(&f, pod.to_string())?;
    kubectl(env, &["apply", "-f", &f.to_string_lossy()])?;
    wait_until(
        Duration::from_secs(90),
        &format!("pod {name} of RuntimeClass ferry to run"),
        || {
            let phase = kubectl(
                env,
                &["get", "pod", &name, "-o", "jsonpath={.status.phase}"],
            )?;
            Ok(phase == "Running")
        },
        || kubectl(env, &["describe", "pod", &name]).unwrap_or_else(|e| e.to_string()),
    )?;
    kubectl(
        env,
        &["delete", "pod", &name, "--wait=true", "--timeout=60s"],
    )?;
    Ok(())
}

#[test]
fn helm_installs_upgrades_and_uninstalls_ferry_on_real_nodes() -> Result<()> {
    ferry_testkit::install_crypto_provider();
    let work = tempfile::Builder::new()
        .prefix("ferry-inst-")
        .tempdir_in("/tmp")?;
    let bin_dir = workspace_bin("ferry-node")?
        .parent()
        .context("the binaries' directory")?
        .to_path_buf();
    let built = ferry::build_all(
        &bin_dir,
        ferry::version(),
        &NodeTools::from_host()?,
        &work.path().join("images"),
    )?;
    let lan = Lan::create()?;
    let env = TestEnv::start_with(
        &["east"],
        &Options {
            bind_ip: Some(lan.host_ip()),
            nodes: true,
        },
    )?;
    let base = work.path().join("n");
    let _shared = SharedDir::new(&base)?;
    let mut images: Vec<PathBuf> = built
        .iter()
        .filter(|b| !b.reference.contains("launcher"))
        .map(|b| b.archive.clone())
        .collect();
    images.push(ferry_testkit::oci::busybox_image()?);
    let mut nodes = vec![];
    for name in ["east-1", "east-2"] {
        let n = lan.add_node(name)?;
        let mut o = NodeOptions::new(name, &pod_cidr_for(&n), &base.join(name));
        o.images = images.clone();
        nodes.push((KubeNode::start(&n, env.cluster("east"), o)?, n));
    }
    ferry_testkit::kube_node::route_pod_networks(
        &nodes.iter().map(|(k, _)| k).collect::<Vec<_>>(),
    )?;

    // Install.
    let values_file = work.path().join("values.json");
    std::fs::write(&values_file, values(&env, &base)?)?;
    let t = Instant::now();
    ok(
        helm_cmd(&env)?
            .args(["install", "ferry", CHART, "--create-namespace", "-f"])
            .arg(&values_file)
            .output()?,
        "helm install",
    )?;
    let controllers = rolled_out(&env, "controller", 2, &[])?;
    let daemons = rolled_out(&env, "node", 2, &[])?;
    eprintln!(
        "helm install → controller and daemons Ready in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for (k, _) in &nodes {
        let want = format!("https://{}:7070", k.ip());
        wait_until(
            Duration::from_secs(30),
            &format!("{} to announce {want}", k.name()),
            || Ok(daemon_annotation(&env, k.name())? == want),
            String::new,
        )?;
        let bin = k.dir().join("ferry-bin");
        for f in ["ferry-runtime", "ferry-runtime.json"] {
            ensure!(
                bin.join(f).is_file(),
                "{} not installed",
                bin.join(f).display()
            );
        }
        let dropin = k.containerd_dropin_dir().join("ferry.toml");
        let text = std::fs::read_to_string(&dropin)
            .with_context(|| format!("{} not installed", dropin.display()))?;
        ensure!(
            text.contains(&bin.join("ferry-runtime").display().to_string()),
            "{text}"
        );
        ensure!(
            !handlers(k)?.contains(&"ferry".to_string()),
            "containerd has the handler before it restarted"
        );
    }
    // What systemd would do (node.containerdRestart=none): restart containerd. The
    // running pods, ferry's own included, go on.
    for (k, _) in &mut nodes {
        k.restart_containerd()?;
        ensure!(
            handlers(k)?.contains(&"ferry".to_string()),
            "{}: no ferry handler after the restart",
            k.name()
        );
    }
    for (k, _) in &nodes {
        ferry_pod_runs(&env, work.path(), k.name())?;
    }
    let rbac = kubectl(
        &env,
        &["get", "clusterrolebinding", "ferry-node", "-o", "name"],
    )?;
    ensure!(rbac.trim() == "clusterrolebinding.rbac.authorization.k8s.io/ferry-node");

    // Upgrade: a changed value rolls out; the node pieces stay (the preStop hook sees
    // the DaemonSet still there).
    ok(
        helm_cmd(&env)?
            .args([
                "upgrade",
                "ferry",
                CHART,
                "--reuse-values",
                "--set",
                "logLevel=debug",
            ])
            .output()?,
        "helm upgrade",
    )?;
    rolled_out(&env, "controller", 2, &controllers)?;
    let new_daemons = rolled_out(&env, "node", 2, &daemons)?;
    for uid in &new_daemons {
        let env_json = kubectl(
            &env,
            &[
                "get",
                "pods",
                "-n",
                NS,
                "-o",
                &format!(
                    "jsonpath={{.items[?(@.metadata.uid==\"{uid}\")].spec.containers[0].env}}"
                ),
            ],
        )?;
        ensure!(env_json.contains(r#""value":"debug""#), "{env_json}");
    }
    for (k, _) in &nodes {
        ensure!(
            k.dir().join("ferry-bin/ferry-runtime").is_file()
                && k.containerd_dropin_dir().join("ferry.toml").is_file(),
            "{}: the upgrade removed the node pieces",
            k.name()
        );
    }

    // Uninstall.
    let t = Instant::now();
    ok(
        helm_cmd(&env)?
            .args(["uninstall", "ferry", "--wait", "--timeout=5m"])
            .output()?,
        "helm uninstall",
    )?;
    eprintln!("helm uninstall took {:.1}s", t.elapsed().as_secs_f64());
    wait_until(
        Duration::from_secs(60),
        "ferry's pods to be gone",
        || {
            Ok(kubectl(&env, &["get", "pods", "-n", NS, "-o", "name"])?
                .trim()
                .is_empty())
        },
        || kubectl(&env, &["get", "pods", "-n", NS, "-o", "wide"]).unwrap_or_default(),
    )?;
    let mut left = vec![];
    for (k, _) in &nodes {
        if !daemon_annotation(&env, k.name())?.is_empty() {
            left.push(format!(
                "{}: the ferry.dev/node-daemon annotation",
                k.name()
            ));
        }
        for f in [
            k.dir().join("ferry-bin"),
            k.containerd_dropin_dir().join("ferry.toml"),
        ] {
            if f.exists() {
                left.push(f.display().to_string());
            }
        }
    }
    for (k, _) in &mut nodes {
        k.restart_containerd()?;
        if handlers(k)?.contains(&"ferry".to_string()) {
            left.push(format!("{}: containerd's ferry handler", k.name()));
        }
    }
    // Every ferry object, namespaced or not, but the CRDs (helm never deletes those).
    let kinds = "all,secrets,configmaps,serviceaccounts,roles,rolebindings,\
                 poddisruptionbudgets,jobs";
    left.extend(
        kubectl(&env, &["get", kinds, "-n", NS, "-o", "name"])?
            .lines()
            .filter(|l| !l.ends_with("/kube-root-ca.crt") && !l.ends_with("/default"))
            .map(String::from),
    );
    let cluster_kinds = "clusterroles,clusterrolebindings,runtimeclasses,\
        validatingwebhookconfigurations,validatingadmissionpolicies,\
        validatingadmissionpolicybindings";
    left.extend(
        kubectl(&env, &["get", cluster_kinds, "-o", "name"])?
            .lines()
            .filter(|l| l.contains("ferry"))
            .map(String::from),
    );
    ensure!(left.is_empty(), "helm uninstall left behind: {left:#?}");
    let crds = kubectl(&env, &["get", "crd", "-o", "name"])?;
    ensure!(
        crds.contains("migrations.ferry.dev"),
        "CRDs stay (helm's policy): {crds}"
    );
    Ok(())
}
