//! VM migration through the node daemons' gRPC API, the way the controller drives it:
//! two `ferry-node` daemons in network-namespace nodes, a real QEMU (TCG) guest started
//! by ferry-launcher and registered as a pod on node A, its memory stream forwarded
//! daemon-to-daemon over ferry-transfer's mutual-TLS pipe into an incoming QEMU that the
//! destination daemon starts.
use anyhow::{Context, Result, ensure};
use ferry_proto::node::v1 as pb;
use ferry_proto::node::v1::node_agent_client::NodeAgentClient;
use ferry_testkit::containers::{CgroupGuard, Daemon};
use ferry_testkit::guest::{Guest, first_count, last_count, sums, wait_count_above};
use ferry_testkit::netns::Lan;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type Client = NodeAgentClient<Channel>;

/// TCG guests saturate this 2-core machine; one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    _lan: Lan,
    _cg: CgroupGuard,
    _a: Daemon,
    b: Daemon,
    ca: Client,
    cb: Client,
    guest: Guest,
    tmp: tempfile::TempDir,
}

async fn setup(labels: (&str, &str), extra: &[&str]) -> Result<Setup> {
    setup_guest(labels, extra, 256, false).await
}

async fn setup_guest(
    labels: (&str, &str),
    extra: &[&str],
    memory_mib: u32,
    busy: bool,
) -> Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let cg = CgroupGuard::new("vmd");
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-node"));
    let a = Daemon::start_with(
        &lan,
        labels.0,
        tmp.path(),
        bin,
        &format!("{}-a", cg.0),
        extra,
    )?;
    let b = Daemon::start_with(
        &lan,
        labels.1,
        tmp.path(),
        bin,
        &format!("{}-b", cg.0),
        extra,
    )?;
    let ca = NodeAgentClient::connect(a.endpoint.clone()).await?;
    let cb = NodeAgentClient::connect(b.endpoint.clone()).await?;
    let launcher = Path::new(env!("CARGO_BIN_EXE_ferry-launcher"));
    let guest = Guest::launch_with(
        &a.node, launcher, &a.vm_root, "default", "vm-src", memory_mib, busy,
    )?;
    wait_count_above(&guest.serial(), 2, Duration::from_secs(90)).await?;
    Ok(Setup {
        _lan: lan,
        _cg: cg,
        _a: a,
        b,
        ca,
        cb,
        guest,
        tmp,
    })
}

fn pod(name: &str) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: "default".into(),
        pod_name: name.into(),
        pod_uid: String::new(),
    }
}

fn mig(id: &str) -> pb::MigrationRef {
    pb::MigrationRef {
        migration_id: id.into(),
    }
}

async fn op(c: &mut Client, id: &str) -> Result<pb::Operation> {
    Ok(c.get_operation(mig(id)).await?.into_inner())
}

async fn wait_op(c: &mut Client, id: &str, timeout: Duration) -> Result<pb::Operation> {
    let deadline = Instant::now() + timeout;
    loop {
        let o = op(c, id).await?;
        if o.state != pb::OperationState::Running as i32 {
            return Ok(o);
        }
        ensure!(
            Instant::now() < deadline,
            "operation {id} still running: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The guest's checksum of memory it never changes after boot is the same at the
/// destination as it was at the source.
async fn check_memory_intact(src_sums: &[String], dst_serial: &Path) -> Result<()> {
    let expected = src_sums.first().context("the source printed no checksum")?;
    ensure!(
        src_sums.iter().all(|s| s == expected),
        "source checksums differ: {src_sums:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while sums(dst_serial).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the destination printed no checksum"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dst = sums(dst_serial);
    ensure!(
        dst.iter().all(|s| s == expected),
        "guest memory changed across the migration: {expected} before, {dst:?} after"
    );
    Ok(())
}

/// Describe, prepare, checkpoint and restore, as the controller does.
async fn start(s: &mut Setup, id: &str, strategy: pb::Strategy) -> Result<()> {
    let desc = s.ca.describe_workload(pod("vm-src")).await?.into_inner();
    ensure!(
        desc.kind == pb::WorkloadKind::VirtualMachine as i32,
        "a launcher's pod must be described as a VM: {desc:?}"
    );
    ensure!(desc.memory_bytes >= 256 << 20, "memory: {desc:?}");
    let prep =
        s.cb.prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: id.into(),
            workload: Some(desc),
            target: Some(pod("vm-dst")),
            strategy: strategy as i32,
            transfer: None,
        })
        .await?
        .into_inner();
    s.ca.start_checkpoint(pb::StartCheckpointRequest {
        migration_id: id.into(),
        workload: Some(pod("vm-src")),
        strategy: strategy as i32,
        transfer: None,
        receive_endpoint: prep.receive_endpoint,
        leave_running: true,
        page_servers: prep.page_servers,
    })
    .await?;
    s.cb.start_restore(pb::StartRestoreRequest {
        migration_id: id.into(),
        target: Some(pod("vm-dst")),
    })
    .await?;
    Ok(())
}

/// A move both daemons reported done and finalized, with what the source showed last.
struct Moved {
    checkpoint: pb::Operation,
    /// The source's last count and memory sums, read while it was paused (not gone:
    /// until finalize, rollback stays possible).
    before: u64,
    src_sums: Vec<String>,
    dst_serial: PathBuf,
}

/// Waits for the checkpoint (within `timeout`) and the restore to succeed, reads the
/// paused source's state, then finalizes both sides.
async fn complete(s: &mut Setup, id: &str, timeout: Duration) -> Result<Moved> {
    let checkpoint = wait_op(&mut s.ca, id, timeout).await?;
    ensure!(
        checkpoint.state == pb::OperationState::Succeeded as i32,
        "checkpoint: {checkpoint:?}"
    );
    let rs = wait_op(&mut s.cb, id, Duration::from_secs(60)).await?;
    ensure!(
        rs.state == pb::OperationState::Succeeded as i32,
        "restore: {rs:?}"
    );
    let before = last_count(&s.guest.serial()).context("source count")?;
    let src_sums = sums(&s.guest.serial());
    s.ca.finalize(mig(id)).await?;
    s.cb.finalize(mig(id)).await?;
    Ok(Moved {
        checkpoint,
        before,
        src_sums,
        dst_serial: s.b.vm_root.join("default_vm-dst").join("serial.log"),
    })
}

#[tokio::test]
async fn vm_migrates_between_daemons_over_mtls() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vda", "vdb"), &[]).await?;
    let id = "vm-live-1";
    start(&mut s, id, pb::Strategy::PreCopy).await?;
    let Moved {
        checkpoint: cp,
        before,
        src_sums,
        dst_serial,
    } = complete(&mut s, id, Duration::from_secs(120)).await?;
    ensure!(cp.bytes_done > 16 << 20, "guest memory moved: {cp:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.guest.guard.exited() {
        ensure!(
            Instant::now() < deadline,
            "source QEMU still running after finalize"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The destination's serial log starts after migration: the guest's counter goes on
    // from where it was, it does not boot again from 1.
    let after = wait_count_above(&dst_serial, before, Duration::from_secs(60)).await?;
    let first = first_count(&dst_serial).context("destination count")?;
    ensure!(
        first >= before,
        "counter restarted: first {first} < source's {before}"
    );
    check_memory_intact(&src_sums, &dst_serial).await?;
    let moved = s.cb.describe_workload(pod("vm-dst")).await?.into_inner();
    ensure!(moved.kind == pb::WorkloadKind::VirtualMachine as i32);
    let gone = s.ca.describe_workload(pod("vm-src")).await;
    ensure!(
        gone.as_ref().err().map(|e| e.code()) == Some(tonic::Code::NotFound),
        "the source VM must be gone: {gone:?}"
    );
    println!(
        "VM through daemons: downtime {} ms, {} MiB, {} ms; count {before} -> {after}",
        cp.downtime_ms,
        cp.bytes_done >> 20,
        cp.elapsed_ms
    );
    drop(s.tmp);
    Ok(())
}

/// A busy 512 MiB guest (64 MiB rewritten continuously) moves through the daemons and
/// keeps counting; the memory it dirties arrives intact (a corrupted guest would oops
/// and stop counting).
#[tokio::test]
async fn busy_512mib_guest_migrates_through_daemons() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup_guest(("vdg", "vdh"), &[], 512, true).await?;
    let id = "vm-busy-1";
    start(&mut s, id, pb::Strategy::PreCopy).await?;
    let Moved {
        checkpoint: cp,
        before,
        src_sums,
        dst_serial,
    } = complete(&mut s, id, Duration::from_secs(180)).await?;
    let after = wait_count_above(&dst_serial, before + 3, Duration::from_secs(60)).await?;
    let log = std::fs::read_to_string(&dst_serial)?;
    ensure!(
        !log.contains("Oops") && !log.contains("BUG"),
        "destination guest crashed: {log}"
    );
    check_memory_intact(&src_sums, &dst_serial).await?;
    println!(
        "busy 512 MiB guest through daemons: downtime {} ms, {} MiB, {} ms; count {before} -> {after}",
        cp.downtime_ms,
        cp.bytes_done >> 20,
        cp.elapsed_ms
    );
    Ok(())
}

/// A busy guest on a link too slow for pre-copy to converge (16 MB/s against 64 MiB
/// rewritten continuously): with post-copy allowed the daemon sees the expected downtime
/// stop falling and switches by itself, and the migration completes.
#[tokio::test]
async fn stalled_pre_copy_switches_to_post_copy_by_itself() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup_guest(
        ("vdi", "vdj"),
        &["--vm-max-bandwidth", "16000000"],
        256,
        true,
    )
    .await?;
    let id = "vm-stall-1";
    start(&mut s, id, pb::Strategy::PostCopy).await?;
    let Moved {
        checkpoint: cp,
        before,
        src_sums,
        dst_serial,
    } = complete(&mut s, id, Duration::from_secs(180)).await?;
    ensure!(
        cp.message.contains("switched to post-copy"),
        "the daemon must have switched: {cp:?}"
    );
    wait_count_above(&dst_serial, before + 2, Duration::from_secs(60)).await?;
    // Post-copy: pages arrived on demand, and still the memory is what it was.
    check_memory_intact(&src_sums, &dst_serial).await?;
    println!(
        "stalled pre-copy → post-copy: downtime {} ms, total {} ms",
        cp.downtime_ms, cp.elapsed_ms
    );
    Ok(())
}

/// The destination's QEMU dies mid-copy (memory stream throttled to 4 MB/s so the copy
/// is surely in flight): the source's checkpoint fails, abort leaves the source guest
/// running and counting, and the destination is cleaned up.
#[tokio::test]
async fn destination_dying_mid_migration_leaves_the_source_running() -> Result<()> {
    destination_dies(("vdc", "vdd"), 1 << 20).await
}

/// The destination's QEMU dies before it even listens: the source, whose QEMU is
/// already pushing into the pipe, must not block on a pipe nobody reads.
#[tokio::test]
async fn destination_dying_before_it_listens_leaves_the_source_running() -> Result<()> {
    destination_dies(("vdk", "vdl"), 0).await
}

async fn destination_dies(labels: (&str, &str), after_bytes: u64) -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(labels, &["--vm-max-bandwidth", "4000000"]).await?;
    let id = "vm-kill-1";
    start(&mut s, id, pb::Strategy::PreCopy).await?;
    let dst_dir = s.b.vm_root.join("default_vm-dst");
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        let o = op(&mut s.ca, id).await?;
        if o.bytes_done >= after_bytes
            && let Ok(rec) = std::fs::read(dst_dir.join("vm.json"))
        {
            let rec: serde_json::Value = serde_json::from_slice(&rec)?;
            break rec["pid"].as_u64().context("pid")? as i32;
        }
        ensure!(
            Instant::now() < deadline,
            "migration never got going: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;

    let cp = wait_op(&mut s.ca, id, Duration::from_secs(60)).await?;
    ensure!(
        cp.state == pb::OperationState::Failed as i32,
        "checkpoint must fail: {cp:?}"
    );
    let rs = wait_op(&mut s.cb, id, Duration::from_secs(30)).await?;
    ensure!(
        rs.state == pb::OperationState::Failed as i32,
        "restore must fail: {rs:?}"
    );
    // What the controller does on failure: abort both ends.
    s.cb.abort(mig(id)).await?;
    s.ca.abort(mig(id)).await?;
    let n = last_count(&s.guest.serial()).unwrap_or(0);
    wait_count_above(&s.guest.serial(), n + 2, Duration::from_secs(30)).await?;
    ensure!(!s.guest.guard.exited(), "source QEMU must keep running");
    ensure!(!dst_dir.exists(), "destination registry left behind");
    s.ca.describe_workload(pod("vm-src")).await?;
    Ok(())
}

/// Abort while the copy runs (a deleted Migration): the source resumes, the destination's
/// incoming QEMU is removed.
#[tokio::test]
async fn abort_mid_migration_resumes_the_source() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vde", "vdf"), &["--vm-max-bandwidth", "4000000"]).await?;
    let id = "vm-abort-1";
    start(&mut s, id, pb::Strategy::PreCopy).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while op(&mut s.ca, id).await?.bytes_done < 1 << 20 {
        ensure!(Instant::now() < deadline, "migration never got going");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ab = s.ca.abort(mig(id)).await?.into_inner();
    ensure!(
        ab.state == pb::OperationState::Aborted as i32,
        "source abort: {ab:?}"
    );
    s.cb.abort(mig(id)).await?;
    let n = last_count(&s.guest.serial()).unwrap_or(0);
    wait_count_above(&s.guest.serial(), n + 2, Duration::from_secs(30)).await?;
    ensure!(!s.guest.guard.exited(), "source QEMU must keep running");
    ensure!(
        !s.b.vm_root.join("default_vm-dst").exists(),
        "destination registry left behind"
    );
    Ok(())
}

/// Bad requests for VMs are refused with a clear code before anything starts.
#[tokio::test]
async fn vm_bad_input_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let cg = CgroupGuard::new("vmbad");
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-node"));
    let d = Daemon::start(&lan, "vdx", tmp.path(), bin, &cg.0)?;
    let mut c = NodeAgentClient::connect(d.endpoint.clone()).await?;
    // A VM description without the guest spec cannot start an incoming guest.
    let e = c
        .prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: "bad-1".into(),
            workload: Some(pb::WorkloadDescription {
                workload: Some(pod("vm-x")),
                kind: pb::WorkloadKind::VirtualMachine as i32,
                containers: vec![],
                memory_bytes: 1 << 28,
                runtime_spec: b"{not json".to_vec(),
            }),
            target: Some(pod("vm-y")),
            strategy: pb::Strategy::PreCopy as i32,
            transfer: None,
        })
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    ensure!(e.message().contains("guest spec"), "{e:?}");
    // Object-store transfer is not wired into the daemons: refused, not silently direct.
    let e = c
        .prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: "bad-2".into(),
            workload: None,
            target: None,
            strategy: pb::Strategy::PreCopy as i32,
            transfer: Some(pb::TransferSpec {
                mode: pb::TransferMode::ObjectStore as i32,
                ..Default::default()
            }),
        })
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::Unimplemented, "{e:?}");
    ensure!(e.message().contains("ObjectStore"), "{e:?}");
    // No VM registered for the pod: NotFound, naming the pod.
    let e = c
        .describe_workload(pod("no-such-vm"))
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    ensure!(e.message().contains("no-such-vm"), "{e:?}");
    // A stale registration (its QEMU is gone) is not a VM.
    let dir = d.vm_root.join("default_stale");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("vm.json"),
        serde_json::json!({"namespace": "default", "pod_name": "stale", "pod_uid": "", "pid": u32::MAX,
            "spec": {"kernel": "/k", "initrd": null, "append": "", "memory_mib": 64, "vcpus": 1,
                     "accel": "tcg", "qmp_socket": "/q", "serial_log": "/s", "incoming": false}})
        .to_string(),
    )?;
    let e = c.describe_workload(pod("stale")).await.expect_err("stale");
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    Ok(())
}
