//! The `Migration` resource: move one running Pod (containers or a VM) to another node
//! or cluster without restarting it.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Moves one running Pod to another node or cluster without restarting it. Containers
/// are checkpointed with CRIU and restored; a Pod that hosts a VM is live-migrated.
/// The spec cannot change once the migration has started; delete the Migration to
/// cancel it (the workload keeps running at the source).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    shortname = "mig",
    category = "ferry",
    doc = "Migration moves one running Pod to another node or cluster without restarting it.",
    status = "MigrationStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Workload", type_ = "string", json_path = ".spec.workload.pod"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.target.display"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.display"),
    printcolumn(name = "Downtime", type_ = "string", json_path = ".status.timings.downtime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Reason", type_ = "string", priority = 1, json_path = ".status.failure.reason"),
    printcolumn(name = "Waiting", type_ = "string", priority = 1, json_path = ".status.queued"),
    printcolumn(name = "Policy", type_ = "string", priority = 1, json_path = ".status.settings.policy"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec == oldSelf.spec"
    ).message("spec cannot change once the migration has started; delete this Migration and create a new one")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.transfer.mode != 'ObjectStore' || (has(self.strategy) && self.strategy == 'Cold')").message("transfer.mode ObjectStore moves containers with strategy Cold only (Live needs the direct connection to the source): set strategy: Cold"))]
pub struct MigrationSpec {
    /// The workload to move.
    pub workload: WorkloadRef,
    /// Where to move it. Omit `cluster` to move within this cluster; omit `node` to let
    /// ferry pick a ready node.
    pub target: TargetRef,
    /// How to move the state: `Live` keeps the workload running while most state is
    /// copied (VM pre-copy, container lazy pages); `Cold` stops it for the whole copy.
    /// Unset: the selecting MigrationPolicy's, else `Live` (`status.settings` shows
    /// what applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Allow switching to post-copy when pre-copy does not converge (live strategy).
    /// Unset: the selecting MigrationPolicy's, else false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// How state bytes travel between the node daemons.
    #[serde(default)]
    pub transfer: Transfer,
    /// Time limits; exceeding one fails the migration and rolls it back.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// What to do when a step fails.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Order among Migrations waiting for a slot (the controller's limits on how many
    /// run at once): higher goes first; Migrations that drain started go before all.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// CRIU options some container workloads need to be checkpointed at all. A dump
    /// that fails for want of one names it in the failure message.
    #[serde(default)]
    pub criu: CriuSettings,
}

/// Workload-specific CRIU options (containers; ignored for VM pods).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CriuSettings {
    /// Checkpoint and restore held file locks (`--file-locks`): databases, pid files.
    #[serde(default)]
    pub file_locks: bool,
    /// Allow unix sockets connected to peers outside the container (`--ext-unix-sk`).
    #[serde(default)]
    pub external_unix_sockets: bool,
    /// Established TCP connections: `Close` (default) closes them at the target, so
    /// peers see a reset and reconnect (the pod IP changes with the node); `Restore`
    /// restores them, which works only where the pod keeps its IP.
    #[serde(default)]
    pub tcp_connections: TcpConnections,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TcpConnections {
    #[default]
    Close,
    Restore,
}

/// The Pod to move, in the Migration's namespace. A Pod that hosts a VM (run by
/// ferry-launcher) is detected and live-migrated.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Name of the Pod.
    #[schemars(length(min = 1, max = 253))]
    pub pod: String,
}

/// Destination of the workload.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Target cluster: the cluster ID of a Liqo peer (ForeignCluster) or the name of a
    /// linked cluster (a kubeconfig Secret labelled `ferry.dev/cluster`). Empty: this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Target node name. Empty: the least loaded ready node other than the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Strategy {
    /// Stop the workload, copy its state, restore it (downtime grows with memory size).
    Cold,
    /// Copy while the workload runs and stop it only for the last part.
    #[default]
    Live,
}

/// How state bytes travel.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'ObjectStore' || has(self.objectStore)").message("transfer.objectStore (bucket and credentials) is required when transfer.mode is ObjectStore"))]
#[x_kube(validation = Rule::new("self.mode != 'ObjectStore' || (!self.compress && !has(self.bandwidthLimitMiBps))").message("transfer.compress and transfer.bandwidthLimitMiBps apply to Direct transfers; through a bucket the state moves as it is: unset them"))]
pub struct Transfer {
    /// `Direct`: a stream between the two node daemons (mutual TLS).
    /// `ObjectStore`: through an S3-compatible bucket.
    #[serde(default)]
    pub mode: TransferMode,
    /// Bucket settings; required when mode is ObjectStore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStore>,
    /// Compress state with zstd (level 1) on the wire: container bundles, CRIU's page
    /// pipes and the VM migration stream. `status.progress.wireBytes` shows the effect.
    #[serde(default)]
    pub compress: bool,
    /// Bandwidth cap in MiB/s on what the source sends, shared by all of the
    /// migration's streams and pipes (VMs: QEMU's max-bandwidth and
    /// max-postcopy-bandwidth); 0 or unset means no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bandwidth_limit_mi_bps: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TransferMode {
    #[default]
    Direct,
    ObjectStore,
}

/// An S3-compatible bucket that both clusters can reach.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStore {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// S3 endpoint URL, e.g. https://s3.example.com. Empty: AWS for the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region (default us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Key prefix for this migration's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Secret in the Migration's namespace with keys `accessKeyId` and `secretAccessKey`.
    pub credentials_secret: String,
}

/// Time limits in seconds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Each attempt must finish within this many seconds; a retry after a rollback
    /// starts its own clock. Unset: the selecting MigrationPolicy's
    /// `completionTimeoutPerGiBSeconds` × the workload's memory in GiB (at least 1),
    /// else 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub completion_seconds: Option<u32>,
    /// Fail when no byte moves for this many seconds while copying (default 150).
    #[serde(default = "default_progress")]
    #[schemars(range(min = 1, max = 86400))]
    pub progress_seconds: u32,
}

/// The completion timeout when neither the Migration nor a policy sets one.
pub const DEFAULT_COMPLETION_SECONDS: u32 = 600;
fn default_progress() -> u32 {
    150
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            completion_seconds: None,
            progress_seconds: default_progress(),
        }
    }
}

/// What happens when a step fails. The source is always resumed first: a failed
/// migration leaves the workload running exactly once, at the source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// How many times to try again after a rollback before giving up (default 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub max_retries: u32,
}

/// Observed state of a Migration, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Containers or VirtualMachine, as detected at the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_kind: Option<WorkloadKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Placement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Placement>,
    /// Where the source daemon sends state, as the target daemon announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<Receiver>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// Steps whose daemon operation was started, so a restarted controller never starts
    /// a finished step again (daemons also deduplicate by migration ID).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub started_steps: Vec<String>,
    /// Rollbacks so far (compared with spec.failurePolicy.maxRetries).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Past the point of no return: post-copy handed the workload to the target, whose
    /// copy is the only one that can go on. From here the migration completes forward:
    /// no rollback, no retry, and deleting the Migration waits for the end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub committed: bool,
    /// Why this valid Migration waits in Pending: the limits on migrations at once in
    /// this cluster and from its source node are taken (it starts when a slot frees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<String>,
    /// The settings this migration runs with, fixed when it leaves Pending: its spec's,
    /// else the selecting MigrationPolicy's, else the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    /// What this migration put in its bucket (transfer.mode ObjectStore), from the
    /// first upload until the objects are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<StoredObjects>,
}

/// A migration's objects in its bucket. Removed when it succeeds or is cancelled;
/// after a failure kept for the controller's `--failed-object-retention` (for a
/// post-mortem; they are encrypted with the migration's token, which the controller
/// forgets, so keeping them does not expose the workload's memory), then removed;
/// removed at once when the Migration is deleted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredObjects {
    pub state: ObjectsState,
    /// e.g. `s3://bucket/prefix/<migration-uid>/`.
    pub location: String,
    /// Retained: when the controller removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_after: Option<Time>,
    /// What the last removal did or why it failed (it is retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ObjectsState {
    /// The migration uses them (or a removal is still to succeed).
    Stored,
    /// Kept after a failure until removeAfter.
    Retained,
    Removed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    Pending,
    Preparing,
    Checkpointing,
    Transferring,
    Restoring,
    Completing,
    Succeeded,
    Failed,
    Cancelled,
    RolledBack,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::Cancelled | Phase::RolledBack
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Preparing => "Preparing",
            Phase::Checkpointing => "Checkpointing",
            Phase::Transferring => "Transferring",
            Phase::Restoring => "Restoring",
            Phase::Completing => "Completing",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
            Phase::RolledBack => "RolledBack",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Containers,
    VirtualMachine,
}

/// What a Migration runs with (`status.settings`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub strategy: Strategy,
    pub allow_post_copy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_mi_bps: Option<u32>,
    pub completion_seconds: u32,
    /// The MigrationPolicy that filled in what the spec left unset, if one selects
    /// the Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Where a copy of the workload runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Cluster name as the Migration names it; empty for this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub node: String,
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `cluster/node`, for `kubectl get`.
    pub display: String,
}

/// The target daemon's receiving side of one migration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Receiver {
    /// host:port of the state stream (direct transfer).
    pub endpoint: String,
    /// CRIU page servers, one per container (containers only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub page_servers: Vec<PageServer>,
    /// The migration's transfer token from the destination daemon. Held in memory
    /// only, never written to the status (anyone who can read Migrations would read
    /// it): the controller asks the destination again (PrepareReceiver is idempotent).
    #[serde(skip)]
    #[schemars(skip)]
    pub token: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PageServer {
    pub container: String,
    /// The pipe at the receiver's endpoint that reaches this container's page server.
    pub pipe: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub bytes_transferred: u64,
    /// 0 while unknown.
    pub bytes_total: u64,
    /// Bytes the sending daemon put on the network for it, after compression
    /// (`transfer.compress`): below bytesTransferred when compression paid off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes: Option<u64>,
    /// e.g. `512Mi/1Gi (50%)`, for `kubectl get`.
    pub display: String,
    /// When the byte count last grew (for timeouts.progressSeconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_at: Option<Time>,
    /// Bytes per second over the last second or more of the transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// VMs: bytes per second the guest dirtied during QEMU's last pre-copy pass; a
    /// pre-copy converges only while this stays below the link's rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes_per_second: Option<u64>,
    /// The sample the rate is measured from: bytesTransferred at rateSampledAtMs (Unix
    /// milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_sampled_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_sampled_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// startedAt in Unix milliseconds (Kubernetes times have whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Time the workload was not running, measured by the node daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Human form of downtimeMs, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// When each phase was entered, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTiming>,
    /// What the node daemons did and how long each step took, in milliseconds: the
    /// breakdown of the downtime (for containers: freeze, handover, dump/<container>,
    /// rootfs/<container>, send/<container> on the source; receive/<container>,
    /// restore/<container> on the target). Steps for several containers overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepTiming>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepTiming {
    pub name: String,
    /// The node that did it.
    pub node: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub start_ms: u64,
    pub duration_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTiming {
    pub phase: Phase,
    pub entered_at: Time,
    /// enteredAt in Unix milliseconds (enteredAt has whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_at_ms: Option<u64>,
    /// How long the migration was in this phase, once it left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Why the migration failed and in which phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    /// Machine-readable CamelCase reason, e.g. PodNotFound, CheckpointFailed, Timeout.
    pub reason: String,
    pub message: String,
    pub phase: Phase,
    /// Whether the source has been resumed (rollback finished).
    #[serde(default)]
    pub rolled_back: bool,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}
