//! What draining a node does to a Pod: the eviction strategy a Pod asks for, and what
//! the eviction webhook answers for it. Plain functions over API objects; the webhook
//! (`webhook.rs`) reads the Pod and its Migration, calls [`decide`] and acts on it.
//!
//! As KubeVirt does for VMs with `evictionStrategy: LiveMigrate`: an eviction of a Pod
//! that should move is refused with 429 (TooManyRequests) while a Migration moves it;
//! `kubectl drain` retries refused evictions and finishes once the source Pod is gone.
use ferry_crds::{EVICTION_STRATEGY_LABEL, EvictionStrategy, Migration, MigrationPolicy, Phase};
use k8s_openapi::api::core::v1::Pod;

pub mod guard;
pub mod webhook;

/// Label on the Migrations an eviction started: the node the Pod was evicted from.
pub const EVICTED_FROM_LABEL: &str = "ferry.dev/evicted-from";

/// The eviction strategy a Pod asks for with the label `ferry.dev/eviction-strategy`
/// (None without it: a MigrationPolicy may then give one). An unknown value is an error
/// naming the valid ones: a typo must not silently let a must-move Pod be killed.
pub fn strategy_label(pod: &Pod) -> Result<Option<EvictionStrategy>, String> {
    let Some(v) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(EVICTION_STRATEGY_LABEL))
    else {
        return Ok(None);
    };
    match v.as_str() {
        "None" => Ok(Some(EvictionStrategy::None)),
        "LiveMigrate" => Ok(Some(EvictionStrategy::LiveMigrate)),
        "LiveMigrateIfPossible" => Ok(Some(EvictionStrategy::LiveMigrateIfPossible)),
        other => Err(format!(
            "label {EVICTION_STRATEGY_LABEL}={other:?} is not an eviction strategy; use \
             LiveMigrate, LiveMigrateIfPossible or None"
        )),
    }
}

/// The MigrationPolicy that selects `pod` (`policy::select`), read from the cluster.
pub async fn selecting_policy(
    client: &kube::Client,
    pod: &Pod,
) -> Result<Option<MigrationPolicy>, kube::Error> {
    use kube::ResourceExt;
    let policies = kube::Api::<MigrationPolicy>::all(client.clone())
        .list(&Default::default())
        .await?
        .items;
    if policies.is_empty() {
        return Ok(None);
    }
    let ns = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get_opt(&pod.namespace().unwrap_or_default())
        .await?
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    Ok(crate::policy::select(&policies, &ns, pod.labels()).cloned())
}

/// Why a Pod cannot be moved on eviction, before any Migration exists.
pub fn not_movable(pod: &Pod) -> Option<String> {
    // A ReplicaSet's Pod moves within its cluster, adopted by it (the Migration checks
    // the ReplicaSet); every other owner is refused here, with the reason.
    if crate::owner::controller_of(pod).is_some_and(|o| o.kind != "ReplicaSet")
        && let Err(why) = crate::owner::adoption(pod, None, false)
    {
        return Some(why);
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
    {
        return Some("it is not scheduled to a node".into());
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        return Some(format!(
            "it is not running (phase {})",
            phase.unwrap_or("unknown")
        ));
    }
    crate::placement::unsupported(pod)
}

/// The webhook's answer to one eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let the eviction through (the Pod is deleted as usual).
    Allow(String),
    /// Create the Migration (named by the webhook), then refuse the eviction.
    StartMigration,
    /// Refuse the eviction with 429 and this message; drain retries.
    Refuse(String),
}

/// Decides an eviction of a Pod that asks for `strategy`, which cannot move for
/// `not_movable` (None: it can), given the Migration this eviction started before, if any.
pub fn decide(
    strategy: EvictionStrategy,
    not_movable: Option<&str>,
    existing: Option<&Migration>,
) -> Verdict {
    use EvictionStrategy as S;
    if strategy == S::None {
        return Verdict::Allow("eviction strategy None".into());
    }
    if let Some(m) = existing {
        let status = m.status.clone().unwrap_or_default();
        let name = kube::ResourceExt::name_any(m);
        return match status.phase {
            Some(Phase::Succeeded) => Verdict::Refuse(format!(
                "ferry moved this pod (Migration {name}); its source Pod is being removed"
            )),
            Some(p @ (Phase::Failed | Phase::RolledBack | Phase::Cancelled)) => {
                let why = status
                    .failure
                    .map(|f| format!("{}: {}", f.reason, f.message))
                    .unwrap_or_else(|| "cancelled".into());
                if strategy == S::LiveMigrateIfPossible {
                    Verdict::Allow(format!(
                        "Migration {name} ended {p} ({why}); evicting instead"
                    ))
                } else {
                    Verdict::Refuse(format!(
                        "the pod must migrate ({EVICTION_STRATEGY_LABEL}=LiveMigrate) and \
                         Migration {name} ended {p}: {why}. Fix the cause and delete the \
                         Migration to try again, or set the label to None to let it be evicted"
                    ))
                }
            }
            p => Verdict::Refuse(match status.queued {
                Some(why) => format!(
                    "ferry will migrate this pod away (Migration {name} waits for a slot: \
                     {why}); the eviction succeeds once it has moved"
                ),
                None => format!(
                    "ferry is migrating this pod away (Migration {name}, phase {}); the \
                     eviction succeeds once it has moved",
                    p.map(|p| p.as_str()).unwrap_or("New")
                ),
            }),
        };
    }
    match (strategy, not_movable) {
        (S::LiveMigrateIfPossible, Some(why)) => {
            Verdict::Allow(format!("it cannot be migrated ({why}); evicting instead"))
        }
        (_, Some(why)) => Verdict::Refuse(format!(
            "the pod must migrate ({EVICTION_STRATEGY_LABEL}=LiveMigrate) but cannot: {why}"
        )),
        (_, None) => Verdict::StartMigration,
    }
}

/// The name of the Migration an eviction of `pod` (`uid`) starts: one per Pod, so
/// drain's retries find it instead of starting another.
pub fn migration_name(pod: &str, uid: &str) -> String {
    let pod: String = pod.chars().take(200).collect();
    let uid: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("evict-{pod}-{uid}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::{Failure, MigrationSpec, MigrationStatus};

    fn pod(labels: serde_json::Value, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn migration(phase: Phase) -> Migration {
        let mut m = Migration::new(
            "evict-p-1234",
            serde_json::from_value::<MigrationSpec>(serde_json::json!({
                "workload": {"pod": "p"}, "target": {}
            }))
            .unwrap(),
        );
        m.status = Some(MigrationStatus {
            phase: Some(phase),
            failure: matches!(phase, Phase::Failed | Phase::RolledBack).then(|| Failure {
                reason: "NoCandidate".into(),
                message: "no ready node".into(),
                phase: Phase::Pending,
                rolled_back: false,
            }),
            ..Default::default()
        });
        m
    }

    #[test]
    fn the_label_names_the_strategy_and_a_typo_is_an_error() {
        let s = |v: serde_json::Value| strategy_label(&pod(v, "Running"));
        assert_eq!(s(serde_json::json!({})), Ok(None));
        assert_eq!(
            s(serde_json::json!({EVICTION_STRATEGY_LABEL: "LiveMigrate"})),
            Ok(Some(EvictionStrategy::LiveMigrate))
        );
        assert_eq!(
            s(serde_json::json!({EVICTION_STRATEGY_LABEL: "LiveMigrateIfPossible"})),
            Ok(Some(EvictionStrategy::LiveMigrateIfPossible))
        );
        let e = s(serde_json::json!({EVICTION_STRATEGY_LABEL: "livemigrate"})).unwrap_err();
        assert!(
            e.contains("\"livemigrate\"") && e.contains("LiveMigrate,"),
            "{e}"
        );
    }

    #[test]
    fn what_cannot_move_says_why() {
        assert_eq!(not_movable(&pod(serde_json::json!({}), "Running")), None);
        let pending = not_movable(&pod(serde_json::json!({}), "Pending")).unwrap();
        assert!(pending.contains("phase Pending"), "{pending}");
        let mut ds = pod(serde_json::json!({}), "Running");
        ds.metadata.owner_references = Some(vec![serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d", "uid": "u", "controller": true
        }))
        .unwrap()]);
        assert!(not_movable(&ds).unwrap().contains("DaemonSet"));
        let mut sts = ds.clone();
        sts.metadata.owner_references.as_mut().unwrap()[0].kind = "StatefulSet".into();
        let why = not_movable(&sts).unwrap();
        assert!(why.contains("StatefulSet d"), "{why}");
        // A ReplicaSet's Pod can move (adopted at the target; the Migration checks it).
        let mut rs = ds.clone();
        rs.metadata.owner_references.as_mut().unwrap()[0].kind = "ReplicaSet".into();
        assert_eq!(not_movable(&rs), None);
        let mut tty = pod(serde_json::json!({}), "Running");
        tty.spec.as_mut().unwrap().containers[0].tty = Some(true);
        assert!(not_movable(&tty).unwrap().contains("tty"));
    }

    #[test]
    fn evictions_are_decided_by_strategy_movability_and_the_migration_so_far() {
        use EvictionStrategy as S;
        assert!(matches!(decide(S::None, None, None), Verdict::Allow(_)));
        assert!(matches!(
            decide(S::None, Some("x"), None),
            Verdict::Allow(_)
        ));
        assert_eq!(decide(S::LiveMigrate, None, None), Verdict::StartMigration);
        assert_eq!(
            decide(S::LiveMigrateIfPossible, None, None),
            Verdict::StartMigration
        );
        // Not movable: must-move waits (and says why), if-possible is evicted.
        let Verdict::Refuse(why) = decide(S::LiveMigrate, Some("tty"), None) else {
            panic!()
        };
        assert!(why.contains("cannot: tty"), "{why}");
        assert!(matches!(
            decide(S::LiveMigrateIfPossible, Some("tty"), None),
            Verdict::Allow(_)
        ));
        // A Migration under way, or done, holds the eviction back.
        for p in [Phase::Pending, Phase::Checkpointing, Phase::Succeeded] {
            let m = migration(p);
            assert!(
                matches!(decide(S::LiveMigrate, None, Some(&m)), Verdict::Refuse(_)),
                "{p:?}"
            );
        }
        // A failed one: must-move waits with the failure, if-possible is evicted.
        let failed = migration(Phase::Failed);
        let Verdict::Refuse(why) = decide(S::LiveMigrate, None, Some(&failed)) else {
            panic!()
        };
        assert!(why.contains("NoCandidate: no ready node"), "{why}");
        assert!(matches!(
            decide(S::LiveMigrateIfPossible, None, Some(&failed)),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn one_migration_name_per_pod_within_kubernetes_limits() {
        assert_eq!(
            migration_name("web", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"),
            "evict-web-0b1c2d3e"
        );
        assert!(migration_name(&"x".repeat(253), "u").len() <= 253);
    }
}
