//! Plays the kubelet's part for controller tests (driven by the scripted node agent),
//! whose clusters have no kubelet: registers Node
//! objects and reports status for Pods bound to them (Running when scheduled, gone when
//! deleted). It runs no process: in tests the real processes are run by the node
//! daemon's runtimes (runc, ferry-launcher); this only keeps the API objects in the
//! states a kubelet would report, like kwok does.
use anyhow::Result;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use std::collections::BTreeMap;

/// Creates a Ready, schedulable Node with the given labels.
pub async fn register_node(
    client: &kube::Client,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut all: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert("kubernetes.io/hostname".into(), name.into());
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": all },
        "spec": {},
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let now = chrono::Utc::now().to_rfc3339();
    let status = json!({ "status": {
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
                         "message": "ferry test kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now }],
        "capacity": { "cpu": "2", "memory": "8Gi", "pods": "110" },
        "allocatable": { "cpu": "2", "memory": "8Gi", "pods": "110" },
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Reports a Pod as Running with all containers ready.
pub async fn set_pod_running(client: &kube::Client, pod: &Pod) -> Result<()> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let now = chrono::Utc::now().to_rfc3339();
    let containers: Vec<_> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let statuses: Vec<_> = containers
        .iter()
        .map(|c| {
            json!({ "name": c, "ready": true, "restartCount": 0, "image": "test", "imageID": "",
                          "state": { "running": { "startedAt": now } } })
        })
        .collect();
    let status = json!({ "status": {
        "phase": "Running",
        "conditions": [{ "type": "Ready", "status": "True", "lastTransitionTime": now },
                       { "type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now }],
        "containerStatuses": statuses,
        "startTime": now,
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Watches Pods bound to `nodes` and reports them Running; confirms their deletion.
/// Runs until the returned task is aborted.
pub fn spawn(client: kube::Client, nodes: Vec<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::all(client.clone());
        let stream = watcher(pods.clone(), watcher::Config::default()).applied_objects();
        let result = stream
            .try_for_each(|pod| {
                let client = client.clone();
                let nodes = nodes.clone();
                async move {
                    let node = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default();
                    if !nodes.contains(&node) {
                        return Ok(());
                    }
                    let ns = pod.metadata.namespace.clone().unwrap_or_default();
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if pod.metadata.deletion_timestamp.is_some() {
                        let api: Api<Pod> = Api::namespaced(client, &ns);
                        let _ = api
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await;
                    } else if pod.status.as_ref().and_then(|s| s.phase.as_deref())
                        != Some("Running")
                        && let Err(e) = set_pod_running(&client, &pod).await
                    {
                        tracing::warn!(pod = %name, "test kubelet: {e:#}");
                    }
                    Ok(())
                }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("test kubelet watch ended: {e}");
        }
    })
}
