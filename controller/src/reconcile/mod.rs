//! The Migration reconciler: reads status, asks the state machine what to do, does it
//! through the cluster clients and the node agent, and writes status by server-side
//! apply. Each step is idempotent, so a repeated or resumed reconcile is harmless.
use crate::agent::{
    AgentError, NodeAgent, NodeRef, ObjectStoreAccess, OpStage, OpState, OpStatus, Plan, PodId,
};
use crate::clusters::{ClusterError, Clusters};
use crate::metrics::{Metrics, PhaseLabels};
use crate::state::{self, Outcome, STEP_CHECKPOINT, STEP_FINALIZE, STEP_RESTORE, Step, View};
use crate::{format, placement};
use ferry_crds::{
    CLAIM_ANNOTATION, FINALIZER, Failure, MIGRATION_ANNOTATION, Migration, MigrationStatus, Phase,
    PhaseTiming, Placement, Progress, Timings, TransferMode,
};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use target::Undone;
use tracing::{Instrument, info, info_span, warn};

mod target;

pub const FIELD_MANAGER: &str = "ferry-controller";

/// What every reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub clusters: Arc<Clusters>,
    pub agent: Arc<dyn NodeAgent>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Name of the controller's own cluster in placements (`east/node-1`).
    pub cluster_name: String,
    /// How often a running daemon operation is polled.
    pub poll_interval: Duration,
    /// How target Pods are shaped.
    pub target_shape: placement::TargetShape,
    /// Each prepared Migration's transfer token (by UID) until its checkpoint starts:
    /// memory only, never the status (see `ferry_crds::Receiver::token`).
    pub tokens: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Transition(#[from] state::IllegalTransition),
    /// The Migration is being deleted while the target already runs the workload: the
    /// finalizer stays until completion has finished.
    #[error("completing before the Migration can be deleted")]
    StillCompleting,
    #[error("Migration has no namespace")]
    NoNamespace,
    /// A write lost an optimistic-concurrency race twice; the reconcile runs again.
    #[error("{0}")]
    Conflict(String),
}

impl Error {
    /// Metric label for `error_policy`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Agent(_) => "agent",
            Error::Cluster(_) => "cluster",
            Error::Transition(_) => "transition",
            Error::StillCompleting => "still_completing",
            Error::NoNamespace => "no_namespace",
            Error::Conflict(_) => "conflict",
        }
    }
}

pub async fn reconcile(mig: Arc<Migration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = mig.namespace().ok_or(Error::NoNamespace)?;
    let span = info_span!("reconcile", migration = %format!("{ns}/{}", mig.name_any()));
    let started = Instant::now();
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, mig, |event| async {
        match event {
            Finalizer::Apply(m) => Reconciler::new(&m, &ctx, false).run().await,
            Finalizer::Cleanup(m) => Reconciler::new(&m, &ctx, true).run().await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.observe_reconcile(started.elapsed());
    result
}

pub fn error_policy(mig: Arc<Migration>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.observe_error(error.kind());
    warn!(migration = %mig.name_any(), kind = error.kind(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(2))
}

/// One reconcile of one Migration.
struct Reconciler<'a> {
    m: &'a Migration,
    ctx: &'a Context,
    ns: String,
    deleting: bool,
    status: MigrationStatus,
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn ms_since(t: &Time) -> u64 {
    (Timestamp::now().as_millisecond() - t.0.as_millisecond()).max(0) as u64
}

impl<'a> Reconciler<'a> {
    fn new(m: &'a Migration, ctx: &'a Context, deleting: bool) -> Self {
        Reconciler {
            m,
            ctx,
            ns: m.namespace().unwrap_or_default(),
            deleting,
            status: m.status.clone().unwrap_or_default(),
        }
    }

    fn view(&self) -> View {
        let s = &self.status;
        View {
            phase: s.phase,
            started_steps: s.started_steps.clone(),
            failed: s.failure.is_some(),
            rolled_back: s.failure.as_ref().is_some_and(|f| f.rolled_back),
            deleting: self.deleting,
            committed: s.committed,
            elapsed: s
                .timings
                .as_ref()
                .and_then(|t| t.started_at.as_ref())
                .map(|t| Duration::from_millis(ms_since(t))),
            since_progress: s
                .progress
                .as_ref()
                .and_then(|p| p.last_progress_at.as_ref())
                .map(|t| Duration::from_millis(ms_since(t))),
            completion_timeout: Duration::from_secs(self.m.spec.timeouts.completion_seconds as u64),
            progress_timeout: Duration::from_secs(self.m.spec.timeouts.progress_seconds as u64),
        }
    }

    async fn run(mut self) -> Result<Action, Error> {
        let before = self.status.phase;
        let view = self.view();
        if let Some(which) = state::timed_out(&view).filter(|_| !self.deleting) {
            let message = match which {
                "completion" => format!(
                    "not finished within {}s (spec.timeouts.completionSeconds)",
                    view.completion_timeout.as_secs()
                ),
                _ => format!(
                    "no progress for {}s (spec.timeouts.progressSeconds)",
                    view.progress_timeout.as_secs()
                ),
            };
            self.fail("Timeout", message);
            if let Some(phase) = before {
                self.status.phase = Some(state::next(before, &state::timeout_outcome(phase))?);
            }
            return self.commit(before).await;
        }
        let step = state::decide(&view);
        tracing::debug!(?step, phase = ?before, "step");
        let outcome = match step {
            Step::Done => return Ok(Action::await_change()),
            Step::Initialize => Some(self.initialize()),
            Step::Validate => Some(self.validate().await?),
            Step::PrepareTarget => Some(self.prepare_target().await?),
            Step::StartCheckpoint => Some(self.start_checkpoint().await?),
            Step::AwaitCheckpoint => Some(self.await_checkpoint().await?),
            Step::StartRestore => Some(self.start_restore().await?),
            Step::AwaitRestore => Some(self.await_restore().await?),
            Step::Complete => Some(self.complete().await?),
            Step::RollBack => Some(self.roll_back().await?),
            Step::Cancel => Some(self.cancel().await?),
            Step::GiveUp => Some(self.give_up()),
        };
        if let Some(outcome) = outcome {
            let next = state::next(before, &outcome)?;
            if outcome == (Outcome::RolledBack { retry: true }) {
                self.reset_for_retry();
            }
            self.status.phase = Some(next);
        }
        let deleting_unfinished =
            self.deleting && self.status.phase.is_some_and(|p| !p.is_terminal());
        let action = self.commit(before).await?;
        if deleting_unfinished {
            return Err(Error::StillCompleting);
        }
        Ok(action)
    }

    /// Records what changed: phase timing, condition, Event, metrics; writes status.
    async fn commit(mut self, before: Option<Phase>) -> Result<Action, Error> {
        let phase = self.status.phase;
        if let Some(p) = phase.filter(|_| phase != before) {
            self.entered(p, before).await;
        }
        self.status.observed_generation = self.m.metadata.generation;
        self.set_condition();
        let original = self.m.status.clone().unwrap_or_default();
        if self.status != original {
            let api: Api<Migration> = Api::namespaced(self.ctx.client.clone(), &self.ns);
            let patch = serde_json::json!({
                "apiVersion": "ferry.dev/v1alpha1",
                "kind": "Migration",
                "status": self.status,
            });
            api.patch_status(
                &self.m.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
        Ok(match phase {
            Some(p) if p.is_terminal() => Action::await_change(),
            _ if phase != before => Action::requeue(Duration::from_millis(50)),
            _ => Action::requeue(self.ctx.poll_interval),
        })
    }

    async fn entered(&mut self, phase: Phase, from: Option<Phase>) {
        let timings = self.status.timings.get_or_insert_with(Timings::default);
        timings.phases.push(PhaseTiming {
            phase,
            entered_at: now(),
        });
        if phase.is_terminal() {
            timings.completed_at = Some(now());
            timings.total_ms = timings.started_at.as_ref().map(ms_since);
            self.ctx
                .metrics
                .finished
                .get_or_create(&PhaseLabels {
                    phase: phase.to_string(),
                })
                .inc();
        }
        if phase == Phase::Succeeded
            && let Some(ms) = timings.downtime_ms
        {
            self.ctx.metrics.downtime.observe(ms as f64 / 1000.0);
        }
        let (type_, note) = match (phase, &self.status.failure) {
            (Phase::Failed | Phase::RolledBack, Some(f)) => {
                (EventType::Warning, format!("{}: {}", f.reason, f.message))
            }
            (Phase::Succeeded, _) => (
                EventType::Normal,
                format!(
                    "workload runs at {}; downtime {}",
                    self.status
                        .target
                        .as_ref()
                        .map(|t| t.display.as_str())
                        .unwrap_or("?"),
                    timings_downtime(&self.status)
                ),
            ),
            (Phase::Preparing, _) if from.is_some_and(|f| f != Phase::Pending) => (
                EventType::Warning,
                format!("retrying (attempt {})", self.status.attempts + 1),
            ),
            _ => (
                EventType::Normal,
                format!("{} -> {phase}", from.map(|f| f.as_str()).unwrap_or("New")),
            ),
        };
        info!(%phase, "phase changed");
        // Event notes are limited to 1024 bytes; the whole message stays in the status.
        let note = truncate(note, 1000);
        let event = KubeEvent {
            type_,
            reason: phase.to_string(),
            note: Some(note),
            action: "Migrate".into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.m.object_ref(&()))
            .await
        {
            warn!("publishing event: {e}");
        }
    }

    fn set_condition(&mut self) {
        let Some(phase) = self.status.phase else {
            return;
        };
        let (status, reason, message) = match (phase, &self.status.failure) {
            (Phase::Succeeded, _) => (
                "True",
                "Succeeded".to_string(),
                "the workload runs at the target".to_string(),
            ),
            (_, Some(f)) => ("False", f.reason.clone(), f.message.clone()),
            (Phase::Cancelled, None) => (
                "False",
                "Cancelled".into(),
                "deleted before it finished; the workload runs at the source".into(),
            ),
            (p, None) => ("Unknown", p.to_string(), format!("migration is {p}")),
        };
        let conditions = &mut self.status.conditions;
        let changed = conditions
            .iter()
            .find(|c| c.type_ == "Succeeded")
            .map(|c| c.status != status || c.reason != reason);
        if changed == Some(false) {
            return;
        }
        conditions.retain(|c| c.type_ != "Succeeded");
        conditions.push(Condition {
            type_: "Succeeded".into(),
            status: status.into(),
            reason,
            message,
            last_transition_time: now(),
            observed_generation: self.m.metadata.generation,
        });
    }

    fn fail(&mut self, reason: &str, message: impl Into<String>) {
        let message = message.into();
        warn!(reason, %message, "migration step failed");
        self.status.failure = Some(Failure {
            reason: reason.into(),
            message,
            phase: self.status.phase.unwrap_or(Phase::Pending),
            rolled_back: false,
        });
    }

    fn invalid(&mut self, reason: &str, message: impl Into<String>) -> Outcome {
        self.fail(reason, message);
        Outcome::Invalid
    }

    fn step_failed(&mut self, reason: &str, message: impl Into<String>) -> Outcome {
        self.fail(reason, message);
        Outcome::StepFailed
    }

    fn reset_for_retry(&mut self) {
        reset_for_retry(&mut self.status, now());
    }

    fn initialize(&mut self) -> Outcome {
        self.status.timings = Some(Timings {
            started_at: Some(now()),
            ..Default::default()
        });
        Outcome::Initialized
    }

    // ---- Pending: validate -------------------------------------------------------

    async fn validate(&mut self) -> Result<Outcome, Error> {
        let spec = &self.m.spec;
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let pod_name = &spec.workload.pod;
        let Some(pod) = pods.get_opt(pod_name).await? else {
            return Ok(self.invalid(
                "PodNotFound",
                format!("pod {}/{pod_name} not found", self.ns),
            ));
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(self.invalid(
                "PodTerminating",
                format!("pod {}/{pod_name} is being deleted", self.ns),
            ));
        }
        let Some(source_node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return Ok(self.invalid(
                "PodNotScheduled",
                format!("pod {}/{pod_name} is not on a node yet", self.ns),
            ));
        };
        let pod_phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if pod_phase != "Running" {
            return Ok(self.invalid(
                "PodNotRunning",
                format!("pod {}/{pod_name} is {pod_phase}, not Running", self.ns),
            ));
        }
        if let Some(why) = placement::unsupported(&pod) {
            return Ok(self.invalid(
                "NotMigratable",
                format!("pod {}/{pod_name}: {why}", self.ns),
            ));
        }
        if let Some(other) = self.competing_migration().await? {
            return Ok(self.invalid(
                "AlreadyMigrating",
                format!("Migration {other} is already moving pod {pod_name}"),
            ));
        }
        let target_cluster = spec.target.cluster.clone().filter(|c| !c.is_empty());
        let target_client = match self.ctx.clusters.client(target_cluster.as_deref()).await {
            Ok(c) => c,
            Err(e @ ClusterError::Api(..)) => return Err(e.into()),
            Err(e) => {
                let reason = if matches!(e, ClusterError::NoCredentials(..)) {
                    "NoClusterCredentials"
                } else {
                    "UnknownCluster"
                };
                return Ok(self.invalid(reason, e.to_string()));
            }
        };
        let same_cluster = target_cluster.is_none();
        let nodes = Api::<Node>::all(target_client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let mut load = BTreeMap::new();
        for p in Api::<Pod>::all(target_client.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            if let Some(n) = p.spec.and_then(|s| s.node_name) {
                *load.entry(n).or_insert(0usize) += 1;
            }
        }
        let exclude = same_cluster.then_some(source_node.as_str());
        let target_node =
            match placement::choose_node(&nodes, &load, spec.target.node.as_deref(), exclude) {
                Ok(n) => n,
                Err(e) => return Ok(self.invalid(placement_reason(&e), e.to_string())),
            };
        if spec.transfer.mode == TransferMode::ObjectStore
            && let Err(message) = self.object_store_access().await?
        {
            return Ok(self.invalid("ObjectStoreCredentials", message));
        }
        let source_ref = NodeRef {
            cluster: None,
            node: source_node.clone(),
        };
        let pod_id = PodId {
            namespace: self.ns.clone(),
            name: pod_name.clone(),
            uid: pod.uid().unwrap_or_default(),
        };
        let info = match self.ctx.agent.describe(&source_ref, &pod_id).await {
            Ok(info) => info,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(self.invalid("NotMigratable", e.to_string())),
        };
        let target_display = target_cluster
            .clone()
            .unwrap_or_else(|| self.ctx.cluster_name.clone());
        self.status.workload_kind = Some(info.kind);
        self.status.source = Some(Placement {
            cluster: None,
            node: source_node.clone(),
            namespace: self.ns.clone(),
            pod: pod_name.clone(),
            uid: pod.uid(),
            display: format!("{}/{source_node}", self.ctx.cluster_name),
        });
        self.status.target = Some(Placement {
            cluster: target_cluster,
            node: target_node.clone(),
            namespace: self.ns.clone(),
            pod: placement::target_pod_name(
                pod_name,
                same_cluster,
                &self.m.uid().unwrap_or_default(),
            ),
            uid: None,
            display: format!("{target_display}/{target_node}"),
        });
        // Last, once nothing else refuses: of two Migrations validated at once, only
        // the one whose claim the apiserver accepts goes on.
        if let Some(other) = self.claim(&pod).await? {
            return Ok(self.invalid(
                "AlreadyMigrating",
                format!("Migration {other} is already moving pod {pod_name}"),
            ));
        }
        Ok(Outcome::Validated)
    }

    /// Claims the source Pod for this Migration: the annotation
    /// [`CLAIM_ANNOTATION`] `<name>/<uid>`, written with the Pod's resourceVersion as
    /// a precondition (optimistic concurrency on the apiserver, not a cache check).
    /// Returns the other Migration holding a live claim, if one does. A claim by a
    /// Migration that finished or no longer exists is stale and taken over. A lost
    /// race (409 Conflict) is an error: the reconcile runs again and sees the winner.
    async fn claim(&self, pod: &Pod) -> Result<Option<String>, Error> {
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let me = format!("{}/{}", self.m.name_any(), self.m.uid().unwrap_or_default());
        let mut pod = pod.clone();
        // Twice at most: a conflict means the Pod changed; read it again, and if a live
        // claim made it change, that Migration won.
        for _ in 0..2 {
            if let Some(held) = pod.annotations().get(CLAIM_ANNOTATION) {
                if *held == me {
                    return Ok(None);
                }
                if let Some(other) = self.live_claim(held).await? {
                    return Ok(Some(other));
                }
            }
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": pod.resource_version(),
                "annotations": {CLAIM_ANNOTATION: me},
            }});
            match pods
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => return Ok(None),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    pod = pods.get(&pod.name_any()).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "pod {}/{} keeps changing while this Migration claims it; trying again",
            self.ns,
            pod.name_any()
        )))
    }

    /// The name of the Migration behind a claim, when it still exists and is unfinished.
    async fn live_claim(&self, held: &str) -> Result<Option<String>, Error> {
        let Some((name, uid)) = held.split_once('/') else {
            return Ok(None);
        };
        let api: Api<Migration> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let live = api.get_opt(name).await?.is_some_and(|m| {
            m.uid().as_deref() == Some(uid)
                && !m
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_terminal)
        });
        Ok(live.then(|| name.to_string()))
    }

    /// Another unfinished Migration that already claimed the same Pod.
    async fn competing_migration(&self) -> Result<Option<String>, Error> {
        let api: Api<Migration> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let me = self.m.uid();
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find_map(|other| {
                let active = other
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p != Phase::Pending && !p.is_terminal());
                (other.uid() != me && active && other.spec.workload.pod == self.m.spec.workload.pod)
                    .then(|| other.name_any())
            }))
    }

    /// The bucket credentials from the Secret the spec names (Err: what is wrong).
    async fn object_store_access(
        &self,
    ) -> Result<Result<Option<ObjectStoreAccess>, String>, Error> {
        let Some(os) = &self.m.spec.transfer.object_store else {
            return Ok(Ok(None));
        };
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(secret) = secrets.get_opt(&os.credentials_secret).await? else {
            return Ok(Err(format!(
                "Secret {}/{} (transfer.objectStore.credentialsSecret) not found",
                self.ns, os.credentials_secret
            )));
        };
        let data = secret.data.unwrap_or_default();
        let key = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        let (Some(id), Some(secret_key)) = (key("accessKeyId"), key("secretAccessKey")) else {
            return Ok(Err(format!(
                "Secret {}/{} needs keys accessKeyId and secretAccessKey",
                self.ns, os.credentials_secret
            )));
        };
        Ok(Ok(Some(ObjectStoreAccess {
            endpoint: os.endpoint.clone().unwrap_or_default(),
            bucket: os.bucket.clone(),
            region: os.region.clone().unwrap_or_else(|| "us-east-1".into()),
            prefix: os.prefix.clone().unwrap_or_default(),
            access_key_id: id,
            secret_access_key: secret_key,
        })))
    }

    // ---- the daemon steps ----------------------------------------------------------

    fn source_node(&self) -> NodeRef {
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

    fn target_node(&self) -> NodeRef {
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

    async fn target_pods(&self) -> Result<Api<Pod>, Error> {
        let cluster = self.status.target.as_ref().and_then(|t| t.cluster.clone());
        let client = self.ctx.clusters.client(cluster.as_deref()).await?;
        Ok(Api::namespaced(client, &self.ns))
    }

    async fn plan(&self) -> Result<Plan, Error> {
        let spec = &self.m.spec;
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
            strategy: spec.strategy,
            allow_post_copy: spec.allow_post_copy,
            transfer: spec.transfer.mode,
            object_store,
            compress: spec.transfer.compress,
            bandwidth_limit_bytes_per_sec: spec.transfer.bandwidth_limit_mi_bps.unwrap_or(0) as u64
                * (1 << 20),
            criu: spec.criu.clone(),
            images: Vec::new(),
        })
    }

    fn record_progress(&mut self, op: &OpStatus) {
        let p = self.status.progress.get_or_insert_with(Progress::default);
        if op.bytes_done > p.bytes_transferred || p.last_progress_at.is_none() {
            p.last_progress_at = Some(now());
        }
        // Source and target report their own counters; the migration moved the larger.
        p.bytes_transferred = p.bytes_transferred.max(op.bytes_done);
        p.bytes_total = p.bytes_total.max(op.bytes_total);
        p.display = format::progress(p.bytes_transferred, p.bytes_total);
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
    fn observe(
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

    fn mark_started(&mut self, step: &str) {
        if !self.status.started_steps.iter().any(|s| s == step) {
            self.status.started_steps.push(step.into());
        }
    }

    /// Starts the checkpoint at the source and, right after, the restore at the target:
    /// the target restores as soon as the state arrives, so transfer and restore overlap
    /// the dump instead of waiting for this controller to notice that it finished.
    async fn start_checkpoint(&mut self) -> Result<Outcome, Error> {
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
        let op = self
            .ctx
            .agent
            .start_checkpoint(&self.source_node(), &plan, &receiver)
            .await;
        if op.is_err() {
            return self.observe(op, "CheckpointFailed", Outcome::CheckpointDone);
        }
        self.mark_started(STEP_CHECKPOINT);
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

    async fn await_checkpoint(&mut self) -> Result<Outcome, Error> {
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

    async fn start_restore(&mut self) -> Result<Outcome, Error> {
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

    async fn await_restore(&mut self) -> Result<Outcome, Error> {
        let op = self
            .ctx
            .agent
            .operation(&self.target_node(), &self.m.uid().unwrap_or_default())
            .await;
        self.observe(op, "RestoreFailed", Outcome::RestoreDone)
    }

    async fn roll_back(&mut self) -> Result<Outcome, Error> {
        if self.undo().await? == Undone::Committed {
            return Ok(self.committed_instead());
        }
        let retry = self.status.attempts < self.m.spec.failure_policy.max_retries;
        if !retry && let Some(f) = self.status.failure.as_mut() {
            f.rolled_back = true;
        }
        Ok(Outcome::RolledBack { retry })
    }

    async fn cancel(&mut self) -> Result<Outcome, Error> {
        if self.status.phase.is_some_and(|p| p != Phase::Pending)
            && self.undo().await? == Undone::Committed
        {
            return Ok(self.committed_instead());
        }
        Ok(Outcome::Cancelled)
    }

    /// A rollback or cancel found the source past the point of no return: nothing was
    /// undone; the migration goes on forward (and a deletion waits for it).
    fn committed_instead(&mut self) -> Outcome {
        self.status.committed = true;
        if let Some(f) = self.status.failure.take() {
            warn!(reason = %f.reason, "not rolled back: past the point of no return ({})", f.message);
        }
        Outcome::Committed
    }

    /// A failure past the point of no return: the source cannot resume, so the
    /// Migration fails as it stands, both Pods left for inspection.
    fn give_up(&mut self) -> Outcome {
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

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn timings_downtime(s: &MigrationStatus) -> String {
    s.timings
        .as_ref()
        .and_then(|t| t.downtime.clone())
        .unwrap_or_else(|| "unknown".into())
}

fn placement_reason(e: &placement::PlacementError) -> &'static str {
    use placement::PlacementError as P;
    match e {
        P::NodeNotFound(_) => "NodeNotFound",
        P::NodeNotReady(_) => "NodeNotReady",
        P::NodeUnschedulable(_) => "NodeUnschedulable",
        P::VirtualNode(_) => "VirtualNode",
        P::SameNode(_) => "SameNode",
        P::NoCandidate => "NoTargetNode",
    }
}

/// A new attempt after a rollback: its own clock (the completion timeout applies per
/// attempt; keeping the first attempt's start would fail a retry at once), no failure,
/// no steps started, no receiver, progress or step timings of the old attempt.
fn reset_for_retry(status: &mut MigrationStatus, now: Time) {
    status.attempts += 1;
    status.failure = None;
    status.started_steps.clear();
    status.receiver = None;
    status.progress = None;
    let t = status.timings.get_or_insert_with(Timings::default);
    t.started_at = Some(now);
    t.steps.clear();
    t.downtime_ms = None;
    t.downtime = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_restarts_the_clock_and_forgets_the_old_attempt() {
        let first = Time(Timestamp::from_second(1_000).unwrap());
        let later = Time(Timestamp::from_second(2_000).unwrap());
        let mut s = MigrationStatus {
            attempts: 1,
            started_steps: vec!["prepare".into(), "checkpoint".into()],
            timings: Some(Timings {
                started_at: Some(first),
                downtime_ms: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        };
        reset_for_retry(&mut s, later.clone());
        assert_eq!(s.attempts, 2);
        assert!(s.started_steps.is_empty());
        let t = s.timings.unwrap();
        assert_eq!(t.started_at, Some(later));
        assert_eq!(t.downtime_ms, None);
    }
}
