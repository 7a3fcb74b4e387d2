//! The daemon steps: the plan both daemons get, starting and following the checkpoint
//! and the restore, and what a rollback or cancel found at the source.
use super::*;
use crate::serving;

impl Reconciler<'_> {
    // ---- the daemon steps ----------------------------------------------------------

    pub(super) fn source_node(&self) -> NodeRef {
        let s = self
            .status
            .source
            .as_ref()
            .expect("source recorded when validated");
        NodeRef {
            cluster: None,
            node: s.node.clone(),
        }
    }

    pub(super) fn target_node(&self) -> NodeRef {
        let t = self
            .status
            .target
            .as_ref()
            .expect("target recorded when validated");
        NodeRef {
            cluster: t.cluster.clone(),
            node: t.node.clone(),
        }
    }

    /// Sets ferry's readiness gate on the source Pod, if it declares it.
    pub(super) async fn source_serving(&self, why: serving::Why) -> Result<bool, kube::Error> {
        let s = self.status.source.as_ref().expect("validated");
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &s.namespace);
        serving::set_named(&pods, &s.pod, why).await
    }

    pub(super) async fn target_pods(&self) -> Result<Api<Pod>, Error> {
        let cluster = self.status.target.as_ref().and_then(|t| t.cluster.clone());
        let client = self.ctx.clusters.client(cluster.as_deref()).await?;
        Ok(Api::namespaced(client, &self.ns))
    }

    pub(super) async fn plan(&self) -> Result<Plan, Error> {
        let spec = &self.m.spec;
        let settings = self.settings();
        let s = self.status.source.as_ref().expect("validated");
        let t = self.status.target.as_ref().expect("validated");
        let object_store = self.object_store_access().await?.ok().flatten();
        Ok(Plan {
            migration_id: self.m.uid().unwrap_or_default(),
            source_node: self.source_node(),
            source: PodId {
                namespace: s.namespace.clone(),
                name: s.pod.clone(),
                uid: s.uid.clone().unwrap_or_default(),
            },
            target: PodId {
                namespace: t.namespace.clone(),
                name: t.pod.clone(),
                uid: t.uid.clone().unwrap_or_default(),
            },
            kind: self
                .status
                .workload_kind
                .unwrap_or(ferry_crds::WorkloadKind::Containers),
            strategy: settings.strategy,
            allow_post_copy: settings.allow_post_copy,
            transfer: spec.transfer.mode,
            object_store,
            compress: spec.transfer.compress,
            bandwidth_limit_bytes_per_sec: u64::from(settings.bandwidth_limit_mi_bps.unwrap_or(0))
                * (1 << 20),
            criu: spec.criu.clone(),
            images: Vec::new(),
        })
    }

    pub(super) fn record_progress(&mut self, op: &OpStatus) {
        let p = self.status.progress.get_or_insert_with(Progress::default);
        if op.bytes_done > p.bytes_transferred || p.last_progress_at.is_none() {
            p.last_progress_at = Some(now());
        }
        // Source and target report their own counters; the migration moved the larger.
        p.bytes_transferred = p.bytes_transferred.max(op.bytes_done);
        p.bytes_total = p.bytes_total.max(op.bytes_total);
        if op.wire_bytes > 0 {
            p.wire_bytes = Some(p.wire_bytes.unwrap_or(0).max(op.wire_bytes));
        }
        if op.dirty_bytes_per_sec > 0 {
            p.dirty_bytes_per_second = Some(op.dirty_bytes_per_sec);
        }
        sample_rate(p, now_ms());
        p.display = format::progress_at(p.bytes_transferred, p.bytes_total, p.bytes_per_second);
        if !op.steps.is_empty() {
            let t = self.status.timings.get_or_insert_with(Timings::default);
            for step in &op.steps {
                // Each report repeats the steps so far: keep one entry per node and name.
                t.steps
                    .retain(|s| !(s.node == step.node && s.name == step.name));
                t.steps.push(step.clone());
            }
            t.steps.sort_by_key(|s| s.start_ms);
        }
        if let Some(ms) = op.downtime_ms {
            let t = self.status.timings.get_or_insert_with(Timings::default);
            let ms = t.downtime_ms.unwrap_or(0).max(ms);
            t.downtime_ms = Some(ms);
            t.downtime = Some(format::millis(ms));
        }
    }

    /// Turns a daemon's answer about a running step into an outcome.
    pub(super) fn observe(
        &mut self,
        op: Result<OpStatus, AgentError>,
        reason: &str,
        done: Outcome,
    ) -> Result<Outcome, Error> {
        let op = match op {
            Ok(op) => op,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(self.step_failed(reason, e.to_string())),
        };
        self.record_progress(&op);
        if op.committed && !self.status.committed {
            info!("past the point of no return: the migration can only complete forward");
            self.status.committed = true;
        }
        Ok(match op.state {
            OpState::Running => Outcome::InProgress {
                transferring: op.stage == OpStage::Transferring,
            },
            OpState::Succeeded => done,
            OpState::Failed | OpState::Aborted => {
                let msg = if op.message.is_empty() {
                    format!("{:?} {:?}", op.stage, op.state)
                } else {
                    op.message
                };
                self.step_failed(reason, msg)
            }
        })
    }

    pub(super) fn mark_started(&mut self, step: &str) {
        if !self.status.started_steps.iter().any(|s| s == step) {
            self.status.started_steps.push(step.into());
        }
    }

    /// Starts the checkpoint at the source and, right after, the restore at the target:
    /// the target restores as soon as the state arrives, so transfer and restore overlap
    /// the dump instead of waiting for this controller to notice that it finished.
    pub(super) async fn start_checkpoint(&mut self) -> Result<Outcome, Error> {
        let plan = self.plan().await?;
        let mut receiver = self.status.receiver.clone().unwrap_or_default();
        let uid = self.m.uid().unwrap_or_default();
        let remembered = self.ctx.tokens.lock().unwrap().get(&uid).cloned();
        match remembered {
            Some(token) => receiver.token = token,
            // The status never holds the token and this controller has not seen it (it
            // restarted): ask the destination again (it answers a repeated
            // PrepareReceiver with what it prepared, token included).
            None => match self.refresh_receiver(&plan).await? {
                Ok(r) => receiver = r,
                Err(outcome) => return Ok(outcome),
            },
        }
        // Out of its Services before it stops answering (`serving.rs`). Only a hint to
        // the clients: a failure to say so does not hold the move up.
        if !self.is_vm()
            && let Err(e) = self.source_serving(serving::Why::Frozen).await
        {
            warn!("taking the source Pod out of its Services' endpoints: {e}");
        }
        let op = self
            .ctx
            .agent
            .start_checkpoint(&self.source_node(), &plan, &receiver)
            .await;
        if op.is_err() {
            return self.observe(op, "CheckpointFailed", Outcome::CheckpointDone);
        }
        self.mark_started(STEP_CHECKPOINT);
        self.objects_stored();
        self.ctx.tokens.lock().unwrap().remove(&uid);
        let outcome = self.observe(op, "CheckpointFailed", Outcome::CheckpointDone)?;
        if outcome == Outcome::StepFailed {
            return Ok(outcome);
        }
        match self
            .ctx
            .agent
            .start_restore(&self.target_node(), &plan)
            .await
        {
            Ok(op) if op.state == OpState::Failed => {
                Ok(self.step_failed("RestoreFailed", op.message))
            }
            Ok(_) => {
                self.mark_started(STEP_RESTORE);
                Ok(outcome)
            }
            // Not started: the Restoring phase starts it again.
            Err(e) if e.is_transient() => Ok(outcome),
            Err(e) => Ok(self.step_failed("RestoreFailed", e.to_string())),
        }
    }

    pub(super) async fn await_checkpoint(&mut self) -> Result<Outcome, Error> {
        let op = self
            .ctx
            .agent
            .operation(&self.source_node(), &self.m.uid().unwrap_or_default())
            .await;
        let outcome = self.observe(op, "CheckpointFailed", Outcome::CheckpointDone)?;
        if outcome == Outcome::StepFailed && self.status.committed {
            // The target holds the only copy that can go on; whether it does is its
            // restore's to say.
            let f = self.status.failure.take();
            warn!(failure = ?f, "the source failed past the point of no return; the target's restore decides");
            return Ok(Outcome::CheckpointDone);
        }
        Ok(outcome)
    }

    pub(super) async fn start_restore(&mut self) -> Result<Outcome, Error> {
        let plan = self.plan().await?;
        let op = self
            .ctx
            .agent
            .start_restore(&self.target_node(), &plan)
            .await;
        if op.is_ok() {
            self.mark_started(STEP_RESTORE);
        }
        self.observe(op, "RestoreFailed", Outcome::RestoreDone)
    }

    pub(super) async fn await_restore(&mut self) -> Result<Outcome, Error> {
        let op = self
            .ctx
            .agent
            .operation(&self.target_node(), &self.m.uid().unwrap_or_default())
            .await;
        self.observe(op, "RestoreFailed", Outcome::RestoreDone)
    }

    pub(super) async fn roll_back(&mut self) -> Result<Outcome, Error> {
        if self.undo().await? == Undone::Committed {
            return Ok(self.committed_instead());
        }
        let retry = self.status.attempts < self.m.spec.failure_policy.max_retries;
        if !retry && let Some(f) = self.status.failure.as_mut() {
            f.rolled_back = true;
        }
        Ok(Outcome::RolledBack { retry })
    }

    pub(super) async fn cancel(&mut self) -> Result<Outcome, Error> {
        if self.status.phase.is_some_and(|p| p != Phase::Pending)
            && self.undo().await? == Undone::Committed
        {
            return Ok(self.committed_instead());
        }
        Ok(Outcome::Cancelled)
    }

    /// A rollback or cancel found the source past the point of no return: nothing was
    /// undone; the migration goes on forward (and a deletion waits for it).
    pub(super) fn committed_instead(&mut self) -> Outcome {
        self.status.committed = true;
        if let Some(f) = self.status.failure.take() {
            warn!(reason = %f.reason, "not rolled back: past the point of no return ({})", f.message);
        }
        Outcome::Committed
    }

    /// A failure past the point of no return: the source cannot resume, so the
    /// Migration fails as it stands, both Pods left for inspection.
    pub(super) fn give_up(&mut self) -> Outcome {
        if let Some(f) = self.status.failure.as_mut() {
            f.message = format!(
                "{} (past the point of no return: post-copy had handed the workload to the \
                 target, so the source could not be resumed; the source Pod stays frozen and \
                 the target Pod as it is)",
                f.message
            );
        }
        Outcome::Lost
    }
}

/// How long a rate sample must span: shorter windows see the bursts of a pipe's
/// buffering, not its rate.
const RATE_WINDOW_MS: u64 = 1000;

/// Updates `bytes_per_second` from the bytes moved since the last sample once the
/// sample is at least [`RATE_WINDOW_MS`] old, and starts a new sample.
fn sample_rate(p: &mut Progress, now_ms: u64) {
    let (Some(at), Some(bytes)) = (p.rate_sampled_at_ms, p.rate_sampled_bytes) else {
        p.rate_sampled_at_ms = Some(now_ms);
        p.rate_sampled_bytes = Some(p.bytes_transferred);
        return;
    };
    let span = now_ms.saturating_sub(at);
    if span < RATE_WINDOW_MS {
        return;
    }
    let moved = p.bytes_transferred.saturating_sub(bytes);
    p.bytes_per_second = Some(moved * 1000 / span);
    p.rate_sampled_at_ms = Some(now_ms);
    p.rate_sampled_bytes = Some(p.bytes_transferred);
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn the_rate_is_measured_over_a_second_or_more() {
        let mut p = Progress::default();
        sample_rate(&mut p, 10_000);
        assert_eq!(p.bytes_per_second, None);
        p.bytes_transferred = 5 << 20;
        sample_rate(&mut p, 10_400); // too soon: no rate from 400 ms of bursts
        assert_eq!(p.bytes_per_second, None);
        p.bytes_transferred = 20 << 20;
        sample_rate(&mut p, 12_000);
        assert_eq!(p.bytes_per_second, Some(10 << 20));
        // Stalled: the rate falls to zero once a window passes without bytes.
        sample_rate(&mut p, 13_500);
        assert_eq!(p.bytes_per_second, Some(0));
    }
}
