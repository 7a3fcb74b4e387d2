//! How the controller reaches node daemons: the [`NodeAgent`] trait, in domain terms.
//! `grpc` implements it over ferry's node API; `scripted` is the test double that lets
//! controller tests run the real reconciler against a real apiserver before (or
//! without) real daemons.
pub use ferry_crds::Receiver;
use ferry_crds::{CriuSettings, Strategy, TransferMode, WorkloadKind};

pub mod grpc;
pub mod scripted;

/// A node daemon: the node's name in a cluster (None: the controller's own cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeRef {
    pub cluster: Option<String>,
    pub node: String,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.cluster.as_deref().unwrap_or("local"),
            self.node
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub kind: WorkloadKind,
    pub containers: Vec<String>,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStoreAccess {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Everything a daemon needs to know about one migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The Migration's UID: daemons deduplicate calls by it.
    pub migration_id: String,
    /// The node that runs the workload now.
    pub source_node: NodeRef,
    pub source: PodId,
    pub target: PodId,
    /// What the source daemon described (containers until described).
    pub kind: WorkloadKind,
    pub strategy: Strategy,
    pub allow_post_copy: bool,
    pub transfer: TransferMode,
    pub object_store: Option<ObjectStoreAccess>,
    pub compress: bool,
    pub bandwidth_limit_bytes_per_sec: u64,
    pub criu: CriuSettings,
    /// The source containers' images (filled when the receiver is prepared, so the
    /// target node can check it has the very same images).
    pub images: Vec<ContainerImage>,
}

/// The image one source container runs, as its Pod's status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerImage {
    pub container: String,
    /// The spec's reference (`busybox:1.36`).
    pub image: String,
    /// The kubelet's `imageID` (a digest), empty when unknown.
    pub image_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    Aborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStage {
    Prepared,
    Checkpointing,
    Transferring,
    Restoring,
    Finalizing,
    Aborting,
}

/// A daemon's report on the operation it runs for a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpStatus {
    pub stage: OpStage,
    pub state: OpState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// What the daemon sent on the network (after compression).
    pub wire_bytes: u64,
    /// VMs: the guest's dirty rate in QEMU's last pass (0: not known).
    pub dirty_bytes_per_sec: u64,
    /// Measured by the side that paused the workload.
    pub downtime_ms: Option<u64>,
    pub message: String,
    /// The daemon's timed steps so far, each with the daemon's node.
    pub steps: Vec<ferry_crds::StepTiming>,
    /// Source: past the point of no return (post-copy handed the workload over).
    pub committed: bool,
    /// Abort at a destination: no copy of the workload runs there, nor can one start.
    pub no_copy: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The daemon could not be reached or answered with a transient error: try again.
    #[error("node daemon on {node} unavailable: {message}")]
    Unavailable { node: String, message: String },
    /// The daemon refused the request; repeating it will not help.
    #[error("node daemon on {node} refused: {message}")]
    Rejected { node: String, message: String },
    /// The daemon knows nothing of this migration (for example after it restarted).
    #[error("node daemon on {node} has no operation for migration {migration_id}")]
    UnknownMigration { node: String, migration_id: String },
}

impl AgentError {
    pub fn is_transient(&self) -> bool {
        matches!(self, AgentError::Unavailable { .. })
    }
}

/// The node daemon API as the controller uses it. Every call is idempotent per
/// migration ID; long work is started and then observed with [`NodeAgent::operation`].
#[async_trait::async_trait]
pub trait NodeAgent: Send + Sync {
    /// The daemon runtimes that can receive workloads on the node ("containers" needs
    /// the ferry runtime handler there).
    async fn receiving_runtimes(&self, node: &NodeRef) -> Result<Vec<String>, AgentError>;
    async fn describe(&self, node: &NodeRef, pod: &PodId) -> Result<WorkloadInfo, AgentError>;
    /// Destination: get ready to receive; returns where the source sends state.
    async fn prepare_receiver(&self, node: &NodeRef, plan: &Plan) -> Result<Receiver, AgentError>;
    async fn start_checkpoint(
        &self,
        node: &NodeRef,
        plan: &Plan,
        receiver: &Receiver,
    ) -> Result<OpStatus, AgentError>;
    /// Destination: restore as soon as the state arrives (may be called while the
    /// checkpoint still runs, so that restore overlaps the transfer).
    async fn start_restore(&self, node: &NodeRef, plan: &Plan) -> Result<OpStatus, AgentError>;
    /// Source, once the target runs the workload: remove the source copy.
    async fn finalize(&self, node: &NodeRef, migration_id: &str) -> Result<OpStatus, AgentError>;
    /// Source, before a rollback: stop the migration without resuming. `true`: it is
    /// past the point of no return (the target's copy is the only one that can go on);
    /// `false`: it will never hand over, and may be rolled back.
    async fn fence(&self, node: &NodeRef, migration_id: &str) -> Result<bool, AgentError>;
    /// Stop the migration: the source resumes, the destination cleans up.
    async fn abort(&self, node: &NodeRef, migration_id: &str) -> Result<OpStatus, AgentError>;
    async fn operation(&self, node: &NodeRef, migration_id: &str) -> Result<OpStatus, AgentError>;
    /// Returns once the migration's operation on `node` no longer runs (as soon as the
    /// daemon says so: the controller's cue to reconcile now rather than at its next
    /// poll, `crate::wake`). An agent that cannot be told never returns: polling alone
    /// then drives the migration.
    async fn operation_settled(
        &self,
        _node: &NodeRef,
        _migration_id: &str,
    ) -> Result<(), AgentError> {
        futures::future::pending().await
    }
}
