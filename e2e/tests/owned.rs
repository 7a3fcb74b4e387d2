//! A Deployment's Pod moves within its cluster on real nodes: the target Pod is held
//! outside the ReplicaSet until it is Ready, then adopted, then the source goes. Every
//! watch event on the Deployment's Pods is recorded: the ReplicaSet's ready Pods never
//! number more than one over or under its replicas, it never creates a Pod of its own,
//! and the moved Pod counts on. Pods of owners ferry cannot satisfy are refused.
use anyhow::{Context, Result, ensure};
use ferry_crds::Migration;
use ferry_e2e::world::{World, WorldOptions, counter_pod, numbers, succeeded, wait_for};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REPLICAS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployments_pod_moves_without_a_surplus_replica() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-owned-")
        .tempdir_in("/tmp")?;
    let mut w = World::start(dir.path(), WorldOptions::default()).await?;
    w.start_controller();
    for ns in ["deploy", "sts"] {
        w.namespace(ns).await?;
    }
    let w = &w;
    let (a, b) = futures::join!(
        deployment_pod_moves(w, "deploy"),
        stateful_set_refused(w, "sts")
    );
    let mut failed = 0;
    for (name, r) in [
        ("a Deployment's Pod moves, adopted by its ReplicaSet", a),
        ("a StatefulSet's Pod is refused", b),
    ] {
        match r {
            Ok(()) => eprintln!("scenario ok: {name}"),
            Err(e) => {
                failed += 1;
                eprintln!("scenario FAILED: {name}: {e:#}");
            }
        }
    }
    if failed > 0 {
        eprintln!("logs kept in {}", dir.keep().display());
        anyhow::bail!("{failed} scenario(s) failed");
    }
    Ok(())
}

/// A pod template of counters pinned to east-1 (the scheduler puts every replica there).
fn template(app: &str) -> serde_json::Value {
    let mut pod = counter_pod(app, "east-1", &["app"]);
    pod["metadata"] = json!({"labels": {"app": app}});
    pod
}

fn migration(pod: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: m}}\nspec:\n  workload: {{pod: {pod}}}\n  target: {{node: east-2}}\n  strategy: Cold\n"
    )
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What the watch saw: every Pod name, and after each event the ReplicaSet's ready,
/// not terminating Pods (what its `readyReplicas` counts).
#[derive(Default)]
struct Record {
    names: BTreeSet<String>,
    ready_counts: Vec<usize>,
}

async fn deployment_pod_moves(w: &World, ns: &str) -> Result<()> {
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "web"}},
                 "template": template("web")}
    }))?;
    let deployments: Api<Deployment> = Api::namespaced(w.east.clone(), ns);
    deployments.create(&PostParams::default(), &deploy).await?;
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    let by_app = ListParams::default().labels("app=web");
    wait_for(Duration::from_secs(120), "both replicas ready", || async {
        let ps = pods.list(&by_app).await?.items;
        Ok(ps.len() == REPLICAS && ps.iter().all(ready))
    })
    .await?;
    let rs = Api::<ReplicaSet>::namespaced(w.east.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("no ReplicaSet")?;
    let rs_uid = rs.uid().unwrap_or_default();
    let before: Vec<String> = pods
        .list(&by_app)
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let moving = before[0].clone();
    let stays = before[1].clone();

    // Every event from here on, with the ReplicaSet's view after it.
    let record = Arc::new(Mutex::new(Record::default()));
    let rec = record.clone();
    let (started, listed_rx) = tokio::sync::oneshot::channel();
    let mut started = Some(started);
    let stream = watcher::watcher(pods.clone(), watcher::Config::default().labels("app=web"));
    let watching = tokio::spawn(async move {
        let mut seen: BTreeMap<String, Pod> = BTreeMap::new();
        let mut stream = std::pin::pin!(stream);
        // The initial list arrives Pod by Pod: counted once complete.
        let mut listed = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Apply(p)) => {
                    seen.insert(p.name_any(), p);
                }
                Ok(Event::InitApply(p)) => {
                    seen.insert(p.name_any(), p);
                    continue;
                }
                Ok(Event::Delete(p)) => {
                    seen.remove(&p.name_any());
                }
                Ok(Event::Init) => {
                    seen.clear();
                    continue;
                }
                Ok(Event::InitDone) => {
                    listed = true;
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
                Err(_) => continue,
            }
            if !listed {
                continue;
            }
            let owned_ready = seen
                .values()
                .filter(|p| {
                    p.owner_references().iter().any(|o| o.uid == rs_uid)
                        && p.metadata.deletion_timestamp.is_none()
                        && ready(p)
                })
                .count();
            let mut r = rec.lock().unwrap();
            r.names.extend(seen.keys().cloned());
            r.ready_counts.push(owned_ready);
        }
    });
    w.counting(ns, &moving, &["app"]).await?;
    // The watch records from its first complete list on.
    tokio::time::timeout(Duration::from_secs(30), listed_rx)
        .await
        .context("the Pod watch did not list in 30 s")??;
    w.apply_migration(ns, &migration(&moving)).await?;
    let m: Migration = w
        .follow(ns, "m", Duration::from_secs(180), |m| {
            eprintln!("[{ns}] m: {:?}", m.status.as_ref().and_then(|s| s.phase));
        })
        .await?;
    let status = succeeded(&m)?;
    let target = status
        .target
        .as_ref()
        .map(|t| t.pod.clone())
        .context("no target")?;
    // Settled: the source is gone, the ReplicaSet holds its replicas, all ready.
    wait_for(
        Duration::from_secs(60),
        "the ReplicaSet to settle",
        || async {
            let ps = pods.list(&by_app).await?.items;
            Ok(ps.len() == REPLICAS && ps.iter().all(ready))
        },
    )
    .await?;
    // Long enough for a ReplicaSet that miscounted to have acted on it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    watching.abort();
    let r = std::mem::take(&mut *record.lock().unwrap());
    let now: BTreeSet<String> = pods
        .list(&by_app)
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    ensure!(
        now == BTreeSet::from([stays.clone(), target.clone()]),
        "the Deployment's Pods are {now:?}, not {stays} and the target {target}"
    );
    let expected: BTreeSet<String> = [moving.clone(), stays.clone(), target.clone()].into();
    ensure!(
        r.names == expected,
        "Pods seen during the move: {:?}: the ReplicaSet created or replaced one",
        r.names
    );
    let (lo, hi) = (REPLICAS - 1, REPLICAS + 1);
    ensure!(
        r.ready_counts.iter().all(|n| (lo..=hi).contains(n)),
        "ready replicas left {lo}..={hi} at some event: {:?}",
        r.ready_counts
    );
    eprintln!(
        "[{ns}] {} watch events; ready replicas per event: {:?}",
        r.ready_counts.len(),
        r.ready_counts
    );
    let t = pods.get(&target).await?;
    ensure!(
        t.owner_references()
            .iter()
            .any(|o| o.uid == rs.uid().unwrap_or_default()),
        "the target Pod is not the ReplicaSet's"
    );
    let first = *numbers(&w.logs("east", ns, &target, "app")?)
        .first()
        .context("empty log")?;
    ensure!(
        first > 1,
        "the target's log starts at {first}: restarted, not restored"
    );
    Ok(())
}

async fn stateful_set_refused(w: &World, ns: &str) -> Result<()> {
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                 "template": template("db")}
    }))?;
    Api::<StatefulSet>::namespaced(w.east.clone(), ns)
        .create(&PostParams::default(), &sts)
        .await?;
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    wait_for(Duration::from_secs(120), "db-0 ready", || async {
        Ok(pods.get_opt("db-0").await?.is_some_and(|p| ready(&p)))
    })
    .await?;
    let uid = pods.get("db-0").await?.uid();
    w.apply_migration(ns, &migration("db-0")).await?;
    let m = w.follow(ns, "m", Duration::from_secs(60), |_| {}).await?;
    let f = m
        .status
        .and_then(|s| s.failure)
        .context("no failure recorded")?;
    ensure!(
        f.reason == "UnsupportedOwner"
            && f.message
                .contains("StatefulSet db: its name is its identity"),
        "refused with {}: {}",
        f.reason,
        f.message
    );
    ensure!(pods.get("db-0").await?.uid() == uid, "db-0 was replaced");
    Ok(())
}
