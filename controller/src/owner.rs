//! Pods a controller owns. Deleting the source Pod of a ReplicaSet (a Deployment's)
//! would make it create a replacement, and a target Pod that matches its selector
//! would be adopted at once and, not ready yet, scaled away. So within a cluster the
//! target Pod is created *held back*: one label of the ReplicaSet's selector withheld
//! (`pod-template-hash` for a Deployment's), which keeps it outside the ReplicaSet,
//! and the adoption recorded in [`ADOPT_ANNOTATION`]. At Completing, once the target
//! is Ready, the source gets the lowest `controller.kubernetes.io/pod-deletion-cost`
//! and the target its label and owner reference; then the source is deleted. Whichever
//! the ReplicaSet sees first, it never counts fewer than its replicas and never more
//! than one over: a surplus it resolves by deleting the source, the cheapest Pod.
//!
//! Refused, with the reason: StatefulSet Pods (their name is their identity, and the
//! target could only exist once the source is gone), DaemonSet Pods (one per node by
//! design), Pods of other controllers (Jobs, custom ones: ferry cannot tell what they
//! do with a second Pod), and any owned Pod moving to another cluster (its owner stays
//! behind and would replace it).
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::{Deserialize, Serialize};

/// On a held-back target Pod: the [`Adoption`] to make at Completing, as JSON.
pub const ADOPT_ANNOTATION: &str = "ferry.dev/adopt";
/// The ReplicaSet controller deletes Pods with a lower cost first (beta since 1.22).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The lowest cost: the source goes first if the ReplicaSet scales down.
pub const LOWEST_DELETION_COST: &str = "-2147483648";

/// How a target Pod joins its source's ReplicaSet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Adoption {
    /// The owner reference the target gets (the source's, controller: true).
    pub owner: OwnerReference,
    /// The selector label withheld from the target until then: key and value.
    pub label: (String, String),
}

/// The source Pod's controller, if any: (kind, name).
pub fn controller_of(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// What a move of `pod` does about its controller: nothing (none), an adoption into
/// `rs` (the ReplicaSet named by its owner reference, as read; None: not found), or
/// why it cannot move.
pub fn adoption(
    pod: &Pod,
    rs: Option<&ReplicaSet>,
    across_clusters: bool,
) -> Result<Option<Adoption>, String> {
    let Some(owner) = controller_of(pod) else {
        return Ok(None);
    };
    let (kind, name) = (owner.kind.as_str(), owner.name.as_str());
    match kind {
        "DaemonSet" => {
            return Err(format!(
                "it belongs to DaemonSet {name}, which runs one on every node; DaemonSet Pods \
                 are never migrated"
            ));
        }
        "StatefulSet" => {
            return Err(format!(
                "it belongs to StatefulSet {name}: its name is its identity, and the target \
                 Pod could exist only once the source is gone; ferry does not move StatefulSet \
                 Pods"
            ));
        }
        "ReplicaSet" => {}
        _ => {
            return Err(format!(
                "it is owned by {kind} {name}, which would replace it; ferry moves Pods of \
                 ReplicaSets (and Deployments) only"
            ));
        }
    }
    if across_clusters {
        return Err(format!(
            "it is owned by ReplicaSet {name}, which stays in this cluster and would replace \
             it; ferry moves a ReplicaSet's Pods only within their cluster"
        ));
    }
    let Some(rs) = rs.filter(|rs| rs.metadata.uid.as_deref() == Some(owner.uid.as_str())) else {
        return Err(format!("its owner ReplicaSet {name} was not found"));
    };
    let match_labels = rs
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    // A Deployment's own hash first: the Pod stays in the Deployment's (and its
    // Services') selector meanwhile.
    let key = ["pod-template-hash"]
        .into_iter()
        .map(String::from)
        .find(|k| match_labels.contains_key(k))
        .or_else(|| match_labels.keys().next().cloned());
    let Some(key) = key else {
        return Err(format!(
            "ReplicaSet {name} selects its Pods by matchExpressions only; ferry holds a target \
             Pod outside a ReplicaSet by one of its matchLabels"
        ));
    };
    let Some(value) = labels.get(&key).cloned() else {
        return Err(format!(
            "it lacks label {key} of ReplicaSet {name}'s selector"
        ));
    };
    let mut owner = owner.clone();
    owner.block_owner_deletion = Some(true);
    Ok(Some(Adoption {
        owner,
        label: (key, value),
    }))
}

/// Shapes a target Pod to wait outside the ReplicaSet: the label withheld, the
/// adoption recorded on it.
pub fn hold_back(target: &mut Pod, a: &Adoption) {
    if let Some(labels) = target.metadata.labels.as_mut() {
        labels.remove(&a.label.0);
    }
    target
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            ADOPT_ANNOTATION.into(),
            serde_json::to_string(a).expect("json"),
        );
}

/// The Adoption a target Pod was created with, if any.
pub fn pending_adoption(target: &Pod) -> Option<Adoption> {
    let text = target
        .metadata
        .annotations
        .as_ref()?
        .get(ADOPT_ANNOTATION)?;
    serde_json::from_str(text).ok()
}

/// True once the target carries the owner reference (adopted).
pub fn adopted(target: &Pod, a: &Adoption) -> bool {
    target
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == a.owner.uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(owner: Option<(&str, &str)>) -> Pod {
        let refs: Vec<_> = owner
            .into_iter()
            .map(|(kind, name)| {
                json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "rs-uid", "controller": true})
            })
            .collect();
        serde_json::from_value(
            json!({"metadata": {"name": "web-abc", "ownerReferences": refs,
            "labels": {"app": "web", "pod-template-hash": "h1"}}}),
        )
        .unwrap()
    }

    fn rs(match_labels: serde_json::Value) -> ReplicaSet {
        serde_json::from_value(json!({"metadata": {"name": "web-h1", "uid": "rs-uid"},
            "spec": {"selector": {"matchLabels": match_labels}}}))
        .unwrap()
    }

    #[test]
    fn a_deployments_pod_is_held_back_by_its_template_hash() {
        let rs = rs(json!({"app": "web", "pod-template-hash": "h1"}));
        let a = adoption(&pod(Some(("ReplicaSet", "web-h1"))), Some(&rs), false)
            .unwrap()
            .unwrap();
        assert_eq!(a.label, ("pod-template-hash".into(), "h1".into()));
        assert_eq!(a.owner.uid, "rs-uid");
        assert_eq!(a.owner.block_owner_deletion, Some(true));
        assert_eq!(adoption(&pod(None), None, true), Ok(None));
    }

    #[test]
    fn owners_ferry_cannot_satisfy_are_refused_with_the_reason() {
        let rs_ = rs(json!({"app": "web"}));
        let p = pod(Some(("ReplicaSet", "web-h1")));
        assert!(
            adoption(&p, Some(&rs_), true)
                .unwrap_err()
                .contains("only within their cluster")
        );
        assert!(adoption(&p, None, false).unwrap_err().contains("not found"));
        assert!(
            adoption(&p, Some(&rs(json!({}))), false)
                .unwrap_err()
                .contains("matchExpressions")
        );
        for (kind, want) in [
            ("StatefulSet", "its name is its identity"),
            ("DaemonSet", "never migrated"),
            ("Job", "owned by Job"),
        ] {
            let e = adoption(&pod(Some((kind, "x"))), Some(&rs_), false).unwrap_err();
            assert!(e.contains(want), "{kind}: {e}");
        }
        let a = adoption(&p, Some(&rs_), false).unwrap().unwrap();
        assert_eq!(a.label, ("app".into(), "web".into()));
    }

    #[test]
    fn a_held_back_target_is_outside_the_selector_until_adopted() {
        let rs = rs(json!({"app": "web", "pod-template-hash": "h1"}));
        let source = pod(Some(("ReplicaSet", "web-h1")));
        let a = adoption(&source, Some(&rs), false).unwrap().unwrap();
        let mut target = pod(None);
        hold_back(&mut target, &a);
        let labels = target.metadata.labels.clone().unwrap();
        assert!(!labels.contains_key("pod-template-hash"));
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(pending_adoption(&target), Some(a.clone()));
        assert!(!adopted(&target, &a));
        target.metadata.owner_references = Some(vec![a.owner.clone()]);
        assert!(adopted(&target, &a));
    }
}
