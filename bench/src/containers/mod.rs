//! Container migration on real nodes, each case beside the same container moved by hand
//! with the same tools, in the same run:
//!
//! * **ferry** (what a user sees): a Pod running `memhog N` (N MiB of touched heap) on
//!   east-1 of the e2e world (kubelet + containerd nodes, ferry's controller in this
//!   process), and a Migration to `{cluster: west, node: west-1}` with strategy Cold,
//!   or Live (CRIU lazy pages). The numbers are the Succeeded Migration's
//!   `status.timings`: `downtimeMs` (the node daemons' freeze to restored-and-running)
//!   and `totalMs` (the whole Migration: target Pod, transfer, restore, cleanup).
//!   A fresh namespace and Pod for every run.
//! * **baseline, cold**: a standalone runc container from the same memhog binary (its
//!   bundle's rootfs is built directly, not unpacked from the image), `runc checkpoint
//!   --image-path` (CRIU dump to disk), `cp -a` of the images and the bundle, `runc
//!   restore` under a second runc root; downtime = checkpoint start to restore returned
//!   (the process is stopped throughout), and total = downtime.
//! * **baseline, lazy** (beside Live): `runc checkpoint --lazy-pages --page-server`
//!   (the source CRIU keeps serving the memory), `cp -a` of the images and bundle,
//!   `criu lazy-pages` + `runc restore --lazy-pages`; downtime = checkpoint start to
//!   restore returned (before the memory has moved), total = until the source CRIU
//!   exited, i.e. every page arrived.
//!
//! Where the baseline runs: its runc and CRIU processes run inside the world's node
//! network namespaces, the source in east-1's and the destination in west-1's, each
//! node with its own runc root, so the lazy pages cross the same veth/bridge as
//! ferry's. Both share this machine's disk for images, as ferry's staging does.
//!
//! Cold and Live runs alternate which side goes first (the machine is shared and
//! drifts); the full mode keeps the best of two runs of each side. There is no pre-copy
//! case: this kernel lacks the soft-dirty tracking CRIU's pre-dump needs (see
//! docs/containers.md).
mod baseline;
mod installed;
mod report;
mod service;

pub use report::step_breakdown;

use crate::Measurement;
use crate::bucket;
use anyhow::{Context, Result, bail, ensure};
use baseline::Raw;
use ferry_crds::{Migration, Phase};
use ferry_e2e::world::{World, WorldOptions};
use ferry_testkit::minio::MinioServer;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The workload: touches MIB MiB of heap (one write per page, so every page is
/// resident and none is the shared zero page), says so, then idles forever, or with
/// `--serve PORT` answers every TCP connection on PORT with one line, `memhog`.
/// `--devnull` first points its stdio at the container's own /dev/null: runc hands a
/// standalone container the host stdio it was started with, and CRIU cannot dump files
/// from outside the container. In a Pod the CRI shim's stdio is ferry's to handle.
const MEMHOG_C: &str = r#"
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int devnull = 0, port = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--devnull") == 0) devnull = 1;
        else if (strcmp(argv[i], "--serve") == 0 && i + 1 < argc) port = atoi(argv[++i]);
        else argc = 0;
    }
    if (argc < 2) { fprintf(stderr, "usage: memhog MIB [--devnull] [--serve PORT]\n"); return 2; }
    if (devnull) {
        int fd = open("/dev/null", O_RDWR);
        dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
        if (fd > 2) close(fd);
    }
    size_t n = (size_t)atol(argv[1]) << 20;
    char *p = malloc(n);
    if (!p) { perror("malloc"); return 1; }
    for (size_t i = 0; i < n; i += 4096) p[i] = (char)((i >> 12) | 1);
    printf("memhog: %s MiB resident\n", argv[1]);
    fflush(stdout);
    if (port) {
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 128)) { perror("listen"); return 1; }
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c < 0) continue;
            if (write(c, "memhog\n", 7) < 0) perror("write");
            close(c);
        }
    }
    for (;;) usleep(10000);
}
"#;

const MEMHOG_IMAGE: &str = "docker.io/library/memhog:ferry";
const SOURCE_NODE: &str = "east-1";
const TARGET_NODE: &str = "west-1";
/// The longest a Migration of the largest size may take before the bench gives up.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the suite: `sizes` in MiB (default by `quick`), `service_runs` runs of the
/// Service case (default: as many as the other cases).
pub fn run(quick: bool, sizes: &[u64], service_runs: Option<usize>) -> Result<Vec<Measurement>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(run_async(quick, sizes, service_runs))
}

async fn run_async(
    quick: bool,
    sizes: &[u64],
    service_runs: Option<usize>,
) -> Result<Vec<Measurement>> {
    let tmp = tempfile::Builder::new()
        .prefix("ferry-bench-containers-")
        .tempdir_in("/tmp")?;
    let result = bench(tmp.path(), quick, sizes, service_runs).await;
    if result.is_err() || std::env::var("FERRY_BENCH_KEEP").is_ok_and(|v| v == "1") {
        // The nodes' kubelet/containerd/ferry-node logs and the CRIU logs are in there.
        let how = if result.is_err() { "failed" } else { "done" };
        eprintln!(
            "containers bench {how}; logs kept in {}",
            tmp.keep().display()
        );
    }
    result
}

/// One side's best of the runs of a case.
struct Best {
    downtime_ms: f64,
    total_ms: f64,
    /// The steps of the run with the best downtime: ferry's `status.timings.steps`,
    /// the baseline's own (see [`baseline`]).
    steps: Option<serde_json::Value>,
}

impl Best {
    fn new() -> Best {
        Best {
            downtime_ms: f64::INFINITY,
            total_ms: f64::INFINITY,
            steps: None,
        }
    }

    fn add(&mut self, downtime_ms: f64, total_ms: f64, steps: Option<serde_json::Value>) {
        if downtime_ms < self.downtime_ms {
            self.downtime_ms = downtime_ms;
            self.steps = steps;
        }
        self.total_ms = self.total_ms.min(total_ms);
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Strategy {
    Cold,
    Live,
}

async fn bench(
    dir: &Path,
    quick: bool,
    sizes: &[u64],
    service_runs: Option<usize>,
) -> Result<Vec<Measurement>> {
    let memhog = build_memhog(dir)?;
    let image = dir.join("memhog-image.tar");
    let mut b = ferry_testkit::oci::ImageBuilder::new(MEMHOG_IMAGE);
    b.file(&memhog, "/memhog", 0o755)
        .dir("/tmp")
        .entrypoint(&["/memhog"]);
    b.write(&image)?;

    std::fs::create_dir_all(dir.join("world"))?;
    let mut world = World::start(
        &dir.join("world"),
        WorldOptions {
            images: vec![image.clone()],
            ..Default::default()
        },
    )
    .await?;
    world.start_controller();
    let client_host = world.start_client_host("east", "east-client")?;
    let w = &world;
    let minio = MinioServer::start_on(w.host_ip())?;
    minio.create_bucket(bucket::BUCKET).await?;
    // Declared after the world, so dropped before it: its containers and cgroups go
    // while the nodes' namespaces still exist.
    let raw = Raw::new(w, &dir.join("raw"), &memhog)?;

    let sizes: &[u64] = match (sizes, quick) {
        ([], true) => &[64],
        ([], false) => &[64, 1024],
        (given, _) => given,
    };
    let runs = if quick { 1 } else { 2 };
    let mut out = Vec::new();
    let mut ferry_first = true;
    // The smallest size's Direct Cold move, for the installed ferry's case.
    let mut smallest_cold = None;
    for &mib in sizes {
        let mut direct_cold = (f64::NAN, f64::NAN);
        for strategy in [Strategy::Cold, Strategy::Live] {
            let (mut ferry, mut base) = (Best::new(), Best::new());
            for run in 0..runs {
                // Alternate which side goes first, across cases and runs.
                let order = [ferry_first, !ferry_first];
                ferry_first = !ferry_first;
                for side_is_ferry in order {
                    if side_is_ferry {
                        let (d, t, steps) = ferry_run(w, strategy, (mib, 1), run, None).await?;
                        eprintln!(
                            "[bench] ferry {strategy:?} {mib} MiB run {run}: \
                             downtime {d:.0} ms, total {t:.0} ms"
                        );
                        ferry.add(d, t, steps);
                    } else {
                        let (d, t, steps) = tokio::task::block_in_place(|| match strategy {
                            Strategy::Cold => raw.cold(mib, run).map(|(d, s)| (d, d, s)),
                            Strategy::Live => raw.lazy(mib, run),
                        })?;
                        eprintln!(
                            "[bench] baseline {strategy:?} {mib} MiB run {run}: \
                             downtime {d:.0} ms, total {t:.0} ms"
                        );
                        base.add(d, t, Some(steps));
                    }
                }
            }
            if strategy == Strategy::Cold {
                direct_cold = (ferry.downtime_ms, ferry.total_ms);
                if smallest_cold.is_none_or(|(m, _)| mib < m) {
                    smallest_cold = Some((mib, direct_cold));
                }
            }
            out.extend(measurements(strategy, mib, runs, &ferry, &base));
        }
        // Cold through the bucket, beside this run's Direct Cold and a plain PUT + GET.
        let mut store = Best::new();
        for run in 0..runs {
            let (d, t, steps) = ferry_run(w, Strategy::Cold, (mib, 1), run, Some(&minio)).await?;
            eprintln!(
                "[bench] ferry Cold through the bucket {mib} MiB run {run}: \
                 downtime {d:.0} ms, total {t:.0} ms"
            );
            store.add(d, t, steps);
        }
        // The same memory in four containers, beside this run's one-container Cold.
        let mut four = Best::new();
        for run in 0..runs {
            let (d, t, steps) = ferry_run(w, Strategy::Cold, (mib / 4, 4), run, None).await?;
            eprintln!(
                "[bench] ferry Cold 4 x {} MiB run {run}: downtime {d:.0} ms, total {t:.0} ms",
                mib / 4
            );
            four.add(d, t, steps);
        }
        out.extend(four_containers(mib, runs, &four, direct_cold));
        let (put, get) = bucket::put_get(&minio, mib).await?;
        eprintln!("[bench] MinIO PUT {mib} MiB {put:.0} ms, GET {get:.0} ms");
        out.extend(bucket::measurements(
            mib,
            runs,
            (store.downtime_ms, store.total_ms),
            direct_cold,
            (put, get),
            store.steps.take(),
        ));
        // Called through its Service while it moves; the run with the shortest gap.
        // Each run moves it twice, with ferry's readiness gate and without.
        let (mut gated, mut ungated): (Option<service::GapRun>, Option<service::GapRun>) =
            (None, None);
        let service_runs = service_runs.unwrap_or(runs);
        for run in 0..service_runs {
            for (gate, best) in [(true, &mut gated), (false, &mut ungated)] {
                let r = service::client_gap(w, &client_host, mib, run, gate).await?;
                eprintln!(
                    "[bench] ferry Cold {mib} MiB called through its Service run {run} \
                     (readiness gate: {gate}): client gap {:.0} ms, downtime {:.0} ms, \
                     {} calls timed out ({}; ICMP rate-limited: {}), {} refused; source out \
                     of the endpoints {} ms after the freeze, target in {} ms after its \
                     restore",
                    r.gap_ms,
                    r.downtime_ms,
                    r.details["calls_timed_out"],
                    r.details["timed_out_by_window"],
                    r.details["icmp_rate_limited"],
                    r.details["calls_refused"],
                    r.details["breakdown"]["freeze_to_source_endpoint_gone_ms"],
                    r.details["breakdown"]["restored_to_target_endpoint_ready_ms"]
                );
                if best.as_ref().is_none_or(|b| r.gap_ms < b.gap_ms) {
                    *best = Some(r);
                }
            }
        }
        out.extend(service::measurements(mib, service_runs, gated, ungated));
    }
    drop(raw);
    drop(minio);
    drop(client_host);
    drop(world);
    // The same move through ferry as installed, in clusters of its own (the bench's
    // are gone: one set of nodes at a time on this machine).
    if let Some((mib, beside)) = smallest_cold {
        out.extend(tokio::task::block_in_place(|| {
            installed::measure(dir, &image, mib, beside)
        })?);
    }
    Ok(out)
}

/// What every direct case's details say: its size, strategy, runs, route and the
/// steps of ferry's best run.
fn case_details(
    mib: u64,
    strategy: Strategy,
    runs: usize,
    ferry: &Best,
) -> serde_json::Map<String, serde_json::Value> {
    let mut details = serde_json::Map::new();
    details.insert("rss_mib".into(), mib.into());
    details.insert("strategy".into(), format!("{strategy:?}").into());
    details.insert("runs".into(), runs.into());
    details.insert(
        "route".into(),
        format!("{SOURCE_NODE} -> {TARGET_NODE} (across clusters)").into(),
    );
    if let Some(steps) = &ferry.steps {
        details.insert("ferry_steps".into(), steps.clone());
    }
    details
}

/// The 4-container case: four containers of `mib / 4` MiB each, against one container
/// of `mib` MiB moved Cold in the same run (the dumps run in parallel, the restores one
/// after another as the kubelet creates the containers; the issue's goal is at most
/// 1.3x).
fn four_containers(mib: u64, runs: usize, four: &Best, one: (f64, f64)) -> Vec<Measurement> {
    let mut details = case_details(mib, Strategy::Cold, runs, four);
    details.insert("containers".into(), 4.into());
    Measurement::downtime_and_total(
        &format!("containers/cold-4x{}MiB", mib / 4),
        &format!("ferry Cold of one {mib} MiB container, same run"),
        &details,
        (four.downtime_ms, four.total_ms),
        one,
    )
}

/// The two measurements (downtime, total) of one case.
fn measurements(
    strategy: Strategy,
    mib: u64,
    runs: usize,
    ferry: &Best,
    base: &Best,
) -> Vec<Measurement> {
    let (tag, baseline_name) = match strategy {
        Strategy::Cold => (
            "cold",
            "raw runc checkpoint (CRIU dump to disk) + cp + runc restore",
        ),
        Strategy::Live => (
            "live",
            "raw runc checkpoint --lazy-pages + cp + criu lazy-pages + runc restore --lazy-pages",
        ),
    };
    let mut details = case_details(mib, strategy, runs, ferry);
    if let Some(steps) = &base.steps {
        details.insert("baseline_steps".into(), steps.clone());
    }
    Measurement::downtime_and_total(
        &format!("containers/{tag}-{mib}MiB"),
        baseline_name,
        &details,
        (ferry.downtime_ms, ferry.total_ms),
        (base.downtime_ms, base.total_ms),
    )
}

/// `memhog`, compiled static so the image and the bundle need nothing else.
fn build_memhog(dir: &Path) -> Result<PathBuf> {
    ferry_testkit::oci::static_binary(dir, "memhog", MEMHOG_C)
}

/// The containers of a memhog Pod of `n`: `hog`, then `hog-1`, `hog-2`, ...
fn hog_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i {
            0 => "hog".to_string(),
            i => format!("hog-{i}"),
        })
        .collect()
}

/// A Pod of `n` containers each holding `mib` MiB. It requests one CPU in all, as the
/// baseline's standalone runc container has (cpu.shares 1024): a BestEffort Pod's
/// cgroup has cpu.shares 2, and its restore (CRIU runs in the container's cgroup)
/// then starves behind anything else that runs on the node.
fn memhog_pod(mib: u64, n: usize) -> serde_json::Value {
    let cpu = format!("{}m", 1000 / n.max(1));
    let containers: Vec<serde_json::Value> = hog_names(n)
        .into_iter()
        .map(|name| {
            serde_json::json!({"name": name, "image": MEMHOG_IMAGE, "imagePullPolicy": "Never",
                               "args": [mib.to_string()],
                               "resources": {"requests": {"cpu": cpu}}})
        })
        .collect();
    serde_json::json!({
        "metadata": {"name": "memhog", "labels": {"app": "memhog"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": SOURCE_NODE},
            "terminationGracePeriodSeconds": 2,
            "containers": containers
        }
    })
}

/// One Migration through the controller of a Pod of `containers` containers of
/// `mib` MiB each: (downtime ms, total ms, steps if reported). With `bucket`, through
/// that MinIO (`transfer.mode: ObjectStore`).
async fn ferry_run(
    w: &World,
    strategy: Strategy,
    (mib, containers): (u64, usize),
    run: usize,
    bucket: Option<&MinioServer>,
) -> Result<(f64, f64, Option<serde_json::Value>)> {
    let via = if bucket.is_some() { "-bucket" } else { "" };
    let ns = format!(
        "{}{via}-{containers}x{mib}-{run}",
        format!("{strategy:?}").to_lowercase()
    );
    w.namespace(&ns).await?;
    if bucket.is_some() {
        bucket::create_secret(w, &ns).await?;
    }
    w.create_pod(&ns, memhog_pod(mib, containers)).await?;
    // Running means started; wait until the heap is in, as the baseline does.
    for name in hog_names(containers) {
        tokio::task::block_in_place(|| {
            wait_resident(mib, || w.container_pid(SOURCE_NODE, &ns, "memhog", &name))
        })?;
    }
    let mut yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: m}}\nspec:\n  \
         workload: {{pod: memhog}}\n  target: {{cluster: west, node: {TARGET_NODE}}}\n  \
         strategy: {strategy:?}\n"
    );
    if let Some(minio) = bucket {
        yaml += &bucket::transfer_yaml(minio);
    }
    w.apply_migration(&ns, &yaml).await?;
    let m = w.follow(&ns, "m", MIGRATION_TIMEOUT, |_| {}).await?;
    let result = timings(&m).with_context(|| format!("{strategy:?} migration of {mib} MiB"));
    cleanup(w, &ns).await;
    result
}

/// Frees a run's memory (a 1 GiB Pod per run) before the next case: its namespace's
/// objects go in both clusters, and the Pods are waited for.
async fn cleanup(w: &World, ns: &str) {
    w.clean_namespace(ns).await;
    for cluster in ["east", "west"] {
        let _ = w
            .kubectl(cluster)
            .args([
                "-n",
                ns,
                "wait",
                "--for=delete",
                "pod",
                "--all",
                "--timeout=60s",
            ])
            .output();
    }
}

/// downtime_ms, total_ms and `timings.steps` of a Migration that must have Succeeded.
fn timings(m: &Migration) -> Result<(f64, f64, Option<serde_json::Value>)> {
    let status = m.status.as_ref().context("Migration has no status")?;
    if status.phase != Some(Phase::Succeeded) {
        match &status.failure {
            Some(f) => bail!(
                "Migration {:?} in {:?}: {}: {}",
                status.phase,
                f.phase,
                f.reason,
                f.message
            ),
            None => bail!("Migration ended {:?} without a failure", status.phase),
        }
    }
    let t = status
        .timings
        .as_ref()
        .context("Succeeded without timings")?;
    let downtime = t.downtime_ms.context("Succeeded without downtimeMs")?;
    let total = t.total_ms.context("Succeeded without totalMs")?;
    // Read through JSON: the per-step list is newer than some versions of the CRD type.
    let steps = serde_json::to_value(status)?["timings"]["steps"].clone();
    let steps = steps
        .as_array()
        .is_some_and(|a| !a.is_empty())
        .then_some(steps);
    Ok((downtime as f64, total as f64, steps))
}

/// Waits (blocking) until the process `pid_of` names holds 95% of `mib` MiB resident.
fn wait_resident(mib: u64, pid_of: impl Fn() -> Result<u32>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = (mib << 20) * 95 / 100;
    loop {
        let last = match pid_of() {
            Ok(pid) if rss_bytes(pid) >= want => return Ok(()),
            Ok(pid) => format!("pid {pid} has {} MiB", rss_bytes(pid) >> 20),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "memhog never reached {mib} MiB resident: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// VmRSS of a process, from /proc (0 when it cannot be read).
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .map_or(0, |kb| kb << 10)
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}
