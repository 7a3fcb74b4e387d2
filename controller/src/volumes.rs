//! Which of a Pod's volumes can go where the Pod goes. A pure check over API objects
//! (the reconciler reads the claims and volumes), made before anything is touched: a
//! Pod that would arrive with other files than it left with is refused, naming the
//! volume and why.
//!
//! | volume | container Pod | VM Pod |
//! |---|---|---|
//! | configMap, secret, projected, downwardAPI, image | re-created by the target kubelet | same |
//! | emptyDir (no subPath) | moved: packed while frozen, filled before the restore | refused (the VM runtime moves memory and devices only) |
//! | hostPath, every mount read-only | allowed: the target node must hold the same files | same |
//! | hostPath written to | refused (its files stay on the node) | refused, but ferry's VM root (`FERRY_VM_ROOT`) |
//! | PVC ReadWriteMany / ReadOnlyMany (read-only), not node-local, same cluster | re-attached by the target kubelet | same |
//! | PVC ReadWriteOnce / ReadWriteOncePod, node-local PV, or across clusters | refused | refused |
//! | nfs, cephfs, glusterfs | re-mounted by the target kubelet | same |
//! | anything else (generic ephemeral, inline CSI, iscsi, …) | refused: ferry cannot tell its contents come back | same |
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Volume};
use std::collections::BTreeMap;

/// Env var a VM pod's launcher reads: the node's VM root, a hostPath ferry's daemons
/// share with their VM pods (`ferry-launcher`).
pub const VM_ROOT_ENV: &str = "FERRY_VM_ROOT";

/// The claims a Pod's volumes name and the volumes bound to them, as read from the
/// source cluster (absent: not found).
#[derive(Debug, Default, Clone)]
pub struct Claims {
    pub claims: BTreeMap<String, PersistentVolumeClaim>,
    pub volumes: BTreeMap<String, PersistentVolume>,
}

/// The claim names of a Pod's PVC volumes (what [`Claims`] must hold).
pub fn claim_names(pod: &Pod) -> Vec<String> {
    volumes(pod)
        .iter()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
        .collect()
}

fn volumes(pod: &Pod) -> &[Volume] {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default()
}

/// Why the Pod's volumes cannot move (the first volume that cannot), or None.
pub fn not_movable(pod: &Pod, vm: bool, across_clusters: bool, claims: &Claims) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let containers: Vec<_> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mounts = |name: &str| {
        containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .filter(move |m| m.name == name)
            .collect::<Vec<_>>()
    };
    let vm_roots: Vec<&str> = containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .filter(|e| e.name == VM_ROOT_ENV)
        .filter_map(|e| e.value.as_deref())
        .collect();
    for v in volumes(pod) {
        let name = &v.name;
        let read_only = mounts(name).iter().all(|m| m.read_only == Some(true));
        let why = if v.config_map.is_some()
            || v.secret.is_some()
            || v.projected.is_some()
            || v.downward_api.is_some()
            || v.image.is_some()
            || v.nfs.is_some()
            || v.cephfs.is_some()
            || v.glusterfs.is_some()
        {
            None
        } else if v.empty_dir.is_some() {
            if vm {
                Some(format!(
                    "volume {name} is an emptyDir: ferry moves a VM's memory and devices, not \
                     its pod's emptyDir files"
                ))
            } else if mounts(name)
                .iter()
                .any(|m| m.sub_path.is_some() || m.sub_path_expr.is_some())
            {
                Some(format!(
                    "volume {name} is an emptyDir mounted with subPath: ferry moves only \
                     emptyDirs mounted whole"
                ))
            } else {
                None
            }
        } else if let Some(hp) = &v.host_path {
            if read_only || (vm && vm_roots.contains(&hp.path.as_str())) {
                None
            } else {
                Some(format!(
                    "volume {name} is a hostPath ({}) that the pod can write: its files stay \
                     on the node (mount it readOnly if every node holds the same files)",
                    hp.path
                ))
            }
        } else if let Some(pvc) = &v.persistent_volume_claim {
            claim(
                name,
                &pvc.claim_name,
                pvc.read_only == Some(true) || read_only,
                across_clusters,
                claims,
            )
        } else if v.ephemeral.is_some() {
            Some(format!(
                "volume {name} is a generic ephemeral volume: the target Pod would get a new, \
                 empty claim"
            ))
        } else {
            Some(format!(
                "volume {name} is of a kind ferry cannot move or re-attach (only configMap, \
                 secret, projected, downwardAPI, image, emptyDir, read-only hostPath, nfs, \
                 cephfs, glusterfs and shared PVCs)"
            ))
        };
        if why.is_some() {
            return why;
        }
    }
    None
}

fn claim(
    volume: &str,
    claim: &str,
    read_only: bool,
    across_clusters: bool,
    claims: &Claims,
) -> Option<String> {
    if across_clusters {
        return Some(format!(
            "volume {volume} is PVC {claim}, which exists only in this cluster: ferry does not \
             move volumes between clusters"
        ));
    }
    let Some(pvc) = claims.claims.get(claim) else {
        return Some(format!("volume {volume}: PVC {claim} not found"));
    };
    let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Some(format!("volume {volume}: PVC {claim} is not bound"));
    };
    let Some(pv) = claims.volumes.get(&pv_name) else {
        return Some(format!(
            "volume {volume}: PersistentVolume {pv_name} of PVC {claim} not found"
        ));
    };
    let spec = pv.spec.clone().unwrap_or_default();
    if spec.local.is_some() || spec.host_path.is_some() || pinned_to_one_node(pv) {
        return Some(format!(
            "volume {volume} is PVC {claim} on node-local storage (PersistentVolume {pv_name}): \
             its data cannot leave the node"
        ));
    }
    let modes = pvc
        .status
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .or_else(|| spec.access_modes.clone())
        .unwrap_or_default();
    let has = |m: &str| modes.iter().any(|x| x == m);
    if has("ReadWriteMany") || (has("ReadOnlyMany") && read_only) {
        return None;
    }
    Some(format!(
        "volume {volume} is PVC {claim} with access modes {modes:?}: the target Pod runs before \
         the source stops, so the volume must attach on two nodes at once (ReadWriteMany, or \
         ReadOnlyMany mounted readOnly)"
    ))
}

/// A PersistentVolume whose node affinity names exactly one node by hostname.
fn pinned_to_one_node(pv: &PersistentVolume) -> bool {
    let terms = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    !terms.is_empty()
        && terms.iter().all(|t| {
            t.match_expressions.iter().flatten().any(|e| {
                e.key == "kubernetes.io/hostname"
                    && e.operator == "In"
                    && e.values.as_ref().is_some_and(|v| v.len() == 1)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(volumes: serde_json::Value, mounts: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "volumeMounts": mounts,
                     "env": [{"name": VM_ROOT_ENV, "value": "/run/ferry/vms"}]}],
                     "volumes": volumes}
        }))
        .unwrap()
    }

    fn claims(pvc: serde_json::Value, pv: serde_json::Value) -> Claims {
        Claims {
            claims: BTreeMap::from([("data".into(), serde_json::from_value(pvc).unwrap())]),
            volumes: BTreeMap::from([("pv-1".into(), serde_json::from_value(pv).unwrap())]),
        }
    }

    #[test]
    fn recreated_and_moved_volumes_pass() {
        let p = pod(
            json!([{"name": "cfg", "configMap": {"name": "c"}},
                   {"name": "tok", "projected": {"sources": []}},
                   {"name": "scratch", "emptyDir": {}},
                   {"name": "certs", "hostPath": {"path": "/etc/ssl"}}]),
            json!([{"name": "scratch", "mountPath": "/s"},
                   {"name": "certs", "mountPath": "/etc/ssl", "readOnly": true}]),
        );
        assert_eq!(not_movable(&p, false, true, &Claims::default()), None);
    }

    #[test]
    fn node_bound_volumes_are_refused_with_their_name() {
        let rw_host = pod(
            json!([{"name": "logs", "hostPath": {"path": "/var/log/app"}}]),
            json!([{"name": "logs", "mountPath": "/l"}]),
        );
        let why = not_movable(&rw_host, false, false, &Claims::default()).unwrap();
        assert!(
            why.contains("volume logs is a hostPath (/var/log/app)"),
            "{why}"
        );
        let vm_root = pod(
            json!([{"name": "vm-root", "hostPath": {"path": "/run/ferry/vms"}}]),
            json!([{"name": "vm-root", "mountPath": "/run/ferry/vms"}]),
        );
        assert_eq!(not_movable(&vm_root, true, true, &Claims::default()), None);
        assert!(not_movable(&vm_root, false, false, &Claims::default()).is_some());
        let vm_scratch = pod(json!([{"name": "s", "emptyDir": {}}]), json!([]));
        assert!(
            not_movable(&vm_scratch, true, false, &Claims::default())
                .unwrap()
                .contains("emptyDir")
        );
        let sub = pod(
            json!([{"name": "s", "emptyDir": {}}]),
            json!([{"name": "s", "mountPath": "/s", "subPath": "x"}]),
        );
        assert!(
            not_movable(&sub, false, false, &Claims::default())
                .unwrap()
                .contains("subPath")
        );
        let eph = pod(json!([{"name": "e", "ephemeral": {}}]), json!([]));
        assert!(
            not_movable(&eph, false, false, &Claims::default())
                .unwrap()
                .contains("ephemeral")
        );
    }

    #[test]
    fn claims_move_only_when_shared_and_not_node_local() {
        let p = pod(
            json!([{"name": "vol", "persistentVolumeClaim": {"claimName": "data"}}]),
            json!([{"name": "vol", "mountPath": "/d"}]),
        );
        let pvc = |modes: serde_json::Value| {
            json!({"metadata": {"name": "data"}, "spec": {"volumeName": "pv-1"},
                   "status": {"accessModes": modes}})
        };
        let nfs =
            json!({"metadata": {"name": "pv-1"}, "spec": {"nfs": {"server": "s", "path": "/"}}});
        assert_eq!(
            not_movable(
                &p,
                false,
                false,
                &claims(pvc(json!(["ReadWriteMany"])), nfs.clone())
            ),
            None
        );
        let why = not_movable(
            &p,
            false,
            false,
            &claims(pvc(json!(["ReadWriteOnce"])), nfs.clone()),
        )
        .unwrap();
        assert!(
            why.contains("volume vol is PVC data with access modes"),
            "{why}"
        );
        let local = json!({"metadata": {"name": "pv-1"}, "spec": {"local": {"path": "/mnt/d"}}});
        let why = not_movable(
            &p,
            false,
            false,
            &claims(pvc(json!(["ReadWriteMany"])), local),
        )
        .unwrap();
        assert!(
            why.contains("node-local storage (PersistentVolume pv-1)"),
            "{why}"
        );
        let pinned = json!({"metadata": {"name": "pv-1"}, "spec": {"csi": {"driver": "d", "volumeHandle": "h"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["east-1"]}]}]}}}});
        assert!(
            not_movable(
                &p,
                false,
                false,
                &claims(pvc(json!(["ReadWriteMany"])), pinned)
            )
            .is_some()
        );
        let why =
            not_movable(&p, false, true, &claims(pvc(json!(["ReadWriteMany"])), nfs)).unwrap();
        assert!(why.contains("exists only in this cluster"), "{why}");
        let unbound = Claims {
            claims: BTreeMap::from([(
                "data".into(),
                serde_json::from_value(json!({"metadata": {"name": "data"}, "spec": {}})).unwrap(),
            )]),
            ..Default::default()
        };
        assert!(
            not_movable(&p, false, false, &unbound)
                .unwrap()
                .contains("not bound")
        );
        assert!(
            not_movable(&p, false, false, &Claims::default())
                .unwrap()
                .contains("not found")
        );
    }
}
