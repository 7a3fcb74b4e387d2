//! The user's view: a Cold move of the memhog Pod through ferry as `helm install` puts
//! it on two clusters (`ferry_e2e::installed`: the chart's controller Deployment, its
//! node DaemonSet, the ferry-runtime that DaemonSet installs, the clusters linked by
//! `kubectl ferry link`, the move started by `kubectl ferry migrate --wait`), beside
//! this run's Direct Cold move of the same size through the controller and daemons the
//! bench starts beside its nodes. The ratio is what running as installed costs: the
//! Pods' resource limits, the linked cluster's kubeconfig, the DaemonSet's host pieces.
use super::{
    Best, MEMHOG_IMAGE, SOURCE_NODE, Strategy, TARGET_NODE, case_details, memhog_pod, timings,
};
use crate::Measurement;
use anyhow::{Context, Result};
use ferry_crds::Migration;
use ferry_e2e::installed::{Installed, wait_until};
use std::path::Path;
use std::time::{Duration, Instant};

const NS: &str = "bench";

/// One move of `mib` MiB; `beside`: (downtime, total) of this run's Direct Cold move.
pub(super) fn measure(
    dir: &Path,
    image: &Path,
    mib: u64,
    beside: (f64, f64),
) -> Result<Vec<Measurement>> {
    let started = Instant::now();
    let w = Installed::start_cluster_set(
        &dir.join("installed"),
        &[("east", &[SOURCE_NODE]), ("west", &[TARGET_NODE])],
        &[image.to_path_buf()],
    )?;
    eprintln!(
        "[bench] ferry installed on two clusters in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    for c in ["east", "west"] {
        w.kubectl(c, &["create", "namespace", NS])?;
    }
    let mut pod = memhog_pod(mib, 1);
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    pod["metadata"]["namespace"] = NS.into();
    let manifest = dir.join("installed-memhog.json");
    std::fs::write(&manifest, pod.to_string())?;
    w.kubectl("east", &["apply", "-f", &manifest.to_string_lossy()])?;
    // memhog prints once its heap is in, as the other cases wait for.
    wait_until(
        Duration::from_secs(120),
        "memhog to hold its memory",
        || {
            Ok(
                w.kubectl("east", &["logs", "-n", NS, "memhog", "-c", "hog"])
                    .is_ok_and(|l| l.contains("resident")),
            )
        },
        || {
            w.kubectl("east", &["describe", "pod", "-n", NS, "memhog"])
                .unwrap_or_default()
        },
    )?;
    let to = format!("west/{TARGET_NODE}");
    w.migrate(NS, &["memhog", "--to", &to, "--cold", "--name", "m"])?;
    let json = w.kubectl("east", &["get", "migration", "-n", NS, "m", "-o", "json"])?;
    let m: Migration = serde_json::from_str(&json).context("the Migration as JSON")?;
    let (downtime, total, steps) = timings(&m)?;
    eprintln!(
        "[bench] installed ferry Cold {mib} MiB: downtime {downtime:.0} ms, total {total:.0} ms"
    );
    let mut run = Best::new();
    run.add(downtime, total, steps);
    let mut details = case_details(mib, Strategy::Cold, 1, &run);
    details.insert(
        "route".into(),
        format!("east/{SOURCE_NODE} -> west/{TARGET_NODE}, helm-installed ferry").into(),
    );
    details.insert("image".into(), MEMHOG_IMAGE.into());
    Ok(Measurement::downtime_and_total(
        &format!("containers/installed-cold-{mib}MiB"),
        "ferry Cold of the same size through the controller and daemons started beside \
         the nodes, same run",
        &details,
        (downtime, total),
        beside,
    ))
}
