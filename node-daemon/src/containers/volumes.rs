//! emptyDir volumes move with the pod. Their files live on the node, outside every
//! container's rootfs, so neither CRIU's images nor the writable-layer diff hold them;
//! a process that keeps one of them open could not even be restored without it.
//!
//! Each emptyDir travels once, in the bundle of one container that mounts it (its
//! *carrier*: the first such container by name, so both ends agree), as
//! `volumes/<name>.tar`, packed while the pod is frozen. The source's description
//! names the carriers ([`PodVolumes`], the workload's `runtime_spec`, which the
//! controller carries unchanged to the destination's plan). At the target, the first
//! wrapper whose container mounts the volume waits for the carrier's stage, unpacks the
//! tar into the target Pod's (fresh, empty) emptyDir dir, and marks it filled; the
//! others find it filled. The kubelet made that dir before it ran the gate, and it is
//! the container's own mount: whatever the tar says, nothing lands outside it
//! ([`rootfs::apply_diff`]).
use super::rootfs;
use super::staging::{self, StageDir};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The stage subdirectory holding a carrier's volume tars.
pub const VOLUMES: &str = "volumes";
/// The kubelet's directory of a pod's emptyDir volumes: `<pod dir>/volumes/<this>/<name>`.
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

/// Which container carries each emptyDir of a pod: volume name → container name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodVolumes {
    #[serde(default)]
    pub empty_dirs: BTreeMap<String, String>,
}

impl PodVolumes {
    /// From a description's `runtime_spec`: empty means no emptyDir (older sources).
    pub fn parse(runtime_spec: &[u8]) -> Result<PodVolumes, String> {
        if runtime_spec.is_empty() {
            return Ok(PodVolumes::default());
        }
        let v: PodVolumes = serde_json::from_slice(runtime_spec)
            .map_err(|e| format!("the pod's volume description is unreadable: {e}"))?;
        // Names become path components at the destination.
        if let Some((vol, c)) = v
            .empty_dirs
            .iter()
            .find(|(vol, c)| !staging::safe_component(vol) || !staging::safe_component(c))
        {
            return Err(format!(
                "bad emptyDir {vol:?} or carrier container {c:?} in the volume description"
            ));
        }
        Ok(v)
    }

    pub fn to_spec(&self) -> Vec<u8> {
        if self.empty_dirs.is_empty() {
            return Vec::new();
        }
        serde_json::to_vec(self).expect("json")
    }
}

/// The emptyDir mounts in a container's OCI config: (volume name, host dir). A mount's
/// source is the kubelet's `<root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`.
pub fn empty_dirs(config: &serde_json::Value) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for m in config["mounts"].as_array().into_iter().flatten() {
        let Some(src) = m["source"].as_str().map(Path::new) else {
            continue;
        };
        let plugin = src.parent().and_then(Path::file_name);
        let name = src.file_name().and_then(|n| n.to_str());
        if plugin.is_some_and(|p| p == EMPTY_DIR_PLUGIN)
            && let Some(name) = name
            && !found.iter().any(|(n, _)| n == name)
        {
            found.push((name.to_string(), src.to_path_buf()));
        }
    }
    found
}

/// The carrier of each emptyDir among `containers` (name, OCI config), and its host dir.
pub fn carriers<'a>(
    containers: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>,
) -> BTreeMap<String, (String, PathBuf)> {
    let mut sorted: Vec<_> = containers.into_iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    let mut out = BTreeMap::new();
    for (name, config) in sorted {
        for (vol, dir) in empty_dirs(config) {
            out.entry(vol).or_insert_with(|| (name.to_string(), dir));
        }
    }
    out
}

/// Packs the volumes `container` carries into `<cdir>/volumes/<name>.tar` (while the
/// pod is frozen); returns the bytes of their files.
pub fn pack(
    carriers: &BTreeMap<String, (String, PathBuf)>,
    container: &str,
    cdir: &Path,
) -> std::io::Result<u64> {
    let out = cdir.join(VOLUMES);
    let _ = std::fs::remove_dir_all(&out);
    let mut bytes = 0;
    for (vol, (carrier, dir)) in carriers {
        if carrier != container {
            continue;
        }
        std::fs::create_dir_all(&out)?;
        // An emptyDir has no whiteouts; the list write_diff makes stays in the work dir.
        let discard = cdir.join(staging::WORK).join(format!("{vol}.deleted"));
        rootfs::write_diff(dir, &out.join(format!("{vol}.tar")), &discard)?;
        bytes += rootfs::tree_bytes(dir);
    }
    Ok(bytes)
}

/// Fills the emptyDirs the container mounts (its OCI `config`) from their carriers'
/// stages under `pod_stages`, waiting for a carrier's bundle until `deadline`. A
/// volume the plan does not name (the pod had none, or a source that did not move
/// them) is left as the kubelet made it.
pub fn fill(
    pod_stages: &Path,
    config: &serde_json::Value,
    plan: &BTreeMap<String, String>,
    deadline: Instant,
) -> Result<(), String> {
    for (vol, dir) in empty_dirs(config) {
        let Some(carrier) = plan.get(&vol) else {
            continue;
        };
        let stage = StageDir {
            dir: pod_stages.join(carrier),
        };
        while !stage.has(staging::READY) {
            if stage.has(staging::ABORTED) {
                return Err(format!(
                    "the migration was aborted before emptyDir {vol} arrived"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "emptyDir {vol} (carried by container {carrier}) did not arrive in time"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Containers sharing the volume are created one after another by the kubelet,
        // but a retried create may overlap another: one fills, under the lock.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(stage.path(&format!("{vol}.fill.lock")))
            .map_err(|e| format!("locking emptyDir {vol}: {e}"))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking emptyDir {vol}: {e}"))?;
        let filled = format!("{vol}.filled");
        if stage.has(&filled) {
            continue;
        }
        let tar = stage.path(VOLUMES).join(format!("{vol}.tar"));
        if !tar.exists() {
            return Err(format!(
                "the bundle of container {carrier} lacks emptyDir {vol}"
            ));
        }
        rootfs::apply_diff(&dir, &tar, &stage.path(staging::WORK).join("none"))
            .map_err(|e| format!("filling emptyDir {vol} at {}: {e}", dir.display()))?;
        stage
            .mark(&filled, b"")
            .map_err(|e| format!("marking emptyDir {vol} filled: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(mounts: &[&str]) -> serde_json::Value {
        json!({"mounts": mounts.iter().map(|s| json!({"destination": "/x", "source": s})).collect::<Vec<_>>()})
    }

    #[test]
    fn carriers_are_the_first_container_by_name_that_mounts_each_emptydir() {
        let ed = |uid: &str, v: &str| {
            format!("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/{v}")
        };
        let b = config(&[&ed("u", "shared"), &ed("u", "own-b"), "/etc/hosts"]);
        let a = config(&[
            &ed("u", "shared"),
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/cfg",
        ]);
        let c = carriers([("b", &b), ("a", &a)]);
        let names: Vec<_> = c
            .iter()
            .map(|(v, (c, _))| (v.as_str(), c.as_str()))
            .collect();
        assert_eq!(names, [("own-b", "b"), ("shared", "a")]);
        assert_eq!(c["shared"].1, PathBuf::from(ed("u", "shared")));
    }

    #[test]
    fn a_volume_description_with_path_tricks_is_refused() {
        let spec = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
        assert!(PodVolumes::parse(&spec(json!({"emptyDirs": {"../x": "a"}}))).is_err());
        assert!(PodVolumes::parse(&spec(json!({"emptyDirs": {"x": "a/b"}}))).is_err());
        assert_eq!(PodVolumes::parse(b"").unwrap(), PodVolumes::default());
        let ok = PodVolumes {
            empty_dirs: BTreeMap::from([("x".into(), "a".into())]),
        };
        assert_eq!(PodVolumes::parse(&ok.to_spec()).unwrap(), ok);
    }

    #[test]
    fn a_volume_packed_at_the_source_fills_the_target_once() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src/volumes/kubernetes.io~empty-dir/scratch");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/f"), b"kept").unwrap();
        let carry = carriers([("a", &config(&[src.to_str().unwrap()]))]);
        let stages = t.path().join("stages");
        let cdir = stages.join("a");
        std::fs::create_dir_all(cdir.join(staging::WORK)).unwrap();
        assert_eq!(pack(&carry, "a", &cdir).unwrap(), 4);
        assert_eq!(pack(&carry, "b", &cdir.with_file_name("b")).unwrap(), 0);
        std::fs::write(cdir.join(staging::READY), b"").unwrap();
        let dst = t.path().join("dst/volumes/kubernetes.io~empty-dir/scratch");
        std::fs::create_dir_all(&dst).unwrap();
        let plan = BTreeMap::from([("scratch".to_string(), "a".to_string())]);
        let target = config(&[dst.to_str().unwrap()]);
        let soon = Instant::now() + Duration::from_secs(1);
        fill(&stages, &target, &plan, soon).unwrap();
        assert_eq!(std::fs::read(dst.join("sub/f")).unwrap(), b"kept");
        // A second container sharing it finds it filled: the workload's later writes
        // are not overwritten.
        std::fs::write(dst.join("sub/f"), b"newer").unwrap();
        fill(&stages, &target, &plan, soon).unwrap();
        assert_eq!(std::fs::read(dst.join("sub/f")).unwrap(), b"newer");
    }

    #[test]
    fn a_carrier_that_never_arrives_fails_the_create_with_the_volume_named() {
        let t = tempfile::tempdir().unwrap();
        let dst = t.path().join("dst/volumes/kubernetes.io~empty-dir/scratch");
        let plan = BTreeMap::from([("scratch".to_string(), "a".to_string())]);
        let err = fill(
            t.path(),
            &config(&[dst.to_str().unwrap()]),
            &plan,
            Instant::now() + Duration::from_millis(20),
        )
        .unwrap_err();
        assert!(err.contains("emptyDir scratch"), "{err}");
    }
}
