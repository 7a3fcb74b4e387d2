//! Volumes on real nodes: a Pod's emptyDir files move with it (Cold across clusters,
//! Live within one), kept open by the processes that write them; a Pod on node-local
//! storage is refused with the volume named, and runs on untouched.
use anyhow::{Context, Result, ensure};
use ferry_crds::Migration;
use ferry_e2e::world::{World, WorldOptions, counter_pod, numbers, pod_running, succeeded};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_move_or_are_refused() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-volumes-")
        .tempdir_in("/tmp")?;
    let mut w = World::start(dir.path(), WorldOptions::default()).await?;
    w.start_controller();
    for ns in ["scratch-cold", "scratch-live", "local-pv"] {
        w.namespace(ns).await?;
    }
    let w = &w;
    let results = futures::join!(
        empty_dirs_move(w, "scratch-cold", "Cold"),
        empty_dirs_move(w, "scratch-live", "Live"),
        node_local_claim_is_refused(w, "local-pv", dir.path()),
    );
    let named = [
        ("emptyDirs move, Cold across clusters", results.0),
        ("emptyDirs move, Live within a cluster", results.1),
        ("a pod on a node-local PV is refused", results.2),
    ];
    let mut failed = 0;
    for (name, r) in named {
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
        anyhow::bail!("{failed} volume scenario(s) failed");
    }
    Ok(())
}

/// Two containers share emptyDir `shared`, each appending its count to its own file
/// there through a descriptor held open; the second also holds a Memory-backed
/// emptyDir. A 1 MiB random file and a note are written before the move.
fn scratch_pod(name: &str) -> serde_json::Value {
    let script = "exec 3>>/shared/$C.log; i=0; while true; do i=$((i+1)); echo $i; echo $i >&3; usleep 50000; done";
    let mut pod = pod_running(name, "east-1", &["a", "b"], script);
    for (i, c) in ["a", "b"].iter().enumerate() {
        let ctr = &mut pod["spec"]["containers"][i];
        ctr["env"] = json!([{"name": "C", "value": c}]);
        ctr["volumeMounts"] = json!([{"name": "shared", "mountPath": "/shared"}]);
    }
    pod["spec"]["containers"][1]["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "mem", "mountPath": "/mem"}));
    pod["spec"]["volumes"] = json!([
        {"name": "shared", "emptyDir": {}},
        {"name": "mem", "emptyDir": {"medium": "Memory"}},
    ]);
    pod
}

fn migration(name: &str, pod: &str, target: &str, strategy: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec:\n  workload: {{pod: {pod}}}\n  target: {target}\n  strategy: {strategy}\n"
    )
}

async fn run(w: &World, ns: &str, yaml: &str) -> Result<Migration> {
    w.apply_migration(ns, yaml).await?;
    w.follow(ns, "m", Duration::from_secs(180), |m| {
        eprintln!("[{ns}] m: {:?}", m.status.as_ref().and_then(|s| s.phase));
    })
    .await
}

async fn empty_dirs_move(w: &World, ns: &str, strategy: &str) -> Result<()> {
    w.create_pod(ns, scratch_pod("scratchy")).await?;
    let blob_sum = w.exec(
        "east",
        ns,
        "scratchy",
        "a",
        &[
            "sh",
            "-c",
            "head -c 1048576 /dev/urandom > /shared/blob && md5sum /shared/blob",
        ],
    )?;
    w.exec(
        "east",
        ns,
        "scratchy",
        "b",
        &["sh", "-c", "echo kept in memory > /mem/note"],
    )?;
    w.counting(ns, "scratchy", &["a", "b"]).await?;
    let (target, cluster, node) = if strategy == "Cold" {
        ("{cluster: west, node: west-1}", "west", "west-1")
    } else {
        ("{node: east-2}", "east", "east-2")
    };
    let m = run(w, ns, &migration("m", "scratchy", target, strategy)).await?;
    let status = succeeded(&m)?;
    let pod = status
        .target
        .as_ref()
        .map(|t| t.pod.clone())
        .context("no target")?;
    let target: Pod = Api::namespaced(w.client(cluster).clone(), ns)
        .get(&pod)
        .await?;
    ensure!(
        target.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node),
        "target not on {node}"
    );
    let moved_sum = w.exec(cluster, ns, &pod, "a", &["md5sum", "/shared/blob"])?;
    ensure!(
        moved_sum == blob_sum,
        "the emptyDir file changed on the way: {blob_sum:?} → {moved_sum:?}"
    );
    let note = w.exec(cluster, ns, &pod, "b", &["cat", "/mem/note"])?;
    ensure!(note.trim() == "kept in memory", "/mem/note: {note:?}");
    for c in ["a", "b"] {
        // Restored, not restarted: the log continues, and the file the process holds
        // open in the emptyDir has every count from 1 with none lost or repeated.
        let first = *numbers(&w.logs(cluster, ns, &pod, c)?)
            .first()
            .with_context(|| format!("{c}: empty log"))?;
        ensure!(
            first > 1,
            "{c}: the target's log starts at {first}: restarted"
        );
        let file = numbers(&w.exec(cluster, ns, &pod, c, &["cat", &format!("/shared/{c}.log")])?);
        ensure!(
            file.first() == Some(&1),
            "{c}: its emptyDir log lost its start"
        );
        ensure!(
            file.windows(2).all(|p| p[1] == p[0] + 1),
            "{c}: its emptyDir log has gaps or repeats"
        );
        ensure!(
            file.contains(&(first - 1)) && file.last() >= Some(&first),
            "{c}: its emptyDir log does not continue across the move"
        );
    }
    w.runs_only_on(ns, &["scratchy", &pod], node, &["a", "b"])
        .await
}

/// A counter whose Pod mounts a claim bound to a `local` PersistentVolume on east-1.
async fn node_local_claim_is_refused(w: &World, ns: &str, dir: &Path) -> Result<()> {
    let path = dir.join("local-pv");
    std::fs::create_dir_all(&path)?;
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "e2e-local-pv"},
        "spec": {
            "capacity": {"storage": "1Mi"}, "accessModes": ["ReadWriteOnce"],
            "storageClassName": "e2e-local", "persistentVolumeReclaimPolicy": "Retain",
            "local": {"path": path.display().to_string()},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["east-1"]}]}]}},
        }
    }))?;
    Api::<PersistentVolume>::all(w.east.clone())
        .create(&PostParams::default(), &pv)
        .await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-local",
                 "volumeName": "e2e-local-pv", "resources": {"requests": {"storage": "1Mi"}}}
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(w.east.clone(), ns)
        .create(&PostParams::default(), &pvc)
        .await?;
    let mut pod = counter_pod("pinned", "east-1", &["app"]);
    pod["spec"]["containers"][0]["volumeMounts"] = json!([{"name": "db", "mountPath": "/db"}]);
    pod["spec"]["volumes"] =
        json!([{"name": "db", "persistentVolumeClaim": {"claimName": "data"}}]);
    w.create_pod(ns, pod).await?;
    let m = run(w, ns, &migration("m", "pinned", "{node: east-2}", "Cold")).await?;
    let f = m
        .status
        .as_ref()
        .and_then(|s| s.failure.clone())
        .context("no failure recorded")?;
    ensure!(
        f.reason == "VolumeNotMovable"
            && f.message.contains(
                "volume db is PVC data on node-local storage (PersistentVolume e2e-local-pv)"
            ),
        "refused with {}: {}",
        f.reason,
        f.message
    );
    // Refused before anything was touched: the pod counts on, once, where it was.
    w.check_runs_once_on(ns, "pinned", "east-1").await
}
