//! A pod's containers as containerd runs them on this node, and the pod's cgroup.
//!
//! Containers are found under the runc roots of containerd's runtime handlers (the
//! default `runc` handler and ferry's own, where restored pods run) by the annotations
//! containerd's CRI writes into each container's OCI config. The whole pod is frozen
//! through its pod-level cgroup: one write stops every container at the same instant
//! (the consistent cut), which freezing container by container cannot give.
use super::runc::{Runc, RuncContainer};
use super::staging;
use crate::error::RuntimeError;
use crate::runtime::WorkloadRef;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Env var every VM pod sets (see `vm::registry`): a pod with it is the VM runtime's.
pub const VM_POD_ENV: &str = "FERRY_INCOMING";

/// One app container of a pod (not its sandbox, not ferry's gate).
#[derive(Debug, Clone)]
pub struct PodContainer {
    pub runc: Runc,
    pub c: RuncContainer,
    /// The OCI config containerd wrote for it.
    pub config: serde_json::Value,
}

impl PodContainer {
    pub fn name(&self) -> &str {
        self.c
            .annotation(staging::ANN_CONTAINER_NAME)
            .unwrap_or(&self.c.id)
    }

    /// `linux.cgroupsPath` (cgroupfs layout: `/<root>/kubepods/<qos>/pod<uid>/<id>`).
    pub fn cgroup(&self) -> Option<&str> {
        self.config["linux"]["cgroupsPath"].as_str()
    }

    /// The rootfs directory containerd mounted for it.
    pub fn rootfs(&self) -> PathBuf {
        let root = self.config["root"]["path"].as_str().unwrap_or("rootfs");
        let p = Path::new(root);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.c.bundle.join(p)
        }
    }

    fn is_vm_launcher(&self) -> bool {
        self.config["process"]["env"].as_array().is_some_and(|env| {
            env.iter()
                .filter_map(|e| e.as_str())
                .any(|e| e.split_once('=').is_some_and(|(k, _)| k == VM_POD_ENV))
        })
    }
}

fn belongs_to(c: &RuncContainer, pod: &WorkloadRef) -> bool {
    c.annotation(staging::ANN_SANDBOX_NAMESPACE) == Some(pod.namespace.as_str())
        && c.annotation(staging::ANN_SANDBOX_NAME) == Some(pod.pod_name.as_str())
        && (pod.pod_uid.is_empty()
            || c.annotation(staging::ANN_SANDBOX_UID) == Some(pod.pod_uid.as_str()))
        && c.annotation(staging::ANN_CONTAINER_TYPE) == Some("container")
        && c.annotation(staging::ANN_CONTAINER_NAME) != Some(staging::GATE_CONTAINER)
}

/// What [`find`] saw of a pod.
pub enum Found {
    /// Nothing of the pod runs under these roots.
    None,
    /// The pod hosts a VM: not the container runtime's to move.
    VmPod,
    Containers(Vec<PodContainer>),
}

/// The running app containers of `pod` under `roots`, sorted by name.
pub async fn find(roots: &[Runc], pod: &WorkloadRef) -> Result<Found, RuntimeError> {
    let mut found = Vec::new();
    for runc in roots {
        for c in runc.list().await? {
            if !belongs_to(&c, pod) || c.status == "stopped" {
                continue;
            }
            let config = read_json(&c.bundle.join("config.json"))?;
            found.push(PodContainer {
                runc: runc.clone(),
                c,
                config,
            });
        }
    }
    if found.is_empty() {
        return Ok(Found::None);
    }
    if found.iter().any(PodContainer::is_vm_launcher) {
        return Ok(Found::VmPod);
    }
    found.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(Found::Containers(found))
}

pub fn read_json(path: &Path) -> Result<serde_json::Value, RuntimeError> {
    let text =
        std::fs::read(path).map_err(RuntimeError::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| {
        RuntimeError::FailedPrecondition(format!("{} is not valid JSON: {e}", path.display()))
    })
}

/// The pod-level cgroup all of `containers` sit in (the parent of each container's).
pub fn pod_cgroup(containers: &[PodContainer]) -> Result<String, RuntimeError> {
    let mut parents = containers.iter().map(|c| {
        c.cgroup()
            .and_then(|p| Path::new(p).parent())
            .map(|p| p.display().to_string())
    });
    let first = parents.next().flatten().ok_or_else(|| {
        RuntimeError::FailedPrecondition("container config has no linux.cgroupsPath".into())
    })?;
    if first == "/" || parents.any(|p| p.as_deref() != Some(first.as_str())) {
        return Err(RuntimeError::FailedPrecondition(format!(
            "the pod's containers do not share one pod cgroup (first: {first})"
        )));
    }
    Ok(first)
}

/// The freezer of a cgroup, v1 (`freezer.state`) or v2 (`cgroup.freeze`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Freezer {
    dir: PathBuf,
    v1: bool,
}

impl Freezer {
    pub fn for_cgroup(cgroup: &str) -> Freezer {
        let rel = cgroup.trim_start_matches('/');
        let v1 = Path::new("/sys/fs/cgroup/freezer").is_dir();
        let base = if v1 {
            "/sys/fs/cgroup/freezer"
        } else {
            "/sys/fs/cgroup"
        };
        Freezer {
            dir: Path::new(base).join(rel),
            v1,
        }
    }

    fn write(&self, frozen: bool) -> Result<(), RuntimeError> {
        let (file, value) = match (self.v1, frozen) {
            (true, true) => ("freezer.state", "FROZEN"),
            (true, false) => ("freezer.state", "THAWED"),
            (false, true) => ("cgroup.freeze", "1"),
            (false, false) => ("cgroup.freeze", "0"),
        };
        let p = self.dir.join(file);
        std::fs::write(&p, value).map_err(RuntimeError::io(format!(
            "writing {value} to {}",
            p.display()
        )))
    }

    pub fn is_frozen(&self) -> bool {
        if self.v1 {
            std::fs::read_to_string(self.dir.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN")
        } else {
            std::fs::read_to_string(self.dir.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l == "frozen 1"))
        }
    }

    /// Freezes every task below the cgroup and returns once all are frozen.
    pub async fn freeze(&self, timeout: Duration) -> Result<(), RuntimeError> {
        self.write(true)?;
        let deadline = Instant::now() + timeout;
        while !self.is_frozen() {
            if Instant::now() > deadline {
                let _ = self.write(false);
                return Err(RuntimeError::FailedPrecondition(format!(
                    "the pod cgroup {} did not freeze within {timeout:?} (a task in \
                     uninterruptible sleep?); thawed it again",
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// The cgroup's directory in the freezer hierarchy.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the cgroup still exists.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    pub fn thaw(&self) -> Result<(), RuntimeError> {
        self.write(false)
    }

    /// Every process in the cgroup and below.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out
    }
}

/// Whether a signal is pending for `pid` (the kubelet began stopping a frozen task:
/// it stays pending until the task is thawed).
pub fn signal_pending(pid: u32) -> bool {
    status_values(pid, &["ShdPnd", "SigPnd"])
        .iter()
        .any(|v| u64::from_str_radix(v, 16).is_ok_and(|m| m != 0))
}

/// Whether `pid` exists and has a tracer (`stop_signal.rs` holds it, or a CRIU does).
pub fn traced(pid: u32) -> bool {
    status_values(pid, &["TracerPid"]).iter().any(|v| v != "0")
}

/// The values of the `/proc/<pid>/status` lines named `keys` (none once it is gone).
fn status_values(pid: u32, keys: &[&str]) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            keys.contains(&k).then(|| v.trim().to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, cgroup: &str, env: &[&str]) -> PodContainer {
        let c: RuncContainer = serde_json::from_value(serde_json::json!({
            "id": name, "pid": 1, "status": "running", "bundle": "/b",
            "annotations": {staging::ANN_CONTAINER_NAME: name}
        }))
        .unwrap();
        PodContainer {
            runc: Runc::new("runc", "/r"),
            c,
            config: serde_json::json!({"linux": {"cgroupsPath": cgroup}, "process": {"env": env}}),
        }
    }

    #[test]
    fn pod_cgroup_is_the_shared_parent() {
        let a = container("a", "/n1/kubepods/besteffort/podU/aaa", &[]);
        let b = container("b", "/n1/kubepods/besteffort/podU/bbb", &[]);
        assert_eq!(
            pod_cgroup(&[a.clone(), b]).unwrap(),
            "/n1/kubepods/besteffort/podU"
        );
        let c = container("c", "/n1/kubepods/besteffort/podV/ccc", &[]);
        assert!(pod_cgroup(&[a, c]).is_err());
    }

    #[test]
    fn vm_pods_are_recognised_by_their_env() {
        assert!(container("l", "/x/y", &["FERRY_INCOMING=", "PATH=/bin"]).is_vm_launcher());
        assert!(!container("a", "/x/y", &["PATH=/bin"]).is_vm_launcher());
    }

    #[test]
    fn pending_signals_are_read_from_proc() {
        // This test process has none pending.
        assert!(!signal_pending(std::process::id()));
    }
}
