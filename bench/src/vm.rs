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
//! both paths the incoming QEMU was already listening. Both sides use the same
//! max-bandwidth (explicit: QEMU's default cap would bound both) and downtime-limit.
//! Needs the test guest (`scripts/build-test-guest.sh`) and release binaries of
//! ferry-node and ferry-launcher next to ferry-bench.
use crate::Measurement;
use anyhow::{Context, Result, bail, ensure};
use ferry_node::vm::INCOMING_READY;
use ferry_node::vm::qemu::{MigrationTuning, QemuBackend};
use ferry_proto::node::v1 as pb;
use ferry_testkit::containers::Daemon;
use ferry_testkit::guest::{Guest, VmPod, launcher_command, wait_count_above};
use ferry_testkit::netns::{Lan, Node};
use ferry_testkit::process::ChildGuard;
use std::path::Path;
use std::time::{Duration, Instant};

const BANDWIDTH: u64 = 10 << 30;

pub fn run(quick: bool) -> Result<Vec<Measurement>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(quick))
}

struct Sample {
    downtime_ms: f64,
    total_ms: f64,
    bytes: f64,
}

async fn run_async(quick: bool) -> Result<Vec<Measurement>> {
    let runs = if quick { 1 } else { 3 };
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
            let raw_s = raw_migration(&a.node, &b.node, &launcher, tmp.path(), mib, i).await;
            let ferry_s = ferry_migration(&a, &b, &launcher, mib, i).await;
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
        let best =
            |v: &[Sample], f: fn(&Sample) -> f64| v.iter().map(f).fold(f64::INFINITY, f64::min);
        let details = |v: &[Sample]| {
            let mut m = serde_json::Map::new();
            m.insert("guest_mib".into(), mib.into());
            m.insert("runs".into(), runs.into());
            m.insert("bytes".into(), (v[0].bytes as u64).into());
            m
        };
        for (metric, f) in [
            (
                "downtime_ms",
                (|s: &Sample| s.downtime_ms) as fn(&Sample) -> f64,
            ),
            ("total_ms", |s: &Sample| s.total_ms),
        ] {
            out.push(Measurement {
                case: format!("vm/live-{mib}MiB"),
                metric: metric.into(),
                ferry: best(&ferry, f),
                baseline: best(&raw, f),
                baseline_name: "raw QEMU→QEMU TCP migration (best of runs)".into(),
                details: details(&ferry),
            });
        }
    }
    drop((a, b));
    Ok(out)
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
    let mut cp = None;
    let mut rs = None;
    while cp.is_none() || rs.is_none() {
        for (client, slot) in [(&mut ca, &mut cp), (&mut cb, &mut rs)] {
            if slot.is_none() {
                let op = client.get_operation(mig.clone()).await?.into_inner();
                match pb::OperationState::try_from(op.state) {
                    Ok(pb::OperationState::Running) => {}
                    Ok(pb::OperationState::Succeeded) => *slot = Some(op),
                    _ => bail!("migration {id} failed: {op:?}"),
                }
            }
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "migration {id} timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let cp = cp.expect("set");
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
