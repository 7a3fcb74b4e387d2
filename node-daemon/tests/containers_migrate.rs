//! Real runc + CRIU migrations between two `ferry-node` daemons, each in its own network
//! namespace ("node") with its own runc root, driven over gRPC like the controller does.
mod containers_support;

use containers_support::*;
use ferry_proto::node::v1 as pb;
use std::time::Duration;

/// Lines must be exactly 1..=n: a restarted counter would write "1" again, a lost file
/// offset would overwrite the beginning.
fn assert_contiguous(counts: &[u64], what: &str) {
    for (i, v) in counts.iter().enumerate() {
        assert_eq!(*v, i as u64 + 1, "{what}: line {i} is {v}; log: {counts:?}");
    }
}

/// TCP sockets of `pid`'s netns on `port_hex` in state `st` (0A listen, 01 established).
fn tcp_count(pid: u64, port_hex: &str, st: &str) -> usize {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default()
        + &std::fs::read_to_string(format!("/proc/{pid}/net/tcp6")).unwrap_or_default();
    tcp.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && (f[1].ends_with(port_hex) || f[2].ends_with(port_hex)) && f[3] == st
        })
        .count()
}

fn listening_on_8080(pid: u64) -> bool {
    // local_address *:1F90, state 0A = LISTEN (busybox nc may bind v4 or v6)
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default()
        + &std::fs::read_to_string(format!("/proc/{pid}/net/tcp6")).unwrap_or_default();
    tcp.lines()
        .any(|l| l.contains(":1F90") && l.split_whitespace().nth(3) == Some("0A"))
}

#[tokio::test(flavor = "multi_thread")]
async fn counter_container_moves_to_another_node() -> anyhow::Result<()> {
    let TwoNodes {
        base,
        cg,
        lan: _lan,
        mut a,
        mut b,
    } = TwoNodes::start().await?;

    let p = pod("counter");
    let bundle = base.path().join("bundle-app");
    write_bundle(
        &bundle,
        &p,
        "app",
        COUNTER_SCRIPT,
        &format!("/{}/a/app", cg.0),
    )?;
    a.containers.run(&a.node, &bundle, "counter-app")?;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let desc = a.client.describe_workload(p.clone()).await?.into_inner();
    assert_eq!(desc.containers.len(), 1);
    assert_eq!(desc.containers[0].name, "app");
    let src_pid = desc.containers[0].pid as u64;
    assert!(
        listening_on_8080(src_pid),
        "source container should listen on 8080"
    );
    let est = tcp_count(src_pid, ":1F91", "01");
    assert_eq!(
        est, 2,
        "both ends of the loopback connection on 8081 are established"
    );

    let (cp, rs) = migrate(&mut a.client, &mut b.client, "mig-counter", &p, &p).await?;
    assert!(succeeded(&cp), "checkpoint: {cp:?}");
    assert!(succeeded(&rs), "restore: {rs:?}");
    assert!(cp.bytes_done > 0);
    // The frozen source wrote nothing since the cut; its last value is where B continues.
    let at_cut = *read_counts(&bundle.join("rootfs/data/count.log"))
        .last()
        .unwrap();
    assert!(
        at_cut > 3,
        "counter should have run before the cut ({at_cut})"
    );
    assert_eq!(
        runc_status(&a.runc_root, "counter-app").as_deref(),
        Some("paused")
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    let moved = b.client.describe_workload(p.clone()).await?.into_inner();
    assert_eq!(
        moved.containers.len(),
        1,
        "pod found on B by its annotations"
    );
    let dst_pid = moved.containers[0].pid as u64;
    let dst_log = b.state_dir.join("mig-counter/app/rootfs/data/count.log");
    let counts = read_counts(&dst_log);
    assert_contiguous(&counts, "destination log");
    assert!(
        *counts.last().unwrap() > at_cut + 3,
        "counter continues past {at_cut} on B: {:?}",
        &counts[counts.len().saturating_sub(5)..]
    );
    assert!(listening_on_8080(dst_pid), "listening socket restored on B");
    assert_eq!(
        tcp_count(dst_pid, ":1F91", "01"),
        2,
        "established connection survives (--tcp-established)"
    );
    eprintln!(
        "cold migration: downtime {} ms, bundle {} bytes, counter {at_cut} -> {}",
        rs.downtime_ms,
        cp.bytes_done,
        counts.last().unwrap()
    );

    // Finalize removes the frozen source copy.
    let fin = a
        .client
        .finalize(pb::MigrationRef {
            migration_id: "mig-counter".into(),
        })
        .await?
        .into_inner();
    assert!(succeeded(&fin), "{fin:?}");
    b.client
        .finalize(pb::MigrationRef {
            migration_id: "mig-counter".into(),
        })
        .await?;
    assert_eq!(runc_status(&a.runc_root, "counter-app"), None);
    assert_eq!(
        runc_status(&b.runc_root, "counter-app").as_deref(),
        Some("running")
    );
    drop((a, b));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn three_container_pod_moves_in_one_cut() -> anyhow::Result<()> {
    three_container_pod(pb::Strategy::Cold).await
}

/// Post-copy of a pod: one lazy page server per container on the source, one
/// lazy-pages daemon per container on the destination.
#[tokio::test(flavor = "multi_thread")]
async fn three_container_pod_post_copy() -> anyhow::Result<()> {
    three_container_pod(pb::Strategy::PostCopy).await
}

async fn three_container_pod(strategy: pb::Strategy) -> anyhow::Result<()> {
    let TwoNodes {
        base,
        cg,
        lan: _lan,
        mut a,
        mut b,
    } = TwoNodes::start().await?;
    let p = pod("trio");
    let names = ["one", "three", "two"];
    for n in names {
        let bundle = base.path().join(format!("bundle-{n}"));
        write_bundle(&bundle, &p, n, COUNTER_SCRIPT, &format!("/{}/a/{n}", cg.0))?;
        a.containers.run(&a.node, &bundle, &format!("trio-{n}"))?;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let desc = a.client.describe_workload(p.clone()).await?.into_inner();
    let got: Vec<&str> = desc.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(got, names);

    let (cp, rs) = migrate_with(&mut a.client, &mut b.client, "mig-trio", &p, &p, strategy).await?;
    assert!(succeeded(&cp), "checkpoint: {cp:?}");
    assert!(succeeded(&rs), "restore: {rs:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    for n in names {
        let at_cut = *read_counts(
            &base
                .path()
                .join(format!("bundle-{n}/rootfs/data/count.log")),
        )
        .last()
        .unwrap();
        let counts = read_counts(
            &b.state_dir
                .join(format!("mig-trio/{n}/rootfs/data/count.log")),
        );
        assert_contiguous(&counts, n);
        assert!(
            *counts.last().unwrap() > at_cut + 3,
            "{n} continues past {at_cut}"
        );
        assert_eq!(
            runc_status(&b.runc_root, &format!("trio-{n}")).as_deref(),
            Some("running")
        );
    }
    eprintln!(
        "3-container pod, {strategy:?}: downtime {} ms",
        rs.downtime_ms
    );
    a.client
        .finalize(pb::MigrationRef {
            migration_id: "mig-trio".into(),
        })
        .await?;
    assert!(runc_list(&a.runc_root)?.is_empty(), "source copies removed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_restore_leaves_source_running() -> anyhow::Result<()> {
    let TwoNodes {
        base,
        cg,
        lan: _lan,
        mut a,
        mut b,
    } = TwoNodes::start().await?;
    let p = pod("fragile");
    let bundle = base.path().join("bundle-app");
    write_bundle(
        &bundle,
        &p,
        "app",
        COUNTER_SCRIPT,
        &format!("/{}/a/app", cg.0),
    )?;
    a.containers.run(&a.node, &bundle, "fragile-app")?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = "mig-fragile";
    let desc = a.client.describe_workload(p.clone()).await?.into_inner();
    let prep = b
        .client
        .prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: id.into(),
            workload: Some(desc),
            target: Some(p.clone()),
            strategy: pb::Strategy::Cold as i32,
            transfer: None,
        })
        .await?
        .into_inner();
    a.client
        .start_checkpoint(pb::StartCheckpointRequest {
            migration_id: id.into(),
            workload: Some(p.clone()),
            strategy: pb::Strategy::Cold as i32,
            transfer: None,
            receive_endpoint: prep.receive_endpoint,
            leave_running: true,
            page_servers: prep.page_servers,
        })
        .await?;
    let cp = wait_op(&mut a.client, id, Duration::from_secs(60)).await?;
    assert!(succeeded(&cp), "{cp:?}");
    // Corrupt the received bundle before the destination restores it. The checkpoint
    // ends when the destination has verified the stream, while tar may still be
    // unpacking it: the bundle's tar has images/ first, then config.json, so once
    // config.json exists, images/ is complete and stays as we leave it.
    let app = b.state_dir.join(id).join("app");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !app.join("config.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "bundle never unpacked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(app.join("images/pstree.img"), b"not a criu image at all")?;
    b.client
        .start_restore(pb::StartRestoreRequest {
            migration_id: id.into(),
            target: Some(p.clone()),
        })
        .await?;
    let rs = wait_op(&mut b.client, id, Duration::from_secs(60)).await?;
    assert_eq!(rs.state, pb::OperationState::Failed as i32, "{rs:?}");
    assert!(
        rs.message.contains("criu"),
        "error names CRIU and keeps its log: {}",
        rs.message
    );
    assert!(
        runc_list(&b.runc_root)?.is_empty(),
        "nothing half-restored on B"
    );

    // The controller rolls back: the source resumes where it was frozen.
    let log = bundle.join("rootfs/data/count.log");
    let at_cut = *read_counts(&log).last().unwrap();
    let ab = a
        .client
        .abort(pb::MigrationRef {
            migration_id: id.into(),
        })
        .await?
        .into_inner();
    assert_eq!(ab.state, pb::OperationState::Aborted as i32, "{ab:?}");
    b.client
        .abort(pb::MigrationRef {
            migration_id: id.into(),
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        runc_status(&a.runc_root, "fragile-app").as_deref(),
        Some("running")
    );
    let counts = read_counts(&log);
    assert_contiguous(&counts, "source log");
    assert!(
        *counts.last().unwrap() > at_cut + 3,
        "source continues after rollback"
    );
    Ok(())
}

/// Post-copy (CRIU lazy pages): a 256 MiB container runs on B right after the small
/// images arrive; its memory follows from A's lazy page server. The bundle carries no
/// memory, the counter continues, and every page reaches B intact.
#[tokio::test(flavor = "multi_thread")]
async fn post_copy_runs_before_the_memory_arrives() -> anyhow::Result<()> {
    let TwoNodes {
        base,
        cg,
        lan: _lan,
        mut a,
        mut b,
    } = TwoNodes::start().await?;
    let v = b.client.version(pb::VersionRequest {}).await?.into_inner();
    let post = v
        .strategy_support
        .iter()
        .find(|s| s.strategy == pb::Strategy::PostCopy as i32)
        .expect("post-copy reported");
    assert!(
        post.available,
        "post-copy unavailable here: {}",
        post.reason
    );

    const MIB: u64 = 256;
    let p = pod("lazy");
    let bundle = base.path().join("bundle-app");
    write_bundle(
        &bundle,
        &p,
        "app",
        "exec /memcounter 256",
        &format!("/{}/a/app", cg.0),
    )?;
    build_memcounter(&bundle.join("rootfs/memcounter"))?;
    a.containers.run(&a.node, &bundle, "lazy-app")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let src_pid = loop {
        let d = a.client.describe_workload(p.clone()).await?.into_inner();
        let c = &d.containers[0];
        if c.rss_bytes >= (MIB << 20) * 95 / 100 {
            break c.pid as u64;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never reached {MIB} MiB: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rss_of(src_pid) >= (MIB << 20) * 95 / 100);

    let id = "mig-lazy";
    let (cp, rs) = migrate_with(
        &mut a.client,
        &mut b.client,
        id,
        &p,
        &p,
        pb::Strategy::PostCopy,
    )
    .await?;
    assert!(succeeded(&cp), "checkpoint: {cp:?}");
    assert!(succeeded(&rs), "restore: {rs:?}");
    assert!(rs.downtime_ms > 0, "downtime reported: {rs:?}");
    // Memory went through the lazy page server, not the bundle.
    assert!(
        cp.bytes_done > 0 && cp.bytes_done < 16 << 20,
        "bundle without the memory: {} bytes",
        cp.bytes_done
    );
    let lazy_log = std::fs::read_to_string(b.state_dir.join(id).join("work/app/lazy-pages.log"))?;
    let fetched = lazy_log
        .lines()
        .find(|l| l.contains("UFFD transferred pages"))
        .unwrap_or_default()
        .to_string();
    assert!(
        !fetched.is_empty(),
        "lazy-pages daemon reports its transfer: {}",
        &lazy_log[lazy_log.len().saturating_sub(2000)..]
    );
    let at_cut = *read_counts(&bundle.join("rootfs/data/count.log"))
        .last()
        .unwrap();
    assert!(at_cut > 3, "counter ran before the cut ({at_cut})");
    assert_eq!(
        runc_status(&a.runc_root, "lazy-app").as_deref(),
        Some("paused"),
        "leave_running keeps the source frozen after post-copy"
    );

    tokio::time::sleep(Duration::from_millis(4000)).await;
    let moved = b.client.describe_workload(p.clone()).await?.into_inner();
    let dst_pid = moved.containers[0].pid as u64;
    assert!(
        rss_of(dst_pid) >= (MIB << 20) * 95 / 100,
        "all memory resident on B: {} bytes",
        rss_of(dst_pid)
    );
    let dst_root = b.state_dir.join(id).join("app/rootfs/data");
    let counts = read_counts(&dst_root.join("count.log"));
    assert_contiguous(&counts, "destination log");
    assert!(
        *counts.last().unwrap() > at_cut + 20,
        "counter continues past {at_cut} on B: {:?}",
        &counts[counts.len().saturating_sub(5)..]
    );
    // The program re-read every page at least once since the restore.
    let errors = std::fs::read_to_string(dst_root.join("errors.log")).unwrap_or_default();
    assert!(errors.is_empty(), "pages lost their content: {errors}");
    eprintln!(
        "post-copy {MIB} MiB: downtime {} ms, bundle {} bytes, {fetched}, counter {at_cut} -> {}",
        rs.downtime_ms,
        cp.bytes_done,
        counts.last().unwrap()
    );

    for c in [&mut a.client, &mut b.client] {
        let fin = c
            .finalize(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await?
            .into_inner();
        assert!(succeeded(&fin), "{fin:?}");
    }
    assert_eq!(runc_status(&a.runc_root, "lazy-app"), None);
    assert_eq!(
        runc_status(&b.runc_root, "lazy-app").as_deref(),
        Some("running")
    );
    Ok(())
}

/// Post-copy whose restore fails before the destination fetched any page: the source
/// is still whole (frozen, serving), and the controller's abort stops its lazy page
/// server and resumes it where it stopped.
#[tokio::test(flavor = "multi_thread")]
async fn failed_post_copy_restore_rolls_back() -> anyhow::Result<()> {
    let TwoNodes {
        base,
        cg,
        lan: _lan,
        mut a,
        mut b,
    } = TwoNodes::start().await?;
    let p = pod("lazyfail");
    let bundle = base.path().join("bundle-app");
    write_bundle(
        &bundle,
        &p,
        "app",
        COUNTER_SCRIPT,
        &format!("/{}/a/app", cg.0),
    )?;
    a.containers.run(&a.node, &bundle, "lazyfail-app")?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = "mig-lazyfail";
    let desc = a.client.describe_workload(p.clone()).await?.into_inner();
    let prep = b
        .client
        .prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: id.into(),
            workload: Some(desc),
            target: Some(p.clone()),
            strategy: pb::Strategy::PostCopy as i32,
            transfer: None,
        })
        .await?
        .into_inner();
    assert!(
        prep.page_servers.is_empty(),
        "post-copy: the source serves the pages"
    );
    a.client
        .start_checkpoint(pb::StartCheckpointRequest {
            migration_id: id.into(),
            workload: Some(p.clone()),
            strategy: pb::Strategy::PostCopy as i32,
            transfer: None,
            receive_endpoint: prep.receive_endpoint,
            leave_running: true,
            page_servers: prep.page_servers,
        })
        .await?;
    // The bundle is out (config.json follows the images in the tar stream); the
    // checkpoint itself runs on until the pages are fetched.
    let staged = b.state_dir.join(id).join("app");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !staged.join("config.json").exists() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "bundle never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(staged.join("images/pstree.img"), b"not a criu image at all")?;
    b.client
        .start_restore(pb::StartRestoreRequest {
            migration_id: id.into(),
            target: Some(p.clone()),
        })
        .await?;
    let rs = wait_op(&mut b.client, id, Duration::from_secs(60)).await?;
    assert_eq!(rs.state, pb::OperationState::Failed as i32, "{rs:?}");
    assert!(runc_list(&b.runc_root)?.is_empty(), "nothing left on B");
    let cp = a
        .client
        .get_operation(pb::MigrationRef {
            migration_id: id.into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        cp.state,
        pb::OperationState::Running as i32,
        "source still serving: {cp:?}"
    );

    let log = bundle.join("rootfs/data/count.log");
    let at_cut = *read_counts(&log).last().unwrap();
    let ab = a
        .client
        .abort(pb::MigrationRef {
            migration_id: id.into(),
        })
        .await?
        .into_inner();
    assert_eq!(ab.state, pb::OperationState::Aborted as i32, "{ab:?}");
    b.client
        .abort(pb::MigrationRef {
            migration_id: id.into(),
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        runc_status(&a.runc_root, "lazyfail-app").as_deref(),
        Some("running")
    );
    let counts = read_counts(&log);
    assert_contiguous(&counts, "source log");
    assert!(
        *counts.last().unwrap() > at_cut + 3,
        "source continues after rollback: {at_cut} -> {:?}",
        counts.last()
    );
    Ok(())
}
