//! MigrationPolicy applied: which policy selects a Pod, and what a Migration (or a
//! drain) runs with. Plain functions; the reconciler and the eviction webhook read the
//! policies, the Namespace and the Pod.
//!
//! Precedence, field by field (after KubeVirt's MigrationPolicy): what the Migration's
//! spec sets > the selecting policy > the defaults. The selecting policy: of those
//! whose selectors both match, the highest `priority`, then the most specific (more
//! selector requirements), then the first by name. The eviction strategy: the Pod's
//! `ferry.dev/eviction-strategy` label > the selecting policy > `None`.
use ferry_crds::{
    DEFAULT_COMPLETION_SECONDS, EvictionStrategy, MigrationPolicy, MigrationSpec, Settings,
    Strategy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use std::collections::BTreeMap;

type Labels = BTreeMap<String, String>;

/// Whether `selector` matches `labels` (Kubernetes semantics: absent or empty selects
/// everything; all requirements must hold).
pub fn matches(selector: Option<&LabelSelector>, labels: &Labels) -> bool {
    let Some(s) = selector else { return true };
    let by_labels = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_labels
        && s.match_expressions.iter().flatten().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false, // unknown operators select nothing, as the apiserver would refuse them
            }
        })
}

fn requirements(selector: Option<&LabelSelector>) -> usize {
    selector.map_or(0, |s| {
        s.match_labels.as_ref().map_or(0, BTreeMap::len)
            + s.match_expressions.as_ref().map_or(0, Vec::len)
    })
}

/// The policy that selects a Pod with `pod_labels` in a namespace with `ns_labels`.
pub fn select<'a>(
    policies: &'a [MigrationPolicy],
    ns_labels: &Labels,
    pod_labels: &Labels,
) -> Option<&'a MigrationPolicy> {
    policies
        .iter()
        .filter(|p| {
            matches(p.spec.namespace_selector.as_ref(), ns_labels)
                && matches(p.spec.pod_selector.as_ref(), pod_labels)
        })
        .min_by_key(|p| {
            let specific = requirements(p.spec.namespace_selector.as_ref())
                + requirements(p.spec.pod_selector.as_ref());
            (
                std::cmp::Reverse(p.spec.priority),
                std::cmp::Reverse(specific),
                p.name_any(),
            )
        })
}

/// What a Migration runs with: its spec's fields, else `policy`'s, else the defaults.
/// `memory_bytes` (the workload's, from its daemon) scales a per-GiB timeout.
pub fn settings(
    spec: &MigrationSpec,
    policy: Option<&MigrationPolicy>,
    memory_bytes: u64,
) -> Settings {
    let p = policy.map(|p| &p.spec);
    let gib = memory_bytes.div_ceil(1 << 30).max(1);
    let per_gib = p
        .and_then(|p| p.completion_timeout_per_gi_b_seconds)
        .map(|s| (u64::from(s) * gib).min(86_400) as u32);
    Settings {
        strategy: spec
            .strategy
            .or(p.and_then(|p| p.strategy))
            .unwrap_or(Strategy::Live),
        allow_post_copy: spec
            .allow_post_copy
            .or(p.and_then(|p| p.allow_post_copy))
            .unwrap_or(false),
        bandwidth_limit_mi_bps: spec
            .transfer
            .bandwidth_limit_mi_bps
            .or(p.and_then(|p| p.bandwidth_limit_mi_bps)),
        completion_seconds: spec
            .timeouts
            .completion_seconds
            .or(per_gib)
            .unwrap_or(DEFAULT_COMPLETION_SECONDS),
        // Named only when it filled something in.
        policy: policy
            .filter(|_| {
                spec.strategy.is_none()
                    || spec.allow_post_copy.is_none()
                    || spec.transfer.bandwidth_limit_mi_bps.is_none()
                    || spec.timeouts.completion_seconds.is_none()
            })
            .map(|p| p.name_any()),
    }
}

/// The eviction strategy of a Pod: its label, else the selecting policy's, else None.
/// An unknown label value is an error (see `drain::strategy_of`).
pub fn eviction_strategy(
    label: Result<Option<EvictionStrategy>, String>,
    policy: Option<&MigrationPolicy>,
) -> Result<EvictionStrategy, String> {
    Ok(label?
        .or(policy.map(|p| p.spec.eviction_strategy))
        .unwrap_or(EvictionStrategy::None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: serde_json::Value) -> MigrationPolicy {
        serde_json::from_value(
            json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap()
    }

    fn labels(v: serde_json::Value) -> Labels {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let l = labels(json!({"app": "web", "tier": "front"}));
        let sel = |v: serde_json::Value| serde_json::from_value::<LabelSelector>(v).unwrap();
        assert!(matches(None, &l));
        assert!(matches(Some(&sel(json!({}))), &l));
        assert!(matches(
            Some(&sel(json!({"matchLabels": {"app": "web"}}))),
            &l
        ));
        assert!(!matches(
            Some(&sel(json!({"matchLabels": {"app": "db"}}))),
            &l
        ));
        let expr = |op: &str, values: serde_json::Value| {
            sel(json!({"matchExpressions": [{"key": "tier", "operator": op, "values": values}]}))
        };
        assert!(matches(Some(&expr("In", json!(["front", "back"]))), &l));
        assert!(!matches(Some(&expr("NotIn", json!(["front"]))), &l));
        assert!(matches(Some(&expr("Exists", json!(null))), &l));
        assert!(!matches(Some(&expr("DoesNotExist", json!(null))), &l));
        assert!(!matches(Some(&expr("Bogus", json!(null))), &l));
    }

    #[test]
    fn the_highest_priority_then_most_specific_then_first_name_selects() {
        let ns = labels(json!({"env": "prod"}));
        let pod = labels(json!({"app": "web"}));
        let all = policy("all", json!({}));
        let web = policy(
            "web",
            json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        );
        let prod_web = policy(
            "prod-web",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "namespaceSelector": {"matchLabels": {"env": "prod"}}}),
        );
        let urgent = policy("urgent", json!({"priority": 5}));
        let db = policy(
            "db",
            json!({"priority": 9, "podSelector": {"matchLabels": {"app": "db"}}}),
        );
        let name = |ps: &[MigrationPolicy]| select(ps, &ns, &pod).map(|p| p.name_any());
        assert_eq!(name(&[all.clone(), web.clone()]), Some("web".into()));
        assert_eq!(
            name(&[all.clone(), web.clone(), prod_web.clone()]),
            Some("prod-web".into())
        );
        assert_eq!(
            name(&[web.clone(), prod_web, urgent, db.clone()]),
            Some("urgent".into())
        );
        let twin = policy(
            "a-twin",
            json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        );
        assert_eq!(name(&[web, twin]), Some("a-twin".into()));
        assert_eq!(name(&[db]), None);
    }

    #[test]
    fn the_spec_wins_over_the_policy_which_wins_over_the_defaults() {
        let spec = |v: serde_json::Value| -> MigrationSpec {
            let mut base = json!({"workload": {"pod": "p"}, "target": {}});
            for (k, val) in v.as_object().unwrap() {
                base[k] = val.clone();
            }
            serde_json::from_value(base).unwrap()
        };
        let p = policy(
            "slow-links",
            json!({"strategy": "Cold", "allowPostCopy": true, "bandwidthLimitMiBps": 20,
                   "completionTimeoutPerGiBSeconds": 150}),
        );
        let defaults = settings(&spec(json!({})), None, 1 << 30);
        assert_eq!(defaults.strategy, Strategy::Live);
        assert!(!defaults.allow_post_copy);
        assert_eq!(defaults.bandwidth_limit_mi_bps, None);
        assert_eq!(defaults.completion_seconds, DEFAULT_COMPLETION_SECONDS);
        assert_eq!(defaults.policy, None);
        // 3 GiB and a bit: 4 × 150 s.
        let from_policy = settings(&spec(json!({})), Some(&p), (3 << 30) + 1);
        assert_eq!(
            from_policy,
            Settings {
                strategy: Strategy::Cold,
                allow_post_copy: true,
                bandwidth_limit_mi_bps: Some(20),
                completion_seconds: 600,
                policy: Some("slow-links".into()),
            }
        );
        let explicit = settings(
            &spec(json!({"strategy": "Live", "allowPostCopy": false,
                         "transfer": {"bandwidthLimitMiBps": 5}, "timeouts": {"completionSeconds": 90}})),
            Some(&p),
            1 << 30,
        );
        assert_eq!(explicit.strategy, Strategy::Live);
        assert!(!explicit.allow_post_copy);
        assert_eq!(explicit.bandwidth_limit_mi_bps, Some(5));
        assert_eq!(explicit.completion_seconds, 90);
        assert_eq!(explicit.policy, None, "the policy filled in nothing");
    }

    #[test]
    fn the_pod_label_wins_over_the_policy_for_eviction() {
        let lm = policy("lm", json!({"evictionStrategy": "LiveMigrate"}));
        use EvictionStrategy as E;
        assert_eq!(eviction_strategy(Ok(None), Some(&lm)), Ok(E::LiveMigrate));
        assert_eq!(eviction_strategy(Ok(Some(E::None)), Some(&lm)), Ok(E::None));
        assert_eq!(eviction_strategy(Ok(None), None), Ok(E::None));
        assert!(eviction_strategy(Err("typo".into()), Some(&lm)).is_err());
    }
}
