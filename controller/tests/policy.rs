//! MigrationPolicy on a real kube-apiserver (scripted daemons): which policy selects a
//! Pod (priority, then the most specific, then name), field by field precedence (the
//! Migration's spec > the policy > the defaults), `status.settings` naming the policy,
//! the daemon given those settings; and the eviction strategy (the Pod's label > the
//! policy), as the drain guard marks and budgets the must-move Pods.
mod common;

use common::*;
use ferry_controller::agent::scripted::ScriptedAgent;
use ferry_controller::drain::guard;
use ferry_crds::{MigrationPolicy, Phase, Settings, Strategy};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, PostParams};
use std::sync::Arc;

const NS: &str = "policy";

async fn create_policy(w: &World, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
    let mut spec = spec;
    // Cluster-scoped: each selects this test's namespace only, so that tests running
    // beside it against the same apiserver are not touched.
    spec["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] = NS.into();
    let p: MigrationPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": name}, "spec": spec,
    }))?;
    let api: Api<MigrationPolicy> = Api::all(w.east.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    api.create(&PostParams::default(), &p).await?;
    Ok(())
}

/// A running Pod on east node 1 with `app: <app>` and extra labels.
async fn pod(w: &World, name: &str, app: &str, extra: serde_json::Value) -> anyhow::Result<()> {
    w.pod(name).await?;
    let mut labels = extra;
    labels["app"] = app.into();
    let patch = serde_json::json!({"metadata": {"labels": labels}});
    Api::<Pod>::namespaced(w.east.clone(), NS)
        .patch(name, &Default::default(), &kube::api::Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn migration(w: &World, name: &str, pod: &str, extra: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\n\
         spec:\n  workload: {{pod: {pod}}}\n  target: {}\n{extra}",
        w.same_cluster_target()
    )
}

#[tokio::test]
async fn policies_fill_in_what_the_migration_leaves_unset() -> anyhow::Result<()> {
    let w = World::new(NS).await?;
    create_policy(
        &w,
        "policy-namespace",
        serde_json::json!({"strategy": "Cold", "bandwidthLimitMiBps": 20,
                           "completionTimeoutPerGiBSeconds": 100}),
    )
    .await?;
    create_policy(
        &w,
        "policy-web",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}},
                           "strategy": "Cold", "allowPostCopy": true}),
    )
    .await?;
    for (p, app, extra) in [
        ("web", "web", serde_json::json!({})),
        ("other", "other", serde_json::json!({})),
        ("explicit", "other", serde_json::json!({})),
        ("urgent", "web", serde_json::json!({"tier": "urgent"})),
    ] {
        pod(&w, p, app, extra).await?;
    }
    // Less specific than policy-web for "urgent" (one requirement fewer), but higher.
    create_policy(
        &w,
        "policy-urgent",
        serde_json::json!({"priority": 10, "completionTimeoutPerGiBSeconds": 300,
                           "podSelector": {"matchLabels": {"tier": "urgent"}}}),
    )
    .await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    let _c = w.controller("a", agent.clone());
    w.migration(&migration(&w, "m-web", "web", "")).await?;
    w.migration(&migration(&w, "m-other", "other", "")).await?;
    w.migration(&migration(
        &w,
        "m-explicit",
        "explicit",
        "  strategy: Live\n  timeouts: {completionSeconds: 50}\n",
    ))
    .await?;
    w.migration(&migration(&w, "m-urgent", "urgent", ""))
        .await?;
    let mut got = std::collections::BTreeMap::new();
    for name in ["m-web", "m-other", "m-explicit", "m-urgent"] {
        let m = w.wait_phase(name, Phase::Succeeded).await?;
        got.insert(name, m.status.and_then(|s| s.settings).expect("settings"));
    }
    let s = |strategy, allow_post_copy, bw: Option<u32>, completion, policy: &str| Settings {
        strategy,
        allow_post_copy,
        bandwidth_limit_mi_bps: bw,
        completion_seconds: completion,
        policy: Some(policy.into()),
    };
    // The more specific policy wins over the namespace-wide one, field by field over
    // the defaults (no bandwidth, 600 s).
    assert_eq!(
        got["m-web"],
        s(Strategy::Cold, true, None, 600, "policy-web")
    );
    // 1 GiB of memory (the scripted daemon's): 100 s per GiB.
    assert_eq!(
        got["m-other"],
        s(Strategy::Cold, false, Some(20), 100, "policy-namespace")
    );
    // What the Migration sets wins; the policy fills in the rest.
    assert_eq!(
        got["m-explicit"],
        s(Strategy::Live, false, Some(20), 50, "policy-namespace")
    );
    // Priority wins over specificity.
    assert_eq!(
        got["m-urgent"],
        s(Strategy::Live, false, None, 300, "policy-urgent")
    );
    // The daemons were told the same.
    let plans = agent.checkpoint_plans();
    let other = plans
        .iter()
        .find(|p| p.source.name == "other")
        .expect("a checkpoint of other");
    assert_eq!(other.strategy, Strategy::Cold);
    assert_eq!(other.bandwidth_limit_bytes_per_sec, 20 << 20);
    let web = plans.iter().find(|p| p.source.name == "web").unwrap();
    assert!(web.allow_post_copy);

    // Eviction: the label wins over the policy; the guard marks and budgets exactly the
    // Pods whose strategy is LiveMigrate.
    create_policy(
        &w,
        "policy-web",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "drainable"}},
                           "evictionStrategy": "LiveMigrate"}),
    )
    .await?;
    pod(&w, "by-policy", "drainable", serde_json::json!({})).await?;
    pod(
        &w,
        "opted-out",
        "drainable",
        serde_json::json!({ferry_crds::EVICTION_STRATEGY_LABEL: "None"}),
    )
    .await?;
    guard::sync(&w.east, Some(NS)).await?;
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), NS);
    let marked = |p: &Pod| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(guard::GUARDED_LABEL))
            .cloned()
    };
    assert_eq!(
        marked(&pods.get("by-policy").await?).as_deref(),
        Some("true")
    );
    assert_eq!(marked(&pods.get("opted-out").await?), None);
    let budget = Api::<PodDisruptionBudget>::namespaced(w.east.clone(), NS)
        .get(guard::BUDGET)
        .await?;
    let sel = budget.spec.unwrap().selector.unwrap().match_labels.unwrap();
    assert_eq!(
        sel.get(guard::GUARDED_LABEL).map(String::as_str),
        Some("true")
    );
    // The policy gone, the mark and the budget go with the next pass.
    Api::<MigrationPolicy>::all(w.east.clone())
        .delete("policy-web", &DeleteParams::default())
        .await?;
    guard::sync(&w.east, Some(NS)).await?;
    assert_eq!(marked(&pods.get("by-policy").await?), None);
    assert!(
        Api::<PodDisruptionBudget>::namespaced(w.east.clone(), NS)
            .get_opt(guard::BUDGET)
            .await?
            .is_none()
    );
    for name in ["policy-namespace", "policy-urgent"] {
        Api::<MigrationPolicy>::all(w.east.clone())
            .delete(name, &DeleteParams::default())
            .await?;
    }
    Ok(())
}
