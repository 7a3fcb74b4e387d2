//! The workload-generic runtime trait the node daemon drives, and its domain types.
//!
//! One trait for every kind of workload (containerd containers through CRIU, QEMU
//! guests through QMP): the gRPC layer only converts to and from these types (see `convert.rs`) and
//! never knows which backend does the work. Long calls report through a
//! [`ProgressSink`]; the server turns that into `Operation` messages.
pub use crate::containers::staging::CriuOptions;
use crate::error::RuntimeError;
use ferry_transfer::{S3Config, Shaping};
use futures::future::BoxFuture;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// A pod, as Kubernetes names it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadRef {
    pub namespace: String,
    pub pod_name: String,
    /// Empty matches any uid.
    pub pod_uid: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.pod_name)?;
        if !self.pod_uid.is_empty() {
            write!(f, " (uid {})", self.pod_uid)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Containers,
    VirtualMachine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The CRI container name (`io.kubernetes.container.name`).
    pub name: String,
    /// The runtime's container id.
    pub id: String,
    pub pid: u32,
    pub rss_bytes: u64,
    /// Bytes in its writable layer (the rootfs diff a migration moves).
    pub writable_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadDescription {
    pub workload: WorkloadRef,
    pub kind: WorkloadKind,
    /// The runtime that claimed the pod ([`Runtime::name`]).
    pub runtime: String,
    pub containers: Vec<ContainerInfo>,
    pub memory_bytes: u64,
    /// Runtime-specific, carried unchanged from source to destination (a VM's guest
    /// spec as JSON); empty for containers.
    pub runtime_spec: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Stop, copy, restore (the copy streams while CRIU dumps).
    Cold,
    /// Iterative copy while running, then a short stop.
    PreCopy,
    /// Restore first, fault memory in from the source (CRIU lazy pages).
    PostCopy,
}

/// Whether a strategy can run on this node, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrategySupport {
    pub strategy: Strategy,
    pub available: bool,
    pub reason: String,
}

/// Destination side: what the source will send.
#[derive(Debug, Clone)]
pub struct ReceiverPlan {
    pub migration_id: String,
    pub workload: WorkloadDescription,
    pub target: WorkloadRef,
    pub strategy: Strategy,
    pub criu: CriuOptions,
    /// The images the source containers run (containers).
    pub images: Vec<ContainerImage>,
    /// The name the source daemon's certificate carries (the only peer that may send).
    pub source_peer: String,
    /// The migration's transfer token (this node granted it to `source_peer`).
    pub token: String,
    /// Compression and bandwidth cap of the migration's pipes (the source's choice:
    /// this side decompresses what it receives in kind).
    pub shaping: Shaping,
    /// `transfer.mode: ObjectStore`: the state comes through this bucket, not from the
    /// source directly.
    pub bucket: Option<S3Config>,
}

/// The image one source container runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerImage {
    pub container: String,
    pub image: String,
    /// The source kubelet's imageID (a digest); empty when unknown.
    pub image_id: String,
}

/// Where the source sends state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverInfo {
    pub receive_endpoint: String,
    /// (container name, pipe id) of a CRIU page server per container.
    pub page_servers: Vec<(String, String)>,
    /// The migration's transfer token, granted to the source.
    pub token: String,
}

/// Source side.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    pub migration_id: String,
    pub workload: WorkloadRef,
    pub strategy: Strategy,
    pub receive_endpoint: String,
    /// (container name, pipe id at `receive_endpoint`) per container (Cold).
    pub page_servers: Vec<(String, String)>,
    /// The migration's transfer token, from the destination.
    pub token: String,
    /// Keep the source resumable (frozen, not killed) until finalize or abort.
    pub leave_running: bool,
    pub criu: CriuOptions,
    /// Compression and bandwidth cap of everything this side sends for the migration.
    pub shaping: Shaping,
    /// `transfer.mode: ObjectStore`: the state goes into this bucket, sealed with the
    /// token, for the destination to fetch.
    pub bucket: Option<S3Config>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stage {
    #[default]
    Unspecified,
    Prepared,
    Checkpointing,
    Transferring,
    Restoring,
    Finalizing,
    Aborting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpState {
    #[default]
    Running,
    Succeeded,
    Failed,
    Aborted,
}

/// A snapshot of one long operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub migration_id: String,
    pub stage: Stage,
    pub state: OpState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes sent on the network, after compression (see `bytes_done` for before).
    pub wire_bytes: u64,
    /// VMs: what the guest dirtied per second in QEMU's last pass (0: not yet known).
    pub dirty_bytes_per_sec: u64,
    pub downtime_ms: u64,
    /// Time since the operation started, as of the last update; readers of a running
    /// operation use [`Progress::elapsed_now`], which advances between updates too.
    pub elapsed_ms: u64,
    pub started_unix_ms: u64,
    pub message: String,
    /// What this side did so far, in the order the steps ended.
    pub steps: Vec<Step>,
    /// Source: past the point of no return (see [`Handover`]).
    pub committed: bool,
}

impl Progress {
    /// Elapsed time as of `now_unix_ms`: still advancing while the operation runs
    /// (a CRIU dump or an upload may go for seconds between two byte counts).
    pub fn elapsed_now(&self, now_unix_ms: u64) -> u64 {
        match self.state {
            OpState::Running if self.started_unix_ms > 0 => now_unix_ms
                .saturating_sub(self.started_unix_ms)
                .max(self.elapsed_ms),
            _ => self.elapsed_ms,
        }
    }
}

/// One timed step of an operation (the per-step breakdown of a migration's downtime).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// e.g. `freeze`, `dump/app`, `send/app`, `receive/app`, `restore/app`.
    pub name: String,
    pub start_unix_ms: u64,
    pub duration_ms: u64,
}

/// Where a backend reports progress; cheap to clone, readers watch the latest value.
#[derive(Clone)]
pub struct ProgressSink {
    tx: watch::Sender<Progress>,
    started: std::time::Instant,
}

impl ProgressSink {
    pub fn new(migration_id: &str, stage: Stage) -> (ProgressSink, watch::Receiver<Progress>) {
        let (tx, rx) = watch::channel(Progress {
            migration_id: migration_id.to_string(),
            stage,
            started_unix_ms: unix_ms(),
            ..Default::default()
        });
        (
            ProgressSink {
                tx,
                started: std::time::Instant::now(),
            },
            rx,
        )
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.tx.send_modify(|p| {
            f(p);
            p.elapsed_ms = elapsed;
        });
    }

    pub fn stage(&self, stage: Stage, message: impl Into<String>) {
        let message = message.into();
        self.update(|p| {
            p.stage = stage;
            p.message = message;
        });
    }

    pub fn add_bytes(&self, n: u64) {
        self.update(|p| p.bytes_done += n);
    }

    pub fn add_wire_bytes(&self, n: u64) {
        self.update(|p| p.wire_bytes += n);
    }

    /// `raw` bytes moved as `wire` bytes on the network, counted as they go.
    pub fn add_moved(&self, raw: u64, wire: u64) {
        self.update(|p| {
            p.bytes_done += raw;
            p.wire_bytes += wire;
        });
    }

    /// `shaping` that also counts what it sends into this operation's progress, for
    /// page pipes whose length nobody knows beforehand.
    pub fn metered(&self, shaping: &ferry_transfer::Shaping) -> ferry_transfer::Shaping {
        let me = self.clone();
        ferry_transfer::Shaping {
            on_sent: Some(ferry_transfer::OnSent(std::sync::Arc::new(move |m| {
                me.add_moved(m.raw, m.wire)
            }))),
            ..shaping.clone()
        }
    }

    /// The guest's dirty rate as QEMU last measured it (kept while QEMU reports 0:
    /// between passes it has nothing new).
    pub fn set_dirty_rate(&self, bytes_per_sec: u64) {
        if bytes_per_sec > 0 {
            self.update(|p| p.dirty_bytes_per_sec = bytes_per_sec);
        }
    }

    /// Absolute counters, for backends that learn totals from elsewhere (QEMU).
    pub fn set_bytes(&self, done: u64, total: u64) {
        self.update(|p| {
            p.bytes_done = done;
            p.bytes_total = total;
        });
    }

    /// Records a step that started at `start_unix_ms` and ends now.
    pub fn step(&self, name: impl Into<String>, start_unix_ms: u64) {
        let step = Step {
            name: name.into(),
            start_unix_ms,
            duration_ms: unix_ms().saturating_sub(start_unix_ms),
        };
        self.update(|p| p.steps.push(step));
    }

    /// Records a step measured elsewhere (e.g. by `ferry-runtime`).
    pub fn step_measured(&self, step: Step) {
        self.update(|p| p.steps.push(step));
    }

    pub fn downtime_ms(&self, ms: u64) {
        self.update(|p| p.downtime_ms = ms);
    }

    /// The source passed its point of no return ([`Handover::commit`]).
    pub fn committed(&self) {
        self.update(|p| p.committed = true);
    }

    pub fn finish(&self, result: &Result<(), RuntimeError>) {
        self.update(|p| match result {
            Ok(()) => {
                p.state = OpState::Succeeded;
            }
            Err(RuntimeError::Aborted(why)) => {
                p.state = OpState::Aborted;
                p.message = why.clone();
            }
            Err(e) => {
                p.state = OpState::Failed;
                p.message = e.to_string();
            }
        });
    }

    pub fn latest(&self) -> Progress {
        self.tx.borrow().clone()
    }
}

/// Milliseconds since the Unix epoch, for timestamps that cross processes (the source's
/// freeze time travels with the bundle so the destination can measure downtime).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A backend that can move one kind of workload. Methods are idempotent per
/// `migration_id` where the server may repeat them.
pub trait Runtime: Send + Sync + 'static {
    /// Short name reported by `Version` and named by descriptions ("containers", "qemu").
    fn name(&self) -> &'static str;

    /// Which strategies this node can run, probed from its kernel and tools.
    fn strategies(&self) -> Vec<StrategySupport>;

    /// Whether this node can receive this runtime's workloads (containers need the
    /// ferry runtime handler; a runtime without it can still send).
    fn receives(&self) -> bool {
        true
    }

    /// `Ok(None)` when this runtime does not claim the pod. A runtime claims a pod only
    /// on evidence of its own (the VM runtime: a registered guest; the container
    /// runtime: containerd containers of the pod that host no guest), so at most one
    /// claims it; the server refuses a pod two runtimes claim.
    fn describe<'a>(
        &'a self,
        workload: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<Option<WorkloadDescription>, RuntimeError>>;

    /// Destination: get ready to receive; returns at once with where to send.
    fn prepare_receiver(
        &self,
        plan: ReceiverPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<ReceiverInfo, RuntimeError>>;

    /// Source: refuse a checkpoint that cannot work (workload stopped, request
    /// incomplete) before anything is frozen, so bad input is an RPC error.
    fn check_checkpoint<'a>(
        &'a self,
        plan: &'a CheckpointPlan,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Source: checkpoint and send to the receiver. Runs until the state is sent.
    fn checkpoint_out(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<(), RuntimeError>>;

    /// Destination: restore from what was (or is being) received. Runs until the workload
    /// runs here.
    fn restore_in<'a>(
        &'a self,
        migration_id: &'a str,
        target: &'a WorkloadRef,
        progress: ProgressSink,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Source, after success: remove the source copy. Destination: forget the staging.
    fn finalize<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Source: make sure the workload is never handed over from now on, unless it was
    /// already (post-copy): `Ok(true)` then, and nothing changes. Called before the
    /// controller removes the target copy of a rollback; the caller stops the running
    /// operation afterwards when this answers `Ok(false)`.
    fn fence<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<bool, RuntimeError>>;

    /// Source: resume the workload. Destination: remove whatever was received or
    /// restored, and say whether a copy may run here ([`Left`]).
    fn abort<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<Left, RuntimeError>>;

    /// Whether this runtime holds state for `migration_id` that no running operation
    /// knows of (recovered after a daemon restart): Abort and Finalize go to it.
    fn knows(&self, _migration_id: &str) -> bool {
        false
    }
}

/// What an Abort leaves on its node, for the controller's rollback order: a
/// destination that can vouch that no copy of the workload runs there lets the source
/// resume at once, without waiting for the target Pod to be deleted through its
/// (perhaps unreachable) apiserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// No copy runs here, and none can start for this migration: every restore was
    /// refused before it began.
    NoCopy,
    /// A copy runs here (a resumed source), or may (a destination whose restore had
    /// begun, or whose state this daemon cannot vouch for).
    MayRun,
}

/// The source's point of no return, decided once between the migration's own work
/// ([`Handover::commit`], right before post-copy hands the workload to the destination)
/// and a rollback ([`Handover::fence`]): whichever comes first wins, so a source either
/// hands over or stays resumable, never both.
#[derive(Debug, Default)]
pub struct Handover(std::sync::atomic::AtomicU8);

const RESUMABLE: u8 = 0;
const COMMITTED: u8 = 1;
const FENCED: u8 = 2;

impl Handover {
    /// A handover in the state a record says (`resumable: false` is committed).
    pub fn recovered(resumable: bool) -> Handover {
        Handover(std::sync::atomic::AtomicU8::new(if resumable {
            RESUMABLE
        } else {
            COMMITTED
        }))
    }

    /// The migration hands the workload over: true unless a rollback fenced it first.
    pub fn commit(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        matches!(
            self.0
                .compare_exchange(RESUMABLE, COMMITTED, SeqCst, SeqCst),
            Ok(_) | Err(COMMITTED)
        )
    }

    /// A rollback fences the source: true when it was already committed.
    pub fn fence(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        matches!(
            self.0.compare_exchange(RESUMABLE, FENCED, SeqCst, SeqCst),
            Err(COMMITTED)
        )
    }

    /// Whether the source may still resume.
    pub fn resumable(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst) != COMMITTED
    }
}

#[cfg(test)]
mod handover_tests {
    use super::Handover;

    #[test]
    fn the_first_of_commit_and_fence_wins() {
        let h = Handover::default();
        assert!(h.resumable());
        assert!(!h.fence(), "fenced before any handover");
        assert!(!h.commit(), "a fenced source must not hand over");
        assert!(h.resumable());
        let h = Handover::default();
        assert!(h.commit());
        assert!(h.commit(), "committing twice (several containers) is fine");
        assert!(h.fence(), "a fence after the handover reports it");
        assert!(!h.resumable());
        assert!(!Handover::recovered(false).resumable());
        assert!(Handover::recovered(true).resumable());
    }
}

#[cfg(test)]
mod progress_tests {
    use super::{OpState, Progress};

    #[test]
    fn a_running_operation_ages_between_updates_and_a_finished_one_stops() {
        let mut p = Progress {
            state: OpState::Running,
            started_unix_ms: 1_000,
            elapsed_ms: 10,
            ..Default::default()
        };
        assert_eq!(p.elapsed_now(6_000), 5_000);
        p.state = OpState::Succeeded;
        p.elapsed_ms = 4_200;
        assert_eq!(p.elapsed_now(60_000), 4_200);
    }
}
