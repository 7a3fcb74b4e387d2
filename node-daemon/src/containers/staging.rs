//! The contract between the node daemon and `ferry-runtime` (the OCI runtime wrapper
//! containerd runs for the `ferry` RuntimeClass): where the daemon stages a received
//! checkpoint and how each side tells the other what happened. Files only, so neither
//! side needs the other to be up, and a daemon restart does not strand a waiting create.
//!
//! ```text
//! <state>/restore/<target pod uid>/<container name>/
//!     plan.json        what to restore (written first by the daemon)
//!     images/          CRIU images (all pages for Cold; none for Live: lazy pages)
//!     rootfs-diff.tar  the source's writable-layer files, paths relative to the rootfs
//!     deleted.files    paths the source deleted from its image layers, one per line
//!     work/            CRIU work dir (lazy-pages.socket for Live)
//!     waiting          a create waits for this checkpoint          (wrapper)
//!     ready            staging complete: the wrapper may restore   (daemon)
//!     aborted          the migration ended: fail the create        (daemon)
//!     decision         "restore" or "abort", whoever comes first     (wrapper / daemon)
//!     restored         {"pid", "startedUnixMs", "atUnixMs"} once `runc restore` ran (wrapper)
//!     failed           why the restore failed; later creates fail too (wrapper)
//!     consumed         the checkpoint was used: a later create is a fresh start (wrapper)
//! ```
//!
//! `decision` is created once (see [`StageDir::decide`]): the wrapper writes "restore"
//! right before `runc restore`, the daemon's Abort "abort". Whichever wins holds, so an
//! Abort that wins knows no copy of this container ran or will run here, and the
//! controller may resume the source without waiting for the target Pod to go.
//!
//! A container marked as a migration target (pod annotation [`MIGRATION_ANNOTATION`],
//! passed into its OCI config by containerd's `pod_annotations`) is restored only from
//! this directory, never started fresh, until `consumed` exists: a kubelet retry after a
//! failed or aborted restore must not start a second copy of the workload.
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Pod annotation naming the Migration whose checkpoint the Pod's containers restore.
pub const MIGRATION_ANNOTATION: &str = "ferry.dev/migration";
/// containerd's OCI annotations naming a container's pod and role.
pub const ANN_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const ANN_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const ANN_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const ANN_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const ANN_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The init container the controller adds to a target Pod: it holds the app containers
/// back until the checkpoint is staged (or will be, well within the kubelet's
/// runtime request timeout), so that no `create` waits long. It runs the pause image;
/// the daemon ends it with SIGTERM (pause exits 0).
pub const GATE_CONTAINER: &str = "ferry-restore-gate";

pub const PLAN: &str = "plan.json";
pub const READY: &str = "ready";
pub const WAITING: &str = "waiting";
pub const ABORTED: &str = "aborted";
pub const RESTORED: &str = "restored";
pub const FAILED: &str = "failed";
pub const CONSUMED: &str = "consumed";
pub const DECISION: &str = "decision";
pub const IMAGES: &str = "images";
pub const WORK: &str = "work";
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED: &str = "deleted.files";

/// What the wrapper needs to restore one container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlan {
    /// Must equal the container's [`MIGRATION_ANNOTATION`].
    pub migration_id: String,
    /// Post-copy: `criu lazy-pages` (started by the daemon) serves the memory.
    pub lazy: bool,
    /// CRIU options the dump was made with and the restore needs.
    #[serde(default)]
    pub criu: CriuOptions,
    /// The pod's emptyDirs and the container whose bundle carries each
    /// (`volumes::PodVolumes`).
    #[serde(default)]
    pub empty_dirs: std::collections::BTreeMap<String, String>,
}

/// Workload-specific CRIU options (from the Migration); both ends use the same.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CriuOptions {
    /// `--file-locks`: dump and restore held file locks (databases, pid files).
    #[serde(default)]
    pub file_locks: bool,
    /// `--ext-unix-sk`: allow unix sockets connected to peers outside the container.
    #[serde(default)]
    pub external_unix_sockets: bool,
    /// Established TCP connections: false closes them at the target (the peer sees a
    /// reset; the pod IP changes anyway); true restores them (only works where the
    /// pod keeps its IP).
    #[serde(default)]
    pub tcp_keep: bool,
}

/// Written by the wrapper once `runc restore` ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    pub pid: u32,
    /// When `runc restore` began (the state was staged) and when it returned.
    #[serde(default)]
    pub started_unix_ms: u64,
    pub at_unix_ms: u64,
}

/// Whether a staged container is restored or its migration aborted (see `decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Restore,
    Abort,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Restore => "restore",
            Decision::Abort => "abort",
        }
    }
}

/// One container's staging directory.
#[derive(Debug, Clone)]
pub struct StageDir {
    pub dir: PathBuf,
}

/// True for a name that is one safe path component (pod UIDs, container names).
pub fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl StageDir {
    /// The container this stage is for (the dir's last component).
    pub fn container(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `<state>/restore/<pod uid>/<container>`; None for names that are not one safe
    /// path component.
    pub fn new(state_dir: &Path, pod_uid: &str, container: &str) -> Option<StageDir> {
        (safe_component(pod_uid) && safe_component(container)).then(|| StageDir {
            dir: pod_dir(state_dir, pod_uid).join(container),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn has(&self, marker: &str) -> bool {
        self.dir.join(marker).exists()
    }

    /// Writes a marker atomically (tmp + rename), so the other side never reads half.
    pub fn mark(&self, marker: &str, body: &[u8]) -> io::Result<()> {
        crate::atomic::write_file(&self.dir, marker, body)
    }

    /// Decides this container's fate once: `want` if no decision was made yet, else the
    /// one made before (by the other side, or by an earlier call).
    pub fn decide(&self, want: Decision) -> io::Result<Decision> {
        if crate::atomic::create_once(&self.dir, DECISION, want.as_str().as_bytes())? {
            return Ok(want);
        }
        match self.read(DECISION).as_deref() {
            Some("restore") => Ok(Decision::Restore),
            Some("abort") => Ok(Decision::Abort),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: unreadable decision {other:?}", self.dir.display()),
            )),
        }
    }

    pub fn read(&self, marker: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(marker)).ok()
    }

    pub fn plan(&self) -> io::Result<RestorePlan> {
        let text = std::fs::read(self.dir.join(PLAN))?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn restored(&self) -> Option<Restored> {
        serde_json::from_str(&self.read(RESTORED)?).ok()
    }

    /// Drops the checkpoint (images, rootfs diff; the work dir with CRIU's logs too
    /// unless `keep_logs`) but keeps the markers: a kubelet retry must still see
    /// `consumed` (fresh start) or `failed`/`aborted`.
    pub fn drop_payload(&self, keep_logs: bool) {
        let work: &[&str] = if keep_logs { &[] } else { &[WORK] };
        for p in [IMAGES, ROOTFS_DIFF, DELETED, super::volumes::VOLUMES]
            .iter()
            .chain(work)
        {
            let p = self.dir.join(p);
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// The stages on disk whose plan names `migration_id` (what a restarted daemon can
/// still find of a migration it was receiving: its memory of it died with it).
pub fn stages_of(state_dir: &Path, migration_id: &str) -> Vec<StageDir> {
    let mut found = Vec::new();
    let Ok(pods) = std::fs::read_dir(state_dir.join("restore")) else {
        return found;
    };
    for pod in pods.flatten() {
        let Ok(containers) = std::fs::read_dir(pod.path()) else {
            continue;
        };
        for c in containers.flatten() {
            let stage = StageDir { dir: c.path() };
            if stage.plan().is_ok_and(|p| p.migration_id == migration_id) {
                found.push(stage);
            }
        }
    }
    found
}

/// `<state>/restore/<pod uid>`.
pub fn pod_dir(state_dir: &Path, pod_uid: &str) -> PathBuf {
    state_dir.join("restore").join(pod_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_paths_refuse_traversal() {
        let s = Path::new("/var/lib/ferry");
        assert!(StageDir::new(s, "../x", "app").is_none());
        assert!(StageDir::new(s, "uid", "a/b").is_none());
        assert!(StageDir::new(s, "uid", "..").is_none());
        assert!(StageDir::new(s, "", "app").is_none());
        let st = StageDir::new(s, "0b1c-2d", "app").unwrap();
        assert_eq!(st.dir, Path::new("/var/lib/ferry/restore/0b1c-2d/app"));
    }

    #[test]
    fn markers_are_written_whole() {
        let d = tempfile::tempdir().unwrap();
        let st = StageDir::new(d.path(), "u", "c").unwrap();
        assert!(!st.has(READY));
        let plan = RestorePlan {
            migration_id: "m".into(),
            lazy: true,
            criu: CriuOptions {
                file_locks: true,
                ..Default::default()
            },
            ..Default::default()
        };
        st.mark(PLAN, &serde_json::to_vec(&plan).unwrap()).unwrap();
        st.mark(READY, b"").unwrap();
        assert!(st.has(READY));
        assert_eq!(st.plan().unwrap(), plan);
        std::fs::create_dir_all(st.path(IMAGES)).unwrap();
        st.drop_payload(false);
        assert!(!st.path(IMAGES).exists() && st.has(READY) && st.has(PLAN));
    }

    #[test]
    fn the_first_decision_holds() {
        let d = tempfile::tempdir().unwrap();
        let st = StageDir::new(d.path(), "u", "c").unwrap();
        assert_eq!(st.decide(Decision::Restore).unwrap(), Decision::Restore);
        assert_eq!(st.decide(Decision::Abort).unwrap(), Decision::Restore);
        let other = StageDir::new(d.path(), "u", "d").unwrap();
        assert_eq!(other.decide(Decision::Abort).unwrap(), Decision::Abort);
        assert_eq!(other.decide(Decision::Restore).unwrap(), Decision::Abort);
    }

    #[test]
    fn a_migrations_stages_are_found_on_disk() {
        let d = tempfile::tempdir().unwrap();
        assert!(stages_of(d.path(), "m").is_empty(), "no restore dir yet");
        let plan = |id: &str| {
            serde_json::to_vec(&RestorePlan {
                migration_id: id.into(),
                ..Default::default()
            })
            .unwrap()
        };
        for (pod, c, id) in [("u1", "a", "m"), ("u1", "b", "m"), ("u2", "a", "other")] {
            StageDir::new(d.path(), pod, c)
                .unwrap()
                .mark(PLAN, &plan(id))
                .unwrap();
        }
        // A stage without a readable plan is nobody's.
        std::fs::create_dir_all(d.path().join("restore/u3/a")).unwrap();
        std::fs::write(d.path().join("restore/u3/a").join(PLAN), b"{").unwrap();
        let mut found: Vec<String> = stages_of(d.path(), "m")
            .iter()
            .map(|s| s.dir.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        found.sort();
        assert_eq!(found, ["restore/u1/a", "restore/u1/b"]);
    }
}
