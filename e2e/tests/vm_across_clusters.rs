//! The whole path for a VM: a `Migration` of a VM pod applied in cluster east →
//! controller → node daemons → QEMU's live-migration stream from east-1's daemon over the
//! mutual-TLS pipe to west-1's daemon, which runs the incoming guest → source QEMU quits.
//! Real apiservers, QEMU (TCG), ferry-launcher, namespaces.
use ferry_crds::{Phase, WorkloadKind};
use ferry_e2e::world::{NAMESPACE, World};
use ferry_testkit::guest::{last_count, wait_count_above};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_moves_to_another_cluster_and_keeps_counting() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = World::start(dir.path()).await?;
    w.start_controller();
    let (_, mut guest) = w.vm_pod("guest", 256).await?;
    // The source's registry (and serial log) goes away with it; remember where it was.
    let before = wait_count_above(&guest.serial(), 2, Duration::from_secs(60)).await?;

    w.apply_migration(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: guest}\nspec:\n  workload: {pod: guest}\n  target: {cluster: west, node: west-1}\n",
    )
    .await?;
    let done = w.follow("guest", Duration::from_secs(180), |_| {}).await?;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{:?}", status.failure);
    assert_eq!(status.workload_kind, Some(WorkloadKind::VirtualMachine));

    // The guest goes on counting at the target from where it was: no reboot.
    let dst = w.vm_serial("west-1", "guest");
    let at_cut = last_count(&dst).unwrap_or(before);
    let after = wait_count_above(&dst, at_cut, Duration::from_secs(60)).await?;
    let first = std::fs::read_to_string(&dst)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("count ")?.parse::<u64>().ok())
        .unwrap();
    assert!(
        first >= before,
        "guest rebooted: first count {first} < {before}"
    );

    // Exactly one copy: source QEMU gone, Pod object moved.
    for _ in 0..100 {
        if guest.guard.exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(guest.guard.exited(), "source QEMU still running");
    assert!(
        Api::<Pod>::namespaced(w.east.clone(), NAMESPACE)
            .get_opt("guest")
            .await?
            .is_none()
    );
    assert!(
        Api::<Pod>::namespaced(w.west.clone(), NAMESPACE)
            .get_opt("guest")
            .await?
            .is_some()
    );

    let timings = status.timings.unwrap();
    eprintln!(
        "e2e VM migration east→west: downtime {} ms, total {} ms, {} bytes; count {before} → {after}",
        timings.downtime_ms.unwrap_or(0),
        timings.total_ms.unwrap_or(0),
        status.progress.map(|p| p.bytes_transferred).unwrap_or(0)
    );
    assert!(timings.downtime_ms.is_some(), "downtime measured");
    Ok(())
}
