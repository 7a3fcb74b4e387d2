//! A VM pod on real nodes: its kubelet runs ferry-launcher (from the launcher image),
//! which runs the guest under QEMU (TCG here). The controller creates the target Pod
//! first, marked incoming; its kubelet starts the launcher waiting for the guest; the
//! daemons live-migrate QEMU over their mutual-TLS pipe; the source Pod is deleted and
//! its kubelet ends the paused source QEMU. Both strategies, one world. Then faults
//! mid pre-copy (capped at 1 MiB/s so the copy lasts): the destination daemon killed
//! (rolls back), the controller restarted (completes), the Migration deleted
//! (cancelled); each ends with the guest running once, counting, memory intact.
use anyhow::{Context, Result, bail, ensure};
use ferry_crds::{Migration, MigrationStatus, Phase, WorkloadKind};
use ferry_e2e::world::{World, WorldOptions, wait_for};
use ferry_testkit::guest::{
    first_count, last_count, launcher_image, sums, vm_pod_manifest, wait_count_above,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::path::PathBuf;
use std::time::Duration;

/// A guest running on east-1: where its serial log is, its count and its memory
/// checksum before any move.
struct Guest {
    serial: PathBuf,
    before: u64,
    sum: String,
}

async fn start_guest(w: &World, ns: &str) -> Result<Guest> {
    let mut manifest = vm_pod_manifest("guest", 256, &w.vm_root);
    manifest["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    let pod = w.create_pod(ns, manifest).await?;
    let serial = w
        .vm_root
        .join(pod.metadata.uid.clone().unwrap_or_default())
        .join("serial.log");
    let before = wait_count_above(&serial, 2, Duration::from_secs(120)).await?;
    let sum = sums(&serial)
        .first()
        .cloned()
        .context("the guest printed no memory checksum")?;
    Ok(Guest {
        serial,
        before,
        sum,
    })
}

/// Migration `guest` of pod `guest` to west-1; `extra` is appended to its spec.
async fn migrate(w: &World, ns: &str, strategy: &str, extra: &str) -> Result<()> {
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: guest}}\nspec:\n  workload: {{pod: guest}}\n  target: {{cluster: west, node: west-1}}\n  strategy: {strategy}\n{extra}"
    );
    w.apply_migration(ns, &yaml).await?;
    Ok(())
}

async fn follow(w: &World, ns: &str) -> Result<MigrationStatus> {
    let done = w
        .follow(ns, "guest", Duration::from_secs(240), |m| {
            eprintln!("[{ns}] {:?}", m.status.as_ref().and_then(|s| s.phase));
        })
        .await?;
    done.status.context("no status")
}

async fn vm_moves(w: &World, ns: &str, strategy: &str) -> Result<()> {
    let g = start_guest(w, ns).await?;
    migrate(w, ns, strategy, "").await?;
    let status = follow(w, ns).await?;
    moved(w, ns, &g, &status).await?;
    let t = status.timings.unwrap_or_default();
    eprintln!(
        "[{ns}] {strategy}: downtime {:?} ms, total {:?} ms",
        t.downtime_ms, t.total_ms
    );
    Ok(())
}

/// After a Succeeded move: the target Pod runs under west-1's kubelet, the guest counts
/// on from where it was with the memory it never changes intact (no reboot), and the
/// source Pod and its QEMU are gone: exactly one copy.
async fn moved(w: &World, ns: &str, g: &Guest, status: &MigrationStatus) -> Result<()> {
    ensure!(
        status.phase == Some(Phase::Succeeded),
        "{:?}",
        status.failure
    );
    ensure!(
        status.workload_kind == Some(WorkloadKind::VirtualMachine),
        "kind {:?}",
        status.workload_kind
    );
    let west: Api<Pod> = Api::namespaced(w.west.clone(), ns);
    let target = west.get("guest").await?;
    ensure!(
        target.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("west-1"),
        "target node"
    );
    let cs = target
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default();
    ensure!(
        cs.len() == 1 && cs[0].restart_count == 0,
        "target container restarted: {cs:?}"
    );
    let dst_serial = w
        .vm_root
        .join(target.metadata.uid.unwrap_or_default())
        .join("serial.log");
    let at_cut = last_count(&dst_serial).unwrap_or(g.before);
    wait_count_above(&dst_serial, at_cut, Duration::from_secs(60)).await?;
    let first = first_count(&dst_serial).context("no count at the target")?;
    ensure!(
        first >= g.before,
        "guest rebooted: first count {first} < {}",
        g.before
    );
    ensure!(
        sums(&dst_serial).iter().all(|s| *s == g.sum),
        "memory checksum changed"
    );
    let east: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    wait_for(Duration::from_secs(60), "the source Pod to go", || async {
        Ok(east.get_opt("guest").await?.is_none())
    })
    .await?;
    let copies = w.running_copies(ns, "guest")?;
    ensure!(
        copies.len() == 1 && copies[0].0 == "west-1",
        "running copies {copies:?}"
    );
    Ok(())
}

/// After a rollback or cancel: the target Pod is gone, the source Pod's one container
/// was never restarted, its guest counts on past `at_fault` with its memory intact, and
/// it is the only copy.
async fn stayed(w: &World, ns: &str, g: &Guest, at_fault: u64) -> Result<()> {
    let west: Api<Pod> = Api::namespaced(w.west.clone(), ns);
    wait_for(Duration::from_secs(60), "the target Pod to go", || async {
        Ok(west.get_opt("guest").await?.is_none())
    })
    .await?;
    wait_count_above(&g.serial, at_fault + 2, Duration::from_secs(60))
        .await
        .context("the source guest did not count on")?;
    ensure!(
        sums(&g.serial).iter().all(|s| *s == g.sum),
        "the source's memory checksum changed"
    );
    let cs = w.container_statuses("east", ns, "guest").await?;
    ensure!(
        cs.len() == 1 && cs[0].restart_count == 0,
        "source container restarted: {cs:?}"
    );
    let copies = w.running_copies(ns, "guest")?;
    ensure!(
        copies == [("east-1".to_string(), "compute".to_string())],
        "running copies {copies:?}"
    );
    Ok(())
}

/// What a fault does to a VM move mid pre-copy.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The destination daemon SIGKILLed (with its children) and restarted.
    DestinationDaemon,
    /// The controller killed and restarted.
    Controller,
    /// The Migration deleted.
    Delete,
}

/// Pre-copy capped at 1 MiB/s, so the copy lasts; `fault` once bytes have moved and
/// before anything is committed. The copy must then roll back (daemon), complete
/// (controller) or be cancelled (delete), with the guest running exactly once, intact.
async fn vm_fault_mid_copy(w: &mut World, ns: &str, fault: Fault) -> Result<()> {
    let g = start_guest(w, ns).await?;
    migrate(w, ns, "Live", "  transfer: {bandwidthLimitMiBps: 1}\n").await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    wait_for(
        Duration::from_secs(120),
        "the guest's memory to move",
        || async {
            let s = migs.get("guest").await?.status.unwrap_or_default();
            ensure!(
                !s.committed
                    && !s
                        .phase
                        .is_some_and(|p| p.is_terminal()
                            || matches!(p, Phase::Restoring | Phase::Completing)),
                "past the copy before the fault: {:?} committed {}",
                s.phase,
                s.committed
            );
            Ok(
                matches!(s.phase, Some(Phase::Checkpointing | Phase::Transferring))
                    && s.progress.is_some_and(|p| p.bytes_transferred > 0),
            )
        },
    )
    .await?;
    let at_fault = last_count(&g.serial).unwrap_or(g.before);
    eprintln!("[{ns}] {fault:?} mid-copy at count {at_fault}");
    match fault {
        Fault::DestinationDaemon => w.restart_daemon("west-1")?,
        Fault::Controller => w.restart_controller().await,
        Fault::Delete => migs
            .delete("guest", &Default::default())
            .await
            .map(|_| ())?,
    }
    match fault {
        Fault::DestinationDaemon => {
            let status = follow(w, ns).await?;
            ensure!(
                status.phase == Some(Phase::RolledBack),
                "{:?}: {:?}",
                status.phase,
                status.failure
            );
            let f = status.failure.context("no failure")?;
            eprintln!("[{ns}] rolled back: {}: {}", f.reason, f.message);
            stayed(w, ns, &g, at_fault).await
        }
        Fault::Controller => {
            let status = follow(w, ns).await?;
            moved(w, ns, &g, &status).await
        }
        Fault::Delete => {
            wait_for(
                Duration::from_secs(120),
                "the deleted Migration to go",
                || async { Ok(migs.get_opt("guest").await?.is_none()) },
            )
            .await?;
            stayed(w, ns, &g, at_fault).await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vm_pods_move_to_another_cluster_and_keep_counting() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-vm-")
        .tempdir_in("/tmp")?;
    let opts = WorldOptions {
        images: vec![launcher_image()?],
        ..Default::default()
    };
    let mut w = World::start(dir.path(), opts).await?;
    w.start_controller();
    // One after the other: two TCG guests at once would starve the 2 cores.
    let mut failed = vec![];
    let mut record = |name: String, r: Result<()>| match r {
        Ok(()) => eprintln!("scenario ok: {name}"),
        Err(e) => {
            eprintln!("scenario FAILED: {name}: {e:#}");
            failed.push(name);
        }
    };
    for (ns, strategy) in [("vm-live", "Live"), ("vm-cold", "Cold")] {
        w.namespace(ns).await?;
        record(format!("VM {strategy}"), vm_moves(&w, ns, strategy).await);
        w.clean_namespace(ns).await;
    }
    for (ns, fault) in [
        ("vm-dest-crash", Fault::DestinationDaemon),
        ("vm-restart", Fault::Controller),
        ("vm-delete", Fault::Delete),
    ] {
        w.namespace(ns).await?;
        let r = vm_fault_mid_copy(&mut w, ns, fault).await;
        record(format!("VM: {fault:?} mid pre-copy"), r);
        w.clean_namespace(ns).await;
    }
    if !failed.is_empty() {
        eprintln!("logs kept in {}", dir.keep().display());
        bail!("VM scenarios failed: {failed:?}");
    }
    Ok(())
}
