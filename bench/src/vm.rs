//! VM live migration: ferry vs raw QEMU, the same guest, the same nodes, the same run.
//!
//! * **raw**: two ferry-launcher guests (source, and `-incoming defer` destination) on
//!   two network-namespace nodes; QMP `migrate tcp:B` straight from QEMU to QEMU.
//! * **ferry**: two `ferry-node` daemons on the same kind of nodes; the source guest is
//!   registered as a pod, and the bench drives the daemons over gRPC as the controller
//!   does (describe, prepare, checkpoint, restore). The bench plays the kubelet: it starts
//!   the source pod's launcher and the target pod's (with `FERRY_INCOMING`), and stops
//!   both at the end. The stream goes QEMU → unix socket → source daemon → mutual-TLS
//!   pipe → destination daemon → the target pod's incoming QEMU.
//!
//! Metrics: downtime as QEMU measures it on the source (guest stop to completion, same
//! meaning on both paths), and total time measured here, wall clock from the migrate
//! request (raw) / StartCheckpoint (ferry) until the guest runs at the destination; on
//! both paths the incoming QEMU was already listening. Each is reported twice: the best
//! of the runs (`downtime_ms`, `total_ms`) and their 95th percentile (`downtime_p95_ms`,
//! `total_p95_ms`, nearest rank: with fewer than 20 runs that is the worst run). Both
//! sides use the same max-bandwidth (explicit: QEMU's default cap would bound both) and
//! downtime-limit.
//! `FERRY_BENCH_KEEP=1` keeps the daemons' logs and the guests' files afterwards.
//! Needs the test guest (`scripts/build-test-guest.sh`) and release binaries of
//! ferry-node and ferry-launcher next to ferry-bench.
use crate::Measurement;
use anyhow::{Context, Result, ensure};
use ferry_node::vm::INCOMING_READY;
use ferry_node::vm::qemu::{MigrationTuning, QemuBackend};
use ferry_proto::node::v1 as pb;
use ferry_proto::node::v1::node_agent_client::NodeAgentClient;
use ferry_testkit::containers::Daemon;
use ferry_testkit::guest::{Guest, VmPod, launcher_command, wait_count_above};
use ferry_testkit::netns::{Lan, Node};
use ferry_testkit::process::ChildGuard;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const BANDWIDTH: u64 = 10 << 30;

/// `runs`: migrations of each size on each path (default: 1 quick, 3 full).
pub fn run(quick: bool, runs: Option<usize>) -> Result<Vec<Measurement>> {
    let runs = runs.unwrap_or(if quick { 1 } else { 3 });
    ensure!(runs > 0, "the VM bench needs at least one run");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(quick, runs))
}

struct Sample {
    downtime_ms: f64,
    total_ms: f64,
    bytes: f64,
}

async fn run_async(quick: bool, runs: usize) -> Result<Vec<Measurement>> {
    let sizes: &[u32] = if quick { &[256] } else { &[256, 512] };
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let daemon_bin = ferry_testkit::workspace_bin("ferry-node")?;
    let launcher = ferry_testkit::workspace_bin("ferry-launcher")?;
    let bw = BANDWIDTH.to_string();
    let extra = ["--vm-max-bandwidth", bw.as_str()];
    let a = Daemon::start_with(&lan, "bva", tmp.path(), &daemon_bin, &extra)?;
    let b = Daemon::start_with(&lan, "bvb", tmp.path(), &daemon_bin, &extra)?;

    let mut out = vec![];
    for &mib in sizes {
        let (mut raw, mut ferry) = (vec![], vec![]);
        for i in 0..runs {
            // Alternate which goes first: the machine is shared and drifts.
            let raw_run = raw_migration(&a.node, &b.node, &launcher, tmp.path(), mib, i);
            let ferry_run = ferry_migration(&a, &b, &launcher, mib, i);
            let (raw_s, ferry_s) = if i % 2 == 0 {
                let r = raw_run.await;
                (r, ferry_run.await)
            } else {
                let f = ferry_run.await;
                (raw_run.await, f)
            };
            if raw_s.is_err() || ferry_s.is_err() {
                // Keep the daemons' logs, serial consoles and QEMU logs for a look.
                let kept = tmp.keep();
                eprintln!("vm bench failed; logs kept in {}", kept.display());
                raw_s.context("raw QEMU migration")?;
                ferry_s.context("ferry migration")?;
                unreachable!("one of them failed");
            }
            raw.push(raw_s?);
            ferry.push(ferry_s?);
        }
        out.extend(measurements(mib, &ferry, &raw));
    }
    drop((a, b));
    if std::env::var_os("FERRY_BENCH_KEEP").is_some() {
        // The daemons' logs (RUST_LOG=ferry_node=debug shows every QMP command's time).
        eprintln!("vm bench files kept in {}", tmp.keep().display());
    }
    Ok(out)
}

/// Best and 95th percentile of each metric, ferry's beside raw QEMU's.
fn measurements(mib: u32, ferry: &[Sample], raw: &[Sample]) -> Vec<Measurement> {
    let mut details = serde_json::Map::new();
    details.insert("guest_mib".into(), mib.into());
    details.insert("runs".into(), ferry.len().into());
    details.insert("bytes".into(), (ferry[0].bytes as u64).into());
    type Metric = fn(&Sample) -> f64;
    let metrics: [(&str, Metric); 2] = [("downtime", |s| s.downtime_ms), ("total", |s| s.total_ms)];
    let mut out = vec![];
    for (name, f) in metrics {
        for (suffix, stat, how) in [
            ("ms", best as fn(Vec<f64>) -> f64, "best"),
            ("p95_ms", p95, "p95"),
        ] {
            let of = |v: &[Sample]| stat(v.iter().map(f).collect());
            out.push(Measurement {
                case: format!("vm/live-{mib}MiB"),
                metric: format!("{name}_{suffix}"),
                ferry: of(ferry),
                baseline: of(raw),
                baseline_name: format!("raw QEMU→QEMU TCP migration ({how} of runs)"),
                details: details.clone(),
            });
        }
    }
    out
}

fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

/// Nearest-rank 95th percentile: the smallest value at least 95% of the runs reach.
fn p95(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = (v.len() as f64 * 0.95).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn launch_raw(
    node: &Node,
    launcher: &Path,
    dir: &Path,
    name: &str,
    mib: u32,
    incoming: bool,
) -> Result<ChildGuard> {
    let mut cmd = launcher_command(node, launcher, mib, false)?;
    cmd.arg("--qmp")
        .arg(dir.join(format!("{name}.qmp")))
        .arg("--serial-log")
        .arg(dir.join(format!("{name}.serial")));
    if incoming {
        cmd.arg("--incoming");
    }
    ChildGuard::spawn(name, cmd)
}

async fn raw_migration(
    a: &Node,
    b: &Node,
    launcher: &Path,
    base: &Path,
    mib: u32,
    i: usize,
) -> Result<Sample> {
    let dir = base.join(format!("raw-{mib}-{i}"));
    std::fs::create_dir_all(&dir)?;
    let _src = launch_raw(a, launcher, &dir, "raw-src", mib, false)?;
    let _dst = launch_raw(b, launcher, &dir, "raw-dst", mib, true)?;
    wait_count_above(&dir.join("raw-src.serial"), 2, Duration::from_secs(120)).await?;
    let src = QemuBackend::connect(&dir.join("raw-src.qmp"), Duration::from_secs(10)).await?;
    let dst = QemuBackend::connect(&dir.join("raw-dst.qmp"), Duration::from_secs(10)).await?;
    let tuning = MigrationTuning {
        max_bandwidth: BANDWIDTH,
        ..Default::default()
    };
    src.configure(&tuning).await?;
    dst.configure(&tuning).await?;
    let uri = format!("tcp:{}:{}", b.ip(), 4444 + i);
    dst.migrate_incoming(&uri).await?;
    let t0 = Instant::now();
    src.migrate(&uri).await?;
    let p = src
        .wait_finished(Duration::from_millis(20), Duration::from_secs(300), |_| {})
        .await?;
    while dst.run_state().await? != "running" {
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "destination never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let _ = src.quit().await;
    let _ = dst.quit().await;
    Ok(Sample {
        downtime_ms: p.downtime_ms.context("QEMU reported no downtime")? as f64,
        total_ms,
        bytes: p.transferred_bytes as f64,
    })
}

async fn ferry_migration(
    a: &Daemon,
    b: &Daemon,
    launcher: &Path,
    mib: u32,
    i: usize,
) -> Result<Sample> {
    let id = format!("bench-{mib}-{i}");
    let src_pod = VmPod::new("bench", &format!("bench-src-{mib}-{i}"));
    let dst_pod = VmPod::new("bench", &format!("bench-dst-{mib}-{i}")).incoming(&id);
    let guest = Guest::launch(&a.node, launcher, &a.vm_root, &src_pod, mib, false)?;
    wait_count_above(&guest.serial(), 2, Duration::from_secs(120)).await?;
    // The target pod's kubelet starts its launcher: QEMU waits with -incoming defer.
    let target = Guest::launch(&b.node, launcher, &b.vm_root, &dst_pod, mib, false)?;
    let mut ca = ferry_testkit::pki::control_client(&a.endpoint).await?;
    let mut cb = ferry_testkit::pki::control_client(&b.endpoint).await?;
    let pod = |p: &VmPod| pb::WorkloadRef {
        namespace: p.namespace.clone(),
        pod_name: p.name.clone(),
        pod_uid: p.uid.clone(),
    };
    let mig = pb::MigrationRef {
        migration_id: id.clone(),
    };
    let desc = ca.describe_workload(pod(&src_pod)).await?.into_inner();
    let prep = cb
        .prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: id.clone(),
            workload: Some(desc),
            target: Some(pod(&dst_pod)),
            strategy: pb::Strategy::PreCopy as i32,
            source_peer: a.peer_name(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // Like the raw baseline's destination, the incoming QEMU is up before the clock
    // starts (the controller prepares the target before it checkpoints the source).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let op = cb.get_operation(mig.clone()).await?.into_inner();
        if op.message == INCOMING_READY {
            break;
        }
        ensure!(
            op.state == pb::OperationState::Running as i32 && Instant::now() < deadline,
            "destination never got ready: {op:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    ca.start_checkpoint(pb::StartCheckpointRequest {
        migration_id: id.clone(),
        workload: Some(pod(&src_pod)),
        strategy: pb::Strategy::PreCopy as i32,
        receive_endpoint: prep.receive_endpoint,
        leave_running: true,
        token: prep.token,
        ..Default::default()
    })
    .await?;
    cb.start_restore(pb::StartRestoreRequest {
        migration_id: id.clone(),
        target: Some(pod(&dst_pod)),
    })
    .await?;
    // Followed as the controller follows them (WatchProgress), not polled: a poll here
    // would add its own interval to ferry's total.
    let (cp, rs) = tokio::time::timeout(Duration::from_secs(300), async {
        tokio::try_join!(settled(&mut ca, &mig), settled(&mut cb, &mig))
    })
    .await
    .with_context(|| format!("migration {id} timed out"))??;
    for op in [&cp, &rs] {
        ensure!(
            op.state == pb::OperationState::Succeeded as i32,
            "migration {id} failed: {op:?}"
        );
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    ca.finalize(mig.clone()).await?;
    cb.finalize(mig.clone()).await?;
    // The pods' kubelets end both copies (the daemons leave them running, as they must:
    // the source paused, the target running the guest).
    drop(guest);
    drop(target);
    Ok(Sample {
        downtime_ms: cp.downtime_ms as f64,
        total_ms,
        bytes: cp.bytes_done as f64,
    })
}

/// An operation's last state: WatchProgress sends the current state, then every change,
/// and ends after the first state that is not Running.
async fn settled(
    client: &mut NodeAgentClient<Channel>,
    mig: &pb::MigrationRef,
) -> Result<pb::Operation> {
    let mut stream = client.watch_progress(mig.clone()).await?.into_inner();
    let mut last = None;
    while let Some(op) = stream.message().await? {
        last = Some(op);
    }
    last.with_context(|| format!("the watch of {} ended empty", mig.migration_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_nearest_rank() {
        assert_eq!(p95(vec![5.0]), 5.0);
        // 10 runs: rank 10, the worst.
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(p95(ten), 10.0);
        // 40 runs: rank 38.
        assert_eq!(p95((1..=40).map(f64::from).collect()), 38.0);
        assert_eq!(best(vec![3.0, 1.0, 2.0]), 1.0);
    }

    #[test]
    fn every_metric_has_its_best_and_p95_beside_the_baseline() {
        let s = |d, t| Sample {
            downtime_ms: d,
            total_ms: t,
            bytes: 1e6,
        };
        let ms = measurements(
            256,
            &[s(50.0, 500.0), s(70.0, 600.0)],
            &[s(10.0, 300.0), s(12.0, 350.0)],
        );
        let get = |metric: &str| ms.iter().find(|m| m.metric == metric).unwrap();
        assert_eq!(
            (get("downtime_ms").ferry, get("downtime_ms").baseline),
            (50.0, 10.0)
        );
        assert_eq!(
            (
                get("downtime_p95_ms").ferry,
                get("downtime_p95_ms").baseline
            ),
            (70.0, 12.0)
        );
        assert_eq!(
            (get("total_ms").ferry, get("total_ms").baseline),
            (500.0, 300.0)
        );
        assert_eq!(
            (get("total_p95_ms").ferry, get("total_p95_ms").baseline),
            (600.0, 350.0)
        );
        assert_eq!(ms.len(), 4);
        assert!(ms.iter().all(|m| m.details["runs"] == 2));
    }
}
