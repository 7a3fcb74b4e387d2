//! Choosing the target node and shaping the Pod that receives the workload. Pure
//! functions over API objects; the reconciler does the reads and writes.
pub use ferry_crds::INCOMING_ANNOTATION;
use ferry_crds::{CLAIM_ANNOTATION, MIGRATION_ANNOTATION};
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// Liqo's virtual nodes stand for a whole peer cluster; ferry's daemons never run there.
const LIQO_NODE_TYPE_LABEL: &str = "liqo.io/type";

/// Annotation on the target Pod naming the Pod it continues, `cluster/namespace/name`.
pub const SOURCE_ANNOTATION: &str = "ferry.dev/source";
/// The init container of a container target Pod: it holds the app containers back
/// until the node daemon opens it (must match ferry-node's staging contract).
pub const GATE_CONTAINER: &str = "ferry-restore-gate";

/// How target Pods are shaped (controller settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetShape {
    /// RuntimeClass whose handler is ferry-runtime (containers restore through it).
    pub runtime_class: String,
    /// Image of the gate init container: any image with `/pause` (the kubelet's
    /// sandbox image is on every node).
    pub gate_image: String,
}

impl Default for TargetShape {
    fn default() -> Self {
        TargetShape {
            runtime_class: "ferry".into(),
            gate_image: "registry.k8s.io/pause:3.10".into(),
        }
    }
}

/// Why a Pod cannot be moved as it is (checked before anything is touched).
pub fn unsupported(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(c) = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.restart_policy.as_deref() == Some("Always"))
    {
        return Some(format!(
            "init container {} is a sidecar (restartPolicy: Always); ferry does not move sidecars yet",
            c.name
        ));
    }
    if let Some(c) = spec
        .containers
        .iter()
        .find(|c| c.tty == Some(true) || c.stdin == Some(true))
    {
        return Some(format!(
            "container {} has a terminal or stdin attached (tty/stdin); ferry moves only detached containers",
            c.name
        ));
    }
    None
}

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
///
/// Containers: the Pod runs under ferry's RuntimeClass, whose runtime restores each app
/// container from the staged checkpoint instead of starting it; the source's init
/// containers already ran and are not run again; ferry's gate init container holds the
/// app containers back until the node daemon opens it. A VM Pod keeps its runtime and
/// is marked incoming: its launcher waits for the guest's state instead of booting.
pub fn target_pod(
    source: &Pod,
    name: &str,
    node: &str,
    migration_uid: &str,
    source_id: &str,
    vm: bool,
    shape: &TargetShape,
) -> Pod {
    let mut annotations: BTreeMap<String, String> = source
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        // The source's claim is not the target's.
        .filter(|(k, _)| {
            k != "kubectl.kubernetes.io/last-applied-configuration"
                && k != CLAIM_ANNOTATION
                && k != crate::owner::DELETION_COST_ANNOTATION
        })
        .collect();
    annotations.insert(MIGRATION_ANNOTATION.into(), migration_uid.into());
    annotations.insert(SOURCE_ANNOTATION.into(), source_id.into());
    let mut spec = source.spec.clone().unwrap_or_default();
    spec.node_name = Some(node.into());
    // A selector that pinned the source to its node would make the target's kubelet
    // reject the Pod; the target node is this Migration's choice.
    if let Some(sel) = spec.node_selector.as_mut() {
        sel.remove("kubernetes.io/hostname");
    }
    if vm {
        annotations.insert(INCOMING_ANNOTATION.into(), migration_uid.into());
    } else {
        spec.runtime_class_name = Some(shape.runtime_class.clone());
        spec.init_containers = Some(vec![gate_container(&shape.gate_image)]);
    }
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

/// The gate: pause waits until the daemon sends it SIGTERM, then exits 0. Locked down
/// so that it passes the restricted Pod Security level.
fn gate_container(image: &str) -> Container {
    serde_json::from_value(serde_json::json!({
        "name": GATE_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "securityContext": {
            "runAsUser": 65535, "runAsGroup": 65535, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
        }
    }))
    .expect("gate container is valid")
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
    fn sidecars_and_terminals_are_refused_before_anything_moves() {
        let pod = |spec: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
        };
        assert_eq!(
            unsupported(&pod(
                json!({"containers": [{"name": "a"}], "initContainers": [{"name": "setup"}]})
            )),
            None
        );
        let sidecar = pod(
            json!({"containers": [{"name": "a"}], "initContainers": [{"name": "log", "restartPolicy": "Always"}]}),
        );
        assert!(
            unsupported(&sidecar)
                .unwrap()
                .contains("init container log is a sidecar")
        );
        let tty = pod(json!({"containers": [{"name": "a", "tty": true}]}));
        assert!(
            unsupported(&tty)
                .unwrap()
                .contains("container a has a terminal")
        );
    }

    #[test]
    fn target_pod_keeps_the_spec_binds_the_node_and_marks_the_migration() {
        let source: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                          "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "x"}},
            "spec": {"nodeName": "a", "containers": [{"name": "c", "image": "busybox"}],
                     "nodeSelector": {"kubernetes.io/hostname": "a", "zone": "z1"}}
        }))
        .unwrap();
        let pod = target_pod(
            &source,
            "web",
            "b",
            "uid-1",
            "east/shop/web",
            false,
            &TargetShape::default(),
        );
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("b"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("ferry"));
        let sel = spec.node_selector.clone().unwrap();
        assert_eq!(
            sel.get("zone").map(String::as_str),
            Some("z1"),
            "other constraints stay"
        );
        assert!(
            !sel.contains_key("kubernetes.io/hostname"),
            "the source's pin goes"
        );
        let inits = spec.init_containers.as_ref().unwrap();
        assert_eq!(inits.len(), 1);
        assert_eq!(inits[0].name, GATE_CONTAINER);
        let vm = target_pod(
            &source,
            "web",
            "b",
            "uid-1",
            "east/shop/web",
            true,
            &TargetShape::default(),
        );
        assert!(vm.spec.as_ref().unwrap().runtime_class_name.is_none());
        assert_eq!(
            vm.metadata
                .annotations
                .as_ref()
                .unwrap()
                .get(INCOMING_ANNOTATION)
                .map(String::as_str),
            Some("uid-1")
        );
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
