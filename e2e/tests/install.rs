//! `helm install` of ferry on a cluster of two real nodes (kubelet + containerd), from
//! the images `ferry-images` builds (`ferry_e2e::installed`): the controller and every
//! ferry-node DaemonSet pod become Ready; each daemon announces itself on its own Node;
//! the init container puts ferry-runtime and containerd's `ferry` handler on each host,
//! so that a Pod of the `ferry` RuntimeClass runs; `helm upgrade` with a changed value
//! rolls both out and keeps the node pieces; `helm uninstall` leaves no ferry object
//! (but the CRDs, by Helm's policy), no Node annotation, no host file and no containerd
//! handler.
use anyhow::{Result, ensure};
use ferry_e2e::chart::CHART;
use ferry_e2e::installed::{Installed, NS, handlers, ok, wait_until};
use std::path::Path;
use std::time::{Duration, Instant};

fn ferry_pod_runs(w: &Installed, dir: &Path, node: &str) -> Result<()> {
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
    w.kubectl("east", &["apply", "-f", &f.to_string_lossy()])?;
    wait_until(
        Duration::from_secs(90),
        &format!("pod {name} of RuntimeClass ferry to run"),
        || {
            Ok(w.kubectl(
                "east",
                &["get", "pod", &name, "-o", "jsonpath={.status.phase}"],
            )? == "Running")
        },
        || {
            w.kubectl("east", &["describe", "pod", &name])
                .unwrap_or_else(|e| e.to_string())
        },
    )?;
    w.kubectl(
        "east",
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
    let mut w = Installed::start(work.path(), &[("east", &["east-1", "east-2"])], &[])?;

    // Install.
    let took = w.install("east", &[])?;
    eprintln!(
        "helm install → controller and daemons Ready in {:.1}s",
        took.as_secs_f64()
    );
    let controllers = w.rolled_out("east", "controller", 2, &[])?;
    let daemons = w.rolled_out("east", "node", 2, &[])?;
    for k in w.nodes("east") {
        let want = format!("https://{}:7070", k.ip());
        wait_until(
            Duration::from_secs(30),
            &format!("{} to announce {want}", k.name()),
            || Ok(w.daemon_annotation("east", k.name())? == want),
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
            .map_err(|e| anyhow::anyhow!("{} not installed: {e}", dropin.display()))?;
        ensure!(
            text.contains(&bin.join("ferry-runtime").display().to_string()),
            "{text}"
        );
        ensure!(
            !handlers(k)?.contains(&"ferry".to_string()),
            "containerd has the handler before it restarted"
        );
    }
    // What systemd would do (node.containerdRestart=none). The running pods, ferry's
    // own included, go on.
    w.restart_containerd("east")?;
    for k in w.nodes("east") {
        ensure!(
            handlers(k)?.contains(&"ferry".to_string()),
            "{}: no ferry handler after the restart",
            k.name()
        );
        ferry_pod_runs(&w, work.path(), k.name())?;
    }
    w.rolled_out("east", "node", 2, &[])?;

    // Upgrade: a changed value rolls out; the node pieces stay (the preStop hook sees
    // the DaemonSet still there).
    ok(
        w.helm("east")?
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
    w.rolled_out("east", "controller", 2, &controllers)?;
    for uid in w.rolled_out("east", "node", 2, &daemons)? {
        let env = w.kubectl(
            "east",
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
        ensure!(env.contains(r#""value":"debug""#), "{env}");
    }
    for k in w.nodes("east") {
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
        w.helm("east")?
            .args(["uninstall", "ferry", "--wait", "--timeout=5m"])
            .output()?,
        "helm uninstall",
    )?;
    eprintln!("helm uninstall took {:.1}s", t.elapsed().as_secs_f64());
    wait_until(
        Duration::from_secs(60),
        "ferry's pods to be gone",
        || {
            Ok(w.kubectl("east", &["get", "pods", "-n", NS, "-o", "name"])?
                .trim()
                .is_empty())
        },
        || {
            w.kubectl("east", &["get", "pods", "-n", NS, "-o", "wide"])
                .unwrap_or_default()
        },
    )?;
    let mut left = vec![];
    for k in w.nodes("east") {
        if !w.daemon_annotation("east", k.name())?.is_empty() {
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
    w.restart_containerd("east")?;
    for k in w.nodes("east") {
        if handlers(k)?.contains(&"ferry".to_string()) {
            left.push(format!("{}: containerd's ferry handler", k.name()));
        }
    }
    // Every ferry object, namespaced or not, but the CRDs (helm never deletes those).
    let kinds = "all,secrets,configmaps,serviceaccounts,roles,rolebindings,leases,\
                 poddisruptionbudgets,jobs";
    left.extend(
        w.kubectl("east", &["get", kinds, "-n", NS, "-o", "name"])?
            .lines()
            .filter(|l| !l.ends_with("/kube-root-ca.crt") && !l.ends_with("/default"))
            .map(String::from),
    );
    let cluster_kinds = "clusterroles,clusterrolebindings,runtimeclasses,\
        validatingwebhookconfigurations,validatingadmissionpolicies,\
        validatingadmissionpolicybindings";
    left.extend(
        w.kubectl("east", &["get", cluster_kinds, "-o", "name"])?
            .lines()
            .filter(|l| l.contains("ferry"))
            .map(String::from),
    );
    ensure!(left.is_empty(), "helm uninstall left behind: {left:#?}");
    let crds = w.kubectl("east", &["get", "crd", "-o", "name"])?;
    ensure!(
        crds.contains("migrations.ferry.dev"),
        "CRDs stay (helm's policy): {crds}"
    );
    Ok(())
}
