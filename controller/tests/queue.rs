//! How many migrations run at once, against a real kube-apiserver (scripted daemons):
//! with one slot per source node, Migrations beyond it wait in Pending with the reason
//! in `status.queued`, and start one at a time in their order (drain's first, then by
//! `spec.priority`, then oldest), which a restarted controller keeps.
mod common;

use common::*;
use ferry_controller::agent::scripted::{Call, ScriptedAgent};
use ferry_controller::drain::EVICTED_FROM_LABEL;
use ferry_controller::queue::Limits;
use ferry_crds::{Migration, Phase};
use std::sync::Arc;
use std::time::Duration;

fn migration(w: &World, name: &str, pod: &str, extra: &str, labels: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n\
         spec:\n  workload: {{pod: {pod}}}\n  target: {}\n{extra}",
        w.same_cluster_target()
    )
}

/// When `m` entered `phase` (Unix ms), and when it finished.
fn entered(m: &Migration, phase: Phase) -> u64 {
    let t = m
        .status
        .as_ref()
        .and_then(|s| s.timings.clone())
        .unwrap_or_default();
    t.phases
        .iter()
        .find(|p| p.phase == phase)
        .and_then(|p| p.entered_at_ms)
        .unwrap_or_else(|| panic!("{} never entered {phase}", kube::ResourceExt::name_any(m)))
}

#[tokio::test]
async fn beyond_the_limit_migrations_wait_and_start_in_order() -> anyhow::Result<()> {
    let w = World::new("queue").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.hold(Call::StartCheckpoint);
    let mut settings = w.settings("a");
    settings.limits = Limits {
        per_cluster: 5,
        per_node: 1,
    };
    let c = w.controller_with(settings.clone(), agent.clone());
    for p in ["first", "low", "high", "drained"] {
        w.pod(p).await?;
    }
    w.migration(&migration(&w, "m-first", "first", "", ""))
        .await?;
    w.wait_phase("m-first", Phase::Transferring).await?;
    // Created in this order; they must start drain's first, then by priority.
    w.migration(&migration(&w, "m-low", "low", "", "")).await?;
    w.migration(&migration(&w, "m-high", "high", "  priority: 10\n", ""))
        .await?;
    w.migration(&migration(
        &w,
        "m-drained",
        "drained",
        "",
        &format!("{EVICTED_FROM_LABEL}: {}", w.node("east", 1)),
    ))
    .await?;
    let api = w.migrations();
    wait_for(Duration::from_secs(30), "three queued", || async {
        let mut queued = 0;
        for name in ["m-low", "m-high", "m-drained"] {
            let s = api.get(name).await?.status.unwrap_or_default();
            anyhow::ensure!(
                matches!(s.phase, None | Some(Phase::Pending)),
                "{name} started past the limit: {:?}",
                s.phase
            );
            if s.queued.as_deref().is_some_and(|q| q.contains("from node")) {
                queued += 1;
            }
        }
        Ok(queued == 3)
    })
    .await?;
    let m = api.get("m-low").await?;
    let cond = m.status.unwrap().conditions;
    assert!(
        cond.iter()
            .any(|c| c.reason == "Queued" && c.message.contains("--parallel-outbound")),
        "{cond:?}"
    );
    // The order is in the objects: a new controller keeps it.
    drop(c);
    let _c = w.controller_with(settings, agent.clone());
    agent.release(Call::StartCheckpoint);
    let mut done = vec![];
    for name in ["m-first", "m-drained", "m-high", "m-low"] {
        done.push(w.wait_phase(name, Phase::Succeeded).await?);
    }
    // One at a time: each left Pending only after the one before it had finished.
    for pair in done.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let finished = before
            .status
            .as_ref()
            .and_then(|s| s.timings.as_ref())
            .and_then(|t| t.phases.iter().find(|p| p.phase == Phase::Succeeded))
            .and_then(|p| p.entered_at_ms)
            .expect("finished");
        let started = entered(after, Phase::Preparing);
        assert!(
            started >= finished,
            "{} started at {started} before {} finished at {finished}",
            kube::ResourceExt::name_any(after),
            kube::ResourceExt::name_any(before)
        );
        assert!(after.status.as_ref().unwrap().queued.is_none());
    }
    Ok(())
}
