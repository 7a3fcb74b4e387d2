//! How the node daemon finds the VMs on its node: the contract with ferry-launcher.
//!
//! The launcher runs in the VM pod's container. The node's VM root is a hostPath mounted
//! into that container at the same path the daemon uses (`ferry-node --vm-root`), so a
//! path under it means the same file to QEMU in the container and to the daemon on the
//! host, the way KubeVirt's virt-handler reaches virt-launcher's sockets. Each guest has
//! one directory, keyed by its pod's UID:
//!
//! ```text
//! <root>/<pod-uid>/
//!   vm.json     the pod (namespace, name, uid, node: from the Downward API), the guest
//!               spec, and whether it waits for an incoming migration (and which)
//!   qmp.sock    QMP, for the daemon
//!   serial.log  the guest's console
//!   in.sock     incoming migration stream (QEMU listens, after `migrate-incoming`)
//!   out.sock    outgoing migration stream (the daemon listens, QEMU connects)
//! ```
//!
//! Rules the daemon keeps:
//! 1. It never uses an absolute path from a record: it joins its own VM root with the
//!    pod UID (a record is written by a pod, which may be wrong or hostile).
//! 2. A record is live while its QMP socket accepts a connection; refused (or no socket)
//!    means the pod's QEMU is gone and the record is stale. The launcher's PID is a PID
//!    of the container's namespace and means nothing on the host; where a host PID is
//!    needed, SO_PEERCRED of a QMP connection gives it.
//! 3. With a node name (`ferry-node --node-name`), it claims only records of that node.
//!
//! The launcher never talks to the Kubernetes API: everything it knows about its pod
//! comes from the environment variables below, set by the Downward API.
use super::launcher::GuestSpec;
use crate::runtime::WorkloadRef;
use crate::validate;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

pub const RECORD: &str = "vm.json";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const SERIAL_LOG: &str = "serial.log";
/// Where the incoming QEMU listens for the migration stream.
pub const INCOMING_SOCKET: &str = "in.sock";
/// Where the source daemon listens for its QEMU's outgoing migration stream.
pub const OUTGOING_SOCKET: &str = "out.sock";

/// The node's VM root, for the launcher and the daemon alike.
pub const ENV_VM_ROOT: &str = "FERRY_VM_ROOT";
/// `fieldRef: metadata.namespace`.
pub const ENV_POD_NAMESPACE: &str = "FERRY_POD_NAMESPACE";
/// `fieldRef: metadata.name`.
pub const ENV_POD_NAME: &str = "FERRY_POD_NAME";
/// `fieldRef: metadata.uid`.
pub const ENV_POD_UID: &str = "FERRY_POD_UID";
/// `fieldRef: spec.nodeName`; also `ferry-node --node-name`.
pub const ENV_NODE_NAME: &str = "FERRY_NODE_NAME";
/// `fieldRef: metadata.annotations['ferry.dev/incoming']`: set on every VM pod, empty on
/// a pod that boots its guest, the Migration UID on a pod that receives one. Its presence
/// marks a VM pod: a container runtime declines pods whose containers carry it.
pub const ENV_INCOMING: &str = "FERRY_INCOMING";
/// The annotation the controller puts on a target VM pod: the Migration's UID.
pub const INCOMING_ANNOTATION: &str = "ferry.dev/incoming";

/// What a launcher writes into `vm.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// The node the pod runs on; empty when the launcher was not told.
    #[serde(default)]
    pub node_name: String,
    /// QEMU waits with `-incoming defer` for the daemon's `migrate-incoming`.
    #[serde(default)]
    pub incoming: bool,
    /// The Migration UID an incoming guest waits for (`FERRY_INCOMING`); empty: any
    /// (a launcher started with a bare `--incoming`).
    #[serde(default)]
    pub migration_uid: String,
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
            && (w.pod_uid.is_empty() || self.pod_uid == w.pod_uid)
    }
}

/// The Migration UID in `FERRY_INCOMING`'s value, if the pod receives one.
pub fn incoming_migration(env_value: Option<&str>) -> Option<String> {
    env_value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
}

/// The directory of the pod with UID `pod_uid`. A UID is a lowercase UUID (as the API
/// server writes it); anything else is refused, and the joined path is checked to stay
/// inside the root.
pub fn dir_for(root: &Path, pod_uid: &str) -> io::Result<PathBuf> {
    validate::pod_uid("pod UID", pod_uid).map_err(|why| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{why} (it names the pod's directory under the VM root)"),
        )
    })?;
    under(root, root.join(pod_uid))
}

/// `path`, if it lies inside `root` ([`validate::inside`]): what a VM path built from
/// request data must do before anything is created or removed there.
pub fn under(root: &Path, path: PathBuf) -> io::Result<PathBuf> {
    if validate::inside(root, &path) {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not inside the VM root {}",
                path.display(),
                root.display()
            ),
        ))
    }
}

/// `<dir>/<name>` for creating or removing `name` in a pod's directory: the path must be
/// inside `root` and `dir` a directory, not a symbolic link (a pod may write into its
/// directory, and the daemon runs as root).
pub fn file_in(root: &Path, dir: &Path, name: &str) -> io::Result<PathBuf> {
    let path = under(root, dir.join(name))?;
    if path.parent() != Some(dir) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not one file name"),
        ));
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a directory (a symbolic link or another file)",
                dir.display()
            ),
        ));
    }
    Ok(path)
}

/// Writes the record atomically (the daemon may be reading it); returns the directory.
pub fn register(root: &Path, rec: &VmRecord) -> io::Result<PathBuf> {
    let dir = dir_for(root, &rec.pod_uid)?;
    let body = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
    crate::atomic::write_file(&dir, RECORD, &body)?;
    Ok(dir)
}

/// Whether something listens on the unix socket at `path`. Refused or absent: nobody
/// (QEMU is gone). A full accept queue (QEMU busy with another QMP client) is a listener.
pub(crate) async fn listening(path: &Path) -> io::Result<bool> {
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("connecting to {}: {e}", path.display()),
        )),
    }
}

/// A live guest of this node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    /// `<root>/<pod-uid>`, built by the daemon.
    pub dir: PathBuf,
    pub rec: VmRecord,
}

impl Found {
    pub fn qmp(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }
}

/// Why a pod's directory holds no guest this daemon may use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Missing {
    NoRecord,
    /// The pod's entry under the VM root is a symbolic link or a file.
    NotADirectory,
    /// Registered, but QMP refuses connections: QEMU not started yet, or gone.
    NotListening,
    OtherNode(String),
    OtherPod(String),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::NoRecord => write!(f, "no {RECORD}"),
            Missing::NotADirectory => write!(f, "not a directory (a symbolic link or a file)"),
            Missing::NotListening => write!(f, "{RECORD}, but nothing listens on {QMP_SOCKET}"),
            Missing::OtherNode(n) => write!(f, "{RECORD} of node {n:?}"),
            Missing::OtherPod(p) => write!(f, "{RECORD} of pod {p}"),
        }
    }
}

/// The VM root as one daemon sees it.
#[derive(Clone)]
pub(crate) struct Registry {
    root: PathBuf,
    /// Claim only records of this node; `None`: any.
    node_name: Option<String>,
}

impl Registry {
    pub fn new(root: PathBuf, node_name: Option<String>) -> Registry {
        Registry {
            root,
            node_name: node_name.filter(|n| !n.is_empty()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The live guest of pod `w` on this node, if any. With the pod's UID that is one
    /// directory; without, every record is read.
    pub async fn find(&self, w: &WorkloadRef) -> io::Result<Option<Found>> {
        if !w.pod_uid.is_empty() {
            return Ok(self.probe(w).await?.ok());
        }
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            let Ok(dir) = dir_for(&self.root, &uid) else {
                continue;
            };
            match self.read(&dir) {
                Ok(Some(rec)) if rec.matches(w) => {}
                Ok(_) => continue,
                Err(e) => {
                    // Another pod's broken record must not hide this pod's VM.
                    tracing::warn!(error = %e, "skipping an unreadable VM record");
                    continue;
                }
            }
            let by_uid = WorkloadRef {
                pod_uid: uid,
                ..w.clone()
            };
            if let Ok(found) = self.probe(&by_uid).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The guest of pod `w` (its UID set), or why there is none.
    pub async fn probe(&self, w: &WorkloadRef) -> io::Result<Result<Found, Missing>> {
        let dir = dir_for(&self.root, &w.pod_uid)?;
        // A pod can write into the VM root: its directory must be one, not a link
        // to somewhere else.
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if !m.file_type().is_dir() => return Ok(Err(Missing::NotADirectory)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(Missing::NoRecord)),
            Err(e) => return Err(e),
        }
        let Some(rec) = self.read(&dir)? else {
            return Ok(Err(Missing::NoRecord));
        };
        if !rec.matches(w) {
            return Ok(Err(Missing::OtherPod(rec.workload().to_string())));
        }
        if let Some(node) = &self.node_name
            && rec.node_name != *node
        {
            return Ok(Err(Missing::OtherNode(rec.node_name)));
        }
        if !listening(&dir.join(QMP_SOCKET)).await? {
            return Ok(Err(Missing::NotListening));
        }
        Ok(Ok(Found { dir, rec }))
    }

    fn read(&self, dir: &Path) -> io::Result<Option<VmRecord>> {
        let path = dir.join(RECORD);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::launcher::Accel;

    const U1: &str = "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e";
    const U2: &str = "5d1e0f9a-7c3b-4e2d-8a6f-1b2c3d4e5f60";

    fn rec(uid: &str, node: &str) -> VmRecord {
        VmRecord {
            namespace: "ns".into(),
            pod_name: "vm-1".into(),
            pod_uid: uid.into(),
            node_name: node.into(),
            incoming: false,
            migration_uid: String::new(),
            spec: GuestSpec {
                kernel: "/k".into(),
                initrd: None,
                append: "console=ttyS0".into(),
                memory_mib: 64,
                vcpus: 1,
                accel: Accel::Tcg,
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

    /// Registers `rec` and, with `qmp`, listens on its QMP socket as QEMU would.
    fn put(root: &Path, rec: &VmRecord, qmp: bool) -> Option<std::os::unix::net::UnixListener> {
        let dir = register(root, rec).unwrap();
        qmp.then(|| std::os::unix::net::UnixListener::bind(dir.join(QMP_SOCKET)).unwrap())
    }

    #[tokio::test]
    async fn finds_guests_whose_qmp_listens() {
        let root = tempfile::tempdir().unwrap();
        let reg = Registry::new(root.path().into(), None);
        assert_eq!(reg.find(&w("")).await.unwrap(), None);
        assert_eq!(reg.find(&w(U1)).await.unwrap(), None);
        let _qmp = put(root.path(), &rec(U1, ""), true);
        let found = reg.find(&w(U1)).await.unwrap().expect("registered");
        assert_eq!(found.rec, rec(U1, ""));
        assert_eq!(found.dir, root.path().join(U1));
        // Without a UID, by namespace and name.
        assert_eq!(
            reg.find(&w("")).await.unwrap().map(|f| f.dir),
            Some(found.dir)
        );
        // Another UID is another pod.
        assert!(reg.find(&w(U2)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_record_whose_qmp_refuses_is_stale() {
        let root = tempfile::tempdir().unwrap();
        let reg = Registry::new(root.path().into(), None);
        put(root.path(), &rec(U1, ""), false);
        assert_eq!(reg.probe(&w(U1)).await.unwrap(), Err(Missing::NotListening));
        // A socket file that nobody listens on any more (QEMU killed).
        drop(std::os::unix::net::UnixListener::bind(
            root.path().join(U1).join(QMP_SOCKET),
        ));
        assert_eq!(reg.probe(&w(U1)).await.unwrap(), Err(Missing::NotListening));
        assert!(reg.find(&w("")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn claims_only_its_own_node() {
        let root = tempfile::tempdir().unwrap();
        let _a = put(root.path(), &rec(U1, "node-b"), true);
        let mine = Registry::new(root.path().into(), Some("node-a".into()));
        assert_eq!(
            mine.probe(&w(U1)).await.unwrap(),
            Err(Missing::OtherNode("node-b".into()))
        );
        assert!(mine.find(&w("")).await.unwrap().is_none());
        let theirs = Registry::new(root.path().into(), Some("node-b".into()));
        assert!(theirs.find(&w(U1)).await.unwrap().is_some());
        // No node name: no check.
        let any = Registry::new(root.path().into(), Some(String::new()));
        assert!(any.find(&w(U1)).await.unwrap().is_some());
    }

    #[test]
    fn uids_stay_under_the_root() {
        let root = Path::new("/run/ferry/vms");
        assert_eq!(
            dir_for(root, "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e").unwrap(),
            root.join("0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e")
        );
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            ".hidden",
            "u1",
            "/etc",
            "0B7C5A8E-1F0E-4C2A-9D8E-2F3A4B5C6D7E",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d/.",
        ] {
            let e = dir_for(root, bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().contains("pod UID"), "{e}");
        }
    }

    #[test]
    fn files_are_created_only_in_real_pod_directories() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let dir = dir_for(root, U1).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            file_in(root, &dir, OUTGOING_SOCKET).unwrap(),
            dir.join(OUTGOING_SOCKET)
        );
        for bad in ["..", "../x", "a/b", "/etc/passwd", ""] {
            assert!(file_in(root, &dir, bad).is_err(), "{bad:?}");
        }
        // A directory outside the root, however it was reached.
        let elsewhere = tempfile::tempdir().unwrap();
        assert!(file_in(root, elsewhere.path(), OUTGOING_SOCKET).is_err());
        assert!(file_in(root, &root.join(U1).join(".."), OUTGOING_SOCKET).is_err());
        // A pod's entry that links elsewhere.
        let link = root.join(U2);
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
        let e = file_in(root, &link, OUTGOING_SOCKET).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[tokio::test]
    async fn a_linked_pod_directory_is_no_guest() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        // A live guest registered elsewhere, linked into the root under another UID.
        let _qmp = put(elsewhere.path(), &rec(U1, ""), true);
        std::os::unix::fs::symlink(elsewhere.path().join(U1), root.path().join(U2)).unwrap();
        let reg = Registry::new(root.path().into(), None);
        assert_eq!(
            reg.probe(&w(U2)).await.unwrap(),
            Err(Missing::NotADirectory)
        );
        assert!(reg.find(&w("")).await.unwrap().is_none());
        // The same guest through its real directory is found.
        let real = Registry::new(elsewhere.path().into(), None);
        assert!(real.probe(&w(U1)).await.unwrap().is_ok());
    }

    #[test]
    fn incoming_is_a_non_empty_migration_uid() {
        assert_eq!(incoming_migration(None), None);
        assert_eq!(incoming_migration(Some("")), None);
        assert_eq!(incoming_migration(Some("  ")), None);
        assert_eq!(incoming_migration(Some("m-1")), Some("m-1".into()));
    }
}
