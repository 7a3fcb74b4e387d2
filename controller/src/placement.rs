//! Choosing the target node and shaping the Pod that receives the workload. Pure
//! functions over API objects; the reconciler does the reads and writes.
use ferry_crds::MIGRATION_ANNOTATION;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// Liqo's virtual nodes stand for a whole peer cluster; ferry's daemons never run there.
const LIQO_NODE_TYPE_LABEL: &str = "liqo.io/type";

/// Annotation on the target Pod naming the Pod it continues, `cluster/namespace/name`.
pub const SOURCE_ANNOTATION: &str = "ferry.dev/source";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("node {0:?} not found in the target cluster")]
    NodeNotFound(String),
    #[error("node {0:?} is not Ready")]
    NodeNotReady(String),
    #[error("node {0:?} is cordoned (unschedulable)")]
    NodeUnschedulable(String),
    #[error("node {0:?} is a Liqo virtual node; choose a real node of the peer cluster")]
    VirtualNode(String),
    #[error("the workload already runs on node {0:?}; choose another target node")]
    SameNode(String),
    #[error("no ready, schedulable node in the target cluster besides the source node")]
    NoCandidate,
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn check(node: &Node, name: &str) -> Result<(), PlacementError> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if labels.get(LIQO_NODE_TYPE_LABEL).map(String::as_str) == Some("virtual-node") {
        return Err(PlacementError::VirtualNode(name.into()));
    }
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        return Err(PlacementError::NodeUnschedulable(name.into()));
    }
    if !ready(node) {
        return Err(PlacementError::NodeNotReady(name.into()));
    }
    Ok(())
}

/// The target node: `wanted` if it is usable, else the usable node with the fewest pods
/// (then by name). `exclude` is the source node when source and target share a cluster.
pub fn choose_node(
    nodes: &[Node],
    pods_per_node: &BTreeMap<String, usize>,
    wanted: Option<&str>,
    exclude: Option<&str>,
) -> Result<String, PlacementError> {
    let name_of = |n: &Node| n.metadata.name.clone().unwrap_or_default();
    if let Some(wanted) = wanted {
        if exclude == Some(wanted) {
            return Err(PlacementError::SameNode(wanted.into()));
        }
        let node = nodes
            .iter()
            .find(|n| name_of(n) == wanted)
            .ok_or_else(|| PlacementError::NodeNotFound(wanted.into()))?;
        check(node, wanted)?;
        return Ok(wanted.into());
    }
    nodes
        .iter()
        .map(name_of)
        .zip(nodes)
        .filter(|(name, node)| Some(name.as_str()) != exclude && check(node, name).is_ok())
        .min_by_key(|(name, _)| (pods_per_node.get(name).copied().unwrap_or(0), name.clone()))
        .map(|(name, _)| name)
        .ok_or(PlacementError::NoCandidate)
}

/// The Pod that receives the workload: the source's spec bound to `node`, marked with
/// the migration so a retry finds it instead of creating another.
pub fn target_pod(
    source: &Pod,
    name: &str,
    node: &str,
    migration_uid: &str,
    source_id: &str,
) -> Pod {
    let mut annotations: BTreeMap<String, String> = source
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "kubectl.kubernetes.io/last-applied-configuration")
        .collect();
    annotations.insert(MIGRATION_ANNOTATION.into(), migration_uid.into());
    annotations.insert(SOURCE_ANNOTATION.into(), source_id.into());
    let mut spec = source.spec.clone().unwrap_or_default();
    spec.node_name = Some(node.into());
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: source.metadata.namespace.clone(),
            labels: source.metadata.labels.clone(),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Name of the target Pod: the same name in another cluster (as Liqo keeps names),
/// a suffixed one within the same cluster.
pub fn target_pod_name(source_pod: &str, same_cluster: bool, migration_uid: &str) -> String {
    if !same_cluster {
        return source_pod.into();
    }
    let suffix: String = migration_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(5)
        .collect();
    let base: String = source_pod.chars().take(63 - 1 - suffix.len()).collect();
    format!("{base}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ready: bool, extra: serde_json::Value) -> Node {
        let mut v = json!({
            "metadata": {"name": name, "labels": {}},
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        });
        if let Some(labels) = extra.get("labels") {
            v["metadata"]["labels"] = labels.clone();
        }
        if let Some(u) = extra.get("unschedulable") {
            v["spec"]["unschedulable"] = u.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn picks_least_loaded_usable_node_other_than_source() {
        let nodes = vec![
            node("a", true, json!({})),
            node("b", true, json!({})),
            node("c", false, json!({})),
            node("d", true, json!({"unschedulable": true})),
            node(
                "v",
                true,
                json!({"labels": {"liqo.io/type": "virtual-node"}}),
            ),
            node("e", true, json!({})),
        ];
        let load = BTreeMap::from([("b".to_string(), 3), ("e".to_string(), 1)]);
        assert_eq!(choose_node(&nodes, &load, None, Some("a")), Ok("e".into()));
        assert_eq!(
            choose_node(&nodes, &BTreeMap::new(), None, Some("a")),
            Ok("b".into())
        );
    }

    #[test]
    fn explains_why_a_wanted_node_is_refused() {
        let nodes = vec![
            node("a", true, json!({})),
            node("c", false, json!({})),
            node(
                "v",
                true,
                json!({"labels": {"liqo.io/type": "virtual-node"}}),
            ),
        ];
        let none = BTreeMap::new();
        assert_eq!(
            choose_node(&nodes, &none, Some("a"), Some("a")),
            Err(PlacementError::SameNode("a".into()))
        );
        assert_eq!(
            choose_node(&nodes, &none, Some("c"), None),
            Err(PlacementError::NodeNotReady("c".into()))
        );
        assert_eq!(
            choose_node(&nodes, &none, Some("v"), None),
            Err(PlacementError::VirtualNode("v".into()))
        );
        assert_eq!(
            choose_node(&nodes, &none, Some("x"), None),
            Err(PlacementError::NodeNotFound("x".into()))
        );
        assert_eq!(
            choose_node(&nodes, &none, None, Some("a")),
            Err(PlacementError::NoCandidate)
        );
    }

    #[test]
    fn target_pod_keeps_the_spec_binds_the_node_and_marks_the_migration() {
        let source: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                          "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "x"}},
            "spec": {"nodeName": "a", "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap();
        let pod = target_pod(&source, "web", "b", "uid-1", "east/shop/web");
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("b"));
        assert_eq!(
            pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("busybox")
        );
        let ann = pod.metadata.annotations.unwrap();
        assert_eq!(
            ann.get(MIGRATION_ANNOTATION).map(String::as_str),
            Some("uid-1")
        );
        assert_eq!(ann.get("team").map(String::as_str), Some("x"));
        assert!(!ann.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        assert_eq!(target_pod_name("web", false, "ab-cd-ef"), "web");
        assert_eq!(target_pod_name("web", true, "ab-cd-ef"), "web-abcde");
    }
}
