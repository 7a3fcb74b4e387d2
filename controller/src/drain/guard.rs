//! The guard that keeps a Pod that must move alive while no controller answers the
//! eviction webhook (whose failure policy is Ignore, so that an outage never blocks the
//! eviction of Pods ferry does not manage).
//!
//! In every namespace with a Pod labelled `ferry.dev/eviction-strategy=LiveMigrate`
//! the leader keeps a PodDisruptionBudget selecting exactly those Pods with
//! `maxUnavailable: 0`. The apiserver checks it itself: an eviction is refused (429)
//! with or without ferry, and `kubectl drain` waits. Admission webhooks run before the
//! budget is checked, so while ferry answers, its webhook decides first (and moves the
//! Pod); Completing deletes the source Pod, which no budget stops.
use ferry_crds::EVICTION_STRATEGY_LABEL;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use std::collections::BTreeSet;
use std::time::Duration;
use tracing::{info, warn};

/// The name of the budget in each namespace.
pub const BUDGET: &str = "ferry-must-migrate";
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
            "selector": {"matchLabels": {EVICTION_STRATEGY_LABEL: "LiveMigrate"}},
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

/// One pass: a budget in every namespace with a must-move Pod, none elsewhere.
pub async fn sync(client: &Client, namespace: Option<&str>) -> Result<(), kube::Error> {
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let must = ListParams::default().labels(&format!("{EVICTION_STRATEGY_LABEL}=LiveMigrate"));
    let wanted: BTreeSet<String> = pods
        .list_metadata(&must)
        .await?
        .items
        .iter()
        .filter_map(|p| p.namespace())
        .collect();
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
