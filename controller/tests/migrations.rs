//! The Migration controller against real kube-apiservers (testenv), with the scripted
//! node agent standing in for node daemons.
mod common;

use common::*;
use ferry_controller::agent::scripted::{Call, ScriptedAgent};
use ferry_crds::{MIGRATION_ANNOTATION, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use std::sync::Arc;
use std::time::Duration;

fn migration_yaml(name: &str, pod: &str, target: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec:\n  workload: {{pod: {pod}}}\n  target: {target}\n"
    )
}

async fn events_for(world: &World, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(world.east.clone(), &world.ns);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .collect()
}

#[tokio::test]
async fn migration_walks_every_phase_and_reports_status_and_events() -> anyhow::Result<()> {
    let w = World::new("happy").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(&migration_yaml(
        "m1",
        "web",
        &format!("{{node: {}}}", w.node("east", 2)),
    ))
    .await?;
    let m = w.wait_phase("m1", Phase::Succeeded).await?;
    let status = m.status.unwrap();

    let phases: Vec<Phase> = status
        .timings
        .as_ref()
        .unwrap()
        .phases
        .iter()
        .map(|p| p.phase)
        .collect();
    use Phase::*;
    assert_eq!(
        phases,
        vec![
            Pending,
            Preparing,
            Checkpointing,
            Transferring,
            Restoring,
            Completing,
            Succeeded
        ]
    );
    let target = status.target.clone().unwrap();
    assert_eq!(target.display, format!("east/{}", w.node("east", 2)));
    assert_eq!(
        status.timings.as_ref().unwrap().downtime.as_deref(),
        Some("42ms"),
        "downtime from the daemon"
    );
    assert_eq!(status.progress.as_ref().unwrap().display, "1Gi/1Gi (100%)");
    assert_eq!(status.observed_generation, m.metadata.generation);
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .unwrap();
    assert_eq!(cond.status, "True");

    // The workload moved: the source Pod is gone, the target Pod runs on the target node.
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), &w.ns);
    assert!(pods.get_opt("web").await?.is_none(), "source pod removed");
    let moved = pods.get(&target.pod).await?;
    assert_eq!(
        moved.spec.as_ref().unwrap().node_name.as_deref(),
        Some(w.node("east", 2).as_str())
    );
    assert_eq!(
        moved.annotations().get(MIGRATION_ANNOTATION),
        m.metadata.uid.as_ref()
    );

    // Each daemon step ran once, on the right node; Finalize once per side (the source
    // ends its frozen copy, then the target drops its staged state).
    for call in [
        Call::PrepareReceiver,
        Call::StartCheckpoint,
        Call::StartRestore,
    ] {
        assert_eq!(agent.count(call), 1, "{call:?}");
    }
    assert_eq!(agent.count(Call::Finalize), 2);
    let on = |call| {
        agent
            .calls()
            .into_iter()
            .find(|(c, _)| *c == call)
            .unwrap()
            .1
            .node
    };
    assert_eq!(on(Call::StartCheckpoint), w.node("east", 1));
    assert_eq!(on(Call::StartRestore), w.node("east", 2));
    assert_eq!(
        on(Call::Finalize),
        w.node("east", 1),
        "the source is finalized first"
    );

    let reasons: Vec<String> = events_for(&w, "m1")
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for phase in [
        "Pending",
        "Preparing",
        "Checkpointing",
        "Transferring",
        "Restoring",
        "Completing",
        "Succeeded",
    ] {
        assert!(
            reasons.iter().any(|r| r == phase),
            "no {phase} event in {reasons:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_shows_columns_and_the_apiserver_rejects_invalid_migrations() -> anyhow::Result<()>
{
    let w = World::new("cli").await?;
    let env = env();
    let bad = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: bad, namespace: {}}}\nspec:\n  workload: {{pod: web}}\n  target: {{cluster: west}}\n  transfer: {{mode: ObjectStore, compress: true}}\n  timeouts: {{completionSeconds: 0}}\n",
        w.ns
    );
    let file = tempfile_with(&bad)?;
    let out = env
        .kubectl("east")
        .args(["apply", "-f"])
        .arg(file.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "invalid Migration accepted");
    assert!(
        stderr.contains("spec.timeouts.completionSeconds"),
        "{stderr}"
    );
    assert!(
        stderr.contains("transfer.objectStore (bucket and credentials) is required"),
        "{stderr}"
    );
    // Through a bucket: Cold only, and no settings that apply to Direct alone.
    assert!(stderr.contains("with strategy Cold only"), "{stderr}");
    assert!(
        stderr.contains("transfer.compress and transfer.bandwidthLimitMiBps apply to Direct"),
        "{stderr}"
    );

    // The examples in the docs are valid as written.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let out = env
        .kubectl("east")
        .args(["apply", "--dry-run=server", "-n", &w.ns, "-f", examples])
        .output()?;
    assert!(
        out.status.success(),
        "examples rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Once started, the spec is frozen.
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.hold(Call::StartCheckpoint);
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(&migration_yaml(
        "m1",
        "web",
        &format!("{{node: {}}}", w.node("east", 2)),
    ))
    .await?;
    w.wait_phase("m1", Phase::Transferring).await?;
    let out = env
        .kubectl("east")
        .args([
            "-n",
            &w.ns,
            "patch",
            "mig",
            "m1",
            "--type=merge",
            "-p",
            r#"{"spec":{"strategy":"Cold"}}"#,
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("spec cannot change once the migration has started")
    );

    let out = env
        .kubectl("east")
        .args(["-n", &w.ns, "get", "mig"])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "PHASE", "WORKLOAD", "TARGET", "PROGRESS", "DOWNTIME", "AGE"
        ],
        "{table}"
    );
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("m1") && row.contains("Transferring") && row.contains("web"),
        "{table}"
    );
    assert!(
        row.contains(&format!("east/{}", w.node("east", 2))),
        "{table}"
    );
    Ok(())
}

fn tempfile_with(text: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new()?;
    f.write_all(text.as_bytes())?;
    Ok(f)
}

#[tokio::test]
async fn moves_a_pod_to_a_linked_cluster() -> anyhow::Result<()> {
    let w = World::new("linked").await?;
    w.link_west().await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    let _c = w.controller("a", agent.clone());
    w.pod("db").await?;
    // Nodes are cluster-scoped and other tests add theirs: name ours.
    w.migration(&migration_yaml(
        "m1",
        "db",
        &format!("{{cluster: west, node: {}}}", w.node("west", 2)),
    ))
    .await?;
    let m = w.wait_phase("m1", Phase::Succeeded).await?;
    let target = m.status.unwrap().target.unwrap();
    assert_eq!(target.cluster.as_deref(), Some("west"));
    // The Pod now exists in the other apiserver, on one of its nodes, under the same name.
    let west_pod = Api::<Pod>::namespaced(w.west.clone(), &w.ns)
        .get("db")
        .await?;
    let node = west_pod.spec.unwrap().node_name.unwrap();
    assert_eq!(node, w.node("west", 2));
    assert!(
        Api::<Pod>::namespaced(w.east.clone(), &w.ns)
            .get_opt("db")
            .await?
            .is_none()
    );
    let restore_on = agent
        .calls()
        .into_iter()
        .find(|(c, _)| *c == Call::StartRestore)
        .unwrap()
        .1;
    assert_eq!(restore_on.cluster.as_deref(), Some("west"));
    Ok(())
}

#[tokio::test]
async fn invalid_requests_fail_with_a_reason_and_touch_nothing() -> anyhow::Result<()> {
    let w = World::new("invalid").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    // A link whose kubeconfig would run a command in the controller for credentials.
    let marker = format!("/tmp/ferry-exec-ran-{}", w.ns);
    let exec_kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:1'}}}}]\n\
         users: [{{name: shady-user, user: {{exec: {{apiVersion: client.authentication.k8s.io/v1, command: /bin/sh, args: [-c, 'touch {marker}']}}}}}}]\n\
         contexts: [{{name: c, context: {{cluster: c, user: shady-user}}}}]\ncurrent-context: c\n"
    );
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cluster-shady", "labels": {"ferry.dev/cluster": "shady"}},
        "stringData": {"kubeconfig": exec_kubeconfig}
    }))?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(w.east.clone(), &w.ns)
        .create(&Default::default(), &secret)
        .await?;
    let same_node = format!("{{node: {}}}", w.node("east", 1));
    let cases = [
        (
            "missing",
            "nope",
            "{}",
            "PodNotFound",
            "pod invalid/nope not found",
        ),
        (
            "unknown",
            "web",
            "{cluster: mars}",
            "UnknownCluster",
            "unknown cluster \"mars\"",
        ),
        (
            "shady",
            "web",
            "{cluster: shady}",
            "UnknownCluster",
            "user \"shady-user\" gets its credentials from an exec credential plugin",
        ),
        (
            "samenode",
            "web",
            same_node.as_str(),
            "SameNode",
            "already runs on node",
        ),
        (
            "nonode",
            "web",
            "{node: ghost}",
            "NodeNotFound",
            "node \"ghost\" not found",
        ),
    ];
    for (name, pod, target, _, _) in &cases {
        w.migration(&migration_yaml(name, pod, target)).await?;
    }
    for (name, _, _, reason, message) in cases {
        let m = w.wait_phase(name, Phase::Failed).await?;
        let failure = m.status.unwrap().failure.unwrap();
        assert_eq!(failure.reason, reason, "{name}");
        assert!(
            failure.message.contains(message),
            "{name}: {}",
            failure.message
        );
    }
    // Nothing was started at any daemon and the workload is where it was.
    assert_eq!(
        agent.count(Call::PrepareReceiver) + agent.count(Call::StartCheckpoint),
        0
    );
    let pods = Api::<Pod>::namespaced(w.east.clone(), &w.ns)
        .list(&ListParams::default())
        .await?;
    assert_eq!(pods.items.len(), 1);
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the link's exec plugin ran"
    );
    Ok(())
}

#[tokio::test]
async fn a_liqo_peer_without_ferry_credentials_is_refused_with_the_fix() -> anyhow::Result<()> {
    let w = World::new("liqo").await?;
    let env = env();
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/liqo-foreigncluster-crd.yaml"
    );
    let out = env.kubectl("east").args(["apply", "-f", crd]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.kubectl("east")
        .args([
            "wait",
            "--for=condition=Established",
            "crd/foreignclusters.core.liqo.io",
            "--timeout=60s",
        ])
        .status()?;
    let fc = tempfile_with(
        "apiVersion: core.liqo.io/v1beta1\nkind: ForeignCluster\nmetadata: {name: west-peer}\nspec: {clusterID: west-peer}\n",
    )?;
    let out = env
        .kubectl("east")
        .args(["apply", "-f"])
        .arg(fc.path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let agent = Arc::new(ScriptedAgent::new(2));
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(&migration_yaml("m1", "web", "{cluster: west-peer}"))
        .await?;
    let failure = w
        .wait_phase("m1", Phase::Failed)
        .await?
        .status
        .unwrap()
        .failure
        .unwrap();
    assert_eq!(failure.reason, "NoClusterCredentials");
    assert!(
        failure
            .message
            .contains("labelled ferry.dev/cluster=west-peer"),
        "{}",
        failure.message
    );
    Ok(())
}

#[tokio::test]
async fn deleting_mid_flight_cancels_and_keeps_the_source() -> anyhow::Result<()> {
    let w = World::new("cancel").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.hold(Call::StartCheckpoint);
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    let created = w
        .migration(&migration_yaml("m1", "web", &w.same_cluster_target()))
        .await?;
    let m = w.wait_phase("m1", Phase::Transferring).await?;
    let target_pod = m.status.unwrap().target.unwrap().pod;
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), &w.ns);
    assert!(
        pods.get_opt(&target_pod).await?.is_some(),
        "target pod exists mid-flight"
    );

    w.migrations()
        .delete("m1", &DeleteParams::default())
        .await?;
    wait_for(
        Duration::from_secs(30),
        "Migration gone (finalizer removed)",
        || async { Ok(w.migrations().get_opt("m1").await?.is_none()) },
    )
    .await?;
    let reasons: Vec<String> = events_for(&w, "m1")
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "Cancelled"), "{reasons:?}");
    let cancelled: Vec<Event> = events_for(&w, "m1").await;
    assert!(
        cancelled
            .iter()
            .all(|e| e.involved_object.uid == created.metadata.uid)
    );
    // The source keeps running; the target copy is gone; both daemons were told.
    assert!(pods.get_opt("web").await?.is_some());
    assert!(pods.get_opt(&target_pod).await?.is_none());
    let aborts: Vec<String> = agent
        .calls()
        .into_iter()
        .filter(|(c, _)| *c == Call::Abort)
        .map(|(_, n)| n.node)
        .collect();
    assert!(
        aborts.contains(&w.node("east", 1)) && aborts.contains(&w.node("east", 2)),
        "{aborts:?}"
    );
    Ok(())
}

/// Past the point of no return (post-copy handed the workload over), deleting the
/// Migration does not cancel: the migration completes, then the Migration goes; nothing
/// was aborted anywhere.
#[tokio::test]
async fn deleting_past_the_point_of_no_return_completes_forward() -> anyhow::Result<()> {
    let w = World::new("committed-delete").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.commit_when_transferring();
    agent.hold(Call::StartCheckpoint);
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(&migration_yaml("m1", "web", &w.same_cluster_target()))
        .await?;
    let m = w.wait_phase("m1", Phase::Transferring).await?;
    let status = m.status.unwrap();
    assert!(
        status.committed,
        "the status says it is past the point of no return"
    );
    let target_pod = status.target.unwrap().pod;
    w.migrations()
        .delete("m1", &DeleteParams::default())
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = w.migrations().get("m1").await?;
    assert!(
        m.metadata.deletion_timestamp.is_some(),
        "deleted, but held by its finalizer while it completes"
    );
    agent.release(Call::StartCheckpoint);
    wait_for(
        Duration::from_secs(30),
        "Migration gone once complete",
        || async { Ok(w.migrations().get_opt("m1").await?.is_none()) },
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), &w.ns);
    assert!(
        pods.get_opt(&target_pod).await?.is_some(),
        "the target runs on"
    );
    assert!(
        pods.get_opt("web").await?.is_none(),
        "the source was removed"
    );
    assert_eq!(agent.count(Call::Abort), 0, "nothing was aborted");
    assert_eq!(
        agent.count(Call::Fence),
        0,
        "the status said committed: no cancel was even attempted"
    );
    Ok(())
}

/// A failure past the point of no return is not rolled back (the source cannot resume;
/// removing the target would leave no copy at all): the Migration fails and says why.
#[tokio::test]
async fn a_failure_past_the_point_of_no_return_fails_without_rollback() -> anyhow::Result<()> {
    let w = World::new("committed-fail").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.commit_when_transferring();
    agent.fail(Call::StartRestore, "restore failed: no page source");
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(&migration_yaml("m1", "web", &w.same_cluster_target()))
        .await?;
    let m = w.wait_phase("m1", Phase::Failed).await?;
    let status = m.status.unwrap();
    let failure = status.failure.unwrap();
    assert_eq!(failure.reason, "RestoreFailed");
    assert!(
        failure.message.contains("no page source")
            && failure.message.contains("point of no return"),
        "{}",
        failure.message
    );
    assert!(!failure.rolled_back);
    assert_eq!(agent.count(Call::Abort), 0, "nothing was rolled back");
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), &w.ns);
    assert!(
        pods.get_opt(&status.target.unwrap().pod).await?.is_some(),
        "the target Pod is left for inspection"
    );
    Ok(())
}

#[tokio::test]
async fn a_restarted_controller_resumes_without_repeating_finished_steps() -> anyhow::Result<()> {
    let w = World::new("restart").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.hold(Call::StartRestore);
    let first = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(&migration_yaml("m1", "web", &w.same_cluster_target()))
        .await?;
    w.wait_phase("m1", Phase::Restoring).await?;
    drop(first); // the controller dies mid-restore
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _second = w.controller("a", agent.clone());
    agent.release(Call::StartRestore);
    w.wait_phase("m1", Phase::Succeeded).await?;
    for call in [
        Call::PrepareReceiver,
        Call::StartCheckpoint,
        Call::StartRestore,
    ] {
        assert_eq!(
            agent.count(call),
            1,
            "{call:?} started again after the restart"
        );
    }
    assert_eq!(agent.count(Call::Finalize), 2, "one Finalize per side");
    Ok(())
}

#[tokio::test]
async fn a_failed_restore_rolls_back_then_retries_by_policy() -> anyhow::Result<()> {
    let w = World::new("rollback").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    agent.fail(
        Call::StartRestore,
        "corrupted bundle: checksum mismatch at byte 4096",
    );
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    w.migration(
        &(migration_yaml("m1", "web", &w.same_cluster_target())
            + "  failurePolicy: {maxRetries: 1}\n"),
    )
    .await?;
    let m = w.wait_phase("m1", Phase::RolledBack).await?;
    let status = m.status.unwrap();
    let failure = status.failure.unwrap();
    assert_eq!(failure.reason, "RestoreFailed");
    assert!(failure.message.contains("corrupted bundle"));
    assert!(failure.rolled_back);
    assert_eq!(status.attempts, 1, "one retry, then give up");
    assert_eq!(agent.count(Call::StartRestore), 2);
    assert_eq!(
        agent.count(Call::Finalize),
        0,
        "the source was never removed"
    );
    let pods = Api::<Pod>::namespaced(w.east.clone(), &w.ns)
        .list(&ListParams::default())
        .await?;
    let names: Vec<String> = pods.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["web"], "only the source pod remains");
    Ok(())
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_acts_and_the_other_takes_over() -> anyhow::Result<()> {
    let w = World::new("leader").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    // A Lease long enough that slow apiserver answers on a busy machine cannot make
    // replica-a give up while it leads (it stops after two thirds of the Lease
    // without a renewal), and b starts only once a holds it.
    let settings = |identity: &str| {
        let mut s = w.settings(identity);
        s.lease_duration = Duration::from_secs(15);
        s
    };
    let a = w.controller_with(settings("replica-a"), agent.clone());
    let leases: Api<Lease> = Api::namespaced(w.east.clone(), &w.ns);
    wait_for(
        Duration::from_secs(30),
        "replica-a to hold the Lease",
        || async {
            let holder = leases
                .get_opt("ferry-controller")
                .await?
                .and_then(|l| l.spec?.holder_identity);
            Ok(holder.as_deref() == Some("replica-a"))
        },
    )
    .await?;
    let b = w.controller_with(settings("replica-b"), agent.clone());
    w.pod("web").await?;
    w.pod("api").await?;
    w.migration(&migration_yaml("m1", "web", &w.same_cluster_target()))
        .await?;
    w.wait_phase("m1", Phase::Succeeded).await?;
    assert!(a.reconciles() > 0, "the first replica leads");
    assert_eq!(b.reconciles(), 0, "the standby replica must not act");
    let instances: Vec<Option<String>> = events_for(&w, "m1")
        .await
        .into_iter()
        .map(|e| e.reporting_instance)
        .collect();
    assert!(
        instances.iter().all(|i| i.as_deref() == Some("replica-a")),
        "{instances:?}"
    );

    drop(a); // the leader dies; its Lease expires and the standby takes over
    w.migration(&migration_yaml("m2", "api", &w.same_cluster_target()))
        .await?;
    w.wait_phase("m2", Phase::Succeeded).await?;
    assert!(b.reconciles() > 0);
    let instances: Vec<Option<String>> = events_for(&w, "m2")
        .await
        .into_iter()
        .map(|e| e.reporting_instance)
        .collect();
    assert!(
        instances.iter().all(|i| i.as_deref() == Some("replica-b")),
        "{instances:?}"
    );
    Ok(())
}

#[tokio::test]
async fn of_two_migrations_of_one_pod_exactly_one_proceeds() -> anyhow::Result<()> {
    let w = World::new("twice").await?;
    let agent = Arc::new(ScriptedAgent::new(2));
    // Both are past every other check when they claim the pod.
    agent.rendezvous_describes(2);
    let _c = w.controller("a", agent.clone());
    w.pod("web").await?;
    let target = w.same_cluster_target();
    // Created together: both are Pending, and validated, at the same time.
    let (first, second) = (
        migration_yaml("first", "web", &target),
        migration_yaml("second", "web", &target),
    );
    let (a, b) = tokio::join!(w.migration(&first), w.migration(&second));
    a?;
    b?;
    let api = w.migrations();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let mut ended = Vec::new();
        for name in ["first", "second"] {
            let m = api.get(name).await?;
            if let Some(p) = m.status.as_ref().and_then(|s| s.phase)
                && p.is_terminal()
            {
                ended.push((name, p, m.status.and_then(|s| s.failure)));
            }
        }
        if ended.len() == 2 {
            break ended;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not both ended in 60 s: {ended:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let won: Vec<_> = ended
        .iter()
        .filter(|(_, p, _)| *p == Phase::Succeeded)
        .collect();
    // The loser lost the claim: refused while the winner moves the pod, or (when its
    // retry comes after the move) because the pod is gone from here.
    let lost: Vec<_> = ended
        .iter()
        .filter(|(_, p, f)| {
            *p == Phase::Failed
                && f.as_ref().is_some_and(|f| {
                    f.phase == Phase::Pending
                        && (f.reason == "AlreadyMigrating" || f.reason == "PodNotFound")
                })
        })
        .collect();
    assert!(
        won.len() == 1 && lost.len() == 1,
        "exactly one must move the pod, the other be refused: {ended:?}"
    );
    assert_eq!(
        agent.count(Call::StartCheckpoint),
        1,
        "only one Migration may freeze the pod"
    );
    eprintln!(
        "{} moved the pod; {} was refused: {}",
        won[0].0,
        lost[0].0,
        lost[0].2.as_ref().unwrap().message
    );
    Ok(())
}
