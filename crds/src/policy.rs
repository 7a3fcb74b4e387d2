//! `MigrationPolicy`: cluster-wide defaults for Migrations of selected workloads, and
//! what `kubectl drain` does with them.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Strategy;

/// Defaults for Migrations of the Pods it selects, and their eviction strategy. When
/// several policies select a Pod, the one with the highest `priority` wins, then the
/// most specific (more selector requirements), then the first by name. A field the
/// Migration sets wins over the policy; the Pod's `ferry.dev/eviction-strategy` label
/// wins over `evictionStrategy`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "MigrationPolicy",
    shortname = "migpol",
    doc = "MigrationPolicy sets defaults and the drain behaviour for the Migrations of the Pods it selects.",
    category = "ferry",
    printcolumn(
        name = "Eviction",
        type_ = "string",
        json_path = ".spec.evictionStrategy"
    ),
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.strategy"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicySpec {
    /// Namespaces whose Pods this policy covers (empty: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods this policy covers (empty: all in the selected namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Higher wins when several policies select a Pod.
    #[serde(default)]
    pub priority: i32,
    /// What draining a node does to a selected Pod.
    #[serde(default)]
    pub eviction_strategy: EvictionStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// Bandwidth cap per migration in MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bandwidth_limit_mi_bps: Option<u32>,
    /// Completion timeout per GiB of workload memory, in seconds (KubeVirt uses 150).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub completion_timeout_per_gi_b_seconds: Option<u32>,
    /// Where draining a node moves the Pods this policy selects: a cluster (a Liqo
    /// peer's cluster ID or a linked cluster's name) and optionally a node there.
    /// Unset: another node of the Pod's own cluster. Read by drain only: a Migration
    /// someone writes names its own target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_target: Option<crate::TargetRef>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum EvictionStrategy {
    /// Eviction proceeds as usual: the Pod is deleted.
    #[default]
    None,
    /// Eviction is refused and a Migration moves the Pod instead.
    LiveMigrate,
    /// Migrate when the Pod can be migrated, otherwise evict as usual.
    LiveMigrateIfPossible,
}
