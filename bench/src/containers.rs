//! Container migration downtime, each case beside raw CRIU in the same run:
//! * ferry cold: the runc backend of `ferry-node` (pause, `runc checkpoint` with pages
//!   streamed to the destination's CRIU page server, bundle streamed over TCP, restore
//!   as soon as it arrives), source and destination as two backend instances with their
//!   own runc roots on loopback; downtime = freeze to restored-and-running.
//! * baseline: raw `runc checkpoint` (CRIU dump to disk) + `cp` of the images and
//!   bundle + `runc restore`; downtime = the sum (the process is stopped throughout).
//! * ferry post-copy: the same backends with `Strategy::PostCopy` (CRIU lazy pages):
//!   downtime = freeze to restored-and-running, before the memory has moved; the time
//!   until the last page arrived is in the details.
//! * lazy baseline: raw `runc checkpoint --lazy-pages` + `cp` of the images and bundle +
//!   `criu lazy-pages` + `runc restore --lazy-pages`; downtime = checkpoint start to
//!   restore done.
//!
//! The workload is a static C program holding N MiB of touched heap (built here with
//! gcc; CRIU comes from `scripts/install-criu.sh`). There is no pre-copy case: CRIU's
//! pre-dump needs soft-dirty memory tracking, which this kernel lacks (see
//! docs/containers.md).
use crate::Measurement;
use anyhow::{Context, Result, bail};
use ferry_node::criu::Criu;
use ferry_node::runc::Runc;
use ferry_node::runc_backend::{RuncConfig, RuncRuntime};
use ferry_node::runtime::*;
use ferry_node::transport::Transport;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEMHOG_C: &str = r#"
#include <stdlib.h>
#include <unistd.h>
#include <fcntl.h>
int main(int argc, char **argv) {
    /* Drop the host stdio runc handed over: CRIU cannot dump files outside the container. */
    int fd = open("/dev/null", O_RDWR);
    dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
    size_t n = (size_t)atol(argv[1]) << 20;
    char *p = malloc(n);
    for (size_t i = 0; i < n; i += 4096) p[i] = (char)((i >> 12) | 1);
    volatile unsigned long k = 0;
    for (;;) { k++; usleep(10000); }
}
"#;

pub fn run(quick: bool) -> Result<Vec<Measurement>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(quick))
}

struct Bench {
    dir: PathBuf,
    memhog: PathBuf,
    cgroup: String,
    src: RuncRuntime,
    dst: RuncRuntime,
    runc_a: Runc,
    runc_b: Runc,
}

async fn run_async(quick: bool) -> Result<Vec<Measurement>> {
    let criu = which_criu()?;
    // (No tempfile dependency in this crate: a pid-named dir, removed at the end.)
    let dir = std::env::temp_dir().join(format!("ferry-bench-containers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let memhog = dir.join("memhog");
    std::fs::write(dir.join("memhog.c"), MEMHOG_C)?;
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&memhog)
        .arg(dir.join("memhog.c"))
        .output()?;
    if !out.status.success() {
        bail!(
            "gcc -static memhog.c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cgroup = format!("ferry-bench-{}", std::process::id());
    let runc_a = Runc::new("runc", dir.join("runc-a"));
    let runc_b = Runc::new("runc", dir.join("runc-b"));
    // Both "nodes" are this process on loopback; each gets its own transfer identity.
    let pki = ferry_transfer::TestPki::generate()?;
    let mut transports = vec![];
    for name in ["a", "b"] {
        let id = pki.issue(&format!("bench-{name}"), &["127.0.0.1"])?;
        transports.push(std::sync::Arc::new(
            Transport::with_identity(id, "127.0.0.1", 0).await?,
        ));
    }
    let mk = |name: &str, runc: &Runc| RuncConfig {
        runc: runc.clone(),
        criu: Criu {
            binary: criu.clone(),
        },
        state_dir: dir.join(format!("state-{name}")),
        advertise_ip: "127.0.0.1".into(),
        cgroup_prefix: format!("/{cgroup}/{name}"),
        transport: transports[usize::from(name == "b")].clone(),
    };
    let b = Bench {
        src: RuncRuntime::new(mk("a", &runc_a)).await,
        dst: RuncRuntime::new(mk("b", &runc_b)).await,
        dir,
        memhog,
        cgroup,
        runc_a,
        runc_b,
    };
    let sizes: &[u64] = if quick { &[64] } else { &[64, 256, 1024] };
    let lazy_ok = b
        .src
        .strategies()
        .iter()
        .find(|s| s.strategy == Strategy::PostCopy)
        .map(|s| (s.available, s.reason.clone()))
        .unwrap_or_default();
    let mut out = Vec::new();
    let result = async {
        // Alternate baseline and ferry, keep the best of each: the machine is shared.
        let runs = if quick { 1 } else { 2 };
        for &mib in sizes {
            let (mut base_ms, mut ferry_ms, mut bytes) = (f64::MAX, f64::MAX, 0);
            for _ in 0..runs {
                base_ms = base_ms.min(b.baseline(mib).await?);
                let (f, n) = b.ferry_cold(mib).await?;
                ferry_ms = ferry_ms.min(f);
                bytes = n;
            }
            let mut details = serde_json::Map::new();
            details.insert("rss_mib".into(), mib.into());
            details.insert("bundle_bytes_excluding_pages".into(), bytes.into());
            details.insert("strategy".into(), "cold".into());
            out.push(Measurement {
                case: format!("containers/cold-{mib}MiB"),
                metric: "downtime_ms".into(),
                ferry: ferry_ms,
                baseline: base_ms,
                baseline_name: "raw runc checkpoint (CRIU dump to disk) + cp + runc restore".into(),
                details,
            });
            if !lazy_ok.0 {
                tracing::warn!(reason = %lazy_ok.1, "post-copy unavailable: no lazy-pages case");
                continue;
            }
            let (mut base_ms, mut base_total) = (f64::MAX, 0.0);
            let (mut lazy_ms, mut lazy_total, mut bytes) = (f64::MAX, 0.0, 0);
            for _ in 0..runs {
                let (d, t) = b.baseline_lazy(mib).await?;
                if d < base_ms {
                    (base_ms, base_total) = (d, t);
                }
                let (d, t, n) = b.ferry_lazy(mib).await?;
                if d < lazy_ms {
                    (lazy_ms, lazy_total, bytes) = (d, t, n);
                }
            }
            let mut details = serde_json::Map::new();
            details.insert("rss_mib".into(), mib.into());
            details.insert("bundle_bytes_excluding_pages".into(), bytes.into());
            details.insert("strategy".into(), "post-copy".into());
            details.insert("ferry_until_all_pages_ms".into(), lazy_total.into());
            details.insert("baseline_until_all_pages_ms".into(), base_total.into());
            details.insert("ferry_cold_downtime_ms".into(), ferry_ms.into());
            out.push(Measurement {
                case: format!("containers/lazy-{mib}MiB"),
                metric: "downtime_ms".into(),
                ferry: lazy_ms,
                baseline: base_ms,
                baseline_name: "raw runc checkpoint --lazy-pages + cp + criu lazy-pages + runc restore --lazy-pages".into(),
                details,
            });
        }
        anyhow::Ok(())
    }
    .await;
    b.cleanup().await;
    let _ = std::fs::remove_dir_all(&b.dir);
    result?;
    Ok(out)
}

fn which_criu() -> Result<PathBuf> {
    ferry_testkit::containers::criu()
}

impl Bench {
    /// A bundle whose process holds `mib` MiB, started under runc root A.
    async fn start(&self, id: &str, mib: u64, pod: &WorkloadRef) -> Result<PathBuf> {
        let bundle = self.dir.join(format!("bundle-{id}"));
        let _ = std::fs::remove_dir_all(&bundle); // from a previous run
        let rootfs = bundle.join("rootfs");
        for d in ["proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(&self.memhog, rootfs.join("memhog"))?;
        let out = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .output()?;
        if !out.status.success() {
            bail!("runc spec: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = bundle.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["process"]["terminal"] = false.into();
        c["process"]["args"] = serde_json::json!(["/memhog", mib.to_string()]);
        c["linux"]["cgroupsPath"] = format!("/{}/src/{id}", self.cgroup).into();
        c["annotations"] = serde_json::json!({
            "io.kubernetes.pod.namespace": pod.namespace, "io.kubernetes.pod.name": pod.pod_name,
            "io.kubernetes.pod.uid": pod.pod_uid, "io.kubernetes.container.name": "hog",
        });
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
        let err_path = self.dir.join(format!("{id}.stderr"));
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_a.root)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            // The container inherits runc's stdio: a pipe here would never reach EOF.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .status()?;
        if !out.success() {
            bail!(
                "runc run {id}: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        // Wait until the heap is resident.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = self.runc_a.list().await?;
            let pid = list.iter().find(|c| c.id == id).map(|c| c.pid).unwrap_or(0);
            if pid != 0 && ferry_node::runc::rss_bytes(pid) >= (mib << 20) * 95 / 100 {
                return Ok(bundle);
            }
            if Instant::now() > deadline {
                bail!("{id} never reached {mib} MiB RSS");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ferry_cold(&self, mib: u64) -> Result<(f64, u64)> {
        let (downtime, _, bytes) = self.ferry(mib, Strategy::Cold).await?;
        Ok((downtime, bytes))
    }

    /// (downtime, until every page arrived, bundle bytes) of a post-copy migration.
    async fn ferry_lazy(&self, mib: u64) -> Result<(f64, f64, u64)> {
        self.ferry(mib, Strategy::PostCopy).await
    }

    /// One migration through the backends; (downtime ms, checkpoint-to-done ms, bytes).
    async fn ferry(&self, mib: u64, strategy: Strategy) -> Result<(f64, f64, u64)> {
        let tag = if strategy == Strategy::PostCopy {
            "lazy"
        } else {
            "ferry"
        };
        let pod = WorkloadRef {
            namespace: "bench".into(),
            pod_name: format!("{tag}-{mib}"),
            pod_uid: String::new(),
        };
        let id = format!("{tag}-{mib}");
        self.start(&id, mib, &pod).await?;
        let desc = self.src.describe(&pod).await?.context("pod not found")?;
        let (psink, _prx) = ProgressSink::new(&id, Stage::Prepared);
        let info = self
            .dst
            .prepare_receiver(
                ReceiverPlan {
                    migration_id: id.clone(),
                    workload: desc,
                    target: pod.clone(),
                    strategy,
                },
                psink,
            )
            .await?;
        let plan = CheckpointPlan {
            migration_id: id.clone(),
            workload: pod.clone(),
            strategy,
            receive_endpoint: info.receive_endpoint,
            page_servers: info.page_servers,
            leave_running: true,
        };
        let (csink, _crx) = ProgressSink::new(&id, Stage::Checkpointing);
        let (rsink, _rrx) = ProgressSink::new(&id, Stage::Restoring);
        let t0 = Instant::now();
        let (c, r) = tokio::join!(
            self.src.checkpoint_out(plan, csink.clone()),
            self.dst.restore_in(&id, &pod, rsink.clone())
        );
        // Post-copy: the checkpoint ends when the last page has been fetched.
        let total = t0.elapsed().as_secs_f64() * 1000.0;
        c?;
        r?;
        let downtime = rsink.latest().downtime_ms as f64;
        self.src.finalize(&id).await?;
        self.dst.finalize(&id).await?;
        let _ = self.runc_b.delete_force(&id).await;
        let _ = std::fs::remove_dir_all(self.dir.join("state-b").join(&id));
        Ok((downtime, total, csink.latest().bytes_done))
    }

    /// Raw lazy migration with the tools alone: returns (downtime ms, until all pages
    /// fetched ms).
    async fn baseline_lazy(&self, mib: u64) -> Result<(f64, f64)> {
        let pod = WorkloadRef {
            namespace: "bench".into(),
            pod_name: format!("rawlazy-{mib}"),
            pod_uid: String::new(),
        };
        let id = format!("rawlazy-{mib}");
        let bundle = self.start(&id, mib, &pod).await?;
        let d = |s: &str| self.dir.join(format!("rawlazy-{s}-{mib}"));
        let (img, work, img2, work2, bundle2) =
            (d("img"), d("work"), d("img2"), d("work2"), d("bundle2"));
        for p in [&img, &work, &work2] {
            std::fs::create_dir_all(p)?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let t0 = Instant::now();
        let args = self.runc_a.checkpoint_args(
            &id,
            &ferry_node::runc::CheckpointOpts {
                image_path: img.clone(),
                work_path: work.clone(),
                page_server: Some(format!("127.0.0.1:{port}")),
                lazy_pages: true,
                status_fd: Some(1),
                ..Default::default()
            },
        );
        let mut dump = self.runc_a.spawn(&args)?;
        let mut stdout = dump.stdout.take().context("runc stdout")?;
        let mut byte = [0u8; 1];
        if tokio::io::AsyncReadExt::read(&mut stdout, &mut byte).await? != 1 {
            self.runc_a
                .finish(dump, &args, Some(&work.join("dump.log")))
                .await?;
            bail!("raw lazy dump ended before its page server started");
        }
        cp(&img, &img2)?;
        cp(&bundle, &bundle2)?;
        let path = bundle2.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["linux"]["cgroupsPath"] = format!("/{}/rawlazy-dst/{id}", self.cgroup).into();
        std::fs::write(&path, serde_json::to_vec(&c)?)?;
        let criu = Criu {
            binary: which_criu()?,
        };
        criu.start_lazy_pages(&ferry_node::criu::LazyPagesOpts {
            images_dir: img2.clone(),
            work_dir: work2.clone(),
            source_address: "127.0.0.1".into(),
            source_port: port,
            pidfile: work2.join("lazy.pid"),
            log_file: work2.join("lazy.log"),
        })
        .await?;
        let args2 = self.runc_b.restore_args(
            &id,
            &ferry_node::runc::RestoreOpts {
                image_path: img2.clone(),
                work_path: work2.clone(),
                bundle: bundle2.clone(),
                lazy_pages: true,
                ..Default::default()
            },
        );
        self.runc_b
            .run(args2, Some(&work2.join("restore.log")))
            .await?;
        let downtime = t0.elapsed();
        self.runc_a
            .finish(dump, &args, Some(&work.join("dump.log")))
            .await?;
        let total = t0.elapsed();
        tracing::info!(mib, ?downtime, ?total, "raw lazy baseline");
        let _ = self.runc_b.delete_force(&id).await;
        let _ = self.runc_a.delete_force(&id).await;
        for p in [&img, &img2, &work, &work2, &bundle2] {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok((
            downtime.as_secs_f64() * 1000.0,
            total.as_secs_f64() * 1000.0,
        ))
    }

    async fn baseline(&self, mib: u64) -> Result<f64> {
        let pod = WorkloadRef {
            namespace: "bench".into(),
            pod_name: format!("raw-{mib}"),
            pod_uid: String::new(),
        };
        let id = format!("raw-{mib}");
        let bundle = self.start(&id, mib, &pod).await?;
        let (img, work) = (
            self.dir.join(format!("raw-img-{mib}")),
            self.dir.join(format!("raw-work-{mib}")),
        );
        let (img2, bundle2) = (
            self.dir.join(format!("raw-img2-{mib}")),
            self.dir.join(format!("raw-bundle2-{mib}")),
        );
        std::fs::create_dir_all(&img)?;
        std::fs::create_dir_all(&work)?;
        let t0 = Instant::now();
        let args = self.runc_a.checkpoint_args(
            &id,
            &ferry_node::runc::CheckpointOpts {
                image_path: img.clone(),
                work_path: work.clone(),
                ..Default::default()
            },
        );
        self.runc_a.run(args, Some(&work.join("dump.log"))).await?;
        cp(&img, &img2)?;
        cp(&bundle, &bundle2)?;
        let t_copy = t0.elapsed();
        // The copy must not share the source cgroup (the source is gone, but keep it clean).
        let path = bundle2.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["linux"]["cgroupsPath"] = format!("/{}/raw-dst/{id}", self.cgroup).into();
        std::fs::write(&path, serde_json::to_vec(&c)?)?;
        let args = self.runc_b.restore_args(
            &id,
            &ferry_node::runc::RestoreOpts {
                image_path: img2.clone(),
                work_path: work.clone(),
                bundle: bundle2.clone(),
                ..Default::default()
            },
        );
        self.runc_b
            .run(args, Some(&work.join("restore.log")))
            .await?;
        let downtime = t0.elapsed();
        tracing::info!(mib, ?t_copy, ?downtime, "raw baseline");
        let _ = self.runc_b.delete_force(&id).await;
        let _ = self.runc_a.delete_force(&id).await;
        for d in [&img, &img2, &work, &bundle2] {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(downtime.as_secs_f64() * 1000.0)
    }

    async fn cleanup(&self) {
        for r in [&self.runc_a, &self.runc_b] {
            for c in r.list().await.unwrap_or_default() {
                let _ = r.delete_force(&c.id).await;
            }
        }
        for ctrl in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            rmdir_tree(&ctrl.path().join(&self.cgroup));
        }
    }
}

fn cp(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

fn rmdir_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(p);
    }
}

#[cfg(test)]
mod tests {
    /// Runs the quick suite (needs root, runc, CRIU from scripts/install-criu.sh, gcc).
    #[test]
    #[ignore = "benchmark: run with --ignored"]
    fn containers_bench() {
        let quick = std::env::var("FERRY_BENCH_FULL").is_err();
        for m in super::run(quick).unwrap() {
            println!(
                "{} {}: ferry {:.0} baseline {:.0} ratio {:.2} {:?}",
                m.case,
                m.metric,
                m.ferry,
                m.baseline,
                m.ratio(),
                m.details
            );
        }
    }
}
