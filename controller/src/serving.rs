//! ferry's readiness gate: a frozen source leaves its Services' endpoints at the freeze.
//!
//! A Pod that declares `readinessGates: [{conditionType: ferry.dev/serving}]` is Ready
//! only while ferry says it serves. The kubelet never writes that condition (it copies
//! conditions it does not own through its own status updates), so ferry keeps it:
//!
//! - [`keep`] (the leader runs it) sets it True on every gated Pod that has no value
//!   yet and is not a move's target, so a gated Pod becomes Ready as its containers do;
//! - a container move sets the source's False just before the freeze (reason
//!   `Frozen`): the EndpointSlice controller marks the endpoint not ready and
//!   kube-proxy stops sending new connections to a process that cannot answer them;
//! - a rollback sets it True again once the source runs (reason `Resumed`);
//! - the target Pod, created from the source's spec with the same gate, gets True as
//!   soon as its sandbox exists, so it joins the Services the moment its containers run.
//!
//! Pods without the gate are never written to. A VM move leaves the gate alone: QEMU's
//! switch-over pause is milliseconds, and the source must serve through the pre-copy.
use ferry_crds::MIGRATION_ANNOTATION;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use std::time::Duration;
use tracing::{debug, warn};

/// The readiness gate's condition type.
pub const GATE: &str = ferry_crds::SERVING_CONDITION;

/// Why the condition has its value (its `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Not being moved: set by [`keep`] on a gated Pod without a value.
    NotMigrating,
    /// A move's target: it serves as soon as its containers run.
    Target,
    /// The source is frozen for its checkpoint.
    Frozen,
    /// The move was rolled back and the source runs again.
    Resumed,
}

impl Why {
    fn serving(self) -> bool {
        !matches!(self, Why::Frozen)
    }

    fn reason(self) -> &'static str {
        match self {
            Why::NotMigrating => "NotMigrating",
            Why::Target => "MigrationTarget",
            Why::Frozen => "Frozen",
            Why::Resumed => "Resumed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Why::NotMigrating => "no ferry migration holds this Pod",
            Why::Target => "the target of a ferry migration: it serves once its containers run",
            Why::Frozen => {
                "frozen by a ferry migration: out of its Services' endpoints until it runs again"
            }
            Why::Resumed => "the ferry migration was rolled back; this Pod runs again",
        }
    }
}

/// Whether the Pod declares ferry's readiness gate.
pub fn gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.condition_type == GATE))
}

/// The gate's current value, `None` while nobody set it.
pub fn value(pod: &Pod) -> Option<bool> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == GATE)
        .map(|c| c.status == "True")
}

/// Whether [`keep`] must set the gate: gated, not being deleted, not a move's target
/// (the move sets that one, [`Why::Target`]), no value yet. A value is never
/// overwritten here: a False one belongs to the move that froze the Pod.
pub fn needs_value(pod: &Pod) -> bool {
    gated(pod)
        && pod.metadata.deletion_timestamp.is_none()
        && !pod.annotations().contains_key(MIGRATION_ANNOTATION)
        && value(pod).is_none()
}

/// The status patch that sets the condition (a strategic merge: conditions merge by
/// type, so the kubelet's own stay as they are).
pub fn patch(why: Why) -> serde_json::Value {
    serde_json::json!({"status": {"conditions": [{
        "type": GATE,
        "status": if why.serving() { "True" } else { "False" },
        "reason": why.reason(),
        "message": why.message(),
        "lastTransitionTime": Time(Timestamp::now()),
    }]}})
}

/// Sets the gate on `pod` if it declares it and the value differs; a Pod that is gone
/// needs nothing. Answers whether it wrote.
pub async fn set(pods: &Api<Pod>, pod: &Pod, why: Why) -> Result<bool, kube::Error> {
    if !gated(pod) || value(pod) == Some(why.serving()) {
        return Ok(false);
    }
    match pods
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch(why)),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads `name` and sets its gate (see [`set`]).
pub async fn set_named(pods: &Api<Pod>, name: &str, why: Why) -> Result<bool, kube::Error> {
    match pods.get_opt(name).await? {
        Some(pod) => set(pods, &pod, why).await,
        None => Ok(false),
    }
}

/// Gives every gated Pod without a value its first one (True), until dropped.
pub async fn keep(client: Client, namespace: Option<String>) {
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    loop {
        let mut events = watcher(pods.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let pod = match event {
                Ok(pod) => pod,
                Err(e) => {
                    debug!("watching pods for ferry's readiness gate: {e}");
                    continue;
                }
            };
            if !needs_value(&pod) {
                continue;
            }
            let api: Api<Pod> =
                Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
            if let Err(e) = set(&api, &pod, Why::NotMigrating).await {
                warn!(pod = %pod.name_any(), "setting ferry's readiness gate: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(gates: &[&str], conditions: serde_json::Value) -> Pod {
        let gates: Vec<_> = gates
            .iter()
            .map(|g| serde_json::json!({"conditionType": g}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "readinessGates": gates},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn only_gated_pods_without_a_value_get_one() {
        assert!(needs_value(&pod(&[GATE], serde_json::json!([]))));
        assert!(!needs_value(&pod(
            &["example.com/other"],
            serde_json::json!([])
        )));
        let frozen = pod(
            &[GATE],
            serde_json::json!([{"type": GATE, "status": "False"}]),
        );
        assert_eq!(value(&frozen), Some(false));
        assert!(!needs_value(&frozen), "a move's False is its own");
        let mut deleting = pod(&[GATE], serde_json::json!([]));
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert!(!needs_value(&deleting));
        let mut target = pod(&[GATE], serde_json::json!([]));
        target
            .annotations_mut()
            .insert(MIGRATION_ANNOTATION.into(), "uid".into());
        assert!(!needs_value(&target), "a target's value is its move's");
    }

    #[test]
    fn the_patch_sets_only_the_gate_and_frozen_is_the_only_false() {
        for (why, status) in [
            (Why::NotMigrating, "True"),
            (Why::Target, "True"),
            (Why::Frozen, "False"),
            (Why::Resumed, "True"),
        ] {
            let p = patch(why);
            let conditions = p["status"]["conditions"].as_array().unwrap();
            assert_eq!(conditions.len(), 1);
            assert_eq!(conditions[0]["type"], GATE);
            assert_eq!(conditions[0]["status"], status, "{why:?}");
            assert_eq!(conditions[0]["reason"], why.reason());
            assert!(conditions[0]["lastTransitionTime"].is_string());
        }
    }
}
