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
use crate::Measurement;
use crate::bucket;
use anyhow::{Context, Result, bail, ensure};
use ferry_crds::{Migration, Phase};
use ferry_e2e::world::{World, WorldOptions};
use ferry_testkit::containers::{CgroupGuard, RuncRoot};
use ferry_testkit::minio::MinioServer;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The workload: touches MIB MiB of heap (one write per page, so every page is
/// resident and none is the shared zero page), says so, then idles forever.
/// `--devnull` first points its stdio at the container's own /dev/null: runc hands a
/// standalone container the host stdio it was started with, and CRIU cannot dump files
/// from outside the container. In a Pod the CRI shim's stdio is ferry's to handle.
const MEMHOG_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: memhog MIB [--devnull]\n"); return 2; }
    if (argc > 2 && strcmp(argv[2], "--devnull") == 0) {
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
    for (;;) usleep(10000);
}
"#;

const MEMHOG_IMAGE: &str = "docker.io/library/memhog:ferry";
const SOURCE_NODE: &str = "east-1";
const TARGET_NODE: &str = "west-1";
/// The longest a Migration of the largest size may take before the bench gives up.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(quick: bool, sizes: &[u64]) -> Result<Vec<Measurement>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(run_async(quick, sizes))
}

async fn run_async(quick: bool, sizes: &[u64]) -> Result<Vec<Measurement>> {
    let tmp = tempfile::Builder::new()
        .prefix("ferry-bench-containers-")
        .tempdir_in("/tmp")?;
    let result = bench(tmp.path(), quick, sizes).await;
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
    /// the baseline's own (see [`StepClock`]).
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

async fn bench(dir: &Path, quick: bool, sizes: &[u64]) -> Result<Vec<Measurement>> {
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
            images: vec![image],
            ..Default::default()
        },
    )
    .await?;
    world.start_controller();
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
    }
    drop(raw);
    drop(world);
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
    let src = dir.join("memhog.c");
    let bin = dir.join("memhog");
    std::fs::write(&src, MEMHOG_C)?;
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running gcc (scripts/install-deps.sh installs gcc and libc6-dev)")?;
    ensure!(
        out.status.success(),
        "gcc -static memhog.c: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(bin)
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
    // Free the memory (a 1 GiB Pod per run) before the next case.
    w.clean_namespace(&ns).await;
    for cluster in ["east", "west"] {
        let _ = w
            .kubectl(cluster)
            .args([
                "-n",
                &ns,
                "wait",
                "--for=delete",
                "pod",
                "--all",
                "--timeout=60s",
            ])
            .output();
    }
    result
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

/// A by-hand move's steps, one after the other, in the shape the controller reports
/// ferry's (`status.timings.steps`: name, node, startMs, durationMs), so the two plot
/// side by side; times are ms since the move began.
struct StepClock {
    t0: Instant,
    last: Instant,
    steps: Vec<serde_json::Value>,
}

impl StepClock {
    fn new(t0: Instant) -> StepClock {
        StepClock {
            t0,
            last: t0,
            steps: vec![],
        }
    }

    /// Records the step that ran from the previous one's end until now.
    fn step(&mut self, name: &str, node: &str) {
        let now = Instant::now();
        self.steps.push(serde_json::json!({
            "name": name,
            "node": node,
            "startMs": (self.last - self.t0).as_secs_f64() * 1e3,
            "durationMs": (now - self.last).as_secs_f64() * 1e3,
        }));
        self.last = now;
    }

    fn steps(self) -> serde_json::Value {
        self.steps.into()
    }
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

/// One node of the by-hand path: its network namespace and a runc root of its own.
struct RawNode {
    netns: String,
    ip: Ipv4Addr,
    /// Force-deletes what is left under the root when dropped.
    runc: RuncRoot,
}

/// The baseline: runc and CRIU driven by hand (see the module docs).
struct Raw {
    dir: PathBuf,
    memhog: PathBuf,
    runc: PathBuf,
    criu: PathBuf,
    src: RawNode,
    dst: RawNode,
    /// Parent of every baseline container's cgroup; removed on drop.
    cgroup: CgroupGuard,
}

impl Raw {
    fn new(w: &World, dir: &Path, memhog: &Path) -> Result<Raw> {
        std::fs::create_dir_all(dir)?;
        let node = |name: &str, root: &str| {
            let kube = &w.node(name).kube;
            RawNode {
                netns: kube.netns().to_string(),
                ip: kube.ip(),
                runc: RuncRoot {
                    root: dir.join(root),
                },
            }
        };
        Ok(Raw {
            dir: dir.to_path_buf(),
            memhog: memhog.to_path_buf(),
            // The runc ferry-runtime is configured with (e2e/src/world.rs).
            runc: ["/usr/sbin/runc", "/usr/bin/runc"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .context("runc not installed")?,
            criu: ferry_testkit::containers::criu()?,
            src: node(SOURCE_NODE, "runc-src"),
            dst: node(TARGET_NODE, "runc-dst"),
            cgroup: CgroupGuard::new("bench"),
        })
    }

    /// runc with `node`'s root and our CRIU, inside `node`'s network namespace
    /// (`nsenter --net` execs runc, so runc's stdio is what we give this Command).
    fn runc(&self, node: &RawNode) -> Command {
        let mut c = self.in_netns(node, &self.runc);
        c.arg("--root")
            .arg(&node.runc.root)
            .arg("--criu")
            .arg(&self.criu);
        c
    }

    fn in_netns(&self, node: &RawNode, prog: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", node.netns)).arg(prog);
        c
    }

    /// A bundle of `memhog MIB --devnull`, run under the source root; returns the
    /// bundle once the heap is resident.
    fn start(&self, id: &str, mib: u64) -> Result<PathBuf> {
        let bundle = self.dir.join(id).join("bundle");
        let rootfs = bundle.join("rootfs");
        for d in ["proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(&self.memhog, rootfs.join("memhog"))?;
        let mut spec = Command::new(&self.runc);
        spec.args(["spec", "--bundle"]).arg(&bundle);
        run_ok(spec, "runc spec", None)?;
        let path = bundle.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["process"]["terminal"] = false.into();
        c["process"]["args"] = serde_json::json!(["/memhog", mib.to_string(), "--devnull"]);
        c["linux"]["cgroupsPath"] = format!("/{}/src/{id}", self.cgroup.0).into();
        // Keep the mounts CRIU handles without extra options (no sysfs/cgroup/mqueue).
        let keep = ["/proc", "/dev", "/dev/pts", "/dev/shm"];
        let mounts: Vec<serde_json::Value> = c["mounts"]
            .as_array()
            .context("runc spec has mounts")?
            .iter()
            .filter(|m| keep.contains(&m["destination"].as_str().unwrap_or("")))
            .cloned()
            .collect();
        c["mounts"] = mounts.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&c)?)?;

        let err_path = self.dir.join(id).join("run.stderr");
        let st = self
            .runc(&self.src)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            // The container inherits runc's stdio: a pipe here would never reach EOF.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .status()?;
        ensure!(
            st.success(),
            "runc run {id}: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        wait_resident(mib, || self.pid(&self.src, id))?;
        Ok(bundle)
    }

    fn state(&self, node: &RawNode, id: &str) -> Result<serde_json::Value> {
        let mut c = self.runc(node);
        c.args(["state", id]);
        Ok(serde_json::from_slice(&run_ok(c, "runc state", None)?)?)
    }

    fn pid(&self, node: &RawNode, id: &str) -> Result<u32> {
        let s = self.state(node, id)?;
        s["pid"]
            .as_u64()
            .filter(|&p| p > 0)
            .map(|p| p as u32)
            .context("runc state: no pid")
    }

    /// The restored copy runs (checked after the clock stopped).
    fn check_restored(&self, id: &str) -> Result<()> {
        let s = self.state(&self.dst, id)?;
        ensure!(s["status"] == "running", "restored {id} is {}", s["status"]);
        Ok(())
    }

    /// The copy must not share the source's cgroup (the source is gone by then, but
    /// keep the two apart as two nodes would).
    fn retarget_cgroup(&self, bundle: &Path, id: &str) -> Result<()> {
        let path = bundle.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["linux"]["cgroupsPath"] = format!("/{}/dst/{id}", self.cgroup.0).into();
        std::fs::write(&path, serde_json::to_vec(&c)?)?;
        Ok(())
    }

    fn restore(&self, id: &str, img: &Path, work: &Path, bundle: &Path, lazy: bool) -> Result<()> {
        let mut c = self.runc(&self.dst);
        c.args(["restore", "--detach", "--image-path"])
            .arg(img)
            .arg("--work-path")
            .arg(work)
            .arg("--bundle")
            .arg(bundle);
        if lazy {
            c.arg("--lazy-pages");
        }
        c.arg(id);
        run_ok(c, "runc restore", Some(&work.join("restore.log"))).map(drop)
    }

    /// The directories of one by-hand move: the source's images and work dir, their
    /// copies at the destination, and the copied bundle (created where runc needs it).
    fn raw_dirs(&self, id: &str) -> Result<RawDirs> {
        let d = self.dir.join(id);
        let dirs = RawDirs {
            img: d.join("img"),
            work: d.join("work"),
            img2: d.join("img2"),
            work2: d.join("work2"),
            bundle2: d.join("bundle2"),
            d,
        };
        for p in [&dirs.img, &dirs.work, &dirs.work2] {
            std::fs::create_dir_all(p)?;
        }
        Ok(dirs)
    }

    /// The copy step of a by-hand move: images and bundle to the destination's side,
    /// the bundle pointed at the destination's cgroup.
    fn copy_to_destination(
        &self,
        id: &str,
        img: &Path,
        bundle: &Path,
        img2: &Path,
        bundle2: &Path,
    ) -> Result<()> {
        cp(img, img2)?;
        cp(bundle, bundle2)?;
        self.retarget_cgroup(bundle2, id)
    }

    /// Cold by hand; returns the downtime in ms and its steps.
    fn cold(&self, mib: u64, run: usize) -> Result<(f64, serde_json::Value)> {
        let id = format!("raw-cold-{mib}-{run}");
        let result = self.cold_inner(&id, mib);
        self.remove(&id);
        result
    }

    fn cold_inner(&self, id: &str, mib: u64) -> Result<(f64, serde_json::Value)> {
        let bundle = self.start(id, mib)?;
        let RawDirs {
            img,
            work,
            img2,
            work2,
            bundle2,
            ..
        } = self.raw_dirs(id)?;
        let t0 = Instant::now();
        let mut clock = StepClock::new(t0);
        let mut c = self.runc(&self.src);
        c.args(["checkpoint", "--image-path"])
            .arg(&img)
            .arg("--work-path")
            .arg(&work)
            .arg(id);
        run_ok(c, "runc checkpoint", Some(&work.join("dump.log")))?;
        clock.step("dump", SOURCE_NODE);
        self.copy_to_destination(id, &img, &bundle, &img2, &bundle2)?;
        clock.step("copy", "-");
        self.restore(id, &img2, &work2, &bundle2, false)?;
        clock.step("restore", TARGET_NODE);
        let downtime = ms(t0);
        self.check_restored(id)?;
        Ok((downtime, clock.steps()))
    }

    /// Lazy pages by hand; returns (downtime ms, until every page arrived ms, steps).
    fn lazy(&self, mib: u64, run: usize) -> Result<(f64, f64, serde_json::Value)> {
        let id = format!("raw-lazy-{mib}-{run}");
        let result = self.lazy_inner(&id, mib);
        self.remove(&id);
        result
    }

    fn lazy_inner(&self, id: &str, mib: u64) -> Result<(f64, f64, serde_json::Value)> {
        let bundle = self.start(id, mib)?;
        let RawDirs {
            d,
            img,
            work,
            img2,
            work2,
            bundle2,
        } = self.raw_dirs(id)?;
        // A port the kernel just called free (on the host; the node's namespace has
        // only ferry-node's and the kubelet's listeners, on fixed ports).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let t0 = Instant::now();
        let mut clock = StepClock::new(t0);
        let mut c = self.runc(&self.src);
        c.args(["checkpoint", "--image-path"])
            .arg(&img)
            .arg("--work-path")
            .arg(&work)
            .arg("--page-server")
            .arg(format!("{}:{port}", self.src.ip))
            // CRIU writes one byte to fd 1 once its lazy page server listens.
            .args(["--lazy-pages", "--status-fd", "1"])
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("checkpoint.stderr"))?);
        let mut dump = Group::spawn(c)?;
        let dump_log = work.join("dump.log");
        let mut byte = [0u8; 1];
        if dump.stdout()?.read(&mut byte)? != 1 {
            let st = dump.wait(Duration::from_secs(10))?;
            bail!(
                "raw lazy dump ended ({st}) before its page server started: {}{}",
                std::fs::read_to_string(d.join("checkpoint.stderr")).unwrap_or_default(),
                log_tail(&dump_log)
            );
        }
        clock.step("dump", SOURCE_NODE);
        self.copy_to_destination(id, &img, &bundle, &img2, &bundle2)?;
        clock.step("copy", "-");
        // The destination's userfaultfd daemon; `--daemon` returns once its socket (in
        // the restore's work dir) is ready, and it exits once every page is in.
        let mut lp = self.in_netns(&self.dst, &self.criu);
        lp.args(["lazy-pages", "--daemon", "--page-server", "--address"])
            .arg(self.src.ip.to_string())
            .arg("--port")
            .arg(port.to_string())
            .arg("--images-dir")
            .arg(&img2)
            .arg("--work-dir")
            .arg(&work2)
            .arg("--pidfile")
            .arg(work2.join("lazy.pid"))
            .arg("-o")
            .arg(work2.join("lazy.log"))
            .arg("-v4");
        run_ok(lp, "criu lazy-pages", Some(&work2.join("lazy.log")))?;
        clock.step("lazy-pages daemon", TARGET_NODE);
        self.restore(id, &img2, &work2, &bundle2, true)?;
        clock.step("restore", TARGET_NODE);
        let downtime = ms(t0);
        // The source CRIU exits (and runc checkpoint with it) once the last page went.
        let st = dump.wait(Duration::from_secs(120 + mib / 4))?;
        clock.step("pages", "-");
        let total = ms(t0);
        ensure!(
            st.success(),
            "runc checkpoint --lazy-pages: {st}: {}{}",
            std::fs::read_to_string(d.join("checkpoint.stderr")).unwrap_or_default(),
            log_tail(&dump_log)
        );
        self.check_restored(id)?;
        Ok((downtime, total, clock.steps()))
    }

    /// Ends both copies of `id` and removes its files (errors ignored: best effort).
    fn remove(&self, id: &str) {
        for node in [&self.src, &self.dst] {
            let mut c = self.runc(node);
            c.args(["delete", "--force", id]);
            let _ = c.output();
        }
        // A lazy-pages daemon is gone by now unless the run failed half way.
        let pidfile = self.dir.join(id).join("work2").join("lazy.pid");
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(self.dir.join(id));
    }
}

/// A spawned process group (runc and the CRIU it starts); killed on drop unless it
/// was waited for.
struct RawDirs {
    d: PathBuf,
    img: PathBuf,
    work: PathBuf,
    img2: PathBuf,
    work2: PathBuf,
    bundle2: PathBuf,
}

struct Group(Option<Child>);

impl Group {
    fn spawn(mut cmd: Command) -> Result<Group> {
        cmd.process_group(0);
        Ok(Group(Some(
            cmd.spawn().with_context(|| format!("starting {cmd:?}"))?,
        )))
    }

    fn stdout(&mut self) -> Result<&mut std::process::ChildStdout> {
        self.0
            .as_mut()
            .and_then(|c| c.stdout.as_mut())
            .context("no stdout pipe")
    }

    /// Its exit status; polls often, the return is on the clock of the lazy baseline.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.0.as_mut().context("already waited")?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.0 = None;
                return Ok(st);
            }
            ensure!(Instant::now() < deadline, "still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` (stdin from /dev/null) and returns its stdout; a failure carries stderr
/// and the end of the CRIU log `log`.
fn run_ok(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        log.map(log_tail).unwrap_or_default()
    );
    Ok(out.stdout)
}

/// The last lines of a CRIU log, for an error message.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("\n");
    format!("\n--- {} (end) ---\n{tail}", path.display())
}

fn cp(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(
        st.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}

/// ferry's per-step breakdown of every case whose details carry `ferry_steps`
/// (`status.timings.steps` of its best run): one line per step with its node, its
/// start as an offset from the first step's, and its duration.
pub fn step_breakdown(ms: &[Measurement]) -> String {
    let mut out = String::new();
    let mut seen = HashSet::new();
    for m in ms {
        let Some(steps) = m.details.get("ferry_steps").and_then(|s| s.as_array()) else {
            continue;
        };
        if !seen.insert(m.case.as_str()) {
            continue; // the downtime and total rows of a case share one run's steps
        }
        let start = |s: &serde_json::Value| s["startMs"].as_f64();
        let t0 = steps.iter().filter_map(start).fold(f64::INFINITY, f64::min);
        let _ = writeln!(out, "ferry steps of {} (its best-downtime run):", m.case);
        let _ = writeln!(
            out,
            "  {:<36} {:<10} {:>10} {:>12}",
            "step", "node", "start_ms", "duration_ms"
        );
        for s in steps {
            let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            let _ = writeln!(
                out,
                "  {:<36} {:<10} {:>10} {:>12}",
                s["name"].as_str().unwrap_or("?"),
                s["node"].as_str().unwrap_or("-"),
                num(start(s).map(|v| v - t0)),
                num(s["durationMs"].as_f64()),
            );
        }
        // ferry's own share: the downtime minus CRIU's dump (which streams the pages
        // for Cold) and restore, each the slowest container's (they run in parallel).
        let slowest = |prefix: &str| {
            steps
                .iter()
                .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                .filter_map(|s| s["durationMs"].as_f64())
                .fold(0.0, f64::max)
        };
        let criu = slowest("dump/") + slowest("restore/");
        if let Some(d) = ms
            .iter()
            .find(|x| x.case == m.case && x.metric == "downtime_ms")
        {
            let _ = writeln!(
                out,
                "  ferry's own share of the {:.0} ms downtime: {:.0} ms (CRIU dump + restore {:.0} ms)",
                d.ferry,
                d.ferry - criu,
                criu
            );
        }
        if let Some(base) = m.details.get("baseline_steps").and_then(|s| s.as_array()) {
            let line = base
                .iter()
                .map(|s| {
                    format!(
                        "{} {:.0} ms",
                        s["name"].as_str().unwrap_or("?"),
                        s["durationMs"].as_f64().unwrap_or(f64::NAN)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(out, "  its baseline's steps: {line}");
        }
    }
    out
}
