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
//! 1. destination (`prepare_receiver` → background task): wait, bounded, for the target
//!    pod's launcher (started by its kubelet with `FERRY_INCOMING` set) to register an
//!    incoming guest and answer on QMP; check it is the source's guest, configure it,
//!    `migrate-incoming unix:<dir>/in.sock`, report [`INCOMING_READY`], and splice the
//!    pipe from the source into it once it arrives; `restore_in` waits until the guest
//!    runs here.
//! 2. source (`checkpoint_out`): point QEMU's `migrate` at `<dir>/out.sock`, where this
//!    daemon listens, and splice that connection into a ferry-transfer pipe `<id>.ram`
//!    to the destination; follow `query-migrate` into the progress stream until QEMU
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
use super::launcher::GuestSpec;
use super::qemu::{ConvergencePolicy, MigrationTuning, QemuBackend, QemuError, Switch};
use super::record::{Records, SourceRecord};
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
use ferry_transfer::{Moved, Shaping};
use futures::future::{BoxFuture, FutureExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
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

    // ---- source ----

    async fn checkpoint(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        check_plan(&plan.migration_id, &plan.workload, "workload")?;
        let found = self.find_running(&plan.workload).await?;
        let qmp = found.qmp();
        let sock = self.own_file(&found.dir, registry::OUTGOING_SOCKET)?;
        let handover = Arc::new(Handover::default());
        let record = |resumable| SourceRecord {
            dir: found.dir.clone(),
            resumable,
        };
        // On disk before QEMU is touched: whatever happens to this daemon from here on,
        // its next run can still resume or end this source.
        self.records
            .write(&plan.migration_id, &record(true))
            .map_err(RuntimeError::io("recording the outgoing migration"))?;
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            VmMigration::Source {
                dir: found.dir.clone(),
                handover: handover.clone(),
            },
        );
        let ep = transport::peer(&plan.receive_endpoint, &plan.token)?;

        // QEMU migrates into a socket in its pod's directory, which this daemon forwards.
        let q = QemuBackend::connect(&qmp, QMP_WAIT)
            .await
            .map_err(qemu_err)?;
        let tuning = self.tuning_for(plan.strategy, &plan.shaping);
        q.configure(&tuning).await.map_err(qemu_err)?;
        let sock = OwnedSocket(sock);
        let _ = std::fs::remove_file(&sock.0);
        let listener = UnixListener::bind(&sock.0)
            .map_err(RuntimeError::io("binding the migration socket"))?;
        if plan.strategy == Strategy::Cold {
            q.stop().await.map_err(qemu_err)?;
        }
        progress.stage(Stage::Transferring, "migrating guest memory");
        if let Err(e) = q.migrate(&format!("unix:{}", sock.0.display())).await {
            self.resume_if_paused(&q).await;
            return Err(qemu_err(e));
        }
        let forward = async {
            let (conn, _) = tokio::time::timeout(QMP_WAIT, listener.accept())
                .await
                .map_err(|_| {
                    RuntimeError::Transfer("QEMU did not connect to the migration socket".into())
                })?
                .map_err(RuntimeError::io("accepting QEMU's migration connection"))?;
            // One connection (no multifd): the socket has served its purpose.
            drop(listener);
            drop(sock);
            let pipe = self
                .transport
                .sender
                .connect_pipe(&ep, &ram_pipe(&plan.migration_id), &Default::default())
                .await
                .map_err(|e| RuntimeError::Transfer(e.to_string()))?;
            Ok::<_, RuntimeError>(splice(conn, pipe, &plan.shaping))
        };
        let relay = match forward.await {
            Ok(t) => t,
            Err(e) => {
                let _ = q.migrate_cancel().await;
                self.resume_if_paused(&q).await;
                return Err(e);
            }
        };

        // Follow QEMU until it is done; it resumes the guest by itself on failure.
        let mut announced = None;
        let mut q = q;
        let mut reconnects = 0;
        let result = loop {
            let may_switch = |s: Switch| {
                if s != Switch::PostCopy {
                    return true;
                }
                // The destination will hold part of the guest's memory from here on.
                let ok = handover.commit();
                if ok {
                    progress.committed();
                    if let Err(e) = self.records.write(&plan.migration_id, &record(false)) {
                        // A restart would then offer a resume the guest cannot do; the
                        // abort itself still refuses (QEMU reports post-copy).
                        tracing::error!(error = %e, "recording the post-copy switch");
                    }
                }
                ok
            };
            let r = q
                .follow_guarded(&tuning, POLL, FOLLOW_LIMIT, may_switch, |p| {
                    progress.set_bytes(p.transferred_bytes, p.total_bytes);
                    progress.set_dirty_rate(p.dirty_bytes_per_sec());
                    if p.switched_to.is_some() && announced != p.switched_to {
                        announced = p.switched_to;
                        let to = p.switched_to.map(|s| s.as_str()).unwrap_or_default();
                        tracing::info!(switch = to, "pre-copy did not converge");
                        progress.stage(
                            Stage::Transferring,
                            format!("pre-copy did not converge; switched to {to}"),
                        );
                    }
                })
                .await;
            match r {
                Err(QemuError::Command { .. }) if reconnects < MAX_RECONNECTS => {
                    reconnects += 1;
                    match reconnect(&qmp).await {
                        Some(again) => q = again,
                        None => break r.map_err(qemu_err),
                    }
                }
                r => break r.map_err(qemu_err),
            }
        };
        // QEMU calls the migration complete once the last byte is in *our* socket: it
        // still has to cross the relay before the destination has the whole guest.
        let result = match result {
            Ok(p) => {
                let drained = tokio::time::timeout(RELAY_DRAIN, relay.outbound).await;
                relay.inbound.abort();
                let why = match drained {
                    Ok(Ok(Ok(moved))) => {
                        progress.add_wire_bytes(moved.wire);
                        None
                    }
                    Ok(Ok(Err(e))) => Some(e.to_string()),
                    _ => Some(format!("not done within {RELAY_DRAIN:?}")),
                };
                if let Some(why) = why {
                    // Not resumed here: the destination may hold a whole guest after
                    // all. The controller's rollback removes the target first, then
                    // resumes this paused source (Abort).
                    return Err(RuntimeError::Transfer(format!(
                        "QEMU finished, but relaying the end of its stream to the \
                         destination failed: {why}"
                    )));
                }
                Ok(p)
            }
            Err(e) => {
                relay.outbound.abort();
                relay.inbound.abort();
                Err(e)
            }
        };
        match result {
            Ok(p) => {
                progress.downtime_ms(p.downtime_ms.unwrap_or(0));
                // Zero pages are never sent, so what was sent is the whole.
                progress.set_bytes(p.transferred_bytes, p.transferred_bytes);
                tracing::info!(
                    downtime_ms = p.downtime_ms,
                    total_ms = p.total_time_ms,
                    bytes = p.transferred_bytes,
                    postcopy_bytes = p.postcopy_bytes,
                    "guest migrated; source paused until finalize"
                );
                Ok(())
            }
            Err(e) if announced == Some(Switch::PostCopy) => {
                // The guest's memory is split between both ends: resuming the source
                // would run a guest with holes. Say so; the controller must not expect
                // a rollback.
                Err(RuntimeError::FailedPrecondition(format!(
                    "post-copy broke after the switch ({e}); the source cannot resume"
                )))
            }
            Err(e) => {
                self.resume_if_paused(&q).await;
                Err(e)
            }
        }
    }

    /// After a failed or cancelled migration a cold (stopped) guest stays paused.
    async fn resume_if_paused(&self, q: &QemuBackend) {
        if let Ok(state) = q.run_state().await
            && matches!(state.as_str(), "paused" | "postmigrate")
            && let Err(e) = q.cont().await
        {
            tracing::error!(error = %e, "could not resume the source guest");
        }
    }

    async fn abort_source(&self, dir: &Path) -> Result<(), RuntimeError> {
        let q = QemuBackend::connect(&dir.join(registry::QMP_SOCKET), QMP_WAIT)
            .await
            .map_err(qemu_err)?;
        let p = q.progress().await.map_err(qemu_err)?;
        if p.status.starts_with("postcopy") {
            return Err(RuntimeError::FailedPrecondition(format!(
                "post-copy already started ({}): the destination holds part of the guest's \
                 memory, so the source cannot resume; the destination must finish",
                p.status
            )));
        }
        if matches!(
            p.status.as_str(),
            "active" | "setup" | "pre-switchover" | "device"
        ) {
            q.migrate_cancel().await.map_err(qemu_err)?;
            for _ in 0..200 {
                if q.progress().await.map_err(qemu_err)?.is_finished() {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        self.resume_if_paused(&q).await;
        let state = q.run_state().await.map_err(qemu_err)?;
        if state != "running" {
            return Err(RuntimeError::FailedPrecondition(format!(
                "source guest is {state} after abort, not running"
            )));
        }
        if let Ok(sock) = self.own_file(dir, registry::OUTGOING_SOCKET) {
            let _ = std::fs::remove_file(sock);
        }
        Ok(())
    }

    /// The source stays paused until its Pod is deleted: its kubelet ends QEMU. A guest
    /// already gone (the Pod deleted before a retried finalize) is fine.
    async fn finalize_source(&self, dir: &Path) -> Result<(), RuntimeError> {
        if let Ok(sock) = self.own_file(dir, registry::OUTGOING_SOCKET) {
            let _ = std::fs::remove_file(sock);
        }
        let qmp = dir.join(registry::QMP_SOCKET);
        if !registry::listening(&qmp)
            .await
            .map_err(RuntimeError::io("checking the source guest"))?
        {
            return Ok(());
        }
        // The source pod's deletion may end QEMU while we ask: gone is finalized. QEMU
        // serves one QMP client at a time, so while its launcher holds the monitor to
        // quit it, our connection waits for a greeting (up to QMP_WAIT): the socket
        // going away wins that race.
        let ask = async {
            match QemuBackend::connect(&qmp, QMP_WAIT).await {
                Ok(q) => q.run_state().await,
                Err(e) => Err(e),
            }
        };
        let gone = async {
            while registry::listening(&qmp).await.unwrap_or(true) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let state = tokio::select! {
            state = ask => state,
            () = gone => return Ok(()),
        };
        let state = match state {
            Ok(s) => s,
            Err(_) if !registry::listening(&qmp).await.unwrap_or(true) => return Ok(()),
            Err(e) => return Err(qemu_err(e)),
        };
        match state.as_str() {
            "postmigrate" => Ok(()),
            "running" => Err(RuntimeError::FailedPrecondition(
                "the source guest is running again: two copies may run; \
                 the migration cannot be finalized"
                    .into(),
            )),
            state => Err(RuntimeError::FailedPrecondition(format!(
                "the source guest is {state}, not paused after a completed migration \
                 (postmigrate)"
            ))),
        }
    }

    // ---- destination ----

    fn prepare(
        &self,
        plan: ReceiverPlan,
        progress: ProgressSink,
    ) -> Result<ReceiverInfo, RuntimeError> {
        no_bucket(plan.bucket.as_ref())?;
        let spec: GuestSpec = serde_json::from_slice(&plan.workload.runtime_spec).map_err(|e| {
            RuntimeError::InvalidArgument(format!(
                "the VM's description carries no usable guest spec (runtime_spec: {e}); \
                 describe the source with a ferry-node of the same version"
            ))
        })?;
        check_plan(&plan.migration_id, &plan.target, "target")?;
        if !plan.target.pod_uid.is_empty() {
            registry::dir_for(self.registry.root(), &plan.target.pod_uid)
                .map_err(|e| RuntimeError::InvalidArgument(format!("target: {e}")))?;
        }
        let (tx, rx) = watch::channel(DestPhase::Waiting);
        let incoming = Incoming {
            transport: self.transport.clone(),
            registry: self.registry.clone(),
            wait: self.target_wait,
            tuning: self.tuning_for(plan.strategy, &plan.shaping),
            shaping: plan.shaping.clone(),
            migration_id: plan.migration_id.clone(),
            target: plan.target,
            source_spec: spec,
            progress,
        };
        let (transport, pipe_id) = (self.transport.clone(), ram_pipe(&plan.migration_id));
        let task = tokio::spawn(async move {
            let (phase, relay) = match incoming.run().await {
                Ok((qemu, qmp, relay)) => (
                    DestPhase::Incoming {
                        qemu: Arc::new(qemu),
                        qmp,
                    },
                    Some(relay),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "incoming VM setup failed");
                    // Close the source's pipe (parked or still to come) so that its
                    // QEMU sees the failure instead of blocking on a full buffer.
                    reject_pipe(&transport, &pipe_id);
                    (DestPhase::Failed(e.to_string()), None)
                }
            };
            let _ = tx.send(phase);
            // Keep the sender (and so the phase) and the relay alive until the migration
            // is dropped: aborting this task stops the relay.
            let _relay = relay.map(StopOnDrop);
            std::future::pending::<()>().await;
        });
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            VmMigration::Dest { phase: rx, task },
        );
        Ok(ReceiverInfo {
            receive_endpoint: self.transport.endpoint(),
            page_servers: Vec::new(),
            token: plan.token.clone(),
        })
    }

    async fn restore(
        &self,
        migration_id: &str,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let mut phase = match self.migrations.lock().unwrap().get(migration_id) {
            Some(VmMigration::Dest { phase, .. }) => phase.clone(),
            _ => {
                return Err(RuntimeError::NotFound(format!(
                    "migration {migration_id} has no VM receiver here"
                )));
            }
        };
        progress.stage(Stage::Transferring, "waiting for the guest's memory");
        let (mut q, qmp) = loop {
            match phase.borrow_and_update().clone() {
                DestPhase::Incoming { qemu, qmp } => break (qemu, qmp),
                DestPhase::Failed(e) => return Err(RuntimeError::Transfer(e)),
                DestPhase::Waiting => {}
            }
            phase
                .changed()
                .await
                .map_err(|_| RuntimeError::Aborted("receiver dropped".into()))?;
        };
        // The incoming side reports its status too; the guest runs once it completes
        // (during post-copy it already runs while pages still arrive).
        let mut reconnects = 0;
        loop {
            let p = match q.progress().await {
                Ok(p) => p,
                Err(e @ QemuError::Command { .. }) if reconnects < MAX_RECONNECTS => {
                    reconnects += 1;
                    match reconnect(&qmp).await {
                        Some(again) => {
                            q = Arc::new(again);
                            continue;
                        }
                        None => return Err(qemu_err(e)),
                    }
                }
                Err(e) => return Err(qemu_err(e)),
            };
            match p.status.as_str() {
                "failed" | "cancelled" => {
                    return Err(RuntimeError::Transfer(format!(
                        "incoming migration {}: {}",
                        p.status,
                        p.error.unwrap_or_default()
                    )));
                }
                "completed" => {
                    let state = q.run_state().await.map_err(qemu_err)?;
                    if state == "running" {
                        progress.stage(Stage::Restoring, "guest running here");
                        return Ok(());
                    }
                    // A guest stopped at the source (Cold) arrives paused: the whole
                    // guest is here and the source stays stopped, so run it here.
                    if state == "paused" {
                        q.cont().await.map_err(qemu_err)?;
                    }
                }
                _ => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A socket file this daemon created; removed when dropped.
struct OwnedSocket(PathBuf);

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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

/// The request data this runtime builds paths and stream names from, checked here too
/// (the gRPC layer already did, in `convert`): the migration id names the `<id>.ram`
/// pipe, the pod's UID its directory under the VM root.
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

fn check_plan(migration_id: &str, w: &WorkloadRef, what: &str) -> Result<(), RuntimeError> {
    convert::migration_id(migration_id)?;
    convert::check_workload_ref(w, what)
}

fn ram_pipe(migration_id: &str) -> String {
    // Under the migration's scope: only its granted source may open it.
    format!("{migration_id}/ram")
}

/// Takes the pipe `id` if a source connected (or connects within a while) and closes
/// it: an unaccepted pipe would otherwise be parked in the receiver, and the source
/// would block once the connection's buffers fill.
fn reject_pipe(transport: &Arc<Transport>, id: &str) {
    let (transport, id) = (transport.clone(), id.to_string());
    tokio::spawn(async move {
        let wait = Duration::from_secs(30);
        if let Ok(Ok(pipe)) = tokio::time::timeout(wait, transport.receiver.accept_pipe(&id)).await
        {
            tracing::debug!(%id, "closing the pipe of a failed incoming migration");
            drop(pipe);
        }
    });
}

/// Copies both ways until either side closes (the return path carries post-copy page
/// requests back to the source).
struct Relay {
    /// QEMU's socket → pipe; done once QEMU closed its side and every byte was flushed
    /// into the pipe and the pipe shut down.
    outbound: tokio::task::JoinHandle<std::io::Result<Moved>>,
    /// Pipe → QEMU's socket (the return path, or the incoming stream on the destination).
    inbound: tokio::task::JoinHandle<std::io::Result<Moved>>,
}

/// The destination's relay, stopped with the migration's task.
struct StopOnDrop(Relay);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.outbound.abort();
        self.0.inbound.abort();
    }
}

/// Relays a migration stream between a QEMU socket and a transfer pipe, both ways,
/// compressed as the migration says. Not paced here: QEMU paces its own stream
/// (`tuning_for` caps its max-bandwidth), and knowing the rate is how it plans the
/// downtime.
fn splice(qemu: UnixStream, pipe: ferry_transfer::Pipe, shaping: &Shaping) -> Relay {
    let (qemu_r, qemu_w) = qemu.into_split();
    let (pipe_r, pipe_w) = tokio::io::split(pipe);
    let shaping = Shaping {
        pacer: None,
        ..shaping.clone()
    };
    let (out, inn) = (shaping.clone(), shaping);
    Relay {
        outbound: tokio::spawn(async move {
            let m = ferry_transfer::into_pipe(qemu_r, pipe_w, &out).await?;
            tracing::debug!(moved = ?m, "migration stream sent");
            Ok(m)
        }),
        inbound: tokio::spawn(async move {
            let m = ferry_transfer::out_of_pipe(pipe_r, qemu_w, &inn).await?;
            tracing::debug!(moved = ?m, "migration stream received");
            Ok(m)
        }),
    }
}

/// Everything the destination's background task needs.
struct Incoming {
    transport: Arc<Transport>,
    registry: Registry,
    wait: Duration,
    tuning: MigrationTuning,
    shaping: Shaping,
    migration_id: String,
    target: WorkloadRef,
    source_spec: GuestSpec,
    progress: ProgressSink,
}

impl Incoming {
    async fn run(self) -> Result<(QemuBackend, PathBuf, Relay), RuntimeError> {
        let found = self.wait_for_target().await?;
        let qmp = found.qmp();
        let q = QemuBackend::connect(&qmp, QMP_WAIT)
            .await
            .map_err(qemu_err)?;
        let state = q.run_state().await.map_err(qemu_err)?;
        if state != "inmigrate" {
            return Err(RuntimeError::FailedPrecondition(format!(
                "the guest of target pod {} is {state}, not waiting for an incoming migration",
                self.target
            )));
        }
        if let Some(why) = self.source_spec.mismatch(&found.rec.spec) {
            return Err(RuntimeError::FailedPrecondition(format!(
                "the guest of target pod {} is not the source's guest: {why}",
                self.target
            )));
        }
        q.configure(&self.tuning).await.map_err(qemu_err)?;
        // QEMU (in the pod) creates it; the daemon reaches it through the shared VM root.
        let sock = registry::under(
            self.registry.root(),
            found.dir.join(registry::INCOMING_SOCKET),
        )
        .map_err(|e| RuntimeError::FailedPrecondition(format!("VM registry: {e}")))?;
        q.migrate_incoming(&format!("unix:{}", sock.display()))
            .await
            .map_err(qemu_err)?;
        self.progress.stage(Stage::Prepared, INCOMING_READY);
        let pipe = self
            .transport
            .receiver
            .accept_pipe(&ram_pipe(&self.migration_id))
            .await
            .map_err(|e| RuntimeError::Transfer(e.to_string()))?;
        let conn = UnixStream::connect(&sock)
            .await
            .map_err(RuntimeError::io("connecting to the incoming QEMU"))?;
        // Runs until QEMU or the source closes; QEMU's own status says how it went.
        Ok((q, qmp, splice(conn, pipe, &self.shaping)))
    }

    /// The target pod's kubelet starts its launcher whenever it gets to it, before or
    /// after this call; wait for it, bounded.
    async fn wait_for_target(&self) -> Result<Found, RuntimeError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let where_ = if self.target.pod_uid.is_empty() {
            self.registry.root().display().to_string()
        } else {
            registry::dir_for(self.registry.root(), &self.target.pod_uid)
                .map_err(|e| RuntimeError::InvalidArgument(format!("target: {e}")))?
                .display()
                .to_string()
        };
        let io =
            |e: std::io::Error| RuntimeError::io(format!("reading the VM registry at {where_}"))(e);
        let mut last = String::from("nothing registered");
        loop {
            let seen = if self.target.pod_uid.is_empty() {
                self.registry
                    .find(&self.target)
                    .await
                    .map_err(io)?
                    .ok_or(None)
            } else {
                self.registry
                    .probe(&self.target)
                    .await
                    .map_err(io)?
                    .map_err(|m| Some(m.to_string()))
            };
            match seen {
                Ok(found) if !found.rec.incoming => {
                    return Err(RuntimeError::FailedPrecondition(format!(
                        "target pod {} runs a guest that booted by itself, not an incoming \
                         one: its {} was empty (the target Pod needs the annotation {}={})",
                        self.target,
                        registry::ENV_INCOMING,
                        registry::INCOMING_ANNOTATION,
                        self.migration_id
                    )));
                }
                Ok(found)
                    if !found.rec.migration_uid.is_empty()
                        && found.rec.migration_uid != self.migration_id =>
                {
                    return Err(RuntimeError::FailedPrecondition(format!(
                        "target pod {} waits for migration {}, not {}",
                        self.target, found.rec.migration_uid, self.migration_id
                    )));
                }
                Ok(found) => return Ok(found),
                Err(Some(why)) => last = why,
                Err(None) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "target pod {} registered no incoming guest under {where_} within {:?} \
                     (found: {last}); its ferry-launcher must run on this node with {} set \
                     and the VM root mounted at the same path",
                    self.target,
                    self.wait,
                    registry::ENV_INCOMING
                )));
            }
            tokio::time::sleep(TARGET_POLL).await;
        }
    }
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
