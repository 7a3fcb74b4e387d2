//! The daemons tell the controller when an operation ends (`WatchProgress`, followed by
//! `ferry_controller::wake`); it does not have to poll for it. With the controller's
//! poll interval set to an hour, a Cold and a Live migration between real nodes still
//! go through every phase and succeed: a migration that waited for the next poll
//! would sit in Checkpointing for an hour, past this test's deadline.
use anyhow::{Result, ensure};
use ferry_crds::Phase;
use ferry_e2e::world::{World, WorldOptions, counter_pod};
use std::time::Duration;

/// Far beyond the test: any wait that needs a poll never ends in time.
const NO_POLLING: Duration = Duration::from_secs(3600);

async fn moves(w: &World, ns: &str, target: &str, node: &str, strategy: &str) -> Result<()> {
    w.namespace(ns).await?;
    w.create_pod(ns, counter_pod("counter", "east-1", &["app"]))
        .await?;
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: m}}\nspec:\n  \
         workload: {{pod: counter}}\n  target: {target}\n  strategy: {strategy}\n"
    );
    w.apply_migration(ns, &yaml).await?;
    let mut phases = vec![];
    let m = w
        .follow(ns, "m", Duration::from_secs(240), |m| {
            let p = m.status.as_ref().and_then(|s| s.phase);
            eprintln!("[{ns}] {p:?}");
            phases.extend(p);
        })
        .await?;
    let status = m.status.unwrap_or_default();
    ensure!(
        status.phase == Some(Phase::Succeeded),
        "[{ns}] ended {:?}: {:?} (phases {phases:?})",
        status.phase,
        status.failure
    );
    // The phases it entered, as the status records them (sampling the status can miss
    // a phase that lasted less than a read; a Live restore may end within the
    // reconcile that saw the checkpoint end, so Restoring is not required).
    let entered: Vec<Phase> = status
        .timings
        .as_ref()
        .map(|t| t.phases.iter().map(|p| p.phase).collect())
        .unwrap_or_default();
    for want in [Phase::Checkpointing, Phase::Completing] {
        ensure!(
            entered.contains(&want),
            "[{ns}] never entered {want:?}: {entered:?} (seen {phases:?})"
        );
    }
    // One copy: the target Pod's (within a cluster it has another name), none left
    // of the source.
    let target = status.target.map(|t| t.pod).unwrap_or_default();
    w.runs_only_on(ns, &[&target, "counter"], node, &["app"])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_finish_without_polling() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-push-")
        .tempdir_in("/tmp")?;
    let opts = WorldOptions {
        poll_interval: Some(NO_POLLING),
        ..Default::default()
    };
    let mut w = World::start(dir.path(), opts).await?;
    w.start_controller();
    let (cold, live) = futures::join!(
        moves(
            &w,
            "cold",
            "{cluster: west, node: west-1}",
            "west-1",
            "Cold"
        ),
        moves(&w, "live", "{node: east-2}", "east-2", "Live"),
    );
    cold?;
    live?;
    Ok(())
}
