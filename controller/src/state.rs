//! The Migration state machine, in plain Rust: no Kubernetes or gRPC types, so every
//! transition is unit-tested. The reconciler asks [`decide`] what to do for the current
//! status, does it (idempotently), and feeds the [`Outcome`] to [`next`].
use ferry_crds::Phase;
use std::time::Duration;

/// Daemon operations the controller starts once per attempt; their names are recorded
/// in `status.startedSteps` so a restarted controller polls instead of starting again.
pub const STEP_PREPARE: &str = "prepare";
pub const STEP_CHECKPOINT: &str = "checkpoint";
pub const STEP_RESTORE: &str = "restore";
pub const STEP_FINALIZE: &str = "finalize";

/// What the reconciler must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No phase yet: record Pending and the start time.
    Initialize,
    /// Pending: check the workload, the target cluster and node.
    Validate,
    /// Preparing: create the target Pod and get the receiver ready.
    PrepareTarget,
    StartCheckpoint,
    AwaitCheckpoint,
    StartRestore,
    AwaitRestore,
    /// Completing: remove the source copy; the target is authoritative from here on.
    Complete,
    /// A failure is recorded: resume the source and remove the target copy.
    RollBack,
    /// The Migration is being deleted before it finished: roll back, end Cancelled.
    Cancel,
    /// A failure past the point of no return: nothing can be rolled back (the source
    /// cannot resume), so the Migration fails as it stands.
    GiveUp,
    /// Terminal phase: nothing to do.
    Done,
}

/// The parts of a Migration that decide the next step.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub phase: Option<Phase>,
    pub started_steps: Vec<String>,
    pub failed: bool,
    pub rolled_back: bool,
    pub deleting: bool,
    /// Past the point of no return (post-copy handed the workload to the target).
    pub committed: bool,
    /// Time since the migration started (None before it started).
    pub elapsed: Option<Duration>,
    /// Time since bytes last moved while copying (None when not copying).
    pub since_progress: Option<Duration>,
    pub completion_timeout: Duration,
    pub progress_timeout: Duration,
}

impl View {
    fn started(&self, step: &str) -> bool {
        self.started_steps.iter().any(|s| s == step)
    }
}

/// Why a timeout fired, when one did.
pub fn timed_out(v: &View) -> Option<&'static str> {
    let phase = v.phase?;
    // Once the target runs the workload, finishing is always better than rolling back.
    // Pending has nothing to time out: it validates in one pass, or waits in the queue,
    // and an attempt's clock starts once it leaves the queue.
    if phase.is_terminal()
        || matches!(phase, Phase::Pending | Phase::Completing)
        || v.committed
        || v.failed
    {
        return None;
    }
    if v.elapsed.is_some_and(|e| e > v.completion_timeout) {
        return Some("completion");
    }
    if matches!(phase, Phase::Checkpointing | Phase::Transferring)
        && v.since_progress.is_some_and(|s| s > v.progress_timeout)
    {
        return Some("progress");
    }
    None
}

/// What a fired timeout leads to: in Pending nothing was touched, so the Migration
/// simply fails; in later phases the failure is recorded and rolled back first.
pub fn timeout_outcome(phase: Phase) -> Outcome {
    if phase == Phase::Pending {
        Outcome::Invalid
    } else {
        Outcome::StepFailed
    }
}

pub fn decide(v: &View) -> Step {
    let Some(phase) = v.phase else {
        return if v.deleting {
            Step::Cancel
        } else {
            Step::Initialize
        };
    };
    if phase.is_terminal() {
        return Step::Done;
    }
    if phase == Phase::Completing {
        return Step::Complete;
    }
    // Past the point of no return only going forward keeps the workload: deleting the
    // Migration waits, and a failure cannot be rolled back.
    if v.committed && v.failed {
        return Step::GiveUp;
    }
    if v.deleting && !v.committed {
        return Step::Cancel;
    }
    if v.failed && !v.rolled_back && !v.committed {
        return Step::RollBack;
    }
    match phase {
        Phase::Pending => Step::Validate,
        Phase::Preparing => Step::PrepareTarget,
        Phase::Checkpointing | Phase::Transferring if !v.started(STEP_CHECKPOINT) => {
            Step::StartCheckpoint
        }
        Phase::Checkpointing | Phase::Transferring => Step::AwaitCheckpoint,
        Phase::Restoring if !v.started(STEP_RESTORE) => Step::StartRestore,
        Phase::Restoring => Step::AwaitRestore,
        // Covered above; kept exhaustive for the compiler.
        Phase::Completing => Step::Complete,
        Phase::Succeeded | Phase::Failed | Phase::Cancelled | Phase::RolledBack => Step::Done,
    }
}

/// What a step achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Initialized,
    /// The request cannot be carried out; nothing was touched.
    Invalid,
    Validated,
    TargetReady,
    /// The daemon operation runs; `transferring` once bytes flow to the target.
    InProgress {
        transferring: bool,
    },
    CheckpointDone,
    RestoreDone,
    Completed,
    /// A step failed after something was touched: roll back.
    StepFailed,
    /// Rollback finished; `retry` when the failure policy allows another attempt.
    RolledBack {
        retry: bool,
    },
    Cancelled,
    /// A rollback or cancel found the source past the point of no return: nothing was
    /// undone, the migration goes on forward.
    Committed,
    /// Past the point of no return, a step failed: the workload cannot be recovered.
    Lost,
    /// Valid, but the limits on migrations at once are taken: wait in Pending.
    Queued,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no transition from {from:?} on {outcome:?}")]
pub struct IllegalTransition {
    pub from: Option<Phase>,
    pub outcome: Outcome,
}

/// The phase after `outcome` in phase `from`.
pub fn next(from: Option<Phase>, outcome: &Outcome) -> Result<Phase, IllegalTransition> {
    use Outcome as O;
    use Phase as P;
    let to = match (from, outcome) {
        (_, O::Cancelled) if !from.is_some_and(|p| p.is_terminal() || p == P::Completing) => {
            P::Cancelled
        }
        (None, O::Initialized) => P::Pending,
        (Some(P::Pending), O::Invalid) => P::Failed,
        (Some(P::Pending), O::Validated) => P::Preparing,
        (Some(P::Pending), O::Queued) => P::Pending,
        (Some(P::Preparing), O::TargetReady) => P::Checkpointing,
        (Some(P::Preparing), O::InProgress { .. }) => P::Preparing,
        (
            Some(P::Checkpointing),
            O::InProgress {
                transferring: false,
            },
        ) => P::Checkpointing,
        (Some(P::Checkpointing | P::Transferring), O::InProgress { transferring: true }) => {
            P::Transferring
        }
        (
            Some(P::Transferring),
            O::InProgress {
                transferring: false,
            },
        ) => P::Transferring,
        (Some(P::Checkpointing | P::Transferring), O::CheckpointDone) => P::Restoring,
        (Some(P::Restoring), O::InProgress { .. }) => P::Restoring,
        (Some(P::Restoring), O::RestoreDone) => P::Completing,
        (Some(P::Completing), O::InProgress { .. }) => P::Completing,
        (Some(P::Completing), O::Completed) => P::Succeeded,
        (Some(p @ (P::Checkpointing | P::Transferring | P::Restoring)), O::Committed) => p,
        (Some(P::Checkpointing | P::Transferring | P::Restoring), O::Lost) => P::Failed,
        // A failure keeps the phase it happened in until the rollback finished.
        (
            Some(p @ (P::Preparing | P::Checkpointing | P::Transferring | P::Restoring)),
            O::StepFailed,
        ) => p,
        (
            Some(P::Preparing | P::Checkpointing | P::Transferring | P::Restoring),
            O::RolledBack { retry: true },
        ) => P::Preparing,
        (
            Some(P::Preparing | P::Checkpointing | P::Transferring | P::Restoring),
            O::RolledBack { retry: false },
        ) => P::RolledBack,
        _ => {
            return Err(IllegalTransition {
                from,
                outcome: outcome.clone(),
            });
        }
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: Option<Phase>) -> View {
        View {
            phase,
            completion_timeout: Duration::from_secs(600),
            progress_timeout: Duration::from_secs(150),
            ..Default::default()
        }
    }

    #[test]
    fn happy_path_walks_every_phase_in_order() {
        let steps = [
            (None, Outcome::Initialized, Phase::Pending),
            (Some(Phase::Pending), Outcome::Validated, Phase::Preparing),
            // The target Pod not ready yet: the reconcile requeues, the phase stays.
            (
                Some(Phase::Preparing),
                Outcome::InProgress {
                    transferring: false,
                },
                Phase::Preparing,
            ),
            (
                Some(Phase::Preparing),
                Outcome::TargetReady,
                Phase::Checkpointing,
            ),
            (
                Some(Phase::Checkpointing),
                Outcome::InProgress { transferring: true },
                Phase::Transferring,
            ),
            (
                Some(Phase::Transferring),
                Outcome::CheckpointDone,
                Phase::Restoring,
            ),
            (
                Some(Phase::Restoring),
                Outcome::RestoreDone,
                Phase::Completing,
            ),
            (
                Some(Phase::Completing),
                Outcome::Completed,
                Phase::Succeeded,
            ),
        ];
        for (from, outcome, to) in steps {
            assert_eq!(next(from, &outcome), Ok(to), "{from:?} on {outcome:?}");
        }
    }

    #[test]
    fn decide_starts_each_daemon_step_once() {
        let mut v = view(Some(Phase::Checkpointing));
        assert_eq!(decide(&v), Step::StartCheckpoint);
        v.started_steps.push(STEP_CHECKPOINT.into());
        assert_eq!(decide(&v), Step::AwaitCheckpoint);
        v.phase = Some(Phase::Restoring);
        assert_eq!(decide(&v), Step::StartRestore);
        v.started_steps.push(STEP_RESTORE.into());
        assert_eq!(decide(&v), Step::AwaitRestore);
    }

    #[test]
    fn deleting_cancels_unless_the_target_already_runs() {
        for phase in [
            Phase::Pending,
            Phase::Preparing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Restoring,
        ] {
            let mut v = view(Some(phase));
            v.deleting = true;
            assert_eq!(decide(&v), Step::Cancel, "{phase:?}");
            assert_eq!(next(Some(phase), &Outcome::Cancelled), Ok(Phase::Cancelled));
        }
        let mut v = view(Some(Phase::Completing));
        v.deleting = true;
        assert_eq!(decide(&v), Step::Complete);
        assert!(next(Some(Phase::Completing), &Outcome::Cancelled).is_err());
        assert!(next(Some(Phase::Succeeded), &Outcome::Cancelled).is_err());
    }

    #[test]
    fn failure_rolls_back_then_retries_or_stops() {
        let mut v = view(Some(Phase::Restoring));
        v.failed = true;
        assert_eq!(decide(&v), Step::RollBack);
        assert_eq!(
            next(Some(Phase::Restoring), &Outcome::StepFailed),
            Ok(Phase::Restoring)
        );
        assert_eq!(
            next(Some(Phase::Restoring), &Outcome::RolledBack { retry: true }),
            Ok(Phase::Preparing)
        );
        assert_eq!(
            next(
                Some(Phase::Restoring),
                &Outcome::RolledBack { retry: false }
            ),
            Ok(Phase::RolledBack)
        );
        // Invalid input fails at once: nothing to roll back.
        assert_eq!(
            next(Some(Phase::Pending), &Outcome::Invalid),
            Ok(Phase::Failed)
        );
    }

    #[test]
    fn terminal_phases_do_nothing_and_accept_no_outcome() {
        for phase in [
            Phase::Succeeded,
            Phase::Failed,
            Phase::Cancelled,
            Phase::RolledBack,
        ] {
            assert_eq!(decide(&view(Some(phase))), Step::Done);
            assert!(next(Some(phase), &Outcome::Validated).is_err());
            assert!(next(Some(phase), &Outcome::StepFailed).is_err());
        }
    }

    #[test]
    fn completing_never_rolls_back() {
        assert!(next(Some(Phase::Completing), &Outcome::StepFailed).is_err());
        let mut v = view(Some(Phase::Completing));
        v.elapsed = Some(Duration::from_secs(10_000));
        assert_eq!(timed_out(&v), None);
    }

    #[test]
    fn a_queued_migration_never_times_out() {
        let mut v = view(Some(Phase::Pending));
        v.elapsed = Some(Duration::from_secs(10_000));
        assert_eq!(timed_out(&v), None);
        assert_eq!(
            next(Some(Phase::Pending), &Outcome::Queued),
            Ok(Phase::Pending)
        );
    }

    #[test]
    fn a_timeout_in_pending_fails_and_later_ones_roll_back() {
        let out = timeout_outcome(Phase::Pending);
        assert_eq!(next(Some(Phase::Pending), &out), Ok(Phase::Failed));
        for p in [
            Phase::Preparing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Restoring,
        ] {
            let out = timeout_outcome(p);
            assert_eq!(next(Some(p), &out), Ok(p), "{p:?} keeps its phase");
            let mut v = view(Some(p));
            v.failed = true;
            assert_eq!(decide(&v), Step::RollBack, "{p:?} rolls back");
        }
    }

    #[test]
    fn past_the_point_of_no_return_only_forward() {
        for (phase, forward) in [
            (Phase::Transferring, Step::AwaitCheckpoint),
            (Phase::Restoring, Step::AwaitRestore),
        ] {
            let mut v = view(Some(phase));
            v.started_steps = vec![STEP_CHECKPOINT.into(), STEP_RESTORE.into()];
            v.committed = true;
            v.deleting = true;
            assert_eq!(decide(&v), forward, "{phase:?}: deleting waits");
            v.elapsed = Some(Duration::from_secs(10_000));
            assert_eq!(timed_out(&v), None, "{phase:?}: no timeout rolls back");
            v.failed = true;
            assert_eq!(decide(&v), Step::GiveUp, "{phase:?}: no rollback");
            assert_eq!(next(Some(phase), &Outcome::Lost), Ok(Phase::Failed));
            // A rollback that found the source committed keeps the phase.
            assert_eq!(next(Some(phase), &Outcome::Committed), Ok(phase));
        }
        assert!(next(Some(Phase::Pending), &Outcome::Committed).is_err());
        assert!(next(Some(Phase::Succeeded), &Outcome::Lost).is_err());
    }

    #[test]
    fn timeouts_fire_only_while_they_apply() {
        let mut v = view(Some(Phase::Transferring));
        v.elapsed = Some(Duration::from_secs(601));
        assert_eq!(timed_out(&v), Some("completion"));
        v.elapsed = Some(Duration::from_secs(10));
        v.since_progress = Some(Duration::from_secs(151));
        assert_eq!(timed_out(&v), Some("progress"));
        v.phase = Some(Phase::Restoring);
        assert_eq!(timed_out(&v), None, "no byte counter while restoring");
    }
}
