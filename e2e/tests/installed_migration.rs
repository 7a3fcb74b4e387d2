//! A migration through ferry as a user installs it: `helm install` in two clusters
//! (one cluster set: the same `ferry-ca`), `kubectl ferry link`, then `kubectl ferry
//! migrate --wait` moves a counting container from east-1 to west-1 — the controller
//! is the chart's Deployment, the daemons the DaemonSet's pods, the restore runs in the
//! ferry-runtime the DaemonSet installed on west-1. Nothing of ferry runs outside a
//! Pod. The container counts on from where it stopped, once.
use anyhow::{Context, Result, ensure};
use ferry_e2e::installed::{Installed, ok, wait_until};
use ferry_e2e::world::{counter_pod, numbers};
use ferry_testkit::guest::{first_count, last_count as guest_count, sums, vm_pod_manifest};
use std::path::Path;
use std::time::Duration;

const NS: &str = "moving";

fn last_count(w: &Installed, cluster: &str) -> Result<u64> {
    let logs = w.kubectl(cluster, &["logs", "-n", NS, "counter", "-c", "app"])?;
    Ok(numbers(&logs).last().copied().unwrap_or(0))
}

#[test]
fn a_container_moves_between_clusters_through_the_installed_ferry() -> Result<()> {
    ferry_testkit::install_crypto_provider();
    let work = tempfile::Builder::new()
        .prefix("ferry-im-")
        .tempdir_in("/tmp")?;
    let mut w = Installed::start(
        work.path(),
        &[("east", &["east-1"]), ("west", &["west-1"])],
        &[ferry_testkit::guest::launcher_image()?],
    )?;
    for c in ["east", "west"] {
        w.create_cluster_set_ca(c)?;
        let took = w.install(c, &[])?;
        eprintln!("[{c}] helm install → Ready in {:.1}s", took.as_secs_f64());
        w.restart_containerd(c)?;
        w.kubectl(c, &["create", "namespace", NS])?;
    }
    let ferry = |args: &[&str]| kubectl_ferry(&w, args);
    let west_kc = w.env.cluster("west").kubeconfig.display().to_string();
    eprintln!(
        "{}",
        ferry(&[
            "link",
            "west",
            "--home",
            "east",
            "--peer-kubeconfig",
            &west_kc
        ])?
    );

    let mut pod = counter_pod("counter", "east-1", &["app"]);
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    pod["metadata"]["namespace"] = NS.into();
    let f = work.path().join("counter.json");
    std::fs::write(&f, pod.to_string())?;
    w.kubectl("east", &["apply", "-f", &f.to_string_lossy()])?;
    wait_until(
        Duration::from_secs(60),
        "the counter to count",
        || Ok(last_count(&w, "east").unwrap_or(0) > 5),
        || {
            w.kubectl("east", &["describe", "pod", "-n", NS, "counter"])
                .unwrap_or_default()
        },
    )?;

    let moved = ferry(&[
        "-n",
        NS,
        "migrate",
        "counter",
        "--to",
        "west/west-1",
        "--cold",
        "--name",
        "m",
        "--wait",
    ]);
    let printed = match moved {
        Ok(p) => p,
        Err(e) => {
            anyhow::bail!(
                "{e}\n--- east controller\n{}\n--- east daemons\n{}\n--- west daemons\n{}",
                w.ferry_logs("east", "controller"),
                w.ferry_logs("east", "node"),
                w.ferry_logs("west", "node"),
            )
        }
    };
    eprintln!("{printed}");
    for want in ["Checkpointing", "Succeeded", "Downtime:"] {
        ensure!(printed.contains(want), "no {want} in what --wait printed");
    }

    // West runs it on west-1 under the ferry handler; east's copy is gone.
    let where_ = w.kubectl(
        "west",
        &[
            "get",
            "pod",
            "-n",
            NS,
            "counter",
            "-o",
            "jsonpath={.spec.nodeName} {.spec.runtimeClassName} {.status.phase}",
        ],
    )?;
    ensure!(where_ == "west-1 ferry Running", "target pod: {where_}");
    wait_until(
        Duration::from_secs(30),
        "the source Pod to be gone",
        || {
            Ok(w.kubectl("east", &["get", "pods", "-n", NS, "-o", "name"])?
                .trim()
                .is_empty())
        },
        String::new,
    )?;
    // It counts on from where it was, not from 1: the restored process, not a restart.
    let logs = w.kubectl("west", &["logs", "-n", NS, "counter", "-c", "app"])?;
    let first = numbers(&logs).first().copied().unwrap_or(0);
    ensure!(
        first > 5,
        "the target counted from {first}: restarted, not restored"
    );
    let at = last_count(&w, "west")?;
    wait_until(
        Duration::from_secs(30),
        "the moved counter to count on",
        || Ok(last_count(&w, "west")? > at),
        String::new,
    )?;

    vm_moves(&w, work.path())
}

fn kubectl_ferry(w: &Installed, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(ferry_testkit::workspace_bin("kubectl-ferry")?)
        .arg("--kubeconfig")
        .arg(&w.env.cluster("east").kubeconfig)
        .args(args)
        .output()?;
    ok(out, &format!("kubectl ferry {}", args.join(" ")))
}

/// `kubectl ferry -n moving migrate ARGS --wait`; on failure the error carries the
/// installed ferry's logs.
fn migrate(w: &Installed, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", NS, "migrate"];
    all.extend_from_slice(args);
    all.push("--wait");
    let printed = kubectl_ferry(w, &all).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n--- east controller\n{}\n--- east daemons\n{}\n--- west daemons\n{}",
            w.ferry_logs("east", "controller"),
            w.ferry_logs("east", "node"),
            w.ferry_logs("west", "node"),
        )
    })?;
    eprintln!("{printed}");
    for want in ["Succeeded", "Downtime:"] {
        ensure!(printed.contains(want), "no {want} in what --wait printed");
    }
    Ok(())
}

fn pod_uid(w: &Installed, cluster: &str, pod: &str) -> Result<String> {
    w.kubectl(
        cluster,
        &[
            "get",
            "pod",
            "-n",
            NS,
            pod,
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
}

fn vm_moves(w: &Installed, dir: &Path) -> Result<()> {
    let mut manifest = vm_pod_manifest("guest", 256, &w.vm_root());
    manifest["metadata"]["namespace"] = NS.into();
    manifest["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    let f = dir.join("guest.json");
    std::fs::write(&f, manifest.to_string())?;
    w.kubectl("east", &["apply", "-f", &f.to_string_lossy()])?;
    let serial = |cluster: &str| -> Result<std::path::PathBuf> {
        Ok(w.vm_root()
            .join(pod_uid(w, cluster, "guest")?)
            .join("serial.log"))
    };
    let src = serial("east")?;
    wait_until(
        Duration::from_secs(180),
        "the guest to count",
        || Ok(guest_count(&src).unwrap_or(0) > 2),
        || {
            w.kubectl("east", &["describe", "pod", "-n", NS, "guest"])
                .unwrap_or_default()
        },
    )?;
    let before = guest_count(&src).unwrap_or(0);
    let sum = sums(&src)
        .first()
        .cloned()
        .context("the guest printed no memory checksum")?;

    migrate(
        w,
        &["guest", "--to", "west/west-1", "--live", "--name", "vm"],
    )?;

    let placed = w.kubectl(
        "west",
        &[
            "get",
            "pod",
            "-n",
            NS,
            "guest",
            "-o",
            "jsonpath={.spec.nodeName} {.status.phase}",
        ],
    )?;
    ensure!(placed == "west-1 Running", "target VM pod: {placed}");
    let dst = serial("west")?;
    let at = guest_count(&dst).unwrap_or(before);
    wait_until(
        Duration::from_secs(60),
        "the moved guest to count on",
        || Ok(guest_count(&dst).unwrap_or(0) > at),
        String::new,
    )?;
    let first = first_count(&dst).context("no count at the target")?;
    ensure!(
        first >= before,
        "guest rebooted: first count {first} < {before}"
    );
    ensure!(
        sums(&dst).iter().all(|s| *s == sum),
        "guest memory changed across the move"
    );
    wait_until(
        Duration::from_secs(30),
        "the source VM Pod to be gone",
        || {
            Ok(w.kubectl("east", &["get", "pods", "-n", NS, "-o", "name"])?
                .trim()
                .is_empty())
        },
        String::new,
    )?;
    Ok(())
}
