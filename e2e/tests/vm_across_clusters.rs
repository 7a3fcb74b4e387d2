//! A VM pod on real nodes: its kubelet runs ferry-launcher (from the launcher image),
//! which runs the guest under QEMU (TCG here). The controller creates the target Pod
//! first, marked incoming; its kubelet starts the launcher waiting for the guest; the
//! daemons live-migrate QEMU over their mutual-TLS pipe; the source Pod is deleted and
//! its kubelet ends the paused source QEMU. Both strategies, one world.
use anyhow::{Context, Result, bail, ensure};
use ferry_crds::{Phase, WorkloadKind};
use ferry_e2e::world::{World, WorldOptions};
use ferry_testkit::guest::{
    first_count, last_count, launcher_image, sums, vm_pod_manifest, wait_count_above,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

async fn vm_moves(w: &World, ns: &str, strategy: &str) -> Result<()> {
    let mut manifest = vm_pod_manifest("guest", 256, &w.vm_root);
    manifest["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    let pod = w.create_pod(ns, manifest).await?;
    let src_serial = w
        .vm_root
        .join(pod.metadata.uid.clone().unwrap_or_default())
        .join("serial.log");
    let before = wait_count_above(&src_serial, 2, Duration::from_secs(120)).await?;
    let sum_before = sums(&src_serial)
        .first()
        .cloned()
        .context("the guest printed no memory checksum")?;
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: guest}}\nspec:\n  workload: {{pod: guest}}\n  target: {{cluster: west, node: west-1}}\n  strategy: {strategy}\n"
    );
    w.apply_migration(ns, &yaml).await?;
    let done = w
        .follow(ns, "guest", Duration::from_secs(240), |m| {
            eprintln!("[{ns}] {:?}", m.status.as_ref().and_then(|s| s.phase));
        })
        .await?;
    let status = done.status.clone().context("status")?;
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
    // The target Pod runs under west-1's kubelet, and the guest counts on from where it
    // was, with the memory it never changes intact: no reboot.
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
    let at_cut = last_count(&dst_serial).unwrap_or(before);
    wait_count_above(&dst_serial, at_cut, Duration::from_secs(60)).await?;
    let first = first_count(&dst_serial).context("no count at the target")?;
    ensure!(
        first >= before,
        "guest rebooted: first count {first} < {before}"
    );
    ensure!(
        sums(&dst_serial).iter().all(|s| *s == sum_before),
        "memory checksum changed"
    );
    // Exactly one copy: the source Pod and its QEMU are gone.
    let east: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while east.get_opt("guest").await?.is_some() {
        if std::time::Instant::now() > deadline {
            bail!("the source Pod is still there");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let copies = w.running_copies(ns, "guest")?;
    ensure!(
        copies.len() == 1 && copies[0].0 == "west-1",
        "running copies {copies:?}"
    );
    let t = status.timings.unwrap_or_default();
    eprintln!(
        "[{ns}] {strategy}: downtime {:?} ms, total {:?} ms",
        t.downtime_ms, t.total_ms
    );
    Ok(())
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
    for (ns, strategy) in [("vm-live", "Live"), ("vm-cold", "Cold")] {
        w.namespace(ns).await?;
        match vm_moves(&w, ns, strategy).await {
            Ok(()) => eprintln!("scenario ok: VM {strategy}"),
            Err(e) => {
                eprintln!("scenario FAILED: VM {strategy}: {e:#}");
                failed.push(strategy);
            }
        }
        w.clean_namespace(ns).await;
    }
    if !failed.is_empty() {
        eprintln!("logs kept in {}", dir.keep().display());
        bail!("VM scenarios failed: {failed:?}");
    }
    Ok(())
}
