//! Faults in the phases a fast move passes in an instant, held open with real parts:
//! west-1's kubelet stopped (SIGSTOP: it neither starts nor reports containers, its
//! pods and containerd run on).
//!
//! - **Preparing**: the kubelet is stopped before the Migration exists, so the target
//!   Pod the controller creates gets no sandbox and Preparing waits on it.
//! - **Restoring** (Cold): the kubelet is stopped while the 20 MiB still cross the slow
//!   link, so the checkpoint arrives, the gate opens, and no container can be created
//!   to restore it: Restoring waits with nothing restored yet (checked before each
//!   fault, so a fault never lands in a phase it did not mean).
//!
//! - **Completing**, held by west's kube-apiserver stopped (the controller waits for
//!   west's kubelet to report the restored container).
//! - **Mid-transfer**: west-1's link pulled while the checkpoint streams.
//!
//! After each fault the kubelet (apiserver, link) continues and the move ends; then the
//! workload runs exactly once, its counter continued and its 20 MiB intact.
use super::{RUNTIME_REQUEST_TIMEOUT, big_pod, moved_intact, source_never_restarted};
use anyhow::{Context, Result, ensure};
use ferry_controller::placement::GATE_CONTAINER;
use ferry_crds::{Migration, Phase};
use ferry_e2e::world::{World, wait_for};
use ferry_testkit::process::Stopped;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use std::time::Duration;

/// How much of the blob must have crossed before the kubelet stops: the rest (≥ 4 MiB
/// at 4 Mbit/s, ≥ 8 s) leaves time to stop it before the stage is ready.
const STOP_KUBELET_AT: u64 = 16 << 20;

/// The Migration `ns/m` of pod `big` held in Preparing: west-1's kubelet stopped, the
/// target Pod created and waiting for a sandbox. Returns the Migration's Api, the
/// stopped kubelet, the blob's checksum and the target Pod's UID.
async fn in_preparing(w: &World, ns: &str) -> Result<(Api<Migration>, Stopped, String, String)> {
    let kubelet = w.node("west-1").kube.stop_kubelet()?;
    let sum = big_pod(w, ns, "big").await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    let target: Api<Pod> = Api::namespaced(w.west.clone(), ns);
    wait_for(
        Duration::from_secs(60),
        "Preparing with the target Pod created",
        || async {
            let p = migs.get("m").await?.status.and_then(|s| s.phase);
            ensure!(
                matches!(p, None | Some(Phase::Pending | Phase::Preparing)),
                "went on to {p:?} with west-1's kubelet stopped"
            );
            Ok(p == Some(Phase::Preparing) && target.get_opt("big").await?.is_some())
        },
    )
    .await?;
    let uid = target.get("big").await?.uid().unwrap_or_default();
    eprintln!("[{ns}] Preparing, the target Pod waits for west-1's stopped kubelet");
    Ok((migs, kubelet, sum, uid))
}

/// The Migration `ns/m` of pod `big` held in Restoring (Cold) with nothing restored:
/// west-1's kubelet stopped while the blob crosses. Returns the Migration's Api, the
/// stopped kubelet and the blob's checksum.
async fn in_restoring(w: &World, ns: &str) -> Result<(Api<Migration>, Stopped, String)> {
    let sum = big_pod(w, ns, "big").await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    wait_for(
        Duration::from_secs(120),
        "16 MiB across the link",
        || async {
            let s = migs.get("m").await?.status.unwrap_or_default();
            let p = s.phase;
            ensure!(
                matches!(
                    p,
                    None | Some(
                        Phase::Pending
                            | Phase::Preparing
                            | Phase::Checkpointing
                            | Phase::Transferring
                    )
                ),
                "reached {p:?} before 16 MiB were seen to cross"
            );
            Ok(s.progress
                .is_some_and(|p| p.bytes_transferred >= STOP_KUBELET_AT))
        },
    )
    .await?;
    let kubelet = w.node("west-1").kube.stop_kubelet()?;
    wait_for(Duration::from_secs(60), "Restoring", || async {
        let p = migs.get("m").await?.status.and_then(|s| s.phase);
        ensure!(
            !matches!(p, Some(Phase::Completing) | Some(Phase::Succeeded)),
            "restored before west-1's kubelet stopped: {p:?}"
        );
        ensure!(!p.is_some_and(|p| p.is_terminal()), "ended: {p:?}");
        Ok(p == Some(Phase::Restoring))
    })
    .await?;
    nothing_restored(w, ns)?;
    eprintln!("[{ns}] Restoring, the state staged, west-1's kubelet stopped");
    Ok((migs, kubelet, sum))
}

/// No app container of `ns/big` runs on west-1 (its node's CRI, not the apiserver);
/// the gate (pause, never the workload) may still be there.
fn nothing_restored(w: &World, ns: &str) -> Result<()> {
    let copies = w.running_copies(ns, "big")?;
    ensure!(
        copies
            .iter()
            .all(|(node, c)| node != "west-1" || c == GATE_CONTAINER),
        "west-1 already runs {copies:?}"
    );
    Ok(())
}

/// The source counts on while west-1's kubelet is still stopped: the rollback did not
/// wait on the target Pod to go, because its daemon vouched that nothing ran there.
async fn source_counts_on(w: &World, ns: &str) -> Result<()> {
    let before = w.last_count("east", ns, "big", "app")?;
    wait_for(
        Duration::from_secs(60),
        "the source to count on while west-1's kubelet is stopped",
        || async {
            nothing_restored(w, ns)?;
            Ok(w.last_count("east", ns, "big", "app")? > before)
        },
    )
    .await
}

/// Follows `ns/m` to its end and checks it ended in `want`.
async fn ends(w: &World, ns: &str, want: Phase) -> Result<Migration> {
    let m = w
        .follow(ns, "m", Duration::from_secs(300), |m| {
            eprintln!("[{ns}] m: {:?}", m.status.as_ref().and_then(|s| s.phase));
        })
        .await?;
    let s = m.status.clone().context("no status")?;
    ensure!(
        s.phase == Some(want),
        "ended {:?}, not {want:?}: {:?}",
        s.phase,
        s.failure
    );
    if let Some(f) = &s.failure {
        eprintln!("[{ns}] {want:?}: {}: {}", f.reason, f.message);
    }
    Ok(m)
}

/// Deletes `ns/m`, held where west-1's stopped kubelet keeps it: the source counts on
/// while the kubelet is still stopped; once it continues the Migration goes, and the
/// workload runs once at the source.
async fn deleted_while_held(
    w: &World,
    ns: &str,
    migs: &Api<Migration>,
    kubelet: Stopped,
) -> Result<()> {
    migs.delete("m", &Default::default()).await?;
    source_counts_on(w, ns).await?;
    drop(kubelet);
    wait_for(
        Duration::from_secs(120),
        "the deleted Migration to go",
        || async { Ok(migs.get_opt("m").await?.is_none()) },
    )
    .await?;
    runs_once_at_source(w, ns).await
}

/// After a rollback or cancel: one copy, at the source, counting, never restarted.
async fn runs_once_at_source(w: &World, ns: &str) -> Result<()> {
    w.check_runs_once_at_source(ns, "big").await?;
    source_never_restarted(w, ns, "big").await
}

/// The controller killed and restarted in Preparing: the new one finds the target Pod
/// it created (by its Migration annotation) and waits on it; nothing is created twice
/// and the move completes once the kubelet continues.
pub(super) async fn controller_restarted_in_preparing(w: &mut World) -> Result<()> {
    let ns = "prep-restart";
    let (migs, kubelet, sum, uid) = in_preparing(w, ns).await?;
    w.restart_controller().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = migs.get("m").await?.status.and_then(|s| s.phase);
    ensure!(p == Some(Phase::Preparing), "after the restart: {p:?}");
    drop(kubelet);
    moved_intact(w, ns, "big", &sum).await?;
    let target: Api<Pod> = Api::namespaced(w.west.clone(), ns);
    let now = target.get("big").await?.uid().unwrap_or_default();
    ensure!(
        now == uid,
        "the target Pod was created again ({uid} -> {now})"
    );
    Ok(())
}

/// The Migration deleted in Preparing: nothing was frozen, so the source never stops;
/// the target Pod is deleted (and goes once its kubelet continues).
pub(super) async fn deleted_in_preparing(w: &World) -> Result<()> {
    let ns = "prep-delete";
    let (migs, kubelet, _sum, _uid) = in_preparing(w, ns).await?;
    deleted_while_held(w, ns, &migs, kubelet).await
}

/// Both daemons killed (SIGKILL, with their children) and restarted in Preparing,
/// before the receiver was prepared: the move goes on with the new daemons, once.
pub(super) async fn daemons_restarted_in_preparing(w: &World) -> Result<()> {
    let ns = "prep-daemons";
    let (_migs, kubelet, sum, _uid) = in_preparing(w, ns).await?;
    w.restart_daemon("east-1")?;
    w.restart_daemon("west-1")?;
    drop(kubelet);
    moved_intact(w, ns, "big", &sum).await
}

/// The controller killed and restarted in Restoring: the new one polls the restore it
/// finds started in the status; the move completes once the kubelet continues.
pub(super) async fn controller_restarted_in_restoring(w: &mut World) -> Result<()> {
    let ns = "restore-restart";
    let (migs, kubelet, sum) = in_restoring(w, ns).await?;
    w.restart_controller().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = migs.get("m").await?.status.and_then(|s| s.phase);
    ensure!(p == Some(Phase::Restoring), "after the restart: {p:?}");
    drop(kubelet);
    moved_intact(w, ns, "big", &sum).await
}

/// The Migration deleted in Restoring, before the point of no return (Cold): the
/// destination's Abort decides "abort" for the staged container before any restore,
/// so the source resumes at once, kubelet stopped or not; the target Pod goes after.
pub(super) async fn deleted_in_restoring(w: &World) -> Result<()> {
    let ns = "restore-delete";
    let (migs, kubelet, _sum) = in_restoring(w, ns).await?;
    deleted_while_held(w, ns, &migs, kubelet).await
}

/// The destination daemon killed and restarted in Restoring: the restore it was
/// watching is gone with it, so the Migration rolls back. The restarted daemon finds the
/// stage on disk and decides it "abort" before the kubelet can restore it: the source
/// resumes while the kubelet is still stopped, and once it continues no copy starts
/// there (the create fails on `aborted`; the Pod is being deleted anyway).
pub(super) async fn destination_daemon_restarted_in_restoring(w: &World) -> Result<()> {
    let ns = "restore-dest";
    let (_migs, kubelet, _sum) = in_restoring(w, ns).await?;
    w.restart_daemon("west-1")?;
    source_counts_on(w, ns).await?;
    drop(kubelet);
    ends(w, ns, Phase::RolledBack).await?;
    runs_once_at_source(w, ns).await
}

/// The source daemon killed and restarted in Restoring: the frozen source is found again
/// in its state dir; the restore at the target goes on, and Completing has the
/// restarted daemon end the frozen copy once its Pod is deleted.
pub(super) async fn source_daemon_restarted_in_restoring(w: &World) -> Result<()> {
    let ns = "restore-src";
    let (_migs, kubelet, sum) = in_restoring(w, ns).await?;
    w.restart_daemon("east-1")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(kubelet);
    moved_intact(w, ns, "big", &sum).await
}

/// West-1's link pulled in Restoring (the cable, not a process): the kubelet continues
/// and restores the container with no network at all (everything it needs is staged on
/// the node), and the move completes once the link is back and the kubelet reports it.
pub(super) async fn link_cut_in_restoring(w: &World) -> Result<()> {
    let ns = "restore-link";
    let (migs, kubelet, sum) = in_restoring(w, ns).await?;
    let lan = &w.node("west-1").lan;
    lan.set_link(false)?;
    drop(kubelet);
    let restored = wait_for(
        RUNTIME_REQUEST_TIMEOUT * 4,
        "west-1 to restore the container with its link down",
        || async {
            let p = migs.get("m").await?.status.and_then(|s| s.phase);
            ensure!(
                p == Some(Phase::Restoring),
                "left Restoring with west-1 cut off: {p:?}"
            );
            Ok(w.running_copies(ns, "big")?
                .contains(&("west-1".to_string(), "app".to_string())))
        },
    )
    .await;
    lan.set_link(true)?;
    restored?;
    eprintln!("[{ns}] restored on west-1 with its link down; link back up");
    moved_intact(w, ns, "big", &sum).await
}

/// West-1's link pulled for 10 s while the source streams the checkpoint (frozen): the
/// daemons' stream resumes from the last acknowledged byte once it is back, and the
/// move completes, once, intact.
pub(super) async fn link_cut_mid_transfer(w: &World) -> Result<()> {
    let ns = "stream-link";
    let sum = big_pod(w, ns, "big").await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    wait_for(
        Duration::from_secs(120),
        "4 MiB across the link",
        || async {
            let s = migs.get("m").await?.status.unwrap_or_default();
            ensure!(
                !matches!(s.phase, Some(Phase::Restoring | Phase::Completing))
                    && !s.phase.is_some_and(|p| p.is_terminal()),
                "the transfer ended before the cut: {:?}",
                s.phase
            );
            Ok(s.progress.is_some_and(|p| p.bytes_transferred >= 4 << 20))
        },
    )
    .await?;
    let lan = &w.node("west-1").lan;
    lan.set_link(false)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    lan.set_link(true)?;
    eprintln!("[{ns}] west-1's link was down for 10 s mid-stream");
    moved_intact(w, ns, "big", &sum).await
}

/// In Completing, held there by west's kube-apiserver (stopped while the checkpoint
/// streams, so the controller waits for west's kubelet to report the restored
/// container): both daemons killed and restarted, and the Migration deleted. Past
/// Restoring the target is the copy to keep: it completes forward, the restarted
/// source daemon ends the frozen source once its Pod is deleted, then the Migration
/// goes.
pub(super) async fn daemons_restarted_and_deleted_in_completing(w: &World) -> Result<()> {
    let ns = "complete-faults";
    let sum = big_pod(w, ns, "big").await?;
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    wait_for(Duration::from_secs(60), "Checkpointing", || async {
        Ok(migs.get("m").await?.status.and_then(|s| s.phase) == Some(Phase::Checkpointing))
    })
    .await?;
    let stopped = w.env.stop_apiserver("west")?;
    wait_for(
        Duration::from_secs(180),
        "Completing while west's apiserver is stopped",
        || async {
            let p = migs.get("m").await?.status.and_then(|s| s.phase);
            ensure!(!p.is_some_and(|p| p.is_terminal()), "ended: {p:?}");
            Ok(p == Some(Phase::Completing))
        },
    )
    .await?;
    w.restart_daemon("east-1")?;
    w.restart_daemon("west-1")?;
    migs.delete("m", &Default::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = migs.get("m").await?;
    ensure!(
        m.status.as_ref().and_then(|s| s.phase) == Some(Phase::Completing),
        "deleted in Completing: {:?}",
        m.status.and_then(|s| s.phase)
    );
    drop(stopped);
    eprintln!("[{ns}] daemons restarted, Migration deleted, in Completing; west continued");
    wait_for(
        Duration::from_secs(180),
        "the deleted Migration to complete and go",
        || async { Ok(migs.get_opt("m").await?.is_none()) },
    )
    .await?;
    super::runs_once_at_west_1(w, ns, "big").await?;
    let moved = w.exec("west", ns, "big", "app", &["md5sum", "/data/blob"])?;
    ensure!(
        moved == sum,
        "the writable layer changed: {sum:?} -> {moved:?}"
    );
    super::west_1_ready(w).await
}
