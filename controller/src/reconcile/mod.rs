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

mod objects;
mod queue;
mod steps;
mod target;
mod validate;

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
    /// How long a failed migration's objects stay in its bucket (`objects.rs`).
    pub failed_object_retention: Duration,
    /// How many migrations run at once (`validate.rs`, `crate::queue`).
    pub limits: crate::queue::Limits,
    /// Held from a Pending Migration's look at the queue until its status is written,
    /// so that two never take the last slot at once.
    pub admission: Arc<tokio::sync::Mutex<()>>,
    /// The namespace the controller watches (None: all): the queue's scope.
    pub watch_namespace: Option<String>,
    /// Reconciles that daemons' finished operations ask for (`crate::wake`).
    pub wakeups: crate::wake::Wakeups,
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
    /// An apiserver call did not answer in time; the reconcile runs again.
    #[error("{0}")]
    Timeout(String),
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
            Error::Timeout(_) => "timeout",
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
    /// The queue's lock, from a look at the queue until the status is written.
    admission: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// This reconcile already waited (a slice of Preparing's wait for the target
    /// Pod): the next may come at once rather than after the poll interval.
    waited: bool,
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn ms_since(t: &Time) -> u64 {
    (Timestamp::now().as_millisecond() - t.0.as_millisecond()).max(0) as u64
}

/// Unix milliseconds (status times have whole seconds; these fields keep the rest).
fn now_ms() -> u64 {
    Timestamp::now().as_millisecond().max(0) as u64
}

/// Milliseconds since the migration's attempt started, from the precise field when
/// there is one.
fn attempt_ms(t: &Timings) -> Option<u64> {
    match (t.started_at_ms, &t.started_at) {
        (Some(ms), _) => Some(now_ms().saturating_sub(ms)),
        (None, Some(at)) => Some(ms_since(at)),
        (None, None) => None,
    }
}

impl<'a> Reconciler<'a> {
    fn new(m: &'a Migration, ctx: &'a Context, deleting: bool) -> Self {
        Reconciler {
            m,
            ctx,
            ns: m.namespace().unwrap_or_default(),
            deleting,
            status: m.status.clone().unwrap_or_default(),
            admission: None,
            waited: false,
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
                .and_then(attempt_ms)
                .map(Duration::from_millis),
            since_progress: s
                .progress
                .as_ref()
                .and_then(|p| p.last_progress_at.as_ref())
                .map(|t| Duration::from_millis(ms_since(t))),
            completion_timeout: Duration::from_secs(u64::from(self.settings().completion_seconds)),
            progress_timeout: Duration::from_secs(self.m.spec.timeouts.progress_seconds as u64),
        }
    }

    /// What this migration runs with: fixed in `status.settings` when it is validated;
    /// before that (or for a Migration validated by an older controller) its spec over
    /// the defaults.
    pub(super) fn settings(&self) -> ferry_crds::Settings {
        self.status
            .settings
            .clone()
            .unwrap_or_else(|| crate::policy::settings(&self.m.spec, None, 0))
    }

    async fn run(mut self) -> Result<Action, Error> {
        let before = self.status.phase;
        let view = self.view();
        if let Some(which) = state::timed_out(&view).filter(|_| !self.deleting) {
            let message = match which {
                "completion" => format!(
                    "not finished within {}s (status.settings.completionSeconds: the spec's \
                     timeouts.completionSeconds, else the MigrationPolicy's per GiB, else 600)",
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
            Step::Done => {
                let again = self.tend_objects().await;
                let action = self.commit(before).await?;
                return Ok(again.map(Action::requeue).unwrap_or(action));
            }
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
        if let Some(Outcome::InProgress { .. }) = outcome {
            self.waited = step == Step::PrepareTarget;
            // Still waiting for a daemon: be told when it is done (the poll stays).
            let node = match &step {
                Step::AwaitRestore | Step::StartRestore => Some(self.target_node()),
                Step::AwaitCheckpoint | Step::StartCheckpoint | Step::Complete => {
                    Some(self.source_node())
                }
                _ => None,
            };
            if let Some(node) = node {
                self.ctx.wakeups.follow(
                    self.ctx.agent.clone(),
                    node,
                    self.m.uid().unwrap_or_default(),
                    kube::runtime::reflector::ObjectRef::from_obj(self.m),
                );
            }
        }
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
        let objects_to_tend = self
            .status
            .objects
            .as_ref()
            .is_some_and(|o| o.state == ferry_crds::ObjectsState::Stored);
        Ok(match phase {
            // Objects of a finished migration: the next reconcile removes or keeps them.
            Some(p) if p.is_terminal() && objects_to_tend => {
                Action::requeue(Duration::from_millis(50))
            }
            Some(p) if p.is_terminal() => Action::await_change(),
            _ if phase != before || self.waited => Action::requeue(Duration::from_millis(50)),
            _ => Action::requeue(self.ctx.poll_interval),
        })
    }

    async fn entered(&mut self, phase: Phase, from: Option<Phase>) {
        let timings = self.status.timings.get_or_insert_with(Timings::default);
        enter_phase(timings, phase, now(), now_ms());
        if phase.is_terminal() {
            timings.completed_at = Some(now());
            timings.total_ms = attempt_ms(timings);
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
            (Phase::Pending, None) if self.status.queued.is_some() => (
                "Unknown",
                "Queued".into(),
                self.status.queued.clone().unwrap_or_default(),
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
            started_at_ms: Some(now_ms()),
            ..Default::default()
        });
        Outcome::Initialized
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
/// Records entering `phase` at `at` / `at_ms`, closing the duration of the phase before.
fn enter_phase(t: &mut Timings, phase: Phase, at: Time, at_ms: u64) {
    if let Some(prev) = t.phases.last_mut()
        && let Some(entered) = prev.entered_at_ms
    {
        prev.duration_ms = Some(at_ms.saturating_sub(entered));
    }
    t.phases.push(PhaseTiming {
        phase,
        entered_at: at,
        entered_at_ms: Some(at_ms),
        duration_ms: None,
    });
}

fn reset_for_retry(status: &mut MigrationStatus, now: Time) {
    status.attempts += 1;
    status.failure = None;
    status.started_steps.clear();
    status.receiver = None;
    status.progress = None;
    let t = status.timings.get_or_insert_with(Timings::default);
    t.started_at_ms = Some(now.0.as_millisecond().max(0) as u64);
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
        assert_eq!(t.started_at_ms, Some(2_000_000));
        assert_eq!(t.downtime_ms, None);
    }

    #[test]
    fn each_phase_gets_its_duration_in_milliseconds_when_the_next_begins() {
        let at = Time(Timestamp::from_second(1_000).unwrap());
        let mut t = Timings::default();
        enter_phase(&mut t, Phase::Preparing, at.clone(), 1_000_000);
        enter_phase(&mut t, Phase::Checkpointing, at.clone(), 1_000_180);
        enter_phase(&mut t, Phase::Succeeded, at, 1_000_250);
        let d: Vec<_> = t.phases.iter().map(|p| p.duration_ms).collect();
        // The same second for all three; the milliseconds tell them apart.
        assert_eq!(d, [Some(180), Some(70), None]);
        assert_eq!(t.phases[2].entered_at_ms, Some(1_000_250));
    }
}
