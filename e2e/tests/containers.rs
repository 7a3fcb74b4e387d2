//! Containers on real nodes: every pod is created through the apiserver and run by a
//! kubelet + containerd; ferry's controller creates the target Pod, the daemons move
//! the state, `ferry-runtime` restores it as the target Pod's containers.
//!
//! One world (2 clusters × 2 nodes, one controller) for all scenarios: they run
//! concurrently, each in its own namespace, and every failure is reported.
use anyhow::{Context, Result, bail, ensure};
use ferry_crds::{Migration, ObjectsState, Phase};
use ferry_e2e::world::{
    World, WorldOptions, counter_pod, memory_counter_pod, numbers, object_store_transfer,
    rolled_back, stamped, stamped_counter_pod, succeeded, wait_for,
};
use ferry_testkit::gate::GatedProxy;
use ferry_testkit::minio::{ACCESS_KEY, MinioServer, SECRET_KEY};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

#[path = "containers/clients.rs"]
mod clients;

/// The e2e world's bucket (in the MinIO on the LAN's host address).
const BUCKET: &str = "ferry-e2e";

fn migration(name: &str, pod: &str, target: &str, strategy: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec:\n  workload: {{pod: {pod}}}\n  target: {target}\n  strategy: {strategy}\n"
    )
}

/// The target Pod's name (within a cluster it differs from the source's).
fn target_pod(m: &Migration) -> String {
    m.status
        .as_ref()
        .and_then(|s| s.target.as_ref())
        .map(|t| t.pod.clone())
        .unwrap_or_default()
}

async fn run(w: &World, ns: &str, name: &str, yaml: &str) -> Result<Migration> {
    w.apply_migration(ns, yaml).await?;
    w.follow(ns, name, Duration::from_secs(180), |m| {
        eprintln!(
            "[{ns}] {name}: {:?}",
            m.status.as_ref().and_then(|s| s.phase)
        );
    })
    .await
}

/// The pod moved: exactly one running copy (on `node`), run by the target kubelet with
/// no restart, its state continued from the source's, `kubectl logs`/`exec` work, and
/// the source Pod is gone for good.
async fn check_moved(
    w: &World,
    ns: &str,
    m: &Migration,
    cluster: &str,
    pod: &str,
    node: &str,
    containers: &[&str],
) -> Result<()> {
    let status = succeeded(m)?;
    let pods: Api<Pod> = Api::namespaced(w.client(cluster).clone(), ns);
    let target = pods.get(pod).await?;
    let spec = target.spec.clone().unwrap_or_default();
    ensure!(
        spec.node_name.as_deref() == Some(node),
        "target on {:?}",
        spec.node_name
    );
    for cs in target
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default()
    {
        ensure!(
            cs.restart_count == 0,
            "{} restarted {} times",
            cs.name,
            cs.restart_count
        );
        ensure!(
            cs.state.as_ref().is_some_and(|s| s.running.is_some()),
            "{} not running",
            cs.name
        );
    }
    for c in containers {
        // Its log continues where the source stopped (a fresh start would print 1).
        let logs = numbers(&w.logs(cluster, ns, pod, c)?);
        let first = *logs.first().with_context(|| format!("{c}: empty log"))?;
        ensure!(
            first > 1,
            "{c}: the target's log starts at {first}: restarted, not restored"
        );
        // The file it keeps open in its writable layer moved and grows on.
        let file = numbers(&w.exec(cluster, ns, pod, c, &["cat", "/data/count.log"])?);
        ensure!(
            file.first() == Some(&1),
            "{c}: count.log lost its start: {:?}",
            &file[..file.len().min(3)]
        );
        ensure!(
            file.windows(2).all(|p| p[1] == p[0] + 1),
            "{c}: count.log has gaps or repeats"
        );
        ensure!(
            file.contains(&(first - 1)),
            "{c}: the source's last value {} is not in count.log",
            first - 1
        );
    }
    // The source Pod is gone and nothing recreated it.
    let src: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    let source_name = status
        .source
        .as_ref()
        .map(|s| s.pod.clone())
        .unwrap_or_default();
    if cluster != "east" || source_name != pod {
        wait_for(
            Duration::from_secs(30),
            "the source Pod to be gone",
            || async { Ok(src.get_opt(&source_name).await?.is_none()) },
        )
        .await?;
    }
    // Across clusters the source Pod has the target's name.
    w.runs_only_on(ns, &[pod, &source_name], node, containers)
        .await
}

async fn cold_across_clusters(w: &World) -> Result<()> {
    let ns = "cold-across";
    let pod = w
        .create_pod(ns, counter_pod("counter", "east-1", &["app"]))
        .await?;
    eprintln!(
        "[{ns}] pod running on {:?}",
        pod.spec.and_then(|s| s.node_name)
    );
    w.counting(ns, "counter", &["app"]).await?;
    // As a user would: `kubectl ferry migrate ... --wait` follows it to the end.
    let out = tokio::process::Command::new(ferry_testkit::workspace_bin("kubectl-ferry")?)
        .arg("--kubeconfig")
        .arg(&w.env.cluster("east").kubeconfig)
        .args([
            "-n",
            ns,
            "migrate",
            "counter",
            "--to",
            "west/west-1",
            "--cold",
        ])
        .args(["--name", "m", "--wait"])
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&out.stdout);
    eprintln!("[{ns}] kubectl ferry migrate --wait:\n{printed}");
    ensure!(
        out.status.success(),
        "kubectl ferry migrate: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["Checkpointing", "Succeeded", "Downtime:"] {
        ensure!(printed.contains(want), "no {want} in what --wait printed");
    }
    let m = Api::<Migration>::namespaced(w.east.clone(), ns)
        .get("m")
        .await?;
    check_moved(w, ns, &m, "west", "counter", "west-1", &["app"]).await?;
    // The daemons counted it (other scenarios run beside this one: at least one).
    for (node, op) in [("east-1", "checkpoint"), ("west-1", "restore")] {
        let metrics = w.daemon_metrics(node).await?;
        let line = format!(
            r#"ferry_node_operations_total{{runtime="containers",operation="{op}",outcome="succeeded"}} "#
        );
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|n| n.trim().parse::<u64>().ok());
        ensure!(
            count.is_some_and(|c| c >= 1),
            "{node}'s /metrics has no succeeded {op}:\n{metrics}"
        );
    }
    let t = m.status.and_then(|s| s.timings).unwrap_or_default();
    eprintln!(
        "[{ns}] downtime {:?} ms, total {:?} ms",
        t.downtime_ms, t.total_ms
    );
    let t0 = t.steps.first().map_or(0, |s| s.start_ms);
    for s in &t.steps {
        eprintln!(
            "[{ns}]   {:>6} ms +{:>5} ms  {} on {}",
            s.start_ms - t0,
            s.duration_ms,
            s.name,
            s.node
        );
    }
    // The per-step breakdown names the steps of both sides.
    for step in [
        "freeze",
        "dump/app",
        "send/app",
        "receive/app",
        "restore/app",
    ] {
        ensure!(
            t.steps.iter().any(|s| s.name == step),
            "no {step} step in {:?}",
            t.steps
        );
    }
    Ok(())
}

/// What a shaped move reported.
struct Shaped {
    moved: u64,
    wire: u64,
    downtime_ms: u64,
    /// The highest status.progress while the migration was still under way (bytes,
    /// bytes per second): what `kubectl get` showed during the move.
    midway: Option<(u64, u64)>,
    steps: Vec<ferry_crds::StepTiming>,
}

/// A Cold move across clusters with `transfer` settings: the pod holds 16 MiB of one
/// repeated byte, so what it moves is known to be large and compressible.
async fn shaped_move(w: &World, ns: &str, transfer: &str) -> Result<Shaped> {
    w.create_pod(ns, memory_counter_pod("counter", "east-1", 16))
        .await?;
    w.counting(ns, "counter", &["app"]).await?;
    let yaml = migration("m", "counter", "{cluster: west, node: west-1}", "Cold")
        + &format!("  transfer: {transfer}\n");
    w.apply_migration(ns, &yaml).await?;
    let mut midway: Option<(u64, u64)> = None;
    let mut last = None;
    let m = w
        .follow_each(ns, "m", Duration::from_secs(180), |m| {
            let Some(s) = &m.status else { return };
            if s.phase != last {
                eprintln!("[{ns}] m: {:?}", s.phase);
                last = s.phase;
            }
            let moving = matches!(s.phase, Some(Phase::Checkpointing | Phase::Transferring));
            if let Some(p) = s.progress.as_ref().filter(|_| moving)
                && let Some(rate) = p.bytes_per_second
            {
                let (b, r) = midway.unwrap_or_default();
                midway = Some((b.max(p.bytes_transferred), r.max(rate)));
            }
        })
        .await?;
    check_moved(w, ns, &m, "west", "counter", "west-1", &["app"]).await?;
    let s = m.status.context("status")?;
    let p = s.progress.context("no progress in the status")?;
    let wire = p.wire_bytes.context("no wireBytes in the status")?;
    let timings = s.timings.context("no timings")?;
    let downtime = timings.downtime_ms.context("no downtime")?;
    ensure!(
        p.bytes_transferred >= 16 << 20,
        "the 16 MiB the pod holds did not move: {p:?}"
    );
    eprintln!(
        "[{ns}] {} KiB moved, {} KiB on the wire, downtime {downtime} ms; midway (bytes, \
         bytes/s): {midway:?}",
        p.bytes_transferred >> 10,
        wire >> 10
    );
    Ok(Shaped {
        moved: p.bytes_transferred,
        wire,
        downtime_ms: downtime,
        midway,
        steps: timings.steps,
    })
}

/// `transfer.compress`: the pod arrives intact, and far fewer bytes crossed the network
/// than it moved.
async fn compressed_move(w: &World) -> Result<()> {
    let Shaped { moved, wire, .. } = shaped_move(w, "compressed", "{compress: true}").await?;
    ensure!(
        wire * 4 < moved,
        "compression: {wire} bytes on the wire for {moved} moved"
    );
    Ok(())
}

/// `transfer.bandwidthLimitMiBps`: uncompressed, the 16+ MiB cannot have crossed within
/// the downtime faster than the cap (a lower bound: everything of a Cold move is sent
/// while the pod is frozen; unlimited, this move's downtime is a second or two). The
/// move takes seconds, so the status shows bytes and a rate while it is under way:
/// CRIU's pages are counted as they pass the relays, not after the dump. The daemons'
/// early release is 8 MiB here, so the target Pod's gate opens once at most 8 MiB of
/// the pod are still to come: seconds before the bundle is staged at that rate.
async fn capped_move(w: &World) -> Result<()> {
    const MIB_PER_SEC: u64 = 2;
    let Shaped {
        moved,
        wire,
        downtime_ms: downtime,
        midway,
        steps,
    } = shaped_move(
        w,
        "capped",
        &format!("{{bandwidthLimitMiBps: {MIB_PER_SEC}}}"),
    )
    .await?;
    ensure!(
        wire >= moved,
        "uncompressed: {wire} on the wire for {moved} moved"
    );
    let floor_ms = wire * 1000 / (MIB_PER_SEC << 20) * 9 / 10;
    ensure!(
        downtime >= floor_ms,
        "{wire} bytes in a {downtime} ms downtime: faster than {MIB_PER_SEC} MiB/s"
    );
    let (bytes, rate) = midway.context("no progress rate in the status while it moved")?;
    ensure!(
        bytes > 0 && rate > 0,
        "the status showed no bytes moving while the pages went: {bytes} bytes, {rate} B/s"
    );
    let end = |name: &str| {
        steps
            .iter()
            .find(|s| s.name == name && s.node == "west-1")
            .map(|s| s.start_ms + s.duration_ms)
            .with_context(|| format!("no step {name} on west-1 in {steps:?}"))
    };
    let (gate, staged) = (end("gate")?, end("receive/app")?);
    ensure!(
        gate < staged,
        "the gate opened at {gate}, not before the state was staged at {staged}"
    );
    eprintln!(
        "[capped] gate opened {} ms before the state was staged",
        staged - gate
    );
    Ok(())
}

/// `transfer.mode: ObjectStore`: a pod on east-2 moves Cold to west-1 through MinIO
/// while east-2 and west-1 cannot reach each other at all (every packet between them
/// dropped), and afterwards the bucket holds nothing of it. With wrong credentials the
/// Migration fails in Preparing saying so, and the pod runs on once at the source.
async fn through_a_bucket(w: &World, minio: &MinioServer) -> Result<()> {
    let ns = "bucket";
    for (name, secret) in [("s3", SECRET_KEY), ("s3-wrong", "not-the-secret")] {
        w.create_s3_secret(ns, name, ACCESS_KEY, secret).await?;
    }
    w.node("east-2").lan.block(w.node("west-1").lan.ip())?;
    w.create_pod(ns, memory_counter_pod("counter", "east-2", 4))
        .await?;
    w.create_pod(ns, counter_pod("other", "east-2", &["app"]))
        .await?;
    w.counting(ns, "counter", &["app"]).await?;
    let transfer = |secret: &str| object_store_transfer(&minio.endpoint(), BUCKET, "e2e", secret);
    let yaml = migration("m", "counter", "{cluster: west, node: west-1}", "Cold") + &transfer("s3");
    let m = run(w, ns, "m", &yaml).await?;
    check_moved(w, ns, &m, "west", "counter", "west-1", &["app"]).await?;
    let p = m
        .status
        .as_ref()
        .and_then(|s| s.progress.clone())
        .context("progress")?;
    ensure!(
        p.bytes_transferred >= 4 << 20,
        "the 4 MiB the pod holds did not move: {p:?}"
    );
    let m = objects_end(w, ns, "m", ObjectsState::Removed).await?;
    let uid = m.metadata.uid.clone().context("uid")?;
    let left = ferry_testkit::minio::keys_under(minio, BUCKET, &format!("e2e/{uid}/")).await?;
    ensure!(left.is_empty(), "the bucket still holds {left:?}");

    let yaml =
        migration("bad", "other", "{cluster: west, node: west-1}", "Cold") + &transfer("s3-wrong");
    w.apply_migration(ns, &yaml).await?;
    let bad = w
        .follow(ns, "bad", Duration::from_secs(180), |_| {})
        .await?;
    let s = bad.status.context("status")?;
    let f = s.failure.clone().context("no failure")?;
    ensure!(
        f.reason == "PrepareFailed" && f.message.contains("not usable with the credentials"),
        "wrong credentials: {:?} {f:?}",
        s.phase
    );
    w.check_runs_once_on(ns, "other", "east-2").await?;
    ensure!(
        s.objects.is_none(),
        "nothing was uploaded, yet: {:?}",
        s.objects
    );
    eprintln!("[{ns}] wrong credentials: {}", f.message);
    Ok(())
}

/// MinIO dies while the source uploads a 64 MiB pod's bundle: the upload retries, gives
/// up, and the migration rolls back; the pod runs once at the source. Once MinIO is
/// back, the controller's collection after the retention removes the parts the upload
/// left. The moment is set by a gate in front of MinIO, not by sampling: the gate lets
/// 24 MiB through and holds the rest (at most 4 parts of 4 MiB are in flight, so at
/// least one part is whole in the bucket and the manifest, written last, is not).
async fn minio_lost_mid_upload(w: &World) -> Result<()> {
    const GATE: u64 = 24 << 20;
    let ns = "bucket-lost";
    let mut minio = MinioServer::start_on(w.host_ip())?;
    minio.create_bucket(BUCKET).await?;
    let gate = GatedProxy::start(w.host_ip().into(), minio.addr(), GATE).await?;
    w.create_s3_secret(ns, "s3", ACCESS_KEY, SECRET_KEY).await?;
    w.create_pod(ns, memory_counter_pod("big", "east-1", 64))
        .await?;
    // The script counts only once its 64 MiB are in memory.
    w.counting(ns, "big", &["app"]).await?;
    let yaml = migration("m", "big", "{cluster: west, node: west-1}", "Cold")
        + &object_store_transfer(&gate.endpoint(), BUCKET, "e2e", "s3");
    let m = w.apply_migration(ns, &yaml).await?;
    let uid = m.metadata.uid.clone().context("uid")?;
    let bundle = format!("e2e/{uid}/bundle/app/");
    let api: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    if tokio::time::timeout(Duration::from_secs(180), gate.held())
        .await
        .is_err()
    {
        let phase = api.get("m").await?.status.and_then(|s| s.phase);
        bail!("the upload did not reach {GATE} bytes in 180 s (phase {phase:?})");
    }
    // What got through lands in the bucket (read past the gate, from MinIO itself).
    wait_for(
        Duration::from_secs(60),
        "a whole part of the bundle in the bucket",
        || async {
            let keys = ferry_testkit::minio::keys_under(&minio, BUCKET, &bundle).await?;
            Ok(keys.iter().any(|k| k.contains("/part-")))
        },
    )
    .await?;
    let keys = ferry_testkit::minio::keys_under(&minio, BUCKET, &bundle).await?;
    ensure!(
        !keys.iter().any(|k| k.ends_with("/manifest.json")),
        "the manifest is in the bucket behind a gate that held the upload: {keys:?}"
    );
    let phase = api.get("m").await?.status.and_then(|s| s.phase);
    ensure!(
        !phase.is_some_and(Phase::is_terminal),
        "the migration ended ({phase:?}) while its upload was held"
    );
    minio.kill();
    gate.open();
    let parts = keys.iter().filter(|k| k.contains("/part-")).count();
    eprintln!("[{ns}] MinIO killed mid-upload, {parts} parts stored");
    let m = w.follow(ns, "m", Duration::from_secs(180), |_| {}).await?;
    let s = m.status.clone().context("status")?;
    ensure!(
        matches!(s.phase, Some(Phase::RolledBack | Phase::Failed)),
        "phase {:?}: {:?}",
        s.phase,
        s.failure
    );
    w.check_runs_once_on(ns, "big", "east-1").await?;
    eprintln!(
        "[{ns}] {:?}: {}",
        s.phase,
        s.failure.map(|f| f.message).unwrap_or_default()
    );
    minio.restart()?;
    objects_end(w, ns, "m", ObjectsState::Removed).await?;
    let left = ferry_testkit::minio::keys_under(&minio, BUCKET, &format!("e2e/{uid}/")).await?;
    ensure!(left.is_empty(), "left in the bucket: {left:?}");
    Ok(())
}

/// Waits until the Migration's `status.objects` reaches `state`.
async fn objects_end(w: &World, ns: &str, name: &str, state: ObjectsState) -> Result<Migration> {
    let api: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    // Retention (30 s here) and one retried removal (30 s) fit.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = api.get(name).await?;
        let o = m.status.as_ref().and_then(|s| s.objects.clone());
        if o.as_ref().is_some_and(|o| o.state == state) {
            return Ok(m);
        }
        if std::time::Instant::now() > deadline {
            bail!("status.objects of {name} is not {state:?} after 120 s: {o:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn live_within_cluster(w: &World) -> Result<()> {
    let ns = "live-within";
    w.create_pod(ns, counter_pod("counter", "east-1", &["app"]))
        .await?;
    w.counting(ns, "counter", &["app"]).await?;
    let m = run(
        w,
        ns,
        "m",
        &migration("m", "counter", "{node: east-2}", "Live"),
    )
    .await?;
    let target = target_pod(&m);
    check_moved(w, ns, &m, "east", &target, "east-2", &["app"]).await?;
    // A later restart of the restored container is a fresh start, as any restart is.
    let pid = w.container_pid("east-2", ns, &target, "app")?;
    nix_kill(pid)?;
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    wait_for(
        Duration::from_secs(60),
        "the restored container to restart",
        || async {
            let p = pods.get(&target).await?;
            Ok(p.status
                .and_then(|s| s.container_statuses)
                .is_some_and(|cs| {
                    cs.iter().all(|c| {
                        c.restart_count == 1
                            && c.state.as_ref().is_some_and(|s| s.running.is_some())
                    })
                }))
        },
    )
    .await?;
    wait_for(
        Duration::from_secs(30),
        "the restarted container's first line",
        || async { Ok(!numbers(&w.logs("east", ns, &target, "app")?).is_empty()) },
    )
    .await?;
    let logs = numbers(&w.logs("east", ns, &target, "app")?);
    ensure!(
        logs.first() == Some(&1),
        "a restart after the restore starts fresh: {:?}",
        &logs[..logs.len().min(3)]
    );
    Ok(())
}

/// A 3-container pod, Cold across clusters and Live within east; each time the cut is
/// shown: no container ran after the pod froze.
async fn three_containers(w: &World, ns: &str, strategy: &str) -> Result<()> {
    let trio = ["a", "b", "c"];
    w.create_pod(ns, stamped_counter_pod("trio", "east-1", &trio))
        .await?;
    w.counting(ns, "trio", &trio).await?;
    let (target, cluster, node) = if strategy == "Cold" {
        ("{cluster: west, node: west-1}", "west", "west-1")
    } else {
        ("{node: east-2}", "east", "east-2")
    };
    let m = run(w, ns, "m", &migration("m", "trio", target, strategy)).await?;
    let pod = target_pod(&m);
    check_moved(w, ns, &m, cluster, &pod, node, &trio).await?;
    check_cut(w, ns, &m, cluster, &pod, &trio)
}

/// The consistent cut: every line the source wrote (its counts precede the first one
/// the target logged) was stamped, by the container itself, no later than the moment
/// the source daemon saw the pod cgroup frozen. A container that ran on after another
/// was frozen (one freeze per container, dumps between them) would have stamped lines
/// after it.
fn check_cut(
    w: &World,
    ns: &str,
    m: &Migration,
    cluster: &str,
    pod: &str,
    containers: &[&str],
) -> Result<()> {
    let steps = m
        .status
        .as_ref()
        .and_then(|s| s.timings.as_ref())
        .map(|t| t.steps.clone())
        .unwrap_or_default();
    let freeze = steps
        .iter()
        .find(|s| s.name == "freeze" && s.node == "east-1")
        .with_context(|| format!("no freeze step on east-1 in {steps:?}"))?;
    let frozen = freeze.start_ms + freeze.duration_ms;
    for c in containers {
        let first = *numbers(&w.logs(cluster, ns, pod, c)?)
            .first()
            .with_context(|| format!("{c}: empty log"))?;
        let lines = stamped(&w.exec(cluster, ns, pod, c, &["cat", "/data/count.log"])?);
        let source: Vec<_> = lines.iter().filter(|(i, _)| *i < first).collect();
        let last = source
            .last()
            .with_context(|| format!("{c}: no line from the source"))?;
        if let Some((i, at)) = source.iter().find(|(_, at)| *at > frozen) {
            bail!(
                "{c} wrote count {i} {} ms after the pod froze: the cut is not consistent",
                at - frozen
            );
        }
        eprintln!(
            "[{ns}] {c}: last source count {} stamped {} ms before the pod froze",
            last.0,
            frozen - last.1
        );
    }
    Ok(())
}

/// A corrupted checkpoint: the restore fails, the target Pod is removed, the source
/// thawed, exactly one copy (the source) runs. The daemons corrupt what they stage for
/// this namespace (`ferry-node --test-corrupt-staged-namespace`, test-only fault
/// injection): a test racing to overwrite the staged files before the restore read
/// them lost that race on a loaded machine.
async fn corrupted_checkpoint_rolls_back(w: &World) -> Result<()> {
    let ns = "rollback";
    w.create_pod(ns, counter_pod("counter", "east-1", &["app"]))
        .await?;
    w.counting(ns, "counter", &["app"]).await?;
    w.apply_migration(
        ns,
        &migration("m", "counter", "{cluster: west, node: west-1}", "Cold"),
    )
    .await?;
    let m = w.follow(ns, "m", Duration::from_secs(180), |_| {}).await?;
    let f = rolled_back(&m)?.failure.context("failure")?;
    ensure!(f.rolled_back, "not rolled back: {f:?}");
    w.check_runs_once_at_source(ns, "counter").await?;
    eprintln!(
        "[{ns}] rolled back: {}: {}",
        f.reason,
        f.message.lines().next().unwrap_or("")
    );
    Ok(())
}

/// A Cold move through a bucket whose restore fails (the daemons corrupt what they
/// stage in this namespace): rolled back, the pod runs once at the source, and the
/// migration's objects stay in the bucket for the post-mortem, encrypted (the pod's
/// memory is 4 MiB of one byte, and tar pads with zeros: the stored objects have no
/// run of 64 equal bytes), then the controller removes them after its retention.
async fn failed_through_a_bucket_keeps_its_objects(w: &World, minio: &MinioServer) -> Result<()> {
    let ns = "rollback";
    w.create_s3_secret(ns, "s3", ACCESS_KEY, SECRET_KEY).await?;
    w.create_pod(ns, memory_counter_pod("held", "east-1", 4))
        .await?;
    w.counting(ns, "held", &["app"]).await?;
    let yaml = migration("kept", "held", "{cluster: west, node: west-1}", "Cold")
        + &object_store_transfer(&minio.endpoint(), BUCKET, "e2e", "s3");
    let m = run(w, ns, "kept", &yaml).await?;
    let phase = m.status.as_ref().and_then(|s| s.phase);
    ensure!(
        phase == Some(Phase::RolledBack),
        "phase {phase:?}: {:?}",
        m.status
    );
    // The objects first: the retention (30 s) runs from the rollback on.
    let m = objects_end(w, ns, "kept", ObjectsState::Retained).await?;
    let uid = m.metadata.uid.clone().context("uid")?;
    let keys = ferry_testkit::minio::keys_under(minio, BUCKET, &format!("e2e/{uid}/")).await?;
    let data: Vec<_> = keys.iter().filter(|k| k.contains("/part-")).collect();
    ensure!(!data.is_empty(), "nothing retained in the bucket: {keys:?}");
    for key in data {
        let bytes = ferry_testkit::minio::object(minio, BUCKET, key).await?;
        let longest = bytes
            .chunk_by(|a, b| a == b)
            .map(<[u8]>::len)
            .max()
            .unwrap_or(0);
        ensure!(
            longest < 64,
            "{key} ({} bytes) has a run of {longest} equal bytes: stored in the clear?",
            bytes.len()
        );
        eprintln!(
            "[{ns}] retained {key}: {} bytes, longest run {longest}",
            bytes.len()
        );
    }
    w.check_runs_once_on(ns, "held", "east-1").await?;
    objects_end(w, ns, "kept", ObjectsState::Removed).await?;
    let left = ferry_testkit::minio::keys_under(minio, BUCKET, &format!("e2e/{uid}/")).await?;
    ensure!(
        left.is_empty(),
        "still in the bucket after the retention: {left:?}"
    );
    Ok(())
}

fn nix_kill(pid: u32) -> Result<()> {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    ensure!(st.success(), "kill -9 {pid}");
    Ok(())
}

/// Bad input: nothing is frozen, the Migration fails in Preparing with a reason a
/// person can act on, the source runs on untouched.
async fn bad_targets_fail_in_preparing(w: &World) -> Result<()> {
    let ns = "bad-input";
    w.create_pod(ns, counter_pod("counter", "east-1", &["app"]))
        .await?;
    // west-2 has a daemon but no ferry runtime.
    let m = run(
        w,
        ns,
        "no-runtime",
        &migration(
            "no-runtime",
            "counter",
            "{cluster: west, node: west-2}",
            "Cold",
        ),
    )
    .await?;
    let f = m
        .status
        .as_ref()
        .and_then(|s| s.failure.clone())
        .context("failure")?;
    ensure!(f.phase == Phase::Preparing, "failed in {:?}", f.phase);
    ensure!(
        f.message.contains("no ferry runtime"),
        "reason: {}",
        f.message
    );
    // An image the target node does not have.
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    let mut spec = counter_pod("odd", "east-1", &["app"]);
    spec["spec"]["containers"][0]["image"] = "docker.io/library/busybox:only-on-east".into();
    let out = w
        .node("east-1")
        .kube
        .ctr()
        .args([
            "images",
            "tag",
            ferry_e2e::world::BUSYBOX,
            "docker.io/library/busybox:only-on-east",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "ctr tag: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.create_pod(ns, spec).await?;
    let m = run(
        w,
        ns,
        "no-image",
        &migration("no-image", "odd", "{cluster: west, node: west-1}", "Cold"),
    )
    .await?;
    let f = m
        .status
        .as_ref()
        .and_then(|s| s.failure.clone())
        .context("failure")?;
    ensure!(f.phase == Phase::Preparing, "failed in {:?}", f.phase);
    ensure!(
        f.message.contains("busybox:only-on-east") && f.message.contains("not on this node"),
        "reason: {}",
        f.message
    );
    for p in ["counter", "odd"] {
        let copies = w.running_copies(ns, p)?;
        ensure!(
            copies.len() == 1 && copies[0].0 == "east-1",
            "{p}: copies {copies:?}"
        );
        let pod = pods.get(p).await?;
        ensure!(
            pod.status.and_then(|s| s.phase).as_deref() == Some("Running"),
            "{p} not running"
        );
    }
    for c in ["no-runtime", "no-image"] {
        let m: Migration = Api::namespaced(w.east.clone(), ns).get(c).await?;
        eprintln!(
            "[{ns}] {c}: {:?}",
            m.status
                .and_then(|s| s.failure)
                .map(|f| (f.reason, f.message))
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containers_move_between_real_nodes() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-")
        .tempdir_in("/tmp")?;
    let opts = WorldOptions {
        daemon_args: vec![
            "--test-corrupt-staged-namespace".into(),
            "rollback".into(),
            // Low, so that the capped 16 MiB move opens its gate on the pages' count.
            "--early-release-mib".into(),
            "8".into(),
        ],
        // Long enough to look at what a failure kept, short enough to see it go.
        failed_object_retention: Some(Duration::from_secs(30)),
        images: vec![clients::listener_image(dir.path())?],
        ..Default::default()
    };
    let mut w = World::start(dir.path(), opts).await?;
    w.start_controller();
    for ns in [
        "cold-across",
        "live-within",
        "three-cold",
        "three-live",
        "rollback",
        "bad-input",
        "compressed",
        "capped",
        "bucket",
        "bucket-lost",
        "queued-conn",
        "serving",
    ] {
        w.namespace(ns).await?;
    }
    let minio = MinioServer::start_on(w.host_ip())?;
    minio.create_bucket(BUCKET).await?;
    let w = &w;
    let results = futures::join!(
        cold_across_clusters(w),
        live_within_cluster(w),
        three_containers(w, "three-cold", "Cold"),
        three_containers(w, "three-live", "Live"),
        async {
            corrupted_checkpoint_rolls_back(w).await?;
            failed_through_a_bucket_keeps_its_objects(w, &minio).await
        },
        clients::gated_rollback(w),
        bad_targets_fail_in_preparing(w),
        compressed_move(w),
        capped_move(w),
        through_a_bucket(w, &minio),
        minio_lost_mid_upload(w),
        clients::queued_connection(w),
        clients::gated_service(w),
    );
    let named = [
        ("cold across clusters", results.0),
        ("live within a cluster, then a fresh restart", results.1),
        ("three containers, Cold across clusters, one cut", results.2),
        (
            "three containers, Live within a cluster, one cut",
            results.3,
        ),
        (
            "corrupted checkpoint rolls back (direct; through a bucket, objects kept then removed)",
            results.4,
        ),
        (
            "a gated Pod's move rolls back: Ready again, gate True (Resumed)",
            results.5,
        ),
        ("bad targets fail in Preparing", results.6),
        ("compressed Cold move: fewer bytes on the wire", results.7),
        ("capped Cold move: no faster than the cap", results.8),
        (
            "Cold through a bucket, no route between the nodes; wrong credentials",
            results.9,
        ),
        (
            "MinIO lost mid-upload: rolled back, leftovers collected",
            results.10,
        ),
        (
            "a queued connection: Cold within a cluster, listening again",
            results.11,
        ),
        (
            "a gated Pod behind a Service: out of its endpoints while frozen, the target in",
            results.12,
        ),
    ];
    let mut failed = 0;
    for (name, r) in &named {
        match r {
            Ok(()) => eprintln!("scenario ok: {name}"),
            Err(e) => {
                failed += 1;
                eprintln!("scenario FAILED: {name}: {e:#}");
            }
        }
    }
    if failed > 0 {
        eprintln!("logs kept in {}", dir.keep().display());
        bail!("{failed} of {} scenarios failed", named.len());
    }
    Ok(())
}
