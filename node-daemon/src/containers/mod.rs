//! The container runtime: pods run by containerd (runc), moved with CRIU.
//!
//! The target copy is always a kubelet-owned Pod: the controller creates the target Pod
//! first (RuntimeClass `ferry`, marked with the Migration), its kubelet makes the
//! sandbox, and containerd's runc shim runs `ferry-runtime` (`wrapper.rs`) for it. This
//! module never runs a workload itself:
//!
//! 1. destination (`dest.rs`, `prepare_receiver`): stage dirs for each container of the
//!    target Pod (`staging.rs`), a CRIU page server per container (Cold), the bundle
//!    listener; release the target Pod's gate init container so the kubelet starts
//!    creating its containers (each `create` then waits in the wrapper);
//! 2. source (`source.rs`, `checkpoint_out`): freeze the pod cgroup (one cut for all
//!    containers), dump every container in parallel with `runc checkpoint
//!    --leave-running` (pages stream to the page servers; Live: a lazy page server),
//!    send each bundle (CRIU's other images + the writable-layer diff, `rootfs.rs`);
//! 3. destination: unpack each bundle into its stage dir and mark it ready; the wrapper
//!    restores it as the target Pod's container; `restore_in` waits for every
//!    `restored` marker and measures the downtime (freeze → last container running);
//! 4. `finalize` at the source, after the controller deleted the source Pod: kill the
//!    frozen tasks once the kubelet has begun stopping them (its SIGTERM, kept pending
//!    on the frozen inits by `stop_signal.rs`); `abort`: thaw the source,
//!    or at the destination tell waiting creates to fail (the controller deletes the
//!    target Pod, whose kubelet removes whatever was restored).
pub mod criu;
mod dest;
mod gate;
mod images;
mod page_route;
pub mod pod;
pub mod rootfs;
pub mod runc;
mod source;
pub mod staging;
mod stop_signal;
mod unpack;
pub mod volumes;
pub mod wire;
pub mod wrapper;

use crate::error::RuntimeError;
use crate::runtime::*;
use crate::transport::Transport;
use criu::Criu;
use futures::future::{BoxFuture, FutureExt};
use runc::Runc;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Node-level settings of the container runtime.
#[derive(Debug, Clone)]
pub struct ContainersConfig {
    /// runc roots of containerd's runtime handlers (as the shim passes `--root`):
    /// the default handler's and ferry's, where restored pods run.
    pub roots: Vec<Runc>,
    /// The `ferry` handler's runc root. None: this node has no ferry runtime and
    /// cannot receive containers.
    pub restore_root: Option<Runc>,
    pub criu: Criu,
    /// Staging area (checkpoints on the way out, staged restores on the way in).
    pub state_dir: PathBuf,
    /// This node's address peers reach (page servers bind to it).
    pub advertise_ip: String,
    /// Bundles travel through this node's mutual-TLS transfer endpoint.
    pub transport: Arc<Transport>,
    /// Release the target Pod's gate once at most this much is still to arrive before
    /// the restore (writable layers, plus memory for Cold): its containers' creates
    /// then wait for the rest, which must arrive well within the kubelet's runtime
    /// request timeout (`gate.rs`).
    pub early_release_bytes: u64,
    /// crictl and this node's CRI endpoint, to check that the target node holds the
    /// source's images before anything is frozen. None: not checked.
    pub cri: Option<Cri>,
    /// Test-only fault injection (`ferry-node --test-corrupt-staged-namespace`): bundles
    /// staged for target pods in this namespace get a corrupted pstree.img.
    pub test_corrupt_staged_namespace: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Cri {
    pub crictl: PathBuf,
    /// e.g. `unix:///run/containerd/containerd.sock`.
    pub endpoint: String,
}

pub const RUNTIME_NAME: &str = "containers";

pub struct ContainerRuntime {
    cfg: ContainersConfig,
    strategies: Vec<StrategySupport>,
    migrations: Mutex<HashMap<String, Migration>>,
}

enum Migration {
    Source(source::SourceState),
    Dest(dest::DestState),
}

impl ContainerRuntime {
    /// Probes CRIU once so `strategies` answers from memory.
    pub async fn new(cfg: ContainersConfig) -> ContainerRuntime {
        let strategies = cfg.criu.probe().await;
        // Sources a previous run of this daemon froze and did not finish.
        let recovered = source::SourceState::recover(&cfg.state_dir.join("out"))
            .into_iter()
            .map(|(id, s)| (id, Migration::Source(s)));
        ContainerRuntime {
            cfg,
            strategies,
            migrations: Mutex::new(recovered.collect()),
        }
    }

    fn mig_dir(&self, migration_id: &str) -> Result<PathBuf, RuntimeError> {
        if !staging::safe_component(migration_id) {
            return Err(RuntimeError::InvalidArgument(format!(
                "bad migration_id {migration_id:?}"
            )));
        }
        Ok(self.cfg.state_dir.join("out").join(migration_id))
    }

    async fn describe_pod(
        &self,
        pod: &WorkloadRef,
    ) -> Result<Option<WorkloadDescription>, RuntimeError> {
        let found = match pod::find(&self.cfg.roots, pod).await? {
            pod::Found::Containers(c) => c,
            // A VM pod's launcher runs in a container too: never claim it here.
            pod::Found::VmPod | pod::Found::None => return Ok(None),
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let carriers = volumes::carriers(found.iter().map(|c| (c.name(), &c.config)));
        let containers: Vec<ContainerInfo> = found
            .iter()
            .map(|c| ContainerInfo {
                name: c.name().into(),
                id: c.c.id.clone(),
                pid: c.c.pid,
                rss_bytes: runc::rss_bytes(c.c.pid),
                // What moves before the restore: its writable layer and the emptyDirs
                // it carries.
                writable_bytes: rootfs::overlay_upper_dir(&mountinfo, &c.rootfs())
                    .map_or(0, |upper| rootfs::tree_bytes(&upper))
                    + carriers
                        .values()
                        .filter(|(carrier, _)| carrier == c.name())
                        .map(|(_, dir)| rootfs::tree_bytes(dir))
                        .sum::<u64>(),
            })
            .collect();
        let volumes = volumes::PodVolumes {
            empty_dirs: carriers
                .into_iter()
                .map(|(vol, (carrier, _))| (vol, carrier))
                .collect(),
        };
        Ok(Some(WorkloadDescription {
            workload: pod.clone(),
            kind: WorkloadKind::Containers,
            runtime: RUNTIME_NAME.into(),
            memory_bytes: containers.iter().map(|c| c.rss_bytes).sum(),
            containers,
            runtime_spec: volumes.to_spec(),
        }))
    }
}

impl Runtime for ContainerRuntime {
    fn name(&self) -> &'static str {
        RUNTIME_NAME
    }

    fn strategies(&self) -> Vec<StrategySupport> {
        self.strategies.clone()
    }

    fn receives(&self) -> bool {
        self.cfg.restore_root.is_some()
    }

    fn describe<'a>(
        &'a self,
        w: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<Option<WorkloadDescription>, RuntimeError>> {
        self.describe_pod(w).boxed()
    }

    fn prepare_receiver(
        &self,
        plan: ReceiverPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<ReceiverInfo, RuntimeError>> {
        async move {
            let r = self.prepare(plan).await;
            if r.is_ok() {
                progress.stage(
                    Stage::Prepared,
                    "staging ready; target containers wait for the checkpoint",
                );
            }
            r
        }
        .boxed()
    }

    fn check_checkpoint<'a>(
        &'a self,
        plan: &'a CheckpointPlan,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.validate(plan).map(|r| r.map(drop)).boxed()
    }

    fn checkpoint_out(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        self.checkpoint(plan, progress).boxed()
    }

    fn restore_in<'a>(
        &'a self,
        migration_id: &'a str,
        _target: &'a WorkloadRef,
        progress: ProgressSink,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.restore(migration_id, progress).boxed()
    }

    fn finalize<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let entry = self.migrations.lock().unwrap().remove(migration_id);
            match entry {
                Some(Migration::Source(s)) => self.finalize_source(migration_id, s).await,
                Some(Migration::Dest(d)) => {
                    self.finalize_dest(d).await;
                    Ok(())
                }
                None => Ok(()), // already finalized
            }
        }
        .boxed()
    }

    fn knows(&self, migration_id: &str) -> bool {
        self.migrations.lock().unwrap().contains_key(migration_id)
            || (staging::safe_component(migration_id)
                && !staging::stages_of(&self.cfg.state_dir, migration_id).is_empty())
    }

    fn fence<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<bool, RuntimeError>> {
        async move {
            Ok(match self.migrations.lock().unwrap().get(migration_id) {
                Some(Migration::Source(s)) => s.fence(),
                _ => false,
            })
        }
        .boxed()
    }

    fn abort<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<Left, RuntimeError>> {
        async move {
            let entry = self.migrations.lock().unwrap().remove(migration_id);
            match entry {
                Some(Migration::Source(s)) => self
                    .abort_source(migration_id, s)
                    .await
                    .map(|()| Left::MayRun),
                Some(Migration::Dest(d)) => Ok(self.abort_dest(d).await),
                // Unknown to this run (the daemon restarted): what it staged is on disk.
                None => Ok(self.abort_staged(migration_id)),
            }
        }
        .boxed()
    }
}

fn free_port(ip: &str) -> Result<u16, RuntimeError> {
    // Small race between closing and CRIU binding; acceptable on a node we own.
    let l = std::net::TcpListener::bind((ip, 0))
        .map_err(RuntimeError::io(format!("finding a free port on {ip}")))?;
    Ok(l.local_addr()
        .map_err(RuntimeError::io("local_addr"))?
        .port())
}

fn kill_all(pids: &[u32]) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits until none of `pids` runs any more (daemons are not our children: poll /proc).
async fn wait_gone(pids: &[u32], timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_sees_running_not_missing() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
