//! The whole path for a container: `Migration` applied in cluster east → controller →
//! node daemons (gRPC) → CRIU dump on east-1, page server and bundle stream to west-1 →
//! CRIU restore there → source removed. Real apiservers, runc, CRIU, namespaces.
use ferry_crds::Phase;
use ferry_e2e::world::{NAMESPACE, World, counter_lines};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

/// A counter in memory, written to a file it keeps open, plus a listening socket.
const COUNTER: &str = "exec >/dev/null 2>/dev/null </dev/null; nc -l -p 8080 & exec 3>/data/count.log; \
     i=0; while true; do i=$((i+1)); echo $i >&3; usleep 50000; done";

#[tokio::test(flavor = "multi_thread")]
async fn a_container_moves_to_another_cluster_and_keeps_counting() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = World::start(dir.path()).await?;
    w.start_controller();
    w.container_pod("counter", COUNTER).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;

    let m = w
        .apply_migration(
            "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: counter}\nspec:\n  workload: {pod: counter}\n  target: {cluster: west, node: west-1}\n  strategy: Cold\n",
        )
        .await?;
    let mut seen = vec![];
    let done = w
        .follow("counter", Duration::from_secs(120), |m| {
            seen.push(m.status.as_ref().and_then(|s| s.phase))
        })
        .await?;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{:?}", status.failure);
    assert!(seen.contains(&Some(Phase::Restoring)), "{seen:?}");

    // Where the source stopped writing is where the destination continues.
    let at_cut = *counter_lines(&w.bundle_dir("counter").join("rootfs/data/count.log"))
        .last()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let uid = m.metadata.uid.unwrap();
    let dst_log = w
        .node("west-1")
        .daemon
        .state_dir
        .join(&uid)
        .join("app/rootfs/data/count.log");
    let after = counter_lines(&dst_log);
    assert!(
        after.len() > 3,
        "destination log {} has {:?}",
        dst_log.display(),
        after
    );
    assert!(
        after.windows(2).all(|p| p[1] == p[0] + 1),
        "counter lines contiguous: offset kept"
    );
    assert!(
        *after.last().unwrap() > at_cut + 3,
        "counter continues past {at_cut}: {:?}",
        after.last()
    );

    // Exactly one copy: gone from east (object and container), running in west.
    assert!(
        Api::<Pod>::namespaced(w.east.clone(), NAMESPACE)
            .get_opt("counter")
            .await?
            .is_none()
    );
    assert!(
        Api::<Pod>::namespaced(w.west.clone(), NAMESPACE)
            .get_opt("counter")
            .await?
            .is_some()
    );
    assert!(
        w.node("east-1").daemon.runc.list()?.is_empty(),
        "source container removed"
    );
    let running: Vec<_> = w
        .node("west-1")
        .daemon
        .runc
        .list()?
        .into_iter()
        .filter(|c| c["status"] == "running")
        .collect();
    assert_eq!(running.len(), 1, "one container runs at the target");

    let timings = status.timings.unwrap();
    let downtime = timings.downtime_ms.expect("downtime measured");
    assert!(downtime > 0);
    eprintln!(
        "e2e container migration east→west: downtime {downtime} ms, total {} ms, {} bytes",
        timings.total_ms.unwrap_or(0),
        status.progress.map(|p| p.bytes_transferred).unwrap_or(0)
    );
    Ok(())
}
