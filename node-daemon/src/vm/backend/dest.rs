//! The destination side.

use super::relay::{Relay, StopOnDrop, ram_pipe, splice};
use super::{
    DestPhase, INCOMING_READY, MAX_RECONNECTS, POLL, QMP_WAIT, TARGET_POLL, VmMigration, VmRuntime,
    check_plan, no_bucket, qemu_err, reconnect,
};
use crate::error::RuntimeError;
use crate::runtime::{ProgressSink, ReceiverInfo, ReceiverPlan, Stage, WorkloadRef};
use crate::transport::Transport;
use crate::vm::launcher::GuestSpec;
use crate::vm::qemu::{MigrationTuning, QemuBackend, QemuError};
use crate::vm::registry::{self, Found, Registry};
use ferry_transfer::Shaping;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::watch;

impl VmRuntime {
    pub(super) fn prepare(
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

    pub(super) async fn restore(
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

/// Takes the pipe `id` if a source connected (or connects within a while) and closes
/// it: an unaccepted pipe would otherwise be parked in the receiver, and the source
/// would block once the connection's buffers fill.
pub(super) fn reject_pipe(transport: &Arc<Transport>, id: &str) {
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
