//! A move whose transfer outlasts the target kubelet's runtime request timeout: the
//! target node's link is shaped to 4 Mbit/s, its kubelet gives up on a runtime call
//! after 15 s, and the pod carries 20 MiB of incompressible data in its writable layer
//! (~42 s on that link). The daemons' early-release threshold is 8 MiB, so the target
//! Pod's gate stays closed until everything is staged and the app container's `create`
//! restores at once instead of waiting out the transfer (which the kubelet would cut
//! off, killing the copy being restored).
//!
//! The same slow link makes a fault land where it should: the source daemon is killed
//! (SIGKILL, with its children) while it streams the checkpoint, and restarted. It
//! finds the frozen pod again from its state dir; the Migration rolls back and the
//! source runs on: exactly one copy, never a frozen one nobody resumes. The destination
//! daemon killed there instead: it forgets the migration, the rollback deletes the target
//! Pod and thaws the source. The controller
//! killed and restarted there instead: the move completes, once, intact. West's
//! kube-apiserver stopped there (SIGSTOP) until the controller is completing: the
//! target's kubelet restores without it; the controller restarted there, in Completing,
//! picks it up; the move completes once west answers.
//! Stopped there and the Migration deleted meanwhile: the source runs again while west
//! still answers nothing.
//!
//! The same slow link holds Preparing and Restoring open for faults there (`phases.rs`).
//!
//! And it keeps a post-copy's page traffic in view long enough to look at it: 20 MiB of
//! a shell's memory fetched lazily over that link. Every socket CRIU holds on either
//! node, listening or connected, is on loopback; the pages cross between the nodes
//! only inside the daemons' mutual-TLS pipe. Deleting that Migration while the pages
//! flow does not cancel it: past post-copy's point of no return it completes forward.
use anyhow::{Context, Result, bail, ensure};
use ferry_controller::placement::GATE_CONTAINER;
use ferry_crds::{Failure, Migration, Phase};
use ferry_e2e::world::{World, WorldOptions, numbers, pod_running, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::time::Duration;

#[path = "long_transfer/phases.rs"]
mod phases;

const RUNTIME_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_longer_than_the_runtime_request_timeout_still_moves() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-long-")
        .tempdir_in("/tmp")?;
    let opts = WorldOptions {
        runtime_request_timeout: Some(RUNTIME_REQUEST_TIMEOUT),
        daemon_args: vec!["--early-release-mib".into(), "8".into()],
        ..Default::default()
    };
    let mut w = World::start(dir.path(), opts).await?;
    w.start_controller();
    let long = long_transfer(&w).await;
    let crash = source_daemon_killed_mid_transfer(&w).await;
    let dest_crash = destination_daemon_killed_mid_transfer(&w).await;
    let pages = lazy_pages_stay_inside_mutual_tls(&w).await;
    let restart = controller_restarted_mid_transfer(&mut w).await;
    let outage = target_apiserver_stopped_into_completing(&mut w).await;
    let outage_cancel = deleted_while_the_target_apiserver_is_stopped(&w).await;
    let prep_restart = phases::controller_restarted_in_preparing(&mut w).await;
    let prep_delete = phases::deleted_in_preparing(&w).await;
    let prep_daemons = phases::daemons_restarted_in_preparing(&w).await;
    let restore_restart = phases::controller_restarted_in_restoring(&mut w).await;
    let restore_delete = phases::deleted_in_restoring(&w).await;
    let restore_dest = phases::destination_daemon_restarted_in_restoring(&w).await;
    let restore_src = phases::source_daemon_restarted_in_restoring(&w).await;
    let restore_link = phases::link_cut_in_restoring(&w).await;
    let stream_link = phases::link_cut_mid_transfer(&w).await;
    let completing = phases::daemons_restarted_and_deleted_in_completing(&w).await;
    let results = [
        ("long transfer", long),
        ("source daemon killed", crash),
        ("destination daemon killed", dest_crash),
        ("lazy pages inside mutual TLS", pages),
        ("controller restarted mid-transfer", restart),
        ("target apiserver stopped into Completing", outage),
        (
            "deleted while the target apiserver is stopped",
            outage_cancel,
        ),
        ("controller restarted in Preparing", prep_restart),
        ("deleted in Preparing", prep_delete),
        ("both daemons restarted in Preparing", prep_daemons),
        ("controller restarted in Restoring", restore_restart),
        ("deleted in Restoring", restore_delete),
        ("destination daemon restarted in Restoring", restore_dest),
        ("source daemon restarted in Restoring", restore_src),
        ("link cut in Restoring", restore_link),
        ("link cut mid-transfer", stream_link),
        (
            "daemons restarted and Migration deleted in Completing",
            completing,
        ),
    ];
    let mut failed = false;
    for (name, r) in &results {
        match r {
            Ok(()) => eprintln!("scenario ok: {name}"),
            Err(e) => {
                failed = true;
                eprintln!("scenario FAILED: {name}: {e:#}");
            }
        }
    }
    if failed {
        eprintln!("logs kept in {}", dir.keep().display());
        bail!("a scenario failed");
    }
    Ok(())
}

/// A counter pod on east-1 whose writable layer holds 20 MiB of random bytes; returns
/// the blob's md5sum once the counter runs, and shapes west-1's link.
async fn big_pod(w: &World, ns: &str, pod: &str) -> Result<String> {
    w.namespace(ns).await?;
    let script = "head -c 20971520 /dev/urandom > /data/blob; exec 3>>/data/count.log; i=0; \
        while true; do i=$((i+1)); echo $i; echo $i >&3; usleep 50000; done";
    w.create_pod(ns, pod_running(pod, "east-1", &["app"], script))
        .await?;
    // The blob is complete once the counter prints.
    wait_for(Duration::from_secs(30), "the counter to start", || async {
        Ok(!numbers(&w.logs("east", ns, pod, "app")?).is_empty())
    })
    .await?;
    let sum = w.exec("east", ns, pod, "app", &["md5sum", "/data/blob"])?;
    // Only now: the pod's own start must not depend on the slow link.
    w.node("west-1").lan.shape_ingress(4)?;
    w.apply_migration(
        ns,
        &format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: m}}\nspec:\n  \
             workload: {{pod: {pod}}}\n  target: {{cluster: west, node: west-1}}\n  strategy: Cold\n"
        ),
    )
    .await?;
    Ok(sum)
}

async fn long_transfer(w: &World) -> Result<()> {
    let ns = "long";
    let sum = big_pod(w, ns, "big").await?;
    moved_intact(w, ns, "big", &sum).await
}

/// The controller is killed while the source streams the checkpoint (frozen, ~40 s on
/// this link) and a new one started: it polls the running operations from the status
/// (never starting a step twice) and the move completes, once, intact.
async fn controller_restarted_mid_transfer(w: &mut World) -> Result<()> {
    let ns = "restart";
    let sum = big_pod(w, ns, "big").await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    wait_for(Duration::from_secs(60), "Checkpointing", || async {
        Ok(matches!(
            migs.get("m").await?.status.and_then(|s| s.phase),
            Some(Phase::Checkpointing | Phase::Transferring)
        ))
    })
    .await?;
    w.restart_controller().await;
    let phase = migs.get("m").await?.status.and_then(|s| s.phase);
    eprintln!("[{ns}] controller restarted in {phase:?}");
    moved_intact(w, ns, "big", &sum).await
}

/// Waits until Migration `ns/m` is in Checkpointing; returns its Api.
async fn until_checkpointing(w: &World, ns: &str) -> Result<Api<Migration>> {
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    wait_for(Duration::from_secs(60), "Checkpointing", || async {
        Ok(migs.get("m").await?.status.and_then(|s| s.phase) == Some(Phase::Checkpointing))
    })
    .await?;
    Ok(migs)
}

/// A big pod `ns/victim` moving (Migration `m`), 3 s into its checkpoint. The freeze
/// comes first, the 20 MiB take ~40 s on this link: 3 s in, the source is frozen and
/// streaming to the receiving target (or, on a very slow day, still dumping: a fault
/// all the same).
async fn frozen_mid_transfer(w: &World, ns: &str) -> Result<Api<Migration>> {
    big_pod(w, ns, "victim").await?;
    let migs = until_checkpointing(w, ns).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(migs)
}

/// West's kube-apiserver stops (SIGSTOP: it answers nothing) while the source streams
/// its checkpoint, and stays stopped until the controller is in Completing, waiting for
/// west's kubelet to report the restored container running. Meanwhile the transfer
/// ends and west-1's kubelet restores the container without its apiserver; Completing's
/// calls to west time out and are retried. The controller is restarted there too (in
/// Completing, with the target unreachable through its apiserver). Once west answers
/// again the move completes, once, intact.
async fn target_apiserver_stopped_into_completing(w: &mut World) -> Result<()> {
    let ns = "outage";
    let sum = big_pod(w, ns, "big").await?;
    let migs = until_checkpointing(w, ns).await?;
    let stopped = w.env.stop_apiserver("west")?;
    wait_for(
        Duration::from_secs(180),
        "Completing while west's apiserver is stopped",
        || async {
            let p = migs.get("m").await?.status.and_then(|s| s.phase);
            ensure!(
                !p.is_some_and(|p| p.is_terminal()),
                "ended while west's apiserver was stopped: {p:?}"
            );
            Ok(p == Some(Phase::Completing))
        },
    )
    .await?;
    w.restart_controller().await;
    // The new controller reads Completing from the status and waits on west too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = migs.get("m").await?.status.and_then(|s| s.phase);
    ensure!(
        p == Some(Phase::Completing),
        "after the controller restart, with west's apiserver stopped: {p:?}"
    );
    drop(stopped);
    eprintln!("[{ns}] controller restarted in Completing; west's apiserver continued");
    moved_intact(w, ns, "big", &sum).await?;
    west_1_ready(w).await
}

/// West's kube-apiserver stops while the source streams its checkpoint, and the
/// Migration is deleted meanwhile. Nothing was restored at the target, which its daemon
/// vouches for (it decided "abort" before any restore began), so the source resumes at
/// once, while west still answers nothing: the outage does not keep the workload
/// frozen. Once west answers again, the target Pod goes and the Migration with it.
async fn deleted_while_the_target_apiserver_is_stopped(w: &World) -> Result<()> {
    let ns = "outage-cancel";
    let migs = frozen_mid_transfer(w, ns).await?;
    let stopped = w.env.stop_apiserver("west")?;
    migs.delete("m", &Default::default()).await?;
    let before = w.last_count("east", ns, "victim", "app")?;
    wait_for(
        Duration::from_secs(60),
        "the source to count on while west's apiserver is stopped",
        || async {
            // The target Pod's gate (pause, never the workload) stays until west can
            // delete the Pod; the workload's container runs at the source only.
            let copies = w.running_copies(ns, "victim")?;
            ensure!(
                copies
                    .iter()
                    .all(|(node, c)| node == "east-1" || c == GATE_CONTAINER),
                "running copies: {copies:?}"
            );
            Ok(w.last_count("east", ns, "victim", "app")? > before)
        },
    )
    .await?;
    eprintln!("[{ns}] the source runs again while west's apiserver is stopped");
    drop(stopped);
    wait_for(
        Duration::from_secs(120),
        "the deleted Migration to go",
        || async { Ok(migs.get_opt("m").await?.is_none()) },
    )
    .await?;
    w.check_runs_once_at_source(ns, "victim").await?;
    west_1_ready(w).await
}

/// After an outage of west's apiserver: west-1 is Ready again (its kubelet renewed its
/// lease), so that what follows can target it.
async fn west_1_ready(w: &World) -> Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(w.west.clone());
    wait_for(Duration::from_secs(60), "west-1 Ready", || async {
        let n = nodes.get("west-1").await?;
        Ok(n.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await
}

/// Follows the Migration `m` to Succeeded: the transfer outlasted the kubelet's runtime
/// request timeout, the target's container runs unrestarted, its log continues the
/// count, its writable layer is intact, and it is the only running copy.
async fn moved_intact(w: &World, ns: &str, pod: &str, sum: &str) -> Result<()> {
    let m = w
        .follow(ns, "m", Duration::from_secs(300), |m| {
            eprintln!("[{ns}] m: {:?}", m.status.as_ref().and_then(|s| s.phase));
        })
        .await?;
    let s = m.status.clone().context("no status")?;
    if s.phase != Some(Phase::Succeeded) {
        bail!("not Succeeded: {:?}", s.failure);
    }
    let t = s.timings.clone().unwrap_or_default();
    // The premise: the state took longer to arrive than the kubelet waits for a call.
    let receive = t
        .steps
        .iter()
        .find(|s| s.name == "receive/app")
        .with_context(|| format!("no receive/app step in {:?}", t.steps))?;
    ensure!(
        Duration::from_millis(receive.duration_ms) > RUNTIME_REQUEST_TIMEOUT,
        "the transfer took only {} ms: the link is not slow enough to test anything",
        receive.duration_ms
    );
    eprintln!(
        "[{ns}] receive took {} ms (kubelet runtime request timeout {RUNTIME_REQUEST_TIMEOUT:?}); downtime {:?} ms",
        receive.duration_ms, t.downtime_ms
    );
    let pods: Api<Pod> = Api::namespaced(w.west.clone(), ns);
    let target = pods.get(pod).await?;
    let cs = target
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default();
    ensure!(
        cs.len() == 1
            && cs[0].restart_count == 0
            && cs[0].state.as_ref().is_some_and(|s| s.running.is_some()),
        "target container: {cs:?}"
    );
    let first = *numbers(&w.logs("west", ns, pod, "app")?)
        .first()
        .context("empty target log")?;
    ensure!(first > 1, "the target's log starts at {first}: restarted");
    let moved = w.exec("west", ns, pod, "app", &["md5sum", "/data/blob"])?;
    ensure!(
        moved == sum,
        "the writable layer changed: {sum:?} -> {moved:?}"
    );
    w.runs_only_on(ns, &[pod], "west-1", &["app"]).await
}

async fn source_daemon_killed_mid_transfer(w: &World) -> Result<()> {
    daemon_killed_mid_transfer(w, "crash", "east-1").await?;
    Ok(())
}

/// The destination daemon is killed the same way while it receives the checkpoint. It
/// forgets the migration it was receiving (its grants and streams live in memory), so
/// the source's resumed stream is refused, its checkpoint fails at once and the
/// Migration rolls back: the target Pod is deleted, the source thawed.
async fn destination_daemon_killed_mid_transfer(w: &World) -> Result<()> {
    let f = daemon_killed_mid_transfer(w, "crash-dest", "west-1").await?;
    // The source's checkpoint fails on the refusal itself, not on the controller's
    // progress timeout.
    ensure!(
        f.reason == "CheckpointFailed",
        "rolled back for {}, not for the failed send: {}",
        f.reason,
        f.message
    );
    Ok(())
}

/// Kills `node`'s daemon (SIGKILL, with its children) 3 s into the checkpoint of a big
/// pod and restarts it; the Migration must roll back, the source run on exactly once,
/// never restarted. Returns why it rolled back.
async fn daemon_killed_mid_transfer(w: &World, ns: &str, node: &str) -> Result<Failure> {
    frozen_mid_transfer(w, ns).await?;
    w.restart_daemon(node)?;
    let m = w
        .follow(ns, "m", Duration::from_secs(300), |m| {
            eprintln!("[{ns}] m: {:?}", m.status.as_ref().and_then(|s| s.phase));
        })
        .await?;
    let s = m.status.context("no status")?;
    ensure!(
        s.phase == Some(Phase::RolledBack),
        "phase {:?}: {:?}",
        s.phase,
        s.failure
    );
    let f = s.failure.context("no failure")?;
    eprintln!("[{ns}] rolled back: {}: {}", f.reason, f.message);
    w.check_runs_once_at_source(ns, "victim").await?;
    source_never_restarted(w, ns, "victim").await?;
    Ok(f)
}

/// After a move completed: the source Pod was deleted and its kubelet removed it once
/// its copy ended; the one running copy is west-1's.
async fn runs_once_at_west_1(w: &World, ns: &str, pod: &str) -> Result<()> {
    let east: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    wait_for(Duration::from_secs(60), "the source Pod to go", || async {
        Ok(east.get_opt(pod).await?.is_none())
    })
    .await?;
    let copies = w.running_copies(ns, pod)?;
    ensure!(
        copies == [("west-1".to_string(), "app".to_string())],
        "running copies: {copies:?}"
    );
    Ok(())
}

/// No container of the source Pod `ns/pod` was ever restarted by its kubelet.
async fn source_never_restarted(w: &World, ns: &str, pod: &str) -> Result<()> {
    let cs = w.container_statuses("east", ns, pod).await?;
    ensure!(
        cs.iter().all(|c| c.restart_count == 0),
        "the source restarted: {cs:?}"
    );
    Ok(())
}

/// Post-copy of a pod whose shell holds 20 MiB in a variable, over the 4 Mbit/s link:
/// the target runs at once and fetches the pages for ~40 s. While it does, CRIU's page
/// connections are seen on loopback only (the lazy-pages daemon at the target, the
/// dump's page server at the source), never between the nodes' addresses. The
/// Migration, deleted meanwhile (past the point of no return), completes anyway; the
/// restored shell still holds the whole variable.
async fn lazy_pages_stay_inside_mutual_tls(w: &World) -> Result<()> {
    let ns = "pages";
    const LEN: usize = 20 << 20;
    w.namespace(ns).await?;
    // SIGUSR1 makes the shell print the variable's length: a read of restored memory.
    // One tick a second: CRIU's lazy-pages daemon fetches the pages every forked child
    // touches too, and 20 forks a second would take most of this slow link.
    let script = format!(
        "x=$(head -c {LEN} /dev/zero | tr '\\0' m); trap 'echo len ${{#x}}' USR1; \
         exec 3>>/data/count.log; i=0; while true; do i=$((i+1)); echo $i; echo $i >&3; \
         sleep 1; done"
    );
    w.create_pod(ns, pod_running("mem", "east-1", &["app"], &script))
        .await?;
    wait_for(Duration::from_secs(30), "the counter to start", || async {
        Ok(!numbers(&w.logs("east", ns, "mem", "app")?).is_empty())
    })
    .await?;
    w.node("west-1").lan.shape_ingress(4)?;
    w.apply_migration(
        ns,
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: m}\nspec:\n  \
         workload: {pod: mem}\n  target: {cluster: west, node: west-1}\n  strategy: Live\n",
    )
    .await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    // Sample both nodes' sockets until CRIU's page connection shows (it lasts as long
    // as the pages take on this link); every sample must hold the rule.
    let mut seen = Vec::new();
    let mut samples = 0;
    wait_for(Duration::from_secs(120), "CRIU's page connection", || {
        samples += 1;
        let found = (|| -> Result<bool> {
            let mut criu = Vec::new();
            for node in ["east-1", "west-1"] {
                for s in w.tcp_sockets(node)? {
                    if s.held_by("criu") {
                        ensure!(
                            s.on_loopback(),
                            "CRIU holds a socket beyond loopback on {node}: {s:?}"
                        );
                        criu.push((node, s));
                    }
                }
            }
            let connected = criu.iter().any(|(_, s)| s.state == "ESTAB");
            if connected {
                seen = criu;
            }
            Ok(connected)
        })();
        let phase = futures_phase(&migs);
        async move {
            let found = found?;
            if !found && let Some(p) = phase.await? {
                ensure!(
                    !matches!(p, Phase::Succeeded | Phase::Failed | Phase::RolledBack),
                    "the migration ended ({p:?}) before CRIU's page connection was seen"
                );
            }
            Ok(found)
        }
    })
    .await?;
    eprintln!("[{ns}] after {samples} sample(s), CRIU's sockets: {seen:?}");
    // The bundle is out and the target restores: past the point of no return, which
    // the status says. Deleting the Migration now must not cancel (the source cannot
    // resume; removing the target would leave no copy): it completes, then goes.
    wait_for(
        Duration::from_secs(60),
        "the status to say committed",
        || async {
            let s = migs.get("m").await?.status;
            ensure!(
                !s.as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_terminal()),
                "ended before its status said committed: {s:?}"
            );
            Ok(s.is_some_and(|s| s.committed))
        },
    )
    .await?;
    migs.delete("m", &Default::default()).await?;
    wait_for(
        Duration::from_secs(300),
        "the deleted Migration to complete and go",
        || async { Ok(migs.get_opt("m").await?.is_none()) },
    )
    .await?;
    runs_once_at_west_1(w, ns, "mem").await?;
    w.exec("west", ns, "mem", "app", &["kill", "-USR1", "1"])?;
    wait_for(
        Duration::from_secs(30),
        "the restored shell's answer",
        || async {
            Ok(w.logs("west", ns, "mem", "app")?
                .lines()
                .any(|l| l.trim() == format!("len {LEN}")))
        },
    )
    .await?;
    Ok(())
}

/// The Migration's phase, read when awaited.
fn futures_phase(
    migs: &Api<Migration>,
) -> impl std::future::Future<Output = Result<Option<Phase>>> + use<> {
    let migs = migs.clone();
    async move { Ok(migs.get("m").await?.status.and_then(|s| s.phase)) }
}
