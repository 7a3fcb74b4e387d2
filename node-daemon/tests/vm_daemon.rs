//! VM migration through the node daemons' gRPC API, the way the controller drives it:
//! two `ferry-node` daemons in network-namespace nodes, a real QEMU (TCG) guest run by
//! ferry-launcher as VM pod on node A, its memory stream forwarded daemon-to-daemon over
//! ferry-transfer's mutual-TLS pipe into the incoming QEMU of the target pod on node B.
//!
//! No kubelet runs here: the test plays it. It starts each pod's launcher with the
//! environment a kubelet gives a VM pod's container (the Downward API values, and
//! `FERRY_INCOMING` for the target pod, before or after `PrepareReceiver`: a kubelet
//! gets to a new Pod whenever it does), and it ends a pod by stopping its launcher, as a
//! kubelet does when the controller deletes the Pod. The daemons never start, quit or
//! kill a QEMU themselves.
use anyhow::{Context, Result, ensure};
use ferry_node::vm::qemu::QemuBackend;
use ferry_node::vm::registry;
use ferry_proto::node::v1 as pb;
use ferry_proto::node::v1::node_agent_client::NodeAgentClient;
use ferry_testkit::containers::Daemon;
use ferry_testkit::guest::{
    Guest, VmPod, first_count, last_count, sums, vm_pod_manifest, wait_count_above,
};
use ferry_testkit::netns::Lan;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type Client = NodeAgentClient<Channel>;

/// TCG guests saturate this 2-core machine; one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// When the test (as node B's kubelet) starts the target pod's launcher.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    BeforePrepare,
    AfterPrepare,
}

struct Setup {
    _lan: Lan,
    a: Daemon,
    b: Daemon,
    ca: Client,
    cb: Client,
    guest: Guest,
    /// The target pod's launcher, once started.
    target: Option<Guest>,
    memory_mib: u32,
    busy: bool,
    /// The TransferSpec both daemons get, as the controller sends it (None: defaults).
    transfer: Option<pb::TransferSpec>,
    tmp: tempfile::TempDir,
}

fn launcher() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferry-launcher"))
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
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-node"));
    let a = Daemon::start_with(&lan, labels.0, tmp.path(), bin, extra)?;
    let b = Daemon::start_with(&lan, labels.1, tmp.path(), bin, extra)?;
    let ca = ferry_testkit::pki::control_client(&a.endpoint).await?;
    let cb = ferry_testkit::pki::control_client(&b.endpoint).await?;
    let src = VmPod::new("default", "vm-src");
    let guest = Guest::launch(&a.node, launcher(), &a.vm_root, &src, memory_mib, busy)?;
    wait_count_above(&guest.serial(), 2, Duration::from_secs(90)).await?;
    Ok(Setup {
        _lan: lan,
        a,
        b,
        ca,
        cb,
        guest,
        target: None,
        memory_mib,
        busy,
        transfer: None,
        tmp,
    })
}

impl Setup {
    /// Node B's kubelet starts the target pod of migration `id`.
    fn start_target(&mut self, id: &str) -> Result<()> {
        let pod = VmPod::new("default", "vm-dst").incoming(id);
        self.target = Some(Guest::launch(
            &self.b.node,
            launcher(),
            &self.b.vm_root,
            &pod,
            self.memory_mib,
            self.busy,
        )?);
        Ok(())
    }

    fn target(&self) -> &Guest {
        self.target.as_ref().expect("target pod started")
    }

    fn src_ref(&self) -> pb::WorkloadRef {
        pod_ref(&self.guest.pod)
    }

    /// Waits until the source has moved 1 MiB of migration `id`: the copy is under way.
    async fn copying(&mut self, id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while op(&mut self.ca, id).await?.bytes_done < 1 << 20 {
            ensure!(Instant::now() < deadline, "migration never got going");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The source guest runs on: it counts on, its QEMU lives, its daemon describes it.
    async fn source_runs_on(&mut self) -> Result<()> {
        let n = last_count(&self.guest.serial()).unwrap_or(0);
        wait_count_above(&self.guest.serial(), n + 2, Duration::from_secs(30))
            .await
            .context("the source guest stopped counting")?;
        ensure!(!self.guest.guard.exited(), "source QEMU must keep running");
        self.ca.describe_workload(self.src_ref()).await?;
        Ok(())
    }
}

fn pod_ref(p: &VmPod) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: p.namespace.clone(),
        pod_name: p.name.clone(),
        pod_uid: p.uid.clone(),
    }
}

/// A pod by name only (no UID): the registry is searched.
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

/// Describe, prepare, checkpoint and restore, as the controller does; the target pod
/// starts before or after PrepareReceiver.
async fn start(s: &mut Setup, id: &str, strategy: pb::Strategy, target: Target) -> Result<()> {
    let desc = s.ca.describe_workload(s.src_ref()).await?.into_inner();
    ensure!(
        desc.kind == pb::WorkloadKind::VirtualMachine as i32,
        "a launcher's pod must be described as a VM: {desc:?}"
    );
    ensure!(desc.memory_bytes >= 256 << 20, "memory: {desc:?}");
    if target == Target::BeforePrepare {
        s.start_target(id)?;
    }
    // The controller knows the target Pod's UID (it created the Pod) before its
    // kubelet starts the launcher.
    let dst = match &s.target {
        Some(t) => t.pod.clone(),
        None => VmPod::new("default", "vm-dst").incoming(id),
    };
    let prep =
        s.cb.prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: id.into(),
            workload: Some(desc),
            target: Some(pod_ref(&dst)),
            strategy: strategy as i32,
            source_peer: s.a.peer_name(),
            transfer: s.transfer.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if target == Target::AfterPrepare {
        // A kubelet that gets to the Pod a little later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.target = Some(Guest::launch(
            &s.b.node,
            launcher(),
            &s.b.vm_root,
            &dst,
            s.memory_mib,
            s.busy,
        )?);
    }
    s.ca.start_checkpoint(pb::StartCheckpointRequest {
        migration_id: id.into(),
        workload: Some(s.src_ref()),
        strategy: strategy as i32,
        receive_endpoint: prep.receive_endpoint,
        leave_running: true,
        page_servers: prep.page_servers,
        token: prep.token,
        transfer: s.transfer.clone(),
        ..Default::default()
    })
    .await?;
    s.cb.start_restore(pb::StartRestoreRequest {
        migration_id: id.into(),
        target: Some(pod_ref(&dst)),
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
/// paused source's state, finalizes both sides, and checks that finalize left the
/// source QEMU paused, not gone: ending it is its kubelet's job once the controller
/// deletes the source Pod, which the test then does.
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
    ensure!(
        !s.guest.guard.exited(),
        "finalize must not end the source QEMU (its kubelet would restart it)"
    );
    let q = QemuBackend::connect(&s.guest.qmp(), Duration::from_secs(10)).await?;
    ensure!(q.run_state().await? == "postmigrate");
    drop(q);
    // The controller deletes the source Pod: its kubelet's SIGTERM ends QEMU.
    s.guest.guard.stop(Duration::from_secs(10));
    Ok(Moved {
        checkpoint,
        before,
        src_sums,
        dst_serial: s.target().serial(),
    })
}

#[tokio::test]
async fn vm_migrates_between_daemons_over_mtls() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vda", "vdb"), &[]).await?;
    let id = "vm-live-1";
    start(&mut s, id, pb::Strategy::PreCopy, Target::AfterPrepare).await?;
    let Moved {
        checkpoint: cp,
        before,
        src_sums,
        dst_serial,
    } = complete(&mut s, id, Duration::from_secs(120)).await?;
    ensure!(cp.bytes_done > 16 << 20, "guest memory moved: {cp:?}");

    // The destination's serial log starts after migration: the guest's counter goes on
    // from where it was, it does not boot again from 1.
    let after = wait_count_above(&dst_serial, before, Duration::from_secs(60)).await?;
    let first = first_count(&dst_serial).context("destination count")?;
    ensure!(
        first >= before,
        "counter restarted: first {first} < source's {before}"
    );
    check_memory_intact(&src_sums, &dst_serial).await?;
    // Found by UID and by name.
    let target = pod_ref(&s.target().pod);
    let moved = s.cb.describe_workload(target).await?.into_inner();
    ensure!(moved.kind == pb::WorkloadKind::VirtualMachine as i32);
    s.cb.describe_workload(pod("vm-dst")).await?;
    // The source pod is gone (its QMP refuses connections): its record is stale.
    let gone = s.ca.describe_workload(s.src_ref()).await;
    ensure!(
        gone.as_ref().err().map(|e| e.code()) == Some(tonic::Code::NotFound),
        "the source VM must be gone: {gone:?}"
    );
    ensure!(
        s.guest.dir.join(registry::RECORD).exists(),
        "the daemon removes nothing the launcher wrote"
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

/// `transfer.compress` and `transfer.bandwidthLimitMiBps` on a VM: QEMU's stream is
/// compressed through the pipe and decompressed into the target's QEMU (fewer bytes on
/// the wire than QEMU sent; the guest arrives intact and counts on), and QEMU is capped.
#[tokio::test]
async fn vm_moves_compressed_under_a_bandwidth_cap() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vsa", "vsb"), &[]).await?;
    const CAP: u64 = 8 << 20;
    s.transfer = Some(pb::TransferSpec {
        mode: pb::TransferMode::Direct as i32,
        compress: true,
        bandwidth_limit_bytes_per_sec: CAP,
        ..Default::default()
    });
    let id = "vm-shaped-1";
    start(&mut s, id, pb::Strategy::PreCopy, Target::AfterPrepare).await?;
    let moved = complete(&mut s, id, Duration::from_secs(180)).await?;
    let cp = &moved.checkpoint;
    ensure!(cp.bytes_done > 16 << 20, "guest memory moved: {cp:?}");
    ensure!(
        cp.wire_bytes > 0 && cp.wire_bytes < cp.bytes_done,
        "compressed: {} bytes on the wire for {} of QEMU's: {cp:?}",
        cp.wire_bytes,
        cp.bytes_done
    );
    // QEMU cannot have sent faster than the cap (a lower bound; its last pass after the
    // pause is not rate-limited, hence only half of bytes/cap).
    let floor_ms = cp.bytes_done * 1000 / CAP / 2;
    ensure!(
        cp.elapsed_ms >= floor_ms,
        "{} MiB in {} ms: faster than the {} MiB/s cap allows",
        cp.bytes_done >> 20,
        cp.elapsed_ms,
        CAP >> 20
    );
    let after = wait_count_above(&moved.dst_serial, moved.before, Duration::from_secs(60)).await?;
    check_memory_intact(&moved.src_sums, &moved.dst_serial).await?;
    println!(
        "VM compressed + capped at {} MiB/s: {} MiB from QEMU, {} MiB on the wire ({:.2}), \
         {} ms, downtime {} ms; count {} -> {after}",
        CAP >> 20,
        cp.bytes_done >> 20,
        cp.wire_bytes >> 20,
        cp.wire_bytes as f64 / cp.bytes_done as f64,
        cp.elapsed_ms,
        cp.downtime_ms,
        moved.before
    );
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
    start(&mut s, id, pb::Strategy::PreCopy, Target::BeforePrepare).await?;
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
    start(&mut s, id, pb::Strategy::PostCopy, Target::AfterPrepare).await?;
    let Moved {
        checkpoint: cp,
        before,
        src_sums,
        dst_serial,
    } = complete(&mut s, id, Duration::from_secs(180)).await?;
    // The operation's last message is the daemon's record of the switch.
    ensure!(
        cp.message.contains("switched to post-copy"),
        "the daemon must have switched: {cp:?}"
    );
    // The switch followed completed passes of a guest that rewrites its memory: QEMU
    // measured a dirty rate, and the operation reports it.
    ensure!(
        cp.dirty_bytes_per_sec > 0,
        "no dirty rate reported for a busy guest: {cp:?}"
    );
    wait_count_above(&dst_serial, before + 2, Duration::from_secs(60)).await?;
    // Post-copy: pages arrived on demand, and still the memory is what it was.
    check_memory_intact(&src_sums, &dst_serial).await?;
    println!(
        "stalled pre-copy → post-copy: downtime {} ms, total {} ms, dirty rate {} MiB/s",
        cp.downtime_ms,
        cp.elapsed_ms,
        cp.dirty_bytes_per_sec >> 20
    );
    Ok(())
}

/// The destination's QEMU dies mid-copy (memory stream throttled to 4 MB/s so the copy
/// is surely in flight): the source's checkpoint fails, abort leaves the source guest
/// running and counting, and the destination removes nothing of the target pod's.
#[tokio::test]
async fn destination_dying_mid_migration_leaves_the_source_running() -> Result<()> {
    destination_dies(("vdc", "vdd"), 1 << 20, Target::BeforePrepare).await
}

/// The destination's QEMU dies as soon as it registered, likely before it even
/// listens: the source, whose QEMU is already pushing into the pipe, must not block on
/// a pipe nobody reads. A short target wait bounds the destination's look for it.
#[tokio::test]
async fn destination_dying_before_it_listens_leaves_the_source_running() -> Result<()> {
    destination_dies(("vdk", "vdl"), 0, Target::AfterPrepare).await
}

async fn destination_dies(labels: (&str, &str), after_bytes: u64, target: Target) -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(
        labels,
        &[
            "--vm-max-bandwidth",
            "4000000",
            "--vm-target-wait-secs",
            "15",
        ],
    )
    .await?;
    let id = "vm-kill-1";
    start(&mut s, id, pb::Strategy::PreCopy, target).await?;
    let dst_dir = s.target().dir.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = op(&mut s.ca, id).await?;
        if o.bytes_done >= after_bytes && dst_dir.join(registry::RECORD).exists() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "migration never got going: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGKILL: a crash, not a kubelet stopping the pod.
    s.target.as_mut().expect("started").guard.kill();

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
    s.source_runs_on().await?;
    ensure!(
        dst_dir.join(registry::RECORD).exists(),
        "the destination daemon must not remove the target pod's files"
    );
    Ok(())
}

/// Abort while the copy runs (a deleted Migration): the source resumes; the destination
/// stops relaying and leaves the target pod to its kubelet.
#[tokio::test]
async fn abort_mid_migration_resumes_the_source() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vde", "vdf"), &["--vm-max-bandwidth", "4000000"]).await?;
    let id = "vm-abort-1";
    start(&mut s, id, pb::Strategy::PreCopy, Target::BeforePrepare).await?;
    s.copying(id).await?;
    let ab = s.ca.abort(mig(id)).await?.into_inner();
    ensure!(
        ab.state == pb::OperationState::Aborted as i32,
        "source abort: {ab:?}"
    );
    s.cb.abort(mig(id)).await?;
    s.source_runs_on().await?;
    ensure!(
        s.target().dir.join(registry::RECORD).exists(),
        "the destination daemon must not remove the target pod's files"
    );
    Ok(())
}

/// The source daemon crashes (SIGKILL) in the middle of a Cold move, whose guest it
/// paused, and comes back. Its memory of the migration is gone, the paused guest is
/// not: the controller's Abort must still resume it (from the daemon's record), or
/// nothing would run at all.
#[tokio::test]
async fn source_daemon_restarted_mid_cold_move_still_resumes_the_guest() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vdg", "vdh"), &["--vm-max-bandwidth", "4000000"]).await?;
    let id = "vm-crash-1";
    start(&mut s, id, pb::Strategy::Cold, Target::BeforePrepare).await?;
    s.copying(id).await?;
    let paused_at = last_count(&s.guest.serial()).unwrap_or(0);
    s.a.restart()?;
    s.ca = ferry_testkit::pki::control_client(&s.a.endpoint).await?;
    ensure!(
        s.ca.get_operation(mig(id)).await.is_err(),
        "a restarted daemon has no operation to report"
    );
    // What the controller does when the source lost its operation: abort both ends.
    s.cb.abort(mig(id)).await?;
    let ab = s.ca.abort(mig(id)).await?.into_inner();
    ensure!(
        ab.state == pb::OperationState::Aborted as i32 && ab.message.contains("previous run"),
        "the restarted source must abort what its previous run started: {ab:?}"
    );
    wait_count_above(&s.guest.serial(), paused_at + 2, Duration::from_secs(30))
        .await
        .context("the source guest did not run on after the abort")?;
    ensure!(!s.guest.guard.exited(), "source QEMU must keep running");
    // Done once: a second abort finds nothing, and the guest can be migrated again.
    let again = s.ca.abort(mig(id)).await?.into_inner();
    ensure!(
        again.message.contains("nothing to abort"),
        "second abort: {again:?}"
    );
    s.ca.describe_workload(s.src_ref()).await?;
    Ok(())
}

/// The destination daemon crashes (SIGKILL) mid pre-copy and comes back: the relay it
/// ran is gone, so the source's checkpoint fails; the restarted destination has nothing
/// to abort; the source's Abort resumes its guest, which never stopped counting.
#[tokio::test]
async fn destination_daemon_restarted_mid_copy_leaves_the_source_running() -> Result<()> {
    let _one = SERIAL.lock().await;
    let mut s = setup(("vdi", "vdj"), &["--vm-max-bandwidth", "4000000"]).await?;
    let id = "vm-crash-2";
    start(&mut s, id, pb::Strategy::PreCopy, Target::BeforePrepare).await?;
    s.copying(id).await?;
    s.b.restart()?;
    s.cb = ferry_testkit::pki::control_client(&s.b.endpoint).await?;
    let cp = wait_op(&mut s.ca, id, Duration::from_secs(60)).await?;
    ensure!(
        cp.state == pb::OperationState::Failed as i32,
        "the source's checkpoint must fail once its relay's far end is gone: {cp:?}"
    );
    // What the controller does on failure: abort both ends (the target Pod is then
    // deleted; here its launcher is simply left to exit).
    s.cb.abort(mig(id)).await?;
    let ab = s.ca.abort(mig(id)).await?.into_inner();
    ensure!(
        ab.state == pb::OperationState::Aborted as i32,
        "source abort: {ab:?}"
    );
    s.source_runs_on().await?;
    Ok(())
}

/// Writes a registry record as a launcher would and, with `listen`, holds its QMP
/// socket open the way a running QEMU does (no QEMU needed to be found).
fn fake_vm(
    vm_root: &Path,
    pod: &VmPod,
    incoming: bool,
    listen: bool,
) -> Result<Option<std::os::unix::net::UnixListener>> {
    let dir = vm_root.join(&pod.uid);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(registry::RECORD),
        serde_json::json!({"namespace": pod.namespace, "pod_name": pod.name, "pod_uid": pod.uid,
            "node_name": pod.node_name, "incoming": incoming, "migration_uid": pod.incoming,
            "spec": {"kernel": "/k", "initrd": null, "append": "", "memory_mib": 64, "vcpus": 1,
                     "accel": "tcg"}})
        .to_string(),
    )?;
    Ok(if listen {
        Some(std::os::unix::net::UnixListener::bind(
            dir.join(registry::QMP_SOCKET),
        )?)
    } else {
        None
    })
}

fn vm_description(name: &str) -> pb::WorkloadDescription {
    pb::WorkloadDescription {
        workload: Some(pod(name)),
        kind: pb::WorkloadKind::VirtualMachine as i32,
        memory_bytes: 64 << 20,
        runtime_spec:
            br#"{"kernel":"/k","initrd":null,"append":"","memory_mib":64,"vcpus":1,"accel":"tcg"}"#
                .to_vec(),
        runtime: "qemu".into(),
        ..Default::default()
    }
}

/// Bad requests for VMs are refused with a clear code before anything starts; records
/// of other nodes and stale records are not VMs; a target pod that never registers,
/// or boots instead of waiting, fails the restore with a message that says why.
#[tokio::test]
async fn vm_bad_input_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-node"));
    let d = Daemon::start_with(
        &lan,
        "vdx",
        tmp.path(),
        bin,
        &["--node-name", "vdx", "--vm-target-wait-secs", "2"],
    )?;
    let mut c = ferry_testkit::pki::control_client(&d.endpoint).await?;
    // A well-formed request for vm-x into vm-y; each case below changes one thing.
    let request = |id: &str| pb::PrepareReceiverRequest {
        migration_id: id.into(),
        workload: Some(vm_description("vm-x")),
        target: Some(pod("vm-y")),
        strategy: pb::Strategy::PreCopy as i32,
        source_peer: "10.0.0.1".into(),
        ..Default::default()
    };
    // A VM description without the guest spec cannot receive a guest.
    let e = c
        .prepare_receiver(pb::PrepareReceiverRequest {
            workload: Some(pb::WorkloadDescription {
                runtime_spec: b"{not json".to_vec(),
                ..vm_description("vm-x")
            }),
            ..request("bad-1")
        })
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    ensure!(e.message().contains("guest spec"), "{e:?}");
    // A target UID that could leave the VM root.
    let e = c
        .prepare_receiver(pb::PrepareReceiverRequest {
            target: Some(pb::WorkloadRef {
                pod_uid: "../../etc".into(),
                ..pod("vm-y")
            }),
            ..request("bad-3")
        })
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    // A VM does not move through a bucket: refused with the reason, not sent directly.
    let e = c
        .prepare_receiver(pb::PrepareReceiverRequest {
            transfer: Some(pb::TransferSpec {
                mode: pb::TransferMode::ObjectStore as i32,
                object_store: Some(pb::ObjectStore {
                    endpoint: "http://10.0.0.9:9000".into(),
                    bucket: "b".into(),
                    access_key_id: "k".into(),
                    secret_access_key: "s".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..request("bad-2")
        })
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::FailedPrecondition, "{e:?}");
    ensure!(e.message().contains("VMs move only directly"), "{e:?}");
    // ObjectStore without a bucket: the field is named.
    let e = c
        .prepare_receiver(pb::PrepareReceiverRequest {
            transfer: Some(pb::TransferSpec {
                mode: pb::TransferMode::ObjectStore as i32,
                ..Default::default()
            }),
            ..request("bad-4")
        })
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::InvalidArgument, "{e:?}");
    ensure!(e.message().contains("transfer.objectStore"), "{e:?}");
    // No VM registered for the pod: NotFound, naming the pod.
    let e = c
        .describe_workload(pod("no-such-vm"))
        .await
        .expect_err("must be refused");
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    ensure!(e.message().contains("no-such-vm"), "{e:?}");

    // A stale registration (nothing listens on its QMP socket) is not a VM.
    let stale = VmPod::new("default", "stale").on_node("vdx");
    fake_vm(&d.vm_root, &stale, false, false)?;
    let e = c
        .describe_workload(pod_ref(&stale))
        .await
        .expect_err("stale");
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    let e = c.describe_workload(pod("stale")).await.expect_err("stale");
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    // A live record of another node is not this daemon's; one of its own node is.
    let other = VmPod::new("default", "elsewhere").on_node("vdy");
    let _other_qmp = fake_vm(&d.vm_root, &other, false, true)?;
    let e = c
        .describe_workload(pod_ref(&other))
        .await
        .expect_err("other node");
    ensure!(e.code() == tonic::Code::NotFound, "{e:?}");
    let mine = VmPod::new("default", "mine").on_node("vdx");
    let _mine_qmp = fake_vm(&d.vm_root, &mine, false, true)?;
    let desc = c.describe_workload(pod("mine")).await?.into_inner();
    ensure!(
        desc.kind == pb::WorkloadKind::VirtualMachine as i32,
        "{desc:?}"
    );
    ensure!(
        desc.workload.as_ref().map(|w| w.pod_uid.as_str()) == Some(mine.uid.as_str()),
        "{desc:?}"
    );

    // No target launcher within the wait: the restore fails naming the pod and where
    // the daemon looked.
    let nobody = VmPod::new("default", "vm-nobody");
    restore_fails(
        &mut c,
        "bad-4",
        &nobody,
        &[&nobody.uid, "vm-nobody", "FERRY_INCOMING"],
    )
    .await?;
    // A target pod that booted its own guest (FERRY_INCOMING was empty).
    let booted = VmPod::new("default", "vm-booted").on_node("vdx");
    let _booted_qmp = fake_vm(&d.vm_root, &booted, false, true)?;
    restore_fails(
        &mut c,
        "bad-5",
        &booted,
        &["booted by itself", "ferry.dev/incoming=bad-5"],
    )
    .await?;
    // A target pod waiting for another migration.
    let other_mig = VmPod::new("default", "vm-other")
        .on_node("vdx")
        .incoming("m-0");
    let _other_mig_qmp = fake_vm(&d.vm_root, &other_mig, true, true)?;
    restore_fails(
        &mut c,
        "bad-6",
        &other_mig,
        &["waits for migration m-0, not bad-6"],
    )
    .await?;
    Ok(())
}

/// PrepareReceiver for `target` is accepted, and the restore fails with all of `words`.
async fn restore_fails(c: &mut Client, id: &str, target: &VmPod, words: &[&str]) -> Result<()> {
    c.prepare_receiver(pb::PrepareReceiverRequest {
        migration_id: id.into(),
        workload: Some(vm_description("vm-x")),
        target: Some(pod_ref(target)),
        strategy: pb::Strategy::PreCopy as i32,
        source_peer: "10.0.0.1".into(),
        ..Default::default()
    })
    .await?;
    c.start_restore(pb::StartRestoreRequest {
        migration_id: id.into(),
        target: Some(pod_ref(target)),
    })
    .await?;
    let rs = wait_op(c, id, Duration::from_secs(30)).await?;
    ensure!(
        rs.state == pb::OperationState::Failed as i32,
        "restore must fail: {rs:?}"
    );
    for w in words {
        ensure!(rs.message.contains(w), "{w:?} not in {:?}", rs.message);
    }
    c.abort(mig(id)).await?;
    Ok(())
}

/// The names testkit's pod manifest and launcher environment use are the registry's.
#[test]
fn testkit_uses_the_registry_env_names() {
    use ferry_testkit::guest::env;
    assert_eq!(env::VM_ROOT, registry::ENV_VM_ROOT);
    assert_eq!(env::POD_NAMESPACE, registry::ENV_POD_NAMESPACE);
    assert_eq!(env::POD_NAME, registry::ENV_POD_NAME);
    assert_eq!(env::POD_UID, registry::ENV_POD_UID);
    assert_eq!(env::NODE_NAME, registry::ENV_NODE_NAME);
    assert_eq!(env::INCOMING, registry::ENV_INCOMING);
    assert_eq!(env::INCOMING_ANNOTATION, registry::INCOMING_ANNOTATION);
    let pod = vm_pod_manifest("vm", 256, Path::new("/run/ferry/vms"));
    let names: Vec<&str> = pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for n in [
        registry::ENV_VM_ROOT,
        registry::ENV_POD_NAMESPACE,
        registry::ENV_POD_NAME,
        registry::ENV_POD_UID,
        registry::ENV_NODE_NAME,
        registry::ENV_INCOMING,
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/vm-pod.yaml"
    ))
    .expect("examples/vm-pod.yaml");
    for n in names {
        assert!(example.contains(n), "examples/vm-pod.yaml lacks {n}");
    }
    assert!(example.contains(registry::INCOMING_ANNOTATION));
}

/// The launcher image holds everything the launcher and QEMU need for the test guest:
/// its layer, unpacked and used as a chroot (TCG, no /proc, no /dev), boots the guest
/// and registers it the way a VM pod's container would.
#[tokio::test]
async fn launcher_image_runs_the_test_guest_chrooted() -> Result<()> {
    let _one = SERIAL.lock().await;
    let image = ferry_testkit::guest::launcher_image()?;
    let tmp = tempfile::tempdir()?;
    let (oci, rootfs) = (tmp.path().join("oci"), tmp.path().join("rootfs"));
    untar(&image, &oci)?;
    let blob = |digest: &str| {
        oci.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let json = |p: PathBuf| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(p)?)?)
    };
    let index = json(oci.join("index.json"))?;
    let manifest = json(blob(
        index["manifests"][0]["digest"].as_str().context("index")?,
    ))?;
    let layer = blob(
        manifest["layers"][0]["digest"]
            .as_str()
            .context("manifest")?,
    );
    untar(&layer, &rootfs)?;
    let guest_dir = ferry_testkit::guest::guest_dir()?;
    for f in ["vmlinuz", "initramfs.gz"] {
        std::fs::copy(guest_dir.join(f), rootfs.join("guest").join(f))?;
    }
    let pod = VmPod::new("default", "chrooted").on_node("n1");
    let mut cmd = std::process::Command::new("chroot");
    cmd.arg(&rootfs)
        .args(["/usr/bin/ferry-launcher", "--kernel", "/guest/vmlinuz"])
        .args([
            "--initrd",
            "/guest/initramfs.gz",
            "--memory-mib",
            "256",
            "--accel",
            "tcg",
        ])
        .envs(pod.env(Path::new("/run/ferry/vms")));
    let mut vm = ferry_testkit::process::ChildGuard::spawn("chrooted-launcher", cmd)?;
    let dir = rootfs.join("run/ferry/vms").join(&pod.uid);
    let counted = wait_count_above(&dir.join("serial.log"), 0, Duration::from_secs(90)).await;
    ensure!(
        !vm.exited(),
        "the launcher or QEMU exited in the image's rootfs"
    );
    counted?;
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(registry::RECORD))?)?;
    ensure!(
        rec["pod_uid"] == pod.uid.as_str() && rec["node_name"] == "n1",
        "{rec}"
    );
    ensure!(rec["incoming"] == false, "{rec}");
    vm.stop(Duration::from_secs(10));
    Ok(())
}

fn untar(archive: &Path, into: &Path) -> Result<()> {
    std::fs::create_dir_all(into)?;
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()?;
    ensure!(st.success(), "tar -xf {}: {st}", archive.display());
    Ok(())
}
