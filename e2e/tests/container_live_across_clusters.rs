//! A Migration with the default strategy (`Live`) of a container pod: the controller
//! asks for CRIU lazy pages, so the container restores in west before its memory has
//! arrived and faults it in from east's page server. Real apiservers, runc, CRIU
//! (userfaultfd), namespaces.
use ferry_crds::Phase;
use ferry_e2e::world::{NAMESPACE, World, counter_lines};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

/// A counter in memory, written to a file it keeps open. (Large memory under lazy pages
/// is covered by the node-daemon tests and the benchmark.)
const COUNTER: &str = "exec >/dev/null 2>/dev/null </dev/null; exec 3>/data/count.log; \
     i=0; while true; do i=$((i+1)); echo $i >&3; usleep 50000; done";

#[tokio::test(flavor = "multi_thread")]
async fn a_container_moves_live_with_lazy_pages() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = World::start(dir.path()).await?;
    w.start_controller();
    w.container_pod("live", COUNTER).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // No strategy: Live is the default.
    let m = w
        .apply_migration(
            "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: live}\nspec:\n  workload: {pod: live}\n  target: {cluster: west, node: west-1}\n",
        )
        .await?;
    let done = w.follow("live", Duration::from_secs(120), |_| {}).await?;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{:?}", status.failure);

    let at_cut = *counter_lines(&w.bundle_dir("live").join("rootfs/data/count.log"))
        .last()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let dst_log = w
        .node("west-1")
        .daemon
        .state_dir
        .join(m.metadata.uid.unwrap())
        .join("app/rootfs/data/count.log");
    let after = counter_lines(&dst_log);
    assert!(
        after.windows(2).all(|p| p[1] == p[0] + 1),
        "counter lines contiguous: {after:?}"
    );
    assert!(
        after.last().is_some_and(|&n| n > at_cut + 3),
        "counter continues past {at_cut}: {:?}",
        after.last()
    );
    // The restore used lazy pages: west's lazy-pages daemon fetched them from east.
    let lazy_log = std::fs::read_dir(&w.node("west-1").daemon.state_dir)?
        .flatten()
        .flat_map(|e| walk(&e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("lazy"))
        })
        .map(|p| std::fs::read_to_string(p).unwrap_or_default());
    assert!(lazy_log.is_some(), "no lazy-pages log on west-1");

    assert!(
        Api::<Pod>::namespaced(w.east.clone(), NAMESPACE)
            .get_opt("live")
            .await?
            .is_none()
    );
    assert!(
        w.node("east-1").daemon.runc.list()?.is_empty(),
        "source removed"
    );
    let t = status.timings.unwrap();
    eprintln!(
        "e2e container live (lazy pages) east→west: downtime {} ms, total {} ms",
        t.downtime_ms.unwrap_or(0),
        t.total_ms.unwrap_or(0)
    );
    Ok(())
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    if p.is_dir() {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|e| walk(&e.path()))
            .collect()
    } else {
        vec![p.to_path_buf()]
    }
}
