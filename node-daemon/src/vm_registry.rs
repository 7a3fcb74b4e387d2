//! How the node daemon finds the VMs on its node: the contract with ferry-launcher.
//!
//! Each launcher registers its guest in a directory under the node's VM root,
//! `<root>/<namespace>_<pod>/`, holding `vm.json` (the pod it belongs to, the guest spec
//! and the launcher's PID, which stays QEMU's PID because the launcher execs QEMU) and
//! by default the QMP socket and serial log. In a cluster the VM root is a hostPath
//! shared by the launcher pods and the daemon, the way KubeVirt's virt-handler reaches
//! virt-launcher's sockets. The launcher never talks to the Kubernetes API.
use crate::launcher::GuestSpec;
use crate::runtime::WorkloadRef;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

pub const RECORD: &str = "vm.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub pid: u32,
    pub spec: GuestSpec,
}

impl VmRecord {
    pub fn workload(&self) -> WorkloadRef {
        WorkloadRef {
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_uid: self.pod_uid.clone(),
        }
    }

    fn matches(&self, w: &WorkloadRef) -> bool {
        self.namespace == w.namespace
            && self.pod_name == w.pod_name
            && (w.pod_uid.is_empty() || self.pod_uid.is_empty() || self.pod_uid == w.pod_uid)
    }
}

/// The directory of a pod's VM. Namespace and pod names are DNS labels/subdomains, so
/// `_` cannot occur in them and the join is unambiguous.
pub fn dir_for(root: &Path, namespace: &str, pod_name: &str) -> PathBuf {
    root.join(format!("{namespace}_{pod_name}"))
}

/// Writes the record atomically (the daemon may be scanning).
pub fn register(root: &Path, rec: &VmRecord) -> io::Result<PathBuf> {
    let dir = dir_for(root, &rec.namespace, &rec.pod_name);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{RECORD}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(rec).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&tmp, dir.join(RECORD))?;
    Ok(dir)
}

/// The live VM of pod `w`, if this node runs one. A record whose process is gone is
/// stale (the pod ended) and ignored.
pub fn find(root: &Path, w: &WorkloadRef) -> io::Result<Option<(PathBuf, VmRecord)>> {
    let dir = dir_for(root, &w.namespace, &w.pod_name);
    let bytes = match std::fs::read(dir.join(RECORD)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let rec: VmRecord = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", dir.join(RECORD).display()),
        )
    })?;
    if !rec.matches(w) || !process_alive(rec.pid) {
        return Ok(None);
    }
    Ok(Some((dir, rec)))
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::Accel;

    fn rec(pid: u32) -> VmRecord {
        VmRecord {
            namespace: "ns".into(),
            pod_name: "vm-1".into(),
            pod_uid: "u1".into(),
            pid,
            spec: GuestSpec {
                kernel: "/k".into(),
                initrd: None,
                append: "console=ttyS0".into(),
                memory_mib: 64,
                vcpus: 1,
                accel: Accel::Tcg,
                qmp_socket: "/q".into(),
                serial_log: "/s".into(),
                incoming: false,
            },
        }
    }

    fn w(uid: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "ns".into(),
            pod_name: "vm-1".into(),
            pod_uid: uid.into(),
        }
    }

    #[test]
    fn finds_live_records_only() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(find(root.path(), &w("")).unwrap(), None);
        register(root.path(), &rec(std::process::id())).unwrap();
        let (_, got) = find(root.path(), &w("u1")).unwrap().expect("registered");
        assert_eq!(got, rec(std::process::id()));
        assert!(find(root.path(), &w("other-uid")).unwrap().is_none());
        // A PID that cannot exist (above pid_max) is a stale record.
        register(root.path(), &rec(u32::MAX)).unwrap();
        assert!(find(root.path(), &w("")).unwrap().is_none());
    }
}
