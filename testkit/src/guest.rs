//! The VM test guest (built by `scripts/build-test-guest.sh`) run by ferry-launcher, plus
//! readers of its checkable state: the guest prints `count N` once a second on its serial
//! console.
//!
//! Two ways to run it as a VM pod: [`Guest::launch`] starts the launcher on a simulated
//! node with the environment a kubelet would give the pod's container (tests of the
//! daemon without a kubelet play the kubelet this way), and [`launcher_image`] +
//! [`vm_pod_manifest`] give a real kubelet the image and the Pod.
use crate::netns::Node;
use crate::oci::{ImageBuilder, add_with_libs};
use crate::process::ChildGuard;
use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The launcher's environment, from the Downward API. The names are
/// `ferry_node::vm::registry::ENV_*` (testkit does not depend on ferry-node);
/// `node-daemon/tests/vm_daemon.rs` checks that they agree.
pub mod env {
    pub const VM_ROOT: &str = "FERRY_VM_ROOT";
    pub const POD_NAMESPACE: &str = "FERRY_POD_NAMESPACE";
    pub const POD_NAME: &str = "FERRY_POD_NAME";
    pub const POD_UID: &str = "FERRY_POD_UID";
    pub const NODE_NAME: &str = "FERRY_NODE_NAME";
    pub const INCOMING: &str = "FERRY_INCOMING";
    /// The annotation `INCOMING` is read from.
    pub const INCOMING_ANNOTATION: &str = "ferry.dev/incoming";
}

/// The launcher image's ref (imagePullPolicy Never: imported into each node's containerd).
pub const LAUNCHER_IMAGE: &str = "ferry.dev/ferry-launcher:test";
/// Where [`vm_pod_manifest`] mounts the test guest inside the VM pod.
pub const GUEST_MOUNT: &str = "/guest";

/// The built test guest: `FERRY_GUEST_DIR`, else the newest build in the cache.
pub fn guest_dir() -> Result<PathBuf> {
    let hint = "run scripts/build-test-guest.sh (or set FERRY_GUEST_DIR to its output)";
    if let Ok(d) = std::env::var("FERRY_GUEST_DIR") {
        let d = PathBuf::from(d);
        ensure!(
            d.join("vmlinuz").is_file(),
            "FERRY_GUEST_DIR={} has no vmlinuz; {hint}",
            d.display()
        );
        return Ok(d);
    }
    let root = cache_root().join("guest");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("vmlinuz").is_file() && p.join("initramfs.gz").is_file())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    match found.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("test guest missing under {}: {hint}", root.display()),
    }
}

fn cache_root() -> PathBuf {
    PathBuf::from(std::env::var("FERRY_CACHE").unwrap_or_else(|_| "/var/cache/ferry".into()))
}

/// The kernel command line of a guest that keeps rewriting 64 MiB of its memory.
const BUSY_APPEND: &str = "console=ttyS0 quiet panic=-1 ferry.dirty=1";

/// ferry-launcher on `node` booting the test guest with `memory_mib` (accelerator
/// chosen by the launcher). With `busy` the guest keeps rewriting 64 MiB of its memory
/// (`ferry.dirty=1`). Callers add where QMP and the serial log go.
pub fn launcher_command(
    node: &Node,
    launcher: &Path,
    memory_mib: u32,
    busy: bool,
) -> Result<std::process::Command> {
    let g = guest_dir()?;
    let mut cmd = node.command(launcher);
    cmd.arg("--kernel")
        .arg(g.join("vmlinuz"))
        .arg("--initrd")
        .arg(g.join("initramfs.gz"))
        .args(["--memory-mib", &memory_mib.to_string(), "--accel", "auto"]);
    if busy {
        cmd.args(["--append", BUSY_APPEND]);
    }
    Ok(cmd)
}

static UID_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A VM pod as its launcher sees it: the Downward API values a kubelet puts in the
/// container's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.nodeName`; empty: not set.
    pub node_name: String,
    /// The `ferry.dev/incoming` annotation: the Migration UID this pod receives; empty
    /// on a pod that boots its guest.
    pub incoming: String,
}

impl VmPod {
    /// A pod that boots its guest, with a fresh UID (UUID-shaped, unique per process
    /// and call).
    pub fn new(namespace: &str, name: &str) -> VmPod {
        let seq = UID_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        VmPod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!(
                "{:08x}-{:04x}-4000-8000-{:012x}",
                std::process::id(),
                seq & 0xffff,
                nanos & 0xffff_ffff_ffff
            ),
            node_name: String::new(),
            incoming: String::new(),
        }
    }

    /// The same pod with UID `uid` (of a Pod object that exists).
    pub fn with_uid(mut self, uid: &str) -> VmPod {
        self.uid = uid.into();
        self
    }

    /// The target pod of migration `migration_uid`: its launcher waits for the guest.
    pub fn incoming(mut self, migration_uid: &str) -> VmPod {
        self.incoming = migration_uid.into();
        self
    }

    pub fn on_node(mut self, node_name: &str) -> VmPod {
        self.node_name = node_name.into();
        self
    }

    /// The container environment for this pod, as the kubelet resolves
    /// [`vm_pod_manifest`]'s Downward API references (FERRY_INCOMING is always set,
    /// empty on a pod that boots).
    pub fn env(&self, vm_root: &Path) -> Vec<(&'static str, String)> {
        vec![
            (env::VM_ROOT, vm_root.display().to_string()),
            (env::POD_NAMESPACE, self.namespace.clone()),
            (env::POD_NAME, self.name.clone()),
            (env::POD_UID, self.uid.clone()),
            (env::NODE_NAME, self.node_name.clone()),
            (env::INCOMING, self.incoming.clone()),
        ]
    }
}

/// A guest run by ferry-launcher and registered under a node's VM root as a pod.
pub struct Guest {
    pub guard: ChildGuard,
    pub pod: VmPod,
    /// Its registry directory (`<vm_root>/<pod-uid>`): vm.json, qmp.sock, serial.log.
    pub dir: PathBuf,
}

impl Guest {
    /// Starts the launcher for `pod` on `node` the way a kubelet starts a VM pod's
    /// container: the pod's identity in the environment, the VM root shared with the
    /// node's daemon. Stopping (or dropping) the guard is the kubelet ending the pod.
    /// With `busy`, see [`launcher_command`].
    pub fn launch(
        node: &Node,
        launcher: &Path,
        vm_root: &Path,
        pod: &VmPod,
        memory_mib: u32,
        busy: bool,
    ) -> Result<Guest> {
        let mut cmd = launcher_command(node, launcher, memory_mib, busy)?;
        cmd.envs(pod.env(vm_root));
        let dir = vm_root.join(&pod.uid);
        std::fs::create_dir_all(vm_root)?;
        let guard = ChildGuard::spawn(&format!("launcher-{}", pod.name), cmd)?;
        Ok(Guest {
            guard,
            pod: pod.clone(),
            dir,
        })
    }

    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
}

/// The registry directory of pod `namespace/name` under `vm_root`, for a pod whose UID
/// the caller does not know (one the controller created).
pub fn registered_dir(vm_root: &Path, namespace: &str, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(vm_root).ok()?.flatten().find_map(|e| {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path().join("vm.json")).ok()?).ok()?;
        (rec["namespace"] == namespace && rec["pod_name"] == name).then(|| e.path())
    })
}

/// The firmware QEMU loads for the launcher's machine (`-machine pc`, `-kernel`, the
/// default VGA, no NIC): SeaBIOS, the VGA BIOS, the `-kernel` option ROM, and the KVM
/// vAPIC ROM.
const FIRMWARE: &[&str] = &[
    "bios-256k.bin",
    "vgabios-stdvga.bin",
    "linuxboot_dma.bin",
    "kvmvapic.bin",
];

/// QEMU's firmware search path (`-L help`), in its order.
fn qemu_data_dirs(qemu: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new(qemu)
        .args(["-L", "help"])
        .output()
        .with_context(|| format!("running {} -L help", qemu.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.is_absolute())
        .collect())
}

/// The ferry-launcher image, ref [`LAUNCHER_IMAGE`]: the workspace's ferry-launcher
/// (entrypoint) and the host's qemu-system-x86_64 with their shared libraries and the
/// firmware QEMU needs, at the host's paths. Written once per content to
/// `$FERRY_CACHE/images/ferry-launcher-<digest>.tar`.
pub fn launcher_image() -> Result<PathBuf> {
    let b = launcher_builder(&crate::workspace_bin("ferry-launcher")?, LAUNCHER_IMAGE)?;
    let dir = cache_root().join("images");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(
        "ferry-launcher.building.{}.tar",
        std::process::id()
    ));
    let digest = b.write(&tmp)?;
    let out = dir.join(format!(
        "ferry-launcher-{}.tar",
        &digest.trim_start_matches("sha256:")[..16]
    ));
    if out.exists() {
        std::fs::remove_file(&tmp)?;
    } else {
        std::fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

/// What the launcher image holds, named `reference`: `launcher` (the entrypoint) and
/// this machine's QEMU with their libraries and the firmware QEMU needs (ferry's
/// versioned image, `oci::ferry`, is the same with a release build).
pub fn launcher_builder(launcher: &Path, reference: &str) -> Result<ImageBuilder> {
    let qemu = which("qemu-system-x86_64")?;
    let mut b = ImageBuilder::new(reference);
    add_with_libs(&mut b, launcher, "/usr/bin/ferry-launcher")?;
    add_with_libs(&mut b, &qemu, "/usr/bin/qemu-system-x86_64")?;
    let dirs = qemu_data_dirs(&qemu)?;
    for name in FIRMWARE {
        let host = dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .with_context(|| format!("QEMU firmware {name} not found in {dirs:?}"))?;
        b.file(&host, &host.display().to_string(), 0o644);
    }
    // The accelerator probe's cache and scratch space (`--accel auto`).
    b.dir("/var/cache/ferry/accel")
        .dir("/tmp")
        .dir(GUEST_MOUNT)
        .env("FERRY_QEMU=/usr/bin/qemu-system-x86_64")
        .entrypoint(&["/usr/bin/ferry-launcher"]);
    Ok(b)
}

pub(crate) fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not on PATH (scripts/install-qemu.sh)"))
}

/// A VM pod running the test guest under ferry-launcher ([`launcher_image`]), TCG: the
/// Downward API environment the launcher reads, the node's VM root as a hostPath at the
/// same path, and the test guest's directory read-only at [`GUEST_MOUNT`]. The
/// controller sets `ferry.dev/incoming` on a target copy; this pod boots.
pub fn vm_pod_manifest(name: &str, memory_mib: u32, vm_root: &Path) -> serde_json::Value {
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env_from = |name: &str, path: &str| {
        let mut v = field(path);
        v["name"] = json!(name);
        v
    };
    let guest = guest_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| cache_root().join("guest").display().to_string());
    let root = vm_root.display().to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "compute",
                "image": LAUNCHER_IMAGE,
                "imagePullPolicy": "Never",
                "args": [
                    "--kernel", format!("{GUEST_MOUNT}/vmlinuz"),
                    "--initrd", format!("{GUEST_MOUNT}/initramfs.gz"),
                    "--memory-mib", memory_mib.to_string(),
                    "--accel", "tcg",
                ],
                "env": [
                    {"name": env::VM_ROOT, "value": root},
                    env_from(env::POD_NAMESPACE, "metadata.namespace"),
                    env_from(env::POD_NAME, "metadata.name"),
                    env_from(env::POD_UID, "metadata.uid"),
                    env_from(env::NODE_NAME, "spec.nodeName"),
                    env_from(env::INCOMING, &format!("metadata.annotations['{}']", env::INCOMING_ANNOTATION)),
                ],
                "volumeMounts": [
                    {"name": "vm-root", "mountPath": root},
                    {"name": "guest", "mountPath": GUEST_MOUNT, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "vm-root", "hostPath": {"path": root, "type": "DirectoryOrCreate"}},
                {"name": "guest", "hostPath": {"path": guest, "type": "Directory"}},
            ],
        },
    })
}

/// The last `count N` the guest printed into a serial log.
pub fn last_count(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("count ")?.trim().parse().ok())
}

/// The first `count N` the guest printed into a serial log.
pub fn first_count(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("count ")?.trim().parse().ok())
}

/// Every `sum HEX` line the guest printed: the checksum of 32 MiB it wrote once at boot
/// and never changes, so all of them, before and after a migration, must be equal.
pub fn sums(serial: &Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Some(l.trim().strip_prefix("sum ")?.trim().to_string()))
        .collect()
}

/// Waits until the guest behind `serial` printed a count above `above`; returns it.
pub async fn wait_count_above(serial: &Path, above: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = last_count(serial)
            && n > above
        {
            return Ok(n);
        }
        if Instant::now() > deadline {
            let bytes = std::fs::read(serial).unwrap_or_default();
            let tail = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(400)..]);
            bail!(
                "{}: no count above {above} within {timeout:?}; log tail: {tail:?}",
                serial.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_are_unique_and_path_safe() {
        let (a, b) = (VmPod::new("ns", "a"), VmPod::new("ns", "a"));
        assert_ne!(a.uid, b.uid);
        assert!(!a.uid.contains('/') && !a.uid.starts_with('.'));
        assert_eq!(a.uid.len(), 36, "{}", a.uid);
    }

    #[test]
    fn the_manifest_gives_the_launcher_its_pod() {
        let p = vm_pod_manifest("vm-1", 256, Path::new("/run/ferry/vms"));
        let c = &p["spec"]["containers"][0];
        assert_eq!(c["image"], LAUNCHER_IMAGE);
        assert_eq!(c["imagePullPolicy"], "Never");
        let env = c["env"].as_array().unwrap();
        let path_of = |n: &str| {
            env.iter()
                .find(|e| e["name"] == n)
                .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
        };
        assert_eq!(path_of(env::POD_UID), Some(json!("metadata.uid")));
        assert_eq!(
            path_of(env::INCOMING),
            Some(json!("metadata.annotations['ferry.dev/incoming']"))
        );
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/run/ferry/vms");
        assert_eq!(
            p["spec"]["volumes"][0]["hostPath"]["path"],
            "/run/ferry/vms"
        );
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert!(args.windows(2).any(|w| w == ["--accel", "tcg"]), "{args:?}");
        assert!(
            args.windows(2).any(|w| w == ["--kernel", "/guest/vmlinuz"]),
            "{args:?}"
        );
    }
}
