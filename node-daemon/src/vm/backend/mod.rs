//! The VM runtime: live migration of QEMU guests run by ferry-launcher in VM pods.
//!
//! Every copy of a guest is a kubelet-owned Pod: this daemon never starts, quits or
//! kills QEMU. It finds guests in the VM registry (`registry.rs`) and drives them over
//! QMP. Data path (the stream never touches the Kubernetes API or the controller):
//!
//! ```text
//! source QEMU --unix--> source daemon ==mTLS pipe==> dest daemon --unix--> dest QEMU
//!             <-------- return path (post-copy page requests) ---------
//! ```
//!
//! 1. destination (`dest.rs`; `prepare_receiver` → background task): wait, bounded, for the target
//!    pod's launcher (started by its kubelet with `FERRY_INCOMING` set) to register an
//!    incoming guest and answer on QMP; check it is the source's guest, configure it,
//!    `migrate-incoming unix:<dir>/in.sock`, report [`INCOMING_READY`], and splice the
//!    pipe from the source into it once it arrives; `restore_in` waits until the guest
//!    runs here.
//! 2. source (`source.rs`; `checkpoint_out`): open the ferry-transfer pipe `<id>/ram`
//!    to the destination while QEMU is configured, point QEMU's `migrate` at
//!    `<dir>/out.sock`, where this daemon listens, and splice that connection into the
//!    pipe (`relay.rs`); follow `query-migrate` into the progress stream until QEMU
//!    reports completed. The guest is then paused ("postmigrate") but still resumable
//!    until `finalize`.
//! 3. `finalize`: the source checks its guest is paused and forgets the migration; the
//!    controller deletes the source Pod and its kubelet's SIGTERM ends QEMU (quitting it
//!    here would make the kubelet restart the container: a freshly booted second copy).
//!    `abort`: the source cancels the migration (or resumes a paused guest); the
//!    destination stops its task and refuses the pipe, and the controller deletes the
//!    target Pod. Once post-copy has started the source no longer holds the whole guest,
//!    so abort refuses to resume it (see `abort_source`). The switch is the point of no
//!    return: `fence` (before a rollback) and the switch race on one `Handover`.
mod dest;
mod relay;
mod source;

use super::qemu::{ConvergencePolicy, MigrationTuning, QemuBackend, QemuError};
use super::record::Records;
use super::registry::{self, Found, Registry};
use crate::convert;
use crate::error::RuntimeError;
use crate::runtime::{
    CheckpointPlan, ProgressSink, ReceiverInfo, ReceiverPlan, Runtime, Stage, Strategy,
    StrategySupport, WorkloadDescription, WorkloadKind, WorkloadRef,
};
use crate::runtime::{Handover, Left};
use crate::transport::{self, Transport};
use crate::validate;
use dest::reject_pipe;
use ferry_transfer::Shaping;
use futures::future::{BoxFuture, FutureExt};
use relay::ram_pipe;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const QMP_WAIT: Duration = Duration::from_secs(20);
/// `query-migrate` polling: each poll is one small QMP round trip, and the interval
/// adds directly to the measured total time.
const POLL: Duration = Duration::from_millis(20);
/// How often the destination looks for the target pod's guest.
const TARGET_POLL: Duration = Duration::from_millis(100);

/// How long the relay may take to pass the end of QEMU's stream on after QEMU finished.
const RELAY_DRAIN: Duration = Duration::from_secs(60);

/// QMP reconnects tolerated per migration step before the error counts.
const MAX_RECONNECTS: u32 = 3;

/// Longest a migration may run here; the controller's own timeouts normally end it
/// (by Abort) much earlier.
const FOLLOW_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The destination's progress message once its incoming QEMU listens.
pub const INCOMING_READY: &str = "incoming guest ready";

pub struct VmConfig {
    /// Where launchers register their guests (see `registry.rs`), the same path inside
    /// the VM pods as here.
    pub vm_root: PathBuf,
    /// This node's name: records of other nodes are not claimed. `None`: any record.
    pub node_name: Option<String>,
    /// How long the destination waits for the target pod's incoming guest.
    pub target_wait: Duration,
    /// Applied to every outgoing migration (max-bandwidth is always explicit).
    pub tuning: MigrationTuning,
    /// The daemon's own directory for records of outgoing migrations (`record.rs`).
    pub state_dir: PathBuf,
}

impl VmConfig {
    /// The kubelet pulls the image and starts the container first; 2 minutes covers a
    /// slow pull of the launcher image and QEMU's start.
    pub const DEFAULT_TARGET_WAIT: Duration = Duration::from_secs(120);
}

/// What the destination's background task has reached.
#[derive(Clone)]
enum DestPhase {
    Waiting,
    /// The incoming QEMU listens and the pipe from the source is spliced into it.
    Incoming {
        qemu: Arc<QemuBackend>,
        qmp: PathBuf,
    },
    Failed(String),
}

enum VmMigration {
    /// The source guest's registry directory (`<root>/<pod-uid>`) and its point of no
    /// return (the post-copy switch).
    Source {
        dir: PathBuf,
        handover: Arc<Handover>,
    },
    Dest {
        phase: watch::Receiver<DestPhase>,
        task: tokio::task::JoinHandle<()>,
    },
}

pub struct VmRuntime {
    registry: Registry,
    target_wait: Duration,
    tuning: MigrationTuning,
    transport: Arc<Transport>,
    migrations: Mutex<HashMap<String, VmMigration>>,
    records: Records,
}

fn qemu_err(e: QemuError) -> RuntimeError {
    match e {
        QemuError::Connect { .. } => RuntimeError::FailedPrecondition(e.to_string()),
        e => RuntimeError::Transfer(e.to_string()),
    }
}

impl VmRuntime {
    pub fn new(cfg: VmConfig, transport: Arc<Transport>) -> VmRuntime {
        let records = Records::new(cfg.state_dir.join("vm-out"));
        // Sources a previous run of this daemon left mid-migration: their guests run
        // (or wait, paused) in their Pods; Abort or Finalize still reach them.
        let migrations = records
            .load()
            .into_iter()
            .map(|(id, r)| {
                tracing::warn!(migration_id = %id, dir = %r.dir.display(), resumable = r.resumable,
                    "recovered an outgoing VM migration from before a restart: abort resumes the guest, finalize leaves it");
                let handover = Arc::new(Handover::recovered(r.resumable));
                (id, VmMigration::Source { dir: r.dir, handover })
            })
            .collect();
        VmRuntime {
            registry: Registry::new(cfg.vm_root, cfg.node_name),
            target_wait: cfg.target_wait,
            tuning: cfg.tuning,
            transport,
            migrations: Mutex::new(migrations),
            records,
        }
    }

    /// A failed finalize or abort on the source leaves its entry in place, so that the
    /// controller's retry finds the paused guest again.
    fn put_back_source(&self, migration_id: &str, dir: PathBuf, handover: Arc<Handover>) {
        self.migrations.lock().unwrap().insert(
            migration_id.to_string(),
            VmMigration::Source { dir, handover },
        );
    }

    async fn find(&self, w: &WorkloadRef) -> Result<Option<Found>, RuntimeError> {
        self.registry
            .find(w)
            .await
            .map_err(RuntimeError::io("reading the VM registry"))
    }

    async fn find_running(&self, w: &WorkloadRef) -> Result<Found, RuntimeError> {
        self.find(w)
            .await?
            .ok_or_else(|| RuntimeError::NotFound(format!("no running VM for pod {w}")))
    }

    /// `<dir>/<name>` in a guest's directory, for creating or removing `name`: inside
    /// the VM root, in a real directory ([`registry::file_in`]).
    fn own_file(&self, dir: &Path, name: &str) -> Result<PathBuf, RuntimeError> {
        registry::file_in(self.registry.root(), dir, name)
            .map_err(|e| RuntimeError::FailedPrecondition(format!("VM registry: {e}")))
    }

    /// Both ends configure the same tuning (capabilities must match). Live pre-copy
    /// that stalls throttles the guest (auto-converge), which keeps the whole guest at
    /// the source until the end, so rollback stays possible; `PostCopy` (a Migration
    /// that allows it) switches to post-copy instead, which ends any stall but leaves no
    /// way back once switched.
    /// A bandwidth cap (`transfer.bandwidthLimitMiBps`) lowers QEMU's own limits, for
    /// pre-copy and post-copy's background push alike.
    fn tuning_for(&self, strategy: Strategy, shaping: &Shaping) -> MigrationTuning {
        let policy = match strategy {
            Strategy::Cold => ConvergencePolicy::None,
            Strategy::PreCopy => ConvergencePolicy::AutoConverge,
            Strategy::PostCopy => ConvergencePolicy::PostCopy,
        };
        let mut t = MigrationTuning {
            postcopy_ram: policy.needs_postcopy_ram(),
            policy,
            ..self.tuning.clone()
        };
        if let Some(cap) = shaping.pacer.as_ref().map(|p| p.bytes_per_sec()) {
            t.max_bandwidth = t.max_bandwidth.min(cap);
            t.max_postcopy_bandwidth = Some(t.max_postcopy_bandwidth.map_or(cap, |b| b.min(cap)));
        }
        t
    }
}

/// A QMP connection is only the control channel: when it drops while QEMU lives (seen
/// rarely under load as "QAPI stream disconnected"), connect again instead of failing a
/// migration that QEMU is still carrying out. QEMU itself gone: `None`.
async fn reconnect(qmp_socket: &Path) -> Option<QemuBackend> {
    match QemuBackend::connect(qmp_socket, Duration::from_secs(3)).await {
        Ok(q) => {
            tracing::warn!(socket = %qmp_socket.display(), "QMP connection dropped; reconnected");
            Some(q)
        }
        Err(e) => {
            tracing::warn!(error = %e, "QMP connection dropped and QEMU is gone");
            None
        }
    }
}

/// A VM moves only directly: through a bucket its guest would stay paused for the
/// whole upload and download (QEMU's live migration needs its stream to reach the
/// other QEMU as it goes), which is a long outage, not a migration.
fn no_bucket(bucket: Option<&ferry_transfer::S3Config>) -> Result<(), RuntimeError> {
    match bucket {
        None => Ok(()),
        Some(_) => Err(RuntimeError::FailedPrecondition(
            "VMs move only directly between node daemons (transfer.mode Direct): through a \
             bucket the guest would be paused for the whole upload and download"
                .into(),
        )),
    }
}

/// The request data this runtime builds paths and stream names from, checked here too
/// (the gRPC layer already did, in `convert`): the migration id names the `<id>.ram`
/// pipe, the pod's UID its directory under the VM root.
fn check_plan(migration_id: &str, w: &WorkloadRef, what: &str) -> Result<(), RuntimeError> {
    convert::migration_id(migration_id)?;
    convert::check_workload_ref(w, what)
}

fn postcopy_support() -> StrategySupport {
    // QEMU's post-copy needs userfaultfd on the destination.
    let uffd = Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists()
        || Path::new("/dev/userfaultfd").exists();
    StrategySupport {
        strategy: Strategy::PostCopy,
        available: uffd,
        reason: if uffd {
            String::new()
        } else {
            "the kernel has no userfaultfd, which QEMU post-copy needs".into()
        },
    }
}

impl Runtime for VmRuntime {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn strategies(&self) -> Vec<StrategySupport> {
        let ok = |strategy| StrategySupport {
            strategy,
            available: true,
            reason: String::new(),
        };
        vec![
            ok(Strategy::Cold),
            ok(Strategy::PreCopy),
            postcopy_support(),
        ]
    }

    fn describe<'a>(
        &'a self,
        workload: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<Option<WorkloadDescription>, RuntimeError>> {
        async move {
            Ok(self.find(workload).await?.map(|f| WorkloadDescription {
                workload: f.rec.workload(),
                kind: WorkloadKind::VirtualMachine,
                runtime: self.name().to_string(),
                containers: Vec::new(),
                memory_bytes: u64::from(f.rec.spec.memory_mib) << 20,
                runtime_spec: serde_json::to_vec(&f.rec.spec).expect("spec serializes"),
            }))
        }
        .boxed()
    }

    fn prepare_receiver(
        &self,
        plan: ReceiverPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<ReceiverInfo, RuntimeError>> {
        async move {
            progress.stage(
                Stage::Prepared,
                format!("waiting for the guest of target pod {}", plan.target),
            );
            self.prepare(plan, progress)
        }
        .boxed()
    }

    fn check_checkpoint<'a>(
        &'a self,
        plan: &'a CheckpointPlan,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            no_bucket(plan.bucket.as_ref())?;
            check_plan(&plan.migration_id, &plan.workload, "workload")?;
            validate::endpoint("receive_endpoint", &plan.receive_endpoint)
                .map_err(RuntimeError::InvalidArgument)?;
            transport::peer(&plan.receive_endpoint, &plan.token)?;
            let found = self.find_running(&plan.workload).await?;
            let q = QemuBackend::connect(&found.qmp(), Duration::from_secs(5))
                .await
                .map_err(qemu_err)?;
            let state = q.run_state().await.map_err(qemu_err)?;
            let status = q.progress().await.map_err(qemu_err)?.status;
            if state != "running"
                || !matches!(
                    status.as_str(),
                    "none" | "completed" | "failed" | "cancelled"
                )
            {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "VM of pod {} is {state} (migration status {status}); nothing was changed",
                    plan.workload
                )));
            }
            Ok(())
        }
        .boxed()
    }

    fn checkpoint_out(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        self.checkpoint(plan, progress).boxed()
    }

    fn restore_in<'a>(
        &'a self,
        migration_id: &'a str,
        _target: &'a WorkloadRef,
        progress: ProgressSink,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.restore(migration_id, progress).boxed()
    }

    fn finalize<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let m = self.migrations.lock().unwrap().remove(migration_id);
            match m {
                Some(VmMigration::Source { dir, handover }) => {
                    let r = self.finalize_source(&dir).await;
                    if r.is_err() {
                        self.put_back_source(migration_id, dir, handover);
                    }
                    r?;
                    self.records.remove(migration_id);
                }
                // The guest runs on in the target Pod; only the relay ends.
                Some(VmMigration::Dest { task, .. }) => task.abort(),
                None => {}
            }
            Ok(())
        }
        .boxed()
    }

    fn knows(&self, migration_id: &str) -> bool {
        self.migrations.lock().unwrap().contains_key(migration_id)
    }

    fn fence<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<bool, RuntimeError>> {
        async move {
            Ok(match self.migrations.lock().unwrap().get(migration_id) {
                Some(VmMigration::Source { handover, .. }) => handover.fence(),
                _ => false,
            })
        }
        .boxed()
    }

    /// Always [`Left::MayRun`]: a destination's guest is its launcher's, which the
    /// controller ends by deleting the target Pod.
    fn abort<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<Left, RuntimeError>> {
        async move {
            let m = self.migrations.lock().unwrap().remove(migration_id);
            match m {
                Some(VmMigration::Source { dir, handover }) => {
                    let r = self.abort_source(&dir).await;
                    if r.is_err() {
                        self.put_back_source(migration_id, dir, handover);
                    } else {
                        self.records.remove(migration_id);
                    }
                    r.map(|()| Left::MayRun)
                }
                // Nothing here to remove or kill: the target Pod's guest is its
                // kubelet's, and the controller deletes that Pod.
                Some(VmMigration::Dest { task, .. }) => {
                    task.abort();
                    reject_pipe(&self.transport, &ram_pipe(migration_id));
                    Ok(Left::MayRun)
                }
                None => Ok(Left::MayRun),
            }
        }
        .boxed()
    }
}
