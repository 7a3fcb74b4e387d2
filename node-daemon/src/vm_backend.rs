//! The VM runtime: live migration of QEMU guests run by ferry-launcher.
//!
//! Data path (the stream never touches the Kubernetes API or the controller):
//!
//! ```text
//! source QEMU --unix--> source daemon ==mTLS pipe==> dest daemon --unix--> dest QEMU
//!             <-------- return path (post-copy page requests) ---------
//! ```
//!
//! 1. destination (`prepare_receiver` → background task): start the guest described by
//!    the source (its spec travels in `WorkloadDescription.runtime_spec`) with
//!    ferry-launcher in incoming mode, registered under the target pod; call
//!    `migrate-incoming` on a unix socket, report [`INCOMING_READY`], and splice the
//!    pipe from the source into it once it arrives; `restore_in` waits until the guest
//!    runs here.
//! 2. source (`checkpoint_out`): point QEMU's `migrate` at a unix socket this daemon
//!    listens on and splice that connection into a ferry-transfer pipe `<id>.ram` to the
//!    destination; follow `query-migrate` into the progress stream until QEMU reports
//!    completed. The guest is then paused ("postmigrate") but still resumable until
//!    `finalize`.
//! 3. `finalize`: the source quits its QEMU; the destination lets its guest run on.
//!    `abort`: the source cancels the migration (or resumes a paused guest), the
//!    destination kills its incoming QEMU. Once post-copy has started the source no
//!    longer holds the whole guest, so abort refuses to resume it (see `abort_source`).
use crate::error::RuntimeError;
use crate::launcher::{Accel, GuestSpec};
use crate::qemu::{ConvergencePolicy, MigrationTuning, QemuBackend, QemuError, Switch};
use crate::runtime::{
    CheckpointPlan, ProgressSink, ReceiverInfo, ReceiverPlan, Runtime, Stage, Strategy,
    StrategySupport, WorkloadDescription, WorkloadKind, WorkloadRef,
};
use crate::transport::{self, Transport};
use crate::vm_registry;
use futures::future::{BoxFuture, FutureExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const QMP_WAIT: Duration = Duration::from_secs(20);
/// `query-migrate` polling: each poll is one small QMP round trip, and the interval
/// adds directly to the measured total time.
const POLL: Duration = Duration::from_millis(20);

/// How long the relay may take to pass the end of QEMU's stream on after QEMU finished.
const RELAY_DRAIN: Duration = Duration::from_secs(60);
const RELAY_BUF: usize = 256 << 10;

/// QMP reconnects tolerated per migration step before the error counts.
const MAX_RECONNECTS: u32 = 3;

/// Longest a migration may run here; the controller's own timeouts normally end it
/// (by Abort) much earlier.
const FOLLOW_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The destination's progress message once its incoming QEMU listens.
pub const INCOMING_READY: &str = "incoming guest ready";

pub struct VmConfig {
    /// Where launchers register their guests (see `vm_registry`).
    pub vm_root: PathBuf,
    /// The ferry-launcher binary, for destination guests.
    pub launcher: PathBuf,
    /// Per-migration sockets and logs.
    pub state_dir: PathBuf,
    /// Applied to every outgoing migration (max-bandwidth is always explicit).
    pub tuning: MigrationTuning,
}

/// What the destination's background task has reached.
#[derive(Clone)]
enum DestPhase {
    Starting,
    /// The incoming QEMU listens and the pipe from the source is spliced into it.
    Incoming(Arc<QemuBackend>),
    Failed(String),
}

enum VmMigration {
    Source {
        qmp_socket: PathBuf,
        registry_dir: PathBuf,
    },
    Dest {
        phase: watch::Receiver<DestPhase>,
        task: tokio::task::JoinHandle<()>,
        target: WorkloadRef,
        work: PathBuf,
    },
}

pub struct VmRuntime {
    cfg: VmConfig,
    transport: Arc<Transport>,
    migrations: Mutex<HashMap<String, VmMigration>>,
}

fn qemu_err(e: QemuError) -> RuntimeError {
    match e {
        QemuError::Connect { .. } => RuntimeError::FailedPrecondition(e.to_string()),
        e => RuntimeError::Transfer(e.to_string()),
    }
}

impl VmRuntime {
    /// A failed finalize or abort on the source leaves its entry in place, so that the
    /// controller's retry finds the paused guest again.
    fn put_back_source(&self, migration_id: &str, qmp_socket: PathBuf, registry_dir: PathBuf) {
        self.migrations.lock().unwrap().insert(
            migration_id.to_string(),
            VmMigration::Source {
                qmp_socket,
                registry_dir,
            },
        );
    }

    pub fn new(cfg: VmConfig, transport: Arc<Transport>) -> VmRuntime {
        VmRuntime {
            cfg,
            transport,
            migrations: Mutex::new(HashMap::new()),
        }
    }

    fn work_dir(&self, migration_id: &str) -> Result<PathBuf, RuntimeError> {
        if migration_id.contains('/') || migration_id.starts_with('.') {
            return Err(RuntimeError::InvalidArgument(format!(
                "bad migration id {migration_id:?}"
            )));
        }
        let dir = self.cfg.state_dir.join("vm").join(migration_id);
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("creating VM work dir"))?;
        Ok(dir)
    }

    fn find(
        &self,
        w: &WorkloadRef,
    ) -> Result<Option<(PathBuf, vm_registry::VmRecord)>, RuntimeError> {
        vm_registry::find(&self.cfg.vm_root, w).map_err(RuntimeError::io("reading the VM registry"))
    }

    /// Both ends configure the same tuning (capabilities must match). Live pre-copy
    /// that stalls throttles the guest (auto-converge), which keeps the whole guest at
    /// the source until the end, so rollback stays possible; `PostCopy` (a Migration
    /// that allows it) switches to post-copy instead, which ends any stall but leaves no
    /// way back once switched.
    fn tuning_for(&self, strategy: Strategy) -> MigrationTuning {
        let policy = match strategy {
            Strategy::Cold => ConvergencePolicy::None,
            Strategy::PreCopy => ConvergencePolicy::AutoConverge,
            Strategy::PostCopy => ConvergencePolicy::PostCopy,
        };
        MigrationTuning {
            postcopy_ram: policy.needs_postcopy_ram(),
            policy,
            ..self.cfg.tuning.clone()
        }
    }

    // ---- source ----

    async fn checkpoint(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let (registry_dir, rec) = self.find(&plan.workload)?.ok_or_else(|| {
            RuntimeError::NotFound(format!("no running VM for pod {}", plan.workload))
        })?;
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            VmMigration::Source {
                qmp_socket: rec.spec.qmp_socket.clone(),
                registry_dir,
            },
        );
        let ep = transport::peer(&plan.receive_endpoint)?;
        let work = self.work_dir(&plan.migration_id)?;

        // QEMU migrates into a local socket that this daemon forwards.
        let q = QemuBackend::connect(&rec.spec.qmp_socket, QMP_WAIT)
            .await
            .map_err(qemu_err)?;
        let tuning = self.tuning_for(plan.strategy);
        q.configure(&tuning).await.map_err(qemu_err)?;
        let sock = work.join("out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener =
            UnixListener::bind(&sock).map_err(RuntimeError::io("binding the migration socket"))?;
        if plan.strategy == Strategy::Cold {
            q.stop().await.map_err(qemu_err)?;
        }
        progress.stage(Stage::Transferring, "migrating guest memory");
        if let Err(e) = q.migrate(&format!("unix:{}", sock.display())).await {
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
            let pipe = self
                .transport
                .sender
                .connect_pipe(&ep, &ram_pipe(&plan.migration_id), &Default::default())
                .await
                .map_err(|e| RuntimeError::Transfer(e.to_string()))?;
            Ok::<_, RuntimeError>(splice(conn, pipe))
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
            let r = q
                .follow(&tuning, POLL, FOLLOW_LIMIT, |p| {
                    progress.set_bytes(p.transferred_bytes, p.total_bytes);
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
                    match reconnect(&rec.spec.qmp_socket).await {
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
                    Ok(Ok(Ok(_))) => None,
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

    async fn abort_source(&self, qmp_socket: &Path) -> Result<(), RuntimeError> {
        let q = QemuBackend::connect(qmp_socket, QMP_WAIT)
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
        Ok(())
    }

    async fn finalize_source(
        &self,
        qmp_socket: &Path,
        registry_dir: &Path,
    ) -> Result<(), RuntimeError> {
        let pid = vm_registry_pid(registry_dir);
        match QemuBackend::connect(qmp_socket, Duration::from_secs(2)).await {
            Ok(q) => {
                let state = q.run_state().await.map_err(qemu_err)?;
                if state == "running" {
                    return Err(RuntimeError::FailedPrecondition(
                        "the source guest is running again; refusing to stop it".into(),
                    ));
                }
                // QEMU closes QMP as it exits, so the reply may never come.
                let _ = tokio::time::timeout(Duration::from_secs(2), q.quit()).await;
            }
            Err(_) if pid.is_none_or(|p| !vm_registry::process_alive(p)) => {}
            Err(e) => return Err(qemu_err(e)),
        }
        if let Some(pid) = pid {
            for _ in 0..100 {
                if !vm_registry::process_alive(pid) {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        let _ = std::fs::remove_dir_all(registry_dir);
        Ok(())
    }

    // ---- destination ----

    fn prepare(
        &self,
        plan: ReceiverPlan,
        progress: ProgressSink,
    ) -> Result<ReceiverInfo, RuntimeError> {
        let spec: GuestSpec = serde_json::from_slice(&plan.workload.runtime_spec).map_err(|e| {
            RuntimeError::InvalidArgument(format!(
                "the VM's description carries no usable guest spec (runtime_spec: {e}); \
                 describe the source with a ferry-node of the same version"
            ))
        })?;
        let work = self.work_dir(&plan.migration_id)?;
        let (tx, rx) = watch::channel(DestPhase::Starting);
        let ctx = IncomingCtx {
            transport: self.transport.clone(),
            launcher: self.cfg.launcher.clone(),
            vm_root: self.cfg.vm_root.clone(),
            tuning: self.tuning_for(plan.strategy),
            migration_id: plan.migration_id.clone(),
            target: plan.target.clone(),
            work: work.clone(),
            spec,
            progress,
        };
        let (transport, pipe_id) = (self.transport.clone(), ram_pipe(&plan.migration_id));
        let task = tokio::spawn(async move {
            let phase = match ctx.run().await {
                Ok(q) => DestPhase::Incoming(Arc::new(q)),
                Err(e) => {
                    tracing::warn!(error = %e, "incoming VM setup failed");
                    // Close the source's pipe (parked or still to come) so that its
                    // QEMU sees the failure instead of blocking on a full buffer.
                    reject_pipe(&transport, &pipe_id);
                    DestPhase::Failed(e.to_string())
                }
            };
            let _ = tx.send(phase);
            // Keep the sender (and so the phase) alive until the migration is dropped.
            std::future::pending::<()>().await;
        });
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            VmMigration::Dest {
                phase: rx,
                task,
                target: plan.target,
                work,
            },
        );
        Ok(ReceiverInfo {
            receive_endpoint: self.transport.endpoint(),
            page_servers: Vec::new(),
        })
    }

    async fn restore(
        &self,
        migration_id: &str,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let (mut phase, qmp_socket) = match self.migrations.lock().unwrap().get(migration_id) {
            Some(VmMigration::Dest { phase, target, .. }) => (
                phase.clone(),
                vm_registry::dir_for(&self.cfg.vm_root, &target.namespace, &target.pod_name)
                    .join("qmp.sock"),
            ),
            _ => {
                return Err(RuntimeError::NotFound(format!(
                    "migration {migration_id} has no VM receiver here"
                )));
            }
        };
        progress.stage(Stage::Transferring, "waiting for the guest's memory");
        let q = loop {
            match phase.borrow_and_update().clone() {
                DestPhase::Incoming(q) => break q,
                DestPhase::Failed(e) => return Err(RuntimeError::Transfer(e)),
                DestPhase::Starting => {}
            }
            phase
                .changed()
                .await
                .map_err(|_| RuntimeError::Aborted("receiver dropped".into()))?;
        };
        // The incoming side reports its status too; the guest runs once it completes
        // (during post-copy it already runs while pages still arrive).
        let mut q = q;
        let mut reconnects = 0;
        loop {
            let p = match q.progress().await {
                Ok(p) => p,
                Err(e @ QemuError::Command { .. }) if reconnects < MAX_RECONNECTS => {
                    reconnects += 1;
                    match reconnect(&qmp_socket).await {
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
                }
                _ => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn abort_dest(&self, target: &WorkloadRef, work: &Path) {
        let dir = vm_registry::dir_for(&self.cfg.vm_root, &target.namespace, &target.pod_name);
        if let Some(pid) = vm_registry_pid(&dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            for _ in 0..100 {
                if !vm_registry::process_alive(pid) {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(work);
    }
}

fn vm_registry_pid(dir: &Path) -> Option<u32> {
    let bytes = std::fs::read(dir.join(vm_registry::RECORD)).ok()?;
    serde_json::from_slice::<vm_registry::VmRecord>(&bytes)
        .ok()
        .map(|r| r.pid)
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

fn ram_pipe(migration_id: &str) -> String {
    format!("{migration_id}.ram")
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
    outbound: tokio::task::JoinHandle<std::io::Result<u64>>,
    /// Pipe → QEMU's socket (the return path, or the incoming stream on the destination).
    inbound: tokio::task::JoinHandle<std::io::Result<u64>>,
}

/// Relays a migration stream between a QEMU socket and a transfer pipe, both ways.
fn splice(qemu: UnixStream, pipe: ferry_transfer::Pipe) -> Relay {
    let (qemu_r, qemu_w) = qemu.into_split();
    let (pipe_r, pipe_w) = tokio::io::split(pipe);
    Relay {
        outbound: tokio::spawn(copy_then_shutdown(qemu_r, pipe_w)),
        inbound: tokio::spawn(copy_then_shutdown(pipe_r, qemu_w)),
    }
}

async fn copy_then_shutdown(
    from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> std::io::Result<u64> {
    // Large reads: the stream is hundreds of MiB and every syscall is a TLS record.
    let mut from = tokio::io::BufReader::with_capacity(RELAY_BUF, from);
    let n = tokio::io::copy_buf(&mut from, &mut to).await?;
    to.shutdown().await?;
    tracing::debug!(bytes = n, "migration stream direction closed");
    Ok(n)
}

/// Everything the destination's background task needs.
struct IncomingCtx {
    transport: Arc<Transport>,
    launcher: PathBuf,
    vm_root: PathBuf,
    tuning: MigrationTuning,
    migration_id: String,
    target: WorkloadRef,
    work: PathBuf,
    spec: GuestSpec,
    progress: ProgressSink,
}

impl IncomingCtx {
    async fn run(self) -> Result<QemuBackend, RuntimeError> {
        let spec = &self.spec;
        let dir =
            vm_registry::dir_for(&self.vm_root, &self.target.namespace, &self.target.pod_name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut cmd = tokio::process::Command::new(&self.launcher);
        cmd.args(launcher_args(spec, &self.vm_root, &self.target));
        let log = std::fs::File::create(self.work.join("qemu.log"))
            .map_err(RuntimeError::io("creating qemu.log"))?;
        cmd.stdout(log.try_clone().map_err(RuntimeError::io("qemu.log"))?)
            .stderr(log);
        let mut child = cmd.spawn().map_err(RuntimeError::io(format!(
            "starting {}",
            self.launcher.display()
        )))?;
        // The guest outlives this task; reap it whenever it exits.
        let pid = child.id();
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(?pid, ?status, "incoming guest's QEMU exited");
        });

        let qmp = dir.join("qmp.sock");
        let q = QemuBackend::connect(&qmp, QMP_WAIT).await.map_err(|e| {
            RuntimeError::Transfer(format!(
                "{e}; QEMU output: {}",
                std::fs::read_to_string(self.work.join("qemu.log")).unwrap_or_default()
            ))
        })?;
        q.configure(&self.tuning).await.map_err(qemu_err)?;
        let sock = self.work.join("in.sock");
        let _ = std::fs::remove_file(&sock);
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
        let _relay = splice(conn, pipe);
        Ok(q)
    }
}

/// ferry-launcher's arguments for the destination copy of `spec`, registered as `target`.
fn launcher_args(spec: &GuestSpec, vm_root: &Path, target: &WorkloadRef) -> Vec<String> {
    let mut a = vec![
        "--kernel".to_string(),
        spec.kernel.display().to_string(),
        "--append".into(),
        spec.append.clone(),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--accel".into(),
        match spec.accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => "tcg".into(),
        },
        "--incoming".into(),
        "--vm-root".into(),
        vm_root.display().to_string(),
        "--namespace".into(),
        target.namespace.clone(),
        "--pod".into(),
        target.pod_name.clone(),
        "--pod-uid".into(),
        target.pod_uid.clone(),
    ];
    if let Some(initrd) = &spec.initrd {
        a.extend(["--initrd".into(), initrd.display().to_string()]);
    }
    a
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
            Ok(self.find(workload)?.map(|(_, rec)| WorkloadDescription {
                workload: rec.workload(),
                kind: WorkloadKind::VirtualMachine,
                containers: Vec::new(),
                memory_bytes: u64::from(rec.spec.memory_mib) << 20,
                runtime_spec: serde_json::to_vec(&rec.spec).expect("spec serializes"),
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
            progress.stage(Stage::Prepared, "starting the incoming guest");
            self.prepare(plan, progress)
        }
        .boxed()
    }

    fn check_checkpoint<'a>(
        &'a self,
        plan: &'a CheckpointPlan,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            transport::peer(&plan.receive_endpoint)?;
            let (_, rec) = self.find(&plan.workload)?.ok_or_else(|| {
                RuntimeError::NotFound(format!("no running VM for pod {}", plan.workload))
            })?;
            let q = QemuBackend::connect(&rec.spec.qmp_socket, Duration::from_secs(5))
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
                Some(VmMigration::Source {
                    qmp_socket,
                    registry_dir,
                }) => {
                    let r = self.finalize_source(&qmp_socket, &registry_dir).await;
                    if r.is_err() {
                        self.put_back_source(migration_id, qmp_socket, registry_dir);
                    }
                    r?;
                }
                Some(VmMigration::Dest { task, work, .. }) => {
                    task.abort();
                    let _ = std::fs::remove_dir_all(work);
                }
                None => {}
            }
            if let Ok(dir) = self.work_dir(migration_id) {
                let _ = std::fs::remove_dir_all(dir);
            }
            Ok(())
        }
        .boxed()
    }

    fn abort<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let m = self.migrations.lock().unwrap().remove(migration_id);
            match m {
                Some(VmMigration::Source {
                    qmp_socket,
                    registry_dir,
                }) => {
                    let r = self.abort_source(&qmp_socket).await;
                    if r.is_err() {
                        self.put_back_source(migration_id, qmp_socket, registry_dir);
                    }
                    r
                }
                Some(VmMigration::Dest {
                    task, target, work, ..
                }) => {
                    task.abort();
                    reject_pipe(&self.transport, &ram_pipe(migration_id));
                    self.abort_dest(&target, &work).await;
                    Ok(())
                }
                None => Ok(()),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_launcher_gets_the_same_guest_in_incoming_mode() {
        let spec = GuestSpec {
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initramfs.gz".into()),
            append: "console=ttyS0".into(),
            memory_mib: 512,
            vcpus: 2,
            accel: Accel::Tcg,
            qmp_socket: "/src/qmp.sock".into(),
            serial_log: "/src/serial.log".into(),
            incoming: false,
        };
        let target = WorkloadRef {
            namespace: "ns".into(),
            pod_name: "vm-b".into(),
            pod_uid: "u2".into(),
        };
        let a = launcher_args(&spec, Path::new("/run/ferry/vms"), &target);
        let value = |k: &str| a.windows(2).find(|w| w[0] == k).map(|w| w[1].as_str());
        assert_eq!(value("--memory-mib"), Some("512"));
        assert_eq!(value("--vcpus"), Some("2"));
        assert_eq!(value("--initrd"), Some("/g/initramfs.gz"));
        assert_eq!(value("--pod"), Some("vm-b"));
        assert!(a.iter().any(|x| x == "--incoming"));
        // The destination's sockets live in its own registry dir, not the source's.
        assert!(!a.iter().any(|x| x.contains("/src/")));
    }
}
