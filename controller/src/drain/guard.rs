//! The guard that keeps a Pod that must move alive while no controller answers the
//! eviction webhook (whose failure policy is Ignore, so that an outage never blocks the
//! eviction of Pods ferry does not manage).
//!
//! The leader marks every Pod whose eviction strategy is `LiveMigrate` (its
//! `ferry.dev/eviction-strategy` label, else the MigrationPolicy that selects it) with
//! [`GUARDED_LABEL`], and in every namespace with such a Pod keeps a
//! PodDisruptionBudget selecting exactly the marked Pods with `maxUnavailable: 0`. The
//! apiserver checks it itself: an eviction is refused (429) with or without ferry, and
//! `kubectl drain` waits. Admission webhooks run before the budget is checked, so while
//! ferry answers, its webhook decides first (and moves the Pod); Completing deletes the
//! source Pod, which no budget stops. The mark is the controller's own: a policy that
//! changes while no controller runs changes nothing until one does.
use super::strategy_label;
use crate::policy;
use ferry_crds::{EvictionStrategy, MigrationPolicy};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tracing::{info, warn};

/// The name of the budget in each namespace.
pub const BUDGET: &str = "ferry-must-migrate";
/// On the Pods the budgets select: their eviction strategy is `LiveMigrate`.
pub const GUARDED_LABEL: &str = "ferry.dev/must-migrate";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ferry");
/// How often the budgets are brought in line with the labelled Pods.
pub const PERIOD: Duration = Duration::from_secs(2);

/// The budget for a namespace's must-move Pods.
pub fn budget(namespace: &str) -> PodDisruptionBudget {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": BUDGET,
            "namespace": namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
        },
        "spec": {
            "maxUnavailable": 0,
            "selector": {"matchLabels": {GUARDED_LABEL: "true"}},
        },
    }))
    .expect("a PodDisruptionBudget")
}

/// Keeps the budgets until the task is dropped (the leader runs it).
pub async fn run(client: Client, namespace: Option<String>) {
    loop {
        if let Err(e) = sync(&client, namespace.as_deref()).await {
            warn!("keeping the must-migrate disruption budgets: {e}");
        }
        tokio::time::sleep(PERIOD).await;
    }
}

/// Whether a Pod must move on eviction: its label, else the selecting policy. A label
/// ferry cannot read does not guard it: while ferry answers, the webhook refuses its
/// eviction with the reason; the budget covers only what ferry knows must move.
pub fn must_move(
    pod: &Pod,
    policies: &[MigrationPolicy],
    ns_labels: &BTreeMap<String, String>,
) -> bool {
    let label = strategy_label(pod);
    let chosen = match &label {
        Ok(None) => policy::select(policies, ns_labels, pod.labels()),
        _ => None,
    };
    policy::eviction_strategy(label, chosen).is_ok_and(|s| s == EvictionStrategy::LiveMigrate)
}

/// One pass: the must-move Pods marked, a budget in every namespace with one, none
/// elsewhere.
pub async fn sync(client: &Client, namespace: Option<&str>) -> Result<(), kube::Error> {
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let policies = Api::<MigrationPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let ns_labels: BTreeMap<String, BTreeMap<String, String>> = if policies.is_empty() {
        BTreeMap::new()
    } else {
        Api::<Namespace>::all(client.clone())
            .list_metadata(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect()
    };
    let mut wanted = BTreeSet::new();
    // Labels are all it needs: metadata only, not every Pod's spec every 2 s.
    for meta in pods.list_metadata(&ListParams::default()).await?.items {
        let p = Pod {
            metadata: meta.metadata,
            ..Default::default()
        };
        let ns = p.namespace().unwrap_or_default();
        let must = p.metadata.deletion_timestamp.is_none()
            && must_move(
                &p,
                &policies,
                ns_labels.get(&ns).unwrap_or(&BTreeMap::new()),
            );
        if must {
            wanted.insert(ns.clone());
        }
        let marked = p.labels().get(GUARDED_LABEL).map(String::as_str) == Some("true");
        if must != marked {
            let value = if must {
                serde_json::json!("true")
            } else {
                serde_json::Value::Null
            };
            let patch = serde_json::json!({"metadata": {"labels": {GUARDED_LABEL: value}}});
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            match api
                .patch(
                    &p.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    let budgets: Api<PodDisruptionBudget> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ours = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let have: BTreeSet<String> = budgets
        .list_metadata(&ours)
        .await?
        .items
        .iter()
        .filter(|b| b.name_any() == BUDGET)
        .filter_map(|b| b.namespace())
        .collect();
    for ns in wanted.difference(&have) {
        let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
        match api.create(&PostParams::default(), &budget(ns)).await {
            Ok(_) => info!(namespace = %ns, "guarding must-migrate pods with a disruption budget"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    for ns in have.difference(&wanted) {
        let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
        match api.delete(BUDGET, &DeleteParams::default()).await {
            Ok(_) => info!(namespace = %ns, "no must-migrate pods left; budget removed"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
