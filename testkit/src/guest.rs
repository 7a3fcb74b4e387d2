//! The VM test guest (built by `scripts/build-test-guest.sh`) run by ferry-launcher on a
//! simulated node, registered for that node's daemon, plus readers of its checkable
//! state: the guest prints `count N` once a second on its serial console.
use crate::netns::Node;
use crate::process::ChildGuard;
use anyhow::{Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    let cache = std::env::var("FERRY_CACHE").unwrap_or_else(|_| "/var/cache/ferry".into());
    let root = Path::new(&cache).join("guest");
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
        cmd.args(["--append", "console=ttyS0 quiet panic=-1 ferry.dirty=1"]);
    }
    Ok(cmd)
}

/// A guest started by ferry-launcher and registered under a node's VM root as a pod.
pub struct Guest {
    pub guard: ChildGuard,
    /// Its registry directory (`<vm_root>/<namespace>_<pod>`): qmp.sock, serial.log.
    pub dir: PathBuf,
}

impl Guest {
    pub fn launch(
        node: &Node,
        launcher: &Path,
        vm_root: &Path,
        namespace: &str,
        pod: &str,
        memory_mib: u32,
    ) -> Result<Guest> {
        Self::launch_with(node, launcher, vm_root, namespace, pod, memory_mib, false)
    }

    /// With `busy`, see [`launcher_command`].
    pub fn launch_with(
        node: &Node,
        launcher: &Path,
        vm_root: &Path,
        namespace: &str,
        pod: &str,
        memory_mib: u32,
        busy: bool,
    ) -> Result<Guest> {
        let mut cmd = launcher_command(node, launcher, memory_mib, busy)?;
        cmd.arg("--vm-root")
            .arg(vm_root)
            .args(["--namespace", namespace, "--pod", pod]);
        let guard = ChildGuard::spawn(&format!("launcher-{pod}"), cmd)?;
        Ok(Guest {
            guard,
            dir: vm_root.join(format!("{namespace}_{pod}")),
        })
    }

    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
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
