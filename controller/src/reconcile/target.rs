//! The target Pod's life, and the end of the source Pod: every copy of the workload is
//! a kubelet-owned Pod, so the copies are created and ended through the API.
//!
//! - Preparing: create the target Pod, wait until its kubelet has made the sandbox
//!   (`PodReadyToStartContainers`; a VM Pod: until its launcher runs, as KubeVirt waits
//!   for the target launcher pod), then prepare the receiving daemon.
//! - Completing: wait until the target's kubelet reports every container running, then
//!   delete the source Pod (UID precondition), then let the source daemon end the
//!   frozen copy (`Finalize`) and the target daemon drop its staging.
//! - Rollback: abort at the target; unless its daemon vouches that no copy runs there
//!   (every restore refused before it began), delete the target Pod and wait until its
//!   kubelet removed it; then resume the source (`Abort`); a vouched-for target's Pod
//!   is deleted after. Never two copies running, and the source always resumes; a
//!   target apiserver that does not answer delays the source only when the target
//!   may run a copy.
use super::*;
use crate::agent::ContainerImage;
use crate::owner;
use crate::serving;
use ferry_crds::Receiver;
use k8s_openapi::api::core::v1::PodStatus;

/// How long a target Pod may take to get its sandbox (or, for a VM, its launcher).
const TARGET_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one reconcile waits for the target Pod before it requeues.
const READY_SLICE: Duration = Duration::from_secs(2);
/// How long Completing waits for the target's kubelet to report the containers running.
const TARGET_RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long rollback waits for the target Pod to be gone before resuming the source.
const TARGET_GONE_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// How long one call to the target cluster's apiserver may take in Completing and
/// rollback: a stopped apiserver answers nothing, and kube's own read timeout is
/// minutes, during which a reconcile could neither time out nor be cancelled.
const TARGET_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One call to the target cluster's apiserver, bounded by [`TARGET_CALL_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(TARGET_CALL_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Timeout(format!(
            "{what}: the target cluster's apiserver did not answer within {TARGET_CALL_TIMEOUT:?}"
        ))),
    }
}

/// Why a target Pod cannot become ready, when its status already says so.
fn stuck(status: &PodStatus) -> Option<String> {
    if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
        return Some(format!(
            "the target Pod is {}: {}",
            status.phase.as_deref().unwrap_or_default(),
            status
                .message
                .clone()
                .or(status.reason.clone())
                .unwrap_or_default()
        ));
    }
    let cond = |t: &str| status.conditions.iter().flatten().find(|c| c.type_ == t);
    if let Some(c) = cond("PodScheduled").filter(|c| c.status == "False") {
        return Some(format!(
            "the target Pod cannot be scheduled: {}",
            c.message.clone().unwrap_or_default()
        ));
    }
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|cs| {
            let w = cs.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            matches!(
                reason,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "ErrImageNeverPull"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"
                    | "RunContainerError"
            )
            .then(|| {
                format!(
                    "container {} of the target Pod: {reason}: {}",
                    cs.name,
                    w.message.clone().unwrap_or_default()
                )
            })
        })
}

fn condition_true(status: &PodStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Every app container running and never restarted.
fn all_running(pod: &Pod) -> bool {
    let want = pod.spec.as_ref().map(|s| s.containers.len()).unwrap_or(0);
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    statuses.len() == want
        && statuses
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

/// The images the source's containers run, from its spec and status.
pub(super) fn images_of(pod: &Pod) -> Vec<ContainerImage> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| ContainerImage {
            container: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: statuses
                .iter()
                .find(|s| s.name == c.name)
                .map(|s| s.image_id.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// Recent Warning events of a Pod (sandbox and runtime errors show only there).
async fn warnings(client: kube::Client, ns: &str, name: &str) -> String {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, ns);
    let lp = ListParams::default().fields(&format!("involvedObject.name={name},type=Warning"));
    match events.list(&lp).await {
        Ok(list) => list
            .items
            .iter()
            .rev()
            .take(3)
            .filter_map(|e| Some(format!("{}: {}", e.reason.clone()?, e.message.clone()?)))
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::new(),
    }
}

impl Reconciler<'_> {
    pub(super) fn is_vm(&self) -> bool {
        self.status.workload_kind == Some(ferry_crds::WorkloadKind::VirtualMachine)
    }

    async fn target_client(&self) -> Result<kube::Client, Error> {
        let cluster = self.status.target.as_ref().and_then(|t| t.cluster.clone());
        Ok(self.ctx.clusters.client(cluster.as_deref()).await?)
    }

    /// Preparing: the target Pod exists (created by us) and is ready to receive, and
    /// its daemon is prepared.
    pub(super) async fn prepare_target(&mut self) -> Result<Outcome, Error> {
        let pods = self.target_pods().await?;
        let uid = self.m.uid().unwrap_or_default();
        let t = self.status.target.clone().expect("validated");
        let source: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(source_pod) = source.get_opt(&self.m.spec.workload.pod).await? else {
            return Ok(self.step_failed("PodNotFound", "the source pod disappeared"));
        };
        let existing = pods.get_opt(&t.pod).await?;
        let created = match existing {
            Some(p) if p.annotations().get(MIGRATION_ANNOTATION) == Some(&uid) => p,
            Some(_) => {
                return Ok(self.step_failed(
                    "TargetPodExists",
                    format!(
                        "pod {}/{} already exists in the target cluster and is not ours",
                        self.ns, t.pod
                    ),
                ));
            }
            None => {
                // A node without ferry's runtime handler cannot restore containers:
                // say so before creating anything there.
                let runtime = if self.is_vm() { "qemu" } else { "containers" };
                match self.ctx.agent.receiving_runtimes(&self.target_node()).await {
                    Ok(r) if r.iter().any(|x| x == runtime) => {}
                    Ok(_) => {
                        return Ok(self.step_failed(
                            "NoFerryRuntime",
                            format!(
                                "node {} has no ferry runtime (containerd handler `ferry` with \
                                 ferry-runtime, RuntimeClass {}): it cannot receive {runtime}; install \
                                 ferry's node pieces there or choose another target node",
                                t.display, self.ctx.target_shape.runtime_class
                            ),
                        ));
                    }
                    Err(e) if e.is_transient() => return Err(e.into()),
                    Err(e) => return Ok(self.step_failed("PrepareFailed", e.to_string())),
                }
                let source_id = format!(
                    "{}/{}/{}",
                    self.ctx.cluster_name, self.ns, self.m.spec.workload.pod
                );
                let mut pod = placement::target_pod(
                    &source_pod,
                    &t.pod,
                    &t.node,
                    &uid,
                    &source_id,
                    self.is_vm(),
                    &self.ctx.target_shape,
                );
                let same_cluster = t.cluster.is_none();
                match self.adoption(&source_pod, same_cluster).await? {
                    Ok(Some(a)) => owner::hold_back(&mut pod, &a),
                    Ok(None) => {}
                    Err(why) => return Ok(self.step_failed("UnsupportedOwner", why)),
                }
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(p) => p,
                    Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 404 | 422) => {
                        return Ok(self.step_failed(
                            "TargetPodRejected",
                            format!(
                                "creating pod {}/{} in the target cluster: {}",
                                self.ns, t.pod, e.message
                            ),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if let Some(tp) = self.status.target.as_mut() {
            tp.uid = created.uid();
        }
        match self.await_target_ready(&pods, &t.pod).await? {
            // A gated target serves as soon as its containers run (`serving.rs`).
            Readiness::Ready => {
                serving::set_named(&pods, &t.pod, serving::Why::Target).await?;
            }
            Readiness::Waiting => {
                return Ok(Outcome::InProgress {
                    transferring: false,
                });
            }
            Readiness::Stuck(why) => return Ok(self.step_failed("TargetNotReady", why)),
        }
        let plan = self.plan().await?;
        match self.prepare_receiver(plan, &source_pod).await? {
            Ok(receiver) => {
                self.status.receiver = Some(receiver);
                self.status.progress = Some(Progress {
                    last_progress_at: Some(now()),
                    ..Default::default()
                });
                Ok(Outcome::TargetReady)
            }
            Err(outcome) => Ok(outcome),
        }
    }

    /// PrepareReceiver at the target for the source Pod's images; the token it answers
    /// is remembered in memory only (`Context::tokens`) until the checkpoint starts.
    async fn prepare_receiver(
        &mut self,
        mut plan: Plan,
        source_pod: &Pod,
    ) -> Result<Result<Receiver, Outcome>, Error> {
        plan.images = images_of(source_pod);
        match self
            .ctx
            .agent
            .prepare_receiver(&self.target_node(), &plan)
            .await
        {
            Ok(r) => {
                let uid = self.m.uid().unwrap_or_default();
                self.ctx.tokens.lock().unwrap().insert(uid, r.token.clone());
                Ok(Ok(r))
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => Ok(Err(self.step_failed("PrepareFailed", e.to_string()))),
        }
    }

    /// The destination's receiver with its token, which only memory holds: a repeated
    /// PrepareReceiver (idempotent at the daemon), planned as the first one was.
    pub(super) async fn refresh_receiver(
        &mut self,
        plan: &Plan,
    ) -> Result<Result<Receiver, Outcome>, Error> {
        let source: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(source_pod) = source.get_opt(&self.m.spec.workload.pod).await? else {
            return Ok(Err(
                self.step_failed("PodNotFound", "the source pod disappeared")
            ));
        };
        self.prepare_receiver(plan.clone(), &source_pod).await
    }

    /// Waits up to [`READY_SLICE`] for the target's kubelet to make the sandbox
    /// (containers) or run the launcher (VM): one reconcile never waits longer, so a
    /// deletion or a restarted controller is acted on soon; the whole wait is bounded
    /// by [`TARGET_READY_TIMEOUT`] from entering Preparing.
    async fn await_target_ready(&self, pods: &Api<Pod>, name: &str) -> Result<Readiness, Error> {
        let slice_end = Instant::now() + READY_SLICE;
        loop {
            let pod = pods.get_opt(name).await?;
            let Some(pod) = pod else {
                return Ok(Readiness::Stuck(format!(
                    "the target Pod {}/{name} disappeared",
                    self.ns
                )));
            };
            let status = pod.status.clone().unwrap_or_default();
            if let Some(why) = stuck(&status) {
                return Ok(Readiness::Stuck(why));
            }
            let ready = if self.is_vm() {
                all_running(&pod)
            } else {
                condition_true(&status, "PodReadyToStartContainers")
            };
            if ready {
                return Ok(Readiness::Ready);
            }
            if Instant::now() >= slice_end {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // Sandbox failures show only as Events; a repeated one will not heal.
        let client = self.target_client().await?;
        let events = warnings(client, &self.ns, name).await;
        if events.matches("FailedCreatePodSandBox").count() >= 2 {
            return Ok(Readiness::Stuck(format!(
                "the target Pod {}/{name} gets no sandbox: {events}",
                self.ns
            )));
        }
        if self.in_phase_for(Phase::Preparing) < TARGET_READY_TIMEOUT {
            return Ok(Readiness::Waiting);
        }
        Ok(Readiness::Stuck(format!(
            "the target Pod {}/{name} on {} was not ready within {TARGET_READY_TIMEOUT:?}{}",
            self.ns,
            self.status
                .target
                .as_ref()
                .map(|t| t.display.as_str())
                .unwrap_or("?"),
            if events.is_empty() {
                String::new()
            } else {
                format!(": {events}")
            }
        )))
    }

    /// How long the migration has been in `phase` since it last entered it (zero when
    /// the status does not say).
    fn in_phase_for(&self, phase: Phase) -> Duration {
        let entered = self
            .status
            .timings
            .as_ref()
            .and_then(|t| t.phases.iter().rev().find(|p| p.phase == phase))
            .map(|p| {
                p.entered_at_ms
                    .unwrap_or(p.entered_at.0.as_millisecond().max(0) as u64)
            });
        entered.map_or(Duration::ZERO, |at| {
            Duration::from_millis(now_ms().saturating_sub(at))
        })
    }

    /// Completing: the target runs the workload; remove the source copy. Failures here
    /// are retried, never rolled back: the target is the one copy to keep.
    pub(super) async fn complete(&mut self) -> Result<Outcome, Error> {
        let id = self.m.uid().unwrap_or_default();
        let source = self.source_node();
        if !self.status.started_steps.iter().any(|s| s == STEP_FINALIZE) {
            // 1. The target's kubelet reports every container running.
            let pods = self.target_pods().await?;
            let t = self.status.target.clone().expect("validated");
            let deadline = Instant::now() + TARGET_RUNNING_TIMEOUT;
            let target = loop {
                match bounded("reading the target Pod", pods.get_opt(&t.pod)).await? {
                    // A Pod joining a ReplicaSet must be Ready first: one that is not
                    // would be the one its ReplicaSet scales away.
                    Some(p)
                        if all_running(&p)
                            && (owner::pending_adoption(&p).is_none()
                                || p.status
                                    .as_ref()
                                    .is_some_and(|s| condition_true(s, "Ready"))) =>
                    {
                        break p;
                    }
                    Some(_) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                    other => {
                        return Err(AgentError::Rejected {
                            node: self.target_node().to_string(),
                            message: format!(
                                "the target Pod's kubelet does not report its containers running: {:?}",
                                other.and_then(|p| p.status).map(|s| s.container_statuses)
                            ),
                        }
                        .into());
                    }
                }
            };
            // 1b. A ReplicaSet's Pod: the target joins it before the source leaves.
            if let Some(a) = owner::pending_adoption(&target)
                && !owner::adopted(&target, &a)
            {
                self.adopt(&pods, &t.pod, &a).await?;
            }
            // 2. The source Pod goes: its kubelet stops the (frozen) containers and never
            //    restarts them. The UID precondition spares a new Pod of the same name.
            let src: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
            let s = self.status.source.clone().expect("validated");
            let mut dp = DeleteParams::default().grace_period(1);
            dp.preconditions = s.uid.clone().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            });
            match src.delete(&s.pod, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        // 3. The source daemon ends the frozen copy once its kubelet is stopping it.
        let op = if self.status.started_steps.iter().any(|s| s == STEP_FINALIZE) {
            match self.ctx.agent.operation(&source, &id).await {
                Err(AgentError::UnknownMigration { .. }) => None, // finished and forgotten
                r => Some(r?),
            }
        } else {
            let op = self.ctx.agent.finalize(&source, &id).await?;
            self.mark_started(STEP_FINALIZE);
            Some(op)
        };
        if let Some(op) = op {
            match op.state {
                OpState::Running => {
                    return Ok(Outcome::InProgress {
                        transferring: false,
                    });
                }
                OpState::Succeeded => {}
                OpState::Failed | OpState::Aborted => {
                    return Err(AgentError::Rejected {
                        node: source.to_string(),
                        message: format!("finalize: {}", op.message),
                    }
                    .into());
                }
            }
        }
        // 4. The target daemon drops its staged checkpoint (best effort).
        if let Err(e) = self.ctx.agent.finalize(&self.target_node(), &id).await {
            warn!("dropping the target's staged state: {e}");
        }
        Ok(Outcome::Completed)
    }

    /// The ReplicaSet adopts the target: the source first gets the lowest deletion
    /// cost, so that a ReplicaSet seeing both as its own scales the source away; then
    /// the target gets the withheld label and the owner reference (`owner.rs`).
    async fn adopt(&self, pods: &Api<Pod>, target: &str, a: &owner::Adoption) -> Result<(), Error> {
        let src: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let s = self.status.source.clone().expect("validated");
        let cost = serde_json::json!({"metadata": {"annotations": {
            owner::DELETION_COST_ANNOTATION: owner::LOWEST_DELETION_COST}}});
        match src
            .patch(&s.pod, &PatchParams::default(), &Patch::Merge(&cost))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let join = serde_json::json!({"metadata": {
            "labels": {a.label.0.clone(): a.label.1.clone()},
            "ownerReferences": [a.owner],
        }});
        pods.patch(target, &PatchParams::default(), &Patch::Merge(&join))
            .await?;
        info!(owner = %a.owner.name, "the target Pod joined its ReplicaSet");
        Ok(())
    }

    /// Removes the target copy (daemon state, then the Pod, waiting until its kubelet
    /// removed it) and resumes the source. The target goes first so that the workload
    /// never runs twice, unless its daemon vouched that no copy runs there (then the
    /// source resumes first and the Pod goes after: an unanswering target apiserver
    /// does not keep the workload frozen). The source is resumed even when the target
    /// cannot be confirmed gone within [`TARGET_GONE_TIMEOUT`], so it never runs zero
    /// times for long.
    pub(super) async fn undo(&mut self) -> Result<Undone, Error> {
        let id = self.m.uid().unwrap_or_default();
        self.ctx.tokens.lock().unwrap().remove(&id);
        // Fence first: a source that already handed the workload over (post-copy) must
        // not lose its target, and one that did not must never hand it over while the
        // target is being removed. Unknown to its daemon: nothing was started there.
        if self.status.source.is_some()
            && self
                .status
                .started_steps
                .iter()
                .any(|s| s == STEP_CHECKPOINT)
        {
            match self.ctx.agent.fence(&self.source_node(), &id).await {
                Ok(true) => return Ok(Undone::Committed),
                Ok(false) | Err(AgentError::UnknownMigration { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A target that vouches that no copy runs there (every restore refused before it
        // began) lets the source resume at once; otherwise the target Pod goes first, so
        // that the workload never runs twice.
        let mut target_clear = self.status.target.is_none();
        if self.status.target.is_some() {
            match self.ctx.agent.abort(&self.target_node(), &id).await {
                Ok(op) => target_clear = op.no_copy,
                Err(AgentError::UnknownMigration { .. }) => {}
                Err(e) => warn!(
                    "aborting at the target: {e}; deleting the target pod and resuming the source anyway"
                ),
            }
            if !target_clear {
                self.delete_target_pod().await?;
            }
        }
        if self.status.source.is_some() {
            match self.ctx.agent.abort(&self.source_node(), &id).await {
                // What Abort answered counts: a source that did not resume is not rolled
                // back (retried instead).
                Ok(op) if op.state == OpState::Failed => {
                    return Err(AgentError::Rejected {
                        node: self.source_node().to_string(),
                        message: format!("the source did not resume: {}", op.message),
                    }
                    .into());
                }
                Ok(_) | Err(AgentError::UnknownMigration { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // It runs again: back into its Services (a failure retries the rollback,
            // whose steps are all idempotent, rather than leave it out of them).
            self.source_serving(serving::Why::Resumed).await?;
        }
        if target_clear {
            // No copy ran there; the source runs again whether or not the target's
            // apiserver answers now (a failure here retries the rollback).
            self.delete_target_pod().await?;
        }
        Ok(Undone::Undone)
    }

    async fn delete_target_pod(&self) -> Result<(), Error> {
        let Some(t) = &self.status.target else {
            return Ok(());
        };
        let pods = self.target_pods().await?;
        let uid = self.m.uid().unwrap_or_default();
        let ours = |p: &Pod| p.annotations().get(MIGRATION_ANNOTATION) == Some(&uid);
        match bounded("reading the target Pod", pods.get_opt(&t.pod)).await? {
            Some(p) if ours(&p) => {}
            _ => return Ok(()),
        }
        let dp = DeleteParams::default().grace_period(1);
        match bounded("deleting the target Pod", pods.delete(&t.pod, &dp)).await {
            Ok(_) => {}
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
        let deadline = Instant::now() + TARGET_GONE_TIMEOUT;
        while Instant::now() < deadline {
            match bounded("reading the target Pod", pods.get_opt(&t.pod)).await? {
                Some(p) if ours(&p) => tokio::time::sleep(POLL).await,
                _ => return Ok(()),
            }
        }
        warn!(pod = %t.pod, "the target Pod is not gone after {TARGET_GONE_TIMEOUT:?}; resuming the source anyway");
        Ok(())
    }
}

/// Whether the target Pod is ready to receive.
enum Readiness {
    Ready,
    /// Not yet, within [`TARGET_READY_TIMEOUT`].
    Waiting,
    /// It cannot become ready, or did not in time: why.
    Stuck(String),
}

/// What a rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undone {
    /// Target removed, source resumed.
    Undone,
    /// Nothing: the source is past the point of no return.
    Committed,
}
