//! Shared fixtures for the container tests: busybox bundles, runc containers, and
//! `ferry-node` daemons inside testkit network namespaces. Everything is torn down by
//! guards, even when a test fails.
#![allow(dead_code)]
use anyhow::{Result, bail};
use ferry_proto::node::v1 as pb;
use ferry_proto::node::v1::node_agent_client::NodeAgentClient;
use ferry_testkit::containers::PodLabels;
use ferry_testkit::netns::{Lan, Node};
use ferry_testkit::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub type Client = NodeAgentClient<Channel>;

/// CRIU built by scripts/install-criu.sh (Debian 12's own CRIU does not work here).
pub fn require_criu() -> PathBuf {
    ferry_testkit::containers::criu().unwrap_or_else(|e| panic!("{e:#}"))
}

pub use ferry_testkit::containers::{CgroupGuard, in_node, runc_list};

/// An OCI bundle at `dir` running `script` under `sh -c`, annotated as container `name`
/// of `pod` the way the CRI does.
pub fn write_bundle(
    dir: &Path,
    pod: &pb::WorkloadRef,
    name: &str,
    script: &str,
    cgroup: &str,
) -> Result<()> {
    let labels = PodLabels {
        namespace: pod.namespace.clone(),
        name: pod.pod_name.clone(),
        uid: pod.pod_uid.clone(),
    };
    ferry_testkit::containers::write_bundle(dir, &labels, name, script, cgroup)
}

/// runc containers started by the test; `runc delete --force` on drop.
pub struct Containers {
    pub root: PathBuf,
    pub ids: Vec<String>,
}

impl Containers {
    pub fn new(root: &Path) -> Containers {
        Containers {
            root: root.to_path_buf(),
            ids: Vec::new(),
        }
    }

    pub fn run(&mut self, node: &Node, bundle: &Path, id: &str) -> Result<()> {
        let out = in_node(node, "runc")
            .arg("--root")
            .arg(&self.root)
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("runc run {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.ids.push(id.to_string());
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<serde_json::Value>> {
        runc_list(&self.root)
    }
}

pub fn runc_status(root: &Path, id: &str) -> Option<String> {
    runc_list(root)
        .ok()?
        .iter()
        .find(|c| c["id"] == id)
        .map(|c| c["status"].as_str().unwrap_or("").to_string())
}

impl Drop for Containers {
    fn drop(&mut self) {
        // Whatever is under the root, including containers a daemon restored there.
        for c in runc_list(&self.root).unwrap_or_default() {
            if let Some(id) = c["id"].as_str() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&self.root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
    }
}

/// One simulated node running `ferry-node`.
pub struct Daemon {
    pub node: Node,
    pub runc_root: PathBuf,
    pub state_dir: PathBuf,
    pub containers: Containers,
    _child: ChildGuard,
    pub client: Client,
}

impl Daemon {
    pub async fn start(
        lan: &Lan,
        label: &str,
        base: &Path,
        criu: &Path,
        cgroup_prefix: &str,
    ) -> Result<Daemon> {
        let node = lan.add_node(label)?;
        let runc_root = base.join(format!("runc-{label}"));
        let state_dir = base.join(format!("state-{label}"));
        let tls_dir = ferry_testkit::pki::node_tls_dir(
            &base.join(format!("tls-{label}")),
            label,
            &node.ip().to_string(),
        )?;
        let mut cmd = in_node(&node, env!("CARGO_BIN_EXE_ferry-node"));
        cmd.arg("--listen")
            .arg(format!("{}:7070", node.ip()))
            .arg("--advertise-ip")
            .arg(node.ip().to_string())
            .arg("--runc-root")
            .arg(&runc_root)
            .arg("--criu")
            .arg(criu)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--cgroup-prefix")
            .arg(cgroup_prefix)
            .arg("--tls-dir")
            .arg(tls_dir)
            .arg("--vm-root")
            .arg(base.join(format!("vms-{label}")))
            .env("RUST_LOG", "info,ferry_node=debug");
        let child = ChildGuard::spawn(&format!("ferry-node-{label}"), cmd)?;
        let url = format!("http://{}:7070", node.ip());
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match NodeAgentClient::connect(url.clone()).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    bail!("ferry-node {label} did not come up: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let containers = Containers::new(&runc_root);
        Ok(Daemon {
            node,
            runc_root,
            state_dir,
            containers,
            _child: child,
            client,
        })
    }
}

/// Daemons on nodes A and B of a fresh LAN, with the temp dir and cgroup they use.
/// Containers start on A under `/<cgroup>/a/...`; a rollback restores them on A under
/// `a-restored`. Fields are declared so that destructuring them in this order drops
/// the daemons first and the directory last.
pub struct TwoNodes {
    pub base: tempfile::TempDir,
    pub cg: CgroupGuard,
    pub lan: Lan,
    pub a: Daemon,
    pub b: Daemon,
}

impl TwoNodes {
    pub async fn start() -> Result<TwoNodes> {
        let criu = require_criu();
        let base = tempfile::tempdir()?;
        let cg = CgroupGuard::new("test");
        let lan = Lan::create()?;
        let a_cgroups = format!("/{}/a-restored", cg.0);
        let a = Daemon::start(&lan, "a", base.path(), &criu, &a_cgroups).await?;
        let b = Daemon::start(&lan, "b", base.path(), &criu, &format!("/{}/b", cg.0)).await?;
        Ok(TwoNodes {
            base,
            cg,
            lan,
            a,
            b,
        })
    }
}

/// Polls GetOperation until the operation leaves RUNNING.
pub async fn wait_op(c: &mut Client, id: &str, timeout: Duration) -> Result<pb::Operation> {
    let deadline = Instant::now() + timeout;
    loop {
        let op = c
            .get_operation(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await?
            .into_inner();
        if op.state != pb::OperationState::Running as i32 {
            return Ok(op);
        }
        if Instant::now() > deadline {
            bail!("operation {id} still running after {timeout:?}: {op:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn succeeded(op: &pb::Operation) -> bool {
    op.state == pb::OperationState::Succeeded as i32
}

/// The controller's part of a cold migration, minus finalize: describe on the source,
/// prepare the destination, checkpoint, restore (started at once, it waits for bundles).
pub async fn migrate(
    src: &mut Client,
    dst: &mut Client,
    id: &str,
    pod: &pb::WorkloadRef,
    target: &pb::WorkloadRef,
) -> Result<(pb::Operation, pb::Operation)> {
    migrate_with(src, dst, id, pod, target, pb::Strategy::Cold).await
}

/// [`migrate`] with another strategy. Returns once both operations have ended (for
/// post-copy the checkpoint ends when the destination has fetched the last page).
pub async fn migrate_with(
    src: &mut Client,
    dst: &mut Client,
    id: &str,
    pod: &pb::WorkloadRef,
    target: &pb::WorkloadRef,
    strategy: pb::Strategy,
) -> Result<(pb::Operation, pb::Operation)> {
    let desc = src.describe_workload(pod.clone()).await?.into_inner();
    let prep = dst
        .prepare_receiver(pb::PrepareReceiverRequest {
            migration_id: id.into(),
            workload: Some(desc),
            target: Some(target.clone()),
            strategy: strategy as i32,
            transfer: None,
        })
        .await?
        .into_inner();
    src.start_checkpoint(pb::StartCheckpointRequest {
        migration_id: id.into(),
        workload: Some(pod.clone()),
        strategy: strategy as i32,
        transfer: None,
        receive_endpoint: prep.receive_endpoint,
        leave_running: true,
        page_servers: prep.page_servers,
    })
    .await?;
    dst.start_restore(pb::StartRestoreRequest {
        migration_id: id.into(),
        target: Some(target.clone()),
    })
    .await?;
    let cp = wait_op(src, id, Duration::from_secs(60)).await?;
    if !succeeded(&cp) {
        // The destination would wait for bundles forever: the controller aborts it.
        let ab = dst
            .abort(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await?
            .into_inner();
        return Ok((cp, ab));
    }
    let rs = wait_op(dst, id, Duration::from_secs(60)).await?;
    Ok((cp, rs))
}

pub fn pod(name: &str) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: "default".into(),
        pod_name: name.into(),
        pod_uid: format!("uid-{name}"),
    }
}

/// The numbers a counter container wrote to its log, one per line.
pub fn read_counts(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

/// The shell of a counter container: in-memory counter `i`, an open file (fd 3, not in
/// append mode, so a lost offset would overwrite earlier lines), a listening socket on
/// 8080, and an established loopback connection on 8081 inside the pod's netns.
pub const COUNTER_SCRIPT: &str = "exec >/dev/null 2>/dev/null </dev/null; nc -l -p 8080 & \
     sleep 100000 | nc -l -p 8081 & usleep 200000; sleep 100000 | nc 127.0.0.1 8081 & exec 3>/data/count.log; \
     i=0; while true; do i=$((i+1)); echo $i >&3; usleep 50000; done";

/// A static C program for the memory-heavy tests: touches `argv[1]` MiB with a known
/// pattern, then counts like [`COUNTER_SCRIPT`] (fd 3 on /data/count.log, not append)
/// while re-reading 4096 pages per tick (the whole buffer every few seconds); any page
/// that lost its pattern is reported in /data/errors.log. Built with gcc (installed by
/// scripts/install-criu.sh) into `out`.
pub fn build_memcounter(out: &Path) -> Result<()> {
    const SRC: &str = r#"
#include <stdlib.h>
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
static unsigned char pat(size_t page) { return (unsigned char)((page * 2654435761u) >> 7) | 1; }
int main(int argc, char **argv) {
    int fd = open("/dev/null", O_RDWR);
    dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
    size_t pages = ((size_t)atol(argv[1]) << 20) / 4096;
    unsigned char *p = malloc(pages * 4096);
    for (size_t i = 0; i < pages; i++) p[i * 4096 + (i % 4000)] = pat(i);
    int log = open("/data/count.log", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    size_t next = 0;
    for (unsigned long i = 1;; i++) {
        for (int k = 0; k < 4096; k++, next = (next + 1) % pages) {
            if (p[next * 4096 + (next % 4000)] != pat(next)) {
                int e = open("/data/errors.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
                dprintf(e, "page %zu lost its pattern at tick %lu\n", next, i);
                close(e);
            }
        }
        dprintf(log, "%lu\n", i);
        usleep(50000);
    }
}
"#;
    let dir = out.parent().unwrap_or(Path::new("/tmp"));
    let src = dir.join("memcounter.c");
    std::fs::write(&src, SRC)?;
    let o = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .output()?;
    if !o.status.success() {
        bail!(
            "gcc -static memcounter.c (scripts/install-criu.sh installs gcc): {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// Resident memory of `pid` in bytes (0 when gone).
pub fn rss_of(pid: u64) -> u64 {
    ferry_node::runc::rss_bytes(pid as u32)
}
