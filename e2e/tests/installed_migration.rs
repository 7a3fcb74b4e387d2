//! Migrations through ferry as a user installs it: `helm install` in two clusters (one
//! cluster set: the same `ferry-ca`), `kubectl ferry link`, then `kubectl ferry migrate
//! --wait` (`ferry_e2e::installed`). The controller is the chart's Deployment, the
//! daemons the DaemonSet's pods, the container's restore runs in the ferry-runtime the
//! DaemonSet installed on west-1: nothing of ferry runs outside a Pod. A counting
//! container moves cold from east-1 to west-1 and counts on from where it stopped,
//! once; then a VM Pod (ferry-launcher, QEMU under TCG here) moves live and its guest
//! counts on with its memory intact.
use anyhow::{Context, Result, ensure};
use ferry_e2e::installed::{Installed, wait_until};
use ferry_e2e::world::{counter_pod, numbers};
use ferry_testkit::guest::{first_count, last_count as guest_count, sums, vm_pod_manifest};
use std::path::Path;
use std::time::Duration;

const NS: &str = "moving";

fn last_count(w: &Installed, cluster: &str) -> Result<u64> {
    let logs = w.kubectl(cluster, &["logs", "-n", NS, "counter", "-c", "app"])?;
    Ok(numbers(&logs).last().copied().unwrap_or(0))
}

fn apply(w: &Installed, dir: &Path, manifest: serde_json::Value) -> Result<()> {
    let f = dir.join("manifest.json");
    std::fs::write(&f, manifest.to_string())?;
    w.kubectl("east", &["apply", "-f", &f.to_string_lossy()])?;
    Ok(())
}

/// What `kubectl ferry migrate --wait` must have printed for a finished move.
fn succeeded(printed: &str) -> Result<()> {
    eprintln!("{printed}");
    for want in ["Succeeded", "Downtime:"] {
        ensure!(printed.contains(want), "no {want} in what --wait printed");
    }
    Ok(())
}

fn source_gone(w: &Installed) -> Result<()> {
    wait_until(
        Duration::from_secs(30),
        "the source Pod to be gone",
        || {
            Ok(w.kubectl("east", &["get", "pods", "-n", NS, "-o", "name"])?
                .trim()
                .is_empty())
        },
        String::new,
    )
}

#[test]
fn workloads_move_between_clusters_through_the_installed_ferry() -> Result<()> {
    ferry_testkit::install_crypto_provider();
    let work = tempfile::Builder::new()
        .prefix("ferry-im-")
        .tempdir_in("/tmp")?;
    let w = Installed::start_cluster_set(
        work.path(),
        &[("east", &["east-1"]), ("west", &["west-1"])],
        &[ferry_testkit::guest::launcher_image()?],
    )?;
    for c in ["east", "west"] {
        w.kubectl(c, &["create", "namespace", NS])?;
    }

    // A container, cold.
    let mut pod = counter_pod("counter", "east-1", &["app"]);
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    pod["metadata"]["namespace"] = NS.into();
    apply(&w, work.path(), pod)?;
    wait_until(
        Duration::from_secs(60),
        "the counter to count",
        || Ok(last_count(&w, "east").unwrap_or(0) > 5),
        || {
            w.kubectl("east", &["describe", "pod", "-n", NS, "counter"])
                .unwrap_or_default()
        },
    )?;
    succeeded(&w.migrate(
        NS,
        &["counter", "--to", "west/west-1", "--cold", "--name", "m"],
    )?)?;
    let placed = w.kubectl(
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
    ensure!(placed == "west-1 ferry Running", "target pod: {placed}");
    source_gone(&w)?;
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

    // A VM, live.
    let mut vm = vm_pod_manifest("guest", 256, &w.vm_root());
    vm["metadata"]["namespace"] = NS.into();
    vm["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    apply(&w, work.path(), vm)?;
    let src = w.vm_serial("east", NS, "guest")?;
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
    succeeded(&w.migrate(
        NS,
        &["guest", "--to", "west/west-1", "--live", "--name", "vm"],
    )?)?;
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
    let dst = w.vm_serial("west", NS, "guest")?;
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
    source_gone(&w)
}
