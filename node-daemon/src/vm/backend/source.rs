//! The source side: QEMU migrates into a socket this daemon splices into the pipe.

use super::relay::{ram_pipe, splice};
use super::{
    FOLLOW_LIMIT, MAX_RECONNECTS, POLL, QMP_WAIT, RELAY_DRAIN, VmMigration, VmRuntime, check_plan,
    qemu_err, reconnect,
};
use crate::error::RuntimeError;
use crate::runtime::{CheckpointPlan, Handover, ProgressSink, Stage, Strategy};
use crate::transport;
use crate::vm::qemu::{QemuBackend, QemuError, Switch};
use crate::vm::record::SourceRecord;
use crate::vm::registry;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

impl VmRuntime {
    pub(super) async fn checkpoint(
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

        // The pipe's TCP and TLS handshakes and its Hello run while QEMU is configured,
        // not after QEMU connected: by then a Cold guest is stopped, and a live one's
        // stream waits on them. The destination keeps an early pipe until it accepts it.
        let dial = async {
            self.transport
                .sender
                .connect_pipe(&ep, &ram_pipe(&plan.migration_id), &Default::default())
                .await
                .map_err(|e| RuntimeError::Transfer(e.to_string()))
        };
        let tuning = self.tuning_for(plan.strategy, &plan.shaping);
        let configured = async {
            let q = QemuBackend::connect(&qmp, QMP_WAIT)
                .await
                .map_err(qemu_err)?;
            q.configure(&tuning).await.map_err(qemu_err)?;
            Ok(q)
        };
        // Nothing to undo if either fails: the guest still runs untouched. A pipe that
        // did connect is closed, which ends the destination's incoming migration.
        let (pipe, q) = tokio::try_join!(dial, configured)?;
        // QEMU migrates into a socket in its pod's directory, which this daemon forwards.
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

    pub(super) async fn abort_source(&self, dir: &Path) -> Result<(), RuntimeError> {
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
    pub(super) async fn finalize_source(&self, dir: &Path) -> Result<(), RuntimeError> {
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
}

/// A socket file this daemon created; removed when dropped.
struct OwnedSocket(PathBuf);

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
